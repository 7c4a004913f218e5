//! Harness for the WebSocket tests: a client we did not write (`tungstenite`, synchronous) for
//! the protocol, and a raw frame writer and reader for the bytes that client refuses to produce
//! (unmasked frames, fragmented control frames, floods, byte-by-byte delivery).
#![allow(dead_code)] // Each test binary uses its own subset.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::{Message, WebSocket, client::IntoClientRequest};

use crate::gw::{GatewayProc, Options};

/// A `tungstenite` client over a blocking socket (reads time out after the harness deadline).
pub type Ws = WebSocket<TcpStream>;

/// The operator token of these tests.
pub const OPERATOR: &str = "operator-token-of-the-ws-tests";

/// Opens a WebSocket to `target` (path and query, e.g. `/?user=bob`) with extra `headers`;
/// panics unless the gateway answers 101.
pub fn open(g: &GatewayProc, target: &str, headers: &[(&str, &str)]) -> Ws {
    let mut req = format!("ws://{}{target}", g.addr)
        .into_client_request()
        .expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(
            HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    let (ws, resp) = tungstenite::client::client(req, g.connect())
        .unwrap_or_else(|e| panic!("upgrade to {target}: {e}\n{}", g.log()));
    assert_eq!(resp.status(), 101);
    ws
}

/// The next text frame as JSON (pings and pongs skipped); panics on a close or an error.
pub fn recv(ws: &mut Ws) -> Value {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                return serde_json::from_str(t.as_str())
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {t}"));
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Ok(other) => panic!("expected a text frame, got {other:?}"),
            Err(e) => panic!("expected a text frame, got the error {e}"),
        }
    }
}

/// Reads the `connect.challenge` event and returns its nonce.
pub fn challenge(ws: &mut Ws) -> String {
    let ev = recv(ws);
    assert_eq!(ev["type"], "event", "{ev}");
    assert_eq!(ev["event"], "connect.challenge", "{ev}");
    assert!(ev["payload"]["ts"].is_u64(), "{ev}");
    assert!(
        ev.get("seq").is_none(),
        "the challenge is not numbered: {ev}"
    );
    let nonce = ev["payload"]["nonce"].as_str().expect("nonce").to_string();
    assert!(!nonce.is_empty());
    nonce
}

/// The params of a `connect` with `token` (none: no `auth`).
pub fn connect_params(token: Option<&str>) -> Value {
    let mut p = json!({
        "minProtocol": 4, "maxProtocol": 4,
        "client": {"id": "test", "version": "1.0.0", "platform": "linux", "mode": "test"},
    });
    if let Some(t) = token {
        p["auth"] = json!({ "token": t });
    }
    p
}

/// A `req` frame.
pub fn req(id: &str, method: &str, params: Option<Value>) -> Value {
    let mut r = json!({"type": "req", "id": id, "method": method});
    if let Some(p) = params {
        r["params"] = p;
    }
    r
}

/// Sends `v` as one text frame.
pub fn send(ws: &mut Ws, v: &Value) {
    send_text(ws, &v.to_string());
}

/// Sends `text` as one text frame.
pub fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).expect("send");
}

/// The next `res` frame, skipping `tick` events (which may come at any time); it must answer
/// `id`.
pub fn next_res(ws: &mut Ws, id: &str) -> Value {
    loop {
        let f = recv(ws);
        if f["type"] == "event" && f["event"] == "tick" {
            continue;
        }
        assert_eq!(f["type"], "res", "{f}");
        assert_eq!(f["id"], id, "an answer to another request: {f}");
        return f;
    }
}

/// Challenge, `connect` with `params`, and its answer (`ok: true` or not).
pub fn connect_with(ws: &mut Ws, params: Value) -> Value {
    challenge(ws);
    send(ws, &req("c1", "connect", Some(params)));
    next_res(ws, "c1")
}

/// A complete handshake with `token`; returns the `hello-ok` payload.
pub fn hello(ws: &mut Ws, token: Option<&str>) -> Value {
    let res = connect_with(ws, connect_params(token));
    assert_eq!(res["ok"], true, "connect refused: {res}");
    assert_eq!(res["payload"]["type"], "hello-ok", "{res}");
    res["payload"].clone()
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// A close frame with this code and reason.
    Frame(u16, String),
    /// The socket closed (or was reset) without a close frame.
    Socket,
}

impl Closed {
    /// The close code, if a close frame came.
    pub fn code(&self) -> Option<u16> {
        match self {
            Closed::Frame(c, _) => Some(*c),
            Closed::Socket => None,
        }
    }
}

/// Reads until the server closes; returns how, and the text frames that came before.
pub fn closed(ws: &mut Ws) -> (Closed, Vec<Value>) {
    let mut texts = Vec::new();
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => texts.push(serde_json::from_str(t.as_str()).expect("JSON")),
            Ok(Message::Close(Some(f))) => {
                return (Closed::Frame(f.code.into(), f.reason.to_string()), texts);
            }
            Ok(Message::Close(None)) => return (Closed::Frame(1005, String::new()), texts),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("still open after the deadline; received {texts:?}")
            }
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("still open after the deadline; received {texts:?}")
            }
            Err(_) => return (Closed::Socket, texts),
        }
    }
}

/// Sends a `connect` with `params` and expects it refused: `ok: false`, `INVALID_REQUEST`,
/// `details.code` = `detail` (or no details), then a close frame with `code`.
pub fn expect_refused(ws: &mut Ws, params: Value, detail: Option<&str>, code: u16) -> Value {
    let res = connect_with(ws, params);
    assert_eq!(res["ok"], false, "{res}");
    assert_eq!(res["error"]["code"], "INVALID_REQUEST", "{res}");
    assert!(
        !res["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{res}"
    );
    match detail {
        Some(d) => assert_eq!(res["error"]["details"]["code"], d, "{res}"),
        None => assert!(res["error"].get("details").is_none(), "{res}"),
    }
    let (how, after) = closed(ws);
    assert!(after.is_empty(), "nothing after the refusal: {after:?}");
    match how {
        Closed::Frame(c, _) => assert_eq!(c, code, "{res}"),
        Closed::Socket => panic!("closed without a close frame after {res}"),
    }
    res
}

/// Proves the gateway serves a fresh client: a new connection naming `user` (by query)
/// completes the handshake with `token` and gets `health` answered.
pub fn serves_fresh_client(g: &GatewayProc, token: Option<&str>, user: &str) {
    let mut ws = open(g, &format!("/?user={user}"), &[]);
    hello(&mut ws, token);
    send(&mut ws, &req("fresh", "health", None));
    let res = next_res(&mut ws, "fresh");
    assert_eq!(res["ok"], true, "{res}");
    assert_eq!(res["payload"]["ok"], true, "{res}");
    let _ = ws.close(None);
}

// ---- Users and gateways ----

/// A users file in a temporary directory.
pub struct Users {
    _dir: tempfile::TempDir,
    /// Its path.
    pub file: PathBuf,
}

impl Users {
    /// An empty users file location.
    pub fn new() -> Users {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("users.json");
        Users { _dir: dir, file }
    }

    /// Adds `id` with the real `moltbot users add`; returns its token.
    pub fn add(&self, id: &str) -> String {
        add_user(&self.file, id)
    }
}

fn add_user(file: &Path, id: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_moltbot"))
        .args(["users", "add", id, "--users-file"])
        .arg(file)
        .env_remove("MOLTBOT_GATEWAY_TOKEN")
        .env_remove("MOLTBOT_USERS_FILE")
        .stdin(Stdio::null())
        .output()
        .expect("run moltbot users add");
    assert!(
        out.status.success(),
        "moltbot users add {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).expect("UTF-8");
    token.trim_end_matches('\n').to_string()
}

/// A gateway with the users file and the operator token, and `opts`.
pub fn with_users(users: &Users, opts: Options) -> GatewayProc {
    let mut opts = opts.env("MOLTBOT_GATEWAY_TOKEN", OPERATOR);
    opts.args
        .extend(["--users-file".to_string(), users.file.display().to_string()]);
    GatewayProc::start(opts)
}

// ---- Raw frames ----

/// An upgrade request for `target` with extra header lines.
pub fn upgrade_request(target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!(
        "GET {target} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// One frame as a client writes it: masked (with a fixed key) unless `masked` is false.
pub fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A masked text frame of `v`.
pub fn text_frame(v: &Value) -> Vec<u8> {
    frame(true, 0x1, v.to_string().as_bytes(), true)
}

/// A frame the server sent.
#[derive(Debug, Clone)]
pub struct RawFrame {
    /// FIN bit.
    pub fin: bool,
    /// Opcode.
    pub opcode: u8,
    /// Payload (servers do not mask).
    pub payload: Vec<u8>,
}

/// A WebSocket spoken byte by byte over a plain socket.
pub struct Raw {
    /// The socket (reads time out after the harness deadline).
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects and sends the upgrade for `target` (plus `then`, sent in the same write),
    /// and reads the 101.
    pub fn open(g: &GatewayProc, target: &str, headers: &[(&str, &str)], then: &[u8]) -> Raw {
        let mut bytes = upgrade_request(target, headers);
        bytes.extend_from_slice(then);
        let mut s = g.connect();
        s.write_all(&bytes).expect("write upgrade");
        Raw::after_upgrade(s)
    }

    /// Reads the 101 answer on `s`, whose upgrade request was sent.
    pub fn after_upgrade(s: TcpStream) -> Raw {
        let mut r = Raw { s, buf: Vec::new() };
        while !r.buf.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(r.fill(), "closed before the 101");
        }
        let end = r.buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
        let head = String::from_utf8_lossy(&r.buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        r.buf.drain(..end);
        r
    }

    /// Reads more bytes; false on EOF or reset.
    fn fill(&mut self) -> bool {
        let mut b = [0u8; 16384];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return false,
                Ok(n) => {
                    self.buf.extend_from_slice(&b[..n]);
                    return true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("the gateway sent nothing within the deadline")
                }
                Err(_) => return false,
            }
        }
    }

    fn need(&mut self, n: usize) -> bool {
        while self.buf.len() < n {
            if !self.fill() {
                return false;
            }
        }
        true
    }

    /// The next frame; `None` once the socket closed.
    pub fn read_frame(&mut self) -> Option<RawFrame> {
        if !self.need(2) {
            return None;
        }
        let (b0, b1) = (self.buf[0], self.buf[1]);
        assert_eq!(b1 & 0x80, 0, "a server frame is never masked");
        let (len, at) = match b1 & 0x7f {
            126 => {
                if !self.need(4) {
                    return None;
                }
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => {
                if !self.need(10) {
                    return None;
                }
                let mut l = [0u8; 8];
                l.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(l) as usize, 10)
            }
            n => (n as usize, 2),
        };
        if !self.need(at + len) {
            return None;
        }
        let payload = self.buf[at..at + len].to_vec();
        self.buf.drain(..at + len);
        Some(RawFrame {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            payload,
        })
    }

    /// The next text frame as JSON, skipping pongs; panics on anything else.
    pub fn text(&mut self) -> Value {
        loop {
            let f = self
                .read_frame()
                .expect("a text frame, not a closed socket");
            match f.opcode {
                0x1 => return serde_json::from_slice(&f.payload).expect("JSON"),
                0xA => {}
                op => panic!("expected a text frame, got opcode {op}: {f:?}"),
            }
        }
    }

    /// Writes `bytes`.
    pub fn write(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write");
    }

    /// Reads until the server closes: how, and the text frames before.
    pub fn closed(&mut self) -> (Closed, Vec<Value>) {
        let mut texts = Vec::new();
        loop {
            let Some(f) = self.read_frame() else {
                return (Closed::Socket, texts);
            };
            match f.opcode {
                0x1 => texts.push(serde_json::from_slice(&f.payload).expect("JSON")),
                0x8 => {
                    let code = if f.payload.len() >= 2 {
                        u16::from_be_bytes([f.payload[0], f.payload[1]])
                    } else {
                        1005
                    };
                    let reason = String::from_utf8_lossy(f.payload.get(2..).unwrap_or(&[]));
                    return (Closed::Frame(code, reason.into_owned()), texts);
                }
                _ => {}
            }
        }
    }

    /// The handshake over raw frames: challenge, `connect` with `token`, `hello-ok`.
    pub fn hello(&mut self, token: Option<&str>) -> Value {
        let ch = self.text();
        assert_eq!(ch["event"], "connect.challenge", "{ch}");
        self.write(&text_frame(&req(
            "c1",
            "connect",
            Some(connect_params(token)),
        )));
        let res = self.text();
        assert_eq!(res["ok"], true, "{res}");
        res["payload"].clone()
    }
}

/// The resident set size of `pid` now and at its peak, in KiB (`VmRSS`, `VmHWM`).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}
