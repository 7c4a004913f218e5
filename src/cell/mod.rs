//! One real OpenClaw gateway ("cell") per worker slot: the process and the client that talks
//! to it.
//!
//! Upstream runs one gateway per trusted operator and hosts tenants as separate gateway
//! processes, each with its own state directory and loopback port. These are the building
//! blocks for that: [`Cell`] starts `openclaw gateway run` confined to one directory (its
//! home, state, temporary files and logs all under the cell's root), watches and stops it;
//! [`BackendClient`] is the blocking WebSocket client a worker uses to relay one user's
//! frames to it, keeping request ids and payloads byte for byte.

pub mod client;
pub mod ports;
pub mod process;

pub use client::{BackendClient, ClientError, Frame, RequestText};
pub use ports::{ephemeral_overlap, ephemeral_ports};
pub use process::{Cell, CellError, CellSpec, Stopped, end_leftovers, port_range_free};
