//! The state of one worker slot shared by the monitor and every lane owner (gateway cores and
//! the in-process lane): the segment, the lifecycle state, the crash epoch handshake and the
//! counters behind `/status`.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moltbot_ipc::{Segment, WakeReceiver, WakeSender};
use serde::Serialize;

use crate::pool::admission::Admission;

/// Lifecycle of a slot, as reported in the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum SlotState {
    /// A process was spawned and has not reported in yet.
    Starting = 0,
    /// Serving, below its concurrency limit.
    Ready = 1,
    /// Serving at its concurrency limit (further requests queue).
    Busy = 2,
    /// Finishing in-flight work before a recycle or a stop.
    Draining = 3,
    /// Stopped with the pool.
    Stopped = 4,
    /// The process died; a new one is scheduled.
    Crashed = 5,
    /// Too many crashes within the restart window; retried after a cool-down.
    Failed = 6,
}

impl SlotState {
    fn from_u8(v: u8) -> SlotState {
        match v {
            0 => SlotState::Starting,
            1 => SlotState::Ready,
            2 => SlotState::Busy,
            3 => SlotState::Draining,
            4 => SlotState::Stopped,
            5 => SlotState::Crashed,
            _ => SlotState::Failed,
        }
    }

    /// The name used in the status (`ready`, `failed`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Starting => "starting",
            SlotState::Ready => "ready",
            SlotState::Busy => "busy",
            SlotState::Draining => "draining",
            SlotState::Stopped => "stopped",
            SlotState::Crashed => "crashed",
            SlotState::Failed => "failed",
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Counters of a slot, across all generations of its worker.
#[derive(Debug, Default)]
pub struct SlotStats {
    /// Pid of the current process (0 when none).
    pub pid: AtomicU32,
    /// Pid of the slot's standby, the started successor waiting beside it (0 when none).
    pub standby_pid: AtomicU32,
    /// Start of the current process, ms since the epoch.
    pub started_at_ms: AtomicU64,
    /// When the heartbeat last advanced, ms since the epoch.
    pub last_heartbeat_ms: AtomicU64,
    /// Resident set size of the current process in bytes (measured by the monitor); in cell
    /// mode, of the process and its descendants.
    pub rss_bytes: AtomicU64,
    /// Cell mode: resident set size of the worker's descendants (the cell's processes) in
    /// bytes, measured by the monitor; included in `rss_bytes`.
    pub cell_rss_bytes: AtomicU64,
    /// Cell mode: the cell's pid the worker published, once the monitor found it among the
    /// worker's descendants (0 otherwise).
    pub cell_pid: AtomicU32,
    /// Where the current process runs: a [`crate::pool::placement::Side`] code, 0 where
    /// workers run anywhere.
    pub side: AtomicU8,
    /// Restarts (every spawn after the first).
    pub restarts: AtomicU64,
    /// Requests answered by the worker (any status).
    pub requests: AtomicU64,
    /// Requests that ended in an error (handler errors, crashes, timeouts, bad responses).
    pub errors: AtomicU64,
    /// Worker process deaths that were not a requested recycle or stop.
    pub crashes: AtomicU64,
    /// While failed: when the next attempt is due, ms since the epoch.
    pub failed_until_ms: AtomicU64,
}

/// One worker slot.
pub struct Slot {
    /// Slot number (the N of `worker-N`).
    pub id: usize,
    /// `worker-N`.
    pub worker_id: String,
    /// The slot's segment; the same for the life of the pool, whatever the generation.
    pub segment: Segment,
    state: AtomicU8,
    /// A planned replacement is under way (a recycle at `max_requests` or `max_memory`): the
    /// slot drains or starts the successor, and its requests wait in the rings and the
    /// admission queue meanwhile. Cleared when the successor serves or if anything fails.
    replacing: AtomicBool,
    /// Bumped by the monitor after the slot's process died (or the slot failed): every lane
    /// owner then recovers its lane and acknowledges in `lane_acks` before a successor starts.
    pub epoch: AtomicU64,
    lane_acks: Box<[AtomicU64]>,
    /// Concurrency limit and queue.
    pub admission: Arc<Admission>,
    /// Counters for the status.
    pub stats: SlotStats,
    /// A lane owner's request to kill the process, with the slot epoch it was made at (the
    /// process it is about) and the reason.
    kill_request: Mutex<Option<(u64, String)>>,
    monitor_wake: Arc<WakeSender>,
    /// Per lane: the receiving end of the current worker's wake socket, left here by the
    /// monitor at each spawn for the lane's owner to take. Every worker gets sockets of its
    /// own, new at each spawn: one that breaks or floods its socket reaches only its lanes.
    wake_mailbox: Box<[Mutex<Option<WakeReceiver>>]>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("worker_id", &self.worker_id)
            .field("state", &self.state())
            .finish()
    }
}

impl Slot {
    /// A slot in state `starting`.
    pub fn new(
        id: usize,
        segment: Segment,
        lanes: usize,
        admission: Arc<Admission>,
        monitor_wake: Arc<WakeSender>,
    ) -> Slot {
        Slot {
            id,
            worker_id: crate::sandbox::worker_id(id),
            segment,
            state: AtomicU8::new(SlotState::Starting as u8),
            replacing: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            lane_acks: (0..lanes).map(|_| AtomicU64::new(0)).collect(),
            admission,
            stats: SlotStats::default(),
            kill_request: Mutex::new(None),
            monitor_wake,
            wake_mailbox: (0..lanes).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Current state.
    pub fn state(&self) -> SlotState {
        SlotState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Sets the state (monitor only). Waiters in the admission queue re-check it.
    pub fn set_state(&self, s: SlotState) {
        self.state.store(s as u8, Ordering::Release);
        if matches!(s, SlotState::Failed | SlotState::Stopped) {
            self.admission.wake_all();
        }
    }

    /// Marks a planned replacement as begun or over (monitor only).
    pub fn set_replacing(&self, on: bool) {
        self.replacing.store(on, Ordering::Release);
    }

    /// Whether the slot serves its users: ready or busy, or draining or starting in a planned
    /// replacement (a recycle takes milliseconds and loses nothing). A slot starting for the
    /// first time or after a crash, crashed or failed does not.
    pub fn serves(&self) -> bool {
        match self.state() {
            SlotState::Ready | SlotState::Busy => true,
            SlotState::Draining | SlotState::Starting => self.replacing.load(Ordering::Acquire),
            _ => false,
        }
    }

    /// The state as shown in the status: `busy` when at the concurrency limit.
    pub fn reported_state(&self) -> SlotState {
        match self.state() {
            SlotState::Ready if self.admission.in_flight() >= self.admission.max_concurrent() => {
                SlotState::Busy
            }
            s => s,
        }
    }

    /// Records that `lane` has recovered from `epoch` and wakes the monitor, which waits for
    /// every lane's acknowledgement before it starts the successor.
    pub fn ack_epoch(&self, lane: usize, epoch: u64) {
        if let Some(a) = self.lane_acks.get(lane) {
            a.store(epoch, Ordering::Release);
            self.monitor_wake.notify();
        }
    }

    /// True when every lane has recovered from `epoch`.
    pub fn all_lanes_acked(&self, epoch: u64) -> bool {
        self.lane_acks
            .iter()
            .all(|a| a.load(Ordering::Acquire) >= epoch)
    }

    /// Asks the monitor to kill the process that runs at slot epoch `epoch` (a lane saw it
    /// break the protocol). A request about a process that is gone by then is dropped.
    pub fn request_kill(&self, epoch: u64, reason: &str) {
        let mut r = self.kill_request.lock().unwrap_or_else(|p| p.into_inner());
        if r.as_ref().is_none_or(|(e, _)| *e != epoch) {
            *r = Some((epoch, reason.to_string()));
            drop(r);
            self.monitor_wake.notify();
        }
    }

    /// Takes a pending kill request (monitor only): its reason if it is about the process of
    /// the current epoch.
    pub fn take_kill_request(&self) -> Option<String> {
        let taken = self
            .kill_request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (epoch, why) = taken?;
        (epoch == self.epoch.load(Ordering::Acquire)).then_some(why)
    }

    /// Leaves `rx` for the owner of `lane` (monitor, at a spawn); replaces an untaken one.
    pub fn publish_wake(&self, lane: usize, rx: WakeReceiver) {
        if let Some(m) = self.wake_mailbox.get(lane) {
            *m.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
        }
    }

    /// Takes the wake receiver left for `lane`, if any.
    pub fn take_wake(&self, lane: usize) -> Option<WakeReceiver> {
        self.wake_mailbox
            .get(lane)
            .and_then(|m| m.lock().unwrap_or_else(|p| p.into_inner()).take())
    }

    /// Whether a new wake receiver waits for `lane`.
    pub fn has_wake(&self, lane: usize) -> bool {
        self.wake_mailbox
            .get(lane)
            .is_some_and(|m| m.lock().unwrap_or_else(|p| p.into_inner()).is_some())
    }

    /// Time left until a failed slot is retried.
    pub fn retry_after(&self) -> Duration {
        let until = self.stats.failed_until_ms.load(Ordering::Relaxed);
        Duration::from_millis(until.saturating_sub(now_ms()).max(1000))
    }
}

/// For unit tests: slot 0 with one lane on a fresh segment (4 KiB rings), and the receiving
/// end of its monitor wake socket.
#[cfg(test)]
pub(crate) fn test_slot(admission: Arc<Admission>) -> (Arc<Slot>, WakeReceiver) {
    test_slot_sized(admission, 4096)
}

/// As [`test_slot`], with rings of `capacity` bytes.
#[cfg(test)]
pub(crate) fn test_slot_sized(
    admission: Arc<Admission>,
    capacity: usize,
) -> (Arc<Slot>, WakeReceiver) {
    let name = format!(
        "/moltbot-test-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    );
    let layout = moltbot_ipc::SegmentLayout::new(1, capacity).expect("layout");
    let seg = Segment::create(&name, layout, 0).expect("segment");
    let (tx, rx) = moltbot_ipc::wake_pair().expect("wake pair");
    (Arc::new(Slot::new(0, seg, 1, admission, Arc::new(tx))), rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kill_request_is_about_the_process_of_its_epoch() {
        let (s, rx) = test_slot(Admission::new(1, 1));
        assert_eq!(s.take_kill_request(), None);
        s.request_kill(0, "garbage");
        s.request_kill(0, "more garbage");
        assert!(rx.drain() > 0, "the monitor is woken");
        assert_eq!(s.take_kill_request().as_deref(), Some("garbage"));
        assert_eq!(s.take_kill_request(), None, "taken once");
        // Made about a process that died meanwhile: not held against its successor.
        s.request_kill(0, "late");
        s.epoch.fetch_add(1, Ordering::AcqRel);
        assert_eq!(s.take_kill_request(), None);
        // Made about the successor (even before it was spawned): it stands.
        s.request_kill(1, "successor");
        assert_eq!(s.take_kill_request().as_deref(), Some("successor"));
    }

    #[test]
    fn an_acknowledged_recovery_wakes_the_monitor() {
        let (s, rx) = test_slot(Admission::new(1, 1));
        assert_eq!(rx.drain(), 0);
        assert!(!s.all_lanes_acked(1));
        s.ack_epoch(0, 1);
        assert!(s.all_lanes_acked(1));
        assert!(rx.drain() > 0, "the monitor is woken");
        // A lane that does not exist acknowledges nothing and wakes no one.
        s.ack_epoch(7, 2);
        assert_eq!(rx.drain(), 0);
        assert!(!s.all_lanes_acked(2));
    }

    #[test]
    fn a_slot_serves_when_ready_or_busy_or_in_a_planned_replacement() {
        use SlotState::*;
        let (s, _rx) = test_slot(Admission::new(1, 1));
        let all = [Starting, Ready, Busy, Draining, Stopped, Crashed, Failed];
        for replacing in [false, true] {
            s.set_replacing(replacing);
            for state in all {
                s.set_state(state);
                let expected = match state {
                    Ready | Busy => true,
                    Starting | Draining => replacing,
                    _ => false,
                };
                assert_eq!(s.serves(), expected, "{state:?}, replacing {replacing}");
            }
        }
    }
}
