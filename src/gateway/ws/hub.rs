//! Where WebSocket frames wait for their connection, and how a run's events reach every open
//! connection of its user, on any core.
//!
//! Each connection has an [`Outbox`]: frames queued for it, bounded in bytes (a client that
//! does not read is closed as a slow consumer, never buffered without bound). The [`Hub`]
//! knows each user's outboxes; [`Hub::publish`] queues an event into all of them. An outbox of
//! another core is then poked through that core's inbox and pump wake-up, because a
//! connection's task lives on the core that accepted it.
//!
//! Tenancy: the hub is keyed by the user the connection authenticated as, and an event is
//! published under the user of the request it belongs to (the lane knows it; the worker
//! cannot name a user). A connection therefore only ever receives its own user's events.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::frames;

/// One frame waiting to be sent.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A complete frame (an answer to this connection's request).
    Frame(String),
    /// An event; the connection numbers it (`seq`) when it sends it.
    Event {
        /// The event name.
        name: Arc<str>,
        /// Its payload, JSON text; shared by every connection it goes to.
        payload: Arc<str>,
    },
}

impl Outgoing {
    fn len(&self) -> usize {
        match self {
            Outgoing::Frame(f) => f.len(),
            Outgoing::Event { name, payload } => name.len() + payload.len() + 48,
        }
    }
}

/// Frames queued for one connection.
#[derive(Debug)]
pub struct Outbox {
    /// The core whose task serves the connection.
    pub core: usize,
    /// The connection's id (unique in the gateway).
    pub conn: u64,
    max_bytes: usize,
    state: Mutex<OutboxState>,
}

#[derive(Debug, Default)]
struct OutboxState {
    frames: VecDeque<Outgoing>,
    bytes: usize,
    /// A frame was refused because the client is this far behind.
    overflow: bool,
    /// The connection is gone: nothing more is queued.
    closed: bool,
}

impl Outbox {
    /// An empty outbox of connection `conn` on `core` that holds at most `max_bytes`.
    pub fn new(core: usize, conn: u64, max_bytes: usize) -> Outbox {
        Outbox {
            core,
            conn,
            max_bytes,
            state: Mutex::new(OutboxState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, OutboxState> {
        // Nothing panics while holding the lock; a poisoned lock still has consistent data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `frame`. Returns false if it was refused: the connection is closed, or the
    /// client is behind by more than the limit (it is then marked for a slow-consumer close).
    pub fn push(&self, frame: Outgoing) -> bool {
        let mut s = self.lock();
        if s.closed || s.overflow {
            return false;
        }
        let len = frame.len();
        // One frame is always taken into an empty outbox, whatever its size (a worker's answer
        // may be larger than the limit): the limit bounds the backlog of a client that does
        // not read, not the size of one frame.
        if s.bytes > 0 && s.bytes + len > self.max_bytes {
            s.overflow = true;
            s.frames.clear();
            s.bytes = 0;
            return false;
        }
        s.bytes += len;
        s.frames.push_back(frame);
        true
    }

    /// Takes the oldest frame queued.
    pub fn pop(&self) -> Option<Outgoing> {
        let mut s = self.lock();
        let f = s.frames.pop_front()?;
        s.bytes = s.bytes.saturating_sub(f.len());
        Some(f)
    }

    /// Takes queued frames, oldest first, as the text to send, into `out` until their text
    /// reaches `max_bytes` (at least one frame when any is queued): events are numbered here,
    /// `seq` being the connection's last number. Returns how many were taken.
    pub fn pop_batch(&self, seq: &mut u64, max_bytes: usize, out: &mut Vec<String>) -> usize {
        let mut bytes = 0;
        let mut taken = 0;
        while bytes < max_bytes {
            let Some(next) = self.pop() else {
                break;
            };
            let text = match next {
                Outgoing::Frame(f) => f,
                Outgoing::Event { name, payload } => {
                    *seq += 1;
                    frames::event_frame(&name, &payload, *seq)
                }
            };
            bytes += text.len();
            taken += 1;
            out.push(text);
        }
        taken
    }

    /// Whether the client fell too far behind.
    pub fn overflowed(&self) -> bool {
        self.lock().overflow
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Refuses everything from now on and drops what is queued.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.frames.clear();
        s.bytes = 0;
    }
}

/// Connections of one core that were sent frames from other cores.
#[derive(Debug, Default)]
struct Inbox {
    conns: Mutex<Vec<u64>>,
    /// Set when `conns` became non-empty; the core's pump is woken once per set.
    poked: AtomicBool,
}

/// Every WebSocket connection's outbox, by user.
pub struct Hub {
    users: Mutex<HashMap<String, Vec<Arc<Outbox>>>>,
    inboxes: Vec<Inbox>,
    wake_core: Box<dyn Fn(usize) + Send + Sync>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("cores", &self.inboxes.len())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub for `cores` cores; `wake_core(i)` wakes core `i`'s pump, which then calls
    /// [`Hub::take_poked`].
    pub fn new(cores: usize, wake_core: Box<dyn Fn(usize) + Send + Sync>) -> Hub {
        Hub {
            users: Mutex::new(HashMap::new()),
            inboxes: (0..cores).map(|_| Inbox::default()).collect(),
            wake_core,
        }
    }

    fn users(&self) -> MutexGuard<'_, HashMap<String, Vec<Arc<Outbox>>>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a connection of `user`.
    pub fn join(&self, user: &str, outbox: Arc<Outbox>) {
        self.users()
            .entry(user.to_owned())
            .or_default()
            .push(outbox);
    }

    /// Removes a connection of `user`.
    pub fn leave(&self, user: &str, outbox: &Arc<Outbox>) {
        let mut users = self.users();
        if let Some(list) = users.get_mut(user) {
            list.retain(|o| !Arc::ptr_eq(o, outbox));
            if list.is_empty() {
                users.remove(user);
            }
        }
        outbox.close();
    }

    /// Open (authenticated) connections, all users.
    pub fn connections(&self) -> usize {
        self.users().values().map(Vec::len).sum()
    }

    /// Users with at least one open connection.
    pub fn users_connected(&self) -> usize {
        self.users().len()
    }

    /// Open connections of `user`.
    pub fn connections_of(&self, user: &str) -> usize {
        self.users().get(user).map_or(0, Vec::len)
    }

    /// Queues event `name` to every connection of `user`. Returns the connections of core
    /// `here` that got it (the caller wakes them); those of other cores are poked through
    /// their core's inbox.
    pub fn publish(&self, user: &str, name: &str, payload: &str, here: usize) -> Vec<u64> {
        let targets: Vec<Arc<Outbox>> = match self.users().get(user) {
            Some(list) => list.clone(),
            None => return Vec::new(),
        };
        let frame = Outgoing::Event {
            name: Arc::from(name),
            payload: Arc::from(payload),
        };
        let mut local = Vec::new();
        for o in targets {
            // A refused frame is no reason to stop: the connection is woken either way and
            // closes itself if it overflowed.
            o.push(frame.clone());
            if o.core == here {
                local.push(o.conn);
            } else {
                self.poke(o.core, o.conn);
            }
        }
        local
    }

    /// Tells core `core` that connection `conn` has frames.
    pub fn poke(&self, core: usize, conn: u64) {
        let Some(inbox) = self.inboxes.get(core) else {
            return;
        };
        inbox
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        if !inbox.poked.swap(true, Ordering::AcqRel) {
            (self.wake_core)(core);
        }
    }

    /// The connections of `core` poked since the last call.
    pub fn take_poked(&self, core: usize) -> Vec<u64> {
        let Some(inbox) = self.inboxes.get(core) else {
            return Vec::new();
        };
        if !inbox.poked.load(Ordering::Acquire) {
            return Vec::new();
        }
        inbox.poked.store(false, Ordering::Release);
        std::mem::take(&mut *inbox.conns.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn hub(cores: usize) -> (Hub, Arc<AtomicUsize>) {
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        let hub = Hub::new(
            cores,
            Box::new(move |_| {
                w.fetch_add(1, Ordering::Relaxed);
            }),
        );
        (hub, woken)
    }

    fn events(o: &Outbox) -> Vec<String> {
        std::iter::from_fn(|| o.pop())
            .map(|f| match f {
                Outgoing::Event { payload, .. } => payload.to_string(),
                Outgoing::Frame(f) => f,
            })
            .collect()
    }

    #[test]
    fn a_batch_takes_queued_frames_in_order_numbering_the_events() {
        let o = Outbox::new(0, 1, 1 << 20);
        o.push(Outgoing::Frame("{\"type\":\"res\"}".into()));
        for n in 0..3 {
            o.push(Outgoing::Event {
                name: Arc::from("agent"),
                payload: Arc::from(format!("{{\"n\":{n}}}")),
            });
        }
        let (mut seq, mut out) = (7, Vec::new());
        assert_eq!(o.pop_batch(&mut seq, 1 << 20, &mut out), 4);
        assert_eq!(seq, 10);
        assert_eq!(out[0], "{\"type\":\"res\"}");
        for (i, text) in out[1..].iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(v["payload"]["n"], i as u64);
            assert_eq!(v["seq"], 8 + i as u64);
        }
        assert_eq!(o.bytes(), 0);
        assert_eq!(o.pop_batch(&mut seq, 1 << 20, &mut out), 0);
    }

    #[test]
    fn a_batch_ends_past_its_byte_limit_and_leaves_the_rest_queued() {
        let o = Outbox::new(0, 1, 1 << 20);
        for n in 0..10 {
            o.push(Outgoing::Frame(format!("{n:0>100}")));
        }
        let (mut seq, mut out) = (0, Vec::new());
        // The frame that reaches the limit is the last one taken.
        assert_eq!(o.pop_batch(&mut seq, 250, &mut out), 3);
        assert_eq!(o.bytes(), 700);
        // A limit smaller than one frame still takes one.
        assert_eq!(o.pop_batch(&mut seq, 1, &mut out), 1);
        assert_eq!(out.len(), 4);
        assert!(out[3].ends_with('3'));
        assert_eq!(seq, 0);
    }

    #[test]
    fn events_reach_every_connection_of_the_user_and_no_other() {
        let (hub, woken) = hub(2);
        let a0 = Arc::new(Outbox::new(0, 1, 1 << 20));
        let a1 = Arc::new(Outbox::new(1, 2, 1 << 20));
        let b0 = Arc::new(Outbox::new(0, 3, 1 << 20));
        hub.join("alice", a0.clone());
        hub.join("alice", a1.clone());
        hub.join("bob", b0.clone());
        let local = hub.publish("alice", "agent", "{\"n\":1}", 0);
        assert_eq!(local, vec![1]);
        assert_eq!(events(&a0), vec!["{\"n\":1}"]);
        assert_eq!(events(&a1), vec!["{\"n\":1}"]);
        assert!(events(&b0).is_empty());
        // Core 1 was poked once and learns which connection.
        assert_eq!(woken.load(Ordering::Relaxed), 1);
        assert_eq!(hub.take_poked(1), vec![2]);
        assert!(hub.take_poked(1).is_empty());
        // A user whose id is a prefix of another's gets nothing of it.
        hub.publish("alic", "agent", "{}", 0);
        assert!(events(&a0).is_empty());
        assert_eq!((hub.connections(), hub.users_connected()), (3, 2));
        hub.leave("alice", &a1);
        assert_eq!(hub.connections_of("alice"), 1);
        assert_eq!((hub.connections(), hub.users_connected()), (2, 2));
        hub.publish("alice", "agent", "{}", 0);
        assert!(events(&a1).is_empty(), "a closed outbox takes nothing");
    }

    #[test]
    fn a_client_that_does_not_read_overflows_instead_of_growing() {
        let o = Outbox::new(0, 1, 1000);
        let mut pushed = 0;
        while o.push(Outgoing::Frame("x".repeat(100))) {
            pushed += 1;
            assert!(pushed < 100);
        }
        assert!(o.overflowed());
        assert_eq!(o.bytes(), 0, "what was queued is dropped");
        assert!(!o.push(Outgoing::Frame("x".into())));

        // A single frame larger than the limit still goes to a client that reads.
        let o = Outbox::new(0, 1, 1000);
        assert!(o.push(Outgoing::Frame("y".repeat(5000))));
        assert!(!o.overflowed());
        assert!(!o.push(Outgoing::Frame("z".into())));
        assert!(o.overflowed());
    }
}
