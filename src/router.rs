//! The sticky router: userId → worker slot.
//!
//! A consistent-hash ring byte-for-byte compatible with the TypeScript sticky router (32-bit
//! FNV-1a over UTF-16 code units, 150 virtual nodes per worker keyed `worker-{i}:{v}`, first
//! node ≥ hash with wrap), optionally with bounded load (HAProxy's `hash-balance-factor`,
//! Mirrokni et al. 2018), and a routing table that pins each user to the slot it was first
//! given. The table is persisted append-only in `routing-table.jsonl` so assignments survive
//! gateway restarts; lookups of assigned users are lock-free.
//!
//! The router does not validate user ids beyond refusing the empty string: callers validate
//! with [`crate::user::validate_user_id`] first.

use std::borrow::Cow;
use std::collections::HashMap as StdHashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

/// Virtual nodes per worker on the ring (as in the TypeScript router).
pub const VIRTUAL_NODES: usize = 150;

/// The most worker slots a ring accepts (150 nodes each; bounds the ring's memory).
pub const MAX_WORKERS: usize = 4096;

/// The largest accepted balance factor; beyond it the bound could never bite anyway.
pub const MAX_BALANCE_FACTOR: f64 = 1_000_000.0;

/// The file name of the persisted routing table inside the router's directory.
pub const TABLE_FILE: &str = "routing-table.jsonl";

/// Fixed-point scale of the balance factor: it is held in millionths so the load bound is
/// computed in exact integer arithmetic (1.1 × 10 users is 11, not 11.000000000000002 → 12).
const FACTOR_SCALE: u64 = 1_000_000;

const FNV_OFFSET_BASIS: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// Errors of the router.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The worker count is 0 or above [`MAX_WORKERS`].
    #[error("worker count must be between 1 and {MAX_WORKERS}, got {0}")]
    InvalidWorkerCount(usize),
    /// The balance factor is not 0 (off) and not a finite number in 1.0..=1e6.
    #[error("balance factor must be 0 (off) or between 1.0 and {MAX_BALANCE_FACTOR}, got {0}")]
    InvalidBalanceFactor(f64),
    /// The user id is the empty string.
    #[error("user id is empty")]
    EmptyUser,
    /// The table holds `max_users` users: no new user is assigned.
    #[error("the routing table holds its limit of {0} users; no new user can be assigned")]
    Full(usize),
    /// One user per slot ([`StickyRouter::one_user_per_slot`]) and every slot has its user.
    #[error("all {0} slots have their user; no new user can be assigned")]
    SlotsTaken(usize),
    /// Reading, writing or syncing the routing table failed.
    #[error("routing table {path}: {source}")]
    Io {
        /// The file (or directory) concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl RouterError {
    fn io(path: &Path, source: io::Error) -> Self {
        RouterError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// 32-bit FNV-1a over the UTF-16 code units of `s`, as JavaScript computes it with
/// `charCodeAt`: each whole code unit is XORed in, then the hash is multiplied (wrapping) by
/// the FNV prime.
pub fn fnv1a_utf16(s: &str) -> u32 {
    s.encode_utf16().fold(FNV_OFFSET_BASIS, |hash, unit| {
        (hash ^ u32::from(unit)).wrapping_mul(FNV_PRIME)
    })
}

/// One virtual node of the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Node {
    hash: u32,
    worker: u32,
}

/// The consistent-hash ring: 150 virtual nodes per worker, keyed `worker-{i}:{v}`.
#[derive(Debug, Clone)]
pub struct HashRing {
    /// Sorted by (hash, worker): equal hashes (rare) resolve to the lower worker, which is
    /// also what a stable sort by hash of the TypeScript insertion order gives.
    nodes: Vec<Node>,
    workers: usize,
}

impl HashRing {
    /// Builds the ring for `workers` slots (1..=[`MAX_WORKERS`]).
    pub fn new(workers: usize) -> Result<HashRing, RouterError> {
        if workers == 0 || workers > MAX_WORKERS {
            return Err(RouterError::InvalidWorkerCount(workers));
        }
        let mut nodes = Vec::with_capacity(workers * VIRTUAL_NODES);
        let mut key = String::new();
        for worker in 0..workers {
            for v in 0..VIRTUAL_NODES {
                key.clear();
                // Writing to a String cannot fail.
                let _ = std::fmt::Write::write_fmt(&mut key, format_args!("worker-{worker}:{v}"));
                nodes.push(Node {
                    hash: fnv1a_utf16(&key),
                    // workers <= MAX_WORKERS, so this never truncates.
                    worker: worker as u32,
                });
            }
        }
        nodes.sort_unstable();
        Ok(HashRing { nodes, workers })
    }

    /// The number of worker slots.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Index of the first node with hash ≥ `hash`, wrapping to 0.
    fn start(&self, hash: u32) -> usize {
        let i = self.nodes.partition_point(|n| n.hash < hash);
        if i == self.nodes.len() { 0 } else { i }
    }

    /// The worker owning `key` on the pure ring (no load bound): the TypeScript assignment.
    pub fn lookup(&self, key: &str) -> usize {
        // The ring is never empty (workers >= 1), so `start` is a valid index.
        self.nodes
            .get(self.start(fnv1a_utf16(key)))
            .map_or(0, |n| n.worker as usize)
    }

    /// The distinct workers in ring order, starting at `key`'s position: the owner first, then
    /// each further worker the first time one of its nodes is met.
    pub fn walk(&self, key: &str) -> Walk<'_> {
        let start = self.start(fnv1a_utf16(key));
        Walk {
            nodes: self.nodes[start..].iter().chain(&self.nodes[..start]),
            seen: vec![false; self.workers],
            remaining: self.workers,
        }
    }
}

/// Iterator of [`HashRing::walk`]: stops as soon as every worker has been seen.
#[derive(Debug)]
pub struct Walk<'a> {
    nodes: std::iter::Chain<std::slice::Iter<'a, Node>, std::slice::Iter<'a, Node>>,
    seen: Vec<bool>,
    remaining: usize,
}

impl Iterator for Walk<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        while self.remaining > 0 {
            let w = self.nodes.next()?.worker as usize;
            if let Some(seen) = self.seen.get_mut(w).filter(|s| !**s) {
                *seen = true;
                self.remaining -= 1;
                return Some(w);
            }
        }
        None
    }
}

/// Parses and checks a balance factor; `None` means the bound is off.
fn parse_balance_factor(f: f64) -> Result<Option<u64>, RouterError> {
    if f == 0.0 {
        return Ok(None);
    }
    if !f.is_finite() || !(1.0..=MAX_BALANCE_FACTOR).contains(&f) {
        return Err(RouterError::InvalidBalanceFactor(f));
    }
    // In range 1e6..=1e12 after scaling: exact in f64 and in u64.
    Ok(Some((f * FACTOR_SCALE as f64).round() as u64))
}

/// `ceil(f × (assigned + 1) / workers)` with `f` in millionths, in exact integer arithmetic.
fn load_bound(factor_micros: u64, assigned: usize, workers: usize) -> u128 {
    let num = u128::from(factor_micros) * (assigned as u128 + 1);
    let den = u128::from(FACTOR_SCALE) * workers as u128;
    num.div_ceil(den)
}

/// One line of the routing table file.
#[derive(Debug, Serialize, Deserialize)]
struct Entry<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
    worker: usize,
}

/// The append-only routing table file.
#[derive(Debug)]
struct Journal {
    file: File,
    path: PathBuf,
    /// Length of the file up to its last complete, valid line.
    len: u64,
    /// A failed append may have left a partial line behind `len`: cut it before the next one.
    dirty: bool,
    /// Successful appends (each one fsync), for [`StickyRouter::syncs`].
    syncs: u64,
}

impl Journal {
    /// Appends entries, one line each, as a single write and syncs them once (a group commit:
    /// all first assignments of a batch share one fsync); on failure the file is cut back to
    /// its last complete line (or marked for that before the next append).
    fn append(&mut self, entries: &[(&str, usize)]) -> Result<(), io::Error> {
        if self.dirty {
            self.file.set_len(self.len)?;
            self.dirty = false;
        }
        let mut lines = Vec::with_capacity(entries.len() * 48);
        for &(user, worker) in entries {
            serde_json::to_writer(
                &mut lines,
                &Entry {
                    user: Cow::Borrowed(user),
                    worker,
                },
            )?;
            lines.push(b'\n');
        }
        let result = self
            .file
            .write_all(&lines)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.len += lines.len() as u64;
                self.syncs += 1;
                Ok(())
            }
            Err(e) => {
                // The lines may or may not be on disk: remove them so the file and the table
                // agree.
                self.dirty = self.file.set_len(self.len).is_err();
                Err(e)
            }
        }
    }
}

/// What a first assignment needs, behind the mutex.
#[derive(Debug)]
struct AssignState {
    /// Users per worker slot.
    counts: Vec<usize>,
    /// Users whose persisted slot no longer exists (fewer workers than before), with that slot.
    stale: StdHashMap<Box<str>, usize>,
    /// Per slot, its longest-standing user: the one whose current assignment (its last line)
    /// comes first in the table file, or the first assigned since. The one user a slot keeps
    /// under [`StickyRouter::one_user_per_slot`].
    senior: Vec<Option<Box<str>>>,
    journal: Option<Journal>,
}

/// The sticky router: the ring, the optional load bound and the routing table.
///
/// `route` on an assigned user is a hash and a lock-free map read; only a first assignment
/// takes the mutex (count update, file append and fsync, table insert). Share it via `Arc`.
#[derive(Debug)]
pub struct StickyRouter {
    ring: HashRing,
    /// Balance factor in millionths; `None` = pure ring.
    factor: Option<u64>,
    table: papaya::HashMap<Box<str>, usize>,
    len: AtomicUsize,
    /// Most users the table takes (each costs memory and a line on disk for good).
    max_users: usize,
    /// The limit is one user per slot: a full table is [`RouterError::SlotsTaken`].
    per_slot: bool,
    state: Mutex<AssignState>,
}

impl StickyRouter {
    /// A router without a file: assignments last as long as the value.
    pub fn in_memory(workers: usize, balance_factor: f64) -> Result<StickyRouter, RouterError> {
        Self::build(workers, balance_factor, Vec::new(), None)
    }

    /// Opens (or creates) `dir/routing-table.jsonl`, loads its assignments and appends new
    /// ones to it.
    ///
    /// Tolerated on load: a torn or garbage tail (ignored, and the file cut back to its last
    /// valid line so later appends stay parseable), garbage lines in the middle (skipped),
    /// duplicate lines for a user (the LAST one wins: duplicates only arise when a stale user
    /// was re-assigned, and the latest line is the slot that user was last served by).
    /// A persisted slot ≥ `workers` (restarted with fewer workers) is not loaded: that user is
    /// re-assigned on next sight. With more workers than before, no existing user moves.
    /// [`StickyRouter::one_user_per_slot`] then keeps at most one user per slot.
    /// Only one router may have the file open at a time.
    pub fn open(
        dir: &Path,
        workers: usize,
        balance_factor: f64,
    ) -> Result<StickyRouter, RouterError> {
        // Check the arguments before touching the file system.
        HashRing::new(workers)?;
        parse_balance_factor(balance_factor)?;
        std::fs::create_dir_all(dir).map_err(|e| RouterError::io(dir, e))?;
        let path = dir.join(TABLE_FILE);
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| RouterError::io(&path, e))?;
        if !existed {
            sync_dir(dir);
        }
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .map_err(|e| RouterError::io(&path, e))?;
        let (entries, valid_len) = parse_table(&data);
        if valid_len < data.len() {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = data.len() - valid_len,
                "routing table has a torn or invalid tail; truncating it"
            );
            file.set_len(valid_len as u64)
                .and_then(|()| file.sync_data())
                .map_err(|e| RouterError::io(&path, e))?;
        }
        let journal = Journal {
            file,
            path,
            len: valid_len as u64,
            dirty: false,
            syncs: 0,
        };
        Self::build(workers, balance_factor, entries, Some(journal))
    }

    fn build(
        workers: usize,
        balance_factor: f64,
        entries: Vec<(String, usize)>,
        journal: Option<Journal>,
    ) -> Result<StickyRouter, RouterError> {
        let ring = HashRing::new(workers)?;
        let factor = parse_balance_factor(balance_factor)?;
        // Last line wins (see `open`); its position in the file is kept to find each slot's
        // longest-standing user.
        let mut latest: StdHashMap<Box<str>, (usize, usize)> =
            StdHashMap::with_capacity(entries.len());
        for (line, (user, worker)) in entries.into_iter().enumerate() {
            latest.insert(user.into_boxed_str(), (worker, line));
        }
        let table = papaya::HashMap::with_capacity(latest.len());
        let mut counts = vec![0; workers];
        let mut senior: Vec<Option<(usize, Box<str>)>> = vec![None; workers];
        let mut stale = StdHashMap::new();
        {
            let pinned = table.pin();
            for (user, (worker, line)) in latest {
                match counts.get_mut(worker) {
                    Some(c) => {
                        *c += 1;
                        if let Some(first) = senior.get_mut(worker)
                            && first.as_ref().is_none_or(|&(l, _)| line < l)
                        {
                            *first = Some((line, user.clone()));
                        }
                        pinned.insert(user, worker);
                    }
                    None => {
                        stale.insert(user, worker);
                    }
                }
            }
        }
        let senior = senior.into_iter().map(|s| s.map(|(_, u)| u)).collect();
        if !stale.is_empty() {
            tracing::warn!(
                users = stale.len(),
                workers,
                "routing table has users on slots that no longer exist; they are re-assigned on next sight"
            );
        }
        let len = counts.iter().sum();
        Ok(StickyRouter {
            ring,
            factor,
            table,
            len: AtomicUsize::new(len),
            max_users: usize::MAX,
            per_slot: false,
            state: Mutex::new(AssignState {
                counts,
                stale,
                senior,
                journal,
            }),
        })
    }

    /// Limits the table to `max` users: beyond, a new user gets [`RouterError::Full`]. Users
    /// already assigned (also those loaded over the limit) keep their slot.
    pub fn with_max_users(mut self, max: usize) -> StickyRouter {
        self.max_users = max;
        self
    }

    /// At most one user per slot (OpenClaw cells: a cell serves one user): `max_users` is the
    /// slot count and a new user beyond gets [`RouterError::SlotsTaken`]. A new user takes
    /// the first slot without a user in its ring walk (what bounded load at factor 1 gives).
    ///
    /// The loaded table is brought to that rule too, since it may come from a run without
    /// cells (several users per slot) or with more workers (users on slots that no longer
    /// exist): **each slot keeps only its longest-standing user, the one whose current
    /// assignment (its last line) comes first in the table file**; every other user of the
    /// slot, and every user whose slot no longer exists, is dropped from the table. A dropped
    /// user is then a new user: it takes a slot that has no user, if one is left, and is
    /// refused with [`RouterError::SlotsTaken`] otherwise. Nothing is written for a dropped
    /// user (its lines stay in the file, and a later run with more workers or without cells
    /// finds it where it was), so the rule gives the same keeper at every load.
    pub fn one_user_per_slot(mut self) -> StickyRouter {
        self.max_users = self.ring.workers();
        self.per_slot = true;
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let pinned = self.table.pin();
        let shared: Vec<Box<str>> = pinned
            .iter()
            .filter(|&(user, &slot)| state.senior.get(slot).and_then(Option::as_ref) != Some(user))
            .map(|(user, _)| user.clone())
            .collect();
        for user in &shared {
            pinned.remove(user);
        }
        let stale = state.stale.len();
        state.stale.clear();
        state.counts = state
            .senior
            .iter()
            .map(|s| usize::from(s.is_some()))
            .collect();
        let kept = state.counts.iter().sum();
        self.len.store(kept, Ordering::Release);
        if !shared.is_empty() || stale > 0 {
            tracing::warn!(
                kept,
                sharing = shared.len(),
                stale,
                "the routing table has users sharing a slot (from a run without cells) or on \
                 slots that no longer exist: one user per cell, each slot keeps its \
                 longest-standing user; the others take a free cell on next sight or are refused"
            );
        }
        drop(pinned);
        self
    }

    /// The slot of `user`, assigning (and persisting) one on first sight.
    ///
    /// Errors: an empty `user`, a full table ([`StickyRouter::with_max_users`]), or a failure
    /// to persist a new assignment (then nothing is assigned, and a later call tries again).
    pub fn route(&self, user: &str) -> Result<usize, RouterError> {
        if let Some(&slot) = self.table.pin().get(user) {
            return Ok(slot);
        }
        self.route_many(&[user])
            .pop()
            .unwrap_or(Err(RouterError::EmptyUser))
    }

    /// [`StickyRouter::route`] for several users at once, one result per user in order. The
    /// new users among them are assigned in that order and persisted together, with one
    /// fsync: a caller that collects the first sights arriving meanwhile (as each gateway
    /// core does) pays one disk sync per batch rather than one per user.
    pub fn route_many(&self, users: &[&str]) -> Vec<Result<usize, RouterError>> {
        let mut results: Vec<Result<usize, RouterError>> = Vec::with_capacity(users.len());
        let mut state = self.lock();
        let table = self.table.pin();
        // Chosen in this batch, not yet persisted: user → slot, in order (and by user), and
        // how many of them are new to the table (not stale).
        let mut fresh: Vec<(&str, usize)> = Vec::new();
        let mut fresh_by_user: StdHashMap<&str, usize> = StdHashMap::new();
        let mut fresh_new = 0usize;
        for &user in users {
            // Assigned before, or by another thread while we waited for the lock.
            if let Some(&slot) = table.get(user) {
                results.push(Ok(slot));
                continue;
            }
            if user.is_empty() {
                results.push(Err(RouterError::EmptyUser));
                continue;
            }
            if let Some(&slot) = fresh_by_user.get(user) {
                results.push(Ok(slot));
                continue;
            }
            // A user whose slot no longer exists was counted before: it is not a new one.
            let stale = state.stale.contains_key(user);
            if !stale && self.len.load(Ordering::Acquire) + fresh_new >= self.max_users {
                results.push(Err(if self.per_slot {
                    RouterError::SlotsTaken(self.max_users)
                } else {
                    RouterError::Full(self.max_users)
                }));
                continue;
            }
            let slot = self.choose(user, &state.counts);
            if let Some(c) = state.counts.get_mut(slot) {
                *c += 1;
            }
            fresh.push((user, slot));
            fresh_by_user.insert(user, slot);
            fresh_new += usize::from(!stale);
            results.push(Ok(slot));
        }
        if fresh.is_empty() {
            return results;
        }
        let persisted = match state.journal.as_mut() {
            Some(journal) => journal
                .append(&fresh)
                .map_err(|e| (journal.path.clone(), e)),
            None => Ok(()),
        };
        if let Err((path, e)) = persisted {
            // Nothing of the batch is assigned: undo the counts, fail its new users.
            for &(_, slot) in &fresh {
                if let Some(c) = state.counts.get_mut(slot) {
                    *c -= 1;
                }
            }
            for (r, &user) in results.iter_mut().zip(users) {
                if r.is_ok() && table.get(user).is_none() {
                    // One error per user: a copy that keeps the errno where there is one.
                    let source = e.raw_os_error().map_or_else(
                        || io::Error::new(e.kind(), e.to_string()),
                        io::Error::from_raw_os_error,
                    );
                    *r = Err(RouterError::Io {
                        path: path.clone(),
                        source,
                    });
                }
            }
            return results;
        }
        for &(user, slot) in &fresh {
            if let Some(previous) = state.stale.remove(user) {
                tracing::warn!(
                    user,
                    previous = format_args!("worker-{previous}"),
                    now = format_args!("worker-{slot}"),
                    "re-assigned a user whose slot no longer exists"
                );
            }
            if let Some(senior) = state.senior.get_mut(slot)
                && senior.is_none()
            {
                *senior = Some(user.into());
            }
            table.insert(user.into(), slot);
        }
        self.len.fetch_add(fresh.len(), Ordering::Release);
        results
    }

    /// Fsyncs of the routing table so far: one per batch of first assignments.
    pub fn syncs(&self) -> u64 {
        self.lock().journal.as_ref().map_or(0, |j| j.syncs)
    }

    /// Where a new user goes given the current counts.
    fn choose(&self, user: &str, counts: &[usize]) -> usize {
        if self.per_slot {
            // A slot without a user; the limit leaves one to every new user it admits.
            return self
                .ring
                .walk(user)
                .find(|&w| counts.get(w) == Some(&0))
                .unwrap_or_else(|| self.ring.lookup(user));
        }
        let Some(factor) = self.factor else {
            return self.ring.lookup(user);
        };
        let assigned: usize = counts.iter().sum();
        let bound = load_bound(factor, assigned, self.ring.workers());
        // With f >= 1 some worker is always under the bound (else the counts would sum to more
        // than `assigned`); the ring owner is only a fallback that cannot be reached.
        self.ring
            .walk(user)
            .find(|&w| counts.get(w).is_some_and(|&c| (c as u128) < bound))
            .unwrap_or_else(|| self.ring.lookup(user))
    }

    fn lock(&self) -> MutexGuard<'_, AssignState> {
        // Nothing in the critical section panics midway; the state stays consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The assigned slot of `user`, if it has one.
    pub fn lookup(&self, user: &str) -> Option<usize> {
        self.table.pin().get(user).copied()
    }

    /// The assigned slot of `user`, or where it would go now if unseen, without assigning.
    pub fn peek(&self, user: &str) -> usize {
        if let Some(slot) = self.lookup(user) {
            return slot;
        }
        let state = self.lock();
        match self.table.pin().get(user) {
            Some(&slot) => slot,
            None => self.choose(user, &state.counts),
        }
    }

    /// The number of assigned users (the status's `routingTableSize`).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether no user is assigned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Users per worker slot.
    pub fn counts(&self) -> Vec<usize> {
        self.lock().counts.clone()
    }

    /// The number of worker slots.
    pub fn workers(&self) -> usize {
        self.ring.workers()
    }

    /// The ring (pure consistent-hash assignment, without the load bound).
    pub fn ring(&self) -> &HashRing {
        &self.ring
    }
}

/// Parses the table file: the valid entries in file order and the byte length up to the end
/// of the last valid line. Lines after it (a torn or garbage tail) are dropped.
fn parse_table(data: &[u8]) -> (Vec<(String, usize)>, usize) {
    let mut entries = Vec::new();
    let mut valid_len = 0;
    let mut pos = 0;
    while let Some(nl) = data[pos..].iter().position(|&b| b == b'\n') {
        let end = pos + nl + 1;
        let line = &data[pos..pos + nl];
        match serde_json::from_slice::<Entry<'_>>(line) {
            Ok(e) if !e.user.is_empty() => {
                entries.push((e.user.into_owned(), e.worker));
                valid_len = end;
            }
            _ if line.iter().all(u8::is_ascii_whitespace) => {}
            _ => {
                tracing::warn!(offset = pos, "skipping an unreadable routing table line");
            }
        }
        pos = end;
    }
    (entries, valid_len)
}

/// Makes a newly created file's directory entry durable; a failure only costs durability of
/// an empty file, so it is logged, not fatal.
fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not sync the routing table directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn table_path(dir: &Path) -> PathBuf {
        dir.join(TABLE_FILE)
    }

    fn read_lines(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(table_path(dir))
            .expect("read table")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn fnv1a_vectors() {
        assert_eq!(fnv1a_utf16(""), 0x811c9dc5);
        assert_eq!(fnv1a_utf16("a"), 0xe40c292c);
        assert_eq!(fnv1a_utf16("foobar"), 0xbf9cf968);
    }

    #[test]
    fn fnv1a_uses_whole_utf16_code_units() {
        // 'é' is one code unit 0x00E9 (not its two UTF-8 bytes).
        let by_hand = (FNV_OFFSET_BASIS ^ 0xE9).wrapping_mul(FNV_PRIME);
        assert_eq!(fnv1a_utf16("é"), by_hand);
        // U+1F600 is the surrogate pair D83D DE00.
        let pair = [0xD83Du32, 0xDE00]
            .iter()
            .fold(FNV_OFFSET_BASIS, |h, &u| (h ^ u).wrapping_mul(FNV_PRIME));
        assert_eq!(fnv1a_utf16("😀"), pair);
    }

    #[test]
    fn ring_vectors_three_workers() {
        let ring = HashRing::new(3).expect("ring");
        for (user, worker) in [
            ("user-a", 1),
            ("user-b", 2),
            ("user-c", 1),
            ("user-1", 0),
            ("user-2", 1),
        ] {
            assert_eq!(ring.lookup(user), worker, "{user}");
        }
    }

    /// Assignments computed by an independent model of the TypeScript router (FNV-1a over
    /// UTF-16, 150 virtual nodes, the bounded-load rule at factors 1.0, 1.25 and 2.0; Unicode
    /// and astral-plane user ids): `tests/data/router-vectors.json`.
    #[test]
    fn assignments_match_the_independent_model() {
        #[derive(serde::Deserialize)]
        struct Vectors {
            fnv1a_checks: StdHashMap<String, u32>,
            cases: Vec<Case>,
        }
        #[derive(serde::Deserialize)]
        struct Case {
            workers: usize,
            balance_factor: f64,
            #[serde(default)]
            order: Vec<String>,
            assignments: StdHashMap<String, usize>,
        }
        let v: Vectors =
            serde_json::from_str(include_str!("../tests/data/router-vectors.json")).expect("json");
        for (s, h) in &v.fnv1a_checks {
            assert_eq!(fnv1a_utf16(s), *h, "fnv1a({s:?})");
        }
        let mut checked = 0;
        for case in &v.cases {
            let what = format!("{} workers, factor {}", case.workers, case.balance_factor);
            let router =
                StickyRouter::in_memory(case.workers, case.balance_factor).expect("router");
            if case.balance_factor == 0.0 {
                let ring = HashRing::new(case.workers).expect("ring");
                for (user, &worker) in &case.assignments {
                    assert_eq!(ring.lookup(user), worker, "{what}: {user:?}");
                    assert_eq!(
                        router.route(user).expect("route"),
                        worker,
                        "{what}: {user:?}"
                    );
                    checked += 1;
                }
            } else {
                // Bounded load depends on the order of first sight.
                assert_eq!(case.order.len(), case.assignments.len(), "{what}");
                for user in &case.order {
                    let got = router.route(user).expect("route");
                    assert_eq!(Some(&got), case.assignments.get(user), "{what}: {user:?}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 2112);
    }

    #[test]
    fn ring_shape() {
        let ring = HashRing::new(5).expect("ring");
        assert_eq!(ring.nodes.len(), 5 * VIRTUAL_NODES);
        assert!(ring.nodes.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(
            ring.nodes
                .iter()
                .filter(|n| n.hash == fnv1a_utf16("worker-3:149"))
                .map(|n| n.worker)
                .collect::<Vec<_>>(),
            vec![3]
        );
    }

    #[test]
    fn ring_lookup_is_first_node_at_or_after_hash_with_wrap() {
        let ring = HashRing::new(3).expect("ring");
        let last = ring.nodes[ring.nodes.len() - 1];
        let first = ring.nodes[0];
        assert_eq!(ring.start(last.hash), ring.nodes.len() - 1);
        assert_eq!(ring.start(first.hash), 0);
        assert_eq!(ring.start(last.hash.wrapping_add(1)), 0);
        assert_eq!(ring.start(u32::MAX), 0);
        assert_eq!(ring.start(first.hash.saturating_add(1)), 1);
    }

    #[test]
    fn walk_visits_each_worker_once_owner_first() {
        let ring = HashRing::new(8).expect("ring");
        for user in ["user-a", "x", "", "😀"] {
            let order: Vec<usize> = ring.walk(user).collect();
            assert_eq!(order.len(), 8);
            assert_eq!(order[0], ring.lookup(user));
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..8).collect::<Vec<_>>());
        }
    }

    #[test]
    fn invalid_construction_is_an_error() {
        assert!(matches!(
            HashRing::new(0),
            Err(RouterError::InvalidWorkerCount(0))
        ));
        assert!(matches!(
            StickyRouter::in_memory(MAX_WORKERS + 1, 1.0),
            Err(RouterError::InvalidWorkerCount(_))
        ));
        for f in [0.5, 0.999, -1.0, f64::NAN, f64::INFINITY, 1e7] {
            assert!(
                matches!(
                    StickyRouter::in_memory(3, f),
                    Err(RouterError::InvalidBalanceFactor(_))
                ),
                "{f}"
            );
        }
        for f in [0.0, -0.0, 1.0, 1.25, 2.0] {
            assert!(StickyRouter::in_memory(3, f).is_ok(), "{f}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(StickyRouter::open(dir.path(), 3, 0.5).is_err());
        assert!(
            !table_path(dir.path()).exists(),
            "no file for bad arguments"
        );
    }

    #[test]
    fn load_bound_is_exact() {
        // 1.1 × 10 / 1 = 11 exactly (float arithmetic gives 11.000000000000002 → 12).
        let f = parse_balance_factor(1.1).expect("f").expect("on");
        assert_eq!(load_bound(f, 9, 1), 11);
        let f = parse_balance_factor(1.0).expect("f").expect("on");
        assert_eq!(load_bound(f, 0, 3), 1);
        assert_eq!(load_bound(f, 2, 3), 1);
        assert_eq!(load_bound(f, 3, 3), 2);
        let f = parse_balance_factor(1.25).expect("f").expect("on");
        assert_eq!(load_bound(f, 9_999, 8), 1563);
        assert_eq!(parse_balance_factor(0.0).expect("off"), None);
    }

    #[test]
    fn bounded_load_order_example() {
        let r = StickyRouter::in_memory(3, 1.0).expect("router");
        assert_eq!(r.route("user-a").expect("a"), 1);
        assert_eq!(r.route("user-b").expect("b"), 2);
        assert_eq!(r.route("user-c").expect("c"), 0);
        assert_eq!(r.counts(), vec![1, 1, 1]);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn unbounded_router_is_the_pure_ring() {
        let r = StickyRouter::in_memory(3, 0.0).expect("router");
        for (user, worker) in [
            ("user-a", 1),
            ("user-b", 2),
            ("user-c", 1),
            ("user-1", 0),
            ("user-2", 1),
        ] {
            assert_eq!(r.route(user).expect("route"), worker, "{user}");
        }
        assert_eq!(r.counts(), vec![1, 3, 1]);
    }

    #[test]
    fn empty_user_is_refused() {
        let r = StickyRouter::in_memory(3, 1.0).expect("router");
        assert!(matches!(r.route(""), Err(RouterError::EmptyUser)));
        assert!(r.is_empty());
        assert_eq!(r.lookup(""), None);
    }

    #[test]
    fn one_user_per_slot_fills_every_slot_once_then_refuses() {
        let r = StickyRouter::in_memory(4, 1.0)
            .expect("router")
            .one_user_per_slot();
        let mut slots: Vec<usize> = (0..4)
            .map(|i| r.route(&format!("user-{i}")).unwrap())
            .collect();
        slots.sort();
        assert_eq!(slots, vec![0, 1, 2, 3], "each user has a slot of its own");
        assert!(matches!(r.route("user-4"), Err(RouterError::SlotsTaken(4))));
        // A known user keeps its slot.
        assert_eq!(r.route("user-2").unwrap(), r.lookup("user-2").unwrap());
    }

    /// A table written without cells (several users per slot), loaded with one user per
    /// slot: each slot keeps the user whose current line comes first, the others are dropped;
    /// a dropped user takes a slot without a user, or is refused.
    #[test]
    fn one_user_per_slot_keeps_one_user_of_a_shared_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            table_path(dir.path()),
            "{\"user\":\"late\",\"worker\":1}\n\
             {\"user\":\"a\",\"worker\":0}\n\
             {\"user\":\"b\",\"worker\":0}\n\
             {\"user\":\"c\",\"worker\":1}\n\
             {\"user\":\"late\",\"worker\":0}\n\
             {\"user\":\"d\",\"worker\":1}\n",
        )
        .expect("write");
        let lines = read_lines(dir.path()).len();
        for _ in 0..2 {
            let r = StickyRouter::open(dir.path(), 3, 1.0)
                .expect("open")
                .one_user_per_slot();
            // `late` moved to slot 0 after `a` came: `a` keeps slot 0, `c` slot 1.
            assert_eq!(r.lookup("a"), Some(0));
            assert_eq!(r.lookup("c"), Some(1));
            for dropped in ["b", "late", "d"] {
                assert_eq!(r.lookup(dropped), None, "{dropped}");
            }
            assert_eq!(r.counts(), vec![1, 1, 0]);
            assert_eq!(r.len(), 2);
            assert_eq!(r.route("a").expect("a"), 0);
            assert_eq!(r.route("c").expect("c"), 1);
        }
        let r = StickyRouter::open(dir.path(), 3, 1.0)
            .expect("open")
            .one_user_per_slot();
        // The first dropped user to come back takes the free slot; the next is refused.
        assert_eq!(r.route("b").expect("b"), 2);
        assert!(matches!(r.route("d"), Err(RouterError::SlotsTaken(3))));
        assert!(matches!(r.route("late"), Err(RouterError::SlotsTaken(3))));
        assert_eq!(r.counts(), vec![1, 1, 1]);
        assert_eq!(read_lines(dir.path()).len(), lines + 1, "only b's new slot");
        drop(r);
        let r = StickyRouter::open(dir.path(), 3, 1.0)
            .expect("reopen")
            .one_user_per_slot();
        assert_eq!(
            (r.lookup("a"), r.lookup("c"), r.lookup("b"), r.lookup("d")),
            (Some(0), Some(1), Some(2), None)
        );
        // Without cells, the table is loaded as it stands.
        drop(r);
        let r = StickyRouter::open(dir.path(), 3, 1.0).expect("reopen without cells");
        assert_eq!(r.lookup("d"), Some(1));
        assert_eq!(r.counts(), vec![2, 2, 1]);
    }

    /// Four users on four cells, restarted with two: the users of the slots that are gone are
    /// not put on the slots that have a user; back at four, each finds its slot again.
    #[test]
    fn one_user_per_slot_does_not_share_a_slot_with_a_stale_user() {
        let dir = tempfile::tempdir().expect("tempdir");
        let users = ["user-0", "user-1", "user-2", "user-3"];
        let before: Vec<usize> = {
            let r = StickyRouter::open(dir.path(), 4, 1.0)
                .expect("open")
                .one_user_per_slot();
            users.iter().map(|u| r.route(u).expect("route")).collect()
        };
        let r = StickyRouter::open(dir.path(), 2, 1.0)
            .expect("fewer workers")
            .one_user_per_slot();
        assert_eq!(r.counts(), vec![1, 1]);
        for (u, &slot) in users.iter().zip(&before) {
            if slot < 2 {
                assert_eq!(r.route(u).expect("kept"), slot, "{u}");
            } else {
                assert_eq!(r.lookup(u), None, "{u}");
                assert!(
                    matches!(r.route(u), Err(RouterError::SlotsTaken(2))),
                    "{u} must not share a slot"
                );
            }
        }
        assert_eq!(r.counts(), vec![1, 1]);
        assert_eq!(r.len(), 2);
        drop(r);
        let r = StickyRouter::open(dir.path(), 4, 1.0)
            .expect("back to four")
            .one_user_per_slot();
        for (u, &slot) in users.iter().zip(&before) {
            assert_eq!(r.lookup(u), Some(slot), "{u}");
        }

        // A stale user is placed only on a slot without a user.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            table_path(dir.path()),
            "{\"user\":\"x\",\"worker\":3}\n{\"user\":\"y\",\"worker\":0}\n\
             {\"user\":\"z\",\"worker\":2}\n",
        )
        .expect("write");
        let r = StickyRouter::open(dir.path(), 2, 1.0)
            .expect("open")
            .one_user_per_slot();
        assert_eq!(r.route("x").expect("x"), 1);
        assert!(matches!(r.route("z"), Err(RouterError::SlotsTaken(2))));
        assert_eq!(r.counts(), vec![1, 1]);
    }

    #[test]
    fn a_full_table_refuses_new_users_and_keeps_serving_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        let r = StickyRouter::open(dir.path(), 3, 1.0)
            .unwrap()
            .with_max_users(2);
        let a = r.route("a").unwrap();
        let b = r.route("b").unwrap();
        assert!(matches!(r.route("c"), Err(RouterError::Full(2))));
        assert_eq!(r.lookup("c"), None);
        assert_eq!(r.len(), 2);
        assert_eq!((r.route("a").unwrap(), r.route("b").unwrap()), (a, b));
        drop(r);
        // Reopened with a lower limit: the users it holds stay, new ones are refused.
        let r = StickyRouter::open(dir.path(), 3, 1.0)
            .unwrap()
            .with_max_users(1);
        assert_eq!(r.route("b").unwrap(), b);
        assert!(matches!(r.route("d"), Err(RouterError::Full(1))));
        assert_eq!(
            read_lines(dir.path()).len(),
            2,
            "nothing was written for c or d"
        );
    }

    #[test]
    fn lookup_and_peek_do_not_assign() {
        let r = StickyRouter::in_memory(3, 1.0).expect("router");
        assert_eq!(r.lookup("user-a"), None);
        assert_eq!(r.peek("user-a"), 1);
        assert_eq!(r.peek("user-b"), 2);
        assert!(r.is_empty());
        assert_eq!(r.route("user-a").expect("a"), 1);
        // Now worker-1 (user-c's ring owner) is full: peek reflects the current counts.
        assert_eq!(r.ring().lookup("user-c"), 1);
        assert_eq!(r.peek("user-c"), 2);
        assert_eq!(r.lookup("user-a"), Some(1));
        assert_eq!(r.peek("user-a"), 1);
        assert_eq!(r.len(), 1);
        assert_eq!(r.workers(), 3);
    }

    #[test]
    fn persistence_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let users: Vec<String> = (0..50).map(|i| format!("user-{i}")).collect();
        let first: Vec<usize> = {
            let r = StickyRouter::open(dir.path(), 4, 1.0).expect("open");
            users.iter().map(|u| r.route(u).expect("route")).collect()
        };
        // Every assignment is on disk before `route` returned: one line per user.
        assert_eq!(read_lines(dir.path()).len(), 50);
        let r = StickyRouter::open(dir.path(), 4, 1.0).expect("reopen");
        assert_eq!(r.len(), 50);
        let mut counts = vec![0; 4];
        for (u, &w) in users.iter().zip(&first) {
            assert_eq!(r.lookup(u), Some(w));
            assert_eq!(r.route(u).expect("route"), w);
            counts[w] += 1;
        }
        assert_eq!(r.counts(), counts);
        // Routing known users appends nothing.
        assert_eq!(read_lines(dir.path()).len(), 50);
    }

    #[test]
    fn file_format_is_one_json_object_per_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = StickyRouter::open(dir.path(), 3, 1.0).expect("open");
        r.route("user-a").expect("a");
        r.route("we\"ird\nid").expect("weird");
        let text = std::fs::read_to_string(table_path(dir.path())).expect("read");
        assert_eq!(
            text,
            "{\"user\":\"user-a\",\"worker\":1}\n{\"user\":\"we\\\"ird\\nid\",\"worker\":"
                .to_owned()
                + &r.lookup("we\"ird\nid").expect("assigned").to_string()
                + "}\n"
        );
        drop(r);
        let r = StickyRouter::open(dir.path(), 3, 1.0).expect("reopen");
        assert_eq!(r.lookup("user-a"), Some(1));
        assert!(r.lookup("we\"ird\nid").is_some());
    }

    #[test]
    fn torn_last_line_is_dropped_and_later_appends_parse() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let r = StickyRouter::open(dir.path(), 3, 1.0).expect("open");
            r.route("user-a").expect("a");
            r.route("user-b").expect("b");
        }
        let path = table_path(dir.path());
        let good_len = std::fs::metadata(&path).expect("meta").len();
        {
            let mut f = OpenOptions::new().append(true).open(&path).expect("append");
            f.write_all(b"{\"user\":\"user-c\",\"wor").expect("torn");
        }
        {
            let r = StickyRouter::open(dir.path(), 3, 1.0).expect("reopen torn");
            assert_eq!(r.len(), 2);
            assert_eq!(std::fs::metadata(&path).expect("meta").len(), good_len);
            assert_eq!(r.lookup("user-c"), None);
            assert_eq!(r.route("user-c").expect("c"), 0);
            assert_eq!(
                r.route("user-d").expect("d"),
                r.lookup("user-d").expect("d")
            );
        }
        let lines = read_lines(dir.path());
        assert_eq!(lines.len(), 4);
        for line in &lines {
            serde_json::from_str::<serde_json::Value>(line).expect("every line parses");
        }
        let r = StickyRouter::open(dir.path(), 3, 1.0).expect("reopen again");
        assert_eq!(r.len(), 4);
        assert_eq!(r.lookup("user-a"), Some(1));
        assert_eq!(r.lookup("user-b"), Some(2));
        assert_eq!(r.lookup("user-c"), Some(0));
    }

    #[test]
    fn garbage_tail_and_middle_lines_are_tolerated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = table_path(dir.path());
        std::fs::write(
            &path,
            b"{\"user\":\"u1\",\"worker\":0}\n\
              not json\n\
              \n\
              {\"user\":\"\",\"worker\":1}\n\
              {\"user\":\"u2\",\"worker\":-1}\n\
              {\"user\":\"u3\",\"worker\":2,\"extra\":true}\n\
              \xff\xfe garbage\n\
              {\"user\":\"u4\"",
        )
        .expect("write");
        let r = StickyRouter::open(dir.path(), 3, 1.0).expect("open");
        assert_eq!(r.len(), 2);
        assert_eq!(r.lookup("u1"), Some(0));
        assert_eq!(r.lookup("u2"), None);
        assert_eq!(r.lookup("u3"), Some(2));
        assert_eq!(r.counts(), vec![1, 0, 1]);
        // The tail after the last valid line is cut; the middle is left alone.
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.ends_with("\"extra\":true}\n"), "{text:?}");
        assert!(text.contains("not json"));
        r.route("u5").expect("u5");
        drop(r);
        let r = StickyRouter::open(dir.path(), 3, 1.0).expect("reopen");
        assert_eq!(r.len(), 3);
        assert!(r.lookup("u5").is_some());
    }

    #[test]
    fn duplicate_lines_latest_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            table_path(dir.path()),
            "{\"user\":\"u\",\"worker\":0}\n{\"user\":\"u\",\"worker\":2}\n\
             {\"user\":\"v\",\"worker\":1}\n{\"user\":\"v\",\"worker\":1}\n",
        )
        .expect("write");
        let r = StickyRouter::open(dir.path(), 3, 1.0).expect("open");
        assert_eq!(r.lookup("u"), Some(2));
        assert_eq!(r.lookup("v"), Some(1));
        assert_eq!(r.len(), 2);
        assert_eq!(r.counts(), vec![0, 1, 1]);
    }

    #[test]
    fn fewer_workers_reassigns_and_growing_back_keeps_the_new_slot() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            table_path(dir.path()),
            "{\"user\":\"gone\",\"worker\":5}\n{\"user\":\"kept\",\"worker\":1}\n",
        )
        .expect("write");
        let slot = {
            let r = StickyRouter::open(dir.path(), 3, 1.0).expect("open");
            assert_eq!(r.len(), 1);
            assert_eq!(r.lookup("gone"), None);
            assert_eq!(r.counts(), vec![0, 1, 0]);
            let slot = r.route("gone").expect("reassign");
            assert!(slot < 3);
            assert_eq!(r.len(), 2);
            slot
        };
        // Back to 6 workers: the latest assignment holds, not the old slot 5.
        let r = StickyRouter::open(dir.path(), 6, 1.0).expect("reopen");
        assert_eq!(r.lookup("gone"), Some(slot));
        assert_eq!(r.lookup("kept"), Some(1));
    }

    #[test]
    fn failed_append_assigns_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = table_path(dir.path());
        std::fs::write(&path, "").expect("create");
        // A read-only handle: every write (and the cut-back) fails.
        let file = File::open(&path).expect("open ro");
        let journal = Journal {
            file,
            path: path.clone(),
            len: 0,
            dirty: false,
            syncs: 0,
        };
        let r = StickyRouter::build(3, 1.0, Vec::new(), Some(journal)).expect("build");
        assert!(matches!(r.route("user-a"), Err(RouterError::Io { .. })));
        // A batch fails whole: none of its users is assigned.
        let batch = r.route_many(&["x", "y", "x"]);
        assert!(
            batch
                .iter()
                .all(|b| matches!(b, Err(RouterError::Io { .. }))),
            "{batch:?}"
        );
        assert_eq!(r.lookup("x"), None);
        assert_eq!(r.syncs(), 0);
        assert_eq!(r.lookup("user-a"), None);
        assert_eq!(r.len(), 0);
        assert_eq!(r.counts(), vec![0, 0, 0]);
        // The cut-back failed too, so the next append retries it first and fails again.
        assert!(matches!(r.route("user-a"), Err(RouterError::Io { .. })));
        assert!(r.is_empty());
    }

    #[test]
    fn a_full_disk_refuses_new_users_until_space_is_freed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = StickyRouter::open(dir.path(), 3, 1.0).expect("open");
        let known = r.route("known").expect("route");
        // The disk fills up: every write of the table now fails with ENOSPC (as on /dev/full).
        let full = OpenOptions::new()
            .append(true)
            .open("/dev/full")
            .expect("/dev/full");
        let table = {
            let mut state = r.lock();
            let journal = state.journal.as_mut().expect("journal");
            std::mem::replace(&mut journal.file, full)
        };
        let e = r.route("new").expect_err("a full disk");
        assert!(
            matches!(&e, RouterError::Io { source, .. } if source.raw_os_error() == Some(28)),
            "{e:?}"
        );
        let refused = crate::error::RouteError::from(e);
        assert_eq!(
            (refused.status(), refused.code()),
            (503, "ROUTING_TABLE_UNAVAILABLE")
        );
        let message = refused.to_string();
        assert!(message.contains("No space left on device"), "{message}");
        assert!(
            !message.contains(&*dir.path().to_string_lossy()),
            "{message}"
        );
        // Known users keep working; the new one was not assigned.
        assert_eq!(r.route("known").expect("known"), known);
        assert_eq!(r.lookup("new"), None);
        // Space is freed: the new user is assigned, and the table on disk is whole.
        r.lock().journal.as_mut().expect("journal").file = table;
        let new = r.route("new").expect("after freeing space");
        drop(r);
        let reopened = StickyRouter::open(dir.path(), 3, 1.0).expect("reopen");
        assert_eq!(reopened.lookup("known"), Some(known));
        assert_eq!(reopened.lookup("new"), Some(new));
        assert_eq!(read_lines(dir.path()).len(), 2);
    }

    #[test]
    fn dirty_journal_is_cut_back_before_the_next_append() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = table_path(dir.path());
        let good = "{\"user\":\"u\",\"worker\":0}\n";
        std::fs::write(&path, format!("{good}{{\"user\":\"par")).expect("write");
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .expect("open");
        let mut journal = Journal {
            file,
            path: path.clone(),
            len: good.len() as u64,
            dirty: true,
            syncs: 0,
        };
        journal.append(&[("w", 1)]).expect("append");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "{\"user\":\"u\",\"worker\":0}\n{\"user\":\"w\",\"worker\":1}\n"
        );
    }

    #[test]
    fn a_batch_is_assigned_in_order_with_one_fsync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = StickyRouter::open(dir.path(), 3, 1.0).expect("open");
        assert_eq!(r.route("known").expect("route"), r.peek("known"));
        assert_eq!(r.syncs(), 1);
        // The same users one by one, in the same order, in a router of their own.
        let one_by_one = StickyRouter::in_memory(3, 1.0).expect("router");
        let users = [
            "known", "user-a", "", "user-b", "user-a", "user-c", "user-d",
        ];
        let expected: Vec<Option<usize>> = users.iter().map(|u| one_by_one.route(u).ok()).collect();
        let got: Vec<Option<usize>> = r.route_many(&users).into_iter().map(Result::ok).collect();
        assert_eq!(got, expected);
        assert!(matches!(
            r.route_many(&[""]).as_slice(),
            [Err(RouterError::EmptyUser)]
        ));
        assert_eq!(r.syncs(), 2, "one fsync for the whole batch");
        assert_eq!(r.len(), 5);
        // One line per new user (the duplicate and the known one add none).
        assert_eq!(read_lines(dir.path()).len(), 5);
        drop(r);
        let r = StickyRouter::open(dir.path(), 3, 1.0).expect("reopen");
        for (u, want) in users.iter().zip(&expected) {
            if !u.is_empty() {
                assert_eq!(r.lookup(u), *want, "{u}");
            }
        }
        // Known users only: nothing to persist.
        let before = r.syncs();
        assert!(
            r.route_many(&["user-a", "user-b"])
                .iter()
                .all(Result::is_ok)
        );
        assert_eq!(r.syncs(), before);
    }

    #[test]
    fn a_batch_stops_at_the_user_limit() {
        let r = StickyRouter::in_memory(3, 1.0)
            .expect("router")
            .with_max_users(2);
        let got = r.route_many(&["a", "b", "a", "c", "b"]);
        assert!(got[0].is_ok() && got[1].is_ok() && got[2].is_ok() && got[4].is_ok());
        assert!(matches!(got[3], Err(RouterError::Full(2))), "{got:?}");
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn concurrent_routing_agrees() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Arc::new(StickyRouter::open(dir.path(), 8, 1.0).expect("open"));
        let users: Arc<Vec<String>> = Arc::new((0..1000).map(|i| format!("u{i}")).collect());
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let r = Arc::clone(&r);
                let users = Arc::clone(&users);
                std::thread::spawn(move || {
                    // Each thread walks the users from a different start.
                    (0..users.len())
                        .map(|i| {
                            let j = (i + t * 125) % users.len();
                            (j, r.route(&users[j]).expect("route"))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<Vec<(usize, usize)>> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        assert_eq!(r.len(), 1000);
        assert_eq!(r.counts().iter().sum::<usize>(), 1000);
        for res in &results {
            for &(j, w) in res {
                assert_eq!(r.lookup(&users[j]), Some(w));
            }
        }
        // Each user was written exactly once.
        assert_eq!(read_lines(dir.path()).len(), 1000);
        drop(r);
        let r = StickyRouter::open(dir.path(), 8, 1.0).expect("reopen");
        assert_eq!(r.len(), 1000);
        for &(j, w) in &results[0] {
            assert_eq!(r.lookup(&users[j]), Some(w));
        }
    }

    #[test]
    fn router_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<StickyRouter>();
        check::<HashRing>();
    }

    #[test]
    fn bounded_load_holds_at_scale() {
        let r = StickyRouter::in_memory(8, 1.25).expect("router");
        for i in 0..10_000 {
            r.route(&format!("user-{i}")).expect("route");
        }
        let bound = 1563; // ceil(1.25 × 10,000 / 8)
        let counts = r.counts();
        assert_eq!(counts.iter().sum::<usize>(), 10_000);
        assert!(counts.iter().all(|&c| c <= bound), "{counts:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn assignment_is_sticky_across_lookups_and_reload(
            users in proptest::collection::vec("\\PC{1,20}", 1..60),
            workers in 1usize..10,
            f in prop_oneof![Just(0.0), Just(1.0), 1.0f64..3.0],
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let r = StickyRouter::open(dir.path(), workers, f).expect("open");
            let first: Vec<usize> = users.iter().map(|u| r.route(u).expect("route")).collect();
            for _ in 0..3 {
                for (u, &w) in users.iter().zip(&first) {
                    prop_assert_eq!(r.route(u).expect("route"), w);
                    prop_assert_eq!(r.lookup(u), Some(w));
                    prop_assert_eq!(r.peek(u), w);
                }
            }
            let len = r.len();
            drop(r);
            let r = StickyRouter::open(dir.path(), workers, f).expect("reopen");
            prop_assert_eq!(r.len(), len);
            for (u, &w) in users.iter().zip(&first) {
                prop_assert_eq!(r.route(u).expect("route"), w);
            }
        }

        #[test]
        fn adding_a_worker_never_moves_a_user(
            n in 1usize..300,
            workers in 1usize..9,
            f in prop_oneof![Just(0.0), Just(1.0), 1.0f64..2.0],
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let users: Vec<String> = (0..n).map(|i| format!("user-{i}")).collect();
            let before: Vec<usize> = {
                let r = StickyRouter::open(dir.path(), workers, f).expect("open");
                users.iter().map(|u| r.route(u).expect("route")).collect()
            };
            let r = StickyRouter::open(dir.path(), workers + 1, f).expect("grow");
            for (u, &w) in users.iter().zip(&before) {
                prop_assert_eq!(r.route(u).expect("route"), w);
            }
            prop_assert_eq!(r.len(), n);
        }

        #[test]
        fn unbounded_equals_pure_ring(
            users in proptest::collection::vec(any::<String>(), 1..100),
            workers in 1usize..12,
        ) {
            let r = StickyRouter::in_memory(workers, 0.0).expect("router");
            let ring = HashRing::new(workers).expect("ring");
            for u in users.iter().filter(|u| !u.is_empty()) {
                prop_assert_eq!(r.route(u).expect("route"), ring.lookup(u));
            }
        }

        #[test]
        fn bounded_load_never_exceeds_the_bound(
            n in 1usize..500,
            workers in 1usize..9,
            f in 1.0f64..2.0,
        ) {
            let r = StickyRouter::in_memory(workers, f).expect("router");
            for i in 0..n {
                r.route(&format!("u-{i}")).expect("route");
            }
            let micros = parse_balance_factor(f).expect("f").expect("on");
            let bound = load_bound(micros, n - 1, workers);
            prop_assert!(r.counts().iter().all(|&c| (c as u128) <= bound));
            prop_assert_eq!(r.counts().iter().sum::<usize>(), n);
        }
    }
}
