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
//! Trust: each side keeps its own position locally and never re-reads it from shared memory;
//! every position and length it reads from the other side is checked against the ring before
//! use. A violation is [`RingError::Corrupt`], never a panic, never an out-of-bounds access.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of a frame header.
pub const FRAME_HEADER: usize = 16;
/// Alignment of every frame and payload.
pub const FRAME_ALIGN: usize = 16;
/// Smallest ring capacity accepted.
pub const MIN_CAPACITY: usize = 256;

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

/// Keeps the memory a ring lives in mapped for as long as a handle exists.
pub trait Backing: Send + Sync + 'static {}
impl<T: Send + Sync + 'static> Backing for T {}

/// A ring's location: its header and data pointers plus the capacity, which the owner of the
/// handle knows from its own layout (never read back from shared memory).
#[derive(Clone)]
pub struct RingRef {
    header: NonNull<RingHeader>,
    data: NonNull<u8>,
    capacity: usize,
    _backing: Arc<dyn Backing>,
}

// SAFETY: a RingRef is a pointer into a mapping kept alive by `_backing`; all access through it
// goes through atomics or through the SPSC discipline enforced by `Producer`/`Consumer` (one
// owner each, `&mut self` methods), so moving it to another thread is sound.
unsafe impl Send for RingRef {}

impl RingRef {
    /// Describes a ring whose header starts at `base`, followed by `capacity` data bytes.
    ///
    /// # Safety
    /// `base` must be 128-byte aligned and valid for reads and writes of
    /// [`ring_bytes`]`(capacity)` bytes for as long as `backing` lives; `capacity` must be a
    /// power of two and at least [`MIN_CAPACITY`]. Other parties may only access that memory
    /// through the ring protocol (or be hostile, which this module tolerates).
    pub unsafe fn from_raw(base: NonNull<u8>, capacity: usize, backing: Arc<dyn Backing>) -> Self {
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
    pub fn header(&self) -> &RingHeader {
        // SAFETY: `header` points to a live, aligned RingHeader (from_raw's contract) whose
        // fields are all atomics, so shared references are sound even with a concurrent peer.
        unsafe { self.header.as_ref() }
    }

    /// The data capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The largest payload a frame can carry in this ring.
    pub fn max_payload(&self) -> usize {
        self.capacity - FRAME_HEADER
    }

    /// The consumer's park flag.
    pub fn parked_flag(&self) -> &AtomicU32 {
        &self.header().wake.parked
    }

    fn mask(&self) -> u64 {
        self.capacity as u64 - 1
    }

    /// The frame-header words at byte offset `off` (< capacity, multiple of 16).
    fn frame_words(&self, off: usize) -> (&AtomicU32, &AtomicU32) {
        debug_assert!(off % FRAME_ALIGN == 0 && off + FRAME_HEADER <= self.capacity);
        // SAFETY: `off` is a multiple of 16 below `capacity` (callers mask positions and keep
        // them 16-aligned), so the 8 bytes at `off` are in the data area and 4-aligned (data
        // starts 128-aligned). AtomicU32 has the layout of u32 and any bit pattern is valid.
        unsafe {
            let p = self.data.as_ptr().add(off).cast::<AtomicU32>();
            (&*p, &*p.add(1))
        }
    }

    /// Writes a frame header at `off`.
    fn write_frame_header(&self, off: usize, len: u32, tag: u32) {
        let (l, t) = self.frame_words(off);
        l.store(len, Ordering::Relaxed);
        t.store(tag, Ordering::Relaxed);
    }

    /// Reads a frame header at `off`.
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

/// The writing end of a ring.
pub struct Producer {
    ring: RingRef,
    /// Authoritative end of the published frames (mirrors the shared `tail`).
    tail: u64,
    /// Last observed consumer position.
    cached_head: u64,
}

/// Space reserved by [`Producer::reserve`]; fill it with [`Producer::slot`], publish it with
/// [`Producer::commit`]. Dropping it without committing publishes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// Bytes of padding that precede the frame (the rest of the buffer before the wrap).
    pad: usize,
    /// Payload bytes reserved.
    len: usize,
}

impl Reservation {
    /// Payload bytes reserved.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if no payload bytes are reserved.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Producer {
    /// Attaches as the producer, taking the current shared `tail` as the start (a fresh ring is
    /// all zeros; a respawned producer continues where its predecessor stopped).
    pub fn attach(ring: RingRef) -> Result<Producer, RingError> {
        let h = ring.header();
        let tail = h.producer.tail.load(Ordering::Acquire);
        let head = h.consumer.head.load(Ordering::Acquire);
        check_span(head, tail, &ring)?;
        Ok(Producer {
            ring,
            tail,
            cached_head: head,
        })
    }

    /// The ring this producer writes.
    pub fn ring(&self) -> &RingRef {
        &self.ring
    }

    /// The producer's position: end of everything published so far.
    pub fn position(&self) -> u64 {
        self.tail
    }

    /// Free bytes as last observed (may be stale-low, never stale-high).
    fn free(&self) -> usize {
        self.ring.capacity - (self.tail - self.cached_head) as usize
    }

    /// Reloads the consumer's `head`, checking it against what this producer knows.
    fn reload_head(&mut self) -> Result<(), RingError> {
        let head = self.ring.header().consumer.head.load(Ordering::Acquire);
        if head < self.cached_head {
            return Err(RingError::Corrupt("consumer head moved backwards"));
        }
        check_span(head, self.tail, &self.ring)?;
        self.cached_head = head;
        Ok(())
    }

    /// Reserves a frame with room for `len` payload bytes.
    ///
    /// `Full` means: retry after the consumer released frames. If the frame must wrap and the
    /// padding fits but the frame does not yet, the padding is published right away, so that a
    /// frame of up to [`RingRef::max_payload`] bytes always fits once the consumer catches up.
    pub fn reserve(&mut self, len: usize) -> Result<Reservation, RingError> {
        let max = self.ring.max_payload();
        if len > max {
            return Err(RingError::TooLarge { len, max });
        }
        let total = frame_total(len);
        let off = (self.tail & self.ring.mask()) as usize;
        let rest = self.ring.capacity - off;
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
        Ok(Reservation { pad, len })
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

    /// The payload bytes of a reservation, to be filled before [`Producer::commit`].
    ///
    /// The slice is 16-byte aligned. Its contents are unspecified (old frames).
    pub fn slot(&mut self, r: &Reservation) -> &mut [u8] {
        let off = ((self.tail + r.pad as u64) & self.ring.mask()) as usize + FRAME_HEADER;
        debug_assert!(off + r.len <= self.ring.capacity);
        // A hostile consumer could scribble on these bytes: that only garbles the frame it is
        // about to read; the producer never reads them back.
        // SAFETY: `reserve` checked that the span is free producer-owned space inside the data
        // area without wrapping; `&mut self` makes this the only live slice.
        unsafe { core::slice::from_raw_parts_mut(self.ring.data.as_ptr().add(off), r.len) }
    }

    /// Publishes the reserved frame with `used` (≤ reserved) payload bytes.
    pub fn commit(&mut self, r: Reservation, used: usize) {
        let used = used.min(r.len);
        let mut off = (self.tail & self.ring.mask()) as usize;
        if r.pad > 0 {
            self.ring
                .write_frame_header(off, (r.pad - FRAME_HEADER) as u32, TAG_PAD);
            off = 0;
        }
        self.ring.write_frame_header(off, used as u32, TAG_DATA);
        self.tail += (r.pad + frame_total(used)) as u64;
        self.ring
            .header()
            .producer
            .tail
            .store(self.tail, Ordering::Release);
    }

    /// Copies `payload` into a new frame: reserve, copy, commit.
    pub fn push(&mut self, payload: &[u8]) -> Result<(), RingError> {
        let r = self.reserve(payload.len())?;
        self.slot(&r).copy_from_slice(payload);
        self.commit(r, payload.len());
        Ok(())
    }

    /// Reserves `bound` bytes, lets `fill` write the payload and return how many bytes it used,
    /// then publishes. If `fill` fails nothing is published.
    pub fn push_with<E>(
        &mut self,
        bound: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<Result<(), E>, RingError> {
        let r = self.reserve(bound)?;
        match fill(self.slot(&r)) {
            Ok(used) => {
                self.commit(r, used);
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
    /// Only while no consumer is attached (it died). `pos` must be a frame boundary between the
    /// current head and tail; `self.position()` discards everything.
    ///
    /// Also republishes this producer's own `tail`: the dead consumer could write it, and its
    /// successor attaches from the shared positions (a garbage tail would make every successor
    /// fail to attach, a crash loop).
    pub fn discard_until(&mut self, pos: u64) -> Result<(), RingError> {
        if pos < self.cached_head || pos > self.tail || pos % FRAME_ALIGN as u64 != 0 {
            return Err(RingError::Corrupt("discard position outside the ring"));
        }
        let c = &self.ring.header().consumer;
        c.head.store(pos, Ordering::Release);
        c.claimed.store(pos, Ordering::Release);
        self.ring
            .header()
            .producer
            .tail
            .store(self.tail, Ordering::Release);
        self.cached_head = pos;
        Ok(())
    }
}

/// Checks the distance between a head and a tail.
fn check_span(head: u64, tail: u64, ring: &RingRef) -> Result<(), RingError> {
    if head > tail {
        return Err(RingError::Corrupt("head beyond tail"));
    }
    if tail - head > ring.capacity as u64 {
        return Err(RingError::Corrupt("more bytes in flight than capacity"));
    }
    if head % FRAME_ALIGN as u64 != 0 || tail % FRAME_ALIGN as u64 != 0 {
        return Err(RingError::Corrupt("position not frame aligned"));
    }
    Ok(())
}

/// A frame found by [`Consumer::peek`]: where it is and how long its payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Ring position of the frame header.
    pub pos: u64,
    /// Payload bytes.
    pub len: usize,
}

impl Frame {
    /// Position just past this frame.
    pub fn end(&self) -> u64 {
        self.pos + frame_total(self.len) as u64
    }
}

/// The reading end of a ring.
pub struct Consumer {
    ring: RingRef,
    /// Authoritative start of unreleased data (mirrors the shared `head`).
    head: u64,
    /// Last observed producer position.
    cached_tail: u64,
}

impl Consumer {
    /// Attaches as the consumer, continuing from the shared `head`.
    pub fn attach(ring: RingRef) -> Result<Consumer, RingError> {
        let h = ring.header();
        let head = h.consumer.head.load(Ordering::Acquire);
        let tail = h.producer.tail.load(Ordering::Acquire);
        check_span(head, tail, &ring)?;
        h.consumer.claimed.store(head, Ordering::Release);
        Ok(Consumer {
            ring,
            head,
            cached_tail: tail,
        })
    }

    /// The ring this consumer reads.
    pub fn ring(&self) -> &RingRef {
        &self.ring
    }

    /// The consumer's position: start of the first unreleased frame.
    pub fn position(&self) -> u64 {
        self.head
    }

    fn reload_tail(&mut self) -> Result<(), RingError> {
        let tail = self.ring.header().producer.tail.load(Ordering::Acquire);
        if tail < self.cached_tail {
            return Err(RingError::Corrupt("producer tail moved backwards"));
        }
        check_span(self.head, tail, &self.ring)?;
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
    pub fn peek(&mut self) -> Result<Option<Frame>, RingError> {
        loop {
            if self.cached_tail == self.head {
                self.reload_tail()?;
                if self.cached_tail == self.head {
                    return Ok(None);
                }
            }
            let avail = (self.cached_tail - self.head) as usize;
            let off = (self.head & self.ring.mask()) as usize;
            let rest = self.ring.capacity - off;
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
                    return Ok(Some(Frame {
                        pos: self.head,
                        len,
                    }));
                }
                _ => return Err(RingError::Corrupt("unknown frame tag")),
            }
        }
    }

    fn payload_ptr(&self, frame: &Frame) -> *const u8 {
        let off = (frame.pos & self.ring.mask()) as usize + FRAME_HEADER;
        debug_assert!(off + frame.len <= self.ring.capacity);
        // SAFETY: `peek` checked that the frame lies within the data area.
        unsafe { self.ring.data.as_ptr().add(off) }
    }

    /// The payload of a frame returned by `peek`, in place (zero copy). 16-byte aligned.
    ///
    /// Only for a consumer whose producer keeps to the protocol (the worker reading the
    /// gateway's requests): a producer that rewrites published frames would race with this
    /// read. Read untrusted frames with [`Consumer::copy_frame`].
    pub fn bytes(&self, frame: &Frame) -> &[u8] {
        // SAFETY: `peek` validated the span: inside the data area, published (before the
        // Acquire-loaded `tail`), not rewritten until released; borrowing `self` keeps the
        // mapping alive and `release` out while the slice lives.
        unsafe { core::slice::from_raw_parts(self.payload_ptr(frame), frame.len) }
    }

    /// Copies a frame's payload into `out` (replacing its contents) without ever forming a
    /// reference to the shared bytes: the peer may rewrite them concurrently, so they are read
    /// with relaxed atomic loads and only the private copy is interpreted afterwards.
    pub fn copy_frame(&self, frame: &Frame, out: &mut AlignedBuf) {
        let words = frame_total(frame.len) / 8 - FRAME_HEADER / 8;
        out.resize_words(words);
        let src = self.payload_ptr(frame).cast::<AtomicU64>();
        let dst = out.words_mut();
        for (i, w) in dst.iter_mut().enumerate() {
            // SAFETY: the padded payload (frame_total - header bytes, a multiple of 16) is in
            // bounds (checked by `peek`), 8-aligned (payloads are 16-aligned), and AtomicU64
            // accepts any bit pattern, so loading it while the peer writes is sound.
            *w = unsafe { (*src.add(i)).load(Ordering::Relaxed) };
        }
        out.set_len(frame.len);
    }

    /// Marks the frame at the head as taken for processing (see [`ConsumerLine::claimed`]).
    pub fn claim(&self, frame: &Frame) {
        self.ring
            .header()
            .consumer
            .claimed
            .store(frame.end(), Ordering::Release);
    }

    /// Releases the frame returned by the last `peek`, giving its space back to the producer.
    pub fn release(&mut self, frame: Frame) {
        debug_assert_eq!(frame.pos, self.head, "frames are released in order");
        if frame.pos == self.head {
            self.head = frame.end();
            self.publish_head();
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
                self.copy_frame(&frame, out);
                self.release(frame);
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
    }
}

/// A growable byte buffer whose contents start 16-byte aligned: where untrusted frames are
/// copied before rkyv checks them.
#[derive(Default, Clone)]
pub struct AlignedBuf {
    words: Vec<u128>,
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

    fn words_mut(&mut self) -> &mut [u64] {
        let n = self.words.len() * 2;
        // SAFETY: u128 storage reinterpreted as twice as many u64: same total size, u64's
        // alignment divides u128's, every bit pattern is valid for both.
        unsafe { core::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u64>(), n) }
    }

    fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.words.len() * 16);
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

/// A heap-allocated ring for tests and in-process use: header + data in one aligned block.
pub struct HeapRing {
    base: NonNull<u8>,
    capacity: usize,
}

// SAFETY: HeapRing owns its allocation and never touches the bytes itself after zeroing them;
// all access goes through RingRef handles (atomics + SPSC discipline).
unsafe impl Send for HeapRing {}
// SAFETY: as above; &HeapRing exposes no access to the bytes.
unsafe impl Sync for HeapRing {}

impl HeapRing {
    fn layout(capacity: usize) -> std::alloc::Layout {
        // 128 is a power of two and ring_bytes is far below isize::MAX for valid capacities.
        std::alloc::Layout::from_size_align(ring_bytes(capacity), 128)
            .unwrap_or_else(|_| std::alloc::Layout::new::<RingHeader>())
    }

    /// Allocates a zeroed ring of `capacity` (power of two, at least [`MIN_CAPACITY`], at most
    /// 1 GiB).
    pub fn new(capacity: usize) -> Result<Arc<HeapRing>, RingError> {
        if !capacity.is_power_of_two() || !(MIN_CAPACITY..=1 << 30).contains(&capacity) {
            return Err(RingError::Corrupt(
                "capacity must be a power of two in [256, 1 GiB]",
            ));
        }
        // SAFETY: the layout has a non-zero size (the header alone is 384 bytes).
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::layout(capacity)) };
        let Some(base) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(Self::layout(capacity));
        };
        Ok(Arc::new(HeapRing { base, capacity }))
    }

    /// Writes `bytes` into the data area from `offset` on (wrapping at the capacity), with
    /// relaxed atomic byte stores: what a peer process scribbling on its mapping does, for
    /// tests and fuzzing of the hostile-peer paths.
    pub fn write_data(&self, offset: usize, bytes: &[u8]) {
        let data = core::mem::size_of::<RingHeader>();
        for (i, &b) in bytes.iter().enumerate() {
            let at = data + (offset.wrapping_add(i) % self.capacity);
            // The ring reads these bytes only atomically, or as frames of a consumer that
            // trusts its producer, which a test writing here does not use.
            // SAFETY: `at` < header + capacity, the allocation's size; AtomicU8 has u8's layout.
            unsafe {
                (*self
                    .base
                    .as_ptr()
                    .add(at)
                    .cast::<core::sync::atomic::AtomicU8>())
                .store(b, Ordering::Relaxed)
            };
        }
    }

    /// A handle to the ring (for one producer and one consumer).
    pub fn handle(self: &Arc<Self>) -> RingRef {
        let backing: Arc<dyn Backing> = self.clone();
        // SAFETY: the block is 128-aligned, zero-initialized (a valid empty ring),
        // ring_bytes(capacity) long and kept alive by `backing`.
        unsafe { RingRef::from_raw(self.base, self.capacity, backing) }
    }
}

impl Drop for HeapRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout; no handle outlives `self`
        // (each holds an Arc to it).
        unsafe { std::alloc::dealloc(self.base.as_ptr(), Self::layout(self.capacity)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(cap: usize) -> (Producer, Consumer, RingRef) {
        let ring = HeapRing::new(cap).unwrap().handle();
        let p = Producer::attach(ring.clone()).unwrap();
        let c = Consumer::attach(ring.clone()).unwrap();
        (p, c, ring)
    }

    fn pop(c: &mut Consumer) -> Option<Vec<u8>> {
        let f = c.peek().unwrap()?;
        let v = c.bytes(&f).to_vec();
        c.release(f);
        Some(v)
    }

    #[test]
    fn empty_ring_has_nothing() {
        let (_p, mut c, _) = pair(256);
        assert_eq!(c.peek().unwrap(), None);
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
    fn zero_length_frame() {
        let (mut p, mut c, _) = pair(256);
        p.push(b"").unwrap();
        let f = c.peek().unwrap().unwrap();
        assert_eq!(f.len, 0);
        assert_eq!(c.bytes(&f), b"");
        c.release(f);
        assert_eq!(c.peek().unwrap(), None);
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
            assert_eq!(c.bytes(&f).as_ptr() as usize % 16, 0);
            c.release(f);
        }
    }

    #[test]
    fn wrap_inserts_padding_and_frame_starts_at_zero() {
        let (mut p, mut c, ring) = pair(256);
        p.push(&[1; 160]).unwrap(); // 176 bytes, 80 left before the end
        assert_eq!(pop(&mut c).unwrap(), vec![1; 160]);
        p.push(&[2; 100]).unwrap(); // 128 total > 80: pad 80, frame at 0
        assert_eq!(p.position(), 176 + 80 + 128);
        let f = c.peek().unwrap().unwrap();
        assert_eq!(f.pos % 256, 0);
        assert_eq!(c.bytes(&f), &[2; 100][..]);
        c.release(f);
        assert_eq!(ring.header().consumer.head.load(Ordering::Relaxed), 384);
    }

    #[test]
    fn padding_published_alone_lets_a_max_frame_through() {
        let (mut p, mut c, _) = pair(256);
        p.push(&[1; 100]).unwrap(); // 128 bytes
        assert_eq!(pop(&mut c).unwrap(), vec![1; 100]);
        let max = p.ring().max_payload();
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
            p.reserve(usize::MAX),
            Err(RingError::TooLarge {
                len: usize::MAX,
                max: 240
            })
        );
    }

    #[test]
    fn push_with_failure_publishes_nothing() {
        let (mut p, mut c, _) = pair(256);
        let r: Result<(), &str> = p.push_with(10, |_| Err("nope")).unwrap();
        assert_eq!(r, Err("nope"));
        assert_eq!(c.peek().unwrap(), None);
        p.push_with::<()>(10, |b| {
            b[..2].copy_from_slice(b"hi");
            Ok(2)
        })
        .unwrap()
        .unwrap();
        assert_eq!(pop(&mut c).unwrap(), b"hi");
    }

    #[test]
    fn corrupt_tail_is_an_error() {
        for bad in [u64::MAX, 257 * 16, 3, 1 << 40] {
            let (mut p, mut c, ring) = pair(256);
            p.push(b"x").unwrap();
            ring.header().producer.tail.store(bad, Ordering::Release);
            let r = (|| {
                for _ in 0..4 {
                    if let Some(f) = c.peek()? {
                        c.release(f);
                    }
                }
                Ok::<_, RingError>(())
            })();
            assert!(matches!(r, Err(RingError::Corrupt(_))), "tail {bad}: {r:?}");
        }
    }

    #[test]
    fn tail_moving_backwards_is_an_error() {
        let (mut p, mut c, ring) = pair(256);
        p.push(b"x").unwrap();
        p.push(b"y").unwrap();
        assert!(c.has_data().unwrap());
        ring.header().producer.tail.store(0, Ordering::Release);
        let f = c.peek().unwrap().unwrap();
        c.release(f);
        let f = c.peek().unwrap().unwrap();
        c.release(f);
        assert!(matches!(c.peek(), Err(RingError::Corrupt(_))));
    }

    #[test]
    fn corrupt_head_is_an_error() {
        for bad in [u64::MAX, 1 << 40, 5] {
            let (mut p, _c, ring) = pair(256);
            for _ in 0..8 {
                p.push(&[0; 16]).unwrap();
            }
            ring.header().consumer.head.store(bad, Ordering::Release);
            assert!(
                matches!(p.push(b"z"), Err(RingError::Corrupt(_))),
                "head {bad}"
            );
        }
        // head moving backwards
        let (mut p, mut c, ring) = pair(256);
        for _ in 0..8 {
            p.push(&[0; 16]).unwrap();
        }
        pop(&mut c).unwrap();
        p.push(&[0; 16]).unwrap(); // observes head = 32
        ring.header().consumer.head.store(0, Ordering::Release);
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
            let (mut p, mut c, ring) = pair(256);
            p.push(&[1; 16]).unwrap();
            ring.write_frame_header(0, len, tag);
            assert!(
                matches!(c.peek(), Err(RingError::Corrupt(_))),
                "len {len} tag {tag:#x}"
            );
        }
    }

    #[test]
    fn attach_checks_positions() {
        let ring = HeapRing::new(256).unwrap().handle();
        ring.header().producer.tail.store(512, Ordering::Relaxed);
        assert!(Consumer::attach(ring.clone()).is_err());
        assert!(Producer::attach(ring.clone()).is_err());
        ring.header().producer.tail.store(32, Ordering::Relaxed);
        ring.header().consumer.head.store(48, Ordering::Relaxed);
        assert!(Consumer::attach(ring.clone()).is_err());
    }

    #[test]
    fn copy_frame_matches_in_place_bytes() {
        let (mut p, mut c, _) = pair(1024);
        let data: Vec<u8> = (0..=200).collect();
        p.push(&data).unwrap();
        let f = c.peek().unwrap().unwrap();
        let mut buf = AlignedBuf::new();
        c.copy_frame(&f, &mut buf);
        assert_eq!(buf.as_slice(), &data[..]);
        assert_eq!(buf.as_slice().as_ptr() as usize % 16, 0);
        c.release(f);
        assert!(!c.pop_into(&mut buf).unwrap());
    }

    #[test]
    fn claim_and_discard_for_recovery() {
        let (mut p, mut c, _) = pair(1024);
        p.push(b"taken").unwrap();
        p.push(b"unread").unwrap();
        let f = c.peek().unwrap().unwrap();
        c.claim(&f);
        let (head, claimed) = p.peer_positions().unwrap();
        assert_eq!(head, 0);
        assert_eq!(claimed, f.end());
        // The consumer dies; the supervisor discards the taken frame only.
        drop(c);
        p.discard_until(claimed).unwrap();
        let mut c2 = Consumer::attach(p.ring().clone()).unwrap();
        assert_eq!(pop(&mut c2).unwrap(), b"unread");
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
            let f = c.peek().unwrap().unwrap();
            c.claim(&f);
            ring.header()
                .producer
                .tail
                .store(garbage, Ordering::Release);
            drop(c);
            let (_, claimed) = p.peer_positions().unwrap();
            p.discard_until(claimed).unwrap();
            let mut c2 = Consumer::attach(ring.clone()).expect("successor attaches");
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
            ring.header()
                .consumer
                .head
                .store(garbage, Ordering::Release);
            ring.header()
                .consumer
                .claimed
                .store(garbage, Ordering::Release);
            drop(p);
            c.reset_producer();
            let mut p2 = Producer::attach(ring.clone()).expect("successor attaches");
            p2.push(b"next").unwrap();
            assert_eq!(pop(&mut c).unwrap(), b"next");
        }
    }

    #[test]
    fn scribbled_frames_are_caught() {
        let heap = HeapRing::new(256).unwrap();
        let ring = heap.handle();
        let mut p = Producer::attach(ring.clone()).unwrap();
        let mut c = Consumer::attach(ring).unwrap();
        p.push(&[1; 16]).unwrap();
        heap.write_data(0, &[0xff; 8]);
        assert!(matches!(c.peek(), Err(RingError::Corrupt(_))));
        heap.write_data(250, &[0; 16]); // wraps to the start without going out of bounds
    }

    #[test]
    fn reset_producer_drops_garbage() {
        let (mut p, mut c, ring) = pair(256);
        p.push(b"a").unwrap();
        ring.write_frame_header(0, 999, TAG_DATA);
        assert!(c.peek().is_err());
        c.reset_producer();
        assert_eq!(c.peek().unwrap(), None);
        // A new producer continues after the reset.
        let mut p2 = Producer::attach(ring.clone()).unwrap();
        p2.push(b"b").unwrap();
        assert_eq!(pop(&mut c).unwrap(), b"b");
    }
}
