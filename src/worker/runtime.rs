//! The worker process (`moltbot worker`, a hidden subcommand the gateway runs in each slot):
//! confine itself, attach to its segment, then serve its lanes until told to stop.
//!
//! One thread serves every lane, one request at a time, round-robin across lanes so that no
//! gateway core starves. The heartbeat is bumped by this same loop, so a handler that hangs
//! stops the heartbeat and the monitor replaces the process. When idle the loop spins briefly,
//! then parks on the futex in its segment with a timeout of half the heartbeat interval, which
//! keeps the heartbeat going while using no CPU.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use moltbot_ipc::clock::monotonic_us;
use moltbot_ipc::segment::worker_state;
use moltbot_ipc::wake::{announce_park, cancel_park, futex_park, wake_needed};
use moltbot_ipc::{Consumer, Kind, Producer, Response, RingError, Segment, WakeSender};

use crate::worker::handlers::{HandlerReply, Handlers};
use crate::worker::isolation::{self, IsolationPolicy};

/// Command-line arguments of `moltbot worker` (set by the gateway, not by people).
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Slot number.
    #[arg(long)]
    pub slot: usize,
    /// Name of the slot's shared-memory segment.
    #[arg(long)]
    pub segment: String,
    /// Lanes of the segment: the gateway passes this many wake sockets over standard input
    /// (see `moltbot_ipc::wake::receive_wake_senders`), in lane order.
    #[arg(long)]
    pub lanes: usize,
    /// Pid of the gateway; the worker exits if it is not its parent.
    #[arg(long)]
    pub parent_pid: u32,
    /// The sandbox root (also the working directory).
    #[arg(long)]
    pub sandbox: PathBuf,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub heartbeat_ms: u64,
    /// RLIMIT_NOFILE.
    #[arg(long, default_value_t = 1024)]
    pub nofile: u64,
    /// RLIMIT_AS in bytes (none if absent).
    #[arg(long)]
    pub address_space: Option<u64>,
    /// Do not apply Landlock.
    #[arg(long)]
    pub no_landlock: bool,
    /// Exit (code 0, between requests) after serving this many requests: the recycle limit,
    /// enforced exactly here; the monitor replaces the process.
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Run this program (a JSON array: program and arguments) in the sandbox and bridge the
    /// lanes to it over stdin/stdout instead of the built-in handlers.
    #[arg(long)]
    pub command: Option<String>,
    /// Extra read-only paths for Landlock (the agent program's files).
    #[arg(long = "read-path")]
    pub read_paths: Vec<PathBuf>,
    /// How long a bridged program may take to finish after `shutdown`, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub grace_ms: u64,
    /// Longest line a bridged program may write, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_line: usize,
}

/// A lane as the worker sees it.
pub(crate) struct Lane {
    pub(crate) req: Consumer,
    pub(crate) resp: Producer,
    pub(crate) wake: WakeSender,
}

/// Spins this many empty rounds before parking, when the worker has a CPU to itself: a
/// request arriving within that window is taken without a futex round trip. With a single CPU
/// for the gateway and its workers, spinning only delays the gateway, so the worker parks at
/// once.
const SPIN_ROUNDS: u32 = 200;

/// The RSS in the segment header is refreshed at most this often (it costs an open and a read
/// of `/proc/self/statm`).
const RSS_EVERY: Duration = Duration::from_millis(500);

/// Runs the worker until SIGTERM (finish the current request, exit 0) or a fatal error.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    isolation::set_parent_death_signal(args.parent_pid).context("parent death signal")?;
    let policy = IsolationPolicy {
        sandbox_root: args.sandbox.clone(),
        landlock: !args.no_landlock,
        nofile: args.nofile,
        address_space: args.address_space,
        extra_read_only: args.read_paths.clone(),
    };
    isolation::apply_rlimits(&policy).context("rlimits")?;

    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())
        .context("SIGTERM handler")?;

    let seg = Segment::attach(&args.segment).context("attach segment")?;
    let lanes_n = seg.layout().lanes() as usize;
    if args.lanes != lanes_n {
        bail!("--lanes {} for a segment of {lanes_n} lanes", args.lanes);
    }
    let wakes = receive_wake_sockets(lanes_n)?;
    let mut lanes = Vec::with_capacity(lanes_n);
    for (i, wake) in wakes.into_iter().enumerate() {
        let ends = seg
            .take_worker_lane(i as u32)
            .with_context(|| format!("lane {i}"))?;
        lanes.push(Lane {
            req: ends.requests,
            resp: ends.responses,
            wake,
        });
    }

    // From here on no new files outside the sandbox: the segment is mapped, the fds are open.
    let landlock = isolation::apply_landlock(&policy).context("landlock")?;
    tracing::info!(
        worker = args.slot,
        pid = std::process::id(),
        ?landlock,
        "worker serving {lanes_n} lanes"
    );

    let max_reply = lanes
        .first()
        .map(|l| l.resp.max_payload().saturating_sub(1024))
        .unwrap_or(0);
    if let Some(command) = &args.command {
        let argv: Vec<String> =
            serde_json::from_str(command).context("--command must be a JSON array")?;
        return crate::worker::bridge::run(&args, argv, seg, lanes, &term, max_reply);
    }
    let mut handlers = Handlers::new(
        crate::sandbox::worker_id(args.slot),
        std::process::id(),
        &args.sandbox,
    );
    handlers.set_max_reply_bytes(max_reply);

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let spin_rounds = if cpus > 1 { SPIN_ROUNDS } else { 0 };
    let mut w = Worker {
        seg,
        lanes,
        handlers,
        max_reply,
        spin_rounds,
        rss_at: Instant::now(),
        max_requests: args.max_requests.unwrap_or(u64::MAX),
    };
    let park_for = Duration::from_millis((args.heartbeat_ms / 2).clamp(1, 1000));
    w.serve(&term, park_for)
}

struct Worker {
    seg: Segment,
    lanes: Vec<Lane>,
    handlers: Handlers,
    max_reply: usize,
    /// Empty rounds to spin before parking (0 on a single CPU).
    spin_rounds: u32,
    /// When the RSS was last published.
    rss_at: Instant,
    /// Requests after which this process leaves (recycle).
    max_requests: u64,
}

impl Worker {
    fn heartbeat(&self) {
        self.seg.header().heartbeat.fetch_add(1, Ordering::Relaxed);
    }

    fn serve(&mut self, term: &AtomicBool, park_for: Duration) -> anyhow::Result<()> {
        let seg = self.seg.clone();
        let h = seg.header();
        h.worker_state
            .store(worker_state::SERVING, Ordering::Release);
        self.update_rss();
        let mut idle = 0u32;
        loop {
            self.heartbeat();
            if term.load(Ordering::Relaxed) {
                h.worker_state
                    .store(worker_state::EXITING, Ordering::Release);
                tracing::info!("SIGTERM: exiting between requests");
                return Ok(());
            }
            let mut served = false;
            for i in 0..self.lanes.len() {
                if h.requests_served.load(Ordering::Relaxed) >= self.max_requests {
                    // The recycle limit: leave between requests; what is unread stays in
                    // the rings for the successor.
                    h.worker_state
                        .store(worker_state::EXITING, Ordering::Release);
                    tracing::info!("served max_requests ({}): exiting", self.max_requests);
                    return Ok(());
                }
                served |= self.serve_next(i)?;
            }
            if served {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < self.spin_rounds {
                std::hint::spin_loop();
                continue;
            }

            let parked = seg.worker_parked();
            announce_park(parked);
            let mut work = false;
            for l in &mut self.lanes {
                work |= l.req.has_data().context("request ring")?;
            }
            if !work && !term.load(Ordering::Relaxed) {
                if self.rss_at.elapsed() >= RSS_EVERY {
                    self.update_rss();
                }
                futex_park(parked, park_for);
            }
            cancel_park(parked);
            idle = 0;
        }
    }

    fn update_rss(&mut self) {
        self.rss_at = Instant::now();
        if let Some(rss) = crate::pool::proc::rss_bytes(std::process::id()) {
            self.seg.header().rss_bytes.store(rss, Ordering::Relaxed);
        }
    }

    /// Serves the next request of `lane`, if there is one. Returns true if it served one.
    fn serve_next(&mut self, lane: usize) -> anyhow::Result<bool> {
        let seg = self.seg.clone();
        let h = seg.header();
        let started = Instant::now();
        let Lane { req, resp, wake } = &mut self.lanes[lane];
        let Some(frame) = req.peek().context("request ring")? else {
            return Ok(false);
        };
        frame.claim();
        h.in_flight.store(1, Ordering::Relaxed);
        let bytes = frame.bytes();
        let req = match moltbot_ipc::access_request(bytes) {
            Ok(r) => r,
            Err(e) => {
                // The gateway is trusted; a frame it wrote that does not decode means the two
                // sides disagree on the layout. Without a request id nothing can be answered.
                bail!("undecodable request frame: {e}");
            }
        };
        let id = req.request_id.to_native();
        let deadline = req.deadline_us.to_native();
        let kind = req.kind.to_native();
        let (status, code, body): (u16, &str, Vec<u8>);
        if deadline != 0 && monotonic_us() > deadline {
            (status, code, body) = (
                504,
                "TIMEOUT",
                br#"{"message":"the deadline passed before the worker took the request"}"#.to_vec(),
            );
        } else if kind == Kind::Echo {
            // Straight from the request frame into the response frame: no copy in between.
            let echo = Response {
                request_id: id,
                duration_us: 0,
                status: 200,
                body: &req.body,
                error_code: "",
            };
            write_response(resp, wake, &echo, h)?;
            frame.release();
            self.finish(lane);
            return Ok(true);
        } else {
            // Faults that break the ring protocol write their own frames, if any.
            #[cfg(feature = "fault-injection")]
            if crate::worker::handlers::faults::frame(req, resp) {
                frame.release();
                self.finish(lane);
                return Ok(true);
            }
            let reply: HandlerReply = self.handlers.handle(req);
            (status, code, body) = (reply.status, reply.error_code, reply.body);
        }
        let duration_us = started.elapsed().as_micros() as u64;
        let body: &[u8] = if body.len() > self.max_reply {
            br#"{"message":"the reply does not fit in a ring frame"}"#
        } else {
            &body
        };
        let reply = Response {
            request_id: id,
            duration_us,
            status,
            body,
            error_code: code,
        };
        write_response(resp, wake, &reply, h)?;
        frame.release();
        self.finish(lane);
        Ok(true)
    }

    fn finish(&self, _lane: usize) {
        let h = self.seg.header();
        h.in_flight.store(0, Ordering::Relaxed);
        h.requests_served.fetch_add(1, Ordering::Relaxed);
        self.heartbeat();
    }
}

/// How long a worker waits at start for its wake sockets.
const WAKE_SOCKETS_WITHIN: Duration = Duration::from_secs(10);

/// Receives the lanes' wake sockets, which the gateway sends over this process's standard
/// input right after spawning it, then points standard input at `/dev/null` (the channel has
/// served its purpose; nothing else reads it).
fn receive_wake_sockets(lanes: usize) -> anyhow::Result<Vec<WakeSender>> {
    let wakes = moltbot_ipc::wake::receive_wake_senders(
        std::io::stdin().as_fd(),
        lanes,
        WAKE_SOCKETS_WITHIN,
    )
    .context("receiving the wake sockets from the gateway on standard input")?;
    let null = std::fs::File::open("/dev/null").context("/dev/null")?;
    rustix::stdio::dup2_stdin(&null).context("standard input")?;
    Ok(wakes)
}

/// Publishes a response, waiting while the ring is full (the gateway is behind; the heartbeat
/// keeps going because the worker is not stuck), and wakes the gateway core if it sleeps.
pub(crate) fn write_response(
    ring: &mut Producer,
    wake: &WakeSender,
    resp: &Response<'_>,
    h: &moltbot_ipc::SegmentHeader,
) -> anyhow::Result<()> {
    let bound = resp.encoded_len_bound();
    loop {
        match ring.push_with(bound, |slot| resp.encode_into(slot)) {
            Ok(Ok(())) => break,
            Ok(Err(e)) => bail!("encode response: {e}"),
            Err(RingError::Full) => {
                if wake_needed(ring.parked_flag()) {
                    wake.notify();
                }
                h.heartbeat.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) => bail!("response ring: {e}"),
        }
    }
    if wake_needed(ring.parked_flag()) {
        wake.notify();
    }
    Ok(())
}
