//! The shared-memory segment of one worker slot: a header (identity, lifecycle, heartbeat and
//! counters), the worker's park word, then one lane per gateway core (a request ring and a
//! response ring each).
//!
//! The gateway creates the segment with the `shared_memory` crate (mode 0600, a name unique per
//! gateway instance) and keeps the layout it chose; it never reads the layout back. The worker
//! attaches by name, reads the layout from the header, checks magic, version and size, maps the
//! segment and closes the descriptor at once: after that it cannot resize the segment (which
//! would make the gateway fault), only write into it, which the gateway tolerates.
//!
//! ```text
//! 0      SegmentHeader   (128 bytes, #[repr(C, align(128))])
//! 128    WorkerWake      (128 bytes: the worker's futex word)
//! 256    lane 0: request ring  (RingHeader 384 + capacity)
//!        lane 0: response ring (RingHeader 384 + capacity)
//!        lane 1: ...
//! ```

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::ring::{MIN_CAPACITY, RingRef, ring_bytes};

/// "MOLTSHM" + NUL, little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MOLTSHM\0");
/// Version of this layout; bumped on any change.
pub const LAYOUT_VERSION: u32 = 1;
/// Most lanes a segment may have.
pub const MAX_LANES: u32 = 256;
/// Largest ring capacity accepted.
pub const MAX_CAPACITY: usize = 1 << 30;

/// Worker states as published in [`SegmentHeader::worker_state`] by the worker itself.
pub mod worker_state {
    /// Not attached yet.
    pub const STARTING: u32 = 0;
    /// Serving, idle or busy.
    pub const SERVING: u32 = 1;
    /// Finishing its current request before exiting (graceful recycle or shutdown).
    pub const EXITING: u32 = 2;
}

/// The segment header. All fields are atomics because two processes share them.
#[repr(C, align(128))]
pub struct SegmentHeader {
    /// [`MAGIC`]. Written by the gateway at creation.
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`]. Written by the gateway at creation.
    pub version: AtomicU32,
    /// Number of lanes. Written by the gateway at creation.
    pub lanes: AtomicU32,
    /// Data bytes per ring. Written by the gateway at creation.
    pub ring_capacity: AtomicU64,
    /// Size of the whole segment. Written by the gateway at creation.
    pub total_size: AtomicU64,
    /// The worker slot this segment belongs to. Written by the gateway at creation.
    pub slot_id: AtomicU32,
    /// Pid of the worker process of the current generation (set by the gateway at spawn).
    pub worker_pid: AtomicU32,
    /// Bumped by the gateway on each (re)spawn into this slot.
    pub generation: AtomicU64,
    /// Start time of the current worker process, ms since the Unix epoch (set by the gateway).
    pub start_time_ms: AtomicU64,
    /// One of [`worker_state`] (written by the worker; informative only).
    pub worker_state: AtomicU32,
    /// Reserved.
    pub _reserved: AtomicU32,
    /// Bumped by the worker from its serving loop; a counter that stops means a stuck worker.
    pub heartbeat: AtomicU64,
    /// Requests answered by the current generation (written by the worker).
    pub requests_served: AtomicU64,
    /// Requests taken but not yet answered (written by the worker).
    pub in_flight: AtomicU64,
    /// Resident set size in bytes, as measured by the worker itself.
    pub rss_bytes: AtomicU64,
}

/// The worker's park word, alone on its cache line.
#[repr(C, align(128))]
pub struct WorkerWake {
    /// 1 while the worker is parked or about to; a futex word (see [`crate::wake`]).
    pub parked: AtomicU32,
}

const RINGS_OFFSET: usize =
    core::mem::size_of::<SegmentHeader>() + core::mem::size_of::<WorkerWake>();

/// The geometry of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentLayout {
    lanes: u32,
    ring_capacity: usize,
}

/// Errors creating or attaching a segment.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// The requested geometry is not allowed.
    #[error("invalid segment layout: {0}")]
    Layout(String),
    /// The operating system refused.
    #[error("shared memory {name}: {source}")]
    Os {
        /// Segment name.
        name: String,
        /// The error.
        source: std::io::Error,
    },
    /// The `shared_memory` crate refused.
    #[error("shared memory {name}: {message}")]
    Create {
        /// Segment name.
        name: String,
        /// Its message.
        message: String,
    },
    /// The segment exists but is not one of ours, or of another version.
    #[error("shared memory {name} is not a moltbot segment: {reason}")]
    Mismatch {
        /// Segment name.
        name: String,
        /// What did not match.
        reason: String,
    },
}

impl SegmentLayout {
    /// A layout of `lanes` lanes with rings of `ring_capacity` data bytes.
    pub fn new(lanes: u32, ring_capacity: usize) -> Result<Self, SegmentError> {
        if lanes == 0 || lanes > MAX_LANES {
            return Err(SegmentError::Layout(format!(
                "lanes must be 1..={MAX_LANES}, got {lanes}"
            )));
        }
        if !ring_capacity.is_power_of_two()
            || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&ring_capacity)
        {
            return Err(SegmentError::Layout(format!(
                "ring capacity must be a power of two in [{MIN_CAPACITY}, {MAX_CAPACITY}], got {ring_capacity}"
            )));
        }
        let layout = SegmentLayout {
            lanes,
            ring_capacity,
        };
        if layout.total_size_checked().is_none() {
            return Err(SegmentError::Layout("segment too large".into()));
        }
        Ok(layout)
    }

    /// The layout that a segment header describes, validated against the size of the mapping
    /// it was read from: magic, layout version, lanes, ring capacity, and both the declared and
    /// the actual size must match the layout exactly (so every ring lies inside the mapping).
    /// Pure, so that [`Segment::attach`]'s validation can be tested and fuzzed without shared
    /// memory. `Err` is always [`SegmentError::Layout`] with the reason.
    pub fn from_header(
        magic: u64,
        version: u32,
        lanes: u32,
        ring_capacity: u64,
        declared_size: u64,
        mapping_len: usize,
    ) -> Result<SegmentLayout, SegmentError> {
        let bad = |reason: String| Err(SegmentError::Layout(reason));
        if mapping_len < RINGS_OFFSET {
            return bad(format!("size {mapping_len} smaller than the header"));
        }
        if magic != MAGIC {
            return bad(format!("bad magic {magic:#x}"));
        }
        if version != LAYOUT_VERSION {
            return bad(format!(
                "layout version {version}, expected {LAYOUT_VERSION}"
            ));
        }
        let Ok(capacity) = usize::try_from(ring_capacity) else {
            return bad(format!("ring capacity {ring_capacity}"));
        };
        let layout = SegmentLayout::new(lanes, capacity)?;
        if layout.total_size() != mapping_len || declared_size != mapping_len as u64 {
            return bad(format!(
                "size {mapping_len}, header says {declared_size}, layout needs {}",
                layout.total_size()
            ));
        }
        Ok(layout)
    }

    /// Number of lanes.
    pub fn lanes(&self) -> u32 {
        self.lanes
    }

    /// Data bytes per ring.
    pub fn ring_capacity(&self) -> usize {
        self.ring_capacity
    }

    fn total_size_checked(&self) -> Option<usize> {
        ring_bytes(self.ring_capacity)
            .checked_mul(2)?
            .checked_mul(self.lanes as usize)?
            .checked_add(RINGS_OFFSET)
    }

    /// Bytes of the whole segment.
    pub fn total_size(&self) -> usize {
        self.total_size_checked().unwrap_or(usize::MAX)
    }

    fn request_ring_offset(&self, lane: u32) -> usize {
        RINGS_OFFSET + lane as usize * 2 * ring_bytes(self.ring_capacity)
    }

    fn response_ring_offset(&self, lane: u32) -> usize {
        self.request_ring_offset(lane) + ring_bytes(self.ring_capacity)
    }
}

/// The memory behind a segment.
enum Mapping {
    /// Created by this process (the gateway); unlinked when dropped.
    Owned(shared_memory::Shmem),
    /// Attached by name (the worker); unmapped when dropped.
    Attached { ptr: NonNull<u8>, len: usize },
}

// SAFETY: the mapping is plain shared memory; the pointer stays valid until drop, and all
// access to the bytes goes through atomics or the SPSC ring discipline.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out the base pointer.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn base(&self) -> NonNull<u8> {
        match self {
            // shared_memory returns the non-null address of a successful mmap.
            Mapping::Owned(shm) => NonNull::new(shm.as_ptr()).unwrap_or(NonNull::dangling()),
            Mapping::Attached { ptr, .. } => *ptr,
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Mapping::Attached { ptr, len } = self {
            // SAFETY: `ptr`/`len` are exactly the mapping made in `Segment::attach`, and no
            // reference into it outlives the last Arc<Mapping> (every handle holds one).
            let _ = unsafe { rustix::mm::munmap(ptr.as_ptr().cast(), *len) };
        }
    }
}

/// A mapped segment. Cheap to clone (shared mapping).
#[derive(Clone)]
pub struct Segment {
    map: Arc<Mapping>,
    layout: SegmentLayout,
    name: String,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("name", &self.name)
            .field("layout", &self.layout)
            .finish()
    }
}

impl Segment {
    /// Creates a new segment `name` (mode 0600; fails if it exists) for `slot_id`, zeroed, with
    /// its header filled in. It is unlinked when the last handle is dropped.
    pub fn create(
        name: &str,
        layout: SegmentLayout,
        slot_id: u32,
    ) -> Result<Segment, SegmentError> {
        let shm = shared_memory::ShmemConf::new()
            .os_id(name)
            .size(layout.total_size())
            .create()
            .map_err(|e| SegmentError::Create {
                name: name.to_string(),
                message: e.to_string(),
            })?;
        if shm.as_ptr().is_null() || shm.len() < layout.total_size() {
            return Err(SegmentError::Create {
                name: name.to_string(),
                message: "mapping smaller than requested".into(),
            });
        }
        let seg = Segment {
            map: Arc::new(Mapping::Owned(shm)),
            layout,
            name: name.to_string(),
        };
        let h = seg.header();
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.lanes.store(layout.lanes, Ordering::Relaxed);
        h.ring_capacity
            .store(layout.ring_capacity as u64, Ordering::Relaxed);
        h.total_size
            .store(layout.total_size() as u64, Ordering::Relaxed);
        h.slot_id.store(slot_id, Ordering::Relaxed);
        // Magic last: a segment with the magic is completely initialized.
        h.magic.store(MAGIC, Ordering::Release);
        Ok(seg)
    }

    /// Attaches to an existing segment by name, checking that it is a complete moltbot
    /// segment of this layout version. The descriptor is closed before returning.
    pub fn attach(name: &str) -> Result<Segment, SegmentError> {
        let os = |source: std::io::Error| SegmentError::Os {
            name: name.to_string(),
            source,
        };
        let mismatch = |reason: String| SegmentError::Mismatch {
            name: name.to_string(),
            reason,
        };
        let fd = rustix::shm::open(name, rustix::shm::OFlags::RDWR, rustix::fs::Mode::empty())
            .map_err(|e| os(e.into()))?;
        let size = rustix::fs::fstat(&fd).map_err(|e| os(e.into()))?.st_size;
        let len = usize::try_from(size).map_err(|_| mismatch(format!("size {size}")))?;
        if len < RINGS_OFFSET {
            return Err(mismatch(format!("size {len} smaller than the header")));
        }
        // SAFETY: a fresh shared read-write mapping of `len` bytes of the object; the kernel
        // picks the address, so it aliases nothing in this process.
        let ptr = unsafe {
            rustix::mm::mmap(
                core::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .map_err(|e| os(e.into()))?;
        drop(fd);
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| mismatch("null mapping".into()))?;
        let map = Arc::new(Mapping::Attached { ptr, len });
        // The header is read through the mapping before a layout is known.
        // SAFETY: the mapping is page-aligned and at least RINGS_OFFSET bytes long, so a
        // SegmentHeader (all atomics) fits; it lives as long as `map`.
        let h = unsafe { ptr.cast::<SegmentHeader>().as_ref() };
        let layout = SegmentLayout::from_header(
            h.magic.load(Ordering::Acquire),
            h.version.load(Ordering::Relaxed),
            h.lanes.load(Ordering::Relaxed),
            h.ring_capacity.load(Ordering::Relaxed),
            h.total_size.load(Ordering::Relaxed),
            len,
        )
        .map_err(|e| match e {
            SegmentError::Layout(reason) => mismatch(reason),
            other => other,
        })?;
        Ok(Segment {
            map,
            layout,
            name: name.to_string(),
        })
    }

    /// Removes a segment name (for stale segments of a crashed earlier run). Mappings that are
    /// still open stay valid.
    pub fn unlink(name: &str) -> std::io::Result<()> {
        rustix::shm::unlink(name).map_err(Into::into)
    }

    /// The segment's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its geometry.
    pub fn layout(&self) -> SegmentLayout {
        self.layout
    }

    /// The header.
    pub fn header(&self) -> &SegmentHeader {
        // SAFETY: the mapping starts page-aligned, is at least total_size bytes (checked at
        // create/attach) and holds a SegmentHeader (all atomics) at offset 0; it lives as long
        // as `self.map`, which the returned borrow of `self` keeps alive.
        unsafe { self.map.base().cast::<SegmentHeader>().as_ref() }
    }

    /// The worker's park word.
    pub fn worker_parked(&self) -> &AtomicU32 {
        // SAFETY: WorkerWake sits right after the header, inside the mapping (see `header`).
        let wake = unsafe {
            self.map
                .base()
                .add(core::mem::size_of::<SegmentHeader>())
                .cast::<WorkerWake>()
                .as_ref()
        };
        &wake.parked
    }

    fn ring_at(&self, offset: usize) -> RingRef {
        let backing: Arc<dyn crate::ring::Backing> = self.map.clone();
        // SAFETY: `offset` is from this segment's validated layout: the ring lies inside the
        // page-aligned mapping, 128-aligned (every part is a multiple of 128); `backing` keeps
        // the mapping alive for the handle's lifetime.
        unsafe {
            RingRef::from_raw(
                self.map.base().add(offset),
                self.layout.ring_capacity,
                backing,
            )
        }
    }

    /// The request ring of `lane` (producer: a gateway core; consumer: the worker).
    pub fn request_ring(&self, lane: u32) -> Option<RingRef> {
        (lane < self.layout.lanes).then(|| self.ring_at(self.layout.request_ring_offset(lane)))
    }

    /// The response ring of `lane` (producer: the worker; consumer: that gateway core).
    pub fn response_ring(&self, lane: u32) -> Option<RingRef> {
        (lane < self.layout.lanes).then(|| self.ring_at(self.layout.response_ring_offset(lane)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{Consumer, Producer};

    fn unique(tag: &str) -> String {
        format!(
            "/moltbot-test-{}-{tag}-{}",
            std::process::id(),
            rand::random::<u32>()
        )
    }

    fn shm_exists(name: &str) -> bool {
        std::path::Path::new("/dev/shm")
            .join(name.trim_start_matches('/'))
            .exists()
    }

    #[test]
    fn header_sizes_are_cache_lines() {
        assert_eq!(core::mem::size_of::<SegmentHeader>(), 128);
        assert_eq!(core::mem::size_of::<WorkerWake>(), 128);
        assert_eq!(RINGS_OFFSET % 128, 0);
    }

    #[test]
    fn layout_validation() {
        assert!(SegmentLayout::new(0, 4096).is_err());
        assert!(SegmentLayout::new(MAX_LANES + 1, 4096).is_err());
        assert!(SegmentLayout::new(1, 1000).is_err());
        assert!(SegmentLayout::new(1, 128).is_err());
        assert!(SegmentLayout::new(1, MAX_CAPACITY * 2).is_err());
        let l = SegmentLayout::new(3, 4096).unwrap();
        assert_eq!(l.total_size(), RINGS_OFFSET + 6 * (384 + 4096));
    }

    #[test]
    fn from_header_accepts_exactly_a_consistent_header() {
        let l = SegmentLayout::new(2, 4096).unwrap();
        let size = l.total_size();
        let ok = |magic, version, lanes, cap, declared, len| {
            SegmentLayout::from_header(magic, version, lanes, cap, declared, len)
        };
        assert_eq!(
            ok(MAGIC, LAYOUT_VERSION, 2, 4096, size as u64, size).unwrap(),
            l
        );
        let err = |r: Result<SegmentLayout, SegmentError>| r.unwrap_err().to_string();
        assert!(err(ok(0, LAYOUT_VERSION, 2, 4096, size as u64, size)).contains("magic"));
        assert!(err(ok(MAGIC, 99, 2, 4096, size as u64, size)).contains("version 99"));
        assert!(ok(MAGIC, LAYOUT_VERSION, 0, 4096, size as u64, size).is_err());
        assert!(ok(MAGIC, LAYOUT_VERSION, 3, 4096, size as u64, size).is_err());
        assert!(ok(MAGIC, LAYOUT_VERSION, 2, 4095, size as u64, size).is_err());
        assert!(ok(MAGIC, LAYOUT_VERSION, 2, 1 << 40, size as u64, size).is_err());
        assert!(ok(MAGIC, LAYOUT_VERSION, 2, u64::MAX, size as u64, size).is_err());
        // Declared and actual size must both be the layout's.
        assert!(ok(MAGIC, LAYOUT_VERSION, 2, 4096, size as u64 + 1, size).is_err());
        assert!(ok(MAGIC, LAYOUT_VERSION, 2, 4096, size as u64, size + 4096).is_err());
        assert!(ok(MAGIC, LAYOUT_VERSION, 2, 4096, 0, 0).is_err());
        assert!(err(ok(MAGIC, LAYOUT_VERSION, 2, 4096, 0, RINGS_OFFSET - 1)).contains("smaller"));
    }

    #[test]
    fn create_attach_and_unlink_on_drop() {
        let name = unique("seg");
        let layout = SegmentLayout::new(2, 4096).unwrap();
        let seg = Segment::create(&name, layout, 7).unwrap();
        assert!(shm_exists(&name));
        let meta =
            std::fs::metadata(std::path::Path::new("/dev/shm").join(name.trim_start_matches('/')))
                .unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        let other = Segment::attach(&name).unwrap();
        assert_eq!(other.layout(), layout);
        assert_eq!(other.header().slot_id.load(Ordering::Relaxed), 7);
        // Rings are shared: push on one mapping, pop on the other.
        let mut p = Producer::attach(seg.request_ring(1).unwrap()).unwrap();
        let mut c = Consumer::attach(other.request_ring(1).unwrap()).unwrap();
        p.push(b"hello").unwrap();
        let f = c.peek().unwrap().unwrap();
        assert_eq!(c.bytes(&f), b"hello");
        assert!(seg.request_ring(2).is_none());
        drop(other);
        drop((p, c));
        drop(seg);
        assert!(!shm_exists(&name));
    }

    #[test]
    fn create_refuses_existing_name() {
        let name = unique("dup");
        let layout = SegmentLayout::new(1, 4096).unwrap();
        let _a = Segment::create(&name, layout, 0).unwrap();
        assert!(Segment::create(&name, layout, 0).is_err());
    }

    #[test]
    fn attach_checks_magic_version_and_size() {
        let name = unique("bad");
        let layout = SegmentLayout::new(1, 4096).unwrap();
        let seg = Segment::create(&name, layout, 0).unwrap();
        seg.header().version.store(99, Ordering::Relaxed);
        let e = Segment::attach(&name).unwrap_err();
        assert!(e.to_string().contains("version 99"), "{e}");
        seg.header()
            .version
            .store(LAYOUT_VERSION, Ordering::Relaxed);
        seg.header().total_size.store(1, Ordering::Relaxed);
        assert!(Segment::attach(&name).is_err());
        seg.header()
            .total_size
            .store(layout.total_size() as u64, Ordering::Relaxed);
        seg.header().lanes.store(100, Ordering::Relaxed);
        assert!(Segment::attach(&name).is_err());
        seg.header().lanes.store(1, Ordering::Relaxed);
        seg.header().magic.store(0, Ordering::Relaxed);
        assert!(
            Segment::attach(&name)
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        seg.header().magic.store(MAGIC, Ordering::Relaxed);
        Segment::attach(&name).unwrap();
        assert!(Segment::attach(&unique("missing")).is_err());
    }

    #[test]
    fn unlink_removes_name() {
        let name = unique("unlink");
        let layout = SegmentLayout::new(1, 4096).unwrap();
        let seg = Segment::create(&name, layout, 0).unwrap();
        Segment::unlink(&name).unwrap();
        assert!(!shm_exists(&name));
        // The mapping still works.
        seg.header().heartbeat.fetch_add(1, Ordering::Relaxed);
        drop(seg); // unlinking again inside shared_memory's drop is harmless
    }
}
