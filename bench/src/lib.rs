//! The engine of `moltbot-bench`: an HTTP/1.1 keep-alive load generator for the moltbot
//! gateway that also verifies what it receives (status, echoed bodies, sticky routing).
//!
//! One OS thread per `threads`, each driving its share of the connections with non-blocking
//! sockets and an edge-triggered epoll set; one request in flight per connection (no
//! pipelining). Closed loop (send the next request when the answer arrived) or open loop (a
//! fixed schedule per connection, latency measured from the intended send time as wrk2 does).
//!
//! With [`Protocol::Ws`] the connections speak the OpenClaw gateway protocol over WebSocket
//! instead (see [`ws`]): each acts for one user and keeps `depth` RPCs in flight.
//!
//! ```no_run
//! use moltbot_bench::{Config, Stop, Target};
//! use std::time::Duration;
//!
//! let mut cfg = Config::new(Target::parse("http://127.0.0.1:18789")?);
//! cfg.connections = 8;
//! cfg.stop = Stop::Duration(Duration::from_secs(1));
//! let report = moltbot_bench::run(&cfg)?;
//! println!("{}", report.render_table());
//! assert!(report.is_clean(), "{:?}", report.failures());
//! # Ok::<(), moltbot_bench::BenchError>(())
//! ```
#![forbid(unsafe_code)]

pub mod client_cpu;
pub mod config;
pub mod engine;
pub mod floor;
pub mod plot;
pub mod report;
pub mod response;
pub mod rpc;
pub mod schedule;
pub mod server_cpu;
pub mod stats;
mod thread;
pub mod users;
pub mod workload;
pub mod ws;

pub use client_cpu::ClientCpu;
pub use config::{Config, Dist, Endpoint, Protocol, Stop, Target, WsMethod};
pub use engine::{Progress, raise_nofile_limit, run, run_with_progress};
pub use report::{AgentStages, ErrorCounts, LatencySummary, Report, StickyExample, WsSummary};
pub use server_cpu::ServerCpu;

/// Why a run could not be started or finished.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The URL is not `http://host[:port][/prefix]`.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// `host:port`.
        host: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// A setting is out of range or settings contradict each other.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The operating system refused a resource the engine needs (epoll, timer, thread).
    #[error("{what}: {source}")]
    Os {
        /// What was being set up.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A load thread panicked (a bug in the engine).
    #[error("load thread {0} panicked")]
    ThreadPanicked(usize),
}
