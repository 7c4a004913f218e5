//! The `moltbot` command line.

use clap::Parser;

fn main() {
    std::process::exit(moltbot::cli::run(moltbot::cli::Cli::parse()));
}
