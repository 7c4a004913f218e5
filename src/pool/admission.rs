//! Admission control per worker: at most `max_concurrent` requests in flight (in the rings or
//! in the worker), then a bounded FIFO queue, then `UNAVAILABLE`.
//!
//! The counters live in gateway memory (a worker cannot touch them) and are shared by all lane
//! owners, so the limit holds across gateway cores. A permit is held from admission until the
//! worker's answer arrives, or its crash is handled: a request that timed out for its client
//! still occupies the worker, so it still counts.
//!
//! Counting only: nothing here waits. [`QueueTicket::listen`] hands out the
//! [`EventListener`] a waiter sleeps on, asynchronously or blocking (see
//! [`crate::pool::dispatch`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use event_listener::{Event, EventListener, IntoNotification};

/// Concurrency limit and queue of one slot.
#[derive(Debug)]
pub struct Admission {
    /// Permits held.
    in_flight: AtomicUsize,
    /// Queue tickets held.
    queued: AtomicUsize,
    max_concurrent: usize,
    max_queue: usize,
    /// Notified once per released permit, and for everyone when the slot fails or stops.
    event: Event,
}

/// Holds one unit of a slot's concurrency; released on drop.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.in_flight.fetch_sub(1, Ordering::AcqRel);
        // One more waiter for each place freed: `notify(1)` alone would count a waiter that
        // was told of an earlier place and has not run yet, and a burst of answers would
        // admit one queued request instead of one each.
        self.admission.event.notify(1usize.additional());
    }
}

/// A place in the queue. Exchanged for a permit by [`QueueTicket::try_acquire`]; dropped
/// without one, the waiter gave up.
#[derive(Debug)]
pub struct QueueTicket {
    admission: Arc<Admission>,
    /// Left the queue with a permit: nothing to give back on drop.
    admitted: bool,
}

impl Drop for QueueTicket {
    fn drop(&mut self) {
        if self.admitted {
            return;
        }
        let a = &self.admission;
        a.queued.fetch_sub(1, Ordering::AcqRel);
        // The notification of a released permit may have woken this waiter: if a place is
        // free, pass it on to the next one.
        if a.in_flight() < a.max_concurrent {
            a.event.notify(1usize.additional());
        }
    }
}

impl QueueTicket {
    /// Fires when a place may have become free (or the slot's state changed). Take it before
    /// [`QueueTicket::try_acquire`], so that a release in between is not missed.
    pub fn listen(&self) -> EventListener {
        self.admission.event.listen()
    }

    /// A permit if a place is free now; the ticket back otherwise.
    pub fn try_acquire(mut self) -> Result<Permit, QueueTicket> {
        if !self.admission.try_take() {
            return Err(self);
        }
        self.admitted = true;
        self.admission.queued.fetch_sub(1, Ordering::AcqRel);
        Ok(Permit {
            admission: self.admission.clone(),
        })
    }
}

impl Admission {
    /// A limit of `max_concurrent` in flight and `max_queue` waiting.
    pub fn new(max_concurrent: usize, max_queue: usize) -> Arc<Admission> {
        Arc::new(Admission {
            in_flight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            max_concurrent: max_concurrent.max(1),
            max_queue,
            event: Event::new(),
        })
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

    fn try_take(&self) -> bool {
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

    /// The fast path: a permit if one is free and nobody is queued before us.
    pub fn try_enter(self: &Arc<Self>) -> Option<Permit> {
        (self.queued() == 0 && self.try_take()).then(|| Permit {
            admission: self.clone(),
        })
    }

    /// A place in the queue, or `None` when the queue is full.
    pub fn enqueue(self: &Arc<Self>) -> Option<QueueTicket> {
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
                Ok(_) => {
                    return Some(QueueTicket {
                        admission: self.clone(),
                        admitted: false,
                    });
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Wakes every waiter (the slot failed or stopped: they must re-check).
    pub fn wake_all(&self) {
        self.event.notify(usize::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_listener::Listener;
    use std::time::{Duration, Instant};

    #[test]
    fn limit_then_queue_then_full() {
        let a = Admission::new(2, 1);
        let p1 = a.try_enter().unwrap();
        let _p2 = a.try_enter().unwrap();
        assert_eq!(a.in_flight(), 2);
        assert!(a.try_enter().is_none());
        let t = a.enqueue().unwrap();
        assert!(a.enqueue().is_none(), "the queue holds one");
        assert_eq!(a.queued(), 1);
        // Nobody jumps the queue: with a waiter, the fast path is closed even for a free place.
        let l = t.listen();
        drop(p1);
        assert!(
            l.wait_deadline(Instant::now() + Duration::from_secs(30))
                .is_some()
        );
        assert!(a.try_enter().is_none());
        let p3 = t.try_acquire().unwrap();
        assert_eq!((a.in_flight(), a.queued()), (2, 0));
        drop(p3);
        assert_eq!(a.in_flight(), 1);
    }

    #[test]
    fn a_burst_of_answers_admits_one_waiter_for_each_place_freed() {
        let a = Admission::new(3, 3);
        let permits: Vec<Permit> = (0..3).map(|_| a.try_enter().unwrap()).collect();
        let tickets: Vec<QueueTicket> = (0..3).map(|_| a.enqueue().unwrap()).collect();
        let listeners: Vec<EventListener> = tickets.iter().map(QueueTicket::listen).collect();
        // Three answers arrive before any waiter runs: each is told of its own place.
        drop(permits);
        for (i, l) in listeners.into_iter().enumerate() {
            assert!(
                l.wait_deadline(Instant::now() + Duration::from_secs(30))
                    .is_some(),
                "waiter {i} was not told of a free place"
            );
        }
        let admitted: Vec<Permit> = tickets
            .into_iter()
            .map(|t| t.try_acquire().unwrap())
            .collect();
        assert_eq!((a.in_flight(), a.queued()), (3, 0));
        drop(admitted);
    }

    #[test]
    fn a_waiter_that_gives_up_passes_its_wake_up_on() {
        let a = Admission::new(1, 2);
        let p = a.try_enter().unwrap();
        let first = a.enqueue().unwrap();
        let second = a.enqueue().unwrap();
        let l1 = first.listen();
        let l2 = second.listen();
        // The release wakes one waiter; the first gives up instead of taking the place.
        drop(p);
        assert!(
            l1.wait_deadline(Instant::now() + Duration::from_secs(30))
                .is_some()
        );
        drop(first);
        assert!(
            l2.wait_deadline(Instant::now() + Duration::from_secs(30))
                .is_some(),
            "the second waiter was not told about the free place"
        );
        assert!(second.try_acquire().is_ok());
    }

    #[test]
    fn a_ticket_that_cannot_acquire_comes_back() {
        let a = Admission::new(1, 1);
        let _p = a.try_enter().unwrap();
        let t = a.enqueue().unwrap();
        let t = t.try_acquire().unwrap_err();
        assert_eq!(a.queued(), 1);
        drop(t);
        assert_eq!(a.queued(), 0);
    }
}
