//! The monitor thread: spawns the workers, reaps them, watches heartbeats, memory and request
//! counts, and applies the restart policy.
//!
//! It is a plain thread (not a glommio executor) that sleeps in `poll(2)` on one pidfd per
//! worker plus its own wake socket, with a timeout of half a heartbeat interval: a crash is
//! seen at once, a stall within a tick, a starting worker's readiness within a quarter of the
//! time it took to start. Workers are spawned from this thread, so their
//! parent-death signal is tied to a thread that lives as long as the pool.
//!
//! After a worker is gone the monitor bumps the slot's epoch and wakes every lane owner; each
//! one answers or fails what the dead process held and acknowledges; only then, and after the
//! restart delay, does the successor start, so it never sees a half-recovered lane.

use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use moltbot_ipc::segment::{cell_state, worker_state};
use moltbot_ipc::wake::{WakeHandoff, wake_handoff};
use moltbot_ipc::{WakeReceiver, WakeSender, wake_pair};
use rustix::event::{PollFd, PollFlags};

use crate::config::Config;
use crate::pool::placement::{self, Occupancy, Placement, Side};
use crate::pool::policy::{Decision, ExitKind, RestartPolicy, RestartState};
use crate::pool::slot::{Slot, SlotState, now_ms};
use crate::sandbox::{RecycleCause, RestartReason, Sandbox};

/// What the pool asks of the monitor thread.
pub enum MonitorRequest {
    /// Stop every worker: SIGTERM, wait up to the timeout, then SIGKILL. Replies when done.
    Stop(Duration, oneshot::Sender<()>),
}

/// What the monitor needs to start a worker process.
pub struct SpawnSpec {
    /// The binary to run as `<program> worker ...`.
    pub program: std::path::PathBuf,
    /// Lanes per segment (a wake socket pair per lane is made at each spawn).
    pub lanes: usize,
    /// The agent program each worker bridges to (resolved), and the paths it may read.
    pub agent: Option<AgentCommand>,
    /// The OpenClaw cell each worker relays to (`cell = openclaw`), resolved.
    pub cell: Option<CellCommand>,
    /// Where workers run (`worker_placement`); `None`: anywhere.
    pub placement: Option<Placement>,
}

/// The cell mode's programs, resolved at start so that a missing node or package is said
/// once, by the gateway, rather than by every worker at its first request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellCommand {
    /// The node binary (absolute).
    pub node: std::path::PathBuf,
    /// The package's `openclaw.mjs` (absolute).
    pub openclaw: std::path::PathBuf,
    /// What the worker's Landlock domain must let the cell read and execute: node's
    /// installation prefix, the openclaw package and git's prefix (the gateway runs git).
    pub read_paths: Vec<std::path::PathBuf>,
}

impl CellCommand {
    /// Resolves `cell_node` (default `node` on `PATH`), `cell_openclaw` and git.
    pub fn resolve(config: &Config) -> Result<CellCommand, String> {
        use std::path::{Path, PathBuf};
        let on_path = |name: &str| -> Option<PathBuf> {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        };
        let node = match &config.cell_node {
            Some(p) => p
                .canonicalize()
                .map_err(|e| format!("cell_node {}: {e}", p.display()))?,
            None => on_path("node")
                .and_then(|p| p.canonicalize().ok())
                .ok_or("cell_node is not set and there is no `node` on PATH")?,
        };
        let openclaw = config
            .cell_openclaw
            .as_ref()
            .ok_or("cell = openclaw needs cell_openclaw (the package's openclaw.mjs)")?;
        let openclaw = openclaw
            .canonicalize()
            .ok()
            .filter(|p| p.is_file())
            .ok_or_else(|| format!("cell_openclaw {}: no such file", openclaw.display()))?;
        let git = on_path("git")
            .and_then(|p| p.canonicalize().ok())
            .ok_or("no `git` on PATH: the OpenClaw gateway needs it")?;
        // `<prefix>/bin/tool`: the whole prefix (libraries, git's helpers in libexec/).
        let prefix = |exe: &Path| -> PathBuf {
            let dir = exe.parent().unwrap_or(exe);
            match dir.file_name() {
                Some(n) if n == "bin" => dir.parent().unwrap_or(dir).to_path_buf(),
                _ => dir.to_path_buf(),
            }
        };
        let package = openclaw.parent().unwrap_or(&openclaw);
        // The package's dependencies live beside it (`node_modules/openclaw` within
        // `node_modules`): read the enclosing node_modules when there is one.
        let package = match package.parent() {
            Some(nm) if nm.file_name().is_some_and(|n| n == "node_modules") => nm,
            _ => package,
        };
        let mut read_paths = vec![prefix(&node), package.to_path_buf(), prefix(&git)];
        read_paths.sort();
        read_paths.dedup();
        Ok(CellCommand {
            node,
            openclaw,
            read_paths,
        })
    }
}

/// A `worker_command` resolved against the gateway's working directory and `PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCommand {
    /// Program (absolute) and arguments (file arguments made absolute).
    pub argv: Vec<String>,
    /// Read-only paths the program needs under Landlock: its installation and the
    /// directories of the files it was given.
    pub read_paths: Vec<std::path::PathBuf>,
}

impl AgentCommand {
    /// Resolves `argv`: the program on `PATH` (or relative to the current directory if it
    /// has a `/`), and every argument that names an existing file to an absolute path, because
    /// the program runs with its sandbox as working directory.
    pub fn resolve(argv: &[String], extra: &[std::path::PathBuf]) -> Result<AgentCommand, String> {
        use std::path::{Path, PathBuf};
        let (program, args) = argv.split_first().ok_or("worker_command is empty")?;
        let found: Option<PathBuf> = if program.contains('/') {
            Some(PathBuf::from(program))
        } else {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(program))
                    .find(|p| p.is_file())
            })
        };
        let program = found
            .and_then(|p| p.canonicalize().ok())
            .ok_or_else(|| format!("worker_command: program {program:?} not found"))?;
        let mut read_paths: Vec<PathBuf> = extra.to_vec();
        if let Some(dir) = program.parent() {
            // `<prefix>/bin/tool`: the whole prefix (its libraries live beside bin/).
            let prefix = match dir.file_name() {
                Some(n) if n == "bin" => dir.parent().unwrap_or(dir),
                _ => dir,
            };
            read_paths.push(prefix.to_path_buf());
        }
        let mut out = vec![program.to_string_lossy().into_owned()];
        for a in args {
            let p = Path::new(a);
            match p.canonicalize() {
                Ok(abs) if abs.is_file() => {
                    if let Some(dir) = abs.parent() {
                        read_paths.push(dir.to_path_buf());
                    }
                    out.push(abs.to_string_lossy().into_owned());
                }
                _ => out.push(a.clone()),
            }
        }
        read_paths.sort();
        read_paths.dedup();
        Ok(AgentCommand {
            argv: out,
            read_paths,
        })
    }
}

struct Proc {
    child: Child,
    pidfd: Option<OwnedFd>,
    pid: u32,
    started: Instant,
}

impl Proc {
    /// A process just started, with a pidfd to wait on (none on kernels before 5.3: the tick
    /// finds its exit then).
    fn new(child: Child) -> Proc {
        let pid = child.id();
        let pidfd = rustix::process::Pid::from_raw(pid as i32).and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });
        Proc {
            child,
            pidfd,
            pid,
            started: Instant::now(),
        }
    }

    /// Kills and reaps it (it is this process's child: the pid cannot have been reused).
    fn discard(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Phase {
    Running {
        proc: Proc,
        heartbeat: u64,
        heartbeat_at: Instant,
        ready: bool,
        /// Set when the monitor killed it or asked it to leave, and why.
        ending: Option<(ExitKind, RestartReason)>,
        /// Graceful recycle: SIGTERM sent; SIGKILL at this instant.
        recycle_deadline: Option<Instant>,
    },
    Waiting {
        epoch: u64,
        at: Instant,
        reason: RestartReason,
    },
    Failed {
        epoch: u64,
        until: Instant,
    },
    Stopped,
}

/// A slot's started successor (`worker_standby`): executed, attached and confined, it waits
/// on its hand-off channel until the monitor sends it the lanes' wake sockets.
struct Standby {
    proc: Proc,
    /// The parent's end of the hand-off channel; dropped unsent, it releases the standby.
    handoff: WakeHandoff,
    /// Its request limit (`--max-requests`), drawn when it was started.
    max_requests: u64,
}

struct SlotRt {
    slot: Arc<Slot>,
    sandbox: Sandbox,
    phase: Phase,
    restart: RestartState,
    max_requests: u64,
    /// The worker's CPU use and side (`worker_placement`).
    occupancy: Occupancy,
    /// The successor waiting beside the worker, if any.
    standby: Option<Standby>,
    /// A standby was started for the current worker: one per worker, so that one that ends
    /// on its own (a binary that cannot start) is not started again and again; the next
    /// worker is spawned cold instead.
    standby_tried: bool,
}

/// The monitor's state; `run` is its thread body.
pub struct Monitor {
    config: Arc<Config>,
    policy: RestartPolicy,
    spec: SpawnSpec,
    slots: Vec<SlotRt>,
    lane_wakers: Vec<Arc<WakeSender>>,
    wake: WakeReceiver,
    commands: crossbeam::channel::Receiver<MonitorRequest>,
}

/// The shortest wait between two looks at a starting worker.
const READY_POLL_MIN: Duration = Duration::from_millis(1);

/// How long after a look the monitor looks again at a worker started `age` ago that does not
/// serve yet: a quarter of its age, from 1 ms up to the tick. A worker is usually up within
/// milliseconds, and until the monitor sees it the slot counts as down for `/readyz`; one that
/// takes seconds (an agent program, a cell) costs a few dozen looks, not one per millisecond.
fn ready_poll(age: Duration, tick: Duration) -> Duration {
    (age / 4).clamp(READY_POLL_MIN, tick.max(READY_POLL_MIN))
}

/// Moves worker `pid` of `slot` to the CPUs of `side` and records where it runs.
fn place(slot: &Slot, pid: u32, placement: &Placement, side: Side) {
    match placement::move_process(pid, placement.cpus(side)) {
        Ok(_) => slot.stats.side.store(side.code(), Ordering::Relaxed),
        Err(e) => {
            tracing::warn!(worker = %slot.worker_id, pid, "moving to the {} CPUs: {e}", side.as_str());
        }
    }
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown".into(),
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

impl Monitor {
    /// A monitor for `slots` (each with its prepared sandbox).
    pub fn new(
        config: Arc<Config>,
        spec: SpawnSpec,
        slots: Vec<(Arc<Slot>, Sandbox)>,
        lane_wakers: Vec<Arc<WakeSender>>,
        wake: WakeReceiver,
        commands: crossbeam::channel::Receiver<MonitorRequest>,
    ) -> Monitor {
        let slots = slots
            .into_iter()
            .map(|(slot, sandbox)| SlotRt {
                slot,
                sandbox,
                phase: Phase::Waiting {
                    epoch: 0,
                    at: Instant::now(),
                    reason: RestartReason::Initial,
                },
                restart: RestartState::default(),
                max_requests: config.jittered_max_requests(rand::random::<f64>()),
                occupancy: Occupancy::starting(),
                standby: None,
                standby_tried: false,
            })
            .collect();
        Monitor {
            policy: RestartPolicy::new(config.clone()),
            config,
            spec,
            slots,
            lane_wakers,
            wake,
            commands,
        }
    }

    fn tick(&self) -> Duration {
        (self.config.heartbeat_interval / 2)
            .clamp(Duration::from_millis(5), Duration::from_millis(500))
    }

    /// The thread body: runs until a Stop command (or the pool is dropped).
    pub fn run(mut self) {
        loop {
            self.sleep();
            self.wake.drain();
            match self.commands.try_recv() {
                Ok(MonitorRequest::Stop(grace, done)) => {
                    self.stop_all(grace);
                    let _ = done.send(());
                    return;
                }
                Err(crossbeam::channel::TryRecvError::Disconnected) => {
                    self.stop_all(Duration::ZERO);
                    return;
                }
                Err(crossbeam::channel::TryRecvError::Empty) => {}
            }
            for i in 0..self.slots.len() {
                // A fresh instant per slot: a respawn in an earlier slot's step can block for
                // long (it writes sandbox.json and empties the sandbox's temp and cache on a
                // disk that may be busy), and a stale `now` would skew this slot's deadlines
                // and run times.
                self.step(i, Instant::now());
                self.keep_standby(i);
            }
        }
    }

    /// How long the monitor may sleep from `now`: until the next tick, a restart that is due,
    /// or the next look at a worker that has not said it serves yet.
    fn sleep_timeout(&self, now: Instant) -> Duration {
        let tick = self.tick();
        let mut timeout = tick;
        for s in &self.slots {
            let due = match &s.phase {
                // Until every lane has recovered, the restart waits for their acknowledgement,
                // which wakes the monitor: no sooner look would find it due.
                Phase::Waiting { epoch, at, .. } if s.slot.all_lanes_acked(*epoch) => Some(*at),
                Phase::Failed { epoch, until } if s.slot.all_lanes_acked(*epoch) => Some(*until),
                Phase::Running {
                    proc, ready: false, ..
                } => Some(now + ready_poll(now.saturating_duration_since(proc.started), tick)),
                _ => None,
            };
            if let Some(due) = due {
                timeout = timeout.min(due.saturating_duration_since(now));
            }
        }
        timeout
    }

    /// Sleeps until a worker exits, someone wakes the monitor, or [`Monitor::sleep_timeout`].
    fn sleep(&self) {
        let timeout = self.sleep_timeout(Instant::now());
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(self.slots.len() + 1);
        fds.push(PollFd::new(&self.wake, PollFlags::IN));
        for s in &self.slots {
            if let Phase::Running { proc, .. } = &s.phase
                && let Some(fd) = &proc.pidfd
            {
                fds.push(PollFd::from_borrowed_fd(fd.as_fd(), PollFlags::IN));
            }
            // A standby that ends is reaped at once.
            if let Some(fd) = s.standby.as_ref().and_then(|sb| sb.proc.pidfd.as_ref()) {
                fds.push(PollFd::from_borrowed_fd(fd.as_fd(), PollFlags::IN));
            }
        }
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        let _ = rustix::event::poll(&mut fds, Some(&ts));
    }

    fn notify_lanes(&self) {
        for w in &self.lane_wakers {
            w.notify();
        }
    }

    fn step(&mut self, i: usize, now: Instant) {
        let stall = self.config.stall_timeout();
        let max_memory = self.config.worker_memory_limit();
        let drain = self.config.drain_timeout;
        let cell_mode = self.spec.cell.is_some();
        let rt = &mut self.slots[i];
        let slot = rt.slot.clone();
        let h = slot.segment.header();
        match &mut rt.phase {
            Phase::Running {
                proc,
                heartbeat,
                heartbeat_at,
                ready,
                ending,
                recycle_deadline,
            } => {
                match proc.child.try_wait() {
                    Ok(Some(status)) => {
                        self.on_exit(i, status, now);
                        return;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(worker = %slot.worker_id, "waitpid: {e}"),
                }
                if let Some(why) = slot.take_kill_request() {
                    tracing::error!(worker = %slot.worker_id, pid = proc.pid, "killing: protocol violation: {why}");
                    signal(proc.pid, rustix::process::Signal::KILL);
                    *ending = Some((ExitKind::Violation, RestartReason::Protocol(why)));
                }
                if !*ready
                    && ending.is_none()
                    && h.worker_state.load(Ordering::Acquire) == worker_state::SERVING
                {
                    *ready = true;
                    if slot.state() == SlotState::Starting {
                        slot.set_state(SlotState::Ready);
                    }
                    // Saying it serves is a sign of life seen now: `/status` never shows a
                    // ready worker that was never seen alive (`lastHeartbeat` 0).
                    slot.stats
                        .last_heartbeat_ms
                        .store(now_ms(), Ordering::Relaxed);
                    slot.set_replacing(false);
                    tracing::info!(worker = %slot.worker_id, pid = proc.pid, "ready");
                    if let Some(placement) = &self.spec.placement {
                        let side = rt.occupancy.serving();
                        place(&slot, proc.pid, placement, side);
                    }
                }
                let hb = h.heartbeat.load(Ordering::Relaxed);
                if hb != *heartbeat {
                    *heartbeat = hb;
                    *heartbeat_at = now;
                    slot.stats
                        .last_heartbeat_ms
                        .store(now_ms(), Ordering::Relaxed);
                } else if now.duration_since(*heartbeat_at) > stall && ending.is_none() {
                    tracing::error!(
                        worker = %slot.worker_id,
                        pid = proc.pid,
                        "no heartbeat for {:?}: killing the stalled worker",
                        now.duration_since(*heartbeat_at)
                    );
                    signal(proc.pid, rustix::process::Signal::KILL);
                    *ending = Some((ExitKind::Stalled, RestartReason::Stalled));
                }
                if let Some(own) = crate::pool::proc::rss_bytes(proc.pid) {
                    let rss = if cell_mode {
                        own + measure_cell(&slot, proc.pid)
                    } else {
                        own
                    };
                    slot.stats.rss_bytes.store(rss, Ordering::Relaxed);
                    if rss > max_memory && ending.is_none() && *ready {
                        tracing::warn!(worker = %slot.worker_id, rss, max_memory, "over max_memory: recycling");
                        signal(proc.pid, rustix::process::Signal::TERM);
                        *ending = Some((
                            ExitKind::Requested,
                            RestartReason::Recycled(RecycleCause::MaxMemory),
                        ));
                        *recycle_deadline = Some(now + drain);
                        slot.set_replacing(true);
                        slot.set_state(SlotState::Draining);
                    }
                }
                if let Some(placement) = &self.spec.placement
                    && *ready
                    && rt.occupancy.due(now)
                    && let Some(used) = crate::pool::proc::cpu_time(proc.pid)
                    && let Some(side) = rt.occupancy.look(now, used, placement.busy_share())
                {
                    let why = match side {
                        Side::Spare => "busy",
                        Side::Cores => "quiet again",
                    };
                    tracing::info!(worker = %slot.worker_id, pid = proc.pid, "{why}: moving to the {} CPUs", side.as_str());
                    place(&slot, proc.pid, placement, side);
                }
                let served = h.requests_served.load(Ordering::Relaxed);
                if served >= rt.max_requests && ending.is_none() && *ready {
                    tracing::info!(worker = %slot.worker_id, served, "max_requests reached: recycling");
                    signal(proc.pid, rustix::process::Signal::TERM);
                    *ending = Some((
                        ExitKind::Requested,
                        RestartReason::Recycled(RecycleCause::MaxRequests),
                    ));
                    *recycle_deadline = Some(now + drain);
                    slot.set_replacing(true);
                    slot.set_state(SlotState::Draining);
                }
                if let Some(deadline) = recycle_deadline
                    && now >= *deadline
                {
                    tracing::warn!(worker = %slot.worker_id, "did not exit within the drain timeout: killing");
                    signal(proc.pid, rustix::process::Signal::KILL);
                    *recycle_deadline = None;
                }
            }
            Phase::Waiting { epoch, at, reason } => {
                if now >= *at && slot.all_lanes_acked(*epoch) {
                    let reason = reason.clone();
                    self.spawn(i, reason, now);
                }
            }
            Phase::Failed { epoch, until } => {
                if now >= *until && slot.all_lanes_acked(*epoch) {
                    tracing::info!(worker = %slot.worker_id, "cool-down over: retrying");
                    self.policy.on_retry(&mut rt.restart);
                    self.spawn(i, RestartReason::Retried, now);
                }
            }
            Phase::Stopped => {}
        }
    }

    fn on_exit(&mut self, i: usize, status: ExitStatus, now: Instant) {
        let rt = &mut self.slots[i];
        let slot = rt.slot.clone();
        let phase = std::mem::replace(&mut rt.phase, Phase::Stopped);
        let Phase::Running { proc, ending, .. } = phase else {
            return;
        };
        // A worker leaves on its own, cleanly, when it reached its request limit.
        let served = slot
            .segment
            .header()
            .requests_served
            .load(Ordering::Relaxed);
        let exiting =
            slot.segment.header().worker_state.load(Ordering::Acquire) == worker_state::EXITING;
        let ending = match ending {
            None if status.success() && served >= rt.max_requests => Some((
                ExitKind::Requested,
                RestartReason::Recycled(RecycleCause::MaxRequests),
            )),
            // Told to stop by someone else (SIGTERM to the process group) and left cleanly:
            // not a crash, though it is replaced.
            None if status.success() && exiting => {
                Some((ExitKind::Requested, RestartReason::Exited))
            }
            e => e,
        };
        let (kind, reason) = match ending {
            Some((ExitKind::Requested, r)) if status.success() => (ExitKind::Requested, r),
            Some((ExitKind::Requested, _)) | None => {
                (ExitKind::Crashed, RestartReason::Crashed(describe(&status)))
            }
            Some(other) => other,
        };
        let ran = now.duration_since(proc.started);
        if kind != ExitKind::Requested {
            slot.stats.crashes.fetch_add(1, Ordering::Relaxed);
            tracing::error!(worker = %slot.worker_id, pid = proc.pid, ran = ?ran, "worker ended: {reason}");
        } else {
            tracing::info!(worker = %slot.worker_id, pid = proc.pid, "worker recycled: {reason}");
        }
        slot.stats.pid.store(0, Ordering::Relaxed);
        slot.stats.cell_pid.store(0, Ordering::Relaxed);
        slot.stats.cell_rss_bytes.store(0, Ordering::Relaxed);
        slot.segment.header().worker_pid.store(0, Ordering::Relaxed);
        // Only a recycle that ended cleanly stays a planned replacement.
        slot.set_replacing(
            kind == ExitKind::Requested && matches!(reason, RestartReason::Recycled(_)),
        );
        let decision = self.policy.on_exit(&mut rt.restart, &kind, ran, now);
        // The state is set before the epoch is bumped: lanes read it while recovering.
        let epoch = match decision {
            Decision::RestartAfter(delay) => {
                slot.set_state(if kind == ExitKind::Requested {
                    SlotState::Starting
                } else {
                    SlotState::Crashed
                });
                let epoch = slot.epoch.fetch_add(1, Ordering::AcqRel) + 1;
                rt.phase = Phase::Waiting {
                    epoch,
                    at: now + delay,
                    reason,
                };
                epoch
            }
            Decision::FailUntil(until) => {
                let wait = until.saturating_duration_since(now);
                slot.stats
                    .failed_until_ms
                    .store(now_ms() + wait.as_millis() as u64, Ordering::Relaxed);
                tracing::error!(
                    worker = %slot.worker_id,
                    "restart limit reached ({} crashes within {:?}): failed for {wait:?}",
                    rt.restart.recent_crashes(),
                    self.config.restart_window
                );
                slot.set_state(SlotState::Failed);
                let epoch = slot.epoch.fetch_add(1, Ordering::AcqRel) + 1;
                rt.phase = Phase::Failed { epoch, until };
                epoch
            }
        };
        tracing::debug!(worker = %slot.worker_id, epoch, "lanes asked to recover");
        self.notify_lanes();
    }

    /// Starts a process in slot `i`. `decided` is when the monitor decided to; the sandbox's
    /// preparation and record writes (slow on a busy disk) lie in between.
    fn spawn(&mut self, i: usize, reason: RestartReason, decided: Instant) {
        let rt = &mut self.slots[i];
        let slot = rt.slot.clone();
        let initial = reason == RestartReason::Initial;
        // A standby that is still there takes the slot; it has not touched the sandbox, which
        // is made fresh below before it gets its sockets, as for a process spawned now.
        let standby = rt
            .standby
            .take()
            .and_then(|mut sb| match sb.proc.child.try_wait() {
                Ok(None) => Some(sb),
                Ok(Some(_)) => None,
                Err(_) => {
                    sb.proc.discard();
                    None
                }
            });
        slot.stats.standby_pid.store(0, Ordering::Relaxed);
        rt.standby_tried = false;
        // Written with the pid once the process is there (`record_pid`), after the sockets are
        // sent: a standby starts serving without waiting for the file.
        let generation = match rt.sandbox.prepare_start(reason.clone()) {
            Ok(g) => g,
            Err(e) => {
                // The in-memory record counts the start all the same.
                tracing::warn!(worker = %slot.worker_id, "sandbox record: {e}");
                rt.sandbox.generation()
            }
        };
        if !initial {
            slot.stats.restarts.fetch_add(1, Ordering::Relaxed);
        }
        let h = slot.segment.header();
        h.generation.store(generation, Ordering::Relaxed);
        h.worker_state
            .store(worker_state::STARTING, Ordering::Release);
        h.requests_served.store(0, Ordering::Relaxed);
        h.start_time_ms.store(now_ms(), Ordering::Relaxed);
        // A fresh worker has no cell yet (its predecessor's died with it).
        h.cell_state.store(
            if self.spec.cell.is_some() {
                cell_state::STOPPED
            } else {
                cell_state::NONE
            },
            Ordering::Relaxed,
        );
        h.cell_pid.store(0, Ordering::Relaxed);
        slot.stats.cell_pid.store(0, Ordering::Relaxed);
        slot.stats.cell_rss_bytes.store(0, Ordering::Relaxed);
        slot.set_state(SlotState::Starting);
        rt.max_requests = standby.as_ref().map_or_else(
            || self.config.jittered_max_requests(rand::random::<f64>()),
            |sb| sb.max_requests,
        );

        // Wake sockets of its own, one per lane: the sending ends go to this process only
        // (passed over its standard input right after the spawn, closed here right after that,
        // so the receivers see end-of-file when it dies); the receiving ends wait in the slot
        // for the lanes' owners, who are told below.
        let mut senders = Vec::with_capacity(self.spec.lanes);
        let mut pairs_ok = Ok(());
        for lane in 0..self.spec.lanes {
            match wake_pair() {
                Ok((tx, rx)) => {
                    senders.push(tx);
                    slot.publish_wake(lane, rx);
                }
                Err(e) => {
                    pairs_ok = Err(format!("wake socket: {e}"));
                    break;
                }
            }
        }
        let result = match pairs_ok {
            Err(e) => {
                if let Some(sb) = standby {
                    sb.proc.discard();
                }
                Err(e)
            }
            Ok(()) => {
                let taken = standby.and_then(|sb| match sb.handoff.send(&senders) {
                    Ok(()) => Some(sb.proc),
                    Err(e) => {
                        // It ended or broke its channel since the look above: a process
                        // started now takes the slot instead.
                        tracing::warn!(worker = %slot.worker_id, pid = sb.proc.pid, "the standby did not take its wake sockets: {e}");
                        sb.proc.discard();
                        None
                    }
                });
                match taken {
                    Some(proc) => Ok((proc, true)),
                    None => start_process(
                        &self.config,
                        &self.spec,
                        &slot,
                        &rt.sandbox,
                        rt.max_requests,
                        false,
                    )
                    .map(|(child, handoff)| {
                        if let Err(e) = handoff.send(&senders) {
                            // The worker exits when it does not get its sockets: reaped as a
                            // crash.
                            tracing::warn!(worker = %slot.worker_id, "sending the wake sockets: {e}");
                        }
                        (Proc::new(child), false)
                    }),
                }
            }
        };
        drop(senders);
        for w in &self.lane_wakers {
            w.notify();
        }
        match result {
            Ok((mut proc, took_over)) => {
                let pid = proc.pid;
                h.worker_pid.store(pid, Ordering::Relaxed);
                slot.stats.pid.store(pid, Ordering::Relaxed);
                rt.occupancy = Occupancy::starting();
                slot.stats.side.store(
                    self.spec
                        .placement
                        .as_ref()
                        .map_or(0, |_| Side::Spare.code()),
                    Ordering::Relaxed,
                );
                slot.stats.started_at_ms.store(now_ms(), Ordering::Relaxed);
                slot.stats.rss_bytes.store(0, Ordering::Relaxed);
                if let Err(e) = rt.sandbox.record_pid(pid) {
                    tracing::warn!(worker = %slot.worker_id, "sandbox record: {e}");
                }
                if took_over {
                    tracing::info!(worker = %slot.worker_id, pid, generation, "standby took over ({reason})");
                } else {
                    tracing::info!(worker = %slot.worker_id, pid, generation, "spawned ({reason})");
                }
                // The stall clock starts now, not when the spawn was decided: preparing the
                // sandbox and recording the start can take longer than the stall timeout on a
                // busy disk, and the fresh worker was then killed as stalled
                // before its first heartbeat (found by tests/chaos.rs).
                let started = Instant::now();
                let took = started.saturating_duration_since(decided);
                if took >= self.config.stall_timeout() / 2 {
                    tracing::warn!(worker = %slot.worker_id, ?took, "slow respawn: the monitor was blocked (a slow disk? the sandbox is prepared and sandbox.json written before a spawn)");
                }
                proc.started = started;
                rt.phase = Phase::Running {
                    heartbeat: h.heartbeat.load(Ordering::Relaxed),
                    heartbeat_at: started,
                    proc,
                    ready: false,
                    ending: None,
                    recycle_deadline: None,
                };
            }
            Err(e) => {
                // As above: the attempt may have taken long; the retry delay counts from now.
                let now = Instant::now();
                tracing::error!(worker = %slot.worker_id, "cannot spawn the worker: {e}");
                if let Err(e) = rt.sandbox.write_record() {
                    tracing::warn!(worker = %slot.worker_id, "sandbox record: {e}");
                }
                // Counted like a crash, so that a broken binary ends in `failed`.
                let decision =
                    self.policy
                        .on_exit(&mut rt.restart, &ExitKind::Crashed, Duration::ZERO, now);
                let epoch = slot.epoch.load(Ordering::Acquire);
                rt.phase = match decision {
                    Decision::RestartAfter(d) => {
                        slot.set_state(SlotState::Crashed);
                        Phase::Waiting {
                            epoch,
                            at: now + d,
                            reason: RestartReason::Crashed(format!("spawn failed: {e}")),
                        }
                    }
                    Decision::FailUntil(until) => {
                        slot.stats.failed_until_ms.store(
                            now_ms() + until.saturating_duration_since(now).as_millis() as u64,
                            Ordering::Relaxed,
                        );
                        slot.set_state(SlotState::Failed);
                        let epoch = slot.epoch.fetch_add(1, Ordering::AcqRel) + 1;
                        Phase::Failed { epoch, until }
                    }
                };
                if matches!(rt.phase, Phase::Failed { .. }) {
                    self.notify_lanes();
                }
            }
        }
    }

    /// Reaps slot `i`'s standby if it ended, and starts one beside a worker that serves when
    /// `worker_standby` asks for it and none was started for this worker yet.
    fn keep_standby(&mut self, i: usize) {
        let wanted =
            self.config.worker_standby && self.spec.agent.is_none() && self.spec.cell.is_none();
        let rt = &mut self.slots[i];
        if let Some(sb) = &mut rt.standby {
            match sb.proc.child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    tracing::warn!(worker = %rt.slot.worker_id, pid = sb.proc.pid, "the standby ended before it served: {}", describe(&status));
                    rt.slot.stats.standby_pid.store(0, Ordering::Relaxed);
                    rt.standby = None;
                }
                Err(e) => tracing::warn!(worker = %rt.slot.worker_id, "waitpid: {e}"),
            }
        }
        let serving = matches!(
            rt.phase,
            Phase::Running {
                ready: true,
                ending: None,
                ..
            }
        );
        if !wanted || !serving || rt.standby.is_some() || rt.standby_tried {
            return;
        }
        rt.standby_tried = true;
        let max_requests = self.config.jittered_max_requests(rand::random::<f64>());
        match start_process(
            &self.config,
            &self.spec,
            &rt.slot,
            &rt.sandbox,
            max_requests,
            true,
        ) {
            Ok((child, handoff)) => {
                let proc = Proc::new(child);
                rt.slot.stats.standby_pid.store(proc.pid, Ordering::Relaxed);
                tracing::debug!(worker = %rt.slot.worker_id, pid = proc.pid, "standby started");
                rt.standby = Some(Standby {
                    proc,
                    handoff,
                    max_requests,
                });
            }
            Err(e) => {
                tracing::warn!(worker = %rt.slot.worker_id, "cannot start a standby: {e}");
            }
        }
    }

    /// Stops every worker: SIGTERM, then SIGKILL after `grace`; reaps them all. Standbys are
    /// released (their channel closed) and told to stop alike.
    fn stop_all(&mut self, grace: Duration) {
        let mut standbys = Vec::new();
        for rt in &mut self.slots {
            rt.slot.set_state(SlotState::Draining);
            if let Phase::Running { proc, .. } = &rt.phase {
                signal(proc.pid, rustix::process::Signal::TERM);
            }
            if let Some(sb) = rt.standby.take() {
                signal(sb.proc.pid, rustix::process::Signal::TERM);
                rt.slot.stats.standby_pid.store(0, Ordering::Relaxed);
                standbys.push(sb.proc);
            }
        }
        let deadline = Instant::now() + grace;
        loop {
            standbys.retain_mut(|p| matches!(p.child.try_wait(), Ok(None)));
            let mut running = standbys.len();
            for rt in &mut self.slots {
                if let Phase::Running { proc, .. } = &mut rt.phase {
                    match proc.child.try_wait() {
                        Ok(Some(_)) | Err(_) => rt.phase = Phase::Stopped,
                        Ok(None) => running += 1,
                    }
                }
            }
            if running == 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for p in standbys {
            p.discard();
        }
        for rt in &mut self.slots {
            if let Phase::Running { proc, .. } = &mut rt.phase {
                tracing::warn!(worker = %rt.slot.worker_id, pid = proc.pid, "did not stop in time: killing");
                let _ = proc.child.kill();
                let _ = proc.child.wait();
            }
            rt.phase = Phase::Stopped;
            rt.slot.stats.pid.store(0, Ordering::Relaxed);
            rt.slot.set_state(SlotState::Stopped);
            rt.slot.epoch.fetch_add(1, Ordering::AcqRel);
        }
        self.notify_lanes();
    }
}

/// Starts `<program> worker` for `slot` (with `--standby`: a standby) on the spare CPUs where
/// workers are placed. Returns the child and the parent's end of its hand-off channel, on
/// which the lanes' wake sockets are to be sent.
fn start_process(
    config: &Config,
    spec: &SpawnSpec,
    slot: &Slot,
    sandbox: &Sandbox,
    max_requests: u64,
    standby: bool,
) -> Result<(Child, WakeHandoff), String> {
    let (handoff, child_end) = wake_handoff().map_err(|e| format!("wake socket: {e}"))?;
    let mut cmd = worker_command(config, spec, slot, sandbox, max_requests, child_end)?;
    if standby {
        cmd.arg("--standby");
    }
    // A starting worker is busy (exec, loading, confining itself): it starts on the spare
    // CPUs and moves beside the cores once it serves. The child inherits the mask of the
    // thread that starts it, this one, which stays there.
    if let Some(set) = spec
        .placement
        .as_ref()
        .and_then(|p| moltbot_ipc::process::cpu_set(p.cpus(Side::Spare)))
    {
        let _ = rustix::thread::sched_setaffinity(None, &set);
    }
    // Nothing runs between fork and exec (the command has no `pre_exec`): std starts it with
    // posix_spawn, without copying the gateway's page tables, whose cores would then take a
    // copy-on-write fault for each page they write (hundreds per spawn, measured).
    moltbot_ipc::process::cloexec_all().map_err(|e| format!("close-on-exec: {e}"))?;
    let child = cmd.spawn().map_err(|e| e.to_string())?;
    // The command holds the child's end of the channel: closed here, so that the worker sees
    // end-of-file if this side goes away.
    drop(cmd);
    Ok((child, handoff))
}

/// The command line and environment of a worker process.
fn worker_command(
    config: &Config,
    spec: &SpawnSpec,
    slot: &Slot,
    sandbox: &Sandbox,
    max_requests: u64,
    wake_channel: std::os::fd::OwnedFd,
) -> Result<Command, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(sandbox.logs_dir().join("worker.log"))
        .map_err(|e| format!("worker log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("worker log: {e}"))?;
    let lanes = spec.lanes;
    let mut cmd = Command::new(&spec.program);
    cmd.arg("worker")
        .arg("--slot")
        .arg(slot.id.to_string())
        .arg("--segment")
        .arg(slot.segment.name())
        .arg("--lanes")
        .arg(lanes.to_string())
        .arg("--parent-pid")
        .arg(std::process::id().to_string())
        .arg("--sandbox")
        .arg(sandbox.root())
        .arg("--heartbeat-ms")
        .arg(config.heartbeat_interval.as_millis().max(1).to_string())
        .arg("--nofile")
        .arg(config.worker_nofile.to_string())
        .arg("--max-requests")
        .arg(max_requests.to_string())
        .arg("--spin-us")
        .arg(
            config
                .worker_spin(lanes, available_cpus())
                .as_micros()
                .to_string(),
        );
    if let Some(placement) = &spec.placement {
        let spare: Vec<String> = placement
            .cpus(Side::Spare)
            .iter()
            .map(|c| c.to_string())
            .collect();
        cmd.arg("--program-cpus").arg(spare.join(","));
    }
    if let Some(limit) = config.worker_address_space_limit(lanes) {
        cmd.arg("--address-space").arg(limit.to_string());
    }
    if !config.landlock {
        cmd.arg("--no-landlock");
    }
    if let Some(agent) = &spec.agent {
        cmd.arg("--command")
            .arg(serde_json::to_string(&agent.argv).unwrap_or_default())
            .arg("--grace-ms")
            .arg(config.drain_timeout.as_millis().to_string())
            .arg("--max-line")
            .arg((config.ring_capacity / 2).max(64 * 1024).to_string());
        for p in &agent.read_paths {
            cmd.arg("--read-path").arg(p);
        }
    }
    if let Some(cell) = &spec.cell {
        let port =
            crate::config::CELL_PORT_STRIDE as usize * slot.id + config.cell_port_base as usize;
        cmd.arg("--cell-node")
            .arg(&cell.node)
            .arg("--cell-openclaw")
            .arg(&cell.openclaw)
            .arg("--cell-port")
            .arg(port.to_string())
            .arg("--cell-idle-ms")
            .arg(config.cell_idle_timeout.as_millis().to_string())
            .arg("--cell-stall-ms")
            .arg(config.stall_timeout().as_millis().to_string())
            .arg("--grace-ms")
            .arg(config.drain_timeout.as_millis().to_string());
        for p in &cell.read_paths {
            cmd.arg("--read-path").arg(p);
        }
        for name in &config.cell_env {
            cmd.arg("--cell-env").arg(name);
        }
    }
    let mut env = sandbox.worker_env(std::env::vars_os());
    if spec.cell.is_some() {
        // The variables named in `cell_env` (model API keys, which the scrubbed worker
        // environment drops as secrets): the worker hands exactly these to its cell. Never
        // one the worker environment sets itself (HOME, TMPDIR...): those stay the sandbox's.
        let own: Vec<std::ffi::OsString> = env.iter().map(|(k, _)| k.clone()).collect();
        for name in &config.cell_env {
            let name = std::ffi::OsString::from(name);
            if !own.contains(&name)
                && let Some(v) = std::env::var_os(&name)
            {
                env.push((name, v));
            }
        }
    }
    cmd.env_clear()
        .envs(env)
        .current_dir(sandbox.root())
        .stdin(Stdio::from(wake_channel))
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    Ok(cmd)
}

/// Cell mode: the resident memory of the worker's descendants (its cell's processes, helpers
/// included), published in the slot's stats with the cell's pid. The pid the worker writes in
/// the segment is shown only when it is one of those descendants: a worker cannot make the
/// status name someone else's process.
fn measure_cell(slot: &Slot, worker: u32) -> u64 {
    let below = crate::pool::proc::descendants(worker);
    let rss: u64 = below
        .iter()
        .filter_map(|&p| crate::pool::proc::rss_bytes(p))
        .sum();
    let claimed = slot.segment.header().cell_pid.load(Ordering::Relaxed);
    let pid = if below.contains(&claimed) { claimed } else { 0 };
    slot.stats.cell_pid.store(pid, Ordering::Relaxed);
    slot.stats.cell_rss_bytes.store(rss, Ordering::Relaxed);
    rss
}

/// CPUs this process may run on (its affinity mask), which its workers inherit.
pub(crate) fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::admission::Admission;
    use moltbot_ipc::{Segment, SegmentLayout};
    use std::os::unix::fs::PermissionsExt;

    /// A monitor of one slot whose "worker" is a script that sleeps (it never heartbeats),
    /// with a long stall timeout. Returns it and its segment's name.
    fn monitor(dir: &std::path::Path) -> (Monitor, String) {
        let program = dir.join("fake-worker");
        std::fs::write(&program, "#!/bin/sh\nexec /bin/sleep 60\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let base = dir.join("base");
        let config = Arc::new(Config {
            sandbox_dir: base.clone(),
            worker_count: 1,
            heartbeat_interval: Duration::from_millis(50),
            stall_timeout: Some(Duration::from_secs(30)),
            ..Config::default()
        });
        let name = format!(
            "/moltbot-monitor-test-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let seg = Segment::create(&name, SegmentLayout::new(1, 4096).unwrap(), 0).unwrap();
        let (monitor_wake, wake) = moltbot_ipc::wake_pair().unwrap();
        let slot = Arc::new(Slot::new(
            0,
            seg,
            1,
            Admission::new(1, 1),
            Arc::new(monitor_wake),
        ));
        let sandbox = Sandbox::prepare(&base, 0).unwrap();
        let (_tx, commands) = crossbeam::channel::unbounded();
        let m = Monitor::new(
            config,
            SpawnSpec {
                program,
                lanes: 1,
                agent: None,
                cell: None,
                placement: None,
            },
            vec![(slot, sandbox)],
            Vec::new(),
            wake,
            commands,
        );
        (m, name)
    }

    /// A respawn that took longer than the stall timeout (a slow disk under the sandbox) must
    /// not count against the new worker: its stall clock starts when it was spawned.
    #[test]
    fn a_slow_spawn_does_not_make_the_new_worker_look_stalled() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, name) = monitor(dir.path());
        // Decided 40 s before the spawn completes (the stall timeout is 30 s).
        let decided = Instant::now()
            .checked_sub(Duration::from_secs(40))
            .expect("monotonic clock past 40 s");
        m.spawn(0, RestartReason::Initial, decided);
        m.step(0, Instant::now());
        let running = matches!(&m.slots[0].phase, Phase::Running { .. });
        let killed = matches!(
            &m.slots[0].phase,
            Phase::Running {
                ending: Some(_),
                ..
            }
        );
        m.stop_all(Duration::ZERO);
        let _ = Segment::unlink(&name);
        assert!(running, "the fake worker did not start");
        assert!(
            !killed,
            "the new worker was killed as stalled before it could heartbeat"
        );
        assert_eq!(m.slots[0].slot.stats.crashes.load(Ordering::Relaxed), 0);
    }

    /// A starting worker is looked at again soon (a quarter of its age, from 1 ms, up to the
    /// tick), so that the slot counts as up as soon as its worker serves, not a tick later.
    #[test]
    fn a_starting_worker_is_looked_at_again_within_a_quarter_of_its_age() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, name) = monitor(dir.path());
        let tick = m.tick();
        assert_eq!(tick, Duration::from_millis(25));
        m.spawn(0, RestartReason::Initial, Instant::now());
        let started = match &m.slots[0].phase {
            Phase::Running { proc, .. } => proc.started,
            _ => panic!("the fake worker did not start"),
        };
        let at = |ms| m.sleep_timeout(started + Duration::from_millis(ms));
        let (young, older, old) = (at(0), at(40), at(10_000));
        m.slots[0]
            .slot
            .segment
            .header()
            .worker_state
            .store(worker_state::SERVING, Ordering::Release);
        m.step(0, Instant::now());
        let serving = m.sleep_timeout(started + Duration::from_millis(40));
        m.stop_all(Duration::ZERO);
        let _ = Segment::unlink(&name);
        assert_eq!(young, READY_POLL_MIN);
        assert_eq!(older, Duration::from_millis(10));
        assert_eq!(old, tick);
        assert_eq!(serving, tick, "a worker that serves is watched at the tick");
    }

    /// A due restart waits for every lane to recover; until then the monitor sleeps (the
    /// acknowledgement wakes it) instead of polling in a loop.
    #[test]
    fn a_restart_waiting_for_the_lanes_does_not_make_the_monitor_poll() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, name) = monitor(dir.path());
        let _ = Segment::unlink(&name);
        let tick = m.tick();
        let now = Instant::now();
        let slot = m.slots[0].slot.clone();
        let phases = [
            Phase::Waiting {
                epoch: 3,
                at: now,
                reason: RestartReason::Exited,
            },
            Phase::Failed {
                epoch: 4,
                until: now,
            },
        ];
        for (epoch, phase) in [3, 4].into_iter().zip(phases) {
            m.slots[0].phase = phase;
            assert_eq!(m.sleep_timeout(now), tick, "not acknowledged: sleep");
            slot.ack_epoch(0, epoch);
            assert_eq!(
                m.sleep_timeout(now),
                Duration::ZERO,
                "acknowledged: due now"
            );
        }
    }

    /// A worker is ready when it says it serves, without waiting for a heartbeat to change.
    #[test]
    fn a_worker_that_says_it_serves_is_ready_at_the_next_look() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, name) = monitor(dir.path());
        m.spawn(0, RestartReason::Initial, Instant::now());
        let slot = m.slots[0].slot.clone();
        m.step(0, Instant::now());
        let before = slot.state();
        // The fake worker never heartbeats; only its state says it serves.
        slot.segment
            .header()
            .worker_state
            .store(worker_state::SERVING, Ordering::Release);
        m.step(0, Instant::now());
        let after = slot.state();
        let seen_alive = slot.stats.last_heartbeat_ms.load(Ordering::Relaxed);
        m.stop_all(Duration::ZERO);
        let _ = Segment::unlink(&name);
        assert_eq!(before, SlotState::Starting);
        assert_eq!(after, SlotState::Ready);
        assert!(seen_alive > 0, "a ready worker was seen alive");
    }

    #[test]
    fn ready_polls_grow_with_the_age_of_the_start_up_to_the_tick() {
        let tick = Duration::from_millis(500);
        assert_eq!(ready_poll(Duration::ZERO, tick), READY_POLL_MIN);
        assert_eq!(
            ready_poll(Duration::from_millis(100), tick),
            Duration::from_millis(25)
        );
        assert_eq!(ready_poll(Duration::from_secs(60), tick), tick);
        // A tick shorter than the minimum (not configurable today) still gives a valid range.
        assert_eq!(
            ready_poll(Duration::from_secs(1), Duration::ZERO),
            READY_POLL_MIN
        );
    }

    #[test]
    fn a_cell_worker_gets_its_port_programs_and_only_the_named_variables() {
        let dir = tempfile::tempdir().unwrap();
        let (m, name) = monitor(dir.path());
        let _ = Segment::unlink(&name);
        let config = Config {
            cell: crate::config::CellMode::OpenClaw,
            cell_port_base: 21_000,
            // Set by cargo for the test process, dropped by the worker environment; HOME is
            // the worker's own and must stay the sandbox's.
            cell_env: vec!["CARGO_PKG_NAME".into(), "HOME".into()],
            ..(*m.config).clone()
        };
        let cell = CellCommand {
            node: "/opt/node/bin/node".into(),
            openclaw: "/opt/oc/openclaw.mjs".into(),
            read_paths: vec!["/opt/node".into(), "/opt/oc".into()],
        };
        let rt = &m.slots[0];
        let build = |cell: Option<CellCommand>| {
            let spec = SpawnSpec {
                program: "/bin/true".into(),
                lanes: 1,
                agent: None,
                cell,
                placement: None,
            };
            let null = std::fs::File::open("/dev/null").unwrap();
            worker_command(&config, &spec, &rt.slot, &rt.sandbox, 1, null.into()).unwrap()
        };
        let cmd = build(Some(cell));
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| -> Vec<&str> {
            args.windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].as_str())
                .collect()
        };
        assert_eq!(after("--cell-port"), ["21000"], "{args:?}");
        assert_eq!(after("--cell-node"), ["/opt/node/bin/node"]);
        assert_eq!(after("--cell-openclaw"), ["/opt/oc/openclaw.mjs"]);
        assert_eq!(after("--read-path"), ["/opt/node", "/opt/oc"]);
        assert_eq!(after("--cell-env"), ["CARGO_PKG_NAME", "HOME"]);
        let env: Vec<(String, String)> = cmd
            .get_envs()
            .filter_map(|(k, v)| {
                Some((
                    k.to_string_lossy().into_owned(),
                    v?.to_string_lossy().into_owned(),
                ))
            })
            .collect();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CARGO_PKG_NAME"), Some(env!("CARGO_PKG_NAME")));
        assert_eq!(get("HOME"), rt.sandbox.root().to_str());

        let plain = build(None);
        assert!(plain.get_envs().all(|(k, _)| k != "CARGO_PKG_NAME"));
        assert!(plain.get_args().all(|a| a != "--cell-port"));
    }

    #[test]
    fn cell_command_resolution_reads_the_prefixes_and_names_a_missing_package() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        let node = dir.join("node/bin/node");
        let package = dir.join("oc/node_modules/openclaw");
        std::fs::create_dir_all(node.parent().unwrap()).unwrap();
        std::fs::create_dir_all(&package).unwrap();
        std::fs::write(&node, "").unwrap();
        std::fs::write(package.join("openclaw.mjs"), "").unwrap();
        let config = |openclaw: &std::path::Path| Config {
            cell: crate::config::CellMode::OpenClaw,
            cell_node: Some(node.clone()),
            cell_openclaw: Some(openclaw.to_path_buf()),
            ..Config::default()
        };
        match CellCommand::resolve(&config(&package.join("openclaw.mjs"))) {
            Ok(c) => {
                assert_eq!(c.node, node);
                // node's prefix and the whole node_modules (the package's dependencies).
                assert!(c.read_paths.contains(&dir.join("node")), "{c:?}");
                assert!(c.read_paths.contains(&dir.join("oc/node_modules")), "{c:?}");
            }
            // A machine without git: the error says so.
            Err(e) => assert!(e.contains("git"), "{e}"),
        }
        let e = CellCommand::resolve(&config(&package.join("missing.mjs"))).unwrap_err();
        assert!(e.contains("missing.mjs"), "{e}");
    }

    #[test]
    fn agent_command_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("agent.py");
        std::fs::write(&script, "print()").unwrap();
        let argv = vec![
            "sh".to_string(),
            script.to_string_lossy().into_owned(),
            "--flag".to_string(),
        ];
        let c = AgentCommand::resolve(&argv, &[]).unwrap();
        assert!(
            c.argv[0].starts_with('/') && c.argv[0].ends_with("sh"),
            "{:?}",
            c.argv
        );
        assert_eq!(c.argv[2], "--flag");
        let canon_dir = dir.path().canonicalize().unwrap();
        assert!(c.read_paths.contains(&canon_dir), "{:?}", c.read_paths);
        assert!(AgentCommand::resolve(&["no-such-program-xyz".to_string()], &[]).is_err());
        assert!(AgentCommand::resolve(&[], &[]).is_err());
    }
}
