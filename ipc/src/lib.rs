//! Shared-memory channel between gateway cores and worker processes.
//!
//! The safe API cannot be driven into undefined behaviour within a process: ring ends are
//! handed out once each by the owner of the ring's memory, frames and reservations borrow their
//! end, and every position or length read from shared memory is checked (see [`ring`] for the
//! model, including what a peer *process* can and cannot do).
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod message;

pub use message::{
    ArchivedPart, ArchivedRequest, ArchivedResponse, CodecError, Kind, Method, Part, Request,
    Response, access_request, access_response,
};
pub mod ring;
mod sync;

#[cfg(not(loom))]
pub use ring::Tamper;
pub use ring::{
    AlignedBuf, Consumer, HeapRing, Producer, ReadFrame, Reservation, RingError, TakeError,
};
pub mod clock;
#[cfg(not(loom))]
pub mod segment;
pub mod wake;

#[cfg(not(loom))]
pub use segment::{GatewayLane, Segment, SegmentError, SegmentHeader, SegmentLayout, WorkerLane};
pub use wake::{ParkOutcome, WakeReceiver, WakeSender, wake_pair};
pub mod process;
