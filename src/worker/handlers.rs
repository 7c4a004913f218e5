//! Built-in handlers, run inside the worker process.
//!
//! Every handler answers with a [`HandlerReply`]: an HTTP-style status, an error code (`""` on
//! success) and a JSON body (`{"message": ...}` on errors; `echo` returns its input). Bad input
//! and I/O failures become 4xx/5xx replies: a handler never panics and never ends the worker,
//! except the test-only `crash`/`exit`/`hang` actions whose whole point is to.
//!
//! Files (all inside the worker's sandbox, user ids encoded with
//! [`crate::user::safe_file_stem`]):
//! - `sessions/<stem>.jsonl`: one JSON line `{ts, userId, message, reply}` per `agent:message`
//!   turn. Each turn is one `write(2)` on an `O_APPEND` descriptor and no `fsync`: a completed
//!   write lives in the page cache and survives the worker being killed, which is the failure
//!   this pool handles; surviving a machine crash would cost an fsync (milliseconds) per turn.
//!   A line torn by a failed write is skipped when counting and terminated before the next turn.
//! - `state/<stem>/<name>.json`: named session values, replaced atomically (temp file + rename).
//!
//! Files are opened per request rather than cached: workers run with a small open-file limit
//! and may serve many users.
//!
//! Fault injection for the tests: kind `test`, which exists only with the `fault-injection`
//! feature (test builds). Its actions (the request path): `crash` aborts the process, `exit`
//! exits with status 3, `hang` sleeps forever (so the heartbeat stops), `alloc {"mib": N}`
//! allocates, touches and leaks N MiB, `escape {"paths": [...]}` reports which paths it can
//! read, list and create files in, `signal {"pids": [...]}` reports which processes it may
//! signal (a `kill(pid, 0)` probe: no signal is ever sent), and `slow {"ms": N}` sleeps N ms
//! before answering.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use moltbot_ipc::{Kind, Method};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::sandbox::{SESSIONS_DIR, STATE_DIR};
use crate::user::{safe_file_stem, validate_name, validate_user_id};

/// The most turns `agent:command` `history` returns.
pub const HISTORY_LIMIT: usize = 100;

/// Users whose turn count is cached; beyond, the cache is cleared (counts are re-read).
const TURN_CACHE_LIMIT: usize = 100_000;

/// Room kept in the reply budget for the JSON around size-bounded content (ids, counters).
const REPLY_ENVELOPE: usize = 2048;

/// Test `alloc`: the most MiB one request may allocate.
const MAX_ALLOC_MIB: u64 = 64 * 1024;

/// Test `slow`: the longest sleep.
const MAX_SLOW_MS: u64 = 600_000;

/// Test `escape`: the most paths one request may probe.
const MAX_ESCAPE_PATHS: usize = 64;

/// Memory leaked on purpose by the test `alloc` handler (to push RSS over `max_memory`).
static LEAKED: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// One request as the handlers see it (borrowed from the ring frame).
#[derive(Debug, Clone, Copy)]
pub struct HandlerRequest<'a> {
    /// What to do.
    pub kind: Kind,
    /// The HTTP method (meaningful for `session`).
    pub method: Method,
    /// The user the request is for.
    pub user_id: &'a str,
    /// Kind-specific target: a session name, a test action; often empty.
    pub path: &'a str,
    /// The payload.
    pub body: &'a [u8],
}

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

    fn storage(what: &str, e: io::Error) -> Self {
        Self::new(500, "STORAGE_ERROR", format!("cannot {what}: {e}"))
    }
}

type Outcome = Result<HandlerReply, Fail>;

/// The worker's built-in handlers and their per-process state.
#[derive(Debug)]
pub struct Handlers {
    worker_id: String,
    pid: u32,
    sandbox: PathBuf,
    started: Instant,
    /// Valid turns per user, counted once from the session file then kept up to date.
    turns: HashMap<String, u64>,
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
            turns: HashMap::new(),
            max_reply_bytes: usize::MAX,
        }
    }

    /// Sets the largest reply body the response ring can carry (default: unbounded). Larger
    /// replies become `500 REPLY_TOO_LARGE`; `agent:message` refuses a message whose reply would
    /// not fit before recording the turn, and `history` returns fewer turns to fit.
    pub fn set_max_reply_bytes(&mut self, n: usize) {
        self.max_reply_bytes = n;
    }

    /// Runs one request. Never panics; errors come back as replies.
    pub fn handle(&mut self, req: &HandlerRequest<'_>) -> HandlerReply {
        let outcome = match req.kind {
            Kind::Echo => Ok(HandlerReply::ok(req.body.to_vec())),
            Kind::HealthCheck => Ok(self.health()),
            Kind::AgentMessage => self.agent_message(req),
            Kind::AgentCommand => self.agent_command(req),
            Kind::Session => self.session(req),
            #[cfg(feature = "fault-injection")]
            Kind::Test => self.test(req),
        };
        let reply = outcome.unwrap_or_else(|f| HandlerReply::error(f.status, f.code, f.message));
        if reply.body.len() > self.max_reply_bytes {
            return HandlerReply::error(
                500,
                "REPLY_TOO_LARGE",
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

    // ---- agent:message / agent:command ----

    fn session_file(&self, user: &str) -> PathBuf {
        self.sandbox
            .join(SESSIONS_DIR)
            .join(format!("{}.jsonl", safe_file_stem(user)))
    }

    fn agent_message(&mut self, req: &HandlerRequest<'_>) -> Outcome {
        let user = checked_user(req.user_id)?;
        let message = parse_message(req.body)?;
        let path = self.session_file(user);
        let turn = self.turn_count(user, &path)? + 1;
        let reply = format!("echo: {message}");
        let record = TurnRecord {
            ts: now_rfc3339(),
            user_id: user,
            message: &message,
            reply: &reply,
        };
        let mut line = serde_json::to_vec(&record)
            .map_err(|e| Fail::new(500, "INTERNAL", format!("cannot encode the turn: {e}")))?;
        line.push(b'\n');
        let answer = HandlerReply::json(&json!({
            "workerId": self.worker_id,
            "pid": self.pid,
            "userId": user,
            "turn": turn,
            "reply": reply,
        }));
        // Checked before recording: a turn is never stored without its answer reaching the
        // client (JSON escaping can make the echo several times the message).
        if answer.body.len() > self.max_reply_bytes {
            return Err(Fail::new(
                413,
                "MESSAGE_TOO_LARGE",
                format!(
                    "the reply to this message would be {} bytes; at most {} fit",
                    answer.body.len(),
                    self.max_reply_bytes
                ),
            ));
        }
        if let Err(e) = append(&path, &line) {
            // The file may now end in a torn line: recount (and repair) next time.
            self.turns.remove(user);
            return Err(Fail::storage("append to the session log", e));
        }
        self.remember_turns(user, turn);
        Ok(answer)
    }

    /// The user's valid turns: cached, else counted from the file (terminating a torn last
    /// line so the next append starts a line of its own).
    fn turn_count(&mut self, user: &str, path: &Path) -> Result<u64, Fail> {
        if let Some(&n) = self.turns.get(user) {
            return Ok(n);
        }
        let scan = scan_turns(path, 0).map_err(|e| Fail::storage("read the session log", e))?;
        if scan.torn_tail {
            append(path, b"\n").map_err(|e| Fail::storage("repair the session log", e))?;
        }
        self.remember_turns(user, scan.count);
        Ok(scan.count)
    }

    fn remember_turns(&mut self, user: &str, n: u64) {
        if self.turns.len() >= TURN_CACHE_LIMIT && !self.turns.contains_key(user) {
            self.turns.clear();
        }
        self.turns.insert(user.to_owned(), n);
    }

    fn agent_command(&mut self, req: &HandlerRequest<'_>) -> Outcome {
        let user = checked_user(req.user_id)?;
        let cmd = parse_command(req.body)?;
        let path = self.session_file(user);
        match cmd.command.as_str() {
            "history" => {
                let limit = cmd.limit.unwrap_or(HISTORY_LIMIT).min(HISTORY_LIMIT);
                // Not cached: a torn tail is repaired only by `turn_count`, before an append.
                let scan = scan_turns(&path, limit)
                    .map_err(|e| Fail::storage("read the session log", e))?;
                // Newest first within the reply budget, then back in file order.
                let budget = self.max_reply_bytes.saturating_sub(REPLY_ENVELOPE);
                let wanted = scan.last.len();
                let mut used = 0usize;
                let mut history: Vec<Value> = Vec::with_capacity(wanted);
                for (v, len) in scan.last.into_iter().rev() {
                    used = used.saturating_add(len + 1);
                    if used > budget {
                        break;
                    }
                    history.push(v);
                }
                history.reverse();
                Ok(HandlerReply::json(&json!({
                    "workerId": self.worker_id,
                    "userId": user,
                    "turns": scan.count,
                    "truncated": history.len() < wanted,
                    "history": history,
                })))
            }
            "reset" => {
                let removed = match fs::remove_file(&path) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                    Err(e) => return Err(Fail::storage("remove the session log", e)),
                };
                self.remember_turns(user, 0);
                Ok(HandlerReply::json(&json!({
                    "workerId": self.worker_id,
                    "userId": user,
                    "reset": true,
                    "removed": removed,
                })))
            }
            "stats" => {
                let turns = self.turn_count(user, &path)?;
                Ok(HandlerReply::json(&json!({
                    "workerId": self.worker_id,
                    "userId": user,
                    "turns": turns,
                })))
            }
            other => Err(Fail::bad(
                "UNKNOWN_COMMAND",
                format!("unknown command {other:?}; expected history, reset or stats"),
            )),
        }
    }

    // ---- session ----

    fn session(&mut self, req: &HandlerRequest<'_>) -> Outcome {
        let user = checked_user(req.user_id)?;
        let dir = self.sandbox.join(STATE_DIR).join(safe_file_stem(user));
        match req.method {
            Method::Get if req.path.is_empty() => session_list(&dir),
            Method::Get => {
                let name = checked_name(req.path)?;
                let bytes = session_read(&dir, name)?;
                Ok(HandlerReply::ok(bytes))
            }
            Method::Put => session_store(&dir, checked_name(req.path)?, req.body),
            Method::Delete => session_delete(&dir, checked_name(req.path)?),
            Method::Post => session_route(&dir, req.path, req.body),
        }
    }

    // ---- test (test-only) ----

    /// Fault injection for the tests.
    #[cfg(feature = "fault-injection")]
    fn test(&mut self, req: &HandlerRequest<'_>) -> Outcome {
        match req.path {
            "crash" => std::process::abort(),
            "exit" => std::process::exit(3),
            "hang" => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            "alloc" => test_alloc(req.body),
            "escape" => test_escape(req.body, self.pid),
            "signal" => test_signal(req.body),
            "slow" => {
                #[derive(Deserialize)]
                struct Slow {
                    ms: u64,
                }
                let s: Slow = parse_json_payload(req.body, "{\"ms\": N}")?;
                if s.ms > MAX_SLOW_MS {
                    return Err(Fail::bad(
                        "INVALID_PAYLOAD",
                        format!("ms must be at most {MAX_SLOW_MS}"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(s.ms));
                Ok(HandlerReply::json(
                    &json!({ "sleptMs": s.ms, "pid": self.pid }),
                ))
            }
            other => Err(Fail::new(
                404,
                "UNKNOWN_TEST_ACTION",
                format!(
                    "unknown test action {other:?}; expected crash, exit, hang, alloc, escape, signal or slow"
                ),
            )),
        }
    }
}

/// One line of `sessions/<stem>.jsonl`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TurnRecord<'a> {
    ts: String,
    user_id: &'a str,
    message: &'a str,
    reply: &'a str,
}

/// What a scan of a session log found.
struct TurnScan {
    /// Lines that are valid JSON objects.
    count: u64,
    /// The last `keep` of them, each with the length of its line.
    last: VecDeque<(Value, usize)>,
    /// The file does not end in a newline.
    torn_tail: bool,
}

/// Counts the valid turns of a session log (absent = none), keeping the last `keep`.
fn scan_turns(path: &Path, keep: usize) -> io::Result<TurnScan> {
    let mut scan = TurnScan {
        count: 0,
        last: VecDeque::new(),
        torn_tail: false,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(scan),
        Err(e) => return Err(e),
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            scan.torn_tail = true;
            break;
        }
        if keep == 0 {
            if serde_json::from_slice::<serde::de::IgnoredAny>(&line).is_ok()
                && line.trim_ascii_start().first() == Some(&b'{')
            {
                scan.count += 1;
            }
            continue;
        }
        if let Ok(v @ Value::Object(_)) = serde_json::from_slice::<Value>(&line) {
            scan.count += 1;
            if scan.last.len() == keep {
                scan.last.pop_front();
            }
            scan.last.push_back((v, line.len()));
        }
    }
    Ok(scan)
}

/// Appends `bytes` with one `write_all` on an `O_APPEND` descriptor, creating the file (0600)
/// and, if it went missing, its directory.
fn append(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let open = || {
        OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
    };
    let mut f = match open() {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create_private_dir(path.parent().unwrap_or(Path::new(".")))?;
            open()?
        }
        Err(e) => return Err(e),
    };
    f.write_all(bytes)
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn checked_user(user: &str) -> Result<&str, Fail> {
    validate_user_id(user).map_err(|e| Fail::bad("INVALID_USER", e.to_string()))
}

fn checked_name(name: &str) -> Result<&str, Fail> {
    validate_name(name).map_err(|e| {
        Fail::bad(
            "INVALID_NAME",
            format!("invalid session name {name:?}: {e}"),
        )
    })
}

fn utf8(body: &[u8]) -> Result<&str, Fail> {
    std::str::from_utf8(body).map_err(|e| {
        Fail::bad(
            "INVALID_PAYLOAD",
            format!(
                "payload is not UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })
}

/// The message of an `agent:message` payload: `{"message": "..."}` (other fields ignored), a
/// JSON string, or else the raw text.
fn parse_message(body: &[u8]) -> Result<Cow<'_, str>, Fail> {
    let text = utf8(body)?;
    let message = match text.trim_start().as_bytes().first() {
        Some(b'{') | Some(b'"') => match serde_json::from_str::<Value>(text) {
            Ok(Value::String(s)) => Cow::Owned(s),
            Ok(Value::Object(mut map)) => match map.remove("message") {
                Some(Value::String(s)) => Cow::Owned(s),
                Some(_) => {
                    return Err(Fail::bad("INVALID_PAYLOAD", "\"message\" must be a string"));
                }
                None => Cow::Borrowed(text),
            },
            _ => Cow::Borrowed(text),
        },
        _ => Cow::Borrowed(text),
    };
    if message.is_empty() {
        return Err(Fail::bad(
            "INVALID_PAYLOAD",
            "empty message; send {\"message\": \"...\"}",
        ));
    }
    Ok(message)
}

/// A parsed `agent:command` payload.
struct Command {
    command: String,
    limit: Option<usize>,
}

/// `{"command": "...", "limit": N?}`, a JSON string, or the raw (trimmed) text.
fn parse_command(body: &[u8]) -> Result<Command, Fail> {
    let text = utf8(body)?;
    let trimmed = text.trim();
    let parsed = match trimmed.as_bytes().first() {
        Some(b'{') => {
            #[derive(Deserialize)]
            struct Obj {
                command: Option<String>,
                limit: Option<usize>,
            }
            let o: Obj = serde_json::from_str(trimmed).map_err(|e| {
                Fail::bad("INVALID_PAYLOAD", format!("invalid command payload: {e}"))
            })?;
            Command {
                command: o.command.unwrap_or_default(),
                limit: o.limit,
            }
        }
        Some(b'"') => Command {
            command: serde_json::from_str::<String>(trimmed).map_err(|e| {
                Fail::bad("INVALID_PAYLOAD", format!("invalid command payload: {e}"))
            })?,
            limit: None,
        },
        _ => Command {
            command: trimmed.to_owned(),
            limit: None,
        },
    };
    if parsed.command.is_empty() {
        return Err(Fail::bad(
            "INVALID_PAYLOAD",
            "missing command; send {\"command\": \"history\" | \"reset\" | \"stats\"}",
        ));
    }
    Ok(parsed)
}

fn parse_json_payload<T: for<'de> Deserialize<'de>>(body: &[u8], shape: &str) -> Result<T, Fail> {
    serde_json::from_slice(body)
        .map_err(|e| Fail::bad("INVALID_PAYLOAD", format!("expected {shape}: {e}")))
}

fn is_json(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

fn session_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// The stored bytes of a session value.
fn session_read(dir: &Path, name: &str) -> Result<Vec<u8>, Fail> {
    let bytes = match fs::read(session_path(dir, name)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Fail::new(
                404,
                "NOT_FOUND",
                format!("session {name:?} not found"),
            ));
        }
        Err(e) => return Err(Fail::storage("read the session", e)),
    };
    if !is_json(&bytes) {
        return Err(Fail::new(
            500,
            "CORRUPT_STATE",
            format!("session {name:?} does not hold valid JSON"),
        ));
    }
    Ok(bytes)
}

/// Stores a JSON value atomically: a fresh temp file (names starting with `.` are never
/// session names) renamed over the old value.
fn session_store(dir: &Path, name: &str, value: &[u8]) -> Outcome {
    if !is_json(value) {
        return Err(Fail::bad(
            "INVALID_JSON",
            "the session value must be a JSON value",
        ));
    }
    let target = session_path(dir, name);
    let created = !target.exists();
    create_private_dir(dir).map_err(|e| Fail::storage("create the state directory", e))?;
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(value)?;
        fs::rename(&tmp, &target)
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(Fail::storage("store the session", e));
    }
    Ok(HandlerReply::json(&json!({
        "name": name,
        "stored": true,
        "created": created,
        "bytes": value.len(),
    })))
}

fn session_delete(dir: &Path, name: &str) -> Outcome {
    match fs::remove_file(session_path(dir, name)) {
        Ok(()) => Ok(HandlerReply::json(
            &json!({ "name": name, "deleted": true }),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Fail::new(
            404,
            "NOT_FOUND",
            format!("session {name:?} not found"),
        )),
        Err(e) => Err(Fail::storage("delete the session", e)),
    }
}

/// The user's session names, sorted (files that are not `<valid name>.json` are skipped).
fn session_list(dir: &Path) -> Outcome {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(HandlerReply::json(&json!({ "names": [] })));
        }
        Err(e) => return Err(Fail::storage("list the sessions", e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Fail::storage("list the sessions", e))?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if validate_name(name).is_ok() && entry.file_type().is_ok_and(|t| t.is_file()) {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(HandlerReply::json(&json!({ "names": names })))
}

/// `Some(raw)` whenever the field is present, even as `null` (missing stays `None`).
fn present_raw<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// The `/v1/route` form of `session`: `{"action", "name", "value"}`.
fn session_route(dir: &Path, path: &str, body: &[u8]) -> Outcome {
    #[derive(Deserialize)]
    struct Route {
        action: Option<String>,
        name: Option<String>,
        #[serde(default, deserialize_with = "present_raw")]
        value: Option<Box<RawValue>>,
    }
    let route: Route = serde_json::from_slice(body).map_err(|e| {
        Fail::bad(
            "INVALID_JSON",
            format!("expected {{\"action\": \"get\"|\"set\"|\"delete\"|\"list\", \"name\", \"value\"}}: {e}"),
        )
    })?;
    let action = route.action.ok_or_else(|| {
        Fail::bad(
            "INVALID_PAYLOAD",
            "missing \"action\" (get, set, delete or list)",
        )
    })?;
    let name = || -> Result<&str, Fail> {
        match route.name.as_deref() {
            Some(n) => checked_name(n),
            None if !path.is_empty() => checked_name(path),
            None => Err(Fail::bad("INVALID_NAME", "missing \"name\"")),
        }
    };
    match action.as_str() {
        "get" => {
            let name = name()?;
            let bytes = session_read(dir, name)?;
            let text = String::from_utf8(bytes).map_err(|_| {
                Fail::new(
                    500,
                    "CORRUPT_STATE",
                    format!("session {name:?} is not UTF-8"),
                )
            })?;
            let value = RawValue::from_string(text).map_err(|_| {
                Fail::new(
                    500,
                    "CORRUPT_STATE",
                    format!("session {name:?} does not hold valid JSON"),
                )
            })?;
            #[derive(Serialize)]
            struct Got<'a> {
                name: &'a str,
                value: &'a RawValue,
            }
            Ok(HandlerReply::json(&Got {
                name,
                value: &value,
            }))
        }
        "set" => {
            let name = name()?;
            let value = route
                .value
                .as_ref()
                .ok_or_else(|| Fail::bad("INVALID_PAYLOAD", "\"set\" needs a \"value\""))?;
            session_store(dir, name, value.get().as_bytes())
        }
        "delete" => session_delete(dir, name()?),
        "list" => session_list(dir),
        other => Err(Fail::bad(
            "UNKNOWN_ACTION",
            format!("unknown action {other:?}; expected get, set, delete or list"),
        )),
    }
}

/// Test-only: allocates, touches and leaks `{"mib": N}` MiB.
#[cfg(feature = "fault-injection")]
fn test_alloc(body: &[u8]) -> Outcome {
    #[derive(Deserialize)]
    struct Alloc {
        mib: u64,
    }
    let a: Alloc = parse_json_payload(body, "{\"mib\": N}")?;
    if a.mib > MAX_ALLOC_MIB {
        return Err(Fail::bad(
            "INVALID_PAYLOAD",
            format!("mib must be at most {MAX_ALLOC_MIB}"),
        ));
    }
    let bytes = usize::try_from(a.mib << 20)
        .map_err(|_| Fail::bad("INVALID_PAYLOAD", "too large for this platform"))?;
    let mut block = Vec::new();
    block.try_reserve_exact(bytes).map_err(|e| {
        Fail::new(
            500,
            "ALLOC_FAILED",
            format!("cannot allocate {} MiB: {e}", a.mib),
        )
    })?;
    // Non-zero bytes: every page is written, so it counts in RSS.
    block.resize(bytes, 0xa5);
    let mut leaked = LEAKED.lock().unwrap_or_else(|p| p.into_inner());
    leaked.push(block);
    let total: usize = leaked.iter().map(Vec::len).sum();
    Ok(HandlerReply::json(&json!({
        "allocatedMib": a.mib,
        "totalLeakedMib": total >> 20,
    })))
}

#[cfg(feature = "fault-injection")]
fn probe(r: io::Result<()>) -> Value {
    match r {
        Ok(()) => json!({ "ok": true }),
        Err(e) => json!({ "ok": false, "error": e.to_string() }),
    }
}

/// Test-only: tries to read each path and, for directories, to list it and create a file in
/// it; reports what succeeded (isolation tests expect failures outside the sandbox).
#[cfg(feature = "fault-injection")]
fn test_escape(body: &[u8], pid: u32) -> Outcome {
    #[derive(Deserialize)]
    struct Escape {
        paths: Vec<String>,
    }
    let e: Escape = parse_json_payload(body, "{\"paths\": [...]}")?;
    if e.paths.len() > MAX_ESCAPE_PATHS {
        return Err(Fail::bad(
            "INVALID_PAYLOAD",
            format!("at most {MAX_ESCAPE_PATHS} paths"),
        ));
    }
    let mut results = Vec::with_capacity(e.paths.len());
    for p in &e.paths {
        let path = Path::new(p);
        let is_dir = fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false);
        let read = probe(File::open(path).and_then(|mut f| {
            if is_dir {
                Ok(())
            } else {
                f.read(&mut [0u8; 1]).map(|_| ())
            }
        }));
        let (list, create) = if is_dir {
            let list = probe(fs::read_dir(path).and_then(|mut it| match it.next() {
                Some(Err(e)) => Err(e),
                _ => Ok(()),
            }));
            let probe_file = path.join(format!(
                ".moltbot-escape-probe-{pid}-{:016x}",
                rand::random::<u64>()
            ));
            let create = probe(
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&probe_file)
                    .map(|_| {
                        let _ = fs::remove_file(&probe_file);
                    }),
            );
            (list, create)
        } else {
            (Value::Null, Value::Null)
        };
        results.push(json!({
            "path": p,
            "isDir": is_dir,
            "read": read,
            "list": list,
            "create": create,
        }));
    }
    Ok(HandlerReply::json(&json!({ "results": results })))
}

/// Test-only: for each pid, whether this process may signal it, probed with `kill(pid, 0)`
/// (permission and existence checks only; nothing is delivered). Isolation tests expect the
/// gateway and other workers to be out of reach where Landlock scopes signals (ABI 6).
#[cfg(feature = "fault-injection")]
fn test_signal(body: &[u8]) -> Outcome {
    #[derive(Deserialize)]
    struct Signal {
        pids: Vec<u32>,
    }
    let s: Signal = parse_json_payload(body, "{\"pids\": [...]}")?;
    if s.pids.len() > MAX_ESCAPE_PATHS {
        return Err(Fail::bad(
            "INVALID_PAYLOAD",
            format!("at most {MAX_ESCAPE_PATHS} pids"),
        ));
    }
    let results: Vec<Value> = s
        .pids
        .iter()
        .map(|&pid| {
            // Only positive pids: 0 and negative values would address process groups.
            let target = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a process id"));
            let r = target.and_then(|p| rustix::process::test_kill_process(p).map_err(Into::into));
            let mut v = probe(r);
            v["pid"] = json!(pid);
            v
        })
        .collect();
    Ok(HandlerReply::json(&json!({ "results": results })))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        h: Handlers,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("worker-1");
        for d in ["sessions", "state"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        let h = Handlers::new("worker-1", 4321, &root);
        Fixture { _dir: dir, root, h }
    }

    fn req<'a>(
        kind: Kind,
        method: Method,
        user: &'a str,
        path: &'a str,
        body: &'a [u8],
    ) -> HandlerRequest<'a> {
        HandlerRequest {
            kind,
            method,
            user_id: user,
            path,
            body,
        }
    }

    fn body(r: &HandlerReply) -> Value {
        serde_json::from_slice(&r.body).unwrap_or_else(|e| {
            panic!(
                "reply is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&r.body)
            )
        })
    }

    fn assert_error(r: &HandlerReply, status: u16, code: &str) {
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
        fn message(&mut self, user: &str, payload: &[u8]) -> HandlerReply {
            self.h
                .handle(&req(Kind::AgentMessage, Method::Post, user, "", payload))
        }
        fn command(&mut self, user: &str, payload: &str) -> HandlerReply {
            self.h.handle(&req(
                Kind::AgentCommand,
                Method::Post,
                user,
                "",
                payload.as_bytes(),
            ))
        }
        fn session(
            &mut self,
            method: Method,
            user: &str,
            path: &str,
            payload: &[u8],
        ) -> HandlerReply {
            self.h
                .handle(&req(Kind::Session, method, user, path, payload))
        }
        fn route(&mut self, user: &str, payload: Value) -> HandlerReply {
            let b = serde_json::to_vec(&payload).unwrap();
            self.session(Method::Post, user, "", &b)
        }
        fn session_log(&self, user: &str) -> PathBuf {
            self.root
                .join("sessions")
                .join(format!("{}.jsonl", safe_file_stem(user)))
        }
    }

    #[test]
    fn agent_message_appends_and_counts_turns() {
        let mut f = fixture();
        for turn in 1..=3 {
            let r = f.message(
                "user-a",
                format!(r#"{{"message":"hi {turn}","extra":1}}"#).as_bytes(),
            );
            assert_eq!((r.status, r.error_code), (200, ""));
            let v = body(&r);
            assert_eq!(v["workerId"], "worker-1");
            assert_eq!(v["pid"], 4321);
            assert_eq!(v["userId"], "user-a");
            assert_eq!(v["turn"], turn);
            assert_eq!(v["reply"], format!("echo: hi {turn}"));
        }
        let text = fs::read_to_string(f.session_log("user-a")).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2]["userId"], "user-a");
        assert_eq!(lines[2]["message"], "hi 3");
        assert_eq!(lines[2]["reply"], "echo: hi 3");
        assert!(humantime::parse_rfc3339(lines[2]["ts"].as_str().unwrap()).is_ok());
        // Another user has their own count.
        assert_eq!(body(&f.message("user-b", b"yo"))["turn"], 1);
    }

    #[test]
    fn turn_count_continues_after_a_restart() {
        let mut f = fixture();
        f.message("user-a", b"one");
        f.message("user-a", b"two");
        // A new process (fresh cache) over the same sandbox.
        let mut h2 = Handlers::new("worker-1", 99, &f.root);
        let r = h2.handle(&req(
            Kind::AgentMessage,
            Method::Post,
            "user-a",
            "",
            b"three",
        ));
        assert_eq!(body(&r)["turn"], 3);
    }

    #[test]
    fn a_torn_last_line_is_not_counted_and_does_not_swallow_the_next_turn() {
        let mut f = fixture();
        f.message("user-a", b"one");
        let log = f.session_log("user-a");
        let mut file = OpenOptions::new().append(true).open(&log).unwrap();
        file.write_all(br#"{"ts":"2024-01-01T00:00:00Z","userId":"us"#)
            .unwrap();
        let mut h2 = Handlers::new("worker-1", 99, &f.root);
        let r = h2.handle(&req(Kind::AgentMessage, Method::Post, "user-a", "", b"two"));
        assert_eq!(body(&r)["turn"], 2);
        let text = fs::read_to_string(&log).unwrap();
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["message"], "two");
        let stats = h2.handle(&req(
            Kind::AgentCommand,
            Method::Post,
            "user-a",
            "",
            b"stats",
        ));
        assert_eq!(body(&stats)["turns"], 2);
    }

    #[test]
    fn message_payload_forms() {
        let mut f = fixture();
        let cases: &[(&[u8], &str)] = &[
            (br#"{"message":"structured"}"#, "structured"),
            (br#""a json string""#, "a json string"),
            (b"plain text", "plain text"),
            (
                br#"{"text":"no message field"}"#,
                r#"{"text":"no message field"}"#,
            ),
            (b"{not json", "{not json"),
            ("ünïcødé ✓".as_bytes(), "ünïcødé ✓"),
        ];
        for (payload, want) in cases {
            let r = f.message("user-a", payload);
            assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(payload));
            assert_eq!(body(&r)["reply"], format!("echo: {want}"));
        }
    }

    #[test]
    fn bad_message_payloads_are_400() {
        let mut f = fixture();
        assert_error(&f.message("user-a", b"\xff\xfe"), 400, "INVALID_PAYLOAD");
        assert_error(&f.message("user-a", b""), 400, "INVALID_PAYLOAD");
        assert_error(
            &f.message("user-a", br#"{"message": 5}"#),
            400,
            "INVALID_PAYLOAD",
        );
        assert_error(
            &f.message("user-a", br#"{"message": ""}"#),
            400,
            "INVALID_PAYLOAD",
        );
        assert_error(&f.message("", b"hi"), 400, "INVALID_USER");
        assert_error(&f.message("a\nb", b"hi"), 400, "INVALID_USER");
        // Nothing was written for the refused requests.
        assert!(!f.session_log("user-a").exists());
    }

    #[test]
    fn hostile_user_ids_stay_inside_sessions() {
        let mut f = fixture();
        for user in ["../x", "a/b", "..", ".hidden", "/etc/passwd"] {
            let r = f.message(user, b"hello");
            assert_eq!(r.status, 200, "{user}");
            assert_eq!(body(&r)["userId"], user);
        }
        let names: Vec<String> = fs::read_dir(f.root.join("sessions"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 5, "{names:?}");
        for n in &names {
            assert!(n.starts_with('~') && n.ends_with(".jsonl"), "{n}");
            assert!(!n.contains('/'));
        }
        // Nothing escaped the sessions dir.
        let mut top: Vec<String> = fs::read_dir(&f.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        top.sort();
        assert_eq!(top, ["sessions", "state"]);
        assert!(!f.root.parent().unwrap().join("x.jsonl").exists());
    }

    #[test]
    fn sessions_dir_is_recreated_if_missing() {
        let mut f = fixture();
        fs::remove_dir_all(f.root.join("sessions")).unwrap();
        assert_eq!(f.message("user-a", b"hi").status, 200);
        assert!(f.session_log("user-a").is_file());
    }

    #[test]
    fn command_history_stats_and_reset() {
        let mut f = fixture();
        for i in 0..5 {
            f.message("user-a", format!("m{i}").as_bytes());
        }
        let h = body(&f.command("user-a", r#"{"command":"history"}"#));
        assert_eq!(h["turns"], 5);
        assert_eq!(h["userId"], "user-a");
        let hist = h["history"].as_array().unwrap();
        assert_eq!(hist.len(), 5);
        assert_eq!(hist[0]["message"], "m0");
        assert_eq!(hist[4]["reply"], "echo: m4");
        let h = body(&f.command("user-a", r#"{"command":"history","limit":2}"#));
        let hist = h["history"].as_array().unwrap();
        assert_eq!(hist.len(), 2);
        assert_eq!(hist[1]["message"], "m4");
        assert_eq!(body(&f.command("user-a", "stats"))["turns"], 5);
        assert_eq!(body(&f.command("user-a", r#""stats""#))["turns"], 5);

        let r = body(&f.command("user-a", r#"{"command":"reset"}"#));
        assert_eq!(r["reset"], true);
        assert_eq!(r["removed"], true);
        assert!(!f.session_log("user-a").exists());
        assert_eq!(body(&f.command("user-a", "stats"))["turns"], 0);
        assert_eq!(body(&f.message("user-a", b"again"))["turn"], 1);
        // Reset of a user without a log is fine.
        assert_eq!(body(&f.command("user-z", "reset"))["removed"], false);
    }

    #[test]
    fn history_is_bounded() {
        let mut f = fixture();
        for i in 0..(HISTORY_LIMIT + 20) {
            f.message("user-a", format!("m{i}").as_bytes());
        }
        let h = body(&f.command("user-a", r#"{"command":"history","limit":100000}"#));
        assert_eq!(h["turns"], HISTORY_LIMIT + 20);
        let hist = h["history"].as_array().unwrap();
        assert_eq!(hist.len(), HISTORY_LIMIT);
        assert_eq!(hist[0]["message"], "m20");
    }

    #[test]
    fn bad_commands() {
        let mut f = fixture();
        assert_error(
            &f.command("user-a", r#"{"command":"fly"}"#),
            400,
            "UNKNOWN_COMMAND",
        );
        assert_error(&f.command("user-a", "fly"), 400, "UNKNOWN_COMMAND");
        assert_error(&f.command("user-a", "{}"), 400, "INVALID_PAYLOAD");
        assert_error(&f.command("user-a", ""), 400, "INVALID_PAYLOAD");
        assert_error(&f.command("user-a", "{broken"), 400, "INVALID_PAYLOAD");
        assert_error(
            &f.command("user-a", r#"{"command":7}"#),
            400,
            "INVALID_PAYLOAD",
        );
        let r = f.h.handle(&req(
            Kind::AgentCommand,
            Method::Post,
            "user-a",
            "",
            b"\xff",
        ));
        assert_error(&r, 400, "INVALID_PAYLOAD");
    }

    #[test]
    fn session_rest_get_put_delete_list() {
        let mut f = fixture();
        // Empty list first.
        assert_eq!(
            body(&f.session(Method::Get, "user-a", "", b"")),
            json!({"names": []})
        );
        let r = f.session(Method::Put, "user-a", "notes", br#"{"x": [1, 2]}"#);
        assert_eq!(r.status, 200);
        assert_eq!(body(&r)["created"], true);
        let r = f.session(Method::Get, "user-a", "notes", b"");
        assert_eq!((r.status, r.error_code), (200, ""));
        assert_eq!(body(&r), json!({"x": [1, 2]}));
        let r = f.session(Method::Put, "user-a", "notes", b"42");
        assert_eq!(body(&r)["created"], false);
        assert_eq!(f.session(Method::Get, "user-a", "notes", b"").body, b"42");
        f.session(Method::Put, "user-a", "a.b-c_d", b"\"s\"");
        assert_eq!(
            body(&f.session(Method::Get, "user-a", "", b"")),
            json!({"names": ["a.b-c_d", "notes"]})
        );
        // Per user: another user sees nothing.
        assert_error(
            &f.session(Method::Get, "user-b", "notes", b""),
            404,
            "NOT_FOUND",
        );
        assert_eq!(
            body(&f.session(Method::Get, "user-b", "", b"")),
            json!({"names": []})
        );
        let r = f.session(Method::Delete, "user-a", "notes", b"");
        assert_eq!(body(&r), json!({"name": "notes", "deleted": true}));
        assert_error(
            &f.session(Method::Get, "user-a", "notes", b""),
            404,
            "NOT_FOUND",
        );
        assert_error(
            &f.session(Method::Delete, "user-a", "notes", b""),
            404,
            "NOT_FOUND",
        );
        // Stored under state/<stem>/<name>.json, with no temp files left.
        let dir = f.root.join("state").join("user-a");
        let files: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files, ["a.b-c_d.json"]);
    }

    #[test]
    fn session_list_skips_foreign_files() {
        let mut f = fixture();
        f.session(Method::Put, "user-a", "good", b"1");
        let dir = f.root.join("state/user-a");
        fs::write(dir.join(".tmpfile.json"), "1").unwrap();
        fs::write(dir.join("notjson.txt"), "1").unwrap();
        fs::create_dir(dir.join("sub.json")).unwrap();
        assert_eq!(
            body(&f.session(Method::Get, "user-a", "", b"")),
            json!({"names": ["good"]})
        );
    }

    #[test]
    fn session_invalid_names_and_json() {
        let mut f = fixture();
        let long = "n".repeat(65);
        for name in [
            "..",
            "a/b",
            ".hidden",
            long.as_str(),
            "../../etc/passwd",
            "a b",
        ] {
            assert_error(
                &f.session(Method::Get, "user-a", name, b""),
                400,
                "INVALID_NAME",
            );
            assert_error(
                &f.session(Method::Put, "user-a", name, b"1"),
                400,
                "INVALID_NAME",
            );
            assert_error(
                &f.session(Method::Delete, "user-a", name, b""),
                400,
                "INVALID_NAME",
            );
            assert_error(
                &f.route("user-a", json!({"action": "get", "name": name})),
                400,
                "INVALID_NAME",
            );
        }
        assert_error(
            &f.session(Method::Put, "user-a", "", b"1"),
            400,
            "INVALID_NAME",
        );
        assert_error(
            &f.session(Method::Delete, "user-a", "", b""),
            400,
            "INVALID_NAME",
        );
        for bad in [&b"{nope"[..], b"", b"1 2", b"\xff"] {
            assert_error(
                &f.session(Method::Put, "user-a", "x", bad),
                400,
                "INVALID_JSON",
            );
        }
        assert!(!f.root.join("state/user-a/x.json").exists());
        assert_error(&f.session(Method::Get, "", "x", b""), 400, "INVALID_USER");
    }

    #[test]
    fn session_corrupt_value_is_500_not_garbage() {
        let mut f = fixture();
        f.session(Method::Put, "user-a", "v", b"1");
        fs::write(f.root.join("state/user-a/v.json"), "{torn").unwrap();
        assert_error(
            &f.session(Method::Get, "user-a", "v", b""),
            500,
            "CORRUPT_STATE",
        );
        assert_error(
            &f.route("user-a", json!({"action": "get", "name": "v"})),
            500,
            "CORRUPT_STATE",
        );
    }

    #[test]
    fn hostile_users_get_encoded_state_dirs() {
        let mut f = fixture();
        for user in ["../x", "a/b"] {
            assert_eq!(f.session(Method::Put, user, "n", b"1").status, 200);
            let dir = f.root.join("state").join(safe_file_stem(user));
            assert!(dir.join("n.json").is_file());
        }
        assert!(!f.root.join("x").exists());
        assert!(!f.root.join("state/a").exists());
    }

    #[test]
    fn session_route_form() {
        let mut f = fixture();
        let r = f.route(
            "user-a",
            json!({"action": "set", "name": "prefs", "value": {"theme": "dark"}}),
        );
        assert_eq!((r.status, r.error_code), (200, ""));
        assert_eq!(body(&r)["stored"], true);
        let r = f.route("user-a", json!({"action": "get", "name": "prefs"}));
        assert_eq!(
            body(&r),
            json!({"name": "prefs", "value": {"theme": "dark"}})
        );
        // null is a value, not a missing one.
        assert_eq!(
            f.route(
                "user-a",
                json!({"action": "set", "name": "nil", "value": null})
            )
            .status,
            200
        );
        assert_eq!(
            body(&f.session(Method::Get, "user-a", "nil", b"")),
            Value::Null
        );
        assert_eq!(
            body(&f.route("user-a", json!({"action": "list"}))),
            json!({"names": ["nil", "prefs"]})
        );
        let r = f.route("user-a", json!({"action": "delete", "name": "prefs"}));
        assert_eq!(body(&r)["deleted"], true);
        assert_error(
            &f.route("user-a", json!({"action": "get", "name": "prefs"})),
            404,
            "NOT_FOUND",
        );
        assert_error(
            &f.route("user-a", json!({"action": "delete", "name": "prefs"})),
            404,
            "NOT_FOUND",
        );
        // Values stored via REST read back through the route form, whitespace and all.
        f.session(Method::Put, "user-a", "ws", b"  [1, 2]\n");
        assert_eq!(
            body(&f.route("user-a", json!({"action": "get", "name": "ws"}))),
            json!({"name": "ws", "value": [1, 2]})
        );
        // The name may come from the path.
        let r = f.session(Method::Post, "user-a", "ws", br#"{"action":"get"}"#);
        assert_eq!(body(&r)["value"], json!([1, 2]));
    }

    #[test]
    fn session_route_errors() {
        let mut f = fixture();
        assert_error(
            &f.session(Method::Post, "user-a", "", b"{oops"),
            400,
            "INVALID_JSON",
        );
        assert_error(
            &f.route("user-a", json!({"name": "x"})),
            400,
            "INVALID_PAYLOAD",
        );
        assert_error(
            &f.route("user-a", json!({"action": "fly", "name": "x"})),
            400,
            "UNKNOWN_ACTION",
        );
        assert_error(
            &f.route("user-a", json!({"action": "set", "name": "x"})),
            400,
            "INVALID_PAYLOAD",
        );
        assert_error(
            &f.route("user-a", json!({"action": "get"})),
            400,
            "INVALID_NAME",
        );
        assert_error(
            &f.route("user-a", json!({"action": 1})),
            400,
            "INVALID_JSON",
        );
    }

    #[test]
    fn echo_returns_the_body_unchanged() {
        let mut f = fixture();
        let payload = [0u8, 255, b'{', 1, 2, 3];
        let r =
            f.h.handle(&req(Kind::Echo, Method::Post, "user-a", "", &payload));
        assert_eq!(
            r,
            HandlerReply {
                status: 200,
                error_code: "",
                body: payload.to_vec()
            }
        );
        let r =
            f.h.handle(&req(Kind::Echo, Method::Post, "user-a", "", b""));
        assert_eq!((r.status, r.body.len()), (200, 0));
    }

    #[test]
    fn health_reports_identity() {
        let mut f = fixture();
        let r =
            f.h.handle(&req(Kind::HealthCheck, Method::Get, "", "", b""));
        assert_eq!(r.status, 200);
        let v = body(&r);
        assert_eq!(v["status"], "ok");
        assert_eq!(v["workerId"], "worker-1");
        assert_eq!(v["pid"], 4321);
        assert!(v["uptimeMs"].is_u64());
    }

    /// Only in a build without the feature (`cargo test` always has it, through the
    /// dev-dependency): the fault kind does not exist, so no request can reach fault code.
    #[cfg(not(feature = "fault-injection"))]
    #[test]
    fn without_fault_injection_there_is_no_test_kind() {
        assert_eq!(Kind::parse("test"), None);
    }

    #[test]
    fn test_alloc_and_slow() {
        let mut f = fixture();
        let r = f.h.handle(&req(
            Kind::Test,
            Method::Post,
            "u",
            "alloc",
            br#"{"mib": 1}"#,
        ));
        assert_eq!(r.status, 200);
        let v = body(&r);
        assert_eq!(v["allocatedMib"], 1);
        assert!(v["totalLeakedMib"].as_u64().unwrap() >= 1);
        let r = f.h.handle(&req(
            Kind::Test,
            Method::Post,
            "u",
            "alloc",
            br#"{"mib": 99999999}"#,
        ));
        assert_error(&r, 400, "INVALID_PAYLOAD");
        let r =
            f.h.handle(&req(Kind::Test, Method::Post, "u", "alloc", b"x"));
        assert_error(&r, 400, "INVALID_PAYLOAD");
        let r =
            f.h.handle(&req(Kind::Test, Method::Post, "u", "slow", br#"{"ms": 1}"#));
        assert_eq!(body(&r)["sleptMs"], 1);
        let r = f.h.handle(&req(
            Kind::Test,
            Method::Post,
            "u",
            "slow",
            br#"{"ms": 99999999}"#,
        ));
        assert_error(&r, 400, "INVALID_PAYLOAD");
        let r =
            f.h.handle(&req(Kind::Test, Method::Post, "u", "teleport", b""));
        assert_error(&r, 404, "UNKNOWN_TEST_ACTION");
    }

    #[test]
    fn test_escape_reports_per_path() {
        let mut f = fixture();
        let file = f.root.join("sessions/f.txt");
        fs::write(&file, "x").unwrap();
        let dir = f.root.join("state");
        let missing = f.root.join("missing");
        let payload = json!({"paths": [file, dir, missing]}).to_string();
        let r = f.h.handle(&req(
            Kind::Test,
            Method::Post,
            "u",
            "escape",
            payload.as_bytes(),
        ));
        assert_eq!(r.status, 200);
        let v = body(&r);
        let res = v["results"].as_array().unwrap();
        assert_eq!(res[0]["isDir"], false);
        assert_eq!(res[0]["read"]["ok"], true);
        assert_eq!(res[0]["list"], Value::Null);
        assert_eq!(res[1]["isDir"], true);
        assert_eq!(res[1]["read"]["ok"], true);
        assert_eq!(res[1]["list"]["ok"], true);
        assert_eq!(res[1]["create"]["ok"], true);
        assert_eq!(res[2]["read"]["ok"], false);
        assert!(res[2]["read"]["error"].as_str().is_some());
        // The probe file was cleaned up.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        let too_many = json!({"paths": vec!["/"; MAX_ESCAPE_PATHS + 1]}).to_string();
        let r = f.h.handle(&req(
            Kind::Test,
            Method::Post,
            "u",
            "escape",
            too_many.as_bytes(),
        ));
        assert_error(&r, 400, "INVALID_PAYLOAD");
    }

    #[test]
    fn test_signal_probes_without_signalling() {
        let mut f = fixture();
        let me = std::process::id();
        let payload = json!({"pids": [me, 0, u32::MAX, i32::MAX as u32]}).to_string();
        let r = f.h.handle(&req(
            Kind::Test,
            Method::Post,
            "u",
            "signal",
            payload.as_bytes(),
        ));
        assert_eq!(r.status, 200);
        let v = body(&r);
        let res = v["results"].as_array().unwrap();
        assert_eq!(res.len(), 4);
        // Our own process: allowed (and still alive: signal 0 delivers nothing).
        assert_eq!(res[0]["pid"], me);
        assert_eq!(res[0]["ok"], true, "{v}");
        // Pid 0 (our process group) and pids beyond i32 are refused, not probed.
        assert_eq!(res[1]["ok"], false, "{v}");
        assert_eq!(res[2]["ok"], false, "{v}");
        // A pid above pid_max does not exist.
        assert_eq!(res[3]["ok"], false, "{v}");
        assert!(res[3]["error"].as_str().is_some(), "{v}");
        let too_many = json!({"pids": vec![me; MAX_ESCAPE_PATHS + 1]}).to_string();
        let r = f.h.handle(&req(
            Kind::Test,
            Method::Post,
            "u",
            "signal",
            too_many.as_bytes(),
        ));
        assert_error(&r, 400, "INVALID_PAYLOAD");
        let r =
            f.h.handle(&req(Kind::Test, Method::Post, "u", "signal", b"{}"));
        assert_error(&r, 400, "INVALID_PAYLOAD");
    }

    #[test]
    fn replies_are_kept_within_the_reply_budget() {
        let mut f = fixture();
        f.h.set_max_reply_bytes(4096);
        // Control characters escape to six bytes each: 1000 of them do not fit.
        let ctrl = "\u{1}".repeat(1000);
        let r = f.message("user-a", ctrl.as_bytes());
        assert_error(&r, 413, "MESSAGE_TOO_LARGE");
        assert!(
            !f.session_log("user-a").exists(),
            "a refused turn was recorded"
        );
        // History returns the newest turns that fit and says it truncated.
        for i in 0..20 {
            let m = format!("{i:02}{}", "x".repeat(300));
            assert_eq!(f.message("user-a", m.as_bytes()).status, 200);
        }
        let r = f.command("user-a", "history");
        assert!(r.body.len() <= 4096, "{}", r.body.len());
        let v = body(&r);
        assert_eq!(v["turns"], 20);
        assert_eq!(v["truncated"], true);
        let hist = v["history"].as_array().unwrap();
        assert!(!hist.is_empty() && hist.len() < 20);
        assert!(
            hist.last().unwrap()["message"]
                .as_str()
                .unwrap()
                .starts_with("19")
        );
        // Anything else too large becomes REPLY_TOO_LARGE.
        let big = vec![b'a'; 5000];
        let r =
            f.h.handle(&req(Kind::Echo, Method::Post, "user-a", "", &big));
        assert_error(&r, 500, "REPLY_TOO_LARGE");
        f.h.set_max_reply_bytes(usize::MAX);
        let v = body(&f.command("user-a", "history"));
        assert_eq!(v["truncated"], false);
        assert_eq!(v["history"].as_array().unwrap().len(), 20);
    }

    #[test]
    fn storage_failures_are_500_not_panics() {
        let mut f = fixture();
        // A directory where the session log should be: append fails.
        fs::create_dir_all(f.session_log("user-a")).unwrap();
        assert_error(&f.message("user-a", b"hi"), 500, "STORAGE_ERROR");
        // state/<user> is a file: storing fails.
        fs::write(f.root.join("state/user-b"), "x").unwrap();
        assert_error(
            &f.session(Method::Put, "user-b", "n", b"1"),
            500,
            "STORAGE_ERROR",
        );
        // The worker keeps serving.
        assert_eq!(f.message("user-c", b"hi").status, 200);
    }
}
