//! Hostile clients against a real gateway process over raw sockets:
//! a table of malformed, ambiguous and smuggling requests, each sent whole and one byte per
//! write; exhaustion (slowloris, a pipelining flood, a client that never reads, the head limit
//! at and one past its value); and hostile identities (user ids and session names) that must
//! never create or read a file outside their user's directory.
//!
//! `tests/gateway_http.rs` holds more variants of the same families (see the references at
//! each test); the table here covers every family of the issue on its own.
//!
//! No sleep synchronises anything: a test waits for an answer, for the server to close, or polls
//! a condition with `gw::wait_until` (all bounded by `gw::DEADLINE`). The one paced loop (the
//! slowloris trickle) is load generation and ends when the server closes its connections.

mod gw;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Component, Path};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gw::{
    DEADLINE, GatewayProc, Options, RawResponse, parse_responses, raw_request as request,
    read_until_closed,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A test gateway (its log is checked for panics when it is dropped, see `gw`).
type Gw = GatewayProc;

fn start(opts: Options) -> Gw {
    let g = GatewayProc::start(opts);
    g.wait_ready();
    g
}

/// Checks the gateway's JSON error shape and status; returns the error object.
fn assert_error(what: &str, r: &RawResponse, status: u16, code: &str) -> Value {
    let text = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, status, "{what}: status; body {text}");
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{what}: content-type"
    );
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {text}"));
    let err = &v["error"];
    assert_eq!(err["code"], code, "{what}: {text}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: message: {text}"
    );
    assert!(err["retryable"].is_boolean(), "{what}: {text}");
    err.clone()
}

/// `POST /v1/agent` for `user` (a request that, if processed, assigns the user a worker).
fn agent_request(user: &str) -> Vec<u8> {
    request(
        "POST",
        "/v1/agent",
        &[("x-moltbot-user", user.as_bytes())],
        Some(b"hi"),
    )
}

/// Whether `user` has a worker (i.e. one of its requests was processed).
fn assigned(g: &GatewayProc, user: &str) -> bool {
    let r = g.request("GET", &format!("/v1/users/{user}/worker"), &[], None);
    assert_eq!(r.status, 200, "lookup {user}: {}", r.text());
    let v: Value = r.json().expect("lookup JSON");
    v["assigned"].as_bool().expect("assigned")
}

/// Sends `bytes` on a new connection (whole, or one byte per `write` with `TCP_NODELAY`) and
/// returns everything the server sent until it closed. A reader thread runs alongside, so a
/// server that answers and closes early (refusing the request) is seen even while bytes are
/// still being written; the writer then stops.
fn exchange(g: &GatewayProc, bytes: &[u8], bytewise: bool) -> Vec<u8> {
    let mut s = g.connect();
    let mut reader = s.try_clone().expect("clone");
    let done = Arc::new(AtomicBool::new(false));
    let reader_done = done.clone();
    let t = std::thread::spawn(move || {
        let raw = read_until_closed(&mut reader);
        reader_done.store(true, Ordering::Release);
        raw
    });
    if bytewise {
        for b in bytes {
            if done.load(Ordering::Acquire) || s.write_all(std::slice::from_ref(b)).is_err() {
                break;
            }
        }
    } else {
        // A write error means the server already refused and closed: the reader has the rest.
        let _ = s.write_all(bytes);
    }
    match t.join() {
        Ok(raw) => raw,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// VmRSS of a process in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Open connections as `/status` counts them (the status request's own included).
fn open_connections(g: &GatewayProc) -> u64 {
    g.status()["gateway"]["connections"]
        .as_u64()
        .expect("gateway.connections")
}

/// The complete responses at the start of `raw` (a connection closed mid-response leaves a
/// truncated tail, which is ignored) and whether such a tail was left.
fn complete_responses(raw: &[u8]) -> (Vec<RawResponse>, bool) {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = resp.parse(rest) else {
            return (out, true);
        };
        let len: usize = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
            .unwrap_or(0);
        if rest.len() < head_len + len {
            return (out, true);
        }
        out.extend(parse_responses(&rest[..head_len + len]));
        rest = &rest[head_len + len..];
    }
    (out, false)
}

// ---------------------------------------------------------------------------------------------
// Smuggling and framing: one table, every request sent whole and one byte per write
// ---------------------------------------------------------------------------------------------

/// What the gateway must do with a hostile request.
enum Want {
    /// Exactly one error answer with this status and code, `connection: close`, and the
    /// request appended behind it (for another user) never processed.
    Refused(u16, &'static str),
    /// Answered, in order, with these statuses (the bytes end with a `Connection: close`
    /// request so the server closes after the last answer); the listed users were never
    /// assigned (a request hidden in a body was not run).
    Answered(&'static [u16], &'static [&'static str]),
}

/// The hostile-input table: smuggling (TE/CL conflicts, TE lists and codings, bad and oversized
/// chunk sizes, repeated Content-Length), obs-fold, bare LF, NUL and control characters in
/// names, values, targets and methods, invalid methods, HTTP/0.9, the HTTP/2 preface, a body on
/// GET, absolute-form targets; each whole and in 1-byte writes.
///
/// More variants live in `tests/gateway_http.rs`: `smuggling_attempts_are_refused_and_close_the_
/// connection` (30 TE/CL/chunk/obs-fold/bare-LF cases), `other_http_versions_are_505`,
/// `request_targets`, `invalid_users_are_400`, `unknown_paths_are_404_and_wrong_methods_405`,
/// `requests_written_one_byte_at_a_time`, `deep_pipelines_for_one_user` (a GET with a body).
#[test]
fn hostile_requests_are_refused_or_answered_safely() {
    let g = start(Options::new(1));
    let post = |extra: &str| {
        format!("POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: victim\r\n{extra}")
            .into_bytes()
    };
    let cat = |parts: &[&[u8]]| parts.concat();
    let close_livez = b"GET /livez HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    let long_method = "M".repeat(2000);
    // A request hidden in a GET's body: if the gateway framed the GET without its body, it would
    // run this (and assign `hidden-in-body`).
    let hidden = agent_request("hidden-in-body");
    let hidden_chunked = {
        let mut b = format!("{:x}\r\n", hidden.len()).into_bytes();
        b.extend_from_slice(&hidden);
        b.extend_from_slice(b"\r\n0\r\n\r\n");
        b
    };
    let mut h2_preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // An empty SETTINGS frame, as an HTTP/2 client sends right after the preface.
    h2_preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);

    const BAD: Want = Want::Refused(400, "BAD_REQUEST");
    let cases: Vec<(&str, Vec<u8>, Want)> = vec![
        // --- Transfer-Encoding / Content-Length ---
        (
            "TE + CL",
            post("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            BAD,
        ),
        (
            "TE: chunked, chunked",
            post("Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
            BAD,
        ),
        (
            "TE: chunked,chunked (no space)",
            post("Transfer-Encoding: chunked,chunked\r\n\r\n0\r\n\r\n"),
            BAD,
        ),
        (
            "TE: gzip, chunked",
            post("Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
            BAD,
        ),
        (
            "TE: chunked, gzip",
            post("Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"),
            BAD,
        ),
        (
            "TE: gzip with a Content-Length",
            post("Transfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello"),
            BAD,
        ),
        (
            "TE: chunked with a trailing comma",
            post("Transfer-Encoding: chunked,\r\n\r\n0\r\n\r\n"),
            BAD,
        ),
        (
            "TE: quoted chunked",
            post("Transfer-Encoding: \"chunked\"\r\n\r\n0\r\n\r\n"),
            BAD,
        ),
        (
            "TE with a NUL",
            post("Transfer-Encoding: chunked\0\r\n\r\n0\r\n\r\n"),
            BAD,
        ),
        (
            "repeated Content-Length in two cases",
            post("Content-Length: 5\r\ncontent-length: 5\r\n\r\nhello"),
            BAD,
        ),
        (
            "Content-Length: 5, 6",
            post("Content-Length: 5, 6\r\n\r\nhello!"),
            BAD,
        ),
        (
            "Content-Length with a NUL",
            post("Content-Length: 5\0\r\n\r\nhello"),
            BAD,
        ),
        // --- chunk sizes ---
        (
            "chunk size 0x5",
            post("Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"),
            BAD,
        ),
        (
            "negative chunk size",
            post("Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"),
            BAD,
        ),
        (
            "chunk size of 17 hex digits (overflows 64 bits)",
            post("Transfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n"),
            BAD,
        ),
        (
            "chunk size over the body limit",
            post("Transfer-Encoding: chunked\r\n\r\nfffffff\r\nhello\r\n0\r\n\r\n"),
            Want::Refused(413, "BODY_TOO_LARGE"),
        ),
        (
            "chunk size with a leading space",
            post("Transfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n"),
            BAD,
        ),
        (
            "chunk data longer than its size, hiding a request",
            cat(&[
                &post("Transfer-Encoding: chunked\r\n\r\n1\r\nhello\r\n0\r\n\r\n"),
                &agent_request("hidden-in-chunk"),
            ]),
            BAD,
        ),
        (
            "chunk size line with a NUL",
            post("Transfer-Encoding: chunked\r\n\r\n5\0\r\nhello\r\n0\r\n\r\n"),
            BAD,
        ),
        // --- obs-fold and line endings ---
        (
            "obs-fold of x-moltbot-user",
            b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: victim\r\n other\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            BAD,
        ),
        (
            "obs-fold with a tab",
            post("X-Folded: a\r\n\tb\r\nContent-Length: 5\r\n\r\nhello"),
            BAD,
        ),
        (
            "bare LF after the request line",
            b"POST /v1/echo HTTP/1.1\nHost: gw\r\nx-moltbot-user: victim\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            BAD,
        ),
        (
            "bare LF ending the head",
            post("Content-Length: 5\r\n\nhello"),
            BAD,
        ),
        (
            "bare CR inside a value",
            post("X-A: a\rb\r\nContent-Length: 5\r\n\r\nhello"),
            BAD,
        ),
        // --- NUL and control characters ---
        ("NUL in a header name", post("X-A\0B: v\r\n\r\n"), BAD),
        ("NUL in a header value", post("X-A: v\0w\r\n\r\n"), BAD),
        (
            "NUL in x-moltbot-user",
            b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: vic\0tim\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            BAD,
        ),
        (
            "NUL in the request target",
            b"GET /li\0vez HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(),
            BAD,
        ),
        ("ESC in a header value", post("X-A: \x1b[31mred\r\n\r\n"), BAD),
        ("SOH in a header name", post("X-\x01A: v\r\n\r\n"), BAD),
        ("DEL in a header name", post("X-\x7fA: v\r\n\r\n"), BAD),
        ("space inside a header name", post("X A: v\r\n\r\n"), BAD),
        ("empty header name", post(": v\r\n\r\n"), BAD),
        ("control character in the Host", b"GET /livez HTTP/1.1\r\nHost: g\x01w\r\n\r\n".to_vec(), BAD),
        // --- methods ---
        ("method with a parenthesis", b"G(ET /livez HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(), BAD),
        ("method with a slash", b"GE/T /livez HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(), BAD),
        ("empty method", b" /livez HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(), BAD),
        ("NUL in the method", b"GE\0T /livez HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(), BAD),
        (
            "non-ASCII method",
            "GÉT /livez HTTP/1.1\r\nHost: gw\r\n\r\n".as_bytes().to_vec(),
            BAD,
        ),
        (
            "two spaces after the method",
            b"GET  /livez HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(),
            BAD,
        ),
        (
            "unknown method (a valid token)",
            cat(&[b"BREW /livez HTTP/1.1\r\nHost: gw\r\n\r\n", close_livez]),
            Want::Answered(&[405, 200], &[]),
        ),
        (
            "2000-byte method (a valid token)",
            cat(&[
                format!("{long_method} /livez HTTP/1.1\r\nHost: gw\r\n\r\n").as_bytes(),
                close_livez,
            ]),
            Want::Answered(&[405, 200], &[]),
        ),
        // --- versions ---
        ("HTTP/0.9 request", b"GET /\r\n\r\n".to_vec(), BAD),
        ("HTTP/0.9 request for /livez", b"GET /livez\r\n\r\n".to_vec(), BAD),
        (
            "lower-case version",
            b"GET /livez http/1.1\r\nHost: gw\r\n\r\n".to_vec(),
            BAD,
        ),
        (
            "malformed version",
            b"GET /livez HTTP/1.x\r\nHost: gw\r\n\r\n".to_vec(),
            BAD,
        ),
        (
            "HTTP/2 preface and SETTINGS frame",
            h2_preface,
            Want::Refused(505, "VERSION_NOT_SUPPORTED"),
        ),
        (
            "h2c upgrade is served as HTTP/1.1",
            cat(&[
                b"GET /livez HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
                close_livez,
            ]),
            Want::Answered(&[200, 200], &[]),
        ),
        // --- bodies on GET ---
        (
            "GET with a Content-Length body holding a request",
            cat(&[
                &request("GET", "/livez", &[], Some(&hidden)),
                close_livez,
            ]),
            Want::Answered(&[200, 200], &["hidden-in-body"]),
        ),
        (
            "GET with a chunked body holding a request",
            cat(&[
                b"GET /livez HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n",
                &hidden_chunked,
                close_livez,
            ]),
            Want::Answered(&[200, 200], &["hidden-in-body"]),
        ),
        (
            "GET of a session with a body",
            cat(&[
                &request(
                    "GET",
                    "/v1/sessions",
                    &[("x-moltbot-user", b"getter")],
                    Some(br#"{"ignored":true}"#),
                ),
                close_livez,
            ]),
            Want::Answered(&[200, 200], &[]),
        ),
        // --- request targets ---
        (
            "absolute-form GET",
            b"GET http://gw/livez HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(),
            BAD,
        ),
        (
            "absolute-form POST to another host",
            b"POST http://127.0.0.1:18789/v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: victim\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            BAD,
        ),
        (
            "absolute-form https",
            b"GET https://gw/status HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(),
            BAD,
        ),
        (
            "authority-form CONNECT",
            b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n".to_vec(),
            BAD,
        ),
        (
            "network-path reference is just a path",
            cat(&[b"GET //gw/livez HTTP/1.1\r\nHost: gw\r\n\r\n", close_livez]),
            Want::Answered(&[404, 200], &[]),
        ),
        // --- well-formed but unusual framing that must work ---
        (
            "chunk size with 40 leading zeros, extensions and a trailer",
            cat(&[
                b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: unusual\r\nTransfer-Encoding: chunked\r\n\r\n",
                format!("{}5;a=b\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n", "0".repeat(40)).as_bytes(),
                close_livez,
            ]),
            Want::Answered(&[200, 200], &[]),
        ),
    ];

    for bytewise in [false, true] {
        let mode = if bytewise {
            "1-byte writes"
        } else {
            "one write"
        };
        for (i, (what, bytes, want)) in cases.iter().enumerate() {
            let what = format!("{what} ({mode})");
            match want {
                Want::Refused(status, code) => {
                    let smuggled = format!("smuggled-{bytewise}-{i}");
                    let mut all = bytes.clone();
                    all.extend(agent_request(&smuggled));
                    let raw = exchange(&g, &all, bytewise);
                    let r = parse_responses(&raw);
                    assert_eq!(r.len(), 1, "{what}: exactly one answer: {r:?}");
                    assert_error(&what, &r[0], *status, code);
                    assert_eq!(r[0].header("connection"), Some("close"), "{what}");
                    assert!(r[0].header("x-moltbot-worker").is_none(), "{what}");
                    assert!(
                        !assigned(&g, &smuggled),
                        "{what}: the request behind it was processed"
                    );
                }
                Want::Answered(statuses, never) => {
                    let raw = exchange(&g, bytes, bytewise);
                    let r = parse_responses(&raw);
                    let got: Vec<u16> = r.iter().map(|r| r.status).collect();
                    assert_eq!(&got, statuses, "{what}: {r:?}");
                    for user in *never {
                        assert!(!assigned(&g, user), "{what}: {user} was processed");
                    }
                }
            }
        }
    }
    for user in ["victim", "hidden-in-chunk", "hidden-in-body"] {
        assert!(!assigned(&g, user), "{user} reached a worker");
    }
}

/// The head limit at exactly its value and one byte past it (a head is the request line, the
/// fields and the final CRLF). The other limits at and past their values are in
/// `tests/gateway_http.rs`: `long_uris_are_414_and_large_heads_431` (URI 1024/1025, 100/101
/// fields) and `too_large_bodies_are_413` (64 KiB and one more, Content-Length and chunked).
#[test]
fn head_bytes_at_and_one_past_the_limit() {
    const MAX: usize = 4096;
    let g = start(
        Options::new(1)
            .env("MOLTBOT_MAX_HEADER_BYTES", &MAX.to_string())
            .env("MOLTBOT_MAX_URI_BYTES", "1024"),
    );
    let head = |len: usize| {
        let start = "GET /livez HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nx-pad: ";
        let end = "\r\n\r\n";
        let pad = len - start.len() - end.len();
        let h = format!("{start}{}{end}", "p".repeat(pad));
        assert_eq!(h.len(), len);
        h.into_bytes()
    };
    let r = parse_responses(&exchange(&g, &head(MAX), false));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].status, 200, "a head of exactly the limit");
    let r = parse_responses(&exchange(&g, &head(MAX + 1), false));
    assert_eq!(r.len(), 1);
    assert_error("one byte past the limit", &r[0], 431, "HEADERS_TOO_LARGE");
    assert_eq!(r[0].header("connection"), Some("close"));
}

// ---------------------------------------------------------------------------------------------
// Exhaustion
// ---------------------------------------------------------------------------------------------

/// What became of the slow connections.
#[derive(Debug, Default)]
struct SlowReport {
    opened: usize,
    /// Closed after a 408 answer.
    answered_408: usize,
    /// Closed without an answer (or reset).
    closed_silently: usize,
    /// Anything else (an unexpected answer): what it was.
    unexpected: Vec<String>,
}

/// One slowloris connection: a head (or a body) that never ends, one more byte every tick.
struct Slow {
    s: TcpStream,
    got: Vec<u8>,
}

/// Keeps `target` slowloris connections open (reopening those the server closes) until `stop`
/// is set or `max_total` were opened, trickling one byte into each every `tick`; then keeps
/// trickling into the rest until the server has closed every one. Panics if some are still open
/// after [`DEADLINE`] past `stop`: only the server's header timeout can close them.
fn slowloris(
    addr: std::net::SocketAddr,
    target: usize,
    max_total: usize,
    tick: Duration,
    stop: &AtomicBool,
    open_now: &AtomicUsize,
) -> SlowReport {
    let mut report = SlowReport::default();
    let mut conns: Vec<Slow> = Vec::with_capacity(target);
    let mut stopped_at: Option<Instant> = None;
    let finish = |c: Slow, report: &mut SlowReport| {
        if c.got.is_empty() {
            report.closed_silently += 1;
            return;
        }
        let (r, truncated) = complete_responses(&c.got);
        let ok = !truncated
            && r.len() == 1
            && r[0].status == 408
            && serde_json::from_slice::<Value>(&r[0].body)
                .is_ok_and(|v| v["error"]["code"] == "REQUEST_TIMEOUT")
            && r[0].header("connection") == Some("close");
        if ok {
            report.answered_408 += 1;
        } else {
            report
                .unexpected
                .push(String::from_utf8_lossy(&c.got).into_owned());
        }
    };
    loop {
        let stopping = stop.load(Ordering::Acquire);
        if stopping && stopped_at.is_none() {
            stopped_at = Some(Instant::now());
        }
        if !stopping {
            while conns.len() < target && report.opened < max_total {
                let mut s = TcpStream::connect_timeout(&addr, DEADLINE).expect("slowloris connect");
                s.set_nodelay(true).expect("nodelay");
                // Mostly slow heads; every fourth a complete head with a slow body.
                let start: &[u8] = if report.opened % 4 == 3 {
                    b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: slow-body\r\nContent-Length: 1000\r\n\r\n"
                } else {
                    b"GET /livez HTTP/1.1\r\nHost: gw\r\nx-slow: "
                };
                s.write_all(start).expect("slowloris start");
                s.set_nonblocking(true).expect("nonblocking");
                conns.push(Slow { s, got: Vec::new() });
                report.opened += 1;
            }
        }
        open_now.store(conns.len(), Ordering::Release);
        let mut still_open = Vec::with_capacity(conns.len());
        for mut c in conns.drain(..) {
            let mut buf = [0u8; 4096];
            let closed = loop {
                match c.s.read(&mut buf) {
                    Ok(0) => break true,
                    Ok(n) => c.got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break true,
                }
            };
            // A write error: the server closed; its answer (if any) is read on the next tick.
            let write_failed =
                !closed && matches!(c.s.write(b"a"), Err(e) if e.kind() != ErrorKind::WouldBlock);
            if closed {
                finish(c, &mut report);
            } else if write_failed {
                // Read what the server sent before its close, then count the connection.
                let _ = c.s.set_nonblocking(false);
                let _ = c.s.set_read_timeout(Some(DEADLINE));
                loop {
                    match c.s.read(&mut buf) {
                        Ok(n) if n > 0 => c.got.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                finish(c, &mut report);
            } else {
                still_open.push(c);
            }
        }
        conns = still_open;
        open_now.store(conns.len(), Ordering::Release);
        if stopping && conns.is_empty() {
            return report;
        }
        if let Some(t) = stopped_at {
            assert!(
                t.elapsed() < DEADLINE,
                "{} slow connections still open {DEADLINE:?} after the attack stopped: the \
                 header timeout does not close them ({report:?})",
                conns.len()
            );
        }
        // Pacing of the trickle (load generation), not synchronisation.
        std::thread::sleep(tick);
    }
}

/// 1,000 slowloris connections (a head that never ends, one byte every 250 ms; every fourth a
/// body that never ends) held open, and reopened as the server closes them, while normal
/// clients send 200 requests: every normal request succeeds, and every slow connection is
/// closed by the server (with a 408 or without an answer) since its header timeout (1 s) runs
/// from the head's first byte (the body's from the head's end), whatever trickles in after it.
/// A timer that restarted with each byte would leave them open and fail the test.
#[test]
fn slowloris_does_not_starve_normal_traffic() {
    const SLOW: usize = 1000;
    let g = start(Options::new(2).args(&["--header-read-timeout", "1s"]));
    let rss_before = vm_rss_kib(g.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let open_now = Arc::new(AtomicUsize::new(0));
    let attack = {
        let (addr, stop, open_now) = (g.addr, stop.clone(), open_now.clone());
        std::thread::spawn(move || {
            slowloris(
                addr,
                SLOW,
                4 * SLOW,
                Duration::from_millis(250),
                &stop,
                &open_now,
            )
        })
    };
    gw::wait_until("1000 slow connections open", || {
        open_now.load(Ordering::Acquire) >= SLOW || attack.is_finished()
    });
    assert!(!attack.is_finished(), "the attack thread ended early");
    let rss_attacked = vm_rss_kib(g.pid());

    // Normal traffic during the attack: fresh connections and one keep-alive connection.
    let mut latencies = Vec::new();
    let mut keep = g.connect();
    for i in 0..200 {
        let t = Instant::now();
        let body = format!("normal-{i}");
        if i % 2 == 0 {
            let r = g.request(
                "POST",
                "/v1/echo",
                &[("x-moltbot-user", &format!("normal-{}", i % 7))],
                Some(body.as_bytes()),
            );
            assert_eq!(r.status, 200, "request {i}: {}", r.text());
            assert_eq!(r.body, body.as_bytes(), "request {i}");
        } else {
            keep.write_all(&request(
                "POST",
                "/v1/echo",
                &[("x-moltbot-user", b"normal-keep")],
                Some(body.as_bytes()),
            ))
            .expect("write");
            let (status, _, got) =
                gw::read_response(&mut keep).unwrap_or_else(|| panic!("request {i}: no answer"));
            assert_eq!(
                status,
                200,
                "request {i}: {}",
                String::from_utf8_lossy(&got)
            );
            assert_eq!(got, body.as_bytes(), "request {i}");
        }
        latencies.push(t.elapsed());
    }
    let slow_open_at_end = open_now.load(Ordering::Acquire);
    stop.store(true, Ordering::Release);
    let report = match attack.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    assert!(report.opened >= SLOW, "{report:?}");
    assert!(
        report.unexpected.is_empty(),
        "slow connections got answers other than 408: {:?}",
        &report.unexpected[..report.unexpected.len().min(3)]
    );
    assert_eq!(
        report.answered_408 + report.closed_silently,
        report.opened,
        "{report:?}"
    );
    assert!(report.answered_408 > 0, "no 408 at all: {report:?}");
    latencies.sort();
    eprintln!(
        "slowloris: {} slow connections opened ({} answered 408, {} closed silently), {} still \
         open when the normal traffic ended; normal latency p50 {:?}, max {:?}; gateway RSS \
         {rss_before} KiB -> {rss_attacked} KiB under attack",
        report.opened,
        report.answered_408,
        report.closed_silently,
        slow_open_at_end,
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    let growth_mib = rss_attacked.saturating_sub(rss_before) / 1024;
    assert!(
        growth_mib < 200,
        "1000 slow connections cost {growth_mib} MiB"
    );
    // The gateway serves normally afterwards.
    assert_eq!(g.request("GET", "/livez", &[], None).status, 200);
}

/// A client writes 200,000 pipelined requests without reading an answer. The gateway keeps
/// serving others meanwhile, its memory stays bounded (it stops reading from the flooder when
/// the answers back up), and it either answers the flooder or closes it (after the idle timeout
/// of a write that makes no progress).
#[test]
fn pipelining_flood_is_bounded() {
    const FLOOD: usize = 200_000;
    let g = start(Options::new(1).args(&["--idle-timeout", "2s"]));
    let pid = g.pid();
    let rss_before = vm_rss_kib(pid);
    let mut flood = Vec::with_capacity(FLOOD * 40);
    for i in 0..FLOOD {
        if i % 100 == 0 {
            flood.extend(request(
                "POST",
                "/v1/echo",
                &[("x-moltbot-user", b"flooder")],
                Some(b"flood"),
            ));
        } else {
            flood.extend_from_slice(b"GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n");
        }
    }
    let flooder = g.connect();
    flooder.set_write_timeout(Some(DEADLINE)).expect("timeout");
    let writer = {
        let mut w = flooder.try_clone().expect("clone");
        std::thread::spawn(move || w.write_all(&flood).map_err(|e| e.kind()))
    };
    let mut rss_peak = rss_before;
    for i in 0..100 {
        let user = format!("bystander-{}", i % 5);
        let r = g.request("POST", "/v1/echo", &[("x-moltbot-user", &user)], Some(b"x"));
        assert_eq!(r.status, 200, "bystander {i}: {}", r.text());
        rss_peak = rss_peak.max(vm_rss_kib(pid));
    }
    let written = writer.join().expect("writer");
    rss_peak = rss_peak.max(vm_rss_kib(pid));
    let mut reader = flooder;
    reader.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let raw = read_until_closed(&mut reader);
    let (answers, truncated) = complete_responses(&raw);
    assert!(
        answers.iter().all(|r| r.status == 200),
        "the flooder got errors: {:?}",
        answers.iter().find(|r| r.status != 200)
    );
    let growth_mib = rss_peak.saturating_sub(rss_before) / 1024;
    eprintln!(
        "pipelining flood: writer {written:?}, {} of {FLOOD} answered (tail truncated: \
         {truncated}), gateway RSS {rss_before} KiB -> peak {rss_peak} KiB",
        answers.len()
    );
    assert!(
        growth_mib < 200,
        "gateway RSS grew by {growth_mib} MiB under a pipelining flood"
    );
    // Whatever was answered is the flood's own answers, in order, from its start: the
    // gateway either answered everything or gave up on the flooder (closed it), never lost,
    // reordered or mixed up an answer on the way.
    for (i, r) in answers.iter().enumerate() {
        let want: &[u8] = if i % 100 == 0 {
            b"flood"
        } else {
            br#"{"status":"ok"}"#
        };
        assert_eq!(r.body, want, "answer {i} of {}", answers.len());
    }
    assert_eq!(g.request("GET", "/livez", &[], None).status, 200);
}

/// A client sends 64 MiB of echo requests (32 KiB answers each) and never reads. The gateway
/// stops reading from it once its answers back up (the writer cannot send everything), other
/// clients are served meanwhile, the gateway's memory stays bounded, and after the idle timeout
/// (2 s) of a write without progress the connection is dropped, while the client still has not
/// read a byte.
#[test]
fn a_client_that_never_reads_is_dropped_after_the_idle_timeout() {
    const REQUESTS: usize = 2048;
    let g = start(Options::new(1).args(&["--idle-timeout", "2s"]));
    let pid = g.pid();
    let rss_before = vm_rss_kib(pid);
    let body = vec![b'z'; 32 * 1024];
    let one = request(
        "POST",
        "/v1/echo",
        &[("x-moltbot-user", b"never-reads")],
        Some(&body),
    );
    let total = one.len() * REQUESTS;
    let sink = g.connect();
    sink.set_write_timeout(Some(DEADLINE)).expect("timeout");
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let mut w = sink.try_clone().expect("clone");
        let sent = sent.clone();
        std::thread::spawn(move || {
            for _ in 0..REQUESTS {
                let mut rest = one.as_slice();
                while !rest.is_empty() {
                    match w.write(rest) {
                        Ok(0) => return Err(ErrorKind::WriteZero),
                        Ok(n) => {
                            sent.fetch_add(n, Ordering::Relaxed);
                            rest = &rest[n..];
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.kind()),
                    }
                }
            }
            Ok(())
        })
    };
    // Others are served while the answers to the sink back up (same worker, same user set).
    let mut rss_peak = rss_before;
    for i in 0..50 {
        let r = g.request(
            "POST",
            "/v1/echo",
            &[("x-moltbot-user", "reader")],
            Some(&body),
        );
        assert_eq!(r.status, 200, "reader {i}: {}", r.text());
        assert_eq!(r.body.len(), body.len());
        rss_peak = rss_peak.max(vm_rss_kib(pid));
    }
    // The gateway drops the connection although the client keeps it open and never reads.
    gw::wait_until("the never-reading connection to be dropped", || {
        rss_peak = rss_peak.max(vm_rss_kib(pid));
        writer.is_finished() && open_connections(&g) == 1
    });
    let result = writer.join().expect("writer");
    let sent = sent.load(Ordering::Relaxed);
    let growth_mib = rss_peak.saturating_sub(rss_before) / 1024;
    eprintln!(
        "never-reading client: wrote {sent} of {total} bytes ({result:?}); gateway RSS \
         {rss_before} KiB -> peak {rss_peak} KiB"
    );
    assert!(
        result.is_err() && sent < total,
        "the gateway read all {total} bytes from a client that reads nothing ({result:?})"
    );
    assert!(
        growth_mib < 200,
        "gateway RSS grew by {growth_mib} MiB for a client that never reads"
    );
    drop(sink);
    assert_eq!(g.request("GET", "/livez", &[], None).status, 200);
}

// ---------------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------------

/// Percent-encodes every byte but the unreserved ones (RFC 3986 §2.3).
fn pct(bytes: &[u8]) -> String {
    percent_encoding::percent_encode(bytes, moltbot::command::route::SEGMENT).to_string()
}

/// A JSON string literal holding `raw` (escaped where JSON requires it; non-UTF-8 bytes are
/// put in as they are, which makes the document invalid, as a hostile client would send it).
fn json_string_bytes(raw: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(raw) {
        Ok(s) => serde_json::to_vec(s).expect("JSON string"),
        Err(_) => {
            let mut out = vec![b'"'];
            out.extend_from_slice(raw);
            out.push(b'"');
            out
        }
    }
}

/// One response read from a raw exchange that must close after it.
fn one_response(g: &GatewayProc, bytes: &[u8], what: &str) -> RawResponse {
    let r = parse_responses(&g.raw_closed(bytes));
    assert_eq!(r.len(), 1, "{what}: one answer");
    r.into_iter().next().expect("one")
}

/// Every way a hostile user id or session name can reach the gateway (the `x-moltbot-user`
/// header, `/v1/route`'s `userId`, `/v1/users/{id}/worker`, `/v1/sessions/{name}` and the
/// `name` of a `/v1/route` session request) gets a clear 400 JSON error or works safely: the
/// accepted ones keep their data apart (look-alikes included), and afterwards every file in
/// the sandbox base lives inside `worker-N/sessions/` or `worker-N/state/<safe user>/` with a
/// safe name that decodes to an accepted user, and nothing was created outside the base.
#[test]
fn hostile_identities_stay_inside_their_directories() {
    let g = start(Options::new(2));
    let mark = format!(
        "moltbot-hostile-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    // (label, raw id bytes, valid as a user id)
    let ids: Vec<(&str, Vec<u8>, bool)> = vec![
        ("dot-dot", b"..".to_vec(), true),
        ("dot", b".".to_vec(), true),
        (
            "climb to /tmp",
            format!("../../../../../../../../tmp/{mark}").into_bytes(),
            true,
        ),
        ("slash", b"/".to_vec(), true),
        ("absolute", format!("/tmp/{mark}-abs").into_bytes(), true),
        ("a/b", b"a/b".to_vec(), true),
        ("backslash", b"\\".to_vec(), true),
        (
            "windows climb",
            format!("..\\..\\{mark}").into_bytes(),
            true,
        ),
        ("%2e%2e", b"%2e%2e".to_vec(), true),
        (
            "%2e%2e%2f climb",
            format!("%2e%2e%2f%2e%2e%2f{mark}").into_bytes(),
            true,
        ),
        ("NUL", b"a\0b".to_vec(), false),
        ("newline", b"a\nb".to_vec(), false),
        ("128 bytes", vec![b'l'; 128], true),
        ("129 bytes", vec![b'l'; 129], false),
        (
            "128 bytes of 2-byte chars",
            "é".repeat(64).into_bytes(),
            true,
        ),
        (
            "130 bytes of 2-byte chars",
            "é".repeat(65).into_bytes(),
            false,
        ),
        ("4 KiB", vec![b'k'; 4096], false),
        ("non-UTF-8", vec![0xff, 0xfe, b'a'], false),
        ("overlong-encoded dots", vec![0xc0, 0xae, 0xc0, 0xae], false),
        (
            "fullwidth climb",
            format!("．．／．．／{mark}").into_bytes(),
            true,
        ),
        (
            "division-slash climb",
            format!("..∕..∕{mark}").into_bytes(),
            true,
        ),
        ("plain admin", b"admin".to_vec(), true),
        ("fullwidth admin", "ａｄｍｉｎ".as_bytes().to_vec(), true),
        (
            "zero-width admin",
            "ad\u{200B}min".as_bytes().to_vec(),
            true,
        ),
        (
            "RTL override admin",
            "\u{202E}nimda".as_bytes().to_vec(),
            false,
        ),
        ("BOM admin", "\u{FEFF}admin".as_bytes().to_vec(), false),
        ("encoded-stem look-alike", b"~YWRtaW4".to_vec(), true),
        ("trailing dot", b"admin.".to_vec(), true),
        ("upper-case Admin", b"Admin".to_vec(), true),
        ("NFC e-acute", "\u{E9}".as_bytes().to_vec(), true),
        ("NFD e-acute", "e\u{301}".as_bytes().to_vec(), true),
    ];
    // Ids a header can carry at all (HTTP refuses control characters in field values).
    let header_safe = |raw: &[u8]| !raw.iter().any(|&b| b < 0x20 || b == 0x7f);

    // 1. The x-moltbot-user header (an agent turn and a session value per accepted id).
    let mut accepted: BTreeMap<String, &str> = BTreeMap::new();
    for (label, raw, valid) in &ids {
        let what = format!("header {label}");
        let msg = format!("hello from {label}");
        let req = request(
            "POST",
            "/v1/agent",
            &[("x-moltbot-user", raw), ("Connection", b"close")],
            Some(msg.as_bytes()),
        );
        let r = one_response(&g, &req, &what);
        if *valid && header_safe(raw) {
            assert_eq!(
                r.status,
                200,
                "{what}: {}",
                String::from_utf8_lossy(&r.body)
            );
            let user = String::from_utf8(raw.clone()).expect("valid ids are UTF-8");
            let v = r.json();
            assert_eq!(v["userId"], user.as_str(), "{what}");
            assert_eq!(v["turn"], 1, "{what}: a user of its own: {v}");
            accepted.insert(user, label);
            let put = request(
                "PUT",
                "/v1/sessions/secret",
                &[("x-moltbot-user", raw), ("Connection", b"close")],
                Some(json!({ "owner": label }).to_string().as_bytes()),
            );
            let r = one_response(&g, &put, &format!("{what}: put"));
            assert_eq!(
                r.status,
                200,
                "{what}: {}",
                String::from_utf8_lossy(&r.body)
            );
        } else {
            // INVALID_USER from the validator, BAD_REQUEST from the HTTP parser.
            let code = if header_safe(raw) {
                "INVALID_USER"
            } else {
                "BAD_REQUEST"
            };
            assert_error(&what, &r, 400, code);
            assert!(r.header("x-moltbot-worker").is_none(), "{what}");
        }
    }

    // 2. `/v1/route`'s userId (a second agent turn for the accepted ids).
    for (label, raw, valid) in &ids {
        let what = format!("route {label}");
        let mut body = br#"{"type":"agent:message","userId":"#.to_vec();
        body.extend(json_string_bytes(raw));
        body.extend_from_slice(
            format!(r#","payload":{{"message":"route from {label}"}}}}"#).as_bytes(),
        );
        let req = request(
            "POST",
            "/v1/route",
            &[
                ("Connection", b"close"),
                ("content-type", b"application/json"),
            ],
            Some(&body),
        );
        let r = one_response(&g, &req, &what);
        if *valid {
            assert_eq!(
                r.status,
                200,
                "{what}: {}",
                String::from_utf8_lossy(&r.body)
            );
            let v = r.json();
            assert_eq!(v["success"], true, "{what}: {v}");
            assert_eq!(
                v["payload"]["turn"], 2,
                "{what}: the same user as the header: {v}"
            );
        } else {
            // Not UTF-8 is not JSON (INVALID_REQUEST); the rest fail the validator.
            let code = if std::str::from_utf8(raw).is_ok() {
                "INVALID_USER"
            } else {
                "INVALID_REQUEST"
            };
            assert_error(&what, &r, 400, code);
        }
    }
    // A lone surrogate escape is no string at all.
    let r = one_response(
        &g,
        &request(
            "POST",
            "/v1/route",
            &[("Connection", b"close")],
            Some(br#"{"type":"echo","userId":"\ud800","payload":1}"#),
        ),
        "lone surrogate",
    );
    assert_error("lone surrogate", &r, 400, "INVALID_REQUEST");

    // 3. `/v1/users/{id}/worker`, percent-encoded (a lookup never assigns nor creates a file).
    for (label, raw, valid) in &ids {
        let what = format!("lookup {label}");
        let target = format!("/v1/users/{}/worker", pct(raw));
        let req = request("GET", &target, &[("Connection", b"close")], None);
        let r = one_response(&g, &req, &what);
        // Every valid id can be looked up, a '/' in it percent-encoded.
        if *valid {
            assert_eq!(
                r.status,
                200,
                "{what}: {}",
                String::from_utf8_lossy(&r.body)
            );
            let v = r.json();
            assert_eq!(
                v["userId"].as_str().map(str::as_bytes),
                Some(raw.as_slice()),
                "{what}"
            );
            assert_eq!(
                v["assigned"], true,
                "{what}: assigned by the header request"
            );
        } else {
            assert_error(&what, &r, 400, "INVALID_USER");
        }
    }
    // Dot segments and separators as they are, not encoded.
    for (target, want) in [
        ("/v1/users/../worker", Some("..")),
        ("/v1/users/./worker", Some(".")),
        ("/v1/users/%2e%2e/worker", Some("..")),
        ("/v1/users/a/b/worker", None),
        // Encoded separators are part of the id (a lookup key, never a path).
        ("/v1/users/..%2f..%2fetc/worker", Some("../../etc")),
        ("/v1/users/a%5Cb/worker", Some("a\\b")),
    ] {
        let req = request("GET", target, &[("Connection", b"close")], None);
        let r = one_response(&g, &req, target);
        match want {
            Some(user) => {
                assert_eq!(
                    r.status,
                    200,
                    "{target}: {}",
                    String::from_utf8_lossy(&r.body)
                );
                assert_eq!(r.json()["userId"], user, "{target}");
            }
            None => {
                assert_error(target, &r, 400, "INVALID_USER");
            }
        }
    }

    // 4. Session names, through the path and through `/v1/route` (for a plain user).
    let namer: &[u8] = b"namer";
    let bad_names: Vec<String> = vec![
        "..".into(),
        ".".into(),
        "%2e%2e".into(),
        "%2E%2E%2Fsecret".into(),
        "..%2f..%2f..%2fetc%2fpasswd".into(),
        "..%5c..%5csecret".into(),
        "a%5Cb".into(),
        "a%00b".into(),
        "a%0Ab".into(),
        "%FF".into(),
        "%C0%AE%C0%AE".into(),
        pct("．．".as_bytes()),
        pct("a∕b".as_bytes()),
        pct("ad\u{200B}min".as_bytes()),
        pct("\u{202E}nimda".as_bytes()),
        ".hidden".into(),
        "n".repeat(65),
        format!("..%2F..%2F..%2F..%2F..%2Ftmp%2F{mark}"),
    ];
    for name in &bad_names {
        for method in ["PUT", "GET", "DELETE"] {
            let what = format!("{method} /v1/sessions/{name}");
            let body = (method == "PUT").then_some(&b"1"[..]);
            let req = request(
                method,
                &format!("/v1/sessions/{name}"),
                &[("x-moltbot-user", namer), ("Connection", b"close")],
                body,
            );
            let r = one_response(&g, &req, &what);
            assert_error(&what, &r, 400, "INVALID_NAME");
        }
    }
    // Raw traversal in the path: still the sessions endpoint, still an invalid name.
    for target in [
        "/v1/sessions/../../status",
        "/v1/sessions/../x",
        "/v1/sessions/a/../b",
    ] {
        let req = request(
            "PUT",
            target,
            &[("x-moltbot-user", namer), ("Connection", b"close")],
            Some(b"1"),
        );
        let r = one_response(&g, &req, target);
        assert_error(target, &r, 400, "INVALID_NAME");
    }
    // Through `/v1/route`: the worker validates the name.
    let route_names = [
        "..".to_string(),
        "../secret".into(),
        "/etc/passwd".into(),
        "a\\b".into(),
        "a\0b".into(),
        "．．".into(),
        format!("../../../../../tmp/{mark}"),
    ];
    for name in &route_names {
        for payload in [
            json!({"action": "set", "name": name, "value": 1}),
            json!({"action": "get", "name": name}),
            json!({"action": "delete", "name": name}),
        ] {
            let what = format!("route session {payload}");
            let body =
                json!({"type": "session", "userId": "namer", "payload": payload}).to_string();
            let req = request(
                "POST",
                "/v1/route",
                &[("Connection", b"close")],
                Some(body.as_bytes()),
            );
            let r = one_response(&g, &req, &what);
            assert_eq!(
                r.status,
                400,
                "{what}: {}",
                String::from_utf8_lossy(&r.body)
            );
            let v = r.json();
            assert_eq!(v["success"], false, "{what}: {v}");
            assert_eq!(v["errorCode"], "INVALID_NAME", "{what}: {v}");
        }
    }
    // Odd but valid names work, and stay inside the user's directory.
    let longest = "n".repeat(64);
    let odd_names = ["a..b", "x.json", "CON", "nul", "-", "_", longest.as_str()];
    for name in odd_names {
        let req = request(
            "PUT",
            &format!("/v1/sessions/{name}"),
            &[("x-moltbot-user", namer), ("Connection", b"close")],
            Some(b"true"),
        );
        let r = one_response(&g, &req, name);
        assert_eq!(
            r.status,
            200,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    accepted.insert("namer".into(), "namer");

    // 5. Reading with one id never returns another's data (look-alikes included).
    for (user, label) in &accepted {
        if user == "namer" {
            continue;
        }
        let raw = user.as_bytes();
        let what = format!("read back {label}");
        let get = request(
            "GET",
            "/v1/sessions/secret",
            &[("x-moltbot-user", raw), ("Connection", b"close")],
            None,
        );
        let r = one_response(&g, &get, &what);
        assert_eq!(
            r.status,
            200,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json(), json!({ "owner": label }), "{what}");
        let list = request(
            "GET",
            "/v1/sessions",
            &[("x-moltbot-user", raw), ("Connection", b"close")],
            None,
        );
        let r = one_response(&g, &list, &what);
        assert_eq!(r.json(), json!({ "names": ["secret"] }), "{what}");
        let body =
            json!({"type": "agent:command", "userId": user, "payload": {"command": "history"}})
                .to_string();
        let req = request(
            "POST",
            "/v1/route",
            &[("Connection", b"close")],
            Some(body.as_bytes()),
        );
        let r = one_response(&g, &req, &what);
        let v = r.json();
        let history = v["payload"]["history"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: {v}"));
        let messages: Vec<&str> = history
            .iter()
            .filter_map(|t| t["message"].as_str())
            .collect();
        assert_eq!(
            messages,
            [format!("hello from {label}"), format!("route from {label}")],
            "{what}: {v}"
        );
        assert!(
            history.iter().all(|t| t["userId"] == user.as_str()),
            "{what}: another user's turn: {v}"
        );
    }

    // 6. The files: every one inside the sandbox base, in an expected place, with a safe name
    //    that decodes to an accepted user; nothing named after a raw hostile id.
    let base = g.base().to_path_buf();
    let mut found_users: BTreeSet<String> = BTreeSet::new();
    let mut problems = Vec::new();
    walk(&base, &mut |path, is_dir| {
        let rel = path.strip_prefix(&base).expect("inside the base");
        let parts: Vec<&str> = rel
            .components()
            .map(|c| match c {
                Component::Normal(s) => s.to_str().unwrap_or("\u{FFFD}"),
                _ => "<not normal>",
            })
            .collect();
        let ok = match parts.as_slice() {
            ["routing-table.jsonl" | "segments.json" | "gateway.port" | "gateway.lock"] => !is_dir,
            [w] => is_dir && is_worker_dir(w),
            [w, "sandbox.json"] => is_worker_dir(w) && !is_dir,
            [w, "sessions" | "state" | "cache" | "temp" | "logs"] => is_worker_dir(w) && is_dir,
            [w, "logs", "worker.log"] => is_worker_dir(w),
            [w, "state", ".xdg"] => is_worker_dir(w) && is_dir,
            [w, "state", ".xdg", "config" | "data" | "state"] => is_worker_dir(w) && is_dir,
            [w, "sessions", file] => {
                let user = file
                    .strip_suffix(".jsonl")
                    .and_then(moltbot::user::user_from_file_stem);
                let ok = is_worker_dir(w) && !is_dir && user.is_some();
                found_users.extend(user);
                ok
            }
            [w, "state", stem] => {
                let user = moltbot::user::user_from_file_stem(stem);
                let ok = is_worker_dir(w) && is_dir && user.is_some();
                found_users.extend(user);
                ok
            }
            [w, "state", stem, file] => {
                is_worker_dir(w)
                    && !is_dir
                    && moltbot::user::user_from_file_stem(stem).is_some()
                    && file
                        .strip_suffix(".json")
                        .is_some_and(|n| moltbot::user::validate_name(n).is_ok())
            }
            _ => false,
        };
        if !ok {
            problems.push(rel.display().to_string());
        }
        for (label, raw, _) in &ids {
            let plain = raw
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(b));
            let named = parts.iter().any(|p| p.as_bytes() == raw.as_slice());
            if named && !plain {
                problems.push(format!(
                    "{} is named after the raw id {label:?}",
                    rel.display()
                ));
            }
        }
    });
    assert!(
        problems.is_empty(),
        "unexpected files in the sandbox base: {problems:#?}"
    );
    let accepted_users: BTreeSet<String> = accepted.keys().cloned().collect();
    assert_eq!(
        found_users, accepted_users,
        "files belong to exactly the accepted users"
    );

    // Nothing beside the base in the test's directory, nothing in /tmp named after the marker.
    let parent = base.parent().expect("parent");
    let beside: BTreeSet<String> = std::fs::read_dir(parent)
        .expect("read the test directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        beside,
        BTreeSet::from(["gateway.log".to_string(), "workers".to_string()]),
        "files created beside the sandbox base"
    );
    let in_tmp: Vec<String> = std::fs::read_dir("/tmp")
        .expect("read /tmp")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&mark))
        .collect();
    assert!(in_tmp.is_empty(), "files escaped to /tmp: {in_tmp:?}");
}

fn is_worker_dir(name: &str) -> bool {
    name.strip_prefix("worker-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Calls `f(path, is_dir)` for every entry beneath `dir` (not following symlinks).
fn walk(dir: &Path, f: &mut dyn FnMut(&Path, bool)) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.expect("entry");
        let path = entry.path();
        let ty = entry.file_type().expect("file type");
        f(&path, ty.is_dir());
        if ty.is_dir() {
            walk(&path, f);
        }
    }
}
