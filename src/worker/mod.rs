//! The worker process: its runtime loop, its confinement and the built-in handlers.

pub mod bridge;
pub mod handlers;
pub mod isolation;
pub mod runtime;
