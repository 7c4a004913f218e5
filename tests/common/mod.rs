//! Helpers shared by the integration tests: a test configuration with real worker processes in
//! a private sandbox, polling with a deadline, and views of `/proc` and `/dev/shm`.
#![allow(dead_code)] // Each test binary uses its own subset.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moltbot::api::{Kind, Method};
use moltbot::{Config, GatewayRouter, RouteRequest, RouteResponse};
use tempfile::TempDir;

/// How long any awaited condition may take. Generous: the suite must pass on a loaded 2-core
/// machine with every test running in parallel.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A test configuration and the temporary directory its sandboxes live in. Declare the
/// routers after it, so that they stop before the directory is removed.
pub struct TestEnv {
    /// The configuration (clone it for each router).
    pub config: Config,
    /// Keeps the sandbox base alive for the whole test.
    pub dir: TempDir,
}

impl TestEnv {
    /// `workers` slots running the `moltbot` binary under test (it has the fault handlers) and
    /// short timings.
    pub fn new(workers: usize) -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix("moltbot-pool-test-")
            .tempdir()
            .expect("temporary directory");
        let config = Config {
            worker_count: workers,
            sandbox_dir: dir.path().join("workers"),
            worker_program: Some(PathBuf::from(env!("CARGO_BIN_EXE_moltbot"))),
            heartbeat_interval: Duration::from_millis(50),
            // Far above the heartbeat: a worker descheduled on a busy machine must not look
            // stalled. Tests about stalls set their own.
            stall_timeout: Some(Duration::from_secs(2)),
            restart_delay: Duration::from_millis(20),
            max_restart_delay: Duration::from_millis(200),
            request_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            // Tests hammer workers with echoes; only the tests about recycling want recycles.
            max_requests: 100_000_000,
            ring_capacity: 256 * 1024,
            max_body_bytes: 64 * 1024,
            ..Config::default()
        };
        TestEnv { config, dir }
    }

    /// The sandbox base directory.
    pub fn base(&self) -> &Path {
        &self.config.sandbox_dir
    }

    /// `<base>/worker-N`.
    pub fn sandbox(&self, slot: usize) -> PathBuf {
        self.base().join(format!("worker-{slot}"))
    }

    /// `worker-N/sandbox.json`, parsed.
    pub fn sandbox_json(&self, slot: usize) -> serde_json::Value {
        let path = self.sandbox(slot).join("sandbox.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
    }

    /// A started router for this environment's configuration.
    pub fn start(&self) -> GatewayRouter {
        start(self.config.clone())
    }
}

/// Builds and starts a router; panics with the reason if it does not come up.
pub fn start(config: Config) -> GatewayRouter {
    let router = GatewayRouter::new(config).expect("valid test configuration");
    router.start().expect("the pool starts");
    router
}

/// Polls `cond` every few milliseconds until it holds; panics with `what` after `deadline`.
pub fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Names in `/dev/shm` of the segments created by the gateway process `pid`.
pub fn shm_segments_of(pid: u32) -> Vec<String> {
    let prefix = format!("moltbot-{pid}-");
    let mut names: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// True if `/dev/shm` holds the segment `name` (as `Segment::name`, with its leading `/`).
pub fn shm_exists(name: &str) -> bool {
    Path::new("/dev/shm")
        .join(name.trim_start_matches('/'))
        .exists()
}

/// The parent pid and state letter of `pid` from `/proc/<pid>/stat`, if it exists.
pub fn proc_stat(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// The arguments of `pid` from `/proc/<pid>/cmdline` (empty once it is gone).
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// User plus system CPU time of `pid` (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After `pid (comm)`: state is field 3, utime and stime are fields 14 and 15.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Pids of the live (or zombie) children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut kids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&p| proc_stat(p).is_some_and(|(ppid, _)| ppid == pid))
                .collect()
        })
        .unwrap_or_default();
    kids.sort_unstable();
    kids
}

/// Pids of the processes whose command line mentions `needle` (e.g. a sandbox path, which
/// workers get as `--sandbox`), zombies included.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|p| {
                    std::fs::read(format!("/proc/{p}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
                })
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids
}

/// True while `pid` is a child of this test process (running, stopped, or an unreaped zombie).
pub fn is_our_child(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(ppid, _)| ppid == std::process::id())
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    let p = rustix::process::Pid::from_raw(pid as i32).expect("a valid pid");
    rustix::process::kill_process(p, sig).expect("signal delivered");
}

/// `kill -9 pid`.
pub fn kill9(pid: u32) {
    signal(pid, rustix::process::Signal::KILL);
}

/// The status entry of `slot`.
pub fn worker(router: &GatewayRouter, slot: usize) -> moltbot::WorkerStatus {
    let status = router.status().expect("the pool is running");
    status.workers[slot].clone()
}

/// The current pid of `slot` (panics if it has none).
pub fn pid_of(router: &GatewayRouter, slot: usize) -> u32 {
    worker(router, slot).pid.expect("the slot has a process")
}

/// Waits until `slot` is served by a ready process other than `old`; returns its pid.
pub fn wait_replaced(router: &GatewayRouter, slot: usize, old: u32) -> u32 {
    let mut new = 0;
    wait_until(
        DEADLINE,
        &format!("worker-{slot} replaced (old pid {old})"),
        || {
            let w = worker(router, slot);
            match w.pid {
                Some(p) if p != old && w.state == "ready" => {
                    new = p;
                    true
                }
                _ => false,
            }
        },
    );
    new
}

/// The slot number of `worker-N`.
pub fn slot_of(worker_id: &str) -> usize {
    worker_id
        .strip_prefix("worker-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a worker id: {worker_id}"))
}

/// A new user (`<prefix><i>`) that lands on `slot`, assigned there by routing a health check.
/// Use a fresh prefix per call; with the default load bound a slot takes only its share.
pub fn user_on_slot(router: &GatewayRouter, slot: usize, prefix: &str) -> String {
    let want = format!("worker-{slot}");
    for i in 0..10_000 {
        let user = format!("{prefix}{i}");
        let known = router
            .status()
            .expect("the pool is running")
            .routing_table_size;
        if router.worker_for_user(&user).as_deref() == Some(want.as_str()) {
            let r = health(router, &user);
            assert!(r.success, "health check for {user}: {r:?}");
            assert_eq!(r.worker_id.as_deref(), Some(want.as_str()));
            assert_eq!(
                router.status().map(|s| s.routing_table_size),
                Some(known + 1)
            );
            return user;
        }
    }
    panic!("no user found for {want}");
}

/// `agent:message` with `message`.
pub fn agent(router: &GatewayRouter, user: &str, message: &str) -> RouteResponse {
    router.route(RouteRequest {
        kind: "agent:message".into(),
        user_id: user.into(),
        payload: serde_json::json!({ "message": message }),
    })
}

/// `echo` of a small payload.
pub fn echo(router: &GatewayRouter, user: &str) -> RouteResponse {
    router.route(RouteRequest {
        kind: "echo".into(),
        user_id: user.into(),
        payload: serde_json::json!({ "ping": user }),
    })
}

/// `health:check`.
pub fn health(router: &GatewayRouter, user: &str) -> RouteResponse {
    router.route(RouteRequest {
        kind: "health:check".into(),
        user_id: user.into(),
        payload: serde_json::Value::Null,
    })
}

/// A test-only fault action (`crash`, `hang`, `slow`, `alloc`, `garbage-frame`, ...).
pub fn test_action(
    router: &GatewayRouter,
    user: &str,
    action: &str,
    body: serde_json::Value,
) -> RouteResponse {
    let body = serde_json::to_vec(&body).expect("JSON");
    router.route_parts(Kind::Test, Method::Post, user, action, &body)
}

/// The `turn` of a successful `agent:message` answer.
pub fn turn(r: &RouteResponse) -> u64 {
    assert!(r.success, "agent:message failed: {r:?}");
    r.payload
        .as_ref()
        .and_then(|p| p["turn"].as_u64())
        .unwrap_or_else(|| panic!("no turn in {r:?}"))
}

/// The `pid` in a successful answer's payload.
pub fn payload_pid(r: &RouteResponse) -> u32 {
    assert!(r.success, "request failed: {r:?}");
    r.payload
        .as_ref()
        .and_then(|p| p["pid"].as_u64())
        .map(|p| p as u32)
        .unwrap_or_else(|| panic!("no pid in {r:?}"))
}

/// The worker's own "handling a request now" flag from the slot's segment header.
pub fn worker_busy(router: &GatewayRouter, slot: usize) -> bool {
    let pool = router.pool().expect("the pool is running");
    pool.slots()[slot]
        .segment
        .header()
        .in_flight
        .load(std::sync::atomic::Ordering::Acquire)
        != 0
}

/// Runs `send` in a scoped thread once the worker of `slot` is idle, and returns when the
/// worker has taken a request (the one `send` sent, if nothing else goes to that slot).
///
/// The worker clears its flag only after publishing its answer, so a caller can have its answer
/// while the flag still shows the previous request: waiting for idle first makes the 0 → 1
/// transition this one's.
pub fn send_and_wait_taken<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    router: &'scope GatewayRouter,
    slot: usize,
    send: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    wait_until(DEADLINE, &format!("worker-{slot} idle"), || {
        !worker_busy(router, slot)
    });
    let handle = scope.spawn(send);
    wait_until(DEADLINE, &format!("worker-{slot} took the request"), || {
        worker_busy(router, slot)
    });
    handle
}
