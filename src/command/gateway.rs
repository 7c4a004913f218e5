//! `moltbot gateway`: run the gateway until SIGTERM (drain) or SIGINT (fast stop).

use signal_hook::consts::{SIGINT, SIGTERM};

use crate::command::args::{GatewayArgs, PoolArgs};
use crate::config::Config;
use crate::gateway::{Gateway, Shutdown};

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
        gateway.router().config().worker_count
    );
    let signal = signals.forever().next();
    let mode = if signal == Some(SIGINT) {
        Shutdown::Fast
    } else {
        Shutdown::Drain
    };
    eprintln!(
        "moltbot gateway: {} received, {}",
        if mode == Shutdown::Fast {
            "SIGINT"
        } else {
            "SIGTERM"
        },
        if mode == Shutdown::Fast {
            "stopping now"
        } else {
            "draining in-flight requests"
        }
    );
    gateway.shutdown(mode);
    Ok(0)
}
