//! The stand-in agent's side of the OpenClaw gateway protocol: one `req` frame's method and
//! params, answered with the payload of its `res` (or the error object), with the events of a
//! run sent ahead through [`Emit`].
//!
//! Methods: `health`, `status`, `sessions.list`, `chat.history`, and the two-stage `agent` and
//! `chat.send`. Each user has one conversation, the session log that `agent:message` writes
//! (`sessions/<stem>.jsonl`), under the session key `agent:main:main` (`main` for short): REST
//! and RPC turns land in the same history. Anything else is `INVALID_REQUEST`.
//!
//! A run (`agent`, `chat.send`) that streams: the `accepted` answer (`{"runId", "status":
//! "accepted", "acceptedAt"}`), then `agent` events (`AgentEvent` of the protocol schema:
//! `lifecycle` start, `assistant` with the cumulative text and its delta word by word,
//! `lifecycle` end) each followed by its `chat` event (`ChatEvent`: `delta` with `deltaText`,
//! then `final` with the whole message), then the final answer. The run id is the client's
//! `idempotencyKey`, untouched. Errors found before the run starts (bad params, a reply that
//! would not fit) are the only answer; a failure while recording the turn ends the run with a
//! lifecycle `error` and a chat `error` event before the error answer.
//!
//! Error answers carry a protocol error code: `INVALID_REQUEST` (bad params, unknown method),
//! `NOT_FOUND` (a session key other than the user's conversation) or `UNAVAILABLE` (the
//! worker's storage failed; `retryable` when it is full).

use std::time::SystemTime;

use moltbot_ipc::ArchivedRequest;
use moltbot_ipc::clock::monotonic_us;
use serde_json::{Map, Value, json};

use super::agent::scan_turns;
use super::{Fail, HandlerReply, Handlers, Outcome};
use crate::user::validate_user_id;
use crate::worker::lane::Emit;

/// The key of each user's one conversation, as the real gateway names its main session.
pub(super) const MAIN_SESSION_KEY: &str = "agent:main:main";

/// The one agent of this worker.
const AGENT_ID: &str = "main";

/// Longest run id (`idempotencyKey`) accepted: the protocol bounds run ids to 256 elsewhere.
const MAX_RUN_ID: usize = 256;

/// `chat.history` without a `limit`: this many messages at most.
const DEFAULT_HISTORY_MESSAGES: u64 = 200;

/// `chat.history`: the largest `limit` the schema allows.
const MAX_HISTORY_MESSAGES: u64 = 1000;

/// A reply goes out in at most this many deltas: longer replies are cut into fewer, larger
/// pieces rather than one event per word.
const MAX_DELTAS: usize = 64;

/// Room kept in the reply budget for the JSON around the messages of `chat.history`.
const HISTORY_ENVELOPE: usize = 1024;

impl Handlers {
    /// `rpc`: the method is the request's path, its params the body (JSON, `null` if absent).
    pub(super) fn rpc(&mut self, req: &ArchivedRequest<'_>, emit: &mut dyn Emit) -> Outcome {
        Ok(match self.rpc_method(req, emit) {
            Ok(reply) => reply,
            Err(f) => rpc_error(f),
        })
    }

    fn rpc_method(&mut self, req: &ArchivedRequest<'_>, emit: &mut dyn Emit) -> Outcome {
        let method: &str = &req.path;
        let params: Value = serde_json::from_slice(&req.body)
            .map_err(|e| Fail::bad("INVALID_REQUEST", format!("params are not JSON: {e}")))?;
        match method {
            "health" => Ok(HandlerReply::json(&json!({
                "ok": true,
                "ts": now_ms(),
                "workerId": self.worker_id,
                "pid": self.pid,
                "uptimeMs": self.uptime_ms(),
            }))),
            "status" => {
                object(method, &params)?;
                let user = rpc_user(req)?;
                let path = self.session_file(user);
                let turns = self.turn_count(user, &path)?;
                let sessions = u8::from(path.exists());
                Ok(HandlerReply::json(&json!({
                    "ok": true,
                    "workerId": self.worker_id,
                    "pid": self.pid,
                    "uptimeMs": self.uptime_ms(),
                    "agentId": AGENT_ID,
                    "sessions": { "count": sessions, "turns": turns },
                })))
            }
            "sessions.list" => self.sessions_list(req, &params),
            "chat.history" => self.chat_history(req, &params),
            "agent" => {
                let p = object(method, &params)?;
                let message = required_text(method, p, "message")?;
                let run_id = run_id(method, p)?;
                let session_key = match optional_text(method, p, "sessionKey")? {
                    Some(k) => conversation(k)?,
                    None => MAIN_SESSION_KEY,
                };
                if let Some(agent) = optional_text(method, p, "agentId")? {
                    known_agent(agent)?;
                }
                self.run(req, RunKind::Agent, message, run_id, session_key, emit)
            }
            "chat.send" => {
                let p = object(method, &params)?;
                let session_key = conversation(required_text(method, p, "sessionKey")?)?;
                let message = required_text(method, p, "message")?;
                let run_id = run_id(method, p)?;
                if let Some(agent) = optional_text(method, p, "agentId")? {
                    known_agent(agent)?;
                }
                self.run(req, RunKind::Chat, message, run_id, session_key, emit)
            }
            other => Err(Fail::bad(
                "INVALID_REQUEST",
                format!(
                    "unknown method {:?}; this agent serves health, status, sessions.list, \
                     chat.history, agent and chat.send",
                    other.chars().take(64).collect::<String>()
                ),
            )),
        }
    }

    fn uptime_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// One turn of the stand-in agent, as `agent` or `chat.send`: recorded in the user's
    /// session log like `agent:message`, streamed when the caller takes events.
    fn run(
        &mut self,
        req: &ArchivedRequest<'_>,
        kind: RunKind,
        message: &str,
        run_id: &str,
        session_key: &str,
        emit: &mut dyn Emit,
    ) -> Outcome {
        let user = rpc_user(req)?;
        let turn = self.prepare_turn(user, message, |_, _, reply| match kind {
            RunKind::Agent => HandlerReply::json(&json!({
                "runId": run_id,
                "status": "ok",
                "summary": "completed",
                "result": { "payloads": [{ "text": reply }] },
            })),
            RunKind::Chat => HandlerReply::json(&json!({
                "runId": run_id,
                "status": "ok",
                "message": assistant_message(reply, now_ms()),
            })),
        })?;
        if !emit.streams() {
            return self.commit_turn(user, turn);
        }
        if let Ok(accepted) = serde_json::to_vec(&json!({
            "runId": run_id,
            "status": "accepted",
            "acceptedAt": now_ms(),
        })) {
            emit.accepted(&accepted);
        }
        self.stream_turn(user, turn, Run::new(run_id, Some(session_key)), emit)
    }

    /// `sessions.list`: the user's conversation, once it has a session log.
    fn sessions_list(&mut self, req: &ArchivedRequest<'_>, params: &Value) -> Outcome {
        let method = "sessions.list";
        let p = object(method, params)?;
        if let Some(limit) = p.get("limit")
            && limit.as_u64().is_none_or(|n| n < 1)
        {
            return Err(invalid(method, "limit must be an integer of at least 1"));
        }
        let last_message = optional_bool(method, p, "includeLastMessage")?.unwrap_or(false);
        if let Some(agent) = optional_text(method, p, "agentId")? {
            known_agent(agent)?;
        }
        let user = rpc_user(req)?;
        let path = self.session_file(user);
        let updated_at = match std::fs::metadata(&path) {
            Ok(m) => m.modified().ok().map(ms_since_epoch),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(HandlerReply::json(&json!({
                    "ts": now_ms(),
                    "count": 0,
                    "sessions": [],
                })));
            }
            Err(e) => return Err(Fail::storage("read the session log", e)),
        };
        let mut row = json!({
            "key": MAIN_SESSION_KEY,
            "kind": "direct",
            "chatType": "direct",
            "agentId": AGENT_ID,
            "isMain": true,
            "displayName": "main",
            "updatedAt": updated_at,
        });
        if last_message {
            let scan =
                scan_turns(&path, 1).map_err(|e| Fail::storage("read the session log", e))?;
            if let Some(reply) = scan.last.back().and_then(|(t, _)| t["reply"].as_str()) {
                row["lastMessagePreview"] = json!(reply.chars().take(120).collect::<String>());
            }
        }
        Ok(HandlerReply::json(&json!({
            "ts": now_ms(),
            "count": 1,
            "sessions": [row],
        })))
    }

    /// `chat.history`: the last messages of the user's conversation (two per turn: the user's
    /// message and the reply), oldest first, as many as `limit` and the reply budget allow.
    fn chat_history(&mut self, req: &ArchivedRequest<'_>, params: &Value) -> Outcome {
        let method = "chat.history";
        let p = object(method, params)?;
        let session_key = required_text(method, p, "sessionKey")?;
        conversation(session_key)?;
        let limit = match p.get("limit") {
            None => DEFAULT_HISTORY_MESSAGES,
            Some(v) => v
                .as_u64()
                .filter(|n| (1..=MAX_HISTORY_MESSAGES).contains(n))
                .ok_or_else(|| {
                    invalid(
                        method,
                        format!("limit must be an integer from 1 to {MAX_HISTORY_MESSAGES}"),
                    )
                })?,
        };
        if let Some(agent) = optional_text(method, p, "agentId")? {
            known_agent(agent)?;
        }
        let user = rpc_user(req)?;
        let path = self.session_file(user);
        // `limit` is at most 1000, so the turns kept fit in memory whatever the log's size.
        let turns = limit.div_ceil(2) as usize;
        let scan =
            scan_turns(&path, turns).map_err(|e| Fail::storage("read the session log", e))?;
        // Newest first within the budget and the limit, then back in conversation order.
        let budget = self.max_reply_bytes.saturating_sub(HISTORY_ENVELOPE);
        let mut used = 0usize;
        let mut messages: Vec<Value> = Vec::new();
        'turns: for (turn, _) in scan.last.iter().rev() {
            let (Some(message), Some(reply)) = (turn["message"].as_str(), turn["reply"].as_str())
            else {
                continue;
            };
            let ts = turn["ts"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .map_or(0, ms_since_epoch);
            for m in [assistant_message(reply, ts), user_message(message, ts)] {
                let len = serde_json::to_vec(&m).map_or(usize::MAX, |b| b.len() + 1);
                used = used.saturating_add(len);
                if used > budget || messages.len() as u64 >= limit {
                    break 'turns;
                }
                messages.push(m);
            }
        }
        messages.reverse();
        Ok(HandlerReply::json(&json!({
            "sessionKey": session_key,
            "messages": messages,
        })))
    }
}

/// Which method runs a turn: their final answers differ.
#[derive(Clone, Copy)]
enum RunKind {
    Agent,
    Chat,
}

/// The events of one run of the stand-in agent, numbered in order: `agent` events per the
/// protocol's `AgentEvent`, each followed (when the run belongs to a chat session) by the
/// `chat` event (`ChatEvent`) that carries the same `seq`.
pub(super) struct Run<'a> {
    run_id: &'a str,
    session_key: Option<&'a str>,
    /// The last `seq` used; the first event is 1.
    seq: u64,
    started_at: u64,
}

impl<'a> Run<'a> {
    /// A run named `run_id`; `session_key` adds the `chat` events of that session.
    pub(super) fn new(run_id: &'a str, session_key: Option<&'a str>) -> Self {
        Run {
            run_id,
            session_key,
            seq: 0,
            started_at: now_ms(),
        }
    }

    /// An `agent` event. Its `data` carries `emittedUs`: the worker's monotonic clock when it
    /// emitted the event (one clock for every process on the host), so that a load generator
    /// on the host can tell what the gateway adds to each event (`moltbot-bench`).
    fn agent(&mut self, emit: &mut dyn Emit, stream: &str, mut data: Value) -> u64 {
        if let Some(fields) = data.as_object_mut() {
            fields.insert("emittedUs".into(), monotonic_us().into());
        }
        self.seq += 1;
        send(
            emit,
            "agent",
            &json!({
                "runId": self.run_id,
                "seq": self.seq,
                "stream": stream,
                "ts": now_ms(),
                "data": data,
            }),
        );
        self.seq
    }

    fn chat(&self, emit: &mut dyn Emit, seq: u64, state: &str, fields: Value) {
        let Some(session_key) = self.session_key else {
            return;
        };
        let mut payload = json!({
            "runId": self.run_id,
            "sessionKey": session_key,
            "seq": seq,
            "state": state,
        });
        if let (Value::Object(p), Value::Object(f)) = (&mut payload, fields) {
            p.extend(f);
        }
        send(emit, "chat", &payload);
    }

    /// `lifecycle` start.
    pub(super) fn start(&mut self, emit: &mut dyn Emit) {
        let data = json!({ "phase": "start", "startedAt": self.started_at });
        self.agent(emit, "lifecycle", data);
    }

    /// The reply, word by word: `assistant` events with the text so far and the new piece,
    /// and `chat` deltas.
    pub(super) fn reply(&mut self, emit: &mut dyn Emit, text: &str) {
        let mut end = 0;
        for piece in pieces(text, MAX_DELTAS) {
            end += piece.len();
            let so_far = &text[..end];
            let seq = self.agent(emit, "assistant", json!({ "text": so_far, "delta": piece }));
            let message = assistant_message(so_far, now_ms());
            self.chat(
                emit,
                seq,
                "delta",
                json!({ "deltaText": piece, "message": message }),
            );
        }
    }

    /// `lifecycle` end and the chat's `final` with the whole reply.
    pub(super) fn end(&mut self, emit: &mut dyn Emit, text: &str) {
        let now = now_ms();
        let data = json!({ "phase": "end", "startedAt": self.started_at, "endedAt": now });
        let seq = self.agent(emit, "lifecycle", data);
        let message = assistant_message(text, now);
        self.chat(
            emit,
            seq,
            "final",
            json!({ "message": message, "stopReason": "stop" }),
        );
    }

    /// `lifecycle` error and the chat's `error`: the run failed with `message`.
    pub(super) fn fail(&mut self, emit: &mut dyn Emit, message: &str) {
        let data = json!({
            "phase": "error",
            "startedAt": self.started_at,
            "endedAt": now_ms(),
            "error": message,
        });
        let seq = self.agent(emit, "lifecycle", data);
        self.chat(
            emit,
            seq,
            "error",
            json!({ "errorMessage": message, "errorKind": "unknown" }),
        );
    }
}

fn send(emit: &mut dyn Emit, name: &str, payload: &Value) {
    // A `Value` always serializes (its keys are strings); nothing is sent if it ever did not.
    if let Ok(bytes) = serde_json::to_vec(payload) {
        emit.event(name, &bytes);
    }
}

/// `text` cut before each run of whitespace that follows a word ("echo: hi there" → "echo:",
/// " hi", " there"), so that the pieces concatenate back to `text`; at most `max` pieces (more
/// words are grouped, several per piece).
fn pieces(text: &str, max: usize) -> Vec<&str> {
    let mut cuts = vec![0];
    let mut after_word = false;
    for (i, c) in text.char_indices() {
        let space = c.is_whitespace();
        if space && after_word {
            cuts.push(i);
        }
        after_word = !space;
    }
    if cuts.len() > max.max(1) {
        let step = cuts.len().div_ceil(max.max(1));
        cuts = cuts.into_iter().step_by(step).collect();
    }
    cuts.push(text.len());
    cuts.windows(2)
        .map(|w| &text[w[0]..w[1]])
        .filter(|p| !p.is_empty())
        .collect()
}

/// A chat message of the protocol's transcript shape.
fn chat_message(role: &str, text: &str, timestamp: u64) -> Value {
    json!({
        "role": role,
        "content": [{ "type": "text", "text": text }],
        "timestamp": timestamp,
    })
}

fn assistant_message(text: &str, timestamp: u64) -> Value {
    chat_message("assistant", text, timestamp)
}

fn user_message(text: &str, timestamp: u64) -> Value {
    chat_message("user", text, timestamp)
}

/// An error answer of the protocol: the code one of its own, the body its error object.
fn rpc_error(f: Fail) -> HandlerReply {
    let (code, retryable) = match (f.status, f.code) {
        (507, _) => ("UNAVAILABLE", Some(true)),
        (500.., _) => ("UNAVAILABLE", None),
        (404, _) => ("NOT_FOUND", None),
        _ => ("INVALID_REQUEST", None),
    };
    let mut body = json!({ "message": f.message });
    if let Some(r) = retryable {
        body["retryable"] = json!(r);
    }
    HandlerReply {
        status: f.status,
        error_code: code,
        body: serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"message\":\"error\"}".to_vec()),
    }
}

fn rpc_user<'r>(req: &'r ArchivedRequest<'_>) -> Result<&'r str, Fail> {
    validate_user_id(&req.user_id).map_err(|e| Fail::bad("INVALID_REQUEST", e.to_string()))
}

fn invalid(method: &str, why: impl std::fmt::Display) -> Fail {
    Fail::bad("INVALID_REQUEST", format!("invalid {method} params: {why}"))
}

/// The params as an object; absent params (`null`) are an empty one.
fn object<'p>(method: &str, params: &'p Value) -> Result<&'p Map<String, Value>, Fail> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    match params {
        Value::Object(m) => Ok(m),
        Value::Null => Ok(EMPTY.get_or_init(Map::new)),
        _ => Err(invalid(method, "params must be an object")),
    }
}

fn optional_text<'p>(
    method: &str,
    p: &'p Map<String, Value>,
    key: &str,
) -> Result<Option<&'p str>, Fail> {
    match p.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(method, format!("{key} must be a string"))),
    }
}

/// A string property that must be present and not empty.
fn required_text<'p>(method: &str, p: &'p Map<String, Value>, key: &str) -> Result<&'p str, Fail> {
    match optional_text(method, p, key)? {
        None => Err(invalid(
            method,
            format!("must have required property '{key}'"),
        )),
        Some("") => Err(invalid(method, format!("{key} must not be empty"))),
        Some(s) => Ok(s),
    }
}

fn optional_bool(method: &str, p: &Map<String, Value>, key: &str) -> Result<Option<bool>, Fail> {
    match p.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid(method, format!("{key} must be a boolean"))),
    }
}

/// The run id: the `idempotencyKey`, as the client sent it.
fn run_id<'p>(method: &str, p: &'p Map<String, Value>) -> Result<&'p str, Fail> {
    let key = required_text(method, p, "idempotencyKey")?;
    if key.len() > MAX_RUN_ID {
        return Err(invalid(
            method,
            format!("idempotencyKey must be at most {MAX_RUN_ID} bytes"),
        ));
    }
    Ok(key)
}

/// `key` if it names the user's conversation (`main` or `agent:main:main`).
fn conversation(key: &str) -> Result<&str, Fail> {
    if key == MAIN_SESSION_KEY || key == "main" {
        Ok(key)
    } else {
        Err(Fail::new(
            404,
            "NOT_FOUND",
            format!(
                "no session {:?}: each user has one conversation, {MAIN_SESSION_KEY:?} (or \"main\")",
                key.chars().take(128).collect::<String>()
            ),
        ))
    }
}

fn known_agent(agent: &str) -> Result<(), Fail> {
    if agent == AGENT_ID {
        Ok(())
    } else {
        Err(Fail::new(
            404,
            "NOT_FOUND",
            format!(
                "unknown agent id {:?}; this worker runs {AGENT_ID:?}",
                agent.chars().take(128).collect::<String>()
            ),
        ))
    }
}

fn ms_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn now_ms() -> u64 {
    ms_since_epoch(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use moltbot_ipc::{Kind, Method, Request};
    use serde_json::{Value, json};

    use super::super::testing::{Recorded, Recorder, assert_error, body, fixture, handle};
    use super::*;

    /// The protocol's `AgentEvent` and `ChatEvent` definitions (from the npm package).
    fn schema(name: &str) -> Value {
        let all: Value = serde_json::from_str(include_str!(
            "../../../tests/data/openclaw-events.schema.json"
        ))
        .unwrap();
        all["definitions"][name].clone()
    }

    /// Checks `v` against the JSON Schema keywords these definitions use.
    fn check(schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        if let Some(variants) = schema["anyOf"].as_array() {
            let errors: Vec<String> = variants
                .iter()
                .filter_map(|s| check(s, v, at).err())
                .collect();
            return if errors.len() < variants.len() {
                Ok(())
            } else {
                Err(format!("{at}: no variant matches: {errors:?}"))
            };
        }
        if let Some(c) = schema.get("const")
            && c != v
        {
            return Err(format!("{at}: {v} is not {c}"));
        }
        let ok = match schema["type"].as_str() {
            None => true,
            Some("object") => v.is_object(),
            Some("string") => v.is_string(),
            Some("integer") => v.is_i64() || v.is_u64(),
            Some("number") => v.is_number(),
            Some("boolean") => v.is_boolean(),
            Some("array") => v.is_array(),
            Some(other) => return Err(format!("{at}: unsupported type {other}")),
        };
        if !ok {
            return Err(format!("{at}: {v} is not of type {}", schema["type"]));
        }
        if let (Some(s), Some(min)) = (v.as_str(), schema["minLength"].as_u64())
            && (s.chars().count() as u64) < min
        {
            return Err(format!("{at}: shorter than {min}"));
        }
        if let (Some(n), Some(min)) = (v.as_f64(), schema["minimum"].as_f64())
            && n < min
        {
            return Err(format!("{at}: below {min}"));
        }
        if let Some(obj) = v.as_object() {
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                if !obj.contains_key(r) {
                    return Err(format!("{at}: missing {r}"));
                }
            }
            let props = schema["properties"].as_object();
            let any_name = schema["patternProperties"].get("^.*$").is_some();
            for (k, value) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => check(s, value, &format!("{at}.{k}"))?,
                    None if any_name || schema["additionalProperties"] != false => {}
                    None => return Err(format!("{at}: property {k} is not allowed")),
                }
            }
        }
        Ok(())
    }

    fn assert_valid(definition: &str, v: &Value) {
        if let Err(e) = check(&schema(definition), v, definition) {
            panic!("{e}\n{v:#}");
        }
    }

    #[test]
    fn the_schema_check_refuses_what_the_schema_refuses() {
        let good = json!({"runId": "r", "seq": 1, "stream": "lifecycle", "ts": 5, "data": {}});
        assert_valid("AgentEvent", &good);
        let mut extra = good.clone();
        extra["sessionKey"] = json!("main");
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("ts");
        let mut empty_run = good.clone();
        empty_run["runId"] = json!("");
        for bad in [extra, missing, empty_run] {
            assert!(check(&schema("AgentEvent"), &bad, "").is_err(), "{bad}");
        }
        let delta = json!({"runId": "r", "sessionKey": "main", "seq": 1, "state": "delta",
            "deltaText": "x"});
        assert_valid("ChatEvent", &delta);
        let mut no_text = delta.clone();
        no_text.as_object_mut().unwrap().remove("deltaText");
        assert!(check(&schema("ChatEvent"), &no_text, "").is_err());
        let mut bad_state = delta;
        bad_state["state"] = json!("streaming");
        assert!(check(&schema("ChatEvent"), &bad_state, "").is_err());
    }

    fn agent_params(message: &str, key: &str) -> Value {
        json!({"message": message, "idempotencyKey": key})
    }

    #[test]
    fn health_names_the_worker() {
        let mut f = fixture();
        for params in [Value::Null, json!({})] {
            let (r, rec) = f.rpc("user-a", "health", params, true);
            assert_eq!((r.status, r.error_code), (200, ""));
            let v = body(&r);
            assert_eq!(v["ok"], true);
            assert_eq!(v["workerId"], "worker-1");
            assert_eq!(v["pid"], 4321);
            assert!(v["uptimeMs"].is_u64() && v["ts"].is_u64());
            assert!(rec.parts.is_empty());
        }
    }

    #[test]
    fn an_agent_run_streams_accepted_then_events_then_the_final_answer() {
        let mut f = fixture();
        // Run ids come back byte for byte, whatever they hold.
        let key = " Run/Key ü\"1 ";
        let (r, rec) = f.rpc(
            "user-a",
            "agent",
            agent_params("hello brave new world", key),
            true,
        );
        assert_eq!((r.status, r.error_code), (200, ""));
        let reply = "echo: hello brave new world";
        assert_eq!(
            body(&r),
            json!({"runId": key, "status": "ok", "summary": "completed",
                "result": {"payloads": [{"text": reply}]}})
        );

        let Recorded::Accepted(accepted) = &rec.parts[0] else {
            panic!(
                "the first part is not the accepted answer: {:?}",
                rec.parts[0]
            );
        };
        assert_eq!(accepted["runId"], key);
        assert_eq!(accepted["status"], "accepted");
        assert!(accepted["acceptedAt"].as_u64().unwrap() > 1_600_000_000_000);
        assert_eq!(accepted.as_object().unwrap().len(), 3);
        assert!(
            rec.parts[1..]
                .iter()
                .all(|p| matches!(p, Recorded::Event(..)))
        );

        let agent = rec.events("agent");
        for e in &agent {
            assert_valid("AgentEvent", e);
            assert_eq!(e["runId"], key);
        }
        let seqs: Vec<u64> = agent.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=agent.len() as u64).collect::<Vec<_>>());
        assert_eq!(agent[0]["stream"], "lifecycle");
        assert_eq!(agent[0]["data"]["phase"], "start");
        let last = agent.last().unwrap();
        assert_eq!(last["stream"], "lifecycle");
        assert_eq!(last["data"]["phase"], "end");
        // Every event is stamped with the worker's monotonic clock, in emission order.
        let stamps: Vec<u64> = agent
            .iter()
            .map(|e| e["data"]["emittedUs"].as_u64().expect("emittedUs"))
            .collect();
        assert!(
            stamps[0] > 0 && stamps.windows(2).all(|w| w[0] <= w[1]),
            "{stamps:?}"
        );
        let assistant = &agent[1..agent.len() - 1];
        assert_eq!(assistant.len(), 5, "one delta per word: {assistant:?}");
        let mut text = String::new();
        for e in assistant {
            assert_eq!(e["stream"], "assistant");
            text.push_str(e["data"]["delta"].as_str().unwrap());
            assert_eq!(e["data"]["text"], text.as_str(), "cumulative text");
        }
        assert_eq!(text, reply);

        // Each chat event follows the agent event whose seq it carries.
        let mut previous_agent_seq = None;
        for p in &rec.parts[1..] {
            let Recorded::Event(name, v) = p else {
                unreachable!()
            };
            match name.as_str() {
                "agent" => previous_agent_seq = v["seq"].as_u64(),
                "chat" => {
                    assert_valid("ChatEvent", v);
                    assert_eq!(v["seq"].as_u64(), previous_agent_seq);
                    assert_eq!(v["runId"], key);
                    assert_eq!(v["sessionKey"], MAIN_SESSION_KEY);
                }
                other => panic!("unexpected event {other}"),
            }
        }
        let chat = rec.events("chat");
        assert_eq!(chat.len(), assistant.len() + 1);
        let deltas: String = chat[..chat.len() - 1]
            .iter()
            .map(|c| {
                assert_eq!(c["state"], "delta");
                c["deltaText"].as_str().unwrap()
            })
            .collect();
        assert_eq!(deltas, reply);
        let fin = chat.last().unwrap();
        assert_eq!(fin["state"], "final");
        assert_eq!(fin["message"]["role"], "assistant");
        assert_eq!(fin["message"]["content"][0]["text"], reply);
    }

    #[test]
    fn without_stream_a_run_emits_nothing_and_answers_the_same() {
        let mut f = fixture();
        // The recorder fails the test if anything is offered to it.
        let (r, rec) = f.rpc("user-a", "agent", agent_params("hi there", "k-1"), false);
        assert_eq!(r.status, 200);
        assert!(rec.parts.is_empty());
        assert_eq!(body(&r)["result"]["payloads"][0]["text"], "echo: hi there");
        let (r, rec) = f.rpc(
            "user-a",
            "chat.send",
            json!({"sessionKey": "main", "message": "yo", "idempotencyKey": "k-2"}),
            false,
        );
        assert_eq!(body(&r)["runId"], "k-2");
        assert!(rec.parts.is_empty());
        assert_eq!(body(&f.command("user-a", "stats"))["turns"], 2);
    }

    #[test]
    fn chat_send_streams_chat_events_under_the_session_key_it_was_given() {
        let mut f = fixture();
        let params = json!({"sessionKey": "main", "message": "one two", "idempotencyKey": "c-9"});
        let (r, rec) = f.rpc("user-a", "chat.send", params, true);
        assert_eq!((r.status, r.error_code), (200, ""));
        let v = body(&r);
        assert_eq!(v["runId"], "c-9");
        assert_eq!(v["status"], "ok");
        assert_eq!(v["message"]["content"][0]["text"], "echo: one two");
        assert!(matches!(&rec.parts[0], Recorded::Accepted(a) if a["runId"] == "c-9"));
        let chat = rec.events("chat");
        assert_eq!(chat.len(), 4, "three words, then final: {chat:?}");
        for c in &chat {
            assert_valid("ChatEvent", c);
            assert_eq!(c["sessionKey"], "main");
        }
        assert_eq!(chat[3]["state"], "final");
        for e in rec.events("agent") {
            assert_valid("AgentEvent", e);
        }
    }

    #[test]
    fn rpc_and_rest_turns_share_one_history() {
        let mut f = fixture();
        assert_eq!(body(&f.message("user-a", b"first"))["turn"], 1);
        let (r, _) = f.rpc("user-a", "agent", agent_params("second", "k"), true);
        assert_eq!(r.status, 200);
        assert_eq!(body(&f.message("user-a", b"third"))["turn"], 3);
        let (r, _) = f.rpc(
            "user-a",
            "chat.send",
            json!({"sessionKey": MAIN_SESSION_KEY, "message": "fourth", "idempotencyKey": "k2"}),
            false,
        );
        assert_eq!(r.status, 200);

        // REST sees the RPC turns, recorded like its own.
        let h = body(&f.command("user-a", "history"));
        let messages: Vec<&str> = h["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["message"].as_str().unwrap())
            .collect();
        assert_eq!(messages, ["first", "second", "third", "fourth"]);
        let line: Value = serde_json::from_str(
            fs::read_to_string(f.session_log("user-a"))
                .unwrap()
                .lines()
                .nth(1)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(line["userId"], "user-a");
        assert_eq!(line["reply"], "echo: second");
        assert!(humantime::parse_rfc3339(line["ts"].as_str().unwrap()).is_ok());

        // RPC sees the REST turns.
        let (r, _) = f.rpc(
            "user-a",
            "chat.history",
            json!({"sessionKey": "main"}),
            false,
        );
        let v = body(&r);
        assert_eq!(v["sessionKey"], "main");
        let texts: Vec<(&str, &str)> = v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                assert!(m["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
                (
                    m["role"].as_str().unwrap(),
                    m["content"][0]["text"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(texts.len(), 8);
        assert_eq!(texts[0], ("user", "first"));
        assert_eq!(texts[1], ("assistant", "echo: first"));
        assert_eq!(texts[7], ("assistant", "echo: fourth"));
        let (r, _) = f.rpc("user-a", "status", Value::Null, false);
        assert_eq!(body(&r)["sessions"], json!({"count": 1, "turns": 4}));
    }

    #[test]
    fn chat_history_limit_and_budget() {
        let mut f = fixture();
        for i in 1..=5 {
            f.message("user-a", format!("m{i}").as_bytes());
        }
        let history = |f: &mut super::super::testing::Fixture, params: Value| {
            let (r, _) = f.rpc("user-a", "chat.history", params, false);
            assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
            body(&r)["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["content"][0]["text"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            history(&mut f, json!({"sessionKey": "main", "limit": 3})),
            ["echo: m4", "m5", "echo: m5"]
        );
        assert_eq!(
            history(&mut f, json!({"sessionKey": "main", "limit": 1000})).len(),
            10
        );
        // A small reply budget: the newest messages that fit, the answer within it.
        f.h.set_max_reply_bytes(HISTORY_ENVELOPE + 300);
        let (r, _) = f.rpc(
            "user-a",
            "chat.history",
            json!({"sessionKey": "main"}),
            false,
        );
        assert!(r.body.len() <= HISTORY_ENVELOPE + 300, "{}", r.body.len());
        let got = body(&r)["messages"].as_array().unwrap().len();
        assert!((1..10).contains(&got), "{got}");
        for limit in [json!(0), json!(1001), json!("5"), json!(-1)] {
            let (r, _) = f.rpc(
                "user-a",
                "chat.history",
                json!({"sessionKey": "main", "limit": limit}),
                false,
            );
            assert_error(&r, 400, "INVALID_REQUEST");
        }
    }

    #[test]
    fn users_see_only_their_own_sessions() {
        let mut f = fixture();
        let (r, _) = f.rpc("user-a", "sessions.list", Value::Null, false);
        assert_eq!(body(&r)["sessions"], json!([]));
        f.rpc("user-a", "agent", agent_params("secret plans", "k"), false);
        let (r, _) = f.rpc(
            "user-a",
            "sessions.list",
            json!({"includeLastMessage": true, "limit": 10}),
            false,
        );
        let v = body(&r);
        assert_eq!(v["count"], 1);
        let row = &v["sessions"][0];
        assert_eq!(row["key"], MAIN_SESSION_KEY);
        assert_eq!(row["kind"], "direct");
        assert_eq!(row["lastMessagePreview"], "echo: secret plans");
        assert!(row["updatedAt"].as_u64().unwrap() > 1_600_000_000_000);

        let (r, _) = f.rpc("user-b", "sessions.list", json!({}), false);
        assert_eq!(body(&r)["count"], 0);
        let (r, _) = f.rpc(
            "user-b",
            "chat.history",
            json!({"sessionKey": "main"}),
            false,
        );
        assert_eq!(body(&r)["messages"], json!([]));
        let (r, _) = f.rpc("user-b", "status", json!({}), false);
        assert_eq!(body(&r)["sessions"], json!({"count": 0, "turns": 0}));
        // A user cannot name another's conversation: there is only their own.
        let (r, _) = f.rpc(
            "user-b",
            "chat.history",
            json!({"sessionKey": "agent:main:user-a"}),
            false,
        );
        assert_error(&r, 404, "NOT_FOUND");
    }

    #[test]
    fn unknown_methods_and_bad_params_are_invalid_request() {
        let mut f = fixture();
        for method in ["agent.wait", "config.set", "", "Health", "x\u{0}y"] {
            let (r, rec) = f.rpc("user-a", method, json!({}), true);
            assert_error(&r, 400, "INVALID_REQUEST");
            assert!(rec.parts.is_empty());
        }
        let missing_key = json!({"message": "hi"});
        let cases: Vec<(Value, &str)> = vec![
            (missing_key, "idempotencyKey"),
            (json!({"idempotencyKey": "k"}), "message"),
            (agent_params("", "k"), "message"),
            (agent_params("hi", ""), "idempotencyKey"),
            (json!({"message": 5, "idempotencyKey": "k"}), "message"),
            (
                json!({"message": "hi", "idempotencyKey": ["k"]}),
                "idempotencyKey",
            ),
            (
                agent_params("hi", &"k".repeat(MAX_RUN_ID + 1)),
                "idempotencyKey",
            ),
            (json!(["hi"]), "object"),
            (json!("hi"), "object"),
            (Value::Null, "message"),
        ];
        for (params, mentions) in cases {
            let (r, rec) = f.rpc("user-a", "agent", params.clone(), true);
            assert_error(&r, 400, "INVALID_REQUEST");
            let message = body(&r)["message"].as_str().unwrap().to_owned();
            assert!(message.contains(mentions), "{params}: {message}");
            assert!(
                rec.parts.is_empty(),
                "{params}: a refused run emitted parts"
            );
        }
        let (r, _) = f.rpc(
            "user-a",
            "agent",
            json!({"message": "hi", "idempotencyKey": "k", "sessionKey": "other"}),
            true,
        );
        assert_error(&r, 404, "NOT_FOUND");
        let (r, _) = f.rpc(
            "user-a",
            "agent",
            json!({"message": "hi", "idempotencyKey": "k", "agentId": "ops"}),
            true,
        );
        assert_error(&r, 404, "NOT_FOUND");
        let (r, _) = f.rpc(
            "user-a",
            "chat.send",
            json!({"message": "hi", "idempotencyKey": "k"}),
            true,
        );
        assert_error(&r, 400, "INVALID_REQUEST");
        assert!(body(&r)["message"].as_str().unwrap().contains("sessionKey"));
        let (r, _) = f.rpc("user-a", "sessions.list", json!({"limit": 0}), false);
        assert_error(&r, 400, "INVALID_REQUEST");
        let (r, _) = f.rpc("", "agent", agent_params("hi", "k"), true);
        assert_error(&r, 400, "INVALID_REQUEST");
        // Params that are not JSON at all (the gateway sends JSON; still no panic).
        let req = Request {
            request_id: 1,
            deadline_us: 0,
            kind: Kind::Rpc,
            method: Method::Post,
            user_id: "user-a",
            stream: true,
            path: "health",
            call_id: "1",
            body: b"{not json",
        };
        let mut rec = Recorder::new(true);
        assert_error(&handle(&mut f.h, &req, &mut rec), 400, "INVALID_REQUEST");
        // Nothing was recorded for any of them.
        assert!(!f.session_log("user-a").exists());
    }

    #[test]
    fn a_reply_too_large_is_refused_before_the_run_starts() {
        let mut f = fixture();
        f.h.set_max_reply_bytes(2048);
        let (r, rec) = f.rpc(
            "user-a",
            "agent",
            agent_params(&"\u{1}".repeat(600), "k"),
            true,
        );
        assert_error(&r, 413, "INVALID_REQUEST");
        assert!(rec.parts.is_empty());
        assert!(!f.session_log("user-a").exists());
    }

    /// The log fails with `ENOSPC` once the run has started: it ends with error events, and
    /// the answer says to retry.
    #[test]
    fn a_full_disk_during_a_run_ends_it_with_error_events() {
        let mut f = fixture();
        f.message("user-a", b"one");
        let log = f.session_log("user-a");
        fs::remove_file(&log).unwrap();
        std::os::unix::fs::symlink("/dev/full", &log).unwrap();
        let (r, rec) = f.rpc("user-a", "agent", agent_params("two words", "k-full"), true);
        assert_error(&r, 507, "UNAVAILABLE");
        assert_eq!(body(&r)["retryable"], true);
        f.assert_no_server_path(&r);
        assert!(matches!(rec.parts[0], Recorded::Accepted(_)));
        let agent = rec.events("agent");
        let last = agent.last().unwrap();
        assert_valid("AgentEvent", last);
        assert_eq!(last["data"]["phase"], "error");
        let chat = rec.events("chat");
        let last = chat.last().unwrap();
        assert_valid("ChatEvent", last);
        assert_eq!(last["state"], "error");
        assert!(chat.iter().all(|c| c["state"] != "final"));
    }

    #[test]
    fn a_streaming_rest_message_sends_agent_events_and_the_same_reply() {
        let mut f = fixture();
        let plain = f.message("user-a", b"stream me please");
        let req = Request {
            request_id: 3,
            deadline_us: 0,
            kind: Kind::AgentMessage,
            method: Method::Post,
            user_id: "user-a",
            stream: true,
            path: "",
            call_id: "http-7",
            body: br#"{"message":"stream me please"}"#,
        };
        let mut rec = Recorder::new(true);
        let r = handle(&mut f.h, &req, &mut rec);
        assert_eq!(r.status, 200);
        let mut want = body(&plain);
        want["turn"] = json!(2);
        assert_eq!(body(&r), want, "the reply body is the REST one");
        // Agent events only: no accepted answer, no chat session.
        assert!(rec.events("chat").is_empty());
        assert!(rec.parts.iter().all(|p| matches!(p, Recorded::Event(..))));
        let agent = rec.events("agent");
        for e in &agent {
            assert_valid("AgentEvent", e);
            assert_eq!(e["runId"], "http-7");
        }
        assert_eq!(agent[0]["data"]["phase"], "start");
        assert_eq!(agent.last().unwrap()["data"]["phase"], "end");
        let deltas: Vec<&str> = agent
            .iter()
            .filter(|e| e["stream"] == "assistant")
            .map(|e| e["data"]["delta"].as_str().unwrap())
            .collect();
        assert_eq!(deltas, ["echo:", " stream", " me", " please"]);

        // Without a call id, each run gets an id of its own.
        let mut ids = Vec::new();
        for _ in 0..2 {
            let req = Request { call_id: "", ..req };
            let mut rec = Recorder::new(true);
            handle(&mut f.h, &req, &mut rec);
            ids.push(rec.events("agent")[0]["runId"].as_str().unwrap().to_owned());
        }
        assert!(!ids[0].is_empty() && ids[0] != ids[1], "{ids:?}");
    }

    #[test]
    fn pieces_are_words_that_add_up_to_the_text() {
        assert_eq!(pieces("echo: hi there", 64), ["echo:", " hi", " there"]);
        assert_eq!(pieces("echo:   ", 64), ["echo:", "   "]);
        assert_eq!(pieces("echo: a\n\nb ", 64), ["echo:", " a", "\n\nb", " "]);
        assert_eq!(pieces("", 64), Vec::<&str>::new());
        let long: String = (0..1000).map(|i| format!(" w{i}")).collect();
        let text = format!("echo:{long}");
        let p = pieces(&text, MAX_DELTAS);
        assert!(
            p.len() <= MAX_DELTAS && p.len() >= MAX_DELTAS / 2,
            "{}",
            p.len()
        );
        assert_eq!(p.concat(), text);
        let text = "ünï cødé ✓ ok";
        assert_eq!(pieces(text, 2).concat(), text);
        assert_eq!(pieces(text, 2).len(), 2);
    }
}
