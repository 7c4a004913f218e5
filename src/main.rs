//! The `moltbot` command line.

use clap::Parser;
use moltbot::cli::{Cli, Command, WorkersCommand};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Worker(args) => moltbot::command::worker::run(args),
        Command::Gateway(args) => {
            moltbot::command::init_logging("info");
            match moltbot::command::gateway::run(args) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("moltbot gateway: {e:#}");
                    1
                }
            }
        }
        Command::Workers(w) => {
            moltbot::command::init_logging("warn");
            let result = match w {
                WorkersCommand::Demo(a) => moltbot::command::demo::run(a),
                WorkersCommand::Info(a) => moltbot::command::info::run(a),
                WorkersCommand::Status(a) => moltbot::command::status::run(a),
                WorkersCommand::Route(a) => moltbot::command::route::run(a),
            };
            match result {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("moltbot: {e:#}");
                    1
                }
            }
        }
    };
    std::process::exit(code);
}
