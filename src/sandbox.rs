//! Per-worker sandboxes: the directory layout, `sandbox.json`, scratch cleanup on respawn and
//! the scrubbed worker environment.
//!
//! Layout: `<base>/worker-N/{sandbox.json, sessions/, state/, cache/, temp/, logs/}`, every
//! directory mode 0700. `sessions/` and `state/` hold user data and survive respawns; `temp/`
//! and `cache/` are emptied before every start of a sandbox that ran before.
//!
//! Everything inside `worker-N/` is writable by the worker, so this module treats it as hostile:
//! it never follows a symlink planted there (links are removed as links), it repairs a
//! directory replaced by a file or link, it reads at most [`MAX_RECORD_BYTES`] of
//! `sandbox.json`, and a corrupt `sandbox.json` only costs the restart history. While the
//! gateway runs, the in-memory record is authoritative; the file is read once, in
//! [`Sandbox::prepare`].

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, DirBuilder, File};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::fsutil::{WriteOptions, write_atomic};

/// The metadata file in a sandbox root.
pub const SANDBOX_JSON: &str = "sandbox.json";
/// Conversation logs (`<safe user>.jsonl`); kept across respawns.
pub const SESSIONS_DIR: &str = "sessions";
/// Persistent state (`<safe user>/<name>.json`); kept across respawns.
pub const STATE_DIR: &str = "state";
/// Cache; emptied on respawn.
pub const CACHE_DIR: &str = "cache";
/// Scratch space; emptied on respawn.
pub const TEMP_DIR: &str = "temp";
/// Worker logs; kept.
pub const LOGS_DIR: &str = "logs";
/// XDG config/data/state homes live under `state/.xdg/`: persistent, and a leading dot can
/// never collide with a user's state directory (safe file stems never start with `.`).
pub const XDG_DIR: &str = ".xdg";

/// How many restart-history entries `sandbox.json` keeps.
pub const RESTART_HISTORY_LEN: usize = 50;

/// The most of `sandbox.json` that is read (a worker could make it huge).
pub const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Directory mode of every sandbox directory.
const DIR_MODE: u32 = 0o700;

/// Environment variables a worker inherits from the gateway (besides `LC_*` and `MOLTBOT_*`).
///
/// An allow-list rather than a deny-list: whatever the operator's shell holds (cloud
/// credentials, SSH agent sockets, `LD_PRELOAD`) stays out of the worker unless listed here.
pub const ENV_ALLOW: &[&str] = &[
    "PATH",
    "LANG",
    "LANGUAGE",
    "TZ",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
    "NO_COLOR",
];

/// Name suffixes (upper case) that mark a secret; such variables never reach a worker, even
/// when allow-listed (e.g. `MOLTBOT_GATEWAY_TOKEN`, `MOLTBOT_OPENAI_API_KEY`).
const SECRET_SUFFIXES: &[&str] = &[
    "_TOKEN",
    "_SECRET",
    "_API_KEY",
    "_PASSWORD",
    "_PRIVATE_KEY",
    "_KEY",
    "_PASSWD",
    "_CREDENTIALS",
];

/// Name fragments (upper case) that mark a secret wherever they occur (`AWS_SECRET_ACCESS_KEY`,
/// `MOLTBOT_TOKEN_FILE`).
const SECRET_WORDS: &[&str] = &["SECRET", "PASSWORD", "PASSWD", "TOKEN", "CREDENTIAL"];

/// The id of the worker in `slot`.
pub fn worker_id(slot: usize) -> String {
    format!("worker-{slot}")
}

/// Whether an environment variable name looks like it holds a secret (case-insensitive):
/// it ends in `_TOKEN`, `_SECRET`, `_API_KEY`, `_PASSWORD`, `_PRIVATE_KEY`, `_KEY`, `_PASSWD`
/// or `_CREDENTIALS`, or contains `SECRET`, `PASSWORD`, `PASSWD`, `TOKEN` or `CREDENTIAL`.
pub fn is_secret_env(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    SECRET_SUFFIXES
        .iter()
        .any(|s| upper.ends_with(s) || upper == s[1..])
        || SECRET_WORDS.iter().any(|w| upper.contains(w))
}

/// Whether a worker may inherit a variable of this name (before the secret filter).
pub fn is_allowed_env(name: &str) -> bool {
    ENV_ALLOW.contains(&name) || name.starts_with("LC_") || name.starts_with("MOLTBOT_")
}

/// Why a worker is (re)started; recorded in the restart history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartReason {
    /// The first start of this slot in this gateway run.
    Initial,
    /// The process died; the detail says how (`"signal 9"`, `"exit 3"`).
    Crashed(String),
    /// The heartbeat stopped advancing; the process was killed.
    Stalled,
    /// A graceful recycle after a limit was reached.
    Recycled(RecycleCause),
    /// A `failed` slot tried again after its cool-down.
    Retried,
    /// The worker broke the IPC protocol (a bad frame) and was killed.
    Protocol(String),
    /// It exited cleanly on its own after being told to stop (SIGTERM from outside the
    /// gateway, e.g. to the whole process group).
    Exited,
}

/// Which limit caused a recycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecycleCause {
    /// Served `max_requests`.
    MaxRequests,
    /// RSS above `max_memory`.
    MaxMemory,
}

impl fmt::Display for RestartReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestartReason::Initial => f.write_str("initial"),
            RestartReason::Crashed(d) => write!(f, "crashed: {d}"),
            RestartReason::Stalled => f.write_str("stalled"),
            RestartReason::Recycled(RecycleCause::MaxRequests) => {
                f.write_str("recycled: max_requests")
            }
            RestartReason::Recycled(RecycleCause::MaxMemory) => f.write_str("recycled: max_memory"),
            RestartReason::Retried => f.write_str("retried: after failed cool-down"),
            RestartReason::Protocol(d) => write!(f, "protocol error: {d}"),
            RestartReason::Exited => f.write_str("exited on request"),
        }
    }
}

/// One start in the restart history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestartEntry {
    /// When (RFC 3339 UTC).
    pub at: String,
    /// The generation this start began.
    pub generation: u64,
    /// Why (see [`RestartReason`]'s display form).
    pub reason: String,
    /// The pid of the process this start replaced, if any.
    #[serde(default)]
    pub previous_pid: Option<u32>,
    /// The pid of the process started, once known.
    #[serde(default)]
    pub pid: Option<u32>,
}

/// The content of `sandbox.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxRecord {
    /// `worker-N`.
    pub worker_id: String,
    /// When the sandbox was first created (RFC 3339 UTC).
    pub created_at: String,
    /// When a worker was last started in it.
    #[serde(default)]
    pub last_started_at: Option<String>,
    /// Bumped on every start; 0 = never started.
    #[serde(default)]
    pub generation: u64,
    /// Starts other than initial ones.
    #[serde(default)]
    pub restarts: u64,
    /// The current (last started) worker pid.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The last [`RESTART_HISTORY_LEN`] starts, oldest first.
    #[serde(default)]
    pub restart_history: Vec<RestartEntry>,
}

impl SandboxRecord {
    fn fresh(slot: usize, created_at: String) -> Self {
        SandboxRecord {
            worker_id: worker_id(slot),
            created_at,
            last_started_at: None,
            generation: 0,
            restarts: 0,
            pid: None,
            restart_history: Vec::new(),
        }
    }
}

/// A sandbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A file-system operation failed.
    #[error("sandbox: cannot {op} {path}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The sandbox root exists but is not a real directory (a symlink or a file).
    #[error("sandbox: {path} is a {found}, not a directory; refusing to use it")]
    NotADirectory {
        /// The path.
        path: PathBuf,
        /// What was found.
        found: &'static str,
    },
    /// `sandbox.json` could not be encoded.
    #[error("sandbox: cannot encode sandbox.json: {0}")]
    Encode(#[from] serde_json::Error),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SandboxError + 'a {
    move |source| SandboxError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn kind_name(ft: fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

/// Creates `path` as a 0700 directory, or tightens an existing real directory to 0700.
/// A symlink or file in its place is an error when `repair` is false, else removed (as a
/// link, never followed) and replaced.
fn ensure_dir(path: &Path, repair: bool) -> Result<(), SandboxError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => {
            if m.permissions().mode() & 0o7777 != DIR_MODE {
                fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
                    .map_err(io_err("set permissions of", path))?;
            }
            return Ok(());
        }
        Ok(m) => {
            let found = kind_name(m.file_type());
            if !repair {
                return Err(SandboxError::NotADirectory {
                    path: path.to_path_buf(),
                    found,
                });
            }
            tracing::warn!(path = %path.display(), found, "sandbox directory replaced; repairing");
            fs::remove_file(path).map_err(io_err("remove", path))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspect", path)(e)),
    }
    match DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => Ok(()),
        // Created concurrently: check what is there now.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_dir() => Ok(()),
            _ => Err(io_err("create", path)(e)),
        },
        Err(e) => Err(io_err("create", path)(e)),
    }
}

/// Makes a directory tree removable after a worker stripped its permissions (never follows
/// symlinks: only real directories are chmod'ed).
fn make_removable(path: &Path) {
    let Ok(m) = fs::symlink_metadata(path) else {
        return;
    };
    if !m.file_type().is_dir() {
        return;
    }
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE));
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            make_removable(&e.path());
        }
    }
}

/// Removes everything inside `dir` (a real directory), not `dir` itself. Symlinks are removed
/// as links; their targets are never touched (`DirEntry::file_type` does not follow links, and
/// `remove_dir_all` does not follow links inside the tree).
fn empty_dir(dir: &Path) -> Result<(), SandboxError> {
    let entries = fs::read_dir(dir).map_err(io_err("list", dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        let path = entry.path();
        let ft = entry.file_type().map_err(io_err("inspect", &path))?;
        let result = if ft.is_dir() {
            fs::remove_dir_all(&path).or_else(|_| {
                make_removable(&path);
                fs::remove_dir_all(&path)
            })
        } else {
            fs::remove_file(&path)
        };
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path)(e)),
        }
    }
    Ok(())
}

/// One worker slot's sandbox directory and its metadata.
#[derive(Debug)]
pub struct Sandbox {
    root: PathBuf,
    slot: usize,
    record: SandboxRecord,
}

impl Sandbox {
    /// Creates (or adopts) `<base>/worker-<slot>/` with its subdirectories (mode 0700), loads
    /// `sandbox.json` or creates it, and writes it back. `base` is made absolute so the paths
    /// handed to the worker do not depend on its working directory.
    pub fn prepare(base: &Path, slot: usize) -> Result<Sandbox, SandboxError> {
        let base = std::path::absolute(base).map_err(io_err("resolve", base))?;
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&base)
            .map_err(io_err("create", &base))?;
        let root = base.join(worker_id(slot));
        // The base is not writable by workers: a link or file at worker-N came from someone
        // else, so refuse it instead of "repairing" it.
        ensure_dir(&root, false)?;
        let mut sandbox = Sandbox {
            record: SandboxRecord::fresh(slot, now_rfc3339()),
            root,
            slot,
        };
        sandbox.ensure_layout()?;
        sandbox.remove_stale_temp_files();
        sandbox.record = sandbox.load_record();
        sandbox.write_record()?;
        Ok(sandbox)
    }

    /// Creates missing directories and repairs ones a worker replaced by a file or link.
    fn ensure_layout(&self) -> Result<(), SandboxError> {
        ensure_dir(&self.root, false)?;
        for d in [SESSIONS_DIR, STATE_DIR, CACHE_DIR, TEMP_DIR, LOGS_DIR] {
            ensure_dir(&self.root.join(d), true)?;
        }
        let xdg = self.xdg_dir();
        ensure_dir(&xdg, true)?;
        for d in ["config", "data", "state"] {
            ensure_dir(&xdg.join(d), true)?;
        }
        // sandbox.json must be a regular file or absent, else the atomic rename fails.
        let meta = self.metadata_path();
        if let Ok(m) = fs::symlink_metadata(&meta)
            && !m.file_type().is_file()
        {
            tracing::warn!(path = %meta.display(), found = kind_name(m.file_type()), "replacing");
            let r = if m.file_type().is_dir() {
                make_removable(&meta);
                fs::remove_dir_all(&meta)
            } else {
                fs::remove_file(&meta)
            };
            r.map_err(io_err("remove", &meta))?;
        }
        Ok(())
    }

    /// Removes temp files of an interrupted [`Sandbox::write_record`].
    fn remove_stale_temp_files(&self) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".sandbox.json.") && name.ends_with(".tmp") {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Reads `sandbox.json`; anything unusable yields a fresh record (keeping `createdAt` when
    /// it can be read), because a worker can write this file.
    fn load_record(&self) -> SandboxRecord {
        let path = self.metadata_path();
        let fresh = |created: Option<String>| {
            SandboxRecord::fresh(self.slot, created.unwrap_or_else(now_rfc3339))
        };
        let bytes = match read_regular_file(&path) {
            Ok(Some(b)) => b,
            Ok(None) => return fresh(None),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable sandbox.json; starting a fresh record");
                return fresh(None);
            }
        };
        match serde_json::from_slice::<SandboxRecord>(&bytes) {
            Ok(mut r) => {
                let expected = worker_id(self.slot);
                if r.worker_id != expected {
                    tracing::warn!(found = %r.worker_id, %expected, "sandbox.json names another worker; corrected");
                    r.worker_id = expected;
                }
                if humantime::parse_rfc3339(&r.created_at).is_err() {
                    r.created_at = now_rfc3339();
                }
                let excess = r.restart_history.len().saturating_sub(RESTART_HISTORY_LEN);
                r.restart_history.drain(..excess);
                r
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "corrupt sandbox.json; starting a fresh record");
                let created = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("createdAt")?.as_str().map(str::to_owned))
                    .filter(|s| humantime::parse_rfc3339(s).is_ok());
                fresh(created)
            }
        }
    }

    /// Writes `sandbox.json` atomically: a new temp file (never an existing one, which could be
    /// a planted link) renamed over the old file.
    pub fn write_record(&self) -> Result<(), SandboxError> {
        let mut bytes = serde_json::to_vec_pretty(&self.record)?;
        bytes.push(b'\n');
        let path = self.metadata_path();
        // No fsync: this runs on the monitor thread at every respawn, and a sync can block for
        // seconds on a busy disk while no other worker is reaped or checked. The rename keeps
        // the file whole; after a machine crash it may be one start behind.
        let opts = WriteOptions {
            mode: 0o600,
            sync: false,
        };
        write_atomic(&path, &bytes, opts).map_err(io_err("write", &path))
    }

    /// Records a start; call it BEFORE spawning the process (nothing may run in the sandbox).
    ///
    /// Repairs the layout, empties `temp/` and `cache/` if the sandbox ran before (a respawn, or
    /// the first start in a new gateway run: either way what the last process left there is
    /// suspect), keeps `sessions/` and `state/`, bumps the generation, counts a restart unless
    /// `reason` is [`RestartReason::Initial`], appends to the bounded history and writes
    /// `sandbox.json`. Returns the new generation. On error the in-memory record is still
    /// updated; the caller may log and go on.
    pub fn record_start(&mut self, reason: RestartReason) -> Result<u64, SandboxError> {
        let generation = self.prepare_start(reason);
        let written = self.write_record();
        let generation = generation?;
        written?;
        Ok(generation)
    }

    /// [`Sandbox::record_start`] without writing `sandbox.json`, for a caller that writes it
    /// with the pid right after ([`Sandbox::record_pid`]): one write per start instead of two.
    pub fn prepare_start(&mut self, reason: RestartReason) -> Result<u64, SandboxError> {
        let ran_before = self.record.generation > 0;
        let prepared = self.ensure_layout().and_then(|()| {
            if ran_before {
                empty_dir(&self.temp_dir())?;
                empty_dir(&self.cache_dir())?;
            }
            Ok(())
        });
        let now = now_rfc3339();
        let r = &mut self.record;
        r.generation = r.generation.saturating_add(1);
        if reason != RestartReason::Initial {
            r.restarts = r.restarts.saturating_add(1);
        }
        r.last_started_at = Some(now.clone());
        let previous_pid = r.pid.take();
        r.restart_history.push(RestartEntry {
            at: now,
            generation: r.generation,
            reason: reason.to_string(),
            previous_pid,
            pid: None,
        });
        let excess = r.restart_history.len().saturating_sub(RESTART_HISTORY_LEN);
        r.restart_history.drain(..excess);
        let generation = r.generation;
        prepared?;
        Ok(generation)
    }

    /// Records the pid of the process started after [`Sandbox::record_start`].
    pub fn record_pid(&mut self, pid: u32) -> Result<(), SandboxError> {
        self.record.pid = Some(pid);
        if let Some(last) = self.record.restart_history.last_mut() {
            last.pid = Some(pid);
        }
        self.write_record()
    }

    /// The scrubbed environment of this sandbox's worker: the allow-listed variables of
    /// `parent` ([`ENV_ALLOW`], `LC_*`, `MOLTBOT_*`) minus secrets ([`is_secret_env`]) and
    /// non-UTF-8 names, plus the sandbox's own: `MOLTBOT_WORKER_ID`, `MOLTBOT_SANDBOX_ROOT`,
    /// `MOLTBOT_{SESSIONS,STATE,CACHE,TEMP,LOGS}_DIR`, `HOME` (root), `PWD` (root), `TMPDIR`
    /// (temp), `XDG_CONFIG_HOME`/`XDG_DATA_HOME`/`XDG_STATE_HOME` (`state/.xdg/…`),
    /// `XDG_CACHE_HOME` (cache), `XDG_RUNTIME_DIR` (temp). Sorted by name. Use it with
    /// `Command::env_clear()` and `current_dir(root)`.
    pub fn worker_env(
        &self,
        parent: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Vec<(OsString, OsString)> {
        let mut out: BTreeMap<OsString, OsString> = BTreeMap::new();
        for (k, v) in parent {
            let keep = k
                .to_str()
                .is_some_and(|name| is_allowed_env(name) && !is_secret_env(name));
            if keep {
                out.insert(k, v);
            }
        }
        let xdg = self.xdg_dir();
        let own: [(&str, PathBuf); 14] = [
            ("MOLTBOT_SANDBOX_ROOT", self.root.clone()),
            ("MOLTBOT_SESSIONS_DIR", self.sessions_dir()),
            ("MOLTBOT_STATE_DIR", self.state_dir()),
            ("MOLTBOT_CACHE_DIR", self.cache_dir()),
            ("MOLTBOT_TEMP_DIR", self.temp_dir()),
            ("MOLTBOT_LOGS_DIR", self.logs_dir()),
            ("HOME", self.root.clone()),
            ("PWD", self.root.clone()),
            ("TMPDIR", self.temp_dir()),
            ("XDG_CONFIG_HOME", xdg.join("config")),
            ("XDG_DATA_HOME", xdg.join("data")),
            ("XDG_STATE_HOME", xdg.join("state")),
            ("XDG_CACHE_HOME", self.cache_dir()),
            ("XDG_RUNTIME_DIR", self.temp_dir()),
        ];
        for (k, v) in own {
            out.insert(k.into(), v.into_os_string());
        }
        out.insert("MOLTBOT_WORKER_ID".into(), worker_id(self.slot).into());
        out.into_iter().collect()
    }

    /// The sandbox root, `<base>/worker-N` (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The slot number.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// `worker-N`.
    pub fn worker_id(&self) -> String {
        worker_id(self.slot)
    }

    /// `sessions/`.
    pub fn sessions_dir(&self) -> PathBuf {
        self.root.join(SESSIONS_DIR)
    }

    /// `state/`.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join(STATE_DIR)
    }

    /// `cache/`.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join(CACHE_DIR)
    }

    /// `temp/`.
    pub fn temp_dir(&self) -> PathBuf {
        self.root.join(TEMP_DIR)
    }

    /// `logs/`.
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join(LOGS_DIR)
    }

    /// `state/.xdg/` (holds `config/`, `data/`, `state/`).
    pub fn xdg_dir(&self) -> PathBuf {
        self.state_dir().join(XDG_DIR)
    }

    /// `sandbox.json`.
    pub fn metadata_path(&self) -> PathBuf {
        self.root.join(SANDBOX_JSON)
    }

    /// The current record (as last written).
    pub fn record(&self) -> &SandboxRecord {
        &self.record
    }

    /// The current generation (0 = never started).
    pub fn generation(&self) -> u64 {
        self.record.generation
    }
}

/// Reads a regular file without following a symlink in its place, at most
/// [`MAX_RECORD_BYTES`]. `Ok(None)` = absent.
fn read_regular_file(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => {}
        Ok(m) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("is a {}", kind_name(m.file_type())),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    let f = File::open(path)?;
    let mut buf = Vec::new();
    f.take(MAX_RECORD_BYTES + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_RECORD_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_RECORD_BYTES} bytes"),
        ));
    }
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn on_disk(sb: &Sandbox) -> serde_json::Value {
        serde_json::from_slice(&fs::read(sb.metadata_path()).unwrap()).unwrap()
    }

    fn env_map(v: Vec<(OsString, OsString)>) -> BTreeMap<String, String> {
        v.into_iter()
            .map(|(k, v)| (k.into_string().unwrap(), v.into_string().unwrap()))
            .collect()
    }

    #[test]
    fn worker_ids() {
        assert_eq!(worker_id(0), "worker-0");
        assert_eq!(worker_id(12), "worker-12");
    }

    #[test]
    fn prepare_creates_the_layout_with_private_modes() {
        let base = tempfile::tempdir().unwrap();
        let sb = Sandbox::prepare(base.path(), 2).unwrap();
        assert_eq!(sb.root(), base.path().join("worker-2"));
        assert_eq!(sb.slot(), 2);
        assert_eq!(sb.worker_id(), "worker-2");
        for d in [
            sb.root().to_path_buf(),
            sb.sessions_dir(),
            sb.state_dir(),
            sb.cache_dir(),
            sb.temp_dir(),
            sb.logs_dir(),
            sb.xdg_dir().join("config"),
            sb.xdg_dir().join("data"),
            sb.xdg_dir().join("state"),
        ] {
            assert!(
                fs::symlink_metadata(&d).unwrap().is_dir(),
                "{}",
                d.display()
            );
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        assert!(sb.metadata_path().is_file());
        assert_eq!(sb.metadata_path(), sb.root().join("sandbox.json"));
    }

    #[test]
    fn prepare_tightens_existing_directories() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("worker-0");
        fs::create_dir_all(root.join("sessions")).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(root.join("sessions"), fs::Permissions::from_mode(0o777)).unwrap();
        Sandbox::prepare(base.path(), 0).unwrap();
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("sessions")), 0o700);
    }

    #[test]
    fn relative_base_becomes_absolute() {
        // A temp dir in the working directory (the crate root), named relative to it.
        let dir = tempfile::Builder::new()
            .prefix(".sandbox-test-")
            .tempdir_in(".")
            .unwrap();
        let relative = PathBuf::from(dir.path().file_name().unwrap());
        assert!(relative.is_relative());
        let sb = Sandbox::prepare(&relative, 0).unwrap();
        assert!(sb.root().is_absolute());
        assert!(sb.root().starts_with(std::env::current_dir().unwrap()));
    }

    #[test]
    fn sandbox_json_has_the_documented_fields() {
        let base = tempfile::tempdir().unwrap();
        let mut sb = Sandbox::prepare(base.path(), 1).unwrap();
        let v = on_disk(&sb);
        assert_eq!(v["workerId"], "worker-1");
        assert!(humantime::parse_rfc3339(v["createdAt"].as_str().unwrap()).is_ok());
        assert!(v["createdAt"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["lastStartedAt"], serde_json::Value::Null);
        assert_eq!(v["generation"], 0);
        assert_eq!(v["restarts"], 0);
        assert_eq!(v["restartHistory"], serde_json::json!([]));

        assert_eq!(sb.record_start(RestartReason::Initial).unwrap(), 1);
        sb.record_pid(4242).unwrap();
        let v = on_disk(&sb);
        assert_eq!(v["generation"], 1);
        assert_eq!(v["restarts"], 0);
        assert_eq!(v["pid"], 4242);
        assert!(humantime::parse_rfc3339(v["lastStartedAt"].as_str().unwrap()).is_ok());
        let h = &v["restartHistory"][0];
        assert_eq!(h["reason"], "initial");
        assert_eq!(h["generation"], 1);
        assert_eq!(h["previousPid"], serde_json::Value::Null);
        assert_eq!(h["pid"], 4242);
        assert!(humantime::parse_rfc3339(h["at"].as_str().unwrap()).is_ok());
    }

    #[test]
    fn respawn_bumps_generation_and_restarts_and_records_previous_pid() {
        let base = tempfile::tempdir().unwrap();
        let mut sb = Sandbox::prepare(base.path(), 0).unwrap();
        sb.record_start(RestartReason::Initial).unwrap();
        sb.record_pid(100).unwrap();
        let g = sb
            .record_start(RestartReason::Crashed("signal 9".into()))
            .unwrap();
        assert_eq!(g, 2);
        sb.record_pid(101).unwrap();
        assert_eq!(sb.generation(), 2);
        assert_eq!(sb.record().restarts, 1);
        let last = sb.record().restart_history.last().unwrap();
        assert_eq!(last.reason, "crashed: signal 9");
        assert_eq!(last.previous_pid, Some(100));
        assert_eq!(last.pid, Some(101));
        sb.record_start(RestartReason::Stalled).unwrap();
        assert_eq!(sb.record().restarts, 2);
        assert_eq!(on_disk(&sb)["generation"], 3);
    }

    #[test]
    fn record_survives_a_gateway_restart() {
        let base = tempfile::tempdir().unwrap();
        let mut sb = Sandbox::prepare(base.path(), 0).unwrap();
        sb.record_start(RestartReason::Initial).unwrap();
        sb.record_pid(7).unwrap();
        sb.record_start(RestartReason::Stalled).unwrap();
        let before = sb.record().clone();
        let sb2 = Sandbox::prepare(base.path(), 0).unwrap();
        assert_eq!(sb2.record(), &before);
        let mut sb2 = sb2;
        sb2.record_start(RestartReason::Initial).unwrap();
        assert_eq!(sb2.generation(), 3);
        assert_eq!(sb2.record().created_at, before.created_at);
    }

    #[test]
    fn reason_display_forms() {
        assert_eq!(RestartReason::Initial.to_string(), "initial");
        assert_eq!(
            RestartReason::Crashed("signal 9".into()).to_string(),
            "crashed: signal 9"
        );
        assert_eq!(RestartReason::Stalled.to_string(), "stalled");
        assert_eq!(
            RestartReason::Recycled(RecycleCause::MaxRequests).to_string(),
            "recycled: max_requests"
        );
        assert_eq!(
            RestartReason::Recycled(RecycleCause::MaxMemory).to_string(),
            "recycled: max_memory"
        );
        assert_eq!(
            RestartReason::Retried.to_string(),
            "retried: after failed cool-down"
        );
        assert_eq!(
            RestartReason::Protocol("bad frame".into()).to_string(),
            "protocol error: bad frame"
        );
    }

    #[test]
    fn respawn_empties_temp_and_cache_but_keeps_user_data() {
        let base = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("precious.txt"), "keep me").unwrap();
        fs::create_dir(outside.path().join("dir")).unwrap();
        fs::write(outside.path().join("dir/inner.txt"), "keep me too").unwrap();

        let mut sb = Sandbox::prepare(base.path(), 0).unwrap();
        sb.record_start(RestartReason::Initial).unwrap();
        let temp = sb.temp_dir();
        let cache = sb.cache_dir();
        fs::write(temp.join("a.txt"), "x").unwrap();
        fs::create_dir_all(temp.join("nested/deeper")).unwrap();
        fs::write(temp.join("nested/deeper/b.txt"), "x").unwrap();
        symlink(outside.path(), temp.join("link-to-outside-dir")).unwrap();
        symlink(
            outside.path().join("precious.txt"),
            temp.join("link-to-file"),
        )
        .unwrap();
        symlink(outside.path(), temp.join("nested/link")).unwrap();
        fs::write(cache.join("c.bin"), "x").unwrap();
        fs::create_dir(cache.join("sub")).unwrap();
        symlink(outside.path(), cache.join("sub/out")).unwrap();
        fs::write(sb.sessions_dir().join("user-a.jsonl"), "{}\n").unwrap();
        fs::create_dir(sb.state_dir().join("user-a")).unwrap();
        fs::write(sb.state_dir().join("user-a/notes.json"), "1").unwrap();
        fs::write(sb.logs_dir().join("w.log"), "log").unwrap();

        sb.record_start(RestartReason::Crashed("signal 9".into()))
            .unwrap();

        assert_eq!(fs::read_dir(&temp).unwrap().count(), 0);
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 0);
        assert_eq!(mode(&temp), 0o700);
        assert_eq!(mode(&cache), 0o700);
        assert_eq!(
            fs::read_to_string(outside.path().join("precious.txt")).unwrap(),
            "keep me"
        );
        assert_eq!(
            fs::read_to_string(outside.path().join("dir/inner.txt")).unwrap(),
            "keep me too"
        );
        assert!(sb.sessions_dir().join("user-a.jsonl").is_file());
        assert!(sb.state_dir().join("user-a/notes.json").is_file());
        assert!(sb.logs_dir().join("w.log").is_file());
    }

    #[test]
    fn scratch_is_emptied_only_for_a_sandbox_that_ran_before() {
        let base = tempfile::tempdir().unwrap();
        let mut sb = Sandbox::prepare(base.path(), 0).unwrap();
        fs::write(sb.temp_dir().join("pre.txt"), "x").unwrap();
        sb.record_start(RestartReason::Initial).unwrap();
        // Never ran before: nothing a previous process left, nothing removed.
        assert!(sb.temp_dir().join("pre.txt").exists());
        // A new gateway run on the same sandbox: the previous process's scratch goes.
        let mut again = Sandbox::prepare(base.path(), 0).unwrap();
        again.record_start(RestartReason::Initial).unwrap();
        assert!(!again.temp_dir().join("pre.txt").exists());
        assert_eq!(again.record().restarts, 0);
    }

    #[test]
    fn unwritable_nested_dirs_are_still_removed() {
        let base = tempfile::tempdir().unwrap();
        let mut sb = Sandbox::prepare(base.path(), 0).unwrap();
        sb.record_start(RestartReason::Initial).unwrap();
        let locked = sb.temp_dir().join("locked");
        fs::create_dir_all(locked.join("inner")).unwrap();
        fs::write(locked.join("inner/f"), "x").unwrap();
        fs::set_permissions(locked.join("inner"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o500)).unwrap();
        sb.record_start(RestartReason::Stalled).unwrap();
        assert!(!locked.exists());
    }

    #[test]
    fn replaced_scratch_dir_symlink_is_repaired_without_touching_the_target() {
        let base = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim.txt"), "safe").unwrap();
        let mut sb = Sandbox::prepare(base.path(), 0).unwrap();
        sb.record_start(RestartReason::Initial).unwrap();
        fs::remove_dir(sb.temp_dir()).unwrap();
        symlink(outside.path(), sb.temp_dir()).unwrap();
        fs::remove_dir(sb.cache_dir()).unwrap();
        fs::write(sb.cache_dir(), "not a dir").unwrap();
        sb.record_start(RestartReason::Crashed("exit 1".into()))
            .unwrap();
        assert!(fs::symlink_metadata(sb.temp_dir()).unwrap().is_dir());
        assert!(fs::symlink_metadata(sb.cache_dir()).unwrap().is_dir());
        assert_eq!(
            fs::read_to_string(outside.path().join("victim.txt")).unwrap(),
            "safe"
        );
    }

    #[test]
    fn a_symlinked_worker_root_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        symlink(elsewhere.path(), base.path().join("worker-0")).unwrap();
        let e = Sandbox::prepare(base.path(), 0).unwrap_err();
        assert!(
            matches!(
                e,
                SandboxError::NotADirectory {
                    found: "symlink",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    }

    #[test]
    fn history_is_bounded() {
        let base = tempfile::tempdir().unwrap();
        let mut sb = Sandbox::prepare(base.path(), 0).unwrap();
        sb.record_start(RestartReason::Initial).unwrap();
        for i in 0..60 {
            sb.record_start(RestartReason::Crashed(format!("exit {i}")))
                .unwrap();
        }
        let h = &sb.record().restart_history;
        assert_eq!(h.len(), RESTART_HISTORY_LEN);
        assert_eq!(h.last().unwrap().reason, "crashed: exit 59");
        assert_eq!(h.first().unwrap().generation, 12);
        assert_eq!(sb.generation(), 61);
        assert_eq!(sb.record().restarts, 60);
        let v = on_disk(&sb);
        assert_eq!(
            v["restartHistory"].as_array().unwrap().len(),
            RESTART_HISTORY_LEN
        );
    }

    #[test]
    fn oversized_history_on_disk_is_trimmed_on_load() {
        let base = tempfile::tempdir().unwrap();
        let sb = Sandbox::prepare(base.path(), 0).unwrap();
        let mut rec = sb.record().clone();
        for g in 0..200 {
            rec.restart_history.push(RestartEntry {
                at: now_rfc3339(),
                generation: g,
                reason: "stalled".into(),
                previous_pid: None,
                pid: None,
            });
        }
        fs::write(sb.metadata_path(), serde_json::to_vec(&rec).unwrap()).unwrap();
        let sb = Sandbox::prepare(base.path(), 0).unwrap();
        assert_eq!(sb.record().restart_history.len(), RESTART_HISTORY_LEN);
        assert_eq!(sb.record().restart_history[0].generation, 150);
    }

    #[test]
    fn corrupt_json_starts_a_fresh_record_keeping_created_at() {
        let base = tempfile::tempdir().unwrap();
        let mut sb = Sandbox::prepare(base.path(), 0).unwrap();
        sb.record_start(RestartReason::Initial).unwrap();
        let created = sb.record().created_at.clone();
        // Valid JSON, wrong shape: createdAt is salvaged.
        fs::write(
            sb.metadata_path(),
            format!(r#"{{"createdAt": "{created}", "generation": "lots"}}"#),
        )
        .unwrap();
        let sb2 = Sandbox::prepare(base.path(), 0).unwrap();
        assert_eq!(sb2.record().created_at, created);
        assert_eq!(sb2.generation(), 0);
        assert_eq!(on_disk(&sb2)["workerId"], "worker-0");
        // Garbage: a fresh record altogether.
        for junk in [
            &b"\x00\xff garbage"[..],
            b"",
            b"[1,2,3]",
            b"{\"createdAt\": 5}",
        ] {
            fs::write(sb.metadata_path(), junk).unwrap();
            let sb3 = Sandbox::prepare(base.path(), 0).unwrap();
            assert!(humantime::parse_rfc3339(&sb3.record().created_at).is_ok());
            assert_eq!(sb3.generation(), 0);
        }
    }

    #[test]
    fn bad_created_at_and_foreign_worker_id_are_corrected() {
        let base = tempfile::tempdir().unwrap();
        let sb = Sandbox::prepare(base.path(), 3).unwrap();
        fs::write(
            sb.metadata_path(),
            r#"{"workerId":"worker-9","createdAt":"yesterday","generation":4}"#,
        )
        .unwrap();
        let sb = Sandbox::prepare(base.path(), 3).unwrap();
        assert_eq!(sb.record().worker_id, "worker-3");
        assert!(humantime::parse_rfc3339(&sb.record().created_at).is_ok());
        assert_eq!(sb.generation(), 4);
    }

    #[test]
    fn oversized_json_is_tolerated() {
        let base = tempfile::tempdir().unwrap();
        let sb = Sandbox::prepare(base.path(), 0).unwrap();
        let big = vec![b' '; (MAX_RECORD_BYTES + 10) as usize];
        fs::write(sb.metadata_path(), big).unwrap();
        let sb = Sandbox::prepare(base.path(), 0).unwrap();
        assert_eq!(sb.generation(), 0);
        assert!(fs::metadata(sb.metadata_path()).unwrap().len() < 4096);
    }

    #[test]
    fn a_planted_symlink_as_sandbox_json_is_neither_read_nor_written_through() {
        let base = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim.json");
        fs::write(
            &victim,
            r#"{"createdAt":"2001-01-01T00:00:00Z","secret":1}"#,
        )
        .unwrap();
        let mut sb = Sandbox::prepare(base.path(), 0).unwrap();
        fs::remove_file(sb.metadata_path()).unwrap();
        symlink(&victim, sb.metadata_path()).unwrap();
        sb.record_start(RestartReason::Initial).unwrap();
        assert!(fs::symlink_metadata(sb.metadata_path()).unwrap().is_file());
        assert_eq!(
            fs::read_to_string(&victim).unwrap(),
            r#"{"createdAt":"2001-01-01T00:00:00Z","secret":1}"#
        );
        fs::remove_file(sb.metadata_path()).unwrap();
        symlink(&victim, sb.metadata_path()).unwrap();
        let sb2 = Sandbox::prepare(base.path(), 0).unwrap();
        assert_ne!(sb2.record().created_at, "2001-01-01T00:00:00Z");
    }

    #[test]
    fn a_directory_in_place_of_sandbox_json_is_replaced() {
        let base = tempfile::tempdir().unwrap();
        let mut sb = Sandbox::prepare(base.path(), 0).unwrap();
        fs::remove_file(sb.metadata_path()).unwrap();
        fs::create_dir_all(sb.metadata_path().join("x")).unwrap();
        sb.record_start(RestartReason::Initial).unwrap();
        assert!(sb.metadata_path().is_file());
    }

    #[test]
    fn writes_leave_no_temp_files_and_stale_ones_are_removed() {
        let base = tempfile::tempdir().unwrap();
        let mut sb = Sandbox::prepare(base.path(), 0).unwrap();
        for _ in 0..3 {
            sb.record_start(RestartReason::Stalled).unwrap();
        }
        let names = |root: &Path| -> Vec<String> {
            fs::read_dir(root)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        };
        assert!(names(sb.root()).is_empty());
        fs::write(sb.root().join(".sandbox.json.deadbeef.tmp"), "x").unwrap();
        let sb = Sandbox::prepare(base.path(), 0).unwrap();
        assert!(names(sb.root()).is_empty());
        assert_eq!(mode(&sb.metadata_path()), 0o600);
    }

    #[test]
    fn secret_names_are_recognised() {
        for name in [
            "FOO_API_KEY",
            "MOLTBOT_GATEWAY_TOKEN",
            "DB_PASSWORD",
            "AWS_SECRET_ACCESS_KEY",
            "GITHUB_TOKEN",
            "ssh_private_key",
            "moltbot_token",
            "MOLTBOT_OPENAI_KEY",
            "TOKEN",
            "SECRET",
            "MOLTBOT_TOKEN_FILE",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "MYSQL_PASSWD",
        ] {
            assert!(is_secret_env(name), "{name}");
        }
        for name in [
            "PATH",
            "MOLTBOT_WORKER_COUNT",
            "LANG",
            "RUST_LOG",
            "MOLTBOT_KEYS_DIR",
        ] {
            assert!(!is_secret_env(name), "{name}");
        }
    }

    #[test]
    fn worker_env_is_scrubbed_and_points_into_the_sandbox() {
        let base = tempfile::tempdir().unwrap();
        let sb = Sandbox::prepare(base.path(), 5).unwrap();
        let parent: Vec<(OsString, OsString)> = [
            ("PATH", "/usr/bin:/bin"),
            ("LANG", "C.UTF-8"),
            ("LC_ALL", "C"),
            ("TZ", "UTC"),
            ("RUST_LOG", "debug"),
            ("MOLTBOT_WORKER_COUNT", "3"),
            ("MOLTBOT_GATEWAY_TOKEN", "hunter2"),
            ("MOLTBOT_TOKEN", "hunter2"),
            ("FOO_API_KEY", "k"),
            ("DB_PASSWORD", "p"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("SSH_AUTH_SOCK", "/tmp/agent"),
            ("LD_PRELOAD", "/evil.so"),
            ("HOME", "/root"),
            ("TMPDIR", "/tmp"),
            ("XDG_CONFIG_HOME", "/root/.config"),
            ("MOLTBOT_SANDBOX_ROOT", "/elsewhere"),
        ]
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect();
        let env = env_map(sb.worker_env(parent));
        for kept in [
            "PATH",
            "LANG",
            "LC_ALL",
            "TZ",
            "RUST_LOG",
            "MOLTBOT_WORKER_COUNT",
        ] {
            assert!(env.contains_key(kept), "{kept} dropped");
        }
        for gone in [
            "MOLTBOT_GATEWAY_TOKEN",
            "MOLTBOT_TOKEN",
            "FOO_API_KEY",
            "DB_PASSWORD",
            "AWS_SECRET_ACCESS_KEY",
            "SSH_AUTH_SOCK",
            "LD_PRELOAD",
        ] {
            assert!(!env.contains_key(gone), "{gone} leaked");
        }
        assert!(!env.values().any(|v| v.contains("hunter2")));
        let root = sb.root().to_str().unwrap().to_string();
        let p = |rel: &str| format!("{root}/{rel}");
        assert_eq!(env["MOLTBOT_WORKER_ID"], "worker-5");
        assert_eq!(env["MOLTBOT_SANDBOX_ROOT"], root);
        assert_eq!(env["MOLTBOT_SESSIONS_DIR"], p("sessions"));
        assert_eq!(env["MOLTBOT_STATE_DIR"], p("state"));
        assert_eq!(env["MOLTBOT_CACHE_DIR"], p("cache"));
        assert_eq!(env["MOLTBOT_TEMP_DIR"], p("temp"));
        assert_eq!(env["MOLTBOT_LOGS_DIR"], p("logs"));
        assert_eq!(env["HOME"], root);
        assert_eq!(env["PWD"], root);
        assert_eq!(env["TMPDIR"], p("temp"));
        assert_eq!(env["XDG_CONFIG_HOME"], p("state/.xdg/config"));
        assert_eq!(env["XDG_DATA_HOME"], p("state/.xdg/data"));
        assert_eq!(env["XDG_STATE_HOME"], p("state/.xdg/state"));
        assert_eq!(env["XDG_CACHE_HOME"], p("cache"));
        assert_eq!(env["XDG_RUNTIME_DIR"], p("temp"));
        for (k, v) in &env {
            if k.starts_with("XDG_") || k.ends_with("_DIR") || k == "HOME" || k == "TMPDIR" {
                assert!(Path::new(v).is_dir(), "{k}={v} does not exist");
                assert!(v.starts_with(&root), "{k}={v} outside the sandbox");
            }
        }
    }

    #[test]
    fn worker_env_drops_non_utf8_names_and_is_sorted() {
        use std::os::unix::ffi::OsStringExt;
        let base = tempfile::tempdir().unwrap();
        let sb = Sandbox::prepare(base.path(), 0).unwrap();
        let parent = vec![
            (
                OsString::from_vec(b"MOLTBOT_\xff".to_vec()),
                OsString::from("x"),
            ),
            (
                OsString::from("PATH"),
                OsString::from_vec(b"/bin\xff".to_vec()),
            ),
        ];
        let env = sb.worker_env(parent);
        assert!(env.iter().all(|(k, _)| k.to_str().is_some()));
        assert!(
            env.iter().any(|(k, _)| k == "PATH"),
            "non-UTF-8 values are fine"
        );
        let keys: Vec<_> = env.iter().map(|(k, _)| k.clone()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }
}
