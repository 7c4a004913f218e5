//! The atomics the ring and park/wake protocols use: std's, or loom's when the crate is built
//! with `--cfg loom` (`tools/loom`), so that the model checker runs the real protocol code.

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
