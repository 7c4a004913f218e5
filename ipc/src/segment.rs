//! The shared-memory segment of one worker slot: a header (identity, lifecycle, heartbeat and
//! counters), the worker's park word, then one lane per gateway core (a request ring and a
//! response ring each).
//!
//! The gateway creates the segment (`shm_open` with `O_CREAT | O_EXCL`, mode 0600, a name unique
//! per gateway instance) and keeps the layout it chose; it never reads the layout back. The worker
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
//!
//! Ring ends are handed out by [`Segment::take_gateway_lane`] and [`Segment::take_worker_lane`],
//! each end at most once at a time in a process. Every mapping of one object in a process is
//! the same mapping (a registry keyed by the object's device and inode), so attaching again does
//! not yield a second set of ends: a test that plays a worker in the gateway's process must drop
//! the ends of the worker it replaces before taking its successor's.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, Weak};

use crate::ring::{
    Backing, Consumer, MIN_CAPACITY, Producer, RingEnds, SharedRing, TakeError, ring_bytes,
};

/// "MOLTSHM" + NUL, little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MOLTSHM\0");
/// Version of this layout and of the messages its rings carry ([`crate::message`]); bumped on
/// any change of either, so that a worker built from other sources (`worker_program`) fails
/// to attach with a clear error instead of misreading frames.
pub const LAYOUT_VERSION: u32 = 4;
/// Most lanes a segment may have.
pub const MAX_LANES: u32 = 256;
pub use crate::ring::MAX_CAPACITY;

/// Worker states as published in [`SegmentHeader::worker_state`] by the worker itself.
pub mod worker_state {
    /// Not attached yet.
    pub const STARTING: u32 = 0;
    /// Serving, idle or busy.
    pub const SERVING: u32 = 1;
    /// Finishing its current request before exiting (graceful recycle or shutdown).
    pub const EXITING: u32 = 2;
}

/// Cell states as published in [`SegmentHeader::cell_state`] by a worker in cell mode.
pub mod cell_state {
    /// Not in cell mode.
    pub const NONE: u32 = 0;
    /// No cell process.
    pub const STOPPED: u32 = 1;
    /// Spawned, not yet admitting the worker's client.
    pub const STARTING: u32 = 2;
    /// Serving.
    pub const READY: u32 = 3;
    /// Stopping (idle, or the worker leaves).
    pub const STOPPING: u32 = 4;
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
    /// One of [`cell_state`]: the state of the slot's OpenClaw cell in cell mode, else
    /// [`cell_state::NONE`] (written by the worker; informative only).
    pub cell_state: AtomicU32,
    /// Bumped by the worker from its serving loop; a counter that stops means a stuck worker.
    pub heartbeat: AtomicU64,
    /// Requests answered by the current generation (written by the worker).
    pub requests_served: AtomicU64,
    /// Requests taken but not yet answered (written by the worker).
    pub in_flight: AtomicU64,
    /// Resident set size in bytes, as measured by the worker itself.
    pub rss_bytes: AtomicU64,
    /// Pid of the slot's cell process, 0 when there is none (written by the worker;
    /// informative only: the gateway checks it is a descendant of the worker before use).
    pub cell_pid: AtomicU32,
    /// Open client connections (WebSocket) of the slot's users that sent it a request, or
    /// with a request still going (written by the gateway; the cell mode's idle rule).
    pub clients: AtomicU32,
    /// How long the cell's last start took, from spawn to admitting the worker's client, in
    /// ms; 0 before the first (written by the worker; informative only).
    pub cell_startup_ms: AtomicU64,
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

/// A mapping of one shared-memory object, shared by every [`Segment`] of this process that
/// refers to that object (see [`REGISTRY`]), with the take flags of its rings.
struct Mapping {
    /// Start of the mapping (page-aligned).
    ptr: NonNull<u8>,
    /// Its length: exactly the layout's total size.
    len: usize,
    /// The geometry, chosen by this process (created) or validated from the header (attached).
    layout: SegmentLayout,
    /// The name it was created or first attached under.
    name: String,
    /// The object's identity.
    id: ObjectId,
    /// Created by this process: the name is unlinked when the mapping goes away.
    owner: bool,
    /// Take flags of each ring: request ring of lane `i` at `2 i`, response ring at `2 i + 1`.
    ends: Vec<Arc<RingEnds>>,
}

// SAFETY: the mapping is plain shared memory; the pointer stays valid until drop, and all
// access to the bytes goes through atomics or the ring ends that `ends` hands out once each.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out the base pointer.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `Mapping::map`, and no reference
        // into it outlives the last Arc<Mapping> (every Segment and ring end holds one).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
        if self.owner && identity_of_name(&self.name) == Some(self.id) {
            let _ = rustix::shm::unlink(self.name.as_str());
        }
    }
}

/// Every shared-memory object this process maps, by identity: a second [`Segment::attach`] (or
/// an attach after [`Segment::create`]) of an object this process already maps shares that
/// mapping and its take flags, so that two mappings cannot hand out two ends of one ring.
static REGISTRY: Mutex<Vec<(ObjectId, Weak<Mapping>)>> = Mutex::new(Vec::new());

/// A shared-memory object's identity: (st_dev, st_ino).
type ObjectId = (u64, u64);

fn registry() -> std::sync::MutexGuard<'static, Vec<(ObjectId, Weak<Mapping>)>> {
    // The registry holds no invariant that a panic elsewhere could have broken halfway.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn identity(st: &rustix::fs::Stat) -> ObjectId {
    (st.st_dev, st.st_ino)
}

/// The identity of the object a name refers to now, if any.
fn identity_of_name(name: &str) -> Option<ObjectId> {
    let fd =
        rustix::shm::open(name, rustix::shm::OFlags::RDONLY, rustix::fs::Mode::empty()).ok()?;
    rustix::fs::fstat(&fd).ok().map(|st| identity(&st))
}

impl Mapping {
    /// Maps `len` bytes of the object behind `fd`, read-write and shared.
    fn map(fd: &OwnedFd, len: usize) -> std::io::Result<NonNull<u8>> {
        // SAFETY: a fresh shared read-write mapping of `len` bytes of the object; the kernel
        // picks the address, so it aliases nothing in this process.
        let ptr = unsafe {
            rustix::mm::mmap(
                core::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                fd,
                0,
            )
        }?;
        NonNull::new(ptr.cast::<u8>()).ok_or_else(|| std::io::Error::other("null mapping"))
    }

    fn ends_for(layout: SegmentLayout) -> Vec<Arc<RingEnds>> {
        (0..2 * layout.lanes).map(|_| RingEnds::new()).collect()
    }
}

/// A mapped segment. Cheap to clone (shared mapping).
#[derive(Clone)]
pub struct Segment {
    /// The mapping, shared by every Segment of this process on the same object.
    map: Arc<Mapping>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("name", &self.map.name)
            .field("layout", &self.map.layout)
            .finish()
    }
}

/// The gateway's ends of one lane: it produces requests and consumes responses.
#[derive(Debug)]
pub struct GatewayLane {
    /// Producer of the lane's request ring.
    pub requests: Producer,
    /// Consumer of the lane's response ring.
    pub responses: Consumer,
}

/// A worker's ends of one lane: it consumes requests and produces responses.
#[derive(Debug)]
pub struct WorkerLane {
    /// Consumer of the lane's request ring.
    pub requests: Consumer,
    /// Producer of the lane's response ring.
    pub responses: Producer,
}

impl Segment {
    /// Creates a new segment `name` (mode 0600; fails if it exists) for `slot_id`, zeroed, with
    /// its header filled in. It is unlinked when the last handle is dropped.
    pub fn create(
        name: &str,
        layout: SegmentLayout,
        slot_id: u32,
    ) -> Result<Segment, SegmentError> {
        let os = |source: std::io::Error| SegmentError::Os {
            name: name.to_string(),
            source,
        };
        let mode = rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR;
        let fd = rustix::shm::open(
            name,
            rustix::shm::OFlags::CREATE | rustix::shm::OFlags::EXCL | rustix::shm::OFlags::RDWR,
            mode,
        )
        .map_err(|e| os(e.into()))?;
        let made = (|| {
            // Exactly 0600 whatever the umask.
            rustix::fs::fchmod(&fd, mode)?;
            rustix::fs::ftruncate(&fd, layout.total_size() as u64)?;
            let id = identity(&rustix::fs::fstat(&fd)?);
            let ptr = Mapping::map(&fd, layout.total_size())?;
            Ok::<_, std::io::Error>((id, ptr))
        })();
        let (id, ptr) = match made {
            Ok(v) => v,
            Err(e) => {
                let _ = rustix::shm::unlink(name);
                return Err(os(e));
            }
        };
        drop(fd);
        let map = Arc::new(Mapping {
            ptr,
            len: layout.total_size(),
            layout,
            name: name.to_string(),
            id,
            owner: true,
            ends: Mapping::ends_for(layout),
        });
        let mut reg = registry();
        reg.retain(|(_, w)| w.strong_count() > 0);
        reg.push((id, Arc::downgrade(&map)));
        drop(reg);
        let seg = Segment { map };
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
    /// segment of this layout version. The descriptor is closed before returning. If this
    /// process already maps the same object (it created it, or attached before), the segment
    /// shares that mapping, and with it which ring ends are taken.
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
        let st = rustix::fs::fstat(&fd).map_err(|e| os(e.into()))?;
        let id = identity(&st);
        // Held until the new mapping is registered: two attaches of one object in two threads
        // end up with one mapping.
        let mut reg = registry();
        reg.retain(|(_, w)| w.strong_count() > 0);
        if let Some(map) = reg
            .iter()
            .find(|(k, _)| *k == id)
            .and_then(|(_, w)| w.upgrade())
        {
            // The same checks as for a new mapping, against the geometry it already has.
            let seg = Segment { map };
            let h = seg.header();
            let layout = SegmentLayout::from_header(
                h.magic.load(Ordering::Acquire),
                h.version.load(Ordering::Relaxed),
                h.lanes.load(Ordering::Relaxed),
                h.ring_capacity.load(Ordering::Relaxed),
                h.total_size.load(Ordering::Relaxed),
                seg.map.len,
            );
            return match layout {
                Ok(l) if l == seg.map.layout => Ok(seg),
                Ok(l) => Err(mismatch(format!(
                    "layout {l:?}, mapped as {:?}",
                    seg.map.layout
                ))),
                Err(SegmentError::Layout(reason)) => Err(mismatch(reason)),
                Err(other) => Err(other),
            };
        }
        let size = st.st_size;
        let len = usize::try_from(size).map_err(|_| mismatch(format!("size {size}")))?;
        if len < RINGS_OFFSET {
            return Err(mismatch(format!("size {len} smaller than the header")));
        }
        let ptr = Mapping::map(&fd, len).map_err(os)?;
        drop(fd);
        // The header is read through the mapping before a layout is known.
        // SAFETY: the mapping is page-aligned and at least RINGS_OFFSET bytes long, so a
        // SegmentHeader (all atomics) fits; it lives until the munmap below or in Mapping's
        // drop, after this borrow ends.
        let h = unsafe { ptr.cast::<SegmentHeader>().as_ref() };
        let layout = SegmentLayout::from_header(
            h.magic.load(Ordering::Acquire),
            h.version.load(Ordering::Relaxed),
            h.lanes.load(Ordering::Relaxed),
            h.ring_capacity.load(Ordering::Relaxed),
            h.total_size.load(Ordering::Relaxed),
            len,
        );
        let layout = match layout {
            Ok(l) => l,
            Err(e) => {
                // SAFETY: the mapping made above, never handed out (`h` is no longer used).
                let _ = unsafe { rustix::mm::munmap(ptr.as_ptr().cast(), len) };
                return Err(match e {
                    SegmentError::Layout(reason) => mismatch(reason),
                    other => other,
                });
            }
        };
        let map = Arc::new(Mapping {
            ptr,
            len,
            layout,
            name: name.to_string(),
            id,
            owner: false,
            ends: Mapping::ends_for(layout),
        });
        reg.push((id, Arc::downgrade(&map)));
        Ok(Segment { map })
    }

    /// Removes a segment name (for stale segments of a crashed earlier run). Mappings that are
    /// still open stay valid.
    pub fn unlink(name: &str) -> std::io::Result<()> {
        rustix::shm::unlink(name).map_err(Into::into)
    }

    /// The segment's name.
    pub fn name(&self) -> &str {
        &self.map.name
    }

    /// Its geometry.
    pub fn layout(&self) -> SegmentLayout {
        self.map.layout
    }

    /// The header.
    pub fn header(&self) -> &SegmentHeader {
        // SAFETY: the mapping starts page-aligned, is total_size bytes (checked at
        // create/attach) and holds a SegmentHeader (all atomics) at offset 0; it lives as long
        // as `self.map`, which the returned borrow of `self` keeps alive.
        unsafe { self.map.ptr.cast::<SegmentHeader>().as_ref() }
    }

    /// The worker's park word.
    pub fn worker_parked(&self) -> &AtomicU32 {
        // SAFETY: WorkerWake (one atomic) sits right after the header, inside the mapping
        // (see `header`).
        let wake = unsafe {
            self.map
                .ptr
                .add(core::mem::size_of::<SegmentHeader>())
                .cast::<WorkerWake>()
                .as_ref()
        };
        &wake.parked
    }

    fn ring(&self, lane: u32, response: bool) -> Result<SharedRing, TakeError> {
        let layout = self.map.layout;
        if lane >= layout.lanes {
            return Err(TakeError::NoLane {
                lane,
                lanes: layout.lanes,
            });
        }
        let offset = if response {
            layout.response_ring_offset(lane)
        } else {
            layout.request_ring_offset(lane)
        };
        let backing: Arc<dyn Backing> = self.map.clone();
        Ok(SharedRing {
            // SAFETY: `offset` is from the mapping's validated layout, so the ring lies inside
            // the mapping.
            base: unsafe { self.map.ptr.add(offset) },
            capacity: layout.ring_capacity,
            backing,
            ends: self.map.ends[2 * lane as usize + usize::from(response)].clone(),
        })
    }

    /// The gateway's ends of `lane`: the request ring's producer and the response ring's
    /// consumer. Refused while either is taken in this process (by any [`Segment`] on this
    /// object); free again once both are dropped.
    pub fn take_gateway_lane(&self, lane: u32) -> Result<GatewayLane, TakeError> {
        let requests = self.ring(lane, false)?.take_producer()?;
        let responses = self.ring(lane, true)?.take_consumer()?;
        Ok(GatewayLane {
            requests,
            responses,
        })
    }

    /// A worker's ends of `lane`: the request ring's consumer and the response ring's
    /// producer. Refused while either is taken in this process; free again once both are
    /// dropped (a successor worker in the same process, in tests).
    pub fn take_worker_lane(&self, lane: u32) -> Result<WorkerLane, TakeError> {
        let requests = self.ring(lane, false)?.take_consumer()?;
        let responses = self.ring(lane, true)?.take_producer()?;
        Ok(WorkerLane {
            requests,
            responses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Rings are shared: push on one handle, pop on the other.
        let mut gw = seg.take_gateway_lane(1).unwrap();
        let mut worker = other.take_worker_lane(1).unwrap();
        gw.requests.push(b"hello").unwrap();
        let f = worker.requests.peek().unwrap().unwrap();
        assert_eq!(f.bytes(), b"hello");
        f.release();
        worker.responses.push(b"back").unwrap();
        assert_eq!(gw.responses.peek().unwrap().unwrap().bytes(), b"back");
        assert!(matches!(
            seg.take_gateway_lane(2),
            Err(TakeError::NoLane { lane: 2, lanes: 2 })
        ));
        drop(other);
        drop((gw, worker));
        drop(seg);
        assert!(!shm_exists(&name));
    }

    #[test]
    fn each_lane_end_is_taken_once_across_mappings_of_one_object() {
        let name = unique("once");
        let seg = Segment::create(&name, SegmentLayout::new(2, 4096).unwrap(), 0).unwrap();
        let again = Segment::attach(&name).unwrap();
        let third = Segment::attach(&name).unwrap();
        // One mapping per object in a process, however it was reached.
        assert_eq!(seg.header() as *const _, again.header() as *const _);

        let gw = seg.take_gateway_lane(0).unwrap();
        for s in [&seg, &again, &third] {
            assert_eq!(s.take_gateway_lane(0).unwrap_err(), TakeError::Taken);
        }
        let worker = again.take_worker_lane(0).unwrap();
        for s in [&seg, &again, &third] {
            assert_eq!(s.take_worker_lane(0).unwrap_err(), TakeError::Taken);
            // Another lane is independent.
            drop(s.take_worker_lane(1).unwrap());
        }
        // A successor worker in this process: the old ends go first.
        drop(worker);
        let mut worker = third.take_worker_lane(0).expect("free once dropped");
        // The gateway kept its ends across the respawn.
        let mut gw = gw;
        gw.requests.push(b"to the successor").unwrap();
        assert_eq!(
            worker.requests.peek().unwrap().unwrap().bytes(),
            b"to the successor"
        );
        drop(gw);
        drop(seg.take_gateway_lane(0).unwrap());
        // A failed take leaves nothing taken: the response end is taken, the request end not.
        let held = again.take_gateway_lane(1).unwrap();
        let GatewayLane {
            requests,
            responses,
        } = held;
        drop(requests);
        assert_eq!(seg.take_gateway_lane(1).unwrap_err(), TakeError::Taken);
        drop(responses);
        drop(seg.take_gateway_lane(1).unwrap());
        drop(worker);
        drop(seg);
        drop(again);
        assert!(shm_exists(&name), "a handle is still alive");
        drop(third);
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
        // The name now belongs to another object: dropping the first one leaves it alone.
        let successor = Segment::create(&name, layout, 1).unwrap();
        drop(seg);
        assert!(shm_exists(&name));
        drop(successor);
        assert!(!shm_exists(&name));
    }
}
