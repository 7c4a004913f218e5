//! A lane owner's view of its lane in every worker segment: it produces requests, consumes
//! responses, matches them to waiting callers, and recovers the lane after the worker died.
//!
//! This is synchronous and runtime-agnostic: a gateway core drives it from glommio tasks, the
//! in-process lane from a plain thread. Answers go to each request's [`Replies`], which both
//! can await.
//!
//! Everything read from a worker is hostile: frames are copied out of shared memory before they
//! are checked, a structural violation (corrupt ring, undecodable frame, unknown request id)
//! stops all use of the lane and asks the monitor to kill the worker; the lane is reset when the
//! monitor has reaped it (see [`LaneClient::poll`]).

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use moltbot_ipc::wake::{announce_park, cancel_park, futex_unpark, wake_needed};
use moltbot_ipc::{
    AlignedBuf, Consumer, GatewayLane, Kind, Part, Producer, Request, RingError, TakeError,
};

use crate::error::RouteError;
use crate::pool::admission::Permit;
use crate::pool::call::Call;
use crate::pool::reply::{MAX_QUEUED_PART_BYTES, Outcome, Replies, Reply, ReplyTo, reply_pair};
use crate::pool::slot::{Slot, SlotState};

/// Why a request could not be placed in the ring.
#[derive(Debug)]
pub enum Refused {
    /// No room right now (or the lane is being recovered): retry until the deadline. The
    /// permit comes back for the retry.
    Full(Permit),
    /// It can never fit: the request needs `len` bytes, a frame carries at most `max`.
    TooLarge {
        /// Bytes the encoded request needs (an upper bound).
        len: usize,
        /// Most bytes a frame carries.
        max: usize,
    },
}

struct Pending {
    /// Taken when the caller was answered early (its deadline passed): the request still
    /// occupies the worker, so the entry and its permit stay until the worker answers.
    reply: Option<ReplyTo>,
    permit: Permit,
    /// Monotonic µs after which the caller gets `TIMEOUT` (0: never).
    deadline_us: u64,
    /// The request was sent with `stream`: interim parts may precede the final answer.
    stream: bool,
    /// Every body of the answer must be JSON (an RPC request: the gateway forwards them into
    /// JSON frames).
    json: bool,
    /// The caller's tally of the answer bytes it holds ([`Call::held`]).
    held: Option<Arc<AtomicUsize>>,
}

impl Pending {
    /// Frees the admission permit, then answers the caller. In this order because a caller
    /// may send its next request the moment it has the answer: that request must find the
    /// permit free, or a sequential client would be queued (or, with a full queue, refused)
    /// because of its own previous request.
    fn complete(self, outcome: Outcome) {
        let Pending { reply, permit, .. } = self;
        drop(permit);
        if let Some(reply) = reply {
            reply.finish(outcome);
        }
    }
}

struct Outstanding {
    /// Ring position where the frame before this request's ended (its frame, or a padding
    /// frame before it, starts there).
    start: u64,
    /// Ring position just past the request's frame.
    end: u64,
    request_id: u64,
}

/// An interim part's fields, taken out of its frame.
struct PartFields {
    request_id: u64,
    status: u16,
    duration_us: u64,
    part: Part,
    event: String,
    body: Range<usize>,
}

/// Longest error code accepted from a worker.
const MAX_ERROR_CODE: usize = 64;

/// Most response frames one poll of a lane reads: then the core's other tasks run before the
/// next poll (more than a round's worth of answers of its places, few enough that a flood
/// holds the core for well under a millisecond).
const DRAIN_BUDGET: usize = 256;

/// A worker's response frame, decoded and located: the fields the gateway reads from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedResponse<'a> {
    /// The id of the request it answers (matched against the lane's pending requests).
    pub request_id: u64,
    /// The handler's status, unchecked (see [`DecodedResponse::check_fields`]).
    pub status: u16,
    /// The handler's error code, unchecked.
    pub error_code: &'a str,
    /// Handler time in microseconds.
    pub duration_us: u64,
    /// Which part of the answer the frame is.
    pub part: Part,
    /// The event name, unchecked.
    pub event: &'a str,
    /// Where the body lies in the frame.
    pub body: Range<usize>,
}

/// Decodes a response frame (a private, 16-byte aligned copy of a ring frame) with bytecheck.
/// `Err` is a protocol violation: the lane is poisoned and the worker killed.
///
/// Public so that the fuzz target `response_frame` drives exactly the gateway's decoding.
pub fn decode_response(frame: &[u8]) -> Result<DecodedResponse<'_>, &'static str> {
    let a = moltbot_ipc::access_response(frame).map_err(|_| "undecodable response frame")?;
    // bytecheck keeps the body inside `frame`; computed without trusting that, so a bytecheck
    // gap would be a violation here instead of an out-of-range slice in `Reply::body`.
    let body_start = (a.body.as_ptr() as usize)
        .checked_sub(frame.as_ptr() as usize)
        .filter(|&start| {
            frame
                .len()
                .checked_sub(start)
                .is_some_and(|room| room >= a.body.len())
        })
        .ok_or("response body outside its frame")?;
    Ok(DecodedResponse {
        request_id: a.request_id.to_native(),
        status: a.status.to_native(),
        error_code: &a.error_code,
        duration_us: a.duration_us.to_native(),
        part: a.part.to_native(),
        event: &a.event,
        body: body_start..body_start + a.body.len(),
    })
}

impl DecodedResponse<'_> {
    /// The checks of a well-framed response's fields: a final status in 200..=599 (a 1xx is
    /// an interim answer in HTTP: a client would wait on for the final one and take the next
    /// request's answer for it) and an error code of at most 64 bytes of `[A-Za-z0-9_:.-]`. `Err(reason)` answers that request's caller
    /// with `BAD_WORKER_RESPONSE` (the frame itself was fine: the lane stays usable).
    pub fn check_fields(&self) -> Result<(), String> {
        if !(200..=599).contains(&self.status) {
            return Err(format!("status {}", self.status));
        }
        let code = self.error_code;
        if !is_token(code, MAX_ERROR_CODE) {
            return Err("malformed error code".into());
        }
        Ok(())
    }

    /// The checks of an interim part: `Err` is a protocol violation (the worker is killed), as
    /// the caller could not be answered truthfully otherwise. An event has a name of 1 to 64
    /// bytes of `[A-Za-z0-9_:.-]`; an `accepted` part has none.
    pub fn check_part(&self) -> Result<(), &'static str> {
        match self.part {
            Part::Final => Ok(()),
            Part::Accepted if self.event.is_empty() => Ok(()),
            Part::Accepted => Err("an accepted answer with an event name"),
            Part::Event if !self.event.is_empty() && is_token(self.event, MAX_ERROR_CODE) => Ok(()),
            Part::Event => Err("an event with a malformed name"),
        }
    }
}

/// Whether `s` is at most `max` bytes of `[A-Za-z0-9_:.-]`.
fn is_token(s: &str, max: usize) -> bool {
    s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_:.-".contains(&b))
}

/// Whether `body` is one JSON value.
fn is_json(body: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

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
    /// Wake-up bytes the worker may still send on its wake socket: one for each of this
    /// owner's park announcements that it cleared (the only time an honest worker writes one),
    /// minus the bytes received. An honest worker keeps it at -1 or above (its byte may arrive
    /// before the owner withdraws the announcement and sees it cleared); below that it is
    /// flooding the owner with wake-ups for answers that do not exist. Reset at each recovery.
    wake_credit: i64,
    /// Where a request is encoded before it is copied into the ring (see `submit`).
    scratch: AlignedBuf,
}

/// The wake socket byte that may arrive before [`LaneClient::cancel_park`] credits it.
const WAKE_IN_FLIGHT: i64 = 1;

impl LaneClient {
    /// Takes the gateway's ends of `lane` of `slot`'s segment, as its owner.
    pub fn new(slot: Arc<Slot>, lane: usize) -> Result<LaneClient, TakeError> {
        let l = u32::try_from(lane).unwrap_or(u32::MAX);
        let GatewayLane {
            requests: req,
            responses: resp,
        } = slot.segment.take_gateway_lane(l)?;
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
            wake_credit: 0,
            scratch: AlignedBuf::new(),
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
        self.req.max_payload()
    }

    /// Places a request in the ring and wakes the worker if it sleeps (or leaves that to
    /// [`LaneSet::flush_wakes`]). The permit is held until the request is answered; its
    /// answer (or the error in its place) arrives on the returned [`Replies`], by
    /// `deadline_us` (monotonic µs, 0: none) as far as this lane's owner enforces it.
    pub fn submit(
        &mut self,
        call: &Call<'_>,
        deadline_us: u64,
        permit: Permit,
    ) -> Result<Replies, Refused> {
        if self.poisoned || self.slot.epoch.load(Ordering::Acquire) != self.seen_epoch {
            // Recovery pending: the owner's next poll handles it; the caller retries.
            return Err(Refused::Full(permit));
        }
        let id = self.next_id;
        let req = Request {
            request_id: id,
            deadline_us,
            kind: call.kind,
            method: call.method,
            user_id: call.user,
            stream: call.stream,
            path: call.target,
            call_id: call.call_id,
            body: call.body,
        };
        let bound = req.encoded_len_bound();
        let too_large = Refused::TooLarge {
            len: bound,
            max: self.max_payload(),
        };
        if bound > self.max_payload() {
            return Err(too_large);
        }
        // Encoded privately, then stored into the ring with atomic stores: the worker may
        // write the ring's free space at any time, and a `&mut` to it would be a data race.
        let Ok(used) = req.encode_into(self.scratch.zeroed_mut(bound)) else {
            return Err(too_large);
        };
        self.scratch.truncate(used);
        let start = self.req.position();
        match self.req.push_buf(&self.scratch) {
            Ok(()) => {}
            Err(RingError::TooLarge { .. }) => return Err(too_large),
            Err(RingError::Full) => return Err(Refused::Full(permit)),
            Err(RingError::Corrupt(why)) => {
                self.poison(why);
                return Err(Refused::Full(permit));
            }
        }
        self.next_id += 1;
        self.outstanding.push_back(Outstanding {
            start,
            end: self.req.position(),
            request_id: id,
        });
        let (reply, replies) = reply_pair(call.stream);
        self.pending.insert(
            id,
            Pending {
                reply: Some(reply),
                permit,
                deadline_us,
                stream: call.stream,
                json: call.kind == Kind::Rpc,
                held: call.held.cloned(),
            },
        );
        if self.defer_wakes {
            self.wake_due = true;
        } else {
            self.wake_worker();
        }
        Ok(replies)
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
        announce_park(self.resp.parked_flag());
    }

    /// Withdraws [`LaneClient::announce_park`]. If the worker cleared the announcement, it may
    /// send one wake-up byte for it. (Its answer may be gone by then: a worker that published,
    /// saw an older announcement and was preempted before clearing it clears a newer one, after
    /// the owner read the answer. So a cleared announcement does not prove an answer.)
    pub fn cancel_park(&mut self) {
        if cancel_park(self.resp.parked_flag()) {
            self.wake_credit = self.wake_credit.saturating_add(1);
        }
    }

    /// Accounts for `bytes` read from the wake socket for this lane of the worker that was
    /// running at slot epoch `socket_epoch` (read when the owner took the socket). Returns
    /// false if the owner should stop reading that socket: its worker is gone (the slot moved
    /// to a later epoch: late bytes say nothing about the successor), or the bytes exceed what
    /// the worker was entitled to send, which poisons the lane (the worker is killed).
    pub fn wake_received(&mut self, bytes: usize, socket_epoch: u64) -> bool {
        if self.slot.epoch.load(Ordering::Acquire) != socket_epoch {
            return false;
        }
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.wake_credit = self.wake_credit.saturating_sub(bytes);
        if self.wake_credit < -WAKE_IN_FLIGHT {
            self.wake_credit = 0;
            self.poison("wake-ups without answers (wake socket flood)");
        }
        !self.poisoned
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

    /// Reads the published responses, at most [`DRAIN_BUDGET`] frames: a worker that
    /// publishes as fast as the gateway reads would otherwise keep the core in this loop, and
    /// every other connection of the core waiting. `Err` means the ring was found corrupt.
    fn drain_responses(&mut self) -> Result<bool, ()> {
        let mut worked = false;
        for _ in 0..DRAIN_BUDGET {
            match self.resp.peek() {
                Ok(None) => return Ok(worked),
                Ok(Some(f)) => {
                    let mut buf = AlignedBuf::with_capacity(f.len());
                    f.copy_into(&mut buf);
                    f.release();
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
        Ok(worked)
    }

    /// Matches a response to its caller.
    fn deliver(&mut self, frame: AlignedBuf) -> Result<(), &'static str> {
        let r = decode_response(frame.as_slice())?;
        if r.part != Part::Final {
            r.check_part()?;
            let part = PartFields {
                request_id: r.request_id,
                status: r.status,
                duration_us: r.duration_us,
                part: r.part,
                event: r.event.to_string(),
                body: r.body,
            };
            return self.deliver_part(part, frame);
        }
        let json = match self.pending.get(&r.request_id) {
            Some(p) => p.json,
            None => return Err("response to an unknown request id"),
        };
        if json && !is_json(&frame.as_slice()[r.body.clone()]) {
            return Err("an RPC answer that is not JSON");
        }
        let pending = self
            .pending
            .remove(&r.request_id)
            .ok_or("response to an unknown request id")?;
        let stats = &self.slot.stats;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let outcome = match r.check_fields() {
            Err(reason) => Err(RouteError::BadWorkerResponse {
                slot: self.slot.id,
                reason,
            }),
            Ok(()) => {
                let (status, code, duration_us, body) =
                    (r.status, r.error_code.to_string(), r.duration_us, r.body);
                let reply = Reply::new(self.slot.id, status, code, duration_us, frame, body);
                Ok(match &pending.held {
                    Some(held) => reply.counted_in(held.clone()),
                    None => reply,
                })
            }
        };
        if !matches!(&outcome, Ok(r) if r.is_success()) {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        pending.complete(outcome);
        self.prune_outstanding();
        Ok(())
    }

    /// Hands an interim part to its caller. A part for an id the worker was not given, for a
    /// request that does not stream, with a malformed name, or (for an RPC) a body that is not
    /// JSON is a protocol violation. Events carry no user: they belong to the user of the
    /// request they name, so a worker cannot address another user's connections.
    fn deliver_part(&mut self, p: PartFields, frame: AlignedBuf) -> Result<(), &'static str> {
        let slot = self.slot.id;
        let pending = self
            .pending
            .get_mut(&p.request_id)
            .ok_or("an event for an unknown request id")?;
        if !pending.stream {
            return Err("an event for a request that does not stream");
        }
        if pending.json && !is_json(&frame.as_slice()[p.body.clone()]) {
            return Err("an event whose payload is not JSON");
        }
        if let Some(reply) = &pending.reply {
            let part = Reply::new(slot, p.status, String::new(), p.duration_us, frame, p.body)
                .into_part(p.part, p.event);
            if !reply.part(part) {
                // The caller has not taken what came so far: it is answered now; the request
                // keeps its permit until the worker's own answer, which finds no one to answer.
                if let Some(reply) = pending.reply.take() {
                    reply.finish(Err(RouteError::EventsOverrun {
                        slot,
                        max: MAX_QUEUED_PART_BYTES,
                    }));
                }
            }
        }
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
            self.slot.request_kill(self.seen_epoch, why);
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
        // untrusted and dropped unread. Reset either way (after a full drain it is empty):
        // that also republishes this side's positions, which the dead worker could overwrite
        // without the ring reading as corrupt, and from which its successor attaches.
        if !self.poisoned {
            let _ = self.drain_responses();
        }
        self.resp.reset_producer();
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
                let taken_until = self.taken_until(claimed.max(head));
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
        // The successor starts with a clean account: its predecessor's wake socket is no longer
        // read (its bytes carry an older epoch) and no announcement is outstanding.
        self.wake_credit = 0;
        self.seen_epoch = epoch;
        self.slot.ack_epoch(self.lane, epoch);
    }

    /// The frame boundary up to which a dead worker took the requests, from the position it
    /// claimed: that position itself when it is a boundary, else the end of the frame it
    /// falls in (a worker may have stored anything there; a request it may have taken is
    /// failed rather than given to its successor, and its successor starts on a boundary).
    /// Before the first outstanding request every request was answered: all taken.
    fn taken_until(&self, claimed: u64) -> u64 {
        match self.outstanding.front() {
            None => self.req.position(),
            Some(first) if claimed <= first.start => first.start,
            Some(_) => self
                .outstanding
                .iter()
                .map(|o| o.end)
                .find(|&end| end >= claimed)
                .unwrap_or(self.req.position()),
        }
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
            if p.reply.is_none() || p.deadline_us == 0 {
                continue;
            }
            if p.deadline_us <= now_us {
                if let Some(reply) = p.reply.take() {
                    self.slot.stats.errors.fetch_add(1, Ordering::Relaxed);
                    reply.finish(Err(RouteError::Timeout(timeout)));
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
    /// Takes the gateway's ends of `lane` in each of `slots`.
    pub fn new(slots: &[Arc<Slot>], lane: usize) -> Result<LaneSet, TakeError> {
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
    pub fn cancel_park(&mut self) {
        for l in &mut self.lanes {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::admission::Admission;
    use crate::pool::reply::Delivery;
    use crate::pool::slot::test_slot;
    use moltbot_ipc::Response;
    use std::time::{Duration, Instant};

    fn encoded(resp: &Response<'_>) -> AlignedBuf {
        let mut buf = AlignedBuf::new();
        let n = resp
            .encode_into(buf.zeroed_mut(resp.encoded_len_bound()))
            .unwrap();
        buf.zeroed_mut(n);
        buf
    }

    fn response<'a>(status: u16, error_code: &'a str, body: &'a [u8]) -> Response<'a> {
        Response {
            request_id: 42,
            duration_us: 7,
            status,
            part: Part::Final,
            body,
            error_code,
            event: "",
        }
    }

    /// A streaming RPC request submitted on a fresh lane with rings of `capacity` bytes: the
    /// lane, the worker's end, the caller's replies, the request id (and what must live).
    fn streaming_request(
        capacity: usize,
    ) -> (
        LaneClient,
        moltbot_ipc::WorkerLane,
        Replies,
        u64,
        (Arc<Slot>, moltbot_ipc::wake::WakeReceiver),
    ) {
        let (slot, rx) = crate::pool::slot::test_slot_sized(Admission::new(1, 1), capacity);
        let mut lane = LaneClient::new(slot.clone(), 0).unwrap();
        let mut worker = slot.segment.take_worker_lane(0).unwrap();
        let permit = slot.admission.try_enter().unwrap();
        let call = Call {
            kind: Kind::Rpc,
            method: moltbot_ipc::Method::Post,
            user: "u",
            target: "",
            call_id: "",
            stream: true,
            body: b"{}",
            held: None,
        };
        let Ok(replies) = lane.submit(&call, 0, permit) else {
            panic!("submit refused");
        };
        let f = worker.requests.peek().unwrap().unwrap();
        let id = moltbot_ipc::access_request(f.bytes())
            .unwrap()
            .request_id
            .to_native();
        f.release();
        (lane, worker, replies, id, (slot, rx))
    }

    fn event(id: u64, body: &[u8]) -> AlignedBuf {
        encoded(&Response {
            request_id: id,
            duration_us: 0,
            status: 200,
            part: Part::Event,
            body,
            error_code: "",
            event: "agent",
        })
    }

    /// A worker that publishes faster than the gateway reads cannot keep the core in one
    /// poll: each reads at most `DRAIN_BUDGET` frames, then the core's other tasks run.
    #[test]
    fn a_poll_reads_a_bounded_number_of_frames() {
        let (mut lane, mut worker, _replies, id, _keep) = streaming_request(1 << 20);
        let ev = event(id, b"[]");
        for _ in 0..DRAIN_BUDGET + 10 {
            worker.responses.push(ev.as_slice()).unwrap();
        }
        assert!(lane.poll());
        assert!(lane.has_work(), "one poll read every frame");
        assert!(lane.poll());
        assert!(!lane.has_work());
    }

    /// A caller that leaves more than `MAX_QUEUED_PART_BYTES` of events untaken is answered
    /// `EVENTS_OVERRUN` after the events it had; later ones are dropped, and the worker's own
    /// answer then frees the request's place without an error.
    #[test]
    fn events_the_caller_does_not_take_are_bounded() {
        let (mut lane, mut worker, mut replies, id, keep) = streaming_request(1 << 20);
        let payload = format!("\"{}\"", "e".repeat(60 * 1024));
        let ev = event(id, payload.as_bytes());
        let sent = MAX_QUEUED_PART_BYTES / ev.len() + 20;
        for _ in 0..sent {
            while worker.responses.push(ev.as_slice()).is_err() {
                assert!(lane.poll());
            }
        }
        while lane.has_work() {
            lane.poll();
        }
        let mut parts = 0;
        let end = loop {
            let next = futures_lite::future::poll_once(replies.next());
            match futures_lite::future::block_on(next) {
                Some(Delivery::Part(_)) => parts += 1,
                Some(Delivery::Final(outcome)) => break outcome,
                None => panic!("{parts} events and no answer"),
            }
        };
        assert_eq!(parts, MAX_QUEUED_PART_BYTES / ev.len());
        let Err(e) = end else {
            panic!("answered without an error");
        };
        assert_eq!(e.code(), "EVENTS_OVERRUN");
        // The request still holds the worker's one place until the worker's answer, which
        // frees it and is otherwise dropped.
        assert!(keep.0.admission.try_enter().is_none());
        let fin = encoded(&Response {
            request_id: id,
            ..response(200, "", b"{}")
        });
        worker.responses.push(fin.as_slice()).unwrap();
        assert!(lane.poll());
        assert!(!lane.poisoned);
        assert!(keep.0.admission.try_enter().is_some());
    }

    /// A dead worker that stored a `claimed` position inside a frame: the request of that
    /// frame counts as taken (failed, not given to the successor), and the successor starts on
    /// the next frame boundary, where it reads the request the dead worker never saw.
    #[test]
    fn a_claimed_position_inside_a_frame_counts_that_frame_as_taken() {
        let (slot, _rx) = test_slot(Admission::new(4, 4));
        let seg = slot.segment.clone();
        let mut lane = LaneClient::new(slot.clone(), 0).unwrap();
        let body = [b'b'; 200];
        let mut replies = Vec::new();
        for _ in 0..3 {
            let call = Call {
                kind: Kind::Echo,
                method: moltbot_ipc::Method::Post,
                user: "u",
                target: "",
                call_id: "",
                stream: false,
                body: &body,
                held: None,
            };
            let permit = slot.admission.try_enter().unwrap();
            let Ok(r) = lane.submit(&call, 0, permit) else {
                panic!("submit refused");
            };
            replies.push(r);
        }
        let (first, second) = (&lane.outstanding[0], &lane.outstanding[1]);
        assert_eq!(first.end, second.start);
        let inside_second = second.start + 32;
        assert!(inside_second < second.end);
        // The worker takes the first request, stores a position inside the second, and dies.
        {
            let mut worker = seg.take_worker_lane(0).unwrap();
            worker.requests.peek().unwrap().unwrap().claim();
        }
        lane.req.tamper().unwrap().set_claimed(inside_second);
        slot.epoch.fetch_add(1, Ordering::AcqRel);
        assert!(lane.poll());
        let outcomes: Vec<_> = replies
            .into_iter()
            .take(2)
            .map(|r| r.outcome_by(Instant::now(), Duration::ZERO))
            .collect();
        for o in outcomes {
            assert_eq!(o.map(|_| ()), Err(RouteError::WorkerCrashed { slot: 0 }));
        }
        // The successor reads the third request, whole.
        let mut worker = seg.take_worker_lane(0).expect("a successor attaches");
        let f = worker
            .requests
            .peek()
            .expect("a ring the successor can read")
            .unwrap();
        let req = moltbot_ipc::access_request(f.bytes()).unwrap();
        assert_eq!(req.request_id.to_native(), 3);
        assert_eq!(&req.body[..], &body[..]);
    }

    #[test]
    fn recovery_republishes_the_positions_a_dead_worker_overwrote() {
        // Found by the fuzz target `response_frame`: a worker that stored garbage into the
        // gateway-owned positions (response ring `head`, request ring `tail`) before dying made
        // every successor fail to attach (a crash loop into `failed`).
        let (slot, _rx) = test_slot(Admission::new(4, 4));
        let seg = slot.segment.clone();
        let mut lane = LaneClient::new(slot.clone(), 0).unwrap();
        // The worker, in another process, stores garbage into the gateway's positions; played
        // here through the gateway's own ends while no worker end is taken in this process.
        lane.resp.tamper().unwrap().set_head(255);
        lane.req.tamper().unwrap().set_tail(u64::MAX);
        assert!(seg.take_worker_lane(0).is_err());
        // The worker died; the monitor bumped the epoch.
        slot.epoch.fetch_add(1, Ordering::AcqRel);
        assert!(lane.poll());
        // The successor attaches: the positions it reads make a valid ring.
        let mut worker = seg.take_worker_lane(0).expect("a successor attaches");
        assert!(!worker.requests.has_data().unwrap());
        worker.responses.push(b"x").unwrap();
    }

    #[test]
    fn wake_ups_are_counted_against_the_announcements_the_worker_took() {
        let (slot, _rx) = test_slot(Admission::new(4, 4));
        let mut lane = LaneClient::new(slot.clone(), 0).unwrap();
        // The owner's announcement, as the worker sees it.
        let worker = slot.segment.take_worker_lane(0).unwrap();
        let resp = &worker.responses;
        // An honest round: the owner announces, the worker takes it and sends one byte, which
        // may arrive before or after the owner withdraws the announcement.
        for byte_first in [true, false] {
            lane.announce_park();
            assert!(
                wake_needed(resp.parked_flag()),
                "the worker takes the announcement"
            );
            if byte_first {
                assert!(lane.wake_received(1, 0));
                lane.cancel_park();
            } else {
                lane.cancel_park();
                assert!(lane.wake_received(1, 0));
            }
        }
        // An announcement nobody took allows nothing; one byte may be in flight.
        lane.announce_park();
        lane.cancel_park();
        assert!(lane.wake_received(1, 0));
        assert_eq!(slot.take_kill_request(), None);
        // The worker died with that byte uncredited: late bytes of its socket are dropped, and
        // its successor's account starts at zero, not at its predecessor's -1.
        slot.epoch.fetch_add(1, Ordering::AcqRel);
        assert!(!lane.wake_received(1000, 0), "stop reading the old socket");
        assert!(lane.poll(), "recovery");
        assert!(lane.wake_received(1, 1));
        assert_eq!(slot.take_kill_request(), None);
        // A second byte without an announcement taken: a flood, and the worker is killed.
        assert!(!lane.wake_received(1, 1));
        assert!(
            slot.take_kill_request()
                .is_some_and(|r| r.contains("flood"))
        );
    }

    #[test]
    fn decode_response_locates_fields_and_body() {
        let frame = encoded(&response(201, "", b"hello body"));
        let r = decode_response(frame.as_slice()).unwrap();
        assert_eq!((r.request_id, r.status, r.duration_us), (42, 201, 7));
        assert_eq!(r.error_code, "");
        assert_eq!(&frame.as_slice()[r.body.clone()], b"hello body");
        assert_eq!(r.check_fields(), Ok(()));

        let frame = encoded(&response(200, "", b""));
        let r = decode_response(frame.as_slice()).unwrap();
        assert!(r.body.is_empty() && r.body.end <= frame.len());
    }

    #[test]
    fn decode_response_refuses_garbage_and_truncation() {
        let frame = encoded(&response(200, "OK_CODE", &[9; 100]));
        for len in [0, 1, 16, frame.len() - 16] {
            assert!(decode_response(&frame.as_slice()[..len]).is_err(), "{len}");
        }
        let mut junk = AlignedBuf::new();
        for (i, b) in junk.zeroed_mut(256).iter_mut().enumerate() {
            *b = (i * 37 % 253) as u8;
        }
        assert!(decode_response(junk.as_slice()).is_err());
    }

    #[test]
    fn check_fields_bounds_status_and_error_code() {
        fn ok(status: u16, code: &str) -> Result<(), String> {
            let frame = encoded(&response(status, code, b""));
            let r = decode_response(frame.as_slice()).unwrap();
            r.check_fields()
        }
        assert_eq!(ok(200, ""), Ok(()));
        assert_eq!(ok(599, "A-z_0:9."), Ok(()));
        assert_eq!(ok(99, ""), Err("status 99".into()));
        assert_eq!(ok(100, ""), Err("status 100".into()));
        assert_eq!(ok(199, ""), Err("status 199".into()));
        assert_eq!(ok(600, ""), Err("status 600".into()));
        assert_eq!(ok(500, &"E".repeat(64)), Ok(()));
        assert!(ok(500, &"E".repeat(65)).is_err());
        for bad in ["A B", "A\nB", "A\"B", "é", "A/B"] {
            assert_eq!(ok(500, bad), Err("malformed error code".into()), "{bad:?}");
        }
    }
}
