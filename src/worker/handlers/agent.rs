//! The stand-in agent: `agent:message` records a turn and echoes the message back,
//! `agent:command` answers `history`, `reset` and `stats`. The RPC methods (`rpc`) run turns
//! through the same [`Handlers::prepare_turn`] and [`Handlers::commit_turn`], so both see one
//! history per user.
//!
//! Each user's turns are in `sessions/<stem>.jsonl`, one JSON line `{ts, userId, message,
//! reply}` per turn. Each turn is one `write(2)` on an `O_APPEND` descriptor and no `fsync`: a
//! completed write lives in the page cache and survives the worker being killed, which is the
//! failure this pool handles; surviving a machine crash would cost an fsync (milliseconds) per
//! turn. A line torn by a failed write (a full disk, a kill mid-write) is skipped when counting
//! and terminated before the next turn.
//!
//! The turn count of each user is read from the file once, then kept in [`TurnCache`].

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use moltbot_ipc::ArchivedRequest;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::rpc::Run;
use super::{Fail, HandlerReply, Handlers, Outcome, checked_user, create_private_dir};
use crate::sandbox::SESSIONS_DIR;
use crate::user::safe_file_stem;
use crate::worker::lane::Emit;

/// The most turns `agent:command` `history` returns.
pub const HISTORY_LIMIT: usize = 100;

/// Users whose turn count is cached; beyond, the cache is cleared (counts are re-read).
const TURN_CACHE_LIMIT: usize = 100_000;

/// Room kept in the reply budget for the JSON around the turns of `history` (ids, counters).
const REPLY_ENVELOPE: usize = 2048;

/// Valid turns per user, counted once from the session log, then kept up to date.
#[derive(Debug, Default)]
pub(super) struct TurnCache {
    counts: HashMap<String, u64>,
}

impl TurnCache {
    fn get(&self, user: &str) -> Option<u64> {
        self.counts.get(user).copied()
    }

    fn remember(&mut self, user: &str, n: u64) {
        if self.counts.len() >= TURN_CACHE_LIMIT && !self.counts.contains_key(user) {
            self.counts.clear();
        }
        self.counts.insert(user.to_owned(), n);
    }

    /// Drops `user`'s count: the file may have changed in a way only a recount sees.
    fn forget(&mut self, user: &str) {
        self.counts.remove(user);
    }
}

impl Handlers {
    pub(super) fn session_file(&self, user: &str) -> PathBuf {
        self.sandbox
            .join(SESSIONS_DIR)
            .join(format!("{}.jsonl", safe_file_stem(user)))
    }

    /// `agent:message`: records the turn, answers with the echo and the turn number. When the
    /// request streams, the reply goes out word by word as `agent` events first.
    pub(super) fn agent_message(
        &mut self,
        req: &ArchivedRequest<'_>,
        emit: &mut dyn Emit,
    ) -> Outcome {
        let user = checked_user(&req.user_id)?;
        let message = parse_message(&req.body)?;
        let turn = self.prepare_turn(user, &message, |h, turn, reply| {
            HandlerReply::json(&json!({
                "workerId": h.worker_id,
                "pid": h.pid,
                "userId": user,
                "turn": turn,
                "reply": reply,
            }))
        })?;
        if !emit.streams() {
            return self.commit_turn(user, turn);
        }
        // The caller's id of the request names the run when it has one (the gateway passes
        // the client's); else a fresh one, so that events of concurrent runs stay apart.
        let run_id = if req.call_id.is_empty() {
            format!("run-{:016x}", rand::random::<u64>())
        } else {
            req.call_id.to_string()
        };
        self.stream_turn(user, turn, Run::new(&run_id, None), emit)
    }

    /// Streams `turn`'s reply as the events of `run`, records the turn, then ends the run
    /// (with an error event if the turn could not be recorded).
    pub(super) fn stream_turn(
        &mut self,
        user: &str,
        turn: PendingTurn,
        mut run: Run<'_>,
        emit: &mut dyn Emit,
    ) -> Outcome {
        let reply = turn.reply.clone();
        run.start(emit);
        run.reply(emit, &reply);
        match self.commit_turn(user, turn) {
            Ok(answer) => {
                run.end(emit, &reply);
                Ok(answer)
            }
            Err(f) => {
                run.fail(emit, &f.message);
                Err(f)
            }
        }
    }

    /// Prepares one turn of `user`: numbers it, makes the stand-in's reply (the echo) and the
    /// final answer (`answer` of the handlers, the turn number and the reply). Nothing is
    /// written yet; [`Handlers::commit_turn`] records it.
    pub(super) fn prepare_turn(
        &mut self,
        user: &str,
        message: &str,
        answer: impl FnOnce(&Self, u64, &str) -> HandlerReply,
    ) -> Result<PendingTurn, Fail> {
        let path = self.session_file(user);
        let number = self.turn_count(user, &path)? + 1;
        let reply = format!("echo: {message}");
        let record = TurnRecord {
            ts: now_rfc3339(),
            user_id: user,
            message,
            reply: &reply,
        };
        let mut line = serde_json::to_vec(&record)
            .map_err(|e| Fail::new(500, "INTERNAL", format!("cannot encode the turn: {e}")))?;
        line.push(b'\n');
        let answer = answer(self, number, &reply);
        if !answer.is_success() {
            return Err(Fail::new(
                answer.status,
                answer.error_code,
                "cannot encode the answer",
            ));
        }
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
        Ok(PendingTurn {
            path,
            line,
            number,
            reply,
            answer,
        })
    }

    /// Appends a prepared turn to `user`'s session log; returns its answer.
    pub(super) fn commit_turn(&mut self, user: &str, turn: PendingTurn) -> Outcome {
        if let Err(e) = append(&turn.path, &turn.line) {
            // The file may now end in a torn line: recount (and repair) next time.
            self.turns.forget(user);
            return Err(Fail::storage("append to the session log", e));
        }
        self.turns.remember(user, turn.number);
        Ok(turn.answer)
    }

    /// The user's valid turns: cached, else counted from the file (terminating a torn last
    /// line so the next append starts a line of its own).
    pub(super) fn turn_count(&mut self, user: &str, path: &Path) -> Result<u64, Fail> {
        if let Some(n) = self.turns.get(user) {
            return Ok(n);
        }
        let scan = scan_turns(path, 0).map_err(|e| Fail::storage("read the session log", e))?;
        if scan.torn_tail {
            append(path, b"\n").map_err(|e| Fail::storage("repair the session log", e))?;
        }
        self.turns.remember(user, scan.count);
        Ok(scan.count)
    }

    /// `agent:command`: `history` (the last turns, within the reply budget), `reset` (removes
    /// the log) or `stats` (the turn count).
    pub(super) fn agent_command(&mut self, req: &ArchivedRequest<'_>) -> Outcome {
        let user = checked_user(&req.user_id)?;
        let cmd = parse_command(&req.body)?;
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
                self.turns.remember(user, 0);
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
}

/// A turn ready to be recorded, its answer known to fit the reply budget.
pub(super) struct PendingTurn {
    path: PathBuf,
    /// The session-log line, newline included.
    line: Vec<u8>,
    /// The turn's number (1 for the first).
    pub(super) number: u64,
    /// The stand-in agent's reply.
    pub(super) reply: String,
    answer: HandlerReply,
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
pub(super) struct TurnScan {
    /// Lines that are valid JSON objects.
    pub(super) count: u64,
    /// The last `keep` of them, each with the length of its line.
    pub(super) last: VecDeque<(Value, usize)>,
    /// The file does not end in a newline.
    pub(super) torn_tail: bool,
}

/// Counts the valid turns of a session log (absent = none), keeping the last `keep`.
pub(super) fn scan_turns(path: &Path, keep: usize) -> io::Result<TurnScan> {
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

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
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

#[cfg(test)]
mod tests {
    use moltbot_ipc::{Kind, Method};
    use serde_json::Value;

    use super::super::testing::{assert_error, body, call, fixture};
    use super::*;

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
        let r = call(
            &mut h2,
            Kind::AgentMessage,
            Method::Post,
            "user-a",
            "",
            b"three",
        );
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
        let r = call(
            &mut h2,
            Kind::AgentMessage,
            Method::Post,
            "user-a",
            "",
            b"two",
        );
        assert_eq!(body(&r)["turn"], 2);
        let text = fs::read_to_string(&log).unwrap();
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["message"], "two");
        let stats = call(
            &mut h2,
            Kind::AgentCommand,
            Method::Post,
            "user-a",
            "",
            b"stats",
        );
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
        let r = f.call(Kind::AgentCommand, Method::Post, "user-a", "", b"\xff");
        assert_error(&r, 400, "INVALID_PAYLOAD");
    }

    #[test]
    fn turns_are_kept_within_the_reply_budget() {
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
        let r = f.message("user-a", b"hi");
        assert_error(&r, 500, "STORAGE_ERROR");
        f.assert_no_server_path(&r);
        let r = f.command("user-a", "reset");
        assert_error(&r, 500, "STORAGE_ERROR");
        f.assert_no_server_path(&r);
        // The worker keeps serving.
        assert_eq!(f.message("user-c", b"hi").status, 200);
    }

    /// A real `ENOSPC`: the log is a symlink to `/dev/full`, where every write fails that way.
    #[test]
    fn a_turn_on_a_full_disk_is_507_and_the_user_carries_on() {
        let mut f = fixture();
        assert_eq!(body(&f.message("user-a", b"one"))["turn"], 1);
        let log = f.session_log("user-a");
        let aside = log.with_extension("aside");
        fs::rename(&log, &aside).unwrap();
        std::os::unix::fs::symlink("/dev/full", &log).unwrap();
        let r = f.message("user-a", b"two");
        assert_error(&r, 507, "INSUFFICIENT_STORAGE");
        f.assert_no_server_path(&r);
        // Others are not affected.
        assert_eq!(body(&f.message("user-b", b"hi"))["turn"], 1);
        // Space again: the failed turn was not counted.
        fs::remove_file(&log).unwrap();
        fs::rename(&aside, &log).unwrap();
        assert_eq!(body(&f.message("user-a", b"three"))["turn"], 2);
        assert_eq!(body(&f.command("user-a", "stats"))["turns"], 2);
        let messages: Vec<String> = fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["message"].to_string())
            .collect();
        assert_eq!(messages, ["\"one\"", "\"three\""]);
    }
}
