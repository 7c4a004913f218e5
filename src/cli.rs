//! The `moltbot` command line: `gateway`, `workers {demo,info,status,route}` and the hidden
//! `worker` that the gateway runs in each slot. One file per subcommand in `command/`.

use clap::{Parser, Subcommand};

use crate::config::PoolArgs;

/// moltbot: multi-tenant gateway and sandboxed worker pool.
#[derive(Parser, Debug)]
#[command(name = "moltbot", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway on its port until SIGTERM (drain) or SIGINT (fast stop).
    Gateway(crate::command::gateway::GatewayCmdArgs),
    /// Manage and try the worker pool.
    #[command(subcommand)]
    Workers(WorkersCommand),
    /// One worker process (started by the gateway, not by hand).
    #[command(hide = true)]
    Worker(crate::worker::runtime::WorkerArgs),
}

/// `moltbot workers ...`
#[derive(Subcommand, Debug)]
pub enum WorkersCommand {
    /// Start a pool, route user-a, user-b and user-c, show stickiness and status, stop.
    Demo(DemoArgs),
    /// Print the architecture and the effective configuration.
    Info(InfoArgs),
    /// Show the status of a running gateway.
    Status(crate::command::status::StatusArgs),
    /// Show which worker a user is (or would be) routed to by a running gateway.
    Route(crate::command::route::RouteArgs),
}

/// `moltbot workers demo`
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Pool settings.
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Gateway settings (the demo serves on the port too; `-p 0` picks a free one).
    #[command(flatten)]
    pub gateway: crate::config::GatewayArgs,
    /// Seconds to keep running after the demo (0 = until Ctrl-C).
    #[arg(
        short = 't',
        long = "timeout",
        value_name = "SECONDS",
        default_value_t = 5
    )]
    pub timeout: u64,
}

/// Output format of informational commands.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// For people.
    #[default]
    Human,
    /// For programs.
    Json,
}

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

/// Runs `worker ...` if this process was started as a worker; returns otherwise.
///
/// Programs that embed the pool (such as `examples/setup_workers.rs`) call this first thing in
/// `main`, because the pool re-executes the current binary as its workers unless
/// `worker_program` is set.
pub fn run_worker_if_requested() {
    let mut args = std::env::args_os();
    let _program = args.next();
    if args.next().is_some_and(|a| a == "worker") {
        let code = match Cli::try_parse() {
            Ok(Cli {
                command: Command::Worker(w),
            }) => crate::command::worker::run(w),
            Ok(_) => 2,
            Err(e) => {
                let _ = e.print();
                2
            }
        };
        std::process::exit(code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn gateway_flags_parse() {
        let cli = Cli::try_parse_from([
            "moltbot",
            "gateway",
            "-w",
            "3",
            "-p",
            "0",
            "--worker-command",
            "python3 agent.py",
            "--cores",
            "0,1",
        ])
        .unwrap();
        let Command::Gateway(g) = cli.command else {
            panic!("not the gateway command")
        };
        assert_eq!(g.pool.workers, Some(3));
        assert_eq!(
            g.pool.worker_command.unwrap().0,
            ["python3".to_string(), "agent.py".to_string()]
        );
    }
}
