//! The OpenClaw gateway protocol over WebSocket, against real gateways with a client we did not
//! write (`tungstenite`): the handshake and each way it is refused (the error answer, then the
//! close code), tenancy (which user a connection acts as), ticks, requests after `hello-ok`
//! (ids untouched, pipelining, garbage answered without closing), and the stop.

mod gw;
mod ws;

use gw::{GatewayProc, Options};
use serde_json::{Value, json};
use ws::{
    Closed, OPERATOR, Users, challenge, closed, connect_params, connect_with, expect_refused,
    hello, next_res, open, recv, req, send, send_text, serves_fresh_client, with_users,
};

/// A gateway without credentials (loopback): the upgrade names the user.
fn open_gateway() -> GatewayProc {
    GatewayProc::start(Options::new(1))
}

#[test]
fn handshake_gives_hello_ok_and_requests_reach_the_worker() {
    let g = open_gateway();
    let mut ws = open(&g, "/?user=alice", &[]);
    let nonce = challenge(&mut ws);
    // A v4 UUID: 8-4-4-4-12 hex digits.
    let parts: Vec<&str> = nonce.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [8, 4, 4, 4, 12]
    );
    assert!(nonce.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    send(&mut ws, &req("c1", "connect", Some(connect_params(None))));
    let res = next_res(&mut ws, "c1");
    assert_eq!(res["ok"], true, "{res}");
    let h = &res["payload"];
    assert_eq!(h["type"], "hello-ok");
    assert_eq!(h["protocol"], 4);
    assert!(
        !h["server"]["connId"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
    );
    let methods = h["features"]["methods"].as_array().expect("methods");
    assert!(methods.contains(&json!("health")), "{h}");
    assert!(
        h["features"]["events"]
            .as_array()
            .expect("events")
            .contains(&json!("tick"))
    );
    assert_eq!(
        h["policy"]["maxPayload"],
        64 * 1024,
        "the harness's --max-body-bytes"
    );
    assert_eq!(h["policy"]["tickIntervalMs"], 30_000);
    assert_eq!(h["auth"]["role"], "operator");
    assert!(h["snapshot"]["uptimeMs"].is_u64());

    send(&mut ws, &req("h1", "health", None));
    let res = next_res(&mut ws, "h1");
    assert_eq!(res["ok"], true, "{res}");
    assert_eq!(res["payload"]["ok"], true, "{res}");
    assert!(res["payload"]["workerId"].is_string(), "{res}");

    send(&mut ws, &req("u1", "no.such.method", Some(json!({}))));
    let res = next_res(&mut ws, "u1");
    assert_eq!(res["ok"], false, "{res}");
    assert_eq!(res["error"]["code"], "INVALID_REQUEST", "{res}");
    assert!(
        res["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no.such.method")),
        "{res}"
    );
    // A protocol 3 node is accepted too (the legacy version, for nodes only).
    let mut node = open(&g, "/?user=alice", &[]);
    let mut p = connect_params(None);
    p["minProtocol"] = json!(3);
    p["maxProtocol"] = json!(3);
    p["role"] = json!("node");
    let res = connect_with(&mut node, p);
    assert_eq!(res["payload"]["protocol"], 3, "{res}");
}

#[test]
fn each_refused_connect_is_answered_then_closed_with_its_code() {
    let users = Users::new();
    let alice = users.add("alice");
    let g = with_users(&users, Options::new(1));
    let refuse = |params: Value, detail: Option<&str>, code: u16| {
        let mut ws = open(&g, "/", &[]);
        expect_refused(&mut ws, params, detail, code)
    };
    // No token, a wrong one, only a credential this gateway does not take.
    refuse(connect_params(None), Some("AUTH_TOKEN_MISSING"), 1008);
    refuse(
        connect_params(Some("mbt_not-a-token")),
        Some("AUTH_TOKEN_MISMATCH"),
        1008,
    );
    let mut p = connect_params(None);
    p["auth"] = json!({"password": "hunter2"});
    refuse(p, Some("AUTH_UNAUTHORIZED"), 1008);
    // A protocol the gateway does not speak, with a good token: 1002.
    for (min, max) in [(5, 6), (1, 3), (3, 3)] {
        let mut p = connect_params(Some(&alice));
        p["minProtocol"] = json!(min);
        p["maxProtocol"] = json!(max);
        let res = refuse(p, Some("PROTOCOL_MISMATCH"), 1002);
        assert!(
            res["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("protocol")),
            "{res}"
        );
    }
    // A device identity that signed another nonce.
    let mut p = connect_params(Some(&alice));
    p["device"] = json!({"id": "d", "publicKey": "k", "signature": "s", "signedAt": 1,
        "nonce": "not-this-connections-nonce"});
    refuse(p, Some("DEVICE_AUTH_NONCE_MISMATCH"), 1008);
    // Params the schema refuses: no details code, 1008.
    for bad in [
        json!({"minProtocol": 4, "maxProtocol": 4}),
        json!({"minProtocol": 4, "maxProtocol": 4, "client": {"id": "nope", "version": "1",
            "platform": "p", "mode": "test"}, "auth": {"token": alice}}),
        json!({"minProtocol": 4, "maxProtocol": 4, "client": {"id": "test", "version": "1",
            "platform": "p", "mode": "test"}, "auth": {"token": alice}, "surprise": 1}),
        json!("a string"),
    ] {
        refuse(bad, None, 1008);
    }
    // Missing params altogether.
    let mut ws = open(&g, "/", &[]);
    challenge(&mut ws);
    send(&mut ws, &req("c9", "connect", None));
    let res = next_res(&mut ws, "c9");
    assert_eq!(res["error"]["code"], "INVALID_REQUEST", "{res}");
    assert_eq!(
        closed(&mut ws).0,
        Closed::Frame(1008, "connect refused".into())
    );

    // The device identity signing this connection's nonce is accepted.
    let mut ws = open(&g, "/", &[]);
    let nonce = challenge(&mut ws);
    let mut p = connect_params(Some(&alice));
    p["device"] = json!({"id": "d", "publicKey": "k", "signature": "s", "signedAt": 1,
        "nonce": nonce});
    send(&mut ws, &req("c1", "connect", Some(p)));
    assert_eq!(next_res(&mut ws, "c1")["ok"], true);
    serves_fresh_client(&g, Some(&alice), "alice");
}

#[test]
fn a_first_frame_that_is_not_connect_is_refused_with_1008() {
    let g = open_gateway();
    // A request before connect: answered with its own id, then closed.
    let mut ws = open(&g, "/?user=u", &[]);
    challenge(&mut ws);
    send(&mut ws, &req("early-1", "health", None));
    let res = next_res(&mut ws, "early-1");
    assert_eq!(res["ok"], false, "{res}");
    assert_eq!(res["error"]["code"], "INVALID_REQUEST", "{res}");
    assert_eq!(
        closed(&mut ws).0,
        Closed::Frame(1008, "invalid handshake".into())
    );
    // Not a request at all.
    for text in [
        "not json",
        "{}",
        r#"{"type":"event","event":"x"}"#,
        r#"{"type":"req","id":"","method":"connect"}"#,
    ] {
        let mut ws = open(&g, "/?user=u", &[]);
        challenge(&mut ws);
        send_text(&mut ws, text);
        let (how, frames) = closed(&mut ws);
        assert_eq!(
            how,
            Closed::Frame(1008, "invalid handshake".into()),
            "{text}"
        );
        assert_eq!(frames.len(), 1, "{text}: {frames:?}");
        assert_eq!(frames[0]["ok"], false, "{text}");
        assert_eq!(frames[0]["error"]["code"], "INVALID_REQUEST", "{text}");
    }
    // A binary first frame: 1003.
    let mut ws = open(&g, "/?user=u", &[]);
    challenge(&mut ws);
    ws.send(tungstenite::Message::binary(vec![1u8, 2, 3]))
        .expect("send");
    assert_eq!(closed(&mut ws).0.code(), Some(1003));
    serves_fresh_client(&g, None, "u");
}

#[test]
fn no_connect_within_the_timeout_closes_with_1008() {
    let g = GatewayProc::start(Options::new(1).args(&["--ws-connect-timeout", "300ms"]));
    let mut ws = open(&g, "/?user=u", &[]);
    challenge(&mut ws);
    // Pings do not count as a connect.
    ws.send(tungstenite::Message::Ping(b"x".to_vec().into()))
        .expect("ping");
    let (how, frames) = closed(&mut ws);
    assert_eq!(how, Closed::Frame(1008, "connect timeout".into()));
    assert!(frames.is_empty(), "{frames:?}");
    serves_fresh_client(&g, None, "u");
}

#[test]
fn tenancy_a_user_token_acts_for_its_own_user_only() {
    let users = Users::new();
    let alice = users.add("alice");
    users.add("bob");
    let g = with_users(&users, Options::new(1));
    // Alice's token naming bob, by header or by query: refused.
    for (target, headers) in [
        ("/", vec![("x-moltbot-user", "bob")]),
        ("/?user=bob", vec![]),
        ("/", vec![("x-moltbot-user", "Alice")]),
    ] {
        let mut ws = open(&g, target, &headers);
        expect_refused(
            &mut ws,
            connect_params(Some(&alice)),
            Some("AUTH_UNAUTHORIZED"),
            1008,
        );
    }
    // Her token naming herself, or nobody: she is served.
    let mut ws = open(&g, "/", &[("x-moltbot-user", "alice")]);
    hello(&mut ws, Some(&alice));
    let mut ws = open(&g, "/", &[]);
    hello(&mut ws, Some(&alice));
    send(&mut ws, &req("h", "health", None));
    assert_eq!(next_res(&mut ws, "h")["ok"], true);
    // The request went to alice's worker; bob was never routed anywhere.
    assert!(assigned(&g, "alice"));
    assert!(!assigned(&g, "bob"));
}

/// Whether `user` has a worker assigned (through the operator's view).
fn assigned(g: &GatewayProc, user: &str) -> bool {
    let auth = format!("Bearer {OPERATOR}");
    let r = g.request(
        "GET",
        &format!("/v1/users/{user}/worker"),
        &[("authorization", &auth)],
        None,
    );
    let v: Value = r.json().expect("JSON");
    assert_eq!(r.status, 200, "{v}");
    v["assigned"].as_bool().expect("assigned")
}

#[test]
fn tenancy_the_operator_token_acts_for_the_named_user() {
    let users = Users::new();
    users.add("alice");
    let g = with_users(&users, Options::new(1));
    let mut ws = open(&g, "/", &[("x-moltbot-user", "bob")]);
    hello(&mut ws, Some(OPERATOR));
    send(&mut ws, &req("h", "health", None));
    assert_eq!(next_res(&mut ws, "h")["ok"], true);
    assert!(assigned(&g, "bob"));
    let mut ws = open(&g, "/?user=carol", &[]);
    hello(&mut ws, Some(OPERATOR));
    send(&mut ws, &req("h", "health", None));
    assert_eq!(next_res(&mut ws, "h")["ok"], true);
    assert!(assigned(&g, "carol"));
    assert!(!assigned(&g, "alice"));
    // The operator naming nobody, or no valid user id: refused (bad params, 1008).
    let too_long = format!("/?user={}", "u".repeat(129));
    for target in ["/", "/?user=", "/?user=%FF", too_long.as_str()] {
        let mut ws = open(&g, target, &[]);
        let res = expect_refused(&mut ws, connect_params(Some(OPERATOR)), None, 1008);
        assert!(
            res["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("user")),
            "{target}: {res}"
        );
    }
}

#[test]
fn tenancy_a_gateway_without_credentials_takes_the_user_from_header_or_query() {
    let g = open_gateway();
    let mut by_header = open(&g, "/", &[("x-moltbot-user", "hdr-user")]);
    hello(&mut by_header, None);
    send(&mut by_header, &req("h", "health", None));
    assert_eq!(next_res(&mut by_header, "h")["ok"], true);
    let mut by_query = open(&g, "/?x=1&user=q%20user", &[]);
    hello(&mut by_query, None);
    send(&mut by_query, &req("h", "health", None));
    assert_eq!(next_res(&mut by_query, "h")["ok"], true);
    let lookup = |u: &str| -> Value {
        g.request("GET", &format!("/v1/users/{u}/worker"), &[], None)
            .json()
            .expect("JSON")
    };
    assert_eq!(lookup("hdr-user")["assigned"], true);
    assert_eq!(lookup("q%20user")["assigned"], true, "percent-decoded");
    // Nobody named: refused.
    let mut ws = open(&g, "/", &[]);
    expect_refused(&mut ws, connect_params(None), None, 1008);
}

#[test]
fn ticks_come_with_contiguous_seq() {
    let g = GatewayProc::start(Options::new(1).args(&["--ws-tick-interval", "200ms"]));
    let mut ws = open(&g, "/?user=t", &[]);
    let h = hello(&mut ws, None);
    assert_eq!(h["policy"]["tickIntervalMs"], 200);
    let mut seqs = Vec::new();
    let mut answered = 0;
    while seqs.len() < 6 {
        // A request between ticks: answers carry no seq and leave no gap.
        if seqs.len() == 3 && answered == 0 {
            send(&mut ws, &req("mid", "health", None));
        }
        let f = recv(&mut ws);
        match f["type"].as_str() {
            Some("event") => {
                assert_eq!(f["event"], "tick", "{f}");
                assert!(f["payload"]["ts"].is_u64(), "{f}");
                seqs.push(f["seq"].as_u64().expect("seq"));
            }
            Some("res") => {
                assert!(f.get("seq").is_none(), "{f}");
                answered += 1;
            }
            _ => panic!("{f}"),
        }
    }
    assert_eq!(seqs, (1..=6).collect::<Vec<u64>>());
}

#[test]
fn request_ids_are_echoed_untouched() {
    let g = open_gateway();
    let mut ws = open(&g, "/?user=ids", &[]);
    hello(&mut ws, None);
    let long = "é".repeat(128); // 256 bytes: the longest id accepted
    let ids = [
        "1",
        "a\"b\\c",
        "ünïcødé 💥",
        "  spaced  ",
        "{\"json\":\"in an id\"}",
        "line\nbreak\ttab\u{0}nul",
        "</script>",
        long.as_str(),
    ];
    for id in ids {
        let params = json!({"nested": {"a": [1, 2.5, null, true]}, "s": id,
            "big": 123456789012345678901234567890u128 as f64});
        send(&mut ws, &req(id, "health", Some(params)));
        let res = next_res(&mut ws, id);
        assert_eq!(res["ok"], true, "{id:?}: {res}");
        // Unknown methods echo the method in their message, ids untouched in the answer.
        send(&mut ws, &req(id, "ünknown.méthod", None));
        let res = next_res(&mut ws, id);
        assert_eq!(res["error"]["code"], "INVALID_REQUEST", "{res}");
        assert!(
            res["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("ünknown.méthod")),
            "{res}"
        );
    }
    // Params are forwarded byte for byte: odd but valid JSON is accepted as it is.
    for params in [
        r#"{"n":123456789012345678901234567890}"#,
        r#"{"e":1e308,"neg":-0.0}"#,
        r#"  [ "spaces" ,  "\ud83d\udca5" ]  "#,
        "null",
    ] {
        send_text(
            &mut ws,
            &format!(r#"{{"type":"req","id":"p","method":"health","params":{params}}}"#),
        );
        assert_eq!(next_res(&mut ws, "p")["ok"], true, "{params}");
    }
    // An id one byte too long is refused (without its id: it is not one).
    let too_long = "x".repeat(257);
    send(&mut ws, &req(&too_long, "health", None));
    let res = next_res(&mut ws, "invalid");
    assert_eq!(res["error"]["code"], "INVALID_REQUEST", "{res}");
}

#[test]
fn pipelined_requests_are_all_answered_once() {
    let g = open_gateway();
    let mut ws = open(&g, "/?user=pipe", &[]);
    hello(&mut ws, None);
    // Within what one worker admits at once (10 in flight, 100 queued): beyond, requests are
    // refused with a retryable UNAVAILABLE, which is backpressure, not a lost answer.
    const N: usize = 100;
    for i in 0..N {
        let method = if i.is_multiple_of(5) {
            "nope"
        } else {
            "health"
        };
        ws.write(tungstenite::Message::text(
            req(&format!("r{i}"), method, None).to_string(),
        ))
        .expect("write");
    }
    ws.flush().expect("flush");
    let mut seen = [false; N];
    for _ in 0..N {
        let f = recv(&mut ws);
        assert_eq!(f["type"], "res", "{f}");
        let i: usize = f["id"]
            .as_str()
            .and_then(|s| s[1..].parse().ok())
            .expect("id");
        assert!(!seen[i], "answered twice: {f}");
        seen[i] = true;
        assert_eq!(f["ok"], !i.is_multiple_of(5), "{f}");
    }
    assert!(seen.iter().all(|s| *s));
}

#[test]
fn after_hello_a_second_connect_and_garbage_are_answered_and_the_connection_stays() {
    let g = open_gateway();
    let mut ws = open(&g, "/?user=g", &[]);
    hello(&mut ws, None);
    send(&mut ws, &req("c2", "connect", Some(connect_params(None))));
    let res = next_res(&mut ws, "c2");
    assert_eq!(res["ok"], false, "{res}");
    assert_eq!(res["error"]["code"], "INVALID_REQUEST", "{res}");
    for (text, id) in [
        ("not json at all", "invalid"),
        ("", "invalid"),
        ("[1,2,3]", "invalid"),
        ("{\"type\":\"req\",\"id\":\"g1\",\"method\":\"\"}", "g1"),
        (
            "{\"type\":\"req\",\"id\":\"g2\",\"method\":\"health\",\"x\":1}",
            "g2",
        ),
        (
            "{\"type\":\"event\",\"id\":\"g3\",\"event\":\"tick\"}",
            "g3",
        ),
        (
            "{\"type\":\"req\",\"id\":7,\"method\":\"health\"}",
            "invalid",
        ),
        (
            "{\"type\":\"req\",\"id\":\"g4\",\"method\":\"health\"",
            "invalid",
        ),
        (
            "{\"type\":\"req\",\"id\":\"g5\",\"method\":\"health\",\"params\":}",
            "invalid",
        ),
    ] {
        send_text(&mut ws, text);
        let res = next_res(&mut ws, id);
        assert_eq!(res["ok"], false, "{text}: {res}");
        assert_eq!(res["error"]["code"], "INVALID_REQUEST", "{text}: {res}");
    }
    send(&mut ws, &req("still", "health", None));
    assert_eq!(next_res(&mut ws, "still")["ok"], true);
}

#[test]
fn a_stop_sends_shutdown_then_closes_with_1012() {
    let mut g = GatewayProc::start(Options::new(1));
    let mut ws = open(&g, "/?user=s", &[]);
    hello(&mut ws, None);
    send(&mut ws, &req("before", "health", None));
    assert_eq!(next_res(&mut ws, "before")["ok"], true);
    g.signal(rustix::process::Signal::TERM);
    let (how, frames) = closed(&mut ws);
    assert_eq!(
        how,
        Closed::Frame(1012, "gateway stopping".into()),
        "{frames:?}"
    );
    let shutdown: Vec<&Value> = frames.iter().filter(|f| f["event"] != "tick").collect();
    assert_eq!(shutdown.len(), 1, "{frames:?}");
    assert_eq!(shutdown[0]["event"], "shutdown");
    assert_eq!(shutdown[0]["payload"]["reason"], "gateway stopping");
    assert!(g.wait().success());
}

/// A client that closes gets the close frame back (RFC 6455 §5.5.1), before `connect` and
/// after `hello-ok`: a socket closed without it is a connection that failed (a browser
/// reports 1006, `wasClean: false`).
#[test]
fn a_client_close_is_answered_with_a_close_frame() {
    use tungstenite::protocol::CloseFrame;
    use tungstenite::protocol::frame::coding::CloseCode;
    let g = open_gateway();
    for after_hello in [false, true] {
        let mut ws = open(&g, "/?user=bye", &[]);
        if after_hello {
            hello(&mut ws, None);
        } else {
            challenge(&mut ws);
        }
        ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .expect("close");
        let answer = loop {
            match ws.read() {
                Ok(tungstenite::Message::Close(f)) => break f,
                // A tick may come before the close.
                Ok(_) => {}
                Err(e) => panic!("no close frame (after hello: {after_hello}): {e}"),
            }
        };
        assert_eq!(
            answer.map(|f| u16::from(f.code)),
            Some(1000),
            "after hello: {after_hello}"
        );
        // Then the gateway closes the socket.
        match ws.read() {
            Err(tungstenite::Error::ConnectionClosed) => {}
            other => panic!("after the close (after hello: {after_hello}): {other:?}"),
        }
    }
    serves_fresh_client(&g, None, "bye");
}

/// An answer larger than the outbound bound (`--ws-max-buffered-bytes`, which bounds the
/// backlog of a client that does not read, not one frame) reaches a client that reads.
#[test]
fn an_answer_larger_than_the_outbound_bound_reaches_a_client_that_reads() {
    let g = GatewayProc::start_overriding(
        Options::new(1).args(&["--ws-max-buffered-bytes", "64KiB"]),
        &[("--ring-capacity", "1MiB"), ("--max-body-bytes", "512KiB")],
    );
    // A turn of about 300 KB in the user's session log (by HTTP), so that its history is one
    // answer of about 600 KB: the message and its echo.
    let message = "m".repeat(300 * 1000);
    let r = g.request(
        "POST",
        "/v1/agent",
        &[("x-moltbot-user", "large")],
        Some(message.as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let mut ws = open(&g, "/?user=large", &[]);
    hello(&mut ws, None);
    send(
        &mut ws,
        &req("h1", "chat.history", Some(json!({ "sessionKey": "main" }))),
    );
    let res = next_res(&mut ws, "h1");
    let head: String = res.to_string().chars().take(300).collect();
    assert_eq!(res["ok"], true, "{head}");
    let texts: Vec<usize> = res["payload"]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m.to_string().len())
        .collect();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(texts.iter().all(|&n| n > 300 * 1000), "{texts:?}");
    // The connection stays.
    send(&mut ws, &req("after", "health", None));
    assert_eq!(next_res(&mut ws, "after")["ok"], true);
}

#[test]
fn upgrades_that_cannot_be_served_get_an_http_answer() {
    let g = open_gateway();
    let upgrade = |target: &str, version: &str| {
        let raw = g.raw_closed(
            format!(
                "GET {target} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n\r\n"
            )
            .as_bytes(),
        );
        gw::status_of(&raw)
    };
    assert_eq!(upgrade("/elsewhere", "13"), 404);
    assert_eq!(upgrade("/", "8"), 426);
    let raw = g.raw_closed(
        b"GET / HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(gw::status_of(&raw), 400, "no key");
    serves_fresh_client(&g, None, "up");
}

/// The `moltbot_gateway_spinning_cores` gauge of `g`.
fn spinning_cores(g: &GatewayProc) -> f64 {
    let text = g.request("GET", "/metrics", &[], None).text();
    gw::metric(&text, "moltbot_gateway_spinning_cores", &[])
        .unwrap_or_else(|| panic!("no moltbot_gateway_spinning_cores in\n{text}"))
}

#[test]
fn a_core_spins_while_a_websocket_request_is_in_flight_and_sleeps_after() {
    // One core and as many workers as CPUs, placed anywhere: no CPU for a core of its own, so
    // it does not spin when idle; it spins while a request is in flight wherever a CPU is left
    // beside it. (Workers placed beside the core make it spin at all times: tests/placement.rs.)
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let agent = format!(
        "/usr/bin/python3 {}/tests/agents/faulty_agent.py",
        env!("CARGO_MANIFEST_DIR")
    );
    // The agent answers no health check while it sleeps: a stall timeout far beyond the sleep.
    let g = GatewayProc::start_overriding(
        Options::new(cpus).args(&[
            "--cores",
            "1",
            "--worker-placement",
            "any",
            "--worker-command",
            &agent,
        ]),
        &[("--stall-timeout", "60s")],
    );
    let while_in_flight = if cpus > 1 { 1.0 } else { 0.0 };
    assert_eq!(spinning_cores(&g), 0.0);

    let mut ws = open(&g, "/?user=alice", &[]);
    hello(&mut ws, None);
    // The agent answers after 5 s: long enough to scrape while it is in flight.
    send(
        &mut ws,
        &req("slow", "echo", Some(json!({"fault": "slow", "ms": 5000}))),
    );
    gw::wait_until("the core to spin while the request is in flight", || {
        spinning_cores(&g) == while_in_flight
    });
    let res = next_res(&mut ws, "slow");
    assert_eq!(res["ok"], true, "{res}");
    gw::wait_until("the core to stop spinning after the answer", || {
        spinning_cores(&g) == 0.0
    });
    // After a request answered at once it sleeps again too.
    send(&mut ws, &req("h", "health", None));
    assert_eq!(next_res(&mut ws, "h")["ok"], true);
    assert_eq!(spinning_cores(&g), 0.0);
}
