//! The HTTP surface of a real gateway process over real sockets: every endpoint, every error
//! status, request framing (split writes, pipelining, chunked bodies, 100-continue, HTTP/1.0,
//! `Connection: close`), request smuggling, and the start-up refusals.
//!
//! No sleeps synchronise anything: a test waits for an answer or for the server to close the
//! connection (bounded by `gw::DEADLINE`), or polls a condition with `gw::wait_until`.

mod gw;

use std::io::Write;
use std::net::TcpStream;

use gw::{
    GatewayProc, HttpResponse, Options, RawResponse, metric, parse_responses, raw_request,
    read_response, read_until_closed, run_moltbot, write_bytewise,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A test gateway (its log is checked for panics when it is dropped, see `gw`).
type Gw = GatewayProc;

fn start(opts: Options) -> Gw {
    GatewayProc::start(opts)
}

fn start_overriding(opts: Options, overrides: &[(&str, &str)]) -> Gw {
    GatewayProc::start_overriding(opts, overrides)
}

/// Checks the gateway's error shape `{"error":{"code","message","retryable"(,"retryAfterMs")}}`
/// and the status; returns the error object.
fn assert_error(what: &str, status: u16, body: &[u8], want_status: u16, code: &str) -> Value {
    let text = String::from_utf8_lossy(body);
    assert_eq!(status, want_status, "{what}: status; body {text}");
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {text}"));
    let obj = v.as_object().expect("object");
    assert_eq!(obj.len(), 1, "{what}: only `error` at the top: {text}");
    let err = v["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: {text}"));
    for k in err.keys() {
        assert!(
            ["code", "message", "retryable", "retryAfterMs"].contains(&k.as_str()),
            "{what}: unexpected key {k}: {text}"
        );
    }
    assert_eq!(err["code"], code, "{what}: code: {text}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: message: {text}"
    );
    assert!(err["retryable"].is_boolean(), "{what}: retryable: {text}");
    if let Some(ms) = err.get("retryAfterMs") {
        assert!(ms.is_u64(), "{what}: retryAfterMs: {text}");
    }
    v["error"].clone()
}

/// [`assert_error`] for a response of the well-behaved client; also checks the content type.
fn assert_http_error(what: &str, r: &HttpResponse, want_status: u16, code: &str) -> Value {
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{what}: content-type"
    );
    assert_error(what, r.status, &r.body, want_status, code)
}

/// [`assert_error`] for a raw response.
fn assert_raw_error(what: &str, r: &RawResponse, want_status: u16, code: &str) -> Value {
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{what}: content-type"
    );
    assert_error(what, r.status, &r.body, want_status, code)
}

fn json_of(what: &str, r: &HttpResponse) -> Value {
    r.json()
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", r.text()))
}

/// `POST /v1/route` with `{"type","userId","payload"}`.
fn route(g: &GatewayProc, kind: &str, user: &str, payload: Value) -> HttpResponse {
    let body = json!({ "type": kind, "userId": user, "payload": payload }).to_string();
    g.request(
        "POST",
        "/v1/route",
        &[("content-type", "application/json")],
        Some(body.as_bytes()),
    )
}

/// The `x-moltbot-worker` header, checked to be `worker-N` with N below `workers`.
fn worker_header(what: &str, r: &HttpResponse, workers: usize) -> String {
    let w = r
        .header("x-moltbot-worker")
        .unwrap_or_else(|| panic!("{what}: no x-moltbot-worker header ({})", r.status));
    assert_worker_id(what, w, workers);
    w.to_string()
}

fn assert_worker_id(what: &str, w: &str, workers: usize) {
    let n: usize = w
        .strip_prefix("worker-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{what}: {w:?} is not worker-N"));
    assert!(n < workers, "{what}: {w} out of range");
}

/// Checks the `/v1/route` answer shape and returns the body.
fn route_shape(what: &str, r: &HttpResponse, workers: usize, success: bool) -> Value {
    let v = json_of(what, r);
    let text = r.text();
    assert!(
        v["requestId"].as_str().is_some_and(|s| !s.is_empty()),
        "{what}: requestId: {text}"
    );
    let worker = v["workerId"].as_str().expect("workerId");
    assert_worker_id(what, worker, workers);
    assert_eq!(
        worker_header(what, r, workers),
        worker,
        "{what}: header and workerId agree"
    );
    assert_eq!(v["success"], success, "{what}: success: {text}");
    assert!(v["durationUs"].is_u64(), "{what}: durationUs: {text}");
    if success {
        assert_eq!(r.status, 200, "{what}: {text}");
        assert!(v.get("payload").is_some(), "{what}: payload: {text}");
        assert!(v.get("error").is_none(), "{what}: {text}");
    } else {
        assert!(v["error"].as_str().is_some(), "{what}: error: {text}");
        assert!(
            v["errorCode"].as_str().is_some(),
            "{what}: errorCode: {text}"
        );
    }
    v
}

/// `GET /v1/users/{segment}/worker` as JSON.
fn lookup(g: &GatewayProc, segment: &str) -> Value {
    let r = g.request("GET", &format!("/v1/users/{segment}/worker"), &[], None);
    assert_eq!(r.status, 200, "lookup {segment}: {}", r.text());
    json_of("lookup", &r)
}

/// A keep-alive `POST /v1/echo` for `user` with `body`.
fn echo_request(user: &str, body: &[u8]) -> Vec<u8> {
    raw_request(
        "POST",
        "/v1/echo",
        &[("x-moltbot-user", user.as_bytes())],
        Some(body),
    )
}

/// Reads one response from a keep-alive connection, failing with `what`.
fn next_response(what: &str, s: &mut TcpStream) -> gw::Response {
    read_response(s).unwrap_or_else(|| panic!("{what}: no response"))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    gw::header_of(headers, name)
}

// ---------------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------------

#[test]
fn route_endpoint_answers_every_type() {
    let g = start(Options::new(2));
    let user = "route-user";

    // agent:message: the payload is the handler's answer; turns count up.
    let mut worker = String::new();
    for turn in 1..=2u64 {
        let r = route(
            &g,
            "agent:message",
            user,
            json!({ "message": format!("hi {turn}") }),
        );
        let v = route_shape("agent:message", &r, 2, true);
        let p = &v["payload"];
        assert_eq!(p["workerId"], v["workerId"], "{v}");
        assert_eq!(p["turn"], turn, "{v}");
        assert_eq!(p["userId"], user, "{v}");
        assert_eq!(p["reply"], format!("echo: hi {turn}"), "{v}");
        assert!(p["pid"].as_u64().is_some_and(|p| p > 0), "{v}");
        let w = v["workerId"].as_str().unwrap_or_default().to_string();
        if turn > 1 {
            assert_eq!(w, worker, "sticky");
        }
        worker = w;
    }

    // agent:command history: both turns, in order.
    let r = route(&g, "agent:command", user, json!({ "command": "history" }));
    let v = route_shape("agent:command", &r, 2, true);
    assert_eq!(v["workerId"], worker.as_str());
    assert_eq!(v["payload"]["turns"], 2, "{v}");
    let history = v["payload"]["history"].as_array().expect("history");
    let messages: Vec<&str> = history
        .iter()
        .map(|h| h["message"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(messages, ["hi 1", "hi 2"], "{v}");

    // session: set, get, list, delete, then get is a 404 in the same shape.
    let steps: Vec<(Value, u16, Value)> = vec![
        (
            json!({"action": "set", "name": "notes", "value": {"x": [1, 2]}}),
            200,
            json!({"name": "notes", "stored": true, "created": true}),
        ),
        (
            json!({"action": "set", "name": "notes", "value": {"x": 3}}),
            200,
            json!({"name": "notes", "stored": true, "created": false}),
        ),
        (
            json!({"action": "get", "name": "notes"}),
            200,
            json!({"name": "notes", "value": {"x": 3}}),
        ),
        (json!({"action": "list"}), 200, json!({"names": ["notes"]})),
        (
            json!({"action": "delete", "name": "notes"}),
            200,
            json!({"name": "notes", "deleted": true}),
        ),
        (json!({"action": "list"}), 200, json!({"names": []})),
        (json!({"action": "get", "name": "notes"}), 404, Value::Null),
        (json!({"action": "nope"}), 400, Value::Null),
    ];
    for (payload, status, want) in steps {
        let what = format!("session {payload}");
        let r = route(&g, "session", user, payload);
        assert_eq!(r.status, status, "{what}: {}", r.text());
        let v = route_shape(&what, &r, 2, status == 200);
        assert_eq!(v["workerId"], worker.as_str(), "{what}");
        if status == 200 {
            for (k, val) in want.as_object().expect("object") {
                assert_eq!(&v["payload"][k], val, "{what}: {v}");
            }
        } else {
            let code = if status == 404 {
                "NOT_FOUND"
            } else {
                "UNKNOWN_ACTION"
            };
            assert_eq!(v["errorCode"], code, "{what}: {v}");
        }
    }

    // health:check (and its short form).
    for kind in ["health:check", "health"] {
        let r = route(&g, kind, user, Value::Null);
        let v = route_shape(kind, &r, 2, true);
        assert_eq!(v["payload"]["status"], "ok", "{v}");
        assert_eq!(v["payload"]["workerId"], worker.as_str(), "{v}");
    }

    // echo: the payload comes back as it was sent.
    let payload = json!({"nested": {"a": [1, "two", null, true]}, "s": "é\n"});
    let r = route(&g, "echo", user, payload.clone());
    let v = route_shape("echo", &r, 2, true);
    assert_eq!(v["payload"], payload);

    // Request ids are unique.
    let a = route(&g, "echo", user, json!(1));
    let b = route(&g, "echo", user, json!(2));
    assert_ne!(json_of("a", &a)["requestId"], json_of("b", &b)["requestId"]);
}

#[test]
fn route_endpoint_rejects_bad_bodies() {
    let g = start(Options::new(1));
    let long_user = "u".repeat(129);
    let cases: Vec<(&str, String, &str)> = vec![
        ("invalid JSON", "{not json".into(), "INVALID_REQUEST"),
        ("empty body", String::new(), "INVALID_REQUEST"),
        ("a JSON array", "[1,2]".into(), "INVALID_REQUEST"),
        (
            "unknown type",
            json!({"type": "nope", "userId": "u", "payload": {}}).to_string(),
            "INVALID_REQUEST",
        ),
        (
            "missing type",
            json!({"userId": "u", "payload": {}}).to_string(),
            "INVALID_REQUEST",
        ),
        (
            "missing userId",
            json!({"type": "echo", "payload": {}}).to_string(),
            "INVALID_REQUEST",
        ),
        (
            "empty userId",
            json!({"type": "echo", "userId": "", "payload": {}}).to_string(),
            "INVALID_USER",
        ),
        (
            "129-byte userId",
            json!({"type": "echo", "userId": long_user, "payload": {}}).to_string(),
            "INVALID_USER",
        ),
        (
            "control character in userId",
            json!({"type": "echo", "userId": "a\u{1}b", "payload": {}}).to_string(),
            "INVALID_USER",
        ),
    ];
    for (what, body, code) in cases {
        let r = g.request("POST", "/v1/route", &[], Some(body.as_bytes()));
        assert_http_error(what, &r, 400, code);
        assert!(r.header("x-moltbot-worker").is_none(), "{what}: not routed");
    }
    // None of them reached the routing table.
    assert_eq!(g.status()["routingTableSize"], 0);
}

/// Fault injection (test builds only): `{"type":"test","payload":{"action":...}}` reaches the
/// worker's fault handlers.
#[test]
fn route_test_requests_reach_the_fault_handlers() {
    let g = start(Options::new(1));
    let r = route(&g, "test", "t", json!({"action": "slow", "ms": 1}));
    let v = route_shape("slow", &r, 1, true);
    assert_eq!(v["payload"]["sleptMs"], 1, "{v}");
    let r = route(&g, "test", "t", json!({"ms": 1}));
    assert_http_error("no action", &r, 400, "INVALID_REQUEST");
    let r = route(&g, "test", "t", json!({"action": "nope"}));
    assert_eq!(r.status, 404, "{}", r.text());
    let v = route_shape("unknown action", &r, 1, false);
    assert_eq!(v["errorCode"], "UNKNOWN_TEST_ACTION");
}

#[test]
fn agent_endpoint_passes_the_body_and_counts_turns() {
    let g = start(Options::new(2));
    let mut worker = None;
    let bodies: [&[u8]; 3] = [
        br#"{"message":"first"}"#,
        br#""second""#,
        b"third as plain text",
    ];
    let replies = ["echo: first", "echo: second", "echo: third as plain text"];
    for (i, (body, reply)) in bodies.iter().zip(replies).enumerate() {
        let r = g.request(
            "POST",
            "/v1/agent",
            &[("x-moltbot-user", "agent-user")],
            Some(*body),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let w = worker_header("agent", &r, 2);
        let v = json_of("agent", &r);
        assert_eq!(v["workerId"], w.as_str(), "{v}");
        assert_eq!(v["userId"], "agent-user", "{v}");
        assert_eq!(v["turn"], i as u64 + 1, "{v}");
        assert_eq!(v["reply"], reply, "{v}");
        if let Some(prev) = &worker {
            assert_eq!(&w, prev, "sticky");
        }
        worker = Some(w);
    }
    // Another user starts at turn 1.
    let r = g.request(
        "POST",
        "/v1/agent",
        &[("x-moltbot-user", "other")],
        Some(b"hi"),
    );
    assert_eq!(json_of("other", &r)["turn"], 1);
    // The handler's own refusal keeps the error shape and the worker header.
    let r = g.request(
        "POST",
        "/v1/agent",
        &[("x-moltbot-user", "other")],
        Some(b""),
    );
    assert_http_error("empty message", &r, 400, "INVALID_PAYLOAD");
    worker_header("empty message", &r, 2);
}

#[test]
fn sessions_endpoints_are_per_user() {
    let g = start(Options::new(2));
    let alice = [("x-moltbot-user", "alice")];
    let bob = [("x-moltbot-user", "bob")];

    let r = g.request("GET", "/v1/sessions", &alice, None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json_of("list", &r), json!({"names": []}));

    let r = g.request("PUT", "/v1/sessions/notes", &alice, Some(br#"{"a":1}"#));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json_of("put", &r);
    assert_eq!(v["stored"], true, "{v}");
    assert_eq!(v["created"], true, "{v}");
    let alice_worker = worker_header("put", &r, 2);
    let r = g.request("PUT", "/v1/sessions/todo.v2", &alice, Some(b"[1,2,3]"));
    assert_eq!(r.status, 200, "{}", r.text());

    let r = g.request("GET", "/v1/sessions/notes", &alice, None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, br#"{"a":1}"#);
    assert_eq!(worker_header("get", &r, 2), alice_worker);
    let r = g.request("GET", "/v1/sessions", &alice, None);
    assert_eq!(json_of("list", &r), json!({"names": ["notes", "todo.v2"]}));

    // Bob sees none of it, and his own value does not touch Alice's.
    let r = g.request("GET", "/v1/sessions", &bob, None);
    assert_eq!(json_of("bob list", &r), json!({"names": []}));
    let r = g.request("GET", "/v1/sessions/notes", &bob, None);
    assert_http_error("bob get", &r, 404, "NOT_FOUND");
    worker_header("bob get", &r, 2);
    let r = g.request("PUT", "/v1/sessions/notes", &bob, Some(br#""bob's""#));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = g.request("GET", "/v1/sessions/notes", &alice, None);
    assert_eq!(r.body, br#"{"a":1}"#);
    let r = g.request("GET", "/v1/sessions/notes", &bob, None);
    assert_eq!(r.body, br#""bob's""#);

    // The same state as `/v1/route` sessions.
    let r = route(
        &g,
        "session",
        "alice",
        json!({"action": "get", "name": "notes"}),
    );
    assert_eq!(
        json_of("route get", &r)["payload"]["value"],
        json!({"a": 1})
    );

    // Delete, then it is gone (for Alice only).
    let r = g.request("DELETE", "/v1/sessions/notes", &alice, None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json_of("delete", &r)["deleted"], true);
    let r = g.request("GET", "/v1/sessions/notes", &alice, None);
    assert_http_error("get deleted", &r, 404, "NOT_FOUND");
    let r = g.request("DELETE", "/v1/sessions/notes", &alice, None);
    assert_http_error("delete again", &r, 404, "NOT_FOUND");
    let r = g.request("GET", "/v1/sessions", &alice, None);
    assert_eq!(json_of("list", &r), json!({"names": ["todo.v2"]}));
    let r = g.request("GET", "/v1/sessions/notes", &bob, None);
    assert_eq!(r.status, 200);

    // A percent-encoded name is the decoded name.
    let r = g.request("PUT", "/v1/sessions/my%2Dnote", &alice, Some(b"true"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json_of("put", &r)["name"], "my-note");
    let r = g.request("GET", "/v1/sessions/my-note", &alice, None);
    assert_eq!(r.body, b"true");
    let r = g.request("DELETE", "/v1/sessions/my-note", &alice, None);
    assert_eq!(r.status, 200);

    // Bad names and values.
    type Bad<'a> = (&'a str, &'a str, Option<&'a [u8]>, u16, &'a str);
    let bad: [Bad<'_>; 5] = [
        ("GET", "/v1/sessions/.hidden", None, 400, "INVALID_NAME"),
        ("GET", "/v1/sessions/a%20b", None, 400, "INVALID_NAME"),
        ("GET", "/v1/sessions/a%2Fb", None, 400, "INVALID_NAME"),
        ("GET", "/v1/sessions/%zz", None, 400, "INVALID_NAME"),
        (
            "PUT",
            "/v1/sessions/x",
            Some(b"not json"),
            400,
            "INVALID_JSON",
        ),
    ];
    for (method, path, body, status, code) in bad {
        let r = g.request(method, path, &alice, body);
        assert_http_error(&format!("{method} {path}"), &r, status, code);
    }
}

#[test]
fn echo_returns_the_exact_bytes() {
    let g = start(Options::new(2));
    let binary: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let cases: Vec<(&str, Vec<u8>, Option<&str>, &str)> = vec![
        (
            "text",
            b"hello".to_vec(),
            Some("text/plain"),
            "text/plain; charset=utf-8",
        ),
        (
            "json",
            br#"{"a":1}"#.to_vec(),
            Some("application/json"),
            "application/json",
        ),
        ("binary", binary, None, "application/octet-stream"),
        (
            "CRLFs",
            b"\r\n\r\nGET / HTTP/1.1\r\n\r\n".to_vec(),
            None,
            "application/octet-stream",
        ),
        ("empty", Vec::new(), None, "application/octet-stream"),
    ];
    for (what, body, ct, want_ct) in cases {
        let mut headers = vec![("x-moltbot-user", "echo-user")];
        if let Some(ct) = ct {
            headers.push(("content-type", ct));
        }
        let r = g.request("POST", "/v1/echo", &headers, Some(&body));
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert_eq!(r.body, body, "{what}");
        assert_eq!(r.header("content-type"), Some(want_ct), "{what}");
        worker_header(what, &r, 2);
    }
}

#[test]
fn user_worker_lookup_does_not_assign() {
    let g = start(Options::new(2));
    let before = lookup(&g, "newbie");
    assert_eq!(before["userId"], "newbie");
    assert_eq!(before["assigned"], false, "{before}");
    let predicted = before["workerId"].as_str().expect("workerId").to_string();
    assert_worker_id("predicted", &predicted, 2);
    // Looking up neither assigns nor changes the prediction.
    assert_eq!(lookup(&g, "newbie"), before);
    assert_eq!(g.status()["routingTableSize"], 0);

    let r = g.request(
        "POST",
        "/v1/echo",
        &[("x-moltbot-user", "newbie")],
        Some(b"x"),
    );
    let w = worker_header("echo", &r, 2);
    assert_eq!(w, predicted, "the lookup predicted the assignment");
    let after = lookup(&g, "newbie");
    assert_eq!(after["assigned"], true, "{after}");
    assert_eq!(after["workerId"], w.as_str());
    assert_eq!(g.status()["routingTableSize"], 1);

    // Percent-encoded ids: the decoded id is the user of the header.
    let encoded = [
        ("alice%20smith", "alice smith"),
        ("zo%C3%AB", "zoë"),
        ("a%2Bb%3Fc", "a+b?c"),
        // A user id may hold a '/': encoded, the lookup finds it.
        ("team%2Falice", "team/alice"),
    ];
    for (segment, user) in encoded {
        let v = lookup(&g, segment);
        assert_eq!(v["userId"], user, "{v}");
        assert_eq!(v["assigned"], false, "{v}");
        let r = g.request("POST", "/v1/echo", &[("x-moltbot-user", user)], Some(b"x"));
        assert_eq!(r.status, 200, "{}", r.text());
        let w = r.header("x-moltbot-worker").expect("worker header");
        let v = lookup(&g, segment);
        assert_eq!(v["assigned"], true, "{v}");
        assert_eq!(v["workerId"], w, "{segment}");
    }

    // Ids that are not valid.
    let long = "x".repeat(129);
    for segment in ["%zz", "%01", "a%00b", "%FF", long.as_str()] {
        let r = g.request("GET", &format!("/v1/users/{segment}/worker"), &[], None);
        assert_http_error(segment, &r, 400, "INVALID_USER");
    }
    let r = g.request(
        "GET",
        &format!("/v1/users/{}/worker", "y".repeat(128)),
        &[],
        None,
    );
    assert_eq!(r.status, 200, "128 bytes is allowed: {}", r.text());
}

#[test]
fn status_has_the_fields_of_the_design() {
    let g = start(Options::new(2));
    g.wait_ready();
    for u in ["s1", "s2", "s3"] {
        let r = g.request("POST", "/v1/echo", &[("x-moltbot-user", u)], Some(b"x"));
        assert_eq!(r.status, 200);
    }
    let r = g.request("GET", "/status", &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let s = json_of("status", &r);
    assert_eq!(s["totalWorkers"], 2, "{s}");
    assert_eq!(s["healthyWorkers"], 2, "{s}");
    assert!(s["busyWorkers"].is_u64(), "{s}");
    assert!(s["queuedRequests"].is_u64(), "{s}");
    assert_eq!(s["routingTableSize"], 3, "{s}");
    let workers = s["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2);
    let mut pids = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        assert_eq!(w["workerId"], format!("worker-{i}"), "{w}");
        // Idle after its requests were answered: `ready`, not `busy` or anything else.
        assert_eq!(w["state"], "ready", "{w}");
        let pid = w["pid"].as_u64().expect("pid");
        assert!(pid > 0 && pid != u64::from(g.pid()), "{w}");
        pids.push(pid);
        for k in [
            "requestsProcessed",
            "activeRequests",
            "lastHeartbeat",
            "memoryUsage",
            "uptime",
            "restarts",
            "errorCount",
        ] {
            assert!(w[k].is_u64(), "{k}: {w}");
        }
        assert_eq!(w["restarts"], 0, "{w}");
        assert_eq!(w["errorCount"], 0, "{w}");
        assert!(w["lastHeartbeat"].as_u64() > Some(0), "{w}");
    }
    assert_ne!(pids[0], pids[1]);
    gw::wait_until("requestsProcessed to count the requests", || {
        let s = g.status();
        let total: u64 = s["workers"]
            .as_array()
            .map(|ws| {
                ws.iter()
                    .filter_map(|w| w["requestsProcessed"].as_u64())
                    .sum()
            })
            .unwrap_or(0);
        total >= 3
    });
}

#[test]
fn probes_and_metrics() {
    let g = start(Options::new(2));
    let r = g.request("GET", "/livez", &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    g.wait_ready();
    let r = g.request("GET", "/readyz", &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(json_of("readyz", &r)["ready"], true);
    let r = g.request("GET", "/healthz", &[], None);
    assert_eq!(r.status, 200);
    let h = json_of("healthz", &r);
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["healthyWorkers"], 2, "{h}");
    assert_eq!(h["totalWorkers"], 2, "{h}");

    // Requests of known endpoints and statuses, then the counters.
    for i in 0..3 {
        let r = g.request("POST", "/v1/echo", &[("x-moltbot-user", "m")], Some(b"x"));
        assert_eq!(r.status, 200, "echo {i}");
    }
    assert_eq!(g.request("GET", "/nope", &[], None).status, 404);
    assert_eq!(g.request("POST", "/v1/route", &[], Some(b"{")).status, 400);
    assert_eq!(g.request("GET", "/v1/echo", &[], None).status, 405);

    let r = g.request("GET", "/metrics", &[], None);
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
        "{ct}"
    );
    let text = r.text();
    let total = "moltbot_http_requests_total";
    assert!(
        text.contains("# TYPE moltbot_http_requests counter"),
        "{text}"
    );
    for (endpoint, status, want) in [
        ("echo", "200", 3.0),
        ("other", "404", 1.0),
        ("route", "400", 1.0),
        ("echo", "405", 1.0),
        ("livez", "200", 1.0),
        ("healthz", "200", 1.0),
    ] {
        assert_eq!(
            metric(&text, total, &[("endpoint", endpoint), ("status", status)]),
            Some(want),
            "{endpoint} {status}:\n{text}"
        );
    }
    assert!(
        metric(&text, total, &[("endpoint", "readyz"), ("status", "200")]) >= Some(2.0),
        "{text}"
    );
    assert!(
        text.contains("moltbot_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
}

/// Every routed answer, success or the handler's error, names its worker; and the worker is
/// the user's (as `/v1/users/{id}/worker` says).
#[test]
fn routed_responses_carry_the_worker_header() {
    let g = start(Options::new(3));
    let route_body = |kind: &str, user: &str, payload: Value| {
        json!({"type": kind, "userId": user, "payload": payload})
            .to_string()
            .into_bytes()
    };
    type Case = (&'static str, &'static str, String, Vec<u8>, &'static str);
    let mut cases: Vec<Case> = Vec::new();
    for user in ["hdr-a", "hdr-b", "hdr-c", "hdr-d"] {
        cases.extend([
            ("POST", "/v1/echo", user.to_string(), b"x".to_vec(), user),
            ("POST", "/v1/agent", user.to_string(), b"hi".to_vec(), user),
            (
                "PUT",
                "/v1/sessions/n",
                user.to_string(),
                b"1".to_vec(),
                user,
            ),
            ("GET", "/v1/sessions/n", user.to_string(), Vec::new(), user),
            (
                "GET",
                "/v1/sessions/missing",
                user.to_string(),
                Vec::new(),
                user,
            ),
            ("GET", "/v1/sessions", user.to_string(), Vec::new(), user),
            (
                "DELETE",
                "/v1/sessions/n",
                user.to_string(),
                Vec::new(),
                user,
            ),
            ("POST", "/v1/agent", user.to_string(), Vec::new(), user),
        ]);
        for (kind, payload) in [
            ("echo", json!("x")),
            ("agent:message", json!({"message": "m"})),
            ("agent:command", json!({"command": "stats"})),
            ("agent:command", json!({"command": "nope"})),
            ("session", json!({"action": "list"})),
            ("health:check", Value::Null),
        ] {
            cases.push((
                "POST",
                "/v1/route",
                String::new(),
                route_body(kind, user, payload),
                user,
            ));
        }
    }
    for (method, path, header_user, body, user) in cases {
        let what = format!("{method} {path} {user}");
        let mut headers = Vec::new();
        if !header_user.is_empty() {
            headers.push(("x-moltbot-user", header_user.as_str()));
        }
        let body =
            (!body.is_empty() || (method != "GET" && method != "DELETE")).then_some(&body[..]);
        let r = g.request(method, path, &headers, body);
        let w = worker_header(&what, &r, 3);
        assert_eq!(lookup(&g, user)["workerId"], w.as_str(), "{what}");
    }
}

// ---------------------------------------------------------------------------------------------
// Error statuses
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_users_are_400() {
    let g = start(Options::new(1));
    let long = vec![b'u'; 129];
    let max = vec![b'u'; 128];
    // (what, header value or None for no header, expected status, code)
    let cases: Vec<(&str, Option<&[u8]>, u16, &str)> = vec![
        ("missing header", None, 400, "INVALID_USER"),
        ("empty", Some(b""), 400, "INVALID_USER"),
        ("only spaces", Some(b"   "), 400, "INVALID_USER"),
        ("129 bytes", Some(&long), 400, "INVALID_USER"),
        // HTAB is legal in a field value but not in a user id.
        ("tab", Some(b"a\tb"), 400, "INVALID_USER"),
        // Other control characters are refused by the HTTP parser already.
        ("control character", Some(b"a\x01b"), 400, "BAD_REQUEST"),
        ("DEL character", Some(b"a\x7fb"), 400, "BAD_REQUEST"),
        ("invalid UTF-8", Some(b"a\xff\xfeb"), 400, "INVALID_USER"),
        ("truncated UTF-8", Some(b"zo\xc3"), 400, "INVALID_USER"),
        ("128 bytes", Some(&max), 200, ""),
        ("UTF-8", Some("zoë".as_bytes()), 200, ""),
    ];
    for (path, body) in [
        ("/v1/echo", Some(&b"x"[..])),
        ("/v1/agent", Some(&b"hi"[..])),
        ("/v1/sessions", None),
    ] {
        let method = if body.is_some() { "POST" } else { "GET" };
        for (what, value, status, code) in &cases {
            let what = format!("{path}: {what}");
            // Closes after the answer, so reading to the end reads exactly one response.
            let mut headers: Vec<(&str, &[u8])> = vec![("Connection", b"close")];
            headers.extend(value.iter().map(|v| ("x-moltbot-user", *v)));
            let req = raw_request(method, path, &headers, body);
            let responses = parse_responses(&g.raw_closed(&req));
            assert_eq!(responses.len(), 1, "{what}");
            let r = &responses[0];
            if *status == 200 {
                assert_eq!(
                    r.status,
                    200,
                    "{what}: {}",
                    String::from_utf8_lossy(&r.body)
                );
            } else {
                assert_raw_error(&what, r, *status, code);
                assert!(r.header("x-moltbot-worker").is_none(), "{what}");
            }
        }
    }
}

#[test]
fn bearer_token_is_required_but_not_for_probes() {
    let g = start(Options::new(1).env("MOLTBOT_GATEWAY_TOKEN", "secret"));
    let echo = |auth: Option<&str>| {
        let mut h = vec![("x-moltbot-user", "tok")];
        if let Some(a) = auth {
            h.push(("authorization", a));
        }
        g.request("POST", "/v1/echo", &h, Some(b"x"))
    };
    for (what, auth) in [
        ("no header", None),
        ("wrong token", Some("Bearer wrong")),
        ("prefix of the token", Some("Bearer secre")),
        ("token with a suffix", Some("Bearer secretx")),
        ("other scheme", Some("Basic secret")),
        ("no scheme", Some("secret")),
        ("empty", Some("")),
    ] {
        let r = echo(auth);
        assert_http_error(what, &r, 401, "UNAUTHORIZED");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{what}");
        assert!(r.header("x-moltbot-worker").is_none(), "{what}");
    }
    let r = echo(Some("Bearer secret"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, b"x");
    let r = echo(Some("bearer secret"));
    assert_eq!(r.status, 200, "the scheme is case-insensitive");

    // Probes need no token; everything else does.
    assert_eq!(g.request("GET", "/livez", &[], None).status, 200);
    g.wait_ready();
    for path in [
        "/status",
        "/healthz",
        "/metrics",
        "/v1/users/tok/worker",
        "/v1/sessions",
    ] {
        let r = g.request("GET", path, &[("x-moltbot-user", "tok")], None);
        assert_http_error(path, &r, 401, "UNAUTHORIZED");
        let r = g.request(
            "GET",
            path,
            &[
                ("x-moltbot-user", "tok"),
                ("authorization", "Bearer secret"),
            ],
            None,
        );
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let body = json!({"type": "echo", "userId": "tok", "payload": 1}).to_string();
    let r = g.request("POST", "/v1/route", &[], Some(body.as_bytes()));
    assert_http_error("route", &r, 401, "UNAUTHORIZED");
}

#[test]
fn unknown_paths_are_404_and_wrong_methods_405() {
    let g = start(Options::new(1));
    for path in [
        "/",
        "/nope",
        "/v1",
        "/v1/routes",
        "/v1/users/a",
        "/v1/users/a/workers",
        "/v1/users/worker",
        "/livez/x",
        "/V1/echo",
    ] {
        let r = g.request("GET", path, &[], None);
        assert_http_error(path, &r, 404, "NOT_FOUND");
    }
    let cases: [(&str, &str, &str); 14] = [
        ("GET", "/v1/route", "POST"),
        ("PUT", "/v1/route", "POST"),
        ("GET", "/v1/agent", "POST"),
        ("GET", "/v1/echo", "POST"),
        ("DELETE", "/v1/echo", "POST"),
        ("POST", "/status", "GET"),
        ("POST", "/livez", "GET"),
        ("DELETE", "/readyz", "GET"),
        ("PUT", "/healthz", "GET"),
        ("POST", "/metrics", "GET"),
        ("POST", "/v1/users/a/worker", "GET"),
        ("POST", "/v1/sessions", "GET"),
        ("DELETE", "/v1/sessions", "GET"),
        ("POST", "/v1/sessions/n", "GET, PUT, DELETE"),
    ];
    for (method, path, allow) in cases {
        let what = format!("{method} {path}");
        let r = g.request(method, path, &[("x-moltbot-user", "u")], None);
        assert_http_error(&what, &r, 405, "METHOD_NOT_ALLOWED");
        assert_eq!(r.header("allow"), Some(allow), "{what}");
    }
    // Methods are case-sensitive tokens: an unknown one is 405 too.
    let r = parse_responses(
        &g.raw_closed(b"FETCH /status HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(r.len(), 1);
    assert_raw_error("FETCH", &r[0], 405, "METHOD_NOT_ALLOWED");
}

/// A head or a body that does not arrive in time is answered 408 and the connection closed;
/// an idle keep-alive connection is closed silently.
#[test]
fn slow_requests_are_408() {
    let g =
        start(Options::new(1).args(&["--header-read-timeout", "300ms", "--idle-timeout", "300ms"]));
    let cases: [(&str, &[u8]); 4] = [
        ("half a head", b"GET /livez HTTP/1.1\r\nHost: gw\r\n"),
        ("half a request line", b"GET /li"),
        ("one byte", b"G"),
        (
            "half a body",
            b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: u\r\nContent-Length: 10\r\n\r\nhello",
        ),
    ];
    for (what, bytes) in cases {
        // The server answers on its own once its timer fires; the test only waits for that.
        let responses = parse_responses(&g.raw_closed(bytes));
        assert_eq!(responses.len(), 1, "{what}");
        assert_raw_error(what, &responses[0], 408, "REQUEST_TIMEOUT");
        assert_eq!(responses[0].header("connection"), Some("close"), "{what}");
    }
    let r = parse_responses(&g.raw_closed(
        b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: u\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ));
    assert_eq!(r.len(), 1, "half a chunked body");
    assert_raw_error("half a chunked body", &r[0], 408, "REQUEST_TIMEOUT");

    // Idle: nothing sent, or nothing after a complete exchange: closed without an answer.
    assert!(g.raw_closed(b"").is_empty());
    let mut s = g.connect();
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n")
        .expect("write");
    let (status, _, _) = next_response("livez", &mut s);
    assert_eq!(status, 200);
    assert!(
        read_until_closed(&mut s).is_empty(),
        "no 408 for an idle connection"
    );
}

#[test]
fn too_large_bodies_are_413() {
    // The harness starts gateways with --max-body-bytes 64KiB.
    let g = start(Options::new(1));
    const MAX: usize = 64 * 1024;

    // Exactly the limit is fine.
    let body: Vec<u8> = (0..MAX).map(|i| (i % 251) as u8).collect();
    let r = g.request(
        "POST",
        "/v1/echo",
        &[("x-moltbot-user", "big")],
        Some(&body),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == body, "echo of 64 KiB");

    // Content-Length over the limit: refused from the head alone (no body is sent).
    let head = format!(
        "POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: big\r\nContent-Length: {}\r\n\r\n",
        MAX + 1
    );
    let r = parse_responses(&g.raw_closed(head.as_bytes()));
    assert_eq!(r.len(), 1);
    assert_raw_error("Content-Length", &r[0], 413, "BODY_TOO_LARGE");

    // With Expect: 100-continue the refusal comes instead of the 100.
    let head = format!(
        "POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: big\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        MAX + 1
    );
    let r = parse_responses(&g.raw_closed(head.as_bytes()));
    assert_eq!(r.len(), 1);
    assert_raw_error("100-continue", &r[0], 413, "BODY_TOO_LARGE");

    // A chunked body that grows over the limit, chunk by chunk (16 KiB each, then one more
    // byte): refused at the size line that would cross it.
    let mut s = g.connect();
    s.write_all(
        b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: big\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .expect("write");
    let chunk = vec![b'c'; 16 * 1024];
    for _ in 0..4 {
        s.write_all(b"4000\r\n").expect("write");
        s.write_all(&chunk).expect("write");
        s.write_all(b"\r\n").expect("write");
    }
    s.write_all(b"1\r\n").expect("write");
    let r = parse_responses(&read_until_closed(&mut s));
    assert_eq!(r.len(), 1);
    assert_raw_error("chunked growth", &r[0], 413, "BODY_TOO_LARGE");

    // One chunk announced over the limit.
    let r = parse_responses(&g.raw_closed(
        b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: big\r\nTransfer-Encoding: chunked\r\n\r\n10001\r\n",
    ));
    assert_eq!(r.len(), 1);
    assert_raw_error("chunk over the limit", &r[0], 413, "BODY_TOO_LARGE");

    // A chunked body of exactly the limit is fine.
    let mut req = b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: big\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"4000\r\n");
        req.extend_from_slice(&chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let mut s = g.connect();
    s.write_all(&req).expect("write");
    let (status, _, echoed) = next_response("chunked at the limit", &mut s);
    assert_eq!(status, 200);
    assert_eq!(echoed.len(), MAX);
}

/// URI and head limits (lowered through the environment so that each offending request
/// arrives in one segment and is read whole before the answer).
#[test]
fn long_uris_are_414_and_large_heads_431() {
    let g = start(
        Options::new(1)
            .env("MOLTBOT_MAX_URI_BYTES", "1024")
            .env("MOLTBOT_MAX_HEADER_BYTES", "4096"),
    );
    let target = |len: usize| format!("/{}", "a".repeat(len - 1));
    let req = |target: &str, extra: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: gw\r\n{extra}Connection: close\r\n\r\n")
            .into_bytes()
    };
    let one = |what: &str, bytes: &[u8]| {
        let r = parse_responses(&g.raw_closed(bytes));
        assert_eq!(r.len(), 1, "{what}");
        r.into_iter().next().expect("one")
    };

    let r = one("URI at the limit", &req(&target(1024), ""));
    assert_raw_error("URI at the limit", &r, 404, "NOT_FOUND");
    let r = one("URI over the limit", &req(&target(1025), ""));
    assert_raw_error("URI over the limit", &r, 414, "URI_TOO_LONG");
    let r = one("URI far over the limit", &req(&target(3000), ""));
    assert_raw_error("URI far over the limit", &r, 414, "URI_TOO_LONG");

    // Head bytes: one large field.
    let pad = |n: usize| format!("x-pad: {}\r\n", "p".repeat(n));
    let r = one("head over the limit", &req("/livez", &pad(4096)));
    assert_raw_error("head over the limit", &r, 431, "HEADERS_TOO_LARGE");
    let r = one("head under the limit", &req("/livez", &pad(3900)));
    assert_eq!(r.status, 200);
    // Many fields adding up.
    let many: String = (0..60)
        .map(|i| format!("x-f{i}: {}\r\n", "v".repeat(60)))
        .collect();
    let r = one("many fields", &req("/livez", &many));
    assert_raw_error("many fields", &r, 431, "HEADERS_TOO_LARGE");

    // Incomplete heads are refused as soon as they cannot fit any more (the header timeout is
    // the default 10 s; the answers come without waiting for it).
    let r = one(
        "unterminated request line",
        format!("GET /{}", "a".repeat(2000)).as_bytes(),
    );
    assert_raw_error("unterminated request line", &r, 414, "URI_TOO_LONG");
    let r = one(
        "unterminated head",
        format!(
            "GET /livez HTTP/1.1\r\nHost: gw\r\nx-pad: {}",
            "p".repeat(4200)
        )
        .as_bytes(),
    );
    assert_raw_error("unterminated head", &r, 431, "HEADERS_TOO_LARGE");

    // Header count (default 100, Host and Connection included).
    let fields = |n: usize| (0..n).map(|i| format!("x-h{i}: v\r\n")).collect::<String>();
    let r = one("100 fields", &req("/livez", &fields(98)));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = one("101 fields", &req("/livez", &fields(99)));
    assert_raw_error("101 fields", &r, 431, "HEADERS_TOO_LARGE");
}

#[test]
fn other_http_versions_are_505() {
    let g = start(Options::new(1));
    let cases: [(&str, &[u8], u16, &str); 5] = [
        (
            "HTTP/2.0",
            b"GET /livez HTTP/2.0\r\nHost: gw\r\n\r\n",
            505,
            "VERSION_NOT_SUPPORTED",
        ),
        (
            "HTTP/1.2",
            b"GET /livez HTTP/1.2\r\nHost: gw\r\n\r\n",
            505,
            "VERSION_NOT_SUPPORTED",
        ),
        (
            "HTTP/3.0",
            b"GET /livez HTTP/3.0\r\n\r\n",
            505,
            "VERSION_NOT_SUPPORTED",
        ),
        (
            "h2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            505,
            "VERSION_NOT_SUPPORTED",
        ),
        ("HTTP/0.9", b"GET /livez\r\n\r\n", 400, "BAD_REQUEST"),
    ];
    for (what, bytes, status, code) in cases {
        let r = parse_responses(&g.raw_closed(bytes));
        assert_eq!(r.len(), 1, "{what}");
        assert_raw_error(what, &r[0], status, code);
    }
}

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

#[test]
fn requests_written_one_byte_at_a_time() {
    let g = start(Options::new(2));
    let body = json!({"type": "echo", "userId": "bytewise", "payload": {"k": "v"}}).to_string();
    let mut s = g.connect();
    // Twice on the same connection: the second request starts in a fresh parse state.
    for i in 0..2 {
        let req = raw_request("POST", "/v1/route", &[], Some(body.as_bytes()));
        write_bytewise(&mut s, &req);
        let (status, headers, answer) = next_response("bytewise", &mut s);
        assert_eq!(status, 200, "{i}: {}", String::from_utf8_lossy(&answer));
        let v: Value = serde_json::from_slice(&answer).expect("JSON");
        assert_eq!(v["payload"], json!({"k": "v"}));
        assert_eq!(header(&headers, "x-moltbot-worker"), v["workerId"].as_str());
    }
    // A GET too (no body), and a chunked body, byte by byte.
    write_bytewise(&mut s, b"GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n");
    assert_eq!(next_response("livez", &mut s).0, 200);
    write_bytewise(
        &mut s,
        b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: b\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    );
    let (status, _, answer) = next_response("chunked", &mut s);
    assert_eq!(status, 200);
    assert_eq!(answer, b"abcde");
}

#[test]
fn bodies_split_into_pieces() {
    let g = start(Options::new(1));
    let body: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let req = echo_request("pieces", &body);
    let head_len = req.len() - body.len();
    let mut s = g.connect();
    s.write_all(&req[..head_len]).expect("write");
    // Uneven pieces, including single bytes.
    let mut at = 0;
    for size in [1usize, 1, 2, 500, 1, 3000, 17].iter().cycle() {
        if at == body.len() {
            break;
        }
        let end = (at + size).min(body.len());
        s.write_all(&body[at..end]).expect("write");
        s.flush().expect("flush");
        at = end;
    }
    let (status, _, echoed) = next_response("pieces", &mut s);
    assert_eq!(status, 200);
    assert!(echoed == body, "echo of a body sent in pieces");
    // The head split in the middle of a header, the body with the next head's first bytes.
    let req = echo_request("pieces", b"0123456789");
    let split = req.len() - 15;
    s.write_all(&req[..20]).expect("write");
    s.write_all(&req[20..split]).expect("write");
    let mut rest = req[split..].to_vec();
    rest.extend_from_slice(b"GET /li");
    s.write_all(&rest).expect("write");
    s.write_all(b"vez HTTP/1.1\r\nHost: gw\r\n\r\n")
        .expect("write");
    let (status, _, echoed) = next_response("split", &mut s);
    assert_eq!((status, echoed.as_slice()), (200, &b"0123456789"[..]));
    assert_eq!(next_response("livez", &mut s).0, 200);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let g = start(Options::new(3));
    let mut all = Vec::new();
    for i in 0..10 {
        all.extend(echo_request(
            &format!("pipe-{}", i % 5),
            format!("body-{i}").as_bytes(),
        ));
    }
    let mut s = g.connect();
    s.write_all(&all).expect("write");
    for i in 0..10 {
        let (status, headers, body) = next_response(&format!("response {i}"), &mut s);
        assert_eq!(status, 200);
        assert_eq!(body, format!("body-{i}").as_bytes(), "response {i}");
        assert!(header(&headers, "x-moltbot-worker").is_some());
        assert_eq!(header(&headers, "connection"), Some("keep-alive"));
    }
    // Mixed endpoints, the last one closing the connection: exactly ten answers, in order.
    let mut all = Vec::new();
    for i in 0..9 {
        match i % 3 {
            0 => all.extend(echo_request("mix", format!("m{i}").as_bytes())),
            1 => all.extend(b"GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n"),
            _ => all.extend(b"GET /nope HTTP/1.1\r\nHost: gw\r\n\r\n"),
        }
    }
    all.extend(b"GET /v1/users/mix/worker HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
    let r = parse_responses(&g.raw_closed(&all));
    let statuses: Vec<u16> = r.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 404, 200, 200, 404, 200, 200, 404, 200]);
    for i in [0, 3, 6] {
        assert_eq!(r[i].body, format!("m{i}").as_bytes());
    }
    assert_eq!(r[9].json()["assigned"], true);
}

/// A slow request first, a fast one (on another worker) second, pipelined: the answers still
/// come in request order.
#[test]
fn pipelined_answers_wait_for_a_slow_first_request() {
    let g = start(Options::new(2));
    let r = g.request(
        "POST",
        "/v1/echo",
        &[("x-moltbot-user", "slowpoke")],
        Some(b"x"),
    );
    let slow_worker = worker_header("slowpoke", &r, 2);
    let fast = (0..100)
        .map(|i| format!("fast-{i}"))
        .find(|u| lookup(&g, u)["workerId"] != slow_worker.as_str())
        .expect("a user on the other worker");
    let slow =
        json!({"type": "test", "userId": "slowpoke", "payload": {"action": "slow", "ms": 300}})
            .to_string();
    let mut all = raw_request("POST", "/v1/route", &[], Some(slow.as_bytes()));
    all.extend(echo_request(&fast, b"fast answer"));
    let mut s = g.connect();
    s.write_all(&all).expect("write");
    let (status, headers, body) = next_response("slow", &mut s);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        header(&headers, "x-moltbot-worker"),
        Some(slow_worker.as_str())
    );
    let v: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(v["payload"]["sleptMs"], 300, "{v}");
    let (status, headers, body) = next_response("fast", &mut s);
    assert_eq!(status, 200);
    assert_eq!(body, b"fast answer");
    assert_ne!(
        header(&headers, "x-moltbot-worker"),
        Some(slow_worker.as_str())
    );
}

#[test]
fn chunked_request_bodies() {
    let g = start(Options::new(1));
    let head = "POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: chunky\r\nTransfer-Encoding: chunked\r\n\r\n";
    let cases: [(&str, &[u8], &[u8]); 7] = [
        ("one chunk", b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
        (
            "several chunks",
            b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n",
            b"hello world",
        ),
        (
            "extensions",
            b"5;name=value\r\nhello\r\n6;a;b=\"q\"\r\n world\r\n0;last\r\n\r\n",
            b"hello world",
        ),
        (
            "upper- and lower-case hex",
            b"A\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\n",
            b"0123456789abcdefghij",
        ),
        ("leading zeros", b"0005\r\nhello\r\n000\r\n\r\n", b"hello"),
        (
            "trailer fields",
            b"5\r\nhello\r\n0\r\nX-Trailer: yes\r\nX-Other: 1\r\n\r\n",
            b"hello",
        ),
        ("empty body", b"0\r\n\r\n", b""),
    ];
    // Each case whole, then split at every third byte, on one keep-alive connection; a plain
    // request after each proves the chunked body was consumed exactly.
    let mut s = g.connect();
    for (what, chunks, want) in cases {
        for split in [false, true] {
            let mut req = head.as_bytes().to_vec();
            req.extend_from_slice(chunks);
            if split {
                for piece in req.chunks(3) {
                    s.write_all(piece).expect("write");
                    s.flush().expect("flush");
                }
            } else {
                s.write_all(&req).expect("write");
            }
            let (status, _, body) = next_response(what, &mut s);
            assert_eq!(
                status,
                200,
                "{what} (split {split}): {}",
                String::from_utf8_lossy(&body)
            );
            assert_eq!(body, want, "{what} (split {split})");
            s.write_all(b"GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n")
                .expect("write");
            assert_eq!(next_response("livez", &mut s).0, 200, "{what}");
        }
    }
    // A JSON body for /v1/route, chunked.
    let body = json!({"type": "echo", "userId": "chunky", "payload": [1, 2, 3]}).to_string();
    let (a, b) = body.as_bytes().split_at(10);
    let mut req =
        b"POST /v1/route HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for part in [a, b] {
        req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&req).expect("write");
    let (status, _, answer) = next_response("route", &mut s);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let v: Value = serde_json::from_slice(&answer).expect("JSON");
    assert_eq!(v["payload"], json!([1, 2, 3]));
}

#[test]
fn expect_100_continue() {
    let g = start(Options::new(1));
    let body: Vec<u8> = (0..2048u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut s = g.connect();
    for round in 0..2 {
        let head = format!(
            "POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: curl\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).expect("write");
        // The interim answer comes before any body byte is sent.
        let mut interim = [0u8; 25];
        std::io::Read::read_exact(&mut s, &mut interim).expect("100 Continue");
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n", "round {round}");
        s.write_all(&body).expect("write");
        let (status, _, echoed) = next_response("final", &mut s);
        assert_eq!(status, 200);
        assert_eq!(echoed, body, "round {round}");
    }
    // The same, chunked.
    s.write_all(b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: curl\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n")
        .expect("write");
    assert_eq!(next_response("100 chunked", &mut s).0, 100);
    s.write_all(b"800\r\n").expect("write");
    s.write_all(&body).expect("write");
    s.write_all(b"\r\n0\r\n\r\n").expect("write");
    let (status, _, echoed) = next_response("final chunked", &mut s);
    assert_eq!(status, 200);
    assert_eq!(echoed, body);
}

#[test]
fn http10_with_and_without_keep_alive() {
    let g = start(Options::new(1));
    // Without keep-alive: one answer, then the server closes, even with more requests sent.
    let bytes = b"POST /v1/echo HTTP/1.0\r\nx-moltbot-user: old\r\nContent-Length: 3\r\n\r\none\
GET /livez HTTP/1.0\r\n\r\n";
    let r = parse_responses(&g.raw_closed(bytes));
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].status, 200);
    assert_eq!(r[0].body, b"one");
    assert_eq!(r[0].header("connection"), Some("close"));

    // With keep-alive: two requests on one connection.
    let mut s = g.connect();
    for body in [&b"first"[..], b"second"] {
        let req = format!(
            "POST /v1/echo HTTP/1.0\r\nConnection: keep-alive\r\nx-moltbot-user: old\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(req.as_bytes()).expect("write");
        s.write_all(body).expect("write");
        let (status, headers, echoed) = next_response("1.0 keep-alive", &mut s);
        assert_eq!(status, 200);
        assert_eq!(echoed, body);
        assert_eq!(header(&headers, "connection"), Some("keep-alive"));
    }
    // The last one without keep-alive closes it.
    s.write_all(b"GET /livez HTTP/1.0\r\n\r\n").expect("write");
    let r = parse_responses(&read_until_closed(&mut s));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].status, 200);
}

#[test]
fn http11_connection_close() {
    let g = start(Options::new(1));
    let bytes = b"GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n\
POST /v1/echo HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nx-moltbot-user: c\r\nContent-Length: 2\r\n\r\nhi\
GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n";
    let r = parse_responses(&g.raw_closed(bytes));
    assert_eq!(
        r.len(),
        2,
        "nothing after Connection: close is answered: {r:?}"
    );
    assert_eq!(r[0].header("connection"), Some("keep-alive"));
    assert_eq!(r[1].status, 200);
    assert_eq!(r[1].body, b"hi");
    assert_eq!(r[1].header("connection"), Some("close"));
    // Token lists and case: `Connection: Keep-Alive, Close` closes too.
    let r = parse_responses(&g.raw_closed(
        b"GET /livez HTTP/1.1\r\nHost: gw\r\nConnection: Keep-Alive, CLOSE\r\n\r\nGET /livez HTTP/1.1\r\nHost: gw\r\n\r\n",
    ));
    assert_eq!(r.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Smuggling
// ---------------------------------------------------------------------------------------------

/// Each ambiguous request is refused with 400 and the connection closed: the request smuggled
/// behind it is never processed (its user never gets a worker) and exactly one response
/// comes back.
#[test]
fn smuggling_attempts_are_refused_and_close_the_connection() {
    let g = start(Options::new(1));
    let post = "POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: victim\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "TE + CL",
            format!("{post}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "CL + TE",
            format!("{post}Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\n"),
        ),
        (
            "TE: chunked, chunked",
            format!("{post}Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "TE: gzip, chunked",
            format!("{post}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "TE: identity",
            format!("{post}Transfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        (
            "TE: identity alone",
            format!("{post}Transfer-Encoding: identity\r\n\r\n"),
        ),
        (
            "TE twice",
            format!("{post}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "TE: xchunked",
            format!("{post}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "TE in HTTP/1.0",
            "POST /v1/echo HTTP/1.0\r\nx-moltbot-user: victim\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
        ),
        (
            "two equal Content-Length",
            format!("{post}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        (
            "two differing Content-Length",
            format!("{post}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ),
        ("Content-Length: 5, 5", format!("{post}Content-Length: 5, 5\r\n\r\nhello")),
        ("Content-Length: +5", format!("{post}Content-Length: +5\r\n\r\nhello")),
        ("Content-Length: -1", format!("{post}Content-Length: -1\r\n\r\n")),
        ("Content-Length: 0x5", format!("{post}Content-Length: 0x5\r\n\r\nhello")),
        ("Content-Length: empty", format!("{post}Content-Length: \r\n\r\n")),
        (
            "Content-Length overflow",
            format!("{post}Content-Length: 99999999999999999999999\r\n\r\n"),
        ),
        (
            "space before the colon",
            format!("{post}Content-Length : 5\r\n\r\nhello"),
        ),
        (
            "bad chunk size",
            format!("{post}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "chunk size with a sign",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "chunk size overflow",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "chunk data longer than its size",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "chunk size line ended by bare LF",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"),
        ),
        (
            "obs-fold",
            format!("{post}X-Folded: a\r\n b\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        (
            "obs-fold of Transfer-Encoding",
            format!("{post}Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "bare LF between headers",
            "POST /v1/echo HTTP/1.1\r\nHost: gw\nx-moltbot-user: victim\r\nContent-Length: 5\r\n\r\nhello".into(),
        ),
        (
            "bare LF everywhere",
            "POST /v1/echo HTTP/1.1\nHost: gw\nx-moltbot-user: victim\nContent-Length: 5\n\nhello".into(),
        ),
        (
            "bare CR",
            "POST /v1/echo HTTP/1.1\rHost: gw\r\nContent-Length: 5\r\n\r\nhello".into(),
        ),
        (
            "two Host headers",
            format!("{post}Host: other\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        (
            "two x-moltbot-user headers",
            format!("{post}x-moltbot-user: other\r\nContent-Length: 5\r\n\r\nhello"),
        ),
    ];
    for (i, (what, bad)) in cases.iter().enumerate() {
        let smuggled_user = format!("smuggled-{i}");
        let mut bytes = bad.as_bytes().to_vec();
        bytes.extend(raw_request(
            "POST",
            "/v1/agent",
            &[("x-moltbot-user", smuggled_user.as_bytes())],
            Some(b"hi"),
        ));
        let responses = parse_responses(&g.raw_closed(&bytes));
        assert_eq!(
            responses.len(),
            1,
            "{what}: exactly one response: {responses:?}"
        );
        assert_raw_error(what, &responses[0], 400, "BAD_REQUEST");
        assert_eq!(responses[0].header("connection"), Some("close"), "{what}");
        let v = lookup(&g, &smuggled_user);
        assert_eq!(
            v["assigned"], false,
            "{what}: the smuggled request was processed"
        );
    }
    // A valid request before the bad one is answered first; nothing after the bad one is.
    let mut bytes = echo_request("before", b"fine");
    bytes.extend_from_slice(cases[0].1.as_bytes());
    bytes.extend(echo_request("smuggled-after", b"never"));
    let r = parse_responses(&g.raw_closed(&bytes));
    let statuses: Vec<u16> = r.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 400], "{r:?}");
    assert_eq!(r[0].body, b"fine");
    assert_eq!(lookup(&g, "smuggled-after")["assigned"], false);
    // The refused requests reached no worker either.
    assert_eq!(lookup(&g, "victim")["assigned"], false);
    assert_eq!(g.status()["routingTableSize"], 1, "only `before`");
}

// ---------------------------------------------------------------------------------------------
// More framing and connection handling
// ---------------------------------------------------------------------------------------------

/// Answers to HEAD carry no body (RFC 9110 §9.3.2), so what follows on the connection is
/// framed right.
#[test]
fn head_requests_get_answers_without_a_body() {
    let g = start(Options::new(1));
    for (target, status) in [("/livez", 405), ("/status", 405), ("/nope", 404)] {
        let req = format!(
            "HEAD {target} HTTP/1.1\r\nHost: gw\r\n\r\nGET /livez HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        );
        let raw = g.raw_closed(req.as_bytes());
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 4)
            .unwrap_or_else(|| panic!("HEAD {target}: no head: {raw:?}"));
        let (head, rest) = raw.split_at(end);
        assert_eq!(gw::status_of(head), status, "HEAD {target}");
        let r = parse_responses(rest);
        assert_eq!(
            r.len(),
            1,
            "HEAD {target}: then exactly the GET's answer: {:?}",
            String::from_utf8_lossy(rest)
        );
        assert_eq!(r[0].status, 200, "HEAD {target}");
        assert_eq!(r[0].body, br#"{"status":"ok"}"#);
    }
}

/// A head trickled in one byte at a time still has to be complete within the header timeout
/// (slowloris): the head below never completes, so only the server's timer can end the test.
#[test]
fn a_trickled_head_is_408() {
    let g = start(Options::new(1).args(&["--header-read-timeout", "300ms"]));
    let mut s = g.connect();
    let mut reader = s.try_clone().expect("clone");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader_done = done.clone();
    let t = std::thread::spawn(move || {
        let raw = read_until_closed(&mut reader);
        reader_done.store(true, std::sync::atomic::Ordering::Release);
        raw
    });
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: gw\r\nx-slow: ")
        .expect("write");
    // Pacing only (the byte rate), not synchronisation: the loop ends when the server closes.
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        if s.write_all(b"a").is_err() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let raw = t.join().expect("reader");
    let r = parse_responses(&raw);
    assert_eq!(r.len(), 1);
    assert_raw_error("trickle", &r[0], 408, "REQUEST_TIMEOUT");
}

/// A client that half-closes after sending (`nc`, `curl --no-keepalive` on some systems) still
/// gets every answer before the server closes.
#[test]
fn a_half_closed_client_gets_its_answers() {
    let g = start(Options::new(1));
    let mut s = g.connect();
    let mut all = echo_request("half", b"one");
    all.extend(echo_request("half", b"two"));
    s.write_all(&all).expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let r = parse_responses(&read_until_closed(&mut s));
    let bodies: Vec<&[u8]> = r.iter().map(|r| r.body.as_slice()).collect();
    assert_eq!(bodies, [&b"one"[..], b"two"]);
}

#[test]
fn request_targets() {
    let g = start(Options::new(1));
    let cases: [(&str, &[u8], u16); 9] = [
        ("leading empty line", b"\r\nGET /livez HTTP/1.1\r\n", 200),
        ("query", b"GET /livez?probe=1&x HTTP/1.1\r\n", 200),
        (
            "query on a lookup",
            b"GET /v1/users/q/worker?x=y HTTP/1.1\r\n",
            200,
        ),
        ("absolute-form", b"GET http://gw/livez HTTP/1.1\r\n", 400),
        ("asterisk-form", b"OPTIONS * HTTP/1.1\r\n", 400),
        ("authority-form", b"CONNECT gw:80 HTTP/1.1\r\n", 400),
        ("fragment", b"GET /livez#top HTTP/1.1\r\n", 400),
        ("relative", b"GET livez HTTP/1.1\r\n", 400),
        ("lower-case method", b"get /livez HTTP/1.1\r\n", 405),
    ];
    for (what, line, status) in cases {
        let mut req = line.to_vec();
        req.extend_from_slice(b"Host: gw\r\nConnection: close\r\n\r\n");
        let r = parse_responses(&g.raw_closed(&req));
        assert_eq!(r.len(), 1, "{what}");
        match status {
            200 => assert_eq!(
                r[0].status,
                200,
                "{what}: {}",
                String::from_utf8_lossy(&r[0].body)
            ),
            400 => {
                assert_raw_error(what, &r[0], 400, "BAD_REQUEST");
            }
            _ => {
                assert_raw_error(what, &r[0], status, "METHOD_NOT_ALLOWED");
            }
        }
    }
    // HTTP/1.1 needs exactly one Host.
    let r = parse_responses(&g.raw_closed(b"GET /livez HTTP/1.1\r\nConnection: close\r\n\r\n"));
    assert_eq!(r.len(), 1);
    assert_raw_error("no Host", &r[0], 400, "BAD_REQUEST");
}

/// More pipelined requests for one user than the connection prepares at once and than the
/// worker admits concurrently: all answered, in order, none waiting for a timeout.
#[test]
fn deep_pipelines_for_one_user() {
    let g = start(Options::new(1));
    let mut all = Vec::new();
    for i in 0..100 {
        all.extend(echo_request("deep", format!("{i}").as_bytes()));
    }
    // A GET with a body (ignored, but consumed) in the middle of it.
    all.extend(raw_request("GET", "/livez", &[], Some(b"ignored")));
    all.extend(echo_request("deep", b"last"));
    let mut s = g.connect();
    s.write_all(&all).expect("write");
    for i in 0..100 {
        let (status, _, body) = next_response(&format!("{i}"), &mut s);
        assert_eq!(status, 200, "{i}: {}", String::from_utf8_lossy(&body));
        assert_eq!(body, format!("{i}").as_bytes());
    }
    assert_eq!(next_response("livez", &mut s).0, 200);
    let (status, _, body) = next_response("last", &mut s);
    assert_eq!((status, body.as_slice()), (200, &b"last"[..]));
}

/// Beyond `--max-connections` per core: 503 with Retry-After, and the connection closed.
#[test]
fn too_many_connections_are_503() {
    let g = start(Options::new(1).args(&["--cores", "1", "--max-connections", "2"]));
    let livez = b"GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n";
    let mut open = Vec::new();
    for i in 0..2 {
        let mut s = g.connect();
        s.write_all(livez).expect("write");
        assert_eq!(next_response(&format!("connection {i}"), &mut s).0, 200);
        open.push(s);
    }
    let r = parse_responses(&g.raw_closed(livez));
    assert_eq!(r.len(), 1);
    let err = assert_raw_error("third connection", &r[0], 503, "TOO_MANY_CONNECTIONS");
    assert_eq!(err["retryable"], true);
    assert!(err["retryAfterMs"].is_u64(), "{err}");
    assert!(r[0].header("retry-after").is_some());
    // Once one closes, a new connection is served again (the server notices the close on its
    // own time: poll).
    drop(open.pop());
    gw::wait_until("a free connection slot", || {
        g.raw_closed(b"GET /livez HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            .starts_with(b"HTTP/1.1 200 ")
    });
}

/// Chunk extensions and tiny chunks inflate the bytes of a chunked body far beyond its decoded
/// size; they count against the body limit too, so the connection's buffer stays bounded.
#[test]
fn chunked_framing_overhead_counts_against_the_body_limit() {
    let g = start(Options::new(1));
    let mut s = g.connect();
    let mut reader = s.try_clone().expect("clone");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader_done = done.clone();
    let t = std::thread::spawn(move || {
        let raw = read_until_closed(&mut reader);
        reader_done.store(true, std::sync::atomic::Ordering::Release);
        raw
    });
    s.write_all(
        b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: pad\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .expect("write");
    // One body byte per 4 KiB of framing; 4 MiB of it (1 KiB of body) at most.
    let mut chunk = b"1;".to_vec();
    chunk.extend(std::iter::repeat_n(b'e', 4000));
    chunk.extend_from_slice(b"\r\nX\r\n");
    for _ in 0..1000 {
        if done.load(std::sync::atomic::Ordering::Acquire) || s.write_all(&chunk).is_err() {
            break;
        }
    }
    let r = parse_responses(&t.join().expect("reader"));
    assert_eq!(r.len(), 1);
    assert_raw_error("padded chunks", &r[0], 413, "BODY_TOO_LARGE");
}

/// The header and body timeouts measure the client, not the server: a partial request
/// pipelined behind a slow one is not timed out while the server is still answering the slow
/// one. (The slow request sleeps 1 s, over three times the 300 ms timeout.)
#[test]
fn time_spent_answering_does_not_count_against_the_next_request() {
    let g = start(Options::new(1).args(&["--header-read-timeout", "300ms"]));
    let slow =
        json!({"type": "test", "userId": "patient", "payload": {"action": "slow", "ms": 1000}})
            .to_string();
    for (what, partial, rest) in [
        (
            "partial body",
            &b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: patient\r\nContent-Length: 10\r\n\r\nhello"[..],
            &b"world"[..],
        ),
        (
            "partial head",
            b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nx-moltbot-user: pat",
            b"ient\r\nContent-Length: 10\r\n\r\nhelloworld",
        ),
    ] {
        let mut s = g.connect();
        let mut bytes = raw_request("POST", "/v1/route", &[], Some(slow.as_bytes()));
        bytes.extend_from_slice(partial);
        s.write_all(&bytes).expect("write");
        let (status, _, body) = next_response(what, &mut s);
        assert_eq!(status, 200, "{what}: {}", String::from_utf8_lossy(&body));
        // Only now, with the slow answer read, the rest is sent.
        s.write_all(rest).expect("write");
        let (status, _, body) = next_response(what, &mut s);
        assert_eq!(status, 200, "{what}: {}", String::from_utf8_lossy(&body));
        assert_eq!(body, b"helloworld", "{what}");
    }
}

// ---------------------------------------------------------------------------------------------
// Worker-side failures: 502, 503, 504
// ---------------------------------------------------------------------------------------------

/// A long test `slow` request, pipelined on its own connection; returns the connection so it
/// stays open.
fn start_slow_request(g: &GatewayProc, user: &str) -> TcpStream {
    let slow =
        json!({"type": "test", "userId": user, "payload": {"action": "slow", "ms": 600_000}})
            .to_string();
    let mut s = g.connect();
    s.write_all(&raw_request(
        "POST",
        "/v1/route",
        &[],
        Some(slow.as_bytes()),
    ))
    .expect("write");
    s
}

#[test]
fn request_timeout_is_504() {
    // A stall timeout above the handler's sleep, so the worker is not replaced meanwhile.
    let g = start_overriding(
        Options::new(1),
        &[("--request-timeout", "300ms"), ("--stall-timeout", "20min")],
    );
    let slow = json!({"action": "slow", "ms": 600_000});
    let r = route(&g, "test", "late", slow);
    assert_eq!(r.status, 504, "{}", r.text());
    let v = route_shape("route", &r, 1, false);
    assert_eq!(v["errorCode"], "TIMEOUT", "{v}");
    assert_eq!(v["retryable"], true, "{v}");
    // The worker is still asleep: a request behind it times out too, in the error shape.
    let r = g.request(
        "POST",
        "/v1/echo",
        &[("x-moltbot-user", "late")],
        Some(b"x"),
    );
    let err = assert_http_error("echo", &r, 504, "TIMEOUT");
    assert_eq!(err["retryable"], true);
    worker_header("echo", &r, 1);
}

#[test]
fn a_request_waiting_in_the_admission_queue_times_out_with_504() {
    // One place per worker, held by a request the worker sleeps on: the next request waits in
    // the admission queue, where only its deadline can end the wait.
    let g = start_overriding(
        Options::new(1).env("MOLTBOT_MAX_CONCURRENT", "1"),
        &[("--request-timeout", "3s"), ("--stall-timeout", "20min")],
    );
    let _slow = start_slow_request(&g, "busy");
    gw::wait_until("the slow request to be admitted", || {
        g.status()["workers"][0]["activeRequests"] == 1
    });
    let mut queued = g.connect();
    queued
        .write_all(&raw_request(
            "POST",
            "/v1/echo",
            &[("x-moltbot-user", b"busy")],
            Some(b"x"),
        ))
        .expect("write");
    gw::wait_until("the second request to queue", || {
        g.status()["workers"][0]["queuedRequests"] == 1
    });
    let (status, _, body) = read_response(&mut queued).expect("an answer");
    let err = assert_error("queued echo", status, &body, 504, "TIMEOUT");
    assert_eq!(err["retryable"], true);
    assert_eq!(g.status()["workers"][0]["queuedRequests"], 0);
    // The connection is still served.
    queued
        .write_all(&raw_request("GET", "/healthz", &[], None))
        .expect("write");
    assert_eq!(read_response(&mut queued).expect("an answer").0, 200);
}

#[test]
fn a_full_queue_is_503() {
    let g = start_overriding(
        Options::new(1)
            .env("MOLTBOT_MAX_CONCURRENT", "1")
            .env("MOLTBOT_MAX_QUEUE", "0"),
        &[("--stall-timeout", "20min")],
    );
    let _slow = start_slow_request(&g, "busy");
    gw::wait_until("the slow request to be admitted", || {
        g.status()["workers"][0]["activeRequests"] == 1
    });
    let r = g.request(
        "POST",
        "/v1/echo",
        &[("x-moltbot-user", "busy")],
        Some(b"x"),
    );
    let err = assert_http_error("echo", &r, 503, "UNAVAILABLE");
    assert_eq!(err["retryable"], true);
    assert!(
        err["retryAfterMs"].as_u64().is_some_and(|ms| ms > 0),
        "{err}"
    );
    assert!(
        r.header("retry-after")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|s| s >= 1),
        "{:?}",
        r.headers
    );
    worker_header("echo", &r, 1);
    let r = route(&g, "echo", "busy", json!(1));
    assert_eq!(r.status, 503);
    let v = route_shape("route", &r, 1, false);
    assert_eq!(v["errorCode"], "UNAVAILABLE", "{v}");
    assert!(r.header("retry-after").is_some());
}

#[test]
fn new_users_beyond_max_users_are_503_and_known_users_keep_working() {
    let g = start(Options::new(2).args(&["--max-users", "3"]));
    let known: Vec<String> = (0..3).map(|i| format!("known-{i}")).collect();
    for u in &known {
        let r = g.request("POST", "/v1/echo", &[("x-moltbot-user", u)], Some(b"x"));
        assert_eq!(r.status, 200, "{u}: {}", r.text());
    }
    let r = g.request(
        "POST",
        "/v1/echo",
        &[("x-moltbot-user", "one-too-many")],
        Some(b"x"),
    );
    let err = assert_http_error("echo", &r, 503, "USER_LIMIT");
    assert_eq!(err["retryable"], false, "{err}");
    assert!(r.header("retry-after").is_none(), "{:?}", r.headers);
    let r = route(&g, "echo", "another-one", json!(1));
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("USER_LIMIT"), "{}", r.text());
    // Nothing was assigned; known users are served; a lookup still answers.
    assert_eq!(g.status()["routingTableSize"], 3);
    for u in &known {
        let r = route(&g, "echo", u, json!(u));
        route_shape(u, &r, 2, true);
    }
    assert_eq!(lookup(&g, "one-too-many")["assigned"], false);
}

#[test]
fn a_worker_crash_mid_request_is_502_then_it_recovers() {
    let g = start(Options::new(2));
    let r = g.request(
        "POST",
        "/v1/echo",
        &[("x-moltbot-user", "crashy")],
        Some(b"x"),
    );
    let w = worker_header("before", &r, 2);
    let r = route(&g, "test", "crashy", json!({"action": "crash"}));
    assert_eq!(r.status, 502, "{}", r.text());
    let v = route_shape("crash", &r, 2, false);
    assert_eq!(v["errorCode"], "WORKER_CRASHED", "{v}");
    assert_eq!(v["retryable"], true, "{v}");
    assert_eq!(v["workerId"], w.as_str());
    let slot: usize = w["worker-".len()..].parse().expect("slot");
    gw::wait_until("the worker to be respawned", || {
        let s = g.status();
        s["workers"][slot]["restarts"].as_u64() >= Some(1) && s["workers"][slot]["state"] == "ready"
    });
    let r = g.request(
        "POST",
        "/v1/echo",
        &[("x-moltbot-user", "crashy")],
        Some(b"again"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, b"again");
    assert_eq!(
        worker_header("after", &r, 2),
        w,
        "the user stays on its slot"
    );
}

// ---------------------------------------------------------------------------------------------
// Start-up refusals
// ---------------------------------------------------------------------------------------------

#[test]
fn non_loopback_bind_without_a_token_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("workers");
    let base = base.to_str().expect("utf-8 path");
    let (status, stderr) = run_moltbot(
        &[
            "gateway", "--bind", "0.0.0.0", "-p", "0", "-w", "1", "-s", base,
        ],
        &[],
    );
    assert!(!status.success(), "{status}: {stderr}");
    assert!(stderr.contains("token"), "{stderr}");
    assert!(stderr.contains("MOLTBOT_GATEWAY_TOKEN"), "{stderr}");
    assert!(
        !dir.path().join("workers").join("gateway.port").exists(),
        "it never listened"
    );
}

#[test]
fn a_busy_port_is_refused_with_a_hint() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("workers");
    let base = base.to_str().expect("utf-8 path");
    let commands: [&[&str]; 2] = [
        &["gateway", "-p", &port, "-w", "1", "-s", base],
        &[
            "workers", "demo", "-p", &port, "-w", "1", "-s", base, "-t", "1",
        ],
    ];
    for args in commands {
        let (status, stderr) = run_moltbot(args, &[]);
        assert!(!status.success(), "{args:?}: {status}: {stderr}");
        assert!(stderr.contains(&port), "{args:?}: names the port: {stderr}");
        assert!(stderr.contains("in use"), "{args:?}: {stderr}");
        assert!(stderr.contains("-p 0"), "{args:?}: suggests -p 0: {stderr}");
    }
    drop(busy);
}

/// Large answers (written head first, then the body straight from the worker's frame) come
/// back exact, also pipelined behind and ahead of small ones on one keep-alive connection.
#[test]
fn large_echo_bodies_come_back_exact_and_in_order() {
    let g = start(Options::new(1));
    let big: Vec<u8> = (0..60 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let r = g.request("POST", "/v1/echo", &[("x-moltbot-user", "big")], Some(&big));
    assert_eq!(r.status, 200);
    assert_eq!(r.body, big);
    assert_eq!(r.header("x-moltbot-worker"), Some("worker-0"));
    let mut s = g.connect();
    let mut wire = Vec::new();
    for body in [&b"small-1"[..], &big[..], &b"small-2"[..], &big[..20_000]] {
        wire.extend_from_slice(&echo_request("big", body));
    }
    s.write_all(&wire).unwrap();
    for body in [&b"small-1"[..], &big[..], &b"small-2"[..], &big[..20_000]] {
        let (status, headers, got) = gw::read_response(&mut s).expect("answer");
        assert_eq!(status, 200);
        assert_eq!(
            gw::header_of(&headers, "x-moltbot-worker"),
            Some("worker-0")
        );
        assert_eq!(got.len(), body.len());
        assert!(got == body);
    }
}

/// Runs `moltbot <args>` and returns (exit code, stdout, stderr).
fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_moltbot"));
    cmd.args(args).env_remove("MOLTBOT_GATEWAY_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run moltbot");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `moltbot workers status` and `moltbot workers route` talk to a running gateway (the
/// TypeScript version left them as placeholders), in both formats, with its token.
#[test]
fn cli_status_and_route_talk_to_a_running_gateway() {
    let g = start(Options::new(3).env("MOLTBOT_GATEWAY_TOKEN", "tok"));
    let url = g.url();
    let auth = [("MOLTBOT_GATEWAY_TOKEN", "tok")];
    // Assign user-a through a real request.
    let r = g.request(
        "POST",
        "/v1/echo",
        &[
            ("x-moltbot-user", "user-a"),
            ("authorization", "Bearer tok"),
        ],
        Some(b"x"),
    );
    assert_eq!(r.status, 200);
    let worker = r.header("x-moltbot-worker").expect("worker").to_string();

    let (code, out, err) = cli(&["workers", "status", "--gateway", &url], &auth);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 workers"), "{out}");
    for w in ["worker-0", "worker-1", "worker-2"] {
        assert!(out.contains(w), "{out}");
    }
    let (code, out, err) = cli(
        &["workers", "status", "--gateway", &url, "--format", "json"],
        &auth,
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(v["totalWorkers"], 3);
    assert_eq!(v["routingTableSize"], 1);

    let (code, out, err) = cli(&["workers", "route", "user-a", "--gateway", &url], &auth);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("user-a → {worker} (assigned)")),
        "{out}"
    );
    let (code, out, _) = cli(
        &[
            "workers",
            "route",
            "nobody-yet",
            "--gateway",
            &url,
            "--format",
            "json",
        ],
        &auth,
    );
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("route JSON");
    assert_eq!(v["assigned"], false);

    // Without the token: a clear failure, not a crash.
    let (code, _, err) = cli(&["workers", "status", "--gateway", &url], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("401") || err.contains("token"), "{err}");
    // No gateway there: a clear failure.
    let (code, _, err) = cli(
        &["workers", "status", "--gateway", "http://127.0.0.1:9"],
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("no gateway") || err.contains("refused"),
        "{err}"
    );
}

/// Stores a session of `kib` KiB for `user`; returns the raw request that reads it back.
fn big_session(g: &GatewayProc, user: &str, kib: usize) -> (Vec<u8>, usize) {
    let big = serde_json::to_vec(&"v".repeat(kib * 1024)).expect("JSON");
    let r = g.request(
        "PUT",
        "/v1/sessions/big",
        &[("x-moltbot-user", user)],
        Some(&big),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let get = raw_request(
        "GET",
        "/v1/sessions/big",
        &[("x-moltbot-user", user.as_bytes())],
        None,
    );
    (get, big.len())
}

/// HTTP requests in flight on `g`, not counting the one that asks.
fn in_flight(g: &GatewayProc) -> f64 {
    let text = g.request("GET", "/metrics", &[], None).text();
    metric(&text, "moltbot_http_requests_in_flight", &[]).expect("in-flight gauge") - 1.0
}

/// Pipelined requests whose client goes away while an earlier answer is being written get no
/// answer; they still end, so `moltbot_http_requests_in_flight` comes back down.
#[test]
fn requests_behind_an_answer_the_client_reset_still_end() {
    let g = start_overriding(
        Options::new(1),
        &[("--max-body-bytes", "1MiB"), ("--ring-capacity", "4MiB")],
    );
    let (get, _) = big_session(&g, "leaver", 900);
    let mut s = g.connect();
    // 20 answers of 900 KiB: more than the sockets hold, so the gateway is still writing the
    // first ones, with the others waiting, when the client goes.
    s.write_all(&get.repeat(20)).expect("write");
    gw::wait_until("the pipelined requests in flight", || in_flight(&g) >= 10.0);
    rustix::net::sockopt::set_socket_linger(&s, Some(std::time::Duration::ZERO)).expect("linger");
    drop(s);
    gw::wait_until("every request ended", || in_flight(&g) == 0.0);
}

/// A client that pipelines requests for large answers and reads none is disconnected once
/// more than the connection's limit of answers (16 MiB here) waits for it and none is taken
/// for a second, long before the idle timeout; a client that pipelines the same requests and
/// reads gets every answer.
#[test]
fn a_client_that_lets_pipelined_answers_pile_up_is_disconnected() {
    let g = start_overriding(
        Options::new(1).args(&["--idle-timeout", "10m"]),
        &[("--max-body-bytes", "2MiB"), ("--ring-capacity", "8MiB")],
    );
    let (get, len) = big_session(&g, "hoarder", 1900);
    // 32 answers of 1.9 MiB: 60 MiB, far more than the sockets take.
    let mut hoarder = g.connect();
    hoarder.write_all(&get.repeat(32)).expect("write");
    gw::wait_until("the hoarder's requests in flight", || in_flight(&g) >= 1.0);
    gw::wait_until("the hoarder disconnected", || in_flight(&g) == 0.0);
    drop(hoarder);

    let mut reader = g.connect();
    reader.write_all(&get.repeat(32)).expect("write");
    for i in 0..32 {
        let (status, _, body) = read_response(&mut reader).unwrap_or_else(|| panic!("answer {i}"));
        assert_eq!((status, body.len()), (200, len), "answer {i}");
    }
}
