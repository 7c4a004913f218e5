//! The `moltbot` command line: `gateway`, `workers {demo,info,status,route}`, `users
//! {add,list,revoke,rotate}` and the hidden `worker` that the gateway runs in each slot. This
//! module only assembles the subcommands of `crate::command` (one file each, owning its
//! arguments) and dispatches to them; the dependency goes this way only.

use clap::{Parser, Subcommand};

use crate::command::{self, demo, gateway, info, route, status, users, worker};

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
    Gateway(gateway::GatewayCmdArgs),
    /// Manage and try the worker pool.
    #[command(subcommand)]
    Workers(WorkersCommand),
    /// Manage the users file: per-user tokens for the gateway.
    #[command(subcommand)]
    Users(users::UsersCommand),
    /// One worker process (started by the gateway, not by hand).
    #[command(hide = true)]
    Worker(Box<worker::WorkerArgs>),
}

/// `moltbot workers ...`
#[derive(Subcommand, Debug)]
pub enum WorkersCommand {
    /// Start a pool, route user-a, user-b and user-c, show stickiness and status, stop.
    Demo(demo::DemoArgs),
    /// Print the architecture and the effective configuration.
    Info(info::InfoArgs),
    /// Show the status of a running gateway.
    Status(status::StatusArgs),
    /// Show which worker a user is (or would be) routed to by a running gateway.
    Route(route::RouteArgs),
}

/// Runs a parsed command line; returns the process exit code. Errors are printed here, with
/// the name of the command that failed.
pub fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Worker(args) => worker::run(*args),
        Command::Gateway(args) => {
            command::init_logging("info");
            gateway::run(args).unwrap_or_else(|e| {
                eprintln!("moltbot gateway: {e:#}");
                1
            })
        }
        Command::Users(u) => {
            command::init_logging("warn");
            users::run(u).unwrap_or_else(|e| {
                eprintln!("moltbot users: {e:#}");
                1
            })
        }
        Command::Workers(w) => {
            command::init_logging("warn");
            let result = match w {
                WorkersCommand::Demo(a) => demo::run(a),
                WorkersCommand::Info(a) => info::run(a),
                WorkersCommand::Status(a) => status::run(a),
                WorkersCommand::Route(a) => route::run(a),
            };
            result.unwrap_or_else(|e| {
                eprintln!("moltbot: {e:#}");
                1
            })
        }
    }
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
            }) => worker::run(*w),
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
        assert_eq!(g.pool.flags.get("worker_count"), Some("3"));
        assert_eq!(g.pool.flags.get("worker_command"), Some("python3 agent.py"));
        assert_eq!(g.gateway.flags.get("cores"), Some("0,1"));
        let c = g.pool.resolve(Some(&g.gateway), Vec::new()).unwrap();
        assert_eq!(c.worker_command.unwrap(), ["python3", "agent.py"]);
        assert_eq!(c.port, 0);
    }
}
