//! `moltbot workers info`: the architecture and the effective configuration.

use crate::command::Format;
use crate::config::{Config, PoolArgs};

/// `moltbot workers info`
#[derive(clap::Args, Debug, Clone)]
pub struct InfoArgs {
    /// Pool settings to resolve.
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    pub format: Format,
}

const ARCHITECTURE: &str = "\
moltbot gateway: one fixed port, one sandboxed worker process per slot

  client --HTTP/1.1--> :PORT  gateway (glommio, one pinned executor per core)
                                |  parse, auth, userId -> worker (sticky consistent hash,
                                |  bounded load, persisted routing table)
                                |  rkyv request into the shared-memory ring [core -> worker]
                                v
             worker-N process (own sandbox dir, Landlock, rlimits)   <-- monitor thread:
                                |  handler runs, rkyv response into     heartbeats, waitpid,
                                v  the ring [worker -> core]            RSS, restart policy
             the gateway core writes the reply to the socket

Sandbox layout: <sandbox_dir>/worker-N/{sandbox.json, sessions/, state/, cache/, temp/, logs/}";

/// Prints the architecture and the configuration; returns the exit code.
pub fn run(args: InfoArgs) -> anyhow::Result<i32> {
    let config = Config::resolve(&args.pool, None, Config::process_env())?;
    let landlock = crate::worker::isolation::probe_landlock();
    match args.format {
        Format::Json => {
            let out = serde_json::json!({
                "config": config,
                "landlock": landlock,
                "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Format::Human => {
            println!("{ARCHITECTURE}\n");
            println!("Landlock on this kernel: {landlock:?}\n");
            println!("Effective configuration (file < MOLTBOT_* env < flags):\n");
            print!("{}", config.to_toml_string()?);
        }
    }
    Ok(0)
}
