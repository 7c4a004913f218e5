//! The OpenClaw gateway protocol over WebSocket, on `/` of the gateway port beside the HTTP
//! API: the upgrade, the `connect` handshake, then each `req` relayed to the user's worker
//! with its answers and events streamed back.
//!
//! RFC 6455 framing (masking, fragmentation, control frames, the close handshake, UTF-8,
//! size limits) is async-tungstenite's, driven by the core that accepted the connection; the
//! connection lives on that core like an HTTP connection does.
//!
//! Bounds, so that no client can stall a core or grow its memory without limit:
//! - before `hello-ok`: at most [`PRE_AUTH_BYTES`] read in all (a frame over
//!   [`PRE_AUTH_FRAME`] closes with 1009) and `ws_connect_timeout` from the upgrade to
//!   connect (1008), by which the client must also have taken what was sent to it (else the
//!   connection is reset);
//! - after: frames up to `policy.maxPayload` (= `max_body_bytes`, which a ring frame carries),
//!   1009 beyond; text only (binary: 1003), UTF-8 (1007); the outbound queue is bounded by
//!   `policy.maxBufferedBytes` (1008 "slow consumer");
//! - the task yields to the core's other tasks between inbound messages (ping floods).
//!
//! Tenancy: a connection acts as the one user its credential names (see [`connect`]); its
//! requests go to that user's worker, and it receives the events of that user's runs only
//! (see [`hub`]).

pub mod frames;
pub mod hub;
mod presence;
mod run;
mod stream;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use async_tungstenite::tungstenite::{Error as WsError, Message};
use futures_lite::{AsyncWriteExt, StreamExt};
use futures_util::SinkExt;
use glommio::net::TcpStream;

use crate::auth::{Principal, Refusal};
use crate::gateway::answer::Answer;
use crate::gateway::http::{Method, RequestHead};
use crate::gateway::notify::Notify;
use crate::gateway::reactor::Reactor;
use crate::metrics::Endpoint;
use frames::{ConnectRefusal, ErrorShape, close};
use hub::{Outbox, Outgoing};
use stream::Metered;

/// Most bytes read from a client before it has authenticated.
pub const PRE_AUTH_BYTES: usize = 128 * 1024;
/// Largest frame accepted before authentication.
pub const PRE_AUTH_FRAME: usize = 64 * 1024;

/// Bytes of frames encoded before a write: a batch of queued frames goes out in one write
/// up to this size.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// What a frame adds around the body a ring frame carried: the JSON around it (the type, the
/// request id of at most 256 bytes escaped, the event's `seq`) and the WebSocket header.
const FRAME_ENVELOPE: usize = 4 * 1024;

/// How often a draining connection checks whether the drain timeout passed.
const DRAIN_CHECK: Duration = Duration::from_millis(100);

/// How long a closing connection waits for the client to answer its close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Requests of one connection in flight at once; beyond, its next frames wait (as HTTP
/// pipelining does), so that one connection cannot fill its worker's admission queue and
/// starve the other users of that worker.
pub const MAX_IN_FLIGHT: usize = 32;

/// The methods the built-in worker serves (announced in `hello-ok`).
pub const METHODS: &[&str] = &[
    "health",
    "status",
    "sessions.list",
    "chat.history",
    "agent",
    "chat.send",
];

/// The events this gateway sends.
pub const EVENTS: &[&str] = &["connect.challenge", "tick", "shutdown", "agent", "chat"];

/// Whether `head` asks to upgrade to WebSocket (`Upgrade: websocket`).
pub fn is_upgrade(head: &RequestHead) -> bool {
    head.upgrade_websocket
}

/// A WebSocket upgrade that cannot be served: the HTTP answer, then close.
async fn refuse_upgrade(stream: TcpStream, status: u16, code: &str, message: &str) {
    let mut a = Answer::error(Endpoint::Other, status, code, message, false, None);
    if status == 426 {
        a.headers.push(("sec-websocket-version", "13".into()));
    }
    crate::gateway::conn::answer_and_close(stream, &a).await;
}

/// Serves a WebSocket connection whose upgrade request is `head`; `early` holds bytes the
/// client sent after it.
pub async fn serve(reactor: Rc<Reactor>, mut stream: TcpStream, head: RequestHead, early: Vec<u8>) {
    let Some(key) = head.websocket_key.clone() else {
        return refuse_upgrade(stream, 400, "BAD_UPGRADE", "missing Sec-WebSocket-Key").await;
    };
    if head.method != Method::Get || !head.connection_upgrade {
        return refuse_upgrade(
            stream,
            400,
            "BAD_UPGRADE",
            "a WebSocket upgrade is a GET with `Connection: Upgrade`",
        )
        .await;
    }
    if head.websocket_version.as_deref() != Some(b"13".as_slice()) {
        return refuse_upgrade(stream, 426, "UPGRADE_REQUIRED", "WebSocket version 13 only").await;
    }
    if head.path() != "/" {
        return refuse_upgrade(stream, 404, "NOT_FOUND", "WebSocket connections go to /").await;
    }
    use crate::gateway::http::BodyFraming;
    if !matches!(head.body, BodyFraming::None | BodyFraming::Length(0)) {
        return refuse_upgrade(stream, 400, "BAD_UPGRADE", "an upgrade request has no body").await;
    }
    let accept = async_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    );
    let sent = glommio::timer::timeout(Duration::from_secs(5), async {
        stream
            .write_all(response.as_bytes())
            .await
            .map_err(Into::into)
    })
    .await;
    if sent.is_err() {
        return;
    }
    let cfg = &reactor.shared.config;
    // The client has this long to connect, and to take what is sent to it meanwhile.
    let connect_deadline = Instant::now() + cfg.ws_connect_timeout;
    let mut ws_config = WebSocketConfig::default();
    ws_config.read_buffer_size = 4096;
    // Frames are encoded into the buffer and written when `flush` ends a batch; the buffer
    // is written out early only when a batch outgrows it.
    ws_config.write_buffer_size = WRITE_BATCH_BYTES;
    ws_config.max_message_size = Some(cfg.max_body_bytes);
    ws_config.max_frame_size = Some(cfg.max_body_bytes);
    // The codec queues a pong for each ping while the client does not read them; unbounded,
    // a ping flood grew the gateway by every pong it could not send. Beyond this bound the
    // latest pong replaces the unsent one, and a frame that does not fit ends the connection.
    // The outbox takes one frame of any size (its limit, `ws_max_buffered_bytes`, bounds a
    // backlog, not a frame), so the bound is room for the largest frame the gateway sends —
    // a worker's answer or event, whose body a ring frame carried, in its envelope — behind a
    // batch's worth of frames not yet written (a blocked write is finished before the next
    // frame is encoded).
    ws_config.max_write_buffer_size = cfg
        .ring_capacity
        .saturating_add(FRAME_ENVELOPE)
        .saturating_add(WRITE_BATCH_BYTES);
    let budget = Rc::new(Cell::new(Some(PRE_AUTH_BYTES.saturating_sub(early.len()))));
    let metered = Metered::new(stream, budget.clone());
    let ws =
        WebSocketStream::from_partially_read(metered, early, Role::Server, Some(ws_config)).await;
    let named = named_user(&head);
    let mut c = Conn {
        reactor: reactor.clone(),
        ws,
        budget,
        seq: 0,
    };
    c.run(named, connect_deadline).await;
}

/// The user an upgrade request names for an operator token or a gateway without credentials:
/// the `x-moltbot-user` header, else `?user=` in the URL (for clients that cannot set
/// headers, such as browsers and the `openclaw` CLI).
fn named_user(head: &RequestHead) -> Option<Vec<u8>> {
    if let Some(u) = &head.user {
        return Some(u.clone());
    }
    let query = head.query()?;
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("user=") {
            let decoded: Vec<u8> = percent_encoding::percent_decode_str(v).collect();
            return Some(decoded);
        }
    }
    None
}

/// Why the connection ends.
enum End {
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The client sent a close frame: the codec queued the answer, which is sent, then the
    /// connection ends.
    ClosedByClient,
    /// The socket failed, or ended without a close frame: nothing more to send.
    Gone,
    /// The client did not take a frame in time: the socket is reset, dropping what it did
    /// not read.
    Reset,
}

/// One authenticated connection's identity.
struct Session {
    user: String,
    outbox: Arc<Outbox>,
    wake: Rc<Notify>,
    /// Requests of this connection not yet finally answered.
    in_flight: Rc<Cell<usize>>,
    /// Counted at the user's slot while the connection or one of its requests lives.
    presence: Rc<presence::Presence>,
}

struct Conn {
    reactor: Rc<Reactor>,
    ws: WebSocketStream<Metered>,
    /// Bytes the client may still send before authenticating (`None`: authenticated).
    budget: Rc<Cell<Option<usize>>>,
    /// The last event `seq` sent.
    seq: u64,
}

impl Conn {
    async fn run(&mut self, named: Option<Vec<u8>>, connect_deadline: Instant) {
        let session = match self.handshake(named, connect_deadline).await {
            Ok(s) => s,
            Err(end) => return self.end(end).await,
        };
        let end = self.serve(&session).await;
        self.reactor
            .shared
            .hub
            .leave(&session.user, &session.outbox);
        self.reactor
            .ws_conns
            .borrow_mut()
            .remove(&session.outbox.conn);
        self.end(end).await;
    }

    /// Sends a close frame (bounded in time: the client may not read) and ends. A client that
    /// has not answered the close within the bound is reset: what it did not read (a slow
    /// consumer's backlog, the close frame itself) is dropped rather than left to the kernel
    /// to deliver, for minutes, to a client that does not read.
    ///
    /// A client's close frame is answered (RFC 6455 §5.5.1): the codec only queues the answer
    /// when it reads the close, so it is flushed here, within the same bound, before the
    /// socket is closed.
    async fn end(&mut self, end: End) {
        let in_time = match end {
            End::Close(code, reason) => {
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                };
                glommio::timer::timeout(CLOSE_WAIT, async {
                    let _ = self.ws.close(Some(frame)).await;
                    // Let the client answer the close (bounded by the timeout), as RFC 6455
                    // asks.
                    while let Some(Ok(_)) = self.ws.next().await {}
                    Ok(())
                })
                .await
                .is_ok()
            }
            End::ClosedByClient => glommio::timer::timeout(CLOSE_WAIT, async {
                let _ = self.ws.flush().await;
                Ok(())
            })
            .await
            .is_ok(),
            End::Gone => true,
            End::Reset => false,
        };
        if !in_time {
            // Dropped without a FIN: the socket's close is then a reset.
            self.ws.get_ref().reset_on_close();
            return;
        }
        let _ = self.ws.get_mut().close().await;
    }

    /// Sends one text frame before `hello-ok`, which the client must take by `deadline` (the
    /// connect deadline): a client that does not read would otherwise hold its connection,
    /// unauthenticated, for as long as it likes. Past the deadline the connection is reset.
    async fn send_before(&mut self, deadline: Instant, text: String) -> Result<(), End> {
        let left = deadline.saturating_duration_since(Instant::now());
        // The send is tried first: a frame the socket takes at once goes even at the deadline.
        let sent = glommio::timer::timeout(left.max(Duration::from_millis(1)), async {
            Ok(self.ws.send(Message::text(text)).await)
        })
        .await;
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Reset),
        }
    }

    /// `connect.challenge`, then the client's `connect` by `deadline`: the session, or why
    /// not.
    async fn handshake(
        &mut self,
        named: Option<Vec<u8>>,
        deadline: Instant,
    ) -> Result<Session, End> {
        let reactor = self.reactor.clone();
        let shared = &reactor.shared;
        let nonce = new_nonce();
        let challenge = format!(
            "{{\"type\":\"event\",\"event\":\"connect.challenge\",\"payload\":{{\"nonce\":\"{nonce}\",\"ts\":{}}}}}",
            now_ms()
        );
        self.send_before(deadline, challenge).await?;
        let text = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = glommio::timer::timeout(left.max(Duration::from_millis(1)), async {
                Ok(self.ws.next().await)
            })
            .await;
            match next {
                Err(_) => return Err(End::Close(close::POLICY, "connect timeout")),
                Ok(None) => return Err(End::Gone),
                Ok(Some(Err(e))) => return Err(self.read_failure(e)),
                Ok(Some(Ok(Message::Text(t)))) => break t,
                Ok(Some(Ok(Message::Binary(_)))) => {
                    return Err(End::Close(close::UNSUPPORTED, "binary frames are not used"));
                }
                Ok(Some(Ok(Message::Close(_)))) => return Err(End::ClosedByClient),
                Ok(Some(Ok(_))) => continue,
            }
        };
        if text.len() > PRE_AUTH_FRAME {
            return Err(End::Close(close::TOO_BIG, "frame too large before connect"));
        }
        let req = match frames::parse_request(text.as_str()) {
            Ok(r) => r,
            Err(e) => {
                let shape = ErrorShape::new("INVALID_REQUEST", e.message, None);
                let id = e.id.unwrap_or_else(|| "connect".into());
                self.send_before(deadline, frames::error_frame(&id, &shape))
                    .await?;
                return Err(End::Close(close::POLICY, "invalid handshake"));
            }
        };
        let id = req.id.to_string();
        if req.method != "connect" {
            let shape = ErrorShape::new(
                "INVALID_REQUEST",
                "invalid handshake: the first request must be connect",
                None,
            );
            self.send_before(deadline, frames::error_frame(&id, &shape))
                .await?;
            return Err(End::Close(close::POLICY, "invalid handshake"));
        }
        let outcome = frames::check_connect(req.params, &nonce).and_then(|(p, protocol)| {
            self.authorize(&p, named.as_deref())
                .map(|u| (p, protocol, u))
        });
        let (params, protocol, user) = match outcome {
            Ok(v) => v,
            Err(r) => {
                let shape = ErrorShape::new("INVALID_REQUEST", r.message.clone(), r.detail);
                self.send_before(deadline, frames::error_frame(&id, &shape))
                    .await?;
                let reason = if r.close == close::PROTOCOL {
                    "protocol mismatch"
                } else {
                    "connect refused"
                };
                return Err(End::Close(r.close, reason));
            }
        };
        // Authenticated: the pre-auth limits end.
        self.budget.set(None);
        let conn_no = reactor.next_ws_conn.get();
        reactor.next_ws_conn.set(conn_no + 1);
        let conn = ((reactor.id as u64) << 48) | conn_no;
        let conn_id = format!("{}-{conn_no}", reactor.id);
        let scopes: Vec<String> = match &params.scopes {
            Some(s) => s.iter().map(|s| s.0.clone()).collect(),
            None => vec!["operator.read".into(), "operator.write".into()],
        };
        let role = params.role.as_ref().map_or("operator", |r| r.0.as_str());
        let hello = frames::hello_ok(&frames::Hello {
            protocol,
            version: concat!("moltbot-gateway/", env!("CARGO_PKG_VERSION")),
            conn_id: &conn_id,
            methods: METHODS,
            events: EVENTS,
            uptime_ms: u64::try_from(shared.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            role,
            scopes: &scopes,
            max_payload: shared.config.max_body_bytes,
            max_buffered_bytes: shared.config.ws_max_buffered_bytes,
            tick_interval_ms: u64::try_from(shared.config.ws_tick_interval.as_millis())
                .unwrap_or(u64::MAX),
        });
        let outbox = Arc::new(Outbox::new(
            reactor.id,
            conn,
            shared.config.ws_max_buffered_bytes,
        ));
        let wake = Rc::new(Notify::default());
        reactor.ws_conns.borrow_mut().insert(conn, wake.clone());
        shared.hub.join(&user, outbox.clone());
        let session = Session {
            user,
            outbox,
            wake,
            in_flight: Rc::new(Cell::new(0)),
            presence: Rc::new(presence::Presence::new(shared.pool.clone())),
        };
        if let Err(end) = self
            .send_before(deadline, frames::ok_frame(&id, &hello))
            .await
        {
            shared.hub.leave(&session.user, &session.outbox);
            reactor.ws_conns.borrow_mut().remove(&conn);
            return Err(end);
        }
        Ok(session)
    }

    /// The user a `connect` acts as: a user's credential names its user (and a named user
    /// must be that one); the operator token and a gateway without credentials act for the
    /// user the upgrade request named.
    fn authorize(
        &self,
        p: &frames::ConnectParams,
        named: Option<&[u8]>,
    ) -> Result<String, ConnectRefusal> {
        let reactor = &self.reactor;
        let auth = p.auth.as_ref();
        let token = auth
            .and_then(|a| a.token.as_deref())
            .filter(|t| !t.is_empty());
        let principal = match reactor.shared.auth.authenticate(token) {
            Ok(p) => p,
            Err(r) => {
                reactor.metrics.auth_refused(r);
                let detail = match r {
                    Refusal::Missing if auth.is_some_and(|a| a.only_unsupported()) => {
                        "AUTH_UNAUTHORIZED"
                    }
                    Refusal::Missing => "AUTH_TOKEN_MISSING",
                    _ => "AUTH_TOKEN_MISMATCH",
                };
                return Err(ConnectRefusal::auth(detail, r.message()));
            }
        };
        match principal {
            Principal::User(user) => match named {
                Some(n) if n != user.as_bytes() => {
                    reactor.metrics.auth_refused(Refusal::Forbidden);
                    Err(ConnectRefusal::auth(
                        "AUTH_UNAUTHORIZED",
                        "this token acts for its own user only",
                    ))
                }
                _ => Ok(user),
            },
            Principal::Operator | Principal::Anonymous => {
                let raw = named.ok_or_else(|| {
                    ConnectRefusal::params(
                        "name the user: the x-moltbot-user header or ?user= on the URL",
                    )
                })?;
                crate::user::validate_user_id_bytes(raw)
                    .map(str::to_owned)
                    .map_err(|e| ConnectRefusal::params(format!("invalid user: {e}")))
            }
        }
    }

    /// Maps a read failure to how the connection ends.
    fn read_failure(&self, e: WsError) -> End {
        use async_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
        match e {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
                End::Close(close::TOO_BIG, "message too large")
            }
            WsError::Capacity(_) => End::Close(close::TOO_BIG, "frame too large"),
            WsError::Utf8(_) => End::Close(close::INVALID_DATA, "invalid UTF-8"),
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
            WsError::Protocol(_) => End::Close(close::PROTOCOL, "protocol error"),
            WsError::Io(_) if self.budget.get() == Some(0) => {
                End::Close(close::TOO_BIG, "too much data before connect")
            }
            _ => End::Gone,
        }
    }

    /// After `hello-ok`: requests, answers, events and ticks until the client leaves, the
    /// gateway stops, or a limit is passed.
    async fn serve(&mut self, s: &Session) -> End {
        let reactor = self.reactor.clone();
        let shared = reactor.shared.clone();
        let tick = shared.config.ws_tick_interval;
        let mut next_tick = Instant::now() + tick;
        let mut shutdown_sent = false;
        loop {
            // 1. Send what is queued.
            if let Err(end) = self.flush(s).await {
                return end;
            }
            if shared.stopping_fast() {
                return End::Close(close::RESTART, "gateway stopping");
            }
            if shared.stopping() {
                if !shutdown_sent {
                    shutdown_sent = true;
                    s.outbox.push(Outgoing::Event {
                        name: Arc::from("shutdown"),
                        payload: Arc::from("{\"reason\":\"gateway stopping\"}"),
                    });
                    continue;
                }
                if s.in_flight.get() == 0 && s.outbox.bytes() == 0 {
                    return End::Close(close::RESTART, "gateway stopping");
                }
            }
            // 2. Wait for a frame, a wake-up (frames queued, a run ended), a tick or a stop.
            enum Woke {
                Frame(Option<Result<Message, WsError>>),
                Wake,
                Tick,
            }
            let left = next_tick.saturating_duration_since(Instant::now());
            let stop_watch = async {
                if shutdown_sent {
                    // Draining: look again now and then, for the drain timeout turning the
                    // stop into a fast one.
                    glommio::timer::sleep(DRAIN_CHECK).await;
                } else {
                    reactor.closing.wait().await;
                }
                Woke::Wake
            };
            let reading = s.in_flight.get() < MAX_IN_FLIGHT;
            let woke = futures_lite::future::or(
                async {
                    if !reading {
                        // A run ending wakes the connection, which then reads again.
                        std::future::pending::<()>().await;
                    }
                    Woke::Frame(self.ws.next().await)
                },
                futures_lite::future::or(
                    async {
                        s.wake.notified().await;
                        Woke::Wake
                    },
                    futures_lite::future::or(
                        async {
                            glommio::timer::sleep(left).await;
                            Woke::Tick
                        },
                        stop_watch,
                    ),
                ),
            )
            .await;
            match woke {
                Woke::Wake => {}
                Woke::Tick => {
                    next_tick = Instant::now() + tick;
                    let payload = format!("{{\"ts\":{}}}", now_ms());
                    s.outbox.push(Outgoing::Event {
                        name: Arc::from("tick"),
                        payload: Arc::from(payload),
                    });
                }
                Woke::Frame(None) => return End::Gone,
                Woke::Frame(Some(Err(e))) => return self.read_failure(e),
                Woke::Frame(Some(Ok(m))) => {
                    match m {
                        Message::Text(t) => self.request(s, t.as_str(), shutdown_sent),
                        Message::Binary(_) => {
                            return End::Close(close::UNSUPPORTED, "binary frames are not used");
                        }
                        Message::Close(_) => return End::ClosedByClient,
                        // Pings are answered by the codec; pongs and raw frames need nothing.
                        _ => {}
                    }
                    glommio::yield_if_needed().await;
                }
            }
        }
    }

    /// Sends everything in the outbox, numbering events. A client too far behind is closed.
    ///
    /// Frames queued together (a run's burst of events) go out with one write: each is
    /// encoded into the codec's buffer and the batch is flushed once, so that the last event
    /// of a burst does not wait for a socket round trip per frame before it.
    async fn flush(&mut self, s: &Session) -> Result<(), End> {
        let mut batch = Vec::new();
        loop {
            if s.outbox.overflowed() {
                return Err(End::Close(close::POLICY, "slow consumer"));
            }
            if s.outbox
                .pop_batch(&mut self.seq, WRITE_BATCH_BYTES, &mut batch)
                == 0
            {
                return Ok(());
            }
            // A client that does not read blocks the send; meanwhile the outbox fills, and
            // once it passes its limit the client is closed. Nothing may fill it (no events,
            // and no requests are read meanwhile): a send whose socket takes no byte for two
            // tick intervals (the time after which a client deems a silent gateway dead)
            // closes the client too, which would otherwise hold its connection forever.
            let overflow = async {
                loop {
                    s.wake.notified().await;
                    if s.outbox.overflowed() {
                        return Some(End::Close(close::POLICY, "slow consumer"));
                    }
                }
            };
            let written = self.ws.get_ref().written();
            let stall = self
                .reactor
                .shared
                .config
                .ws_tick_interval
                .saturating_mul(2);
            let stalled = async {
                let mut seen = written.get();
                loop {
                    glommio::timer::sleep(stall).await;
                    if written.get() == seen {
                        return Some(End::Close(close::POLICY, "slow consumer"));
                    }
                    seen = written.get();
                }
            };
            let ws = &mut self.ws;
            let queued = &mut batch;
            let failed = futures_lite::future::or(
                async {
                    let mut sent = Ok(());
                    for text in queued.drain(..) {
                        sent = ws.feed(Message::text(text)).await;
                        if sent.is_err() {
                            break;
                        }
                    }
                    if sent.is_ok() {
                        sent = ws.flush().await;
                    }
                    match sent {
                        Ok(()) => None,
                        Err(_) if s.outbox.overflowed() => {
                            Some(End::Close(close::POLICY, "slow consumer"))
                        }
                        Err(_) => Some(End::Gone),
                    }
                },
                futures_lite::future::or(overflow, stalled),
            )
            .await;
            if let Some(end) = failed {
                return Err(end);
            }
        }
    }

    /// One inbound text frame after `hello-ok`: a request for the user's worker.
    fn request(&mut self, s: &Session, text: &str, stopping: bool) {
        let push = |frame: String| {
            s.outbox.push(Outgoing::Frame(frame));
        };
        let req = match frames::parse_request(text) {
            Ok(r) => r,
            Err(e) => {
                let id = e.id.unwrap_or_else(|| "invalid".into());
                push(frames::error_frame(
                    &id,
                    &ErrorShape::new("INVALID_REQUEST", e.message, None),
                ));
                return;
            }
        };
        if stopping {
            let mut e = ErrorShape::new(
                "UNAVAILABLE",
                "the gateway is stopping",
                Some("SHUTTING_DOWN"),
            );
            e.retryable = Some(true);
            push(frames::error_frame(&req.id, &e));
            return;
        }
        if req.method == "connect" {
            push(frames::error_frame(
                &req.id,
                &ErrorShape::new("INVALID_REQUEST", "already connected", None),
            ));
            return;
        }
        s.in_flight.set(s.in_flight.get() + 1);
        let task = run::Run {
            reactor: self.reactor.clone(),
            user: s.user.clone(),
            outbox: s.outbox.clone(),
            wake: s.wake.clone(),
            in_flight: s.in_flight.clone(),
            presence: s.presence.clone(),
            id: req.id.into_owned(),
            method: req.method.into_owned(),
            params: req
                .params
                .map_or_else(|| "null".to_owned(), |p| p.get().to_owned()),
        };
        glommio::spawn_local(task.run()).detach();
    }
}

/// A random v4 UUID for the connect challenge.
fn new_nonce() -> String {
    let b: [u8; 16] = rand::random();
    let mut b = b;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
