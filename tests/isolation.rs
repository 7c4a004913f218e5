//! Enforced isolation of real worker processes: Landlock as
//! `/status` reports it and as a worker experiences it (the test-only `escape` and `signal`
//! probes), the shared-memory segments a worker maps and their modes, the scrubbed worker
//! environment, and the workers' rlimits, read from `/proc` (the tests run as root).
//!
//! No sleep synchronises anything: a test waits for answers, or polls with `gw::wait_until`.

mod gw;
mod hostile_worker;

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use gw::{GatewayProc, HttpResponse, Options};
use moltbot::worker::isolation::{Enforcement, probe_landlock};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A started gateway (all workers ready) and the bearer token its requests carry, if any.
struct Gw {
    g: GatewayProc,
    token: Option<&'static str>,
}

impl Gw {
    fn start(opts: Options, token: Option<&'static str>) -> Gw {
        let g = GatewayProc::start(opts);
        g.wait_ready();
        Gw { g, token }
    }

    fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> HttpResponse {
        let auth = self.token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("authorization", auth));
        }
        self.g.request(method, path, &headers, body)
    }

    fn status(&self) -> Value {
        let r = self.request("GET", "/status", None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json().expect("status JSON")
    }

    /// `/v1/route` of `kind` for `user`; returns the whole answer (which must be a success).
    fn route(&self, kind: &str, user: &str, payload: Value) -> Value {
        let body = json!({"type": kind, "userId": user, "payload": payload}).to_string();
        let r = self.request("POST", "/v1/route", Some(body.as_bytes()));
        let v: Value = r
            .json()
            .unwrap_or_else(|e| panic!("route {kind}: not JSON ({e}): {}", r.text()));
        assert_eq!(r.status, 200, "route {kind} for {user}: {v}");
        assert_eq!(v["success"], true, "route {kind} for {user}: {v}");
        v
    }

    /// The slot serving `user` (assigning it by a first request).
    fn slot_of(&self, user: &str) -> usize {
        let v = self.route("health:check", user, Value::Null);
        worker_slot(v["workerId"].as_str().expect("workerId"))
    }

    /// Two users served by two different slots: `(user, slot)` each.
    fn users_on_two_workers(&self) -> [(String, usize); 2] {
        let first = ("iso-user-0".to_string(), self.slot_of("iso-user-0"));
        for i in 1..100 {
            let user = format!("iso-user-{i}");
            let slot = self.slot_of(&user);
            if slot != first.1 {
                return [first, (user, slot)];
            }
        }
        panic!("100 users all landed on {}", first.1);
    }

    /// The pid of each slot, once all are running.
    fn worker_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        gw::wait_until("every worker to have a pid", || {
            let st = self.status();
            pids = st["workers"]
                .as_array()
                .expect("workers")
                .iter()
                .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
                .collect();
            pids.len() == st["workers"].as_array().map_or(0, Vec::len)
        });
        pids
    }

    /// `<base>/worker-N`.
    fn sandbox(&self, slot: usize) -> PathBuf {
        self.g.base().join(format!("worker-{slot}"))
    }
}

fn worker_slot(id: &str) -> usize {
    id.strip_prefix("worker-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{id:?} is not worker-N"))
}

/// NUL-separated `/proc` file as strings.
fn proc_strings(pid: u32, file: &str) -> Vec<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/{file}"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/{file}: {e}"));
    bytes
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The value after `flag` on a worker's command line.
fn cmdline_arg(pid: u32, flag: &str) -> Option<String> {
    let args = proc_strings(pid, "cmdline");
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).cloned()
}

/// A worker's own segment name (`/moltbot-...`), from its command line.
fn own_segment(pid: u32) -> String {
    cmdline_arg(pid, "--segment").expect("--segment on the worker's command line")
}

/// The segment names the gateway recorded (`segments.json`), with their leading `/`.
fn recorded_segments(g: &GatewayProc) -> Vec<String> {
    let text = std::fs::read_to_string(g.base().join("segments.json")).expect("segments.json");
    let v: Value = serde_json::from_str(&text).expect("segments.json is JSON");
    v["names"]
        .as_array()
        .expect("names")
        .iter()
        .map(|n| n.as_str().expect("name").to_string())
        .collect()
}

/// `/dev/shm/<name>` of a segment name.
fn shm_path(name: &str) -> PathBuf {
    Path::new("/dev/shm").join(name.trim_start_matches('/'))
}

/// `(soft, hard)` of a row of `/proc/<pid>/limits` (`None` for "unlimited").
fn limit(pid: u32, row: &str) -> (Option<u64>, Option<u64>) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = text
        .lines()
        .find(|l| l.starts_with(row))
        .unwrap_or_else(|| panic!("no {row:?} in /proc/{pid}/limits:\n{text}"));
    let mut cols = line[row.len()..].split_whitespace();
    let mut value = || {
        let c = cols.next().expect("column");
        (c != "unlimited").then(|| c.parse().expect("number"))
    };
    (value(), value())
}

/// Runs the test-only `escape` probe as `user` on `paths`; returns the results by path.
fn escape(g: &Gw, user: &str, paths: &[PathBuf]) -> Vec<(PathBuf, Value)> {
    let paths_json: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let v = g.route(
        "test",
        user,
        json!({"action": "escape", "paths": paths_json}),
    );
    let results = v["payload"]["results"]
        .as_array()
        .unwrap_or_else(|| panic!("escape results: {v}"));
    assert_eq!(results.len(), paths.len(), "{v}");
    paths.iter().cloned().zip(results.iter().cloned()).collect()
}

/// Runs the test-only `signal` probe (`kill(pid, 0)`, nothing delivered) as `user`.
fn may_signal(g: &Gw, user: &str, pids: &[u32]) -> Vec<Value> {
    let v = g.route("test", user, json!({"action": "signal", "pids": pids}));
    v["payload"]["results"]
        .as_array()
        .unwrap_or_else(|| panic!("signal results: {v}"))
        .clone()
}

/// Whether a probe result is a denial by the kernel (`EACCES` for files, `EPERM` for signals),
/// as opposed to success or a path that does not exist.
fn denied(probe: &Value) -> bool {
    probe["ok"] == false
        && probe["error"]
            .as_str()
            .is_some_and(|e| e.contains("os error 13") || e.contains("os error 1)"))
}

/// Whether this kernel enforces Landlock; says so when it does not.
fn kernel_has_landlock() -> bool {
    let probe = probe_landlock();
    if probe.enforced == Enforcement::NotEnforced {
        eprintln!("this kernel has no Landlock: the enforcement checks are skipped");
        return false;
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Landlock
// ---------------------------------------------------------------------------------------------

/// `/status` reports what Landlock enforces on this kernel, and a worker experiences exactly
/// that: it can read, list and create in its own sandbox and read system files, and is denied
/// (EACCES, for paths that exist) another worker's sandbox, the gateway's files in the base
/// directory (routing table, segment record, port file, lock), `/dev/shm` and every segment
/// file in it (its own included: it only keeps its mapping), the gateway's and the other
/// worker's `/proc` entries, `/tmp` and the gateway's binary. With ABI 6 it cannot signal the
/// gateway or the other worker either.
#[test]
fn landlock_confines_each_worker_to_its_own_sandbox() {
    let g = Gw::start(Options::new(2), None);
    let st = g.status();
    let reported = &st["gateway"]["landlock"];
    let probe = probe_landlock();
    assert_eq!(
        reported,
        &serde_json::to_value(probe).expect("probe JSON"),
        "/status reports this kernel's Landlock"
    );
    if !kernel_has_landlock() {
        assert_eq!(reported["enforced"], "notEnforced", "{reported}");
        return;
    }
    // Kernels from 6.12 on (ABI 6) enforce every right this gateway handles, and the scopes.
    if probe.abi >= Some(6) {
        assert_eq!(reported["enforced"], "fullyEnforced", "{reported}");
        assert_eq!(reported["scoped"], true, "{reported}");
    }

    let [(user, slot), (_, other_slot)] = g.users_on_two_workers();
    let pids = g.worker_pids();
    let (own_pid, other_pid) = (pids[slot], pids[other_slot]);
    let gw_pid = g.g.pid();
    let own = g.sandbox(slot);
    let other = g.sandbox(other_slot);
    let base = g.g.base().to_path_buf();
    let own_seg = shm_path(&own_segment(own_pid));
    let other_seg = shm_path(&own_segment(other_pid));

    let allowed_rw = [
        own.clone(),
        own.join("sessions"),
        own.join("state"),
        own.join("temp"),
        own.join("cache"),
    ];
    let allowed_read = [
        own.join("sandbox.json"),
        PathBuf::from("/etc/passwd"),
        PathBuf::from("/usr/lib"),
        PathBuf::from(format!("/proc/{own_pid}/status")),
    ];
    let mut forbidden = vec![
        other.clone(),
        other.join("sandbox.json"),
        other.join("sessions"),
        other.join("state"),
        other.join("logs/worker.log"),
        base.clone(),
        base.join("routing-table.jsonl"),
        base.join("segments.json"),
        base.join("gateway.port"),
        base.join("gateway.lock"),
        PathBuf::from("/dev/shm"),
        own_seg,
        other_seg,
        PathBuf::from(format!("/proc/{gw_pid}/environ")),
        PathBuf::from(format!("/proc/{gw_pid}/cmdline")),
        PathBuf::from(format!("/proc/{other_pid}/environ")),
        PathBuf::from(format!("/proc/{other_pid}/maps")),
        PathBuf::from("/tmp"),
        base.parent().expect("parent").join("gateway.log"),
        PathBuf::from(env!("CARGO_BIN_EXE_moltbot")),
        // Through the worker's own /proc magic links: Landlock checks where they lead.
        PathBuf::from(format!(
            "/proc/{own_pid}/root{}",
            base.join("segments.json").display()
        )),
        PathBuf::from(format!(
            "/proc/{own_pid}/cwd/../worker-{other_slot}/sandbox.json"
        )),
    ];
    // System secrets a worker running as root could otherwise read: the system paths it may
    // read are what programs need (libraries, name resolution, certificates), not all of /etc.
    forbidden.extend(
        [
            "/etc/shadow",
            "/etc/gshadow",
            "/etc/ssl/private",
            "/etc/ssh",
        ]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists()),
    );
    // Each forbidden path exists (so a refusal is a denial, not a missing file).
    for p in &forbidden {
        assert!(
            p.exists(),
            "{} does not exist: the probe would prove nothing",
            p.display()
        );
    }
    // Another worker's session data, to be sure there is something to steal.
    let [_, (other_user, _)] = g.users_on_two_workers();
    g.route("agent:message", &other_user, json!({"message": "private"}));

    let mut paths: Vec<PathBuf> = allowed_rw.to_vec();
    paths.extend(allowed_read.iter().cloned());
    paths.extend(forbidden.iter().cloned());
    let results = escape(&g, &user, &paths);
    let mut problems = Vec::new();
    for (path, r) in &results {
        let p = path.display();
        let is_dir = r["isDir"] == true;
        if allowed_rw.contains(path) {
            for k in ["read", "list", "create"] {
                if r[k]["ok"] != true {
                    problems.push(format!("own {p}: {k} failed: {r}"));
                }
            }
        } else if allowed_read.contains(path) {
            if r["read"]["ok"] != true {
                problems.push(format!("readable {p}: {r}"));
            }
            if is_dir && r["create"]["ok"] != false {
                problems.push(format!("read-only {p} is writable: {r}"));
            }
        } else {
            if !denied(&r["read"]) {
                problems.push(format!("forbidden {p}: read not denied: {r}"));
            }
            if is_dir && (!denied(&r["list"]) || !denied(&r["create"])) {
                problems.push(format!("forbidden {p}: list/create not denied: {r}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "Landlock escapes:\n{}",
        problems.join("\n")
    );

    if probe.abi >= Some(6) {
        let r = may_signal(&g, &user, &[own_pid, gw_pid, other_pid]);
        assert_eq!(r[0]["ok"], true, "a worker may signal itself: {r:?}");
        assert!(denied(&r[1]), "the worker may signal the gateway: {r:?}");
        assert!(denied(&r[2]), "the worker may signal another worker: {r:?}");
    }
    // The workers still serve.
    g.route("echo", &user, json!("still alive"));
}

/// With Landlock switched off by configuration (`MOLTBOT_LANDLOCK=false`) the same probes
/// succeed (so the denials above are Landlock's doing, not the file modes'), and the worker
/// says in its log that Landlock is disabled.
#[test]
fn without_landlock_the_same_probes_succeed() {
    let g = Gw::start(Options::new(2).env("MOLTBOT_LANDLOCK", "false"), None);
    let [(user, slot), (_, other_slot)] = g.users_on_two_workers();
    let pids = g.worker_pids();
    let other = g.sandbox(other_slot);
    let paths = [
        other.join("sandbox.json"),
        g.g.base().join("routing-table.jsonl"),
        PathBuf::from(format!("/proc/{}/environ", g.g.pid())),
    ];
    for (path, r) in escape(&g, &user, &paths) {
        assert_eq!(r["read"]["ok"], true, "{}: {r}", path.display());
    }
    let r = may_signal(&g, &user, &[g.g.pid(), pids[other_slot]]);
    assert!(r.iter().all(|r| r["ok"] == true), "{r:?}");
    let log = std::fs::read_to_string(g.sandbox(slot).join("logs/worker.log")).expect("log");
    assert!(
        log.contains("Disabled"),
        "the worker logs its Landlock state:\n{log}"
    );
}

/// `/status` says so when configuration switches Landlock off.
///
/// Ignored until the gateway reports its configuration: `src/gateway/mod.rs` fills
/// `Shared::landlock` with `probe_landlock()` whatever `config.landlock` says, so `/status`
/// claims `fullyEnforced` while no worker applies a ruleset. The fix (not in this file's
/// owner's reach): `landlock: if config.landlock { probe_landlock() } else {
/// LandlockStatus::DISABLED }`, and a start-up warning when it is disabled.
#[test]
fn landlock_disabled_by_configuration_is_reported_in_status() {
    let g = Gw::start(Options::new(1).env("MOLTBOT_LANDLOCK", "false"), None);
    let st = g.status();
    assert_eq!(
        st["gateway"]["landlock"],
        json!({"enforced": "disabled", "abi": null, "scoped": false}),
        "{st}"
    );
}

// ---------------------------------------------------------------------------------------------
// Shared memory
// ---------------------------------------------------------------------------------------------

/// Each worker maps exactly one segment, its own (as named on its command line and recorded
/// by the gateway); every segment file is 0600 and owned by the gateway's user; and a worker
/// holds no descriptor of a file outside its sandbox (no other segment, not the gateway's lock
/// or routing table, which the gateway keeps open) but `/dev/null` and its own segment.
#[test]
fn workers_map_only_their_own_segment_and_segments_are_private() {
    let g = Gw::start(Options::new(3), None);
    let pids = g.worker_pids();
    let recorded = recorded_segments(&g.g);
    assert_eq!(recorded.len(), 3, "{recorded:?}");
    let gw_uid = std::fs::metadata(format!("/proc/{}", g.g.pid()))
        .expect("gateway /proc")
        .uid();
    for name in &recorded {
        let path = shm_path(name);
        let m = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            m.mode() & 0o7777,
            0o600,
            "{}: mode {:o}",
            path.display(),
            m.mode()
        );
        assert_eq!(m.uid(), gw_uid, "{}: owner", path.display());
    }
    let mut owners = BTreeSet::new();
    for (slot, &pid) in pids.iter().enumerate() {
        let own = own_segment(pid);
        assert!(
            recorded.contains(&own),
            "worker-{slot}: {own} is not recorded"
        );
        assert!(owners.insert(own.clone()), "two workers share {own}");
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
        let mapped: BTreeSet<String> = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|p| p.starts_with("/dev/shm/"))
            .map(str::to_string)
            .collect();
        assert_eq!(
            mapped,
            BTreeSet::from([shm_path(&own).display().to_string()]),
            "worker-{slot} maps only its own segment"
        );
        let root = g.sandbox(slot);
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds") {
            let Ok(target) = std::fs::read_link(fd.expect("fd").path()) else {
                continue;
            };
            // Sockets, pipes and anonymous inodes read as `socket:[N]` and the like.
            if !target.is_absolute() {
                continue;
            }
            assert!(
                target.starts_with(&root)
                    || target == Path::new("/dev/null")
                    || target == shm_path(&own),
                "worker-{slot} holds a descriptor of {}",
                target.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Environment and rlimits
// ---------------------------------------------------------------------------------------------

/// The gateway's secrets never reach a worker: started with a bearer token, an API key, a
/// password and other secret-looking variables, each worker's `/proc/<pid>/environ` has none
/// of their names or values, but has its identity and a home, temp and XDG directories inside
/// its own sandbox (which is also its working directory).
#[test]
fn worker_environment_carries_no_gateway_secret() {
    let secrets = [
        ("MOLTBOT_GATEWAY_TOKEN", "gw-token-3f9a51"),
        ("FOO_API_KEY", "foo-key-77c1e0"),
        ("DB_PASSWORD", "db-pass-0b2e93"),
        ("AWS_SECRET_ACCESS_KEY", "aws-secret-5d1c"),
        ("MOLTBOT_OPENAI_API_KEY", "moltbot-key-9e4f"),
        ("GITHUB_TOKEN", "gh-token-2a7b"),
    ];
    let mut opts = Options::new(2).env("MOLTBOT_ISOLATION_MARKER", "kept");
    for (k, v) in secrets {
        opts = opts.env(k, v);
    }
    let g = Gw::start(opts, Some("gw-token-3f9a51"));
    // The token is in force (so it did reach the gateway).
    let r = g.g.request("GET", "/status", &[], None);
    assert_eq!(r.status, 401, "the gateway runs with its token");
    let gw_env = proc_strings(g.g.pid(), "environ");
    for (k, v) in secrets {
        assert!(gw_env.contains(&format!("{k}={v}")), "the gateway has {k}");
    }

    for (slot, pid) in g.worker_pids().into_iter().enumerate() {
        let env = proc_strings(pid, "environ");
        let root = g.sandbox(slot);
        for (k, v) in secrets {
            for e in &env {
                assert!(!e.starts_with(&format!("{k}=")), "worker-{slot} has {k}");
                assert!(!e.contains(v), "worker-{slot} has the value of {k}: {e}");
            }
        }
        let get = |k: &str| {
            env.iter()
                .find_map(|e| e.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("worker-{slot} has no {k}: {env:#?}"))
                .to_string()
        };
        assert_eq!(get("MOLTBOT_WORKER_ID"), format!("worker-{slot}"));
        assert_eq!(
            get("MOLTBOT_ISOLATION_MARKER"),
            "kept",
            "allow-listed variables pass"
        );
        assert_eq!(Path::new(&get("HOME")), root);
        assert_eq!(Path::new(&get("MOLTBOT_SANDBOX_ROOT")), root);
        for k in [
            "TMPDIR",
            "XDG_CONFIG_HOME",
            "XDG_DATA_HOME",
            "XDG_STATE_HOME",
            "XDG_CACHE_HOME",
            "XDG_RUNTIME_DIR",
        ] {
            let v = get(k);
            assert!(
                Path::new(&v).starts_with(&root),
                "worker-{slot}: {k}={v} is outside its sandbox {}",
                root.display()
            );
        }
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd");
        assert_eq!(cwd, root, "worker-{slot} runs in its sandbox");
    }
}

/// Worker rlimits: the configured open-file limit (`MOLTBOT_WORKER_NOFILE=256`), no core
/// dumps, and the configured address-space cap; without a configured cap, the one derived
/// from `max_memory` (4 × max_memory + 1 GiB + both rings of every lane).
#[test]
fn worker_rlimits_follow_the_configuration() {
    let configured = Gw::start(
        Options::new(1)
            .env("MOLTBOT_WORKER_NOFILE", "256")
            .env("MOLTBOT_WORKER_ADDRESS_SPACE", "6GiB"),
        None,
    );
    let derived = Gw::start(Options::new(1).env("MOLTBOT_MAX_MEMORY", "256MiB"), None);

    let pid = configured.worker_pids()[0];
    assert_eq!(limit(pid, "Max open files"), (Some(256), Some(256)));
    assert_eq!(limit(pid, "Max core file size"), (Some(0), Some(0)));
    let six_gib = 6u64 << 30;
    assert_eq!(
        limit(pid, "Max address space"),
        (Some(six_gib), Some(six_gib))
    );
    // The worker works within them.
    configured.route("echo", "limited", json!("ok"));

    let pid = derived.worker_pids()[0];
    let lanes: u64 = cmdline_arg(pid, "--lanes")
        .expect("--lanes")
        .parse()
        .expect("a number of lanes");
    // The harness runs gateways with --ring-capacity 256KiB.
    let want = 4 * (256u64 << 20) + (1u64 << 30) + 2 * (256u64 << 10) * lanes;
    assert_eq!(limit(pid, "Max address space"), (Some(want), Some(want)));
    assert_eq!(limit(pid, "Max core file size"), (Some(0), Some(0)));
    assert_eq!(
        limit(pid, "Max open files"),
        (Some(1024), Some(1024)),
        "the default"
    );
    derived.route("echo", "derived", json!("ok"));
}

// ---------------------------------------------------------------------------------------------
// Shared descriptors
// ---------------------------------------------------------------------------------------------

/// A compromised worker can do anything with its own descriptors; doing so must not hurt the
/// users of other workers. Here the test plays that worker: it takes the worker's socket
/// descriptors (its wake sockets) with `pidfd_getfd` and shuts down their sending side, as code
/// running in the worker could. The other worker's users must still be served. (Each worker
/// has wake sockets of its own, made at its spawn; when they were shared by all workers, one
/// worker's `shutdown()` closed the channel for everyone and the pump spun on end-of-file.)
#[test]
fn a_worker_breaking_its_wake_sockets_hurts_only_its_own_users() {
    let g = Gw::start(Options::new(2), None);
    let [(_, victim_slot), (bystander, _)] = g.users_on_two_workers();
    let pid = g.worker_pids()[victim_slot];
    let broken = hostile_worker::worker_sockets(pid)
        .iter()
        .filter(|s| rustix::net::shutdown(s, rustix::net::Shutdown::Write).is_ok())
        .count();
    assert!(broken > 0, "no socket of the worker could be shut down");
    for i in 0..20 {
        let v = g.route("echo", &bystander, json!(i));
        assert_eq!(v["payload"], json!(i));
    }
    assert_eq!(g.request("GET", "/livez", None).status, 200);
}

/// A compromised worker that writes wake-up bytes without answering anything would keep its
/// gateway cores waking up for nothing. An honest worker sends one only after clearing a park
/// announcement of the core, which the core can count; the flooding one is killed as a protocol
/// violation and replaced, and the other worker's users are served throughout.
#[test]
fn a_worker_flooding_its_wake_sockets_is_killed_and_replaced() {
    let g = Gw::start(Options::new(2), None);
    let [(victim, victim_slot), (bystander, bystander_slot)] = g.users_on_two_workers();
    let pids = g.worker_pids();
    let pid = pids[victim_slot];
    let served = std::sync::atomic::AtomicU64::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let (written, replaced) = std::thread::scope(|s| {
        s.spawn(|| {
            use std::sync::atomic::Ordering::*;
            let mut i = 0u64;
            while !done.load(Acquire) || i < 5 {
                let v = g.route("echo", &bystander, json!(i));
                assert_eq!(v["payload"], json!(i));
                i += 1;
                served.store(i, Release);
            }
        });
        let r = hostile_worker::flood_wake_sockets(pid, std::time::Duration::from_secs(20), || {
            g.worker_pids()[victim_slot] != pid
        });
        done.store(true, std::sync::atomic::Ordering::Release);
        r
    });
    assert!(
        replaced,
        "the flooding worker was not replaced ({written} bytes written)\n{}",
        g.g.log()
    );
    assert!(served.into_inner() >= 5);
    let history =
        std::fs::read_to_string(g.sandbox(victim_slot).join("sandbox.json")).expect("sandbox.json");
    assert!(
        history.contains("wake socket flood"),
        "restart reason: {history}"
    );
    // The successor serves the victim's user; the bystander's worker was never restarted.
    assert_eq!(g.route("echo", &victim, json!("after"))["payload"], "after");
    assert_eq!(g.worker_pids()[bystander_slot], pids[bystander_slot]);
}

/// Descriptors the gateway inherited without close-on-exec (from a shell or a supervisor) stay
/// out of its workers and their standbys: a worker holds its stdio, its wake sockets and what
/// it opened itself.
#[test]
fn workers_inherit_no_stray_descriptor_of_the_gateway() {
    // Held open, without close-on-exec, while the gateway starts: it inherits it.
    let (stray, _w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::empty()).expect("pipe");
    let target = |pid: u32, fd: &str| {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let stray_t = target(std::process::id(), &stray.as_raw_fd().to_string());
    assert!(stray_t.starts_with("pipe:"), "{stray_t}");
    let g = Gw::start(Options::new(2), None);
    let targets = |pid: u32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fds")
            .filter_map(|e| e.ok())
            .map(|e| target(pid, &e.file_name().to_string_lossy()))
            .collect()
    };
    assert!(
        targets(g.g.pid()).contains(&stray_t),
        "the gateway did not inherit the pipe: the test proves nothing"
    );
    // The standbys waiting beside the workers (started the same way) hold nothing of it either.
    let mut standbys = Vec::new();
    gw::wait_until("every worker to have a standby", || {
        standbys = g.status()["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter_map(|w| w["standbyPid"].as_u64().map(|p| p as u32))
            .collect();
        standbys.len() == 2
    });
    for pid in g.worker_pids().into_iter().chain(standbys) {
        let t = targets(pid);
        assert!(!t.contains(&stray_t), "worker {pid} inherited it: {t:?}");
    }
    // The gateway's own sockets (wake sockets included: they reach a worker over its stdin,
    // never by inheritance) are all close-on-exec.
    let gw = g.g.pid();
    for e in std::fs::read_dir(format!("/proc/{gw}/fd"))
        .expect("fds")
        .flatten()
    {
        let fd = e.file_name().to_string_lossy().into_owned();
        if !target(gw, &fd).starts_with("socket:") {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{gw}/fdinfo/{fd}")).unwrap_or_default();
        let Some(flags) = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        else {
            continue; // closed meanwhile
        };
        assert!(
            flags & 0o2_000_000 != 0,
            "gateway socket {fd} is inheritable (flags {flags:o})"
        );
    }
}
