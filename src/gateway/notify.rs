//! Wake-ups between the tasks of one gateway core: single-threaded, no atomics, no allocation
//! per wait.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Wakes one waiter (the pump) when something needs its attention.
#[derive(Default)]
pub struct Notify {
    flag: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    /// Marks the event and wakes the waiter, if any.
    pub fn notify(&self) {
        self.flag.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Resolves once `notify` was called since the last time it resolved.
    pub fn notified(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.flag.replace(false) {
                return Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
    }
}

/// A one-shot broadcast: once fired, every waiter (present and future) resolves.
#[derive(Default)]
pub struct Latch {
    fired: Cell<bool>,
    waiters: RefCell<slab::Slab<Waker>>,
}

impl Latch {
    /// Fires the latch.
    pub fn fire(&self) {
        if self.fired.replace(true) {
            return;
        }
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for (_, w) in waiters {
            w.wake();
        }
    }

    /// True once fired.
    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    /// Resolves when the latch fires. Dropping it unregisters the waiter.
    pub fn wait(&self) -> LatchWait<'_> {
        LatchWait {
            latch: self,
            key: None,
        }
    }
}

/// The future of [`Latch::wait`].
pub struct LatchWait<'a> {
    latch: &'a Latch,
    key: Option<usize>,
}

impl Future for LatchWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.latch.fired.get() {
            return Poll::Ready(());
        }
        let mut waiters = self.latch.waiters.borrow_mut();
        match self.key {
            Some(k) if waiters.contains(k) => {
                if !waiters[k].will_wake(cx.waker()) {
                    waiters[k] = cx.waker().clone();
                }
            }
            _ => {
                let k = waiters.insert(cx.waker().clone());
                drop(waiters);
                self.key = Some(k);
            }
        }
        Poll::Pending
    }
}

impl Drop for LatchWait<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key {
            let mut waiters = self.latch.waiters.borrow_mut();
            if waiters.contains(k) {
                waiters.remove(k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_is_edge_triggered() {
        let n = Notify::default();
        n.notify();
        futures_lite::future::block_on(n.notified());
        let mut fut = Box::pin(n.notified());
        assert!(
            futures_lite::future::block_on(futures_lite::future::poll_once(&mut fut)).is_none()
        );
        n.notify();
        assert!(
            futures_lite::future::block_on(futures_lite::future::poll_once(&mut fut)).is_some()
        );
    }

    #[test]
    fn latch_wakes_all_and_unregisters_on_drop() {
        let s = Latch::default();
        let mut a = Box::pin(s.wait());
        let b = Box::pin(s.wait());
        assert!(futures_lite::future::block_on(futures_lite::future::poll_once(&mut a)).is_none());
        let mut b = b;
        assert!(futures_lite::future::block_on(futures_lite::future::poll_once(&mut b)).is_none());
        assert_eq!(s.waiters.borrow().len(), 2);
        drop(b);
        assert_eq!(s.waiters.borrow().len(), 1);
        s.fire();
        assert!(s.is_fired());
        assert!(futures_lite::future::block_on(futures_lite::future::poll_once(&mut a)).is_some());
        futures_lite::future::block_on(s.wait());
    }
}
