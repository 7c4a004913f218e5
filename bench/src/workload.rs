//! The requests sent and the checks on their answers.
//!
//! Every request carries a body unique to its user and sequence number, so an answer that
//! belongs to another request (or another user) is caught, not only a wrong status.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::{Config, Endpoint};
use crate::response::Response;
use crate::users::{write_u64, write_user};

/// `{"message":""}`: the agent body's bytes besides the message.
const AGENT_OVERHEAD: usize = 14;
/// `{"type":"echo","userId":"","payload":{"data":""}}` besides the user id and data.
const ROUTE_OVERHEAD: usize = 49;

/// Builds the request bytes of a run.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    endpoint: Endpoint,
    /// Request line and the headers common to every request.
    head: Vec<u8>,
    body_size: usize,
}

impl RequestTemplate {
    /// The template of `cfg`'s endpoint, target and token.
    pub fn new(cfg: &Config) -> RequestTemplate {
        let mut head = Vec::with_capacity(256);
        head.extend_from_slice(b"POST ");
        head.extend_from_slice(cfg.target.prefix.as_bytes());
        head.extend_from_slice(cfg.endpoint.path().as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(cfg.target.host_header.as_bytes());
        head.extend_from_slice(b"\r\n");
        if let Some(token) = &cfg.token {
            head.extend_from_slice(b"authorization: Bearer ");
            head.extend_from_slice(token.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(match cfg.endpoint {
            Endpoint::Echo => b"content-type: application/octet-stream\r\n",
            Endpoint::Agent | Endpoint::Route => b"content-type: application/json\r\n",
        });
        RequestTemplate {
            endpoint: cfg.endpoint,
            head,
            body_size: cfg.body_size,
        }
    }

    /// Writes request `seq` of user index `user` into `out` and what the answer must echo into
    /// `expect` (echo: the body; agent: the message; route: the payload JSON). Both are cleared
    /// first; their allocations are reused.
    pub fn build(&self, user: u32, seq: u64, out: &mut Vec<u8>, expect: &mut Vec<u8>) {
        out.clear();
        expect.clear();
        out.extend_from_slice(&self.head);
        if self.endpoint != Endpoint::Route {
            out.extend_from_slice(b"x-moltbot-user: ");
            write_user(out, user);
            out.extend_from_slice(b"\r\n");
        }
        match self.endpoint {
            Endpoint::Echo => fill(expect, user, seq, self.body_size),
            Endpoint::Agent => fill(
                expect,
                user,
                seq,
                self.body_size.saturating_sub(AGENT_OVERHEAD).max(1),
            ),
            Endpoint::Route => {
                let mut id = Vec::with_capacity(16);
                write_user(&mut id, user);
                let data = self
                    .body_size
                    .saturating_sub(ROUTE_OVERHEAD + id.len())
                    .max(1);
                expect.extend_from_slice(b"{\"data\":\"");
                fill(expect, user, seq, data);
                expect.extend_from_slice(b"\"}");
            }
        }
        let body_len = match self.endpoint {
            Endpoint::Echo => expect.len(),
            Endpoint::Agent => expect.len() + AGENT_OVERHEAD,
            Endpoint::Route => {
                // `{"type":"echo","userId":"user-N","payload":` + payload + `}`
                let mut n = 0;
                n += br#"{"type":"echo","userId":""#.len();
                n += b"user-".len() + decimal_len(u64::from(user));
                n += br#"","payload":"#.len();
                n + expect.len() + 1
            }
        };
        out.extend_from_slice(b"content-length: ");
        write_u64(out, body_len as u64);
        out.extend_from_slice(b"\r\n\r\n");
        match self.endpoint {
            Endpoint::Echo => out.extend_from_slice(expect),
            Endpoint::Agent => {
                out.extend_from_slice(br#"{"message":""#);
                out.extend_from_slice(expect);
                out.extend_from_slice(br#""}"#);
            }
            Endpoint::Route => {
                out.extend_from_slice(br#"{"type":"echo","userId":""#);
                write_user(out, user);
                out.extend_from_slice(br#"","payload":"#);
                out.extend_from_slice(expect);
                out.push(b'}');
            }
        }
    }
}

fn decimal_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

/// Exactly `len` JSON-safe bytes: `u{user}s{seq}.` then the alphabet, cut to `len`.
pub(crate) fn fill(out: &mut Vec<u8>, user: u32, seq: u64, len: usize) {
    let start = out.len();
    out.push(b'u');
    write_u64(out, u64::from(user));
    out.push(b's');
    write_u64(out, seq);
    out.push(b'.');
    let mut c = 0u8;
    while out.len() - start < len {
        out.push(b'a' + c);
        c = (c + 1) % 26;
    }
    out.truncate(start + len);
}

#[derive(Deserialize)]
struct AgentReply<'a> {
    #[serde(rename = "workerId", borrow)]
    worker_id: Option<Cow<'a, str>>,
    #[serde(rename = "userId", borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow)]
    reply: Cow<'a, str>,
}

#[derive(Deserialize)]
struct RouteReply<'a> {
    success: bool,
    #[serde(rename = "workerId", borrow)]
    worker_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

/// Checks a 200 answer's body against what was sent. The error says what differs.
pub fn verify(
    endpoint: Endpoint,
    user: u32,
    expect: &[u8],
    resp: &Response<'_>,
) -> Result<(), String> {
    match endpoint {
        Endpoint::Echo => {
            if resp.body == expect {
                Ok(())
            } else {
                Err(format!(
                    "user-{user}: echoed body differs from the one sent ({} bytes sent, {} received)",
                    expect.len(),
                    resp.body.len()
                ))
            }
        }
        Endpoint::Agent => {
            let r: AgentReply<'_> = serde_json::from_slice(resp.body)
                .map_err(|e| format!("user-{user}: agent reply is not the expected JSON: {e}"))?;
            let want_user = format!("user-{user}");
            if r.user_id != want_user {
                return Err(format!(
                    "{want_user}: agent reply is for user {:?}",
                    r.user_id
                ));
            }
            let reply = r.reply.as_bytes();
            if reply.strip_prefix(b"echo: ") != Some(expect) {
                return Err(format!(
                    "{want_user}: agent reply does not echo the message"
                ));
            }
            same_worker(&want_user, r.worker_id.as_deref(), resp.worker)
        }
        Endpoint::Route => {
            let r: RouteReply<'_> = serde_json::from_slice(resp.body)
                .map_err(|e| format!("user-{user}: route reply is not the expected JSON: {e}"))?;
            let want_user = format!("user-{user}");
            if !r.success {
                return Err(format!("{want_user}: route reply has success=false"));
            }
            if r.payload.map(|p| p.get().as_bytes()) != Some(expect) {
                return Err(format!(
                    "{want_user}: route reply does not echo the payload"
                ));
            }
            same_worker(&want_user, r.worker_id.as_deref(), resp.worker)
        }
    }
}

/// The worker named in the body must be the one in `x-moltbot-worker` (when both exist).
fn same_worker(user: &str, body: Option<&str>, header: Option<&[u8]>) -> Result<(), String> {
    match (body, header) {
        (Some(b), Some(h)) if b.as_bytes() != h => Err(format!(
            "{user}: body names {b:?} but x-moltbot-worker is {:?}",
            String::from_utf8_lossy(h)
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Target;

    fn template(endpoint: Endpoint, body_size: usize, token: Option<&str>) -> RequestTemplate {
        let mut cfg = Config::new(Target::parse("http://127.0.0.1:18789/p").expect("url"));
        cfg.endpoint = endpoint;
        cfg.body_size = body_size;
        cfg.token = token.map(str::to_string);
        RequestTemplate::new(&cfg)
    }

    /// Parses a built request: (path, headers, body).
    fn parse(raw: &[u8]) -> (String, Vec<(String, String)>, Vec<u8>) {
        let mut h = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut h);
        let n = match req.parse(raw).expect("request parses") {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => panic!("partial request"),
        };
        let headers: Vec<_> = req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .expect("content-length");
        assert_eq!(raw.len() - n, len, "content-length matches the body");
        (
            req.path.unwrap_or("").to_string(),
            headers,
            raw[n..].to_vec(),
        )
    }

    fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
        h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn echo_requests_are_well_formed_and_unique() {
        let t = template(Endpoint::Echo, 64, Some("s3cret"));
        let (mut out, mut expect) = (Vec::new(), Vec::new());
        t.build(42, 7, &mut out, &mut expect);
        let (path, h, body) = parse(&out);
        assert_eq!(path, "/p/v1/echo");
        assert_eq!(header(&h, "host"), Some("127.0.0.1:18789"));
        assert_eq!(header(&h, "authorization"), Some("Bearer s3cret"));
        assert_eq!(header(&h, "x-moltbot-user"), Some("user-42"));
        assert_eq!(body.len(), 64);
        assert_eq!(body, expect);
        assert!(body.starts_with(b"u42s7.abc"));
        let first = body.clone();
        t.build(42, 8, &mut out, &mut expect);
        assert_ne!(parse(&out).2, first);
        for size in [0, 1, 3, 5000] {
            let t = template(Endpoint::Echo, size, None);
            t.build(123456, 99, &mut out, &mut expect);
            let (_, h, body) = parse(&out);
            assert_eq!(body.len(), size);
            assert_eq!(header(&h, "authorization"), None);
        }
    }

    #[test]
    fn agent_and_route_bodies_are_json_of_about_the_size() {
        let (mut out, mut expect) = (Vec::new(), Vec::new());
        for size in [0, 10, 64, 300] {
            let t = template(Endpoint::Agent, size, None);
            t.build(3, 1, &mut out, &mut expect);
            let (path, h, body) = parse(&out);
            assert_eq!(path, "/p/v1/agent");
            assert_eq!(header(&h, "x-moltbot-user"), Some("user-3"));
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["message"].as_str().map(str::as_bytes), Some(&expect[..]));
            assert_eq!(body.len(), size.max(AGENT_OVERHEAD + 1));

            let t = template(Endpoint::Route, size, None);
            t.build(12345, 1, &mut out, &mut expect);
            let (path, h, body) = parse(&out);
            assert_eq!(path, "/p/v1/route");
            assert_eq!(header(&h, "x-moltbot-user"), None);
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["type"], "echo");
            assert_eq!(v["userId"], "user-12345");
            let payload = serde_json::to_vec(&v["payload"]).expect("payload");
            assert_eq!(payload, expect);
            assert_eq!(body.len(), size.max(ROUTE_OVERHEAD + 10 + 1));
        }
    }

    fn resp<'a>(body: &'a [u8], worker: Option<&'a [u8]>) -> Response<'a> {
        Response {
            status: 200,
            worker,
            body,
            close: false,
        }
    }

    #[test]
    fn verifies_echo() {
        assert!(verify(Endpoint::Echo, 1, b"abc", &resp(b"abc", None)).is_ok());
        let e = verify(Endpoint::Echo, 1, b"abc", &resp(b"abd", None)).expect_err("mismatch");
        assert!(e.contains("user-1"), "{e}");
        assert!(verify(Endpoint::Echo, 1, b"abc", &resp(b"", None)).is_err());
    }

    #[test]
    fn verifies_agent() {
        let w = Some(&b"worker-1"[..]);
        let ok =
            br#"{"workerId":"worker-1","pid":9,"userId":"user-5","turn":3,"reply":"echo: hi"}"#;
        assert!(verify(Endpoint::Agent, 5, b"hi", &resp(ok, w)).is_ok());
        assert!(verify(Endpoint::Agent, 6, b"hi", &resp(ok, w)).is_err());
        assert!(verify(Endpoint::Agent, 5, b"ho", &resp(ok, w)).is_err());
        assert!(verify(Endpoint::Agent, 5, b"hi", &resp(ok, Some(b"worker-0"))).is_err());
        assert!(verify(Endpoint::Agent, 5, b"hi", &resp(b"not json", w)).is_err());
    }

    #[test]
    fn verifies_route() {
        let w = Some(&b"worker-0"[..]);
        let ok = br#"{"requestId":"r1","workerId":"worker-0","success":true,"payload":{"data":"x"},"durationUs":4}"#;
        assert!(verify(Endpoint::Route, 0, br#"{"data":"x"}"#, &resp(ok, w)).is_ok());
        assert!(verify(Endpoint::Route, 0, br#"{"data":"y"}"#, &resp(ok, w)).is_err());
        assert!(
            verify(
                Endpoint::Route,
                0,
                br#"{"data":"x"}"#,
                &resp(ok, Some(b"worker-2"))
            )
            .is_err()
        );
        let failed = br#"{"requestId":"r1","workerId":"worker-0","success":false,"error":"x","durationUs":0}"#;
        assert!(verify(Endpoint::Route, 0, br#"{"data":"x"}"#, &resp(failed, w)).is_err());
    }
}
