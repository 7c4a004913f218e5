//! What each load thread counts, and the merge of all threads at the end of a run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::report::{ErrorCounts, StickyExample};

/// Most problem descriptions kept (per thread and merged).
pub const MAX_PROBLEMS: usize = 20;
/// Most sticky-violation examples kept.
pub const MAX_STICKY_EXAMPLES: usize = 10;
/// Above this many users the user → worker map is a hash map instead of a dense vector.
const DENSE_USERS: u32 = 1 << 20;
/// Latencies are recorded in nanoseconds up to 100 s (longer ones saturate).
const HIGHEST_NS: u64 = 100_000_000_000;

/// A latency histogram in nanoseconds, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts: this cannot fail at run time.
    Histogram::new_with_bounds(1, HIGHEST_NS, 3).expect("valid constant histogram bounds")
}

/// Error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Connecting failed or timed out.
    Connect,
    /// Reading failed or the connection ended mid-response.
    Read,
    /// Writing the request failed.
    Write,
    /// No answer within the timeout.
    Timeout,
    /// The answer is not valid HTTP/1.1.
    Parse,
    /// The status is not 200.
    Status,
    /// A 200 answer whose body is not what was sent (WebSocket: an `ok` answer whose payload
    /// is not the one the method promises).
    Body,
    /// WebSocket: the upgrade or the `connect` handshake failed.
    Handshake,
    /// WebSocket: a frame that breaks the protocol (not JSON, an answer to no request, an
    /// event `seq` out of order, a binary frame, an unexpected close).
    Protocol,
}

impl ErrorCounts {
    /// Adds one error of `kind`.
    pub fn add(&mut self, kind: ErrorKind) {
        let c = match kind {
            ErrorKind::Connect => &mut self.connect,
            ErrorKind::Read => &mut self.read,
            ErrorKind::Write => &mut self.write,
            ErrorKind::Timeout => &mut self.timeout,
            ErrorKind::Parse => &mut self.parse,
            ErrorKind::Status => &mut self.status,
            ErrorKind::Body => &mut self.body,
            ErrorKind::Handshake => &mut self.handshake,
            ErrorKind::Protocol => &mut self.protocol,
        };
        *c += 1;
    }

    /// Adds another set of counts.
    pub fn merge(&mut self, o: &ErrorCounts) {
        self.connect += o.connect;
        self.read += o.read;
        self.write += o.write;
        self.timeout += o.timeout;
        self.parse += o.parse;
        self.status += o.status;
        self.body += o.body;
        self.handshake += o.handshake;
        self.protocol += o.protocol;
    }
}

/// The first worker each user was seen on.
#[derive(Debug)]
enum Seen {
    /// Indexed by user: 0 = not seen, else the local worker index + 1.
    Dense(Vec<u16>),
    Sparse(HashMap<u32, u16>),
}

/// Per thread: answers per worker and which worker each user was answered by.
#[derive(Debug)]
pub struct WorkerTally {
    /// Worker names (`x-moltbot-worker` values) in order of first sight.
    names: Vec<Vec<u8>>,
    /// Measured answers per worker (same index as `names`).
    counts: Vec<u64>,
    seen: Seen,
    /// Users answered by more than one worker: every worker index seen.
    conflicts: HashMap<u32, BTreeSet<u16>>,
}

impl WorkerTally {
    /// A tally for users `0..users`.
    pub fn new(users: u32) -> WorkerTally {
        WorkerTally {
            names: Vec::new(),
            counts: Vec::new(),
            seen: if users <= DENSE_USERS {
                Seen::Dense(vec![0; users as usize])
            } else {
                Seen::Sparse(HashMap::new())
            },
            conflicts: HashMap::new(),
        }
    }

    fn intern(&mut self, worker: &[u8]) -> u16 {
        if let Some(i) = self.names.iter().position(|n| n == worker) {
            return i as u16;
        }
        // A server inventing tens of thousands of worker names is misbehaving already: fold
        // the excess into the last name rather than growing without bound.
        if self.names.len() >= usize::from(u16::MAX - 1) {
            return (self.names.len() - 1) as u16;
        }
        self.names.push(worker.to_vec());
        self.counts.push(0);
        (self.names.len() - 1) as u16
    }

    /// Notes that `user` was answered by `worker`; `measured` answers count per worker.
    /// Returns the worker the user had before if it is a different one (a violation).
    pub fn observe(&mut self, user: u32, worker: &[u8], measured: bool) -> Option<&[u8]> {
        let w = self.intern(worker);
        if measured {
            self.counts[usize::from(w)] += 1;
        }
        let slot = match &mut self.seen {
            Seen::Dense(v) => v.get_mut(user as usize)?,
            Seen::Sparse(m) => m.entry(user).or_insert(0),
        };
        if *slot == 0 {
            *slot = w + 1;
            return None;
        }
        let first = *slot - 1;
        if first == w {
            return None;
        }
        let set = self.conflicts.entry(user).or_default();
        set.insert(first);
        let new = set.insert(w);
        if new {
            self.names.get(usize::from(first)).map(|n| &n[..])
        } else {
            None
        }
    }

    /// Every (user, worker name) pair seen.
    fn pairs(&self) -> Vec<(u32, &[u8])> {
        let mut out = Vec::new();
        let name = |w: u16| self.names.get(usize::from(w)).map(|n| &n[..]);
        match &self.seen {
            Seen::Dense(v) => {
                for (u, &s) in v.iter().enumerate() {
                    if let Some(n) = s.checked_sub(1).and_then(name) {
                        out.push((u as u32, n));
                    }
                }
            }
            Seen::Sparse(m) => {
                for (&u, &s) in m {
                    if let Some(n) = s.checked_sub(1).and_then(name) {
                        out.push((u, n));
                    }
                }
            }
        }
        for (&u, set) in &self.conflicts {
            for &w in set {
                if let Some(n) = name(w) {
                    out.push((u, n));
                }
            }
        }
        out
    }
}

/// What only a WebSocket run counts.
#[derive(Debug)]
pub struct WsStats {
    /// Handshakes completed (`hello-ok` received), warm-up included.
    pub handshakes: u64,
    /// Measured final answers by outcome: `ok`, or the error's `code`.
    pub outcomes: BTreeMap<String, u64>,
    /// Measured `agent`: from sending the request to its `accepted` answer (ns).
    pub accepted: Histogram<u64>,
    /// Measured `agent`: from sending the request to the first `agent` or `chat` event of
    /// its run (ns).
    pub first_event: Histogram<u64>,
    /// Measured `agent` events stamped by the worker (`data.emittedUs`): from the worker
    /// emitting the event to this client reading it (ns), on the host's monotonic clock.
    pub event_delay: Histogram<u64>,
    /// Events of this connection's measured runs received before their final answer.
    pub run_events: u64,
    /// Measured runs answered finally with no event of theirs seen before.
    pub runs_without_event: u64,
}

impl WsStats {
    fn new() -> WsStats {
        WsStats {
            handshakes: 0,
            outcomes: BTreeMap::new(),
            accepted: new_histogram(),
            first_event: new_histogram(),
            event_delay: new_histogram(),
            run_events: 0,
            runs_without_event: 0,
        }
    }

    fn merge(&mut self, o: &WsStats) {
        self.handshakes += o.handshakes;
        for (k, &n) in &o.outcomes {
            *self.outcomes.entry(k.clone()).or_insert(0) += n;
        }
        add_histogram(&mut self.accepted, &o.accepted);
        add_histogram(&mut self.first_event, &o.first_event);
        add_histogram(&mut self.event_delay, &o.event_delay);
        self.run_events += o.run_events;
        self.runs_without_event += o.runs_without_event;
    }
}

/// Records a duration in ns (at least 1, saturating at the histogram's top).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(ns);
}

/// Adds `from` into `into`; both share bounds, and an addition that does not fit saturates.
fn add_histogram(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    if into.add(from).is_err() {
        for v in from.iter_recorded() {
            into.saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
    }
}

/// One load thread's counts.
#[derive(Debug)]
pub struct ThreadStats {
    /// Latency of measured answers (ns).
    pub hist: Histogram<u64>,
    /// Measured answers (any status).
    pub requests: u64,
    /// Measured errors.
    pub errors: ErrorCounts,
    /// Measured answers by status code.
    pub status: BTreeMap<u16, u64>,
    /// Answers per worker and user stickiness (warm-up included).
    pub workers: WorkerTally,
    /// Measured answers without `x-moltbot-worker`.
    pub no_worker_header: u64,
    /// The first problems, described.
    pub problems: Vec<String>,
    /// When the last measured answer arrived.
    pub last_done: Option<Instant>,
    /// Open loop: measured requests due before the end but never sent (the connection was
    /// still waiting for earlier answers).
    pub unsent: u64,
    /// WebSocket runs only.
    pub ws: WsStats,
}

impl ThreadStats {
    /// Empty counts for users `0..users`.
    pub fn new(users: u32) -> ThreadStats {
        ThreadStats {
            hist: new_histogram(),
            requests: 0,
            errors: ErrorCounts::default(),
            status: BTreeMap::new(),
            workers: WorkerTally::new(users),
            no_worker_header: 0,
            problems: Vec::new(),
            last_done: None,
            unsent: 0,
            ws: WsStats::new(),
        }
    }

    /// Records one measured answer.
    pub fn answered(&mut self, status: u16, latency: Duration, at: Instant) {
        *self.status.entry(status).or_insert(0) += 1;
        self.done(latency, at);
    }

    /// Records one measured final WebSocket answer: `outcome` is `ok` or the error code.
    pub fn rpc_answered(&mut self, outcome: &str, latency: Duration, at: Instant) {
        match self.ws.outcomes.get_mut(outcome) {
            Some(n) => *n += 1,
            None => {
                self.ws.outcomes.insert(outcome.to_string(), 1);
            }
        }
        self.done(latency, at);
    }

    fn done(&mut self, latency: Duration, at: Instant) {
        self.requests += 1;
        record(&mut self.hist, latency);
        self.last_done = Some(self.last_done.map_or(at, |l| l.max(at)));
    }

    /// Keeps a problem description if fewer than [`MAX_PROBLEMS`] are kept.
    pub fn problem(&mut self, describe: impl FnOnce() -> String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(describe());
        }
    }
}

/// All threads' counts together.
#[derive(Debug)]
pub struct Merged {
    /// Latency of measured answers (ns).
    pub hist: Histogram<u64>,
    /// Measured answers.
    pub requests: u64,
    /// Measured errors.
    pub errors: ErrorCounts,
    /// Measured answers by status.
    pub status: BTreeMap<u16, u64>,
    /// Measured answers per worker name.
    pub per_worker: BTreeMap<String, u64>,
    /// Measured answers without a worker header.
    pub no_worker_header: u64,
    /// Users answered by more than one worker (across all threads).
    pub sticky_violations: u64,
    /// Some of them.
    pub sticky_examples: Vec<StickyExample>,
    /// Users answered with a worker header at least once.
    pub users_seen: u64,
    /// The first problems.
    pub problems: Vec<String>,
    /// When the last measured answer arrived.
    pub last_done: Option<Instant>,
    /// Open loop: requests due but never sent.
    pub unsent: u64,
    /// WebSocket runs only.
    pub ws: WsStats,
}

/// Merges the threads' counts; stickiness is checked across threads (a user answered by
/// worker-0 on one thread and worker-1 on another is a violation).
pub fn merge(threads: &[ThreadStats]) -> Merged {
    let mut hist = new_histogram();
    let mut m = Merged {
        hist: new_histogram(),
        requests: 0,
        errors: ErrorCounts::default(),
        status: BTreeMap::new(),
        per_worker: BTreeMap::new(),
        no_worker_header: 0,
        sticky_violations: 0,
        sticky_examples: Vec::new(),
        users_seen: 0,
        problems: Vec::new(),
        last_done: None,
        unsent: 0,
        ws: WsStats::new(),
    };
    for t in threads {
        add_histogram(&mut hist, &t.hist);
        m.ws.merge(&t.ws);
        m.requests += t.requests;
        m.errors.merge(&t.errors);
        for (&s, &n) in &t.status {
            *m.status.entry(s).or_insert(0) += n;
        }
        for (name, &n) in t.workers.names.iter().zip(&t.workers.counts) {
            if n > 0 {
                *m.per_worker
                    .entry(String::from_utf8_lossy(name).into_owned())
                    .or_insert(0) += n;
            }
        }
        m.no_worker_header += t.no_worker_header;
        m.unsent += t.unsent;
        for p in &t.problems {
            if m.problems.len() < MAX_PROBLEMS {
                m.problems.push(p.clone());
            }
        }
        m.last_done = match (m.last_done, t.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    m.hist = hist;

    // user → the set of worker names it was answered by, over all threads.
    let mut workers: HashMap<u32, BTreeSet<&[u8]>> = HashMap::new();
    for t in threads {
        for (u, name) in t.workers.pairs() {
            workers.entry(u).or_default().insert(name);
        }
    }
    m.users_seen = workers.len() as u64;
    let mut violators: Vec<(u32, &BTreeSet<&[u8]>)> = workers
        .iter()
        .filter(|(_, s)| s.len() > 1)
        .map(|(&u, s)| (u, s))
        .collect();
    violators.sort_by_key(|(u, _)| *u);
    m.sticky_violations = violators.len() as u64;
    m.sticky_examples = violators
        .iter()
        .take(MAX_STICKY_EXAMPLES)
        .map(|(u, s)| StickyExample {
            user: format!("user-{u}"),
            workers: s
                .iter()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect(),
        })
        .collect();
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_merge_and_give_percentiles() {
        let t0 = Instant::now();
        let mut a = ThreadStats::new(10);
        let mut b = ThreadStats::new(10);
        // 1..=1000 µs split over two threads: odd values on a, even on b.
        for us in 1..=1000u64 {
            let t = if us % 2 == 1 { &mut a } else { &mut b };
            t.answered(
                200,
                Duration::from_micros(us),
                t0 + Duration::from_micros(us),
            );
        }
        b.answered(503, Duration::from_millis(50), t0);
        let m = merge(&[a, b]);
        assert_eq!(m.requests, 1001);
        assert_eq!(m.hist.len(), 1001);
        let q = |p: f64| m.hist.value_at_quantile(p) as f64 / 1000.0;
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.002 + 1.0;
        assert!(close(q(0.5), 501.0), "p50 {}", q(0.5));
        assert!(close(q(0.9), 901.0), "p90 {}", q(0.9));
        assert!(close(q(0.99), 991.0), "p99 {}", q(0.99));
        assert!(close(m.hist.max() as f64 / 1000.0, 50_000.0));
        assert_eq!(m.status.get(&200), Some(&1000));
        assert_eq!(m.status.get(&503), Some(&1));
        assert_eq!(m.last_done, Some(t0 + Duration::from_micros(1000)));
    }

    #[test]
    fn errors_merge_by_kind() {
        let mut a = ThreadStats::new(1);
        let mut b = ThreadStats::new(1);
        a.errors.add(ErrorKind::Connect);
        a.errors.add(ErrorKind::Timeout);
        b.errors.add(ErrorKind::Timeout);
        b.errors.add(ErrorKind::Body);
        let m = merge(&[a, b]);
        assert_eq!(m.errors.connect, 1);
        assert_eq!(m.errors.timeout, 2);
        assert_eq!(m.errors.body, 1);
        assert_eq!(m.errors.total(), 4);
    }

    #[test]
    fn per_worker_counts_only_measured_answers() {
        let mut a = ThreadStats::new(100);
        assert_eq!(a.workers.observe(1, b"worker-0", false), None);
        assert_eq!(a.workers.observe(1, b"worker-0", true), None);
        assert_eq!(a.workers.observe(2, b"worker-1", true), None);
        let mut b = ThreadStats::new(100);
        b.workers.observe(3, b"worker-1", true);
        let m = merge(&[a, b]);
        let want: BTreeMap<String, u64> =
            [("worker-0".to_string(), 1), ("worker-1".to_string(), 2)].into();
        assert_eq!(m.per_worker, want);
        assert_eq!(m.users_seen, 3);
        assert_eq!(m.sticky_violations, 0);
    }

    #[test]
    fn a_user_on_two_workers_within_a_thread_is_a_violation() {
        for users in [10, DENSE_USERS + 1] {
            let mut a = ThreadStats::new(users);
            a.workers.observe(7, b"worker-0", true);
            assert_eq!(
                a.workers.observe(7, b"worker-1", true),
                Some(&b"worker-0"[..])
            );
            // Reported once per new worker, not per answer.
            assert_eq!(a.workers.observe(7, b"worker-1", true), None);
            assert_eq!(a.workers.observe(7, b"worker-0", true), None);
            let m = merge(&[a]);
            assert_eq!(m.sticky_violations, 1);
            assert_eq!(m.sticky_examples[0].user, "user-7");
            assert_eq!(m.sticky_examples[0].workers, vec!["worker-0", "worker-1"]);
        }
    }

    #[test]
    fn a_user_on_two_workers_across_threads_is_a_violation() {
        let mut a = ThreadStats::new(10);
        let mut b = ThreadStats::new(10);
        a.workers.observe(4, b"worker-0", true);
        a.workers.observe(5, b"worker-1", true);
        b.workers.observe(4, b"worker-1", true);
        b.workers.observe(5, b"worker-1", true);
        let m = merge(&[a, b]);
        assert_eq!(m.sticky_violations, 1);
        assert_eq!(m.sticky_examples[0].user, "user-4");
    }

    #[test]
    fn problems_are_bounded() {
        let mut a = ThreadStats::new(1);
        for i in 0..100 {
            a.problem(|| format!("p{i}"));
        }
        assert_eq!(a.problems.len(), MAX_PROBLEMS);
        let b = ThreadStats {
            problems: vec!["x".into(); MAX_PROBLEMS],
            ..ThreadStats::new(1)
        };
        assert_eq!(merge(&[a, b]).problems.len(), MAX_PROBLEMS);
    }
}
