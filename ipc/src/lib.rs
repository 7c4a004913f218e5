//! Shared-memory channel between gateway cores and worker processes.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod message;

pub use message::{
    access_request, access_response, ArchivedRequest, ArchivedResponse, CodecError, Header, Kind,
    Method, Request, Response,
};
