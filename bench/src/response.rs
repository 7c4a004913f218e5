//! Incremental HTTP/1.1 response reader: bytes arrive in any split; [`ResponseReader::parse`]
//! says when one whole response (head by `httparse`, body by Content-Length, chunked encoding
//! or connection close) is there.

use thiserror::Error;

/// The largest response head accepted.
pub const MAX_HEAD: usize = 64 << 10;
/// The largest response body accepted.
pub const MAX_BODY: usize = 64 << 20;
const MAX_HEADERS: usize = 64;
/// Initial buffer per connection (grown for larger responses; small so that thousands of
/// connections stay cheap).
const READ_CHUNK: usize = 4 << 10;
/// The most bytes buffered for one response (a chunked body's framing included).
const MAX_BUFFER: usize = MAX_HEAD + 2 * MAX_BODY;

/// Why a response could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    /// `httparse` refused the head.
    #[error("bad response head: {0}")]
    Head(String),
    /// The head did not end within [`MAX_HEAD`] bytes.
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The Content-Length header is missing digits, repeated with different values, or huge.
    #[error("bad content-length")]
    ContentLength,
    /// The chunked body is malformed.
    #[error("bad chunked body")]
    Chunked,
    /// The body exceeds [`MAX_BODY`].
    #[error("response body larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    /// The server sent bytes after a response although only one request was in flight.
    #[error("{0} unexpected bytes after the response")]
    TrailingBytes(usize),
    /// The connection ended before the response did.
    #[error("connection closed mid-response")]
    Truncated,
}

/// A complete response, borrowed from the reader.
#[derive(Debug, PartialEq, Eq)]
pub struct Response<'a> {
    /// Status code.
    pub status: u16,
    /// The `x-moltbot-worker` header's value.
    pub worker: Option<&'a [u8]>,
    /// The body, decoded.
    pub body: &'a [u8],
    /// The server will close the connection (or the response was framed by closing it).
    pub close: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(usize),
    DataEnd,
    Trailer,
}

#[derive(Debug, Clone, Copy)]
struct Head {
    status: u16,
    len: usize,
    framing: Framing,
    close: bool,
    has_worker: bool,
}

/// Reads one response at a time from a connection's bytes.
#[derive(Debug)]
pub struct ResponseReader {
    buf: Vec<u8>,
    filled: usize,
    head: Option<Head>,
    worker: Vec<u8>,
    /// Decoded chunked body.
    body: Vec<u8>,
    chunk: Chunk,
    /// Parse position within `buf` of the chunked decoder.
    pos: usize,
    /// Bytes of `buf` the complete response occupies (set when complete).
    consumed: usize,
    eof: bool,
}

impl Default for ResponseReader {
    fn default() -> Self {
        ResponseReader::new()
    }
}

impl ResponseReader {
    /// An empty reader.
    pub fn new() -> ResponseReader {
        ResponseReader {
            buf: vec![0; READ_CHUNK],
            filled: 0,
            head: None,
            worker: Vec::new(),
            body: Vec::new(),
            chunk: Chunk::Size,
            pos: 0,
            consumed: 0,
            eof: false,
        }
    }

    /// Space to read into (grown when nearly full, and to the whole body once its length is
    /// known; never empty).
    pub fn spare(&mut self) -> &mut [u8] {
        let mut need = self.filled + READ_CHUNK / 4;
        if let Some(Head {
            len,
            framing: Framing::Length(n),
            ..
        }) = self.head
        {
            need = need.max(len + n);
        }
        if need > self.buf.len() {
            let new_len = need
                .max(self.buf.len() * 2)
                .min(MAX_BUFFER)
                .max(self.filled + 1);
            self.buf.resize(new_len, 0);
        }
        &mut self.buf[self.filled..]
    }

    /// Records that `n` bytes were read into [`ResponseReader::spare`].
    pub fn filled(&mut self, n: usize) {
        self.filled = (self.filled + n).min(self.buf.len());
    }

    /// Copies `bytes` in (tests and callers that do not read into [`ResponseReader::spare`]).
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let spare = self.spare();
            let n = spare.len().min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            self.filled(n);
            bytes = &bytes[n..];
        }
    }

    /// Bytes received and not yet consumed.
    pub fn pending(&self) -> usize {
        self.filled
    }

    /// The connection reached end of file: a response framed by the close completes, any other
    /// partial response is truncated.
    pub fn set_eof(&mut self) {
        self.eof = true;
    }

    /// A complete response if there is one. After using it call [`ResponseReader::consume`].
    pub fn parse(&mut self) -> Result<Option<Response<'_>>, ParseError> {
        if self.filled >= MAX_BUFFER {
            return Err(ParseError::BodyTooLarge);
        }
        if !self.complete()? {
            if self.eof && (self.filled > 0 || self.head.is_some()) {
                return Err(ParseError::Truncated);
            }
            return Ok(None);
        }
        let Some(head) = self.head else {
            return Ok(None);
        };
        let body = match head.framing {
            Framing::Length(n) => &self.buf[head.len..head.len + n],
            Framing::UntilClose => &self.buf[head.len..self.filled],
            Framing::Chunked => &self.body[..],
        };
        Ok(Some(Response {
            status: head.status,
            worker: head.has_worker.then_some(&self.worker[..]),
            body,
            close: head.close || head.framing == Framing::UntilClose,
        }))
    }

    /// Drops the response [`ResponseReader::parse`] returned. Errors if bytes follow it (a
    /// server answering more than was asked).
    pub fn consume(&mut self) -> Result<(), ParseError> {
        let used = self.consumed.min(self.filled);
        let rest = self.filled - used;
        self.buf.copy_within(used..self.filled, 0);
        self.filled = rest;
        self.head = None;
        self.body.clear();
        self.chunk = Chunk::Size;
        self.pos = 0;
        self.consumed = 0;
        if self.buf.len() > 4 * READ_CHUNK && self.filled < READ_CHUNK {
            // A huge response grew the buffer: give the memory back.
            self.buf.truncate(READ_CHUNK);
            self.buf.shrink_to_fit();
        }
        if rest > 0 {
            return Err(ParseError::TrailingBytes(rest));
        }
        Ok(())
    }

    /// Forgets everything (the connection was closed).
    pub fn reset(&mut self) {
        self.filled = 0;
        self.head = None;
        self.body.clear();
        self.chunk = Chunk::Size;
        self.pos = 0;
        self.consumed = 0;
        self.eof = false;
    }

    /// Advances the parse; true once a whole response is buffered.
    fn complete(&mut self) -> Result<bool, ParseError> {
        loop {
            if self.head.is_none() && !self.parse_head()? {
                return Ok(false);
            }
            let Some(head) = self.head else {
                return Ok(false);
            };
            // Interim responses (100 Continue, ...) are skipped.
            if (100..200).contains(&head.status) && head.status != 101 {
                let used = head.len;
                self.buf.copy_within(used..self.filled, 0);
                self.filled -= used;
                self.head = None;
                continue;
            }
            return match head.framing {
                Framing::Length(n) => {
                    if self.filled >= head.len + n {
                        self.consumed = head.len + n;
                        Ok(true)
                    } else {
                        Ok(false)
                    }
                }
                Framing::UntilClose => {
                    if self.filled - head.len > MAX_BODY {
                        return Err(ParseError::BodyTooLarge);
                    }
                    self.consumed = self.filled;
                    Ok(self.eof)
                }
                Framing::Chunked => self.decode_chunks(),
            };
        }
    }

    fn parse_head(&mut self) -> Result<bool, ParseError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(&self.buf[..self.filled]) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if self.filled > MAX_HEAD {
                    return Err(ParseError::HeadTooLarge);
                }
                return Ok(false);
            }
            Err(e) => return Err(ParseError::Head(e.to_string())),
        };
        let status = resp.code.unwrap_or(0);
        let mut length: Option<usize> = None;
        let mut chunked = false;
        let mut close = resp.version == Some(0);
        let mut has_worker = false;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let n = parse_length(h.value)?;
                if length.is_some_and(|m| m != n) {
                    return Err(ParseError::ContentLength);
                }
                length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = h
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") && resp.version == Some(0) {
                        close = false;
                    }
                }
            } else if h.name.eq_ignore_ascii_case("x-moltbot-worker") {
                self.worker.clear();
                self.worker.extend_from_slice(h.value);
                has_worker = true;
            }
        }
        let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::UntilClose
        };
        self.head = Some(Head {
            status,
            len,
            framing,
            close,
            has_worker,
        });
        self.pos = len;
        self.chunk = Chunk::Size;
        Ok(true)
    }

    fn decode_chunks(&mut self) -> Result<bool, ParseError> {
        loop {
            let avail = &self.buf[self.pos..self.filled];
            match self.chunk {
                Chunk::Size => match httparse::parse_chunk_size(avail) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        self.pos += used;
                        let size = usize::try_from(size).map_err(|_| ParseError::BodyTooLarge)?;
                        if size > MAX_BODY.saturating_sub(self.body.len()) {
                            return Err(ParseError::BodyTooLarge);
                        }
                        self.chunk = if size == 0 {
                            Chunk::Trailer
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) => {
                        // A size line is short; a long partial one is garbage.
                        return if avail.len() > 1024 {
                            Err(ParseError::Chunked)
                        } else {
                            Ok(false)
                        };
                    }
                    Err(_) => return Err(ParseError::Chunked),
                },
                Chunk::Data(rem) => {
                    let take = rem.min(avail.len());
                    self.body.extend_from_slice(&avail[..take]);
                    self.pos += take;
                    if take < rem {
                        self.chunk = Chunk::Data(rem - take);
                        return Ok(false);
                    }
                    self.chunk = Chunk::DataEnd;
                }
                Chunk::DataEnd => {
                    if avail.len() < 2 {
                        return Ok(false);
                    }
                    if &avail[..2] != b"\r\n" {
                        return Err(ParseError::Chunked);
                    }
                    self.pos += 2;
                    self.chunk = Chunk::Size;
                }
                Chunk::Trailer => {
                    // Trailer fields are skipped line by line up to the empty line.
                    let Some(eol) = avail.windows(2).position(|w| w == b"\r\n") else {
                        return if avail.len() > MAX_HEAD {
                            Err(ParseError::HeadTooLarge)
                        } else {
                            Ok(false)
                        };
                    };
                    self.pos += eol + 2;
                    if eol == 0 {
                        self.consumed = self.pos;
                        return Ok(true);
                    }
                }
            }
        }
    }
}

fn parse_length(v: &[u8]) -> Result<usize, ParseError> {
    let v = v.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) || v.len() > 12 {
        return Err(ParseError::ContentLength);
    }
    let n = v
        .iter()
        .fold(0usize, |acc, &d| acc * 10 + usize::from(d - b'0'));
    if n > MAX_BODY {
        return Err(ParseError::BodyTooLarge);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Owned {
        status: u16,
        worker: Option<Vec<u8>>,
        body: Vec<u8>,
        close: bool,
    }

    fn owned(r: Response<'_>) -> Owned {
        Owned {
            status: r.status,
            worker: r.worker.map(<[u8]>::to_vec),
            body: r.body.to_vec(),
            close: r.close,
        }
    }

    /// Feeds `raw` in pieces cut at `cuts`, returns each response seen.
    fn read_split(raw: &[u8], cuts: &[usize], eof: bool) -> Result<Vec<Owned>, ParseError> {
        let mut r = ResponseReader::new();
        let mut out = Vec::new();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&raw.len())) {
            r.feed(&raw[prev..c]);
            prev = c;
            while let Some(resp) = r.parse()? {
                out.push(owned(resp));
                match r.consume() {
                    Ok(()) => {}
                    Err(ParseError::TrailingBytes(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if eof {
            r.set_eof();
            if let Some(resp) = r.parse()? {
                out.push(owned(resp));
                r.consume()?;
            }
        }
        Ok(out)
    }

    const CL: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
x-moltbot-worker: worker-1\r\ncontent-length: 11\r\n\r\nhello world";

    #[test]
    fn content_length_at_every_split() {
        let want = Owned {
            status: 200,
            worker: Some(b"worker-1".to_vec()),
            body: b"hello world".to_vec(),
            close: false,
        };
        for a in 0..=CL.len() {
            for b in a..=CL.len() {
                let got = read_split(CL, &[a, b], false).expect("parse");
                assert_eq!(got, vec![want.clone()], "cuts {a},{b}");
            }
        }
    }

    #[test]
    fn incomplete_is_not_a_response() {
        let mut r = ResponseReader::new();
        r.feed(&CL[..CL.len() - 1]);
        assert_eq!(r.parse(), Ok(None));
        r.feed(&CL[CL.len() - 1..]);
        assert!(r.parse().expect("parse").is_some());
    }

    #[test]
    fn chunked_at_every_split() {
        let raw = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\
Connection: close\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for a in 0..=raw.len() {
            for b in (a..=raw.len()).step_by(3) {
                let got = read_split(raw, &[a, b], false).expect("parse");
                assert_eq!(got.len(), 1, "cuts {a},{b}");
                assert_eq!(got[0].status, 503);
                assert_eq!(got[0].body, b"hello world");
                assert!(got[0].close);
                assert_eq!(got[0].worker, None);
            }
        }
    }

    #[test]
    fn two_responses_back_to_back_on_one_connection() {
        let mut raw = CL.to_vec();
        raw.extend_from_slice(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
        let mut r = ResponseReader::new();
        r.feed(&raw);
        assert_eq!(r.parse().expect("first").map(|x| x.status), Some(200));
        assert!(matches!(r.consume(), Err(ParseError::TrailingBytes(_))));
        let second = r.parse().expect("second").expect("complete");
        assert_eq!((second.status, second.body), (404, &b""[..]));
        assert_eq!(r.consume(), Ok(()));
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn body_until_close_needs_eof() {
        let raw = b"HTTP/1.0 200 OK\r\n\r\nsome body";
        for cut in 0..=raw.len() {
            let got = read_split(raw, &[cut], true).expect("parse");
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].body, b"some body");
            assert!(got[0].close);
        }
        assert_eq!(read_split(raw, &[], false).expect("parse").len(), 0);
    }

    #[test]
    fn interim_responses_are_skipped() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        for cut in 0..=raw.len() {
            let got = read_split(raw, &[cut], false).expect("parse");
            assert_eq!(got.len(), 1, "cut {cut}");
            assert_eq!((got[0].status, &got[0].body[..]), (200, &b"ok"[..]));
        }
    }

    #[test]
    fn no_body_statuses_and_connection_tokens() {
        let raw = b"HTTP/1.1 204 No Content\r\nConnection: keep-alive, close\r\n\r\n";
        let got = read_split(raw, &[], false).expect("parse");
        assert_eq!(got[0].status, 204);
        assert!(got[0].close);
        let raw = b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n";
        assert!(!read_split(raw, &[], false).expect("parse")[0].close);
    }

    #[test]
    fn truncation_and_garbage_are_errors() {
        let mut r = ResponseReader::new();
        r.feed(&CL[..20]);
        r.set_eof();
        assert_eq!(r.parse(), Err(ParseError::Truncated));

        let cases: &[(&[u8], ParseError)] = &[
            (
                b"HTTQ/1.1 200 OK\r\n\r\n",
                ParseError::Head("invalid HTTP version".into()),
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1x\r\n\r\n",
                ParseError::ContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                ParseError::ContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 999999999999\r\n\r\n",
                ParseError::BodyTooLarge,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                ParseError::Chunked,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXX",
                ParseError::Chunked,
            ),
        ];
        for (raw, want) in cases {
            let mut r = ResponseReader::new();
            r.feed(raw);
            assert_eq!(
                r.parse().err().as_ref(),
                Some(want),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let mut r = ResponseReader::new();
        let mut head = b"HTTP/1.1 200 OK\r\nx-pad: ".to_vec();
        head.resize(MAX_HEAD + 10, b'a');
        r.feed(&head);
        assert_eq!(r.parse().err(), Some(ParseError::HeadTooLarge));
    }

    #[test]
    fn large_bodies_grow_the_buffer_and_shrink_back() {
        let body = vec![b'z'; 200_000];
        let mut raw =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        raw.extend_from_slice(&body);
        let got = read_split(&raw, &[7, 1000, 70_000], false).expect("parse");
        assert_eq!(got[0].body, body);
        let mut r = ResponseReader::new();
        r.feed(&raw);
        assert!(r.parse().expect("parse").is_some());
        r.consume().expect("consume");
        assert!(r.buf.len() <= READ_CHUNK);
        r.feed(CL);
        assert_eq!(r.parse().expect("parse").map(|x| x.body.len()), Some(11));
    }

    #[test]
    fn reset_forgets_a_partial_response() {
        let mut r = ResponseReader::new();
        r.feed(&CL[..30]);
        assert_eq!(r.parse(), Ok(None));
        r.reset();
        r.feed(CL);
        assert_eq!(r.parse().expect("parse").map(|x| x.status), Some(200));
    }
}
