//! What every gateway core shares across threads: the configuration, the pool, the metrics,
//! and the lifecycle of the gateway (listening, stopping).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::gateway::ws::hub::Hub;
use crate::metrics::CoreMetrics;
use crate::pool::Pool;
use crate::worker::isolation::LandlockStatus;

/// How the gateway stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGTERM: stop accepting, answer what is in flight (up to the drain timeout), then stop
    /// the workers.
    Drain,
    /// SIGINT, or a second signal during a drain: close everything now.
    Fast,
}

/// Shared by all cores.
pub struct Shared {
    /// The configuration.
    pub config: Arc<Config>,
    /// The worker pool.
    pub pool: Arc<Pool>,
    /// Who each request is.
    pub auth: Arc<Authenticator>,
    /// Per-core metrics, indexed by core.
    pub metrics: Vec<Arc<CoreMetrics>>,
    /// True once every core listens.
    pub listening: AtomicBool,
    /// A stop began: no new connections, keep-alive connections close after their answers.
    draining: AtomicBool,
    /// A fast stop began: connections close now, unanswered requests are dropped.
    fast: AtomicBool,
    /// Notified when a stop begins or turns fast.
    stop_event: event_listener::Event,
    /// Open connections, all cores.
    pub connections: AtomicUsize,
    /// What Landlock enforces for the workers on this kernel.
    pub landlock: LandlockStatus,
    /// When the gateway started.
    pub started: Instant,
    /// Wakes each core's pump (to make it see a stop, or frames for its WebSocket
    /// connections).
    pub core_wakers: Vec<Arc<moltbot_ipc::WakeSender>>,
    /// The WebSocket connections' outboxes, by user.
    pub hub: Hub,
}

impl Shared {
    /// Shared state of a gateway that has not started listening.
    pub fn new(
        config: Arc<Config>,
        pool: Arc<Pool>,
        auth: Arc<Authenticator>,
        cores: usize,
        core_wakers: Vec<Arc<moltbot_ipc::WakeSender>>,
    ) -> Shared {
        // What workers get: nothing when switched off, else what this kernel supports.
        let landlock = if config.landlock {
            crate::worker::isolation::probe_landlock()
        } else {
            LandlockStatus::DISABLED
        };
        Shared {
            config,
            pool,
            auth,
            metrics: (0..cores)
                .map(|_| Arc::new(CoreMetrics::default()))
                .collect(),
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            fast: AtomicBool::new(false),
            stop_event: event_listener::Event::new(),
            connections: AtomicUsize::new(0),
            landlock,
            started: Instant::now(),
            hub: Hub::new(cores, {
                let wakers = core_wakers.clone();
                Box::new(move |core| {
                    if let Some(w) = wakers.get(core) {
                        w.notify();
                    }
                })
            }),
            core_wakers,
        }
    }

    /// True once a stop began (either mode).
    pub fn stopping(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// True once a fast stop began (SIGINT, a second signal, or the drain timeout passed).
    pub fn stopping_fast(&self) -> bool {
        self.fast.load(Ordering::Acquire)
    }

    /// Begins a stop, or turns a drain into a fast stop. Never the other way.
    pub fn begin_stop(&self, mode: StopMode) {
        self.draining.store(true, Ordering::Release);
        if mode == StopMode::Fast {
            self.fast.store(true, Ordering::Release);
        }
        self.stop_event.notify(usize::MAX);
        for w in &self.core_wakers {
            w.notify();
        }
    }

    /// Resolves when a stop begins.
    pub async fn stop_begun(&self) {
        loop {
            let l = self.stop_event.listen();
            if self.stopping() {
                return;
            }
            l.await;
        }
    }
}
