//! The worker process: its runtime loop and the built-in handlers.

pub mod handlers;
