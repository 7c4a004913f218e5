//! moltbot: the multi-tenant gateway and sandboxed worker pool of the moltbot assistant.
//!
//! One gateway on one port serves many users; each user is pinned to one worker process
//! (sticky, consistent hashing with bounded load), each worker lives in its own sandbox, and a
//! monitor thread respawns workers that crash or stall. The README describes the whole
//! picture: the HTTP API, the configuration, how each promise is kept and tested.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod cell;
pub mod cli;
pub mod command;
pub mod config;
pub mod error;
pub mod fsutil;
pub mod gateway;
pub mod metrics;
pub mod pool;
pub mod router;
pub mod sandbox;
pub mod user;
pub mod worker;

pub use api::{GatewayRouter, RouteRequest, RouteResponse};
pub use config::Config;
pub use error::RouteError;
pub use pool::{PoolStatus, WorkerStatus};
