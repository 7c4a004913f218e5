//! The worker pool with real worker processes: stickiness, crashes, stalls, recycling, the
//! restart policy, requests in flight at a crash, admission, hostile workers, stop and restart,
//! and the `workers demo` command. Each test has its own sandbox directory and pool.

mod common;
mod hostile_worker;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use moltbot::{GatewayRouter, RouteResponse};
use rustix::process::Signal;
use serde_json::json;

/// Routes echo requests for `user` until `stop` is set; returns every failed answer and the
/// number of answers. Run it in a scoped thread beside a fault on another user.
fn echo_until(
    router: &GatewayRouter,
    user: &str,
    stop: &AtomicBool,
) -> (Vec<RouteResponse>, usize) {
    let mut failed = Vec::new();
    let mut n = 0;
    // At least a few requests even if the fault is over at once.
    while n < 5 || !stop.load(Ordering::Acquire) {
        let r = echo(router, user);
        if !r.success {
            failed.push(r);
        }
        n += 1;
    }
    (failed, n)
}

/// Lines of `<sandbox>/sessions/<user>.jsonl`, parsed.
fn session_lines(env: &TestEnv, slot: usize, user: &str) -> Vec<serde_json::Value> {
    let path = env
        .sandbox(slot)
        .join("sessions")
        .join(format!("{user}.jsonl"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?}: {e}")))
        .collect()
}

fn error_code(r: &RouteResponse) -> &str {
    r.error_code.as_deref().unwrap_or("")
}

fn restart_reasons(env: &TestEnv, slot: usize) -> Vec<String> {
    env.sandbox_json(slot)["restartHistory"]
        .as_array()
        .expect("restartHistory")
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

// 1.
#[test]
fn users_are_sticky_and_each_gets_a_worker_of_its_own() {
    let env = TestEnv::new(3);
    let router = env.start();
    let expected = [
        ("user-a", "worker-1"),
        ("user-b", "worker-2"),
        ("user-c", "worker-0"),
    ];
    for (user, w) in expected {
        let r = agent(&router, user, &format!("Hello from {user}"));
        assert!(r.success, "{r:?}");
        assert_eq!(r.worker_id.as_deref(), Some(w), "{user}");
        assert_eq!(router.worker_for_user(user).as_deref(), Some(w));
        let payload = r.payload.as_ref().expect("payload");
        assert_eq!(payload["workerId"], w);
        assert_eq!(payload["userId"], user);
        assert_eq!(payload["turn"], 1);
        assert_eq!(payload["reply"], format!("echo: Hello from {user}"));
        assert_eq!(payload_pid(&r), pid_of(&router, slot_of(w)));
    }
    for (user, w) in expected {
        for _ in 0..10 {
            assert_eq!(router.worker_for_user(user).as_deref(), Some(w));
            let r = echo(&router, user);
            assert!(r.success, "{r:?}");
            assert_eq!(r.worker_id.as_deref(), Some(w));
            assert_eq!(r.payload, Some(json!({ "ping": user })));
        }
    }
    let status = router.status().expect("running");
    assert_eq!(status.total_workers, 3);
    assert_eq!(status.healthy_workers, 3);
    assert_eq!(status.routing_table_size, 3);
    assert_eq!(status.queued_requests, 0);
    let mut pids: Vec<u32> = status.workers.iter().map(|w| w.pid.expect("pid")).collect();
    for (i, w) in status.workers.iter().enumerate() {
        assert_eq!(w.worker_id, format!("worker-{i}"));
        assert_eq!(w.state, "ready");
        assert!(is_our_child(w.pid.expect("pid")), "{w:?}");
        assert_eq!(w.restarts, 0);
        assert_eq!(w.crashes, 0);
        assert_eq!(w.generation, 1);
        // One agent:message and ten echoes each.
        assert_eq!(w.requests_processed, 11, "{w:?}");
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 3);
}

// 2.
#[test]
fn kill_9_respawns_in_the_same_slot_with_sessions_intact() {
    let env = TestEnv::new(3);
    let router = env.start();
    assert_eq!(turn(&agent(&router, "user-a", "one")), 1);
    assert_eq!(turn(&agent(&router, "user-a", "two")), 2);
    let r = agent(&router, "user-b", "hi");
    assert_eq!(r.worker_id.as_deref(), Some("worker-2"));
    let old = pid_of(&router, 1);
    let before = env.sandbox_json(1);
    let (gen0, restarts0) = (before["generation"].as_u64(), before["restarts"].as_u64());
    assert_eq!((gen0, restarts0), (Some(1), Some(0)));

    kill9(old);
    let new = wait_replaced(&router, 1, old);
    assert!(!is_our_child(old), "the killed worker is reaped");

    let r = agent(&router, "user-a", "three");
    assert_eq!(r.worker_id.as_deref(), Some("worker-1"));
    assert_eq!(turn(&r), 3, "the turn counter continues: {r:?}");
    assert_eq!(payload_pid(&r), new);
    assert_eq!(
        router.worker_for_user("user-a").as_deref(),
        Some("worker-1")
    );
    let lines = session_lines(&env, 1, "user-a");
    let messages: Vec<&str> = lines
        .iter()
        .map(|l| l["message"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(messages, ["one", "two", "three"]);

    let after = env.sandbox_json(1);
    assert_eq!(after["generation"].as_u64(), Some(2));
    assert_eq!(after["restarts"].as_u64(), Some(1));
    assert_eq!(after["pid"].as_u64(), Some(u64::from(new)));
    assert_eq!(restart_reasons(&env, 1), ["initial", "crashed: signal 9"]);
    let w = worker(&router, 1);
    assert_eq!((w.restarts, w.crashes, w.generation), (1, 1, 2));

    // The other slots never noticed.
    assert_eq!(turn(&agent(&router, "user-b", "again")), 2);
    for slot in [0, 2] {
        let w = worker(&router, slot);
        assert_eq!((w.restarts, w.crashes), (0, 0), "{w:?}");
    }
}

// 3.
#[test]
fn a_stopped_or_hanging_worker_is_detected_as_stalled_and_replaced() {
    let mut env = TestEnv::new(3);
    env.config.stall_timeout = Some(Duration::from_millis(500));
    let router = env.start();
    assert!(agent(&router, "user-a", "hi").success);
    assert!(agent(&router, "user-b", "hi").success);

    // SIGSTOP: the process is alive but its heartbeat stops.
    let stopped = pid_of(&router, 1);
    signal(stopped, Signal::STOP);
    let second = wait_replaced(&router, 1, stopped);
    wait_until(DEADLINE, "the stopped worker is killed and reaped", || {
        !is_our_child(stopped)
    });
    assert_eq!(restart_reasons(&env, 1), ["initial", "stalled"]);
    assert_eq!(worker(&router, 1).crashes, 1);
    assert_eq!(payload_pid(&agent(&router, "user-a", "after stop")), second);

    // A handler that never returns: its caller learns the worker died; the slot recovers.
    let stop = AtomicBool::new(false);
    let (hung, (failed, n)) = std::thread::scope(|s| {
        let other = s.spawn(|| echo_until(&router, "user-b", &stop));
        let hung = test_action(&router, "user-a", "hang", json!({}));
        stop.store(true, Ordering::Release);
        (hung, other.join().expect("echo thread"))
    });
    assert!(!hung.success);
    assert_eq!(error_code(&hung), "WORKER_CRASHED", "{hung:?}");
    assert_eq!(hung.worker_id.as_deref(), Some("worker-1"));
    assert!(
        failed.is_empty(),
        "user-b on another slot saw errors: {failed:?}"
    );
    assert!(n >= 5);
    let third = wait_replaced(&router, 1, second);
    assert_eq!(payload_pid(&agent(&router, "user-a", "after hang")), third);
    assert_eq!(turn(&agent(&router, "user-a", "turns kept")), 4);
    assert_eq!(restart_reasons(&env, 1), ["initial", "stalled", "stalled"]);
    assert_eq!(worker(&router, 1).crashes, 2);
}

// 4a.
#[test]
fn a_worker_over_max_memory_is_recycled_and_nothing_is_lost() {
    let mut env = TestEnv::new(2);
    env.config.max_memory = 64 * 1024 * 1024;
    let router = env.start();
    let user = user_on_slot(&router, 0, "mem");
    let old = pid_of(&router, 0);
    let crashes = worker(&router, 0).crashes;

    let stop = AtomicBool::new(false);
    let (alloc, results) = std::thread::scope(|s| {
        let streams: Vec<_> = (0..2)
            .map(|_| s.spawn(|| echo_until(&router, &user, &stop)))
            .collect();
        let alloc = test_action(&router, &user, "alloc", json!({ "mib": 100 }));
        wait_replaced(&router, 0, old);
        stop.store(true, Ordering::Release);
        let results: Vec<_> = streams
            .into_iter()
            .map(|h| h.join().expect("stream"))
            .collect();
        (alloc, results)
    });
    assert!(alloc.success, "{alloc:?}");
    assert_eq!(
        alloc.payload.as_ref().map(|p| p["allocatedMib"].clone()),
        Some(json!(100))
    );
    for (failed, n) in &results {
        assert!(
            failed.is_empty(),
            "lost around the recycle ({n} sent): {failed:?}"
        );
    }
    let w = worker(&router, 0);
    assert_eq!(w.crashes, crashes, "a recycle is not a crash: {w:?}");
    assert_eq!(w.restarts, 1);
    assert_eq!(
        restart_reasons(&env, 0),
        ["initial", "recycled: max_memory"]
    );
    assert_eq!(env.sandbox_json(0)["restarts"].as_u64(), Some(1));
    assert!(echo(&router, &user).success);
}

// 4b.
#[test]
fn a_worker_at_max_requests_is_recycled_and_every_request_is_answered() {
    let mut env = TestEnv::new(1);
    env.config.max_requests = 50;
    env.config.max_requests_jitter = 0.0;
    let router = env.start();
    let answered = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..2 {
            let (router, answered) = (&router, &answered);
            s.spawn(move || {
                let user = format!("stream-{t}");
                for i in 0..100 {
                    // Every other request takes a few milliseconds in the worker: the monitor
                    // checks the limit once per tick, and the stream must outlast a few ticks
                    // for more than one recycle to happen.
                    let r = if i % 2 == 0 {
                        agent(router, &user, &format!("m{i}"))
                    } else {
                        test_action(router, &user, "slow", json!({ "ms": 3 }))
                    };
                    answered.lock().expect("lock").push(r);
                }
            });
        }
    });
    let answered = answered.into_inner().expect("lock");
    assert_eq!(answered.len(), 200);
    let failed: Vec<_> = answered.iter().filter(|r| !r.success).collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    // Each stream's turns are all recorded, across the recycles.
    for t in 0..2 {
        assert_eq!(session_lines(&env, 0, &format!("stream-{t}")).len(), 50);
    }
    let pids: std::collections::BTreeSet<u32> = answered.iter().map(payload_pid).collect();
    assert!(
        pids.len() >= 2,
        "200 requests served by one process: {pids:?}"
    );
    wait_until(DEADLINE, "the last generation is ready", || {
        worker(&router, 0).state == "ready"
    });
    let w = worker(&router, 0);
    assert_eq!(w.crashes, 0, "{w:?}");
    assert!(w.restarts >= 1, "{w:?}");
    assert_eq!(w.requests_processed, 200);
    let reasons = restart_reasons(&env, 0);
    assert_eq!(reasons[0], "initial");
    assert!(
        reasons[1..].iter().all(|r| r == "recycled: max_requests"),
        "{reasons:?}"
    );
}

/// The standby of `slot` (`worker_standby`, on by default) once it has one other than `not`.
fn wait_standby(router: &GatewayRouter, slot: usize, not: u32) -> u32 {
    let mut pid = 0;
    wait_until(
        DEADLINE,
        &format!("worker-{slot} to have a standby"),
        || match worker(router, slot).standby_pid {
            Some(p) if p != not => {
                pid = p;
                true
            }
            _ => false,
        },
    );
    pid
}

// 4c.
#[test]
fn a_standby_waits_beside_the_worker_serves_nobody_and_takes_over_at_the_recycle() {
    let mut env = TestEnv::new(2);
    env.config.max_requests = 20;
    env.config.max_requests_jitter = 0.0;
    let router = env.start();
    let user = user_on_slot(&router, 0, "standby");
    let first = pid_of(&router, 0);
    let other = pid_of(&router, 1);
    let standby = wait_standby(&router, 0, 0);
    assert_ne!(standby, first);
    assert!(is_our_child(standby), "the pool's own child");
    assert!(cmdline(standby).iter().any(|a| a == "--standby"));
    // Started and attached ahead: it maps the slot's segment already.
    let segment = router.pool().expect("running").slots()[0]
        .segment
        .name()
        .trim_start_matches('/')
        .to_string();
    let maps = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    assert!(maps(first).contains(&segment));
    wait_until(DEADLINE, "the standby to map its segment", || {
        maps(standby).contains(&segment)
    });

    // The first process answers until its limit, the standby after it, never before.
    let mut pids = Vec::new();
    for i in 0..30 {
        let r = agent(&router, &user, &format!("m{i}"));
        assert!(r.success, "{r:?}");
        pids.push(payload_pid(&r));
    }
    let took_over = pids.iter().position(|&p| p != first).expect("a recycle");
    assert!(took_over > 0, "{pids:?}");
    assert!(
        pids[took_over..].iter().all(|&p| p == standby),
        "the standby did not take over alone: first {first}, standby {standby}: {pids:?}"
    );
    // The user's turns went on across the takeover.
    assert_eq!(session_lines(&env, 0, &user).len(), 30);
    assert_eq!(wait_replaced(&router, 0, first), standby);
    let w = worker(&router, 0);
    assert_eq!((w.crashes, w.restarts), (0, 1), "{w:?}");
    let history = &env.sandbox_json(0)["restartHistory"];
    let last = history.as_array().and_then(|h| h.last()).expect("history");
    assert_eq!(last["reason"], "recycled: max_requests", "{history}");
    assert_eq!(last["pid"], standby, "{history}");
    assert_eq!(last["previousPid"], first, "{history}");

    // The new worker gets a standby of its own; the other slot was never touched.
    let second = wait_standby(&router, 0, standby);
    assert_ne!(second, first);
    assert_eq!(pid_of(&router, 1), other);

    // Stopping the pool leaves no process behind, standbys included.
    let others = worker(&router, 1).standby_pid;
    router.stop();
    for pid in [Some(standby), Some(second), others].into_iter().flatten() {
        assert!(!is_our_child(pid), "{pid} left after the stop");
    }
}

#[test]
fn a_crashed_workers_standby_takes_its_place() {
    let env = TestEnv::new(1);
    let router = env.start();
    let user = user_on_slot(&router, 0, "crash");
    let first = pid_of(&router, 0);
    let standby = wait_standby(&router, 0, 0);
    kill9(first);
    assert_eq!(wait_replaced(&router, 0, first), standby);
    let r = agent(&router, &user, "after the crash");
    assert!(r.success, "{r:?}");
    assert_eq!(payload_pid(&r), standby);
    assert_eq!(worker(&router, 0).crashes, 1);
    assert_eq!(
        restart_reasons(&env, 0).last().map(String::as_str),
        Some("crashed: signal 9")
    );
    wait_standby(&router, 0, standby);
}

#[test]
fn a_standby_that_dies_is_reaped_and_the_next_worker_starts_cold() {
    let env = TestEnv::new(1);
    let router = env.start();
    let user = user_on_slot(&router, 0, "cold");
    let first = pid_of(&router, 0);
    let standby = wait_standby(&router, 0, 0);
    kill9(standby);
    wait_until(DEADLINE, "the dead standby reaped", || {
        worker(&router, 0).standby_pid.is_none() && !is_our_child(standby)
    });
    // Its users never noticed; the worker's replacement is a process started then.
    assert!(echo(&router, &user).success);
    kill9(first);
    let next = wait_replaced(&router, 0, first);
    assert_ne!(next, standby);
    assert!(
        !cmdline(next).iter().any(|a| a == "--standby"),
        "{:?}",
        cmdline(next)
    );
    let r = agent(&router, &user, "after");
    assert_eq!(payload_pid(&r), next, "{r:?}");
    // The new worker gets a standby again.
    let again = wait_standby(&router, 0, 0);
    assert_ne!(again, standby);
}

#[test]
fn without_worker_standby_no_standby_is_started() {
    let mut env = TestEnv::new(1);
    env.config.worker_standby = false;
    let router = env.start();
    let sandbox = env.sandbox(0).to_string_lossy().into_owned();
    let mut pid = pid_of(&router, 0);
    for round in 0..2 {
        // Two heartbeats seen after the worker is ready: the monitor has looked at the slot
        // since (a standby starts at the first look at a ready worker).
        for _ in 0..2 {
            let seen = worker(&router, 0).last_heartbeat;
            wait_until(DEADLINE, "a heartbeat seen", || {
                worker(&router, 0).last_heartbeat > seen
            });
        }
        let w = worker(&router, 0);
        assert_eq!(w.standby_pid, None, "round {round}: {w:?}");
        assert_eq!(processes_mentioning(&sandbox), vec![pid], "round {round}");
        kill9(pid);
        pid = wait_replaced(&router, 0, pid);
    }
}

// 5.
#[test]
fn a_crash_loop_fails_the_slot_then_it_is_retried_after_the_cool_down() {
    let mut env = TestEnv::new(3);
    env.config.max_restart_attempts = 2;
    env.config.restart_window = Duration::from_secs(60);
    env.config.failed_cooldown = Duration::from_secs(2);
    let router = env.start();
    let victim = user_on_slot(&router, 0, "loop");
    let bystander = user_on_slot(&router, 1, "calm");
    let first = pid_of(&router, 0);

    let stop = AtomicBool::new(false);
    let (codes, (failed, _)) = std::thread::scope(|s| {
        let other = s.spawn(|| echo_until(&router, &bystander, &stop));
        let mut codes = Vec::new();
        while worker(&router, 0).state != "failed" {
            assert!(codes.len() < 20, "never failed: {codes:?}");
            let r = test_action(&router, &victim, "crash", json!({}));
            assert!(!r.success);
            codes.push(error_code(&r).to_string());
        }
        // Failed: refused at once, while still failed.
        let r = echo(&router, &victim);
        assert!(!r.success);
        assert_eq!(error_code(&r), "UNAVAILABLE", "{r:?}");
        assert_eq!(r.worker_id.as_deref(), Some("worker-0"));
        assert_eq!(worker(&router, 0).state, "failed");
        assert_eq!(worker(&router, 0).pid, None);
        stop.store(true, Ordering::Release);
        (codes, other.join().expect("bystander"))
    });
    // Three crashes (the third is one more than max_restart_attempts = 2); a request sent
    // while the slot was failing may be refused instead of crashing it.
    assert!(
        codes
            .iter()
            .all(|c| c == "WORKER_CRASHED" || c == "UNAVAILABLE"),
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| *c == "WORKER_CRASHED").count(),
        3,
        "{codes:?}"
    );
    assert!(failed.is_empty(), "the bystander saw errors: {failed:?}");
    assert_eq!(worker(&router, 0).crashes, 3);

    // After the cool-down: a new process, serving again.
    let back = wait_replaced(&router, 0, first);
    assert_eq!(payload_pid(&health(&router, &victim)), back);
    let reasons = restart_reasons(&env, 0);
    assert_eq!(
        reasons.last().map(String::as_str),
        Some("retried: after failed cool-down")
    );
    for slot in [1, 2] {
        assert_eq!(worker(&router, slot).crashes, 0);
    }
}

// 6.
#[test]
fn at_a_crash_the_taken_request_fails_and_the_queued_ones_go_to_the_successor() {
    let mut env = TestEnv::new(2);
    env.config.max_concurrent = 4;
    // The slow handler stops the heartbeat; only our kill may end it.
    env.config.stall_timeout = Some(Duration::from_secs(120));
    let router = env.start();
    let user = user_on_slot(&router, 1, "inflight");
    let old = pid_of(&router, 1);

    let (slow, queued) = std::thread::scope(|s| {
        let slow = send_and_wait_taken(s, &router, 1, || {
            test_action(&router, &user, "slow", json!({ "ms": 20_000 }))
        });
        let (router, user) = (&router, &user);
        let queued: Vec<_> = (0..2)
            .map(|i| s.spawn(move || agent(router, user, &format!("queued {i}"))))
            .collect();
        wait_until(DEADLINE, "three requests admitted", || {
            worker(router, 1).active_requests == 3
        });
        kill9(old);
        let slow = slow.join().expect("slow");
        let queued: Vec<_> = queued
            .into_iter()
            .map(|h| h.join().expect("queued"))
            .collect();
        (slow, queued)
    });
    assert!(!slow.success);
    assert_eq!(error_code(&slow), "WORKER_CRASHED", "{slow:?}");
    for r in &queued {
        assert!(r.success, "a queued request was lost: {r:?}");
    }
    let new = pid_of(&router, 1);
    assert_ne!(new, old);
    let mut turns = Vec::new();
    for r in &queued {
        assert_eq!(payload_pid(r), new, "answered by the successor");
        turns.push(turn(r));
    }
    turns.sort_unstable();
    assert_eq!(turns, [1, 2]);
    assert_eq!(worker(&router, 1).active_requests, 0);
}

// 7.
#[test]
fn stop_leaves_nothing_behind_and_a_restart_keeps_the_assignments() {
    let env = TestEnv::new(3);
    let router = env.start();
    for user in ["user-a", "user-b", "user-c"] {
        assert!(agent(&router, user, "before").success);
    }
    let pool = router.pool().expect("running");
    let segments: Vec<String> = pool
        .slots()
        .iter()
        .map(|s| s.segment.name().to_string())
        .collect();
    drop(pool);
    let pids: Vec<u32> = (0..3).map(|i| pid_of(&router, i)).collect();
    for (pid, name) in pids.iter().zip(&segments) {
        assert!(is_our_child(*pid));
        assert!(shm_exists(name), "{name}");
    }
    // Every worker's standby is up: the pool's processes are the workers and the standbys.
    let mut standbys = Vec::new();
    wait_until(DEADLINE, "every worker to have a standby", || {
        standbys = (0..3)
            .filter_map(|i| worker(&router, i).standby_pid)
            .collect();
        standbys.len() == 3
    });
    let base = env.base().to_string_lossy().into_owned();
    let mut sorted: Vec<u32> = pids.iter().chain(&standbys).copied().collect();
    sorted.sort_unstable();
    assert_eq!(processes_mentioning(&base), sorted);

    router.stop();
    assert_eq!(processes_mentioning(&base), Vec::<u32>::new());
    let children = children_of(std::process::id());
    for pid in pids.iter().chain(&standbys) {
        assert!(!children.contains(pid), "process {pid} survived stop()");
    }
    for name in &segments {
        assert!(!shm_exists(name), "segment {name} survived stop()");
    }
    assert!(router.status().is_none());
    assert!(router.worker_for_user("user-a").is_none());
    let r = echo(&router, "user-a");
    assert!(!r.success);
    assert_eq!(error_code(&r), "UNAVAILABLE");
    router.stop();

    // The same router again, on the same directory: the routing table is reloaded.
    router.start().expect("restart");
    assert_eq!(router.status().map(|s| s.routing_table_size), Some(3));
    let expected = [
        ("user-a", "worker-1"),
        ("user-b", "worker-2"),
        ("user-c", "worker-0"),
    ];
    for (user, w) in expected {
        assert_eq!(router.worker_for_user(user).as_deref(), Some(w));
        let r = agent(&router, user, "after");
        assert_eq!(r.worker_id.as_deref(), Some(w));
        assert_eq!(turn(&r), 2);
    }
    router.stop();

    // A new router on the same directory, while someone still holds the old pool.
    let other = env.start();
    let held = other.pool();
    other.stop();
    drop(other);
    let third = env.start();
    for (user, w) in expected {
        assert_eq!(third.worker_for_user(user).as_deref(), Some(w));
    }
    assert_eq!(turn(&agent(&third, "user-a", "third run")), 3);
    third.stop();
    drop(held);
}

// 7b.
#[test]
fn stop_drains_what_workers_took_and_refuses_the_rest_at_once() {
    let mut env = TestEnv::new(2);
    env.config.stall_timeout = Some(Duration::from_secs(120));
    // A request that stop() left hanging would end in TIMEOUT after this.
    env.config.request_timeout = Duration::from_secs(5);
    // No load bound: four users on one slot.
    env.config.balance_factor = 0.0;
    let router = env.start();
    let user = user_on_slot(&router, 0, "drain");
    let racers: Vec<String> = (0..4)
        .map(|t| user_on_slot(&router, 1, &format!("racer{t}-")))
        .collect();
    let (slow, queued, last) = std::thread::scope(|s| {
        let slow = send_and_wait_taken(s, &router, 0, || {
            test_action(&router, &user, "slow", json!({ "ms": 1000 }))
        });
        // Behind the slow one in the ring: never taken before the worker leaves.
        let queued = s.spawn(|| echo(&router, &user));
        // Callers racing with stop() on the other slot: each runs until its first refusal.
        let router = &router;
        let streams: Vec<_> = racers
            .iter()
            .map(|u| {
                s.spawn(move || {
                    loop {
                        let r = echo(router, u);
                        if !r.success {
                            return r;
                        }
                    }
                })
            })
            .collect();
        wait_until(DEADLINE, "the racers are going", || {
            worker(router, 1).requests_processed > 100 && worker(router, 0).active_requests == 2
        });
        router.stop();
        let last: Vec<_> = streams
            .into_iter()
            .map(|h| h.join().expect("racer"))
            .collect();
        (
            slow.join().expect("slow"),
            queued.join().expect("queued"),
            last,
        )
    });
    // Taken before stop(): finished within the drain timeout and answered.
    assert!(slow.success, "{slow:?}");
    // Not taken: refused, not left to time out.
    assert_eq!(error_code(&queued), "UNAVAILABLE", "{queued:?}");
    for r in &last {
        assert_eq!(error_code(r), "UNAVAILABLE", "{r:?}");
    }
}

// 8.
#[test]
fn a_worker_writing_garbage_is_killed_and_replaced_without_hurting_others() {
    let env = TestEnv::new(2);
    let router = env.start();
    let bad = user_on_slot(&router, 0, "bad");
    let good = user_on_slot(&router, 1, "good");
    for (i, action) in ["garbage-frame", "garbage-id", "garbage-ring"]
        .into_iter()
        .enumerate()
    {
        let old = pid_of(&router, 0);
        let stop = AtomicBool::new(false);
        let (r, (failed, _)) = std::thread::scope(|s| {
            let other = s.spawn(|| echo_until(&router, &good, &stop));
            let r = test_action(&router, &bad, action, json!({}));
            wait_replaced(&router, 0, old);
            stop.store(true, Ordering::Release);
            (r, other.join().expect("other"))
        });
        assert!(!r.success, "{action}: {r:?}");
        // The worker never sent a usable answer; it is killed for the violation, and the
        // request it had taken fails like any request taken by a worker that died.
        assert_eq!(error_code(&r), "WORKER_CRASHED", "{action}: {r:?}");
        assert_eq!(r.worker_id.as_deref(), Some("worker-0"));
        assert!(
            failed.is_empty(),
            "{action}: the other slot saw errors: {failed:?}"
        );
        assert!(!is_our_child(old));
        let after = echo(&router, &bad);
        assert!(after.success, "{action}: the successor serves: {after:?}");
        assert_eq!(worker(&router, 0).crashes, i as u64 + 1);
        let reasons = restart_reasons(&env, 0);
        assert!(
            reasons
                .last()
                .is_some_and(|r| r.starts_with("protocol error: ")),
            "{action}: {reasons:?}"
        );
    }
    assert_eq!(worker(&router, 1).crashes, 0);
    assert_eq!(worker(&router, 1).restarts, 0);
}

// 8b. The in-process lane's owner counts wake-ups like a gateway core does (see
// `isolation.rs` for the gateway): bytes on a wake socket that answer no park announcement are
// a flood, and the worker sending them is killed.
#[test]
fn a_worker_flooding_its_wake_sockets_is_killed_and_replaced() {
    let env = TestEnv::new(2);
    let router = env.start();
    let good = user_on_slot(&router, 1, "good");
    let old = pid_of(&router, 0);
    let stop = AtomicBool::new(false);
    let ((written, replaced), (failed, _)) = std::thread::scope(|s| {
        let other = s.spawn(|| echo_until(&router, &good, &stop));
        let r = hostile_worker::flood_wake_sockets(old, Duration::from_secs(20), || {
            worker(&router, 0).pid != Some(old)
        });
        stop.store(true, Ordering::Release);
        (r, other.join().expect("other"))
    });
    assert!(replaced, "not replaced after {written} bytes");
    assert!(failed.is_empty(), "the other slot saw errors: {failed:?}");
    assert_ne!(wait_replaced(&router, 0, old), old);
    let reasons = restart_reasons(&env, 0);
    assert!(
        reasons
            .last()
            .is_some_and(|r| r.contains("wake socket flood")),
        "{reasons:?}"
    );
    let bad = user_on_slot(&router, 0, "bad");
    assert!(echo(&router, &bad).success, "the successor serves");
    assert_eq!(worker(&router, 1).restarts, 0);
}

// 9.
#[test]
fn the_cli_demo_runs_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sandbox = dir.path().join("demo");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_moltbot"));
    // Hermetic: no configuration from the environment this test happens to run in.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("MOLTBOT_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        // The demo serves on the gateway port too: `-p 0` takes a free one, so that this test
        // does not collide with anything else on 18789.
        .args(["workers", "demo", "-w", "3", "-t", "1", "-p", "0", "-s"])
        .arg(&sandbox)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("demo output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed: {:?}\n{stdout}\n{stderr}",
        out.status
    );
    for needle in [
        "user-a     → worker-1",
        "user-b     → worker-2",
        "user-c     → worker-0",
        "user-a     → always worker-1",
        "worker-0: ready",
        "worker-1: ready",
        "worker-2: ready",
        "Done!",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
    assert_eq!(shm_segments_of(pid), Vec::<String>::new());
    let sandbox_arg = sandbox.to_string_lossy();
    assert_eq!(
        processes_mentioning(&sandbox_arg),
        Vec::<u32>::new(),
        "workers left behind"
    );
    assert!(sandbox.join("worker-2").join("sandbox.json").exists());
}

// 10.
#[test]
fn admission_queues_one_and_refuses_the_next() {
    let mut env = TestEnv::new(2);
    env.config.max_concurrent = 1;
    env.config.max_queue = 1;
    env.config.stall_timeout = Some(Duration::from_secs(120));
    let router = env.start();
    let user = user_on_slot(&router, 0, "adm");
    let other = user_on_slot(&router, 1, "free");

    let (slow, queued) = std::thread::scope(|s| {
        let slow = send_and_wait_taken(s, &router, 0, || {
            test_action(&router, &user, "slow", json!({ "ms": 3000 }))
        });
        assert_eq!(worker(&router, 0).state, "busy");
        let queued = s.spawn(|| echo(&router, &user));
        wait_until(DEADLINE, "one request queued", || {
            router.status().is_some_and(|st| st.queued_requests == 1)
        });
        let status = router.status().expect("running");
        assert_eq!(status.busy_workers, 1);
        assert_eq!(status.workers[0].queued_requests, 1);
        assert_eq!(status.workers[0].active_requests, 1);

        let refused = echo(&router, &user);
        assert!(!refused.success);
        assert_eq!(error_code(&refused), "UNAVAILABLE", "{refused:?}");
        assert_eq!(refused.worker_id.as_deref(), Some("worker-0"));
        // Refused while the other two were still waiting, not after.
        assert_eq!(router.status().map(|s| s.queued_requests), Some(1));
        // Another slot is not affected by this one's limit.
        assert!(echo(&router, &other).success);
        (slow.join().expect("slow"), queued.join().expect("queued"))
    });
    assert!(slow.success, "{slow:?}");
    assert!(queued.success, "{queued:?}");
    let status = router.status().expect("running");
    assert_eq!(status.queued_requests, 0);
    assert_eq!(status.workers[0].active_requests, 0);
}

// 10b.
#[test]
fn a_sequential_client_is_never_refused_because_of_its_own_previous_request() {
    let mut env = TestEnv::new(1);
    env.config.max_concurrent = 1;
    env.config.max_queue = 0;
    let router = env.start();
    for i in 0..500 {
        let r = echo(&router, "one-at-a-time");
        assert!(r.success, "request {i}: {r:?}");
        // The answer arrives after the permit is released, never before.
        assert_eq!(worker(&router, 0).active_requests, 0, "request {i}");
    }
}

/// The request limit is exact: a worker serves `max_requests` and leaves between requests,
/// the successor takes what follows; no process serves one more, and nothing is lost.
#[test]
fn max_requests_is_exact_per_process() {
    let mut env = TestEnv::new(1);
    env.config.max_requests = 15;
    env.config.max_requests_jitter = 0.0;
    let router = env.start();
    let mut per_pid: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for i in 0..100 {
        let r = agent(&router, "steady", &format!("m{i}"));
        assert!(r.success, "request {i}: {r:?}");
        *per_pid.entry(payload_pid(&r)).or_default() += 1;
    }
    assert!(per_pid.values().all(|&n| n <= 15), "{per_pid:?}");
    assert!(
        per_pid.len() >= 7,
        "100 requests at 15 each need 7 processes: {per_pid:?}"
    );
    let w = worker(&router, 0);
    assert_eq!(w.crashes, 0, "recycles are not crashes");
    assert!(
        restart_reasons(&env, 0)
            .iter()
            .any(|r| r.contains("max_requests"))
    );
    router.stop();
}

// The routing table's limit, through the library API.
#[test]
fn a_new_user_beyond_max_users_gets_user_limit() {
    let mut env = TestEnv::new(2);
    env.config.max_users = 1;
    let router = env.start();
    assert!(echo(&router, "first").success);
    let r = echo(&router, "second");
    assert_eq!(error_code(&r), "USER_LIMIT", "{r:?}");
    assert_eq!(r.worker_id, None, "{r:?}");
    assert!(echo(&router, "first").success);
    assert_eq!(router.status().expect("status").routing_table_size, 1);
}

#[test]
fn a_spinning_worker_serves_then_parks_without_burning_a_cpu() {
    let mut env = TestEnv::new(1);
    env.config.worker_spin = Some(Duration::from_millis(10));
    let router = env.start();
    let pid = pid_of(&router, 0);
    let args = cmdline(pid);
    let at = args
        .iter()
        .position(|a| a == "--spin-us")
        .expect("--spin-us");
    assert_eq!(
        args.get(at + 1).map(String::as_str),
        Some("10000"),
        "{args:?}"
    );

    for i in 0..50 {
        let r = echo(&router, &format!("user-{i}"));
        assert!(r.success, "{r:?}");
    }
    // Idle now: the worker spins 10ms after its last request, then parks, and after a park
    // that only the timeout (25ms here) ended it parks again without spinning. A worker that
    // kept spinning, or spun after every park (40% of a CPU), would keep adding CPU time.
    wait_until(DEADLINE, "the idle worker uses no CPU for 400ms", || {
        let before = cpu_ticks(pid).expect("the worker runs");
        std::thread::sleep(Duration::from_millis(400));
        cpu_ticks(pid) == Some(before)
    });
    // Parked, it still answers (the wake-up path).
    let r = echo(&router, "user-after");
    assert!(r.success, "{r:?}");
    router.stop();
}
