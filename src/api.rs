//! The Rust library API, mirroring the TypeScript `createGatewayRouter`: `new`, `start`,
//! `route`, `worker_for_user`, `status`, `stop`.
//!
//! `route` goes through the same rings as HTTP requests, on a lane of its own that a pump
//! thread drives, so a library caller gets the same admission, timeouts, crash handling and
//! stickiness as a client of the gateway.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_listener::Listener;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::RouteError;
use crate::pool::call::{Call, next_request_id};
/// Request kinds and methods, for [`GatewayRouter::route_parts`].
pub use crate::pool::call::{Kind, Method};
use crate::pool::dispatch::{Dispatch, Step};
use crate::pool::lane::LaneSet;
use crate::pool::reply::Reply;
use crate::pool::{Pool, PoolError, PoolStatus};

/// A request, as the TypeScript router's `router.route({type, userId, payload})`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRequest {
    /// `agent:message`, `agent:command`, `session`, `health:check`, `echo`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The user.
    pub user_id: String,
    /// Handler-specific payload.
    #[serde(default)]
    pub payload: serde_json::Value,
}

/// The answer, as the TypeScript router's `WorkerResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteResponse {
    /// Unique per gateway run.
    pub request_id: String,
    /// The worker that handled it (or would have).
    pub worker_id: Option<String>,
    /// True if the handler succeeded.
    pub success: bool,
    /// The handler's payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// A message if it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A machine-readable code if it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Handler time in microseconds.
    pub duration_us: u64,
}

/// Turns a worker's answer into a `RouteResponse`.
pub fn response_from_reply(request_id: String, reply: &Reply) -> RouteResponse {
    let worker_id = Some(crate::sandbox::worker_id(reply.slot));
    let parsed: Option<serde_json::Value> = serde_json::from_slice(reply.body()).ok();
    if reply.is_success() {
        let payload = parsed.unwrap_or_else(|| {
            serde_json::Value::String(String::from_utf8_lossy(reply.body()).into_owned())
        });
        RouteResponse {
            request_id,
            worker_id,
            success: true,
            payload: Some(payload),
            error: None,
            error_code: None,
            duration_us: reply.duration_us,
        }
    } else {
        let message = parsed
            .as_ref()
            .and_then(|v| v.get("message"))
            .and_then(|m| m.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| format!("handler failed with status {}", reply.status));
        RouteResponse {
            request_id,
            worker_id,
            success: false,
            payload: None,
            error: Some(message),
            error_code: Some(if reply.error_code.is_empty() {
                "HANDLER_ERROR".into()
            } else {
                reply.error_code.clone()
            }),
            duration_us: reply.duration_us,
        }
    }
}

/// Turns a gateway-side failure into a `RouteResponse`.
pub fn response_from_error(
    request_id: String,
    worker_id: Option<String>,
    e: &RouteError,
) -> RouteResponse {
    RouteResponse {
        request_id,
        worker_id,
        success: false,
        payload: None,
        error: Some(e.to_string()),
        error_code: Some(e.code().to_string()),
        duration_us: 0,
    }
}

struct InProcess {
    set: Mutex<LaneSet>,
    endpoint_wake: moltbot_ipc::WakeReceiver,
    waker: Arc<moltbot_ipc::WakeSender>,
    stop: AtomicBool,
}

struct Running {
    pool: Arc<Pool>,
    inproc: Arc<InProcess>,
    pump: Option<std::thread::JoinHandle<()>>,
}

/// The gateway router: the pool plus an in-process lane.
pub struct GatewayRouter {
    config: Arc<Config>,
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for GatewayRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayRouter").finish_non_exhaustive()
    }
}

/// How long `start` waits for the workers to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

impl GatewayRouter {
    /// A router for `config` (validated here; nothing starts yet).
    pub fn new(config: Config) -> Result<GatewayRouter, PoolError> {
        config.validate()?;
        Ok(GatewayRouter {
            config: Arc::new(config),
            running: Mutex::new(None),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Starts the pool and waits until every worker is ready.
    pub fn start(&self) -> Result<(), PoolError> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.is_some() {
            return Ok(());
        }
        let (pool, mut endpoints) = Pool::start(self.config.clone(), 1, None)?;
        let own = endpoints.remove(0);
        let inproc = Arc::new(InProcess {
            set: Mutex::new(own.set),
            endpoint_wake: own.wake,
            waker: own.waker,
            stop: AtomicBool::new(false),
        });
        let pump_state = inproc.clone();
        let pump_slots = pool.slots().to_vec();
        let pump_lane = own.lane;
        let pump = std::thread::Builder::new()
            .name("moltbot-inproc-lane".into())
            .spawn(move || pump(pump_state, pump_slots, pump_lane))
            .map_err(|e| PoolError::Io("lane thread", e))?;
        let r = Running {
            pool: pool.clone(),
            inproc,
            pump: Some(pump),
        };
        if let Err(e) = pool.wait_ready(START_TIMEOUT) {
            stop_running(r, Duration::ZERO);
            return Err(e);
        }
        *running = Some(r);
        Ok(())
    }

    /// The running pool, if started.
    pub fn pool(&self) -> Option<Arc<Pool>> {
        self.running
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|r| r.pool.clone()))
    }

    /// Routes one request to its user's worker and waits for the answer (at most the request
    /// timeout). Never panics; every failure is a `RouteResponse` with `success: false`.
    pub fn route(&self, req: RouteRequest) -> RouteResponse {
        let request_id = next_request_id();
        // Checked in this order: user, type, payload.
        let parsed = crate::user::validate_user_id(&req.user_id)
            .map_err(|e| RouteError::InvalidUser(e.to_string()))
            .and_then(|_| {
                Kind::parse(&req.kind).ok_or_else(|| {
                    RouteError::InvalidRequest(format!("unknown request type {:?}", req.kind))
                })
            })
            .and_then(|kind| {
                serde_json::to_vec(&req.payload)
                    .map(|body| (kind, body))
                    .map_err(|e| RouteError::InvalidRequest(e.to_string()))
            });
        match parsed {
            Ok((kind, body)) => {
                self.route_with_id(request_id, &Call::of_kind(kind, &req.user_id, &body))
            }
            Err(e) => response_from_error(request_id, None, &e),
        }
    }

    /// Routes a request given in its parts (kind, method, target, raw body), as the HTTP
    /// gateway has them; `route` is this with the method of the kind, no target and the JSON
    /// payload as the body. The target is kind-specific: a session name, or the action of a
    /// fault-injection request. Never panics; failures are `success: false` responses.
    pub fn route_parts(
        &self,
        kind: Kind,
        method: Method,
        user: &str,
        target: &str,
        body: &[u8],
    ) -> RouteResponse {
        let call = Call {
            kind,
            method,
            user,
            target,
            call_id: "",
            stream: false,
            body,
            held: None,
        };
        self.route_with_id(next_request_id(), &call)
    }

    fn route_with_id(&self, request_id: String, call: &Call<'_>) -> RouteResponse {
        let (pool, inproc) = match self.running.lock() {
            Ok(r) => match r.as_ref() {
                Some(r) => (r.pool.clone(), r.inproc.clone()),
                None => return response_from_error(request_id, None, &RouteError::ShuttingDown),
            },
            Err(_) => return response_from_error(request_id, None, &RouteError::ShuttingDown),
        };
        match dispatch_blocking(&pool, &inproc, call) {
            Ok(reply) => response_from_reply(request_id, &reply),
            Err((slot, e)) => {
                response_from_error(request_id, slot.map(crate::sandbox::worker_id), &e)
            }
        }
    }

    /// The worker a user is (or would be) routed to, without routing anything: the assigned
    /// slot for a known user, else where it would go now.
    pub fn worker_for_user(&self, user: &str) -> Option<String> {
        let pool = self.pool()?;
        let user = crate::user::validate_user_id(user).ok()?;
        Some(crate::sandbox::worker_id(pool.router().peek(user)))
    }

    /// The pool status (all zero when not started).
    pub fn status(&self) -> Option<PoolStatus> {
        self.pool().map(|p| p.status())
    }

    /// Stops the workers (SIGTERM, SIGKILL after the drain timeout) and removes the segments.
    /// Pending in-process requests are answered with `UNAVAILABLE`.
    pub fn stop(&self) {
        self.stop_with_grace(self.config.drain_timeout);
    }

    /// Like [`GatewayRouter::stop`], with workers killed after `grace` instead of the drain
    /// timeout.
    pub fn stop_with_grace(&self, grace: Duration) {
        let r = self.running.lock().ok().and_then(|mut r| r.take());
        if let Some(r) = r {
            stop_running(r, grace);
        }
    }
}

fn stop_running(mut r: Running, grace: Duration) {
    r.pool.stop(grace);
    r.inproc.stop.store(true, Ordering::Release);
    r.inproc.waker.notify();
    if let Some(h) = r.pump.take() {
        let _ = h.join();
    }
    let mut set = r.inproc.set.lock().unwrap_or_else(|p| p.into_inner());
    // A final poll: a worker that finished its request while draining may have exited just
    // before the pump stopped, leaving its answer in the ring; deliver it rather than fail a
    // request that was answered. Every worker is reaped by now, so nothing new arrives and the
    // loop ends once the rings are empty and the stop epoch is recovered.
    while set.poll() {}
    set.fail_all(RouteError::ShuttingDown);
}

/// Drives a [`Dispatch`] on the calling thread: blocks for a first assignment, in the admission
/// queue and while the ring is full, then for the reply. Errors carry the slot when it was known.
fn dispatch_blocking(
    pool: &Pool,
    inproc: &InProcess,
    call: &Call<'_>,
) -> Result<Reply, (Option<usize>, RouteError)> {
    let mut d = Dispatch::new(pool, call, Instant::now()).map_err(|e| (None, e))?;
    loop {
        let step = {
            let mut set = inproc.set.lock().unwrap_or_else(|p| p.into_inner());
            d.step(call, &mut set, Instant::now())
        };
        match step.map_err(|e| (d.slot(), e))? {
            Step::Assign => {
                let slot = pool
                    .router()
                    .route(call.user)
                    .map_err(|e| (None, RouteError::from(e)))?;
                d.assigned(pool, slot).map_err(|e| (Some(slot), e))?;
            }
            Step::Queue(listener) => {
                let _ = listener.wait_deadline(d.deadline());
            }
            Step::Pause(pause) => {
                // Full may mean a recovery is due: make sure the lane's owner sees it.
                inproc.waker.notify();
                let left = d.deadline().saturating_duration_since(Instant::now());
                std::thread::sleep(pause.min(left));
            }
            Step::Sent { slot, replies } => {
                return replies
                    .outcome_by(d.deadline(), pool.config().request_timeout)
                    .map_err(|e| (Some(slot), e));
            }
        }
    }
}

impl Drop for GatewayRouter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The in-process lane's owner thread: delivers answers, runs recoveries, sleeps when idle on
/// the monitor's control socket and on every worker's own wake socket for this lane.
fn pump(lane: Arc<InProcess>, slots: Vec<Arc<crate::pool::slot::Slot>>, lane_no: usize) {
    let mut wakes: Vec<Option<moltbot_ipc::WakeReceiver>> = slots.iter().map(|_| None).collect();
    // The slot epoch at which each wake socket was taken (see `LaneClient::wake_received`).
    let mut epochs = vec![0u64; slots.len()];
    while !lane.stop.load(Ordering::Acquire) {
        for (i, s) in slots.iter().enumerate() {
            if let Some(rx) = s.take_wake(lane_no) {
                wakes[i] = Some(rx);
                epochs[i] = s.epoch.load(Ordering::Acquire);
            }
        }
        let worked = lane.set.lock().map(|mut s| s.poll()).unwrap_or(false);
        if worked {
            continue;
        }
        let park = lane
            .set
            .lock()
            .map(|mut s| s.prepare_park())
            .unwrap_or(false);
        if park {
            let received = wait_any(&lane.endpoint_wake, &mut wakes, Duration::from_secs(1));
            if let Ok(mut s) = lane.set.lock() {
                for (i, n) in received {
                    if !s.get_mut(i).is_none_or(|l| l.wake_received(n, epochs[i])) {
                        // Gone, or flooding and being killed: stop listening to it.
                        wakes[i] = None;
                    }
                }
                s.cancel_park();
            }
        }
    }
}

/// Sleeps until the control socket or a worker's wake socket is readable (or `timeout`);
/// drains them, and forgets the wake sockets whose worker is gone. Returns the bytes read
/// from each worker's socket (slot, bytes).
fn wait_any(
    control: &moltbot_ipc::WakeReceiver,
    wakes: &mut [Option<moltbot_ipc::WakeReceiver>],
    timeout: Duration,
) -> Vec<(usize, usize)> {
    use rustix::event::{PollFd, PollFlags, poll};
    let ready: Vec<bool> = {
        let mut fds = vec![PollFd::new(control, PollFlags::IN)];
        let mut which = Vec::new();
        for (i, w) in wakes.iter().enumerate() {
            if let Some(w) = w {
                fds.push(PollFd::new(w, PollFlags::IN));
                which.push(i);
            }
        }
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        if poll(&mut fds, Some(&ts)).is_err() {
            return Vec::new();
        }
        let mut ready = vec![false; wakes.len()];
        for (k, &i) in which.iter().enumerate() {
            ready[i] = !fds[k + 1].revents().is_empty();
        }
        ready
    };
    control.drain();
    let mut received = Vec::new();
    for (i, r) in ready.into_iter().enumerate() {
        if !r {
            continue;
        }
        match wakes[i].as_ref().map(|w| w.drain_checked()) {
            Some(Some(n)) if n > 0 => received.push((i, n)),
            Some(None) => wakes[i] = None,
            _ => {}
        }
    }
    received
}
