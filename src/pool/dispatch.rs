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
    /// one (a lock-free lookup). The request's deadline starts at `now`, the caller's reading
    /// of the clock.
    pub fn new(pool: &Pool, call: &Call<'_>, now: Instant) -> Result<Dispatch, RouteError> {
        crate::user::validate_user_id(call.user)
            .map_err(|e| RouteError::InvalidUser(e.to_string()))?;
        let mut d = Dispatch::with_timeout(pool.config().request_timeout, now);
        if let Some(slot) = pool.router().lookup(call.user) {
            d.assigned(pool, slot)?;
        }
        Ok(d)
    }

    fn with_timeout(timeout: Duration, now: Instant) -> Dispatch {
        Dispatch {
            slot: None,
            stage: Stage::Unassigned,
            timeout,
            deadline: now + timeout,
            deadline_us: monotonic_us().saturating_add(timeout.as_micros() as u64),
        }
    }

    /// The user's slot is `slot` (after [`Step::Assign`]).
    pub fn assigned(&mut self, pool: &Pool, slot: usize) -> Result<(), RouteError> {
        let slot = pool
            .slots()
            .get(slot)
            .ok_or_else(|| RouteError::Internal(format!("no worker slot {slot}")))?;
        self.go_to(slot.clone());
        Ok(())
    }

    fn go_to(&mut self, slot: Arc<Slot>) {
        self.slot = Some(slot);
        self.stage = Stage::Admit(None);
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

    /// `TIMEOUT` if the deadline has passed at `now`.
    fn timed_out_at(&self, now: Instant) -> Option<RouteError> {
        (now >= self.deadline).then(|| self.timed_out())
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
        let timed_out = self.timed_out_at(now);
        let Dispatch {
            slot,
            stage,
            deadline_us,
            ..
        } = self;
        let Some(slot) = slot.as_deref() else {
            return Ok(Step::Assign);
        };
        loop {
            match std::mem::replace(stage, Stage::Done) {
                Stage::Unassigned => return Ok(Step::Assign),
                Stage::Done => {
                    return Err(RouteError::Internal("request already dispatched".into()));
                }
                Stage::Admit(ticket) => {
                    refusal(slot)?;
                    let a = &slot.admission;
                    let ticket = match ticket {
                        Some(t) => t,
                        None => match a.try_enter() {
                            Some(permit) => {
                                *stage = Stage::Submit(permit);
                                continue;
                            }
                            None => a.enqueue().ok_or_else(|| queue_full(slot))?,
                        },
                    };
                    if let Some(e) = timed_out {
                        return Err(e);
                    }
                    // Listen before trying, so that a permit released in between wakes us.
                    let listener = ticket.listen();
                    refusal(slot)?;
                    match ticket.try_acquire() {
                        Ok(permit) => *stage = Stage::Submit(permit),
                        Err(ticket) => {
                            *stage = Stage::Admit(Some(ticket));
                            return Ok(Step::Queue(listener));
                        }
                    }
                }
                Stage::Submit(permit) => {
                    if let Some(e) = timed_out {
                        return Err(e);
                    }
                    let lane = lanes
                        .get_mut(slot.id)
                        .ok_or_else(|| RouteError::Internal(format!("no lane to {}", slot.id)))?;
                    return match lane.submit(call, *deadline_us, permit) {
                        Ok(replies) => Ok(Step::Sent {
                            slot: slot.id,
                            replies,
                        }),
                        Err(Refused::Full(permit)) => {
                            *stage = Stage::Submit(permit);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::admission::Admission;
    use crate::pool::call::Kind;
    use crate::pool::slot::test_slot;
    use event_listener::Listener;

    const CALL: Call<'static> = Call {
        kind: Kind::Echo,
        method: crate::pool::call::Method::Post,
        user: "user-a",
        target: "",
        call_id: "",
        stream: false,
        body: b"hello",
        held: None,
    };

    fn to(slot: &Arc<Slot>) -> Dispatch {
        let mut d = Dispatch::with_timeout(Duration::from_secs(60), Instant::now());
        d.go_to(slot.clone());
        d
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn admitted_then_queued_then_refused() {
        let (slot, _rx) = test_slot(Admission::new(1, 1));
        let mut lanes = LaneSet::new(std::slice::from_ref(&slot), 0).unwrap();
        let now = Instant::now();
        let mut first = to(&slot);
        assert!(matches!(
            first.step(&CALL, &mut lanes, now),
            Ok(Step::Sent { slot: 0, .. })
        ));
        assert_eq!(slot.admission.in_flight(), 1);
        let mut second = to(&slot);
        let Ok(Step::Queue(listener)) = second.step(&CALL, &mut lanes, now) else {
            panic!("the second request should wait in the queue");
        };
        assert_eq!(slot.admission.queued(), 1);
        let e = to(&slot).step(&CALL, &mut lanes, now).unwrap_err();
        assert_eq!((e.status(), e.code()), (503, "UNAVAILABLE"));
        // The first is answered (here: failed by a stopping pool): its place goes to the second.
        lanes.fail_all(RouteError::ShuttingDown);
        assert!(listener.wait_deadline(far()).is_some());
        assert!(matches!(
            second.step(&CALL, &mut lanes, Instant::now()),
            Ok(Step::Sent { .. })
        ));
        assert_eq!(
            (slot.admission.in_flight(), slot.admission.queued()),
            (1, 0)
        );
    }

    #[test]
    fn a_queued_request_times_out_and_leaves_the_queue() {
        let (slot, _rx) = test_slot(Admission::new(1, 4));
        let mut lanes = LaneSet::new(std::slice::from_ref(&slot), 0).unwrap();
        let mut first = to(&slot);
        assert!(first.step(&CALL, &mut lanes, Instant::now()).is_ok());
        let mut second = to(&slot);
        assert!(matches!(
            second.step(&CALL, &mut lanes, Instant::now()),
            Ok(Step::Queue(_))
        ));
        let late = second.deadline() + Duration::from_millis(1);
        let e = second.step(&CALL, &mut lanes, late).unwrap_err();
        assert_eq!(e.code(), "TIMEOUT");
        assert_eq!(slot.admission.queued(), 0);
        // Over: a dispatch is not stepped twice.
        assert_eq!(
            second.step(&CALL, &mut lanes, late).unwrap_err().code(),
            "INTERNAL"
        );
    }

    #[test]
    fn a_failed_slot_refuses_and_releases_its_waiters() {
        let (slot, _rx) = test_slot(Admission::new(1, 4));
        let mut lanes = LaneSet::new(std::slice::from_ref(&slot), 0).unwrap();
        assert!(to(&slot).step(&CALL, &mut lanes, Instant::now()).is_ok());
        let mut waiting = to(&slot);
        let Ok(Step::Queue(listener)) = waiting.step(&CALL, &mut lanes, Instant::now()) else {
            panic!("queued");
        };
        slot.set_state(SlotState::Failed);
        assert!(listener.wait_deadline(far()).is_some(), "waiters are woken");
        let e = waiting.step(&CALL, &mut lanes, Instant::now()).unwrap_err();
        assert_eq!((e.status(), e.code()), (503, "UNAVAILABLE"));
        assert!(e.retry_after().is_some());
        let e = to(&slot)
            .step(&CALL, &mut lanes, Instant::now())
            .unwrap_err();
        assert_eq!(e.status(), 503);
        assert_eq!(slot.admission.queued(), 0);
    }

    #[test]
    fn a_full_ring_pauses_and_a_request_that_never_fits_is_refused() {
        let (slot, _rx) = test_slot(Admission::new(1000, 4));
        let mut lanes = LaneSet::new(std::slice::from_ref(&slot), 0).unwrap();
        // The test slot's rings hold 4 KiB: fill the request ring.
        let body = [7u8; 1000];
        let call = Call {
            body: &body,
            held: None,
            ..CALL
        };
        let mut paused = None;
        for _ in 0..16 {
            let mut d = to(&slot);
            match d.step(&call, &mut lanes, Instant::now()) {
                Ok(Step::Sent { .. }) => continue,
                Ok(Step::Pause(p)) => {
                    paused = Some((d, p));
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let (mut d, pause) = paused.expect("the ring fills up");
        assert_eq!(pause, RING_FULL_PAUSE);
        // Still full: it keeps its permit and pauses again; past the deadline it times out.
        assert!(matches!(
            d.step(&call, &mut lanes, Instant::now()),
            Ok(Step::Pause(_))
        ));
        let held = slot.admission.in_flight();
        let late = d.deadline() + Duration::from_millis(1);
        assert_eq!(
            d.step(&call, &mut lanes, late).unwrap_err().code(),
            "TIMEOUT"
        );
        assert_eq!(
            slot.admission.in_flight(),
            held - 1,
            "the permit is released"
        );
        let huge = vec![0u8; 8192];
        let e = to(&slot)
            .step(
                &Call {
                    body: &huge,
                    held: None,
                    ..CALL
                },
                &mut lanes,
                Instant::now(),
            )
            .unwrap_err();
        assert_eq!((e.status(), e.code()), (413, "PAYLOAD_TOO_LARGE"));
    }
}
