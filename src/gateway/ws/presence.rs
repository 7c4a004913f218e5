//! A WebSocket connection's presence at its user's slot, counted in the slot's segment header
//! (`clients`) from the connection's first routed request until the connection and its last
//! request end. The worker of a cell slot reads it: a cell is idle only when nobody is
//! connected and no run is going, not merely between requests.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::pool::Pool;

/// One connection's mark on a slot; dropped with the connection's last holder.
pub(super) struct Presence {
    pool: Arc<Pool>,
    slot: Cell<Option<usize>>,
}

impl Presence {
    pub(super) fn new(pool: Arc<Pool>) -> Presence {
        Presence {
            pool,
            slot: Cell::new(None),
        }
    }

    /// The connection's request went to `slot`: counted there (and no longer at a slot it
    /// went to before, should the user have moved).
    pub(super) fn at(&self, slot: usize) {
        if self.slot.get() == Some(slot) {
            return;
        }
        self.leave();
        if let Some(s) = self.pool.slots().get(slot) {
            s.segment.header().clients.fetch_add(1, Ordering::Relaxed);
            self.slot.set(Some(slot));
        }
    }

    fn leave(&self) {
        if let Some(old) = self.slot.take()
            && let Some(s) = self.pool.slots().get(old)
        {
            // The worker can write this word too; a decrement never wraps below zero, so a
            // corrupted count only misleads that worker about its own cell.
            let _ = s.segment.header().clients.fetch_update(
                Ordering::Relaxed,
                Ordering::Relaxed,
                |n| Some(n.saturating_sub(1)),
            );
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.leave();
    }
}
