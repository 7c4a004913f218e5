//! `moltbot gateway`: run the gateway until SIGTERM (drain) or SIGINT (fast stop).

use signal_hook::consts::{SIGINT, SIGTERM};

use crate::command::args::{GatewayArgs, PoolArgs};
use crate::config::Config;
use crate::gateway::{Gateway, StopMode};

/// `moltbot gateway`
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayCmdArgs {
    /// Pool settings.
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Gateway settings.
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// Runs the gateway; returns the exit code.
pub fn run(args: GatewayCmdArgs) -> anyhow::Result<i32> {
    let config = args
        .pool
        .resolve(Some(&args.gateway), Config::process_env())?;
    // Signals are blocked into the iterator before any thread starts, so that none is lost.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let gateway = Gateway::start(config)?;
    eprintln!(
        "moltbot gateway listening on http://{} ({} workers)",
        gateway.local_addr(),
        gateway.config().worker_count
    );
    let first = signals.forever().next();
    let mode = if first == Some(SIGINT) {
        eprintln!("moltbot gateway: SIGINT received, stopping now");
        StopMode::Fast
    } else {
        eprintln!(
            "moltbot gateway: SIGTERM received, draining in-flight requests (Ctrl-C to stop now)"
        );
        StopMode::Drain
    };
    // During a drain, SIGINT (a second Ctrl-C) turns it into a fast stop.
    let handle = signals.handle();
    let watcher = (mode == StopMode::Drain).then(|| {
        let fast = gateway.fast_stop();
        std::thread::spawn(move || {
            for signal in signals.forever() {
                if signal == SIGINT {
                    eprintln!("moltbot gateway: SIGINT received, stopping now");
                    fast.now();
                    return;
                }
            }
        })
    });
    gateway.stop(mode);
    handle.close();
    if let Some(w) = watcher {
        let _ = w.join();
    }
    Ok(0)
}
