//! Fault injection for the tests: the `test` request kind. It exists only with the
//! `fault-injection` feature, which only test builds enable, so a release worker contains none
//! of this.
//!
//! The action is the request's path:
//! - `crash` aborts the process, `exit` exits with status 3, `hang` sleeps forever (so the
//!   heartbeat stops);
//! - `alloc {"mib": N}` allocates, touches and leaks N MiB;
//! - `escape {"paths": [...]}` reports which paths it can read, list and create files in;
//! - `signal {"pids": [...]}` reports which processes it may signal (a `kill(pid, 0)` probe: no
//!   signal is ever sent);
//! - `slow {"ms": N}` sleeps N ms before answering; `busy {"ms": N}` keeps a CPU busy for N ms
//!   (wall clock) before answering;
//! - `garbage-frame`, `garbage-id`, `garbage-ring`, `event-unknown-id` and `event-no-stream`
//!   break the ring protocol itself: the worker loop hands them to [`frame`] before the
//!   handlers, as they need the response ring.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use moltbot_ipc::{ArchivedRequest, Kind, Producer, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Fail, HandlerReply, Outcome};

/// `alloc`: the most MiB one request may allocate.
const MAX_ALLOC_MIB: u64 = 64 * 1024;

/// `slow`: the longest sleep.
const MAX_SLOW_MS: u64 = 600_000;

/// `escape` and `signal`: the most paths or pids one request may probe.
const MAX_PROBES: usize = 64;

/// Memory leaked on purpose by `alloc` (to push RSS over `max_memory`).
static LEAKED: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// The faults that answer through the ring: writes what the action calls for into the response
/// ring and returns true, or returns false (another kind, another action) without touching it.
pub(crate) fn frame(req: &ArchivedRequest<'_>, ring: &mut Producer) -> bool {
    if req.kind.to_native() != Kind::Test {
        return false;
    }
    match &*req.path {
        // A frame that is not a Response archive.
        "garbage-frame" => {
            let _ = ring.push(&[0xa5; 96]);
            true
        }
        // A well-formed response to a request that does not exist.
        "garbage-id" => {
            let r = Response {
                request_id: req.request_id.to_native() ^ 0x5555_0000_0000_0000,
                duration_us: 0,
                status: 200,
                part: moltbot_ipc::Part::Final,
                body: b"{}",
                error_code: "",
                event: "",
            };
            let bound = r.encoded_len_bound();
            let _ = ring.push_with(bound, |slot| r.encode_into(slot));
            true
        }
        // An event for a request that does not exist.
        "event-unknown-id" => {
            push_event(ring, req.request_id.to_native() ^ 0x5555_0000_0000_0000);
            true
        }
        // An event for this request, which was sent without `stream` (sent with it, the
        // event would be legitimate: the action does not apply).
        "event-no-stream" if !req.stream => {
            push_event(ring, req.request_id.to_native());
            true
        }
        // Positions that break the ring's invariants: what a worker writing its mapping
        // directly does (the gateway's end is in another process).
        "garbage-ring" => {
            if let Ok(mut t) = ring.tamper() {
                t.set_tail(u64::MAX - 7);
            }
            true
        }
        _ => false,
    }
}

/// A well-formed `agent` event for `request_id`.
fn push_event(ring: &mut Producer, request_id: u64) {
    let r = Response {
        request_id,
        duration_us: 0,
        status: 200,
        part: moltbot_ipc::Part::Event,
        body: br#"{"runId":"fault","seq":1,"stream":"lifecycle","ts":0,"data":{"phase":"start"}}"#,
        error_code: "",
        event: "agent",
    };
    let bound = r.encoded_len_bound();
    let _ = ring.push_with(bound, |slot| r.encode_into(slot));
}

/// The `test` kind's handler actions; `pid` is the worker's (it names the `escape` probe files).
pub(super) fn handle(req: &ArchivedRequest<'_>, pid: u32) -> Outcome {
    match &*req.path {
        "crash" => std::process::abort(),
        "exit" => std::process::exit(3),
        "hang" => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        "alloc" => alloc(&req.body),
        "escape" => escape(&req.body, pid),
        "signal" => signal(&req.body),
        "slow" => slow(&req.body, pid),
        "busy" => busy(&req.body, pid),
        other => Err(Fail::new(
            404,
            "UNKNOWN_TEST_ACTION",
            format!(
                "unknown test action {other:?}; expected crash, exit, hang, alloc, escape, signal, slow or busy"
            ),
        )),
    }
}

fn parse_json_payload<T: for<'de> Deserialize<'de>>(body: &[u8], shape: &str) -> Result<T, Fail> {
    serde_json::from_slice(body)
        .map_err(|e| Fail::bad("INVALID_PAYLOAD", format!("expected {shape}: {e}")))
}

/// The duration of `slow` and `busy`: `{"ms": N}`, at most [`MAX_SLOW_MS`].
fn duration_payload(body: &[u8]) -> Result<u64, Fail> {
    #[derive(Deserialize)]
    struct Ms {
        ms: u64,
    }
    let d: Ms = parse_json_payload(body, "{\"ms\": N}")?;
    if d.ms > MAX_SLOW_MS {
        return Err(Fail::bad(
            "INVALID_PAYLOAD",
            format!("ms must be at most {MAX_SLOW_MS}"),
        ));
    }
    Ok(d.ms)
}

/// Sleeps `{"ms": N}` milliseconds, then answers.
fn slow(body: &[u8], pid: u32) -> Outcome {
    let ms = duration_payload(body)?;
    std::thread::sleep(Duration::from_millis(ms));
    Ok(HandlerReply::json(&json!({ "sleptMs": ms, "pid": pid })))
}

/// Computes without pause for `{"ms": N}` ms of wall-clock time.
fn busy(body: &[u8], pid: u32) -> Outcome {
    let ms = duration_payload(body)?;
    let until = std::time::Instant::now() + Duration::from_millis(ms);
    let mut x = 0u64;
    while std::time::Instant::now() < until {
        for i in 0..1000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
    }
    Ok(HandlerReply::json(&json!({ "busyMs": ms, "pid": pid })))
}

/// Allocates, touches and leaks `{"mib": N}` MiB.
fn alloc(body: &[u8]) -> Outcome {
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

fn probe(r: io::Result<()>) -> Value {
    match r {
        Ok(()) => json!({ "ok": true }),
        Err(e) => json!({ "ok": false, "error": e.to_string() }),
    }
}

/// Tries to read each path and, for directories, to list it and create a file in it; reports
/// what succeeded (isolation tests expect failures outside the sandbox).
fn escape(body: &[u8], pid: u32) -> Outcome {
    #[derive(Deserialize)]
    struct Escape {
        paths: Vec<String>,
    }
    let e: Escape = parse_json_payload(body, "{\"paths\": [...]}")?;
    if e.paths.len() > MAX_PROBES {
        return Err(Fail::bad(
            "INVALID_PAYLOAD",
            format!("at most {MAX_PROBES} paths"),
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

/// For each pid, whether this process may signal it, probed with `kill(pid, 0)` (permission
/// and existence checks only; nothing is delivered). Isolation tests expect the gateway and
/// other workers to be out of reach where Landlock scopes signals (ABI 6).
fn signal(body: &[u8]) -> Outcome {
    #[derive(Deserialize)]
    struct Signal {
        pids: Vec<u32>,
    }
    let s: Signal = parse_json_payload(body, "{\"pids\": [...]}")?;
    if s.pids.len() > MAX_PROBES {
        return Err(Fail::bad(
            "INVALID_PAYLOAD",
            format!("at most {MAX_PROBES} pids"),
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
    use moltbot_ipc::{AlignedBuf, HeapRing, Method, Request, access_request, access_response};

    use super::super::testing::{assert_error, body, fixture};
    use super::*;

    #[test]
    fn alloc_and_slow() {
        let mut f = fixture();
        let mut test =
            |action: &str, payload: &[u8]| f.call(Kind::Test, Method::Post, "u", action, payload);
        let r = test("alloc", br#"{"mib": 1}"#);
        assert_eq!(r.status, 200);
        let v = body(&r);
        assert_eq!(v["allocatedMib"], 1);
        assert!(v["totalLeakedMib"].as_u64().unwrap() >= 1);
        assert_error(
            &test("alloc", br#"{"mib": 99999999}"#),
            400,
            "INVALID_PAYLOAD",
        );
        assert_error(&test("alloc", b"x"), 400, "INVALID_PAYLOAD");
        let r = test("slow", br#"{"ms": 1}"#);
        assert_eq!(body(&r)["sleptMs"], 1);
        assert_eq!(body(&r)["pid"], 4321);
        assert_error(
            &test("slow", br#"{"ms": 99999999}"#),
            400,
            "INVALID_PAYLOAD",
        );
        assert_error(&test("teleport", b""), 404, "UNKNOWN_TEST_ACTION");
        // The frame-level actions never reach the handlers in a worker; here they are unknown.
        assert_error(&test("garbage-frame", b""), 404, "UNKNOWN_TEST_ACTION");
    }

    #[test]
    fn escape_reports_per_path() {
        let mut f = fixture();
        let file = f.root.join("sessions/f.txt");
        fs::write(&file, "x").unwrap();
        let dir = f.root.join("state");
        let missing = f.root.join("missing");
        let payload = json!({"paths": [file, dir, missing]}).to_string();
        let r = f.call(Kind::Test, Method::Post, "u", "escape", payload.as_bytes());
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
        let too_many = json!({"paths": vec!["/"; MAX_PROBES + 1]}).to_string();
        let r = f.call(Kind::Test, Method::Post, "u", "escape", too_many.as_bytes());
        assert_error(&r, 400, "INVALID_PAYLOAD");
    }

    #[test]
    fn signal_probes_without_signalling() {
        let mut f = fixture();
        let me = std::process::id();
        let payload = json!({"pids": [me, 0, u32::MAX, i32::MAX as u32]}).to_string();
        let r = f.call(Kind::Test, Method::Post, "u", "signal", payload.as_bytes());
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
        let too_many = json!({"pids": vec![me; MAX_PROBES + 1]}).to_string();
        let r = f.call(Kind::Test, Method::Post, "u", "signal", too_many.as_bytes());
        assert_error(&r, 400, "INVALID_PAYLOAD");
        let r = f.call(Kind::Test, Method::Post, "u", "signal", b"{}");
        assert_error(&r, 400, "INVALID_PAYLOAD");
    }

    #[test]
    fn frame_faults_write_what_breaks_the_protocol() {
        let frame_for = |kind: Kind, action: &str, stream: bool| {
            let req = Request {
                request_id: 7,
                deadline_us: 0,
                kind,
                method: Method::Post,
                user_id: "u",
                path: action,
                call_id: "",
                stream,
                body: b"",
            };
            let mut buf = AlignedBuf::new();
            let n = req
                .encode_into(buf.zeroed_mut(req.encoded_len_bound()))
                .unwrap();
            buf.zeroed_mut(n);
            buf
        };
        let ring = HeapRing::new(4096).unwrap();
        let (mut producer, mut consumer) = ring.split().unwrap();
        let mut out = AlignedBuf::new();
        let mut fault = |kind: Kind, action: &str, stream: bool| {
            let buf = frame_for(kind, action, stream);
            frame(access_request(buf.as_slice()).unwrap(), &mut producer)
        };

        // Other kinds and the handler actions are left alone.
        assert!(!fault(Kind::Session, "garbage-frame", false));
        assert!(!fault(Kind::Test, "slow", false));
        assert!(!consumer.pop_into(&mut out).unwrap());

        assert!(fault(Kind::Test, "garbage-frame", false));
        assert!(consumer.pop_into(&mut out).unwrap());
        assert!(access_response(out.as_slice()).is_err());

        assert!(fault(Kind::Test, "garbage-id", false));
        assert!(consumer.pop_into(&mut out).unwrap());
        let resp = access_response(out.as_slice()).unwrap();
        assert_eq!(resp.request_id.to_native(), 7 ^ 0x5555_0000_0000_0000);

        assert!(fault(Kind::Test, "event-unknown-id", false));
        assert!(consumer.pop_into(&mut out).unwrap());
        let resp = access_response(out.as_slice()).unwrap();
        assert_eq!(resp.request_id.to_native(), 7 ^ 0x5555_0000_0000_0000);
        assert_eq!(resp.part.to_native(), moltbot_ipc::Part::Event);
        assert_eq!(&*resp.event, "agent");
        assert!(serde_json::from_slice::<Value>(&resp.body).is_ok());

        assert!(fault(Kind::Test, "event-no-stream", false));
        assert!(consumer.pop_into(&mut out).unwrap());
        let resp = access_response(out.as_slice()).unwrap();
        assert_eq!(resp.request_id.to_native(), 7);
        assert_eq!(resp.part.to_native(), moltbot_ipc::Part::Event);
        assert_eq!(&*resp.event, "agent");
        // A request that streams may take the event: nothing is written for it.
        assert!(!fault(Kind::Test, "event-no-stream", true));
        assert!(!consumer.pop_into(&mut out).unwrap());

        // The gateway's end lives in another process: a worker scribbles over positions only
        // where no end of this process reads them.
        drop(consumer);
        assert!(fault(Kind::Test, "garbage-ring", false));
        drop(producer);
        assert!(
            ring.take_consumer().is_err(),
            "the tail was broken: no consumer can attach"
        );
    }
}
