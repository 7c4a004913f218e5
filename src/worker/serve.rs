//! The built-in serving loop: one thread serves every lane, one request at a time,
//! round-robin across lanes so that no gateway core starves. The heartbeat is bumped by this
//! same loop, so a handler that hangs stops the heartbeat and the monitor replaces the process.
//! When idle the loop spins briefly, then parks on the futex in its segment with a timeout of
//! half the heartbeat interval, which keeps the heartbeat going while using no CPU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use moltbot_ipc::clock::monotonic_us;
use moltbot_ipc::segment::worker_state;
use moltbot_ipc::wake::{announce_park, cancel_park, futex_park};
use moltbot_ipc::{Kind, Part, Response, Segment};

use crate::worker::handlers::{HandlerReply, Handlers};
use crate::worker::lane::{Lane, RingEmit, write_response};

/// Spins this many empty rounds before parking, when the worker has a CPU to itself: a
/// request arriving within that window is taken without a futex round trip. With a single CPU
/// for the gateway and its workers, spinning only delays the gateway, so the worker parks at
/// once.
const SPIN_ROUNDS: u32 = 200;

/// The RSS in the segment header is refreshed at most this often (it costs an open and a read
/// of `/proc/self/statm`).
const RSS_EVERY: Duration = Duration::from_millis(500);

/// Serves `lanes` with `handlers` until SIGTERM (`term`; the current request is finished) or
/// `max_requests` served (a recycle). `max_reply` bounds a reply body; an idle loop parks for
/// `park_for` at most.
pub(crate) fn run(
    seg: Segment,
    lanes: Vec<Lane>,
    handlers: Handlers,
    max_reply: usize,
    max_requests: u64,
    term: &AtomicBool,
    park_for: Duration,
) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let spin_rounds = if cpus > 1 { SPIN_ROUNDS } else { 0 };
    let mut w = Worker {
        seg,
        lanes,
        handlers,
        max_reply,
        spin_rounds,
        rss_at: Instant::now(),
        max_requests,
    };
    w.serve(term, park_for)
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
