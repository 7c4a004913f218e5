//! The worker-pool guide's "Full Setup Script" with the Rust library API: start 3 workers,
//! route user-a, user-b and user-c, verify stickiness over 10 requests each, print the
//! status, stop.
//!
//! ```text
//! cargo run --example setup_workers
//! MOLTBOT_SANDBOX_DIR=/tmp/elsewhere cargo run --example setup_workers
//! ```
//!
//! Exits non-zero if a request fails or a user is not sticky.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use moltbot::{Config, GatewayRouter, RouteRequest};

const USERS: [&str; 3] = ["user-a", "user-b", "user-c"];

fn rule() {
    println!("{}", "─".repeat(30));
}

fn main() -> ExitCode {
    // The pool re-executes this binary as its workers: a worker must become one here, before
    // anything else runs.
    moltbot::cli::run_worker_if_requested();

    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("setup_workers: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Returns whether every check passed.
fn run() -> anyhow::Result<bool> {
    println!("Starting worker pool with 3 workers...\n");
    let sandbox_dir = std::env::var_os("MOLTBOT_SANDBOX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/moltbot-workers"));
    let config = Config {
        worker_count: 3,
        sandbox_dir,
        max_concurrent: 10,
        request_timeout: Duration::from_secs(60),
        heartbeat_interval: Duration::from_secs(5),
        max_memory: 256 * 1024 * 1024,
        max_requests: 5000,
        ..Config::default()
    };
    let router = GatewayRouter::new(config)?;
    router.start()?;
    println!("Worker pool ready!\n");

    let mut ok = true;
    println!("Routing assignments:");
    rule();
    for user in USERS {
        let response = router.route(RouteRequest {
            kind: "agent".into(),
            user_id: user.into(),
            payload: serde_json::json!({ "message": "test" }),
        });
        let worker = router.worker_for_user(user).unwrap_or_default();
        if response.success && response.worker_id.as_deref() == Some(worker.as_str()) {
            println!("  {user:<10} → {worker}");
        } else {
            ok = false;
            println!(
                "  {user:<10} → {worker} (FAILED: {} {})",
                response.error_code.unwrap_or_default(),
                response.error.unwrap_or_default()
            );
        }
    }

    println!("\nVerifying sticky routing (10 requests each):");
    rule();
    for user in USERS {
        let mut workers = BTreeSet::new();
        for _ in 0..10 {
            let response = router.route(RouteRequest {
                kind: "echo".into(),
                user_id: user.into(),
                payload: serde_json::json!({ "n": 1 }),
            });
            if !response.success {
                ok = false;
            }
            workers.insert(response.worker_id.unwrap_or_else(|| "none".into()));
            workers.insert(
                router
                    .worker_for_user(user)
                    .unwrap_or_else(|| "none".into()),
            );
        }
        ok &= workers.len() == 1;
        let list: Vec<String> = workers.into_iter().collect();
        println!("  {user:<10} → always {}", list.join(", "));
    }

    println!("\nWorker Status:");
    rule();
    match router.status() {
        Some(status) => {
            for w in &status.workers {
                let pid = w.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                println!("  {}: {} (pid: {pid})", w.worker_id, w.state);
            }
            ok &= status.healthy_workers == 3;
        }
        None => ok = false,
    }

    println!("\nStopping workers...");
    router.stop();
    println!("Done!");
    if !ok {
        eprintln!("setup_workers: some checks failed (see above)");
    }
    Ok(ok)
}
