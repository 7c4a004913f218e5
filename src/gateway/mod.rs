//! The HTTP/1.1 front of the gateway.

pub mod http;
