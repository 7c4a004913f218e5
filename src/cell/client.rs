//! A blocking WebSocket client of one OpenClaw cell, speaking as a backend operator.
//!
//! It performs the handshake (wait for `connect.challenge`, send `connect` with the cell's
//! token, check `hello-ok`) and then passes frames through: requests go out with the id,
//! method and params the caller gives, byte for byte; answers and events come back with
//! their payloads as raw JSON text, unparsed, so that a relay forwards exactly what the cell
//! said (request ids, run ids and idempotency keys included). Every read and write has a
//! timeout, so a cell that hangs cannot block its caller forever.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// The protocol version spoken (the real gateway's current one).
pub const PROTOCOL: u32 = 4;

/// The scopes requested: read and write for the methods clients use (`health`, `status`,
/// `sessions.list`, `agent`, `chat.send`…), admin for the rest, since the cell serves one
/// user who is its whole operator.
pub const SCOPES: [&str; 3] = ["operator.read", "operator.write", "operator.admin"];

/// The id of the `connect` request (the first frame, before any of the caller's).
const CONNECT_ID: &str = "moltbot-cell-connect";

/// The largest message accepted: the real gateway's announced payload limit is 25 MiB, and
/// node's `ws` sends a message as one frame, so the frame limit is raised to match too.
const MAX_MESSAGE: usize = 32 << 20;

/// How long a write may block (the cell stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A frame from the cell, its payloads as the cell wrote them.
#[derive(Debug, Clone)]
pub enum Frame {
    /// An answer to a request (`{"type":"res",…}`); the `agent` method answers twice with
    /// the same id (accepted, then final).
    Res {
        id: String,
        ok: bool,
        payload_raw: Option<Box<RawValue>>,
        error_raw: Option<Box<RawValue>>,
        /// The whole frame's text.
        raw: String,
    },
    /// An event (`{"type":"event",…}`): `tick`, `agent`, `chat`, `shutdown`, …
    Event {
        name: String,
        payload_raw: Option<Box<RawValue>>,
        seq: Option<u64>,
        /// The whole frame's text.
        raw: String,
    },
}

/// Why talking to a cell failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the cell on port {port}: {source}")]
    Connect { port: u16, source: std::io::Error },
    #[error("WebSocket upgrade with the cell failed: {0}")]
    Upgrade(String),
    #[error("the cell did not {0} in time")]
    Timeout(&'static str),
    #[error("the cell refused the connection: {error}")]
    Rejected { error: String },
    #[error("the cell broke the protocol: {0}")]
    Protocol(String),
    #[error("the cell closed the connection (code {code:?}: {reason})")]
    Closed { code: Option<u16>, reason: String },
    #[error("params are not JSON: {0}")]
    InvalidParams(serde_json::Error),
    #[error("connection to the cell failed: {0}")]
    Ws(Box<tungstenite::Error>),
}

impl From<tungstenite::Error> for ClientError {
    fn from(e: tungstenite::Error) -> ClientError {
        match e {
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                ClientError::Closed {
                    code: None,
                    reason: "connection closed".into(),
                }
            }
            e => ClientError::Ws(Box::new(e)),
        }
    }
}

/// One connection to a cell, authenticated as a backend operator.
pub struct BackendClient {
    ws: WebSocket<TcpStream>,
    hello: Box<RawValue>,
}

impl std::fmt::Debug for BackendClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendClient").finish_non_exhaustive()
    }
}

/// The fields of a frame the client looks at; the rest stays in the raw text.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    ok: Option<bool>,
    #[serde(default, borrow)]
    payload: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
}

/// A request frame's text, `{"type":"req","id":…,"method":…,"params":…}`, made once by the
/// caller and sent as it is.
#[derive(Debug)]
pub struct RequestText(String);

impl RequestText {
    /// The frame of request `id` for `method`, `params` copied as is (`None` leaves it out).
    pub fn new(id: &str, method: &str, params: Option<&RawValue>) -> RequestText {
        RequestText(
            serde_json::to_string(&Request {
                kind: "req",
                id,
                method,
                params,
            })
            .expect("strings and raw JSON always serialize"),
        )
    }
}

#[derive(Serialize)]
struct Request<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<&'a RawValue>,
}

impl BackendClient {
    /// Connects to `ws://127.0.0.1:PORT/` and completes the handshake with `token`, all
    /// within `timeout`.
    pub fn connect(
        port: u16,
        token: &str,
        timeout: Duration,
    ) -> Result<BackendClient, ClientError> {
        let deadline = Instant::now() + timeout;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let connect_err = |source| ClientError::Connect { port, source };
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(connect_err)?;
        stream.set_nodelay(true).map_err(connect_err)?;
        stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(connect_err)?;
        set_read_deadline(&stream, deadline, "answer the upgrade").map_err(|e| match e {
            ClientError::Ws(e) => ClientError::Upgrade(e.to_string()),
            e => e,
        })?;
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let url = format!("ws://127.0.0.1:{port}/");
        let (ws, _) = tungstenite::client::client_with_config(url.as_str(), stream, Some(config))
            .map_err(|e| match e {
            tungstenite::HandshakeError::Interrupted(_) => {
                ClientError::Timeout("answer the upgrade")
            }
            tungstenite::HandshakeError::Failure(e) => ClientError::Upgrade(e.to_string()),
        })?;
        let mut client = BackendClient {
            ws,
            hello: RawValue::from_string("null".into()).expect("null is JSON"),
        };

        // The server speaks first.
        match client.read_until(deadline, "send connect.challenge")? {
            Frame::Event { name, .. } if name == "connect.challenge" => {}
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected connect.challenge, got {}",
                    raw_of(&other)
                )));
            }
        }
        let params = serde_json::json!({
            "minProtocol": PROTOCOL,
            "maxProtocol": PROTOCOL,
            "client": {
                "id": "gateway-client",
                "version": env!("CARGO_PKG_VERSION"),
                "platform": "linux",
                "mode": "backend",
            },
            "role": "operator",
            "scopes": SCOPES,
            "auth": { "token": token },
        })
        .to_string();
        client.send_request(CONNECT_ID, "connect", Some(&params))?;
        loop {
            match client.read_until(deadline, "answer connect")? {
                Frame::Res {
                    id,
                    ok,
                    payload_raw,
                    error_raw,
                    ..
                } if id == CONNECT_ID => {
                    if !ok {
                        return Err(ClientError::Rejected {
                            error: error_raw.map_or_else(|| "no error".into(), |e| e.get().into()),
                        });
                    }
                    let hello = payload_raw
                        .ok_or_else(|| ClientError::Protocol("hello-ok without payload".into()))?;
                    #[derive(Deserialize)]
                    struct Hello<'a> {
                        #[serde(rename = "type", borrow)]
                        kind: &'a str,
                    }
                    match serde_json::from_str::<Hello<'_>>(hello.get()) {
                        Ok(h) if h.kind == "hello-ok" => {}
                        _ => {
                            return Err(ClientError::Protocol(format!(
                                "connect answered without hello-ok: {}",
                                hello.get()
                            )));
                        }
                    }
                    client.hello = hello;
                    return Ok(client);
                }
                // Events may come before the answer (presence, health); a connection that
                // has not completed the handshake has no use for them.
                Frame::Event { .. } => {}
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected frame during the handshake: {}",
                        raw_of(&other)
                    )));
                }
            }
        }
    }

    /// The `hello-ok` payload the cell answered `connect` with (its methods, events,
    /// snapshot, policy).
    pub fn hello_raw(&self) -> &RawValue {
        &self.hello
    }

    /// The socket, for a caller that waits for it to become readable (with `poll`) before
    /// calling [`BackendClient::next_frame`], so that one thread can also wait for frames to
    /// send. Reading or writing it directly would corrupt the WebSocket stream.
    pub fn socket(&self) -> &TcpStream {
        self.ws.get_ref()
    }

    /// Sends `{"type":"req","id":ID,"method":METHOD,"params":PARAMS}`, `params` (JSON text)
    /// copied as is; `None` leaves `params` out, as some clients do.
    pub fn send_request(
        &mut self,
        id: &str,
        method: &str,
        params: Option<&str>,
    ) -> Result<(), ClientError> {
        let params: Option<&RawValue> = params
            .map(serde_json::from_str)
            .transpose()
            .map_err(ClientError::InvalidParams)?;
        self.send_text(RequestText::new(id, method, params).0)
    }

    /// Sends a request made with [`RequestText::new`] (no second parse: it is valid JSON by
    /// construction).
    pub fn send_request_text(&mut self, request: RequestText) -> Result<(), ClientError> {
        self.send_text(request.0)
    }

    /// Sends a frame the caller made (a client's request relayed as it came, `traceparent`
    /// and all); it must be JSON.
    pub fn send_raw(&mut self, frame: &str) -> Result<(), ClientError> {
        serde_json::from_str::<&RawValue>(frame).map_err(ClientError::InvalidParams)?;
        self.send_text(frame.to_string())
    }

    /// The next frame from the cell, or `None` when none came within `timeout`. Pings are
    /// answered on the way. `Err` when the connection closed or broke: it is then unusable.
    pub fn next_frame(&mut self, timeout: Duration) -> Result<Option<Frame>, ClientError> {
        match self.read_until(Instant::now() + timeout, "send a frame") {
            Ok(frame) => Ok(Some(frame)),
            Err(ClientError::Timeout(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The next frame that has already arrived, without waiting: `None` once the socket has
    /// no more (a partly received frame stays buffered for the next call). For a caller that
    /// waits with `poll`: a read with a timeout would block for the kernel's timer
    /// granularity (4 ms at HZ=250) at the end of every burst.
    pub fn try_next_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        let io = |e| ClientError::Ws(Box::new(tungstenite::Error::Io(e)));
        self.ws.get_ref().set_nonblocking(true).map_err(io)?;
        let got = loop {
            match self.ws.read() {
                Ok(m) => match self.message(m) {
                    Some(r) => break r.map(Some),
                    None => continue,
                },
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    break Ok(None);
                }
                Err(e) => break Err(e.into()),
            }
        };
        self.ws.get_ref().set_nonblocking(false).map_err(io)?;
        got
    }

    /// What a message read means: a frame, the end of the connection, or nothing (`None`:
    /// pings are answered by tungstenite; pongs and raw frames carry nothing).
    fn message(&mut self, m: Message) -> Option<Result<Frame, ClientError>> {
        match m {
            Message::Text(text) => Some(parse_frame(text.as_str())),
            Message::Close(frame) => {
                // Answer the close (tungstenite queues the reply; flushing sends it).
                let _ = self.ws.flush();
                Some(Err(ClientError::Closed {
                    code: frame.as_ref().map(|f| u16::from(f.code)),
                    reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                }))
            }
            Message::Binary(_) => Some(Err(ClientError::Protocol("binary frame".into()))),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
        }
    }

    /// Starts the close handshake and waits up to `timeout` for the cell's answer.
    pub fn close(mut self, timeout: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + timeout;
        match self.ws.close(None) {
            Ok(()) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        loop {
            match self.read_until(deadline, "answer close") {
                Ok(_) => {}
                Err(ClientError::Closed { .. }) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn send_text(&mut self, text: String) -> Result<(), ClientError> {
        match self.ws.send(Message::text(text)) {
            Ok(()) => Ok(()),
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                Err(ClientError::Timeout("read what was sent"))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads until a text frame arrives or `deadline` passes (`Timeout(what)`).
    fn read_until(&mut self, deadline: Instant, what: &'static str) -> Result<Frame, ClientError> {
        loop {
            set_read_deadline(self.ws.get_ref(), deadline, what)?;
            match self.ws.read() {
                Ok(m) => {
                    if let Some(r) = self.message(m) {
                        return r;
                    }
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    // A partly read frame stays in tungstenite's buffer for the next read.
                    if Instant::now() >= deadline {
                        return Err(ClientError::Timeout(what));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Sets the socket's read timeout to what is left until `deadline` (at least 1 ms: zero
/// would mean no timeout at all).
fn set_read_deadline(
    stream: &TcpStream,
    deadline: Instant,
    what: &'static str,
) -> Result<(), ClientError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ClientError::Timeout(what));
    }
    stream
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .map_err(|e| ClientError::Ws(Box::new(tungstenite::Error::Io(e))))
}

fn parse_frame(text: &str) -> Result<Frame, ClientError> {
    let f: Incoming<'_> = serde_json::from_str(text)
        .map_err(|e| ClientError::Protocol(format!("frame is not a JSON frame ({e}): {text}")))?;
    let own = |v: Option<&RawValue>| v.map(RawValue::to_owned);
    match f.kind {
        "res" => Ok(Frame::Res {
            id: f
                .id
                .ok_or_else(|| ClientError::Protocol(format!("res without id: {text}")))?,
            ok: f
                .ok
                .ok_or_else(|| ClientError::Protocol(format!("res without ok: {text}")))?,
            payload_raw: own(f.payload),
            error_raw: own(f.error),
            raw: text.to_string(),
        }),
        "event" => Ok(Frame::Event {
            name: f
                .event
                .ok_or_else(|| ClientError::Protocol(format!("event without name: {text}")))?,
            payload_raw: own(f.payload),
            seq: f.seq,
            raw: text.to_string(),
        }),
        other => Err(ClientError::Protocol(format!(
            "frame of type {other:?}: {text}"
        ))),
    }
}

fn raw_of(frame: &Frame) -> &str {
    match frame {
        Frame::Res { raw, .. } | Frame::Event { raw, .. } => raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn frames_keep_their_payloads_verbatim() {
        let text = r#"{"type":"res","id":"r 1","ok":true,"payload":{"runId":"k1",  "n":1.50}}"#;
        match parse_frame(text).unwrap() {
            Frame::Res {
                id,
                ok,
                payload_raw,
                error_raw,
                raw,
            } => {
                assert_eq!((id.as_str(), ok), ("r 1", true));
                assert_eq!(payload_raw.unwrap().get(), r#"{"runId":"k1",  "n":1.50}"#);
                assert!(error_raw.is_none());
                assert_eq!(raw, text);
            }
            f => panic!("{f:?}"),
        }
        let text = r#"{"type":"event","event":"tick","payload":{"ts":1},"seq":7}"#;
        match parse_frame(text).unwrap() {
            Frame::Event {
                name,
                payload_raw,
                seq,
                ..
            } => {
                assert_eq!((name.as_str(), seq), ("tick", Some(7)));
                assert_eq!(payload_raw.unwrap().get(), r#"{"ts":1}"#);
            }
            f => panic!("{f:?}"),
        }
        for bad in [
            r#"{"type":"req","id":"1","method":"x"}"#,
            r#"{"type":"res","ok":true}"#,
            r#"{"type":"event"}"#,
            "[1]",
            "nope",
        ] {
            assert!(
                matches!(parse_frame(bad), Err(ClientError::Protocol(_))),
                "{bad}"
            );
        }
    }

    /// A server speaking the cell's side of the handshake on a thread: answers `connect`
    /// with `answer` (built from the connect request), then echoes each request's raw
    /// params back as an event and closes when the client does.
    fn fake_cell(
        answer: fn(&serde_json::Value) -> String,
    ) -> (u16, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut ws = tungstenite::accept(stream).unwrap();
            ws.send(Message::text(
                r#"{"type":"event","event":"connect.challenge","payload":{"nonce":"n","ts":1}}"#,
            ))
            .unwrap();
            let mut seen = Vec::new();
            loop {
                let text = match ws.read() {
                    Ok(Message::Text(t)) => t.to_string(),
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                seen.push(text.clone());
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                if v["method"] == "connect" {
                    if ws.send(Message::text(answer(&v))).is_err() {
                        break;
                    }
                } else {
                    let event =
                        format!(r#"{{"type":"event","event":"echo","seq":1,"payload":{text}}}"#);
                    ws.send(Message::text(event)).unwrap();
                }
            }
            let _ = ws.flush();
            seen
        });
        (port, server)
    }

    #[test]
    fn handshake_then_requests_go_out_and_frames_come_back_as_written() {
        let (port, server) = fake_cell(|req| {
            // Only the right token, protocol and client identity are welcome.
            let p = &req["params"];
            let good = p["auth"]["token"] == "sekrit"
                && p["minProtocol"] == 4
                && p["client"]["id"] == "gateway-client"
                && p["client"]["mode"] == "backend"
                && p["role"] == "operator";
            let id = req["id"].as_str().unwrap();
            if good {
                format!(
                    r#"{{"type":"res","id":"{id}","ok":true,"payload":{{"type":"hello-ok","protocol":4}}}}"#
                )
            } else {
                format!(
                    r#"{{"type":"res","id":"{id}","ok":false,"error":{{"code":"INVALID_REQUEST"}}}}"#
                )
            }
        });
        let mut c = BackendClient::connect(port, "sekrit", Duration::from_secs(30)).unwrap();
        assert_eq!(c.hello_raw().get(), r#"{"type":"hello-ok","protocol":4}"#);
        let params = r#"{"message":"hi",  "idempotencyKey":"k1"}"#;
        c.send_request("a/1", "agent", Some(params)).unwrap();
        let frame = c.next_frame(Duration::from_secs(30)).unwrap().unwrap();
        let Frame::Event {
            name, payload_raw, ..
        } = frame
        else {
            panic!("{frame:?}")
        };
        assert_eq!(name, "echo");
        assert_eq!(
            payload_raw.unwrap().get(),
            format!(r#"{{"type":"req","id":"a/1","method":"agent","params":{params}}}"#)
        );
        // Without waiting: nothing yet is None; once the socket is readable, the frame, and
        // the socket is blocking again for the timed reads.
        assert!(c.try_next_frame().unwrap().is_none());
        c.send_request("h", "health", None).unwrap();
        let readable = |c: &BackendClient| {
            let mut fds = [rustix::event::PollFd::new(
                c.socket(),
                rustix::event::PollFlags::IN,
            )];
            rustix::event::poll(&mut fds, None).unwrap();
        };
        readable(&c);
        let got = loop {
            if let Some(f) = c.try_next_frame().unwrap() {
                break f;
            }
            // Readable with half a frame: wait for the rest.
            readable(&c);
        };
        assert!(
            raw_of(&got).contains(r#""id":"h","method":"health""#),
            "{got:?}"
        );
        assert!(c.try_next_frame().unwrap().is_none());
        assert!(matches!(
            c.send_request("x", "agent", Some("{oops")),
            Err(ClientError::InvalidParams(_))
        ));
        // Nothing more comes: the wait ends with None, not an error.
        assert!(c.next_frame(Duration::from_millis(200)).unwrap().is_none());
        c.close(Duration::from_secs(30)).unwrap();
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(
            seen[2].contains(r#""id":"h","method":"health"}"#),
            "{}",
            seen[2]
        );
    }

    #[test]
    fn a_refused_token_is_an_error_with_the_cells_words() {
        let (port, server) = fake_cell(|req| {
            let id = req["id"].as_str().unwrap();
            format!(
                r#"{{"type":"res","id":"{id}","ok":false,"error":{{"code":"INVALID_REQUEST"}}}}"#
            )
        });
        match BackendClient::connect(port, "wrong", Duration::from_secs(30)) {
            Err(ClientError::Rejected { error }) => {
                assert_eq!(error, r#"{"code":"INVALID_REQUEST"}"#)
            }
            other => panic!("{other:?}"),
        }
        server.join().unwrap();
    }

    #[test]
    fn a_silent_server_times_the_handshake_out() {
        // Accepts the TCP connection and the upgrade, then says nothing.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let _ws = tungstenite::accept(stream).unwrap();
            // Hold the connection open until the client has given up.
            let _ = done_rx.recv();
        });
        let started = Instant::now();
        let r = BackendClient::connect(port, "t", Duration::from_millis(500));
        assert!(
            matches!(r, Err(ClientError::Timeout("send connect.challenge"))),
            "{r:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(500));
        done_tx.send(()).unwrap();
        server.join().unwrap();
    }
}
