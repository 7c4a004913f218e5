//! Where workers run (`worker_placement`), on real gateways: one core and as many workers as
//! CPUs, so that the workers share the CPUs with the core. A worker that serves runs on the
//! core's CPU, every thread of it; a busy one moves to the other CPUs and comes back once
//! quiet, while the other users' workers stay where they were; a starting worker (a
//! successor after a crash) comes back beside the core once it serves; the programs workers
//! start run on the other CPUs; the core spins while idle. With `any`, none of it.
//!
//! On a machine with one CPU there is no other CPU: the tests check that placement is off.

mod gw;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gw::{GatewayProc, Options, wait_until};
// The CPUs this process may run on, in order: what the gateway it starts may use.
use moltbot::pool::placement::allowed_cpus;
use serde_json::{Value, json};

/// A CPU list as the kernel writes it in `/proc/PID/status` (`0`, `1-3`, `0,2-3`).
fn parse_cpu_list(text: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

/// The CPUs each thread of `pid` may run on.
fn thread_cpus(pid: u32) -> Vec<Vec<usize>> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(parse_cpu_list)
        })
        .collect()
}

/// True when every thread of `pid` may run on exactly `cpus`.
fn runs_on(pid: u32, cpus: &[usize]) -> bool {
    let threads = thread_cpus(pid);
    !threads.is_empty() && threads.iter().all(|t| t == cpus)
}

/// The worker of `slot` in `status`.
fn worker(status: &Value, slot: usize) -> &Value {
    &status["workers"][slot]
}

/// Slot number of a `worker-N` id.
fn slot_of(worker_id: &str) -> usize {
    worker_id.trim_start_matches("worker-").parse().unwrap()
}

/// The gateway's `moltbot_gateway_spinning_cores`.
fn spinning_cores(g: &GatewayProc) -> f64 {
    let text = g.request("GET", "/metrics", &[], None).text();
    gw::metric(&text, "moltbot_gateway_spinning_cores", &[]).expect("spinning cores gauge")
}

/// One core on the first CPU and as many workers as CPUs (at least 2).
fn start(extra: &[&str]) -> (GatewayProc, usize, Vec<usize>) {
    let cpus = allowed_cpus();
    let workers = cpus.len().max(2);
    let g = GatewayProc::start(Options::new(workers).args(&["--cores", "1"]).args(extra));
    g.wait_ready();
    (g, workers, cpus)
}

#[test]
fn serving_workers_run_beside_the_core_and_a_busy_one_moves_away_and_back() {
    // A low threshold, as the busy worker shares its CPU with the other tests' processes.
    let (g, workers, cpus) = start(&["--worker-busy-share", "0.2"]);
    let (core, spare) = (vec![cpus[0]], cpus[1..].to_vec());
    if spare.is_empty() {
        // One CPU: nowhere else to go; placement is off.
        let status = g.status();
        assert!(worker(&status, 0).get("cpus").is_none(), "{status}");
        return;
    }
    // Every worker, every thread of it, beside the core once it serves.
    wait_until("every worker beside the core", || {
        let status = g.status();
        (0..workers).all(|i| {
            let w = worker(&status, i);
            w["cpus"] == "cores" && w["pid"].as_u64().is_some_and(|p| runs_on(p as u32, &core))
        })
    });
    // With workers beside the core, the core spins while idle.
    assert_eq!(spinning_cores(&g), 1.0);

    // One user keeps their worker computing (the test builds' `busy` action, 300 ms a
    // request, in a loop bounded by the deadline).
    let first = g.request(
        "POST",
        "/v1/echo",
        &[("x-moltbot-user", "busy")],
        Some(b"x"),
    );
    let busy = slot_of(first.header("x-moltbot-worker").expect("worker header"));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (url, stop) = (g.url(), stop.clone());
        std::thread::spawn(move || {
            let body =
                json!({"type": "test", "userId": "busy", "payload": {"action": "busy", "ms": 300}})
                    .to_string();
            let until = std::time::Instant::now() + gw::DEADLINE;
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                let r = gw::http_request(&url, "POST", "/v1/route", &[], Some(body.as_bytes()))
                    .expect("busy request");
                assert_eq!(r.status, 200, "{}", r.text());
            }
        })
    };
    wait_until("the busy worker on the spare CPUs", || {
        let status = g.status();
        let w = worker(&status, busy);
        w["cpus"] == "spare" && w["pid"].as_u64().is_some_and(|p| runs_on(p as u32, &spare))
    });
    // Nobody else moved: the other users' workers keep the core's CPU.
    let status = g.status();
    for i in (0..workers).filter(|&i| i != busy) {
        let w = worker(&status, i);
        assert_eq!(w["cpus"], "cores", "{status}");
        assert!(
            runs_on(w["pid"].as_u64().unwrap() as u32, &core),
            "{status}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    wait_until("the quiet worker back beside the core", || {
        let status = g.status();
        let w = worker(&status, busy);
        w["cpus"] == "cores" && w["pid"].as_u64().is_some_and(|p| runs_on(p as u32, &core))
    });
    assert!(
        g.log().contains("busy: moving to the spare CPUs"),
        "{}",
        g.log()
    );

    // A successor starts on the spare CPUs and comes beside the core once it serves.
    let old = worker(&g.status(), 0)["pid"].as_u64().unwrap() as u32;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(old as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    wait_until("the successor beside the core", || {
        let status = g.status();
        let w = worker(&status, 0);
        w["pid"]
            .as_u64()
            .is_some_and(|p| p as u32 != old && w["state"] == "ready" && runs_on(p as u32, &core))
            && w["cpus"] == "cores"
    });
}

#[test]
fn an_agent_program_runs_on_the_spare_cpus() {
    let agent = format!(
        "/usr/bin/python3 {}/tests/agents/faulty_agent.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let (g, _, cpus) = start(&["--worker-command", &agent]);
    let spare = cpus[1..].to_vec();
    let status = g.status();
    let pid = worker(&status, 0)["pid"].as_u64().unwrap() as u32;
    let programs = moltbot_ipc::process::descendants(pid);
    assert_eq!(programs.len(), 1, "{programs:?}");
    if spare.is_empty() {
        assert!(runs_on(programs[0], &cpus));
        return;
    }
    assert!(
        runs_on(programs[0], &spare),
        "{:?}",
        thread_cpus(programs[0])
    );
    wait_until("the worker itself beside the core", || {
        runs_on(pid, &cpus[..1]) && worker(&g.status(), 0)["cpus"] == "cores"
    });
}

#[test]
fn with_any_workers_run_anywhere_and_the_core_sleeps_when_idle() {
    let (g, workers, cpus) = start(&["--worker-placement", "any"]);
    let status = g.status();
    for i in 0..workers {
        let w = worker(&status, i);
        assert!(w.get("cpus").is_none(), "{status}");
        assert!(
            runs_on(w["pid"].as_u64().unwrap() as u32, &cpus),
            "{status}"
        );
    }
    assert_eq!(spinning_cores(&g), 0.0);
}
