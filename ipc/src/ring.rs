//! A single-producer single-consumer ring of variable-length frames in shared memory.
//!
//! The algorithm is rtrb's: the producer owns `tail`, the consumer owns `head`, both positions
//! are byte offsets that only grow (`u64`, never wrapping in practice), and each side caches the
//! other's position, reloading it only when the ring looks full (producer) or empty (consumer).
//! The layout is iceoryx2-like: `#[repr(C)]`, each side's line 128-byte aligned so that the two
//! never share a cache line (also across the adjacent-line prefetcher).
//!
//! Frames: a 16-byte header (`len`, `tag`, reserved) followed by the payload, padded to 16
//! bytes, so every payload starts 16-byte aligned (rkyv's requirement). A frame never wraps: if
//! it does not fit before the end of the buffer, a padding frame fills the tail and the frame
//! starts at offset 0. The largest payload is `capacity - 16`.
//!
//! # Ends
//!
//! A ring's [`Producer`] and [`Consumer`] come only from the owner of its memory
//! ([`crate::Segment::take_gateway_lane`] / [`crate::Segment::take_worker_lane`], or
//! [`HeapRing::take_producer`] / [`HeapRing::take_consumer`]), each at most once at a time per
//! process: a second take while the first end lives is refused with [`TakeError::Taken`], and a
//! dropped end may be taken again (a respawned worker continues where its predecessor stopped).
//! Frames and reservations borrow their end: a [`ReadFrame`] from [`Consumer::peek`] and a
//! [`Reservation`] from [`Producer::reserve`] cannot outlive a release or commit, cannot be
//! made by hand, and there is at most one of each at a time.
//!
//! ```compile_fail,E0599
//! // Ends cannot be duplicated.
//! let ring = moltbot_ipc::HeapRing::new(256).unwrap();
//! let p = ring.take_producer().unwrap();
//! let _second = p.clone();
//! ```
//!
//! ```compile_fail,E0603
//! // The ring's location is not public: no end can be attached from it.
//! use moltbot_ipc::ring::RingRef;
//! ```
//!
//! # Trust and memory model
//!
//! Within this process the safe API cannot produce a data race or an out-of-bounds access: the
//! one producer writes only free space (between its own `tail` and the consumer's `head` plus the
//! capacity), the one consumer reads only published frames (between its own `head` and the
//! producer's `tail`, loaded with `Acquire`), each side keeps its own position locally and
//! never re-reads it from shared memory, and every position and length read from the other
//! side is checked before use. A violation is [`RingError::Corrupt`], never a panic, never an
//! out-of-bounds access.
//!
//! When the other end is a different process (the gateway and a worker), that process can
//! write anything into the shared memory at any time: no type can prevent it. The ring then
//! still never reads or writes outside its data area (positions and lengths are checked), and
//! the side facing an untrusted peer never forms a reference to bytes that peer can write: the
//! gateway copies response frames out with relaxed atomic loads ([`ReadFrame::copy_into`]) and
//! checks only the copy, and writes its requests into the free space with relaxed atomic
//! stores from a private buffer ([`Producer::push_buf`]). In-place access
//! ([`ReadFrame::bytes`], [`Reservation::as_mut_slice`]) is for the trusted direction (the
//! worker reading the gateway's requests and writing its answers); a peer that rewrote a frame
//! it had published would garble what is read there.
//! [`Tamper`] plays such a peer inside one process, for tests and fuzzing, without breaking the
//! rules above: it exists only while the other end is not taken in this process.

#[cfg(not(loom))]
use core::ptr::NonNull;
use core::sync::atomic::AtomicU8;
use std::sync::Arc;

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Bytes of a frame header.
pub const FRAME_HEADER: usize = 16;
/// Alignment of every frame and payload.
pub const FRAME_ALIGN: usize = 16;
/// Smallest ring capacity accepted.
pub const MIN_CAPACITY: usize = 256;
/// Largest ring capacity accepted.
pub const MAX_CAPACITY: usize = 1 << 30;

const TAG_DATA: u32 = 0x444d_5246; // "FRMD"
const TAG_PAD: u32 = 0x504d_5246; // "FRMP"

/// The producer's cache line.
#[repr(C, align(128))]
pub struct ProducerLine {
    /// End of the last published frame. Written only by the producer (Release).
    pub tail: AtomicU64,
}

/// The consumer's cache line.
#[repr(C, align(128))]
pub struct ConsumerLine {
    /// Start of the first frame not yet released. Written only by the consumer (Release).
    pub head: AtomicU64,
    /// End of the frame the consumer has taken for processing (`claimed > head` means the frame
    /// at `head` is being processed). Lets a supervisor tell taken frames from unread ones after
    /// the consumer died.
    pub claimed: AtomicU64,
}

/// The park flag of the ring's consumer, on its own line: the producer reads it after every
/// push, the consumer writes it only when it goes to sleep.
#[repr(C, align(128))]
pub struct WakeLine {
    /// 1 while the consumer is parked (or about to), 0 otherwise. See [`crate::wake`].
    pub parked: AtomicU32,
}

/// The control block that precedes a ring's data bytes.
#[repr(C)]
pub struct RingHeader {
    /// Producer-owned line.
    pub producer: ProducerLine,
    /// Consumer-owned line.
    pub consumer: ConsumerLine,
    /// Consumer park flag.
    pub wake: WakeLine,
}

#[cfg(loom)]
impl RingHeader {
    /// An empty ring's control block (loom's atomics cannot live in zeroed raw memory).
    fn new() -> RingHeader {
        RingHeader {
            producer: ProducerLine {
                tail: AtomicU64::new(0),
            },
            consumer: ConsumerLine {
                head: AtomicU64::new(0),
                claimed: AtomicU64::new(0),
            },
            wake: WakeLine {
                parked: AtomicU32::new(0),
            },
        }
    }
}

/// Bytes a ring occupies: its header plus `capacity` data bytes.
pub const fn ring_bytes(capacity: usize) -> usize {
    core::mem::size_of::<RingHeader>() + capacity
}

/// Errors of ring operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// A frame of this payload size can never fit in this ring.
    #[error("frame of {len} bytes exceeds the ring's maximum of {max}")]
    TooLarge {
        /// Requested payload bytes.
        len: usize,
        /// Largest payload the ring can carry.
        max: usize,
    },
    /// Not enough free space right now; retry after the consumer made progress.
    #[error("ring is full")]
    Full,
    /// The peer wrote positions or frame headers that break the ring's invariants.
    #[error("ring corrupted by peer: {0}")]
    Corrupt(&'static str),
}

/// Why an end of a ring could not be handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TakeError {
    /// This end is already taken in this process (by a value still alive).
    #[error("this end of the ring is already taken in this process")]
    Taken,
    /// Acting for the other end ([`Tamper`], [`Producer::discard_until`]) while that end is
    /// taken in this process.
    #[error("the other end of the ring is taken in this process")]
    PeerTaken,
    /// A [`Tamper`] is writing the ring or has stored positions that its end has not
    /// republished since ([`Consumer::reset_producer`] / [`Producer::discard_until`]).
    #[error("the ring was tampered with and its positions are not republished yet")]
    Tampered,
    /// The segment has no such lane.
    #[error("no lane {lane}: the segment has {lanes}")]
    NoLane {
        /// The lane asked for.
        lane: u32,
        /// Lanes of the segment.
        lanes: u32,
    },
    /// The positions in shared memory do not make a valid ring.
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// Keeps the memory a ring lives in alive for as long as an end exists.
#[cfg(not(loom))]
pub(crate) trait Backing: Send + Sync + 'static {}
#[cfg(not(loom))]
impl<T: Send + Sync + 'static> Backing for T {}

const PRODUCER: u8 = 1;
const CONSUMER: u8 = 2;
/// A [`Tamper`] (or a discard on a dead consumer's behalf) is writing the ring.
const TAMPERING: u8 = 4;
/// A [`Tamper`] stored positions; its end has not republished its own since.
const UNREPAIRED: u8 = 8;

/// Which ends of one ring are handed out in this process: the in-process half of the
/// single-producer single-consumer rule. Kept by the owner of the ring's memory (process-local,
/// never in shared memory, which a peer could write).
pub(crate) struct RingEnds {
    /// [`PRODUCER`], [`CONSUMER`], [`TAMPERING`], [`UNREPAIRED`] bits.
    bits: AtomicU8,
}

impl RingEnds {
    pub(crate) fn new() -> Arc<RingEnds> {
        Arc::new(RingEnds {
            bits: AtomicU8::new(0),
        })
    }

    /// Marks `end` taken. Acquire: the new end sees every position its predecessor stored.
    fn take(self: &Arc<Self>, end: u8) -> Result<EndGuard, TakeError> {
        let mut bits = self.bits.load(core::sync::atomic::Ordering::Acquire);
        loop {
            if bits & end != 0 {
                return Err(TakeError::Taken);
            }
            if bits & (TAMPERING | UNREPAIRED) != 0 {
                return Err(TakeError::Tampered);
            }
            match self.bits.compare_exchange_weak(
                bits,
                bits | end,
                core::sync::atomic::Ordering::AcqRel,
                core::sync::atomic::Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(EndGuard {
                        ends: self.clone(),
                        end,
                    });
                }
                Err(now) => bits = now,
            }
        }
    }

    /// Sets [`TAMPERING`] if `peer` is not taken: no end can be taken until [`Self::unlock`].
    fn lock_without(&self, peer: u8) -> bool {
        let mut bits = self.bits.load(core::sync::atomic::Ordering::Acquire);
        loop {
            if bits & (peer | TAMPERING) != 0 {
                return false;
            }
            match self.bits.compare_exchange_weak(
                bits,
                bits | TAMPERING,
                core::sync::atomic::Ordering::AcqRel,
                core::sync::atomic::Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => bits = now,
            }
        }
    }

    #[cfg(not(loom))]
    fn set(&self, bits: u8) {
        self.bits
            .fetch_or(bits, core::sync::atomic::Ordering::AcqRel);
    }

    fn clear(&self, bits: u8) {
        self.bits
            .fetch_and(!bits, core::sync::atomic::Ordering::AcqRel);
    }
}

/// One taken end: its bit in [`RingEnds`], cleared when the end is dropped.
pub(crate) struct EndGuard {
    /// The ring's flags.
    ends: Arc<RingEnds>,
    /// [`PRODUCER`] or [`CONSUMER`].
    end: u8,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        // UNREPAIRED can only have been set through this end (its peer was not taken, and
        // cannot be taken while the bit is set): with it gone no end holds a view of the ring
        // that could disagree with the positions in memory.
        self.ends.clear(self.end | UNREPAIRED);
    }
}

/// A ring's location: header and data, the capacity (from the owner's own layout, never read
/// back from shared memory) and what keeps the memory alive. Crate-private and never cloned:
/// each end owns the one made for it when it was taken.
#[cfg(not(loom))]
pub(crate) struct RingRef {
    /// The control block, 128-byte aligned.
    header: NonNull<RingHeader>,
    /// The first of `capacity` data bytes, 128-byte aligned, right after the header.
    data: NonNull<u8>,
    /// Data bytes: a power of two in `MIN_CAPACITY..=MAX_CAPACITY`.
    capacity: usize,
    /// Keeps the memory mapped (or allocated) while this handle exists.
    _backing: Arc<dyn Backing>,
}

// SAFETY: a RingRef is a pointer into memory kept alive by `_backing` (Send + Sync). It gives
// access to the bytes only through atomics and through the one Producer or Consumer that owns
// it, so moving it to another thread moves that access along with its owner.
#[cfg(not(loom))]
unsafe impl Send for RingRef {}

#[cfg(not(loom))]
impl RingRef {
    /// Describes a ring whose header starts at `base`, followed by `capacity` data bytes.
    ///
    /// # Safety
    /// `base` must be 128-byte aligned and valid for reads and writes of
    /// [`ring_bytes`]`(capacity)` bytes for as long as `backing` lives, and hold a valid ring
    /// (all zeros is an empty one); `capacity` must be a power of two in
    /// `MIN_CAPACITY..=MAX_CAPACITY`. Within this process that memory may only be accessed
    /// through the ends that [`RingEnds`] hands out for it, with one [`RingEnds`] per ring
    /// (however many times the memory is mapped).
    pub(crate) unsafe fn from_raw(
        base: NonNull<u8>,
        capacity: usize,
        backing: Arc<dyn Backing>,
    ) -> Self {
        debug_assert!(capacity.is_power_of_two() && capacity >= MIN_CAPACITY);
        debug_assert_eq!(base.as_ptr() as usize % 128, 0);
        // SAFETY: the caller guarantees `ring_bytes(capacity)` valid bytes from `base`, so the
        // data area at offset size_of::<RingHeader>() is in bounds.
        let data = unsafe { base.add(core::mem::size_of::<RingHeader>()) };
        RingRef {
            header: base.cast(),
            data,
            capacity,
            _backing: backing,
        }
    }

    /// The control block (all atomics): positions and the park flag.
    fn header(&self) -> &RingHeader {
        // SAFETY: `header` points to a live, aligned RingHeader (from_raw's contract) whose
        // fields are all atomics, so shared references are sound even with a concurrent peer.
        unsafe { self.header.as_ref() }
    }

    fn data_ptr(&self) -> *mut u8 {
        self.data.as_ptr()
    }

    /// The frame-header words at byte offset `off`.
    fn frame_words(&self, off: usize) -> (&AtomicU32, &AtomicU32) {
        assert!(off.is_multiple_of(FRAME_ALIGN) && off + FRAME_HEADER <= self.capacity);
        // SAFETY: checked just above: the 8 bytes at `off` are in the data area and 4-aligned
        // (data starts 128-aligned). AtomicU32 has the layout of u32, any bit pattern is valid,
        // and every access to frame headers in this process is atomic.
        unsafe {
            let p = self.data.as_ptr().add(off).cast::<AtomicU32>();
            (&*p, &*p.add(1))
        }
    }

    /// Copies the `dst.len()` 8-byte words from data offset `off` with relaxed atomic loads.
    fn load_words(&self, off: usize, dst: &mut [u64]) {
        assert!(off.is_multiple_of(8) && off + dst.len() * 8 <= self.capacity);
        let src = self
            .data_ptr()
            .wrapping_add(off)
            .cast::<core::sync::atomic::AtomicU64>();
        for (i, w) in dst.iter_mut().enumerate() {
            // SAFETY: checked above: word `i` lies in the data area and is 8-aligned (data is
            // 128-aligned). AtomicU64 accepts any bit pattern, and an atomic load is sound
            // while another process writes the same bytes.
            *w = unsafe { (*src.add(i)).load(core::sync::atomic::Ordering::Relaxed) };
        }
    }

    /// Copies `src` into the data area from offset `off` with relaxed atomic stores.
    fn store_words(&self, off: usize, src: &[u64]) {
        assert!(off.is_multiple_of(8) && off + src.len() * 8 <= self.capacity);
        let dst = self
            .data_ptr()
            .wrapping_add(off)
            .cast::<core::sync::atomic::AtomicU64>();
        for (i, w) in src.iter().enumerate() {
            // SAFETY: checked above: word `i` lies in the data area and is 8-aligned (data is
            // 128-aligned). AtomicU64 has u64's layout, and an atomic store is sound while
            // another process reads or writes the same bytes.
            unsafe { (*dst.add(i)).store(*w, core::sync::atomic::Ordering::Relaxed) };
        }
    }

    /// Stores one byte of the data area with a relaxed atomic store.
    fn store_byte(&self, off: usize, b: u8) {
        assert!(off < self.capacity);
        // SAFETY: `off` is in the data area (checked above); AtomicU8 has u8's layout. Only a
        // Tamper calls this, while no end of this ring hands out a reference to its bytes.
        unsafe {
            (*self.data_ptr().add(off).cast::<AtomicU8>())
                .store(b, core::sync::atomic::Ordering::Relaxed)
        }
    }

    /// Loom's record of an access to data bytes (nothing outside loom).
    #[inline(always)]
    fn track(&self, _off: usize, _len: usize, _write: bool) {}
}

/// The memory of a ring under loom: the header's atomics and the frame headers are loom
/// atomics; the payload bytes are plain memory, and each 16-byte unit has a loom cell that
/// records every access to it, so that loom reports a read of bytes whose write does not
/// happen before it (an unpublished frame) and a write over bytes still being read.
#[cfg(loom)]
pub(crate) struct LoomMemory {
    /// The control block.
    header: RingHeader,
    /// Frame-header words (length, tag) of each 16-byte unit.
    words: Box<[AtomicU32]>,
    /// The payload bytes, 16-byte aligned.
    bytes: Box<[core::cell::UnsafeCell<u128>]>,
    /// One access record per 16-byte unit.
    track: Box<[loom::cell::UnsafeCell<()>]>,
}

// SAFETY: the payload bytes are accessed only through the ring's ends, whose protocol loom
// checks on every access (the `track` cells).
#[cfg(loom)]
unsafe impl Sync for LoomMemory {}
// SAFETY: as above.
#[cfg(loom)]
unsafe impl Send for LoomMemory {}

#[cfg(loom)]
pub(crate) struct RingRef {
    /// The memory.
    mem: Arc<LoomMemory>,
    /// Data bytes.
    capacity: usize,
}

#[cfg(loom)]
impl RingRef {
    fn new_loom(capacity: usize) -> Arc<LoomMemory> {
        let units = capacity / FRAME_ALIGN;
        Arc::new(LoomMemory {
            header: RingHeader::new(),
            words: (0..units * 2).map(|_| AtomicU32::new(0)).collect(),
            bytes: (0..units).map(|_| core::cell::UnsafeCell::new(0)).collect(),
            track: (0..units)
                .map(|_| loom::cell::UnsafeCell::new(()))
                .collect(),
        })
    }

    fn header(&self) -> &RingHeader {
        &self.mem.header
    }

    fn data_ptr(&self) -> *mut u8 {
        core::cell::UnsafeCell::raw_get(self.mem.bytes.as_ptr()).cast::<u8>()
    }

    fn frame_words(&self, off: usize) -> (&AtomicU32, &AtomicU32) {
        assert!(off % FRAME_ALIGN == 0 && off + FRAME_HEADER <= self.capacity);
        let u = off / FRAME_ALIGN;
        (&self.mem.words[2 * u], &self.mem.words[2 * u + 1])
    }

    fn load_words(&self, off: usize, dst: &mut [u64]) {
        assert!(off % 8 == 0 && off + dst.len() * 8 <= self.capacity);
        self.track(off, dst.len() * 8, false);
        for (i, w) in dst.iter_mut().enumerate() {
            // SAFETY: in bounds (checked above); loom runs one thread at a time, and `track`
            // has checked that this read is ordered after the bytes' last write.
            *w = unsafe { self.data_ptr().add(off + 8 * i).cast::<u64>().read() };
        }
    }

    fn store_words(&self, off: usize, src: &[u64]) {
        assert!(off % 8 == 0 && off + src.len() * 8 <= self.capacity);
        self.track(off, src.len() * 8, true);
        for (i, w) in src.iter().enumerate() {
            // SAFETY: in bounds (checked above); loom runs one thread at a time, and `track`
            // has checked that no read or write of these bytes is concurrent with this one.
            unsafe { self.data_ptr().add(off + 8 * i).cast::<u64>().write(*w) };
        }
    }

    fn track(&self, off: usize, len: usize, write: bool) {
        let first = off / FRAME_ALIGN;
        let last = (off + len).div_ceil(FRAME_ALIGN);
        for cell in &self.mem.track[first..last] {
            if write {
                cell.with_mut(|_| ());
            } else {
                cell.with(|_| ());
            }
        }
    }
}

impl RingRef {
    fn capacity(&self) -> usize {
        self.capacity
    }

    fn max_payload(&self) -> usize {
        self.capacity - FRAME_HEADER
    }

    fn mask(&self) -> u64 {
        self.capacity as u64 - 1
    }

    fn write_frame_header(&self, off: usize, len: u32, tag: u32) {
        let (l, t) = self.frame_words(off);
        l.store(len, Ordering::Relaxed);
        t.store(tag, Ordering::Relaxed);
    }

    fn read_frame_header(&self, off: usize) -> (u32, u32) {
        let (l, t) = self.frame_words(off);
        (l.load(Ordering::Relaxed), t.load(Ordering::Relaxed))
    }
}

/// Rounds a payload length up to a whole frame (header + padded payload).
#[inline]
pub const fn frame_total(len: usize) -> usize {
    FRAME_HEADER + ((len + FRAME_ALIGN - 1) & !(FRAME_ALIGN - 1))
}

/// The writing end of a ring. Exactly one exists per ring in a process at a time.
pub struct Producer {
    /// The ring.
    ring: RingRef,
    /// The ring's taken ends; this end's bit is cleared when it is dropped.
    end: EndGuard,
    /// Authoritative end of the published frames (mirrors the shared `tail`).
    tail: u64,
    /// Last observed consumer position.
    cached_head: u64,
}

/// Room for one frame, reserved by [`Producer::reserve`]: fill it through
/// [`Reservation::as_mut_slice`], publish it with [`Reservation::commit`]. Dropping it publishes
/// nothing. It borrows its producer, so there is one at a time, and none after its commit:
///
/// ```compile_fail,E0382
/// let ring = moltbot_ipc::HeapRing::new(256).unwrap();
/// let mut p = ring.take_producer().unwrap();
/// let mut r = p.reserve(8).unwrap();
/// r.as_mut_slice().fill(1);
/// r.commit(8);
/// r.as_mut_slice().fill(2); // used after commit
/// ```
///
/// ```compile_fail,E0499
/// let ring = moltbot_ipc::HeapRing::new(256).unwrap();
/// let mut p = ring.take_producer().unwrap();
/// let a = p.reserve(8).unwrap();
/// let b = p.reserve(8).unwrap(); // a second reservation while the first lives
/// a.commit(8);
/// b.commit(8);
/// ```
pub struct Reservation<'a> {
    /// The producer: its `tail` cannot move while this reservation lives.
    producer: &'a mut Producer,
    /// Bytes of padding that precede the frame (the rest of the buffer before the wrap).
    pad: usize,
    /// Data-area offset of the payload.
    off: usize,
    /// Payload bytes reserved.
    len: usize,
}

impl Reservation<'_> {
    /// Payload bytes reserved.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if no payload bytes are reserved.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The reserved payload bytes, 16-byte aligned. Their contents are unspecified (old
    /// frames).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let ring = &self.producer.ring;
        ring.track(self.off, self.len, true);
        // `reserve` checked that `off..off + len` lies inside the data area (the frame does not
        // wrap) and is free: between this producer's tail and the consumer's head plus the
        // capacity. In this process nothing else references these bytes: the consumer end (the
        // only one, see RingEnds) reads only published frames and wrote the head this producer
        // read (a Tamper exists only while that end is not taken, and its stores make the end
        // untakeable until repaired). Another process mapping the ring is outside this guarantee
        // (see the module docs).
        // SAFETY: in bounds and free (above); `&mut self` makes this the only slice.
        unsafe { core::slice::from_raw_parts_mut(ring.data_ptr().add(self.off), self.len) }
    }

    /// Publishes the frame with `used` (at most the reserved length) payload bytes.
    pub fn commit(self, used: usize) {
        let used = used.min(self.len);
        self.producer.ring.track(self.off, used, true);
        self.producer.publish(self.pad, used);
    }
}

impl core::fmt::Debug for Reservation<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Reservation")
            .field("len", &self.len)
            .finish()
    }
}

impl Producer {
    /// Attaches as the producer, taking the current shared `tail` as the start (a fresh ring is
    /// all zeros; a respawned producer continues where its predecessor stopped).
    fn attach(ring: RingRef, end: EndGuard) -> Result<Producer, RingError> {
        let h = ring.header();
        let tail = h.producer.tail.load(Ordering::Acquire);
        let head = h.consumer.head.load(Ordering::Acquire);
        check_span(head, tail, ring.capacity())?;
        Ok(Producer {
            ring,
            end,
            tail,
            cached_head: head,
        })
    }

    /// The producer's position: end of everything published so far.
    pub fn position(&self) -> u64 {
        self.tail
    }

    /// The data capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.ring.capacity()
    }

    /// The largest payload a frame can carry in this ring.
    pub fn max_payload(&self) -> usize {
        self.ring.max_payload()
    }

    /// The consumer's park flag (see [`crate::wake`]).
    pub fn parked_flag(&self) -> &AtomicU32 {
        &self.ring.header().wake.parked
    }

    /// Free bytes as last observed (may be stale-low, never stale-high).
    fn free(&self) -> usize {
        self.ring.capacity() - (self.tail - self.cached_head) as usize
    }

    /// Reloads the consumer's `head`, checking it against what this producer knows.
    fn reload_head(&mut self) -> Result<(), RingError> {
        let head = self.ring.header().consumer.head.load(Ordering::Acquire);
        if head < self.cached_head {
            return Err(RingError::Corrupt("consumer head moved backwards"));
        }
        check_span(head, self.tail, self.ring.capacity())?;
        self.cached_head = head;
        Ok(())
    }

    /// Reserves a frame with room for `len` payload bytes.
    ///
    /// `Full` means: retry after the consumer released frames. If the frame must wrap and the
    /// padding fits but the frame does not yet, the padding is published right away, so that a
    /// frame of up to [`Producer::max_payload`] bytes always fits once the consumer catches up.
    pub fn reserve(&mut self, len: usize) -> Result<Reservation<'_>, RingError> {
        let max = self.ring.max_payload();
        if len > max {
            return Err(RingError::TooLarge { len, max });
        }
        let total = frame_total(len);
        let off = (self.tail & self.ring.mask()) as usize;
        let rest = self.ring.capacity() - off;
        let pad = if total > rest { rest } else { 0 };
        if self.free() < pad + total {
            self.reload_head()?;
            if self.free() < pad + total {
                if pad > 0 && self.free() >= pad {
                    self.publish_padding(off, pad);
                }
                return Err(RingError::Full);
            }
        }
        let start = if pad > 0 { 0 } else { off };
        Ok(Reservation {
            producer: self,
            pad,
            off: start + FRAME_HEADER,
            len,
        })
    }

    fn publish_padding(&mut self, off: usize, pad: usize) {
        self.ring
            .write_frame_header(off, (pad - FRAME_HEADER) as u32, TAG_PAD);
        self.tail += pad as u64;
        self.ring
            .header()
            .producer
            .tail
            .store(self.tail, Ordering::Release);
    }

    /// Writes the headers of a reserved frame (and its padding) and publishes it.
    fn publish(&mut self, pad: usize, used: usize) {
        let mut off = (self.tail & self.ring.mask()) as usize;
        if pad > 0 {
            self.ring
                .write_frame_header(off, (pad - FRAME_HEADER) as u32, TAG_PAD);
            off = 0;
        }
        self.ring.write_frame_header(off, used as u32, TAG_DATA);
        self.tail += (pad + frame_total(used)) as u64;
        self.ring
            .header()
            .producer
            .tail
            .store(self.tail, Ordering::Release);
    }

    /// Copies `payload` into a new frame: reserve, copy, commit.
    pub fn push(&mut self, payload: &[u8]) -> Result<(), RingError> {
        let mut r = self.reserve(payload.len())?;
        r.as_mut_slice().copy_from_slice(payload);
        r.commit(payload.len());
        Ok(())
    }

    /// Copies `payload` into a new frame with relaxed atomic stores, without ever forming a
    /// reference to the ring's bytes: the way to write to a consumer in another process that
    /// may write the free space at any time (an untrusted peer), where the `&mut` of
    /// [`Reservation::as_mut_slice`] would be a data race.
    pub fn push_buf(&mut self, payload: &AlignedBuf) -> Result<(), RingError> {
        let len = payload.len();
        let r = self.reserve(len)?;
        // Whole words: the reservation is `len` rounded up to 16 bytes.
        r.producer
            .ring
            .store_words(r.off, &payload.words()[..len.div_ceil(8)]);
        r.commit(len);
        Ok(())
    }

    /// Reserves `bound` bytes, lets `fill` write the payload and return how many bytes it used,
    /// then publishes. If `fill` fails nothing is published.
    pub fn push_with<E>(
        &mut self,
        bound: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<Result<(), E>, RingError> {
        let mut r = self.reserve(bound)?;
        match fill(r.as_mut_slice()) {
            Ok(used) => {
                r.commit(used);
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(e)),
        }
    }

    /// The consumer's `head` and `claimed`, checked. For a supervisor deciding what to do with
    /// unread frames after the consumer died.
    pub fn peer_positions(&mut self) -> Result<(u64, u64), RingError> {
        self.reload_head()?;
        let claimed = self.ring.header().consumer.claimed.load(Ordering::Acquire);
        let claimed = if claimed < self.cached_head || claimed > self.tail {
            // A stale or garbage claim means "nothing taken".
            self.cached_head
        } else {
            claimed
        };
        Ok((self.cached_head, claimed))
    }

    /// Moves the consumer's position to `pos` on its behalf, discarding the frames before it.
    /// Only while no consumer is attached (it died): with the consumer end taken in this
    /// process this is [`TakeError::PeerTaken`]. `pos` must be a frame boundary between the
    /// current head and tail; `self.position()` discards everything.
    ///
    /// Also republishes this producer's own `tail`: the dead consumer could write it, and its
    /// successor attaches from the shared positions (a garbage tail would make every successor
    /// fail to attach, a crash loop).
    pub fn discard_until(&mut self, pos: u64) -> Result<(), TakeError> {
        if pos < self.cached_head || pos > self.tail || !pos.is_multiple_of(FRAME_ALIGN as u64) {
            return Err(RingError::Corrupt("discard position outside the ring").into());
        }
        // No consumer may be taken while the head is moved under it.
        if !self.end.ends.lock_without(CONSUMER) {
            return Err(TakeError::PeerTaken);
        }
        let h = self.ring.header();
        h.consumer.head.store(pos, Ordering::Release);
        h.consumer.claimed.store(pos, Ordering::Release);
        h.producer.tail.store(self.tail, Ordering::Release);
        self.cached_head = pos;
        self.end.ends.clear(TAMPERING | UNREPAIRED);
        Ok(())
    }

    /// Plays the consumer's process: a [`Tamper`] that writes the ring's memory as that process
    /// could. Only while the consumer end is not taken in this process.
    #[cfg(not(loom))]
    pub fn tamper(&mut self) -> Result<Tamper<'_>, TakeError> {
        Tamper::new(&self.ring, &self.end.ends, CONSUMER)
    }
}

impl core::fmt::Debug for Producer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Producer")
            .field("tail", &self.tail)
            .field("cached_head", &self.cached_head)
            .finish()
    }
}

/// Checks the distance between a head and a tail.
fn check_span(head: u64, tail: u64, capacity: usize) -> Result<(), RingError> {
    if head > tail {
        return Err(RingError::Corrupt("head beyond tail"));
    }
    if tail - head > capacity as u64 {
        return Err(RingError::Corrupt("more bytes in flight than capacity"));
    }
    if !head.is_multiple_of(FRAME_ALIGN as u64) || !tail.is_multiple_of(FRAME_ALIGN as u64) {
        return Err(RingError::Corrupt("position not frame aligned"));
    }
    Ok(())
}

/// The reading end of a ring. Exactly one exists per ring in a process at a time.
pub struct Consumer {
    /// The ring.
    ring: RingRef,
    /// The ring's taken ends; this end's bit is cleared when it is dropped.
    end: EndGuard,
    /// Authoritative start of unreleased data (mirrors the shared `head`).
    head: u64,
    /// Last observed producer position.
    cached_tail: u64,
}

/// The frame at the head of a ring, found by [`Consumer::peek`]. It borrows its consumer, so
/// that there is one at a time and none after its release; its position and length were
/// checked by `peek` and cannot be changed. Dropping it without [`ReadFrame::release`] leaves
/// it at the head: the next `peek` returns it again.
///
/// ```compile_fail,E0382
/// let ring = moltbot_ipc::HeapRing::new(256).unwrap();
/// let (mut p, mut c) = ring.split().unwrap();
/// p.push(b"x").unwrap();
/// let f = c.peek().unwrap().unwrap();
/// f.release();
/// let _ = f.bytes(); // used after release
/// ```
///
/// ```compile_fail,E0616
/// let ring = moltbot_ipc::HeapRing::new(256).unwrap();
/// let (mut p, mut c) = ring.split().unwrap();
/// p.push(b"x").unwrap();
/// let f = c.peek().unwrap().unwrap();
/// let _ = f.len; // fields are private
/// ```
///
/// ```compile_fail,E0451
/// let ring = moltbot_ipc::HeapRing::new(256).unwrap();
/// let mut c = ring.take_consumer().unwrap();
/// // A frame cannot be made up.
/// let f = moltbot_ipc::ReadFrame { consumer: &mut c, pos: 0, len: usize::MAX };
/// ```
///
/// ```compile_fail,E0499
/// let ring = moltbot_ipc::HeapRing::new(256).unwrap();
/// let (mut p, mut c) = ring.split().unwrap();
/// p.push(b"x").unwrap();
/// let a = c.peek().unwrap().unwrap();
/// let b = c.peek().unwrap().unwrap(); // a second frame while the first lives
/// a.release();
/// b.release();
/// ```
pub struct ReadFrame<'a> {
    /// The consumer: its head cannot move while this frame lives.
    consumer: &'a mut Consumer,
    /// Ring position of the frame header (the consumer's head).
    pos: u64,
    /// Payload bytes (the frame lies inside the data area and before the published tail).
    len: usize,
}

impl ReadFrame<'_> {
    /// Payload bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty payload.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ring position just past this frame (where the consumer's head goes at release).
    pub fn end(&self) -> u64 {
        self.pos + frame_total(self.len) as u64
    }

    fn payload_off(&self) -> usize {
        (self.pos & self.consumer.ring.mask()) as usize + FRAME_HEADER
    }

    /// The payload, in place (zero copy), 16-byte aligned.
    ///
    /// Only for a consumer whose producer keeps to the protocol (the worker reading the
    /// gateway's requests): a producer process that rewrites published frames changes these
    /// bytes while they are read. Read untrusted frames with [`ReadFrame::copy_into`].
    pub fn bytes(&self) -> &[u8] {
        let ring = &self.consumer.ring;
        let off = self.payload_off();
        ring.track(off, self.len, false);
        // `peek` checked that `off..off + len` lies inside the data area (the frame does not
        // wrap) and before the tail it loaded with Acquire, so the bytes are published and their
        // writes visible. In this process nothing writes them until the release: the producer
        // end (the only one, see RingEnds) writes only between its tail and this consumer's
        // published head plus the capacity, and this frame borrows the consumer, so the head
        // stays put; a Tamper exists only while the producer end is not taken or borrows this
        // consumer mutably. Another process mapping the ring is outside this guarantee (see the
        // module docs).
        // SAFETY: in bounds, published and not written until released (above).
        unsafe { core::slice::from_raw_parts(ring.data_ptr().add(off), self.len) }
    }

    /// Copies the payload into `out` (replacing its contents) without ever forming a
    /// reference to the shared bytes: a peer process may rewrite them concurrently, so they are
    /// read with relaxed atomic loads and only the private copy is interpreted afterwards.
    pub fn copy_into(&self, out: &mut AlignedBuf) {
        let words = (frame_total(self.len) - FRAME_HEADER) / 8;
        out.resize_words(words);
        self.consumer
            .ring
            .load_words(self.payload_off(), &mut out.words_mut()[..words]);
        out.set_len(self.len);
    }

    /// Marks the frame as taken for processing (see [`ConsumerLine::claimed`]).
    pub fn claim(&self) {
        self.consumer
            .ring
            .header()
            .consumer
            .claimed
            .store(self.end(), Ordering::Release);
    }

    /// Releases the frame, giving its space back to the producer.
    pub fn release(self) {
        let end = self.end();
        let off = self.payload_off();
        self.consumer.ring.track(off, self.len, false);
        self.consumer.head = end;
        self.consumer.publish_head();
    }
}

impl core::fmt::Debug for ReadFrame<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ReadFrame")
            .field("pos", &self.pos)
            .field("len", &self.len)
            .finish()
    }
}

impl Consumer {
    /// Attaches as the consumer, continuing from the shared `head`.
    fn attach(ring: RingRef, end: EndGuard) -> Result<Consumer, RingError> {
        let h = ring.header();
        let head = h.consumer.head.load(Ordering::Acquire);
        let tail = h.producer.tail.load(Ordering::Acquire);
        check_span(head, tail, ring.capacity())?;
        h.consumer.claimed.store(head, Ordering::Release);
        Ok(Consumer {
            ring,
            end,
            head,
            cached_tail: tail,
        })
    }

    /// The consumer's position: start of the first unreleased frame.
    pub fn position(&self) -> u64 {
        self.head
    }

    /// The data capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.ring.capacity()
    }

    /// The largest payload a frame can carry in this ring.
    pub fn max_payload(&self) -> usize {
        self.ring.max_payload()
    }

    /// This consumer's park flag (see [`crate::wake`]).
    pub fn parked_flag(&self) -> &AtomicU32 {
        &self.ring.header().wake.parked
    }

    fn reload_tail(&mut self) -> Result<(), RingError> {
        let tail = self.ring.header().producer.tail.load(Ordering::Acquire);
        if tail < self.cached_tail {
            return Err(RingError::Corrupt("producer tail moved backwards"));
        }
        check_span(self.head, tail, self.ring.capacity())?;
        self.cached_tail = tail;
        Ok(())
    }

    /// True if a frame (or padding) is published and not yet consumed.
    pub fn has_data(&mut self) -> Result<bool, RingError> {
        if self.cached_tail == self.head {
            self.reload_tail()?;
        }
        Ok(self.cached_tail != self.head)
    }

    /// Finds the next frame without consuming it (padding is skipped and released).
    pub fn peek(&mut self) -> Result<Option<ReadFrame<'_>>, RingError> {
        loop {
            if self.cached_tail == self.head {
                self.reload_tail()?;
                if self.cached_tail == self.head {
                    return Ok(None);
                }
            }
            let avail = (self.cached_tail - self.head) as usize;
            let off = (self.head & self.ring.mask()) as usize;
            let rest = self.ring.capacity() - off;
            let (len, tag) = self.ring.read_frame_header(off);
            let len = len as usize;
            match tag {
                TAG_PAD => {
                    if len + FRAME_HEADER != rest || avail < rest {
                        return Err(RingError::Corrupt("bad padding frame"));
                    }
                    self.head += rest as u64;
                    self.publish_head();
                }
                TAG_DATA => {
                    let total = frame_total(len);
                    if len > self.ring.max_payload() || total > rest || total > avail {
                        return Err(RingError::Corrupt("frame length outside the ring"));
                    }
                    let pos = self.head;
                    return Ok(Some(ReadFrame {
                        consumer: self,
                        pos,
                        len,
                    }));
                }
                _ => return Err(RingError::Corrupt("unknown frame tag")),
            }
        }
    }

    fn publish_head(&self) {
        let c = &self.ring.header().consumer;
        c.head.store(self.head, Ordering::Release);
    }

    /// Pops the next frame into `out` (copying). Returns `false` if the ring is empty.
    pub fn pop_into(&mut self, out: &mut AlignedBuf) -> Result<bool, RingError> {
        match self.peek()? {
            Some(frame) => {
                frame.copy_into(out);
                frame.release();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Drops everything the producer published, on its behalf, after it died with a ring that
    /// no longer makes sense: its `tail` is reset to this consumer's position.
    ///
    /// Also republishes this consumer's own `head` (and `claimed`): the dead producer could
    /// write them, and its successor attaches from the shared positions (a garbage head would
    /// make every successor fail to attach, a crash loop).
    pub fn reset_producer(&mut self) {
        let h = self.ring.header();
        h.consumer.head.store(self.head, Ordering::Release);
        h.consumer.claimed.store(self.head, Ordering::Release);
        h.producer.tail.store(self.head, Ordering::Release);
        self.cached_tail = self.head;
        // What a Tamper stored is overwritten: a producer may be taken again.
        self.end.ends.clear(UNREPAIRED);
    }

    /// Plays the producer's process: a [`Tamper`] that writes the ring's memory as that process
    /// could. Only while the producer end is not taken in this process.
    #[cfg(not(loom))]
    pub fn tamper(&mut self) -> Result<Tamper<'_>, TakeError> {
        Tamper::new(&self.ring, &self.end.ends, PRODUCER)
    }
}

impl core::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Consumer")
            .field("head", &self.head)
            .field("cached_tail", &self.cached_tail)
            .finish()
    }
}

/// Writes a ring's shared memory the way the process at its other end could (any position,
/// any byte), for tests and fuzzing of the hostile-peer paths. Made by [`Producer::tamper`] or
/// [`Consumer::tamper`] while the other end is not taken in this process; it borrows the end it
/// came from, so no frame or reservation of that end is alive meanwhile, and no end of the ring
/// can be taken while it lives. After it stored a position, the other end cannot be taken until
/// its end republished its positions ([`Consumer::reset_producer`], [`Producer::discard_until`])
/// or was dropped, so that no end in this process starts from positions that contradict
/// another's.
#[cfg(not(loom))]
pub struct Tamper<'a> {
    /// The ring.
    ring: &'a RingRef,
    /// Its ends; [`TAMPERING`] is set while this value lives.
    ends: &'a RingEnds,
}

#[cfg(not(loom))]
impl<'a> Tamper<'a> {
    fn new(ring: &'a RingRef, ends: &'a RingEnds, peer: u8) -> Result<Tamper<'a>, TakeError> {
        if ends.lock_without(peer) {
            Ok(Tamper { ring, ends })
        } else {
            Err(TakeError::PeerTaken)
        }
    }

    /// Writes `bytes` into the data area from `offset` on (wrapping at the capacity).
    pub fn write_data(&mut self, offset: usize, bytes: &[u8]) {
        let cap = self.ring.capacity();
        for (i, &b) in bytes.iter().enumerate() {
            self.ring.store_byte(offset.wrapping_add(i) % cap, b);
        }
    }

    /// Writes a frame header (payload length, tag) at the 16-byte unit `unit` (wrapping).
    pub fn write_frame_header(&mut self, unit: usize, len: u32, tag: u32) {
        let off = (unit * FRAME_ALIGN) % self.ring.capacity();
        self.ring.write_frame_header(off, len, tag);
    }

    /// The tag of data frames.
    pub const DATA_TAG: u32 = TAG_DATA;
    /// The tag of padding frames.
    pub const PAD_TAG: u32 = TAG_PAD;

    /// The shared `tail`.
    pub fn tail(&self) -> u64 {
        self.ring.header().producer.tail.load(Ordering::Acquire)
    }

    /// The shared `head`.
    pub fn head(&self) -> u64 {
        self.ring.header().consumer.head.load(Ordering::Acquire)
    }

    /// The shared `claimed`.
    pub fn claimed(&self) -> u64 {
        self.ring.header().consumer.claimed.load(Ordering::Acquire)
    }

    /// Stores the shared `tail`.
    pub fn set_tail(&mut self, v: u64) {
        self.ends.set(UNREPAIRED);
        self.ring.header().producer.tail.store(v, Ordering::Release);
    }

    /// Stores the shared `head`.
    pub fn set_head(&mut self, v: u64) {
        self.ends.set(UNREPAIRED);
        self.ring.header().consumer.head.store(v, Ordering::Release);
    }

    /// Stores the shared `claimed`.
    pub fn set_claimed(&mut self, v: u64) {
        self.ends.set(UNREPAIRED);
        self.ring
            .header()
            .consumer
            .claimed
            .store(v, Ordering::Release);
    }
}

#[cfg(not(loom))]
impl core::fmt::Debug for Tamper<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Tamper").finish_non_exhaustive()
    }
}

#[cfg(not(loom))]
impl Drop for Tamper<'_> {
    fn drop(&mut self) {
        self.ends.clear(TAMPERING);
    }
}

/// A growable byte buffer whose contents start 16-byte aligned: where untrusted frames are
/// copied before rkyv checks them.
#[derive(Default, Clone)]
pub struct AlignedBuf {
    /// The storage, 16-byte aligned.
    words: Vec<u128>,
    /// Valid bytes from the start of `words`.
    len: usize,
}

impl AlignedBuf {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty buffer with room for `bytes`.
    pub fn with_capacity(bytes: usize) -> Self {
        AlignedBuf {
            words: Vec::with_capacity(bytes.div_ceil(16)),
            len: 0,
        }
    }

    /// The valid bytes.
    pub fn as_slice(&self) -> &[u8] {
        let all: &[u8] = bytemuck_bytes(&self.words);
        &all[..self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the length to `len` bytes and returns them, zero-filled where newly grown (a
    /// 16-byte aligned output buffer for encoding).
    pub fn zeroed_mut(&mut self, len: usize) -> &mut [u8] {
        self.words.resize(len.div_ceil(16), 0);
        self.len = len;
        let n = self.words.len() * 16;
        // SAFETY: u128 storage viewed as bytes: same memory, alignment 1, any bit pattern is a
        // valid u128; `&mut self` makes the view exclusive.
        let all =
            unsafe { core::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), n) };
        &mut all[..len]
    }

    fn resize_words(&mut self, words8: usize) {
        self.words.resize(words8.div_ceil(2), 0);
        self.len = 0;
    }

    /// Keeps the first `len` bytes (at most the current length).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    fn words(&self) -> &[u64] {
        // SAFETY: u128 storage viewed as twice as many u64: same memory, u64's alignment
        // divides u128's, every bit pattern is valid for both; shared like `&self`.
        unsafe {
            core::slice::from_raw_parts(self.words.as_ptr().cast::<u64>(), self.words.len() * 2)
        }
    }

    fn words_mut(&mut self) -> &mut [u64] {
        let n = self.words.len() * 2;
        // SAFETY: u128 storage reinterpreted as twice as many u64: same total size, u64's
        // alignment divides u128's, every bit pattern is valid for both.
        unsafe { core::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u64>(), n) }
    }

    fn set_len(&mut self, len: usize) {
        assert!(len <= self.words.len() * 16);
        self.len = len;
    }
}

fn bytemuck_bytes(words: &[u128]) -> &[u8] {
    // SAFETY: any initialized u128 slice is a valid byte slice of 16× the length; u8 has
    // alignment 1.
    unsafe { core::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 16) }
}

impl core::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

/// The memory of a [`HeapRing`]: header + data in one aligned block.
#[cfg(not(loom))]
struct HeapBlock {
    /// Start of the block, 128-byte aligned, `ring_bytes(capacity)` long.
    base: NonNull<u8>,
    /// Data bytes.
    capacity: usize,
}

// SAFETY: HeapBlock owns its allocation and never touches the bytes itself after zeroing them;
// all access goes through the ring's ends (atomics + the SPSC discipline of RingEnds).
#[cfg(not(loom))]
unsafe impl Send for HeapBlock {}
// SAFETY: as above; &HeapBlock exposes no access to the bytes.
#[cfg(not(loom))]
unsafe impl Sync for HeapBlock {}

#[cfg(not(loom))]
impl HeapBlock {
    fn layout(capacity: usize) -> std::alloc::Layout {
        // 128 is a power of two and ring_bytes is far below isize::MAX for valid capacities.
        std::alloc::Layout::from_size_align(ring_bytes(capacity), 128)
            .unwrap_or_else(|_| std::alloc::Layout::new::<RingHeader>())
    }
}

#[cfg(not(loom))]
impl Drop for HeapBlock {
    fn drop(&mut self) {
        // SAFETY: allocated in `HeapRing::new` with exactly this layout; no end outlives the
        // block (each holds an Arc to it).
        unsafe { std::alloc::dealloc(self.base.as_ptr(), Self::layout(self.capacity)) }
    }
}

/// A heap-allocated ring for tests and in-process use. Cheap to clone (the clones share the
/// ring and its ends).
#[derive(Clone)]
pub struct HeapRing {
    /// The memory.
    #[cfg(not(loom))]
    block: Arc<HeapBlock>,
    /// The memory.
    #[cfg(loom)]
    mem: Arc<LoomMemory>,
    /// Data bytes.
    capacity: usize,
    /// Which ends are taken.
    ends: Arc<RingEnds>,
}

impl HeapRing {
    /// Allocates a zeroed ring of `capacity` (power of two, at least [`MIN_CAPACITY`], at most
    /// [`MAX_CAPACITY`]).
    pub fn new(capacity: usize) -> Result<HeapRing, RingError> {
        if !capacity.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
            return Err(RingError::Corrupt(
                "capacity must be a power of two in [256, 1 GiB]",
            ));
        }
        #[cfg(not(loom))]
        {
            let layout = HeapBlock::layout(capacity);
            // SAFETY: the layout has a non-zero size (the header alone is 384 bytes).
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            let Some(base) = NonNull::new(ptr) else {
                std::alloc::handle_alloc_error(layout);
            };
            Ok(HeapRing {
                block: Arc::new(HeapBlock { base, capacity }),
                capacity,
                ends: RingEnds::new(),
            })
        }
        #[cfg(loom)]
        Ok(HeapRing {
            mem: RingRef::new_loom(capacity),
            capacity,
            ends: RingEnds::new(),
        })
    }

    /// The data capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn ring(&self) -> RingRef {
        #[cfg(not(loom))]
        {
            let backing: Arc<dyn Backing> = self.block.clone();
            // SAFETY: the block is 128-aligned, zero-initialized (a valid empty ring) or left
            // by earlier ends, ring_bytes(capacity) long and kept alive by `backing`; its only
            // accessors are the ends `self.ends` hands out.
            unsafe { RingRef::from_raw(self.block.base, self.capacity, backing) }
        }
        #[cfg(loom)]
        RingRef {
            mem: self.mem.clone(),
            capacity: self.capacity,
        }
    }

    /// The producer end; refused while another one of this ring lives.
    pub fn take_producer(&self) -> Result<Producer, TakeError> {
        let end = self.ends.take(PRODUCER)?;
        Ok(Producer::attach(self.ring(), end)?)
    }

    /// The consumer end; refused while another one of this ring lives.
    pub fn take_consumer(&self) -> Result<Consumer, TakeError> {
        let end = self.ends.take(CONSUMER)?;
        Ok(Consumer::attach(self.ring(), end)?)
    }

    /// Both ends.
    pub fn split(&self) -> Result<(Producer, Consumer), TakeError> {
        let p = self.take_producer()?;
        let c = self.take_consumer()?;
        Ok((p, c))
    }
}

impl core::fmt::Debug for HeapRing {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HeapRing")
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// Hands out the two ends of a ring in shared memory (for [`crate::segment`]).
#[cfg(not(loom))]
pub(crate) struct SharedRing {
    /// Start of the ring's header in the mapping.
    pub(crate) base: NonNull<u8>,
    /// Data bytes.
    pub(crate) capacity: usize,
    /// Keeps the mapping alive.
    pub(crate) backing: Arc<dyn Backing>,
    /// Which ends are taken (one per ring, shared by every mapping of the object).
    pub(crate) ends: Arc<RingEnds>,
}

#[cfg(not(loom))]
impl SharedRing {
    fn ring(&self) -> RingRef {
        // SAFETY: SharedRing is built only by Segment, whose validated layout places the ring
        // 128-aligned inside the mapping that `backing` keeps alive, with `ends` the one set of
        // flags for this ring in the process (the segment registry shares mappings).
        unsafe { RingRef::from_raw(self.base, self.capacity, self.backing.clone()) }
    }

    pub(crate) fn take_producer(&self) -> Result<Producer, TakeError> {
        let end = self.ends.take(PRODUCER)?;
        Ok(Producer::attach(self.ring(), end)?)
    }

    pub(crate) fn take_consumer(&self) -> Result<Consumer, TakeError> {
        let end = self.ends.take(CONSUMER)?;
        Ok(Consumer::attach(self.ring(), end)?)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn pair(cap: usize) -> (Producer, Consumer, HeapRing) {
        let ring = HeapRing::new(cap).unwrap();
        let (p, c) = ring.split().unwrap();
        (p, c, ring)
    }

    fn pop(c: &mut Consumer) -> Option<Vec<u8>> {
        let f = c.peek().unwrap()?;
        let v = f.bytes().to_vec();
        f.release();
        Some(v)
    }

    fn peek_len(c: &mut Consumer) -> Option<usize> {
        c.peek().unwrap().map(|f| f.len())
    }

    /// Replaces the producer by a Tamper-wielding peer for one closure.
    fn as_producer_peer(
        p: &mut Option<Producer>,
        c: &mut Consumer,
        f: impl FnOnce(&mut Tamper<'_>),
    ) {
        *p = None;
        f(&mut c.tamper().unwrap());
    }

    #[test]
    fn empty_ring_has_nothing() {
        let (_p, mut c, _) = pair(256);
        assert!(c.peek().unwrap().is_none());
        assert!(!c.has_data().unwrap());
    }

    #[test]
    fn push_pop_in_order() {
        let (mut p, mut c, _) = pair(1024);
        p.push(b"one").unwrap();
        p.push(b"two!").unwrap();
        assert!(c.has_data().unwrap());
        assert_eq!(pop(&mut c).unwrap(), b"one");
        assert_eq!(pop(&mut c).unwrap(), b"two!");
        assert_eq!(pop(&mut c), None);
    }

    #[test]
    fn a_frame_not_released_is_returned_again() {
        let (mut p, mut c, _) = pair(1024);
        p.push(b"one").unwrap();
        p.push(b"two").unwrap();
        // Looked at, not released.
        assert_eq!(c.peek().unwrap().unwrap().bytes(), b"one");
        assert_eq!(pop(&mut c).unwrap(), b"one");
        assert_eq!(pop(&mut c).unwrap(), b"two");
    }

    #[test]
    fn a_reservation_dropped_publishes_nothing() {
        let (mut p, mut c, _) = pair(256);
        // Filled, not committed.
        p.reserve(16).unwrap().as_mut_slice().fill(7);
        assert_eq!(p.position(), 0);
        assert!(!c.has_data().unwrap());
        p.push(b"after").unwrap();
        assert_eq!(pop(&mut c).unwrap(), b"after");
    }

    #[test]
    fn zero_length_frame() {
        let (mut p, mut c, _) = pair(256);
        p.push(b"").unwrap();
        let f = c.peek().unwrap().unwrap();
        assert_eq!(f.len(), 0);
        assert!(f.is_empty());
        assert_eq!(f.bytes(), b"");
        f.release();
        assert!(c.peek().unwrap().is_none());
    }

    #[test]
    fn full_then_space_after_release() {
        let (mut p, mut c, _) = pair(256);
        // 256 bytes = 8 frames of 32 (16 header + 16 payload).
        for i in 0..8u8 {
            p.push(&[i; 16]).unwrap();
        }
        assert_eq!(p.push(&[9; 1]), Err(RingError::Full));
        assert_eq!(pop(&mut c).unwrap(), vec![0; 16]);
        p.push(&[9; 16]).unwrap();
        assert_eq!(p.push(&[10; 1]), Err(RingError::Full));
    }

    #[test]
    fn payloads_are_16_aligned() {
        let (mut p, mut c, _) = pair(1024);
        for len in [1, 3, 17, 33, 100] {
            p.push(&vec![7; len]).unwrap();
            let f = c.peek().unwrap().unwrap();
            assert_eq!(f.bytes().as_ptr() as usize % 16, 0);
            f.release();
        }
    }

    #[test]
    fn wrap_inserts_padding_and_frame_starts_at_zero() {
        let (mut p, mut c, _) = pair(256);
        p.push(&[1; 160]).unwrap(); // 176 bytes, 80 left before the end
        assert_eq!(pop(&mut c).unwrap(), vec![1; 160]);
        p.push(&[2; 100]).unwrap(); // 128 total > 80: pad 80, frame at 0
        assert_eq!(p.position(), 176 + 80 + 128);
        let f = c.peek().unwrap().unwrap();
        assert_eq!(f.end() - frame_total(100) as u64, 256);
        assert_eq!(f.bytes(), &[2; 100][..]);
        f.release();
        assert_eq!(c.position(), 384);
        drop(p);
        assert_eq!(c.tamper().unwrap().head(), 384);
    }

    #[test]
    fn padding_published_alone_lets_a_max_frame_through() {
        let (mut p, mut c, _) = pair(256);
        p.push(&[1; 100]).unwrap(); // 128 bytes
        assert_eq!(pop(&mut c).unwrap(), vec![1; 100]);
        let max = p.max_payload();
        assert_eq!(max, 240);
        // Needs the whole ring: 128 bytes of padding are published, then Full.
        assert_eq!(p.push(&vec![3; max]), Err(RingError::Full));
        assert_eq!(pop(&mut c), None); // consumes the padding
        p.push(&vec![3; max]).unwrap();
        assert_eq!(pop(&mut c).unwrap(), vec![3; max]);
    }

    #[test]
    fn one_byte_too_large_is_refused() {
        let (mut p, _c, _) = pair(256);
        assert_eq!(
            p.push(&[0; 241]),
            Err(RingError::TooLarge { len: 241, max: 240 })
        );
        assert_eq!(
            p.reserve(usize::MAX).unwrap_err(),
            RingError::TooLarge {
                len: usize::MAX,
                max: 240
            }
        );
    }

    #[test]
    fn push_with_failure_publishes_nothing() {
        let (mut p, mut c, _) = pair(256);
        let r: Result<(), &str> = p.push_with(10, |_| Err("nope")).unwrap();
        assert_eq!(r, Err("nope"));
        assert!(c.peek().unwrap().is_none());
        p.push_with::<()>(10, |b| {
            b[..2].copy_from_slice(b"hi");
            Ok(2)
        })
        .unwrap()
        .unwrap();
        assert_eq!(pop(&mut c).unwrap(), b"hi");
    }

    #[test]
    fn each_end_is_taken_once_at_a_time() {
        let ring = HeapRing::new(256).unwrap();
        let p = ring.take_producer().unwrap();
        assert_eq!(ring.take_producer().unwrap_err(), TakeError::Taken);
        assert_eq!(ring.clone().take_producer().unwrap_err(), TakeError::Taken);
        let c = ring.take_consumer().unwrap();
        assert_eq!(ring.take_consumer().unwrap_err(), TakeError::Taken);
        assert!(ring.split().is_err());
        drop(p);
        let mut p = ring.take_producer().expect("free again once dropped");
        drop(c);
        let mut c = ring.take_consumer().unwrap();
        p.push(b"z").unwrap();
        assert_eq!(pop(&mut c).unwrap(), b"z");
        // Ends move to other threads; the take rule holds there too.
        let t = std::thread::spawn(move || {
            p.push(b"from a thread").unwrap();
            p
        });
        let p = t.join().unwrap();
        assert_eq!(pop(&mut c).unwrap(), b"from a thread");
        assert_eq!(ring.take_producer().unwrap_err(), TakeError::Taken);
        drop(p);
    }

    #[test]
    fn tamper_only_plays_an_absent_peer() {
        let (p, mut c, ring) = pair(256);
        assert_eq!(c.tamper().unwrap_err(), TakeError::PeerTaken);
        drop(p);
        {
            let mut t = c.tamper().unwrap();
            // Nothing can be taken while it writes.
            assert_eq!(ring.take_producer().unwrap_err(), TakeError::Tampered);
            t.write_data(0, &[1, 2, 3]);
        }
        // Only data was written: the producer may come back.
        drop(ring.take_producer().unwrap());
        c.tamper().unwrap().set_tail(1 << 40);
        assert_eq!(ring.take_producer().unwrap_err(), TakeError::Tampered);
        assert!(c.peek().is_err());
        c.reset_producer();
        let mut p = ring.take_producer().expect("repaired");
        p.push(b"ok").unwrap();
        assert_eq!(pop(&mut c).unwrap(), b"ok");
        // The other direction, and a discard on behalf of a consumer that is still here.
        assert_eq!(p.discard_until(p.position()), Err(TakeError::PeerTaken));
        drop(c);
        p.tamper().unwrap().set_head(16);
        assert_eq!(ring.take_consumer().unwrap_err(), TakeError::Tampered);
        let end = p.position();
        p.discard_until(end).unwrap();
        ring.take_consumer().expect("repaired");
    }

    #[test]
    fn corrupt_tail_is_an_error() {
        for bad in [u64::MAX, 257 * 16, 3, 1 << 40] {
            let (p, mut c, _ring) = pair(256);
            let mut p = Some(p);
            p.as_mut().unwrap().push(b"x").unwrap();
            as_producer_peer(&mut p, &mut c, |t| t.set_tail(bad));
            let r = (|| {
                for _ in 0..4 {
                    if let Some(f) = c.peek()? {
                        f.release();
                    }
                }
                Ok::<_, RingError>(())
            })();
            assert!(matches!(r, Err(RingError::Corrupt(_))), "tail {bad}: {r:?}");
        }
    }

    #[test]
    fn tail_moving_backwards_is_an_error() {
        let (p, mut c, _ring) = pair(256);
        let mut p = Some(p);
        p.as_mut().unwrap().push(b"x").unwrap();
        p.as_mut().unwrap().push(b"y").unwrap();
        assert!(c.has_data().unwrap());
        as_producer_peer(&mut p, &mut c, |t| t.set_tail(0));
        c.peek().unwrap().unwrap().release();
        c.peek().unwrap().unwrap().release();
        assert!(matches!(c.peek(), Err(RingError::Corrupt(_))));
    }

    #[test]
    fn corrupt_head_is_an_error() {
        for bad in [u64::MAX, 1 << 40, 5] {
            let (mut p, c, _ring) = pair(256);
            for _ in 0..8 {
                p.push(&[0; 16]).unwrap();
            }
            drop(c);
            p.tamper().unwrap().set_head(bad);
            assert!(
                matches!(p.push(b"z"), Err(RingError::Corrupt(_))),
                "head {bad}"
            );
        }
        // head moving backwards
        let (mut p, mut c, _ring) = pair(256);
        for _ in 0..8 {
            p.push(&[0; 16]).unwrap();
        }
        pop(&mut c).unwrap();
        p.push(&[0; 16]).unwrap(); // observes head = 32
        drop(c);
        p.tamper().unwrap().set_head(0);
        assert!(matches!(p.push(b"z"), Err(RingError::Corrupt(_))));
    }

    #[test]
    fn corrupt_frame_headers_are_errors() {
        // (len, tag) written over the first frame's header.
        let cases = [
            (u32::MAX, TAG_DATA),
            (241, TAG_DATA),
            (200, TAG_DATA), // longer than what is published
            (16, 0xdead_beef),
            (0, TAG_PAD),   // padding that does not reach the end
            (240, TAG_PAD), // padding over unpublished bytes
        ];
        for (len, tag) in cases {
            let (p, mut c, _ring) = pair(256);
            let mut p = Some(p);
            p.as_mut().unwrap().push(&[1; 16]).unwrap();
            as_producer_peer(&mut p, &mut c, |t| t.write_frame_header(0, len, tag));
            assert!(
                matches!(c.peek(), Err(RingError::Corrupt(_))),
                "len {len} tag {tag:#x}"
            );
        }
    }

    #[test]
    fn attach_checks_positions() {
        let ring = HeapRing::new(256).unwrap();
        let mut c = ring.take_consumer().unwrap();
        c.tamper().unwrap().set_tail(512);
        drop(c);
        assert!(ring.take_consumer().is_err());
        assert!(matches!(
            ring.take_producer(),
            Err(TakeError::Ring(RingError::Corrupt(_)))
        ));
        let mut p = ring.take_producer_after_reset();
        p.tamper().unwrap().set_tail(32);
        p.tamper().unwrap().set_head(48);
        drop(p);
        assert!(matches!(
            ring.take_consumer(),
            Err(TakeError::Ring(RingError::Corrupt(_)))
        ));
    }

    impl HeapRing {
        /// A producer on a ring whose positions were made garbage: reset them first.
        fn take_producer_after_reset(&self) -> Producer {
            let ends = self.ends.take(PRODUCER).unwrap();
            let ring = self.ring();
            ring.header().producer.tail.store(0, Ordering::Relaxed);
            ring.header().consumer.head.store(0, Ordering::Relaxed);
            Producer::attach(ring, ends).unwrap()
        }
    }

    #[test]
    fn copy_into_matches_in_place_bytes() {
        let (mut p, mut c, _) = pair(1024);
        let data: Vec<u8> = (0..=200).collect();
        p.push(&data).unwrap();
        let f = c.peek().unwrap().unwrap();
        let mut buf = AlignedBuf::new();
        f.copy_into(&mut buf);
        assert_eq!(buf.as_slice(), f.bytes());
        assert_eq!(buf.as_slice(), &data[..]);
        assert_eq!(buf.as_slice().as_ptr() as usize % 16, 0);
        f.release();
        assert!(!c.pop_into(&mut buf).unwrap());
    }

    /// Frames written with atomic stores from a private buffer read back as pushed, for every
    /// length around the word and unit sizes, across the wrap, and after a longer buffer was
    /// truncated (the bytes past the length are not part of the frame).
    #[test]
    fn push_buf_writes_what_push_writes() {
        let (mut p, mut c, _) = pair(256);
        let mut buf = AlignedBuf::new();
        for len in (0..=40).chain([100, 160, 240]) {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            buf.zeroed_mut(len + 9).fill(0xee);
            buf.zeroed_mut(len).copy_from_slice(&data);
            buf.truncate(len);
            if matches!(p.push_buf(&buf), Err(RingError::Full)) {
                // Only the padding before the wrap went in: once it is read, the frame fits.
                assert_eq!(pop(&mut c), None);
                p.push_buf(&buf).unwrap();
            }
            assert_eq!(pop(&mut c).unwrap(), data, "{len}");
        }
        buf.zeroed_mut(241);
        assert!(matches!(p.push_buf(&buf), Err(RingError::TooLarge { .. })));
    }

    #[test]
    fn claim_and_discard_for_recovery() {
        let (mut p, mut c, ring) = pair(1024);
        p.push(b"taken").unwrap();
        p.push(b"unread").unwrap();
        let end = {
            let f = c.peek().unwrap().unwrap();
            f.claim();
            f.end()
        };
        let (head, claimed) = p.peer_positions().unwrap();
        assert_eq!(head, 0);
        assert_eq!(claimed, end);
        // The consumer dies; the supervisor discards the taken frame only.
        drop(c);
        p.discard_until(claimed).unwrap();
        let mut c2 = ring.take_consumer().unwrap();
        assert_eq!(pop(&mut c2).unwrap(), b"unread");
        drop(c2);
        assert!(p.discard_until(3).is_err());
        assert!(p.discard_until(u64::MAX).is_err());
    }

    #[test]
    fn discard_until_republishes_a_tail_the_dead_consumer_overwrote() {
        // Found by the fuzz target `response_frame`: a worker stored garbage into its request
        // ring's `tail` and died; every successor then failed to attach.
        for garbage in [255, 0, u64::MAX, 1 << 40] {
            let (mut p, mut c, ring) = pair(256);
            p.push(b"taken").unwrap();
            p.push(b"unread").unwrap();
            c.peek().unwrap().unwrap().claim();
            drop(c);
            p.tamper().unwrap().set_tail(garbage);
            let (_, claimed) = p.peer_positions().unwrap();
            p.discard_until(claimed).unwrap();
            let mut c2 = ring.take_consumer().expect("successor attaches");
            assert_eq!(pop(&mut c2).unwrap(), b"unread");
        }
    }

    #[test]
    fn reset_producer_republishes_a_head_the_dead_producer_overwrote() {
        // The same on the response ring: the dead producer overwrote the consumer's `head`.
        for garbage in [255, 0, u64::MAX, 1 << 40] {
            let (mut p, mut c, ring) = pair(256);
            p.push(b"read").unwrap();
            assert_eq!(pop(&mut c).unwrap(), b"read");
            drop(p);
            {
                let mut t = c.tamper().unwrap();
                t.set_head(garbage);
                t.set_claimed(garbage);
            }
            c.reset_producer();
            let mut p2 = ring.take_producer().expect("successor attaches");
            p2.push(b"next").unwrap();
            assert_eq!(pop(&mut c).unwrap(), b"next");
        }
    }

    #[test]
    fn scribbled_frames_are_caught() {
        let (p, mut c, _ring) = pair(256);
        let mut p = Some(p);
        p.as_mut().unwrap().push(&[1; 16]).unwrap();
        as_producer_peer(&mut p, &mut c, |t| {
            t.write_data(0, &[0xff; 8]);
            t.write_data(250, &[0; 16]); // wraps to the start without going out of bounds
        });
        assert!(matches!(c.peek(), Err(RingError::Corrupt(_))));
    }

    #[test]
    fn reset_producer_drops_garbage() {
        let (p, mut c, ring) = pair(256);
        let mut p = Some(p);
        p.as_mut().unwrap().push(b"a").unwrap();
        as_producer_peer(&mut p, &mut c, |t| t.write_frame_header(0, 999, TAG_DATA));
        assert!(c.peek().is_err());
        c.reset_producer();
        assert_eq!(peek_len(&mut c), None);
        // A new producer continues after the reset.
        let mut p2 = ring.take_producer().unwrap();
        p2.push(b"b").unwrap();
        assert_eq!(pop(&mut c).unwrap(), b"b");
    }
}
