//! The `moltbot` command line.

use clap::Parser;
use moltbot::cli::{Cli, Command, WorkersCommand};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Worker(args) => moltbot::command::worker::run(args),
        Command::Workers(w) => {
            moltbot::command::init_logging("warn");
            let result = match w {
                WorkersCommand::Demo(a) => moltbot::command::demo::run(a),
                WorkersCommand::Info(a) => moltbot::command::info::run(a),
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
