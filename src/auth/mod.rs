//! Who a request is: the credential it carries decides the user, never a field the client
//! merely claims. One check ([`Authenticator::authenticate`]) serves HTTP and WebSocket
//! clients.
//!
//! Credentials: per-user tokens (stored hashed in the users file, [`users`]), signed tokens
//! from an identity provider ([`jwt`]), and the operator token (`MOLTBOT_GATEWAY_TOKEN`), which
//! may act for any user. With none of them configured, requests are anonymous (a gateway on
//! loopback for one person, the demo); once any exists, every request but the probes must
//! carry one.
//!
//! The users file is watched: a change (by `moltbot users ...`, or SIGHUP) is in force for
//! new requests within [`RELOAD_EVERY`] plus the time to read it. A file that turns malformed
//! leaves the last good table in force and says so in the log and in `/status`.

pub mod jwt;
pub mod users;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::auth::jwt::{JwtFailure, JwtVerifier};
use crate::auth::users::{TokenLookup, UsersError, UsersTable};
use crate::config::Config;

/// How often the users file is looked at (and a SIGHUP noticed).
pub const RELOAD_EVERY: Duration = Duration::from_millis(200);

/// How often the users' last use is written beside the users file (when it changed).
pub const LAST_USED_EVERY: Duration = Duration::from_secs(10);

/// Who a request acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The operator token: may act for any user (named by the request) and read the gateway's
    /// own state.
    Operator,
    /// A user's own credential: acts as this user only.
    User(String),
    /// No credential is configured at all: requests name their user (a gateway for one person
    /// on loopback).
    Anonymous,
}

/// Why a request is refused. Clients see only 401 or 403 with a fixed message; the reason is
/// for the metrics (and never names a user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Credentials are configured and the request carries none.
    Missing,
    /// A token that is no credential of this gateway.
    Unknown,
    /// A user token that was revoked (or replaced by a rotation).
    Revoked,
    /// A signed token past its `exp`, or before its `nbf`.
    Expired,
    /// A signed token that does not verify (signature, algorithm, issuer, audience, claim).
    Invalid,
    /// A valid credential asking for something it may not have: another user, the gateway's
    /// state.
    Forbidden,
}

impl Refusal {
    /// Every reason, in the order of [`Refusal::index`].
    pub const ALL: [Refusal; 6] = [
        Refusal::Missing,
        Refusal::Unknown,
        Refusal::Revoked,
        Refusal::Expired,
        Refusal::Invalid,
        Refusal::Forbidden,
    ];

    /// The metrics label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Unknown => "unknown",
            Refusal::Revoked => "revoked",
            Refusal::Expired => "expired",
            Refusal::Invalid => "invalid",
            Refusal::Forbidden => "forbidden",
        }
    }

    /// Position in [`Refusal::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// 403 for a credential that may not do this, 401 for no valid credential.
    pub fn status(self) -> u16 {
        match self {
            Refusal::Forbidden => 403,
            _ => 401,
        }
    }

    /// The error code clients see.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::Forbidden => "FORBIDDEN",
            _ => "UNAUTHORIZED",
        }
    }

    /// The message clients see: the same for every 401, so that it never tells whether a user
    /// or a token exists.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Forbidden => "this credential may not act for that user or read that",
            _ => "missing or invalid bearer token",
        }
    }
}

/// Errors setting up authentication at start-up (for the operator).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The users file could not be used.
    #[error(transparent)]
    Users(#[from] UsersError),
    /// The JWT settings could not be used.
    #[error(transparent)]
    Jwt(#[from] jwt::JwtConfigError),
}

/// The users table in force and what is known about the file it came from.
struct Loaded {
    table: Arc<UsersTable>,
    /// Identity of the file the table was read from (`None`: there was no file).
    file: Option<FileId>,
    /// Some table of this gateway's life had a user (revoked ones count): from then on every
    /// request needs a credential, whatever later happens to the file (emptied by hand,
    /// deleted). Only a restart without users opens the gateway again.
    guarded: bool,
}

/// Enough of a file's metadata to notice a replacement or a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileId {
    fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileId {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// The state of the users file, for `/status`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsersFileStatus {
    /// Users with an active token in the table in force (read from it by
    /// [`Authenticator::status`]).
    pub active_users: usize,
    /// When the table in force was loaded (ms since the epoch; 0: never, no file).
    pub loaded_at: u64,
    /// Why the file's latest version was not taken (the last good table stays in force).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Whether each kind of credential is configured, for `/status`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthStatus {
    /// The operator token is set.
    pub operator_token: bool,
    /// Signed tokens are accepted.
    pub jwt: bool,
    /// The users file (its path: `/status` is for the operator).
    pub users_file: PathBuf,
    /// Its state.
    pub users: UsersFileStatus,
}

/// The one check of every request's credential.
pub struct Authenticator {
    operator: Option<String>,
    jwt: Option<JwtVerifier>,
    users_path: PathBuf,
    users: ArcSwap<Loaded>,
    status: Mutex<UsersFileStatus>,
    /// Last accepted use per user, seconds since the epoch (written out every
    /// [`LAST_USED_EVERY`]).
    last_used: papaya::HashMap<Box<str>, AtomicU64>,
    last_used_dirty: AtomicBool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("operator", &self.operator.is_some())
            .field("jwt", &self.jwt.is_some())
            .field("users_path", &self.users_path)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Authenticator {
    /// The credentials of `config`: the operator token, the JWT settings, and the users file
    /// (a missing file is fine unless `users_file` was set explicitly; an unreadable or
    /// malformed one is an error).
    pub fn from_config(config: &Config) -> Result<Authenticator, AuthError> {
        let users_path = config.users_path();
        let jwt = JwtVerifier::from_config(config)?;
        let (table, file) = match UsersTable::load(&users_path) {
            Ok(t) => (t, FileId::of(&users_path)),
            Err(UsersError::Missing { .. }) if !config.explicit("users_file") => {
                (UsersTable::empty(), None)
            }
            Err(e) => return Err(e.into()),
        };
        let status = UsersFileStatus {
            active_users: 0,
            loaded_at: if file.is_some() { now_ms() } else { 0 },
            error: None,
        };
        let last_used = papaya::HashMap::new();
        {
            let pinned = last_used.pin();
            for (user, ms) in users::read_last_used(&users_path) {
                pinned.insert(user.into_boxed_str(), AtomicU64::new(ms / 1000));
            }
        }
        Ok(Authenticator {
            operator: config.token.clone(),
            jwt,
            users_path,
            users: ArcSwap::from_pointee(Loaded {
                guarded: !table.is_empty(),
                table: Arc::new(table),
                file,
            }),
            status: Mutex::new(status),
            last_used,
            last_used_dirty: AtomicBool::new(false),
        })
    }

    /// True if some credential lets a client in: a non-loopback gateway needs one.
    pub fn can_admit_anyone(&self) -> bool {
        self.operator.is_some() || self.jwt.is_some() || self.users.load().table.active_users() > 0
    }

    /// Who a request with this bearer token (the `Authorization` value after `Bearer `, or
    /// `None`) acts as.
    pub fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, Refusal> {
        let loaded = self.users.load();
        // Any credential, now or earlier in this run: revoked users count too (revoking the
        // last user does not open the gateway, nor does emptying or deleting the file).
        let configured = self.operator.is_some() || self.jwt.is_some() || loaded.guarded;
        if !configured {
            // Nothing to check a token against: as on a gateway for one person.
            return Ok(Principal::Anonymous);
        }
        let Some(token) = bearer else {
            return Err(Refusal::Missing);
        };
        if let Some(op) = &self.operator
            && bool::from(op.as_bytes().ct_eq(token.as_bytes()))
        {
            return Ok(Principal::Operator);
        }
        match loaded.table.lookup(token) {
            TokenLookup::Active { user } => {
                self.note_use(user);
                return Ok(Principal::User(user.to_string()));
            }
            TokenLookup::Revoked { .. } => return Err(Refusal::Revoked),
            TokenLookup::Unknown => {}
        }
        match &self.jwt {
            Some(v) if jwt::looks_like_jwt(token) => match v.verify(token) {
                Ok(user) => Ok(Principal::User(user)),
                Err(JwtFailure::Expired | JwtFailure::NotYetValid) => Err(Refusal::Expired),
                Err(JwtFailure::Invalid(_)) => Err(Refusal::Invalid),
            },
            _ => Err(Refusal::Unknown),
        }
    }

    /// The bearer token of an `Authorization` header value, if it is one.
    pub fn bearer(header: Option<&str>) -> Option<&str> {
        let (scheme, rest) = header?.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then_some(rest.trim())
    }

    fn note_use(&self, user: &str) {
        let now_s = now_ms() / 1000;
        let pinned = self.last_used.pin();
        match pinned.get(user) {
            // At most one store per user and second.
            Some(t) if t.load(Ordering::Relaxed) >= now_s => return,
            Some(t) => t.store(now_s, Ordering::Relaxed),
            None => {
                pinned.insert(user.into(), AtomicU64::new(now_s));
            }
        }
        self.last_used_dirty.store(true, Ordering::Relaxed);
    }

    /// Re-reads the users file if it changed (or `force`). A file that cannot be read or
    /// parsed, or that is gone after one was read, leaves the table in force, records why and
    /// logs it once per version of the file.
    pub fn reload_if_changed(&self, force: bool) {
        let now = FileId::of(&self.users_path);
        let current = self.users.load();
        if !force && now == current.file {
            return;
        }
        let result = match now {
            // A gateway started without a file has nothing to keep.
            None if current.file.is_none() && !current.guarded => Ok(UsersTable::empty()),
            // Revoking everyone is `moltbot users revoke`; a file that disappears (unlinked
            // by hand, by a tool, by a cleaner of temporary directories) is not a revocation.
            None => Err(UsersError::Missing {
                path: self.users_path.clone(),
            }),
            Some(_) => UsersTable::load(&self.users_path),
        };
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(table) => {
                tracing::info!(
                    active_users = table.active_users(),
                    "users file {} (re)loaded",
                    self.users_path.display()
                );
                status.loaded_at = now_ms();
                status.error = None;
                self.users.store(Arc::new(Loaded {
                    guarded: current.guarded || !table.is_empty(),
                    table: Arc::new(table),
                    file: now,
                }));
            }
            Err(e) => {
                let message = e.to_string();
                if status.error.as_deref() != Some(message.as_str()) {
                    tracing::error!("{message}; the previous users table stays in force");
                }
                status.error = Some(message);
                // Remember this version as seen, so that it is not re-read at every tick;
                // the table stays the last good one.
                let table = current.table.clone();
                self.users.store(Arc::new(Loaded {
                    table,
                    file: now,
                    guarded: current.guarded,
                }));
            }
        }
    }

    /// Writes the users' last use beside the users file, if any changed since the last time.
    pub fn save_last_used(&self) {
        if !self.last_used_dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let map: HashMap<String, u64> = self
            .last_used
            .pin()
            .iter()
            .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed) * 1000))
            .collect();
        if let Err(e) = users::write_last_used(&self.users_path, &map) {
            tracing::warn!("cannot record the users' last use: {e}");
        }
    }

    /// The state for `/status`.
    pub fn status(&self) -> AuthStatus {
        AuthStatus {
            operator_token: self.operator.is_some(),
            jwt: self.jwt.is_some(),
            users_file: self.users_path.clone(),
            users: UsersFileStatus {
                active_users: self.users.load().table.active_users(),
                ..self
                    .status
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            },
        }
    }
}

/// The thread that keeps the users table current: it looks at the file every
/// [`RELOAD_EVERY`], re-reads it at once on SIGHUP, and writes the last-use record every
/// [`LAST_USED_EVERY`]. Stopped (and joined) on drop.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    /// Starts watching for `auth`.
    pub fn start(auth: Arc<Authenticator>) -> std::io::Result<Watcher> {
        let stop = Arc::new(AtomicBool::new(false));
        let hup = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())?;
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("moltbot-auth".into())
            .spawn(move || {
                let mut saved = Instant::now();
                while !s.load(Ordering::Acquire) {
                    std::thread::sleep(RELOAD_EVERY);
                    auth.reload_if_changed(hup.swap(false, Ordering::AcqRel));
                    if saved.elapsed() >= LAST_USED_EVERY {
                        saved = Instant::now();
                        auth.save_last_used();
                    }
                }
                auth.save_last_used();
            })?;
        Ok(Watcher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
