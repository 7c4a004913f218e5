//! One gateway core: a glommio executor pinned to a CPU, with its own `SO_REUSEPORT` listener,
//! its own lane to every worker, and a pump task that delivers the workers' answers.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;
use glommio::net::{TcpListener, UnixStream};
use moltbot_ipc::clock::monotonic_us;

use crate::config::Config;
use crate::gateway::endpoints::Answer;
use crate::metrics::{CoreMetrics, Endpoint};
use crate::pool::lane::LaneSet;
use crate::pool::{LaneEndpoint, Pool};
use crate::worker::isolation::LandlockStatus;

/// What every core shares (across threads).
pub struct Shared {
    /// The configuration.
    pub config: Arc<Config>,
    /// The worker pool.
    pub pool: Arc<Pool>,
    /// Per-core metrics, indexed by core.
    pub metrics: Vec<Arc<CoreMetrics>>,
    /// True once every core listens.
    pub listening: AtomicBool,
    /// SIGTERM: stop accepting, finish what is in flight, close keep-alive connections.
    pub draining: AtomicBool,
    /// SIGINT (or the drain timeout passed): drop everything now.
    pub stop_now: AtomicBool,
    /// Notified when `draining` or `stop_now` is set.
    pub shutdown: event_listener::Event,
    /// Open connections, all cores.
    pub connections: AtomicUsize,
    /// What Landlock enforces for the workers on this kernel.
    pub landlock: LandlockStatus,
    /// When the gateway started.
    pub started: Instant,
    /// Wakes each core's pump (to make it see a shutdown).
    pub core_wakers: Vec<Arc<moltbot_ipc::WakeSender>>,
}

impl Shared {
    /// True once a shutdown began.
    pub fn stopping(&self) -> bool {
        self.draining.load(Ordering::Acquire) || self.stop_now.load(Ordering::Acquire)
    }

    /// Begins a shutdown (`fast`: drop connections at once).
    pub fn begin_shutdown(&self, fast: bool) {
        self.draining.store(true, Ordering::Release);
        if fast {
            self.stop_now.store(true, Ordering::Release);
        }
        self.shutdown.notify(usize::MAX);
        for w in &self.core_wakers {
            w.notify();
        }
    }

    /// Resolves when a shutdown begins.
    pub async fn shutdown_signal(&self) {
        loop {
            let l = self.shutdown.listen();
            if self.stopping() {
                return;
            }
            l.await;
        }
    }
}

/// One core's state (lives on its executor thread).
pub struct Core {
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
    pub done: Cell<bool>,
    /// Wakes the pump: requests were submitted and their workers need waking.
    pub flush: crate::gateway::signal::Notify,
    /// Fired (by the pump) when a shutdown began: idle connections stop waiting.
    pub shutdown: crate::gateway::signal::Signal,
    /// Per slot: tells its wake reader that a new wake socket may wait in the slot.
    pub wake_swaps: Vec<crate::gateway::signal::Notify>,
    /// Users waiting for their first assignment, persisted in batches.
    pub first_sight: Rc<crate::gateway::first_sight::FirstSight>,
}

impl Core {
    /// `/readyz`: 200 while every slot serves and no shutdown began; 503 otherwise.
    pub fn readiness(&self) -> Answer {
        let s = &self.shared;
        let status = s.pool.status();
        let ready = s.listening.load(Ordering::Acquire)
            && !s.stopping()
            && status.healthy_workers == status.total_workers;
        if ready {
            Answer::json(Endpoint::Readyz, 200, br#"{"ready":true}"#.to_vec())
        } else {
            let why = if s.stopping() {
                "draining".to_string()
            } else if !s.listening.load(Ordering::Acquire) {
                "starting".to_string()
            } else {
                format!(
                    "{} of {} workers ready",
                    status.healthy_workers, status.total_workers
                )
            };
            Answer::error(
                Endpoint::Readyz,
                503,
                "NOT_READY",
                &why,
                true,
                Some(Duration::from_secs(1)),
            )
        }
    }

    /// `/healthz`: ok when every worker is healthy, degraded when some are, 503 when none.
    pub fn health(&self) -> Answer {
        let status = self.shared.pool.status();
        let (code, state) = if status.healthy_workers == status.total_workers {
            (200, "ok")
        } else if status.healthy_workers > 0 {
            (200, "degraded")
        } else {
            (503, "unhealthy")
        };
        let body = serde_json::json!({
            "status": state,
            "healthyWorkers": status.healthy_workers,
            "totalWorkers": status.total_workers,
            "draining": self.shared.stopping(),
        });
        Answer::json(
            Endpoint::Healthz,
            code,
            serde_json::to_vec(&body).unwrap_or_default(),
        )
    }

    /// `/status`: the pool status plus the gateway's own facts.
    pub fn status_answer(&self) -> Answer {
        let s = &self.shared;
        let mut v = serde_json::to_value(s.pool.status()).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "gateway".into(),
                serde_json::json!({
                    "cores": s.metrics.len(),
                    "connections": s.connections.load(Ordering::Relaxed),
                    "draining": s.stopping(),
                    "uptimeMs": s.started.elapsed().as_millis() as u64,
                    "landlock": s.landlock,
                    "version": env!("CARGO_PKG_VERSION"),
                }),
            );
        }
        Answer::json(
            Endpoint::Status,
            200,
            serde_json::to_vec(&v).unwrap_or_default(),
        )
    }

    /// `/metrics`: Prometheus text.
    pub fn metrics_answer(&self) -> Answer {
        let s = &self.shared;
        let info = crate::metrics::GatewayInfo {
            version: env!("CARGO_PKG_VERSION"),
            uptime: s.started.elapsed(),
            cores: s.metrics.len(),
            draining: s.stopping(),
        };
        let text = crate::metrics::encode(&s.metrics, &s.pool.status(), &info);
        let mut a = Answer::json(Endpoint::Metrics, 200, text.into_bytes());
        a.content_type = crate::metrics::CONTENT_TYPE;
        a
    }
}

/// Delivers the workers' answers on this core and wakes the workers it sent requests to:
/// polls the lanes while there is work, then parks on the wake socket (the workers write to it
/// only when this core announced that it sleeps) or until a connection submits a request.
///
/// Worker wake-ups are issued here, once per round for all the requests the connection tasks
/// submitted in it, rather than at each submit: the scheduler then switches to a worker once
/// per batch, not once per request.
pub async fn pump(core: Rc<Core>, mut control: UnixStream) {
    let mut buf = [0u8; 256];
    let timeout = core.shared.config.request_timeout;
    // Request deadlines are enforced here rather than with a timer per request: every
    // EXPIRY_TICK while busy, and by a timer on the earliest deadline while parked.
    let mut next_check = 0u64;
    let mut earliest = 0u64;
    while !core.done.get() {
        if core.shared.stopping() {
            core.shutdown.fire();
        }
        let now = monotonic_us();
        let worked = {
            let mut lanes = core.lanes.borrow_mut();
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
            let mut lanes = core.lanes.borrow_mut();
            if !lanes.prepare_park() {
                continue;
            }
            // Know the earliest deadline before sleeping.
            earliest = lanes.expire(now, timeout);
        }
        // The monitor's control socket: a recovery, new wake sockets, or a shutdown. (The
        // workers' own wake sockets are read by `wake_reader`, which notifies `flush`.)
        let read = async {
            if matches!(control.read(&mut buf).await, Ok(n) if n > 0) {
                for n in &core.wake_swaps {
                    n.notify();
                }
            }
        };
        if earliest != 0 {
            let wait = Duration::from_micros(earliest.saturating_sub(now).max(1000));
            futures_lite::future::or(
                read,
                futures_lite::future::or(core.flush.notified(), glommio::timer::sleep(wait)),
            )
            .await;
        } else {
            futures_lite::future::or(read, core.flush.notified()).await;
        }
        core.lanes.borrow_mut().cancel_park();
    }
}

/// Reads one slot's wake socket for this core's lane (a worker writes to it when it answered
/// while the pump slept) and wakes the pump. The socket is the worker's own and is replaced at
/// each spawn: at end-of-file (the worker died, or broke it) the reader waits for the next one.
pub async fn wake_reader(core: Rc<Core>, slot: Arc<crate::pool::slot::Slot>, lane: usize) {
    let mut buf = [0u8; 64];
    let swap = &core.wake_swaps[slot.id];
    while !core.done.get() {
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
                    let honest = core
                        .lanes
                        .borrow_mut()
                        .get_mut(slot.id)
                        .is_none_or(|l| l.wake_received(n, epoch));
                    if !honest {
                        // Gone, or flooding and being killed: stop listening to it.
                        break;
                    }
                    core.flush.notify();
                }
                // End-of-file or an error: this worker is gone (or broke its socket).
                Some(_) => break,
                // A newer socket was published: switch to it.
                None if slot.has_wake(lane) => break,
                None => {}
            }
            if core.done.get() {
                return;
            }
        }
    }
}

/// How often a busy pump looks for requests past their deadline.
const EXPIRY_TICK_US: u64 = 5_000;

/// Accepts connections until a shutdown begins.
pub async fn accept_loop(core: Rc<Core>, listener: TcpListener) {
    let shared = core.shared.clone();
    let max = shared.config.max_connections;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shared.shutdown_signal().await;
            None
        })
        .await;
        let Some(result) = accepted else { return };
        let stream = match result {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                tracing::warn!(core = core.id, "accept: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if core.conns.get() >= max {
            core.metrics.connection_rejected();
            glommio::spawn_local(crate::gateway::conn::reject(stream)).detach();
            continue;
        }
        core.conns.set(core.conns.get() + 1);
        shared.connections.fetch_add(1, Ordering::Relaxed);
        core.metrics.connection_opened();
        let c = core.clone();
        glommio::spawn_local(async move {
            let guard = ConnGuard(c.clone());
            let served = futures_lite::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
                crate::gateway::conn::serve(c, stream),
            ))
            .await;
            if served.is_err() {
                tracing::error!("a connection task panicked; the connection was closed");
            }
            drop(guard);
        })
        .detach();
    }
}

/// Counts a connection out however its task ends.
struct ConnGuard(Rc<Core>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let c = &self.0;
        c.conns.set(c.conns.get().saturating_sub(1));
        c.shared.connections.fetch_sub(1, Ordering::Relaxed);
        c.metrics.connection_closed();
    }
}

/// Everything a core thread needs.
pub struct CoreSetup {
    /// Core number.
    pub id: usize,
    /// Its lane endpoint.
    pub endpoint: LaneEndpoint,
    /// Shared state.
    pub shared: Arc<Shared>,
    /// Where to listen.
    pub addr: SocketAddr,
}

/// The body of a core's executor: listen, accept, serve; on shutdown wait for its connections
/// (up to the drain timeout), then stop.
pub async fn run(setup: CoreSetup, bound: std::sync::mpsc::Sender<Result<SocketAddr, String>>) {
    let CoreSetup {
        id,
        endpoint,
        shared,
        addr,
    } = setup;
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            let _ = bound.send(Err(format!("cannot listen on {addr}: {e}")));
            return;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    let lane = endpoint.lane;
    let wake: UnixStream = moltbot_ipc::wake::adopt_fd(endpoint.wake.into_owned_fd());
    let mut lanes = endpoint.set;
    lanes.set_defer_wakes(true);
    let core = Rc::new(Core {
        id,
        metrics: shared.metrics[id].clone(),
        shared: shared.clone(),
        lanes: RefCell::new(lanes),
        conns: Cell::new(0),
        done: Cell::new(false),
        flush: Default::default(),
        shutdown: Default::default(),
        first_sight: Default::default(),
        wake_swaps: shared
            .pool
            .slots()
            .iter()
            .map(|_| Default::default())
            .collect(),
    });
    for slot in core.shared.pool.slots() {
        glommio::spawn_local(wake_reader(core.clone(), slot.clone(), lane)).detach();
    }
    let pump_task = glommio::spawn_local(pump(core.clone(), wake));
    let _ = bound.send(Ok(local));
    accept_loop(core.clone(), listener).await;
    // Draining: connections finish their requests and close; INT or the timeout cuts it short.
    let deadline = Instant::now() + shared.config.drain_timeout;
    while core.conns.get() > 0
        && !shared.stop_now.load(Ordering::Acquire)
        && Instant::now() < deadline
    {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    core.done.set(true);
    endpoint.waker.notify();
    pump_task.await;
    // Answers a worker wrote after the pump's last round are still delivered; only what is
    // truly unanswered fails.
    let mut lanes = core.lanes.borrow_mut();
    lanes.poll();
    lanes.fail_all(crate::error::RouteError::ShuttingDown);
}
