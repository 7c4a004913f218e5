//! The deadlines of one gateway core's waits, without a timer per wait.
//!
//! Every HTTP request waits with a deadline at least once: its connection's read (keep-alive
//! or header timeout) and, when its worker is busy, its place in the admission queue (the
//! request timeout). A glommio timer per wait costs two clock reads, an allocation, and an
//! insertion into and a removal from the executor's timer tree, and nearly every such timer
//! is cancelled. Here a wait is an entry in a slab (its deadline and its waker), added and
//! removed in constant time without reading the clock. One sweeper task per core sleeps until
//! the earliest deadline it knows of, then wakes the waits that are due.
//!
//! A wait ends no earlier than its deadline, and at most [`GRAIN`] after it (besides the
//! executor's own timer latency): the sweeper looks at most once per grain, so that many
//! deadlines falling due one after another cost one pass over the waits, not one each. A pass
//! looks at every wait, so its cost is bounded by the core's connections: at most
//! `max_connections` (10,000 by default) reads, plus the queued requests, 200 times a second.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::gateway::notify::Notify;

/// The longest a due wait may go unnoticed after its deadline.
pub const GRAIN: Duration = Duration::from_millis(5);

/// One core's waits with deadlines and the state of its sweeper.
#[derive(Default)]
pub struct Deadlines {
    /// The waits in progress.
    waits: RefCell<slab::Slab<Wait>>,
    /// When the sweeper looks next; `None` while it knows of no wait. Not moved later when
    /// waits end: the sweeper then finds nothing due and looks at the next deadline.
    next: Cell<Option<Instant>>,
    /// Wakes the sweeper when a wait is due before `next`.
    earlier: Notify,
}

/// A wait's entry.
struct Wait {
    /// When it is due.
    at: Instant,
    /// The task to wake when it is.
    waker: Waker,
    /// Set by the sweeper once `at` has passed.
    due: bool,
}

impl Deadlines {
    /// Resolves once `at` has passed (see the module's note on precision); dropping it ends
    /// the wait.
    pub fn until(&self, at: Instant) -> Expiry<'_> {
        Expiry {
            deadlines: self,
            at,
            key: None,
        }
    }

    /// The number of waits in progress.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waits.borrow().len()
    }

    /// The sweeper: runs as long as its core's executor does.
    pub async fn sweep(&self) {
        loop {
            match self.next.get() {
                None => self.earlier.notified().await,
                Some(next) => {
                    let left = next.saturating_duration_since(Instant::now());
                    if !left.is_zero() {
                        futures_lite::future::or(
                            self.earlier.notified(),
                            glommio::timer::sleep(left),
                        )
                        .await;
                    }
                }
            }
            let now = Instant::now();
            if self.next.get().is_some_and(|next| now >= next) {
                self.wake_due(now);
            }
        }
    }

    /// Marks the waits due at `now` and wakes their tasks; sets when to look next.
    fn wake_due(&self, now: Instant) {
        let mut woken = Vec::new();
        let mut earliest: Option<Instant> = None;
        for (_, w) in self.waits.borrow_mut().iter_mut() {
            if w.due {
                continue;
            }
            if w.at <= now {
                w.due = true;
                woken.push(w.waker.clone());
            } else {
                earliest = Some(earliest.map_or(w.at, |e| e.min(w.at)));
            }
        }
        self.next.set(earliest.map(|e| e.max(now + GRAIN)));
        // Woken after the slab is released: a waker may run code that touches it.
        for w in woken {
            w.wake();
        }
    }

    fn add(&self, at: Instant, waker: Waker) -> usize {
        let key = self.waits.borrow_mut().insert(Wait {
            at,
            waker,
            due: false,
        });
        if self.next.get().is_none_or(|next| at < next) {
            self.next.set(Some(at));
            self.earlier.notify();
        }
        key
    }
}

/// A wait until a deadline ([`Deadlines::until`]).
pub struct Expiry<'a> {
    deadlines: &'a Deadlines,
    at: Instant,
    /// Its entry, from its first poll on.
    key: Option<usize>,
}

impl Future for Expiry<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(key) = this.key else {
            this.key = Some(this.deadlines.add(this.at, cx.waker().clone()));
            return Poll::Pending;
        };
        let mut waits = this.deadlines.waits.borrow_mut();
        let Some(w) = waits.get_mut(key) else {
            return Poll::Ready(());
        };
        if w.due {
            return Poll::Ready(());
        }
        if !w.waker.will_wake(cx.waker()) {
            w.waker = cx.waker().clone();
        }
        Poll::Pending
    }
}

impl Drop for Expiry<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.deadlines.waits.borrow_mut().try_remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn executor() -> glommio::LocalExecutor {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .expect("executor")
    }

    /// Deadlines with their sweeper running on the current executor.
    fn swept() -> std::rc::Rc<Deadlines> {
        let d = std::rc::Rc::new(Deadlines::default());
        let sweeper = d.clone();
        glommio::spawn_local(async move { sweeper.sweep().await }).detach();
        d
    }

    #[test]
    fn a_wait_ends_at_its_deadline_not_before() {
        executor().run(async {
            let d = swept();
            let begun = Instant::now();
            let at = begun + Duration::from_millis(30);
            d.until(at).await;
            assert!(Instant::now() >= at);
            assert_eq!(d.waiting(), 0, "the ended wait left its entry");
        });
    }

    #[test]
    fn an_earlier_wait_is_not_held_up_by_a_later_one() {
        executor().run(async {
            let d = swept();
            let now = Instant::now();
            // The sweeper first learns of a wait an hour away, then of one 20 ms away.
            let far = glommio::spawn_local({
                let d = d.clone();
                async move { d.until(now + Duration::from_secs(3600)).await }
            });
            futures_lite::future::yield_now().await;
            let near = now + Duration::from_millis(20);
            let woke = futures_lite::future::or(
                async {
                    d.until(near).await;
                    true
                },
                async {
                    // Far beyond the near deadline and its grain, far short of the hour.
                    glommio::timer::sleep(Duration::from_secs(60)).await;
                    false
                },
            )
            .await;
            assert!(woke, "the near wait waited for the far one");
            assert!(Instant::now() >= near);
            drop(far);
        });
    }

    #[test]
    fn many_waits_end_in_deadline_order_and_dropped_ones_leave_nothing() {
        executor().run(async {
            let d = swept();
            let base = Instant::now();
            let order = std::rc::Rc::new(RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            for i in [3u64, 1, 4, 0, 2] {
                let (d, order) = (d.clone(), order.clone());
                // 100 ms apart: far more than the grain, so the order is the deadlines'.
                let at = base + Duration::from_millis(10 + 100 * i);
                tasks.push(glommio::spawn_local(async move {
                    d.until(at).await;
                    assert!(Instant::now() >= at);
                    order.borrow_mut().push(i);
                }));
            }
            // Waits that are dropped before their deadline.
            for _ in 0..100 {
                let w = d.until(base + Duration::from_millis(1));
                drop(w);
                let mut w = Box::pin(d.until(base + Duration::from_secs(3600)));
                assert!(futures_lite::future::poll_once(&mut w).await.is_none());
            }
            for t in tasks {
                t.await;
            }
            assert_eq!(*order.borrow(), vec![0, 1, 2, 3, 4]);
            assert_eq!(d.waiting(), 0);
        });
    }
}
