//! Built-in handlers, run inside the worker process.
//!
//! [`Handlers::handle`] takes a request as it lies in the ring frame and dispatches it by kind:
//! `echo` and `health:check` are answered here, `agent:message` and `agent:command` by the
//! stand-in agent (`agent`), `rpc` (OpenClaw gateway-protocol methods) by the same agent over
//! the same session logs (`rpc`), `session` by the session store (`sessions`), and `test` by
//! fault injection (`faults`), which exists only in builds with the `fault-injection` feature
//! (the test builds).
//!
//! A request sent with `stream` may get interim parts before its final reply, through the
//! [`Emit`] it is handled with: the `accepted` answer of a two-stage RPC, and events (`agent`,
//! `chat`). Handlers build them only when [`Emit::streams`] says someone takes them.
//!
//! Every handler answers with a [`HandlerReply`]: an HTTP-style status, an error code (`""` on
//! success) and a JSON body (`{"message": ...}` on errors; `echo` returns its input). Bad input
//! and I/O failures become 4xx/5xx replies: a handler never panics and never ends the worker,
//! except the fault actions whose whole point is to.
//!
//! Storage failures: a full disk or an exhausted quota (`ENOSPC`, `EDQUOT`) is transient and
//! answers `507 INSUFFICIENT_STORAGE`, so the client retries later; any other I/O failure is
//! `500 STORAGE_ERROR`. Error messages name what failed ("store the session") and the OS
//! error, never a path of the server: the sandbox layout is none of the client's business.
//!
//! Files (session logs, state values) live inside the worker's sandbox, named after users with
//! [`crate::user::safe_file_stem`]. They are opened per request rather than cached: workers run
//! with a small open-file limit and may serve many users.

mod agent;
#[cfg(feature = "fault-injection")]
pub(crate) mod faults;
mod rpc;
mod sessions;

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use moltbot_ipc::{ArchivedRequest, Kind};
use rustix::io::Errno;
use serde::Serialize;
use serde_json::json;

use crate::user::validate_user_id;
use crate::worker::lane::Emit;

pub use agent::HISTORY_LIMIT;

/// A handler's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerReply {
    /// HTTP-style status: 2xx success, 4xx the request's fault, 5xx the handler's.
    pub status: u16,
    /// Machine-readable error code, `""` on success.
    pub error_code: &'static str,
    /// The payload: JSON for every handler but `echo`.
    pub body: Vec<u8>,
}

impl HandlerReply {
    /// A success with `body` as is.
    pub fn ok(body: Vec<u8>) -> Self {
        HandlerReply {
            status: 200,
            error_code: "",
            body,
        }
    }

    /// A success with `value` serialized as JSON.
    pub fn json(value: &impl Serialize) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self::ok(body),
            Err(e) => Self::error(500, "INTERNAL", format!("cannot encode the reply: {e}")),
        }
    }

    /// An error with body `{"message": message}`.
    pub fn error(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        let message: String = message.into();
        let body = serde_json::to_vec(&json!({ "message": message }))
            .unwrap_or_else(|_| b"{\"message\":\"error\"}".to_vec());
        HandlerReply {
            status,
            error_code: code,
            body,
        }
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A failed request, turned into a reply by [`Handlers::handle`].
#[derive(Debug)]
struct Fail {
    status: u16,
    code: &'static str,
    message: String,
}

impl Fail {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Fail {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(400, code, message)
    }

    /// The worker's storage failed while trying to `what` (a phrase without paths: "store the
    /// session"). An `io::Error` from the OS displays as its errno's text, never the path, so
    /// the message names no server path either.
    fn storage(what: &str, e: io::Error) -> Self {
        let cause = crate::error::io_cause(&e);
        if is_storage_full(&e) {
            Self::new(
                507,
                "INSUFFICIENT_STORAGE",
                format!("cannot {what}: the worker's storage is full ({cause}); retry later"),
            )
        } else {
            Self::new(500, "STORAGE_ERROR", format!("cannot {what}: {cause}"))
        }
    }
}

/// Whether `e` says the file system is out of space or the quota is exhausted: conditions that
/// pass once space is freed, unlike a broken or misconfigured store. By kind too, because
/// wrappers (tempfile adds the path) keep the kind but not the errno.
fn is_storage_full(e: &io::Error) -> bool {
    Errno::from_io_error(e).is_some_and(|n| n == Errno::NOSPC || n == Errno::DQUOT)
        || matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
}

type Outcome = Result<HandlerReply, Fail>;

/// The worker's built-in handlers and their per-process state.
#[derive(Debug)]
pub struct Handlers {
    worker_id: String,
    pid: u32,
    sandbox: PathBuf,
    started: Instant,
    /// The stand-in agent's turn counts.
    turns: agent::TurnCache,
    /// The largest reply body that can travel back (a ring frame's payload).
    max_reply_bytes: usize,
}

impl Handlers {
    /// Handlers for worker `worker_id` (pid `pid`) whose sandbox root is `sandbox`.
    pub fn new(worker_id: impl Into<String>, pid: u32, sandbox: impl Into<PathBuf>) -> Self {
        Handlers {
            worker_id: worker_id.into(),
            pid,
            sandbox: sandbox.into(),
            started: Instant::now(),
            turns: agent::TurnCache::default(),
            max_reply_bytes: usize::MAX,
        }
    }

    /// Sets the largest reply body the response ring can carry (default: unbounded). Larger
    /// replies become `500 REPLY_TOO_LARGE`; `agent:message` refuses a message whose reply would
    /// not fit before recording the turn, and `history` returns fewer turns to fit.
    pub fn set_max_reply_bytes(&mut self, n: usize) {
        self.max_reply_bytes = n;
    }

    /// Runs one request, read in place from its ring frame; its interim parts (if it streams)
    /// go to `emit` before the final reply is returned. Never panics; errors come back as
    /// replies.
    pub(crate) fn handle(
        &mut self,
        req: &ArchivedRequest<'_>,
        emit: &mut dyn Emit,
    ) -> HandlerReply {
        let kind = req.kind.to_native();
        let outcome = match kind {
            Kind::Rpc => self.rpc(req, emit),
            Kind::Echo => Ok(HandlerReply::ok(req.body.to_vec())),
            Kind::HealthCheck => Ok(self.health()),
            Kind::AgentMessage => self.agent_message(req, emit),
            Kind::AgentCommand => self.agent_command(req),
            Kind::Session => sessions::handle(&self.sandbox, req),
            #[cfg(feature = "fault-injection")]
            Kind::Test => faults::handle(req, self.pid),
        };
        let reply = outcome.unwrap_or_else(|f| HandlerReply::error(f.status, f.code, f.message));
        if reply.body.len() > self.max_reply_bytes {
            // An RPC error answer carries a code of the protocol's own.
            let code = if kind == Kind::Rpc {
                "UNAVAILABLE"
            } else {
                "REPLY_TOO_LARGE"
            };
            return HandlerReply::error(
                500,
                code,
                format!(
                    "the reply ({} bytes) exceeds the {} bytes a response can carry",
                    reply.body.len(),
                    self.max_reply_bytes
                ),
            );
        }
        reply
    }

    fn health(&self) -> HandlerReply {
        let uptime_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        HandlerReply::json(&json!({
            "status": "ok",
            "workerId": self.worker_id,
            "pid": self.pid,
            "uptimeMs": uptime_ms,
        }))
    }
}

fn checked_user(user: &str) -> Result<&str, Fail> {
    validate_user_id(user).map_err(|e| Fail::bad("INVALID_USER", e.to_string()))
}

/// Creates `dir` and any missing parents, private to the worker (0700).
fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// What the handler tests share: a sandbox with its handlers, and requests built the way the
/// worker receives them.
#[cfg(test)]
mod testing {
    use std::fs;
    use std::path::PathBuf;

    use moltbot_ipc::{AlignedBuf, Kind, Method, Request, access_request};
    use serde_json::Value;

    use super::{HandlerReply, Handlers};
    use crate::user::safe_file_stem;
    use crate::worker::lane::Emit;

    pub(super) struct Fixture {
        _dir: Option<tempfile::TempDir>,
        pub(super) root: PathBuf,
        pub(super) h: Handlers,
    }

    /// Handlers of worker `worker-1` (pid 4321) over a fresh sandbox with its `sessions` and
    /// `state` directories.
    pub(super) fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Fixture::over(dir.path().join("worker-1"));
        f._dir = Some(dir);
        f
    }

    /// Runs one request through `h` as the worker does: encoded into an aligned frame, then
    /// read in place.
    pub(super) fn call(
        h: &mut Handlers,
        kind: Kind,
        method: Method,
        user_id: &str,
        path: &str,
        body: &[u8],
    ) -> HandlerReply {
        let req = Request {
            request_id: 1,
            deadline_us: 0,
            kind,
            method,
            user_id,
            stream: false,
            path,
            call_id: "",
            body,
        };
        handle(h, &req, &mut crate::worker::lane::NoEmit)
    }

    /// Runs `req` through `h` from an aligned frame, its interim parts going to `emit`.
    pub(super) fn handle(h: &mut Handlers, req: &Request<'_>, emit: &mut dyn Emit) -> HandlerReply {
        let mut frame = AlignedBuf::new();
        let n = req
            .encode_into(frame.zeroed_mut(req.encoded_len_bound()))
            .expect("encode the request");
        let archived = access_request(frame.zeroed_mut(n)).expect("read the request");
        h.handle(archived, emit)
    }

    /// An interim part a handler emitted, its payload parsed (a part that is not JSON fails
    /// the test: the gateway would kill the worker for it).
    #[derive(Debug, Clone, PartialEq)]
    pub(super) enum Recorded {
        Accepted(Value),
        Event(String, Value),
    }

    /// An [`Emit`] that keeps what it is given, as a streaming caller (or, with `stream`
    /// false, one that takes no parts: they must not even be offered).
    pub(super) struct Recorder {
        pub(super) stream: bool,
        pub(super) parts: Vec<Recorded>,
    }

    impl Recorder {
        pub(super) fn new(stream: bool) -> Self {
            Recorder {
                stream,
                parts: Vec::new(),
            }
        }

        /// The payloads of the events named `name`, in order.
        pub(super) fn events(&self, name: &str) -> Vec<&Value> {
            self.parts
                .iter()
                .filter_map(|p| match p {
                    Recorded::Event(n, v) if n == name => Some(v),
                    _ => None,
                })
                .collect()
        }
    }

    fn json_part(payload: &[u8]) -> Value {
        serde_json::from_slice(payload).unwrap_or_else(|e| {
            panic!(
                "a part that is not JSON ({e}): {:?}",
                String::from_utf8_lossy(payload)
            )
        })
    }

    impl Emit for Recorder {
        fn streams(&self) -> bool {
            self.stream
        }
        fn accepted(&mut self, payload: &[u8]) {
            assert!(
                self.stream,
                "accepted offered to a caller that does not stream"
            );
            self.parts.push(Recorded::Accepted(json_part(payload)));
        }
        fn event(&mut self, name: &str, payload: &[u8]) {
            assert!(
                self.stream,
                "event offered to a caller that does not stream"
            );
            assert!(
                !name.is_empty()
                    && name.len() <= 64
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_:.-".contains(&b)),
                "malformed event name {name:?}"
            );
            self.parts
                .push(Recorded::Event(name.to_owned(), json_part(payload)));
        }
    }

    /// The reply's JSON body.
    pub(super) fn body(r: &HandlerReply) -> Value {
        serde_json::from_slice(&r.body).unwrap_or_else(|e| {
            panic!(
                "reply is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&r.body)
            )
        })
    }

    /// `r` is an error with this status and code and a non-empty message.
    pub(super) fn assert_error(r: &HandlerReply, status: u16, code: &str) {
        assert_eq!(
            (r.status, r.error_code),
            (status, code),
            "{:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(body(r)["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(!r.is_success());
    }

    impl Fixture {
        /// As [`fixture`], over the sandbox `root` (left in place afterwards).
        pub(super) fn over(root: PathBuf) -> Fixture {
            for d in ["sessions", "state"] {
                fs::create_dir_all(root.join(d)).unwrap();
            }
            let h = Handlers::new("worker-1", 4321, &root);
            Fixture {
                _dir: None,
                root,
                h,
            }
        }
        pub(super) fn call(
            &mut self,
            kind: Kind,
            method: Method,
            user: &str,
            path: &str,
            payload: &[u8],
        ) -> HandlerReply {
            call(&mut self.h, kind, method, user, path, payload)
        }
        /// An RPC `method` of `user` with `params` (`Value::Null`: none), as a streaming
        /// request when `stream`; the reply and what was emitted before it.
        pub(super) fn rpc(
            &mut self,
            user: &str,
            method: &str,
            params: Value,
            stream: bool,
        ) -> (HandlerReply, Recorder) {
            let body = serde_json::to_vec(&params).unwrap();
            let req = Request {
                request_id: 9,
                deadline_us: 0,
                kind: Kind::Rpc,
                method: Method::Post,
                user_id: user,
                stream,
                path: method,
                call_id: "req-1",
                body: &body,
            };
            let mut rec = Recorder::new(stream);
            let reply = handle(&mut self.h, &req, &mut rec);
            (reply, rec)
        }
        pub(super) fn message(&mut self, user: &str, payload: &[u8]) -> HandlerReply {
            self.call(Kind::AgentMessage, Method::Post, user, "", payload)
        }
        pub(super) fn command(&mut self, user: &str, payload: &str) -> HandlerReply {
            self.call(
                Kind::AgentCommand,
                Method::Post,
                user,
                "",
                payload.as_bytes(),
            )
        }
        pub(super) fn session(
            &mut self,
            method: Method,
            user: &str,
            path: &str,
            payload: &[u8],
        ) -> HandlerReply {
            self.call(Kind::Session, method, user, path, payload)
        }
        pub(super) fn route(&mut self, user: &str, payload: Value) -> HandlerReply {
            let b = serde_json::to_vec(&payload).unwrap();
            self.session(Method::Post, user, "", &b)
        }
        pub(super) fn session_log(&self, user: &str) -> PathBuf {
            self.root
                .join("sessions")
                .join(format!("{}.jsonl", safe_file_stem(user)))
        }
        /// `r`'s message does not reveal where the sandbox is.
        pub(super) fn assert_no_server_path(&self, r: &HandlerReply) {
            let message = body(r)["message"].as_str().unwrap_or_default().to_owned();
            let root = self.root.to_string_lossy();
            for leak in [&*root, "/dev/", "sessions/", "state/", ".json", ".tmp"] {
                assert!(!message.contains(leak), "{message:?} names a path ({leak})");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use moltbot_ipc::{Kind, Method};
    use serde_json::json;

    use super::testing::{assert_error, body, fixture};
    use super::*;

    #[test]
    fn echo_returns_the_body_unchanged() {
        let mut f = fixture();
        let payload = [0u8, 255, b'{', 1, 2, 3];
        let r = f.call(Kind::Echo, Method::Post, "user-a", "", &payload);
        assert_eq!(
            r,
            HandlerReply {
                status: 200,
                error_code: "",
                body: payload.to_vec()
            }
        );
        let r = f.call(Kind::Echo, Method::Post, "user-a", "", b"");
        assert_eq!((r.status, r.body.len()), (200, 0));
    }

    #[test]
    fn health_reports_identity() {
        let mut f = fixture();
        let r = f.call(Kind::HealthCheck, Method::Get, "", "", b"");
        assert_eq!(r.status, 200);
        let v = body(&r);
        assert_eq!(v["status"], "ok");
        assert_eq!(v["workerId"], "worker-1");
        assert_eq!(v["pid"], 4321);
        assert!(v["uptimeMs"].is_u64());
    }

    #[test]
    fn replies_beyond_the_budget_become_reply_too_large() {
        let mut f = fixture();
        f.h.set_max_reply_bytes(4096);
        let big = vec![b'a'; 5000];
        let r = f.call(Kind::Echo, Method::Post, "user-a", "", &big);
        assert_error(&r, 500, "REPLY_TOO_LARGE");
        let r = f.call(Kind::Echo, Method::Post, "user-a", "", &big[..4096]);
        assert_eq!((r.status, r.body.len()), (200, 4096));
    }

    #[test]
    fn a_full_disk_or_quota_is_507_other_io_failures_500() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let f = Fail::storage("store the session", io::Error::from_raw_os_error(errno));
            assert_eq!((f.status, f.code), (507, "INSUFFICIENT_STORAGE"), "{errno}");
            assert!(f.message.starts_with("cannot store the session: "), "{f:?}");
        }
        for errno in [
            libc::EIO,
            libc::EACCES,
            libc::EROFS,
            libc::EISDIR,
            libc::EFBIG,
        ] {
            let f = Fail::storage("store the session", io::Error::from_raw_os_error(errno));
            assert_eq!((f.status, f.code), (500, "STORAGE_ERROR"), "{errno}");
        }
        // Not from the OS: never taken for a full disk.
        let f = Fail::storage("store the session", io::Error::other("no space"));
        assert_eq!(f.status, 500);
        // A wrapper that adds the server's path (tempfile does) keeps the kind: still 507, and
        // the path stays out of the message.
        let wrapped = io::Error::new(
            io::ErrorKind::StorageFull,
            "No space left on device (os error 28) at path \"/srv/worker-1/state/.x.tmp\"",
        );
        let f = Fail::storage("store the session", wrapped);
        assert_eq!((f.status, f.code), (507, "INSUFFICIENT_STORAGE"));
        assert!(!f.message.contains("/srv"), "{}", f.message);
        let f = Fail::storage("read the session", io::Error::other("at path \"/srv/x\""));
        assert!(!f.message.contains("/srv"), "{}", f.message);
        let r = HandlerReply::error(507, "INSUFFICIENT_STORAGE", "m");
        assert!(!r.is_success());
        assert_eq!(body(&r), json!({"message": "m"}));
    }

    /// Only in a build without the feature (`cargo test` always has it, through the
    /// dev-dependency): the fault kind does not exist, so no request can reach fault code.
    #[cfg(not(feature = "fault-injection"))]
    #[test]
    fn without_fault_injection_there_is_no_test_kind() {
        assert_eq!(Kind::parse("test"), None);
    }
}
