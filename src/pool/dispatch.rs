//! One request's way to its user's worker: route, admit, submit, then the worker's replies.
//!
//! Plain logic: nothing here waits or does I/O. Each [`Dispatch::step`] either moves the
//! request on or says what it needs first — the user's first assignment persisted, a place in
//! the admission queue, a pause while the ring is full — and its driver provides that and
//! steps again: a gateway core asynchronously (`gateway::reactor`), a library caller by
//! blocking (`api`). Both get the same admission, deadline, back-pressure and errors.
//!
//! One deadline covers the whole way, from [`Dispatch::new`] to the final reply: the time a
//! request waited in the admission queue is taken from the time its worker has.

use std::sync::Arc;
use std::time::{Duration, Instant};

use event_listener::EventListener;
use moltbot_ipc::clock::monotonic_us;

use crate::error::RouteError;
use crate::pool::Pool;
use crate::pool::admission::{Permit, QueueTicket};
use crate::pool::call::Call;
use crate::pool::lane::{LaneSet, Refused};
use crate::pool::reply::Replies;
use crate::pool::slot::{Slot, SlotState};

/// How long a request pauses before it tries a full ring again. Long enough for the worker to
/// take a few frames, short next to any request's time in the worker.
pub const RING_FULL_PAUSE: Duration = Duration::from_micros(100);

/// What a dispatch needs before it can go on.
#[derive(Debug)]
pub enum Step {
    /// The user is new: persist its first assignment (`StickyRouter::route`, which fsyncs),
    /// then call [`Dispatch::assigned`].
    Assign,
    /// Every place at the worker is taken: wait until this fires (or the deadline), then step
    /// again.
    Queue(EventListener),
    /// The ring is full, or the lane is being recovered: pause this long (at most until the
    /// deadline), then step again.
    Pause(Duration),
    /// In the ring of `slot`: the worker's replies arrive on `replies`.
    Sent {
        /// The user's slot.
        slot: usize,
        /// Where the worker's replies arrive.
        replies: Replies,
    },
}

enum Stage {
    /// The user has no slot yet.
    Unassigned,
    /// Routed; waiting for admission (with a place in the queue once the fast path failed).
    Admit(Option<QueueTicket>),
    /// Admitted; the permit goes with the request into the lane.
    Submit(Permit),
    /// Handed to the lane (or failed): nothing more to do.
    Done,
}

/// One request in dispatch.
pub struct Dispatch {
    slot: Option<Arc<Slot>>,
    stage: Stage,
    timeout: Duration,
    deadline: Instant,
    /// The same deadline on the monotonic clock both sides of a ring read.
    deadline_us: u64,
}

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatch")
            .field("slot", &self.slot.as_ref().map(|s| s.id))
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Dispatch {
    /// Starts dispatching `call` through `pool`: checks the user and finds its slot if it has
    /// one (a lock-free lookup). The request's deadline starts now.
    pub fn new(pool: &Pool, call: &Call<'_>) -> Result<Dispatch, RouteError> {
        crate::user::validate_user_id(call.user)
            .map_err(|e| RouteError::InvalidUser(e.to_string()))?;
        let timeout = pool.config().request_timeout;
        let mut d = Dispatch {
            slot: None,
            stage: Stage::Unassigned,
            timeout,
            deadline: Instant::now() + timeout,
            deadline_us: monotonic_us().saturating_add(timeout.as_micros() as u64),
        };
        if let Some(slot) = pool.router().lookup(call.user) {
            d.assigned(pool, slot)?;
        }
        Ok(d)
    }

    /// The user's slot is `slot` (after [`Step::Assign`]).
    pub fn assigned(&mut self, pool: &Pool, slot: usize) -> Result<(), RouteError> {
        let slot = pool
            .slots()
            .get(slot)
            .ok_or_else(|| RouteError::Internal(format!("no worker slot {slot}")))?;
        self.slot = Some(slot.clone());
        self.stage = Stage::Admit(None);
        Ok(())
    }

    /// The slot the request goes to, once known.
    pub fn slot(&self) -> Option<usize> {
        self.slot.as_ref().map(|s| s.id)
    }

    /// When the request times out.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The `TIMEOUT` error of this request.
    pub fn timed_out(&self) -> RouteError {
        RouteError::Timeout(self.timeout)
    }

    /// Moves the request on as far as it goes without waiting; `lanes` are the caller's lanes
    /// (one per slot). After an error or [`Step::Sent`] the dispatch is over.
    pub fn step(
        &mut self,
        call: &Call<'_>,
        lanes: &mut LaneSet,
        now: Instant,
    ) -> Result<Step, RouteError> {
        let result = self.advance(call, lanes, now);
        if matches!(result, Ok(Step::Sent { .. }) | Err(_)) {
            self.stage = Stage::Done;
        }
        result
    }

    fn advance(
        &mut self,
        call: &Call<'_>,
        lanes: &mut LaneSet,
        now: Instant,
    ) -> Result<Step, RouteError> {
        let Some(slot) = self.slot.clone() else {
            return Ok(Step::Assign);
        };
        loop {
            match std::mem::replace(&mut self.stage, Stage::Done) {
                Stage::Unassigned => return Ok(Step::Assign),
                Stage::Done => {
                    return Err(RouteError::Internal("request already dispatched".into()));
                }
                Stage::Admit(ticket) => {
                    refusal(&slot)?;
                    let a = &slot.admission;
                    let ticket = match ticket {
                        Some(t) => t,
                        None => match a.try_enter() {
                            Some(permit) => {
                                self.stage = Stage::Submit(permit);
                                continue;
                            }
                            None => a.enqueue().ok_or_else(|| queue_full(&slot))?,
                        },
                    };
                    if now >= self.deadline {
                        return Err(self.timed_out());
                    }
                    // Listen before trying, so that a permit released in between wakes us.
                    let listener = ticket.listen();
                    refusal(&slot)?;
                    match ticket.try_acquire() {
                        Ok(permit) => self.stage = Stage::Submit(permit),
                        Err(ticket) => {
                            self.stage = Stage::Admit(Some(ticket));
                            return Ok(Step::Queue(listener));
                        }
                    }
                }
                Stage::Submit(permit) => {
                    if now >= self.deadline {
                        return Err(self.timed_out());
                    }
                    let lane = lanes
                        .get_mut(slot.id)
                        .ok_or_else(|| RouteError::Internal(format!("no lane to {}", slot.id)))?;
                    return match lane.submit(call, self.deadline_us, permit) {
                        Ok(replies) => Ok(Step::Sent {
                            slot: slot.id,
                            replies,
                        }),
                        Err(Refused::Full(permit)) => {
                            self.stage = Stage::Submit(permit);
                            Ok(Step::Pause(RING_FULL_PAUSE))
                        }
                        Err(Refused::TooLarge { len, max }) => {
                            Err(RouteError::TooLarge { len, max })
                        }
                    };
                }
            }
        }
    }
}

/// Refuses at once what cannot be admitted now: a failed or stopped slot.
fn refusal(slot: &Slot) -> Result<(), RouteError> {
    match slot.state() {
        SlotState::Failed => Err(RouteError::Unavailable {
            slot: slot.id,
            reason: "worker failed: restart limit reached, retrying after a cool-down".into(),
            retry_after: slot.retry_after(),
        }),
        SlotState::Stopped => Err(RouteError::ShuttingDown),
        _ => Ok(()),
    }
}

fn queue_full(slot: &Slot) -> RouteError {
    RouteError::Unavailable {
        slot: slot.id,
        reason: format!(
            "{} requests in flight and {} queued",
            slot.admission.in_flight(),
            slot.admission.queued()
        ),
        retry_after: Duration::from_secs(1),
    }
}
