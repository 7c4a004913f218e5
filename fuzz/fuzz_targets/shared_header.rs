//! The shared header's validation (`Segment::attach` via `SegmentLayout::from_header`) on
//! arbitrary header values and mapping sizes, without shared memory.
//!
//! Besides "no panic": an accepted header describes exactly the mapping, so every ring the
//! segment hands out lies inside it, 128-byte aligned.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use moltbot_ipc::ring::{MIN_CAPACITY, RingHeader, ring_bytes};
use moltbot_ipc::segment::{
    LAYOUT_VERSION, MAGIC, MAX_CAPACITY, MAX_LANES, SegmentHeader, WorkerWake,
};
use moltbot_ipc::{SegmentError, SegmentLayout};

/// Header fields as a worker (or anything else with write access) may have left them. Each
/// field is either a raw value or a plausible one, so that the fuzzer reaches the later checks
/// and the accepting path as easily as the refusals.
#[derive(Arbitrary, Debug)]
struct Input {
    /// None: the right magic.
    magic: Option<u64>,
    /// None: the right version.
    version: Option<u32>,
    /// `n + 1`, or a raw value.
    lanes: Result<u8, u32>,
    /// log2 of the capacity, or a raw value.
    capacity: Result<u8, u64>,
    /// The consistent size plus this offset, or a raw value.
    declared: Result<i16, u64>,
    /// The consistent size plus this offset, or a raw value.
    mapping: Result<i16, usize>,
}

/// Bytes before the first ring: the header and the worker's park word.
const RINGS_OFFSET: usize = size_of::<SegmentHeader>() + size_of::<WorkerWake>();

/// The size the layout formula gives, in wide arithmetic (never overflows).
fn expected_size(lanes: u32, capacity: u64) -> u128 {
    let ring = size_of::<RingHeader>() as u128 + u128::from(capacity);
    RINGS_OFFSET as u128 + 2 * u128::from(lanes) * ring
}

fn offset(base: u128, delta: i16) -> u128 {
    base.saturating_add_signed(i128::from(delta))
}

fuzz_target!(|input: Input| {
    let magic = input.magic.unwrap_or(MAGIC);
    let version = input.version.unwrap_or(LAYOUT_VERSION);
    let lanes = match input.lanes {
        Ok(n) => u32::from(n) + 1,
        Err(raw) => raw,
    };
    let capacity = match input.capacity {
        Ok(log2) => 1u64.checked_shl(u32::from(log2 % 64)).unwrap_or(0),
        Err(raw) => raw,
    };
    let size = expected_size(lanes, capacity);
    let declared = match input.declared {
        Ok(d) => u64::try_from(offset(size, d)).unwrap_or(u64::MAX),
        Err(raw) => raw,
    };
    let mapping = match input.mapping {
        Ok(d) => usize::try_from(offset(size, d)).unwrap_or(usize::MAX),
        Err(raw) => raw,
    };
    match SegmentLayout::from_header(magic, version, lanes, capacity, declared, mapping) {
        Ok(layout) => {
            assert_eq!(magic, MAGIC);
            assert_eq!(version, LAYOUT_VERSION);
            assert!((1..=MAX_LANES).contains(&lanes));
            assert!(capacity.is_power_of_two());
            assert!((MIN_CAPACITY as u64..=MAX_CAPACITY as u64).contains(&capacity));
            assert_eq!(layout.lanes(), lanes);
            assert_eq!(layout.ring_capacity() as u64, capacity);
            // The mapping is exactly the layout: the last response ring ends at its end.
            assert_eq!(size, mapping as u128);
            assert_eq!(declared as u128, size);
            assert_eq!(layout.total_size(), mapping);
            let ring = ring_bytes(layout.ring_capacity());
            assert_eq!(ring % 128, 0);
            assert_eq!(RINGS_OFFSET % 128, 0);
            assert_eq!(RINGS_OFFSET + 2 * layout.lanes() as usize * ring, mapping);
        }
        Err(SegmentError::Layout(reason)) => assert!(!reason.is_empty()),
        Err(other) => panic!("from_header is pure, yet returned {other:?}"),
    }
});
