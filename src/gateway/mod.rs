//! The gateway: one glommio executor per core, each pinned to its CPU with its own
//! `SO_REUSEPORT` listener on the same port, routing each request to its user's worker over
//! shared memory.

//! Read top-down: [`shared`] (what all cores share) → [`reactor`] (a core's lanes, pump and
//! dispatch) → [`http`] and [`answer`] (the codec) → [`endpoints`] → [`conn`] (one connection)
//! → [`server`] (the accept loop and a core's life) → [`Gateway`] here.

pub mod answer;
pub mod conn;
pub mod deadline;
pub mod endpoints;
pub mod first_sight;
pub mod http;
mod nofile;
pub mod notify;
pub mod reactor;
pub mod server;
pub mod shared;
pub mod spin;
pub mod ws;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

use crate::auth::Authenticator;
use crate::config::{Config, Cores};
use crate::gateway::server::CoreSetup;
use crate::gateway::shared::Shared;
pub use crate::gateway::shared::StopMode;
use crate::pool::placement;
use crate::pool::{Pool, PoolError};

/// Bytes of io_uring-registered memory per core. The gateway does socket I/O only, which
/// does not use these buffers (they serve glommio's direct file I/O), so a small amount
/// suffices; it is pinned (`RLIMIT_MEMLOCK`) once per ring and glommio has three per executor.
pub const IO_MEMORY: usize = 256 * 1024;
/// glommio refuses to start below this `RLIMIT_MEMLOCK`.
const GLOMMIO_MIN_MEMLOCK: u64 = 512 * 1024;

/// Errors starting the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The pool could not start.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// The port is taken.
    #[error(
        "port {port} on {ip} is already in use (another gateway?); choose another with -p/--port, or -p 0 for any free port"
    )]
    PortInUse {
        /// Address.
        ip: IpAddr,
        /// Port.
        port: u16,
    },
    /// Listening failed otherwise.
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, String),
    /// Not enough locked memory for io_uring.
    #[error(
        "RLIMIT_MEMLOCK is {have} KiB but {cores} gateway cores need {need} KiB for io_uring; run `ulimit -l {need}` (or more) before starting, or use fewer --cores"
    )]
    Memlock {
        /// Current soft limit, KiB.
        have: u64,
        /// Needed, KiB.
        need: u64,
        /// Cores.
        cores: usize,
    },
    /// An executor could not be created.
    #[error("gateway core {0}: {1}")]
    Executor(usize, String),
}

/// How many cores (executors) the gateway runs when `cores` is not set: half the CPUs it may
/// use, at least one. The workers run on the same CPUs (and the clients often do too): with an
/// executor pinned on every CPU, each executor is half as busy, parks and is woken far more
/// often, and the gateway spends more CPU per request for about half the throughput (README,
/// "One executor on this machine").
pub fn default_cores(available: usize) -> usize {
    (available / 2).max(1)
}

/// The CPUs the cores run on, of the `available` ones.
fn core_cpus(config: &Config, available: &[usize]) -> Result<Vec<usize>, GatewayError> {
    let cpus = match &config.cores {
        None => available[..default_cores(available.len())].to_vec(),
        Some(Cores::Count(n)) => {
            if *n == 0 || *n > available.len() {
                return Err(GatewayError::Config(format!(
                    "cores = {n}, but {} CPUs are available",
                    available.len()
                )));
            }
            available[..*n].to_vec()
        }
        Some(Cores::List(list)) => {
            for c in list {
                if !available.contains(c) {
                    return Err(GatewayError::Config(format!(
                        "core {c} is not available (available: {available:?})"
                    )));
                }
            }
            list.clone()
        }
    };
    if cpus.is_empty() {
        return Err(GatewayError::Config("no cores to run on".into()));
    }
    Ok(cpus)
}

/// Makes sure io_uring can lock the memory the cores need, raising the soft limit (and the hard
/// one when privileged) if necessary.
fn ensure_memlock(cores: usize) -> Result<(), GatewayError> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let need = (cores as u64 * 3 * IO_MEMORY as u64 + 256 * 1024).max(GLOMMIO_MIN_MEMLOCK);
    let cur = getrlimit(Resource::Memlock);
    let have = cur.current.unwrap_or(u64::MAX);
    if have >= need {
        return Ok(());
    }
    let hard = cur.maximum.unwrap_or(u64::MAX);
    let new = Rlimit {
        current: Some(need),
        maximum: Some(hard.max(need)),
    };
    if setrlimit(Resource::Memlock, new).is_ok() {
        tracing::info!(
            "raised RLIMIT_MEMLOCK from {} KiB to {} KiB",
            have / 1024,
            need / 1024
        );
        return Ok(());
    }
    Err(GatewayError::Memlock {
        have: have / 1024,
        need: need.div_ceil(1024),
        cores,
    })
}

/// How long the gateway waits for its workers to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    /// Keeps the users table current; stopped with the gateway.
    _auth_watcher: crate::auth::Watcher,
    cores: Vec<glommio::ExecutorJoinHandle<()>>,
    addr: SocketAddr,
    stopped: AtomicBool,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("addr", &self.addr).finish()
    }
}

/// Turns a drain into a fast stop from another thread (a second signal).
#[derive(Clone)]
pub struct FastStop(Arc<Shared>);

impl FastStop {
    /// Stops at once: connections close, unanswered requests are dropped, workers are killed.
    pub fn now(&self) {
        self.0.begin_stop(StopMode::Fast);
    }
}

impl Gateway {
    /// Starts the pool, then the cores; returns when every core listens.
    pub fn start(mut config: Config) -> Result<Gateway, GatewayError> {
        config
            .validate()
            .map_err(|e| GatewayError::Config(e.to_string()))?;
        let available = placement::allowed_cpus();
        let cpus = core_cpus(&config, &available)?;
        ensure_memlock(cpus.len())?;
        // A default max_connections shrinks to what the open-files limit allows.
        config.max_connections = nofile::ensure_nofile(&config, cpus.len());
        // Fail fast on a busy port, before starting workers. A socket without SO_REUSEPORT
        // cannot bind where another group of listeners already is, so this also catches a
        // second gateway that would otherwise share the port silently.
        let ip = config.bind;
        let probe = std::net::TcpListener::bind((ip, config.port)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                GatewayError::PortInUse {
                    ip,
                    port: config.port,
                }
            } else {
                GatewayError::Listen(SocketAddr::new(ip, config.port), e.to_string())
            }
        })?;
        let port = probe
            .local_addr()
            .map_err(|e| GatewayError::Listen(SocketAddr::new(ip, config.port), e.to_string()))?
            .port();
        drop(probe);
        let addr = SocketAddr::new(ip, port);

        // Credentials before workers: a broken users file or JWT key is a start-up error.
        let auth = Arc::new(
            Authenticator::from_config(&config).map_err(|e| GatewayError::Config(e.to_string()))?,
        );
        if !ip.is_loopback() && !auth.can_admit_anyone() {
            return Err(GatewayError::Config(format!(
                "binding the non-loopback address {ip} needs a credential: set {}, add a user \
                 (moltbot users add ID) or configure signed tokens (jwt_*)",
                crate::config::TOKEN_ENV
            )));
        }
        let auth_watcher = crate::auth::Watcher::start(auth.clone())
            .map_err(|e| GatewayError::Config(format!("users file watcher: {e}")))?;

        let config = Arc::new(config);
        let placement = placement::Placement::new(&config, &cpus, &available);
        let workers_beside = placement.is_some();
        let (pool, endpoints) = Pool::start(config.clone(), cpus.len(), placement)?;
        if let Err(e) = pool.wait_ready(START_TIMEOUT) {
            pool.stop(Duration::ZERO);
            return Err(e.into());
        }
        let shared = Arc::new(Shared::new(
            config,
            pool.clone(),
            auth,
            cpus.len(),
            endpoints.iter().map(|e| e.waker.clone()).collect(),
        ));
        let cpu_count = crate::pool::monitor::available_cpus();
        let idle_spin = shared
            .config
            .gateway_spin(cpus.len(), cpu_count, workers_beside);
        let stream_spin = shared.config.gateway_stream_spin(cpus.len(), cpu_count);
        let mut cores = Vec::with_capacity(cpus.len());
        for (id, (endpoint, cpu)) in endpoints.into_iter().zip(cpus).enumerate() {
            let (tx, rx) = std::sync::mpsc::channel();
            let setup = CoreSetup {
                id,
                endpoint,
                shared: shared.clone(),
                addr,
                spin: spin::Spin::new(idle_spin, stream_spin, shared.metrics[id].clone()),
            };
            let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
                .name(&format!("moltbot-core-{id}"))
                .io_memory(IO_MEMORY)
                .spin_before_park(idle_spin)
                .spawn(move || server::run(setup, tx))
                .map_err(|e| GatewayError::Executor(id, e.to_string()));
            let handle = match handle {
                Ok(h) => h,
                Err(e) => {
                    abort_start(&shared, cores);
                    return Err(e);
                }
            };
            match rx.recv() {
                Ok(Ok(_)) => cores.push(handle),
                Ok(Err(msg)) => {
                    let _ = handle.join();
                    abort_start(&shared, cores);
                    return Err(GatewayError::Listen(addr, msg));
                }
                Err(_) => {
                    let _ = handle.join();
                    abort_start(&shared, cores);
                    return Err(GatewayError::Executor(id, "core thread ended".into()));
                }
            }
        }
        shared.listening.store(true, Ordering::Release);
        let port_file = shared.config.sandbox_dir.join("gateway.port");
        if let Err(e) = std::fs::write(&port_file, format!("{port}\n")) {
            tracing::warn!("cannot write {}: {e}", port_file.display());
        }
        if !shared.config.landlock {
            tracing::warn!(
                "Landlock is switched off (landlock = false): workers are not confined to their sandboxes"
            );
        } else if !matches!(
            shared.landlock.enforced,
            crate::worker::isolation::Enforcement::FullyEnforced
        ) {
            tracing::warn!(
                landlock = ?shared.landlock,
                "Landlock is not fully enforced on this kernel: workers are isolated by directories, rlimits and process boundaries only"
            );
        }
        Ok(Gateway {
            shared,
            _auth_watcher: auth_watcher,
            cores,
            addr,
            stopped: AtomicBool::new(false),
        })
    }

    /// The address the cores listen on (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The effective configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.shared.config
    }

    /// The worker pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.shared.pool
    }

    /// A handle that turns a drain under way into a fast stop (for a second signal).
    pub fn fast_stop(&self) -> FastStop {
        FastStop(self.shared.clone())
    }

    /// Stops the gateway. `Drain` waits for in-flight requests (up to the drain timeout),
    /// unless [`FastStop::now`] cuts it short.
    pub fn stop(mut self, mode: StopMode) {
        self.stop_cores_and_pool(mode);
    }

    fn stop_cores_and_pool(&mut self, mode: StopMode) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::info!(?mode, "gateway stopping");
        let began = Instant::now();
        self.shared.begin_stop(mode);
        for h in self.cores.drain(..) {
            let _ = h.join();
        }
        // One drain timeout bounds the whole stop: the workers (and their cells, which take
        // 10–30 s to stop) get what the connections left of it, unless the stop is (or
        // turned) fast; then they are killed.
        let grace = if self.shared.stopping_fast() {
            Duration::ZERO
        } else {
            self.shared
                .config
                .drain_timeout
                .saturating_sub(began.elapsed())
        };
        self.shared.pool.stop(grace);
        tracing::info!("gateway stopped");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop_cores_and_pool(StopMode::Fast);
    }
}

fn abort_start(shared: &Shared, cores: Vec<glommio::ExecutorJoinHandle<()>>) {
    shared.begin_stop(StopMode::Fast);
    for h in cores {
        let _ = h.join();
    }
    shared.pool.stop(Duration::ZERO);
}

#[cfg(test)]
mod tests {
    #[test]
    fn by_default_half_the_cpus_run_executors() {
        let cases = [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (64, 32)];
        for (cpus, want) in cases {
            assert_eq!(super::default_cores(cpus), want, "{cpus} CPUs");
        }
    }
}
