//! The pure HTTP/1.1 layer of the gateway: no I/O, no runtime, no async.
//!
//! The connection loop feeds bytes from its read buffer into [`parse_head`] (one httparse call
//! per attempt), frames the body with [`BodyFraming`] (a byte count, or [`ChunkedDecoder`]), and
//! writes answers with [`write_response_head`] and [`error_body`].
//!
//! Strictness is deliberate: this is the edge of a multi-tenant proxy, so anything that two HTTP
//! implementations could frame differently (request smuggling) is refused with an error whose
//! [`HttpError::closes_connection`] is true. Decisions worth knowing:
//! - Only CRLF line endings; obs-fold, bare LF, NUL and control characters are refused.
//! - Content-Length must appear at most once (a repeated header is refused even if equal) and
//!   be plain digits; Transfer-Encoding must appear at most once and be exactly `chunked`; both
//!   together are refused; Transfer-Encoding in an HTTP/1.0 request is refused (RFC 9112 §6.1).
//! - Only origin-form targets (`/path?query`): absolute-form, authority-form and asterisk-form are
//!   400 (the gateway is not a forward proxy and has no use for `OPTIONS *`). A `#` in the target
//!   is 400 (fragments are never sent on the wire).
//! - HTTP/1.1 requests need exactly one `Host` header (RFC 9112 §3.2); a repeated `Host` is 400
//!   for any version.
//! - A syntactically valid version other than 1.0/1.1 (`HTTP/2.0`, `HTTP/1.2`) and the HTTP/2
//!   prior-knowledge preface are 505; a malformed version or a missing one (HTTP/0.9) is 400.
//! - `max_uri_bytes` bounds the request-target (not the whole request line); `max_header_bytes`
//!   bounds the whole head (request line, fields and the final CRLF).
//! - The captured `x-moltbot-user`, `authorization` and `content-type` must not repeat (an
//!   ambiguous user or credential is refused rather than guessed).

use std::mem::MaybeUninit;

use serde::Serialize;

/// Size limits of one request. Each bound is inclusive: a value exactly at the limit is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of the whole request head, request line to the blank line included (431 beyond).
    pub max_header_bytes: usize,
    /// Number of header fields (431 beyond).
    pub max_headers: usize,
    /// Bytes of the decoded request body (413 beyond).
    pub max_body_bytes: usize,
    /// Bytes of the request-target (414 beyond).
    pub max_uri_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_body_bytes: 1024 * 1024,
            max_uri_bytes: 8 * 1024,
        }
    }
}

/// Why a request could not be accepted. Every variant maps to a status and an error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Malformed or ambiguous framing (400). The connection cannot be trusted any more.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// A well-framed request whose path cannot be used (400); the connection stays usable.
    #[error("invalid request path: {0}")]
    InvalidPath(&'static str),
    /// The head is too large or has too many fields (431).
    #[error("request header fields too large: {0}")]
    HeaderTooLarge(&'static str),
    /// The request-target is longer than `max_uri_bytes` (414).
    #[error("request-target longer than the configured limit")]
    UriTooLong,
    /// The body is larger than `max_body_bytes` (413).
    #[error("request body larger than the configured limit")]
    BodyTooLarge,
    /// A protocol version other than HTTP/1.0 and HTTP/1.1 (505).
    #[error("HTTP version not supported: {0}")]
    VersionNotSupported(&'static str),
}

impl HttpError {
    /// The HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) | Self::InvalidPath(_) => 400,
            Self::HeaderTooLarge(_) => 431,
            Self::UriTooLong => 414,
            Self::BodyTooLarge => 413,
            Self::VersionNotSupported(_) => 505,
        }
    }

    /// The machine-readable code of the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) | Self::InvalidPath(_) => "BAD_REQUEST",
            Self::HeaderTooLarge(_) => "HEADERS_TOO_LARGE",
            Self::UriTooLong => "URI_TOO_LONG",
            Self::BodyTooLarge => "BODY_TOO_LARGE",
            Self::VersionNotSupported(_) => "VERSION_NOT_SUPPORTED",
        }
    }

    /// Whether the connection must be closed after the error response: true for every error
    /// raised while reading a request (its end is unknown or untrustworthy), false only for
    /// [`HttpError::InvalidPath`], which is raised on a fully framed request.
    pub fn closes_connection(&self) -> bool {
        !matches!(self, Self::InvalidPath(_))
    }

    /// Appends a complete error response (head and JSON body) for this error.
    pub fn write_response(&self, out: &mut Vec<u8>) {
        let body = error_body(self.code(), &self.to_string(), false, None);
        write_response_head(
            out,
            self.status(),
            "application/json",
            body.len(),
            !self.closes_connection(),
            &[],
        );
        out.extend_from_slice(&body);
    }
}

/// The request method. Methods are case-sensitive: `get` is [`Method::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
    /// `CONNECT`
    Connect,
    /// `OPTIONS`
    Options,
    /// `TRACE`
    Trace,
    /// `PATCH`
    Patch,
    /// Any other syntactically valid method token (answered 405 by the endpoint layer).
    Other,
}

impl Method {
    fn from_token(token: &str) -> Self {
        match token {
            "GET" => Self::Get,
            "POST" => Self::Post,
            "PUT" => Self::Put,
            "DELETE" => Self::Delete,
            "HEAD" => Self::Head,
            "PATCH" => Self::Patch,
            "OPTIONS" => Self::Options,
            "CONNECT" => Self::Connect,
            "TRACE" => Self::Trace,
            _ => Self::Other,
        }
    }

    /// The method token; `"OTHER"` for [`Method::Other`] (a label for logs and metrics).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
            Self::Connect => "CONNECT",
            Self::Options => "OPTIONS",
            Self::Trace => "TRACE",
            Self::Patch => "PATCH",
            Self::Other => "OTHER",
        }
    }
}

/// The protocol version of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// `HTTP/1.0`
    Http10,
    /// `HTTP/1.1`
    Http11,
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// Neither Content-Length nor Transfer-Encoding: no body.
    None,
    /// `Content-Length: n` (already checked against `max_body_bytes`); may be 0.
    Length(u64),
    /// `Transfer-Encoding: chunked`: decode with [`ChunkedDecoder`].
    Chunked,
}

/// A parsed request head. Owns its data so that the connection can shift its read buffer.
/// Its `Debug` output redacts the `authorization` value, so logging a head leaks no credential.
#[derive(Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method.
    pub method: Method,
    /// The request-target in origin-form (`/path` or `/path?query`), as sent (not decoded).
    pub target: String,
    /// The protocol version.
    pub version: Version,
    /// Bytes of the head in the buffer (leading empty lines included); the body starts here.
    pub head_len: usize,
    /// Whether the connection stays open after the response (version default and `Connection`).
    pub keep_alive: bool,
    /// How the body is delimited.
    pub body: BodyFraming,
    /// `Expect: 100-continue` on an HTTP/1.1 request that has a non-empty body: send
    /// [`CONTINUE_100`] before reading the body unless its bytes are already buffered.
    pub expect_continue: bool,
    /// The raw `x-moltbot-user` value (may be non-UTF-8; the endpoint layer validates it).
    pub user: Option<Vec<u8>>,
    /// The `authorization` value (ASCII, else the request is refused).
    pub authorization: Option<String>,
    /// The `content-type` value (ASCII, else the request is refused).
    pub content_type: Option<String>,
    /// `Upgrade: websocket` was asked for.
    pub upgrade_websocket: bool,
    /// `Connection` lists `upgrade`.
    pub connection_upgrade: bool,
    /// The `sec-websocket-key` value (ASCII).
    pub websocket_key: Option<String>,
    /// The raw `sec-websocket-version` value.
    pub websocket_version: Option<Vec<u8>>,
    /// `Accept` lists `text/event-stream`.
    pub accepts_event_stream: bool,
}

impl std::fmt::Debug for RequestHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestHead")
            .field("method", &self.method)
            .field("target", &self.target)
            .field("version", &self.version)
            .field("head_len", &self.head_len)
            .field("keep_alive", &self.keep_alive)
            .field("body", &self.body)
            .field("expect_continue", &self.expect_continue)
            .field("user", &self.user.as_deref().map(String::from_utf8_lossy))
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("content_type", &self.content_type)
            .finish()
    }
}

impl RequestHead {
    /// The path part of the target (before `?`).
    pub fn path(&self) -> &str {
        split_target(&self.target).0
    }

    /// The query part of the target (after `?`), if any.
    pub fn query(&self) -> Option<&str> {
        split_target(&self.target).1
    }
}

/// Header slots kept on the stack; a larger `max_headers` falls back to one heap allocation.
const STACK_HEADERS: usize = 128;

/// Parses the request head at the start of `buf`.
///
/// `buf` may hold a partial head (`Ok(None)`: read more), one complete head, or a head followed
/// by body bytes and further pipelined requests (only the first head is parsed; the body starts
/// at `head_len`). An incomplete head that already fills `max_header_bytes` is an error, so a
/// caller may cap its head buffer at that size.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<RequestHead>, HttpError> {
    if limits.max_headers <= STACK_HEADERS {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        parse_with_slots(buf, limits, &mut slots[..limits.max_headers])
    } else {
        let mut slots = Vec::with_capacity(limits.max_headers);
        slots.resize_with(limits.max_headers, MaybeUninit::uninit);
        parse_with_slots(buf, limits, &mut slots)
    }
}

fn parse_with_slots<'b>(
    buf: &'b [u8],
    limits: &Limits,
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<RequestHead>, HttpError> {
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return incomplete(buf, limits),
        Err(e) => return Err(classify_parse_error(e, buf)),
    };
    // A complete parse always sets these; their absence would be an httparse bug.
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HttpError::BadRequest("malformed request line"));
    };

    if target.len() > limits.max_uri_bytes {
        return Err(HttpError::UriTooLong);
    }
    if head_len > limits.max_header_bytes {
        return Err(HttpError::HeaderTooLarge(
            "request head larger than the limit",
        ));
    }
    if has_bare_lf(&buf[..head_len]) {
        return Err(HttpError::BadRequest(
            "bare LF line ending (only CRLF is accepted)",
        ));
    }
    check_origin_form(target)?;
    let version = match minor {
        0 => Version::Http10,
        1 => Version::Http11,
        _ => {
            return Err(HttpError::VersionNotSupported(
                "only HTTP/1.0 and HTTP/1.1 are supported",
            ));
        }
    };

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut host_seen = false;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut expect_100 = false;
    let mut user: Option<Vec<u8>> = None;
    let mut authorization: Option<String> = None;
    let mut content_type: Option<String> = None;
    let mut upgrade_websocket = false;
    let mut connection_upgrade = false;
    let mut websocket_key: Option<String> = None;
    let mut websocket_version: Option<Vec<u8>> = None;
    let mut accepts_event_stream = false;

    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        // Dispatch on the length first: most fields are rejected by one integer compare.
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => {
                if host_seen {
                    return Err(HttpError::BadRequest("repeated Host header"));
                }
                host_seen = true;
            }
            6 if name.eq_ignore_ascii_case(b"expect")
                && value.eq_ignore_ascii_case(b"100-continue") =>
            {
                expect_100 = true;
            }
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for token in value.split(|&b| b == b',') {
                    let token = trim_ows(token);
                    if token.eq_ignore_ascii_case(b"close") {
                        conn_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        conn_keep_alive = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        connection_upgrade = true;
                    }
                }
            }
            12 if name.eq_ignore_ascii_case(b"content-type") => {
                if content_type.is_some() {
                    return Err(HttpError::BadRequest("repeated Content-Type header"));
                }
                content_type = Some(ascii_value(value, "non-ASCII Content-Type value")?);
            }
            13 if name.eq_ignore_ascii_case(b"authorization") => {
                if authorization.is_some() {
                    return Err(HttpError::BadRequest("repeated Authorization header"));
                }
                authorization = Some(ascii_value(value, "non-ASCII Authorization value")?);
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                if content_length.is_some() {
                    return Err(HttpError::BadRequest("repeated Content-Length header"));
                }
                content_length = Some(parse_content_length(value)?);
            }
            6 if name.eq_ignore_ascii_case(b"accept") => {
                accepts_event_stream |= value.split(|&b| b == b',').any(|t| {
                    let media = t.split(|&b| b == b';').next().unwrap_or_default();
                    trim_ows(media).eq_ignore_ascii_case(b"text/event-stream")
                });
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => {
                upgrade_websocket |= value
                    .split(|&b| b == b',')
                    .any(|t| trim_ows(t).eq_ignore_ascii_case(b"websocket"));
            }
            17 if name.eq_ignore_ascii_case(b"sec-websocket-key") => {
                if websocket_key.is_some() {
                    return Err(HttpError::BadRequest("repeated Sec-WebSocket-Key header"));
                }
                websocket_key = Some(ascii_value(value, "non-ASCII Sec-WebSocket-Key value")?);
            }
            21 if name.eq_ignore_ascii_case(b"sec-websocket-version") => {
                websocket_version = Some(value.to_vec());
            }
            14 if name.eq_ignore_ascii_case(b"x-moltbot-user") => {
                if user.is_some() {
                    return Err(HttpError::BadRequest("repeated x-moltbot-user header"));
                }
                user = Some(value.to_vec());
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                if chunked {
                    return Err(HttpError::BadRequest("repeated Transfer-Encoding header"));
                }
                if !value.eq_ignore_ascii_case(b"chunked") {
                    return Err(HttpError::BadRequest(
                        "unsupported Transfer-Encoding (only a single `chunked` is accepted)",
                    ));
                }
                chunked = true;
            }
            _ => {}
        }
    }

    let body = match (chunked, content_length) {
        (true, Some(_)) => {
            return Err(HttpError::BadRequest(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        (true, None) if version == Version::Http10 => {
            return Err(HttpError::BadRequest(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        (true, None) => BodyFraming::Chunked,
        (false, Some(n)) => {
            if n > limits.max_body_bytes as u64 {
                return Err(HttpError::BodyTooLarge);
            }
            BodyFraming::Length(n)
        }
        (false, None) => BodyFraming::None,
    };
    if version == Version::Http11 && !host_seen {
        return Err(HttpError::BadRequest("missing Host header"));
    }

    let keep_alive = match version {
        Version::Http11 => !conn_close,
        Version::Http10 => conn_keep_alive && !conn_close,
    };
    // RFC 9110 §10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored, and
    // without a body there is nothing to continue with.
    let has_body = !matches!(body, BodyFraming::None | BodyFraming::Length(0));
    let expect_continue = expect_100 && version == Version::Http11 && has_body;

    Ok(Some(RequestHead {
        method: Method::from_token(method),
        target: target.to_owned(),
        version,
        head_len,
        keep_alive,
        body,
        expect_continue,
        user,
        authorization,
        content_type,
        upgrade_websocket,
        connection_upgrade,
        websocket_key,
        websocket_version,
        accepts_event_stream,
    }))
}

/// An incomplete head: fail early when it can no longer fit the limits.
fn incomplete(buf: &[u8], limits: &Limits) -> Result<Option<RequestHead>, HttpError> {
    if buf.len() > limits.max_uri_bytes && partial_target_len(buf) > limits.max_uri_bytes {
        return Err(HttpError::UriTooLong);
    }
    if buf.len() >= limits.max_header_bytes {
        return Err(HttpError::HeaderTooLarge(
            "request head larger than the limit",
        ));
    }
    Ok(None)
}

/// Counts CRs against LFs. httparse guarantees every CR in an accepted head is followed by LF,
/// so the counts are equal exactly when no LF stands alone. Branch-free, so it vectorises.
fn has_bare_lf(head: &[u8]) -> bool {
    let (mut cr, mut lf) = (0usize, 0usize);
    for &b in head {
        cr += usize::from(b == b'\r');
        lf += usize::from(b == b'\n');
    }
    cr != lf
}

fn check_origin_form(target: &str) -> Result<(), HttpError> {
    let bytes = target.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(HttpError::BadRequest(if target == "*" {
            "asterisk-form request-target is not supported"
        } else if target.contains("://") {
            "absolute-form request-target is not supported (origin-form only)"
        } else {
            "request-target must be origin-form (start with '/')"
        }));
    }
    if bytes.contains(&b'#') {
        return Err(HttpError::BadRequest("fragment in request-target"));
    }
    Ok(())
}

fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    if value.is_empty() {
        return Err(HttpError::BadRequest("empty Content-Length"));
    }
    let mut n: u64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return Err(HttpError::BadRequest("invalid Content-Length"));
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or(HttpError::BadRequest("Content-Length overflows"))?;
    }
    Ok(n)
}

fn ascii_value(value: &[u8], reason: &'static str) -> Result<String, HttpError> {
    if !value.is_ascii() {
        return Err(HttpError::BadRequest(reason));
    }
    // ASCII is always valid UTF-8; the error arm is unreachable but kept panic-free.
    String::from_utf8(value.to_vec()).map_err(|_| HttpError::BadRequest(reason))
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The first request line (after the empty lines a client may send first) and whether its line
/// ending has arrived.
fn request_line(buf: &[u8]) -> (&[u8], bool) {
    let mut start = 0;
    while let Some(&b) = buf.get(start) {
        if b == b'\r' || b == b'\n' {
            start += 1;
        } else {
            break;
        }
    }
    let rest = &buf[start..];
    match rest.iter().position(|&b| b == b'\r' || b == b'\n') {
        Some(end) => (&rest[..end], true),
        None => (rest, false),
    }
}

/// Length of the request-target seen so far (0 if the method has not ended yet).
fn partial_target_len(buf: &[u8]) -> usize {
    let (line, _) = request_line(buf);
    match line.iter().position(|&b| b == b' ') {
        Some(sp) => line[sp + 1..]
            .iter()
            .position(|&b| b == b' ')
            .unwrap_or(line.len() - sp - 1),
        None => 0,
    }
}

/// Turns an httparse error into a specific reason (cold path: the request is refused anyway).
#[cold]
fn classify_parse_error(err: httparse::Error, buf: &[u8]) -> HttpError {
    match err {
        httparse::Error::Version => classify_version(buf),
        httparse::Error::Token => classify_request_line(buf),
        httparse::Error::HeaderName => {
            if buf.windows(2).any(|w| w == b"\n " || w == b"\n\t") {
                HttpError::BadRequest("obs-fold or whitespace at the start of a header line")
            } else {
                HttpError::BadRequest("invalid character in header name")
            }
        }
        httparse::Error::HeaderValue => HttpError::BadRequest("invalid character in header value"),
        httparse::Error::NewLine => {
            HttpError::BadRequest("malformed line ending (only CRLF is accepted)")
        }
        httparse::Error::TooManyHeaders => HttpError::HeaderTooLarge("too many header fields"),
        httparse::Error::Status => HttpError::BadRequest("malformed request line"),
    }
}

fn classify_version(buf: &[u8]) -> HttpError {
    let (line, _) = request_line(buf);
    if line.starts_with(b"PRI * HTTP/2") {
        return HttpError::VersionNotSupported(
            "HTTP/2 connection preface received; this gateway speaks HTTP/1.1 only",
        );
    }
    let token = line.rsplit(|&b| b == b' ').next().unwrap_or_default();
    // A well-formed (possibly still incomplete) `HTTP/DIGIT.DIGIT` is an unsupported version;
    // anything else is a malformed one.
    let well_formed = match token.strip_prefix(b"HTTP/") {
        Some([major, rest @ ..]) if major.is_ascii_digit() => match rest {
            [] | [b'.'] => true,
            [b'.', minor] => minor.is_ascii_digit(),
            _ => false,
        },
        _ => false,
    };
    if well_formed {
        HttpError::VersionNotSupported("only HTTP/1.0 and HTTP/1.1 are supported")
    } else {
        HttpError::BadRequest("malformed HTTP version")
    }
}

fn classify_request_line(buf: &[u8]) -> HttpError {
    let (line, terminated) = request_line(buf);
    let (method, rest) = match line.iter().position(|&b| b == b' ') {
        Some(sp) => (&line[..sp], Some(&line[sp + 1..])),
        None => (line, None),
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return HttpError::BadRequest("invalid method");
    }
    let Some(rest) = rest else {
        return HttpError::BadRequest("malformed request line");
    };
    if terminated && !rest.is_empty() && !rest.contains(&b' ') {
        return HttpError::BadRequest("missing HTTP version (HTTP/0.9 is not supported)");
    }
    HttpError::BadRequest("invalid request-target")
}

/// Progress of one [`ChunkedDecoder::decode`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeProgress {
    /// Input bytes consumed; when `done`, the bytes after them belong to the next request.
    pub consumed: usize,
    /// The last chunk and the trailer section have been read.
    pub done: bool,
}

/// Longest chunk-size line (size and extensions) accepted; extensions are ignored anyway.
const MAX_CHUNK_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting the first hex digit of a chunk size.
    SizeStart,
    /// Inside the hex digits.
    Size,
    /// Whitespace after the size; only an extension may follow.
    SizeWs,
    /// Inside chunk extensions (ignored).
    Ext,
    /// CR of the size line seen, expecting LF.
    SizeLf,
    /// Inside chunk data.
    Data,
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or of the final CRLF).
    TrailerStart,
    /// Inside a trailer line (ignored).
    Trailer,
    /// CR of a trailer line seen, expecting LF.
    TrailerLf,
    /// CR of the final empty line seen, expecting LF.
    EndLf,
    /// The body is complete.
    Done,
    /// An error was returned; the connection must close.
    Failed,
}

/// Incremental decoder of a `Transfer-Encoding: chunked` request body.
///
/// Feed it any split of the input (down to one byte at a time); it keeps its position between
/// calls and never reads past the end of the body.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// Size of the current chunk while its size line is read.
    size: u64,
    /// Bytes left in the current chunk.
    remaining: u64,
    /// Bytes of the current size line.
    line_len: usize,
    /// Bytes of the trailer section.
    trailer_len: usize,
    /// Body bytes delivered so far.
    decoded: u64,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self {
            state: ChunkState::SizeStart,
            size: 0,
            remaining: 0,
            line_len: 0,
            trailer_len: 0,
            decoded: 0,
        }
    }

    /// Whether the whole body has been decoded.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Body bytes decoded so far.
    pub fn decoded_len(&self) -> u64 {
        self.decoded
    }

    /// Decodes from `input`, appending body bytes to `out`.
    pub fn decode(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        limits: &Limits,
    ) -> Result<DecodeProgress, HttpError> {
        self.decode_with(input, limits, |data| out.extend_from_slice(data))
    }

    /// Decodes from `input`, handing each run of body bytes to `sink` (e.g. straight into a ring
    /// slot, without an intermediate buffer). After an error the decoder stays failed.
    pub fn decode_with(
        &mut self,
        input: &[u8],
        limits: &Limits,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<DecodeProgress, HttpError> {
        match self.run(input, limits, &mut sink) {
            Ok(consumed) => Ok(DecodeProgress {
                consumed,
                done: self.state == ChunkState::Done,
            }),
            Err(e) => {
                self.state = ChunkState::Failed;
                Err(e)
            }
        }
    }

    fn run(
        &mut self,
        input: &[u8],
        limits: &Limits,
        sink: &mut impl FnMut(&[u8]),
    ) -> Result<usize, HttpError> {
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            match self.state {
                ChunkState::Done => break,
                ChunkState::Data => {
                    // Bulk copy: the only state that handles more than one byte per step.
                    let avail = &input[i..];
                    let n =
                        usize::try_from(self.remaining).map_or(avail.len(), |r| r.min(avail.len()));
                    sink(&avail[..n]);
                    i += n;
                    self.remaining -= n as u64;
                    self.decoded += n as u64;
                    if self.remaining == 0 {
                        self.state = ChunkState::DataCr;
                    }
                }
                _ => {
                    i += 1;
                    self.step(b, limits)?;
                }
            }
        }
        if self.state == ChunkState::Failed {
            return Err(HttpError::BadRequest("chunked decoder used after an error"));
        }
        Ok(i)
    }

    fn step(&mut self, b: u8, limits: &Limits) -> Result<(), HttpError> {
        use ChunkState as S;
        if matches!(
            self.state,
            S::SizeStart | S::Size | S::SizeWs | S::Ext | S::SizeLf
        ) {
            self.line_len += 1;
            if self.line_len > MAX_CHUNK_LINE {
                return Err(HttpError::BadRequest("chunk-size line too long"));
            }
        }
        if matches!(
            self.state,
            S::TrailerStart | S::Trailer | S::TrailerLf | S::EndLf
        ) {
            self.trailer_len += 1;
            if self.trailer_len > limits.max_header_bytes {
                return Err(HttpError::HeaderTooLarge(
                    "chunked trailer section too large",
                ));
            }
        }
        self.state = match (self.state, b) {
            (S::SizeStart, _) => match hex_val(b) {
                Some(d) => {
                    self.size = u64::from(d);
                    S::Size
                }
                None => return Err(HttpError::BadRequest("invalid chunk size")),
            },
            (S::Size, b'\r') => S::SizeLf,
            (S::Size, b';') => S::Ext,
            (S::Size, b' ' | b'\t') => S::SizeWs,
            (S::Size, _) => {
                let d = hex_val(b).ok_or(HttpError::BadRequest("invalid chunk size"))?;
                self.size = self
                    .size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(u64::from(d)))
                    .ok_or(HttpError::BadRequest("chunk size overflows"))?;
                S::Size
            }
            (S::SizeWs, b' ' | b'\t') => S::SizeWs,
            (S::SizeWs, b';') => S::Ext,
            (S::SizeWs, _) => return Err(HttpError::BadRequest("invalid chunk size")),
            (S::Ext, b'\r') => S::SizeLf,
            (S::Ext, _) if is_field_byte(b) => S::Ext,
            (S::Ext, _) => return Err(HttpError::BadRequest("invalid chunk extension")),
            (S::SizeLf, b'\n') => {
                self.line_len = 0;
                if self.size == 0 {
                    S::TrailerStart
                } else {
                    if self.decoded.saturating_add(self.size) > limits.max_body_bytes as u64 {
                        return Err(HttpError::BodyTooLarge);
                    }
                    self.remaining = self.size;
                    S::Data
                }
            }
            (S::SizeLf, _) => {
                return Err(HttpError::BadRequest("chunk-size line not ended by CRLF"));
            }
            (S::DataCr, b'\r') => S::DataLf,
            (S::DataLf, b'\n') => S::SizeStart,
            (S::DataCr | S::DataLf, _) => {
                return Err(HttpError::BadRequest("chunk data not followed by CRLF"));
            }
            (S::TrailerStart, b'\r') => S::EndLf,
            (S::TrailerStart, _) if is_tchar(b) => S::Trailer,
            (S::TrailerStart, _) => return Err(HttpError::BadRequest("invalid trailer field")),
            (S::Trailer, b'\r') => S::TrailerLf,
            (S::Trailer, _) if is_field_byte(b) => S::Trailer,
            (S::Trailer, _) => return Err(HttpError::BadRequest("invalid trailer field")),
            (S::TrailerLf, b'\n') => S::TrailerStart,
            (S::TrailerLf | S::EndLf, _) if b != b'\n' => {
                return Err(HttpError::BadRequest("trailer line not ended by CRLF"));
            }
            (S::EndLf, _) => S::Done,
            // `run` never steps in these states.
            (S::Data | S::Done | S::Failed | S::TrailerLf, _) => {
                return Err(HttpError::BadRequest("chunked decoder used after an error"));
            }
        };
        Ok(())
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// HTAB, SP, visible ASCII and obs-text: what a field value (or an extension) may hold.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

/// The interim response to `Expect: 100-continue`.
pub const CONTINUE_100: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The reason phrase of a status code: the `http` crate's canonical one (a `&'static str`, so
/// the response head costs no allocation), empty for a code it does not know, which HTTP
/// allows.
pub fn reason_phrase(status: u16) -> &'static str {
    ::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

/// Whether a response with this status carries content: not a 1xx, 204 or 304 (RFC 9110
/// 6.4.1), nor a 205 (15.3.6). The body of an answer with any other status is not written,
/// whatever the worker put in it: bytes after such a head would be read as the next response.
pub fn status_has_content(status: u16) -> bool {
    status >= 200 && !matches!(status, 204 | 205 | 304)
}

/// Appends a response head: status line, `content-type` (omitted when empty), `content-length`
/// (omitted for 1xx, 204 and 304, whose messages end at the head; 0 for 205, which has no
/// content), `connection`, `extra_headers`, blank line.
///
/// Names and values are written as given: they come from the gateway, never from a client, and
/// must not contain CR or LF. `status` must be three digits.
pub fn write_response_head(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    content_length: usize,
    keep_alive: bool,
    extra_headers: &[(&str, &str)],
) {
    debug_assert!((100..=999).contains(&status), "status must be three digits");
    debug_assert!(
        !content_type.contains(['\r', '\n'])
            && extra_headers
                .iter()
                .all(|(n, v)| !n.contains(['\r', '\n']) && !v.contains(['\r', '\n'])),
        "response header names and values must not contain CR or LF"
    );
    let reason = reason_phrase(status);
    let extra: usize = extra_headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 4)
        .sum();
    out.reserve(96 + reason.len() + content_type.len() + extra);

    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !content_type.is_empty() {
        out.extend_from_slice(b"content-type: ");
        out.extend_from_slice(content_type.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if status >= 200 && !matches!(status, 204 | 304) {
        let length = if status_has_content(status) {
            content_length
        } else {
            0
        };
        out.extend_from_slice(b"content-length: ");
        push_decimal(out, length as u64);
        out.extend_from_slice(b"\r\n");
    }
    end_head(out, keep_alive, extra_headers);
}

/// The end of a response head: `connection`, the extra headers, the blank line.
fn end_head(out: &mut Vec<u8>, keep_alive: bool, extra_headers: &[(&str, &str)]) {
    out.extend_from_slice(if keep_alive {
        b"connection: keep-alive\r\n".as_slice()
    } else {
        b"connection: close\r\n".as_slice()
    });
    for (name, value) in extra_headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the head of a 200 response whose body follows in chunks ([`write_chunk`], then
/// [`write_last_chunk`]).
///
/// Without `chunked` (an HTTP/1.0 client, which has no chunked encoding) the body is written as
/// is and ends with the connection: `keep_alive` must then be false.
pub fn write_stream_head(
    out: &mut Vec<u8>,
    content_type: &str,
    chunked: bool,
    keep_alive: bool,
    extra_headers: &[(&str, &str)],
) {
    debug_assert!(
        chunked || !keep_alive,
        "a close-delimited body ends the connection"
    );
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\n");
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    end_head(out, keep_alive, extra_headers);
}

/// Writes one chunk of a chunked body (nothing for an empty `data`, which would end it).
pub fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Ends a chunked body.
pub fn write_last_chunk(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n\r\n");
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorObject<'a> {
    code: &'a str,
    message: &'a str,
    retryable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

/// The gateway's JSON error body `{"error":{"code","message","retryable","retryAfterMs"}}`;
/// `retryAfterMs` is omitted when `None`.
pub fn error_body(
    code: &str,
    message: &str,
    retryable: bool,
    retry_after_ms: Option<u64>,
) -> Vec<u8> {
    let envelope = ErrorEnvelope {
        error: ErrorObject {
            code,
            message,
            retryable,
            retry_after_ms,
        },
    };
    // Serialising borrowed strings, a bool and an integer into a Vec cannot fail; the fallback
    // only keeps this panic-free.
    serde_json::to_vec(&envelope).unwrap_or_else(|_| {
        br#"{"error":{"code":"INTERNAL","message":"error body serialisation failed","retryable":false}}"#
            .to_vec()
    })
}

/// Splits an origin-form target into its path and its query (the part after the first `?`).
pub fn split_target(target: &str) -> (&str, Option<&str>) {
    match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    }
}

/// Percent-decodes one path segment (`+` stays `+`).
///
/// Refused with [`HttpError::InvalidPath`]: a malformed escape (`%`, `%4`, `%zz`), a raw `/` (a
/// segment must stay one segment), an ASCII control character (raw or encoded, `%00`
/// included), and a result that is not UTF-8. An encoded `%2F` is a `/` inside the segment (a
/// user id may hold one); dot segments are returned as they are: the validators of user ids
/// and session names decide about them.
pub fn percent_decode_segment(seg: &str) -> Result<String, HttpError> {
    let bytes = seg.as_bytes();
    if bytes.contains(&b'/') {
        return Err(HttpError::InvalidPath("'/' inside a path segment"));
    }
    // `percent_decode` passes a malformed escape through as it is; here it is an error.
    let malformed = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if malformed {
        return Err(HttpError::InvalidPath("invalid percent-escape"));
    }
    let decoded = percent_encoding::percent_decode(bytes);
    if decoded.clone().any(|b| b.is_ascii_control()) {
        return Err(HttpError::InvalidPath(
            "control character in a path segment",
        ));
    }
    decoded
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| HttpError::InvalidPath("path segment is not valid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<RequestHead>, HttpError> {
        parse_head(raw, &Limits::default())
    }

    fn parse_ok(raw: &[u8]) -> RequestHead {
        match parse(raw) {
            Ok(Some(head)) => head,
            other => panic!("expected a complete head for {raw:?}, got {other:?}"),
        }
    }

    #[test]
    fn simple_get() {
        let raw =
            b"GET /v1/users/alice/worker?x=1 HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";
        let head = parse_ok(raw);
        assert_eq!(head.method, Method::Get);
        assert_eq!(head.target, "/v1/users/alice/worker?x=1");
        assert_eq!(head.path(), "/v1/users/alice/worker");
        assert_eq!(head.query(), Some("x=1"));
        assert_eq!(head.version, Version::Http11);
        assert_eq!(head.head_len, raw.len());
        assert!(head.keep_alive);
        assert_eq!(head.body, BodyFraming::None);
        assert!(!head.expect_continue);
        assert_eq!(head.user, None);
        assert_eq!(head.authorization, None);
        assert_eq!(head.content_type, None);
    }

    #[test]
    fn post_with_content_length_and_captured_headers() {
        let raw = b"POST /v1/agent HTTP/1.1\r\nHOST: x\r\nX-Moltbot-User: user-a\r\n\
authorization: Bearer s3cret\r\nContent-Type: application/json\r\ncontent-length: 5\r\n\r\nhello";
        let head = parse_ok(raw);
        assert_eq!(head.method, Method::Post);
        assert_eq!(head.body, BodyFraming::Length(5));
        assert_eq!(head.head_len, raw.len() - 5);
        assert_eq!(&raw[head.head_len..], b"hello");
        assert_eq!(head.user.as_deref(), Some(b"user-a".as_slice()));
        assert_eq!(head.authorization.as_deref(), Some("Bearer s3cret"));
        assert_eq!(head.content_type.as_deref(), Some("application/json"));
    }

    #[test]
    fn debug_output_redacts_the_credential() {
        let head = parse_ok(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\r\n");
        let shown = format!("{head:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn user_header_keeps_raw_non_utf8_bytes() {
        let head =
            parse_ok(b"POST /v1/agent HTTP/1.1\r\nHost: x\r\nx-moltbot-user: a\xffb\r\n\r\n");
        assert_eq!(head.user.as_deref(), Some(b"a\xffb".as_slice()));
    }

    #[test]
    fn methods_are_mapped_case_sensitively() {
        let cases: &[(&[u8], Method)] = &[
            (b"GET", Method::Get),
            (b"HEAD", Method::Head),
            (b"POST", Method::Post),
            (b"PUT", Method::Put),
            (b"DELETE", Method::Delete),
            (b"OPTIONS", Method::Options),
            (b"TRACE", Method::Trace),
            (b"PATCH", Method::Patch),
            (b"get", Method::Other),
            (b"BREW", Method::Other),
        ];
        for (token, method) in cases {
            let mut raw = token.to_vec();
            raw.extend_from_slice(b" / HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(parse_ok(&raw).method, *method, "{token:?}");
        }
        assert_eq!(Method::Delete.as_str(), "DELETE");
        assert_eq!(Method::Other.as_str(), "OTHER");
    }

    #[test]
    fn head_split_at_every_byte_is_incomplete_until_the_end() {
        let raw = b"\r\nPOST /v1/echo HTTP/1.1\r\nHost: h\r\nx-moltbot-user: u\r\n\
Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n";
        let full = parse_ok(raw);
        assert_eq!(full.head_len, raw.len());
        for cut in 0..raw.len() {
            assert_eq!(parse(&raw[..cut]), Ok(None), "prefix of {cut} bytes");
        }
        let mut with_body = raw.to_vec();
        with_body.extend_from_slice(b"5\r\nhello\r\n0\r\n\r\n");
        assert_eq!(parse_ok(&with_body), full);
    }

    #[test]
    fn pipelined_requests_parse_one_after_another() {
        let raw = b"POST /v1/echo HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc\
GET /livez HTTP/1.1\r\nHost: h\r\n\r\nGET /readyz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";
        let first = parse_ok(raw);
        assert_eq!(first.target, "/v1/echo");
        let BodyFraming::Length(n) = first.body else {
            panic!("expected a length")
        };
        let body_end = first.head_len + n as usize;
        assert_eq!(&raw[first.head_len..body_end], b"abc");
        let second = parse_ok(&raw[body_end..]);
        assert_eq!(second.target, "/livez");
        assert_eq!(second.body, BodyFraming::None);
        assert!(second.keep_alive);
        let third = parse_ok(&raw[body_end + second.head_len..]);
        assert_eq!(third.target, "/readyz");
        assert!(!third.keep_alive);
        assert_eq!(body_end + second.head_len + third.head_len, raw.len());
    }

    #[test]
    fn keep_alive_rules() {
        let cases: &[(&[u8], bool)] = &[
            (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", true),
            (
                b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
                false,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Keep-Alive, CLOSE\r\n\r\n",
                false,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nConnection: close\r\n\r\n",
                false,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\n",
                true,
            ),
            (b"GET / HTTP/1.0\r\n\r\n", false),
            (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
            (
                b"GET / HTTP/1.0\r\nConnection: foo ,\tKeep-Alive\r\n\r\n",
                true,
            ),
            (
                b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
                false,
            ),
        ];
        for (raw, keep_alive) in cases {
            assert_eq!(
                parse_ok(raw).keep_alive,
                *keep_alive,
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn http10_needs_no_host_and_reports_its_version() {
        let head = parse_ok(b"POST /v1/echo HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi");
        assert_eq!(head.version, Version::Http10);
        assert_eq!(head.body, BodyFraming::Length(2));
    }

    #[test]
    fn expect_continue_rules() {
        let cases: &[(&[u8], bool)] = &[
            (b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n", true),
            (b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nTransfer-Encoding: chunked\r\n\r\n", true),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\n", false),
            // No body: nothing to continue with.
            (b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n", false),
            (b"GET / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n", false),
            // HTTP/1.0 clients do not understand 1xx (RFC 9110 10.1.1).
            (b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n", false),
            (b"POST / HTTP/1.1\r\nHost: h\r\nExpect: something-else\r\nContent-Length: 9\r\n\r\n", false),
        ];
        for (raw, expect) in cases {
            assert_eq!(
                parse_ok(raw).expect_continue,
                *expect,
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn body_on_get_is_framed_normally() {
        let head = parse_ok(b"GET /status HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody");
        assert_eq!(head.body, BodyFraming::Length(4));
        assert_eq!(
            parse_ok(b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n").body,
            BodyFraming::Chunked
        );
    }

    #[test]
    fn leading_empty_line_is_tolerated_and_counted() {
        let raw = b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n";
        assert_eq!(parse_ok(raw).head_len, raw.len());
    }

    #[test]
    fn malformed_and_smuggling_requests_are_refused_and_close() {
        use HttpError::{BadRequest as B, HeaderTooLarge as H, VersionNotSupported as V};
        let te_cl = B("both Transfer-Encoding and Content-Length");
        let bad_te = B("unsupported Transfer-Encoding (only a single `chunked` is accepted)");
        let cases: &[(&str, &[u8], HttpError)] = &[
            ("TE + CL", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", te_cl),
            ("CL + TE", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", te_cl),
            ("TE chunked, chunked", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", bad_te),
            ("TE gzip, chunked", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", bad_te),
            ("TE identity", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n", bad_te),
            ("TE empty", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n\r\n", bad_te),
            ("TE repeated", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", B("repeated Transfer-Encoding header")),
            ("TE on HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", B("Transfer-Encoding in an HTTP/1.0 request")),
            ("CL repeated equal", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", B("repeated Content-Length header")),
            ("CL repeated differing", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\ncontent-length: 6\r\n\r\n", B("repeated Content-Length header")),
            ("CL list", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n", B("invalid Content-Length")),
            ("CL signed +", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\n", B("invalid Content-Length")),
            ("CL signed -", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -5\r\n\r\n", B("invalid Content-Length")),
            ("CL hex", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x5\r\n\r\n", B("invalid Content-Length")),
            ("CL inner space", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1 2\r\n\r\n", B("invalid Content-Length")),
            ("CL empty", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n", B("empty Content-Length")),
            ("CL overflow", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 18446744073709551616\r\n\r\n", B("Content-Length overflows")),
            ("obs-fold", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\r\n c\r\n\r\n", B("obs-fold or whitespace at the start of a header line")),
            ("obs-fold tab", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\r\n\tc\r\n\r\n", B("obs-fold or whitespace at the start of a header line")),
            ("space before first header", b"GET / HTTP/1.1\r\n Host: h\r\n\r\n", B("obs-fold or whitespace at the start of a header line")),
            ("bare LF everywhere", b"GET / HTTP/1.1\nHost: h\n\n", B("bare LF line ending (only CRLF is accepted)")),
            ("bare LF after a header", b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n", B("bare LF line ending (only CRLF is accepted)")),
            ("bare LF ends the head", b"GET / HTTP/1.1\r\nHost: h\r\n\n", B("bare LF line ending (only CRLF is accepted)")),
            ("bare LF leading line", b"\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", B("bare LF line ending (only CRLF is accepted)")),
            ("bare CR in value", b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", B("invalid character in header value")),
            ("bare CR after request line", b"GET / HTTP/1.1\rHost: h\r\n\r\n", B("malformed line ending (only CRLF is accepted)")),
            ("NUL in value", b"GET / HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n\r\n", B("invalid character in header value")),
            ("control char in value", b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x01b\r\n\r\n", B("invalid character in header value")),
            ("DEL in value", b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x7fb\r\n\r\n", B("invalid character in header value")),
            ("NUL in name", b"GET / HTTP/1.1\r\nHost: h\r\nX\0Y: a\r\n\r\n", B("invalid character in header name")),
            ("control char in name", b"GET / HTTP/1.1\r\nHost: h\r\nX\x0bY: a\r\n\r\n", B("invalid character in header name")),
            ("space before colon", b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length : 5\r\n\r\n", B("invalid character in header name")),
            ("empty header name", b"GET / HTTP/1.1\r\nHost: h\r\n: v\r\n\r\n", B("invalid character in header name")),
            ("invalid method", b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n", B("invalid method")),
            ("method with NUL", b"GE\0T / HTTP/1.1\r\nHost: h\r\n\r\n", B("invalid method")),
            ("empty method", b" / HTTP/1.1\r\nHost: h\r\n\r\n", B("invalid method")),
            ("HTTP/0.9", b"GET /\r\n\r\n", B("missing HTTP version (HTTP/0.9 is not supported)")),
            ("double space", b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", B("invalid request-target")),
            ("control char in target", b"GET /a\x01b HTTP/1.1\r\nHost: h\r\n\r\n", B("invalid request-target")),
            ("non-UTF-8 target", b"GET /a\xffb HTTP/1.1\r\nHost: h\r\n\r\n", B("invalid request-target")),
            ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", V("only HTTP/1.0 and HTTP/1.1 are supported")),
            ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: h\r\n\r\n", V("only HTTP/1.0 and HTTP/1.1 are supported")),
            ("HTTP/3 partial", b"GET / HTTP/3", V("only HTTP/1.0 and HTTP/1.1 are supported")),
            ("lowercase version", b"GET / http/1.1\r\nHost: h\r\n\r\n", B("malformed HTTP version")),
            ("version garbage", b"GET / HTTP/1.x\r\nHost: h\r\n\r\n", B("malformed HTTP version")),
            ("version without dot", b"GET / HTTP/11\r\nHost: h\r\n\r\n", B("malformed HTTP version")),
            ("text after version", b"GET / HTTP/1.1 x\r\nHost: h\r\n\r\n", B("malformed line ending (only CRLF is accepted)")),
            ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", V("HTTP/2 connection preface received; this gateway speaks HTTP/1.1 only")),
            ("absolute-form", b"GET http://example.com/v1/echo HTTP/1.1\r\nHost: h\r\n\r\n", B("absolute-form request-target is not supported (origin-form only)")),
            ("asterisk-form", b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", B("asterisk-form request-target is not supported")),
            ("authority-form", b"CONNECT example.com:443 HTTP/1.1\r\nHost: h\r\n\r\n", B("request-target must be origin-form (start with '/')")),
            ("fragment", b"GET /a#b HTTP/1.1\r\nHost: h\r\n\r\n", B("fragment in request-target")),
            ("missing Host", b"GET / HTTP/1.1\r\n\r\n", B("missing Host header")),
            ("repeated Host", b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", B("repeated Host header")),
            ("repeated user", b"GET / HTTP/1.1\r\nHost: a\r\nx-moltbot-user: a\r\nX-Moltbot-User: b\r\n\r\n", B("repeated x-moltbot-user header")),
            ("repeated authorization", b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n", B("repeated Authorization header")),
            ("repeated content-type", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Type: a\r\nContent-Type: b\r\n\r\n", B("repeated Content-Type header")),
            ("non-ASCII authorization", b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer \xc3\xa9\r\n\r\n", B("non-ASCII Authorization value")),
            ("non-ASCII content-type", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Type: \xff\r\n\r\n", B("non-ASCII Content-Type value")),
            ("CL over body limit", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1048577\r\n\r\n", HttpError::BodyTooLarge),
            ("too many headers", &too_many_headers(), H("too many header fields")),
        ];
        for (name, raw, expected) in cases {
            let got = parse(raw);
            assert_eq!(got, Err(*expected), "{name}");
            assert!(expected.closes_connection(), "{name}");
        }
    }

    fn too_many_headers() -> Vec<u8> {
        let mut raw = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
        for i in 0..Limits::default().max_headers {
            raw.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        raw
    }

    #[test]
    fn errors_have_status_code_and_close_flag() {
        let cases = [
            (HttpError::BadRequest("x"), 400, "BAD_REQUEST", true),
            (HttpError::InvalidPath("x"), 400, "BAD_REQUEST", false),
            (
                HttpError::HeaderTooLarge("x"),
                431,
                "HEADERS_TOO_LARGE",
                true,
            ),
            (HttpError::UriTooLong, 414, "URI_TOO_LONG", true),
            (HttpError::BodyTooLarge, 413, "BODY_TOO_LARGE", true),
            (
                HttpError::VersionNotSupported("x"),
                505,
                "VERSION_NOT_SUPPORTED",
                true,
            ),
        ];
        for (err, status, code, closes) in cases {
            assert_eq!(err.status(), status, "{err:?}");
            assert_eq!(err.code(), code, "{err:?}");
            assert_eq!(err.closes_connection(), closes, "{err:?}");
        }
    }

    #[test]
    fn error_write_response_is_a_full_json_response() {
        let mut out = Vec::new();
        HttpError::UriTooLong.write_response(&mut out);
        let body = br#"{"error":{"code":"URI_TOO_LONG","message":"request-target longer than the configured limit","retryable":false}}"#;
        let mut expected = format!(
            "HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        expected.extend_from_slice(body);
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&expected)
        );

        out.clear();
        HttpError::InvalidPath("x").write_response(&mut out);
        assert!(out.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
        assert!(out.windows(24).any(|w| w == b"connection: keep-alive\r\n"));
    }

    /// A head of exactly `len` bytes (padding in one header).
    fn head_of_len(len: usize) -> Vec<u8> {
        let prefix = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: ";
        let suffix = b"\r\n\r\n";
        let mut raw = prefix.to_vec();
        raw.resize(len - suffix.len(), b'p');
        raw.extend_from_slice(suffix);
        assert_eq!(raw.len(), len);
        raw
    }

    #[test]
    fn header_bytes_limit_is_inclusive() {
        let limits = Limits {
            max_header_bytes: 200,
            ..Limits::default()
        };
        let at = head_of_len(200);
        assert_eq!(
            parse_head(&at, &limits).map(|h| h.map(|h| h.head_len)),
            Ok(Some(200))
        );
        let past = head_of_len(201);
        let too_large = Err(HttpError::HeaderTooLarge(
            "request head larger than the limit",
        ));
        assert_eq!(parse_head(&past, &limits), too_large);
        // Incomplete: a full buffer without the end of the head can never fit.
        assert_eq!(parse_head(&past[..200], &limits), too_large);
        assert_eq!(parse_head(&past[..199], &limits), Ok(None));
        // Body bytes after a head at the limit do not count.
        let mut with_body = at.clone();
        with_body.extend_from_slice(&[b'x'; 500]);
        assert!(matches!(parse_head(&with_body, &limits), Ok(Some(_))));
    }

    #[test]
    fn header_count_limit_is_inclusive() {
        for (max, stack) in [(3usize, true), (STACK_HEADERS + 2, false)] {
            let limits = Limits {
                max_headers: max,
                ..Limits::default()
            };
            assert_eq!(limits.max_headers <= STACK_HEADERS, stack);
            let mut raw = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
            for i in 1..max {
                raw.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
            }
            let mut at = raw.clone();
            at.extend_from_slice(b"\r\n");
            assert!(matches!(parse_head(&at, &limits), Ok(Some(_))), "max {max}");
            raw.extend_from_slice(b"X-last: v\r\n\r\n");
            assert_eq!(
                parse_head(&raw, &limits),
                Err(HttpError::HeaderTooLarge("too many header fields")),
                "max {max}"
            );
        }
    }

    #[test]
    fn uri_limit_is_inclusive() {
        let limits = Limits {
            max_uri_bytes: 32,
            ..Limits::default()
        };
        let target_at = format!("/{}", "a".repeat(31));
        let target_past = format!("/{}", "a".repeat(32));
        let at = format!("GET {target_at} HTTP/1.1\r\nHost: h\r\n\r\n");
        let past = format!("GET {target_past} HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(
            parse_head(at.as_bytes(), &limits).map(|h| h.map(|h| h.target)),
            Ok(Some(target_at.clone()))
        );
        assert_eq!(
            parse_head(past.as_bytes(), &limits),
            Err(HttpError::UriTooLong)
        );
        // Detected before the request line ends, and not before the limit is passed.
        let partial_past = format!("GET {target_past}");
        let partial_at = format!("GET {target_at}");
        assert_eq!(
            parse_head(partial_past.as_bytes(), &limits),
            Err(HttpError::UriTooLong)
        );
        assert_eq!(parse_head(partial_at.as_bytes(), &limits), Ok(None));
        // The limit is on the target, not on the whole request line.
        let long_method = format!("LONGMETHODNAME {target_at} HTTP/1.1\r\nHost: h\r\n");
        assert_eq!(parse_head(long_method.as_bytes(), &limits), Ok(None));
        // 414 wins over 431 for a request line that fills the whole head budget.
        let tight = Limits {
            max_uri_bytes: 32,
            max_header_bytes: 40,
            ..Limits::default()
        };
        let huge = format!("GET /{}", "a".repeat(100));
        assert_eq!(
            parse_head(huge.as_bytes(), &tight),
            Err(HttpError::UriTooLong)
        );
    }

    #[test]
    fn content_length_limit_is_inclusive() {
        let limits = Limits {
            max_body_bytes: 10,
            ..Limits::default()
        };
        let at = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n";
        let past = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n";
        assert_eq!(
            parse_head(at, &limits).map(|h| h.map(|h| h.body)),
            Ok(Some(BodyFraming::Length(10)))
        );
        assert_eq!(parse_head(past, &limits), Err(HttpError::BodyTooLarge));
        let leading_zeros = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0010\r\n\r\n";
        assert_eq!(
            parse_head(leading_zeros, &limits).map(|h| h.map(|h| h.body)),
            Ok(Some(BodyFraming::Length(10)))
        );
    }

    /// Decodes `input` split into the given pieces; returns the body, the bytes consumed in
    /// total and whether it finished, or the first error.
    fn decode_pieces(
        pieces: &[&[u8]],
        limits: &Limits,
    ) -> Result<(Vec<u8>, usize, bool), HttpError> {
        let mut dec = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut consumed = 0;
        for piece in pieces {
            let p = dec.decode(piece, &mut out, limits)?;
            consumed += p.consumed;
            if p.done {
                assert!(dec.is_done());
                return Ok((out, consumed, true));
            }
            assert_eq!(
                p.consumed,
                piece.len(),
                "an unfinished decoder consumes everything"
            );
        }
        Ok((out, consumed, false))
    }

    const SAMPLE: &[u8] =
        b"5\r\nhello\r\n1;ext=1;flag\r\n \r\nA \t;name=\"quoted value\"\r\n0123456789\r\n\
000\r\nTrailer-One: x\r\nTrailer-Two: y z\r\n\r\nNEXT REQUEST";
    const SAMPLE_BODY: &[u8] = b"hello 0123456789";

    #[test]
    fn chunked_decodes_with_extensions_and_trailers() {
        let limits = Limits::default();
        let (body, consumed, done) = decode_pieces(&[SAMPLE], &limits).expect("decodes");
        assert!(done);
        assert_eq!(body, SAMPLE_BODY);
        assert_eq!(&SAMPLE[consumed..], b"NEXT REQUEST");
    }

    #[test]
    fn chunked_every_split_gives_the_same_result() {
        let limits = Limits::default();
        let expected = decode_pieces(&[SAMPLE], &limits).expect("decodes");
        for cut in 0..=SAMPLE.len() {
            let (a, b) = SAMPLE.split_at(cut);
            assert_eq!(
                decode_pieces(&[a, b], &limits).as_ref(),
                Ok(&expected),
                "cut {cut}"
            );
        }
        let bytes: Vec<&[u8]> = SAMPLE.chunks(1).collect();
        assert_eq!(decode_pieces(&bytes, &limits), Ok(expected));
    }

    #[test]
    fn chunked_decode_with_streams_runs_without_copying() {
        let mut dec = ChunkedDecoder::new();
        let mut runs: Vec<Vec<u8>> = Vec::new();
        let p = dec
            .decode_with(
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
                &Limits::default(),
                |d| runs.push(d.to_vec()),
            )
            .expect("decodes");
        assert!(p.done);
        assert_eq!(runs, vec![b"abc".to_vec(), b"de".to_vec()]);
        assert_eq!(dec.decoded_len(), 5);
        // A finished decoder consumes nothing more.
        let again = dec.decode(b"5\r\nhello", &mut Vec::new(), &Limits::default());
        assert_eq!(
            again,
            Ok(DecodeProgress {
                consumed: 0,
                done: true
            })
        );
    }

    #[test]
    fn chunked_errors() {
        let limits = Limits::default();
        let bad = |r| Err(HttpError::BadRequest(r));
        let cases: &[(&str, &[u8], Result<(), HttpError>)] = &[
            (
                "oversized size",
                b"ffffffffffffffffff\r\n",
                bad("chunk size overflows"),
            ),
            (
                "size over the body limit",
                b"fffffffffffffff\r\n",
                Err(HttpError::BodyTooLarge),
            ),
            (
                "negative size",
                b"-5\r\nhello\r\n0\r\n\r\n",
                bad("invalid chunk size"),
            ),
            (
                "plus sign",
                b"+5\r\nhello\r\n0\r\n\r\n",
                bad("invalid chunk size"),
            ),
            (
                "0x prefix",
                b"0x5\r\nhello\r\n0\r\n\r\n",
                bad("invalid chunk size"),
            ),
            ("garbage size", b"zz\r\n", bad("invalid chunk size")),
            ("empty size", b"\r\nhello\r\n", bad("invalid chunk size")),
            (
                "space then digit",
                b"5 5\r\nhello\r\n",
                bad("invalid chunk size"),
            ),
            (
                "bare LF after size",
                b"5\nhello\r\n0\r\n\r\n",
                bad("invalid chunk size"),
            ),
            (
                "CR without LF after size",
                b"5\rhello\r\n",
                bad("chunk-size line not ended by CRLF"),
            ),
            (
                "NUL in extension",
                b"5;a\0\r\nhello\r\n",
                bad("invalid chunk extension"),
            ),
            (
                "bare LF in extension",
                b"5;a\nhello\r\n",
                bad("invalid chunk extension"),
            ),
            (
                "missing CRLF after data",
                b"5\r\nhelloX\r\n0\r\n\r\n",
                bad("chunk data not followed by CRLF"),
            ),
            (
                "bare LF after data",
                b"5\r\nhello\n0\r\n\r\n",
                bad("chunk data not followed by CRLF"),
            ),
            (
                "CR without LF after data",
                b"5\r\nhello\rX",
                bad("chunk data not followed by CRLF"),
            ),
            (
                "data longer than size",
                b"3\r\nhello\r\n0\r\n\r\n",
                bad("chunk data not followed by CRLF"),
            ),
            (
                "obs-fold in trailer",
                b"0\r\nA: b\r\n c\r\n\r\n",
                bad("invalid trailer field"),
            ),
            (
                "NUL in trailer",
                b"0\r\nA: \0\r\n\r\n",
                bad("invalid trailer field"),
            ),
            (
                "bare LF ends trailer",
                b"0\r\nA: b\n\r\n",
                bad("invalid trailer field"),
            ),
            (
                "bare LF ends body",
                b"0\r\n\n",
                bad("invalid trailer field"),
            ),
            (
                "CR then garbage ends body",
                b"0\r\n\rX",
                bad("trailer line not ended by CRLF"),
            ),
            (
                "CR then garbage ends trailer",
                b"0\r\nA: b\rX",
                bad("trailer line not ended by CRLF"),
            ),
            (
                "long extension",
                &long_extension(),
                bad("chunk-size line too long"),
            ),
        ];
        for (name, input, expected) in cases {
            let whole = decode_pieces(&[*input], &limits).map(|_| ());
            assert_eq!(&whole, expected, "{name}");
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(
                &decode_pieces(&bytes, &limits).map(|_| ()),
                expected,
                "{name} byte-wise"
            );
        }
    }

    fn long_extension() -> Vec<u8> {
        let mut v = b"5;".to_vec();
        v.resize(MAX_CHUNK_LINE + 10, b'a');
        v
    }

    #[test]
    fn chunked_decoder_stays_failed_after_an_error() {
        let limits = Limits::default();
        let mut dec = ChunkedDecoder::new();
        let mut out = Vec::new();
        assert!(dec.decode(b"zz", &mut out, &limits).is_err());
        assert_eq!(
            dec.decode(b"0\r\n\r\n", &mut out, &limits),
            Err(HttpError::BadRequest("chunked decoder used after an error"))
        );
    }

    #[test]
    fn chunked_body_limit_is_inclusive() {
        let limits = Limits {
            max_body_bytes: 10,
            ..Limits::default()
        };
        let at: &[u8] = b"4\r\nabcd\r\n6\r\nefghij\r\n0\r\n\r\n";
        let (body, _, done) = decode_pieces(&[at], &limits).expect("at the limit");
        assert!(done);
        assert_eq!(body, b"abcdefghij");
        let past: &[u8] = b"4\r\nabcd\r\n7\r\nefghijk\r\n0\r\n\r\n";
        assert_eq!(
            decode_pieces(&[past], &limits),
            Err(HttpError::BodyTooLarge)
        );
        // Refused at the size line, before any of the oversized chunk arrives.
        assert_eq!(
            decode_pieces(&[b"4\r\nabcd\r\n7\r\n".as_slice()], &limits),
            Err(HttpError::BodyTooLarge)
        );
    }

    #[test]
    fn chunked_trailer_limit_is_inclusive() {
        let limits = Limits {
            max_header_bytes: 12,
            ..Limits::default()
        };
        // The trailer section "A: 12345\r\n\r\n" is exactly 12 bytes.
        let at: &[u8] = b"0\r\nA: 12345\r\n\r\n";
        assert!(matches!(decode_pieces(&[at], &limits), Ok((_, _, true))));
        let past: &[u8] = b"0\r\nA: 123456\r\n\r\n";
        assert_eq!(
            decode_pieces(&[past], &limits),
            Err(HttpError::HeaderTooLarge(
                "chunked trailer section too large"
            ))
        );
    }

    #[test]
    fn response_head_exact_bytes() {
        let mut out = b"previous".to_vec();
        write_response_head(
            &mut out,
            200,
            "application/json",
            1234,
            true,
            &[("x-moltbot-worker", "worker-1")],
        );
        assert_eq!(
            String::from_utf8_lossy(&out),
            "previousHTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1234\r\n\
connection: keep-alive\r\nx-moltbot-worker: worker-1\r\n\r\n"
        );

        out.clear();
        write_response_head(
            &mut out,
            503,
            "application/json",
            0,
            false,
            &[("retry-after", "1"), ("x-a", "b")],
        );
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\
connection: close\r\nretry-after: 1\r\nx-a: b\r\n\r\n"
        );

        out.clear();
        write_response_head(&mut out, 204, "", 0, true, &[]);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 204 No Content\r\nconnection: keep-alive\r\n\r\n"
        );

        // 304 ends at its head; 205 has no content and says so.
        out.clear();
        write_response_head(&mut out, 304, "", 10, true, &[]);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 304 Not Modified\r\nconnection: keep-alive\r\n\r\n"
        );
        out.clear();
        write_response_head(&mut out, 205, "text/plain", 10, true, &[]);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 205 Reset Content\r\ncontent-type: text/plain\r\ncontent-length: 0\r\n\
connection: keep-alive\r\n\r\n"
        );

        out.clear();
        write_response_head(&mut out, 299, "text/plain", usize::MAX, true, &[]);
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!(
                "HTTP/1.1 299 \r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: keep-alive\r\n\r\n",
                usize::MAX
            )
        );
    }

    #[test]
    fn reason_phrases_of_the_gateway_statuses() {
        let cases = [
            (200, "OK"),
            (400, "Bad Request"),
            (401, "Unauthorized"),
            (404, "Not Found"),
            (405, "Method Not Allowed"),
            (408, "Request Timeout"),
            (413, "Payload Too Large"),
            (414, "URI Too Long"),
            (431, "Request Header Fields Too Large"),
            (502, "Bad Gateway"),
            (503, "Service Unavailable"),
            (504, "Gateway Timeout"),
            (505, "HTTP Version Not Supported"),
            (799, ""),
        ];
        for (status, reason) in cases {
            assert_eq!(reason_phrase(status), reason, "{status}");
        }
        assert_eq!(CONTINUE_100, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn error_body_shape_and_escaping() {
        assert_eq!(
            String::from_utf8_lossy(&error_body(
                "UNAVAILABLE",
                "worker-2 failed",
                true,
                Some(1500)
            )),
            r#"{"error":{"code":"UNAVAILABLE","message":"worker-2 failed","retryable":true,"retryAfterMs":1500}}"#
        );
        let body = error_body("BAD_REQUEST", "bad \"user\"\nline2\\ \u{1}", false, None);
        assert_eq!(
            String::from_utf8_lossy(&body),
            r#"{"error":{"code":"BAD_REQUEST","message":"bad \"user\"\nline2\\ \u0001","retryable":false}}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(v["error"]["message"], "bad \"user\"\nline2\\ \u{1}");
        assert!(v["error"].get("retryAfterMs").is_none());
    }

    #[test]
    fn split_target_cases() {
        let cases = [
            ("/", ("/", None)),
            ("/v1/echo", ("/v1/echo", None)),
            ("/v1/echo?", ("/v1/echo", Some(""))),
            ("/a?b=1&c=2", ("/a", Some("b=1&c=2"))),
            ("/a?b?c", ("/a", Some("b?c"))),
        ];
        for (target, expected) in cases {
            assert_eq!(split_target(target), expected, "{target}");
        }
    }

    #[test]
    fn percent_decoding_cases() {
        let ok = [
            ("alice", "alice"),
            ("", ""),
            ("user%20a", "user a"),
            ("%41%62%63", "Abc"),
            ("%e2%82%AC", "\u{20ac}"),
            ("a+b", "a+b"),
            ("%2e%2e", ".."),
            ("%5c", "\\"),
            ("a%2Fb", "a/b"),
            ("%2f", "/"),
            ("caf\u{e9}", "caf\u{e9}"),
        ];
        for (input, expected) in ok {
            assert_eq!(
                percent_decode_segment(input).as_deref(),
                Ok(expected),
                "{input}"
            );
        }
        let bad = |r| Err(HttpError::InvalidPath(r));
        let errors = [
            ("%", bad("invalid percent-escape")),
            ("a%4", bad("invalid percent-escape")),
            ("%zz", bad("invalid percent-escape")),
            ("%+1", bad("invalid percent-escape")),
            ("%00", bad("control character in a path segment")),
            ("a%0Ab", bad("control character in a path segment")),
            ("%7f", bad("control character in a path segment")),
            ("a\u{1}", bad("control character in a path segment")),
            ("a/b", bad("'/' inside a path segment")),
            ("%ff", bad("path segment is not valid UTF-8")),
            ("%c3%28", bad("path segment is not valid UTF-8")),
        ];
        for (input, expected) in errors {
            let got = percent_decode_segment(input);
            assert_eq!(got, expected, "{input}");
            assert!(!got.err().is_some_and(|e| e.closes_connection()), "{input}");
        }
    }
}
