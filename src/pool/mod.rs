//! The worker pool: slots, their segments and sandboxes, the monitor thread, and the lane
//! endpoints that gateway cores and in-process callers drive.

pub mod admission;
pub mod call;
pub mod dispatch;
pub mod lane;
pub mod monitor;
pub mod placement;
pub mod policy;
pub mod proc;
pub mod reply;
pub mod slot;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moltbot_ipc::{Segment, SegmentLayout, WakeReceiver, WakeSender, wake_pair};
use serde::Serialize;

use crate::config::Config;
use crate::pool::admission::Admission;
use crate::pool::lane::LaneSet;
use crate::pool::monitor::{Monitor, MonitorRequest, SpawnSpec};
use crate::pool::slot::{Slot, SlotState, now_ms};
use crate::router::StickyRouter;
use crate::sandbox::Sandbox;

/// Errors starting the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The configuration does not hold.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The sandbox base directory could not be prepared.
    #[error("sandbox base {path}: {source}")]
    Base {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another gateway uses this sandbox base directory.
    #[error("another gateway is running on {0} (its lock is held)")]
    Locked(PathBuf),
    /// A sandbox could not be prepared.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// The routing table could not be opened.
    #[error(transparent)]
    Router(#[from] crate::router::RouterError),
    /// Shared memory could not be set up.
    #[error(transparent)]
    Segment(#[from] moltbot_ipc::SegmentError),
    /// A lane could not be attached.
    #[error("lane: {0}")]
    Ring(#[from] moltbot_ipc::TakeError),
    /// Wake sockets or threads could not be created.
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    /// Workers did not come up.
    #[error("workers not ready within {0:?}: {1}")]
    NotReady(Duration, String),
}

/// A lane for its owner: its lane in every slot plus the socket that wakes it.
pub struct LaneEndpoint {
    /// Lane number.
    pub lane: usize,
    /// The owner's side of the lane in each slot.
    pub set: LaneSet,
    /// The monitor's control socket for this lane: readable when a recovery is due or a slot
    /// has new wake sockets ([`Slot::take_wake`]). Workers wake the owner through those.
    pub wake: WakeReceiver,
    /// Wakes this lane's owner (e.g. to stop it).
    pub waker: Arc<WakeSender>,
}

/// The file naming this run's segments, so that a later run can remove them after a crash.
const SEGMENTS_FILE: &str = "segments.json";
/// Held (flock) while a gateway uses the base directory.
const LOCK_FILE: &str = "gateway.lock";

#[derive(Debug, Serialize, serde::Deserialize)]
struct SegmentsRecord {
    pid: u32,
    names: Vec<String>,
}

/// The worker pool.
pub struct Pool {
    config: Arc<Config>,
    slots: Vec<Arc<Slot>>,
    router: Arc<StickyRouter>,
    lane_wakers: Vec<Arc<WakeSender>>,
    monitor_tx: crossbeam::channel::Sender<MonitorRequest>,
    monitor: Mutex<Option<std::thread::JoinHandle<()>>>,
    monitor_wake: Arc<WakeSender>,
    base: PathBuf,
    started: Instant,
    /// The base directory's lock; released by `stop` (not only on drop), so that a handle to
    /// a stopped pool that someone still holds does not block a new pool on the same base.
    lock: Mutex<Option<File>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("base", &self.base)
            .field("slots", &self.slots.len())
            .finish()
    }
}

fn create_base(path: &Path) -> Result<(), PoolError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| PoolError::Base {
            path: path.to_path_buf(),
            source,
        })
}

fn lock_base(base: &Path) -> Result<File, PoolError> {
    let path = base.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| PoolError::Base {
            path: path.clone(),
            source,
        })?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| PoolError::Locked(base.to_path_buf()))?;
    Ok(file)
}

/// Removes the segments a crashed earlier run left behind (we hold the base lock, so no live
/// gateway uses them).
fn remove_stale_segments(base: &Path) {
    let path = base.join(SEGMENTS_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    match serde_json::from_str::<SegmentsRecord>(&text) {
        Ok(rec) => {
            for name in rec.names {
                if name.starts_with("/moltbot-") && Segment::unlink(&name).is_ok() {
                    tracing::warn!("removed stale segment {name} of gateway pid {}", rec.pid);
                }
            }
        }
        Err(e) => tracing::warn!("ignoring unreadable {}: {e}", path.display()),
    }
    let _ = std::fs::remove_file(&path);
}

fn write_segments(base: &Path, names: &[String]) -> Result<(), PoolError> {
    let rec = SegmentsRecord {
        pid: std::process::id(),
        names: names.to_vec(),
    };
    let path = base.join(SEGMENTS_FILE);
    let text = serde_json::to_vec(&rec).unwrap_or_default();
    let opts = crate::fsutil::WriteOptions {
        mode: 0o666,
        sync: true,
    };
    crate::fsutil::write_atomic(&path, &text, opts)
        .map_err(|source| PoolError::Base { path, source })
}

/// Warns when the cells' ports lie in the kernel's ephemeral range: any outgoing connection
/// on the machine may take one and keep that slot's cell from starting until it closes.
fn warn_of_ephemeral_cell_ports(config: &Config) {
    let first = config.cell_port_base;
    let last = config.last_cell_port().min(u16::MAX as usize) as u16;
    if let Some((n, range)) = crate::cell::ephemeral_overlap(first..=last) {
        tracing::warn!(
            "{n} of the cells' ports {first}-{last} are in the kernel's ephemeral port range \
             {}-{} (net.ipv4.ip_local_port_range): an outgoing connection can take one and \
             keep a cell from starting; keep them below {} (cell_port_base) or reserve the \
             ports in net.ipv4.ip_local_reserved_ports",
            range.start(),
            range.end(),
            range.start()
        );
    }
}

impl Pool {
    /// Starts the pool with `lanes` lane owners and waits until every worker is ready.
    /// Returns the pool and one endpoint per lane. `placement`: where the workers run, beside
    /// the lanes' owners (the gateway's cores) or anywhere (`None`).
    pub fn start(
        config: Arc<Config>,
        lanes: usize,
        placement: Option<crate::pool::placement::Placement>,
    ) -> Result<(Arc<Pool>, Vec<LaneEndpoint>), PoolError> {
        config.validate()?;
        let base = config.sandbox_dir.clone();
        create_base(&base)?;
        let lock = lock_base(&base)?;
        remove_stale_segments(&base);
        let router = match config.cell {
            // A cell serves one user: bounded load at factor 1 fills every slot before any
            // takes a second user, and the limit stops there.
            crate::config::CellMode::OpenClaw => {
                StickyRouter::open(&base, config.worker_count, 1.0)?.one_user_per_slot()
            }
            crate::config::CellMode::None => {
                StickyRouter::open(&base, config.worker_count, config.balance_factor)?
                    .with_max_users(config.max_users)
            }
        };
        let router = Arc::new(router);

        let (monitor_wake, monitor_rx) =
            wake_pair().map_err(|e| PoolError::Io("wake socket", e))?;
        let monitor_wake = Arc::new(monitor_wake);
        // Per lane, the gateway's own control socket: the monitor wakes the lane's owner with
        // it (crash epochs, new worker wake sockets, a stop). Workers never get these; each
        // worker gets wake sockets of its own at each spawn (see the monitor).
        let mut lane_wakers = Vec::with_capacity(lanes);
        let mut lane_receivers = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let (tx, rx) = wake_pair().map_err(|e| PoolError::Io("wake socket", e))?;
            lane_wakers.push(Arc::new(tx));
            lane_receivers.push(rx);
        }

        let layout = SegmentLayout::new(lanes as u32, config.ring_capacity)?;
        let token: u32 = rand::random();
        let mut slots = Vec::with_capacity(config.worker_count);
        let mut sandboxes = Vec::with_capacity(config.worker_count);
        let mut names = Vec::with_capacity(config.worker_count);
        for id in 0..config.worker_count {
            names.push(format!("/moltbot-{}-{token:08x}-w{id}", std::process::id()));
        }
        write_segments(&base, &names)?;
        for (id, name) in names.iter().enumerate() {
            let segment = Segment::create(name, layout, id as u32)?;
            let slot = Arc::new(Slot::new(
                id,
                segment,
                lanes,
                Admission::new(config.max_concurrent, config.max_queue),
                monitor_wake.clone(),
            ));
            sandboxes.push(Sandbox::prepare(&base, id)?);
            slots.push(slot);
        }

        let mut endpoints = Vec::with_capacity(lanes);
        for (lane, wake) in lane_receivers.into_iter().enumerate() {
            endpoints.push(LaneEndpoint {
                lane,
                set: LaneSet::new(&slots, lane)?,
                wake,
                waker: lane_wakers[lane].clone(),
            });
        }

        let program = config
            .resolved_worker_program()
            .map_err(|e| PoolError::Io("worker program", e))?;
        let agent = match &config.worker_command {
            Some(argv) => Some(
                crate::pool::monitor::AgentCommand::resolve(argv, &config.worker_read_paths)
                    .map_err(|e| PoolError::Io("worker_command", std::io::Error::other(e)))?,
            ),
            None => None,
        };
        let cell = match config.cell {
            crate::config::CellMode::OpenClaw => Some(
                crate::pool::monitor::CellCommand::resolve(&config)
                    .map_err(|e| PoolError::Io("cell", std::io::Error::other(e)))?,
            ),
            crate::config::CellMode::None => None,
        };
        if cell.is_some() {
            warn_of_ephemeral_cell_ports(&config);
        }
        let (monitor_tx, commands) = crossbeam::channel::unbounded();
        let monitor = Monitor::new(
            config.clone(),
            SpawnSpec {
                program,
                lanes,
                agent,
                cell,
                placement,
            },
            slots.iter().cloned().zip(sandboxes).collect(),
            lane_wakers.clone(),
            monitor_rx,
            commands,
        );
        let handle = std::thread::Builder::new()
            .name("moltbot-monitor".into())
            .spawn(move || monitor.run())
            .map_err(|e| PoolError::Io("monitor thread", e))?;

        let pool = Arc::new(Pool {
            config,
            slots,
            router,
            lane_wakers,
            monitor_tx,
            monitor: Mutex::new(Some(handle)),
            monitor_wake,
            base,
            started: Instant::now(),
            lock: Mutex::new(Some(lock)),
        });
        Ok((pool, endpoints))
    }

    /// Waits until every slot is serving (`ready`), at most `timeout`.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), PoolError> {
        let deadline = Instant::now() + timeout;
        loop {
            let not_ready: Vec<String> = self
                .slots
                .iter()
                .filter(|s| !matches!(s.state(), SlotState::Ready | SlotState::Busy))
                .map(|s| format!("{} {}", s.worker_id, s.state().as_str()))
                .collect();
            if not_ready.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(PoolError::NotReady(timeout, not_ready.join(", ")));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The slots.
    pub fn slots(&self) -> &[Arc<Slot>] {
        &self.slots
    }

    /// The sticky router.
    pub fn router(&self) -> &Arc<StickyRouter> {
        &self.router
    }

    /// The sandbox base directory.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The status of the pool (the TypeScript pool's `getStatus()`).
    pub fn status(&self) -> PoolStatus {
        let now = now_ms();
        let workers: Vec<WorkerStatus> = self
            .slots
            .iter()
            .map(|s| {
                let st = &s.stats;
                let pid = st.pid.load(Ordering::Relaxed);
                let started = st.started_at_ms.load(Ordering::Relaxed);
                WorkerStatus {
                    worker_id: s.worker_id.clone(),
                    state: s.reported_state().as_str(),
                    pid: (pid != 0).then_some(pid),
                    standby_pid: Some(st.standby_pid.load(Ordering::Relaxed)).filter(|&p| p != 0),
                    requests_processed: st.requests.load(Ordering::Relaxed),
                    active_requests: s.admission.in_flight(),
                    queued_requests: s.admission.queued(),
                    last_heartbeat: st.last_heartbeat_ms.load(Ordering::Relaxed),
                    memory_usage: st.rss_bytes.load(Ordering::Relaxed),
                    uptime: if pid != 0 {
                        now.saturating_sub(started)
                    } else {
                        0
                    },
                    restarts: st.restarts.load(Ordering::Relaxed),
                    crashes: st.crashes.load(Ordering::Relaxed),
                    error_count: st.errors.load(Ordering::Relaxed),
                    generation: s.segment.header().generation.load(Ordering::Relaxed),
                    cpus: crate::pool::placement::side_name(st.side.load(Ordering::Relaxed)),
                    cell: (self.config.cell != crate::config::CellMode::None)
                        .then(|| CellStatus::of(s, pid != 0)),
                }
            })
            .collect();
        PoolStatus {
            total_workers: workers.len(),
            healthy_workers: self.slots.iter().filter(|s| s.serves()).count(),
            busy_workers: workers.iter().filter(|w| w.state == "busy").count(),
            queued_requests: self.slots.iter().map(|s| s.admission.queued()).sum(),
            routing_table_size: self.router.len(),
            routing_table_syncs: self.router.syncs(),
            uptime: self.started.elapsed().as_millis() as u64,
            workers,
        }
    }

    /// Stops every worker (SIGTERM, SIGKILL after `grace`), removes the segments. Idempotent.
    pub fn stop(&self, grace: Duration) {
        let handle = self.monitor.lock().ok().and_then(|mut m| m.take());
        if let Some(handle) = handle {
            let (tx, rx) = oneshot::channel();
            if self
                .monitor_tx
                .send(MonitorRequest::Stop(grace, tx))
                .is_ok()
            {
                self.monitor_wake.notify();
                let _ = rx.recv();
            }
            let _ = handle.join();
            for s in &self.slots {
                let _ = Segment::unlink(s.segment.name());
            }
            let _ = std::fs::remove_file(self.base.join(SEGMENTS_FILE));
            for w in &self.lane_wakers {
                w.notify();
            }
            // No worker and no segment is left: the base is free for the next pool.
            drop(self.lock.lock().ok().and_then(|mut l| l.take()));
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// The pool status (`GET /status`, `getStatus()`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// Slots.
    pub total_workers: usize,
    /// Slots that serve their users: ready or busy, or being replaced by a recycle (see
    /// [`Slot::serves`]).
    pub healthy_workers: usize,
    /// Slots at their concurrency limit.
    pub busy_workers: usize,
    /// Requests waiting for admission, all slots.
    pub queued_requests: usize,
    /// Users in the routing table.
    pub routing_table_size: usize,
    /// Fsyncs of the routing table since the start: one per batch of first assignments.
    pub routing_table_syncs: u64,
    /// Milliseconds since the pool started.
    pub uptime: u64,
    /// Per slot.
    pub workers: Vec<WorkerStatus>,
}

/// One slot in the status.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    /// `worker-N`.
    pub worker_id: String,
    /// `starting | ready | busy | draining | stopped | crashed | failed`.
    pub state: &'static str,
    /// Current process, if any.
    pub pid: Option<u32>,
    /// The standby waiting to take over (`worker_standby`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby_pid: Option<u32>,
    /// Requests answered (all generations).
    pub requests_processed: u64,
    /// Requests admitted and not yet answered.
    pub active_requests: usize,
    /// Requests waiting for admission.
    pub queued_requests: usize,
    /// When the heartbeat last advanced (ms since the epoch).
    pub last_heartbeat: u64,
    /// RSS in bytes.
    pub memory_usage: u64,
    /// Milliseconds the current process has been running.
    pub uptime: u64,
    /// Respawns.
    pub restarts: u64,
    /// Unrequested process deaths (crashes, stalls, violations).
    pub crashes: u64,
    /// Requests that ended in an error.
    pub error_count: u64,
    /// Generation of the current process.
    pub generation: u64,
    /// Where the worker runs (`worker_placement`): `cores` (beside the gateway's cores) or
    /// `spare` (the other CPUs); absent where workers run anywhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<&'static str>,
    /// Cell mode: the slot's OpenClaw cell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cell: Option<CellStatus>,
}

/// A slot's OpenClaw cell in the status (cell mode).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CellStatus {
    /// `stopped | starting | ready | stopping`, as the worker reports it.
    pub state: &'static str,
    /// The cell's main process, once found among the worker's descendants.
    pub pid: Option<u32>,
    /// How long its last start took, from spawn to admitting the worker (ms); none before
    /// the first start.
    pub startup_ms: Option<u64>,
    /// Resident memory of the cell's processes in bytes (also counted in the slot's
    /// `memoryUsage`, which `max_memory` limits).
    pub memory_usage: u64,
}

impl CellStatus {
    fn of(slot: &Slot, worker_alive: bool) -> CellStatus {
        use moltbot_ipc::segment::cell_state;
        let h = slot.segment.header();
        // The worker writes the state; with no worker there is no cell, whatever it last wrote.
        let state = match h.cell_state.load(Ordering::Relaxed) {
            _ if !worker_alive => "stopped",
            cell_state::STARTING => "starting",
            cell_state::READY => "ready",
            cell_state::STOPPING => "stopping",
            _ => "stopped",
        };
        let pid = slot.stats.cell_pid.load(Ordering::Relaxed);
        let startup = h.cell_startup_ms.load(Ordering::Relaxed);
        CellStatus {
            state,
            pid: (pid != 0 && worker_alive).then_some(pid),
            startup_ms: (startup != 0).then_some(startup),
            memory_usage: if worker_alive {
                slot.stats.cell_rss_bytes.load(Ordering::Relaxed)
            } else {
                0
            },
        }
    }
}
