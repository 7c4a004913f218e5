//! Harness for gateway integration tests: a real `moltbot gateway` process on port 0 with its
//! own sandbox directory, plus HTTP clients: `ureq` (a client we did not write) for ordinary
//! requests, raw sockets where the bytes on the wire are the point.
#![allow(dead_code)] // Each test binary uses its own subset.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long any awaited condition may take (generous: a loaded 2-core machine).
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `cond` until it holds, panicking with `what` after [`DEADLINE`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A gateway process. Killed (SIGKILL) on drop if still running.
pub struct GatewayProc {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its sandbox base directory.
    pub base: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

/// Options of a test gateway.
pub struct Options {
    /// Worker slots.
    pub workers: usize,
    /// Extra command-line arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl Options {
    /// `workers` slots, nothing else.
    pub fn new(workers: usize) -> Options {
        Options {
            workers,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Adds arguments.
    pub fn args(mut self, a: &[&str]) -> Options {
        self.args.extend(a.iter().map(|s| s.to_string()));
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, k: &str, v: &str) -> Options {
        self.env.push((k.into(), v.into()));
        self
    }
}

impl GatewayProc {
    /// Starts a gateway with test timings; waits until it listens. (Test builds have the
    /// fault-injection handlers.)
    pub fn start(opts: Options) -> GatewayProc {
        GatewayProc::launch(opts, &[])
    }

    /// As [`GatewayProc::start`], replacing some of the harness's default flags (e.g.
    /// `("--request-timeout", "300ms")`; clap refuses a flag given twice).
    pub fn start_overriding(opts: Options, overrides: &[(&str, &str)]) -> GatewayProc {
        GatewayProc::launch(opts, overrides)
    }

    fn launch(opts: Options, overrides: &[(&str, &str)]) -> GatewayProc {
        let defaults = [
            ("--heartbeat-interval", "50ms"),
            ("--stall-timeout", "2s"),
            ("--restart-delay", "20ms"),
            ("--max-restart-delay", "200ms"),
            ("--request-timeout", "30s"),
            ("--drain-timeout", "10s"),
            ("--ring-capacity", "256KiB"),
            ("--max-body-bytes", "64KiB"),
        ];
        for (flag, _) in overrides {
            assert!(
                defaults.iter().any(|(d, _)| d == flag),
                "{flag} is not a default flag of the harness; pass it with Options::args"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("moltbot-gw-test-")
            .tempdir()
            .expect("temporary directory");
        let base = dir.path().join("workers");
        let log = dir.path().join("gateway.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_moltbot"));
        cmd.arg("gateway")
            .args(["-w", &opts.workers.to_string()])
            .arg("-s")
            .arg(&base)
            .args(["-p", "0"])
            .args(defaults.iter().flat_map(|&(flag, value)| {
                let value = overrides
                    .iter()
                    .find(|(f, _)| *f == flag)
                    .map_or(value, |&(_, v)| v);
                [flag, value]
            }))
            .args(&opts.args)
            .env_remove("MOLTBOT_GATEWAY_TOKEN")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn moltbot gateway");
        let port_file = base.join("gateway.port");
        let deadline = Instant::now() + DEADLINE;
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file)
                && let Ok(p) = text.trim().parse::<u16>()
            {
                break p;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "gateway exited early ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "gateway did not start");
            std::thread::sleep(Duration::from_millis(10));
        };
        GatewayProc {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            base,
            log,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The gateway's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The gateway's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// An HTTP request through `ureq` (see [`http_request`]) with the given headers.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> HttpResponse {
        http_request(&self.url(), method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()))
    }

    /// `GET /status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        self.request("GET", "/status", &[], None)
            .json()
            .expect("status JSON")
    }

    /// Pids of the standbys waiting beside the workers (`worker_standby`), in slot order.
    pub fn standby_pids(&self) -> Vec<u32> {
        self.status()["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter_map(|w| w["standbyPid"].as_u64().map(|p| p as u32))
            .collect()
    }

    /// Pid of each worker slot (None while a slot has no process).
    pub fn worker_pids(&self) -> Vec<Option<u32>> {
        self.status()["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["pid"].as_u64().map(|p| p as u32))
            .collect()
    }

    /// State of each worker slot.
    pub fn worker_states(&self) -> Vec<String> {
        self.status()["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["state"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    /// Sends raw bytes on a new connection and reads until the server closes it (or
    /// `DEADLINE`).
    pub fn raw(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = self.connect();
        s.write_all(bytes).expect("write");
        read_to_close(&mut s)
    }

    /// Sends raw bytes on a new connection and reads until the server closes it; panics if it
    /// does not close within [`DEADLINE`].
    pub fn raw_closed(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = self.connect();
        s.write_all(bytes).expect("write");
        read_until_closed(&mut s)
    }

    /// Polls `/readyz` until it answers 200.
    pub fn wait_ready(&self) {
        wait_until("/readyz 200", || {
            self.request("GET", "/readyz", &[], None).status == 200
        });
    }

    /// A raw connection.
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        s
    }

    /// Sends a signal to the gateway.
    pub fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid() as i32) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// Waits for the gateway to exit.
    pub fn wait(&mut self) -> ExitStatus {
        self.wait_within(DEADLINE)
    }

    /// Waits for the gateway to exit; kills it and panics after `within`.
    pub fn wait_within(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("gateway did not exit:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The sandbox base directory.
    pub fn base(&self) -> &Path {
        &self.base
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        // A clean, fast stop (SIGINT), so that no segment outlives the test; SIGKILL and
        // removing the recorded segments only if it does not stop.
        let _ = self.stop_quietly();
        // A connection task that panics closes its connection silently, which a test could
        // take for a deliberate close: a test that passed must not have made the gateway
        // panic anywhere.
        if !std::thread::panicking() {
            let log = self.log();
            assert!(
                !log.contains("panicked"),
                "the gateway logged a panic:\n{log}"
            );
        }
    }
}

/// A complete answer read through `ureq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Headers, names lower-cased (grouped by name, not in the order received).
    pub headers: Vec<(String, String)>,
    /// The whole body (de-chunked).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.body)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A new `ureq` agent as the harness configures them: a status is an answer (the tests judge
/// 4xx and 5xx), redirects are not followed, `*_PROXY` is ignored, and a whole request takes
/// at most [`DEADLINE`]. Its idle connections are kept for its next requests (see
/// [`http_request_with`]).
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .timeout_global(Some(DEADLINE))
        .build()
        .new_agent()
}

/// Sends one request to `url` + `path` through `ureq` and reads the whole answer.
///
/// Each request has a connection of its own (`Connection: close`), as a test expects of a
/// fresh request: no idle connection of an earlier one counts against a connection limit or
/// sees a restart. A body-less POST, PUT or PATCH says `content-length: 0`.
pub fn http_request(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<HttpResponse, ureq::Error> {
    static SHARED: OnceLock<ureq::Agent> = OnceLock::new();
    let mut with_close = vec![("connection", "close")];
    with_close.extend_from_slice(headers);
    http_request_with(
        SHARED.get_or_init(agent),
        url,
        method,
        path,
        &with_close,
        body,
    )
}

/// As [`http_request`], through `agent`, whose connection stays open for its next request
/// (keep-alive, as most clients do).
pub fn http_request_with(
    agent: &ureq::Agent,
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<HttpResponse, ureq::Error> {
    let mut req = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{url}{path}"));
    for (name, value) in headers {
        // As bytes: a value may be UTF-8 (a user id), which HTTP carries as opaque bytes.
        req = req.header(*name, value.as_bytes());
    }
    let mut resp = match body {
        Some(body) => agent.run(req.body(body)?)?,
        None if matches!(method, "POST" | "PUT" | "PATCH") => agent.run(req.body(&[][..])?)?,
        None => agent.run(req.body(())?)?,
    };
    let body = resp
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_to_vec()?;
    Ok(HttpResponse {
        status: resp.status().as_u16(),
        headers: resp
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_string(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    })
}

/// Reads until EOF or the read timeout.
pub fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// A response read by [`read_response`]: status, headers (names lower-cased), body.
pub type Response = (u16, Vec<(String, String)>, Vec<u8>);

/// Reads one HTTP response (head + Content-Length body) from a keep-alive connection.
pub fn read_response(s: &mut TcpStream) -> Option<Response> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    finish_response(&buf, s)
}

/// Parses a response head (up to and with its blank line) and reads its Content-Length body
/// from `r`; the shared tail of every keep-alive response reader in the tests.
pub fn finish_response(head: &[u8], r: &mut impl Read) -> Option<Response> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(head).ok()?;
    let status = resp.code?;
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let len: usize = header_of(&headers, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some((status, headers, body))
}

/// The status code of a raw response.
pub fn status_of(raw: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(raw);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// A header value of a raw response.
pub fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Reads until the server closes the connection (EOF or reset); panics if it is still open
/// after [`DEADLINE`] (the socket's read timeout as set by [`GatewayProc::connect`]).
pub fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!(
                "the server did not close the connection ({e}); received so far:\n{}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

/// Writes `bytes` one byte per `write` call (with `TCP_NODELAY`, one segment each).
pub fn write_bytewise(s: &mut TcpStream, bytes: &[u8]) {
    for b in bytes {
        s.write_all(std::slice::from_ref(b)).expect("write");
        s.flush().expect("flush");
    }
}

/// One response parsed out of raw bytes.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body (Content-Length framed).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Splits raw bytes into the responses they hold (each head + Content-Length body); panics on
/// bytes that are not a complete response.
pub fn parse_responses(raw: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!(
                "not a complete response ({other:?}): {:?}",
                String::from_utf8_lossy(rest)
            ),
        };
        let status = resp.code.expect("status");
        let headers: Vec<(String, String)> = resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let len: usize = header_of(&headers, "content-length")
            .map(|v| v.parse().expect("content-length"))
            .unwrap_or(0);
        assert!(
            rest.len() >= head_len + len,
            "truncated body: {:?}",
            String::from_utf8_lossy(rest)
        );
        out.push(RawResponse {
            status,
            headers,
            body: rest[head_len..head_len + len].to_vec(),
        });
        rest = &rest[head_len + len..];
    }
    out
}

/// Runs the `moltbot` binary with `args` and without any `MOLTBOT_*` variable of the test's
/// environment (plus `env`), until it exits; returns its status and stderr. Panics (after
/// killing it) if it is still running after [`DEADLINE`].
pub fn run_moltbot(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let dir = tempfile::Builder::new()
        .prefix("moltbot-run-")
        .tempdir()
        .expect("temporary directory");
    let err_path = dir.path().join("stderr");
    let err = std::fs::File::create(&err_path).expect("stderr file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moltbot"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(err));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("MOLTBOT_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn moltbot");
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "moltbot {args:?} did not exit:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (
        status,
        std::fs::read_to_string(&err_path).unwrap_or_default(),
    )
}

// ---- Added for tests/gateway_load.rs: tuned starts and restarts on the same sandbox base ----

/// Spawns `moltbot gateway` on `base` with the test timings of [`GatewayProc::start`], except
/// that each `(flag, value)` of `overrides` replaces the timing flag of the same name (clap
/// refuses a flag given twice); stderr is appended to `log`. Returns once it listens.
fn spawn_tuned(
    base: &Path,
    log: &Path,
    opts: &Options,
    overrides: &[(&str, &str)],
) -> (Child, u16) {
    let mut timings: Vec<(&str, &str)> = vec![
        ("--heartbeat-interval", "50ms"),
        ("--stall-timeout", "2s"),
        ("--restart-delay", "20ms"),
        ("--max-restart-delay", "200ms"),
        ("--request-timeout", "30s"),
        ("--drain-timeout", "10s"),
        ("--ring-capacity", "256KiB"),
        ("--max-body-bytes", "64KiB"),
    ];
    for (flag, value) in overrides {
        match timings.iter_mut().find(|(f, _)| f == flag) {
            Some(t) => t.1 = value,
            None => timings.push((flag, value)),
        }
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    // A restart finds the previous run's port file: only a fresh one counts.
    let port_file = base.join("gateway.port");
    let _ = std::fs::remove_file(&port_file);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moltbot"));
    cmd.arg("gateway")
        .args(["-w", &opts.workers.to_string()])
        .arg("-s")
        .arg(base)
        .args(["-p", "0"]);
    for (flag, value) in &timings {
        cmd.args([flag, value]);
    }
    cmd.args(&opts.args)
        .env_remove("MOLTBOT_GATEWAY_TOKEN")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file));
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn moltbot gateway");
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(text) = std::fs::read_to_string(&port_file)
            && let Ok(p) = text.trim().parse::<u16>()
        {
            return (child, p);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "gateway exited early ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "gateway did not start:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl GatewayProc {
    /// Like [`GatewayProc::start`], with `overrides` replacing test timings of the same flag,
    /// e.g. `&[("--stall-timeout", "30s")]`.
    pub fn start_tuned(opts: Options, overrides: &[(&str, &str)]) -> GatewayProc {
        let dir = tempfile::Builder::new()
            .prefix("moltbot-gw-test-")
            .tempdir()
            .expect("temporary directory");
        let base = dir.path().join("workers");
        let log = dir.path().join("gateway.log");
        let (child, port) = spawn_tuned(&base, &log, &opts, overrides);
        GatewayProc {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            base,
            log,
            _dir: dir,
        }
    }

    /// Starts a new gateway on this one's sandbox base (a restart after a crash or a stop);
    /// the previous process must have been waited for ([`GatewayProc::wait`]). Its stderr
    /// continues the same log.
    pub fn restart(&mut self, opts: Options, overrides: &[(&str, &str)]) {
        assert!(
            self.child.is_none(),
            "restart: the gateway is still running"
        );
        let (child, port) = spawn_tuned(&self.base, &self.log, &opts, overrides);
        self.child = Some(child);
        self.addr = SocketAddr::from(([127, 0, 0, 1], port));
    }
}

impl GatewayProc {
    /// Stops the gateway without panicking (fit for a `Drop`): SIGINT, then SIGKILL if it has
    /// not exited within [`DEADLINE`]; then removes the segments it left (a killed gateway
    /// cannot unlink them, and its sandbox base, which would let the next gateway remove them,
    /// is deleted with the test's directory). Returns the exit status if it was still running.
    pub fn stop_quietly(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Some(p) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::INT);
        }
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = child.kill();
                    break child.wait().ok();
                }
            }
        };
        for path in self.segment_paths() {
            let _ = std::fs::remove_file(path);
        }
        status
    }

    /// The `/dev/shm` paths of the segments of the gateway that last ran on this sandbox base,
    /// from the record it keeps there (`segments.json`, removed by a clean stop).
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        let Ok(text) = std::fs::read_to_string(self.base.join("segments.json")) else {
            return Vec::new();
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Vec::new();
        };
        v["names"]
            .as_array()
            .map(|names| {
                names
                    .iter()
                    .filter_map(|n| n.as_str())
                    .filter_map(|n| n.strip_prefix('/'))
                    .filter(|n| n.starts_with("moltbot-") && !n.contains('/'))
                    .map(|n| Path::new("/dev/shm").join(n))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A raw request: request line, `Host`, the given header lines (raw bytes), a Content-Length
/// when `body` is given, and the body.
pub fn raw_request(
    method: &str,
    target: &str,
    headers: &[(&str, &[u8])],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: gw\r\n").into_bytes();
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(b) = body {
        out.extend_from_slice(format!("Content-Length: {}\r\n", b.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    if let Some(b) = body {
        out.extend_from_slice(b);
    }
    out
}

/// An HTTP/1.1 request with a Content-Length body.
pub fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let headers: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    raw_request(method, path, &headers, Some(body))
}

/// One response of a [`Client`].
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Resp {
    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    /// `x-moltbot-worker`.
    pub fn worker(&self) -> Option<&str> {
        self.header("x-moltbot-worker")
    }

    /// The slot number of `x-moltbot-worker`.
    pub fn worker_slot(&self) -> Option<usize> {
        self.worker()?.strip_prefix("worker-")?.parse().ok()
    }

    /// The body as JSON, if it is.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A blocking keep-alive connection: requests are written whole, answers read through a buffer.
pub struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Client {
    /// A new connection to `g`.
    pub fn new(g: &GatewayProc) -> Client {
        let s = g.connect();
        let r = BufReader::new(s.try_clone().expect("clone socket"));
        Client { w: s, r }
    }

    /// Writes `bytes` as they are (one request, several pipelined, or anything else).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.w.write_all(bytes)
    }

    /// Writes one request.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<()> {
        self.send_raw(&request_bytes(method, path, headers, body))
    }

    /// The next response; None on EOF or a broken connection.
    pub fn recv(&mut self) -> Option<Resp> {
        let mut head = Vec::new();
        loop {
            let before = head.len();
            let n = self.r.read_until(b'\n', &mut head).ok()?;
            if n == 0 {
                return None;
            }
            if &head[before..] == b"\r\n" && before > 0 {
                break;
            }
        }
        let (status, headers, body) = finish_response(&head, &mut self.r)?;
        Some(Resp {
            status,
            headers,
            body,
        })
    }

    /// One request and its answer; None if the connection broke.
    pub fn try_call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Option<Resp> {
        self.send(method, path, headers, body).ok()?;
        self.recv()
    }

    /// One request and its answer; panics if the connection breaks.
    pub fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        self.send(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: write: {e}"));
        self.recv()
            .unwrap_or_else(|| panic!("{method} {path}: connection closed without an answer"))
    }

    /// True once the server closed the connection (EOF or reset).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b), Ok(0) | Err(_))
    }
}

/// The value of the OpenMetrics sample `name{labels...}` (labels in any order).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
        if n != name {
            return None;
        }
        let label_text = rest.strip_suffix('}')?;
        let have: Vec<&str> = if label_text.is_empty() {
            Vec::new()
        } else {
            label_text.split(',').collect()
        };
        let all = labels
            .iter()
            .all(|(k, v)| have.contains(&format!("{k}=\"{v}\"").as_str()));
        (all && have.len() == labels.len())
            .then(|| value.parse().ok())
            .flatten()
    })
}
