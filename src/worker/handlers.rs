//! Built-in handlers
