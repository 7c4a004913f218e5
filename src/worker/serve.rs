//! The built-in serving loop: one thread serves every lane, one request at a time,
//! round-robin across lanes so that no gateway core starves. The heartbeat is bumped by this
//! same loop, so a handler that hangs stops the heartbeat and the monitor replaces the process.
//! When idle the loop spins for [`Idle::spin`] (the `worker_spin` setting; zero where the
//! workers share their CPUs), then parks on the futex in its segment with a timeout of half
//! the heartbeat interval, which keeps the heartbeat going while using no CPU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use moltbot_ipc::clock::monotonic_us;
use moltbot_ipc::segment::worker_state;
use moltbot_ipc::wake::{announce_park, cancel_park, futex_park};
use moltbot_ipc::{Kind, Part, Response, Segment};

use crate::worker::handlers::{HandlerReply, Handlers};
use crate::worker::lane::{Lane, RingEmit, write_response};

/// While spinning, the clock is read once per this many empty rounds: a round is a few
/// nanoseconds, a clock read several times that.
const SPIN_CLOCK_EVERY: u32 = 64;

/// The RSS in the segment header is refreshed at most this often (it costs an open and a read
/// of `/proc/self/statm`).
const RSS_EVERY: Duration = Duration::from_millis(500);

/// What an idle serving loop does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Idle {
    /// The longest park on the futex (the heartbeat goes on between parks).
    pub park_for: Duration,
    /// How long to spin over the lanes before parking; zero parks at once.
    pub spin: Duration,
}

/// Serves `lanes` with `handlers` until SIGTERM (`term`; the current request is finished) or
/// `max_requests` served (a recycle). `max_reply` bounds a reply body.
pub(crate) fn run(
    seg: Segment,
    lanes: Vec<Lane>,
    handlers: Handlers,
    max_reply: usize,
    max_requests: u64,
    term: &AtomicBool,
    idle: Idle,
) -> anyhow::Result<()> {
    let mut w = Worker {
        seg,
        lanes,
        handlers,
        max_reply,
        rss_at: Instant::now(),
        max_requests,
    };
    w.serve(term, idle)
}

struct Worker {
    seg: Segment,
    lanes: Vec<Lane>,
    handlers: Handlers,
    max_reply: usize,
    /// When the RSS was last published.
    rss_at: Instant,
    /// Requests after which this process leaves (recycle).
    max_requests: u64,
}

impl Worker {
    fn heartbeat(&self) {
        self.seg.header().heartbeat.fetch_add(1, Ordering::Relaxed);
    }

    fn serve(&mut self, term: &AtomicBool, pace: Idle) -> anyhow::Result<()> {
        let seg = self.seg.clone();
        let h = seg.header();
        h.worker_state
            .store(worker_state::SERVING, Ordering::Release);
        self.update_rss();
        let mut idle = 0u32;
        // When the current spin ends (set at its first empty round). A spin follows served
        // requests only: after a park that nothing ended but the timeout, the loop parks
        // again at once instead of spinning at every heartbeat.
        let mut spin_until: Option<Instant> = None;
        let mut may_spin = false;
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
                spin_until = None;
                may_spin = true;
                continue;
            }
            idle = idle.wrapping_add(1);
            if may_spin && !pace.spin.is_zero() {
                let until = *spin_until.get_or_insert_with(|| Instant::now() + pace.spin);
                if !idle.is_multiple_of(SPIN_CLOCK_EVERY) || Instant::now() < until {
                    std::hint::spin_loop();
                    continue;
                }
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
                futex_park(parked, pace.park_for);
            }
            cancel_park(parked);
            idle = 0;
            spin_until = None;
            may_spin = false;
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
        let Lane { req, resp, wake } = &mut self.lanes[lane];
        let Some(frame) = req.peek().context("request ring")? else {
            return Ok(false);
        };
        // Read the clock only for a request: an idle loop spinning over the lanes would
        // otherwise spend most of its time in clock_gettime.
        let started = Instant::now();
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
                part: Part::Final,
                body: &req.body,
                error_code: "",
                event: "",
            };
            write_response(resp, wake, &echo, h)?;
            frame.release();
            self.finish(lane);
            return Ok(true);
        } else {
            // Faults that break the ring protocol write their own frames, if any.
            #[cfg(feature = "fault-injection")]
            if crate::worker::handlers::faults::frame(req, resp) {
                // Wake the gateway core as for any frame, so that it reads this one now.
                if moltbot_ipc::wake::wake_needed(resp.parked_flag()) {
                    wake.notify();
                }
                frame.release();
                self.finish(lane);
                return Ok(true);
            }
            let mut emit = RingEmit {
                ring: resp,
                wake,
                header: h,
                request_id: id,
                stream: req.stream,
                max_body: self.max_reply,
                failed: None,
            };
            let reply: HandlerReply = self.handlers.handle(req, &mut emit);
            if let Some(e) = emit.failed {
                return Err(e);
            }
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
            part: Part::Final,
            body,
            error_code: code,
            event: "",
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
