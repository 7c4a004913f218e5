//! The cell mode end to end: a real gateway with `--cell openclaw`, each slot relaying its one
//! user's WebSocket frames to a real OpenClaw gateway (a cell) of its own, driven by the
//! OpenClaw reference client (tests/js/cell.mjs): two users on their own cells, sessions kept
//! apart, the cell's errors relayed, a killed cell replaced with its sessions, an idle cell
//! stopped and started again, a third user refused; then SIGTERM stops every cell, no cell
//! survives a gateway killed with SIGKILL, and none of a worker killed so survives its slot's
//! replacement.
//!
//! Needs Node 24, the reference client and the openclaw package (tests/node); tools/test
//! installs them. Each cell takes 12–30 s to start and ~800 MB of memory.

mod gw;
mod node;
mod ws;

use std::time::{Duration, Instant};

use gw::{GatewayProc, Options};
use serde_json::Value;
use ws::{OPERATOR, Users, hello, next_res, open, req, send};

/// How long one answer may take: the first request of a user starts its cell (12–30 s alone,
/// more on a loaded 2-core machine).
const ANSWER: Duration = Duration::from_secs(240);

/// The drain timeout of these gateways: a cell needs 10–30 s to stop.
const DRAIN: Duration = Duration::from_secs(60);

/// How long the reference-client scenario may run (it has 4 cell starts, each waited for
/// with its own deadline).
const SCENARIO: Duration = Duration::from_secs(1200);

/// A gateway in cell mode with `workers` slots and the given extra arguments.
fn cell_gateway(workers: usize, users: &Users, more: &[&str]) -> GatewayProc {
    cell_gateway_at(
        workers,
        node::free_cell_port_base(workers as u16),
        users,
        more,
    )
}

/// A gateway in cell mode whose cells use ports from `base` on.
fn cell_gateway_at(workers: usize, base: u16, users: &Users, more: &[&str]) -> GatewayProc {
    let (node, openclaw) = node::openclaw();
    let base = base.to_string();
    let opts = Options::new(workers)
        .env("MOLTBOT_GATEWAY_TOKEN", OPERATOR)
        .args(&["--users-file", users.file.to_str().unwrap()])
        .args(&["--cell", "openclaw"])
        .args(&["--cell-node", node.to_str().unwrap()])
        .args(&["--cell-openclaw", openclaw.to_str().unwrap()])
        .args(&["--cell-port-base", &base])
        .args(more);
    let drain = format!("{}s", DRAIN.as_secs());
    // The harness's timings are made for the built-in handlers: a cell's first request
    // waits for its start, and a busy Node may leave a probe unanswered for a while.
    let g = GatewayProc::start_overriding(
        opts,
        &[
            ("--request-timeout", "240s"),
            ("--heartbeat-interval", "500ms"),
            ("--stall-timeout", "60s"),
            ("--drain-timeout", &drain),
        ],
    );
    g.wait_ready();
    g
}

/// The gateway's log, then each slot's worker log and cell log: what a failure needs.
fn logs(g: &GatewayProc, slots: usize) -> String {
    let mut out = g.log();
    for slot in 0..slots {
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

/// A process as `(pid, start time)`: the start time tells a survivor from a reused pid.
type Proc = (u32, u64);

/// The start time (clock ticks since boot) of a live, non-zombie process.
fn started(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    if matches!(*fields.first()?, "Z" | "X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Every live descendant of `pid` (from the kernel's parent links).
fn descendants(pid: u32) -> Vec<Proc> {
    let mut found: Vec<Proc> = Vec::new();
    let mut next = vec![pid];
    while let Some(p) = next.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.filter_map(Result::ok) {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for c in children
                .split_ascii_whitespace()
                .filter_map(|c| c.parse().ok())
            {
                if let Some(t) = started(c)
                    && !found.iter().any(|&(q, _)| q == c)
                {
                    found.push((c, t));
                    next.push(c);
                }
            }
        }
    }
    found
}

fn still_alive(procs: &[Proc]) -> Vec<Proc> {
    procs
        .iter()
        .copied()
        .filter(|&(p, t)| started(p) == Some(t))
        .collect()
}

/// Processes whose command line names the openclaw package: the cells and their helpers.
fn openclaw_processes(procs: &[Proc]) -> Vec<Proc> {
    procs
        .iter()
        .copied()
        .filter(|&(p, _)| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains("openclaw") || comm.starts_with("openclaw")
        })
        .collect()
}

fn wait_gone(procs: &[Proc], within: Duration) -> Result<Duration, Vec<Proc>> {
    let t0 = Instant::now();
    loop {
        let left = still_alive(procs);
        if left.is_empty() {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > within {
            return Err(left);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn keys(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_users_on_their_own_cells_through_the_reference_client() {
    let users = Users::new();
    let alice = users.add("alice");
    let bob = users.add("bob");
    let carol = users.add("carol");
    let mut g = cell_gateway(2, &users, &["--cell-idle-timeout", "3s"]);
    let url = format!("ws://{}/", g.url().trim_start_matches("http://"));
    let r = node::run_js(
        "cell.mjs",
        &[
            "--url",
            &url,
            "--http",
            &g.url(),
            "--operator",
            OPERATOR,
            "--alice",
            &alice,
            "--bob",
            &bob,
            "--carol",
            &carol,
        ],
        SCENARIO,
    );
    let show = || {
        format!(
            "{}\n{}",
            serde_json::to_string_pretty(&r).unwrap(),
            logs(&g, 2)
        )
    };
    // The problems first: the whole report and the logs are long.
    assert_eq!(
        r["problems"],
        serde_json::json!([]),
        "problems: {}\n{}",
        r["problems"],
        show()
    );
    assert_eq!(r["violations"], serde_json::json!([]), "{}", show());
    assert_eq!(
        r["steps"],
        serde_json::json!(["started", "agent", "killed", "idle", "carol"])
    );
    eprintln!(
        "fields of the cell's payloads beyond the schema: {}",
        r["cellExtensions"]
    );

    // Answered by real OpenClaw (fields of its own health snapshot and session list), each
    // user by a cell in a slot of their own.
    for user in ["alice", "bob"] {
        let h = &r["health"][user];
        assert!(
            h.get("defaultAgentId").is_some() || h.get("plugins").is_some(),
            "{user}: {h}"
        );
        assert!(
            r["sessionsBefore"][user]["defaults"].is_object(),
            "{user}: {}",
            show()
        );
        let cell = &r["cells"][user]["cell"];
        assert_eq!(cell["state"], "ready", "{user}: {cell}");
        assert!(cell["pid"].as_u64().unwrap_or(0) > 0, "{user}: {cell}");
        assert!(
            cell["startupMs"].as_u64().unwrap_or(0) > 0,
            "{user}: {cell}"
        );
        // A real cell is hundreds of MB; the figure is the cell's processes, not the worker.
        assert!(
            cell["memoryUsage"].as_u64().unwrap_or(0) > 100 << 20,
            "{user}: {cell}"
        );
    }
    assert_ne!(r["cells"]["alice"]["slot"], r["cells"]["bob"]["slot"]);

    // The cell's own error for a run without a model key, relayed intact; the run's events
    // went to alice only.
    let agent = &r["agent"];
    assert_eq!(agent["ok"], false, "{agent}");
    assert_eq!(agent["error"]["code"], "UNAVAILABLE", "{agent}");
    let message = agent["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("No route-compatible authentication source"),
        "{agent}"
    );
    assert_eq!(agent["runEvents"]["bob"], 0, "{agent}");

    // alice's session is hers: bob's cell has no such session or history.
    let session = "agent:main:alice-private";
    assert!(
        keys(&r["sessionsAfterRun"]["alice"]).contains(&session.to_owned()),
        "{}",
        show()
    );
    assert!(
        !keys(&r["sessionsAfterRun"]["bob"]).contains(&session.to_owned()),
        "{}",
        show()
    );
    let history = &r["bobReadsAliceHistory"];
    assert!(
        history["ok"] == false || history["messages"] == 0,
        "{history}"
    );

    // Her cell killed: what she waited for fails UNAVAILABLE; a fresh cell has her sessions.
    let killed = &r["killed"];
    assert_eq!(killed["wait"]["ok"], false, "{killed}");
    assert_eq!(killed["wait"]["error"]["code"], "UNAVAILABLE", "{killed}");
    assert!(
        keys(&r["afterKill"]["sessions"]).contains(&session.to_owned()),
        "{}",
        show()
    );
    let fresh = &r["afterKill"]["cell"]["cell"];
    assert_ne!(fresh["pid"], killed["pid"], "{}", show());
    // bob noticed nothing: same cell, no refusal, no close.
    let bob_side = &r["bobDuringKill"];
    assert_eq!(bob_side["health"], serde_json::json!([]), "{bob_side}");
    assert_eq!(
        bob_side["before"]["pid"], bob_side["after"]["pid"],
        "{bob_side}"
    );
    assert_eq!(bob_side["closes"], serde_json::json!([]), "{bob_side}");

    // Idle: alice's cell stopped once she left; bob's, with bob connected, did not; hers came
    // back with her sessions.
    let idle = &r["idle"];
    assert_eq!(idle["stopped"]["state"], "stopped", "{idle}");
    assert_eq!(idle["bob"]["state"], "ready", "{idle}");
    assert_eq!(idle["bob"]["pid"], bob_side["before"]["pid"], "{idle}");
    assert!(
        keys(&idle["sessions"]).contains(&session.to_owned()),
        "{idle}"
    );
    assert_ne!(idle["cell"]["cell"]["pid"], fresh["pid"], "{idle}");

    let carol_side = &r["carol"];
    assert_eq!(carol_side["ok"], false, "{carol_side}");
    assert_eq!(carol_side["error"]["code"], "UNAVAILABLE", "{carol_side}");
    assert_eq!(
        carol_side["error"]["details"]["code"], "USER_LIMIT",
        "{carol_side}"
    );
    let why = carol_side["error"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("every OpenClaw cell is taken"), "{carol_side}");

    // SIGTERM: the gateway stops within its drain timeout, every cell with it.
    let tree = descendants(g.pid());
    let cells = openclaw_processes(&tree);
    assert!(
        cells.len() >= 2,
        "no cell processes under the gateway: {tree:?}"
    );
    g.signal(rustix::process::Signal::TERM);
    let status = g.wait_within(DRAIN + Duration::from_secs(60));
    assert!(status.success(), "{status}\n{}", logs(&g, 2));
    if let Err(left) = wait_gone(&tree, Duration::from_secs(60)) {
        panic!(
            "processes survived the gateway's SIGTERM: {left:?}\n{}",
            logs(&g, 2)
        );
    }
}

/// A gateway with one slot whose cell serves (alice's `health` started it), and its users
/// file.
fn one_cell_serving() -> (GatewayProc, Users) {
    let users = Users::new();
    let alice = users.add("alice");
    let g = cell_gateway(1, &users, &[]);
    let mut socket = open(&g, "/", &[]);
    socket
        .get_mut()
        .set_read_timeout(Some(ANSWER))
        .expect("read timeout");
    hello(&mut socket, Some(&alice));
    send(&mut socket, &req("h", "health", None));
    let res = next_res(&mut socket, "h");
    assert_eq!(res["ok"], true, "{res}\n{}", logs(&g, 1));
    (g, users)
}

#[test]
fn no_cell_survives_a_gateway_killed_with_sigkill() {
    let (g, _users) = one_cell_serving();
    // The worker, its cell and the cell's helper processes.
    let tree = descendants(g.pid());
    let cells = openclaw_processes(&tree);
    assert!(!cells.is_empty(), "no cell under the gateway: {tree:?}");
    g.signal(rustix::process::Signal::KILL);
    if let Err(left) = wait_gone(&tree, Duration::from_secs(120)) {
        panic!("processes survived the gateway's SIGKILL: {left:?}");
    }
}

/// The pid of slot 0's worker and its state, through the operator's `/status`.
fn slot0(g: &GatewayProc) -> (Option<u32>, String) {
    let auth = format!("Bearer {OPERATOR}");
    let r = g.request("GET", "/status", &[("authorization", &auth)], None);
    let v: Value = r.json().expect("status JSON");
    let w = &v["workers"][0];
    (
        w["pid"].as_u64().map(|p| p as u32),
        w["state"].as_str().unwrap_or("?").to_owned(),
    )
}

#[test]
fn a_worker_killed_with_sigkill_leaves_no_cell_process_once_its_slot_is_replaced() {
    let (g, _users) = one_cell_serving();
    let (Some(worker), _) = slot0(&g) else {
        panic!("slot 0 has no worker\n{}", logs(&g, 1));
    };
    // The cell and its helpers; stopped, so that none can end by itself when its parent dies
    // (as they do, sooner or later): whatever is still there below was left to the slot.
    let tree = descendants(worker);
    assert!(
        !openclaw_processes(&tree).is_empty(),
        "no cell under the worker: {tree:?}"
    );
    for &(p, _) in &tree {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(p as i32).expect("pid"),
            rustix::process::Signal::STOP,
        );
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(worker as i32).expect("pid"),
        rustix::process::Signal::KILL,
    )
    .expect("kill the worker");
    let t0 = Instant::now();
    loop {
        let (pid, state) = slot0(&g);
        if pid.is_some_and(|p| p != worker) && state == "ready" {
            break;
        }
        assert!(
            t0.elapsed() < ANSWER,
            "slot 0 not replaced: {pid:?} {state}\n{}",
            logs(&g, 1)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Err(left) = wait_gone(&tree, Duration::from_secs(60)) {
        for &(p, _) in &left {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(p as i32).expect("pid"),
                rustix::process::Signal::KILL,
            );
        }
        panic!(
            "processes of the killed worker's cell survived its replacement: {left:?}\n{}",
            logs(&g, 1)
        );
    }
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

/// Cell ports inside the kernel's ephemeral range draw a warning at start (anyone's outgoing
/// connection may take one and keep a cell from starting); ports below it do not.
#[test]
fn a_gateway_warns_when_its_cell_ports_are_ephemeral() {
    const WARNING: &str = "in the kernel's ephemeral port range";
    let ephemeral = moltbot::cell::ephemeral_ports().expect("Linux has ip_local_port_range");
    let users = Users::new();
    users.add("alice");
    let inside = (0..400)
        .map(|_| rand::random_range(*ephemeral.start()..=ephemeral.end() - 110))
        .find(|&p| moltbot::cell::port_range_free(p))
        .expect("a free port range in the ephemeral ports");
    let g = cell_gateway_at(1, inside, &users, &[]);
    let log = g.log();
    let line = log.lines().find(|l| l.contains(WARNING));
    let line = line.unwrap_or_else(|| panic!("no warning for cell ports from {inside}:\n{log}"));
    assert!(
        line.contains(&format!("cells' ports {inside}-{}", inside + 110)),
        "{line}"
    );
    drop(g);

    let g = cell_gateway(1, &users, &[]);
    let log = g.log();
    assert!(!log.contains(WARNING), "{log}");
}
