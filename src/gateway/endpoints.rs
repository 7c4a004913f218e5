//! The HTTP surface: which path does what, and how answers and errors look.
//!
//! A request is handled in two steps so that pipelined requests overlap: [`prepare`] admits
//! and submits a routed request (waiting only if its worker is at its concurrency limit) and
//! returns at once; [`Prepared::finish`] then waits for the worker's answer. The connection
//! prepares every request already in its buffer before finishing the first.
//!
//! TEST-ONLY: with `test_handlers` on, `/v1/route` with type `test` takes the worker's test
//! action from `payload.action` (see `test_action`); off, the worker refuses it with 403.

use std::rc::Rc;
use std::time::Duration;

use moltbot_ipc::clock::monotonic_us;
use moltbot_ipc::{Header, Kind, Method as IpcMethod};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::RouteError;
use crate::gateway::core::Core;
use crate::gateway::http::{self, Method, RequestHead};
use crate::metrics::Endpoint;
use crate::pool::lane::{Outgoing, Reply, SubmitError};

/// A response body.
pub enum Body {
    /// Owned bytes.
    Bytes(Vec<u8>),
    /// The body of a worker's answer, in its validated frame copy.
    Reply(Reply),
}

impl Body {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Body::Bytes(b) => b,
            Body::Reply(r) => r.body(),
        }
    }
}

/// A complete answer to one request.
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Content type (empty: none).
    pub content_type: &'static str,
    /// Extra headers (rare ones: retry-after, allow, www-authenticate).
    pub headers: Vec<(&'static str, String)>,
    /// The slot that answered, sent as `x-moltbot-worker: worker-N`.
    pub worker: Option<usize>,
    /// The body.
    pub body: Body,
    /// Which endpoint (metrics).
    pub endpoint: Endpoint,
}

const JSON: &str = "application/json";

impl Answer {
    /// A JSON answer.
    pub fn json(endpoint: Endpoint, status: u16, body: Vec<u8>) -> Answer {
        Answer {
            status,
            content_type: JSON,
            headers: Vec::new(),
            worker: None,
            body: Body::Bytes(body),
            endpoint,
        }
    }

    /// The gateway's error shape `{"error":{"code","message","retryable","retryAfterMs"}}`.
    pub fn error(
        endpoint: Endpoint,
        status: u16,
        code: &str,
        message: &str,
        retryable: bool,
        retry_after: Option<Duration>,
    ) -> Answer {
        let ms = retry_after.map(|d| d.as_millis() as u64);
        let mut a = Answer::json(
            endpoint,
            status,
            http::error_body(code, message, retryable, ms),
        );
        if let Some(d) = retry_after {
            a.headers
                .push(("retry-after", d.as_secs().max(1).to_string()));
        }
        a
    }

    /// An answer for a gateway-side failure of a routed request.
    pub fn route_error(endpoint: Endpoint, e: &RouteError) -> Answer {
        Answer::error(
            endpoint,
            e.status(),
            e.code(),
            &e.to_string(),
            e.retryable(),
            e.retry_after(),
        )
    }

    fn with_worker(mut self, slot: usize) -> Answer {
        self.worker = Some(slot);
        self
    }
}

/// How a worker's answer is turned into the HTTP answer.
enum Shape {
    /// `/v1/route`: the seed's `WorkerResponse` JSON.
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
}

/// A routed request waiting for its worker.
pub struct Waiting {
    /// Answered by the pump: the worker's answer, a crash, or `TIMEOUT` at the deadline.
    rx: oneshot::Receiver<crate::pool::lane::Outcome>,
    slot: usize,
    shape: Shape,
    endpoint: Endpoint,
}

impl Prepared {
    /// Waits for the answer.
    pub async fn finish(self) -> Answer {
        match self {
            Prepared::Done(a) => a,
            Prepared::Waiting(w) => {
                let result = match w.rx.await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(RouteError::ShuttingDown),
                };
                shape_answer(w.endpoint, w.slot, w.shape, result)
            }
        }
    }
}

fn shape_answer(
    endpoint: Endpoint,
    slot: usize,
    shape: Shape,
    result: Result<Reply, RouteError>,
) -> Answer {
    let answer = match (shape, result) {
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
                Answer::error(
                    endpoint,
                    reply.status,
                    handler_code(&reply),
                    &message,
                    false,
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
    slot: usize,
    request_id: String,
    result: Result<Reply, RouteError>,
) -> Answer {
    use std::fmt::Write;
    let worker_id = crate::sandbox::worker_id(slot);
    let mut out = String::with_capacity(128);
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let status;
    match result {
        Ok(reply) if reply.is_success() => {
            status = 200;
            let _ = write!(
                out,
                "{{\"requestId\":{},\"workerId\":{},\"success\":true,\"payload\":",
                q(&request_id),
                q(&worker_id)
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
                q(&worker_id),
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
                q(&worker_id),
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

/// The user of a header-addressed endpoint (`x-moltbot-user`), validated.
fn header_user(head: &RequestHead) -> Result<&str, String> {
    let raw = head
        .user
        .as_deref()
        .ok_or_else(|| "missing x-moltbot-user header".to_string())?;
    crate::user::validate_user_id_bytes(raw).map_err(|e| format!("invalid x-moltbot-user: {e}"))
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

/// Constant-time comparison of the bearer token.
fn token_matches(expected: &str, header: Option<&str>) -> bool {
    let Some(given) = header.and_then(|h| {
        let (scheme, rest) = h.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then_some(rest.trim())
    }) else {
        return false;
    };
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= (a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

/// Handles one request up to the point where it waits for a worker.
pub async fn prepare(core: &Rc<Core>, head: &RequestHead, body: &[u8]) -> Prepared {
    let path = head.path();
    let endpoint = classify(path);
    if let Some(token) = &core.shared.config.token {
        if !matches!(endpoint, Endpoint::Livez | Endpoint::Readyz)
            && !token_matches(token, head.authorization.as_deref())
        {
            let mut a = Answer::error(
                endpoint,
                401,
                "UNAUTHORIZED",
                "missing or invalid bearer token",
                false,
                None,
            );
            a.headers.push(("www-authenticate", "Bearer".into()));
            return Prepared::Done(a);
        }
    }
    let m = head.method;
    match endpoint {
        Endpoint::Livez => match m {
            Method::Get => {
                Prepared::Done(Answer::json(endpoint, 200, br#"{"status":"ok"}"#.to_vec()))
            }
            _ => method_not_allowed(endpoint, "GET"),
        },
        Endpoint::Readyz => match m {
            Method::Get => Prepared::Done(core.readiness()),
            _ => method_not_allowed(endpoint, "GET"),
        },
        Endpoint::Healthz => match m {
            Method::Get => Prepared::Done(core.health()),
            _ => method_not_allowed(endpoint, "GET"),
        },
        Endpoint::Status => match m {
            Method::Get => Prepared::Done(core.status_answer()),
            _ => method_not_allowed(endpoint, "GET"),
        },
        Endpoint::Metrics => match m {
            Method::Get => Prepared::Done(core.metrics_answer()),
            _ => method_not_allowed(endpoint, "GET"),
        },
        Endpoint::Users => match m {
            Method::Get => Prepared::Done(user_worker(core, path).await),
            _ => method_not_allowed(endpoint, "GET"),
        },
        Endpoint::Route => match m {
            Method::Post => route(core, body).await,
            _ => method_not_allowed(endpoint, "POST"),
        },
        Endpoint::Agent | Endpoint::Echo => {
            if m != Method::Post {
                return method_not_allowed(endpoint, "POST");
            }
            let user = match header_user(head) {
                Ok(u) => u,
                Err(msg) => return bad_request(endpoint, "INVALID_USER", &msg),
            };
            let (kind, content_type) = if endpoint == Endpoint::Agent {
                (Kind::AgentMessage, JSON)
            } else {
                (Kind::Echo, echo_content_type(head))
            };
            call(
                core,
                endpoint,
                user,
                kind,
                IpcMethod::Post,
                "",
                body,
                Shape::Raw { content_type },
            )
            .await
        }
        Endpoint::Sessions => sessions(core, head, path, body).await,
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

async fn user_worker(core: &Rc<Core>, path: &str) -> Answer {
    let endpoint = Endpoint::Users;
    let Some(seg) = users_segment(path) else {
        return Answer::error(
            endpoint,
            404,
            "NOT_FOUND",
            &format!("no such endpoint: {path}"),
            false,
            None,
        );
    };
    let user = match http::percent_decode_segment(seg) {
        Ok(u) => u,
        Err(e) => return Answer::error(endpoint, 400, "INVALID_USER", &e.to_string(), false, None),
    };
    if let Err(e) = crate::user::validate_user_id(&user) {
        return Answer::error(
            endpoint,
            400,
            "INVALID_USER",
            &format!("invalid userId: {e}"),
            false,
            None,
        );
    }
    let router = core.shared.pool.router();
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
    Answer::json(endpoint, 200, serde_json::to_vec(&body).unwrap_or_default())
}

#[derive(Deserialize)]
struct RouteBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(rename = "userId")]
    user_id: String,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

async fn route(core: &Rc<Core>, body: &[u8]) -> Prepared {
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
    if let Err(e) = crate::user::validate_user_id(&req.user_id) {
        return bad_request(endpoint, "INVALID_USER", &format!("invalid userId: {e}"));
    }
    let payload = req.payload.map(|p| p.get()).unwrap_or("null");
    let path = match test_action(core, kind, payload) {
        Ok(p) => p,
        Err(msg) => return bad_request(endpoint, "INVALID_REQUEST", &msg),
    };
    call(
        core,
        endpoint,
        &req.user_id,
        kind,
        crate::api::route_method(kind),
        &path,
        payload.as_bytes(),
        Shape::Route {
            request_id: crate::api::next_request_id(),
        },
    )
    .await
}

/// TEST-ONLY: the worker's test handlers dispatch on the request path, which `/v1/route`
/// otherwise leaves empty. With `test_handlers` on, `{"type":"test","payload":{"action":A,...}}`
/// sends `A` as the path so the integration tests can reach them over HTTP. With it off the
/// path stays empty and the worker answers `403 TEST_HANDLERS_DISABLED`, as for any test request.
fn test_action(core: &Rc<Core>, kind: Kind, payload: &str) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Action {
        action: String,
    }
    if kind != Kind::Test || !core.shared.config.test_handlers {
        return Ok(String::new());
    }
    serde_json::from_str::<Action>(payload)
        .map(|a| a.action)
        .map_err(|e| format!("a test request needs {{\"payload\":{{\"action\": ...}}}}: {e}"))
}

async fn sessions(core: &Rc<Core>, head: &RequestHead, path: &str, body: &[u8]) -> Prepared {
    let endpoint = Endpoint::Sessions;
    let name = match path.strip_prefix("/v1/sessions/") {
        None => String::new(),
        Some(seg) => match http::percent_decode_segment(seg) {
            Ok(n) => n,
            Err(e) => return bad_request(endpoint, "INVALID_NAME", &e.to_string()),
        },
    };
    let method = match (head.method, name.is_empty()) {
        (Method::Get, _) => IpcMethod::Get,
        (Method::Put, false) => IpcMethod::Put,
        (Method::Delete, false) => IpcMethod::Delete,
        (_, true) => return method_not_allowed(endpoint, "GET"),
        _ => return method_not_allowed(endpoint, "GET, PUT, DELETE"),
    };
    if !name.is_empty() {
        if let Err(e) = crate::user::validate_name(&name) {
            return bad_request(
                endpoint,
                "INVALID_NAME",
                &format!("invalid session name: {e}"),
            );
        }
    }
    let user = match header_user(head) {
        Ok(u) => u,
        Err(msg) => return bad_request(endpoint, "INVALID_USER", &msg),
    };
    call(
        core,
        endpoint,
        user,
        Kind::Session,
        method,
        &name,
        body,
        Shape::Raw { content_type: JSON },
    )
    .await
}

/// Routes to the user's worker: admission, then the ring. Returns once the request is in the
/// ring (or refused).
#[allow(clippy::too_many_arguments)]
async fn call(
    core: &Rc<Core>,
    endpoint: Endpoint,
    user: &str,
    kind: Kind,
    method: IpcMethod,
    path: &str,
    body: &[u8],
    shape: Shape,
) -> Prepared {
    let shared = &core.shared;
    let router = shared.pool.router();
    // A known user is a lock-free lookup; a first assignment appends to the routing table and
    // fsyncs it, which must not stall the reactor (and every connection on this core): it runs
    // on glommio's blocking thread, batched with the other first sights of this core, and this
    // request waits for it.
    let routed = match router.lookup(user) {
        Some(s) => Ok(s),
        None => core.first_sight.route(router, user.to_string()).await,
    };
    let slot_id = match routed {
        Ok(s) => s,
        Err(e) => return Prepared::Done(Answer::route_error(endpoint, &e)),
    };
    let fail = |e: RouteError| {
        Prepared::Done(shape_answer(
            endpoint,
            slot_id,
            shape_for_error(&shape),
            Err(e),
        ))
    };
    if shared.stopping() {
        return fail(RouteError::ShuttingDown);
    }
    let Some(slot) = shared.pool.slots().get(slot_id).cloned() else {
        return fail(RouteError::Internal("no such slot".into()));
    };
    let timeout = shared.config.request_timeout;
    let mut timer = glommio::timer::Timer::new(timeout);
    let mut permit = match crate::pool::admission::acquire(&slot, &mut timer, timeout).await {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let headers: [Header<'_>; 0] = [];
    let out = Outgoing {
        kind,
        method,
        user_id: user,
        path,
        headers: &headers,
        body,
        deadline_us: monotonic_us() + timeout.as_micros() as u64,
    };
    let (mut tx, rx) = oneshot::channel();
    loop {
        let result = match core.lanes.borrow_mut().get_mut(slot_id) {
            Some(lane) => lane.submit(&out, tx, permit),
            None => return fail(RouteError::Internal("no such lane".into())),
        };
        match result {
            Ok(()) => {
                // The pump wakes the worker once for everything submitted this round.
                core.flush.notify();
                break;
            }
            Err(SubmitError::TooLarge(len, max)) => return fail(RouteError::TooLarge { len, max }),
            Err(SubmitError::Full(t, p)) => {
                (tx, permit) = (t, p);
                // The worker is behind (or being replaced): give it a moment, within the
                // request's own deadline.
                let slept = futures_lite::future::or(
                    async {
                        glommio::timer::sleep(Duration::from_micros(100)).await;
                        true
                    },
                    async {
                        let _ = (&mut timer).await;
                        false
                    },
                )
                .await;
                if !slept {
                    return fail(RouteError::Timeout(timeout));
                }
            }
        }
    }
    Prepared::Waiting(Waiting {
        rx,
        slot: slot_id,
        shape,
        endpoint,
    })
}

fn shape_for_error(shape: &Shape) -> Shape {
    match shape {
        Shape::Route { request_id } => Shape::Route {
            request_id: request_id.clone(),
        },
        Shape::Raw { content_type } => Shape::Raw { content_type },
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
    fn bearer_token_comparison() {
        assert!(token_matches("s3cret", Some("Bearer s3cret")));
        assert!(token_matches("s3cret", Some("bearer s3cret")));
        assert!(!token_matches("s3cret", Some("Bearer s3cre")));
        assert!(!token_matches("s3cret", Some("Bearer s3cretx")));
        assert!(!token_matches("s3cret", Some("Basic s3cret")));
        assert!(!token_matches("s3cret", Some("s3cret")));
        assert!(!token_matches("s3cret", None));
    }
}
