//! The WebSocket side of the engine: load connections that speak the OpenClaw gateway
//! protocol (`--protocol ws`).
//!
//! Each connection, on the same edge-triggered epoll loop as the HTTP engine: a non-blocking
//! TCP connect; the HTTP upgrade to `ws://HOST/?user=user-N` (tungstenite's client
//! handshake, resumed on each readiness edge); the server's `connect.challenge`; our
//! `connect` request (protocol 4, a `test` client, `auth.token` when a token is set);
//! `hello-ok`. Then it keeps `depth` requests in flight (closed loop: each final answer is
//! followed by a new request), matching answers to requests by id. With `--rate` (open
//! loop) each connection sends on the run's [`Schedule`] instead, at most `depth` in flight,
//! and every stage's latency counts from when the request was due.
//!
//! A connection acts for one user (the protocol ties a connection to the user its credential
//! or URL names), drawn with the run's user distribution each time it connects.
//!
//! RFC 6455 framing — masked client frames, ping answered by pong, the close frame,
//! fragmented messages — is tungstenite's; here only the protocol's frames are handled.
//!
//! `agent` runs are two-stage: the `accepted` answer, `agent`/`chat` events naming the run
//! (its `runId` is our `idempotencyKey`), the final answer with the request's id. The time
//! from sending the request to each stage is recorded. Events reach every connection of the
//! user, so events of runs this connection did not start are ignored.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::io;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::Rng;
use rustix::event::epoll;
use serde::Deserialize;
use serde_json::value::RawValue;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use crate::BenchError;
use crate::config::{Config, WsMethod};
use crate::engine::{Plan, READABLE, RECONNECT_DELAY, Shared};
use crate::rpc::{self, Inbound};
use crate::schedule::Schedule;
use crate::stats::{ErrorKind, ThreadStats, record};
use crate::thread::{Connections, MAX_WAIT, ThreadCore, drive};
use crate::users::UserPicker;
use crate::workload::fill;

/// `{"message":"","idempotencyKey":""}` and a typical run id: the agent params' bytes besides
/// the message, so that `--body-size` is about the params' size as for HTTP.
const AGENT_OVERHEAD: usize = 60;
/// Read chunk per connection: the protocol's frames are small (`hello-ok` is about 1 KiB),
/// and thousands of connections must stay cheap.
const READ_BUFFER: usize = 16 << 10;

type Ws = WebSocket<TcpStream>;

/// Where a connection is.
enum Phase {
    /// No socket; reconnect at `wake_at`.
    Down,
    /// Non-blocking TCP connect in progress.
    Connecting(TcpStream),
    /// The upgrade request sent, its answer not complete.
    Upgrading(MidHandshake<ClientHandshake<TcpStream>>),
    /// Upgraded: waiting for `connect.challenge`.
    Challenge(Ws),
    /// `connect` sent: waiting for `hello-ok`.
    Hello(Ws),
    /// Connected: requests flow.
    Ready(Ws),
    /// Finished for good.
    Done,
}

/// A request sent and not finally answered.
struct Pending {
    /// The latency origin: when it was written (closed loop) or due (open loop).
    sent: Instant,
    /// Its timeout.
    deadline: Instant,
    /// Whether it is measured (sent after the warm-up).
    measured: bool,
    /// `agent`: its `accepted` answer came.
    accepted: bool,
    /// `agent`: an event of its run came.
    first_event: bool,
    /// `agent`: the message sent (the reply must echo it).
    message: String,
}

struct Conn {
    phase: Phase,
    /// The user this connection acts for.
    user: u32,
    /// This connection's run ids are this prefix and the request id: unique per run (random
    /// part), thread and connection, so events of other connections' runs are recognised.
    run_prefix: String,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// The last event `seq` (numbered events are contiguous per connection).
    last_seq: u64,
    /// Handshake timeout.
    deadline: Instant,
    /// When the heap next wakes this connection: to reconnect, or (open loop) to send.
    wake_at: Instant,
    /// Open loop: this connection's send times.
    schedule: Option<Schedule>,
    /// Open loop: the number of the next request in the schedule.
    k: u64,
    /// No more requests will be sent: the run's end or its request count was reached.
    draining: bool,
}

impl Conn {
    fn ws(&mut self) -> Option<&mut Ws> {
        match &mut self.phase {
            Phase::Challenge(ws) | Phase::Hello(ws) | Phase::Ready(ws) => Some(ws),
            _ => None,
        }
    }
}

/// One load thread of a WebSocket run.
pub(crate) struct WsThread<'a> {
    core: ThreadCore<'a>,
    conns: Vec<Conn>,
    /// The `connect` request (the same for every connection).
    connect_frame: String,
}

impl<'a> Connections<'a> for WsThread<'a> {
    fn core(&mut self) -> &mut ThreadCore<'a> {
        &mut self.core
    }

    fn count(&self) -> usize {
        self.conns.len()
    }

    /// Starts connecting connection `i` as a freshly drawn user.
    fn open(&mut self, i: usize, now: Instant) {
        if self.core.over(now) {
            return self.finish(i);
        }
        match self.core.connect(i) {
            Ok((stream, connected)) => {
                let user = self.core.picker.pick(&mut self.core.rng);
                let deadline = now + self.core.cfg.timeout;
                let c = &mut self.conns[i];
                c.user = user;
                c.last_seq = 0;
                c.draining = false;
                c.deadline = deadline;
                c.phase = Phase::Connecting(stream);
                self.core.scan_at = self.core.scan_at.min(deadline);
                if connected {
                    self.upgrade(i, now);
                }
            }
            Err(e) => {
                let addr = self.core.cfg.target.addr;
                let why = format!("connect to {addr}: {e}");
                self.broken(i, now, ErrorKind::Connect, why, RECONNECT_DELAY);
            }
        }
    }

    fn on_event(&mut self, i: usize, flags: epoll::EventFlags, _waited: Instant) {
        // Each frame is timed when it is read, not when the wait returned: event latencies
        // are measured to the microsecond.
        let now = Instant::now();
        match &self.conns[i].phase {
            Phase::Connecting(stream) => {
                if !flags.intersects(
                    epoll::EventFlags::OUT | epoll::EventFlags::ERR | epoll::EventFlags::HUP,
                ) {
                    return;
                }
                match rustix::net::sockopt::socket_error(stream) {
                    Ok(Ok(())) => self.upgrade(i, now),
                    Ok(Err(e)) | Err(e) => {
                        let addr = self.core.cfg.target.addr;
                        let why = format!("connect to {addr}: {}", io::Error::from(e));
                        self.broken(i, now, ErrorKind::Connect, why, RECONNECT_DELAY);
                    }
                }
            }
            Phase::Upgrading(_) => {
                if flags.intersects(READABLE | epoll::EventFlags::OUT) {
                    self.upgrade(i, now);
                }
            }
            Phase::Challenge(_) | Phase::Hello(_) | Phase::Ready(_) => self.drive(i, now),
            Phase::Down | Phase::Done => {}
        }
    }

    fn wake(&mut self, i: usize, now: Instant) {
        let c = &self.conns[i];
        // A stale entry (a later one exists) or a connection already back up.
        if c.wake_at > now {
            return;
        }
        if matches!(c.phase, Phase::Down) {
            self.open(i, now);
        } else if matches!(c.phase, Phase::Ready(_)) && self.fill(i) {
            // Open loop: requests came due.
            self.flush(i, now);
        }
    }

    /// Fails handshakes and requests past their deadline; sets the next scan time.
    fn scan_timeouts(&mut self, now: Instant) {
        self.core.scan_at = now + MAX_WAIT;
        let timeout = self.core.cfg.timeout;
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            match &c.phase {
                Phase::Connecting(_)
                | Phase::Upgrading(_)
                | Phase::Challenge(_)
                | Phase::Hello(_) => {
                    if now < c.deadline {
                        self.core.scan_at = self.core.scan_at.min(c.deadline);
                        continue;
                    }
                    let kind = if matches!(c.phase, Phase::Connecting(_)) {
                        ErrorKind::Connect
                    } else {
                        ErrorKind::Handshake
                    };
                    let why = format!("no connection within {timeout:?}");
                    self.broken(i, now, kind, why, RECONNECT_DELAY);
                }
                Phase::Ready(_) => {
                    let expired = c
                        .pending
                        .values()
                        .filter(|p| p.measured && p.deadline <= now)
                        .count() as u64;
                    let first = c.pending.values().map(|p| p.deadline).min();
                    match first {
                        Some(d) if d <= now => {
                            let user = c.user;
                            let lost =
                                c.pending.values().filter(|p| p.measured).count() as u64 - expired;
                            // The timed-out requests count as timeouts; the others in flight
                            // are lost with the connection, dropped so that `depth` stays
                            // the number of requests the gateway is working on.
                            self.errors(ErrorKind::Timeout, expired, || {
                                format!("user-{user}: no answer within {timeout:?}")
                            });
                            self.errors(ErrorKind::Read, lost, || {
                                format!("user-{user}: connection dropped after a request timed out")
                            });
                            self.reconnect(i, now, Duration::ZERO);
                        }
                        Some(d) => self.core.scan_at = self.core.scan_at.min(d),
                        None => {}
                    }
                }
                Phase::Down | Phase::Done => {}
            }
        }
    }
}

impl<'a> WsThread<'a> {
    pub(crate) fn new(
        cfg: &'a Config,
        plan: &'a Plan,
        shared: &'a Shared,
        picker: &'a UserPicker,
        tid: usize,
    ) -> Result<WsThread<'a>, BenchError> {
        let (count, first) = cfg.connections_of(tid);
        // Run ids must not collide with those of another bench run against the same gateway
        // (its users' histories keep them): a random part per run and thread.
        let run_tag: u64 = rand::rng().random();
        let conns = (0..count)
            .map(|i| Conn {
                phase: Phase::Down,
                user: 0,
                run_prefix: format!("bench-{run_tag:016x}-{}-", first + i),
                next_id: 0,
                pending: HashMap::with_capacity(cfg.depth),
                last_seq: 0,
                deadline: plan.t0,
                wake_at: plan.t0,
                schedule: cfg
                    .rate
                    .map(|r| Schedule::new(plan.t0, r, cfg.connections, first + i)),
                k: 0,
                draining: false,
            })
            .collect();
        Ok(WsThread {
            core: ThreadCore::new(cfg, plan, shared, picker, tid, count)?,
            conns,
            connect_frame: rpc::connect_frame(cfg.token.as_deref()),
        })
    }

    pub(crate) fn run(mut self) -> Result<ThreadStats, BenchError> {
        drive(&mut self)?;
        Ok(self.core.stats)
    }

    /// Counts `n` errors of `kind`, describing the first.
    fn errors(&mut self, kind: ErrorKind, n: u64, describe: impl FnOnce() -> String) {
        if n == 0 {
            return;
        }
        for _ in 0..n {
            self.core.stats.errors.add(kind);
        }
        self.core.stats.problem(describe);
        self.core.counters.errors.fetch_add(n, Ordering::Relaxed);
    }

    /// Starts or resumes the HTTP upgrade.
    fn upgrade(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        let result = match std::mem::replace(&mut c.phase, Phase::Down) {
            Phase::Connecting(stream) => {
                let t = &self.core.cfg.target;
                // The gateway serves WebSocket on `/` (below the URL's prefix, for a proxy
                // that forwards one); a connection without credentials names its user here.
                let url = format!("ws://{}{}/?user=user-{}", t.host_header, t.prefix, c.user);
                let mut config = WebSocketConfig::default();
                config.read_buffer_size = READ_BUFFER;
                tungstenite::client::client_with_config(url, stream, Some(config))
            }
            Phase::Upgrading(mid) => mid.handshake(),
            other => {
                c.phase = other;
                return;
            }
        };
        match result {
            Ok((ws, _response)) => {
                self.conns[i].phase = Phase::Challenge(ws);
                // Bytes after the 101 answer (the challenge, often in the same segment) are
                // in tungstenite's buffer already: no new edge will announce them.
                self.drive(i, now);
            }
            Err(HandshakeError::Interrupted(mid)) => self.conns[i].phase = Phase::Upgrading(mid),
            Err(HandshakeError::Failure(e)) => {
                let why = match e {
                    tungstenite::Error::Http(r) => {
                        let body = r
                            .body()
                            .as_deref()
                            .map(|b| String::from_utf8_lossy(&b[..b.len().min(160)]).into_owned())
                            .unwrap_or_default();
                        format!("upgrade refused: status {}: {body}", r.status())
                    }
                    e => format!("upgrade failed: {e}"),
                };
                self.broken(i, now, ErrorKind::Handshake, why, RECONNECT_DELAY);
            }
        }
    }

    /// Reads every frame available, then flushes what was queued (requests, pongs).
    fn drive(&mut self, i: usize, now: Instant) {
        loop {
            let Some(ws) = self.conns[i].ws() else {
                return;
            };
            match ws.read() {
                Ok(Message::Text(t)) => {
                    if !self.on_text(i, t.as_str(), now) {
                        return;
                    }
                }
                Ok(Message::Binary(_)) => {
                    let why = "a binary frame (the protocol sends text)".to_string();
                    return self.broken(i, now, ErrorKind::Protocol, why, Duration::ZERO);
                }
                Ok(Message::Close(f)) => {
                    let why = match f {
                        Some(f) => format!("closed by the server: {} {}", f.code, f.reason),
                        None => "closed by the server".to_string(),
                    };
                    return self.broken(i, now, ErrorKind::Protocol, why, Duration::ZERO);
                }
                // Pings are answered by tungstenite (the pong goes out with the next flush).
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let why = format!("read: {e}");
                    return self.broken(i, now, ErrorKind::Read, why, Duration::ZERO);
                }
            }
        }
        self.flush(i, now);
    }

    /// Writes out what tungstenite has queued; the rest goes with the next writable edge.
    fn flush(&mut self, i: usize, now: Instant) {
        let Some(ws) = self.conns[i].ws() else {
            return;
        };
        match ws.flush() {
            Ok(()) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                let why = format!("write: {e}");
                self.broken(i, now, ErrorKind::Write, why, Duration::ZERO);
            }
        }
    }

    /// One text frame. False when the connection was dropped.
    fn on_text(&mut self, i: usize, text: &str, now: Instant) -> bool {
        let frame = match rpc::parse(text) {
            Ok(f) => f,
            Err(why) => {
                self.broken(i, now, ErrorKind::Protocol, why, Duration::ZERO);
                return false;
            }
        };
        match (&self.conns[i].phase, frame) {
            (Phase::Challenge(_), Inbound::Event { event, .. }) if event == "connect.challenge" => {
                let c = &mut self.conns[i];
                let Phase::Challenge(mut ws) = std::mem::replace(&mut c.phase, Phase::Down) else {
                    return false;
                };
                match ws.write(Message::text(self.connect_frame.clone())) {
                    Ok(()) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        let why = format!("write: {e}");
                        self.broken(i, now, ErrorKind::Write, why, Duration::ZERO);
                        return false;
                    }
                }
                self.conns[i].phase = Phase::Hello(ws);
                true
            }
            (
                Phase::Hello(_),
                Inbound::Res {
                    id,
                    ok: true,
                    payload,
                    ..
                },
            ) if id == rpc::CONNECT_ID => {
                if !is_hello_ok(payload) {
                    let why = "connect answered without a hello-ok payload".to_string();
                    self.broken(i, now, ErrorKind::Handshake, why, RECONNECT_DELAY);
                    return false;
                }
                let c = &mut self.conns[i];
                let Phase::Hello(ws) = std::mem::replace(&mut c.phase, Phase::Down) else {
                    return false;
                };
                c.phase = Phase::Ready(ws);
                self.core.stats.ws.handshakes += 1;
                self.fill(i)
            }
            (
                Phase::Hello(_),
                Inbound::Res {
                    ok: false,
                    code,
                    message,
                    ..
                },
            ) => {
                let why = format!("connect refused: {code}: {message}");
                self.broken(i, now, ErrorKind::Handshake, why, RECONNECT_DELAY);
                false
            }
            (Phase::Challenge(_) | Phase::Hello(_), f) => {
                let why = format!("unexpected frame during the handshake: {f:?}");
                self.broken(i, now, ErrorKind::Handshake, why, RECONNECT_DELAY);
                false
            }
            (
                Phase::Ready(_),
                Inbound::Res {
                    id,
                    ok,
                    payload,
                    code,
                    message,
                },
            ) => self.answer(i, &id, ok, payload, &code, &message, now),
            (
                Phase::Ready(_),
                Inbound::Event {
                    event,
                    seq,
                    payload,
                },
            ) => {
                self.event(i, &event, seq, payload);
                true
            }
            _ => false,
        }
    }

    /// An answer on a connected connection.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &mut self,
        i: usize,
        id: &str,
        ok: bool,
        payload: Option<&RawValue>,
        code: &str,
        message: &str,
        now: Instant,
    ) -> bool {
        let at = Instant::now();
        let method = self.core.cfg.ws_method;
        let c = &mut self.conns[i];
        let Some(n) = id.parse::<u64>().ok().filter(|n| c.pending.contains_key(n)) else {
            let why = format!("an answer to id {id:?}, which is not in flight");
            self.broken(i, now, ErrorKind::Protocol, why, Duration::ZERO);
            return false;
        };
        let run_id = format!("{}{n}", c.run_prefix);
        if method == WsMethod::Agent && ok {
            let p = c.pending.get_mut(&n).filter(|p| !p.accepted);
            if let Some(p) = p {
                match rpc::is_accepted(payload, &run_id) {
                    Ok(true) => {
                        p.accepted = true;
                        if p.measured {
                            record(&mut self.core.stats.ws.accepted, at - p.sent);
                        }
                        return true;
                    }
                    // Not an `accepted` answer: checked below as the final one.
                    Ok(false) => {}
                    Err(why) => {
                        let user = c.user;
                        let why = format!("user-{user}: {why}");
                        self.broken(i, now, ErrorKind::Protocol, why, Duration::ZERO);
                        return false;
                    }
                }
            }
        }
        let Some(p) = c.pending.remove(&n) else {
            return false;
        };
        let user = c.user;
        let mut bad: Option<(ErrorKind, String)> = None;
        if !ok {
            bad = Some((
                ErrorKind::Status,
                format!(
                    "user-{user}: {} answered {code}: {}",
                    method.name(),
                    message.chars().take(160).collect::<String>()
                ),
            ));
        } else {
            match method {
                WsMethod::Health => {
                    match rpc::verify_health(payload) {
                        Ok(Some(worker)) => {
                            let measured = p.measured;
                            if let Some(before) =
                                self.core
                                    .stats
                                    .workers
                                    .observe(user, worker.as_bytes(), measured)
                            {
                                let before = String::from_utf8_lossy(before).into_owned();
                                self.core.stats.problem(|| {
                                format!("user-{user} answered by {worker} after {before}: not sticky")
                            });
                            }
                        }
                        Ok(None) => {}
                        Err(why) => bad = Some((ErrorKind::Body, format!("user-{user}: {why}"))),
                    }
                }
                WsMethod::Agent => {
                    let checked = if p.accepted {
                        rpc::verify_agent_final(payload, &run_id, &p.message)
                    } else {
                        Err("final answer without the accepted stage before it".to_string())
                    };
                    if let Err(why) = checked {
                        bad = Some((ErrorKind::Body, format!("user-{user}: {why}")));
                    }
                }
            }
        }
        if p.measured {
            let outcome = if ok { "ok" } else { code };
            self.core.stats.rpc_answered(outcome, at - p.sent, at);
            self.core.counters.requests.fetch_add(1, Ordering::Relaxed);
            if method == WsMethod::Agent && ok && !p.first_event {
                self.core.stats.ws.runs_without_event += 1;
            }
            if let Some((kind, why)) = bad {
                self.errors(kind, 1, || why);
            }
        }
        self.fill(i)
    }

    /// An event on a connected connection: its `seq` is checked; one of a run of this
    /// connection marks the run's first event.
    fn event(&mut self, i: usize, name: &str, seq: Option<u64>, payload: Option<&RawValue>) {
        let at = Instant::now();
        let c = &mut self.conns[i];
        if let Some(s) = seq {
            let expected = c.last_seq + 1;
            c.last_seq = s;
            if s != expected && self.core.measuring(at) {
                let user = self.conns[i].user;
                self.errors(ErrorKind::Protocol, 1, || {
                    format!("user-{user}: event seq {s} where {expected} was due")
                });
            }
        }
        if self.core.cfg.ws_method != WsMethod::Agent || !matches!(name, "agent" | "chat") {
            return;
        }
        let c = &mut self.conns[i];
        let Some(run) = rpc::run_id(payload) else {
            return;
        };
        let n = run
            .strip_prefix(c.run_prefix.as_str())
            .and_then(|n| n.parse::<u64>().ok());
        let Some(p) = n.and_then(|n| c.pending.get_mut(&n)) else {
            return;
        };
        if p.measured {
            self.core.stats.ws.run_events += 1;
            if name == "agent"
                && let Some(emitted) = rpc::emitted_us(payload)
            {
                let delay_us = moltbot_ipc::clock::monotonic_us().saturating_sub(emitted);
                record(
                    &mut self.core.stats.ws.event_delay,
                    Duration::from_micros(delay_us),
                );
            }
            if !p.first_event {
                record(&mut self.core.stats.ws.first_event, at - p.sent);
            }
        }
        p.first_event = true;
    }

    /// Tops connection `i` up to `depth` requests in flight; closes it once the run is over
    /// and nothing is in flight. False when the connection was dropped or finished.
    fn fill(&mut self, i: usize) -> bool {
        let method = self.core.cfg.ws_method;
        let message_len = self
            .core
            .cfg
            .body_size
            .saturating_sub(AGENT_OVERHEAD)
            .max(1);
        loop {
            let c = &self.conns[i];
            if c.draining || c.pending.len() >= self.core.cfg.depth {
                break;
            }
            let now = Instant::now();
            let Some((origin, measured)) = self.next_send(i, now) else {
                break;
            };
            self.core.seq += 1;
            let seq = self.core.seq;
            let timeout = self.core.cfg.timeout;
            let c = &mut self.conns[i];
            let n = c.next_id;
            c.next_id += 1;
            let mut message = String::new();
            let text = match method {
                WsMethod::Health => rpc::health_frame(n),
                WsMethod::Agent => {
                    let mut m = Vec::with_capacity(message_len);
                    fill(&mut m, c.user, seq, message_len);
                    // `fill` writes ASCII letters and digits only.
                    message = String::from_utf8_lossy(&m).into_owned();
                    let run_id = format!("{}{n}", c.run_prefix);
                    rpc::agent_frame(n, &message, &run_id)
                }
            };
            let Some(ws) = c.ws() else {
                return false;
            };
            match ws.write(Message::text(text)) {
                Ok(()) => {}
                // Queued: it goes out with the next flush.
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    let why = format!("write: {e}");
                    self.broken(i, now, ErrorKind::Write, why, Duration::ZERO);
                    return false;
                }
            }
            let written = Instant::now();
            let sent = origin.unwrap_or(written);
            c.pending.insert(
                n,
                Pending {
                    sent,
                    deadline: written + timeout,
                    measured,
                    accepted: false,
                    first_event: false,
                    message,
                },
            );
            self.core.scan_at = self.core.scan_at.min(written + timeout);
        }
        let c = &mut self.conns[i];
        if c.draining && c.pending.is_empty() {
            if let Some(ws) = c.ws() {
                // The close frame goes into the socket buffer; the server ends its side when
                // it reads it. Waiting for its answer would only delay the end of the run.
                let _ = ws.close(None);
                let _ = ws.flush();
            }
            self.finish(i);
            return false;
        }
        true
    }

    /// Whether connection `i` sends a request now, and if so its intended time (open loop;
    /// `None` in closed loop, where the latency counts from the write) and whether it is
    /// measured. Sets `draining` when the run is over for it; in open loop, a request not yet
    /// due is a wake-up on the heap.
    fn next_send(&mut self, i: usize, now: Instant) -> Option<(Option<Instant>, bool)> {
        let plan = self.core.plan;
        let c = &mut self.conns[i];
        let Some(s) = c.schedule else {
            let measured = now >= plan.measure_start;
            if plan.past_stop(now) || (measured && !self.core.shared.claim(plan)) {
                c.draining = true;
                return None;
            }
            return Some((None, measured));
        };
        let due = s.at(c.k);
        if plan.past_stop(due) {
            c.draining = true;
            return None;
        }
        if plan.past_stop(now) {
            // Behind schedule at the end: the run stops on time; the requests that were due
            // and never sent are reported, not hidden.
            if let Some(stop) = plan.stop_at {
                self.core.stats.unsent += s.unsent(c.k, plan.measure_start, stop);
            }
            c.draining = true;
            return None;
        }
        if due > now {
            if c.wake_at != due {
                c.wake_at = due;
                self.core.heap.push(Reverse((due, i)));
            }
            return None;
        }
        let measured = due >= plan.measure_start;
        if measured && !self.core.shared.claim(plan) {
            c.draining = true;
            return None;
        }
        c.k += 1;
        Some((Some(due), measured))
    }

    /// The connection failed: its measured requests in flight fail with it (or, with none in
    /// flight, the failure itself counts once when measuring); it reconnects after `delay`.
    fn broken(&mut self, i: usize, now: Instant, kind: ErrorKind, why: String, delay: Duration) {
        let c = &mut self.conns[i];
        let user = c.user;
        let in_flight = c.pending.values().filter(|p| p.measured).count() as u64;
        c.pending.clear();
        if in_flight > 0 {
            self.errors(kind, in_flight, || format!("user-{user}: {why}"));
        } else if self.core.measuring(now) {
            // In request-count mode a failure uses up a request: the run stays bounded even
            // when every connection fails.
            if !self.core.shared.claim(self.core.plan) {
                return self.finish(i);
            }
            self.errors(kind, 1, || format!("user-{user}: {why}"));
        }
        self.reconnect(i, now, delay);
    }

    /// Drops connection `i` (its requests in flight forgotten) and connects again after
    /// `delay`, from the main loop: a server that fails every connection at once must not turn
    /// into unbounded recursion.
    fn reconnect(&mut self, i: usize, now: Instant, delay: Duration) {
        let c = &mut self.conns[i];
        if matches!(c.phase, Phase::Done) {
            return;
        }
        c.pending.clear();
        c.phase = Phase::Down;
        c.wake_at = now + delay;
        self.core.heap.push(Reverse((c.wake_at, i)));
    }

    fn finish(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if !matches!(c.phase, Phase::Done) {
            c.phase = Phase::Done;
            c.pending.clear();
            self.core.live -= 1;
        }
    }
}

#[derive(Deserialize)]
struct HelloOk<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

/// Whether the `connect` answer's payload is a `hello-ok`.
fn is_hello_ok(payload: Option<&RawValue>) -> bool {
    payload
        .and_then(|p| serde_json::from_str::<HelloOk<'_>>(p.get()).ok())
        .is_some_and(|h| h.kind == "hello-ok")
}
