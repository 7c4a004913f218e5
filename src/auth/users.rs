//! Per-user tokens: the users file (hashes only), its changes by `moltbot users`, and the
//! table the gateway looks tokens up in.
//!
//! # Tokens
//!
//! A token is `mbt_` followed by the base64url (no padding) of 32 bytes from the operating
//! system's random source: 47 characters of `[A-Za-z0-9_-]`, valid in an HTTP header as they
//! are. The prefix lets people and secret scanners recognise one. It is shown once, when
//! `moltbot users add` or `rotate` makes it; only the SHA-256 of the whole token (prefix
//! included, as UTF-8) is stored. A fast hash is enough because the token has 256 bits of
//! entropy: nothing about it can be guessed, so a slow password hash would only cost the
//! gateway time on every request.
//!
//! # The users file
//!
//! JSON, by default `<sandbox_dir>/users.json` (the `users_file` key), mode 0600 in a
//! directory created 0700:
//!
//! ```json
//! {
//!   "version": 1,
//!   "users": [
//!     {
//!       "id": "alice",
//!       "created": "2025-01-02T03:04:05Z",
//!       "tokens": [
//!         { "sha256": "<64 lowercase hex digits>", "created": "2025-01-02T03:04:05Z",
//!           "revoked": "2025-02-01T00:00:00Z" },
//!         { "sha256": "<64 lowercase hex digits>", "created": "2025-02-01T00:00:00Z" }
//!       ]
//!     }
//!   ]
//! }
//! ```
//!
//! - `version` is 1; another version is refused rather than half understood.
//! - `id` is a user id as [`crate::user::validate_user_id`] accepts it, once per file.
//! - `created` and `revoked` are RFC 3339 UTC times (`Z`); a token without `revoked` is
//!   active. A user has at least one token; revoked tokens stay, so that the gateway can tell
//!   a revoked token from an unknown one.
//! - `sha256` is the SHA-256 of a token in hex, unique in the file.
//! - Unknown fields are refused: the file is written by `moltbot users`, and a field this
//!   build does not know could be a rule it would silently ignore.
//!
//! Anything else is a [`UsersError::Malformed`] that names the file and the place in it; a
//! mutation never overwrites a file it cannot read.
//!
//! # Changes
//!
//! [`add`], [`revoke`] and [`rotate`] read, change and rewrite the file under an exclusive
//! `flock` on `<users file>.lock` beside it, so that two `moltbot users` commands at once
//! cannot lose one's change. The lock file is never removed: removing it would let a third
//! command lock a new file while the second still holds the old one. The file is replaced
//! atomically (a reader — the gateway — sees the old file or the new one) and fsync'd with
//! its directory before the command reports success, since the operator has been shown a
//! token by then. Readers take no lock.
//!
//! # Last use
//!
//! The gateway records when it last accepted a token of each user, in memory, and persists
//! that now and then to `<users file>.last-used` ([`read_last_used`], [`write_last_used`]):
//! `{"alice": 1735787045000, ...}` (unix milliseconds). It is a convenience for `moltbot users
//! list`, not a record anything depends on, hence a file of its own (the gateway never
//! writes the users file) that is neither fsync'd nor locked, and that reads as empty when
//! it is missing or damaged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::TryRngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::fsutil::{WriteOptions, write_atomic};
use crate::user::validate_user_id;

/// The start of every token.
pub const TOKEN_PREFIX: &str = "mbt_";

/// The users file format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;

/// A SHA-256 digest.
type Digest = [u8; 32];

/// The users file: private to the gateway's user, and durable before a token is shown.
const USERS_WRITE: WriteOptions = WriteOptions {
    mode: 0o600,
    sync: true,
};

/// The last-use file: private too, but losing its latest state in a machine crash costs
/// nothing but a slightly older "last used".
const LAST_USED_WRITE: WriteOptions = WriteOptions {
    mode: 0o600,
    sync: false,
};

/// Why the users file could not be loaded or changed. The messages are for the operator
/// (they name the file); none contains a token.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// The users file does not exist. Whether that is fine is the caller's decision.
    #[error("users file {} does not exist", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The users file exists but cannot be read.
    #[error("cannot read users file {}: {error}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The users file is not a users file this build understands.
    #[error("users file {} is malformed: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where in the file.
        reason: String,
    },
    /// The users file (or its directory) could not be written.
    #[error("cannot write {}: {error}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The lock beside the users file could not be taken.
    #[error("cannot lock {}: {error}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The id is not a valid user id.
    #[error("invalid user id {id:?}: {reason}")]
    InvalidId {
        /// The id as given.
        id: String,
        /// Why it is refused.
        reason: crate::user::UserIdError,
    },
    /// `add` of a user that already has an active token.
    #[error("user {id:?} already has an active token (`moltbot users rotate` replaces it)")]
    AlreadyActive {
        /// The user.
        id: String,
    },
    /// The user is not in the users file.
    #[error("no user {id:?} in {}", path.display())]
    UnknownUser {
        /// The user.
        id: String,
        /// The users file.
        path: PathBuf,
    },
    /// `rotate` of a user whose tokens are all revoked.
    #[error("user {id:?} is revoked (`moltbot users add` gives it a new token)")]
    Revoked {
        /// The user.
        id: String,
    },
    /// The operating system's random source failed.
    #[error("cannot draw random bytes for a token: {0}")]
    Random(String),
}

/// What a presented token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenLookup<'a> {
    /// An active token of `user`.
    Active {
        /// The user the token belongs to.
        user: &'a str,
    },
    /// A token of `user` that was revoked (by `revoke` or `rotate`).
    Revoked {
        /// The user the token belonged to.
        user: &'a str,
    },
    /// Not a token of the table.
    Unknown,
}

/// A user as `moltbot users list` shows it; never a token nor a hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    /// The user id.
    pub id: String,
    /// When the user was first added.
    pub created: SystemTime,
    /// When the user's last active token was revoked; `None` while one is active.
    pub revoked: Option<SystemTime>,
    /// When the gateway last accepted a token of the user, if it recorded it.
    pub last_used: Option<SystemTime>,
}

impl UserInfo {
    /// Whether the user has an active token.
    pub fn is_active(&self) -> bool {
        self.revoked.is_none()
    }
}

#[derive(Clone)]
struct User {
    id: String,
    created: SystemTime,
    tokens: Vec<Token>,
}

impl User {
    fn is_active(&self) -> bool {
        self.tokens.iter().any(|t| t.revoked.is_none())
    }

    /// The latest revocation once no token is active.
    fn revoked(&self) -> Option<SystemTime> {
        if self.is_active() {
            None
        } else {
            self.tokens.iter().filter_map(|t| t.revoked).max()
        }
    }
}

#[derive(Clone)]
struct Token {
    sha256: Digest,
    created: SystemTime,
    revoked: Option<SystemTime>,
}

/// A snapshot of the users file: which token belongs to whom, and whether it is revoked.
/// Immutable; a changed file is a new table.
#[derive(Clone, Default)]
pub struct UsersTable {
    users: Vec<User>,
    /// Digest → (index in `users`, index in its `tokens`).
    by_digest: HashMap<Digest, (usize, usize)>,
    /// Users with an active token, counted once: the gateway reports it often.
    active_users: usize,
}

/// Counts only: the table holds hashes, which have no business in a log.
impl fmt::Debug for UsersTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsersTable")
            .field("users", &self.users.len())
            .field("active_users", &self.active_users)
            .field("tokens", &self.by_digest.len())
            .finish()
    }
}

impl UsersTable {
    /// A table without users: every token is [`TokenLookup::Unknown`].
    pub fn empty() -> UsersTable {
        UsersTable::default()
    }

    /// Loads the users file at `path`. A missing file is [`UsersError::Missing`]; an
    /// unreadable one [`UsersError::Unreadable`]; one that is not a valid users file
    /// [`UsersError::Malformed`], naming what is wrong and where.
    pub fn load(path: &Path) -> Result<UsersTable, UsersError> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(UsersError::Missing {
                    path: path.to_path_buf(),
                });
            }
            Err(error) => {
                return Err(UsersError::Unreadable {
                    path: path.to_path_buf(),
                    error,
                });
            }
        };
        let users = parse(&bytes).map_err(|reason| UsersError::Malformed {
            path: path.to_path_buf(),
            reason,
        })?;
        UsersTable::new(users).map_err(|reason| UsersError::Malformed {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Indexes `users`; refuses a digest that occurs twice (a lookup would be ambiguous).
    fn new(users: Vec<User>) -> Result<UsersTable, String> {
        let mut by_digest = HashMap::new();
        for (u, user) in users.iter().enumerate() {
            for (t, token) in user.tokens.iter().enumerate() {
                if let Some((u0, t0)) = by_digest.insert(token.sha256, (u, t)) {
                    return Err(format!(
                        "users[{u}].tokens[{t}].sha256: the same hash as users[{u0}].tokens[{t0}]"
                    ));
                }
            }
        }
        let active_users = users.iter().filter(|u| u.is_active()).count();
        Ok(UsersTable {
            users,
            by_digest,
            active_users,
        })
    }

    /// What `token` (as presented, e.g. after `Bearer `) is: an active or a revoked token of
    /// a user, or unknown.
    ///
    /// The presented token is hashed and the digest looked up; the stored digest is then
    /// compared in constant time. The map lookup alone compares digests with `==`, which
    /// stops at the first differing byte, but what it would leak is a prefix of the SHA-256 of
    /// the attacker's own guess, which says nothing about a stored token; the explicit
    /// comparison keeps the decision itself free of data-dependent branches all the same.
    pub fn lookup(&self, token: &str) -> TokenLookup<'_> {
        let digest = digest(token);
        let Some(&(u, t)) = self.by_digest.get(&digest) else {
            return TokenLookup::Unknown;
        };
        let user = &self.users[u];
        let stored = &user.tokens[t];
        if !bool::from(stored.sha256.ct_eq(&digest)) {
            return TokenLookup::Unknown;
        }
        match stored.revoked {
            None => TokenLookup::Active { user: &user.id },
            Some(_) => TokenLookup::Revoked { user: &user.id },
        }
    }

    /// Users with at least one active token.
    pub fn active_users(&self) -> usize {
        self.active_users
    }

    /// Users in the table, revoked ones included.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the table has no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The user ids, revoked ones included, in the order of the file (the order they were
    /// added).
    pub fn user_ids(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.users.iter().map(|u| u.id.as_str())
    }
}

/// Adds user `id` with a new token and returns the token (the only time it exists outside
/// the caller's hands). A user whose tokens are all revoked gets a new one; a user with an
/// active token is [`UsersError::AlreadyActive`]. Creates the file (and its directory, 0700)
/// if missing.
pub fn add(path: &Path, id: &str) -> Result<String, UsersError> {
    let id = checked_id(id)?;
    change(path, |users, now| {
        let (token, sha256) = new_token()?;
        let fresh = Token {
            sha256,
            created: now,
            revoked: None,
        };
        match users.iter_mut().find(|u| u.id == id) {
            Some(user) if user.is_active() => {
                return Err(UsersError::AlreadyActive { id: id.to_string() });
            }
            Some(user) => user.tokens.push(fresh),
            None => users.push(User {
                id: id.to_string(),
                created: now,
                tokens: vec![fresh],
            }),
        }
        Ok(token)
    })
}

/// Revokes every token of user `id`; returns how many were active until now (0 when the
/// user was revoked already, which is not an error: the user is revoked either way). An id
/// not in the file is [`UsersError::UnknownUser`].
pub fn revoke(path: &Path, id: &str) -> Result<usize, UsersError> {
    let id = checked_id(id)?;
    change(path, |users, now| {
        let user = find(users, id, path)?;
        let mut revoked = 0;
        for token in user.tokens.iter_mut().filter(|t| t.revoked.is_none()) {
            token.revoked = Some(now);
            revoked += 1;
        }
        Ok(revoked)
    })
}

/// Revokes the active tokens of user `id` and gives it a new one, which it returns. An id
/// not in the file is [`UsersError::UnknownUser`], a revoked user [`UsersError::Revoked`]
/// (rotating must not bring a revoked user back by accident; `add` does that on purpose).
pub fn rotate(path: &Path, id: &str) -> Result<String, UsersError> {
    let id = checked_id(id)?;
    change(path, |users, now| {
        let user = find(users, id, path)?;
        if !user.is_active() {
            return Err(UsersError::Revoked { id: id.to_string() });
        }
        let (token, sha256) = new_token()?;
        for t in user.tokens.iter_mut().filter(|t| t.revoked.is_none()) {
            t.revoked = Some(now);
        }
        user.tokens.push(Token {
            sha256,
            created: now,
            revoked: None,
        });
        Ok(token)
    })
}

/// The users of the file at `path`, in the order they were added, with their last use from
/// `<path>.last-used`. A missing users file is [`UsersError::Missing`].
pub fn list(path: &Path) -> Result<Vec<UserInfo>, UsersError> {
    let table = UsersTable::load(path)?;
    let last_used = read_last_used(path);
    Ok(table
        .users
        .iter()
        .map(|u| UserInfo {
            id: u.id.clone(),
            created: u.created,
            revoked: u.revoked(),
            last_used: last_used
                .get(&u.id)
                .map(|&ms| UNIX_EPOCH + Duration::from_millis(ms)),
        })
        .collect())
}

/// `<users file>.last-used`.
pub fn last_used_path(users_path: &Path) -> PathBuf {
    sibling(users_path, ".last-used")
}

/// When the gateway last accepted a token of each user (unix milliseconds), as last written
/// by [`write_last_used`]. A missing file is an empty map, and so is a damaged one (with a
/// warning): this is a convenience, nothing to refuse to start over.
pub fn read_last_used(users_path: &Path) -> HashMap<String, u64> {
    let path = last_used_path(users_path);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            tracing::warn!("ignoring unreadable {}: {e}", path.display());
            return HashMap::new();
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(map) => map,
        Err(e) => {
            tracing::warn!("ignoring malformed {}: {e}", path.display());
            HashMap::new()
        }
    }
}

/// Replaces `<users file>.last-used` with `last_used` (unix milliseconds by user id):
/// atomically, mode 0600, without fsync.
pub fn write_last_used(
    users_path: &Path,
    last_used: &HashMap<String, u64>,
) -> Result<(), UsersError> {
    let path = last_used_path(users_path);
    // Sorted: the file stays diffable and the same map always writes the same bytes.
    let sorted: BTreeMap<&str, u64> = last_used.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let mut bytes = serde_json::to_vec(&sorted).expect("a map of strings to numbers serializes");
    bytes.push(b'\n');
    write_atomic(&path, &bytes, LAST_USED_WRITE).map_err(|error| UsersError::Write { path, error })
}

fn checked_id(id: &str) -> Result<&str, UsersError> {
    validate_user_id(id).map_err(|reason| UsersError::InvalidId {
        id: id.to_string(),
        reason,
    })
}

fn find<'u>(users: &'u mut [User], id: &str, path: &Path) -> Result<&'u mut User, UsersError> {
    users
        .iter_mut()
        .find(|u| u.id == id)
        .ok_or_else(|| UsersError::UnknownUser {
            id: id.to_string(),
            path: path.to_path_buf(),
        })
}

/// A new token and its digest.
fn new_token() -> Result<(String, Digest), UsersError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| UsersError::Random(e.to_string()))?;
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + 43);
    token.push_str(TOKEN_PREFIX);
    URL_SAFE_NO_PAD.encode_string(bytes, &mut token);
    let sha256 = digest(&token);
    Ok((token, sha256))
}

fn digest(token: &str) -> Digest {
    Sha256::digest(token.as_bytes()).into()
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

/// The directory of `path` (`.` for a bare file name).
fn directory(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// The read-modify-write of the CLI: under the lock, reads the file (missing = no users),
/// lets `f` change the users, and writes them back if `f` succeeded.
fn change<T>(
    path: &Path,
    f: impl FnOnce(&mut Vec<User>, SystemTime) -> Result<T, UsersError>,
) -> Result<T, UsersError> {
    let dir = directory(path);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|error| UsersError::Write {
            path: dir.to_path_buf(),
            error,
        })?;
    let _lock = lock(path)?;
    let mut users = match UsersTable::load(path) {
        Ok(table) => table.users,
        Err(UsersError::Missing { .. }) => Vec::new(),
        Err(e) => return Err(e),
    };
    // Whole seconds: the file's times are written to the second.
    let now = UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        );
    let out = f(&mut users, now)?;
    let bytes = serialize(&users);
    write_atomic(path, &bytes, USERS_WRITE).map_err(|error| UsersError::Write {
        path: path.to_path_buf(),
        error,
    })?;
    // The rename is durable only once the directory is: a new token must survive a crash.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|error| UsersError::Write {
            path: dir.to_path_buf(),
            error,
        })?;
    Ok(out)
}

/// Takes the exclusive lock beside `path`, blocking until it is free; it is released when
/// the returned file is closed.
fn lock(path: &Path) -> Result<File, UsersError> {
    let lock_path = sibling(path, ".lock");
    let err = |error: io::Error| UsersError::Lock {
        path: lock_path.clone(),
        error,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(err)?;
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(err(e.into())),
        }
    }
}

// The file as serde sees it: strings checked and converted by `parse`, so that an error
// can say which user and which token is wrong.

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRepr {
    version: u32,
    users: Vec<UserRepr>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserRepr {
    id: String,
    created: String,
    tokens: Vec<TokenRepr>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRepr {
    sha256: String,
    created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoked: Option<String>,
}

/// The users of a users file; the error says what is wrong and where.
fn parse(bytes: &[u8]) -> Result<Vec<User>, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err("the file is empty".into());
    }
    // The version first: a file of another version may differ in every other field, and
    // "unsupported version" says more than the first field that does not fit.
    let head: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let Some(head) = head.as_object() else {
        return Err("not a JSON object".into());
    };
    match head.get("version") {
        None => return Err("no \"version\"".into()),
        Some(v) if v.as_u64() == Some(u64::from(FORMAT_VERSION)) => {}
        Some(v) => {
            return Err(format!(
                "version {v} is not supported (this moltbot reads version {FORMAT_VERSION})"
            ));
        }
    }
    let file: FileRepr = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut seen = HashSet::new();
    let mut users = Vec::with_capacity(file.users.len());
    for (u, raw) in file.users.into_iter().enumerate() {
        let at = format!("users[{u}]");
        validate_user_id(&raw.id).map_err(|e| format!("{at}.id {:?}: {e}", raw.id))?;
        if !seen.insert(raw.id.clone()) {
            return Err(format!("{at}.id {:?} occurs twice", raw.id));
        }
        let created = time(&raw.created).map_err(|e| format!("{at}.created: {e}"))?;
        if raw.tokens.is_empty() {
            return Err(format!("{at}.tokens: user {:?} has no token", raw.id));
        }
        let mut tokens = Vec::with_capacity(raw.tokens.len());
        for (t, tok) in raw.tokens.into_iter().enumerate() {
            let at = format!("{at}.tokens[{t}]");
            tokens.push(Token {
                sha256: hex_digest(&tok.sha256).map_err(|e| format!("{at}.sha256: {e}"))?,
                created: time(&tok.created).map_err(|e| format!("{at}.created: {e}"))?,
                revoked: tok
                    .revoked
                    .as_deref()
                    .map(time)
                    .transpose()
                    .map_err(|e| format!("{at}.revoked: {e}"))?,
            });
        }
        users.push(User {
            id: raw.id,
            created,
            tokens,
        });
    }
    Ok(users)
}

fn serialize(users: &[User]) -> Vec<u8> {
    let file = FileRepr {
        version: FORMAT_VERSION,
        users: users
            .iter()
            .map(|u| UserRepr {
                id: u.id.clone(),
                created: time_text(u.created),
                tokens: u
                    .tokens
                    .iter()
                    .map(|t| TokenRepr {
                        sha256: hex(&t.sha256),
                        created: time_text(t.created),
                        revoked: t.revoked.map(time_text),
                    })
                    .collect(),
            })
            .collect(),
    };
    let mut bytes = serde_json::to_vec_pretty(&file).expect("strings and numbers serialize");
    bytes.push(b'\n');
    bytes
}

fn time(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339(s).map_err(|e| format!("{s:?} is not an RFC 3339 UTC time: {e}"))
}

/// RFC 3339 UTC to the second, as the file holds times.
fn time_text(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn hex(d: &Digest) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in d {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn hex_digest(s: &str) -> Result<Digest, String> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let bad = || {
        format!(
            "not 64 hexadecimal digits ({} characters)",
            s.chars().count()
        )
    };
    let b = s.as_bytes();
    if b.len() != 64 {
        return Err(bad());
    }
    let mut d = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        d[i] = (nibble(pair[0]).ok_or_else(bad)? << 4) | nibble(pair[1]).ok_or_else(bad)?;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::{Arc, Barrier};

    use super::*;

    fn users_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("users.json")
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o777
    }

    fn malformed(path: &Path, text: &str) -> String {
        fs::write(path, text).unwrap();
        match UsersTable::load(path) {
            Err(e @ UsersError::Malformed { .. }) => e.to_string(),
            other => panic!("{text:?} loaded as {other:?}"),
        }
    }

    /// A valid file with one user and one active token, for the malformed cases to spoil.
    fn one_user(id: &str, sha256: &str) -> String {
        format!(
            r#"{{"version":1,"users":[{{"id":{id},"created":"2025-01-02T03:04:05Z","tokens":[{{"sha256":"{sha256}","created":"2025-01-02T03:04:05Z"}}]}}]}}"#,
            id = serde_json::to_string(id).unwrap()
        )
    }

    #[test]
    fn a_token_is_mbt_and_43_base64url_characters_and_a_valid_header_value() {
        let (token, sha256) = new_token().unwrap();
        let body = token.strip_prefix(TOKEN_PREFIX).expect("the prefix");
        assert_eq!(body.len(), 43, "{token}");
        assert!(
            body.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{token}"
        );
        assert_eq!(URL_SAFE_NO_PAD.decode(body).unwrap().len(), TOKEN_BYTES);
        http::HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
        assert_eq!(sha256, <[u8; 32]>::from(Sha256::digest(token.as_bytes())));
        let others: HashSet<String> = (0..100).map(|_| new_token().unwrap().0).collect();
        assert_eq!(others.len(), 100);
        assert!(!others.contains(&token));
    }

    #[test]
    fn added_users_load_back_and_their_tokens_find_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        let alice = add(&path, "alice").unwrap();
        let bob = add(&path, "bob@example.com").unwrap();
        assert_ne!(alice, bob);
        let table = UsersTable::load(&path).unwrap();
        assert_eq!(table.lookup(&alice), TokenLookup::Active { user: "alice" });
        assert_eq!(
            table.lookup(&bob),
            TokenLookup::Active {
                user: "bob@example.com"
            }
        );
        assert_eq!(table.active_users(), 2);
        assert_eq!((table.len(), table.is_empty()), (2, false));
        assert_eq!(
            table.user_ids().collect::<Vec<_>>(),
            ["alice", "bob@example.com"]
        );
        // What the file holds is what it reads back: a rewrite changes no byte.
        let before = fs::read(&path).unwrap();
        assert_eq!(serialize(&table.users), before);
    }

    #[test]
    fn the_file_holds_hashes_only_mode_0600_in_a_new_0700_directory() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("new");
        let path = sub.join("users.json");
        let token = add(&path, "alice").unwrap();
        assert_eq!(mode(&sub), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&sibling(&path, ".lock")), 0o600);
        let text = fs::read_to_string(&path).unwrap();
        let body = token.strip_prefix(TOKEN_PREFIX).unwrap();
        assert!(!text.contains(body), "the token is in the file:\n{text}");
        assert!(
            !text.contains(&body[..16]),
            "a part of the token is in the file"
        );
        assert!(!text.contains(TOKEN_PREFIX));
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["version"], 1);
        let user = &doc["users"][0];
        assert_eq!(user["id"], "alice");
        humantime::parse_rfc3339(user["created"].as_str().unwrap()).unwrap();
        let tok = &user["tokens"][0];
        assert_eq!(tok["sha256"], hex(&digest(&token)));
        assert!(tok.get("revoked").is_none());
        assert_eq!(tok.as_object().unwrap().len(), 2, "{tok}");
        // Nothing else is left beside it: no temporary file, the lock stays.
        let mut names: Vec<String> = fs::read_dir(&sub)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["users.json", "users.json.lock"]);
    }

    #[test]
    fn lookup_tells_active_revoked_and_unknown_tokens_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        let first = add(&path, "alice").unwrap();
        let second = rotate(&path, "alice").unwrap();
        add(&path, "bob").unwrap();
        let table = UsersTable::load(&path).unwrap();
        assert_eq!(table.lookup(&first), TokenLookup::Revoked { user: "alice" });
        assert_eq!(table.lookup(&second), TokenLookup::Active { user: "alice" });
        // Near misses are unknown: one character changed, cut, extended, without prefix.
        let mut flipped = second.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        for other in [
            flipped.as_str(),
            &second[..second.len() - 1],
            &format!("{second}x"),
            &second[TOKEN_PREFIX.len()..],
            &format!(" {second}"),
            "",
            TOKEN_PREFIX,
        ] {
            assert_eq!(table.lookup(other), TokenLookup::Unknown, "{other:?}");
        }
        revoke(&path, "alice").unwrap();
        let table = UsersTable::load(&path).unwrap();
        assert_eq!(
            table.lookup(&second),
            TokenLookup::Revoked { user: "alice" }
        );
        assert_eq!(table.active_users(), 1);
        assert_eq!(table.len(), 2);
        let empty = UsersTable::empty();
        assert_eq!(empty.lookup(&second), TokenLookup::Unknown);
        assert_eq!((empty.active_users(), empty.len()), (0, 0));
        assert!(empty.is_empty());
    }

    #[test]
    fn add_refuses_an_active_user_and_gives_a_revoked_one_a_new_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        let first = add(&path, "alice").unwrap();
        let before = fs::read(&path).unwrap();
        let e = add(&path, "alice").unwrap_err();
        assert!(
            matches!(e, UsersError::AlreadyActive { ref id } if id == "alice"),
            "{e}"
        );
        assert!(e.to_string().contains("already has an active token"), "{e}");
        assert_eq!(
            fs::read(&path).unwrap(),
            before,
            "a refused add wrote the file"
        );

        assert_eq!(revoke(&path, "alice").unwrap(), 1);
        let again = add(&path, "alice").unwrap();
        assert_ne!(again, first);
        let table = UsersTable::load(&path).unwrap();
        assert_eq!(table.lookup(&first), TokenLookup::Revoked { user: "alice" });
        assert_eq!(table.lookup(&again), TokenLookup::Active { user: "alice" });
        // Still one user, with both tokens.
        assert_eq!(table.len(), 1);
        assert_eq!(table.users[0].tokens.len(), 2);
    }

    #[test]
    fn revoke_revokes_every_token_and_twice_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        let token = add(&path, "alice").unwrap();
        assert_eq!(revoke(&path, "alice").unwrap(), 1);
        assert_eq!(revoke(&path, "alice").unwrap(), 0);
        let table = UsersTable::load(&path).unwrap();
        assert_eq!(table.lookup(&token), TokenLookup::Revoked { user: "alice" });
        assert_eq!(table.active_users(), 0);
    }

    #[test]
    fn rotate_replaces_the_active_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        let first = add(&path, "alice").unwrap();
        let second = rotate(&path, "alice").unwrap();
        let third = rotate(&path, "alice").unwrap();
        assert_eq!(HashSet::from([&first, &second, &third]).len(), 3);
        let table = UsersTable::load(&path).unwrap();
        let states: Vec<_> = [&first, &second, &third]
            .iter()
            .map(|t| table.lookup(t))
            .collect();
        assert_eq!(
            states,
            [
                TokenLookup::Revoked { user: "alice" },
                TokenLookup::Revoked { user: "alice" },
                TokenLookup::Active { user: "alice" },
            ]
        );
        assert_eq!(table.active_users(), 1);
    }

    #[test]
    fn unknown_and_revoked_users_are_refused_where_they_must_be() {
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        // No file at all: an unknown user, and no file appears.
        for e in [
            revoke(&path, "ghost").unwrap_err(),
            rotate(&path, "ghost").unwrap_err(),
        ] {
            assert!(matches!(e, UsersError::UnknownUser { .. }), "{e}");
            assert_eq!(
                e.to_string(),
                format!("no user \"ghost\" in {}", path.display())
            );
        }
        assert!(!path.exists());

        add(&path, "alice").unwrap();
        let e = revoke(&path, "Alice").unwrap_err();
        assert!(matches!(e, UsersError::UnknownUser { .. }), "{e}");
        revoke(&path, "alice").unwrap();
        let before = fs::read(&path).unwrap();
        let e = rotate(&path, "alice").unwrap_err();
        assert!(matches!(e, UsersError::Revoked { .. }), "{e}");
        assert!(e.to_string().contains("is revoked"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), before);
    }

    #[test]
    fn invalid_user_ids_are_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        let long = "x".repeat(crate::user::MAX_USER_ID_BYTES + 1);
        for (id, why) in [
            ("", "user id is empty"),
            ("a\nb", "control character U+000A"),
            ("a\u{202E}b", "U+202E"),
            (long.as_str(), "bytes long"),
        ] {
            for e in [
                add(&path, id).unwrap_err(),
                revoke(&path, id).unwrap_err(),
                rotate(&path, id).unwrap_err(),
            ] {
                assert!(matches!(e, UsersError::InvalidId { .. }), "{id:?}: {e}");
                let msg = e.to_string();
                assert!(msg.starts_with("invalid user id "), "{msg}");
                assert!(msg.contains(why), "{msg}");
                // Debug formatting: a control character cannot break the message's line.
                assert!(!msg.contains('\n'), "{msg}");
            }
        }
        assert!(!path.exists());
        assert!(!dir.path().join("users.json.lock").exists());
    }

    #[test]
    fn list_shows_created_revoked_and_last_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        let t0 = SystemTime::now() - Duration::from_secs(1);
        add(&path, "alice").unwrap();
        add(&path, "bob").unwrap();
        revoke(&path, "bob").unwrap();
        let used = 1_735_787_045_123;
        write_last_used(&path, &HashMap::from([("alice".to_string(), used)])).unwrap();
        let users = list(&path).unwrap();
        assert_eq!(users.len(), 2);
        let (alice, bob) = (&users[0], &users[1]);
        assert_eq!(alice.id, "alice");
        assert!(alice.is_active());
        assert!(alice.created >= t0 && alice.created <= SystemTime::now());
        assert_eq!(alice.revoked, None);
        assert_eq!(
            alice.last_used,
            Some(UNIX_EPOCH + Duration::from_millis(used))
        );
        assert_eq!(bob.id, "bob");
        assert!(!bob.is_active());
        assert!(bob.revoked.unwrap() >= bob.created);
        assert_eq!(bob.last_used, None);
        // A user added again after a revoke is active and keeps its first creation time.
        add(&path, "bob").unwrap();
        let again = list(&path).unwrap();
        assert!(again[1].is_active());
        assert_eq!(again[1].created, bob.created);
    }

    #[test]
    fn last_used_round_trips_private_and_reads_empty_when_missing_or_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        assert!(read_last_used(&path).is_empty());
        let map = HashMap::from([("alice".to_string(), 1u64), ("b c".to_string(), u64::MAX)]);
        write_last_used(&path, &map).unwrap();
        let file = dir.path().join("users.json.last-used");
        assert_eq!(last_used_path(&path), file);
        assert_eq!(mode(&file), 0o600);
        assert_eq!(read_last_used(&path), map);
        for damaged in [
            &b""[..],
            b"{",
            b"[1,2]",
            b"{\"alice\": -1}",
            b"{\"alice\": \"yesterday\"}",
            b"\xff\xfe",
        ] {
            fs::write(&file, damaged).unwrap();
            assert!(read_last_used(&path).is_empty(), "{damaged:?}");
        }
        fs::remove_file(&file).unwrap();
        fs::create_dir(&file).unwrap();
        assert!(read_last_used(&path).is_empty());
        // list goes on without it.
        add(&path, "alice").unwrap();
        assert_eq!(list(&path).unwrap()[0].last_used, None);
    }

    #[test]
    fn concurrent_adds_under_the_lock_lose_nothing() {
        const THREADS: usize = 8;
        const EACH: usize = 6;
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(users_path(&dir));
        let start = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (path, start) = (Arc::clone(&path), Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    (0..EACH)
                        .map(|i| {
                            let id = format!("user-{t}-{i}");
                            let token = add(&path, &id).unwrap();
                            (id, token)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let added: Vec<(String, String)> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let table = UsersTable::load(&path).unwrap();
        assert_eq!(table.len(), THREADS * EACH);
        for (id, token) in &added {
            assert_eq!(table.lookup(token), TokenLookup::Active { user: id });
        }
    }

    #[test]
    fn a_missing_file_is_missing_and_a_directory_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        let e = UsersTable::load(&path).unwrap_err();
        assert!(matches!(e, UsersError::Missing { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!("users file {} does not exist", path.display())
        );
        assert!(matches!(list(&path), Err(UsersError::Missing { .. })));
        fs::create_dir(&path).unwrap();
        let e = UsersTable::load(&path).unwrap_err();
        assert!(matches!(e, UsersError::Unreadable { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("cannot read users file {}: ", path.display())),
            "{e}"
        );
    }

    #[test]
    fn malformed_files_are_refused_naming_the_file_and_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        let good = hex(&digest("mbt_x"));
        let other = hex(&digest("mbt_y"));
        fs::write(&path, one_user("alice", &good)).unwrap();
        UsersTable::load(&path).expect("the unspoilt file loads");
        let two = |a: &str, b: &str| {
            format!(
                r#"{{"version":1,"users":[
                {{"id":"{a}","created":"2025-01-02T03:04:05Z","tokens":[{{"sha256":"{good}","created":"2025-01-02T03:04:05Z"}}]}},
                {{"id":"{b}","created":"2025-01-02T03:04:05Z","tokens":[{{"sha256":"{}","created":"2025-01-02T03:04:05Z"}}]}}]}}"#,
                if a == b { &other } else { &good }
            )
        };
        let whole = one_user("alice", &good);
        let cases: Vec<(String, &str)> = vec![
            (whole[..whole.len() / 2].to_string(), "EOF while parsing"),
            (String::new(), "the file is empty"),
            ("\n".into(), "the file is empty"),
            ("[]".into(), "not a JSON object"),
            (r#"{"users":[]}"#.into(), "no \"version\""),
            (
                whole.replace("\"version\":1", "\"version\":2"),
                "version 2 is not supported",
            ),
            (
                whole.replace("\"version\":1", "\"version\":\"1\""),
                "version \"1\" is not supported",
            ),
            (
                whole.replace(&good, &good[..62]),
                "users[0].tokens[0].sha256: not 64 hexadecimal digits (62",
            ),
            (
                whole.replace(&good, &format!("{}zz", &good[..62])),
                "users[0].tokens[0].sha256: not 64 hexadecimal digits",
            ),
            (
                whole.replace(&good, &format!("{}é", &good[..62])),
                "users[0].tokens[0].sha256: not 64 hexadecimal digits",
            ),
            (one_user("", &good), "users[0].id \"\": user id is empty"),
            (
                one_user("a\u{7}b", &good),
                "users[0].id \"a\\u{7}b\": user id contains control character U+0007",
            ),
            (two("alice", "alice"), "users[1].id \"alice\" occurs twice"),
            (
                two("alice", "bob"),
                "users[1].tokens[0].sha256: the same hash as users[0].tokens[0]",
            ),
            (
                whole.replacen("2025-01-02T03:04:05Z", "yesterday", 1),
                "users[0].created: \"yesterday\" is not an RFC 3339",
            ),
            (
                whole.replace("\"}]}]}", "\",\"revoked\":\"2025-13-01T00:00:00Z\"}]}]}"),
                "users[0].tokens[0].revoked",
            ),
            (
                whole.replace(
                    &format!(r#"{{"sha256":"{good}","created":"2025-01-02T03:04:05Z"}}"#),
                    "",
                ),
                "users[0].tokens: user \"alice\" has no token",
            ),
            (
                whole.replace("\"id\"", "\"name\":\"x\",\"id\""),
                "unknown field `name`",
            ),
            (
                whole.replace("\"sha256\"", "\"token\":\"mbt_x\",\"sha256\""),
                "unknown field `token`",
            ),
            (
                whole.replace(",\"users\"", ",\"extra\":1,\"users\""),
                "unknown field `extra`",
            ),
        ];
        for (text, want) in cases {
            let msg = malformed(&path, &text);
            let prefix = format!("users file {} is malformed: ", path.display());
            assert!(msg.starts_with(&prefix), "{msg}");
            assert!(
                msg.contains(want),
                "{text:?}\n  got:  {msg}\n  want: {want}"
            );
        }
    }

    #[test]
    fn a_malformed_file_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        fs::write(&path, "{\"version\":1,\"users\":[").unwrap();
        for e in [
            add(&path, "alice").unwrap_err(),
            revoke(&path, "alice").unwrap_err(),
            rotate(&path, "alice").unwrap_err(),
        ] {
            assert!(matches!(e, UsersError::Malformed { .. }), "{e}");
        }
        assert_eq!(fs::read(&path).unwrap(), b"{\"version\":1,\"users\":[");
    }

    #[test]
    fn a_file_written_by_hand_loads_with_uppercase_hex_and_fractional_times() {
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        let sha = hex(&digest("mbt_handmade")).to_ascii_uppercase();
        let text = format!(
            r#"{{
  "version": 1,
  "users": [
    {{ "id": "用户 1", "created": "2025-01-02T03:04:05.250Z",
      "tokens": [{{ "sha256": "{sha}", "created": "2025-01-02T03:04:05Z", "revoked": "2025-01-03T00:00:00Z" }}] }}
  ]
}}"#
        );
        fs::write(&path, text).unwrap();
        let table = UsersTable::load(&path).unwrap();
        assert_eq!(
            table.lookup("mbt_handmade"),
            TokenLookup::Revoked { user: "用户 1" }
        );
        assert_eq!(table.active_users(), 0);
        // A change rewrites it in the canonical form.
        add(&path, "用户 1").unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(&sha.to_ascii_lowercase()), "{text}");
    }

    #[test]
    fn debug_output_shows_counts_not_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        let token = add(&path, "alice").unwrap();
        let table = UsersTable::load(&path).unwrap();
        let shown = format!("{table:?}");
        assert_eq!(shown, "UsersTable { users: 1, active_users: 1, tokens: 1 }");
        assert!(!shown.contains(&hex(&digest(&token))[..8]));
    }

    #[test]
    fn a_change_makes_a_loosened_file_0600_again() {
        // An operator who loosened the file by hand gets 0600 back at the next change.
        let dir = tempfile::tempdir().unwrap();
        let path = users_path(&dir);
        add(&path, "alice").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        add(&path, "bob").unwrap();
        assert_eq!(mode(&path), 0o600);
    }
}
