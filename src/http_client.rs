//! A minimal blocking HTTP/1.1 client for the CLI (`moltbot workers status|route`) and tests.
//!
//! One request per connection (`Connection: close`) over a plain `TcpStream` to an
//! `http://HOST[:PORT][/BASE]` URL. No TLS: the gateway speaks plain HTTP on loopback; remote
//! gateways sit behind a TLS-terminating proxy or a tunnel. Responses are parsed with
//! `httparse`; bodies are framed by Content-Length, chunked encoding, or the end of the
//! connection, and are bounded in size. Every wait is bounded by one overall timeout.

use std::borrow::Cow;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Largest accepted response head (status line and headers).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Largest accepted response body.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024 * 1024;

/// Most response headers accepted.
const MAX_HEADERS: usize = 100;

/// Longest chunk-size line (with extensions) accepted before its CRLF.
const MAX_CHUNK_LINE: usize = 4096;

/// Headers the client sets itself; callers may not pass them.
const RESERVED_HEADERS: [&str; 4] = ["host", "connection", "content-length", "transfer-encoding"];

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `http://HOST[:PORT][/PATH]`.
    #[error("invalid gateway URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An `https://` URL: this client has no TLS.
    #[error(
        "cannot reach {url}: https is not supported; the gateway speaks plain HTTP \
         (use an http:// URL, through a TLS-terminating proxy or a tunnel for remote gateways)"
    )]
    Https {
        /// The URL as given.
        url: String,
    },
    /// Nothing listens at the address.
    #[error("no gateway at {url}: connection refused (is `moltbot gateway` running?)")]
    Refused {
        /// The URL.
        url: String,
    },
    /// The host name did not resolve.
    #[error("no gateway at {url}: cannot resolve {host:?}: {source}")]
    Resolve {
        /// The URL.
        url: String,
        /// The host part.
        host: String,
        /// Why.
        source: std::io::Error,
    },
    /// No complete answer within the timeout.
    #[error("no answer from {url} within {timeout:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The timeout of the whole request.
        timeout: Duration,
    },
    /// Connecting failed for another reason.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        source: std::io::Error,
    },
    /// Sending or receiving failed.
    #[error("talking to {url}: {source}")]
    Io {
        /// The URL.
        url: String,
        /// Why.
        source: std::io::Error,
    },
    /// The request itself is not valid (method, path, header or token).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The server's answer is not valid HTTP/1.x.
    #[error("malformed HTTP response from {url}: {reason}")]
    BadResponse {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The response body exceeds [`MAX_RESPONSE_BODY`].
    #[error("response from {url} is larger than {limit} bytes")]
    TooLarge {
        /// The URL.
        url: String,
        /// The limit.
        limit: usize,
    },
    /// The body is not the expected JSON.
    #[error("response is not the expected JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Headers in the order received (names as sent by the server).
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ClientError> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }
}

/// Where a URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// Host to connect to (IPv6 without brackets).
    host: String,
    port: u16,
    /// The `Host` header value (the URL's authority).
    authority: String,
    /// Path prefix without a trailing slash (empty for none).
    base: String,
}

fn invalid(url: &str, reason: &'static str) -> ClientError {
    ClientError::InvalidUrl {
        url: url.to_string(),
        reason,
    }
}

fn parse_url(url: &str) -> Result<Target, ClientError> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(invalid(url, "expected http://HOST:PORT"));
    };
    if scheme.eq_ignore_ascii_case("https") {
        return Err(ClientError::Https {
            url: url.to_string(),
        });
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(invalid(url, "only http:// URLs are supported"));
    }
    if rest.contains(['?', '#']) {
        return Err(invalid(url, "a query or fragment is not allowed"));
    }
    let (authority, base) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(invalid(
            url,
            "credentials in the URL are not supported (set MOLTBOT_GATEWAY_TOKEN)",
        ));
    }
    if !authority.bytes().all(|b| b.is_ascii_graphic())
        || !base.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(invalid(
            url,
            "the URL contains spaces or non-ASCII characters",
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err(invalid(url, "unclosed '[' in the host"));
        };
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => return Err(invalid(url, "unexpected characters after ']'")),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((host, p)) => (host, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(invalid(url, "the host is missing"));
    }
    let port = match port {
        None => 80,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(invalid(url, "the port must be a number in 1..=65535")),
            Ok(p) => p,
        },
    };
    Ok(Target {
        host: host.to_string(),
        port,
        authority: authority.to_string(),
        base: base.trim_end_matches('/').to_string(),
    })
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn bad_request(msg: impl Into<String>) -> ClientError {
    ClientError::InvalidRequest(msg.into())
}

/// Builds the request head and body; refuses anything that could break the framing.
fn build_request(
    target: &Target,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    token: Option<&str>,
) -> Result<Vec<u8>, ClientError> {
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(bad_request(format!(
            "method {method:?} is not an HTTP token"
        )));
    }
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad_request(format!(
            "path {path:?} must start with '/' and be percent-encoded ASCII"
        )));
    }
    let mut out = Vec::with_capacity(256 + body.map_or(0, <[u8]>::len));
    let mut line = |name: &str, value: &str| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    line("Host", &target.authority);
    line("Connection", "close");
    line(
        "User-Agent",
        concat!("moltbot-cli/", env!("CARGO_PKG_VERSION")),
    );
    for (name, value) in headers {
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(bad_request(format!(
                "header name {name:?} is not an HTTP token"
            )));
        }
        if RESERVED_HEADERS
            .iter()
            .any(|r| name.eq_ignore_ascii_case(r))
        {
            return Err(bad_request(format!("header {name:?} is set by the client")));
        }
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(bad_request(format!(
                "header {name:?} has a control character in its value"
            )));
        }
        line(name, value);
    }
    if let Some(token) = token {
        // Never echo the token in an error.
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad_request(
                "the token is empty or contains characters not allowed in a header",
            ));
        }
        line("Authorization", &format!("Bearer {token}"));
    }
    if let Some(body) = body {
        line("Content-Length", &body.len().to_string());
    } else if matches!(method, "POST" | "PUT" | "PATCH") {
        line("Content-Length", "0");
    }
    let mut req = Vec::with_capacity(out.len() + 64);
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target.base.as_bytes());
    req.extend_from_slice(path.as_bytes());
    req.extend_from_slice(b" HTTP/1.1\r\n");
    req.extend_from_slice(&out);
    req.extend_from_slice(b"\r\n");
    if let Some(body) = body {
        req.extend_from_slice(body);
    }
    Ok(req)
}

/// Sends one request to `url` (`http://HOST[:PORT][/BASE]`) + `path` and reads the whole
/// response, all within `timeout`.
pub fn request(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<HttpResponse, ClientError> {
    request_with_token(url, method, path, headers, body, None, timeout)
}

/// As [`request`], adding `Authorization: Bearer <token>` when `token` is given.
pub fn request_with_token(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    token: Option<&str>,
    timeout: Duration,
) -> Result<HttpResponse, ClientError> {
    let target = parse_url(url)?;
    let req = build_request(&target, method, path, headers, body, token)?;
    let conn = Conn {
        url,
        timeout,
        deadline: Instant::now() + timeout,
    };
    let mut stream = conn.connect(&target)?;
    conn.send(&mut stream, &req)?;
    conn.receive(&mut stream, method == "HEAD")
}

/// One request's connection context: the URL for messages and the deadline for every wait.
struct Conn<'a> {
    url: &'a str,
    timeout: Duration,
    deadline: Instant,
}

impl Conn<'_> {
    fn timed_out(&self) -> ClientError {
        ClientError::Timeout {
            url: self.url.to_string(),
            timeout: self.timeout,
        }
    }

    fn bad(&self, reason: impl Into<String>) -> ClientError {
        ClientError::BadResponse {
            url: self.url.to_string(),
            reason: reason.into(),
        }
    }

    fn remaining(&self) -> Result<Duration, ClientError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(self.timed_out())
        } else {
            Ok(left)
        }
    }

    fn io(&self, e: std::io::Error) -> ClientError {
        match e.kind() {
            ErrorKind::TimedOut | ErrorKind::WouldBlock => self.timed_out(),
            _ => ClientError::Io {
                url: self.url.to_string(),
                source: e,
            },
        }
    }

    fn connect(&self, target: &Target) -> Result<TcpStream, ClientError> {
        let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
            .to_socket_addrs()
            .map_err(|source| ClientError::Resolve {
                url: self.url.to_string(),
                host: target.host.clone(),
                source,
            })?
            .collect();
        let mut last = None;
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, self.remaining()?) {
                Ok(stream) => {
                    // Small requests and answers: do not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(e) => last = Some(e),
            }
        }
        let url = self.url.to_string();
        Err(match last {
            None => ClientError::Resolve {
                url,
                host: target.host.clone(),
                source: std::io::Error::new(ErrorKind::NotFound, "no addresses"),
            },
            Some(e) if e.kind() == ErrorKind::ConnectionRefused => ClientError::Refused { url },
            Some(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                self.timed_out()
            }
            Some(source) => ClientError::Connect { url, source },
        })
    }

    fn send(&self, stream: &mut TcpStream, req: &[u8]) -> Result<(), ClientError> {
        let mut sent = 0;
        while sent < req.len() {
            stream
                .set_write_timeout(Some(self.remaining()?))
                .map_err(|e| self.io(e))?;
            match stream.write(&req[sent..]) {
                Ok(0) => return Err(self.io(ErrorKind::WriteZero.into())),
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        Ok(())
    }

    /// Reads more bytes into `buf`; `Ok(0)` at the end of the stream.
    fn read_more(&self, stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, ClientError> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            stream
                .set_read_timeout(Some(self.remaining()?))
                .map_err(|e| self.io(e))?;
            match stream.read(&mut chunk) {
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
    }

    fn receive(
        &self,
        stream: &mut TcpStream,
        head_request: bool,
    ) -> Result<HttpResponse, ClientError> {
        let mut buf = Vec::with_capacity(8 * 1024);
        let (status, headers, head_len) = loop {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut slots);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = resp.code.unwrap_or(0);
                    if status == 101 {
                        return Err(self.bad("unexpected 101 Switching Protocols"));
                    }
                    if (100..200).contains(&status) {
                        // Interim response (e.g. 100 Continue): the real one follows.
                        buf.drain(..n);
                        continue;
                    }
                    let headers: Vec<(String, String)> = resp
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    break (status, headers, n);
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() > MAX_RESPONSE_HEAD {
                        return Err(self.bad(format!(
                            "response head larger than {MAX_RESPONSE_HEAD} bytes"
                        )));
                    }
                    if self.read_more(stream, &mut buf)? == 0 {
                        return Err(self.bad(if buf.is_empty() {
                            "the connection closed without a response"
                        } else {
                            "the connection closed in the middle of the response head"
                        }));
                    }
                }
                Err(e) => return Err(self.bad(e.to_string())),
            }
        };
        buf.drain(..head_len);
        let mut response = HttpResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if head_request || status == 204 || status == 304 {
            return Ok(response);
        }
        response.body = match framing(&response).map_err(|r| self.bad(r))? {
            Framing::Chunked => self.read_chunked(stream, buf)?,
            Framing::Length(len) => self.read_length(stream, buf, len)?,
            Framing::UntilClose => self.read_to_end(stream, buf)?,
        };
        Ok(response)
    }

    fn too_large(&self) -> ClientError {
        ClientError::TooLarge {
            url: self.url.to_string(),
            limit: MAX_RESPONSE_BODY,
        }
    }

    fn read_length(
        &self,
        stream: &mut TcpStream,
        mut buf: Vec<u8>,
        len: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_RESPONSE_BODY)
            .ok_or_else(|| self.too_large())?;
        buf.reserve(len.saturating_sub(buf.len()));
        while buf.len() < len {
            if self.read_more(stream, &mut buf)? == 0 {
                return Err(self.bad(format!("the body ended after {} of {len} bytes", buf.len())));
            }
        }
        buf.truncate(len);
        Ok(buf)
    }

    fn read_to_end(
        &self,
        stream: &mut TcpStream,
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>, ClientError> {
        loop {
            if buf.len() > MAX_RESPONSE_BODY {
                return Err(self.too_large());
            }
            if self.read_more(stream, &mut buf)? == 0 {
                return Ok(buf);
            }
        }
    }

    fn read_chunked(
        &self,
        stream: &mut TcpStream,
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>, ClientError> {
        let mut body = Vec::new();
        loop {
            match httparse::parse_chunk_size(&buf) {
                Ok(httparse::Status::Complete((line, size))) => {
                    if size == 0 {
                        buf.drain(..line);
                        self.skip_trailers(stream, buf)?;
                        return Ok(body);
                    }
                    let size = usize::try_from(size)
                        .ok()
                        .filter(|&s| s <= MAX_RESPONSE_BODY - body.len())
                        .ok_or_else(|| self.too_large())?;
                    while buf.len() < line + size + 2 {
                        if self.read_more(stream, &mut buf)? == 0 {
                            return Err(self.bad("the connection closed in the middle of a chunk"));
                        }
                    }
                    if &buf[line + size..line + size + 2] != b"\r\n" {
                        return Err(self.bad("a chunk is not followed by CRLF"));
                    }
                    body.extend_from_slice(&buf[line..line + size]);
                    buf.drain(..line + size + 2);
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err(self.bad("chunk-size line too long"));
                    }
                    if self.read_more(stream, &mut buf)? == 0 {
                        return Err(self.bad("the connection closed before the last chunk"));
                    }
                }
                Err(_) => return Err(self.bad("invalid chunk size")),
            }
        }
    }

    /// Consumes trailer lines up to the empty line that ends a chunked body.
    fn skip_trailers(&self, stream: &mut TcpStream, mut buf: Vec<u8>) -> Result<(), ClientError> {
        let mut trailer_bytes = 0;
        loop {
            match buf.windows(2).position(|w| w == b"\r\n") {
                Some(0) => return Ok(()),
                Some(i) => {
                    trailer_bytes += i + 2;
                    buf.drain(..i + 2);
                }
                None => {
                    if trailer_bytes + buf.len() > MAX_RESPONSE_HEAD {
                        return Err(self.bad("trailers too large"));
                    }
                    if self.read_more(stream, &mut buf)? == 0 {
                        return Err(self.bad("the connection closed inside the trailers"));
                    }
                }
            }
        }
    }
}

/// How a response body is delimited.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Chunked,
    Length(u64),
    UntilClose,
}

/// The body framing of a response (RFC 9112 §6.3), refusing ambiguous heads.
fn framing(resp: &HttpResponse) -> Result<Framing, String> {
    let mut te = resp
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty());
    if let Some(first) = te.next() {
        return match (first.eq_ignore_ascii_case("chunked"), te.next()) {
            (true, None) => Ok(Framing::Chunked),
            _ => Err("unsupported transfer-encoding (only chunked)".into()),
        };
    }
    let mut length = None;
    for (_, v) in resp
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        let v = v.trim();
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("invalid content-length {v:?}"));
        }
        let n: u64 = v
            .parse()
            .map_err(|_| format!("invalid content-length {v:?}"))?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting content-length headers".into());
        }
        length = Some(n);
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

/// A fake server for tests of this client and of the commands that use it.
#[cfg(test)]
pub(crate) mod testing {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::mpsc;
    use std::thread::JoinHandle;

    /// Reads one request (head, then a Content-Length body).
    pub(crate) fn read_request(stream: &mut TcpStream) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let len: usize = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                    .unwrap_or(0);
                if buf.len() >= n + len {
                    return buf;
                }
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return buf,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
    }

    /// Answers one connection per `(status, JSON body)`, sending each raw request back, then
    /// exits. Returns the server's `http://` URL.
    pub(crate) fn serve_json(
        responses: Vec<(u16, String)>,
    ) -> (String, mpsc::Receiver<String>, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            for (status, body) in responses {
                let (mut stream, _) = listener.accept().expect("accept");
                let req = read_request(&mut stream);
                let _ = tx.send(String::from_utf8_lossy(&req).into_owned());
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body.as_bytes());
            }
        });
        (url, rx, handle)
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::mpsc;
    use std::thread::JoinHandle;

    use super::testing::read_request;
    use super::*;

    const T: Duration = Duration::from_secs(10);

    /// When the fake server closes its side after answering.
    #[derive(Clone, Copy)]
    enum Close {
        /// Right after the response (EOF-framed bodies).
        AfterWrite,
        /// Only once the client closed: a client that waits for EOF would hang (and time out).
        WhenClientCloses,
    }

    /// Serves one connection per response (each written in the given pieces), sending each
    /// raw request back, then exits.
    fn serve(
        responses: Vec<(Vec<Vec<u8>>, Close)>,
    ) -> (String, mpsc::Receiver<Vec<u8>>, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            for (pieces, close) in responses {
                let (mut stream, _) = listener.accept().expect("accept");
                let _ = tx.send(read_request(&mut stream));
                for p in pieces {
                    let _ = stream.write_all(&p);
                    let _ = stream.flush();
                }
                if let Close::WhenClientCloses = close {
                    let mut sink = [0u8; 1024];
                    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
                }
            }
        });
        (url, rx, handle)
    }

    fn one(response: &str, close: Close) -> (String, mpsc::Receiver<Vec<u8>>, JoinHandle<()>) {
        serve(vec![(vec![response.as_bytes().to_vec()], close)])
    }

    #[test]
    fn get_with_content_length_and_json() {
        let (url, rx, h) = one(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}",
            Close::WhenClientCloses,
        );
        let resp = request(
            &url,
            "GET",
            "/status",
            &[("Accept", "application/json")],
            None,
            T,
        )
        .expect("response");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-type"), Some("application/json"));
        assert_eq!(resp.header("CONTENT-TYPE"), Some("application/json"));
        assert_eq!(resp.header("x-missing"), None);
        let v: serde_json::Value = resp.json().expect("json");
        assert_eq!(v["ok"], true);
        drop(resp);
        let req = String::from_utf8(rx.recv().expect("request")).expect("utf8");
        let host = url.trim_start_matches("http://");
        assert!(req.starts_with("GET /status HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("\r\nHost: {host}\r\n")), "{req}");
        assert!(req.contains("\r\nConnection: close\r\n"), "{req}");
        assert!(req.contains("\r\nAccept: application/json\r\n"), "{req}");
        assert!(!req.to_ascii_lowercase().contains("authorization"), "{req}");
        h.join().expect("server");
    }

    #[test]
    fn token_body_and_base_path_are_sent() {
        let (url, rx, h) = one(
            "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
            Close::WhenClientCloses,
        );
        let resp = request_with_token(
            &format!("{url}/base/"),
            "POST",
            "/v1/echo",
            &[],
            Some(b"hello"),
            Some("s3cret"),
            T,
        )
        .expect("response");
        assert_eq!(resp.status, 201);
        assert!(resp.body.is_empty());
        let req = String::from_utf8(rx.recv().expect("request")).expect("utf8");
        assert!(req.starts_with("POST /base/v1/echo HTTP/1.1\r\n"), "{req}");
        assert!(
            req.contains("\r\nAuthorization: Bearer s3cret\r\n"),
            "{req}"
        );
        assert!(req.contains("\r\nContent-Length: 5\r\n"), "{req}");
        assert!(req.ends_with("\r\n\r\nhello"), "{req}");
        h.join().expect("server");
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers_in_pieces() {
        let pieces: Vec<Vec<u8>> = [
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "5;ext=1\r\nhel",
            "lo\r\n",
            "6\r\n world\r\n0\r\nX-Trailer: 1\r\n",
            "\r\n",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        let (url, _rx, h) = serve(vec![(pieces, Close::WhenClientCloses)]);
        let resp = request(&url, "GET", "/", &[], None, T).expect("response");
        assert_eq!(resp.text(), "hello world");
        h.join().expect("server");
    }

    #[test]
    fn body_until_close_and_interim_responses() {
        let (url, _rx, h) = one(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nX-A: b\r\n\r\nuntil the end",
            Close::AfterWrite,
        );
        let resp = request(&url, "GET", "/", &[], None, T).expect("response");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("x-a"), Some("b"));
        assert_eq!(resp.body, b"until the end");
        h.join().expect("server");
    }

    #[test]
    fn no_body_for_204_and_head() {
        let (url, _rx, h) = serve(vec![
            (
                vec![b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()],
                Close::WhenClientCloses,
            ),
            (
                vec![b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec()],
                Close::WhenClientCloses,
            ),
        ]);
        let r = request(&url, "GET", "/", &[], None, T).expect("204");
        assert_eq!((r.status, r.body.len()), (204, 0));
        let r = request(&url, "HEAD", "/", &[], None, T).expect("HEAD");
        assert_eq!((r.status, r.body.len()), (200, 0));
        h.join().expect("server");
    }

    #[test]
    fn refused_connection_says_what_to_do() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        drop(listener);
        let err = request(&url, "GET", "/status", &[], None, T).expect_err("refused");
        assert!(matches!(err, ClientError::Refused { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("no gateway at {url}: connection refused (is `moltbot gateway` running?)")
        );
    }

    #[test]
    fn silent_server_times_out() {
        let (url, _rx, h) = serve(vec![(vec![], Close::WhenClientCloses)]);
        let err =
            request(&url, "GET", "/", &[], None, Duration::from_millis(200)).expect_err("timeout");
        assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().starts_with("no answer from"), "{err}");
        h.join().expect("server");
    }

    #[test]
    fn malformed_responses_are_errors() {
        let cases: [(&str, Close, &str); 6] = [
            ("HTTX/1.1 200 OK\r\n\r\n", Close::AfterWrite, "malformed"),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                Close::AfterWrite,
                "ended after 3 of 10 bytes",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
                Close::AfterWrite,
                "conflicting content-length",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                Close::AfterWrite,
                "unsupported transfer-encoding",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                Close::AfterWrite,
                "invalid chunk size",
            ),
            ("", Close::AfterWrite, "closed without a response"),
        ];
        for (raw, close, want) in cases {
            let (url, _rx, h) = one(raw, close);
            let err = request(&url, "GET", "/", &[], None, T).expect_err(raw);
            assert!(
                matches!(err, ClientError::BadResponse { .. }),
                "{raw:?}: {err:?}"
            );
            assert!(err.to_string().contains(want), "{raw:?}: {err}");
            h.join().expect("server");
        }
    }

    #[test]
    fn oversized_head_is_refused() {
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..2000 {
            raw.extend_from_slice(format!("X-{i}: {}\r\n", "v".repeat(40)).as_bytes());
        }
        let (url, _rx, h) = serve(vec![(vec![raw], Close::WhenClientCloses)]);
        let err = request(&url, "GET", "/", &[], None, T).expect_err("too large");
        assert!(matches!(err, ClientError::BadResponse { .. }), "{err:?}");
        h.join().expect("server");
    }

    #[test]
    fn oversized_bodies_are_refused() {
        let (url, _rx, h) = serve(vec![
            (
                vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\nab".to_vec()],
                Close::WhenClientCloses,
            ),
            (
                vec![
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffff\r\n".to_vec(),
                ],
                Close::WhenClientCloses,
            ),
        ]);
        for _ in 0..2 {
            let err = request(&url, "GET", "/", &[], None, T).expect_err("too large");
            assert!(matches!(err, ClientError::TooLarge { .. }), "{err:?}");
        }
        h.join().expect("server");
    }

    #[test]
    fn json_errors_are_reported() {
        let resp = HttpResponse {
            status: 200,
            headers: vec![],
            body: b"not json".to_vec(),
        };
        let err = resp.json::<serde_json::Value>().expect_err("not json");
        assert!(matches!(err, ClientError::Json(_)), "{err:?}");
    }

    #[test]
    fn url_parsing() {
        let t = parse_url("http://[::1]:8080/base/").expect("v6");
        assert_eq!(
            t,
            Target {
                host: "::1".into(),
                port: 8080,
                authority: "[::1]:8080".into(),
                base: "/base".into()
            }
        );
        let t = parse_url("HTTP://localhost").expect("default port");
        assert_eq!(
            (t.host.as_str(), t.port, t.base.as_str()),
            ("localhost", 80, "")
        );
        let err = parse_url("https://gw:18789").expect_err("https");
        assert!(matches!(err, ClientError::Https { .. }), "{err:?}");
        assert!(err.to_string().contains("https is not supported"), "{err}");
        for bad in [
            "127.0.0.1:18789",
            "ftp://h:1",
            "http://:1",
            "http://h:0",
            "http://h:99999",
            "http://h:x",
            "http://u:p@h:1",
            "http://h:1/?q",
            "http://[::1",
            "http://[::1]x",
            "http://h h:1",
        ] {
            let err = parse_url(bad).expect_err(bad);
            assert!(
                matches!(err, ClientError::InvalidUrl { .. }),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn invalid_requests_are_refused_before_connecting() {
        // Port 1 on loopback: nothing is contacted because validation comes first.
        let url = "http://127.0.0.1:1";
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: [Case<'_>; 6] = [
            ("GET", "status", &[], None),
            ("GET", "/a b", &[], None),
            ("G ET", "/", &[], None),
            ("GET", "/", &[("X-A", "1\r\nX-Injected: 1")], None),
            ("GET", "/", &[("Content-Length", "5")], None),
            ("GET", "/", &[], Some("tok\nen")),
        ];
        for (method, path, headers, token) in cases {
            let err =
                request_with_token(url, method, path, headers, None, token, T).expect_err(path);
            assert!(matches!(err, ClientError::InvalidRequest(_)), "{err:?}");
            assert!(!err.to_string().contains("tok\nen"), "token never echoed");
        }
    }
}
