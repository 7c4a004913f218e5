//! The OpenClaw gateway protocol's frames as the WebSocket load connections write and read
//! them: no I/O, so every rule is a unit test.
//!
//! Outbound frames carry only the fields the protocol schema lists (its objects reject
//! additional properties). Inbound frames are parsed without copying payloads.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The protocol version spoken.
pub const PROTOCOL: u32 = 4;
/// The id of the `connect` request (the only request before `hello-ok`).
pub const CONNECT_ID: &str = "connect";

/// The `connect` request: protocol 4, a `test` client, and the token when there is one.
pub fn connect_frame(token: Option<&str>) -> String {
    let mut f = format!(
        "{{\"type\":\"req\",\"id\":\"{CONNECT_ID}\",\"method\":\"connect\",\"params\":{{\
         \"minProtocol\":{PROTOCOL},\"maxProtocol\":{PROTOCOL},\"client\":{{\"id\":\"test\",\
         \"version\":\"{}\",\"platform\":\"{}\",\"mode\":\"test\"}}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS
    );
    if let Some(t) = token {
        f.push_str(",\"auth\":{\"token\":");
        f.push_str(&json_string(t));
        f.push('}');
    }
    f.push_str("}}");
    f
}

/// `health` request `id`, without params (as `openclaw gateway health` sends it).
pub fn health_frame(id: u64) -> String {
    format!("{{\"type\":\"req\",\"id\":\"{id}\",\"method\":\"health\"}}")
}

/// `agent` request `id` with `message` and the run's `idempotencyKey`.
pub fn agent_frame(id: u64, message: &str, run_id: &str) -> String {
    format!(
        "{{\"type\":\"req\",\"id\":\"{id}\",\"method\":\"agent\",\"params\":{{\"message\":{},\
         \"idempotencyKey\":{}}}}}",
        json_string(message),
        json_string(run_id)
    )
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    // Serializing a &str cannot fail.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// An inbound frame.
#[derive(Debug)]
pub enum Inbound<'a> {
    /// An answer to request `id`.
    Res {
        /// The request's id.
        id: Cow<'a, str>,
        /// Success or not.
        ok: bool,
        /// The payload (success).
        payload: Option<&'a RawValue>,
        /// The error's `code` (failure; `UNKNOWN` when absent).
        code: Cow<'a, str>,
        /// The error's `message` (failure), with `details.code` when there is one (the
        /// precise reason, e.g. `AUTH_TOKEN_MISMATCH`).
        message: Cow<'a, str>,
    },
    /// An event.
    Event {
        /// Its name.
        event: Cow<'a, str>,
        /// Its sequence number, when numbered.
        seq: Option<u64>,
        /// Its payload.
        payload: Option<&'a RawValue>,
    },
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(default)]
    ok: Option<bool>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<WireError<'a>>,
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
}

#[derive(Deserialize)]
struct WireError<'a> {
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    details: Option<Details<'a>>,
}

#[derive(Deserialize)]
struct Details<'a> {
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
}

/// Parses one text frame; the error says what is wrong with it.
pub fn parse(text: &str) -> Result<Inbound<'_>, String> {
    let w: Wire<'_> =
        serde_json::from_str(text).map_err(|e| format!("frame is not the expected JSON: {e}"))?;
    match &*w.kind {
        "res" => {
            let id = w.id.ok_or("res frame without an id")?;
            let ok = w.ok.ok_or("res frame without ok")?;
            let (code, message) = match w.error {
                Some(e) => {
                    let message = e.message.unwrap_or_default();
                    let message = match e.details.and_then(|d| d.code) {
                        Some(detail) => Cow::Owned(format!("{message} ({detail})")),
                        None => message,
                    };
                    (e.code.unwrap_or(Cow::Borrowed("UNKNOWN")), message)
                }
                None => (Cow::Borrowed("UNKNOWN"), Cow::Borrowed("")),
            };
            Ok(Inbound::Res {
                id,
                ok,
                payload: w.payload,
                code,
                message,
            })
        }
        "event" => Ok(Inbound::Event {
            event: w.event.ok_or("event frame without an event name")?,
            seq: w.seq,
            payload: w.payload,
        }),
        other => Err(format!(
            "frame of type {:?}",
            other.chars().take(32).collect::<String>()
        )),
    }
}

#[derive(Deserialize)]
struct RunRef<'a> {
    #[serde(rename = "runId", borrow, default)]
    run_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Stamped {
    #[serde(default)]
    data: Option<Stamp>,
}

#[derive(Deserialize)]
struct Stamp {
    #[serde(rename = "emittedUs", default)]
    emitted_us: Option<u64>,
}

/// When the worker emitted an `agent` event: `data.emittedUs`, its monotonic clock in µs (the
/// built-in handlers stamp their events; other agents do not).
pub fn emitted_us(payload: Option<&RawValue>) -> Option<u64> {
    serde_json::from_str::<Stamped>(payload?.get())
        .ok()?
        .data?
        .emitted_us
}

/// The `runId` of an `agent`/`chat` event's (or a run answer's) payload.
pub fn run_id(payload: Option<&RawValue>) -> Option<Cow<'_, str>> {
    serde_json::from_str::<RunRef<'_>>(payload?.get())
        .ok()?
        .run_id
}

#[derive(Deserialize)]
struct Health<'a> {
    ok: bool,
    #[serde(rename = "workerId", borrow, default)]
    worker_id: Option<Cow<'a, str>>,
}

/// Checks a successful `health` payload (`ok: true`); returns the worker it names, if any.
pub fn verify_health(payload: Option<&RawValue>) -> Result<Option<Cow<'_, str>>, String> {
    let p = payload.ok_or("health answer without a payload")?;
    let h: Health<'_> = serde_json::from_str(p.get())
        .map_err(|e| format!("health payload is not the expected JSON: {e}"))?;
    if !h.ok {
        return Err("health payload says ok: false".into());
    }
    Ok(h.worker_id)
}

#[derive(Deserialize)]
struct Accepted<'a> {
    #[serde(rename = "runId", borrow)]
    run_id: Cow<'a, str>,
    #[serde(borrow)]
    status: Cow<'a, str>,
}

/// Whether a successful answer is the `accepted` stage of run `run_id` (`Ok(false)`: it is
/// some other answer, to be checked as the final one).
pub fn is_accepted(payload: Option<&RawValue>, run_id: &str) -> Result<bool, String> {
    let Some(p) = payload else {
        return Ok(false);
    };
    let Ok(a) = serde_json::from_str::<Accepted<'_>>(p.get()) else {
        return Ok(false);
    };
    if a.status != "accepted" {
        return Ok(false);
    }
    if a.run_id != run_id {
        return Err(format!(
            "accepted answer for run {:?}, not {run_id:?}",
            a.run_id
        ));
    }
    Ok(true)
}

#[derive(Deserialize)]
struct Final<'a> {
    #[serde(rename = "runId", borrow)]
    run_id: Cow<'a, str>,
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(borrow, default)]
    result: Option<FinalResult<'a>>,
}

#[derive(Deserialize)]
struct FinalResult<'a> {
    #[serde(borrow, default)]
    payloads: Vec<FinalPayload<'a>>,
}

#[derive(Deserialize)]
struct FinalPayload<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

/// Checks the final answer of an `agent` run: its `runId`, status `ok`, and the stand-in
/// agent's reply (`echo: ` and the message, as the HTTP agent endpoint is checked).
pub fn verify_agent_final(
    payload: Option<&RawValue>,
    run_id: &str,
    message: &str,
) -> Result<(), String> {
    let p = payload.ok_or("agent final answer without a payload")?;
    let f: Final<'_> = serde_json::from_str(p.get())
        .map_err(|e| format!("agent final answer is not the expected JSON: {e}"))?;
    if f.run_id != run_id {
        return Err(format!(
            "agent final answer for run {:?}, not {run_id:?}",
            f.run_id
        ));
    }
    if f.status != "ok" {
        return Err(format!("agent final answer has status {:?}", f.status));
    }
    let text = f
        .result
        .and_then(|r| r.payloads.into_iter().next())
        .and_then(|p| p.text);
    match text {
        Some(t) if t.strip_prefix("echo: ") == Some(message) => Ok(()),
        Some(_) => Err("agent reply does not echo the message".into()),
        None => Err("agent final answer without result.payloads[0].text".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn the_workers_emission_stamp_is_read_from_an_agent_events_data() {
        let raw = |s: &str| serde_json::from_str::<Box<RawValue>>(s).unwrap();
        let stamped = raw(r#"{"runId":"r","seq":1,"data":{"phase":"start","emittedUs":123456}}"#);
        assert_eq!(emitted_us(Some(&stamped)), Some(123_456));
        let plain = raw(r#"{"runId":"r","seq":1,"data":{"phase":"start"}}"#);
        assert_eq!(emitted_us(Some(&plain)), None);
        let chat = raw(r#"{"runId":"r","state":"delta"}"#);
        assert_eq!(emitted_us(Some(&chat)), None);
        let odd = raw(r#"{"data":{"emittedUs":"soon"}}"#);
        assert_eq!(emitted_us(Some(&odd)), None);
        assert_eq!(emitted_us(None), None);
    }

    #[test]
    fn outbound_frames_are_the_schema_fields_only() {
        let c: Value = serde_json::from_str(&connect_frame(Some("t\"k"))).expect("json");
        assert_eq!(c["type"], "req");
        assert_eq!(c["id"], CONNECT_ID);
        assert_eq!(c["method"], "connect");
        let p = &c["params"];
        assert_eq!(
            (p["minProtocol"].as_u64(), p["maxProtocol"].as_u64()),
            (Some(4), Some(4))
        );
        assert_eq!(p["client"]["id"], "test");
        assert_eq!(p["client"]["mode"], "test");
        assert!(!p["client"]["version"].as_str().unwrap_or("").is_empty());
        assert_eq!(p["auth"]["token"], "t\"k");
        let keys: Vec<&String> = p.as_object().expect("object").keys().collect();
        assert_eq!(keys.len(), 4, "{keys:?}");
        let c: Value = serde_json::from_str(&connect_frame(None)).expect("json");
        assert!(c["params"].get("auth").is_none());

        let h: Value = serde_json::from_str(&health_frame(17)).expect("json");
        assert_eq!(h, json!({"type": "req", "id": "17", "method": "health"}));
        let a: Value = serde_json::from_str(&agent_frame(3, "hi \"x\"", "r-1")).expect("json");
        assert_eq!(
            a,
            json!({"type": "req", "id": "3", "method": "agent",
                   "params": {"message": "hi \"x\"", "idempotencyKey": "r-1"}})
        );
    }

    #[test]
    fn parses_answers_and_events() {
        let r = parse(r#"{"type":"res","id":"4","ok":true,"payload":{"ok":true}}"#).expect("res");
        let Inbound::Res {
            id, ok, payload, ..
        } = r
        else {
            panic!("not a res")
        };
        assert_eq!((&*id, ok), ("4", true));
        assert_eq!(payload.map(RawValue::get), Some(r#"{"ok":true}"#));

        let e = parse(
            r#"{"type":"res","id":"5","ok":false,"error":{"code":"UNAVAILABLE","message":"busy","retryable":true}}"#,
        )
        .expect("res");
        let Inbound::Res {
            ok, code, message, ..
        } = e
        else {
            panic!("not a res")
        };
        assert!(!ok);
        assert_eq!((&*code, &*message), ("UNAVAILABLE", "busy"));
        let refused = parse(
            r#"{"type":"res","id":"connect","ok":false,"error":{"code":"INVALID_REQUEST","message":"bad token","details":{"code":"AUTH_TOKEN_MISMATCH"}}}"#,
        )
        .expect("res");
        let Inbound::Res { message, .. } = refused else {
            panic!("not a res")
        };
        assert_eq!(message, "bad token (AUTH_TOKEN_MISMATCH)");

        let ev = parse(
            r#"{"type":"event","event":"agent","payload":{"runId":"k","seq":1,"stream":"lifecycle"},"seq":9}"#,
        )
        .expect("event");
        let Inbound::Event {
            event,
            seq,
            payload,
        } = ev
        else {
            panic!("not an event")
        };
        assert_eq!((&*event, seq), ("agent", Some(9)));
        assert_eq!(run_id(payload).as_deref(), Some("k"));
        let challenge =
            parse(r#"{"type":"event","event":"connect.challenge","payload":{"nonce":"n","ts":1}}"#)
                .expect("challenge");
        assert!(matches!(challenge, Inbound::Event { seq: None, .. }));

        for bad in [
            "not json",
            r#"{"type":"req","id":"1","method":"x"}"#,
            r#"{"type":"res","ok":true}"#,
            r#"{"type":"res","id":"1"}"#,
            r#"{"type":"event"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }

    fn raw(v: Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).expect("raw")
    }

    #[test]
    fn verifies_health() {
        let p = raw(json!({"ok": true, "workerId": "worker-1", "pid": 3}));
        assert_eq!(
            verify_health(Some(&p)).expect("ok").as_deref(),
            Some("worker-1")
        );
        assert!(verify_health(Some(&raw(json!({"ok": false})))).is_err());
        assert!(verify_health(None).is_err());
    }

    #[test]
    fn verifies_the_stages_of_an_agent_run() {
        let acc = raw(json!({"runId": "k1", "status": "accepted", "acceptedAt": 5}));
        assert_eq!(is_accepted(Some(&acc), "k1"), Ok(true));
        assert!(is_accepted(Some(&acc), "k2").is_err());
        let fin = raw(
            json!({"runId": "k1", "status": "ok", "summary": "completed",
                             "result": {"payloads": [{"text": "echo: hello"}]}}),
        );
        assert_eq!(is_accepted(Some(&fin), "k1"), Ok(false));
        assert_eq!(verify_agent_final(Some(&fin), "k1", "hello"), Ok(()));
        assert!(verify_agent_final(Some(&fin), "k2", "hello").is_err());
        assert!(verify_agent_final(Some(&fin), "k1", "bye").is_err());
        let failed = raw(json!({"runId": "k1", "status": "error"}));
        assert!(verify_agent_final(Some(&failed), "k1", "hello").is_err());
        assert!(verify_agent_final(None, "k1", "hello").is_err());
    }
}
