//! A lane owner's view of its lane in every worker segment: it produces requests, consumes
//! responses, matches them to waiting callers, and recovers the lane after the worker died.
//!
//! This is synchronous and runtime-agnostic: a gateway core drives it from glommio tasks, the
//! in-process lane from a plain thread. Completions are oneshot channels, which both can await.
//!
//! Everything read from a worker is hostile: frames are copied out of shared memory before they
//! are checked, a structural violation (corrupt ring, undecodable frame, unknown request id)
//! stops all use of the lane and asks the monitor to kill the worker; the lane is reset when the
//! monitor has reaped it (see [`LaneClient::poll`]).

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use moltbot_ipc::wake::{announce_park, cancel_park, futex_unpark, wake_needed};
use moltbot_ipc::{AlignedBuf, Consumer, Header, Kind, Method, Producer, Request, RingError};

use crate::error::RouteError;
use crate::pool::admission::Permit;
use crate::pool::slot::{Slot, SlotState};

/// The answer a caller receives.
pub type Outcome = Result<Reply, RouteError>;

/// Where a caller's answer is sent.
pub type Completion = oneshot::Sender<Outcome>;

/// A worker's answer, validated, in a private copy of its frame.
#[derive(Debug)]
pub struct Reply {
    /// The slot that answered.
    pub slot: usize,
    /// HTTP-style status from the handler (100..=599).
    pub status: u16,
    /// The handler's error code (`""` on success); `[A-Z0-9_:.-]`, at most 64 bytes.
    pub error_code: String,
    /// Handler time in microseconds.
    pub duration_us: u64,
    frame: AlignedBuf,
    body: Range<usize>,
}

impl Reply {
    /// The payload.
    pub fn body(&self) -> &[u8] {
        &self.frame.as_slice()[self.body.clone()]
    }

    /// True for 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// What a caller sends.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// Request kind.
    pub kind: Kind,
    /// Method it came with.
    pub method: Method,
    /// Validated user id.
    pub user_id: &'a str,
    /// Kind-specific target.
    pub path: &'a str,
    /// Forwarded headers.
    pub headers: &'a [Header<'a>],
    /// Payload.
    pub body: &'a [u8],
    /// Deadline on the monotonic clock in µs (0 = none).
    pub deadline_us: u64,
}

/// Why a request could not be placed in the ring.
#[derive(Debug)]
pub enum SubmitError {
    /// No room right now (or the lane is being recovered): retry until the deadline.
    Full(Completion, Permit),
    /// It can never fit.
    TooLarge(usize, usize),
}

struct Pending {
    /// Taken when the caller was answered early (its deadline passed): the request still
    /// occupies the worker, so the entry and its permit stay until the worker answers.
    tx: Option<Completion>,
    permit: Permit,
    /// Monotonic µs after which the caller gets `TIMEOUT` (0: never).
    deadline_us: u64,
}

impl Pending {
    /// Frees the admission permit, then answers the caller. In this order because a caller
    /// may send its next request the moment it has the answer: that request must find the
    /// permit free, or a sequential client would be queued (or, with a full queue, refused)
    /// because of its own previous request.
    fn complete(self, outcome: Outcome) {
        let Pending { tx, permit, .. } = self;
        drop(permit);
        if let Some(tx) = tx {
            let _ = tx.send(outcome);
        }
    }
}

struct Outstanding {
    /// Ring position just past the request's frame.
    end: u64,
    request_id: u64,
}

/// Longest error code accepted from a worker.
const MAX_ERROR_CODE: usize = 64;

/// One slot's lane, seen from its owner.
pub struct LaneClient {
    slot: Arc<Slot>,
    lane: usize,
    req: Producer,
    resp: Consumer,
    pending: HashMap<u64, Pending>,
    outstanding: VecDeque<Outstanding>,
    next_id: u64,
    seen_epoch: u64,
    /// A protocol violation was seen: the lane is not touched until the worker is gone.
    poisoned: bool,
    /// Inside `recover`: the worker is already dead, violations need no kill.
    recovering: bool,
    /// Wake the worker later, in [`LaneSet::flush_wakes`], instead of at each submit.
    defer_wakes: bool,
    /// A request was submitted since the last flush.
    wake_due: bool,
}

impl LaneClient {
    /// Attaches to `lane` of `slot`'s segment as its owner.
    pub fn new(slot: Arc<Slot>, lane: usize) -> Result<LaneClient, RingError> {
        let seg = &slot.segment;
        let l = lane as u32;
        let req_ring = seg
            .request_ring(l)
            .ok_or(RingError::Corrupt("lane out of range"))?;
        let resp_ring = seg
            .response_ring(l)
            .ok_or(RingError::Corrupt("lane out of range"))?;
        let req = Producer::attach(req_ring)?;
        let resp = Consumer::attach(resp_ring)?;
        let seen_epoch = slot.epoch.load(Ordering::Acquire);
        Ok(LaneClient {
            slot,
            lane,
            req,
            resp,
            pending: HashMap::new(),
            outstanding: VecDeque::new(),
            next_id: 1,
            seen_epoch,
            poisoned: false,
            recovering: false,
            defer_wakes: false,
            wake_due: false,
        })
    }

    /// The slot.
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }

    /// Requests waiting for an answer on this lane.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The largest body a request with this much other data can carry.
    pub fn max_payload(&self) -> usize {
        self.req.ring().max_payload()
    }

    /// Places a request in the ring and wakes the worker if it sleeps. The permit is held until
    /// the request is answered.
    pub fn submit(
        &mut self,
        out: &Outgoing<'_>,
        tx: Completion,
        permit: Permit,
    ) -> Result<(), SubmitError> {
        if self.poisoned || self.slot.epoch.load(Ordering::Acquire) != self.seen_epoch {
            // Recovery pending: the owner's next poll handles it; the caller retries.
            return Err(SubmitError::Full(tx, permit));
        }
        let id = self.next_id;
        let req = Request {
            request_id: id,
            deadline_us: out.deadline_us,
            kind: out.kind,
            method: out.method,
            user_id: out.user_id,
            path: out.path,
            headers: out.headers,
            body: out.body,
        };
        let bound = req.encoded_len_bound();
        match self.req.push_with(bound, |slot| req.encode_into(slot)) {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(RingError::TooLarge { .. }) => {
                return Err(SubmitError::TooLarge(bound, self.max_payload()));
            }
            Err(RingError::Full) => return Err(SubmitError::Full(tx, permit)),
            Err(RingError::Corrupt(why)) => {
                self.poison(why);
                return Err(SubmitError::Full(tx, permit));
            }
        }
        self.next_id += 1;
        self.outstanding.push_back(Outstanding {
            end: self.req.position(),
            request_id: id,
        });
        self.pending.insert(
            id,
            Pending {
                tx: Some(tx),
                permit,
                deadline_us: out.deadline_us,
            },
        );
        if self.defer_wakes {
            self.wake_due = true;
        } else {
            self.wake_worker();
        }
        Ok(())
    }

    /// Wakes the worker if it sleeps.
    fn wake_worker(&mut self) {
        self.wake_due = false;
        let parked = self.slot.segment.worker_parked();
        if wake_needed(parked) {
            futex_unpark(parked);
        }
    }

    /// Delivers the answers that arrived and handles a crash epoch. Returns true if it did
    /// anything.
    pub fn poll(&mut self) -> bool {
        let epoch = self.slot.epoch.load(Ordering::Acquire);
        if epoch != self.seen_epoch {
            self.recover(epoch);
            return true;
        }
        if self.poisoned {
            return false;
        }
        self.drain_responses().unwrap_or(true)
    }

    /// Announces that the owner is about to sleep (the worker then wakes it after its next
    /// response on this lane).
    pub fn announce_park(&self) {
        announce_park(self.resp.ring().parked_flag());
    }

    /// Withdraws [`LaneClient::announce_park`].
    pub fn cancel_park(&self) {
        cancel_park(self.resp.ring().parked_flag());
    }

    /// True if responses wait or a recovery is due (checked after announcing a park).
    pub fn has_work(&mut self) -> bool {
        if self.slot.epoch.load(Ordering::Acquire) != self.seen_epoch {
            return true;
        }
        if self.poisoned {
            return false;
        }
        // A ring that reads as corrupt is work too: the next poll handles it.
        self.resp.has_data().unwrap_or(true)
    }

    /// Reads every published response. `Err` means the ring was found corrupt.
    fn drain_responses(&mut self) -> Result<bool, ()> {
        let mut worked = false;
        loop {
            match self.resp.peek() {
                Ok(None) => return Ok(worked),
                Ok(Some(f)) => {
                    let mut buf = AlignedBuf::with_capacity(f.len);
                    self.resp.copy_frame(&f, &mut buf);
                    self.resp.release(f);
                    worked = true;
                    if let Err(why) = self.deliver(buf) {
                        self.poison(why);
                        return Err(());
                    }
                }
                Err(RingError::Corrupt(why)) => {
                    self.poison(why);
                    return Err(());
                }
                Err(_) => return Ok(worked),
            }
        }
    }

    /// Matches a response to its caller.
    fn deliver(&mut self, frame: AlignedBuf) -> Result<(), &'static str> {
        let a = moltbot_ipc::access_response(frame.as_slice())
            .map_err(|_| "undecodable response frame")?;
        let id = a.request_id.to_native();
        let pending = self
            .pending
            .remove(&id)
            .ok_or("response to an unknown request id")?;
        let status = a.status.to_native();
        let duration_us = a.duration_us.to_native();
        let code: &str = &a.error_code;
        let base = frame.as_slice().as_ptr() as usize;
        let body_start = a.body.as_ptr() as usize - base;
        let body = body_start..body_start + a.body.len();
        let stats = &self.slot.stats;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let outcome = if !(100..=599).contains(&status) {
            Err(RouteError::BadWorkerResponse {
                slot: self.slot.id,
                reason: format!("status {status}"),
            })
        } else if code.len() > MAX_ERROR_CODE
            || !code
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_:.-".contains(&b))
        {
            Err(RouteError::BadWorkerResponse {
                slot: self.slot.id,
                reason: "malformed error code".into(),
            })
        } else {
            Ok(Reply {
                slot: self.slot.id,
                status,
                error_code: code.to_string(),
                duration_us,
                frame,
                body,
            })
        };
        if !matches!(&outcome, Ok(r) if r.is_success()) {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        pending.complete(outcome);
        self.prune_outstanding();
        Ok(())
    }

    /// Drops bookkeeping of requests already answered from the front of the ring order.
    fn prune_outstanding(&mut self) {
        while let Some(front) = self.outstanding.front() {
            if self.pending.contains_key(&front.request_id) {
                break;
            }
            self.outstanding.pop_front();
        }
    }

    fn fail(&mut self, id: u64, err: RouteError) {
        if let Some(p) = self.pending.remove(&id) {
            self.slot.stats.errors.fetch_add(1, Ordering::Relaxed);
            p.complete(Err(err));
        }
    }

    fn poison(&mut self, why: &'static str) {
        if !self.poisoned {
            self.poisoned = true;
            if self.recovering {
                tracing::warn!(worker = %self.slot.worker_id, lane = self.lane, "dead worker left a bad frame: {why}");
                return;
            }
            tracing::error!(
                worker = %self.slot.worker_id,
                lane = self.lane,
                "protocol violation: {why}; killing the worker"
            );
            self.slot.request_kill(why);
        }
    }

    /// The worker of the previous epoch is gone (reaped by the monitor) or the slot failed:
    /// answers what it had finished, fails what it had taken, keeps what it never read for its
    /// successor (or fails everything if the slot failed or the ring is unusable), then
    /// acknowledges the epoch so that the monitor may start the successor.
    fn recover(&mut self, epoch: u64) {
        let slot_id = self.slot.id;
        let crashed = RouteError::WorkerCrashed { slot: slot_id };
        self.recovering = true;
        // 1. Answers the dead worker completed. After a violation the response ring is
        // untrusted and dropped unread.
        if self.poisoned || self.drain_responses().is_err() {
            self.resp.reset_producer();
        }
        // 2. What it had taken, and what it never read. Taken requests get WORKER_CRASHED
        // even when this crash failed the slot: the worker may have acted on them, so they must
        // not be reported as never handled (UNAVAILABLE invites a retry of a non-idempotent
        // request). Only what it never read is refused with UNAVAILABLE when the slot failed.
        let failed = self.slot.state() == SlotState::Failed;
        let unavailable = RouteError::Unavailable {
            slot: slot_id,
            reason: "worker failed: restart limit reached".into(),
            retry_after: self.slot.retry_after(),
        };
        match self.req.peer_positions().ok() {
            Some((head, claimed)) => {
                let taken_until = claimed.max(head);
                let doomed: Vec<u64> = self
                    .outstanding
                    .iter()
                    .filter(|o| o.end <= taken_until)
                    .map(|o| o.request_id)
                    .collect();
                for id in doomed {
                    self.fail(id, crashed.clone());
                }
                if failed {
                    self.discard_all(unavailable);
                } else if self.req.discard_until(taken_until).is_err() {
                    self.discard_all(crashed.clone());
                }
            }
            None => {
                let err = if failed { unavailable } else { crashed };
                self.discard_all(err);
            }
        }
        self.prune_outstanding();
        self.poisoned = false;
        self.recovering = false;
        self.seen_epoch = epoch;
        self.slot.ack_epoch(self.lane, epoch);
    }

    fn discard_all(&mut self, err: RouteError) {
        let end = self.req.position();
        // Only fails when the ring's own positions are inconsistent, which the producer's
        // local state rules out; the pending requests are failed either way.
        let _ = self.req.discard_until(end);
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in ids {
            self.fail(id, err.clone());
        }
        self.outstanding.clear();
    }

    /// Fails every pending request (the pool is stopping).
    pub fn fail_all(&mut self, err: RouteError) {
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in ids {
            self.fail(id, err.clone());
        }
        self.outstanding.clear();
    }

    /// Answers `TIMEOUT` to the callers whose deadline passed by `now_us`. Their requests
    /// keep their place (and permit) until the worker answers or dies. Returns the earliest
    /// deadline still ahead (0: none).
    pub fn expire(&mut self, now_us: u64, timeout: std::time::Duration) -> u64 {
        let mut next = 0u64;
        for p in self.pending.values_mut() {
            if p.tx.is_none() || p.deadline_us == 0 {
                continue;
            }
            if p.deadline_us <= now_us {
                if let Some(tx) = p.tx.take() {
                    self.slot.stats.errors.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(Err(RouteError::Timeout(timeout)));
                }
            } else if next == 0 || p.deadline_us < next {
                next = p.deadline_us;
            }
        }
        next
    }
}

/// All lanes of one owner: its lane in every slot.
pub struct LaneSet {
    lanes: Vec<LaneClient>,
}

impl LaneSet {
    /// Attaches to `lane` in each of `slots`.
    pub fn new(slots: &[Arc<Slot>], lane: usize) -> Result<LaneSet, RingError> {
        let lanes = slots
            .iter()
            .map(|s| LaneClient::new(s.clone(), lane))
            .collect::<Result<_, _>>()?;
        Ok(LaneSet { lanes })
    }

    /// Defers worker wake-ups to [`LaneSet::flush_wakes`]: a gateway core submits all the
    /// requests of one reactor round, then wakes each worker once. Waking at every submit
    /// would let the scheduler switch to the worker for each request (the costliest part of
    /// the hop when gateway and workers share CPUs).
    pub fn set_defer_wakes(&mut self, defer: bool) {
        for l in &mut self.lanes {
            l.defer_wakes = defer;
        }
    }

    /// Wakes the workers that were sent requests since the last flush (if they sleep).
    /// Returns true if any request was waiting for a wake.
    pub fn flush_wakes(&mut self) -> bool {
        let mut any = false;
        for l in &mut self.lanes {
            if l.wake_due {
                any = true;
                l.wake_worker();
            }
        }
        any
    }

    /// The lane to slot `slot`.
    pub fn get_mut(&mut self, slot: usize) -> Option<&mut LaneClient> {
        self.lanes.get_mut(slot)
    }

    /// Polls every lane; true if any did work.
    pub fn poll(&mut self) -> bool {
        let mut worked = false;
        for l in &mut self.lanes {
            worked |= l.poll();
        }
        worked
    }

    /// Announces a park on every lane, then checks once more. Returns false (and withdraws the
    /// announcement) if there is work after all; true means: sleep until woken.
    pub fn prepare_park(&mut self) -> bool {
        for l in &self.lanes {
            l.announce_park();
        }
        if self.lanes.iter_mut().any(|l| l.has_work()) {
            self.cancel_park();
            return false;
        }
        true
    }

    /// Withdraws the park announcement on every lane.
    pub fn cancel_park(&self) {
        for l in &self.lanes {
            l.cancel_park();
        }
    }

    /// Requests waiting for answers on all lanes.
    pub fn pending(&self) -> usize {
        self.lanes.iter().map(|l| l.pending()).sum()
    }

    /// Fails everything pending (pool stop).
    pub fn fail_all(&mut self, err: RouteError) {
        for l in &mut self.lanes {
            l.fail_all(err.clone());
        }
    }

    /// Answers `TIMEOUT` to every caller whose deadline passed; returns the earliest deadline
    /// still ahead (monotonic µs, 0: none).
    pub fn expire(&mut self, now_us: u64, timeout: std::time::Duration) -> u64 {
        let mut next = 0u64;
        for l in &mut self.lanes {
            let n = l.expire(now_us, timeout);
            if n != 0 && (next == 0 || n < next) {
                next = n;
            }
        }
        next
    }
}
