//! The chaos suite: a real gateway with 4 workers under continuous load
//! from bounded client threads (loopback, 48 users, 16 keep-alive connections) while workers
//! are killed (`kill -9` of a random one every 200 ms for 10 s), frozen (SIGSTOP/SIGCONT),
//! pushed past `max_memory`, and crashed into `failed`.
//!
//! The load: echo requests (checked byte for byte), agent messages (a session write in the
//! sandbox) and, one in 16, a 2 ms test action through `/v1/route` (so that kills often land
//! while the worker holds a request). Every request is recorded with its user, when it was
//! sent and answered, and what it got; every user's worker is learned first
//! (`GET /v1/users/{u}/worker`), and every answer must come from it (`x-moltbot-worker`). The
//! rule for each error: a 502/503/504 with the endpoint's JSON error body (the gateway's
//! `{"error":{"code",...}}`, or `/v1/route`'s `{"success":false,"errorCode",...}`), on the
//! user's worker, which a fault took down while the request was in flight or before it was
//! sent and until the slot served again; a 504 only after the whole request timeout. Everything
//! else must be a 200 with the right body.
//!
//! A watcher thread polls `/livez` and `/status` every ~10 ms throughout: the gateway process
//! must live and answer every probe, and a fault's recovery time runs from the signal to the
//! first status showing the slot serving with another pid.
//!
//! Each test ends by checking that every slot is ready, that the gateway's children are
//! exactly its current workers and no other process runs the worker command on its segments
//! (no orphan), and, after a clean stop, that no segment is left in /dev/shm and no worker runs.
//!
//! Each prints one `CHAOS-FIGURES: {json}` line on stderr (faults, requests, errors by kind,
//! recovery p50/max) for the README's Reliability section (`cargo test --test chaos --
//! --nocapture`; `CHAOS_SEED=N` replays a run's choice of victims). The tests take a lock and
//! run one at a time: each loads both CPUs, and figures of overlapping scenarios would mean
//! nothing.
//!
//! Bounded in time: the load stops at a flag, waits go through `gw::wait_until` (generous
//! deadline), sockets time out. Sleeps only pace the faults (the kill cadence, a SIGSTOP's
//! hold, the watcher's poll interval); nothing asserts an absolute duration.

mod common;
mod gw;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::cmdline;
use gw::{Client, GatewayProc, Options, Resp, wait_until};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustix::process::Signal;
use serde_json::{Value, json};

/// Worker slots of every scenario.
const WORKERS: usize = 4;
/// Users of the load (the bounded-load router gives each worker 12).
const USERS: usize = 48;
/// Client threads, one keep-alive connection each, cycling over their users.
const THREADS: usize = 16;
/// The gateway's default `max_concurrent` (per worker).
const MAX_CONCURRENT: usize = 10;
/// Options every scenario adds: no recycle by request count during a run (it would be a
/// restart no fault explains).
const NO_RECYCLE: [&str; 2] = ["--max-requests", "100000000"];

/// The product's default request timeout (the harness sets 30 s): a respawn delayed by a slow
/// disk must not turn queued requests into timeouts in these scenarios.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The harness flags each scenario replaces.
const TIMINGS: [(&str, &str); 1] = [("--request-timeout", "120s")];

/// Scenarios run one at a time (see the module doc).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn user(i: usize) -> String {
    format!("chaos-user-{i}")
}

fn slot_of(worker_id: &str) -> Option<usize> {
    worker_id.strip_prefix("worker-")?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The error shapes of the answers (the client is `gw::Client`).

/// The gateway's error shape `{"error":{"code","message","retryable",...}}`, with the code
/// that fits the status; returns the code.
fn gateway_error(r: &Resp) -> Result<String, String> {
    let v = r
        .json()
        .ok_or_else(|| format!("{}: error body is not JSON: {}", r.status, r.text()))?;
    let e = &v["error"];
    let (Some(code), Some(_), Some(retryable)) = (
        e["code"].as_str(),
        e["message"].as_str(),
        e["retryable"].as_bool(),
    ) else {
        return Err(format!("{}: not the error shape: {}", r.status, r.text()));
    };
    let want = match r.status {
        502 => "WORKER_CRASHED",
        503 => "UNAVAILABLE",
        504 => "TIMEOUT",
        _ => return Err(format!("{}: not a 502/503/504: {}", r.status, r.text())),
    };
    // Refused or timed out before any effect: the client may retry. (A crash mid-request is
    // not asserted either way: the worker may have acted on it.)
    if code != want || (r.status != 502 && !retryable) {
        return Err(format!(
            "{}: code {code} (want {want}), retryable {retryable}: {}",
            r.status,
            r.text()
        ));
    }
    if r.status == 503 {
        let ra = r.header("retry-after").and_then(|v| v.parse::<u64>().ok());
        if ra.is_none_or(|s| s < 1) || e["retryAfterMs"].as_u64().is_none() {
            return Err(format!(
                "503 without Retry-After/retryAfterMs: {:?} {}",
                r.headers,
                r.text()
            ));
        }
    }
    Ok(code.to_string())
}

/// The error answer of `/v1/route` (the TypeScript router's `WorkerResponse`): `success: false`, the
/// `errorCode` that fits the status, the worker named; a 503 also has a Retry-After.
fn route_error(r: &Resp) -> Result<String, String> {
    let v = r
        .json()
        .ok_or_else(|| format!("{}: route error is not JSON: {}", r.status, r.text()))?;
    let want = match r.status {
        502 => "WORKER_CRASHED",
        503 => "UNAVAILABLE",
        504 => "TIMEOUT",
        _ => return Err(format!("{}: not a 502/503/504: {}", r.status, r.text())),
    };
    let ok = v["success"].as_bool() == Some(false)
        && v["errorCode"].as_str() == Some(want)
        && v["error"].as_str().is_some()
        && v["workerId"].as_str() == r.header("x-moltbot-worker")
        && (r.status != 503 || r.header("retry-after").is_some());
    if ok {
        Ok(want.to_string())
    } else {
        Err(format!("{}: not the route error shape: {v}", r.status))
    }
}

// ---------------------------------------------------------------------------------------------
// The load: per thread one connection cycling over its users; echo (checked byte for byte)
// and, every 8th, an agent message (a session write in the worker's sandbox).

/// What one request of the load got.
#[derive(Debug, Clone)]
struct Rec {
    user: usize,
    start: Instant,
    end: Instant,
    /// 0: the connection broke without an answer.
    status: u16,
    /// The error code of a non-200 answer.
    code: Option<String>,
    /// A wrong 200 (body or worker), or an error without the right shape.
    problem: Option<String>,
}

/// Shared state of a load run.
struct Load {
    stop: AtomicBool,
    answered: AtomicU64,
    base: Instant,
    /// Per user: start of its latest successful request, µs after `base` (+1; 0 = none).
    last_ok: Vec<AtomicU64>,
    /// Every user's worker, learned before the load.
    known: Vec<usize>,
}

impl Load {
    fn new(known: Vec<usize>) -> Load {
        Load {
            stop: AtomicBool::new(false),
            answered: AtomicU64::new(0),
            base: Instant::now(),
            last_ok: (0..USERS).map(|_| AtomicU64::new(0)).collect(),
            known,
        }
    }

    fn us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_micros() as u64 + 1
    }

    /// Waits until every user had a request sent after `t` answered 200.
    fn wait_all_served_since(&self, what: &str, t: Instant) {
        let t = self.us(t);
        wait_until(what, || {
            self.last_ok
                .iter()
                .all(|ok| ok.load(Ordering::Relaxed) >= t)
        });
    }
}

/// Sets a flag when dropped, so that a failing driver still ends the threads it runs with
/// (the scope joins them before the panic propagates).
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The kinds of request of the load.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// `POST /v1/echo`: the body back, byte for byte.
    Echo,
    /// `POST /v1/agent`: a turn appended to the user's session log in the sandbox.
    Agent,
    /// `POST /v1/route` test action `slow` (2 ms in the worker): keeps requests in the
    /// worker's hands often enough that kills land mid-request.
    Slow,
}

/// Request `seq` of a load thread: mostly echo, every 8th an agent message, every 16th a slow
/// one.
fn kind_of(seq: u64) -> Kind {
    match seq % 16 {
        3 | 11 => Kind::Agent,
        7 => Kind::Slow,
        _ => Kind::Echo,
    }
}

fn load_thread(g: &GatewayProc, t: usize, ld: &Load) -> Vec<Rec> {
    let users: Vec<usize> = (t..USERS).step_by(THREADS).collect();
    let mut c = Client::new(g);
    let mut out = Vec::new();
    let mut seq = 0u64;
    while !ld.stop.load(Ordering::Acquire) {
        let u = users[seq as usize % users.len()];
        let name = user(u);
        let kind = kind_of(seq);
        let (path, ct, body) = match kind {
            Kind::Agent => (
                "/v1/agent",
                "application/json",
                format!("{{\"message\":\"chaos t{t} #{seq}\"}}"),
            ),
            Kind::Echo => ("/v1/echo", "text/plain", format!("echo {name} t{t} #{seq}")),
            Kind::Slow => (
                "/v1/route",
                "application/json",
                json!({"type": "test", "userId": name, "payload": {"action": "slow", "ms": 2}})
                    .to_string(),
            ),
        };
        seq += 1;
        let start = Instant::now();
        let resp = c.try_call(
            "POST",
            path,
            &[("x-moltbot-user", &name), ("content-type", ct)],
            body.as_bytes(),
        );
        let end = Instant::now();
        let rec = match resp {
            None => {
                c = Client::new(g);
                Rec {
                    user: u,
                    start,
                    end,
                    status: 0,
                    code: None,
                    problem: Some("connection broke without an answer".into()),
                }
            }
            Some(r) => {
                let (code, problem) = if r.worker_slot() != Some(ld.known[u]) {
                    (
                        None,
                        Some(format!(
                            "answered by {:?}, not the user's worker-{} ({}): {}",
                            r.header("x-moltbot-worker"),
                            ld.known[u],
                            r.status,
                            r.text()
                        )),
                    )
                } else {
                    match check_answer(&r, kind, &name, body.as_bytes()) {
                        Ok(code) => (code, None),
                        Err(e) => (None, Some(e)),
                    }
                };
                if r.status == 200 && problem.is_none() {
                    ld.last_ok[u].fetch_max(ld.us(start), Ordering::Relaxed);
                }
                if r.header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                {
                    c = Client::new(g);
                }
                Rec {
                    user: u,
                    start,
                    end,
                    status: r.status,
                    code,
                    problem,
                }
            }
        };
        ld.answered.fetch_add(1, Ordering::Relaxed);
        out.push(rec);
    }
    out
}

/// Checks an answer of the load: a 200 with the right body, or an error with the endpoint's
/// error body (the gateway's `{"error":{...}}`; `/v1/route`'s `{success:false, errorCode}`).
/// Returns the error code of an error.
fn check_answer(r: &Resp, kind: Kind, name: &str, body: &[u8]) -> Result<Option<String>, String> {
    if r.status != 200 {
        return if kind == Kind::Slow {
            route_error(r).map(Some)
        } else {
            gateway_error(r).map(Some)
        };
    }
    match kind {
        Kind::Agent => {
            let v = r
                .json()
                .ok_or_else(|| format!("agent: not JSON: {}", r.text()))?;
            if v["userId"].as_str() != Some(name)
                || v["workerId"].as_str() != r.header("x-moltbot-worker")
                || v["turn"].as_u64().is_none()
            {
                return Err(format!("agent: unexpected answer {v}"));
            }
        }
        Kind::Echo => {
            if r.body != body {
                return Err(format!(
                    "echo: sent {:?}, got {:?}",
                    String::from_utf8_lossy(body),
                    r.text()
                ));
            }
        }
        Kind::Slow => {
            let v = r
                .json()
                .ok_or_else(|| format!("slow: not JSON: {}", r.text()))?;
            if v["success"].as_bool() != Some(true)
                || v["workerId"].as_str() != r.header("x-moltbot-worker")
                || v["payload"]["sleptMs"].as_u64() != Some(2)
            {
                return Err(format!("slow: unexpected answer {v}"));
            }
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// Faults and the watcher.

/// One injected fault.
#[derive(Debug)]
struct Fault {
    kind: &'static str,
    slot: usize,
    pid: u32,
    /// Taken just before the signal.
    at: Instant,
    /// When the slot was seen ready again (with a new process, or the same one resumed).
    over: Option<Instant>,
    /// The process was replaced (false: a SIGSTOP'd worker resumed and kept serving).
    replaced: bool,
    /// The watcher resolves it (kills); otherwise the driver does (stops).
    watched: bool,
}

/// Shared state of the watcher thread.
struct Watch {
    stop: AtomicBool,
    faults: Mutex<Vec<Fault>>,
    /// Probes that did not get 200 (or the gateway process gone).
    failures: Mutex<Vec<String>>,
    probes: AtomicU64,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            stop: AtomicBool::new(false),
            faults: Mutex::new(Vec::new()),
            failures: Mutex::new(Vec::new()),
            probes: AtomicU64::new(0),
        }
    }

    fn faults(&self) -> MutexGuard<'_, Vec<Fault>> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The watcher saw `/livez` answer and the gateway's pid stay the same throughout.
    fn assert_gateway_stayed_up(&self, g: &GatewayProc) {
        let failures = self.failures.lock().expect("lock").clone();
        assert_no_failures("the gateway stays up (/livez, pid)", &failures, g);
    }

    fn fail(&self, what: String) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }
}

/// A slot's (state, pid, lastHeartbeat) in a status.
fn slot_view(st: &Value, slot: usize) -> (String, Option<u32>, u64) {
    let w = &st["workers"][slot];
    (
        w["state"].as_str().unwrap_or("?").to_string(),
        w["pid"].as_u64().map(|p| p as u32),
        w["lastHeartbeat"].as_u64().unwrap_or(0),
    )
}

fn serving(state: &str) -> bool {
    matches!(state, "ready" | "busy")
}

/// The watcher: `/livez` must answer 200 and the gateway process must live, every ~10 ms;
/// a watched fault is over at the first status showing its slot serving with another pid.
fn watcher(g: &GatewayProc, w: &Watch) {
    let gpid = g.pid();
    let mut c = Client::new(g);
    let mut first = true;
    while !w.stop.load(Ordering::Acquire) {
        // Poll interval (not synchronisation).
        if !first {
            std::thread::sleep(Duration::from_millis(10));
        }
        first = false;
        if !process_alive(gpid) {
            w.fail(format!("the gateway process {gpid} is gone"));
            return;
        }
        match c.try_call("GET", "/livez", &[], b"") {
            Some(r) if r.status == 200 => {}
            other => {
                w.fail(format!("/livez: {:?}", other.map(|r| (r.status, r.text()))));
                c = Client::new(g);
            }
        }
        let st = match c.try_call("GET", "/status", &[], b"") {
            Some(r) if r.status == 200 => r.json().unwrap_or_default(),
            other => {
                w.fail(format!(
                    "/status: {:?}",
                    other.map(|r| (r.status, r.text()))
                ));
                c = Client::new(g);
                continue;
            }
        };
        let now = Instant::now();
        w.probes.fetch_add(1, Ordering::Relaxed);
        for f in w.faults().iter_mut() {
            if f.watched && f.over.is_none() {
                let (state, pid, _) = slot_view(&st, f.slot);
                if serving(&state) && pid.is_some_and(|p| p != f.pid) {
                    f.over = Some(now);
                    f.replaced = true;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes, from /proc.

/// The fields of `/proc/<pid>/stat` after the command name: [0] state, [1] ppid.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn process_alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().map(String::as_str) != Some("Z"))
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// The `--segment` argument of a `moltbot worker` command line.
fn segment_arg(args: &[String]) -> Option<&str> {
    let i = args.iter().position(|a| a == "--segment")?;
    args.get(i + 1).map(String::as_str)
}

/// Processes (any parent) running the worker command on one of `segments`, sorted.
fn processes_on(segments: &[String]) -> Vec<u32> {
    let mut v: Vec<u32> = all_pids()
        .into_iter()
        .filter(|p| {
            let args = cmdline(*p);
            args.iter().any(|a| a == "worker")
                && segment_arg(&args).is_some_and(|s| segments.iter().any(|n| n == s))
        })
        .collect();
    v.sort();
    v
}

/// Children of `parent` (zombies included: an unreaped child is a leak too), sorted.
fn children(parent: u32) -> Vec<u32> {
    let mut v: Vec<u32> = all_pids()
        .into_iter()
        .filter(|p| {
            stat_fields(*p).and_then(|f| f.get(1).and_then(|s| s.parse::<u32>().ok()))
                == Some(parent)
        })
        .collect();
    v.sort();
    v
}

/// The running gateway's segment names (`/moltbot-...-wN`), by slot.
fn segment_names(g: &GatewayProc) -> Vec<String> {
    let mut names: Vec<(usize, String)> = g
        .segment_paths()
        .iter()
        .filter_map(|p| {
            let n = p.file_name()?.to_str()?;
            let slot = n.rsplit_once("-w")?.1.parse().ok()?;
            Some((slot, format!("/{n}")))
        })
        .collect();
    names.sort();
    assert_eq!(names.len(), WORKERS, "one segment per slot: {names:?}");
    assert!(
        names.iter().enumerate().all(|(i, (s, _))| *s == i),
        "{names:?}"
    );
    names.into_iter().map(|(_, n)| n).collect()
}

/// A pidfd on `pid` if it is slot `slot`'s live worker of gateway `gpid` (checked after the
/// pidfd is open, so the signal cannot reach a process that reused the pid).
fn pin_worker(gpid: u32, segment: &str, pid: u32) -> Option<OwnedFd> {
    let p = rustix::process::Pid::from_raw(pid as i32)?;
    let fd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()?;
    let f = stat_fields(pid)?;
    let ppid: u32 = f.get(1)?.parse().ok()?;
    let ours = f.first().map(String::as_str) != Some("Z")
        && ppid == gpid
        && segment_arg(&cmdline(pid)) == Some(segment);
    ours.then_some(fd)
}

fn signal(fd: &OwnedFd, sig: Signal) -> bool {
    rustix::process::pidfd_send_signal(fd, sig).is_ok()
}

// ---------------------------------------------------------------------------------------------
// Scenario plumbing.

/// Every user's worker: one request each (assigns it), then `GET /v1/users/{u}/worker`, which
/// must agree with the `x-moltbot-worker` of the answer.
fn learn_workers(g: &GatewayProc) -> Vec<usize> {
    let mut c = Client::new(g);
    let table: Vec<usize> = (0..USERS)
        .map(|u| {
            let r = c.call("POST", "/v1/echo", &[("x-moltbot-user", &user(u))], b"hi");
            assert_eq!(r.status, 200, "{}", r.text());
            let slot = r.worker_slot().expect("x-moltbot-worker");
            assert_eq!(lookup(&mut c, u), slot, "{}", user(u));
            slot
        })
        .collect();
    for s in 0..WORKERS {
        assert!(table.contains(&s), "no user on worker-{s}: {table:?}");
    }
    table
}

/// `GET /v1/users/{u}/worker` of an assigned user.
fn lookup(c: &mut Client, u: usize) -> usize {
    let r = c.call("GET", &format!("/v1/users/{}/worker", user(u)), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().expect("JSON");
    assert_eq!(v["assigned"].as_bool(), Some(true), "{v}");
    v["workerId"].as_str().and_then(slot_of).expect("workerId")
}

/// Per slot: (crashes, restarts).
fn counters(st: &Value) -> Vec<(u64, u64)> {
    (0..WORKERS)
        .map(|s| {
            let w = &st["workers"][s];
            (
                w["crashes"].as_u64().expect("crashes"),
                w["restarts"].as_u64().expect("restarts"),
            )
        })
        .collect()
}

/// The `reason`s of a slot's restart history (sandbox.json).
fn restart_reasons(base: &Path, slot: usize) -> Vec<String> {
    let text = std::fs::read_to_string(base.join(format!("worker-{slot}/sandbox.json")))
        .expect("sandbox.json");
    let v: Value = serde_json::from_str(&text).expect("sandbox.json is JSON");
    v["restartHistory"]
        .as_array()
        .expect("restartHistory")
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Runs the load and the watcher while `drive` runs on this thread; returns every request's
/// record. `drive` gets the load and the watcher.
fn under_load(
    g: &GatewayProc,
    known: Vec<usize>,
    drive: impl FnOnce(&Load, &Watch),
) -> (Vec<Rec>, Watch) {
    let ld = Load::new(known);
    let w = Watch::new();
    let recs = std::thread::scope(|s| {
        let (ldr, wr) = (&ld, &w);
        let watch = s.spawn(move || watcher(g, wr));
        let loads: Vec<_> = (0..THREADS)
            .map(|t| s.spawn(move || load_thread(g, t, ldr)))
            .collect();
        {
            let _stop_watch = SetOnDrop(&w.stop);
            let _stop_load = SetOnDrop(&ld.stop);
            wait_until("the load under way", || {
                ld.answered.load(Ordering::Relaxed) >= 500
            });
            drive(&ld, &w);
        }
        watch.join().expect("watcher");
        loads
            .into_iter()
            .flat_map(|h| h.join().expect("load thread"))
            .collect::<Vec<Rec>>()
    });
    (recs, w)
}

/// A stable end: every slot ready, the gateway's children exactly its current workers and
/// their standbys, no other process on its segments; then a clean stop (SIGINT, exit 0) that
/// leaves no segment in /dev/shm and no worker running.
fn settle_and_stop(g: &mut GatewayProc, segments: &[String]) {
    wait_until("every slot ready", || {
        g.worker_states().iter().all(|s| s == "ready")
    });
    // A standby starts beside a worker once it is ready: looked at until the two views agree.
    let deadline = Instant::now() + gw::DEADLINE;
    let pids = loop {
        let mut pids: Vec<u32> = g
            .worker_pids()
            .into_iter()
            .map(|p| p.expect("every slot has a process"))
            .chain(g.standby_pids())
            .collect();
        pids.sort();
        let kids = children(g.pid());
        if kids == pids {
            break pids;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway's children {kids:?}, its workers and standbys {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        processes_on(segments),
        pids,
        "processes running the worker command on this gateway's segments (orphans?)"
    );
    let paths = g.segment_paths();
    assert_eq!(paths.len(), WORKERS);
    for p in &paths {
        assert!(p.exists(), "{} missing while running", p.display());
    }
    let status = g.stop_quietly().expect("the gateway was running");
    assert!(status.success(), "gateway exit: {status}\n{}", g.log());
    assert!(
        !g.base().join("segments.json").exists(),
        "a clean stop removes its segment record"
    );
    let left: Vec<_> = paths.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "segments left in /dev/shm: {left:?}");
    wait_until("no worker process left", || {
        processes_on(segments).is_empty()
    });
}

/// Attribution of every request. Returns the failures (empty = all good) and the errors per
/// slot: (all but the timeouts, which are checked on their own, and of them the 502s).
fn attribute(
    recs: &[Rec],
    known: &[usize],
    faults: &[Fault],
) -> (Vec<String>, Vec<(usize, usize)>) {
    let mut failures = Vec::new();
    let mut per_slot = vec![(0usize, 0usize); WORKERS];
    let t0 = recs.iter().map(|r| r.start).min();
    for r in recs {
        if let Some(p) = &r.problem {
            failures.push(format!("{} [{}]: {p}", user(r.user), r.status));
            continue;
        }
        if r.status == 200 {
            continue;
        }
        let slot = known[r.user];
        // A timeout only after the request waited its whole timeout (queued for a worker that
        // took that long to come back), never earlier.
        if r.status == 504 && r.end.duration_since(r.start) < REQUEST_TIMEOUT {
            failures.push(format!(
                "{}: 504 after {:?}, before the request timeout",
                user(r.user),
                r.end.duration_since(r.start)
            ));
        }
        if r.status != 504 {
            per_slot[slot].0 += 1;
        }
        if r.status == 502 {
            per_slot[slot].1 += 1;
        }
        // Only a fault that took the process down can fail a request; a SIGSTOP'd worker
        // that resumed answers everything it held.
        let covered = faults.iter().any(|f| {
            f.slot == slot && f.replaced && f.at <= r.end && f.over.is_none_or(|o| o >= r.start)
        });
        if !covered {
            failures.push(format!(
                "{} on untouched worker-{slot}: {} {:?} (sent {:?} after the load began, took {:?}); faults on this slot: {:?}",
                user(r.user),
                r.status,
                r.code,
                t0.map(|t| r.start.duration_since(t)),
                r.end.duration_since(r.start),
                faults
                    .iter()
                    .filter(|f| f.slot == slot)
                    .map(|f| (f.kind, f.pid, t0.map(|t| f.at.saturating_duration_since(t)), f.over.zip(t0).map(|(o, t)| o.saturating_duration_since(t))))
                    .collect::<Vec<_>>()
            ));
        }
    }
    (failures, per_slot)
}

/// The faults, for a failure message: kind, slot, pid, replaced, and ms after the first one.
fn describe_faults(faults: &[Fault]) -> String {
    let Some(t0) = faults.iter().map(|f| f.at).min() else {
        return "no faults".into();
    };
    faults
        .iter()
        .map(|f| {
            format!(
                "{} worker-{} pid {} at {}ms over {:?}ms replaced {}",
                f.kind,
                f.slot,
                f.pid,
                f.at.duration_since(t0).as_millis(),
                f.over.map(|o| o.duration_since(t0).as_millis()),
                f.replaced
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The gateway's log lines about worker lifecycles.
fn lifecycle_log(g: &GatewayProc) -> String {
    g.log()
        .lines()
        .filter(|l| {
            [
                "stall",
                "ended",
                "spawned",
                "killing",
                "recycl",
                "failed",
                "violation",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_no_failures(what: &str, failures: &[String], g: &GatewayProc) {
    if failures.is_empty() {
        return;
    }
    let log = g.log();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    panic!(
        "{what}: {} failures, first ones:\n{}\n--- gateway log (last lines, newest first) ---\n{}",
        failures.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        tail.join("\n")
    );
}

/// Errors by status and code, e.g. `{"502 WORKER_CRASHED": 3}`.
fn errors_by_kind(recs: &[Rec]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in recs.iter().filter(|r| r.status != 200) {
        let k = format!("{} {}", r.status, r.code.as_deref().unwrap_or("?"));
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// p50 and max of the recovery times of the faults that replaced a process, in ms.
fn recovery_ms<'a>(faults: impl IntoIterator<Item = &'a Fault>) -> Value {
    let mut v: Vec<f64> = faults
        .into_iter()
        .filter(|f| f.replaced)
        .filter_map(|f| {
            f.over
                .map(|o| o.duration_since(f.at).as_secs_f64() * 1000.0)
        })
        .collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return json!(null);
    }
    let round = |x: f64| (x * 10.0).round() / 10.0;
    json!({
        "n": v.len(),
        "p50": round(v[(v.len() - 1) / 2]),
        "max": round(v[v.len() - 1]),
    })
}

fn print_figures(v: Value) {
    eprintln!("CHAOS-FIGURES: {v}");
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn seeded_rng() -> (StdRng, u64) {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    (StdRng::seed_from_u64(seed), seed)
}

/// Users keep their worker: the router's answer after the run equals the one before.
fn assert_users_kept_their_worker(g: &GatewayProc, known: &[usize]) {
    let mut c = Client::new(g);
    let moved: Vec<_> = (0..USERS)
        .filter_map(|u| {
            let now = lookup(&mut c, u);
            (now != known[u]).then(|| format!("{}: worker-{} -> worker-{now}", user(u), known[u]))
        })
        .collect();
    assert!(moved.is_empty(), "users moved: {moved:?}");
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 of a random worker every 200 ms for 10 s.

#[test]
fn kill_9_every_200ms_for_10s_fails_only_what_the_victims_held() {
    let _serial = serial();
    let started = Instant::now();
    let (mut rng, seed) = seeded_rng();
    let mut g = GatewayProc::start_overriding(
        Options::new(WORKERS)
            .args(&NO_RECYCLE)
            .args(&["--max-restart-attempts", "100000"]),
        &TIMINGS,
    );
    g.wait_ready();
    let gpid = g.pid();
    let segments = segment_names(&g);
    let known = learn_workers(&g);
    let before = counters(&g.status());
    let mut skipped = 0usize;

    let (recs, w) = under_load(&g, known.clone(), |ld, w| {
        let chaos_end = Instant::now() + Duration::from_secs(10);
        let mut next = Instant::now();
        while Instant::now() < chaos_end {
            // Pace: one kill per 200 ms (load generation, not synchronisation).
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next += Duration::from_millis(200);
            let st = g.status();
            let alive: Vec<(usize, u32)> = (0..WORKERS)
                .filter_map(|s| slot_view(&st, s).1.map(|p| (s, p)))
                .collect();
            if alive.is_empty() {
                skipped += 1;
                continue;
            }
            let (slot, pid) = alive[rng.random_range(0..alive.len())];
            let Some(fd) = pin_worker(gpid, &segments[slot], pid) else {
                // It died (and was reaped) since the status: nothing to kill.
                skipped += 1;
                continue;
            };
            let at = Instant::now();
            if signal(&fd, Signal::KILL) {
                w.faults().push(Fault {
                    kind: "kill",
                    slot,
                    pid,
                    at,
                    over: None,
                    replaced: false,
                    watched: true,
                });
            } else {
                skipped += 1;
            }
        }
        wait_until("every killed worker replaced", || {
            w.faults().iter().all(|f| f.over.is_some())
        });
        ld.wait_all_served_since("every user served after the chaos", Instant::now());
    });

    w.assert_gateway_stayed_up(&g);
    let faults = w.faults.into_inner().expect("lock");
    let (failures, per_slot) = attribute(&recs, &known, &faults);
    assert_no_failures("kill -9 chaos", &failures, &g);

    let after = counters(&g.status());
    let mut kills = vec![0usize; WORKERS];
    for f in &faults {
        kills[f.slot] += 1;
    }
    for s in 0..WORKERS {
        // Each kill hit a live worker of this slot: one crash each, and one respawn each.
        assert_eq!(
            after[s].0 - before[s].0,
            kills[s] as u64,
            "worker-{s}: crashes vs kills\n{}\n{}",
            describe_faults(&faults),
            lifecycle_log(&g)
        );
        assert_eq!(
            after[s].1 - before[s].1,
            kills[s] as u64,
            "worker-{s}: restarts vs kills"
        );
        let (errors, crashed) = per_slot[s];
        // Only what the dead process held can fail: at most max_concurrent per kill; and the
        // worker takes one request at a time, so at most one WORKER_CRASHED per kill.
        assert!(
            errors <= MAX_CONCURRENT * kills[s],
            "worker-{s}: {errors} errors for {} kills",
            kills[s]
        );
        assert!(
            crashed <= kills[s],
            "worker-{s}: {crashed} WORKER_CRASHED for {} kills",
            kills[s]
        );
    }
    assert!(
        kills.iter().sum::<usize>() >= 10,
        "too few kills landed: {kills:?} (skipped {skipped})"
    );
    assert_users_kept_their_worker(&g, &known);
    settle_and_stop(&mut g, &segments);

    print_figures(json!({
        "scenario": "kill -9 a random worker every 200 ms for 10 s",
        "seed": seed,
        "workers": WORKERS,
        "users": USERS,
        "clientThreads": THREADS,
        "faultsInjected": faults.len(),
        "killsPerWorker": kills,
        "skippedTicks": skipped,
        "requestsSent": recs.len(),
        "requestsOk": recs.iter().filter(|r| r.status == 200).count(),
        "errorsByKind": errors_by_kind(&recs),
        "errorsPerWorker": per_slot.iter().map(|p| p.0).collect::<Vec<_>>(),
        "livezProbes": w.probes.load(Ordering::Relaxed),
        "recoveryMs": recovery_ms(&faults),
        // The first kill of each slot: the restart delay has not grown yet (20 ms; under
        // repeated kills it grows ×1.5 per consecutive crash to the 200 ms cap of the test
        // timings, which dominates the figure above).
        "firstKillRecoveryMs": recovery_ms(
            (0..WORKERS).filter_map(|s| faults.iter().find(|f| f.slot == s))
        ),
        "testSeconds": started.elapsed().as_secs_f64().round(),
    }));
}

// ---------------------------------------------------------------------------------------------
// 2. SIGSTOP / SIGCONT.

/// How a SIGSTOP cycle ends.
#[derive(Debug, Clone, Copy)]
enum Hold {
    /// SIGCONT after a moment, well under the stall timeout: the worker resumes.
    Brief,
    /// Held until the monitor replaced the stalled worker (SIGCONT then reaches nothing).
    UntilReplaced,
}

#[test]
fn sigstop_sigcont_cycles_replace_only_stalled_workers() {
    let _serial = serial();
    let started = Instant::now();
    let (mut rng, seed) = seeded_rng();
    let mut g = GatewayProc::start_overriding(
        Options::new(WORKERS)
            .args(&NO_RECYCLE)
            .args(&["--max-restart-attempts", "100000"]),
        &[TIMINGS[0], ("--stall-timeout", "400ms")],
    );
    g.wait_ready();
    let gpid = g.pid();
    let segments = segment_names(&g);
    let known = learn_workers(&g);
    let before = counters(&g.status());
    // (hold, how many workers at once)
    let cycles = [
        (Hold::UntilReplaced, 1),
        (Hold::Brief, 1),
        (Hold::UntilReplaced, 2),
        (Hold::Brief, 2),
        (Hold::UntilReplaced, 1),
        (Hold::Brief, 1),
    ];

    let (recs, w) = under_load(&g, known.clone(), |ld, w| {
        for (hold, n) in cycles {
            let st = g.status();
            let mut slots: Vec<usize> = (0..WORKERS).collect();
            let mut stopped = Vec::new();
            for _ in 0..n {
                let slot = slots.remove(rng.random_range(0..slots.len()));
                let pid = slot_view(&st, slot).1.expect("a ready slot has a pid");
                let fd = pin_worker(gpid, &segments[slot], pid).expect("the worker");
                let at = Instant::now();
                assert!(signal(&fd, Signal::STOP), "SIGSTOP {pid}");
                let i = {
                    let mut f = w.faults();
                    f.push(Fault {
                        kind: "stop",
                        slot,
                        pid,
                        at,
                        over: None,
                        replaced: false,
                        watched: false,
                    });
                    f.len() - 1
                };
                stopped.push((i, slot, pid, fd));
            }
            let cont_ms = match hold {
                Hold::Brief => {
                    // Hold the requests a moment (load generation), then let go.
                    std::thread::sleep(Duration::from_millis(60));
                    let t = epoch_ms();
                    for (_, _, pid, fd) in &stopped {
                        assert!(signal(fd, Signal::CONT), "SIGCONT {pid}");
                    }
                    Some(t)
                }
                Hold::UntilReplaced => None,
            };
            for (i, slot, pid, fd) in &stopped {
                // Over when the slot serves again: with another process, or (after SIGCONT)
                // with this one, heartbeating again as seen by the monitor.
                let mut replaced = false;
                wait_until("the stopped worker's slot serving again", || {
                    let (state, now, hb) = slot_view(&g.status(), *slot);
                    replaced = now.is_some_and(|p| p != *pid);
                    serving(&state)
                        && (replaced || cont_ms.is_some_and(|t| now == Some(*pid) && hb > t))
                });
                let mut f = w.faults();
                f[*i].over = Some(Instant::now());
                f[*i].replaced = replaced;
                drop(f);
                // A replaced worker was SIGKILLed by the monitor: nothing to resume.
                if matches!(hold, Hold::UntilReplaced) {
                    assert!(replaced, "worker-{slot} was never replaced");
                    let _ = signal(fd, Signal::CONT);
                }
            }
        }
        ld.wait_all_served_since("every user served after the chaos", Instant::now());
    });

    w.assert_gateway_stayed_up(&g);
    let faults = w.faults.into_inner().expect("lock");
    let (failures, per_slot) = attribute(&recs, &known, &faults);
    assert_no_failures("SIGSTOP/SIGCONT chaos", &failures, &g);

    let after = counters(&g.status());
    let mut replaced = [0usize; WORKERS];
    for f in faults.iter().filter(|f| f.replaced) {
        replaced[f.slot] += 1;
    }
    for s in 0..WORKERS {
        // A stall is counted as a crash; a worker that resumed in time is no crash.
        assert_eq!(
            after[s].0 - before[s].0,
            replaced[s] as u64,
            "worker-{s}: crashes vs replaced stops\n{}\n{}",
            describe_faults(&faults),
            lifecycle_log(&g)
        );
        assert!(
            per_slot[s].0 <= MAX_CONCURRENT * replaced[s],
            "worker-{s}: {} errors for {} replacements",
            per_slot[s].0,
            replaced[s]
        );
        assert!(per_slot[s].1 <= replaced[s], "worker-{s}: {per_slot:?}");
    }
    for (s, n) in replaced.iter().enumerate() {
        let reasons = restart_reasons(g.base(), s);
        let stalls = reasons.iter().filter(|r| *r == "stalled").count();
        assert_eq!(stalls, *n, "worker-{s}: {reasons:?}");
    }
    assert_users_kept_their_worker(&g, &known);
    settle_and_stop(&mut g, &segments);

    let resumed = faults.iter().filter(|f| !f.replaced).count();
    print_figures(json!({
        "scenario": "SIGSTOP/SIGCONT (stall timeout 400 ms)",
        "seed": seed,
        "faultsInjected": faults.len(),
        "replacedAfterStall": faults.len() - resumed,
        "resumedInTime": resumed,
        "requestsSent": recs.len(),
        "requestsOk": recs.iter().filter(|r| r.status == 200).count(),
        "errorsByKind": errors_by_kind(&recs),
        "recoveryMs": recovery_ms(&faults),
        "testSeconds": started.elapsed().as_secs_f64().round(),
    }));
}

// ---------------------------------------------------------------------------------------------
// 3. A worker past max_memory.

#[test]
fn a_worker_past_max_memory_is_recycled_and_nothing_is_lost() {
    let _serial = serial();
    let started = Instant::now();
    let mut g = GatewayProc::start_overriding(
        Options::new(WORKERS)
            .args(&NO_RECYCLE)
            .args(&["--max-memory", "64MiB"]),
        &TIMINGS,
    );
    g.wait_ready();
    let segments = segment_names(&g);
    let known = learn_workers(&g);
    let victim_user = 0;
    let victim = known[victim_user];
    let old_pid = g.worker_pids()[victim].expect("pid");
    let before = counters(&g.status());
    let mut alloc: Option<Resp> = None;

    let (recs, w) = under_load(&g, known.clone(), |ld, w| {
        let mut c = Client::new(&g);
        let body = json!({
            "type": "test",
            "userId": user(victim_user),
            "payload": {"action": "alloc", "mib": 96},
        })
        .to_string();
        let at = Instant::now();
        w.faults().push(Fault {
            kind: "alloc",
            slot: victim,
            pid: old_pid,
            at,
            over: None,
            replaced: false,
            watched: true,
        });
        alloc = Some(c.call(
            "POST",
            "/v1/route",
            &[("content-type", "application/json")],
            body.as_bytes(),
        ));
        wait_until("the recycled worker replaced", || {
            w.faults().iter().all(|f| f.over.is_some())
        });
        ld.wait_all_served_since("every user served after the recycle", Instant::now());
    });

    w.assert_gateway_stayed_up(&g);
    // The request that allocated is answered: the worker finishes it, then leaves on SIGTERM.
    let a = alloc.expect("the alloc request was sent");
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.worker_slot(), Some(victim));
    let v = a.json().expect("JSON");
    assert_eq!(v["success"].as_bool(), Some(true), "{v}");
    assert_eq!(v["payload"]["allocatedMib"].as_u64(), Some(96), "{v}");
    // Nothing lost: every request of every user, the victim's included, answered 200.
    let bad: Vec<String> = recs
        .iter()
        .filter(|r| r.status != 200 || r.problem.is_some())
        .map(|r| {
            format!(
                "{} [{}] {:?} {:?}",
                user(r.user),
                r.status,
                r.code,
                r.problem
            )
        })
        .collect();
    assert_no_failures("a recycle past max_memory", &bad, &g);

    let after = counters(&g.status());
    for s in 0..WORKERS {
        assert_eq!(after[s].0, before[s].0, "worker-{s}: a recycle is no crash");
        let restarts = if s == victim { 1 } else { 0 };
        assert_eq!(after[s].1 - before[s].1, restarts, "worker-{s}: restarts");
    }
    assert_ne!(g.worker_pids()[victim], Some(old_pid));
    let reasons = restart_reasons(g.base(), victim);
    assert_eq!(
        reasons.last().map(String::as_str),
        Some("recycled: max_memory")
    );
    assert_users_kept_their_worker(&g, &known);
    let faults = w.faults.into_inner().expect("lock");
    settle_and_stop(&mut g, &segments);

    print_figures(json!({
        "scenario": "one worker allocates 96 MiB past max_memory 64 MiB",
        "faultsInjected": 1,
        "requestsSent": recs.len() + 1,
        "requestsOk": recs.iter().filter(|r| r.status == 200).count() + 1,
        "errorsByKind": errors_by_kind(&recs),
        "recoveryMs": recovery_ms(&faults),
        "testSeconds": started.elapsed().as_secs_f64().round(),
    }));
}

// ---------------------------------------------------------------------------------------------
// 4. A crash loop into `failed`, then the cool-down.

#[test]
fn a_crash_loop_fails_the_slot_with_503_then_it_serves_again() {
    let _serial = serial();
    let started = Instant::now();
    let mut g = GatewayProc::start_overriding(
        Options::new(WORKERS).args(&NO_RECYCLE).args(&[
            "--max-restart-attempts",
            "2",
            "--failed-cooldown",
            "2s",
        ]),
        &TIMINGS,
    );
    g.wait_ready();
    let segments = segment_names(&g);
    let known = learn_workers(&g);
    let victim_user = 0;
    let victim = known[victim_user];
    let victim_users: Vec<usize> = (0..USERS).filter(|u| known[*u] == victim).collect();
    let before = counters(&g.status());
    let mut crash_answers = Vec::new();
    let mut failed_probe: Option<Resp> = None;
    let mut readyz_while_failed = 0;
    let mut window = (Instant::now(), Instant::now());
    let mut surely_failed: Option<(Instant, Instant)> = None;
    let mut recovery = Duration::ZERO;

    let (recs, w) = under_load(&g, known.clone(), |ld, _w| {
        let mut c = Client::new(&g);
        let body = json!({
            "type": "test",
            "userId": user(victim_user),
            "payload": {"action": "crash"},
        })
        .to_string();
        // max_restart_attempts + 1 = 3 crashes within the restart window fail the slot. Each
        // crash request is taken by the worker, which aborts; its answer comes after the
        // monitor decided. After the first two the successor is awaited; the restart history
        // checked at the end proves that the third one, not an earlier one, failed the slot.
        let mut failed_at = Instant::now();
        for n in 1..=3 {
            failed_at = Instant::now();
            let r = c.call(
                "POST",
                "/v1/route",
                &[("content-type", "application/json")],
                body.as_bytes(),
            );
            crash_answers.push((r.status, r.worker_slot(), r.json().unwrap_or_default()));
            if n < 3 {
                wait_until("the crashed worker replaced", || {
                    serving(&slot_view(&g.status(), victim).0)
                });
            }
        }
        // Failed: the victim's users are refused at once, with a hint when to come back. What
        // happens between two statuses that both say `failed` happened while failed (it
        // cannot fail again without a crash); should the machine stall past the 2 s
        // cool-down, these checks prove nothing and are skipped rather than fail.
        let seen_failed = slot_view(&g.status(), victim).0 == "failed";
        let from = Instant::now();
        let probe = c.call(
            "POST",
            "/v1/echo",
            &[("x-moltbot-user", &user(victim_user))],
            b"while failed",
        );
        let readyz = c.call("GET", "/readyz", &[], b"").status;
        let until = Instant::now();
        let st = g.status();
        if seen_failed && slot_view(&st, victim).0 == "failed" {
            assert_eq!(st["healthyWorkers"].as_u64(), Some(WORKERS as u64 - 1));
            failed_probe = Some(probe);
            readyz_while_failed = readyz;
            surely_failed = Some((from, until));
        }
        wait_until("the failed slot retried after its cool-down", || {
            serving(&slot_view(&g.status(), victim).0)
        });
        let back = Instant::now();
        window = (failed_at, back);
        recovery = back.duration_since(failed_at);
        ld.wait_all_served_since("every user served after the cool-down", back);
        // The victim's users are served by the same slot again.
        for u in &victim_users {
            let r = c.call(
                "POST",
                "/v1/echo",
                &[("x-moltbot-user", &user(*u))],
                b"back",
            );
            assert_eq!(
                (r.status, r.worker_slot()),
                (200, Some(victim)),
                "{}",
                r.text()
            );
        }
    });

    w.assert_gateway_stayed_up(&g);
    // Exactly max_restart_attempts + 1 crashes within the window fail the slot; each crash
    // request is the one the worker had taken: 502 WORKER_CRASHED, in /v1/route's shape.
    assert_eq!(crash_answers.len(), 3, "{crash_answers:?}");
    for (status, worker, v) in &crash_answers {
        assert_eq!((*status, *worker), (502, Some(victim)), "{v}");
        assert_eq!(v["success"].as_bool(), Some(false), "{v}");
        assert_eq!(v["errorCode"].as_str(), Some("WORKER_CRASHED"), "{v}");
        assert_eq!(
            v["workerId"].as_str(),
            Some(format!("worker-{victim}").as_str())
        );
    }
    let probed = failed_probe.is_some();
    if let Some(p) = failed_probe {
        assert_eq!(p.status, 503, "{}", p.text());
        assert_eq!(p.worker_slot(), Some(victim));
        assert_eq!(gateway_error(&p).as_deref(), Ok("UNAVAILABLE"));
        let retry_after: u64 = p
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After");
        assert!(
            (1..=2).contains(&retry_after),
            "Retry-After {retry_after} for a 2 s cool-down"
        );
        let ms = p.json().expect("JSON")["error"]["retryAfterMs"]
            .as_u64()
            .expect("retryAfterMs");
        assert!((1..=2000).contains(&ms), "retryAfterMs {ms}");
        assert_eq!(readyz_while_failed, 503, "/readyz while a slot is failed");
    }

    // The other users: zero errors. The victim's: only 503 UNAVAILABLE (+ Retry-After, checked
    // per answer by the load), only from the crash that failed the slot until it was back.
    let mut bad = Vec::new();
    let mut refused = 0usize;
    for r in &recs {
        if r.status == 200 && r.problem.is_none() {
            continue;
        }
        let ok = known[r.user] == victim
            && r.problem.is_none()
            && r.status == 503
            && r.code.as_deref() == Some("UNAVAILABLE")
            && r.end >= window.0
            && r.start <= window.1;
        if ok {
            refused += 1;
        } else {
            bad.push(format!(
                "{} (worker-{}) [{}] {:?} {:?}",
                user(r.user),
                known[r.user],
                r.status,
                r.code,
                r.problem
            ));
        }
    }
    // And while the slot was surely failed, none of them was served.
    if let Some((from, until)) = surely_failed {
        for r in &recs {
            if known[r.user] == victim && r.start >= from && r.end <= until && r.status != 503 {
                bad.push(format!(
                    "{} served while failed: {}",
                    user(r.user),
                    r.status
                ));
            }
        }
    }
    assert_no_failures("crash loop into failed", &bad, &g);

    let after = counters(&g.status());
    for s in 0..WORKERS {
        // Two respawns, then failed, then one retry after the cool-down.
        let (crashes, restarts) = if s == victim { (3, 3) } else { (0, 0) };
        assert_eq!(after[s].0 - before[s].0, crashes, "worker-{s}: crashes");
        assert_eq!(after[s].1 - before[s].1, restarts, "worker-{s}: restarts");
    }
    let reasons = restart_reasons(g.base(), victim);
    assert_eq!(
        reasons[reasons.len() - 3..],
        [
            "crashed: signal 6",
            "crashed: signal 6",
            "retried: after failed cool-down"
        ],
        "{reasons:?}"
    );
    assert_users_kept_their_worker(&g, &known);
    settle_and_stop(&mut g, &segments);

    print_figures(json!({
        "scenario": "crash loop into failed (max_restart_attempts 2, failed_cooldown 2 s)",
        "faultsInjected": crash_answers.len(),
        "requestsSent": recs.len() + crash_answers.len() + 1 + victim_users.len(),
        "requestsOk": recs.iter().filter(|r| r.status == 200).count() + victim_users.len(),
        "errorsByKind": errors_by_kind(&recs),
        "victimUsers": victim_users.len(),
        "victimRequestsRefused503": refused,
        "probedWhileFailed": probed,
        "failedToServingMs": recovery.as_millis() as u64,
        "testSeconds": started.elapsed().as_secs_f64().round(),
    }));
}
