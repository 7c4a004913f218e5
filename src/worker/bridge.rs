//! Bring your own agent: the worker runs a program of the user's (`worker_command`) inside its
//! sandbox and bridges its lanes to it over stdin/stdout, in JSON Lines modelled on the
//! TypeScript worker IPC.
//!
//! To the program: `{"type":"request","request":{"requestId","userId","type","payload",
//! "timestamp","timeout","stream"}}` (an OpenClaw RPC has `type` `rpc`, `method`, `callId`
//! and its params as `payload`), `{"type":"health:check"}`, `{"type":"shutdown",
//! "gracePeriod"}`. From it: `{"type":"ready"}`, `{"type":"response","response":{"requestId",
//! "success","payload","error","errorCode"(,"status","details","retryable","retryAfterMs")}}`,
//! `{"type":"heartbeat"}`, `{"type":"log","level","message"}`, and, before a request's
//! `response`, its interim parts: `{"type":"accepted","requestId","payload"}` (the first answer
//! of a two-stage RPC) and `{"type":"event","requestId","event","payload"}` (an event named
//! `[A-Za-z0-9_:.-]{1,64}`). Parts of a request that does not stream are dropped, as are parts
//! too large for a ring frame (logged). Requests are pipelined (the gateway admits at most
//! `max_concurrent` per worker); responses may come back in any order. Its stderr goes to
//! `logs/agent.log`.
//!
//! The program runs under the worker's Landlock domain and rlimits (inherited) and dies with
//! the worker (`PR_SET_PDEATHSIG`). It is held to the same rules as a built-in worker:
//! - it exits, or writes a malformed or oversized line, or answers (or sends a part for) a
//!   request id it was not given or already answered → the worker kills it and exits with an error: the monitor respawns the slot, the
//!   requests it had taken are answered `WORKER_CRASHED`, the unread ones go to the successor;
//! - it stops answering health checks → the worker stops its heartbeat: the monitor kills the
//!   slot as stalled.
//!
//! A request frame is released as soon as it was written to the program: for the gateway it is
//! then "taken", which is exactly what happens to it if the program dies.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use moltbot_ipc::clock::monotonic_us;
use moltbot_ipc::segment::worker_state;
use moltbot_ipc::wake::{announce_park, cancel_park, futex_park, futex_unpark, wake_needed};
use moltbot_ipc::{Kind, Method, Part, Response, Segment};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::worker::lane::{Lane, write_response};

/// What the program says, as read by the reader thread.
#[derive(Debug)]
enum FromChild {
    Ready,
    Heartbeat,
    Response(ChildResponse),
    /// An interim part of request `request_id`: its `accepted` answer (`event` `None`) or an
    /// event so named. The name is already checked.
    Part {
        request_id: String,
        event: Option<String>,
        payload: Box<RawValue>,
    },
    Log {
        level: String,
        message: String,
    },
    /// The program broke the protocol or went away; the reason.
    Fatal(String),
}

#[derive(Debug, Deserialize)]
struct ChildResponse {
    #[serde(rename = "requestId")]
    request_id: String,
    success: bool,
    #[serde(default)]
    payload: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default, rename = "errorCode")]
    error_code: Option<String>,
    #[serde(default)]
    status: Option<u16>,
    /// For RPC errors, passed on in the protocol's error object.
    #[serde(default)]
    details: Option<Box<RawValue>>,
    #[serde(default)]
    retryable: Option<bool>,
    #[serde(default, rename = "retryAfterMs")]
    retry_after_ms: Option<u64>,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    response: Option<ChildResponse>,
    #[serde(default)]
    level: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "requestId")]
    request_id: Option<String>,
    #[serde(default)]
    event: Option<String>,
    /// Present whenever the line has the field, `null` included.
    #[serde(default, deserialize_with = "present_raw")]
    payload: Option<Box<RawValue>>,
}

/// `Some(raw)` whenever the field is present, even as `null` (missing stays `None`).
fn present_raw<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

fn parse_line(line: &[u8]) -> FromChild {
    let env: Envelope = match serde_json::from_slice(line) {
        Ok(e) => e,
        Err(e) => return FromChild::Fatal(format!("malformed line: {e}")),
    };
    match env.kind.as_str() {
        "ready" => FromChild::Ready,
        "heartbeat" => FromChild::Heartbeat,
        "response" => match env.response {
            Some(r) => FromChild::Response(r),
            None => FromChild::Fatal("response without a \"response\" object".into()),
        },
        "log" => FromChild::Log {
            level: env.level.unwrap_or_else(|| "info".into()),
            message: env.message.unwrap_or_default(),
        },
        kind @ ("accepted" | "event") => {
            let Some(request_id) = env.request_id else {
                return FromChild::Fatal(format!("{kind} without a \"requestId\""));
            };
            let Some(payload) = env.payload else {
                return FromChild::Fatal(format!("{kind} without a \"payload\""));
            };
            let event = match (kind, env.event) {
                ("accepted", None) => None,
                ("accepted", Some(_)) => {
                    return FromChild::Fatal("accepted with an event name".into());
                }
                (_, Some(name)) if valid_code(&name) => Some(name),
                (_, Some(name)) => {
                    return FromChild::Fatal(format!(
                        "event name {:?} is not [A-Za-z0-9_:.-]{{1,64}}",
                        name.chars().take(80).collect::<String>()
                    ));
                }
                (_, None) => return FromChild::Fatal("event without an \"event\" name".into()),
            };
            FromChild::Part {
                request_id,
                event,
                payload,
            }
        }
        other => FromChild::Fatal(format!("unknown message type {other:?}")),
    }
}

/// Reads the program's stdout line by line (each at most `max_line` bytes) and hands the
/// messages to the serving loop, waking it if it sleeps.
fn reader(
    stdout: impl Read,
    max_line: usize,
    tx: crossbeam::channel::Sender<FromChild>,
    seg: Segment,
) {
    let wake = |seg: &Segment| {
        let parked = seg.worker_parked();
        if wake_needed(parked) {
            futex_unpark(parked);
        }
    };
    let mut r = BufReader::with_capacity(64 * 1024, stdout);
    let mut line = Vec::with_capacity(4096);
    loop {
        line.clear();
        // Read one line without ever holding more than max_line bytes of it.
        let outcome = loop {
            let buf = match r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(format!("reading its output: {e}")),
            };
            if buf.is_empty() {
                break Err("it closed its output (exited?)".to_string());
            }
            let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], Some(i + 1)),
                None => (buf, None),
            };
            if line.len() + chunk.len() > max_line {
                break Err(format!("a line longer than {max_line} bytes"));
            }
            line.extend_from_slice(chunk);
            let used = done.unwrap_or(chunk.len());
            r.consume(used);
            if done.is_some() {
                break Ok(());
            }
        };
        let msg = match outcome {
            Ok(()) if line.iter().all(|b| b.is_ascii_whitespace()) => continue,
            Ok(()) => parse_line(&line),
            Err(why) => FromChild::Fatal(why),
        };
        let fatal = matches!(msg, FromChild::Fatal(_));
        if tx.send(msg).is_err() {
            return;
        }
        wake(&seg);
        if fatal {
            return;
        }
    }
}

#[derive(Serialize)]
struct RequestOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    request: RequestBody<'a>,
}

#[derive(Serialize)]
struct RequestBody<'a> {
    #[serde(rename = "requestId")]
    request_id: &'a str,
    #[serde(rename = "userId")]
    user_id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    payload: &'a RawValue,
    timestamp: u64,
    timeout: u64,
    /// The caller takes interim parts (`accepted`, events) before the response.
    stream: bool,
    /// An RPC's method.
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    /// An RPC's id on the client's connection.
    #[serde(rename = "callId", skip_serializing_if = "Option::is_none")]
    call_id: Option<&'a str>,
}

/// The payload the program receives: the request body if it is JSON, else the body as a JSON
/// string (lossy UTF-8; `wrapped` is then true, and a string answer is unwrapped back into raw
/// bytes, so that `/v1/echo` of plain text stays byte for byte). For the REST form of
/// `session` the method and name become `{"action","name","value"}`.
fn payload_of(kind: Kind, method: Method, path: &str, body: &[u8]) -> (Box<RawValue>, bool) {
    let json_body = serde_json::from_slice::<Box<RawValue>>(body).ok();
    let value_or_string = || -> serde_json::Value {
        match &json_body {
            Some(raw) => serde_json::from_str(raw.get()).unwrap_or(serde_json::Value::Null),
            None if body.is_empty() => serde_json::Value::Null,
            None => serde_json::Value::String(String::from_utf8_lossy(body).into_owned()),
        }
    };
    if kind == Kind::Session && method != Method::Post {
        let action = match (method, path.is_empty()) {
            (Method::Get, true) => "list",
            (Method::Get, false) => "get",
            (Method::Put, _) => "set",
            (Method::Delete, _) => "delete",
            _ => "get",
        };
        let v = serde_json::json!({ "action": action, "name": path, "value": value_or_string() });
        return (raw(v.to_string()), false);
    }
    match json_body {
        Some(raw) => (raw, false),
        None => (raw(value_or_string().to_string()), !body.is_empty()),
    }
}

/// JSON text we serialized ourselves as a raw value (`null` should it ever not parse).
fn raw(json: String) -> Box<RawValue> {
    RawValue::from_string(json).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// Spawns the program: cwd = sandbox, the worker's (scrubbed) environment, stdin/stdout piped,
/// stderr appended to `logs/agent.log`, killed if the worker dies.
fn spawn(argv: &[String], sandbox: &std::path::Path, cpus: &[usize]) -> anyhow::Result<Child> {
    let (program, args) = argv.split_first().context("worker_command is empty")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(sandbox.join("logs").join("agent.log"))
        .context("open logs/agent.log")?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(sandbox)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    moltbot_ipc::process::die_with_parent(&mut cmd);
    moltbot_ipc::process::inherit_only(&mut cmd, &[]);
    moltbot_ipc::process::run_on_cpus(&mut cmd, cpus);
    cmd.spawn()
        .with_context(|| format!("cannot start {program:?}"))
}

struct Outstanding {
    lane: usize,
    id: u64,
    started: Instant,
    /// The body was not JSON and went to the program as a string (see [`payload_of`]).
    wrapped: bool,
    /// The request takes interim parts.
    stream: bool,
    /// An OpenClaw RPC: its error answers carry the protocol's error object.
    rpc: bool,
}

/// Where an interim part from the program goes: `Ok(Some((lane, request id)))` to write it,
/// `Ok(None)` to drop it (the request does not stream, or the payload does not fit a ring
/// frame), `Err` for a part naming a request the program does not hold (a protocol
/// violation).
fn part_target(
    outstanding: &HashMap<String, Outstanding>,
    request_id: &str,
    payload_len: usize,
    max_reply: usize,
) -> Result<Option<(usize, u64)>, String> {
    let Some(o) = outstanding.get(request_id) else {
        return Err(format!(
            "sent a part for request id {:?}, which it was not given or already answered",
            request_id.chars().take(80).collect::<String>()
        ));
    };
    if !o.stream {
        return Ok(None);
    }
    if payload_len > max_reply {
        tracing::warn!(
            bytes = payload_len,
            "an agent's event too large for a ring frame: dropped"
        );
        return Ok(None);
    }
    Ok(Some((o.lane, o.id)))
}

/// How the worker runs its agent program.
pub(crate) struct Settings {
    /// The sandbox root: the program's working directory (its logs go beneath).
    pub(crate) sandbox: std::path::PathBuf,
    /// Longest line the program may write, in bytes.
    pub(crate) max_line: usize,
    /// Heartbeat interval: the health-check period; three of them silent is a stall.
    pub(crate) heartbeat: Duration,
    /// Requests after which the worker leaves (a recycle).
    pub(crate) max_requests: u64,
    /// Time the program gets to finish after `shutdown`.
    pub(crate) grace: Duration,
    /// The CPUs the program runs on (empty: the worker's own).
    pub(crate) program_cpus: Vec<usize>,
}

/// Serves the lanes through the program until SIGTERM or a fatal error.
pub(crate) fn run(
    args: &Settings,
    argv: Vec<String>,
    seg: Segment,
    mut lanes: Vec<Lane>,
    term: &Arc<AtomicBool>,
    max_reply: usize,
) -> anyhow::Result<()> {
    let mut child = spawn(&argv, &args.sandbox, &args.program_cpus)?;
    let mut stdin = child.stdin.take().context("child stdin")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = crossbeam::channel::unbounded();
    let reader_seg = seg.clone();
    let max_line = args.max_line;
    std::thread::Builder::new()
        .name("agent-reader".into())
        .spawn(move || reader(stdout, max_line, tx, reader_seg))
        .context("reader thread")?;
    tracing::info!(pid = child.id(), ?argv, "agent program started");

    let h = seg.header();
    let heartbeat_every = args.heartbeat;
    // A program silent for this long (no heartbeat, no message) is stalled: the segment
    // heartbeat stops and the monitor replaces the slot.
    let silent_limit = heartbeat_every * 3;
    let park_for = (heartbeat_every / 2).clamp(Duration::from_millis(1), Duration::from_secs(1));
    let max_requests = args.max_requests;
    let mut ready = false;
    let mut last_alive = Instant::now();
    let mut next_health = Instant::now();
    let mut outstanding: HashMap<String, Outstanding> = HashMap::new();
    let mut taken: u64 = 0;
    let mut shutdown_deadline: Option<Instant> = None;
    let mut line = Vec::with_capacity(4096);

    let result = (|| -> anyhow::Result<()> {
        loop {
            let now = Instant::now();
            // 1. What the program said.
            while let Ok(msg) = rx.try_recv() {
                last_alive = Instant::now();
                match msg {
                    FromChild::Ready => {
                        if !ready {
                            ready = true;
                            h.worker_state
                                .store(worker_state::SERVING, Ordering::Release);
                            tracing::info!("agent program ready");
                        }
                    }
                    FromChild::Heartbeat => {}
                    FromChild::Part {
                        request_id,
                        event,
                        payload,
                    } => {
                        let body = payload.get().as_bytes();
                        let target = part_target(&outstanding, &request_id, body.len(), max_reply)
                            .map_err(|why| anyhow::anyhow!("agent program {why}"))?;
                        if let Some((lane, id)) = target {
                            let lane = &mut lanes[lane];
                            let resp = Response {
                                request_id: id,
                                duration_us: 0,
                                status: 200,
                                part: if event.is_some() {
                                    Part::Event
                                } else {
                                    Part::Accepted
                                },
                                body,
                                error_code: "",
                                event: event.as_deref().unwrap_or(""),
                            };
                            write_response(&mut lane.resp, &lane.wake, &resp, h)?;
                        }
                    }
                    FromChild::Log { level, message } => match level.as_str() {
                        "error" => tracing::error!(target: "agent", "{message}"),
                        "warn" | "warning" => tracing::warn!(target: "agent", "{message}"),
                        "debug" => tracing::debug!(target: "agent", "{message}"),
                        _ => tracing::info!(target: "agent", "{message}"),
                    },
                    FromChild::Response(r) => {
                        let Some(o) = outstanding.remove(&r.request_id) else {
                            bail!(
                                "answered request id {:?}, which it was not given",
                                r.request_id
                            );
                        };
                        let body: Vec<u8>;
                        let (status, code): (u16, &str) = if r.success {
                            let text = r.payload.as_ref().map(|p| p.get()).unwrap_or("null");
                            body = match serde_json::from_str::<String>(text) {
                                Ok(s) if o.wrapped => s.into_bytes(),
                                _ => text.as_bytes().to_vec(),
                            };
                            (
                                r.status.filter(|s| (200..300).contains(s)).unwrap_or(200),
                                "",
                            )
                        } else {
                            body = error_body(&r, o.rpc);
                            // An RPC's error code is the protocol's: `UNAVAILABLE` when the
                            // program names none.
                            let fallback = if o.rpc { "UNAVAILABLE" } else { "AGENT_ERROR" };
                            let code = r
                                .error_code
                                .as_deref()
                                .filter(|c| valid_code(c))
                                .unwrap_or(fallback);
                            (
                                r.status.filter(|s| (400..600).contains(s)).unwrap_or(500),
                                code,
                            )
                        };
                        let body: &[u8] = if body.len() > max_reply {
                            br#"{"message":"the agent's reply does not fit in a ring frame"}"#
                        } else {
                            &body
                        };
                        let lane = &mut lanes[o.lane];
                        let resp = Response {
                            request_id: o.id,
                            duration_us: o.started.elapsed().as_micros() as u64,
                            status,
                            part: Part::Final,
                            body,
                            error_code: code,
                            event: "",
                        };
                        write_response(&mut lane.resp, &lane.wake, &resp, h)?;
                        h.requests_served.fetch_add(1, Ordering::Relaxed);
                        h.in_flight
                            .store(outstanding.len() as u64, Ordering::Relaxed);
                    }
                    // Leaving (SIGTERM, the request limit): the program exiting is what we asked.
                    FromChild::Fatal(_) if shutdown_deadline.is_some() => return Ok(()),
                    FromChild::Fatal(why) => bail!("agent program: {why}"),
                }
            }
            // 2. Heartbeat only while the program is alive and answering.
            if ready && now.duration_since(last_alive) <= silent_limit {
                h.heartbeat.fetch_add(1, Ordering::Relaxed);
            }
            // 3. Shutdown (SIGTERM or the request limit): no new requests; wait for the
            //    answers and the exit, up to the grace period.
            let leaving = term.load(Ordering::Relaxed) || (taken >= max_requests);
            if leaving && shutdown_deadline.is_none() {
                let grace = args.grace;
                shutdown_deadline = Some(now + grace);
                h.worker_state
                    .store(worker_state::EXITING, Ordering::Release);
                let msg = serde_json::json!({"type": "shutdown", "gracePeriod": args.grace.as_millis() as u64});
                let _ = send_line(&mut stdin, &msg.to_string());
            }
            if let Some(deadline) = shutdown_deadline
                && (outstanding.is_empty() || now >= deadline)
            {
                if let Ok(Some(_)) = child.try_wait() {
                    return Ok(());
                }
                if now >= deadline {
                    tracing::warn!(
                        "agent program did not exit within the grace period: killing it"
                    );
                    return Ok(());
                }
            }
            // 4. Requests, once the program is ready.
            let mut sent = false;
            if ready && shutdown_deadline.is_none() {
                for (i, lane) in lanes.iter_mut().enumerate() {
                    while taken < max_requests {
                        let Some(frame) = lane.req.peek().context("request ring")? else {
                            break;
                        };
                        let req = moltbot_ipc::access_request(frame.bytes())
                            .map_err(|e| anyhow::anyhow!("undecodable request frame: {e}"))?;
                        let id = req.request_id.to_native();
                        let key = format!("{i}-{id}");
                        let kind = req.kind.to_native();
                        let deadline = req.deadline_us.to_native();
                        let now_us = monotonic_us();
                        let (payload, wrapped) =
                            payload_of(kind, req.method.to_native(), &req.path, &req.body);
                        let rpc = kind == Kind::Rpc;
                        let stream = req.stream;
                        let out = RequestOut {
                            kind: "request",
                            request: RequestBody {
                                request_id: &key,
                                user_id: &req.user_id,
                                kind: kind.as_str(),
                                payload: &payload,
                                timestamp: crate::pool::slot::now_ms(),
                                timeout: if deadline == 0 {
                                    0
                                } else {
                                    deadline.saturating_sub(now_us) / 1000
                                },
                                stream,
                                method: rpc.then_some(&*req.path),
                                call_id: rpc.then_some(&*req.call_id),
                            },
                        };
                        line.clear();
                        serde_json::to_writer(&mut line, &out)?;
                        line.push(b'\n');
                        frame.claim();
                        frame.release();
                        outstanding.insert(
                            key,
                            Outstanding {
                                lane: i,
                                id,
                                started: Instant::now(),
                                wrapped,
                                stream,
                                rpc,
                            },
                        );
                        taken += 1;
                        h.in_flight
                            .store(outstanding.len() as u64, Ordering::Relaxed);
                        // A program that does not read its input blocks us here; the
                        // heartbeat then stops and the monitor replaces the slot.
                        stdin
                            .write_all(&line)
                            .context("writing to the agent program")?;
                        sent = true;
                    }
                }
                if sent {
                    stdin.flush().context("writing to the agent program")?;
                }
            }
            // 5. Health checks (and a look whether the program is still there; its closed
            //    output usually tells first, through the reader).
            if now >= next_health {
                next_health = now + heartbeat_every;
                if let Ok(Some(status)) = child.try_wait() {
                    if shutdown_deadline.is_some() {
                        return Ok(());
                    }
                    bail!("agent program exited ({status})");
                }
                send_line(&mut stdin, r#"{"type":"health:check"}"#)
                    .context("writing to the agent program")?;
            }
            if sent {
                continue;
            }
            // 6. Sleep until a request, a message from the program, or the next check.
            let parked = seg.worker_parked();
            announce_park(parked);
            let mut work = !rx.is_empty();
            if ready && shutdown_deadline.is_none() {
                for l in &mut lanes {
                    work |= l.req.has_data().context("request ring")?;
                }
            }
            if !work && !term.load(Ordering::Relaxed) {
                let until_health = next_health.saturating_duration_since(Instant::now());
                futex_park(
                    parked,
                    park_for.min(until_health).max(Duration::from_millis(1)),
                );
            }
            cancel_park(parked);
        }
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// The body of an error answer: `{"message"}`, and for an RPC the other fields of the
/// protocol's error object the program gave (`details`, `retryable`, `retryAfterMs`).
fn error_body(r: &ChildResponse, rpc: bool) -> Vec<u8> {
    let message = r.error.as_deref().unwrap_or("the agent failed");
    let mut body = serde_json::json!({ "message": message });
    if rpc {
        if let Some(details) = r
            .details
            .as_ref()
            .and_then(|d| serde_json::from_str::<serde_json::Value>(d.get()).ok())
        {
            body["details"] = details;
        }
        if let Some(retryable) = r.retryable {
            body["retryable"] = retryable.into();
        }
        if let Some(ms) = r.retry_after_ms {
            body["retryAfterMs"] = ms.into();
        }
    }
    serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"message\":\"the agent failed\"}".to_vec())
}

fn send_line(stdin: &mut ChildStdin, s: &str) -> std::io::Result<()> {
    stdin.write_all(s.as_bytes())?;
    stdin.write_all(b"\n")?;
    stdin.flush()
}

/// An error code the gateway accepts (the program's own, or `AGENT_ERROR`).
fn valid_code(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 64
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_:.-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_into_messages() {
        assert!(matches!(
            parse_line(br#"{"type":"ready"}"#),
            FromChild::Ready
        ));
        assert!(matches!(
            parse_line(br#"{"type":"heartbeat"}"#),
            FromChild::Heartbeat
        ));
        match parse_line(br#"{"type":"response","response":{"requestId":"0-1","success":true,"payload":{"a":1}}}"#) {
            FromChild::Response(r) => {
                assert_eq!(r.request_id, "0-1");
                assert!(r.success);
                assert_eq!(r.payload.unwrap().get(), r#"{"a":1}"#);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_line(b"not json"), FromChild::Fatal(_)));
        assert!(matches!(
            parse_line(br#"{"type":"what"}"#),
            FromChild::Fatal(_)
        ));
        assert!(matches!(
            parse_line(br#"{"type":"response"}"#),
            FromChild::Fatal(_)
        ));
        match parse_line(br#"{"type":"log","level":"warn","message":"m"}"#) {
            FromChild::Log { level, message } => {
                assert_eq!((level.as_str(), message.as_str()), ("warn", "m"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn interim_parts_parse_and_malformed_ones_are_fatal() {
        match parse_line(
            br#"{"type":"event","requestId":"0-1","event":"agent","payload":{"seq":1}}"#,
        ) {
            FromChild::Part {
                request_id,
                event,
                payload,
            } => {
                assert_eq!(request_id, "0-1");
                assert_eq!(event.as_deref(), Some("agent"));
                assert_eq!(payload.get(), r#"{"seq":1}"#);
            }
            other => panic!("{other:?}"),
        }
        match parse_line(br#"{"type":"accepted","requestId":"0-2","payload":{"runId":"k"}}"#) {
            FromChild::Part {
                request_id, event, ..
            } => assert_eq!((request_id.as_str(), event), ("0-2", None)),
            other => panic!("{other:?}"),
        }
        let long = format!(
            r#"{{"type":"event","requestId":"0-1","event":"{}","payload":1}}"#,
            "e".repeat(65)
        );
        let fatal: [&[u8]; 9] = [
            br#"{"type":"event","requestId":"0-1","payload":{}}"#,
            br#"{"type":"event","requestId":"0-1","event":"","payload":{}}"#,
            br#"{"type":"event","requestId":"0-1","event":"a b","payload":{}}"#,
            br#"{"type":"event","requestId":"0-1","event":"\u00e9","payload":{}}"#,
            br#"{"type":"event","event":"agent","payload":{}}"#,
            br#"{"type":"event","requestId":"0-1","event":"agent"}"#,
            br#"{"type":"accepted","requestId":"0-1","event":"agent","payload":{}}"#,
            br#"{"type":"accepted","payload":{}}"#,
            long.as_bytes(),
        ];
        for line in fatal {
            assert!(
                matches!(parse_line(line), FromChild::Fatal(_)),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        // A name of 64 bytes of the allowed characters is fine.
        let ok = format!(
            r#"{{"type":"event","requestId":"0-1","event":"{}","payload":null}}"#,
            "a:b.c-d_E9".repeat(6) + "abcd"
        );
        assert!(matches!(parse_line(ok.as_bytes()), FromChild::Part { .. }));
    }

    #[test]
    fn parts_go_to_streaming_requests_the_program_holds() {
        let held = |stream: bool| Outstanding {
            lane: 2,
            id: 40,
            started: Instant::now(),
            wrapped: false,
            stream,
            rpc: true,
        };
        let mut outstanding = HashMap::new();
        outstanding.insert("2-40".to_string(), held(true));
        outstanding.insert("2-41".to_string(), held(false));
        assert_eq!(
            part_target(&outstanding, "2-40", 10, 100),
            Ok(Some((2, 40)))
        );
        // Not streaming, or too large for a frame: dropped, the program carries on.
        assert_eq!(part_target(&outstanding, "2-41", 10, 100), Ok(None));
        assert_eq!(part_target(&outstanding, "2-40", 101, 100), Ok(None));
        // An id it was not given (or already answered): a violation.
        let err = part_target(&outstanding, "2-42", 10, 100).unwrap_err();
        assert!(err.contains("2-42"), "{err}");
        outstanding.remove("2-40");
        assert!(part_target(&outstanding, "2-40", 10, 100).is_err());
    }

    #[test]
    fn rpc_requests_name_their_method_and_call_id() {
        let (payload, _) = payload_of(Kind::Rpc, Method::Post, "agent", br#"{"message":"hi"}"#);
        let out = |kind: Kind, stream: bool, rpc: bool| {
            let v = serde_json::to_value(RequestOut {
                kind: "request",
                request: RequestBody {
                    request_id: "0-7",
                    user_id: "u",
                    kind: kind.as_str(),
                    payload: &payload,
                    timestamp: 1,
                    timeout: 0,
                    stream,
                    method: rpc.then_some("agent"),
                    call_id: rpc.then_some("req-9"),
                },
            })
            .unwrap();
            v["request"].clone()
        };
        let v = out(Kind::Rpc, true, true);
        assert_eq!(v["type"], "rpc");
        assert_eq!(v["method"], "agent");
        assert_eq!(v["callId"], "req-9");
        assert_eq!(v["stream"], true);
        assert_eq!(v["payload"], serde_json::json!({"message": "hi"}));
        let v = out(Kind::AgentMessage, false, false);
        assert_eq!(v["type"], "agent:message");
        assert_eq!(v["stream"], false);
        assert!(v.get("method").is_none() && v.get("callId").is_none());
    }

    #[test]
    fn rpc_errors_keep_the_protocol_error_fields() {
        let r: ChildResponse = serde_json::from_str(
            r#"{"requestId":"0-1","success":false,"error":"busy","errorCode":"UNAVAILABLE",
                "details":{"code":"X"},"retryable":true,"retryAfterMs":250}"#,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&error_body(&r, true)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"message": "busy", "details": {"code": "X"}, "retryable": true,
                "retryAfterMs": 250})
        );
        let v: serde_json::Value = serde_json::from_slice(&error_body(&r, false)).unwrap();
        assert_eq!(v, serde_json::json!({"message": "busy"}));
    }

    #[test]
    fn payloads_for_the_program() {
        let (p, wrapped) = payload_of(Kind::AgentMessage, Method::Post, "", br#"{"message":"hi"}"#);
        assert_eq!((p.get(), wrapped), (r#"{"message":"hi"}"#, false));
        let (p, wrapped) = payload_of(Kind::AgentMessage, Method::Post, "", b"plain text");
        assert_eq!((p.get(), wrapped), (r#""plain text""#, true));
        assert_eq!(
            payload_of(Kind::Echo, Method::Post, "", b"").0.get(),
            "null"
        );
        let (p, _) = payload_of(Kind::Session, Method::Put, "notes", br#"{"x":1}"#);
        let v: serde_json::Value = serde_json::from_str(p.get()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"action":"set","name":"notes","value":{"x":1}})
        );
        let (p, _) = payload_of(Kind::Session, Method::Get, "", b"");
        let v: serde_json::Value = serde_json::from_str(p.get()).unwrap();
        assert_eq!(v["action"], "list");
    }

    #[test]
    fn reader_enforces_the_line_limit_and_reports_eof() {
        let name = format!(
            "/moltbot-bridge-test-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let seg =
            Segment::create(&name, moltbot_ipc::SegmentLayout::new(1, 4096).unwrap(), 0).unwrap();
        let (tx, rx) = crossbeam::channel::unbounded();
        let input = b"{\"type\":\"ready\"}\n\n{\"type\":\"heartbeat\"}\n".to_vec();
        reader(&input[..], 1024, tx, seg.clone());
        let msgs: Vec<FromChild> = rx.try_iter().collect();
        assert!(matches!(msgs[0], FromChild::Ready));
        assert!(matches!(msgs[1], FromChild::Heartbeat));
        assert!(matches!(&msgs[2], FromChild::Fatal(w) if w.contains("closed")));
        let (tx, rx) = crossbeam::channel::unbounded();
        let long = vec![b'x'; 5000];
        reader(&long[..], 1024, tx, seg);
        assert!(
            matches!(rx.try_recv().unwrap(), FromChild::Fatal(w) if w.contains("longer than 1024"))
        );
    }
}
