//! A real OpenClaw gateway (npm `openclaw` 2026.9.6 on Node 24) run as a cell: started in a
//! directory of its own, reached with the backend client, stopped, killed.
//!
//! Needs Node 24 (`MOLTBOT_TEST_NODE_DIR`, installed by tools/install-test-node) and the
//! openclaw package (`MOLTBOT_TEST_OPENCLAW_DIR`, installed by tools/install-openclaw); both
//! default to `${XDG_CACHE_HOME:-$HOME/.cache}/moltbot-test/…`. tools/test installs both.
//! Each cell takes 15–30 s to start and ~800 MB of memory.

mod common;
mod node;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use moltbot::cell::{BackendClient, Cell, CellError, CellSpec, Frame};
use rand::Rng;

/// How long a cell may take to be ready (`/readyz`) on a loaded 2-core machine (it takes 15–30 s
/// alone).
const READY: Duration = Duration::from_secs(120);

/// How long the cell has to stop after SIGTERM before it is killed: it drains its work first
/// (10–30 s under load).
const GRACE: Duration = Duration::from_secs(60);

/// How long one answer may take.
const ANSWER: Duration = Duration::from_secs(60);

/// Node 24 and openclaw.mjs; panics with how to install them.
fn installed() -> (PathBuf, PathBuf) {
    node::openclaw()
}

fn spec(root: &Path) -> CellSpec {
    let (node, openclaw) = installed();
    let token: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    CellSpec {
        node,
        openclaw,
        root: root.to_path_buf(),
        port: node::free_cell_port_base(1),
        token,
        env_allow: Vec::new(),
        cpus: Vec::new(),
    }
}

/// Starts a cell and waits until it serves; prints how long that took and its memory.
fn started(spec: &CellSpec) -> Cell {
    let t0 = Instant::now();
    let cell = ready(spec);
    println!(
        "cell on port {} ready after {:.1} s, {} processes, {} MiB resident",
        spec.port,
        t0.elapsed().as_secs_f64(),
        cell.processes().len(),
        cell.rss_bytes() >> 20
    );
    cell
}

/// Starts a cell and waits until it serves, without listing its processes.
fn ready(spec: &CellSpec) -> Cell {
    let cell = Cell::start(spec).expect("start the cell");
    if let Err(e) = cell.wait_ready(Instant::now() + READY) {
        let log = std::fs::read_to_string(cell.log_path()).unwrap_or_default();
        panic!("{e}\n--- cell.log ---\n{log}");
    }
    cell
}

/// Pids whose environment names `root` (the cell's processes carry OPENCLAW_STATE_DIR=root/…):
/// found without the cell's own bookkeeping.
fn processes_with_env(root: &Path) -> Vec<u32> {
    let needle = root.to_string_lossy().into_owned();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|p| {
                    common::proc_stat(*p).is_some_and(|(_, state)| state != 'Z')
                        && std::fs::read(format!("/proc/{p}/environ"))
                            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
                })
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids
}

/// The shared places an OpenClaw process writes to when nothing tells it otherwise: every
/// `/tmp/openclaw*` (the default log directory `/tmp/openclaw`, its per-user fallback, the
/// lifecycle locks), `/var/tmp/openclaw*` and `~/.openclaw` of this process's HOME.
fn shared_places() -> Vec<PathBuf> {
    let mut places = Vec::new();
    for dir in ["/tmp", "/var/tmp"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            places.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("openclaw"))
                    .map(|e| e.path()),
            );
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        places.push(PathBuf::from(home).join(".openclaw"));
    }
    places
}

/// Every file under the shared places, with its size and modification time.
fn snapshot() -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
    fn walk(path: &Path, out: &mut BTreeMap<PathBuf, (u64, Option<SystemTime>)>) {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(path) {
                for e in entries.filter_map(Result::ok) {
                    walk(&e.path(), out);
                }
            }
        } else {
            out.insert(path.to_path_buf(), (meta.len(), meta.modified().ok()));
        }
    }
    let mut out = BTreeMap::new();
    for place in shared_places() {
        walk(&place, &mut out);
    }
    out
}

/// The files in the shared places created or changed since `before` that are the cell's:
/// lock files named after its state database, or files that mention its root (its log lines
/// name its paths). Other OpenClaw processes of the machine may write there meanwhile; their
/// files mention neither.
fn written_by_cell(
    before: &BTreeMap<PathBuf, (u64, Option<SystemTime>)>,
    cell_locks: &[PathBuf],
    root: &Path,
) -> Vec<PathBuf> {
    let needle = root.to_string_lossy().into_owned();
    snapshot()
        .into_iter()
        .filter(|(path, now)| before.get(path) != Some(now))
        .map(|(path, _)| path)
        .filter(|path| {
            cell_locks.contains(path)
                || std::fs::read(path).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// Reads frames until the answer to `id` that ends the request (for `agent`, the one after
/// `accepted`); returns it and everything that came before it.
fn answer(client: &mut BackendClient, id: &str) -> (Frame, Vec<Frame>) {
    let deadline = Instant::now() + ANSWER;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no final answer to {id} within {ANSWER:?}");
        let frame = client
            .next_frame(left)
            .expect("the connection to the cell")
            .unwrap_or_else(|| panic!("no final answer to {id} within {ANSWER:?}: {before:#?}"));
        if let Frame::Res {
            id: rid,
            ok,
            payload_raw,
            ..
        } = &frame
            && rid == id
        {
            let accepted = *ok
                && payload_raw
                    .as_ref()
                    .is_some_and(|p| p.get().contains(r#""status":"accepted""#));
            if !accepted {
                return (frame, before);
            }
        }
        before.push(frame);
    }
}

fn show(frame: &Frame) -> String {
    let raw = match frame {
        Frame::Res { raw, .. } | Frame::Event { raw, .. } => raw,
    };
    let mut s: String = raw.chars().take(600).collect();
    if s.len() < raw.len() {
        s.push_str(&format!("… ({} bytes)", raw.len()));
    }
    s
}

fn json(raw: &serde_json::value::RawValue) -> serde_json::Value {
    serde_json::from_str(raw.get()).expect("JSON")
}

#[test]
fn a_real_cell_serves_a_backend_client_and_stops_cleanly() {
    let dir = tempfile::Builder::new()
        .prefix("moltbot-cell-test-")
        .tempdir()
        .expect("temporary directory");
    let root = dir.path().join("cell");
    let spec = spec(&root);
    let before = snapshot();
    let mut cell = started(&spec);
    let root = cell.root().to_path_buf();

    // What the cell holds outside its root while it runs: its lifecycle locks, nothing else.
    let locks = cell.shared_lock_files();
    println!("shared lock files: {locks:?}");
    assert!(
        !locks.is_empty(),
        "a running cell holds lifecycle locks in /tmp/openclaw-state-locks-UID: if it no \
         longer does, the cleanup in Cell and this check are out of date"
    );
    // The check below finds the cell's writes: while it runs it finds the locks.
    let written = written_by_cell(&before, &locks, &root);
    assert!(
        locks
            .iter()
            .all(|l| written.contains(l) || before.contains_key(l)),
        "{written:?}"
    );

    // A wrong token is refused with the cell's own error.
    let refused = BackendClient::connect(spec.port, "not-the-token", ANSWER);
    println!("wrong token: {refused:?}");
    assert!(
        matches!(refused, Err(moltbot::cell::ClientError::Rejected { .. })),
        "{refused:?}"
    );

    let mut client = BackendClient::connect(spec.port, &spec.token, ANSWER).expect("connect");
    let hello = json(client.hello_raw());
    assert_eq!(hello["type"], "hello-ok");
    assert_eq!(hello["protocol"], 4);
    let scopes = &hello["auth"]["scopes"];
    println!(
        "hello-ok: server {}, auth {}, policy {}, {} methods",
        hello["server"],
        hello["auth"],
        hello["policy"],
        hello["features"]["methods"].as_array().map_or(0, Vec::len)
    );
    for scope in moltbot::cell::client::SCOPES {
        assert!(
            scopes
                .as_array()
                .is_some_and(|s| s.iter().any(|x| x == scope)),
            "{scope} not granted: {scopes}"
        );
    }

    for (id, method, params) in [
        ("h1", "health", None),
        ("s1", "status", Some("{}")),
        ("l1", "sessions.list", Some("{}")),
    ] {
        client.send_request(id, method, params).expect("send");
        let (res, others) = answer(&mut client, id);
        println!("{method}: {}", show(&res));
        for f in &others {
            println!("  meanwhile: {}", show(f));
        }
        let Frame::Res {
            ok, payload_raw, ..
        } = &res
        else {
            unreachable!()
        };
        assert!(ok, "{method} failed: {}", show(&res));
        assert!(
            payload_raw.as_ref().is_some_and(|p| json(p).is_object()),
            "{method}: {}",
            show(&res)
        );
    }

    // `agent` with no model key configured: the run cannot start, and the cell says so.
    let params = r#"{"message":"hi","idempotencyKey":"k1"}"#;
    client
        .send_request("a1", "agent", Some(params))
        .expect("send agent");
    let (res, others) = answer(&mut client, "a1");
    for f in &others {
        println!("agent, before its final answer: {}", show(f));
    }
    println!("agent final answer: {}", show(&res));
    let Frame::Res { ok, error_raw, .. } = &res else {
        unreachable!()
    };
    assert!(
        !ok,
        "an agent run without a model key succeeded: {}",
        show(&res)
    );
    let error = json(error_raw.as_ref().expect("an error object"));
    assert_eq!(error["code"], "UNAVAILABLE", "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("authentication source")),
        "{error}"
    );
    // Whatever came for the run before the answer names it by its idempotency key.
    for f in &others {
        if let Frame::Res {
            id, payload_raw, ..
        } = f
            && id == "a1"
        {
            let p = json(payload_raw.as_ref().expect("accepted payload"));
            assert_eq!(p["runId"], "k1", "{p}");
        }
    }

    let rss = cell.rss_bytes();
    println!(
        "after the requests: {} processes, {} MiB resident",
        cell.processes().len(),
        rss >> 20
    );
    assert!(
        rss > 50 << 20,
        "a running gateway is larger than {rss} bytes"
    );

    client.close(ANSWER).expect("close");
    // The cell's processes as Cell sees them (its group) and as found by their environment
    // agree, once no helper is starting or ending between the two reads.
    let mut members = Vec::new();
    common::wait_until(
        ANSWER,
        "the same processes by group and by environment",
        || {
            members = cell.processes();
            let mut by_env: Vec<i32> = processes_with_env(&root)
                .into_iter()
                .map(|p| p as i32)
                .collect();
            by_env.sort_unstable();
            members.sort_unstable();
            members == by_env
        },
    );
    assert!(members.contains(&(cell.pid() as i32)), "{members:?}");

    let stopped = cell.stop(GRACE).expect("stop");
    println!("stopped: {stopped:?}");
    assert!(stopped.graceful, "SIGTERM was not enough: {stopped:?}");
    assert!(!cell.is_alive());
    assert!(cell.processes().is_empty());
    for pid in &members {
        assert!(
            common::proc_stat(*pid as u32).is_none_or(|(_, state)| state == 'Z'),
            "process {pid} of the cell survived its stop"
        );
    }
    assert_eq!(processes_with_env(&root), Vec::<u32>::new());
    assert_eq!(cell.shared_lock_files(), Vec::<PathBuf>::new());
    let written = written_by_cell(&before, &locks, &root);
    assert!(
        written.is_empty(),
        "the cell wrote outside its root: {written:?}"
    );

    // What the cell wrote, and where: all of it under the root.
    for sub in ["home", "state", "tmp", "logs"] {
        let (mut files, mut bytes) = (0u64, 0u64);
        let mut stack = vec![root.join(sub)];
        while let Some(p) = stack.pop() {
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                stack.extend(
                    std::fs::read_dir(&p)
                        .unwrap()
                        .filter_map(|e| Some(e.ok()?.path())),
                );
            } else {
                files += 1;
                bytes += meta.len();
            }
        }
        println!("{sub}: {files} files, {} KiB", bytes >> 10);
    }
    let log = std::fs::read_to_string(root.join("logs/openclaw.log")).expect("the gateway log");
    assert!(log.lines().count() > 3, "{log}");
    assert!(!log.contains(&spec.token), "the token was logged");
}

#[test]
fn a_killed_cell_is_seen_dead_and_its_group_goes_with_it() {
    let dir = tempfile::Builder::new()
        .prefix("moltbot-cell-test-")
        .tempdir()
        .expect("temporary directory");
    let spec = spec(&dir.path().join("cell"));
    let cell = ready(&spec);
    let root = cell.root().to_path_buf();
    let pid = cell.pid();
    // The main process's descendants, found here rather than through `processes()`, which
    // would make the cell look at its members: `is_alive()` has to do that by itself.
    let helpers: Vec<i32> = moltbot_ipc::process::descendants(pid)
        .into_iter()
        .map(|p| p as i32)
        .collect();
    println!("main {pid}, helpers {helpers:?}");
    // The cell looks at its members at most once a second while it is asked whether it
    // runs: ask for longer than that, so that it has looked since the helpers started.
    let asked = Instant::now();
    common::wait_until(
        Duration::from_secs(30),
        "the cell asked whether it runs for 3 s",
        || cell.is_alive() && asked.elapsed() >= Duration::from_secs(3),
    );

    // Stopped, the helpers cannot end by themselves when the main process dies (as they do,
    // sooner or later): whatever still exists below was left to the cell to end.
    for p in helpers
        .iter()
        .filter_map(|&p| rustix::process::Pid::from_raw(p))
    {
        // A helper may have ended already.
        let _ = rustix::process::kill_process(p, rustix::process::Signal::STOP);
    }
    common::kill9(pid);
    common::wait_until(
        Duration::from_secs(30),
        "is_alive() false after kill -9",
        || !cell.is_alive(),
    );
    // The main process is not reaped while its Cell lives: its pid stays reserved, so the
    // group id cannot name anyone else's group.
    assert!(common::is_our_child(pid));
    let left = cell.processes();
    println!("after kill -9 of the main process, still running: {left:?}");
    // Helpers that started a session of their own are handed to init when the main process
    // dies: the cell still counts them (and its drop kills them).
    for p in helpers.iter().filter(|p| !left.contains(p)) {
        assert!(
            common::proc_stat(*p as u32).is_none_or(|(_, state)| state == 'Z'),
            "process {p} of the cell still runs but is no longer counted as the cell's"
        );
    }

    let locks = cell.shared_lock_files();
    drop(cell);
    assert!(!common::is_our_child(pid), "the main process was reaped");
    for p in left.iter().chain(&helpers) {
        assert!(
            common::proc_stat(*p as u32).is_none_or(|(_, state)| state == 'Z'),
            "process {p} of the killed cell survived its drop"
        );
    }
    assert_eq!(processes_with_env(&root), Vec::<u32>::new());
    for l in &locks {
        assert!(!l.exists(), "{} left behind", l.display());
    }
}

#[test]
fn a_cell_that_cannot_start_is_reported_with_its_log() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut spec = spec(&dir.path().join("cell"));
    // Node exits at once: the script does not exist.
    spec.openclaw = dir.path().join("missing.mjs");
    let mut cell = Cell::start(&spec).expect("the process starts");
    let t0 = Instant::now();
    match cell.wait_ready(Instant::now() + READY) {
        Err(CellError::Exited { status, log }) => {
            assert_eq!(status, "exit code 1");
            let text = std::fs::read_to_string(&log).expect("cell.log");
            assert!(text.contains("missing.mjs"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < READY);
    let stopped = cell.stop(GRACE).expect("stop");
    assert_eq!(stopped.status, "exit code 1");
    // The config the cell was given sends the gateway's log into its root.
    let config =
        std::fs::read_to_string(dir.path().join("cell/state/openclaw.json")).expect("config file");
    let v: serde_json::Value = serde_json::from_str(&config).expect("JSON");
    let logs = dir.path().join("cell/logs").canonicalize().unwrap();
    assert_eq!(
        v["logging"]["file"],
        logs.join("openclaw.log").to_str().unwrap()
    );
}
