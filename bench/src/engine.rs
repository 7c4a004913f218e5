//! The load engine: one OS thread per load thread, each driving its connections with
//! non-blocking sockets on an edge-triggered epoll set (plus a timerfd for the open-loop
//! schedule). HTTP: one request in flight per connection (here); WebSocket: see [`crate::ws`].

use std::cmp::Reverse;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::event::epoll;

use crate::BenchError;
use crate::client_cpu::ClientMeter;
use crate::config::{Config, Protocol, Stop};
use crate::floor::FloorShape;
use crate::report::{LatencySummary, Report};
use crate::response::{ParseError, ResponseReader};
use crate::schedule::{Schedule, latency};
use crate::server_cpu::{CpuMeter, StatusSource};
use crate::stats::{ErrorKind, ThreadStats, merge};
use crate::thread::{Connections, MAX_WAIT, ThreadCore, drive};
use crate::users::UserPicker;
use crate::workload::{RequestTemplate, verify};
use crate::ws::WsThread;

/// Wait before reconnecting after a failed connect.
pub(crate) const RECONNECT_DELAY: Duration = Duration::from_millis(50);
/// Events that mean bytes (or an end) can be read.
pub(crate) const READABLE: epoll::EventFlags = epoll::EventFlags::IN
    .union(epoll::EventFlags::RDHUP)
    .union(epoll::EventFlags::HUP)
    .union(epoll::EventFlags::ERR);

/// A live view of a run, given to the progress callback about once per second.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Since the run started (warm-up included).
    pub elapsed: Duration,
    /// Whether the warm-up is over.
    pub measuring: bool,
    /// Measured answers so far.
    pub requests: u64,
    /// Measured errors so far.
    pub errors: u64,
}

/// Runs `cfg` to completion.
pub fn run(cfg: &Config) -> Result<Report, BenchError> {
    run_with_progress(cfg, |_| {})
}

/// Runs `cfg` to completion, calling `on_progress` about once per second meanwhile.
pub fn run_with_progress(
    cfg: &Config,
    mut on_progress: impl FnMut(&Progress),
) -> Result<Report, BenchError> {
    cfg.validate()?;
    let picker = UserPicker::new(cfg.users, cfg.dist, cfg.zipf_s)?;
    // Before any load: a wrong pid or an unreachable /status stops the run here.
    let mut meter = if cfg.measures_server_cpu() {
        let status = cfg
            .server_status
            .iter()
            .map(|u| StatusSource::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        Some(CpuMeter::new(
            &cfg.server_pids,
            &status,
            cfg.token.as_deref(),
        )?)
    } else {
        None
    };
    let mut client = ClientMeter::default();
    let template = RequestTemplate::new(cfg);
    let threads = cfg.effective_threads();
    let t0 = Instant::now();
    let measure_start = t0 + cfg.warmup;
    let plan = Plan {
        t0,
        measure_start,
        stop_at: match cfg.stop {
            Stop::Duration(d) => Some(measure_start + d),
            Stop::Requests(_) => None,
        },
        limit: match cfg.stop {
            Stop::Requests(n) => Some(n),
            Stop::Duration(_) => None,
        },
    };
    let shared = Shared {
        claimed: AtomicU64::new(0),
        counters: (0..threads).map(|_| Counters::default()).collect(),
    };

    let results: Vec<Result<ThreadStats, BenchError>> = std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<()>();
        let mut handles = Vec::with_capacity(threads);
        let mut spawn_error = None;
        for t in 0..threads {
            let tx = tx.clone();
            let (plan, shared, picker, template) = (&plan, &shared, &picker, &template);
            let spawned = std::thread::Builder::new()
                .name(format!("moltbot-bench-{t}"))
                .spawn_scoped(s, move || {
                    // Tells the progress loop this thread ended, even by a panic.
                    let _done = DoneSignal(tx);
                    match cfg.protocol {
                        Protocol::Http => {
                            LoadThread::new(cfg, plan, shared, picker, template, t)?.run()
                        }
                        Protocol::Ws => WsThread::new(cfg, plan, shared, picker, t)?.run(),
                    }
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(source) => {
                    spawn_error = Some(BenchError::Os {
                        what: "cannot start a load thread",
                        source,
                    });
                    break;
                }
            }
        }
        drop(tx);
        let mut finished = 0;
        let mut next_tick = Instant::now() + Duration::from_secs(1);
        loop {
            let now = Instant::now();
            // The server's and the client's CPU are first read when measuring starts (this
            // loop wakes for it).
            if now >= measure_start {
                if let Some(m) = meter.as_mut()
                    && !m.is_started()
                {
                    m.start();
                }
                if !client.is_started() {
                    client.start();
                }
            }
            if finished >= handles.len() {
                break;
            }
            let mut wake = next_tick;
            if !client.is_started() {
                wake = wake.min(measure_start);
            }
            match rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(()) => finished += 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() < next_tick {
                        continue;
                    }
                    next_tick += Duration::from_secs(1);
                    // A reading a second keeps what a process that ends early had used.
                    if let Some(m) = meter.as_mut() {
                        m.sample();
                    }
                    on_progress(&Progress {
                        elapsed: t0.elapsed(),
                        measuring: Instant::now() >= measure_start,
                        requests: shared.requests(),
                        errors: shared.errors(),
                    });
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let mut results: Vec<Result<ThreadStats, BenchError>> = handles
            .into_iter()
            .enumerate()
            .map(|(t, h)| h.join().unwrap_or(Err(BenchError::ThreadPanicked(t))))
            .collect();
        if let Some(e) = spawn_error {
            results.push(Err(e));
        }
        results
    });
    let stats = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let merged = merge(&stats);
    let end = match (plan.stop_at, merged.last_done) {
        (Some(stop), Some(last)) => stop.max(last),
        (Some(stop), None) => stop,
        (None, Some(last)) => last,
        (None, None) => Instant::now(),
    };
    let measured = end.saturating_duration_since(measure_start);
    let mut report = Report::new(cfg, merged, measured);
    report.server_cpu = meter.map(|m| m.finish(report.requests));
    report.client_cpu = client.finish(report.requests);
    let runs = report.requests;
    if let Some(a) = report.ws.as_mut().and_then(|w| w.agent.as_mut())
        && a.event_delay > 0
    {
        let shape = FloorShape::of_run(a.event_delay, runs, cfg.connections, measured);
        let floor = crate::floor::measure(&shape)?;
        a.loopback_floor = floor.len();
        a.loopback_floor_us = LatencySummary::from_histogram(&floor);
        a.gateway_adds_us = a.event_delay_us.less(&a.loopback_floor_us);
    }
    Ok(report)
}

/// Sends on drop.
struct DoneSignal(mpsc::Sender<()>);

impl Drop for DoneSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// The timeline of a run, shared by all threads.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Start (warm-up begins; the open-loop schedule is anchored here).
    pub(crate) t0: Instant,
    /// Requests due from here on are measured.
    pub(crate) measure_start: Instant,
    /// No request due at or after this is sent (duration mode).
    pub(crate) stop_at: Option<Instant>,
    /// Measured requests to send in total (request-count mode).
    pub(crate) limit: Option<u64>,
}

impl Plan {
    /// Whether `t` is at or past the end of the measured time (duration mode).
    pub(crate) fn past_stop(&self, t: Instant) -> bool {
        self.stop_at.is_some_and(|s| t >= s)
    }
}

/// Per-thread progress counters, each on its own cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) errors: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Shared {
    /// Measured requests claimed so far (request-count mode).
    claimed: AtomicU64,
    pub(crate) counters: Vec<Counters>,
}

impl Shared {
    /// Whether every measured request of a request-count run has been claimed.
    pub(crate) fn claims_exhausted(&self, plan: &Plan) -> bool {
        plan.limit
            .is_some_and(|n| self.claimed.load(Ordering::Relaxed) >= n)
    }

    /// Claims one measured request (request-count mode); false when none is left.
    pub(crate) fn claim(&self, plan: &Plan) -> bool {
        match plan.limit {
            None => true,
            Some(n) => self.claimed.fetch_add(1, Ordering::Relaxed) < n,
        }
    }

    fn requests(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.requests.load(Ordering::Relaxed))
            .sum()
    }

    fn errors(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.errors.load(Ordering::Relaxed))
            .sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No socket; reconnect at `wake_at`.
    Down,
    /// Non-blocking connect in progress.
    Connecting,
    /// Connected, nothing in flight (open loop: waiting for `wake_at`).
    Idle,
    /// Request partly written.
    Writing,
    /// Request written, answer not complete.
    Reading,
    /// Finished for good.
    Done,
}

#[derive(Debug)]
struct Conn {
    stream: Option<TcpStream>,
    state: State,
    req: Vec<u8>,
    written: usize,
    expect: Vec<u8>,
    user: u32,
    reader: ResponseReader,
    /// Latency origin of the request in flight.
    intended: Instant,
    /// Timeout of the request (or connect) in flight.
    deadline: Instant,
    /// Whether the request in flight is measured.
    measured: bool,
    schedule: Option<Schedule>,
    /// Index of the next request in the schedule.
    k: u64,
    wake_at: Instant,
    /// An input edge arrived while the request was still being written (an early answer):
    /// read once the write completes, as no new edge will announce those bytes.
    readable_seen: bool,
}

/// What a completed read means for the connection.
enum Next {
    /// Keep the connection, send the next request.
    Continue,
    /// The server closes the connection: reconnect (not an error).
    Reconnect,
    /// An error of this kind; reconnect.
    Fail(ErrorKind, String),
}

struct LoadThread<'a> {
    core: ThreadCore<'a>,
    template: &'a RequestTemplate,
    conns: Vec<Conn>,
}

impl<'a> Connections<'a> for LoadThread<'a> {
    fn core(&mut self) -> &mut ThreadCore<'a> {
        &mut self.core
    }

    fn count(&self) -> usize {
        self.conns.len()
    }

    /// Starts connecting connection `i`.
    fn open(&mut self, i: usize, now: Instant) {
        if self.core.over(now) {
            self.finish(i);
            return;
        }
        match self.core.connect(i) {
            Ok((stream, connected)) => {
                let c = &mut self.conns[i];
                c.stream = Some(stream);
                c.reader.reset();
                if connected {
                    c.state = State::Idle;
                    self.next(i, now);
                } else {
                    c.state = State::Connecting;
                    c.deadline = now + self.core.cfg.timeout;
                    self.core.scan_at = self.core.scan_at.min(c.deadline);
                }
            }
            Err(e) => self.connect_failed(i, now, e),
        }
    }

    /// A heap entry is due.
    fn wake(&mut self, i: usize, now: Instant) {
        let c = &self.conns[i];
        if c.wake_at > now {
            return; // A stale entry: a later one exists.
        }
        match c.state {
            State::Down => self.open(i, now),
            State::Idle => self.next(i, now),
            _ => {}
        }
    }

    fn on_event(&mut self, i: usize, flags: epoll::EventFlags, now: Instant) {
        match self.conns[i].state {
            State::Connecting => {
                if flags.intersects(
                    epoll::EventFlags::OUT | epoll::EventFlags::ERR | epoll::EventFlags::HUP,
                ) {
                    self.connected(i, now);
                }
            }
            State::Writing => {
                if flags.intersects(READABLE) {
                    self.conns[i].readable_seen = true;
                }
                self.write(i, now);
                let c = &self.conns[i];
                if c.state == State::Reading && c.readable_seen {
                    self.read(i, now);
                }
            }
            State::Reading => self.read(i, now),
            State::Idle => {
                if flags.intersects(READABLE) {
                    self.idle_readable(i, now);
                }
            }
            State::Down | State::Done => {}
        }
    }

    /// Fails requests and connects past their deadline; sets the next scan time.
    fn scan_timeouts(&mut self, now: Instant) {
        // Requests started below (reconnects) lower it again through `next` and `open`.
        self.core.scan_at = now + MAX_WAIT;
        let timeout = self.core.cfg.timeout;
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            let in_flight = matches!(c.state, State::Writing | State::Reading | State::Connecting);
            if !in_flight {
                continue;
            }
            if now < c.deadline {
                self.core.scan_at = self.core.scan_at.min(c.deadline);
            } else if c.state == State::Connecting {
                let e = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {timeout:?}"),
                );
                self.connect_failed(i, now, e);
            } else {
                let why = format!("no answer within {timeout:?}");
                self.fail(i, now, ErrorKind::Timeout, why);
            }
        }
    }
}

impl<'a> LoadThread<'a> {
    fn new(
        cfg: &'a Config,
        plan: &'a Plan,
        shared: &'a Shared,
        picker: &'a UserPicker,
        template: &'a RequestTemplate,
        tid: usize,
    ) -> Result<LoadThread<'a>, BenchError> {
        let (count, first) = cfg.connections_of(tid);
        let conns = (0..count)
            .map(|i| Conn {
                stream: None,
                state: State::Down,
                req: Vec::with_capacity(cfg.body_size + 256),
                written: 0,
                expect: Vec::with_capacity(cfg.body_size + 16),
                user: 0,
                reader: ResponseReader::new(),
                intended: plan.t0,
                deadline: plan.t0,
                measured: false,
                schedule: cfg
                    .rate
                    .map(|r| Schedule::new(plan.t0, r, cfg.connections, first + i)),
                k: 0,
                wake_at: plan.t0,
                readable_seen: false,
            })
            .collect();
        Ok(LoadThread {
            core: ThreadCore::new(cfg, plan, shared, picker, tid, count)?,
            template,
            conns,
        })
    }

    fn run(mut self) -> Result<ThreadStats, BenchError> {
        drive(&mut self)?;
        Ok(self.core.stats)
    }

    fn past_stop(&self, t: Instant) -> bool {
        self.core.plan.past_stop(t)
    }

    /// Claims one measured request (request-count mode); false when none is left.
    fn claim(&self) -> bool {
        self.core.shared.claim(self.core.plan)
    }

    fn error(&mut self, kind: ErrorKind, describe: impl FnOnce() -> String) {
        self.core.stats.errors.add(kind);
        self.core.stats.problem(describe);
        self.core.counters.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn connect_failed(&mut self, i: usize, now: Instant, e: io::Error) {
        self.close(i);
        if self.core.measuring(now) {
            // In request-count mode a failed connect uses up a request: the run stays bounded
            // even when nothing listens.
            if !self.claim() {
                self.finish(i);
                return;
            }
            let addr = self.core.cfg.target.addr;
            self.error(ErrorKind::Connect, || format!("connect to {addr}: {e}"));
        }
        let c = &mut self.conns[i];
        c.wake_at = now + RECONNECT_DELAY;
        self.core.heap.push(Reverse((c.wake_at, i)));
    }

    /// Drops the socket (epoll forgets it with its last descriptor).
    fn close(&mut self, i: usize) {
        let c = &mut self.conns[i];
        c.stream = None;
        c.reader.reset();
        if c.state != State::Done {
            c.state = State::Down;
        }
    }

    fn finish(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if c.state != State::Done {
            c.stream = None;
            c.state = State::Done;
            self.core.live -= 1;
        }
    }

    fn connected(&mut self, i: usize, now: Instant) {
        let Some(stream) = &self.conns[i].stream else {
            return;
        };
        match rustix::net::sockopt::socket_error(stream) {
            Ok(Ok(())) => {
                self.conns[i].state = State::Idle;
                self.next(i, now);
            }
            Ok(Err(e)) | Err(e) => self.connect_failed(i, now, e.into()),
        }
    }

    /// Sends the next request of connection `i` if one is due (or waits for its time).
    fn next(&mut self, i: usize, now: Instant) {
        if self.conns[i].state != State::Idle {
            return;
        }
        let intended = match self.conns[i].schedule {
            Some(s) => {
                let k = self.conns[i].k;
                let due = s.at(k);
                if self.past_stop(due) {
                    self.finish(i);
                    return;
                }
                if self.past_stop(now) {
                    // Behind schedule at the end: the run stops on time; the requests that
                    // were due and never sent are reported, not hidden.
                    if let Some(stop) = self.core.plan.stop_at {
                        self.core.stats.unsent += s.unsent(k, self.core.plan.measure_start, stop);
                    }
                    self.finish(i);
                    return;
                }
                if due > now {
                    let c = &mut self.conns[i];
                    c.wake_at = due;
                    self.core.heap.push(Reverse((due, i)));
                    return;
                }
                self.conns[i].k = k + 1;
                due
            }
            None => {
                if self.past_stop(now) {
                    self.finish(i);
                    return;
                }
                // Closed loop: latency counts from this very moment.
                Instant::now()
            }
        };
        let measured = intended >= self.core.plan.measure_start;
        if measured && !self.claim() {
            self.finish(i);
            return;
        }
        let user = self.core.picker.pick(&mut self.core.rng);
        self.core.seq += 1;
        let c = &mut self.conns[i];
        self.template
            .build(user, self.core.seq, &mut c.req, &mut c.expect);
        c.user = user;
        c.written = 0;
        c.intended = intended;
        c.measured = measured;
        c.deadline = now + self.core.cfg.timeout;
        c.readable_seen = false;
        c.state = State::Writing;
        self.core.scan_at = self.core.scan_at.min(c.deadline);
        self.write(i, now);
    }

    fn write(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        let Some(stream) = c.stream.as_mut() else {
            return;
        };
        loop {
            match stream.write(&c.req[c.written..]) {
                Ok(0) => {
                    return self.fail(i, now, ErrorKind::Write, "write returned 0".into());
                }
                Ok(n) => {
                    c.written += n;
                    if c.written >= c.req.len() {
                        // The answer comes later: its arrival is an epoll edge.
                        c.state = State::Reading;
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(i, now, ErrorKind::Write, e.to_string()),
            }
        }
    }

    fn read(&mut self, i: usize, now: Instant) {
        loop {
            let c = &mut self.conns[i];
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            let spare = c.reader.spare();
            let room = spare.len();
            let n = match stream.read(spare) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.fail(i, now, ErrorKind::Read, e.to_string()),
            };
            if n == 0 {
                c.reader.set_eof();
            } else {
                c.reader.filled(n);
            }
            let next = self.complete(i, n == 0);
            match next {
                None if n == 0 => {
                    return self.fail(
                        i,
                        now,
                        ErrorKind::Read,
                        "connection closed before the response".into(),
                    );
                }
                // A short read emptied the socket: the next bytes bring a new edge.
                None if n < room => return,
                None => continue,
                Some(Next::Continue) => {
                    self.conns[i].state = State::Idle;
                    return self.next(i, now);
                }
                Some(Next::Reconnect) => return self.reconnect_soon(i, now),
                Some(Next::Fail(kind, why)) => return self.fail(i, now, kind, why),
            }
        }
    }

    /// Checks for a complete answer and records it.
    fn complete(&mut self, i: usize, eof: bool) -> Option<Next> {
        // A fresh clock: `now` of the event batch may be stale by the batch's earlier work.
        let now = Instant::now();
        let endpoint = self.core.cfg.endpoint;
        let c = &mut self.conns[i];
        let stats = &mut self.core.stats;
        let resp = match c.reader.parse() {
            Ok(None) => return None,
            Ok(Some(r)) => r,
            Err(ParseError::Truncated) => {
                return Some(Next::Fail(
                    ErrorKind::Read,
                    "connection closed mid-response".into(),
                ));
            }
            Err(e) => return Some(Next::Fail(ErrorKind::Parse, e.to_string())),
        };
        let measured = c.measured;
        let user = c.user;
        match resp.worker {
            Some(w) => {
                if let Some(before) = stats.workers.observe(user, w, measured) {
                    let (before, now_w) = (
                        String::from_utf8_lossy(before).into_owned(),
                        String::from_utf8_lossy(w).into_owned(),
                    );
                    stats.problem(|| {
                        format!("user-{user} answered by {now_w} after {before}: not sticky")
                    });
                }
            }
            None if measured => stats.no_worker_header += 1,
            None => {}
        }
        let mut bad: Option<(ErrorKind, String)> = None;
        if resp.status != 200 {
            let status = resp.status;
            let snippet =
                String::from_utf8_lossy(&resp.body[..resp.body.len().min(160)]).into_owned();
            bad = Some((
                ErrorKind::Status,
                format!("user-{user}: status {status}: {snippet}"),
            ));
        } else if let Err(why) = verify(endpoint, user, &c.expect, &resp) {
            bad = Some((ErrorKind::Body, why));
        }
        let close = resp.close || eof;
        if measured {
            stats.answered(resp.status, latency(c.intended, now), now);
            self.core.counters.requests.fetch_add(1, Ordering::Relaxed);
            if let Some((kind, why)) = bad {
                stats.errors.add(kind);
                stats.problem(|| why);
                self.core.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        match c.reader.consume() {
            Ok(()) => {}
            Err(e) => {
                // The answer counted; the stray bytes make the connection unusable.
                let what = e.to_string();
                if measured {
                    self.error(ErrorKind::Parse, || what);
                }
                return Some(Next::Reconnect);
            }
        }
        Some(if close {
            Next::Reconnect
        } else {
            Next::Continue
        })
    }

    /// A request failed: count it (if measured), drop the connection, reconnect.
    fn fail(&mut self, i: usize, now: Instant, kind: ErrorKind, why: String) {
        let c = &self.conns[i];
        if c.measured && matches!(c.state, State::Writing | State::Reading) {
            let user = c.user;
            self.error(kind, || format!("user-{user}: {why}"));
        }
        self.reconnect_soon(i, now);
    }

    /// Drops the connection and reconnects from the main loop (not from here: a server that
    /// fails every connection at once must not turn into unbounded recursion).
    fn reconnect_soon(&mut self, i: usize, now: Instant) {
        self.close(i);
        let c = &mut self.conns[i];
        if c.state == State::Down {
            c.wake_at = now;
            self.core.heap.push(Reverse((now, i)));
        }
    }

    /// Bytes or a close on a connection with nothing in flight.
    fn idle_readable(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        let Some(stream) = c.stream.as_mut() else {
            return;
        };
        let mut buf = [0u8; 512];
        match stream.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // The server closed an idle keep-alive connection: not an error.
            Ok(0) => self.reconnect_soon(i, now),
            Ok(n) => {
                if self.core.measuring(now) {
                    self.error(ErrorKind::Parse, || {
                        format!("{n} unsolicited bytes on an idle connection")
                    });
                }
                self.reconnect_soon(i, now);
            }
            Err(e) => {
                if self.core.measuring(now) {
                    self.error(ErrorKind::Read, || format!("idle connection: {e}"));
                }
                self.reconnect_soon(i, now);
            }
        }
    }
}

/// Raises this process's open-file soft limit towards the hard limit so that `connections`
/// sockets fit (a process-wide change, so the CLI calls it, not [`run`]). Returns the limit
/// now in force (`None`: unlimited).
pub fn raise_nofile_limit(connections: usize) -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let want = connections as u64 + 64;
    let cur = getrlimit(Resource::Nofile);
    match cur.current {
        Some(soft) if soft < want => {
            let target = cur.maximum.map_or(want, |hard| want.min(hard));
            let raised = Rlimit {
                current: Some(target),
                maximum: cur.maximum,
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => Some(target),
                Err(_) => Some(soft),
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

    #[test]
    fn raises_the_open_file_limit_for_many_connections() {
        let before = getrlimit(Resource::Nofile);
        let (Some(soft), hard) = (before.current, before.maximum) else {
            return assert_eq!(raise_nofile_limit(100_000), None);
        };
        if soft < 300 {
            // Nothing to lower: just check that it asks for enough.
            let got = raise_nofile_limit(1000).unwrap_or(u64::MAX);
            assert!(got >= hard.unwrap_or(u64::MAX).min(1064));
            return;
        }
        let lowered = Rlimit {
            current: Some(256),
            maximum: hard,
        };
        setrlimit(Resource::Nofile, lowered).expect("lower the soft limit");
        let got = raise_nofile_limit(1000);
        let now = getrlimit(Resource::Nofile).current;
        setrlimit(Resource::Nofile, before).expect("restore");
        let want = hard.map_or(1064, |h| h.min(1064));
        assert_eq!(got, Some(want));
        assert_eq!(now, Some(want));
        // Enough already: unchanged.
        assert_eq!(raise_nofile_limit(10), Some(soft));
    }
}
