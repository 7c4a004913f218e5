//! Shared-memory channel between gateway cores and worker processes.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod message;

pub use message::{
    ArchivedRequest, ArchivedResponse, CodecError, Kind, Method, Request, Response, access_request,
    access_response,
};
pub mod ring;

pub use ring::{AlignedBuf, Consumer, Frame, HeapRing, Producer, RingError, RingRef};
pub mod clock;
pub mod segment;
pub mod wake;

pub use segment::{Segment, SegmentError, SegmentHeader, SegmentLayout};
pub use wake::{ParkOutcome, WakeReceiver, WakeSender, wake_pair};
pub mod process;
