//! An HTTP answer as the endpoints build it and the connection writes it: status, a few
//! headers, a body that may be a worker's reply in place, and the gateway's error shape.

use std::time::Duration;

use crate::error::RouteError;
use crate::gateway::http;
use crate::metrics::Endpoint;
use crate::pool::reply::Reply;

/// `content-type` of JSON answers.
pub const JSON: &str = "application/json";

/// A response body.
pub enum Body {
    /// Owned bytes.
    Bytes(Vec<u8>),
    /// The body of a worker's answer, in its validated frame copy.
    Reply(Reply),
}

impl Body {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Body::Bytes(b) => b,
            Body::Reply(r) => r.body(),
        }
    }
}

/// A complete answer to one request.
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Content type (empty: none).
    pub content_type: &'static str,
    /// Extra headers (rare ones: retry-after, allow, www-authenticate).
    pub headers: Vec<(&'static str, String)>,
    /// The slot that answered, sent as `x-moltbot-worker: worker-N`.
    pub worker: Option<usize>,
    /// The body.
    pub body: Body,
    /// Which endpoint (metrics).
    pub endpoint: Endpoint,
}

impl Answer {
    /// A JSON answer.
    pub fn json(endpoint: Endpoint, status: u16, body: Vec<u8>) -> Answer {
        Answer {
            status,
            content_type: JSON,
            headers: Vec::new(),
            worker: None,
            body: Body::Bytes(body),
            endpoint,
        }
    }

    /// The gateway's error shape `{"error":{"code","message","retryable","retryAfterMs"}}`.
    pub fn error(
        endpoint: Endpoint,
        status: u16,
        code: &str,
        message: &str,
        retryable: bool,
        retry_after: Option<Duration>,
    ) -> Answer {
        let ms = retry_after.map(|d| d.as_millis() as u64);
        let mut a = Answer::json(
            endpoint,
            status,
            http::error_body(code, message, retryable, ms),
        );
        if let Some(d) = retry_after {
            a.headers
                .push(("retry-after", d.as_secs().max(1).to_string()));
        }
        a
    }

    /// An answer for a gateway-side failure of a routed request.
    pub fn route_error(endpoint: Endpoint, e: &RouteError) -> Answer {
        Answer::error(
            endpoint,
            e.status(),
            e.code(),
            &e.to_string(),
            e.retryable(),
            e.retry_after(),
        )
    }

    /// Marks the answer as coming from (or meant for) `slot`.
    pub fn with_worker(mut self, slot: Option<usize>) -> Answer {
        self.worker = slot;
        self
    }
}

/// Bodies at least this large are written from the worker's answer straight to the socket
/// (a second write) instead of being copied behind the head first.
pub const DIRECT_BODY: usize = 16 * 1024;

/// `x-moltbot-worker` values, built once.
pub(crate) fn worker_header(slot: usize) -> std::borrow::Cow<'static, str> {
    const NAMES: [&str; 16] = [
        "worker-0",
        "worker-1",
        "worker-2",
        "worker-3",
        "worker-4",
        "worker-5",
        "worker-6",
        "worker-7",
        "worker-8",
        "worker-9",
        "worker-10",
        "worker-11",
        "worker-12",
        "worker-13",
        "worker-14",
        "worker-15",
    ];
    match NAMES.get(slot) {
        Some(n) => std::borrow::Cow::Borrowed(n),
        None => std::borrow::Cow::Owned(crate::sandbox::worker_id(slot)),
    }
}

/// Writes an answer (head + body) into `out`.
pub fn write_answer(out: &mut Vec<u8>, a: &Answer, keep_alive: bool) {
    write_answer_to(out, a, keep_alive, false, true);
}

/// Writes an answer; `head_only` (the request was HEAD) keeps the Content-Length but leaves
/// the body out: a response to HEAD never has content (RFC 9110 §9.3.2), and body bytes would
/// be read as the start of the next response on a keep-alive connection.
/// `with_body` false writes the head only (the caller sends the body itself).
pub fn write_answer_to(
    out: &mut Vec<u8>,
    a: &Answer,
    keep_alive: bool,
    head_only: bool,
    with_body: bool,
) {
    let worker = a.worker.map(worker_header);
    let mut headers: [(&str, &str); 4] = [("", ""); 4];
    let mut n = 0;
    if let Some(w) = &worker {
        headers[n] = ("x-moltbot-worker", w);
        n += 1;
    }
    for (k, v) in &a.headers {
        if n == headers.len() {
            break;
        }
        headers[n] = (k, v.as_str());
        n += 1;
    }
    let body = a.body.as_slice();
    http::write_response_head(
        out,
        a.status,
        a.content_type,
        body.len(),
        keep_alive,
        &headers[..n],
    );
    if !head_only && with_body && http::status_has_content(a.status) {
        out.extend_from_slice(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_to_head_have_no_body() {
        let a = Answer::json(Endpoint::Livez, 405, br#"{"x":1}"#.to_vec());
        let mut full = Vec::new();
        write_answer_to(&mut full, &a, true, false, true);
        let mut head_only = Vec::new();
        write_answer_to(&mut head_only, &a, true, true, true);
        assert!(full.ends_with(br#"{"x":1}"#));
        assert!(head_only.ends_with(b"\r\n\r\n"));
        assert_eq!(&full[..head_only.len()], head_only.as_slice());
        let text = String::from_utf8_lossy(&head_only);
        assert!(text.contains("content-length: 7\r\n"), "{text}");
    }

    /// A worker's body under a status without content is not written: the client would read
    /// it as the next response.
    #[test]
    fn answers_whose_status_has_no_content_have_no_body() {
        let forged = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nX".to_vec();
        for status in [204, 205, 304] {
            let a = Answer::json(Endpoint::Echo, status, forged.clone());
            let mut out = Vec::new();
            write_answer_to(&mut out, &a, true, false, true);
            let text = String::from_utf8_lossy(&out);
            assert!(text.ends_with("\r\n\r\n"), "{status}: {text}");
            assert_eq!(text.matches("HTTP/1.1").count(), 1, "{status}: {text}");
        }
    }
}
