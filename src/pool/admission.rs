//! Admission control per worker: at most `max_concurrent` requests in flight (in the rings or
//! in the worker), then a bounded FIFO queue, then `UNAVAILABLE`.
//!
//! The counters live in gateway memory (a worker cannot touch them) and are shared by all lane
//! owners, so the limit holds across gateway cores. A permit is held from admission until the
//! worker's answer arrives, or its crash is handled: a request that timed out for its client
//! still occupies the worker, so it still counts.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use event_listener::{Event, EventListener, Listener};

use crate::error::RouteError;
use crate::pool::slot::{Slot, SlotState};

/// Concurrency limit and queue of one slot.
#[derive(Debug)]
pub struct Admission {
    in_flight: AtomicUsize,
    queued: AtomicUsize,
    max_concurrent: usize,
    max_queue: usize,
    event: Event,
}

/// Holds one unit of a slot's concurrency; released on drop.
#[derive(Debug)]
pub struct Permit {
    slot: Arc<Slot>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.slot.admission.release();
    }
}

impl Permit {
    /// The slot this permit is for.
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }
}

/// A place in the queue; leaving it (drop) frees the place.
struct QueueTicket<'a> {
    admission: &'a Admission,
}

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        self.admission.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// A limit of `max_concurrent` in flight and `max_queue` waiting.
    pub fn new(max_concurrent: usize, max_queue: usize) -> Admission {
        Admission {
            in_flight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            max_concurrent: max_concurrent.max(1),
            max_queue,
            event: Event::new(),
        }
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests waiting for admission.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The concurrency limit.
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    fn try_acquire(&self) -> bool {
        let mut cur = self.in_flight.load(Ordering::Relaxed);
        while cur < self.max_concurrent {
            match self.in_flight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
        false
    }

    fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.event.notify(1);
    }

    fn enter_queue(&self) -> Option<QueueTicket<'_>> {
        let mut cur = self.queued.load(Ordering::Relaxed);
        loop {
            if cur >= self.max_queue {
                return None;
            }
            match self.queued.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(QueueTicket { admission: self }),
                Err(now) => cur = now,
            }
        }
    }

    /// Wakes every waiter (the slot failed or stopped: they must re-check).
    pub fn wake_all(&self) {
        self.event.notify(usize::MAX);
    }

    /// A waiter gave up; if it had been handed a free place, pass it on.
    fn pass_on(&self) {
        if self.in_flight() < self.max_concurrent {
            self.event.notify(1);
        }
    }
}

/// Refuses at once what can never be admitted now.
fn check_state(slot: &Slot) -> Result<(), RouteError> {
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

/// The fast path: a permit if one is free and nobody is queued before us.
fn fast_path(slot: &Arc<Slot>) -> Result<Option<Permit>, RouteError> {
    check_state(slot)?;
    let a = &slot.admission;
    if a.queued() == 0 && a.try_acquire() {
        return Ok(Some(Permit { slot: slot.clone() }));
    }
    Ok(None)
}

/// Admits a request to `slot`, waiting in the queue until a permit frees up or `timer`
/// completes (the request's deadline). For async callers.
pub async fn acquire<T>(
    slot: &Arc<Slot>,
    timer: &mut T,
    timeout: Duration,
) -> Result<Permit, RouteError>
where
    T: Future + Unpin,
{
    if let Some(p) = fast_path(slot)? {
        return Ok(p);
    }
    let a = &slot.admission;
    let _ticket = a.enter_queue().ok_or_else(|| queue_full(slot))?;
    loop {
        let listener = a.event.listen();
        check_state(slot)?;
        if a.try_acquire() {
            return Ok(Permit { slot: slot.clone() });
        }
        let woke = futures_lite::future::or(
            async {
                listener.await;
                true
            },
            async {
                let _ = (&mut *timer).await;
                false
            },
        )
        .await;
        if !woke {
            a.pass_on();
            return Err(RouteError::Timeout(timeout));
        }
    }
}

/// Admits a request to `slot`, blocking the calling thread until `deadline` at most.
pub fn acquire_blocking(
    slot: &Arc<Slot>,
    deadline: Instant,
    timeout: Duration,
) -> Result<Permit, RouteError> {
    if let Some(p) = fast_path(slot)? {
        return Ok(p);
    }
    let a = &slot.admission;
    let _ticket = a.enter_queue().ok_or_else(|| queue_full(slot))?;
    loop {
        let listener: EventListener = a.event.listen();
        check_state(slot)?;
        if a.try_acquire() {
            return Ok(Permit { slot: slot.clone() });
        }
        if listener.wait_deadline(deadline).is_none() {
            a.pass_on();
            return Err(RouteError::Timeout(timeout));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::slot::Slot;

    fn slot(max: usize, queue: usize) -> Arc<Slot> {
        crate::pool::slot::test_slot(Admission::new(max, queue)).0
    }

    #[test]
    fn limit_then_queue_then_unavailable() {
        let s = slot(2, 1);
        let far = Instant::now() + Duration::from_secs(60);
        let p1 = acquire_blocking(&s, far, Duration::from_secs(60)).unwrap();
        let _p2 = acquire_blocking(&s, far, Duration::from_secs(60)).unwrap();
        assert_eq!(s.admission.in_flight(), 2);
        // A third waits in the queue until p1 is dropped.
        let s2 = s.clone();
        let waiter = std::thread::spawn(move || {
            acquire_blocking(
                &s2,
                Instant::now() + Duration::from_secs(60),
                Duration::from_secs(60),
            )
            .map(|_| ())
        });
        // Wait (bounded) until it is queued, then a fourth is refused: the queue holds one.
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.admission.queued() == 0 {
            assert!(Instant::now() < deadline, "waiter never queued");
            std::thread::yield_now();
        }
        let e = acquire_blocking(&s, far, Duration::from_secs(60)).unwrap_err();
        assert_eq!(e.code(), "UNAVAILABLE");
        assert_eq!(e.status(), 503);
        drop(p1);
        waiter.join().unwrap().unwrap();
        assert_eq!(s.admission.queued(), 0);
        assert_eq!(s.admission.in_flight(), 1);
    }

    #[test]
    fn queued_request_times_out() {
        let s = slot(1, 10);
        let _p = acquire_blocking(&s, Instant::now(), Duration::ZERO).unwrap();
        let e = acquire_blocking(
            &s,
            Instant::now() + Duration::from_millis(20),
            Duration::from_millis(20),
        )
        .unwrap_err();
        assert_eq!(e.code(), "TIMEOUT");
        assert_eq!(s.admission.queued(), 0);
    }

    #[test]
    fn failed_slot_is_refused_and_waiters_are_released() {
        let s = slot(1, 10);
        let _p = acquire_blocking(&s, Instant::now(), Duration::ZERO).unwrap();
        let s2 = s.clone();
        let waiter = std::thread::spawn(move || {
            acquire_blocking(
                &s2,
                Instant::now() + Duration::from_secs(60),
                Duration::from_secs(60),
            )
            .map(|_| ())
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.admission.queued() == 0 {
            assert!(Instant::now() < deadline);
            std::thread::yield_now();
        }
        s.set_state(SlotState::Failed);
        let e = waiter.join().unwrap().unwrap_err();
        assert_eq!(e.code(), "UNAVAILABLE");
        assert!(e.retry_after().is_some());
        let e = acquire_blocking(&s, Instant::now(), Duration::ZERO).unwrap_err();
        assert_eq!(e.status(), 503);
    }

    #[test]
    fn async_acquire_waits_for_release() {
        let s = slot(1, 10);
        let p = acquire_blocking(&s, Instant::now(), Duration::ZERO).unwrap();
        let s2 = s.clone();
        let h = std::thread::spawn(move || {
            let never = std::future::pending::<()>();
            let mut never = std::pin::pin!(never);
            futures_lite::future::block_on(acquire(&s2, &mut never, Duration::from_secs(60)))
                .map(|_| ())
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.admission.queued() == 0 {
            assert!(Instant::now() < deadline);
            std::thread::yield_now();
        }
        drop(p);
        h.join().unwrap().unwrap();
    }
}
