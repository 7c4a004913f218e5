//! `moltbot workers demo`: the guide's walk-through, for real.

use std::time::Duration;

use crate::api::{GatewayRouter, RouteRequest};
use crate::cli::DemoArgs;
use crate::config::Config;

const USERS: [&str; 3] = ["user-a", "user-b", "user-c"];

fn rule() {
    println!("{}", "─".repeat(30));
}

/// Runs the demo; returns the exit code.
pub fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let mut pool_args = args.pool.clone();
    if pool_args.workers.is_none() {
        pool_args.workers = Some(3);
    }
    let config = Config::resolve(&pool_args, None, Config::process_env())?;
    println!("Starting worker pool with {} workers...\n", config.worker_count);
    let router = GatewayRouter::new(config)?;
    router.start()?;
    println!("Worker pool ready!\n");

    println!("Routing assignments:");
    rule();
    let mut ok = true;
    for user in USERS {
        let resp = router.route(RouteRequest {
            kind: "agent:message".into(),
            user_id: user.into(),
            payload: serde_json::json!({ "message": format!("Hello from {user}") }),
        });
        let worker = router.worker_for_user(user).unwrap_or_default();
        if !resp.success || resp.worker_id.as_deref() != Some(worker.as_str()) {
            ok = false;
            println!("  {user:<10} → {worker} (request failed: {:?})", resp.error);
        } else {
            println!("  {user:<10} → {worker}");
        }
    }

    println!("\nVerifying sticky routing (10 requests each):");
    rule();
    for user in USERS {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let resp = router.route(RouteRequest {
                kind: "echo".into(),
                user_id: user.into(),
                payload: serde_json::json!({}),
            });
            seen.insert(resp.worker_id.unwrap_or_else(|| "none".into()));
        }
        ok &= seen.len() == 1;
        let list: Vec<_> = seen.into_iter().collect();
        println!("  {user:<10} → always {}", list.join(", "));
    }

    println!("\nWorker Status:");
    rule();
    if let Some(status) = router.status() {
        for w in &status.workers {
            let pid = w.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
            println!("  {}: {} (pid: {pid})", w.worker_id, w.state);
        }
    }

    wait(args.timeout)?;
    println!("\nStopping workers...");
    router.stop();
    println!("Done!");
    Ok(if ok { 0 } else { 1 })
}

/// Waits `seconds` (0: until SIGINT/SIGTERM); a signal ends the wait early.
fn wait(seconds: u64) -> anyhow::Result<()> {
    let (tx, rx) = crossbeam::channel::bounded(1);
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let handle = signals.handle();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = tx.send(());
        }
    });
    if seconds == 0 {
        println!("\nRunning until Ctrl-C...");
        let _ = rx.recv();
    } else {
        let _ = rx.recv_timeout(Duration::from_secs(seconds));
    }
    handle.close();
    Ok(())
}
