//! The OpenClaw gateway protocol's frames, as this gateway reads and writes them: no I/O, so
//! every rule here is a unit test.
//!
//! Inbound, only `req` frames exist; they are parsed without copying `params` (forwarded to
//! the worker byte for byte). Outbound frames are written as JSON text directly, with only the
//! fields `protocol.schema.json` lists (its objects reject additional properties).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The protocol version this gateway speaks.
pub const PROTOCOL: u32 = 4;
/// The older version still accepted from `role: "node"` and `mode: "probe"` clients.
pub const PROTOCOL_LEGACY: u32 = 3;
/// Longest method name accepted.
const MAX_METHOD: usize = 128;
/// Longest request id accepted (the client's own; echoed back in its answers).
const MAX_ID: usize = 256;

/// An inbound `req` frame: its id and method, and its params as raw JSON text.
#[derive(Debug)]
pub struct RequestFrame<'a> {
    /// The client's id of the request, echoed in every answer to it.
    pub id: Cow<'a, str>,
    /// The method.
    pub method: Cow<'a, str>,
    /// The params exactly as sent (`None` when absent).
    pub params: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    method: Cow<'a, str>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
    #[serde(default)]
    traceparent: Option<String>,
}

/// Why an inbound frame is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// The request id, when the frame got far enough to have one (the answer carries it).
    pub id: Option<String>,
    /// What is wrong, for the client.
    pub message: String,
}

/// Parses one text frame as a `req`.
pub fn parse_request(text: &str) -> Result<RequestFrame<'_>, FrameError> {
    let w: WireRequest<'_> = serde_json::from_str(text).map_err(|e| FrameError {
        id: loose_id(text),
        message: format!("invalid request frame: {}", short(&e.to_string())),
    })?;
    let id = Some(w.id.to_string()).filter(|i| !i.is_empty() && i.len() <= MAX_ID);
    let fail = |message: String| FrameError {
        id: id.clone(),
        message,
    };
    if w.kind != "req" {
        return Err(fail("invalid request frame: type must be \"req\"".into()));
    }
    if w.id.is_empty() || w.id.len() > MAX_ID {
        return Err(fail(format!(
            "invalid request frame: id must be 1 to {MAX_ID} bytes"
        )));
    }
    if w.method.is_empty() || w.method.len() > MAX_METHOD {
        return Err(fail(format!(
            "invalid request frame: method must be 1 to {MAX_METHOD} bytes"
        )));
    }
    if w.traceparent.as_ref().is_some_and(|t| t.len() > 128) {
        return Err(fail(
            "invalid request frame: traceparent longer than 128".into(),
        ));
    }
    Ok(RequestFrame {
        id: w.id,
        method: w.method,
        params: w.params,
    })
}

/// The `id` of a frame that is otherwise invalid, if it has a usable one.
fn loose_id(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Loose {
        id: Option<String>,
    }
    serde_json::from_str::<Loose>(text)
        .ok()
        .and_then(|l| l.id)
        .filter(|i| !i.is_empty() && i.len() <= MAX_ID)
}

fn short(s: &str) -> String {
    s.chars().take(200).collect()
}

/// The `connect` params (`ConnectParams` of the schema), checked field by field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectParams {
    /// Lowest protocol version the client speaks.
    pub min_protocol: u32,
    /// Highest protocol version the client speaks.
    pub max_protocol: u32,
    /// Who the client is.
    pub client: ClientInfo,
    /// Client capabilities (accepted, not used).
    #[serde(default)]
    pub caps: Option<Vec<NonEmpty>>,
    /// Node commands (accepted, not used).
    #[serde(default)]
    pub commands: Option<Vec<NonEmpty>>,
    /// Accepted, not used.
    #[serde(default)]
    pub computer_use: Option<serde::de::IgnoredAny>,
    /// Accepted, not used.
    #[serde(default)]
    pub worker_runs: Option<serde::de::IgnoredAny>,
    /// Accepted, not used.
    #[serde(default)]
    pub permissions: Option<BTreeMap<String, bool>>,
    /// Accepted, not used.
    #[serde(default)]
    pub path_env: Option<String>,
    /// `operator` (the default) or `node`.
    #[serde(default)]
    pub role: Option<NonEmpty>,
    /// The scopes asked for.
    #[serde(default)]
    pub scopes: Option<Vec<NonEmpty>>,
    /// A device identity (accepted; its nonce must be this connection's challenge).
    #[serde(default)]
    pub device: Option<DeviceIdentity>,
    /// Credentials.
    #[serde(default)]
    pub auth: Option<ConnectAuth>,
    /// Accepted, not used.
    #[serde(default)]
    pub locale: Option<String>,
    /// Accepted, not used.
    #[serde(default)]
    pub user_agent: Option<String>,
}

/// A string of at least one character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonEmpty(pub String);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Err(serde::de::Error::custom("an empty string"));
        }
        Ok(NonEmpty(s))
    }
}

/// `client` of the connect params.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientInfo {
    /// One of the schema's client ids.
    pub id: String,
    /// The client's version.
    pub version: NonEmpty,
    /// Its platform.
    pub platform: NonEmpty,
    /// One of the schema's modes.
    pub mode: String,
    /// Display name.
    #[serde(default)]
    pub display_name: Option<NonEmpty>,
    /// At most 96 bytes.
    #[serde(default)]
    pub build_id: Option<NonEmpty>,
    /// Device family.
    #[serde(default)]
    pub device_family: Option<NonEmpty>,
    /// Device model.
    #[serde(default)]
    pub model_identifier: Option<NonEmpty>,
    /// At most 64 bytes.
    #[serde(default)]
    pub time_zone: Option<NonEmpty>,
    /// Instance id.
    #[serde(default)]
    pub instance_id: Option<NonEmpty>,
}

/// Client ids the schema allows.
const CLIENT_IDS: &[&str] = &[
    "webchat-ui",
    "openclaw-control-ui",
    "openclaw-browser-copilot",
    "openclaw-tui",
    "webchat",
    "cli",
    "gateway-client",
    "openclaw-macos",
    "openclaw-linux",
    "openclaw-ios",
    "openclaw-watchos",
    "openclaw-android",
    "node-host",
    "openclaw-worker",
    "test",
    "fingerprint",
    "openclaw-probe",
];

/// Client modes the schema allows.
const CLIENT_MODES: &[&str] = &[
    "webchat", "cli", "ui", "backend", "node", "worker", "probe", "test",
];

/// `device` of the connect params.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeviceIdentity {
    /// The device id.
    pub id: NonEmpty,
    /// Its public key (not verified: no pairing here).
    pub public_key: NonEmpty,
    /// Its signature (not verified).
    pub signature: NonEmpty,
    /// When it signed (ms).
    pub signed_at: u64,
    /// The challenge nonce the device signed.
    pub nonce: NonEmpty,
}

/// `auth` of the connect params.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectAuth {
    /// The gateway token: a user token, a signed token or the operator token.
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    bootstrap_token: Option<String>,
    #[serde(default)]
    device_token: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    approval_runtime_token: Option<String>,
    #[serde(default)]
    agent_runtime_identity_token: Option<String>,
}

impl ConnectAuth {
    /// Whether a credential this gateway does not support was offered instead of a token.
    pub fn only_unsupported(&self) -> bool {
        self.token.is_none()
            && (self.bootstrap_token.is_some()
                || self.device_token.is_some()
                || self.password.is_some()
                || self.approval_runtime_token.is_some()
                || self.agent_runtime_identity_token.is_some())
    }
}

/// Why a `connect` is refused: the error's `details.code` and message, and the close code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRefusal {
    /// `details.code` (`PROTOCOL_MISMATCH`, `AUTH_TOKEN_MISMATCH`, ...); `None` for bad params.
    pub detail: Option<&'static str>,
    /// For the client.
    pub message: String,
    /// The WebSocket close code that follows the answer.
    pub close: u16,
}

impl ConnectRefusal {
    /// Bad params: 1008 without a detail code.
    pub fn params(message: impl Into<String>) -> Self {
        ConnectRefusal {
            detail: None,
            message: message.into(),
            close: close::POLICY,
        }
    }

    /// An authentication failure: 1008 with `detail`.
    pub fn auth(detail: &'static str, message: impl Into<String>) -> Self {
        ConnectRefusal {
            detail: Some(detail),
            message: message.into(),
            close: close::POLICY,
        }
    }
}

/// The WebSocket close codes this gateway uses.
pub mod close {
    /// A normal close.
    pub const NORMAL: u16 = 1000;
    /// Protocol error (and protocol version mismatch).
    pub const PROTOCOL: u16 = 1002;
    /// A data type the protocol does not use (binary frames).
    pub const UNSUPPORTED: u16 = 1003;
    /// Text that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Policy: handshake failures, slow consumers, pre-auth limits.
    pub const POLICY: u16 = 1008;
    /// A message larger than the announced `maxPayload`.
    pub const TOO_BIG: u16 = 1009;
    /// The gateway is restarting or stopping.
    pub const RESTART: u16 = 1012;
}

/// Parses and checks the params of a `connect` (against the challenge `nonce`) and picks the
/// protocol version.
pub fn check_connect(
    params: Option<&RawValue>,
    nonce: &str,
) -> Result<(ConnectParams, u32), ConnectRefusal> {
    let raw = params.ok_or_else(|| ConnectRefusal::params("invalid connect params: missing"))?;
    let p: ConnectParams = serde_json::from_str(raw.get()).map_err(|e| {
        ConnectRefusal::params(format!("invalid connect params: {}", short(&e.to_string())))
    })?;
    if p.min_protocol < 1 || p.max_protocol < 1 {
        return Err(ConnectRefusal::params(
            "invalid connect params: protocol versions start at 1",
        ));
    }
    if !CLIENT_IDS.contains(&p.client.id.as_str()) {
        return Err(ConnectRefusal::params(format!(
            "invalid connect params: unknown client.id {:?}",
            short(&p.client.id)
        )));
    }
    if !CLIENT_MODES.contains(&p.client.mode.as_str()) {
        return Err(ConnectRefusal::params(format!(
            "invalid connect params: unknown client.mode {:?}",
            short(&p.client.mode)
        )));
    }
    if p.client.build_id.as_ref().is_some_and(|b| b.0.len() > 96)
        || p.client.time_zone.as_ref().is_some_and(|t| t.0.len() > 64)
    {
        return Err(ConnectRefusal::params(
            "invalid connect params: client.buildId or client.timeZone too long",
        ));
    }
    let legacy_ok = p.role.as_ref().is_some_and(|r| r.0 == "node") || p.client.mode == "probe";
    let speaks = |v: u32| p.min_protocol <= v && v <= p.max_protocol;
    let protocol = if speaks(PROTOCOL) {
        PROTOCOL
    } else if legacy_ok && speaks(PROTOCOL_LEGACY) {
        PROTOCOL_LEGACY
    } else {
        return Err(ConnectRefusal {
            detail: Some("PROTOCOL_MISMATCH"),
            message: format!(
                "protocol mismatch: the gateway speaks {PROTOCOL} (and {PROTOCOL_LEGACY} for nodes and probes), the client {}..{}",
                p.min_protocol, p.max_protocol
            ),
            close: close::PROTOCOL,
        });
    };
    if let Some(d) = &p.device
        && d.nonce.0 != nonce
    {
        return Err(ConnectRefusal::auth(
            "DEVICE_AUTH_NONCE_MISMATCH",
            "device identity: the signed nonce is not this connection's challenge",
        ));
    }
    Ok((p, protocol))
}

/// Appends `s` as a JSON string.
pub fn push_str(out: &mut String, s: &str) {
    // Serializing a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

/// `{"type":"event","event":NAME,"payload":PAYLOAD,"seq":SEQ}` (`payload` is JSON text).
pub fn event_frame(name: &str, payload: &str, seq: u64) -> String {
    let mut out = String::with_capacity(48 + name.len() + payload.len());
    out.push_str("{\"type\":\"event\",\"event\":");
    push_str(&mut out, name);
    out.push_str(",\"payload\":");
    out.push_str(payload);
    let _ = write!(out, ",\"seq\":{seq}}}");
    out
}

/// `{"type":"res","id":ID,"ok":true,"payload":PAYLOAD}` (`payload` is JSON text).
pub fn ok_frame(id: &str, payload: &str) -> String {
    let mut out = String::with_capacity(48 + id.len() + payload.len());
    out.push_str("{\"type\":\"res\",\"id\":");
    push_str(&mut out, id);
    out.push_str(",\"ok\":true,\"payload\":");
    out.push_str(payload);
    out.push('}');
    out
}

/// An error as the protocol's `ErrorShape`.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorShape {
    /// `INVALID_REQUEST`, `UNAVAILABLE`, ...
    pub code: String,
    /// Never empty.
    pub message: String,
    /// `details` as JSON text.
    pub details: Option<String>,
    /// Whether retrying may succeed.
    pub retryable: Option<bool>,
    /// When to retry.
    pub retry_after_ms: Option<u64>,
}

impl ErrorShape {
    /// An error with `code` and `message` and, if given, `details.code`.
    pub fn new(code: &str, message: impl Into<String>, detail: Option<&str>) -> ErrorShape {
        ErrorShape {
            code: code.into(),
            message: message.into(),
            details: detail.map(|d| {
                let mut s = String::from("{\"code\":");
                push_str(&mut s, d);
                s.push('}');
                s
            }),
            retryable: None,
            retry_after_ms: None,
        }
    }
}

/// `{"type":"res","id":ID,"ok":false,"error":{...}}`.
pub fn error_frame(id: &str, e: &ErrorShape) -> String {
    let mut out = String::with_capacity(96 + id.len() + e.message.len());
    out.push_str("{\"type\":\"res\",\"id\":");
    push_str(&mut out, id);
    out.push_str(",\"ok\":false,\"error\":{\"code\":");
    push_str(
        &mut out,
        if e.code.is_empty() {
            "UNAVAILABLE"
        } else {
            &e.code
        },
    );
    out.push_str(",\"message\":");
    push_str(
        &mut out,
        if e.message.is_empty() {
            "error"
        } else {
            &e.message
        },
    );
    if let Some(d) = &e.details {
        out.push_str(",\"details\":");
        out.push_str(d);
    }
    if let Some(r) = e.retryable {
        let _ = write!(out, ",\"retryable\":{r}");
    }
    if let Some(ms) = e.retry_after_ms {
        let _ = write!(out, ",\"retryAfterMs\":{ms}");
    }
    out.push_str("}}");
    out
}

/// The error object a worker answers an RPC with (`{"message","details"?,"retryable"?,
/// "retryAfterMs"?}`), made an [`ErrorShape`] with the answer's `code`. A body that is not
/// such an object still gives a truthful error (the worker failed, with this status).
pub fn worker_error(code: &str, status: u16, body: &[u8]) -> ErrorShape {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct WorkerError<'a> {
        #[serde(default)]
        message: Option<String>,
        #[serde(default, borrow)]
        details: Option<&'a RawValue>,
        #[serde(default)]
        retryable: Option<bool>,
        #[serde(default)]
        retry_after_ms: Option<u64>,
    }
    let code = if code.is_empty() {
        if status < 500 {
            "INVALID_REQUEST"
        } else {
            "UNAVAILABLE"
        }
    } else {
        code
    };
    match serde_json::from_slice::<WorkerError<'_>>(body) {
        Ok(w) => ErrorShape {
            code: code.into(),
            message: w
                .message
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| format!("the worker failed ({status})")),
            details: w.details.map(|d| d.get().to_string()),
            retryable: w.retryable,
            retry_after_ms: w.retry_after_ms,
        },
        Err(_) => ErrorShape::new(code, format!("the worker failed ({status})"), None),
    }
}

/// What `hello-ok` announces.
#[derive(Debug, Clone)]
pub struct Hello<'a> {
    /// The negotiated protocol version.
    pub protocol: u32,
    /// This gateway's version string.
    pub version: &'a str,
    /// This connection's id.
    pub conn_id: &'a str,
    /// Methods served.
    pub methods: &'a [&'a str],
    /// Events sent.
    pub events: &'a [&'a str],
    /// Gateway uptime.
    pub uptime_ms: u64,
    /// The role granted.
    pub role: &'a str,
    /// The scopes granted.
    pub scopes: &'a [String],
    /// The largest inbound frame accepted.
    pub max_payload: usize,
    /// Outbound bytes buffered for the client before it is closed as a slow consumer.
    pub max_buffered_bytes: usize,
    /// Interval of `tick` events.
    pub tick_interval_ms: u64,
}

/// The `hello-ok` payload.
pub fn hello_ok(h: &Hello<'_>) -> String {
    let list = |items: &mut dyn Iterator<Item = &str>| {
        let mut s = String::from("[");
        for (i, item) in items.enumerate() {
            if i > 0 {
                s.push(',');
            }
            push_str(&mut s, item);
        }
        s.push(']');
        s
    };
    let mut out = String::with_capacity(512);
    let _ = write!(
        out,
        "{{\"type\":\"hello-ok\",\"protocol\":{},\"server\":{{\"version\":",
        h.protocol
    );
    push_str(&mut out, h.version);
    out.push_str(",\"connId\":");
    push_str(&mut out, h.conn_id);
    let _ = write!(
        out,
        "}},\"features\":{{\"methods\":{},\"events\":{}}}",
        list(&mut h.methods.iter().copied()),
        list(&mut h.events.iter().copied())
    );
    let _ = write!(
        out,
        ",\"snapshot\":{{\"presence\":[],\"health\":{{}},\"stateVersion\":{{\"presence\":0,\"health\":0}},\"uptimeMs\":{}}}",
        h.uptime_ms
    );
    out.push_str(",\"auth\":{\"role\":");
    push_str(&mut out, h.role);
    let _ = write!(
        out,
        ",\"scopes\":{}}}",
        list(&mut h.scopes.iter().map(String::as_str))
    );
    let _ = write!(
        out,
        ",\"policy\":{{\"maxPayload\":{},\"maxBufferedBytes\":{},\"tickIntervalMs\":{}}}}}",
        h.max_payload, h.max_buffered_bytes, h.tick_interval_ms
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn connect(extra: Value) -> String {
        let mut p = json!({
            "minProtocol": 4, "maxProtocol": 4,
            "client": {"id": "cli", "version": "1.0", "platform": "linux", "mode": "cli"},
        });
        if let (Some(o), Some(e)) = (p.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                o.insert(k.clone(), v.clone());
            }
        }
        p.to_string()
    }

    fn check(params: &str) -> Result<(ConnectParams, u32), ConnectRefusal> {
        let raw: Box<RawValue> = serde_json::from_str(params).unwrap();
        check_connect(Some(&raw), "nonce-1")
    }

    #[test]
    fn request_frames_keep_id_method_and_params_untouched() {
        let text = r#"{"type":"req","id":"a\"1","method":"agent","params":{"message":"hi",  "idempotencyKey":"run-7"}}"#;
        let r = parse_request(text).unwrap();
        assert_eq!(r.id, "a\"1");
        assert_eq!(r.method, "agent");
        assert_eq!(
            r.params.unwrap().get(),
            r#"{"message":"hi",  "idempotencyKey":"run-7"}"#
        );
        let r = parse_request(r#"{"type":"req","id":"1","method":"health"}"#).unwrap();
        assert!(r.params.is_none());
    }

    #[test]
    fn bad_request_frames_are_refused_with_their_id_when_they_have_one() {
        for (text, id) in [
            (r#"{"type":"req","id":"9","method":""}"#, Some("9")),
            (r#"{"type":"event","id":"9","method":"x"}"#, Some("9")),
            (
                r#"{"type":"req","id":"9","method":"x","extra":1}"#,
                Some("9"),
            ),
            (r#"{"type":"req","id":"","method":"x"}"#, None),
            (r#"{"type":"req","method":"x"}"#, None),
            ("not json", None),
            (r#"{"type":"req","id":7,"method":"x"}"#, None),
        ] {
            let e = parse_request(text).unwrap_err();
            assert_eq!(e.id.as_deref(), id, "{text}");
            assert!(e.message.starts_with("invalid request frame"), "{text}");
        }
        let long = format!(
            r#"{{"type":"req","id":"{}","method":"x"}}"#,
            "i".repeat(300)
        );
        assert!(parse_request(&long).is_err());
    }

    #[test]
    fn connect_negotiates_4_and_3_only_for_nodes_and_probes() {
        assert_eq!(check(&connect(json!({}))).unwrap().1, 4);
        assert_eq!(
            check(&connect(json!({"minProtocol": 1, "maxProtocol": 9})))
                .unwrap()
                .1,
            4
        );
        let old = json!({"minProtocol": 3, "maxProtocol": 3});
        let e = check(&connect(old.clone())).unwrap_err();
        assert_eq!((e.detail, e.close), (Some("PROTOCOL_MISMATCH"), 1002));
        let mut node = old.clone();
        node["role"] = json!("node");
        assert_eq!(check(&connect(node)).unwrap().1, 3);
        let probe = connect(json!({"minProtocol": 3, "maxProtocol": 3,
            "client": {"id": "openclaw-probe", "version": "1", "platform": "p", "mode": "probe"}}));
        assert_eq!(check(&probe).unwrap().1, 3);
        let e = check(&connect(json!({"minProtocol": 5, "maxProtocol": 6}))).unwrap_err();
        assert_eq!(e.close, close::PROTOCOL);
    }

    #[test]
    fn connect_params_are_checked_against_the_schema() {
        for bad in [
            json!({"client": {"id": "nope", "version": "1", "platform": "p", "mode": "cli"}}),
            json!({"client": {"id": "cli", "version": "1", "platform": "p", "mode": "nope"}}),
            json!({"client": {"id": "cli", "version": "", "platform": "p", "mode": "cli"}}),
            json!({"client": {"id": "cli", "version": "1", "platform": "p", "mode": "cli", "x": 1}}),
            json!({"surprise": true}),
            json!({"auth": {"token": "t", "cookie": "c"}}),
            json!({"scopes": [""]}),
            json!({"minProtocol": "4"}),
            json!({"device": {"id": "d", "publicKey": "k", "signature": "s", "signedAt": -1, "nonce": "n"}}),
        ] {
            let e = check(&connect(bad.clone())).unwrap_err();
            assert_eq!((e.detail, e.close), (None, 1008), "{bad}");
        }
        let raw: Box<RawValue> = serde_json::from_str("[]").unwrap();
        assert!(check_connect(Some(&raw), "n").is_err());
        assert!(check_connect(None, "n").is_err());
        let ok = connect(json!({"role": "operator", "scopes": ["operator.read"],
            "auth": {"token": "mbt_x"}, "locale": "en", "userAgent": "ua", "caps": []}));
        let (p, _) = check(&ok).unwrap();
        assert_eq!(p.auth.unwrap().token.as_deref(), Some("mbt_x"));
    }

    #[test]
    fn a_device_identity_must_sign_this_connections_nonce() {
        let device = |nonce: &str| {
            connect(
                json!({"device": {"id": "d", "publicKey": "k", "signature": "s",
                "signedAt": 1, "nonce": nonce}}),
            )
        };
        assert!(check(&device("nonce-1")).is_ok());
        let e = check(&device("nonce-2")).unwrap_err();
        assert_eq!(e.detail, Some("DEVICE_AUTH_NONCE_MISMATCH"));
    }

    #[test]
    fn outbound_frames_are_json_with_schema_fields_only() {
        let v: Value = serde_json::from_str(&event_frame("tick", r#"{"ts":5}"#, 3)).unwrap();
        assert_eq!(
            v,
            json!({"type":"event","event":"tick","payload":{"ts":5},"seq":3})
        );
        let v: Value = serde_json::from_str(&ok_frame("i\"d", "[1]")).unwrap();
        assert_eq!(v, json!({"type":"res","id":"i\"d","ok":true,"payload":[1]}));
        let mut e = ErrorShape::new("INVALID_REQUEST", "bad", Some("AUTH_TOKEN_MISMATCH"));
        e.retryable = Some(false);
        e.retry_after_ms = Some(10);
        let v: Value = serde_json::from_str(&error_frame("1", &e)).unwrap();
        assert_eq!(
            v,
            json!({"type":"res","id":"1","ok":false,"error":{"code":"INVALID_REQUEST",
                "message":"bad","details":{"code":"AUTH_TOKEN_MISMATCH"},"retryable":false,
                "retryAfterMs":10}})
        );
    }

    #[test]
    fn worker_errors_keep_their_fields_and_survive_garbage() {
        let e = worker_error(
            "NOT_FOUND",
            404,
            br#"{"message":"no such session","details":{"k":1},"retryable":false}"#,
        );
        assert_eq!(e.code, "NOT_FOUND");
        assert_eq!(e.message, "no such session");
        assert_eq!(e.details.as_deref(), Some(r#"{"k":1}"#));
        let e = worker_error("", 503, b"\xff not json");
        assert_eq!((e.code.as_str(), e.details), ("UNAVAILABLE", None));
        assert!(!e.message.is_empty());
        let e = worker_error("", 400, br#"{"message":""}"#);
        assert_eq!(e.code, "INVALID_REQUEST");
        assert!(!e.message.is_empty());
    }

    #[test]
    fn hello_ok_is_valid_json() {
        let scopes = vec!["operator.read".to_string()];
        let h = hello_ok(&Hello {
            protocol: 4,
            version: "moltbot 0.1.0",
            conn_id: "c1",
            methods: &["health", "agent"],
            events: &["tick"],
            uptime_ms: 5,
            role: "operator",
            scopes: &scopes,
            max_payload: 100,
            max_buffered_bytes: 200,
            tick_interval_ms: 30_000,
        });
        let v: Value = serde_json::from_str(&h).unwrap();
        assert_eq!(v["type"], "hello-ok");
        assert_eq!(v["features"]["methods"], json!(["health", "agent"]));
        assert_eq!(v["policy"]["maxPayload"], 100);
        assert_eq!(v["auth"]["scopes"], json!(["operator.read"]));
    }
}
