//! Streaming through real gateways: a run's events over WebSocket reach every connection of its
//! user on any core and no other user's; HTTP clients get the same events as Server-Sent
//! Events; a worker that dies mid-run answers the run `UNAVAILABLE`/`WORKER_CRASHED` and the
//! next request is served by its successor; a worker that sends events it may not send is
//! killed; SIGTERM announces `shutdown`, answers the runs in flight, then closes with 1012.

mod gw;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use gw::{DEADLINE, GatewayProc, Options};
use serde_json::{Value, json};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// A WebSocket client of the OpenClaw protocol, connected and past `hello-ok`.
struct Ws {
    ws: WebSocket<TcpStream>,
    hello: Value,
    /// Frames read while looking for another.
    seen: Vec<Value>,
}

impl Ws {
    /// Connects to `gw` as `user` (named in the URL: these gateways have no credentials).
    fn connect(gw: &GatewayProc, user: &str) -> Ws {
        let stream = TcpStream::connect(gw.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let url = format!("ws://{}/?user={user}", gw.addr);
        let (ws, _) = tungstenite::client(url.as_str(), stream).expect("upgrade");
        let mut c = Ws {
            ws,
            hello: Value::Null,
            seen: Vec::new(),
        };
        let challenge = c.next_frame();
        assert_eq!(challenge["event"], "connect.challenge", "{challenge}");
        c.send(
            json!({"type": "req", "id": "c1", "method": "connect", "params": {
                "minProtocol": 4, "maxProtocol": 4,
                "client": {"id": "test", "version": "1", "platform": "linux", "mode": "test"},
            }}),
        );
        let res = c.next_frame();
        assert_eq!(res["ok"], true, "{res}");
        c.hello = res["payload"].clone();
        c
    }

    /// The core the connection landed on (from `hello-ok`'s `connId`, `CORE-N`).
    fn core(&self) -> String {
        let id = self.hello["server"]["connId"].as_str().unwrap_or_default();
        id.split('-').next().unwrap_or_default().to_string()
    }

    fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    /// The next frame, waiting up to the deadline.
    fn next_frame(&mut self) -> Value {
        self.try_next(DEADLINE)
            .expect("a frame before the deadline")
    }

    /// The next text frame within `wait`, or `None`.
    fn try_next(&mut self, wait: Duration) -> Option<Value> {
        let until = Instant::now() + wait;
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).expect("JSON frame")),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= until {
                        return None;
                    }
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Reads frames (keeping them in `seen`) until one satisfies `pred`; returns it.
    fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            if let Some(f) = self.try_next(Duration::from_millis(200)) {
                if pred(&f) {
                    return f;
                }
                self.seen.push(f);
            }
        }
    }

    /// Reads until the server closes; returns the close code.
    fn close_code(&mut self) -> Option<CloseCode> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            assert!(Instant::now() < deadline, "timed out waiting for the close");
            match self.ws.read() {
                Ok(Message::Close(f)) => return f.map(|f| f.code),
                Ok(Message::Text(t)) => self.seen.push(serde_json::from_str(&t).unwrap()),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return None,
            }
        }
    }
}

fn agent_req(id: &str, run: &str, message: &str) -> Value {
    json!({"type": "req", "id": id, "method": "agent",
        "params": {"message": message, "idempotencyKey": run}})
}

fn is_res(id: &str) -> impl Fn(&Value) -> bool + '_ {
    move |f| f["type"] == "res" && f["id"] == id
}

/// The events of run `run` among `frames`.
fn events_of<'a>(frames: &'a [Value], run: &str) -> Vec<&'a Value> {
    frames
        .iter()
        .filter(|f| f["type"] == "event" && f["payload"]["runId"] == run)
        .collect()
}

#[test]
fn a_run_streams_to_every_connection_of_its_user_on_any_core_and_to_no_other_user() {
    let gw = GatewayProc::start(Options::new(2).args(&["--cores", "2"]));
    // Connections spread over the cores by the kernel: open some until both cores serve one.
    let mut alice: Vec<Ws> = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while !(alice.iter().any(|c| c.core() == "0") && alice.iter().any(|c| c.core() == "1")) {
        assert!(
            Instant::now() < deadline,
            "no connection reached the second core"
        );
        alice.push(Ws::connect(&gw, "alice"));
    }
    let first = alice.iter().position(|c| c.core() == "0").unwrap();
    let second = alice.iter().position(|c| c.core() == "1").unwrap();
    let bob = Ws::connect(&gw, "bob");

    let runner = &mut alice[first];
    runner.send(agent_req("r1", "run-shared", "one two three"));
    let accepted = runner.until("accepted", is_res("r1"));
    assert_eq!(accepted["ok"], true);
    assert_eq!(accepted["payload"]["runId"], "run-shared");
    assert_eq!(accepted["payload"]["status"], "accepted");
    let fin = runner.until("final", |f| {
        is_res("r1")(f) && f["payload"]["status"] == "ok"
    });
    assert_eq!(fin["payload"]["runId"], "run-shared");
    let mine = events_of(&runner.seen, "run-shared").len();
    assert!(mine >= 4, "events of the run: {:?}", runner.seen);
    // Contiguous seq on the connection.
    let seqs: Vec<u64> = runner
        .seen
        .iter()
        .filter_map(|f| f["seq"].as_u64())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    // The other connection of the same user, on the other core, sees the same events.
    let other = &mut alice[second];
    other.until("the run's end on the other core", |f| {
        f["event"] == "agent"
            && f["payload"]["runId"] == "run-shared"
            && f["payload"]["data"]["phase"] == "end"
    });
    let theirs = events_of(&other.seen, "run-shared").len() + 1;
    assert!(theirs >= mine - 1, "{theirs} of {mine}");
    // The assistant text arrives cumulatively, in more than one piece.
    let texts: Vec<&str> = other
        .seen
        .iter()
        .filter(|f| f["event"] == "agent" && f["payload"]["stream"] == "assistant")
        .filter_map(|f| f["payload"]["data"]["text"].as_str())
        .collect();
    assert!(texts.len() >= 2, "{texts:?}");
    assert!(
        texts.windows(2).all(|w| w[1].starts_with(w[0])),
        "{texts:?}"
    );
    // No answer frame of the run reached the other connection: answers go to the requester.
    assert!(!other.seen.iter().any(|f| f["type"] == "res"));

    // /status counts the authenticated connections and their users.
    let ws = &gw.status()["gateway"]["websocket"];
    assert_eq!(ws["connections"], alice.len() + 1, "{ws}");
    assert_eq!(ws["users"], 2, "{ws}");
    let mut bob = bob;
    // Bob sees nothing of it (his own request proves his connection works meanwhile).
    bob.send(json!({"type": "req", "id": "h", "method": "health"}));
    let h = bob.until("bob's health", is_res("h"));
    assert_eq!(h["ok"], true);
    assert!(
        events_of(&bob.seen, "run-shared").is_empty(),
        "another user's events reached bob: {:?}",
        bob.seen
    );
}

/// Sends `POST /v1/agent` for Server-Sent Events in `version` with `connection` and reads
/// until the gateway closes: the response head and the body as sent.
fn sse_request(gw: &GatewayProc, version: &str, connection: &str) -> (String, String) {
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let body = br#"{"message":"alpha beta gamma"}"#;
    let req = format!(
        "POST /v1/agent {version}\r\nhost: t\r\nx-moltbot-user: sse-user\r\naccept: text/event-stream\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n",
        body.len()
    );
    std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
    std::io::Write::write_all(&mut s, body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

/// The events of a Server-Sent Events stream, checked to end with the run's `result`, which
/// came in at least two `agent` pieces.
fn assert_run_events(stream: &str) {
    let events: Vec<(&str, Value)> = stream
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let mut name = "";
            let mut data = String::new();
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n;
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (name, serde_json::from_str(&data).expect("JSON data"))
        })
        .collect();
    let (last, result) = events.last().unwrap();
    assert_eq!(*last, "result");
    assert_eq!(result["reply"], "echo: alpha beta gamma");
    let pieces = events
        .iter()
        .filter(|(n, v)| *n == "agent" && v["stream"] == "assistant")
        .count();
    assert!(pieces >= 2, "{events:?}");
}

#[test]
fn http_clients_get_the_run_as_server_sent_events() {
    let gw = GatewayProc::start(Options::new(1));
    let (head, chunked) = sse_request(&gw, "HTTP/1.1", "close");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    // De-chunk.
    let mut stream = String::new();
    let mut rest = chunked.as_str();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size, 16).unwrap();
        if n == 0 {
            break;
        }
        stream.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    assert_run_events(&stream);

    // Without the header the answer is the plain JSON reply, as before.
    let r = gw.request(
        "POST",
        "/v1/agent",
        &[("x-moltbot-user", "sse-user")],
        Some(br#"{"message":"plain"}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json::<Value>().unwrap()["reply"], "echo: plain");
}

/// HTTP/1.0 has no chunked encoding: an HTTP/1.0 client gets the events as they are, the end
/// of the stream marked by the close, even if it asked to keep the connection.
#[test]
fn http_1_0_clients_get_the_events_ended_by_the_close() {
    let gw = GatewayProc::start(Options::new(1));
    for connection in ["keep-alive", "close"] {
        let (head, stream) = sse_request(&gw, "HTTP/1.0", connection);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("content-type: text/event-stream"), "{head}");
        assert!(!head.contains("transfer-encoding"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert_run_events(&stream);
    }
}

#[test]
fn sigterm_announces_shutdown_answers_the_run_in_flight_then_closes_with_1012() {
    let mut gw = GatewayProc::start(Options::new(1));
    let mut c = Ws::connect(&gw, "stopper");
    c.send(json!({"type": "req", "id": "slow", "method": "test.slow", "params": {"ms": 1500}}));
    let accepted = c.until("accepted", is_res("slow"));
    assert_eq!(accepted["payload"]["status"], "accepted", "{accepted}");
    gw.signal(rustix::process::Signal::TERM);
    let shutdown = c.until("shutdown", |f| f["event"] == "shutdown");
    assert_eq!(shutdown["payload"]["reason"], "gateway stopping");
    // The run in flight is still answered, then the connection closes.
    let fin = c.until("the slow run's answer", is_res("slow"));
    assert_eq!(fin["ok"], true, "{fin}");
    assert_eq!(fin["payload"]["sleptMs"], 1500);
    assert_eq!(c.close_code(), Some(CloseCode::Restart));
    let status = gw.wait();
    assert!(status.success(), "{status}");
}

#[test]
fn a_worker_that_dies_mid_run_answers_it_worker_crashed_and_its_successor_serves_the_next() {
    let gw = GatewayProc::start(Options::new(1));
    let mut c = Ws::connect(&gw, "crasher");
    c.send(json!({"type": "req", "id": "h1", "method": "health"}));
    let before = c.until("health", is_res("h1"))["payload"]["pid"].clone();
    c.send(json!({"type": "req", "id": "boom", "method": "test.stream-then-crash"}));
    let accepted = c.until("accepted", is_res("boom"));
    assert_eq!(accepted["ok"], true);
    let fin = c.until("the crashed run's answer", is_res("boom"));
    assert_eq!(fin["ok"], false, "{fin}");
    assert_eq!(fin["error"]["code"], "UNAVAILABLE", "{fin}");
    assert_eq!(fin["error"]["details"]["code"], "WORKER_CRASHED", "{fin}");
    // The event sent before the crash arrived first.
    assert!(c.seen.iter().any(|f| f["event"] == "agent"), "{:?}", c.seen);
    // Same connection, next request: the successor answers.
    c.send(json!({"type": "req", "id": "h2", "method": "health"}));
    let after = c.until("health from the successor", is_res("h2"));
    assert_eq!(after["ok"], true, "{after}");
    assert_ne!(after["payload"]["pid"], before, "a new worker process");
}

#[test]
fn unknown_methods_and_bad_params_get_the_protocols_errors_and_the_connection_stays() {
    let gw = GatewayProc::start(Options::new(1));
    let mut c = Ws::connect(&gw, "erring");
    c.send(json!({"type": "req", "id": "u", "method": "no.such.method"}));
    let r = c.until("unknown method", is_res("u"));
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "INVALID_REQUEST");
    c.send(json!({"type": "req", "id": "a", "method": "agent", "params": {"message": "x"}}));
    let r = c.until("agent without idempotencyKey", is_res("a"));
    assert_eq!(r["error"]["code"], "INVALID_REQUEST", "{r}");
    c.send(json!({"type": "req", "id": "h", "method": "health"}));
    let r = c.until("health", is_res("h"));
    assert_eq!(r["ok"], true);
}

#[test]
fn a_worker_sending_events_it_may_not_send_is_killed_and_replaced() {
    let gw = GatewayProc::start(Options::new(1));
    for action in ["event-unknown-id", "event-no-stream"] {
        let before = gw.worker_pids()[0];
        let body = json!({"type": "test", "userId": "eve", "payload": {"action": action}});
        let r = gw.request("POST", "/v1/route", &[], Some(body.to_string().as_bytes()));
        // The worker is killed for the violation: the request it had taken is answered as lost.
        assert_eq!(r.status, 502, "{action}: {}", r.text());
        assert_eq!(
            r.json::<Value>().unwrap()["errorCode"],
            "WORKER_CRASHED",
            "{action}"
        );
        gw::wait_until("a successor", || {
            let now = gw.worker_pids()[0];
            now.is_some() && now != before
        });
        let ok = gw.request(
            "POST",
            "/v1/route",
            &[],
            Some(br#"{"type":"health:check","userId":"eve","payload":{}}"#),
        );
        assert_eq!(ok.status, 200, "{action}: {}", ok.text());
    }
    let log = gw.log();
    assert!(log.contains("an event for an unknown request id"), "{log}");
    assert!(
        log.contains("an event for a request that does not stream"),
        "{log}"
    );
}
