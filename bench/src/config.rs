//! What a run does: the target, the load shape and the workload.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use serde::Serialize;

use crate::BenchError;

/// Which gateway endpoint the requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `POST /v1/echo`, user in `x-moltbot-user`, the body comes back byte for byte.
    Echo,
    /// `POST /v1/agent`, user in `x-moltbot-user`, body `{"message": ...}`.
    Agent,
    /// `POST /v1/route`, body `{"type":"echo","userId":...,"payload":{...}}`.
    Route,
}

impl Endpoint {
    /// The path below the target's prefix.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Echo => "/v1/echo",
            Endpoint::Agent => "/v1/agent",
            Endpoint::Route => "/v1/route",
        }
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Echo => "echo",
            Endpoint::Agent => "agent",
            Endpoint::Route => "route",
        }
    }
}

/// How requests travel to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 keep-alive, one request in flight per connection, to [`Endpoint`].
    Http,
    /// The OpenClaw gateway protocol over WebSocket on `/`: each connection upgrades,
    /// completes the `connect` handshake as one user, then keeps [`Config::depth`] `req`
    /// frames of [`WsMethod`] in flight, matching answers by id.
    Ws,
}

impl Protocol {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Ws => "ws",
        }
    }
}

/// The RPC method of a WebSocket run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WsMethod {
    /// `health` without params: one `res` per request.
    Health,
    /// `agent` with `{"message", "idempotencyKey"}`: a two-stage run (`accepted` answer,
    /// `agent`/`chat` events, the final answer with the same id).
    Agent,
}

impl WsMethod {
    /// The method name on the wire (and on the command line).
    pub fn name(self) -> &'static str {
        match self {
            WsMethod::Health => "health",
            WsMethod::Agent => "agent",
        }
    }
}

/// How users are drawn for each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dist {
    /// Every user equally likely.
    Uniform,
    /// User of rank k (1-based) with probability ∝ 1/k^s.
    Zipf,
}

impl Dist {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Dist::Uniform => "uniform",
            Dist::Zipf => "zipf",
        }
    }
}

/// When the measured part of a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this long (after the warm-up); requests in flight then are still awaited.
    Duration(Duration),
    /// After this many measured requests (answered or failed) in total over all connections.
    Requests(u64),
}

/// A parsed `http://host[:port][/prefix]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as given.
    pub url: String,
    /// The `Host` header value (`host[:port]` as written in the URL).
    pub host_header: String,
    /// Where to connect: the first resolved address.
    pub addr: SocketAddr,
    /// A path prefix put before the endpoint path (empty for none), without a trailing `/`.
    pub prefix: String,
}

impl Target {
    /// Parses and resolves `http://host[:port][/prefix]` (port 80 by default).
    pub fn parse(url: &str) -> Result<Target, BenchError> {
        let bad = |reason: &str| BenchError::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// URLs are supported"))?;
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            return Err(bad("a query or fragment is not supported"));
        }
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        if authority.contains('@') {
            return Err(bad("user information is not supported"));
        }
        if authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad("the host contains whitespace"));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad host or port"))?;
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|source| BenchError::Resolve {
                host: format!("{host}:{port}"),
                source,
            })?
            .next()
            .ok_or_else(|| BenchError::Resolve {
                host: format!("{host}:{port}"),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
            })?;
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("the path contains whitespace"));
        }
        Ok(Target {
            url: url.to_string(),
            host_header: authority.to_string(),
            addr,
            prefix: path.trim_end_matches('/').to_string(),
        })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` → (host without brackets, port).
fn split_host_port(authority: &str) -> Option<(&str, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => 80,
            p => p.strip_prefix(':')?.parse().ok()?,
        };
        return (!host.is_empty()).then_some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            let port = port.parse().ok()?;
            (!host.is_empty()).then_some((host, port))
        }
        Some(_) => None,
        None => Some((authority, 80)),
    }
}

/// A run's settings. [`Config::new`] gives the command line's defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where requests go.
    pub target: Target,
    /// Load threads (at most `connections` are used).
    pub threads: usize,
    /// Keep-alive connections, spread over the threads.
    pub connections: usize,
    /// When the measured part ends.
    pub stop: Stop,
    /// Traffic before measuring starts (not counted; stickiness is still checked).
    pub warmup: Duration,
    /// Distinct users `user-0` .. `user-{users-1}`.
    pub users: u32,
    /// How a request's user is drawn (WebSocket: a connection's user, drawn at each
    /// connect, as a connection acts for one user).
    pub dist: Dist,
    /// Zipf exponent (with [`Dist::Zipf`]).
    pub zipf_s: f64,
    /// HTTP requests or WebSocket RPCs.
    pub protocol: Protocol,
    /// Which endpoint (HTTP).
    pub endpoint: Endpoint,
    /// Which method (WebSocket).
    pub ws_method: WsMethod,
    /// Requests in flight per connection: 1 for HTTP (no pipelining); with WebSocket, `req`
    /// frames sent before earlier ones are answered.
    pub depth: usize,
    /// Request body size in bytes (the message/payload size for agent/route, approximately).
    pub body_size: usize,
    /// Bearer token sent as `authorization` (WebSocket: `auth.token` of `connect`).
    pub token: Option<String>,
    /// Open loop: total requests per second over all connections; `None` = closed loop.
    pub rate: Option<f64>,
    /// A request not answered within this is a timeout error (the connection is reopened).
    pub timeout: Duration,
    /// Seed of the user draws (each thread derives its own stream from it).
    pub seed: u64,
    /// Server processes whose CPU time (with their live descendants') is measured over the
    /// measured period; see [`crate::server_cpu`].
    pub server_pids: Vec<u32>,
    /// Gateway `/status` URLs whose `workers[].pid` are measured too (asked with `token`).
    pub server_status: Vec<String>,
}

/// Most requests in flight per connection: far beyond what one WebSocket connection is
/// useful for, low enough that a typo cannot queue millions of frames.
pub const MAX_DEPTH: usize = 4096;

/// The largest request body accepted (the gateway's own limit is far lower).
pub const MAX_BODY_SIZE: usize = 64 << 20;

impl Config {
    /// The defaults: one thread per core, 32 connections, 10 s after a 1 s warm-up, 100 users
    /// drawn uniformly, echo with 64-byte bodies, closed loop, 10 s timeout, seed 1, no token.
    pub fn new(target: Target) -> Config {
        Config {
            target,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            connections: 32,
            stop: Stop::Duration(Duration::from_secs(10)),
            warmup: Duration::from_secs(1),
            users: 100,
            dist: Dist::Uniform,
            zipf_s: 1.0,
            protocol: Protocol::Http,
            endpoint: Endpoint::Echo,
            ws_method: WsMethod::Health,
            depth: 1,
            body_size: 64,
            token: None,
            rate: None,
            timeout: Duration::from_secs(10),
            seed: 1,
            server_pids: Vec::new(),
            server_status: Vec::new(),
        }
    }

    /// Checks ranges and combinations.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: String| Err(BenchError::Config(m));
        if self.threads == 0 {
            return bad("threads must be at least 1".into());
        }
        if self.connections == 0 {
            return bad("connections must be at least 1".into());
        }
        if self.users == 0 {
            return bad("users must be at least 1".into());
        }
        match self.stop {
            Stop::Duration(d) if d.is_zero() => return bad("duration must be positive".into()),
            Stop::Requests(0) => return bad("requests must be at least 1".into()),
            _ => {}
        }
        if !(self.zipf_s.is_finite() && self.zipf_s >= 0.0) {
            return bad(format!("zipf exponent must be ≥ 0, not {}", self.zipf_s));
        }
        if let Some(r) = self.rate
            && !(r.is_finite() && r > 0.0)
        {
            return bad(format!("rate must be a positive number, not {r}"));
        }
        if self.depth == 0 || self.depth > MAX_DEPTH {
            return bad(format!("depth must be 1 to {MAX_DEPTH}"));
        }
        if self.protocol == Protocol::Http && self.depth > 1 {
            return bad(
                "depth above 1 needs --protocol ws (HTTP requests are not pipelined)".into(),
            );
        }
        if self.timeout.is_zero() {
            return bad("timeout must be positive".into());
        }
        if self.body_size > MAX_BODY_SIZE {
            return bad(format!("body size must be at most {MAX_BODY_SIZE} bytes"));
        }
        if let Some(t) = &self.token
            && t.bytes().any(|b| b.is_ascii_control())
        {
            return bad("the token contains control characters".into());
        }
        if self.server_pids.contains(&0) {
            return bad("a server pid must be positive".into());
        }
        for url in &self.server_status {
            crate::server_cpu::StatusSource::parse(url)?;
        }
        Ok(())
    }

    /// Whether the server's CPU time is measured.
    pub fn measures_server_cpu(&self) -> bool {
        !self.server_pids.is_empty() || !self.server_status.is_empty()
    }

    /// Threads actually used: never more than connections.
    pub fn effective_threads(&self) -> usize {
        self.threads.min(self.connections).max(1)
    }

    /// Connections of thread `t` and the global index of its first one (an even split, the
    /// first `connections % threads` threads taking one more).
    pub fn connections_of(&self, t: usize) -> (usize, usize) {
        let threads = self.effective_threads();
        let base = self.connections / threads;
        let extra = self.connections % threads;
        let count = base + usize::from(t < extra);
        let first = t * base + t.min(extra);
        (count, first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Target::parse("http://127.0.0.1:18789").expect("url");
        assert_eq!(
            t.addr,
            "127.0.0.1:18789"
                .parse::<std::net::SocketAddr>()
                .expect("addr")
        );
        assert_eq!(t.host_header, "127.0.0.1:18789");
        assert_eq!(t.prefix, "");
        let t = Target::parse("http://127.0.0.1:8080/gw/").expect("url");
        assert_eq!(t.prefix, "/gw");
        let t = Target::parse("http://127.0.0.1").expect("url");
        assert_eq!(t.addr.port(), 80);
        let t = Target::parse("http://[::1]:9000/").expect("url");
        assert_eq!(
            t.addr,
            "[::1]:9000".parse::<std::net::SocketAddr>().expect("addr")
        );
        assert_eq!(t.prefix, "");
        let t = Target::parse("http://localhost:1234").expect("url");
        assert_eq!(t.addr.port(), 1234);
        assert!(t.addr.ip().is_loopback());
    }

    #[test]
    fn refuses_bad_urls() {
        for url in [
            "https://127.0.0.1",
            "127.0.0.1:80",
            "http://",
            "http://:80",
            "http://u@127.0.0.1",
            "http://127.0.0.1:notaport",
            "http://127.0.0.1:99999",
            "http://[::1",
            "http://127.0.0.1/a?b",
            "http://127.0.0.1/a b",
        ] {
            assert!(Target::parse(url).is_err(), "{url} accepted");
        }
    }

    #[test]
    fn splits_connections_evenly() {
        let mut cfg = Config::new(Target::parse("http://127.0.0.1:1").expect("url"));
        cfg.threads = 3;
        cfg.connections = 8;
        let split: Vec<_> = (0..3).map(|t| cfg.connections_of(t)).collect();
        assert_eq!(split, vec![(3, 0), (3, 3), (2, 6)]);
        cfg.threads = 4;
        cfg.connections = 2;
        assert_eq!(cfg.effective_threads(), 2);
        assert_eq!(cfg.connections_of(1), (1, 1));
    }

    #[test]
    fn validates_ranges() {
        let ok = Config::new(Target::parse("http://127.0.0.1:1").expect("url"));
        assert!(ok.validate().is_ok());
        let mut ws = ok.clone();
        ws.protocol = Protocol::Ws;
        ws.depth = 64;
        assert!(ws.validate().is_ok());
        type Mutation = Box<dyn Fn(&mut Config)>;
        let variants: Vec<Mutation> = vec![
            Box::new(|c| c.threads = 0),
            Box::new(|c| c.connections = 0),
            Box::new(|c| c.users = 0),
            Box::new(|c| c.stop = Stop::Requests(0)),
            Box::new(|c| c.stop = Stop::Duration(Duration::ZERO)),
            Box::new(|c| c.zipf_s = -1.0),
            Box::new(|c| c.zipf_s = f64::NAN),
            Box::new(|c| c.rate = Some(0.0)),
            Box::new(|c| c.rate = Some(f64::INFINITY)),
            Box::new(|c| c.timeout = Duration::ZERO),
            Box::new(|c| c.body_size = MAX_BODY_SIZE + 1),
            Box::new(|c| c.token = Some("a\nb".into())),
            Box::new(|c| c.depth = 0),
            Box::new(|c| c.server_pids = vec![0]),
            Box::new(|c| c.server_status = vec!["https://127.0.0.1:1/status".into()]),
            Box::new(|c| c.depth = 2),
            Box::new(|c| {
                c.protocol = Protocol::Ws;
                c.depth = MAX_DEPTH + 1;
            }),
        ];
        for (i, f) in variants.iter().enumerate() {
            let mut c = ok.clone();
            f(&mut c);
            assert!(c.validate().is_err(), "variant {i} accepted");
        }
    }
}
