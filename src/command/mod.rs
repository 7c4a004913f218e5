//! The subcommands, one module each. Every module owns its subcommand's arguments; what
//! several share (the output [`Format`]) lives here. `crate::cli` assembles them into the
//! command line; nothing here refers back to it.

pub mod args;
pub mod client;
pub mod demo;
pub mod gateway;
pub mod info;
pub mod route;
pub mod status;
pub mod users;
pub mod worker;

/// Output format of informational commands.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// For people.
    #[default]
    Human,
    /// For programs.
    Json,
}

/// Logs to stderr, filtered by `RUST_LOG` (default `default_level`).
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
