//! The HTTP surface: which path does what, and how answers and errors look.
//!
//! A request is handled in two steps so that pipelined requests overlap: [`prepare`] admits
//! and submits a routed request (waiting only if its worker is at its concurrency limit) and
//! returns at once; [`Prepared::finish`] then waits for the worker's answer. The connection
//! prepares every request already in its buffer before finishing the first.
//!
//! With the `fault-injection` feature (tests only), `/v1/route` with type `test` takes the
//! worker's fault action from `payload.action` (see `fault_action`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::{Authenticator, Principal, Refusal};
use crate::error::RouteError;
use crate::gateway::answer::{Answer, Body, JSON};
use crate::gateway::http::{self, Method, RequestHead};
use crate::gateway::reactor::Reactor;
use crate::gateway::shared::Shared;
use crate::metrics::Endpoint;
use crate::pool::call::{Call, Kind, Method as CallMethod, next_request_id};
use crate::pool::reply::{Delivery, Replies, Reply};

/// How a worker's answer is turned into the HTTP answer.
enum Shape {
    /// `/v1/route`: the TypeScript router's `WorkerResponse` JSON.
    Route { request_id: String },
    /// The worker's payload as the body, with this content type.
    Raw { content_type: &'static str },
}

/// A request in progress.
pub enum Prepared {
    /// Answered without a worker (or refused before reaching one).
    Done(Answer),
    /// Submitted to a worker; `finish` waits for it.
    Waiting(Waiting),
    /// Submitted to a worker that streams its events first (`Accept: text/event-stream`):
    /// the connection writes them as Server-Sent Events, then the final answer.
    Streaming(Waiting),
}

/// A routed request waiting for its worker.
pub struct Waiting {
    /// Answered by the pump: the worker's answer, a crash, or `TIMEOUT` at the deadline.
    replies: Replies,
    slot: usize,
    shape: Shape,
    endpoint: Endpoint,
}

impl Prepared {
    /// Waits for the answer.
    pub async fn finish(self) -> Answer {
        match self {
            Prepared::Done(a) => a,
            Prepared::Waiting(w) | Prepared::Streaming(w) => {
                let outcome = w.replies.outcome().await;
                shape_answer(w.endpoint, Some(w.slot), w.shape, outcome)
            }
        }
    }
}

impl Waiting {
    /// The next event of the worker's answer, or its end.
    pub async fn next(&mut self) -> Delivery {
        self.replies.next().await
    }

    /// The answer to write for the final outcome.
    pub fn answer(self, outcome: Result<Reply, RouteError>) -> Answer {
        shape_answer(self.endpoint, Some(self.slot), self.shape, outcome)
    }

    /// The slot serving the request.
    pub fn slot(&self) -> usize {
        self.slot
    }
}

fn shape_answer(
    endpoint: Endpoint,
    slot: Option<usize>,
    shape: Shape,
    result: Result<Reply, RouteError>,
) -> Answer {
    let answer = match (shape, result) {
        // Refused before a worker was known (the user, the routing table): the plain error.
        (_, Err(e)) if slot.is_none() => Answer::route_error(endpoint, &e),
        (Shape::Route { request_id }, result) => route_answer(endpoint, slot, request_id, result),
        (Shape::Raw { content_type }, Ok(reply)) => {
            if reply.is_success() {
                Answer {
                    status: reply.status,
                    content_type,
                    headers: Vec::new(),
                    worker: None,
                    body: Body::Reply(reply),
                    endpoint,
                }
            } else {
                let message = handler_message(&reply);
                // A worker out of storage may succeed later; other handler errors will not.
                let retryable = reply.status == 507;
                Answer::error(
                    endpoint,
                    reply.status,
                    handler_code(&reply),
                    &message,
                    retryable,
                    None,
                )
            }
        }
        (Shape::Raw { .. }, Err(e)) => Answer::route_error(endpoint, &e),
    };
    answer.with_worker(slot)
}

fn handler_code(reply: &Reply) -> &str {
    if reply.error_code.is_empty() {
        "HANDLER_ERROR"
    } else {
        &reply.error_code
    }
}

/// The `message` of a handler's error body `{"message": ...}`.
fn handler_message(reply: &Reply) -> String {
    #[derive(Deserialize)]
    struct Msg {
        message: String,
    }
    serde_json::from_slice::<Msg>(reply.body())
        .map(|m| m.message)
        .unwrap_or_else(|_| format!("handler failed with status {}", reply.status))
}

/// `/v1/route`: `{requestId, workerId, success, payload, error?, errorCode?, durationUs}`.
/// The worker's payload is embedded as it is when it is valid JSON (checked: the worker is not
/// trusted to produce it), as a JSON string otherwise.
fn route_answer(
    endpoint: Endpoint,
    slot: Option<usize>,
    request_id: String,
    result: Result<Reply, RouteError>,
) -> Answer {
    use std::fmt::Write;
    let worker_id = slot.map(crate::sandbox::worker_id);
    let mut out = String::with_capacity(128);
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let qo = |s: Option<&str>| s.map_or_else(|| "null".to_string(), q);
    let status;
    match result {
        Ok(reply) if reply.is_success() => {
            status = 200;
            let _ = write!(
                out,
                "{{\"requestId\":{},\"workerId\":{},\"success\":true,\"payload\":",
                q(&request_id),
                qo(worker_id.as_deref())
            );
            match serde_json::from_slice::<&RawValue>(reply.body()) {
                Ok(raw) => out.push_str(raw.get()),
                Err(_) => out.push_str(&q(&String::from_utf8_lossy(reply.body()))),
            }
            let _ = write!(out, ",\"durationUs\":{}}}", reply.duration_us);
        }
        Ok(reply) => {
            status = reply.status;
            let _ = write!(
                out,
                "{{\"requestId\":{},\"workerId\":{},\"success\":false,\"error\":{},\"errorCode\":{},\"durationUs\":{}}}",
                q(&request_id),
                qo(worker_id.as_deref()),
                q(&handler_message(&reply)),
                q(handler_code(&reply)),
                reply.duration_us
            );
        }
        Err(e) => {
            status = e.status();
            let _ = write!(
                out,
                "{{\"requestId\":{},\"workerId\":{},\"success\":false,\"error\":{},\"errorCode\":{},\"retryable\":{},\"durationUs\":0}}",
                q(&request_id),
                qo(worker_id.as_deref()),
                q(&e.to_string()),
                q(e.code()),
                e.retryable()
            );
            let mut a = Answer::json(endpoint, status, out.into_bytes());
            if let Some(d) = e.retry_after() {
                a.headers
                    .push(("retry-after", d.as_secs().max(1).to_string()));
            }
            return a;
        }
    }
    Answer::json(endpoint, status, out.into_bytes())
}

fn bad_request(endpoint: Endpoint, code: &str, message: &str) -> Prepared {
    Prepared::Done(Answer::error(endpoint, 400, code, message, false, None))
}

/// The user a request acts as. A user's credential acts as that user only: a request that
/// also names a user must name exactly that one (compared byte for byte: another case or
/// another Unicode normalisation is another user), else it is refused before it reaches any
/// worker. The operator token, or no credential on a gateway that has none, acts for the user
/// the request names (`what`: where, for the message).
fn acting_user<'a>(
    principal: &'a Principal,
    named: Option<&'a [u8]>,
    what: &str,
) -> Result<&'a str, ActingError> {
    match principal {
        Principal::User(user) => match named {
            Some(n) if n != user.as_bytes() => Err(ActingError::Forbidden),
            _ => Ok(user),
        },
        Principal::Operator | Principal::Anonymous => {
            let raw = named.ok_or_else(|| ActingError::Invalid(format!("missing {what}")))?;
            crate::user::validate_user_id_bytes(raw)
                .map_err(|e| ActingError::Invalid(format!("invalid {what}: {e}")))
        }
    }
}

/// Why a request has no user to act as.
enum ActingError {
    /// It names a user its credential may not act for: 403.
    Forbidden,
    /// It names none, or not a valid one: 400.
    Invalid(String),
}

/// Where header-addressed endpoints take their user from (optional with a user's own
/// credential).
const USER_HEADER: &str = "x-moltbot-user header";

fn acting_refusal(reactor: &Reactor, endpoint: Endpoint, e: ActingError) -> Prepared {
    match e {
        ActingError::Forbidden => refuse(reactor, endpoint, Refusal::Forbidden),
        ActingError::Invalid(msg) => bad_request(endpoint, "INVALID_USER", &msg),
    }
}

/// The answer to a request without a valid credential (401, with `WWW-Authenticate`) or with
/// one that may not do this (403); counted by reason.
fn refuse(reactor: &Reactor, endpoint: Endpoint, r: Refusal) -> Prepared {
    reactor.metrics.auth_refused(r);
    tracing::debug!(reason = r.reason(), "request refused");
    let mut a = Answer::error(endpoint, r.status(), r.code(), r.message(), false, None);
    if r.status() == 401 {
        a.headers.push(("www-authenticate", "Bearer".into()));
    }
    Prepared::Done(a)
}

fn method_not_allowed(endpoint: Endpoint, allow: &'static str) -> Prepared {
    let mut a = Answer::error(
        endpoint,
        405,
        "METHOD_NOT_ALLOWED",
        &format!("allowed: {allow}"),
        false,
        None,
    );
    a.headers.push(("allow", allow.to_string()));
    Prepared::Done(a)
}

/// Handles one request up to the point where it waits for a worker.
pub async fn prepare(
    reactor: &Reactor,
    head: &RequestHead,
    body: &[u8],
    held: &Arc<AtomicUsize>,
) -> Prepared {
    let shared = &reactor.shared;
    let path = head.path();
    let endpoint = classify(path);
    // The probes answer anyone: a balancer or an orchestrator has no credential.
    let principal = if matches!(endpoint, Endpoint::Livez | Endpoint::Readyz) {
        Principal::Anonymous
    } else {
        let bearer = Authenticator::bearer(head.authorization.as_deref());
        match shared.auth.authenticate(bearer) {
            Ok(p) => p,
            Err(r) => return refuse(reactor, endpoint, r),
        }
    };
    let m = head.method;
    let get_only = |answer: fn(&Shared) -> Answer| match m {
        Method::Get => Prepared::Done(answer(shared)),
        _ => method_not_allowed(endpoint, "GET"),
    };
    // The gateway's own state: for the operator (or anyone, when no credential exists).
    let operator_only = |answer: fn(&Shared) -> Answer| match principal {
        Principal::User(_) => refuse(reactor, endpoint, Refusal::Forbidden),
        _ => get_only(answer),
    };
    match endpoint {
        Endpoint::Livez => {
            get_only(|_| Answer::json(Endpoint::Livez, 200, br#"{"status":"ok"}"#.to_vec()))
        }
        Endpoint::Readyz => get_only(readiness),
        Endpoint::Healthz => get_only(health),
        Endpoint::Status => operator_only(status),
        Endpoint::Metrics => operator_only(metrics),
        Endpoint::Users => match m {
            Method::Get => user_worker(reactor, &principal, path).await,
            _ => method_not_allowed(endpoint, "GET"),
        },
        Endpoint::Route => match m {
            Method::Post => route(reactor, &principal, body, held).await,
            _ => method_not_allowed(endpoint, "POST"),
        },
        Endpoint::Agent | Endpoint::Echo => {
            if m != Method::Post {
                return method_not_allowed(endpoint, "POST");
            }
            let user = match acting_user(&principal, head.user.as_deref(), USER_HEADER) {
                Ok(u) => u,
                Err(e) => return acting_refusal(reactor, endpoint, e),
            };
            let (kind, content_type) = if endpoint == Endpoint::Agent {
                (Kind::AgentMessage, JSON)
            } else {
                (Kind::Echo, echo_content_type(head))
            };
            // The agent's events, as Server-Sent Events, for a client that asks for them.
            let stream = endpoint == Endpoint::Agent && head.accepts_event_stream;
            let call = Call {
                kind,
                method: CallMethod::Post,
                user,
                target: "",
                call_id: "",
                stream,
                body,
                held: Some(held),
            };
            match send(reactor, endpoint, &call, Shape::Raw { content_type }).await {
                Prepared::Waiting(w) if stream => Prepared::Streaming(w),
                p => p,
            }
        }
        Endpoint::Sessions => sessions(reactor, &principal, head, path, body, held).await,
        Endpoint::Other => Prepared::Done(Answer::error(
            endpoint,
            404,
            "NOT_FOUND",
            &format!("no such endpoint: {path}"),
            false,
            None,
        )),
    }
}

/// `/readyz`: 200 while every slot serves and no stop began; 503 otherwise.
fn readiness(s: &Shared) -> Answer {
    let status = s.pool.status();
    let ready = s.listening.load(Ordering::Acquire)
        && !s.stopping()
        && status.healthy_workers == status.total_workers;
    if ready {
        return Answer::json(Endpoint::Readyz, 200, br#"{"ready":true}"#.to_vec());
    }
    let why = if s.stopping() {
        "draining".to_string()
    } else if !s.listening.load(Ordering::Acquire) {
        "starting".to_string()
    } else {
        format!(
            "{} of {} workers ready",
            status.healthy_workers, status.total_workers
        )
    };
    Answer::error(
        Endpoint::Readyz,
        503,
        "NOT_READY",
        &why,
        true,
        Some(Duration::from_secs(1)),
    )
}

/// `/healthz`: ok when every worker is healthy, degraded when some are, 503 when none.
fn health(s: &Shared) -> Answer {
    let status = s.pool.status();
    let (code, state) = if status.healthy_workers == status.total_workers {
        (200, "ok")
    } else if status.healthy_workers > 0 {
        (200, "degraded")
    } else {
        (503, "unhealthy")
    };
    let body = serde_json::json!({
        "status": state,
        "healthyWorkers": status.healthy_workers,
        "totalWorkers": status.total_workers,
        "draining": s.stopping(),
    });
    Answer::json(
        Endpoint::Healthz,
        code,
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

/// `/status`: the pool status plus the gateway's own facts.
fn status(s: &Shared) -> Answer {
    let mut v = serde_json::to_value(s.pool.status()).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.insert(
            "gateway".into(),
            serde_json::json!({
                "cores": s.metrics.len(),
                "connections": s.connections.load(Ordering::Relaxed),
                "websocket": {
                    "connections": s.hub.connections(),
                    "users": s.hub.users_connected(),
                },
                "draining": s.stopping(),
                "uptimeMs": s.started.elapsed().as_millis() as u64,
                "landlock": s.landlock,
                "version": env!("CARGO_PKG_VERSION"),
            }),
        );
        obj.insert(
            "auth".into(),
            serde_json::to_value(s.auth.status()).unwrap_or_default(),
        );
    }
    Answer::json(
        Endpoint::Status,
        200,
        serde_json::to_vec(&v).unwrap_or_default(),
    )
}

/// `/metrics`: Prometheus text.
fn metrics(s: &Shared) -> Answer {
    let info = crate::metrics::GatewayInfo {
        version: env!("CARGO_PKG_VERSION"),
        uptime: s.started.elapsed(),
        cores: s.metrics.len(),
        draining: s.stopping(),
    };
    let text = crate::metrics::encode(&s.metrics, &s.pool.status(), &info);
    let mut a = Answer::json(Endpoint::Metrics, 200, text.into_bytes());
    a.content_type = crate::metrics::CONTENT_TYPE;
    a
}

/// The echo answer's content type: the request's when it is a common one.
fn echo_content_type(head: &RequestHead) -> &'static str {
    match head.content_type.as_deref() {
        Some(ct) if ct.starts_with("application/json") => JSON,
        Some(ct) if ct.starts_with("text/plain") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Maps a path to its endpoint.
pub fn classify(path: &str) -> Endpoint {
    match path {
        "/v1/route" => Endpoint::Route,
        "/v1/agent" => Endpoint::Agent,
        "/v1/echo" => Endpoint::Echo,
        "/status" => Endpoint::Status,
        "/livez" => Endpoint::Livez,
        "/readyz" => Endpoint::Readyz,
        "/healthz" => Endpoint::Healthz,
        "/metrics" => Endpoint::Metrics,
        "/v1/sessions" => Endpoint::Sessions,
        p if p.starts_with("/v1/sessions/") => Endpoint::Sessions,
        p if users_segment(p).is_some() => Endpoint::Users,
        _ => Endpoint::Other,
    }
}

/// The `{userId}` segment of `/v1/users/{userId}/worker` (possibly empty). Prefix and suffix
/// must not overlap: `/v1/users/worker` is no lookup (slicing it by lengths panicked).
fn users_segment(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/users/")?.strip_suffix("/worker")
}

async fn user_worker(reactor: &Reactor, principal: &Principal, path: &str) -> Prepared {
    let endpoint = Endpoint::Users;
    let Some(seg) = users_segment(path) else {
        return Prepared::Done(Answer::error(
            endpoint,
            404,
            "NOT_FOUND",
            &format!("no such endpoint: {path}"),
            false,
            None,
        ));
    };
    let user = match http::percent_decode_segment(seg) {
        Ok(u) => u,
        // Whatever it is, it is not the one user this credential may look up.
        Err(_) if matches!(principal, Principal::User(_)) => {
            return refuse(reactor, endpoint, Refusal::Forbidden);
        }
        Err(e) => return bad_request(endpoint, "INVALID_USER", &e.to_string()),
    };
    // A user may look up only itself.
    if let Err(e) = acting_user(principal, Some(user.as_bytes()), "userId") {
        return acting_refusal(reactor, endpoint, e);
    }
    let router = reactor.shared.pool.router();
    let assigned = router.lookup(&user);
    let slot = match assigned {
        Some(s) => s,
        // `peek` takes the router's lock, which a first assignment holds across its fsync:
        // off the reactor thread.
        None => {
            let (r, u) = (router.clone(), user.clone());
            glommio::executor().spawn_blocking(move || r.peek(&u)).await
        }
    };
    let body = serde_json::json!({
        "userId": user,
        "workerId": crate::sandbox::worker_id(slot),
        "assigned": assigned.is_some(),
    });
    Prepared::Done(Answer::json(
        endpoint,
        200,
        serde_json::to_vec(&body).unwrap_or_default(),
    ))
}

#[derive(Deserialize)]
struct RouteBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(rename = "userId", default)]
    user_id: Option<String>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

async fn route(
    reactor: &Reactor,
    principal: &Principal,
    body: &[u8],
    held: &Arc<AtomicUsize>,
) -> Prepared {
    let endpoint = Endpoint::Route;
    let req: RouteBody<'_> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return bad_request(
                endpoint,
                "INVALID_REQUEST",
                &format!("body must be {{\"type\",\"userId\",\"payload\"}}: {e}"),
            );
        }
    };
    let Some(kind) = Kind::parse(req.kind) else {
        return bad_request(
            endpoint,
            "INVALID_REQUEST",
            &format!("unknown type {:?}", req.kind),
        );
    };
    if req.user_id.is_none() && !matches!(principal, Principal::User(_)) {
        // The body's shape is wrong, as for a missing `type`: only a user's own credential
        // makes `userId` optional.
        return bad_request(
            endpoint,
            "INVALID_REQUEST",
            "body must be {\"type\",\"userId\",\"payload\"}: missing field `userId`",
        );
    }
    let named = req.user_id.as_deref().map(str::as_bytes);
    let user = match acting_user(principal, named, "userId") {
        Ok(u) => u,
        Err(e) => return acting_refusal(reactor, endpoint, e),
    };
    let payload = req.payload.map(|p| p.get()).unwrap_or("null");
    let target = match fault_action(kind, payload) {
        Ok(p) => p,
        Err(msg) => return bad_request(endpoint, "INVALID_REQUEST", &msg),
    };
    let call = Call {
        target: &target,
        call_id: "",
        stream: false,
        held: Some(held),
        ..Call::of_kind(kind, user, payload.as_bytes())
    };
    let shape = Shape::Route {
        request_id: next_request_id(),
    };
    send(reactor, endpoint, &call, shape).await
}

/// The worker's fault handlers dispatch on the request's target, which `/v1/route` otherwise
/// leaves empty: `{"type":"test","payload":{"action":A,...}}` sends `A` as the target, so the
/// integration tests can reach them over HTTP.
#[cfg(feature = "fault-injection")]
fn fault_action(kind: Kind, payload: &str) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Action {
        action: String,
    }
    if kind != Kind::Test {
        return Ok(String::new());
    }
    serde_json::from_str::<Action>(payload)
        .map(|a| a.action)
        .map_err(|e| format!("a test request needs {{\"payload\":{{\"action\": ...}}}}: {e}"))
}

/// Without fault injection there is no target to take from `/v1/route`.
#[cfg(not(feature = "fault-injection"))]
fn fault_action(_kind: Kind, _payload: &str) -> Result<String, String> {
    Ok(String::new())
}

async fn sessions(
    reactor: &Reactor,
    principal: &Principal,
    head: &RequestHead,
    path: &str,
    body: &[u8],
    held: &Arc<AtomicUsize>,
) -> Prepared {
    let endpoint = Endpoint::Sessions;
    let name = match path.strip_prefix("/v1/sessions/") {
        None => String::new(),
        Some(seg) => match http::percent_decode_segment(seg) {
            Ok(n) => n,
            Err(e) => return bad_request(endpoint, "INVALID_NAME", &e.to_string()),
        },
    };
    let method = match (head.method, name.is_empty()) {
        (Method::Get, _) => CallMethod::Get,
        (Method::Put, false) => CallMethod::Put,
        (Method::Delete, false) => CallMethod::Delete,
        (_, true) => return method_not_allowed(endpoint, "GET"),
        _ => return method_not_allowed(endpoint, "GET, PUT, DELETE"),
    };
    if !name.is_empty()
        && let Err(e) = crate::user::validate_name(&name)
    {
        return bad_request(
            endpoint,
            "INVALID_NAME",
            &format!("invalid session name: {e}"),
        );
    }
    let user = match acting_user(principal, head.user.as_deref(), USER_HEADER) {
        Ok(u) => u,
        Err(e) => return acting_refusal(reactor, endpoint, e),
    };
    let call = Call {
        kind: Kind::Session,
        method,
        user,
        target: &name,
        call_id: "",
        stream: false,
        body,
        held: Some(held),
    };
    send(reactor, endpoint, &call, Shape::Raw { content_type: JSON }).await
}

/// Sends `call` to its user's worker; returns once it is in the ring (or refused).
async fn send(reactor: &Reactor, endpoint: Endpoint, call: &Call<'_>, shape: Shape) -> Prepared {
    match reactor.dispatch(call).await {
        Ok((slot, replies)) => Prepared::Waiting(Waiting {
            replies,
            slot,
            shape,
            endpoint,
        }),
        Err((slot, e)) => Prepared::Done(shape_answer(endpoint, slot, shape, Err(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_paths() {
        assert_eq!(classify("/v1/route"), Endpoint::Route);
        assert_eq!(classify("/v1/sessions"), Endpoint::Sessions);
        assert_eq!(classify("/v1/sessions/notes"), Endpoint::Sessions);
        assert_eq!(classify("/v1/users/a/worker"), Endpoint::Users);
        assert_eq!(classify("/v1/users/a"), Endpoint::Other);
        assert_eq!(classify("/v1/users//worker"), Endpoint::Users);
        assert_eq!(classify("/v1/users/worker"), Endpoint::Other);
        assert_eq!(users_segment("/v1/users/worker"), None);
        assert_eq!(users_segment("/v1/users//worker"), Some(""));
        assert_eq!(users_segment("/v1/users/a/worker"), Some("a"));
        assert_eq!(classify("/"), Endpoint::Other);
    }

    #[test]
    fn acting_user_follows_the_credential() {
        let alice = Principal::User("alice".into());
        let ok = |p: &Principal, named: Option<&str>| {
            acting_user(p, named.map(str::as_bytes), "userId")
                .ok()
                .map(str::to_string)
        };
        assert_eq!(ok(&alice, None).as_deref(), Some("alice"));
        assert_eq!(ok(&alice, Some("alice")).as_deref(), Some("alice"));
        // Another user, another case, another normalisation: never alice's to act for.
        for other in ["bob", "Alice", "alice ", "a\u{300}lice", ""] {
            assert!(matches!(
                acting_user(&alice, Some(other.as_bytes()), "userId"),
                Err(ActingError::Forbidden)
            ));
        }
        for p in [Principal::Operator, Principal::Anonymous] {
            assert_eq!(ok(&p, Some("bob")).as_deref(), Some("bob"));
            assert!(matches!(
                acting_user(&p, None, "userId"),
                Err(ActingError::Invalid(_))
            ));
            assert!(matches!(
                acting_user(&p, Some(b"bad\x01id"), "userId"),
                Err(ActingError::Invalid(_))
            ));
        }
    }
}
