//! One core's side of the worker hop: its lane to every worker, the pump task that delivers
//! the workers' answers and wakes the workers, the readers of the workers' wake sockets, and
//! [`Reactor::dispatch`], which drives a request's [`Dispatch`] on this core.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;
use glommio::net::UnixStream;
use moltbot_ipc::clock::monotonic_us;

use crate::error::RouteError;
use crate::gateway::deadline::Deadlines;
use crate::gateway::first_sight::FirstSight;
use crate::gateway::notify::{Latch, Notify};
use crate::gateway::shared::Shared;
use crate::gateway::spin::Spin;
use crate::metrics::CoreMetrics;
use crate::pool::call::Call;
use crate::pool::dispatch::{Dispatch, Step};
use crate::pool::lane::LaneSet;
use crate::pool::reply::Replies;
use crate::pool::slot::Slot;

/// One core's state (lives on its executor thread).
pub struct Reactor {
    /// Core number.
    pub id: usize,
    /// Shared state.
    pub shared: Arc<Shared>,
    /// This core's lane in every slot.
    pub lanes: RefCell<LaneSet>,
    /// This core's metrics.
    pub metrics: Arc<CoreMetrics>,
    /// Open connections on this core.
    pub conns: Cell<usize>,
    /// Set when the core is done; the pump exits.
    pub finished: Cell<bool>,
    /// Wakes the pump: requests were submitted and their workers need waking.
    pub flush: Notify,
    /// Fired (by the pump) when a stop began: idle connections stop waiting.
    pub closing: Latch,
    /// The deadlines of this core's reads and queued requests (swept by
    /// [`Deadlines::sweep`]).
    pub deadlines: Deadlines,
    /// Per slot: tells its wake reader that a new wake socket may wait in the slot.
    pub wake_swaps: Vec<Notify>,
    /// Users waiting for their first assignment, persisted in batches.
    pub first_sight: Rc<FirstSight>,
    /// This core's WebSocket connections: what wakes each one's task.
    pub ws_conns: RefCell<HashMap<u64, Rc<Notify>>>,
    /// Numbers this core's WebSocket connections.
    pub next_ws_conn: Cell<u64>,
    /// How long the core spins before it parks; longer while WebSocket requests are in flight.
    pub spin: Spin,
}

impl Reactor {
    /// The reactor of core `id`, with its lane in every slot.
    pub fn new(id: usize, shared: Arc<Shared>, mut lanes: LaneSet, spin: Spin) -> Reactor {
        // Workers are woken once per pump round for everything submitted in it.
        lanes.set_defer_wakes(true);
        Reactor {
            id,
            metrics: shared.metrics[id].clone(),
            wake_swaps: shared
                .pool
                .slots()
                .iter()
                .map(|_| Notify::default())
                .collect(),
            shared,
            lanes: RefCell::new(lanes),
            conns: Cell::new(0),
            finished: Cell::new(false),
            flush: Notify::default(),
            closing: Latch::default(),
            deadlines: Deadlines::default(),
            first_sight: Rc::default(),
            ws_conns: RefCell::default(),
            next_ws_conn: Cell::new(1),
            spin,
        }
    }

    /// Wakes this core's WebSocket connections `conns` (frames were queued for them).
    pub fn wake_ws(&self, conns: &[u64]) {
        let map = self.ws_conns.borrow();
        for c in conns {
            if let Some(n) = map.get(c) {
                n.notify();
            }
        }
    }

    /// Wakes the connections other cores queued frames for.
    fn deliver_pokes(&self) {
        let poked = self.shared.hub.take_poked(self.id);
        if !poked.is_empty() {
            self.wake_ws(&poked);
        }
    }

    /// Sends `call` to its user's worker and returns once it is in the ring: the slot and
    /// where the worker's replies arrive. A new user's first assignment is persisted off the
    /// reactor (batched with this core's other first sights); a full admission queue, a
    /// failed worker or the deadline end it with the error (and the slot, once known).
    pub async fn dispatch(
        &self,
        call: &Call<'_>,
    ) -> Result<(usize, Replies), (Option<usize>, RouteError)> {
        let pool = &self.shared.pool;
        let mut now = Instant::now();
        let mut d = Dispatch::new(pool, call, now).map_err(|e| (None, e))?;
        // A stop refuses requests not yet admitted; admitted ones are served.
        let refuse_if_stopping = |d: &Dispatch| {
            if self.shared.stopping() {
                Err((d.slot(), RouteError::ShuttingDown))
            } else {
                Ok(())
            }
        };
        if d.slot().is_some() {
            refuse_if_stopping(&d)?;
        }
        loop {
            let step = d.step(call, &mut self.lanes.borrow_mut(), now);
            match step.map_err(|e| (d.slot(), e))? {
                Step::Assign => {
                    // A first assignment appends to the routing table and fsyncs it, which
                    // must not stall this core's other connections.
                    let slot = self
                        .first_sight
                        .route(pool.router(), call.user.to_string())
                        .await
                        .map_err(|e| (None, e))?;
                    d.assigned(pool, slot).map_err(|e| (Some(slot), e))?;
                    refuse_if_stopping(&d)?;
                }
                Step::Queue(listener) => {
                    futures_lite::future::or(listener, self.deadlines.until(d.deadline())).await;
                }
                Step::Pause(pause) => {
                    // The worker is behind (or being replaced): give it a moment, within the
                    // request's own deadline.
                    let left = d.deadline().saturating_duration_since(now);
                    glommio::timer::sleep(pause.min(left)).await;
                }
                Step::Sent { slot, replies } => {
                    // The pump wakes the worker once for everything submitted this round.
                    self.flush.notify();
                    return Ok((slot, replies));
                }
            }
            now = Instant::now();
        }
    }
}

/// How often a busy pump looks for requests past their deadline.
const EXPIRY_TICK_US: u64 = 5_000;

/// Delivers the workers' answers on this core and wakes the workers it sent requests to:
/// polls the lanes while there is work, then parks on the wake socket (the workers write to it
/// only when this core announced that it sleeps) or until a connection submits a request.
///
/// Worker wake-ups are issued here, once per round for all the requests the connection tasks
/// submitted in it, rather than at each submit: the scheduler then switches to a worker once
/// per batch, not once per request.
pub async fn pump(reactor: Rc<Reactor>, mut control: UnixStream) {
    let mut buf = [0u8; 256];
    let timeout = reactor.shared.config.request_timeout;
    // Request deadlines are enforced here rather than with a timer per request: every
    // EXPIRY_TICK while busy, and by a timer on the earliest deadline while parked.
    let mut next_check = 0u64;
    let mut earliest = 0u64;
    while !reactor.finished.get() {
        if reactor.shared.stopping() {
            reactor.closing.fire();
        }
        reactor.deliver_pokes();
        let now = monotonic_us();
        let worked = {
            let mut lanes = reactor.lanes.borrow_mut();
            if now >= next_check || (earliest != 0 && now >= earliest) {
                earliest = lanes.expire(now, timeout);
                next_check = now + EXPIRY_TICK_US;
            }
            let woke = lanes.flush_wakes();
            lanes.poll() || woke
        };
        if worked {
            glommio::yield_if_needed().await;
            continue;
        }
        {
            let mut lanes = reactor.lanes.borrow_mut();
            if !lanes.prepare_park() {
                continue;
            }
            // Know the earliest deadline before sleeping.
            earliest = lanes.expire(now, timeout);
        }
        // The monitor's control socket: a recovery, new wake sockets, or a stop. (The
        // workers' own wake sockets are read by `wake_reader`, which notifies `flush`.)
        let read = async {
            if matches!(control.read(&mut buf).await, Ok(n) if n > 0) {
                for n in &reactor.wake_swaps {
                    n.notify();
                }
            }
        };
        if earliest != 0 {
            let wait = Duration::from_micros(earliest.saturating_sub(now).max(1000));
            futures_lite::future::or(
                read,
                futures_lite::future::or(reactor.flush.notified(), glommio::timer::sleep(wait)),
            )
            .await;
        } else {
            futures_lite::future::or(read, reactor.flush.notified()).await;
        }
        reactor.lanes.borrow_mut().cancel_park();
    }
}

/// Reads one slot's wake socket for this core's lane (a worker writes to it when it answered
/// while the pump slept) and wakes the pump. The socket is the worker's own and is replaced at
/// each spawn: at end-of-file (the worker died, or broke it) the reader waits for the next one.
pub async fn wake_reader(reactor: Rc<Reactor>, slot: Arc<Slot>, lane: usize) {
    let mut buf = [0u8; 64];
    let swap = &reactor.wake_swaps[slot.id];
    while !reactor.finished.get() {
        let Some(rx) = slot.take_wake(lane) else {
            swap.notified().await;
            continue;
        };
        // Published by a spawn, after the recovery from the previous worker: this worker's.
        let epoch = slot.epoch.load(Ordering::Acquire);
        let mut stream: UnixStream = moltbot_ipc::wake::adopt_fd(rx.into_owned_fd());
        loop {
            let woke =
                futures_lite::future::or(async { Some(stream.read(&mut buf).await) }, async {
                    swap.notified().await;
                    None
                })
                .await;
            match woke {
                Some(Ok(n)) if n > 0 => {
                    let honest = reactor
                        .lanes
                        .borrow_mut()
                        .get_mut(slot.id)
                        .is_none_or(|l| l.wake_received(n, epoch));
                    if !honest {
                        // Gone, or flooding and being killed: stop listening to it.
                        break;
                    }
                    reactor.flush.notify();
                }
                // End-of-file or an error: this worker is gone (or broke its socket).
                Some(_) => break,
                // A newer socket was published: switch to it.
                None if slot.has_wake(lane) => break,
                None => {}
            }
            if reactor.finished.get() {
                return;
            }
        }
    }
}
