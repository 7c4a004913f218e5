//! Configuration of the gateway and its worker pool.
//!
//! Layers, lowest first: built-in defaults (the seed's table), a TOML file (`--config FILE`, or
//! the file named by `MOLTBOT_CONFIG`; no file is read implicitly), `MOLTBOT_*` environment
//! variables, then command-line flags. [`Config::resolve`] applies all layers and validates.
//!
//! Units: a duration is an integer of milliseconds (the seed's unit: `requestTimeout = 120000`)
//! or a humantime string (`"5s"`, `"250ms"`, `"2m"`); a size is an integer of bytes or a string
//! with a unit (`"512MiB"`). Binary units (`KiB`, `MiB`, `GiB`, `TiB`, and the single letters
//! `K`, `M`, `G`, `T` as in `ulimit`/Docker) are powers of 1024; SI units (`KB`, `MB`, `GB`,
//! `TB`) are powers of 1000. Units are case-insensitive.
//!
//! The bearer token is never taken from a flag (command lines are visible to every local user
//! through `ps`): only from `MOLTBOT_GATEWAY_TOKEN` (or `MOLTBOT_TOKEN`) or the config file, and
//! it is never serialized.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

/// 1 KiB.
const KIB: u64 = 1 << 10;
/// 1 MiB.
const MIB: u64 = 1 << 20;
/// 1 GiB.
const GIB: u64 = 1 << 30;

/// Bytes of a ring frame that are not request body: the rkyv archive around the body, the user
/// id, the path and the forwarded headers, and the frame header. `max_body_bytes` must leave
/// this much room in a ring.
pub const RING_FRAME_OVERHEAD: u64 = 4 * KIB;

/// Smallest accepted ring capacity.
pub const MIN_RING_CAPACITY: u64 = 64 * KIB;

/// Largest accepted ring capacity.
pub const MAX_RING_CAPACITY: u64 = GIB;

/// Largest accepted worker count.
pub const MAX_WORKERS: usize = 1024;

/// Environment variable naming a config file when `--config` is not given.
pub const CONFIG_ENV: &str = "MOLTBOT_CONFIG";

/// Environment variable holding the gateway's bearer token.
pub const TOKEN_ENV: &str = "MOLTBOT_GATEWAY_TOKEN";

/// Prefix of every configuration environment variable.
pub const ENV_PREFIX: &str = "MOLTBOT_";

/// Every configuration key (snake_case). Each is accepted in TOML and as `MOLTBOT_<KEY>`.
pub const KEYS: &[&str] = &[
    "worker_count",
    "sandbox_dir",
    "max_concurrent",
    "max_queue",
    "request_timeout",
    "heartbeat_interval",
    "stall_timeout",
    "max_memory",
    "max_requests",
    "max_requests_jitter",
    "restart_delay",
    "max_restart_delay",
    "stable_after",
    "max_restart_attempts",
    "restart_window",
    "failed_cooldown",
    "balance_factor",
    "max_users",
    "ring_capacity",
    "drain_timeout",
    "worker_program",
    "worker_command",
    "worker_read_paths",
    "test_handlers",
    "bind",
    "port",
    "cores",
    "token",
    "max_header_bytes",
    "max_headers",
    "max_body_bytes",
    "max_uri_bytes",
    "header_read_timeout",
    "idle_timeout",
    "max_connections",
    "worker_nofile",
    "worker_address_space",
    "landlock",
];

/// A configuration that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong form.
    #[error("invalid config {origin}: {message}")]
    Parse {
        /// The file, or `<string>`.
        origin: String,
        /// What is wrong, with the position and the key.
        message: String,
    },
    /// A `MOLTBOT_*` environment variable has a malformed value.
    #[error("invalid environment variable {var}: {message}")]
    Env {
        /// The variable's name.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// A value is well-formed but not allowed (out of range, inconsistent with another key).
    #[error("invalid configuration: {key}: {message}")]
    Invalid {
        /// The offending key.
        key: &'static str,
        /// What is wrong and what to change.
        message: String,
    },
}

/// Which CPU cores run gateway executors: a count (the first N) or an explicit list of ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cores {
    /// Use this many cores.
    Count(usize),
    /// Use exactly these core ids.
    List(Vec<usize>),
}

impl Cores {
    /// How many executors this selects.
    pub fn count(&self) -> usize {
        match self {
            Cores::Count(n) => *n,
            Cores::List(ids) => ids.len(),
        }
    }
}

impl FromStr for Cores {
    type Err = String;

    /// `"2"` is a count; `"0,1"`, `"[0, 1]"` or `"3,"` is a list.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let bracketed = t.starts_with('[') && t.ends_with(']') && t.len() >= 2;
        if !bracketed && !t.contains(',') {
            return t.parse::<usize>().map(Cores::Count).map_err(|_| {
                format!("expected a core count like 2 or a list like 0,1; got {t:?}")
            });
        }
        let inner = if bracketed { &t[1..t.len() - 1] } else { t };
        let mut ids = Vec::new();
        for part in inner.split(',') {
            let p = part.trim();
            if p.is_empty() {
                continue;
            }
            ids.push(
                p.parse::<usize>()
                    .map_err(|_| format!("{p:?} is not a core id (a non-negative integer)"))?,
            );
        }
        Ok(Cores::List(ids))
    }
}

impl fmt::Display for Cores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cores::Count(n) => write!(f, "{n}"),
            Cores::List(ids) => {
                let parts: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                write!(f, "[{}]", parts.join(", "))
            }
        }
    }
}

impl Serialize for Cores {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Cores::Count(n) => s.serialize_u64(*n as u64),
            Cores::List(ids) => {
                let mut seq = s.serialize_seq(Some(ids.len()))?;
                for id in ids {
                    seq.serialize_element(id)?;
                }
                seq.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Cores {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CoresVisitor;
        impl<'de> Visitor<'de> for CoresVisitor {
            type Value = Cores;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a core count (cores = 2) or a list of core ids (cores = [0, 1])")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Cores, E> {
                usize::try_from(v)
                    .map(Cores::Count)
                    .map_err(|_| E::custom("core count too large"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Cores, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("core count must not be negative"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Cores, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Cores, A::Error> {
                let mut ids = Vec::new();
                while let Some(id) = seq.next_element::<usize>()? {
                    ids.push(id);
                }
                Ok(Cores::List(ids))
            }
        }
        d.deserialize_any(CoresVisitor)
    }
}

/// The effective configuration of the gateway and its worker pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Number of worker processes (slots).
    #[serde(alias = "workerCount")]
    pub worker_count: usize,
    /// Base directory of the sandboxes (`<dir>/worker-N/`), the routing table and
    /// `gateway.port`.
    #[serde(
        alias = "sandboxBaseDir",
        alias = "sandboxDir",
        alias = "sandbox_base_dir"
    )]
    pub sandbox_dir: PathBuf,
    /// Requests in flight per worker; more wait in the admission queue.
    #[serde(alias = "maxConcurrent")]
    pub max_concurrent: usize,
    /// Requests that may wait for a worker beyond `max_concurrent`; a full queue answers 503.
    #[serde(alias = "maxQueue")]
    pub max_queue: usize,
    /// A request not answered within this gets 504.
    #[serde(alias = "requestTimeout", with = "duration_serde")]
    pub request_timeout: Duration,
    /// How often a worker bumps its heartbeat and the monitor checks it.
    #[serde(alias = "heartbeatInterval", with = "duration_serde")]
    pub heartbeat_interval: Duration,
    /// A heartbeat not advancing this long marks the worker stalled; `None` = 3 × heartbeat.
    /// Read it through [`Config::stall_timeout`].
    #[serde(
        alias = "stallTimeout",
        with = "opt_duration_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub stall_timeout: Option<Duration>,
    /// Resident memory (bytes) above which a worker is recycled.
    #[serde(alias = "maxMemory", with = "size_serde")]
    pub max_memory: u64,
    /// Requests served after which a worker is recycled (see `max_requests_jitter`).
    #[serde(alias = "maxRequests")]
    pub max_requests: u64,
    /// Fraction in [0, 1): each slot's limit is drawn from
    /// [max_requests × (1 − jitter), max_requests] so slots do not recycle together.
    #[serde(alias = "maxRequestsJitter")]
    pub max_requests_jitter: f64,
    /// Delay before the first respawn after a crash; grows ×1.5 per consecutive crash.
    #[serde(alias = "restartDelay", with = "duration_serde")]
    pub restart_delay: Duration,
    /// Cap of the growing restart delay.
    #[serde(alias = "maxRestartDelay", with = "duration_serde")]
    pub max_restart_delay: Duration,
    /// A worker that ran this long resets the consecutive-crash count.
    #[serde(alias = "stableAfter", with = "duration_serde")]
    pub stable_after: Duration,
    /// More restarts than this within `restart_window` mark the slot `failed`.
    #[serde(alias = "maxRestartAttempts")]
    pub max_restart_attempts: u32,
    /// The window in which restarts are counted.
    #[serde(alias = "restartWindow", with = "duration_serde")]
    pub restart_window: Duration,
    /// How long a `failed` slot waits before it is tried again.
    #[serde(alias = "failedCooldown", with = "duration_serde")]
    pub failed_cooldown: Duration,
    /// Bounded-load factor of the router: 0 = off, otherwise >= 1.
    #[serde(alias = "balanceFactor")]
    pub balance_factor: f64,
    /// Most users the routing table takes; a new user beyond gets 503 `USER_LIMIT` (each user
    /// costs memory and a line in the table for good, and any client can invent user ids).
    #[serde(alias = "maxUsers")]
    pub max_users: usize,
    /// Bytes per shared-memory ring (a power of two).
    #[serde(alias = "ringCapacity", with = "usize_size_serde")]
    pub ring_capacity: usize,
    /// On SIGTERM, how long in-flight requests may take before the gateway stops anyway.
    #[serde(alias = "drainTimeout", with = "duration_serde")]
    pub drain_timeout: Duration,
    /// The binary re-executed as `moltbot worker`; `None` = the current executable.
    #[serde(alias = "workerProgram", skip_serializing_if = "Option::is_none")]
    pub worker_program: Option<PathBuf>,
    /// Bring your own agent: a program (and its arguments) each worker runs in its sandbox
    /// and talks to over stdin/stdout (JSON Lines); `None` = the built-in handlers.
    #[serde(alias = "workerCommand", skip_serializing_if = "Option::is_none")]
    pub worker_command: Option<Vec<String>>,
    /// Extra paths the agent program may read (Landlock), besides the system paths, its own
    /// executable's installation and the files named in `worker_command`.
    #[serde(alias = "workerReadPaths", skip_serializing_if = "Vec::is_empty")]
    pub worker_read_paths: Vec<PathBuf>,
    /// Enables the test-only fault handlers (crash, hang, alloc, escape, ...). Never in
    /// production.
    #[serde(alias = "testHandlers")]
    pub test_handlers: bool,
    /// Address the gateway listens on.
    pub bind: IpAddr,
    /// Port the gateway listens on (0 = ephemeral).
    pub port: u16,
    /// Gateway cores: a count or a list of core ids; `None` = all available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cores: Option<Cores>,
    /// Bearer token required on every endpoint but `/livez` and `/readyz`. Never serialized.
    #[serde(skip_serializing)]
    pub token: Option<String>,
    /// Limit of the request line plus headers, in bytes.
    #[serde(alias = "maxHeaderBytes", with = "usize_size_serde")]
    pub max_header_bytes: usize,
    /// Limit of the number of request headers.
    #[serde(alias = "maxHeaders")]
    pub max_headers: usize,
    /// Limit of a request body, in bytes; must fit a ring frame.
    #[serde(alias = "maxBodyBytes", with = "usize_size_serde")]
    pub max_body_bytes: usize,
    /// Limit of the request target (URI), in bytes.
    #[serde(alias = "maxUriBytes", with = "usize_size_serde")]
    pub max_uri_bytes: usize,
    /// A request head not complete within this gets 408.
    #[serde(alias = "headerReadTimeout", with = "duration_serde")]
    pub header_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    #[serde(alias = "idleTimeout", with = "duration_serde")]
    pub idle_timeout: Duration,
    /// Open connections per gateway core; beyond, 503 and close.
    #[serde(alias = "maxConnections")]
    pub max_connections: usize,
    /// RLIMIT_NOFILE of worker processes.
    #[serde(alias = "workerNofile")]
    pub worker_nofile: u64,
    /// RLIMIT_AS of worker processes in bytes; `None` = derived (see
    /// [`Config::worker_address_space_limit`]); `0` = no limit.
    #[serde(
        alias = "workerAddressSpace",
        with = "opt_size_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub worker_address_space: Option<u64>,
    /// Confine workers with Landlock where the kernel supports it.
    pub landlock: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            worker_count: 4,
            sandbox_dir: PathBuf::from("/tmp/moltbot-workers"),
            max_concurrent: 10,
            max_queue: 100,
            request_timeout: Duration::from_secs(120),
            heartbeat_interval: Duration::from_secs(5),
            stall_timeout: None,
            max_memory: 512 * MIB,
            max_requests: 10_000,
            max_requests_jitter: 0.1,
            restart_delay: Duration::from_secs(1),
            max_restart_delay: Duration::from_secs(30),
            stable_after: Duration::from_secs(30),
            max_restart_attempts: 5,
            restart_window: Duration::from_secs(60),
            failed_cooldown: Duration::from_secs(60),
            balance_factor: 1.0,
            max_users: 1_000_000,
            ring_capacity: 2 * MIB as usize,
            drain_timeout: Duration::from_secs(30),
            worker_program: None,
            worker_command: None,
            worker_read_paths: Vec::new(),
            test_handlers: false,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 18789,
            cores: None,
            token: None,
            max_header_bytes: 16 * KIB as usize,
            max_headers: 100,
            max_body_bytes: MIB as usize,
            max_uri_bytes: 8 * KIB as usize,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            worker_nofile: 1024,
            worker_address_space: None,
            landlock: true,
        }
    }
}

/// Pool flags shared by `moltbot gateway` and `moltbot workers demo`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct PoolArgs {
    /// Number of workers.
    #[arg(short = 'w', long = "workers", value_name = "N")]
    pub workers: Option<usize>,
    /// Base directory of the worker sandboxes.
    #[arg(short = 's', long = "sandbox-dir", value_name = "DIR")]
    pub sandbox_dir: Option<PathBuf>,
    /// Bounded-load factor of the router (0 = off, otherwise >= 1).
    #[arg(long, value_name = "F")]
    pub balance_factor: Option<f64>,
    /// Most users the routing table takes (new users beyond get 503).
    #[arg(long, value_name = "N")]
    pub max_users: Option<usize>,
    /// TOML config file (default: $MOLTBOT_CONFIG if set, else none).
    #[arg(long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Requests in flight per worker.
    #[arg(long, value_name = "N")]
    pub max_concurrent: Option<usize>,
    /// Requests waiting per worker beyond max-concurrent.
    #[arg(long, value_name = "N")]
    pub max_queue: Option<usize>,
    /// Request timeout (milliseconds or e.g. 30s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,
    /// Worker heartbeat interval (milliseconds or e.g. 5s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Heartbeat silence after which a worker counts as stalled (default 3 × heartbeat).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub stall_timeout: Option<Duration>,
    /// Worker memory (RSS) limit before a recycle (bytes or e.g. 512MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// Requests served before a worker is recycled.
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u64>,
    /// Per-slot jitter of max-requests, a fraction in [0, 1).
    #[arg(long, value_name = "FRACTION")]
    pub max_requests_jitter: Option<f64>,
    /// Delay before a respawn (grows ×1.5 per consecutive crash).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub restart_delay: Option<Duration>,
    /// Cap of the growing restart delay.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_restart_delay: Option<Duration>,
    /// A run this long resets the consecutive-crash count.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub stable_after: Option<Duration>,
    /// Restarts allowed within the restart window before a slot is marked failed.
    #[arg(long, value_name = "N")]
    pub max_restart_attempts: Option<u32>,
    /// Window in which restarts are counted.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub restart_window: Option<Duration>,
    /// Cool-down before a failed slot is tried again.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub failed_cooldown: Option<Duration>,
    /// Bytes per shared-memory ring (a power of two, e.g. 2MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub ring_capacity: Option<u64>,
    /// Binary to run as `moltbot worker` (default: this executable).
    #[arg(long, value_name = "PATH")]
    pub worker_program: Option<PathBuf>,
    /// Run this agent program in every worker (e.g. "python3 agent.py"), spoken to over
    /// stdin/stdout in JSON Lines, instead of the built-in handlers.
    #[arg(long, value_name = "COMMAND", value_parser = parse_command_arg)]
    pub worker_command: Option<CommandLine>,
    /// Enable test-only fault handlers (tests only).
    #[arg(long, hide = true)]
    pub test_handlers: bool,
}

/// Gateway flags of `moltbot gateway`. There is deliberately no `--token`: a token on the
/// command line leaks through `ps`; use `MOLTBOT_GATEWAY_TOKEN` or the config file.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct GatewayArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<IpAddr>,
    /// Port to listen on (0 = ephemeral).
    #[arg(short = 'p', long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Gateway cores: a count (2) or a list of core ids (0,1).
    #[arg(long, value_name = "N|LIST", value_parser = parse_cores)]
    pub cores: Option<Cores>,
    /// Open connections per core.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Time allowed for a request head (milliseconds or e.g. 10s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub header_read_timeout: Option<Duration>,
    /// Keep-alive idle timeout.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Largest request body (bytes or e.g. 1MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_body_bytes: Option<u64>,
    /// Time in-flight requests get on SIGTERM.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
}

/// Parses a duration: an integer is milliseconds, anything else a humantime string (`"5s"`,
/// `"250ms"`, `"1h 30m"`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration; expected milliseconds or e.g. \"5s\"".into());
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| format!("{t:?} is too large a number of milliseconds"));
    }
    humantime::parse_duration(t).map_err(|e| {
        format!("{t:?} is not a duration ({e}); expected milliseconds or e.g. \"5s\", \"250ms\"")
    })
}

/// Parses a size: an integer of bytes, optionally with a unit (`"512MiB"`, `"64 KiB"`,
/// `"1.5GiB"`, `"512MB"` = 512 × 10^6). A fraction must come out as whole bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => KIB,
        "m" | "mi" | "mib" => MIB,
        "g" | "gi" | "gib" => GIB,
        "t" | "ti" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "{t:?} is not a size: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if (int.is_empty() && frac.is_empty())
        || frac.contains('.')
        || (num.contains('.') && frac.is_empty())
    {
        return Err(format!(
            "{t:?} is not a size; expected e.g. 1048576, \"512MiB\" or \"1.5GiB\""
        ));
    }
    if frac.len() > 18 {
        return Err(format!("{t:?}: too many decimal places"));
    }
    let too_large = || format!("{t:?} is too large a size");
    let int_v: u128 = if int.is_empty() {
        0
    } else {
        int.parse::<u128>().map_err(|_| too_large())?
    };
    let mut total = int_v.checked_mul(u128::from(mult)).ok_or_else(too_large)?;
    if !frac.is_empty() {
        let scale = 10u128.pow(frac.len() as u32);
        let frac_v = frac.parse::<u128>().map_err(|_| too_large())? * u128::from(mult);
        if frac_v % scale != 0 {
            return Err(format!("{t:?} is not a whole number of bytes"));
        }
        total = total.checked_add(frac_v / scale).ok_or_else(too_large)?;
    }
    u64::try_from(total).map_err(|_| too_large())
}

/// Formats a size for display and serialization: the largest binary unit that divides it
/// exactly (`"512MiB"`), else plain bytes (`"1000B"`). [`parse_size`] reads it back.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(1 << 40, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
    for (m, name) in UNITS {
        if bytes >= m && bytes % m == 0 {
            return format!("{}{name}", bytes / m);
        }
    }
    format!("{bytes}B")
}

/// Clap value parser for `--cores`.
fn parse_cores(s: &str) -> Result<Cores, String> {
    s.parse()
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        other => Err(format!(
            "{other:?} is not a boolean (true/false, 1/0, yes/no, on/off)"
        )),
    }
}

fn parse_num<T: FromStr>(s: &str) -> Result<T, String> {
    let t = s.trim();
    t.parse::<T>()
        .map_err(|_| format!("{t:?} is not a valid non-negative integer in range"))
}

fn parse_float(s: &str) -> Result<f64, String> {
    let t = s.trim();
    t.parse::<f64>()
        .map_err(|_| format!("{t:?} is not a number"))
}

fn parse_usize_size(s: &str) -> Result<usize, String> {
    parse_size(s).and_then(|v| usize::try_from(v).map_err(|_| format!("{s:?} is too large")))
}

/// `""` means "unset" for optional keys.
fn parse_opt<T>(s: &str, f: impl Fn(&str) -> Result<T, String>) -> Result<Option<T>, String> {
    if s.trim().is_empty() {
        Ok(None)
    } else {
        f(s).map(Some)
    }
}

/// A parsed `--worker-command` (program and arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine(pub Vec<String>);

fn parse_command_arg(s: &str) -> Result<CommandLine, String> {
    parse_command(s).map(CommandLine)
}

/// A command line: a JSON array (`["python3", "agent.py"]`) or a string split like a POSIX
/// shell would (`python3 "my agent.py"`).
pub fn parse_command(s: &str) -> Result<Vec<String>, String> {
    let t = s.trim();
    let argv: Vec<String> = if t.starts_with('[') {
        serde_json::from_str(t).map_err(|e| format!("{s:?} is not a JSON array of strings: {e}"))?
    } else {
        shlex::split(t).ok_or_else(|| format!("{s:?} has unbalanced quotes"))?
    };
    if argv.is_empty() || argv[0].is_empty() {
        return Err("the command must name a program".into());
    }
    Ok(argv)
}

fn parse_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        Err("empty path".into())
    } else {
        Ok(PathBuf::from(s))
    }
}

fn to_usize(v: u64, what: &str) -> usize {
    // Only reachable on 32-bit targets with absurd values; validation then reports the key.
    usize::try_from(v).unwrap_or_else(|_| {
        tracing::warn!("{what} {v} does not fit this platform; clamped");
        usize::MAX
    })
}

impl Config {
    /// Parses a TOML document (keys as in [`KEYS`], or the seed's camelCase aliases). Missing
    /// keys keep their defaults; unknown keys are an error naming the key. Does not validate.
    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        Self::parse_toml(s, "<string>")
    }

    /// Reads and parses a TOML file (see [`Config::from_toml_str`]). Does not validate.
    pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_toml(&text, &path.display().to_string())
    }

    fn parse_toml(s: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(s).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Serializes as TOML (durations as humantime strings, sizes with units; no token).
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(self).map_err(|e| ConfigError::Parse {
            origin: "<serialize>".into(),
            message: e.to_string(),
        })
    }

    /// Applies `MOLTBOT_<UPPER_SNAKE_KEY>` variables (e.g. `MOLTBOT_WORKER_COUNT`) and
    /// `MOLTBOT_GATEWAY_TOKEN` (which wins over `MOLTBOT_TOKEN`). Other `MOLTBOT_*` variables
    /// are ignored: workers and tools share the prefix. An empty value unsets an optional key.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let mut gateway_token = None;
        for (var, value) in vars {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if var == TOKEN_ENV {
                gateway_token = Some(value);
                continue;
            }
            let key = rest.to_ascii_lowercase();
            match self.set_key(&key, &value) {
                Ok(_) => {}
                Err(message) => return Err(ConfigError::Env { var, message }),
            }
        }
        if let Some(t) = gateway_token {
            self.token = if t.is_empty() { None } else { Some(t) };
        }
        Ok(())
    }

    /// Sets one key from its string form. `Ok(false)` = not a configuration key.
    fn set_key(&mut self, key: &str, v: &str) -> Result<bool, String> {
        match key {
            "worker_count" => self.worker_count = parse_num(v)?,
            "sandbox_dir" | "sandbox_base_dir" => self.sandbox_dir = parse_path(v)?,
            "max_concurrent" => self.max_concurrent = parse_num(v)?,
            "max_queue" => self.max_queue = parse_num(v)?,
            "request_timeout" => self.request_timeout = parse_duration(v)?,
            "heartbeat_interval" => self.heartbeat_interval = parse_duration(v)?,
            "stall_timeout" => self.stall_timeout = parse_opt(v, parse_duration)?,
            "max_memory" => self.max_memory = parse_size(v)?,
            "max_requests" => self.max_requests = parse_num(v)?,
            "max_requests_jitter" => self.max_requests_jitter = parse_float(v)?,
            "restart_delay" => self.restart_delay = parse_duration(v)?,
            "max_restart_delay" => self.max_restart_delay = parse_duration(v)?,
            "stable_after" => self.stable_after = parse_duration(v)?,
            "max_restart_attempts" => self.max_restart_attempts = parse_num(v)?,
            "restart_window" => self.restart_window = parse_duration(v)?,
            "failed_cooldown" => self.failed_cooldown = parse_duration(v)?,
            "balance_factor" => self.balance_factor = parse_float(v)?,
            "max_users" => self.max_users = parse_num(v)?,
            "ring_capacity" => self.ring_capacity = parse_usize_size(v)?,
            "drain_timeout" => self.drain_timeout = parse_duration(v)?,
            "worker_program" => self.worker_program = parse_opt(v, parse_path)?,
            "worker_command" => self.worker_command = parse_opt(v, parse_command)?,
            "worker_read_paths" => {
                self.worker_read_paths = v
                    .split(':')
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
                    .collect()
            }
            "test_handlers" => self.test_handlers = parse_bool(v)?,
            "bind" => {
                self.bind = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("{v:?} is not an IP address"))?
            }
            "port" => self.port = parse_num(v)?,
            "cores" => self.cores = parse_opt(v, parse_cores)?,
            "token" => self.token = parse_opt(v, |s| Ok(s.to_string()))?,
            "max_header_bytes" => self.max_header_bytes = parse_usize_size(v)?,
            "max_headers" => self.max_headers = parse_num(v)?,
            "max_body_bytes" => self.max_body_bytes = parse_usize_size(v)?,
            "max_uri_bytes" => self.max_uri_bytes = parse_usize_size(v)?,
            "header_read_timeout" => self.header_read_timeout = parse_duration(v)?,
            "idle_timeout" => self.idle_timeout = parse_duration(v)?,
            "max_connections" => self.max_connections = parse_num(v)?,
            "worker_nofile" => self.worker_nofile = parse_num(v)?,
            "worker_address_space" => self.worker_address_space = parse_opt(v, parse_size)?,
            "landlock" => self.landlock = parse_bool(v)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Applies the pool flags that were given.
    pub fn apply_pool_args(&mut self, a: &PoolArgs) {
        macro_rules! set {
            ($($field:ident <- $arg:expr),* $(,)?) => {
                $( if let Some(v) = $arg.clone() { self.$field = v; } )*
            };
        }
        set! {
            worker_count <- a.workers,
            sandbox_dir <- a.sandbox_dir,
            balance_factor <- a.balance_factor,
            max_users <- a.max_users,
            max_concurrent <- a.max_concurrent,
            max_queue <- a.max_queue,
            request_timeout <- a.request_timeout,
            heartbeat_interval <- a.heartbeat_interval,
            max_memory <- a.max_memory,
            max_requests <- a.max_requests,
            max_requests_jitter <- a.max_requests_jitter,
            restart_delay <- a.restart_delay,
            max_restart_delay <- a.max_restart_delay,
            stable_after <- a.stable_after,
            max_restart_attempts <- a.max_restart_attempts,
            restart_window <- a.restart_window,
            failed_cooldown <- a.failed_cooldown,
        }
        if let Some(v) = a.stall_timeout {
            self.stall_timeout = Some(v);
        }
        if let Some(v) = a.ring_capacity {
            self.ring_capacity = to_usize(v, "ring capacity");
        }
        if let Some(v) = &a.worker_program {
            self.worker_program = Some(v.clone());
        }
        if let Some(v) = &a.worker_command {
            self.worker_command = Some(v.0.clone());
        }
        if a.test_handlers {
            self.test_handlers = true;
        }
    }

    /// Applies the gateway flags that were given.
    pub fn apply_gateway_args(&mut self, g: &GatewayArgs) {
        if let Some(v) = g.bind {
            self.bind = v;
        }
        if let Some(v) = g.port {
            self.port = v;
        }
        if let Some(v) = &g.cores {
            self.cores = Some(v.clone());
        }
        if let Some(v) = g.max_connections {
            self.max_connections = v;
        }
        if let Some(v) = g.header_read_timeout {
            self.header_read_timeout = v;
        }
        if let Some(v) = g.idle_timeout {
            self.idle_timeout = v;
        }
        if let Some(v) = g.max_body_bytes {
            self.max_body_bytes = to_usize(v, "max body bytes");
        }
        if let Some(v) = g.drain_timeout {
            self.drain_timeout = v;
        }
    }

    /// The whole layering: defaults < file (`--config`, else `$MOLTBOT_CONFIG`) < env < flags,
    /// then [`Config::validate`].
    pub fn resolve(
        pool: &PoolArgs,
        gw: Option<&GatewayArgs>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let file = pool.config.clone().or_else(|| {
            env.iter()
                .find(|(k, v)| k == CONFIG_ENV && !v.is_empty())
                .map(|(_, v)| PathBuf::from(v))
        });
        let mut cfg = match file {
            Some(path) => Config::load_file(&path)?,
            None => Config::default(),
        };
        cfg.apply_env(env)?;
        cfg.apply_pool_args(pool);
        if let Some(g) = gw {
            cfg.apply_gateway_args(g);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The process environment as UTF-8 pairs for [`Config::apply_env`]: a non-UTF-8
    /// `MOLTBOT_*` value is kept lossily (so it fails parsing with its name), other non-UTF-8
    /// variables are skipped (unlike `std::env::vars`, this never panics).
    pub fn process_env() -> Vec<(String, String)> {
        std::env::vars_os()
            .filter_map(|(k, v)| {
                let k = k.into_string().ok()?;
                match v.into_string() {
                    Ok(v) => Some((k, v)),
                    Err(v) if k.starts_with(ENV_PREFIX) => {
                        Some((k, v.to_string_lossy().into_owned()))
                    }
                    Err(_) => None,
                }
            })
            .collect()
    }

    /// Heartbeat silence after which a worker is stalled: the configured value or
    /// 3 × `heartbeat_interval`.
    pub fn stall_timeout(&self) -> Duration {
        self.stall_timeout
            .unwrap_or_else(|| self.heartbeat_interval.saturating_mul(3))
    }

    /// The restart delay after `consecutive` crashes in a row (1 = the first):
    /// `restart_delay × 1.5^(consecutive − 1)`, capped at `max_restart_delay`.
    pub fn backoff_delay(&self, consecutive: u32) -> Duration {
        let mut d = self.restart_delay;
        let cap = self.max_restart_delay.max(self.restart_delay);
        for _ in 1..consecutive {
            d = d.saturating_add(d / 2);
            if d >= cap {
                return cap;
            }
        }
        d.min(cap)
    }

    /// A slot's own request limit from a uniform draw `unit` in [0, 1]: a value in
    /// [max_requests × (1 − jitter), max_requests], at least 1.
    pub fn jittered_max_requests(&self, unit: f64) -> u64 {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let jitter = if self.max_requests_jitter.is_finite() {
            self.max_requests_jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let cut = (self.max_requests as f64 * jitter * unit).floor() as u64;
        self.max_requests.saturating_sub(cut).max(1)
    }

    /// RLIMIT_AS for workers, or `None` for no limit. Unless configured, derived as
    /// `4 × max_memory + 1 GiB + 2 × ring_capacity × lanes` (`lanes` = gateway cores plus the
    /// in-process lane): headroom for the allocator's virtual reservations and thread stacks
    /// beyond the RSS limit, plus the mapped rings. An explicit 0 disables the limit.
    pub fn worker_address_space_limit(&self, lanes: usize) -> Option<u64> {
        match self.worker_address_space {
            Some(0) => None,
            Some(v) => Some(v),
            None => {
                let rings = (self.ring_capacity as u64)
                    .saturating_mul(2)
                    .saturating_mul(lanes as u64);
                Some(
                    self.max_memory
                        .saturating_mul(4)
                        .saturating_add(GIB)
                        .saturating_add(rings),
                )
            }
        }
    }

    /// The largest request body a ring frame can carry.
    pub fn max_frame_body(&self) -> u64 {
        (self.ring_capacity as u64).saturating_sub(RING_FRAME_OVERHEAD)
    }

    /// The worker binary: `worker_program` or the current executable.
    pub fn resolved_worker_program(&self) -> std::io::Result<PathBuf> {
        match &self.worker_program {
            Some(p) => Ok(p.clone()),
            None => std::env::current_exe(),
        }
    }

    /// Checks every range and cross-key rule; the error names the key and what to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        }
        fn nonzero(key: &'static str, d: Duration) -> Result<(), ConfigError> {
            if d.is_zero() {
                bad(key, "must be greater than zero")
            } else {
                Ok(())
            }
        }
        if !(1..=MAX_WORKERS).contains(&self.worker_count) {
            return bad(
                "worker_count",
                format!("{} is out of range 1..={MAX_WORKERS}", self.worker_count),
            );
        }
        if self.sandbox_dir.as_os_str().is_empty() {
            return bad("sandbox_dir", "must not be empty");
        }
        if self.max_concurrent == 0 {
            return bad("max_concurrent", "must be at least 1");
        }
        nonzero("request_timeout", self.request_timeout)?;
        nonzero("heartbeat_interval", self.heartbeat_interval)?;
        if let Some(st) = self.stall_timeout
            && st <= self.heartbeat_interval
        {
            return bad(
                "stall_timeout",
                format!(
                    "{} must be longer than heartbeat_interval ({}), or every worker looks stalled",
                    humantime::format_duration(st),
                    humantime::format_duration(self.heartbeat_interval)
                ),
            );
        }
        if self.max_memory < 16 * MIB {
            return bad(
                "max_memory",
                format!(
                    "{} is below the minimum of 16MiB (a worker's baseline would recycle it forever)",
                    format_size(self.max_memory)
                ),
            );
        }
        if self.max_requests == 0 {
            return bad("max_requests", "must be at least 1");
        }
        if !(self.max_requests_jitter.is_finite() && (0.0..1.0).contains(&self.max_requests_jitter))
        {
            return bad(
                "max_requests_jitter",
                format!("{} must be a fraction in [0, 1)", self.max_requests_jitter),
            );
        }
        if self.max_restart_delay < self.restart_delay {
            return bad(
                "max_restart_delay",
                "must not be shorter than restart_delay",
            );
        }
        nonzero("stable_after", self.stable_after)?;
        if self.max_restart_attempts == 0 {
            return bad("max_restart_attempts", "must be at least 1");
        }
        nonzero("restart_window", self.restart_window)?;
        nonzero("failed_cooldown", self.failed_cooldown)?;
        let f = self.balance_factor;
        if !(f.is_finite() && (f == 0.0 || f >= 1.0)) {
            return bad(
                "balance_factor",
                format!("{f} must be 0 (off) or at least 1"),
            );
        }
        let rc = self.ring_capacity as u64;
        if !rc.is_power_of_two() || !(MIN_RING_CAPACITY..=MAX_RING_CAPACITY).contains(&rc) {
            return bad(
                "ring_capacity",
                format!(
                    "{} must be a power of two between {} and {}",
                    format_size(rc),
                    format_size(MIN_RING_CAPACITY),
                    format_size(MAX_RING_CAPACITY)
                ),
            );
        }
        if let Some(p) = &self.worker_program
            && p.as_os_str().is_empty()
        {
            return bad("worker_program", "must not be empty");
        }
        if let Some(c) = &self.worker_command
            && c.first().is_none_or(|p| p.is_empty())
        {
            return bad("worker_command", "must name a program");
        }
        match &self.cores {
            Some(Cores::Count(n)) if !(1..=MAX_WORKERS).contains(n) => {
                return bad(
                    "cores",
                    format!("count {n} is out of range 1..={MAX_WORKERS}"),
                );
            }
            Some(Cores::List(ids)) => {
                if ids.is_empty() {
                    return bad("cores", "the list of core ids is empty");
                }
                let mut seen = HashSet::new();
                for id in ids {
                    if !seen.insert(id) {
                        return bad("cores", format!("core {id} is listed twice"));
                    }
                }
            }
            _ => {}
        }
        if let Some(t) = &self.token {
            if t.is_empty() {
                return bad("token", "must not be empty");
            }
            if !t.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                return bad(
                    "token",
                    "must be printable ASCII without spaces (it travels in an HTTP header)",
                );
            }
        }
        if !self.bind.is_loopback() && self.token.is_none() {
            return bad(
                "token",
                format!(
                    "binding the non-loopback address {} needs a token: set {TOKEN_ENV}",
                    self.bind
                ),
            );
        }
        if !(1024..=MIB as usize).contains(&self.max_header_bytes) {
            return bad("max_header_bytes", "must be between 1KiB and 1MiB");
        }
        if !(1..=1024).contains(&self.max_headers) {
            return bad("max_headers", "must be between 1 and 1024");
        }
        if self.max_body_bytes == 0 {
            return bad("max_body_bytes", "must be at least 1");
        }
        if self.max_body_bytes as u64 > self.max_frame_body() {
            return bad(
                "max_body_bytes",
                format!(
                    "{} does not fit a ring frame: at most ring_capacity ({}) − {} = {} bytes; \
                     raise ring_capacity or lower max_body_bytes",
                    format_size(self.max_body_bytes as u64),
                    format_size(rc),
                    format_size(RING_FRAME_OVERHEAD),
                    self.max_frame_body()
                ),
            );
        }
        if self.max_uri_bytes < 16 || self.max_uri_bytes > self.max_header_bytes {
            return bad(
                "max_uri_bytes",
                "must be at least 16 and at most max_header_bytes (the URI is part of the head)",
            );
        }
        nonzero("header_read_timeout", self.header_read_timeout)?;
        nonzero("idle_timeout", self.idle_timeout)?;
        if self.max_users == 0 {
            return bad("max_users", "must be at least 1");
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        if !(16..=1 << 20).contains(&self.worker_nofile) {
            return bad("worker_nofile", "must be between 16 and 1048576");
        }
        if let Some(v) = self.worker_address_space
            && v != 0
            && v <= self.max_memory
        {
            return bad(
                "worker_address_space",
                "must exceed max_memory (or be 0 for no limit), else allocations fail before a recycle",
            );
        }
        Ok(())
    }
}

/// Durations: integer milliseconds or a humantime string in; a humantime string out.
mod duration_serde {
    use super::*;

    pub(super) struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration: integer milliseconds or a string like \"5s\" or \"250ms\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_millis(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_millis)
                .map_err(|_| E::custom("a duration must not be negative"))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
    }

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }
}

/// `Option<Duration>`: present values as in `duration_serde`.
mod opt_duration_serde {
    use super::*;

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&humantime::format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        d.deserialize_any(duration_serde::DurationVisitor).map(Some)
    }
}

/// Sizes: integer bytes or a string with a unit in; a string with a unit out.
mod size_serde {
    use super::*;

    pub(super) struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size: integer bytes or a string like \"512MiB\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom("a size must not be negative"))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }

    pub(super) fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_size(*v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(SizeVisitor)
    }
}

/// `usize` sizes.
mod usize_size_serde {
    use super::*;

    pub(super) fn serialize<S: Serializer>(v: &usize, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_size(*v as u64))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let v = d.deserialize_any(size_serde::SizeVisitor)?;
        usize::try_from(v).map_err(|_| de::Error::custom("size too large for this platform"))
    }
}

/// `Option<u64>` sizes.
mod opt_size_serde {
    use super::*;

    pub(super) fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&format_size(*v)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_any(size_serde::SizeVisitor).map(Some)
    }
}

#[cfg(test)]
mod command_tests {
    use super::*;

    #[test]
    fn worker_command_forms() {
        assert_eq!(
            parse_command("python3 agent.py").unwrap(),
            ["python3", "agent.py"]
        );
        assert_eq!(
            parse_command(r#"python3 "my agent.py" -v"#).unwrap(),
            ["python3", "my agent.py", "-v"]
        );
        assert_eq!(
            parse_command(r#"["node", "a b.js"]"#).unwrap(),
            ["node", "a b.js"]
        );
        assert!(parse_command("").is_err());
        assert!(parse_command("python3 'unbalanced").is_err());
        assert!(parse_command("[1, 2]").is_err());
        let c = Config::from_toml_str("worker_command = [\"python3\", \"agent.py\"]").unwrap();
        assert_eq!(c.worker_command.unwrap(), ["python3", "agent.py"]);
        let c = Config::from_toml_str("workerCommand = [\"node\", \"agent.js\"]").unwrap();
        assert_eq!(c.worker_command.unwrap(), ["node", "agent.js"]);
        let mut c = Config::default();
        c.apply_env([(
            "MOLTBOT_WORKER_COMMAND".to_string(),
            "python3 x.py".to_string(),
        )])
        .unwrap();
        assert_eq!(c.worker_command.unwrap(), ["python3", "x.py"]);
        let bad = Config::from_toml_str("worker_command = []").unwrap();
        assert!(bad.validate().is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn invalid_key(cfg: &Config) -> &'static str {
        match cfg.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        pool: PoolArgs,
        #[command(flatten)]
        gw: GatewayArgs,
    }

    #[test]
    fn defaults_follow_the_seed_table() {
        let c = Config::default();
        assert_eq!(c.worker_count, 4);
        assert_eq!(c.sandbox_dir, PathBuf::from("/tmp/moltbot-workers"));
        assert_eq!(c.max_concurrent, 10);
        assert_eq!(c.max_queue, 100);
        assert_eq!(c.request_timeout, Duration::from_millis(120_000));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(5000));
        assert_eq!(c.stall_timeout(), Duration::from_secs(15));
        assert_eq!(c.max_memory, 512 * 1024 * 1024);
        assert_eq!(c.max_requests, 10_000);
        assert_eq!(c.max_requests_jitter, 0.1);
        assert_eq!(c.restart_delay, Duration::from_millis(1000));
        assert_eq!(c.max_restart_delay, Duration::from_secs(30));
        assert_eq!(c.stable_after, Duration::from_secs(30));
        assert_eq!(c.max_restart_attempts, 5);
        assert_eq!(c.restart_window, Duration::from_millis(60_000));
        assert_eq!(c.failed_cooldown, Duration::from_secs(60));
        assert_eq!(c.balance_factor, 1.0);
        assert_eq!(c.ring_capacity, 2 * 1024 * 1024);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.worker_program, None);
        assert!(!c.test_handlers);
        assert_eq!(c.bind, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(c.port, 18789);
        assert_eq!(c.cores, None);
        assert_eq!(c.token, None);
        assert_eq!(c.max_header_bytes, 16 * 1024);
        assert_eq!(c.max_headers, 100);
        assert_eq!(c.max_body_bytes, 1024 * 1024);
        assert_eq!(c.max_uri_bytes, 8 * 1024);
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.worker_nofile, 1024);
        assert_eq!(c.worker_address_space, None);
        assert!(c.landlock);
        c.validate().unwrap();
    }

    #[test]
    fn empty_toml_is_the_default() {
        assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
    }

    #[test]
    fn toml_snake_case_keys() {
        let c = Config::from_toml_str(
            r#"
            worker_count = 3
            sandbox_dir = "/var/moltbot"
            max_concurrent = 20
            max_queue = 7
            request_timeout = "30s"
            heartbeat_interval = 250
            stall_timeout = "2s"
            max_memory = "256MiB"
            max_requests = 5000
            max_requests_jitter = 0.25
            restart_delay = "100ms"
            max_restart_delay = "10s"
            stable_after = "1m"
            max_restart_attempts = 3
            restart_window = 30000
            failed_cooldown = "5s"
            balance_factor = 1.25
            ring_capacity = "4MiB"
            drain_timeout = "3s"
            worker_program = "/usr/bin/moltbot"
            test_handlers = true
            bind = "::1"
            port = 0
            cores = [0, 2]
            token = "s3cret"
            max_header_bytes = "32KiB"
            max_headers = 50
            max_body_bytes = 65536
            max_uri_bytes = "4KiB"
            header_read_timeout = "5s"
            idle_timeout = "90s"
            max_connections = 100
            worker_nofile = 4096
            worker_address_space = "8GiB"
            landlock = false
            "#,
        )
        .unwrap();
        assert_eq!(c.worker_count, 3);
        assert_eq!(c.sandbox_dir, PathBuf::from("/var/moltbot"));
        assert_eq!(c.max_concurrent, 20);
        assert_eq!(c.max_queue, 7);
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(c.stall_timeout(), Duration::from_secs(2));
        assert_eq!(c.max_memory, 256 * MIB);
        assert_eq!(c.max_requests, 5000);
        assert_eq!(c.max_requests_jitter, 0.25);
        assert_eq!(c.restart_delay, Duration::from_millis(100));
        assert_eq!(c.max_restart_delay, Duration::from_secs(10));
        assert_eq!(c.stable_after, Duration::from_secs(60));
        assert_eq!(c.max_restart_attempts, 3);
        assert_eq!(c.restart_window, Duration::from_secs(30));
        assert_eq!(c.failed_cooldown, Duration::from_secs(5));
        assert_eq!(c.balance_factor, 1.25);
        assert_eq!(c.ring_capacity, 4 * MIB as usize);
        assert_eq!(c.drain_timeout, Duration::from_secs(3));
        assert_eq!(c.worker_program, Some(PathBuf::from("/usr/bin/moltbot")));
        assert!(c.test_handlers);
        assert_eq!(c.bind, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(c.port, 0);
        assert_eq!(c.cores, Some(Cores::List(vec![0, 2])));
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert_eq!(c.max_header_bytes, 32 * 1024);
        assert_eq!(c.max_headers, 50);
        assert_eq!(c.max_body_bytes, 65536);
        assert_eq!(c.max_uri_bytes, 4096);
        assert_eq!(c.header_read_timeout, Duration::from_secs(5));
        assert_eq!(c.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.max_connections, 100);
        assert_eq!(c.worker_nofile, 4096);
        assert_eq!(c.worker_address_space, Some(8 * GIB));
        assert!(!c.landlock);
        c.validate().unwrap();
    }

    #[test]
    fn toml_seed_camel_case_aliases() {
        let c = Config::from_toml_str(
            r#"
            workerCount = 3
            sandboxBaseDir = "/tmp/x"
            maxConcurrent = 5
            requestTimeout = 60000
            heartbeatInterval = 5000
            maxMemory = 268435456
            maxRequests = 5000
            restartDelay = 1000
            maxRestartAttempts = 2
            restartWindow = 60000
            maxQueue = 9
            stallTimeout = 20000
            maxRequestsJitter = 0.0
            maxRestartDelay = 5000
            stableAfter = 1000
            failedCooldown = 1000
            balanceFactor = 0
            ringCapacity = 131072
            drainTimeout = 1000
            workerProgram = "/bin/true"
            testHandlers = true
            maxHeaderBytes = 8192
            maxHeaders = 10
            maxBodyBytes = 1000
            maxUriBytes = 1000
            headerReadTimeout = 1000
            idleTimeout = 1000
            maxConnections = 10
            workerNofile = 64
            workerAddressSpace = 0
            "#,
        )
        .unwrap();
        assert_eq!(c.worker_count, 3);
        assert_eq!(c.sandbox_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.max_concurrent, 5);
        assert_eq!(c.request_timeout, Duration::from_secs(60));
        assert_eq!(c.max_memory, 256 * MIB);
        assert_eq!(c.max_requests, 5000);
        assert_eq!(c.restart_delay, Duration::from_secs(1));
        assert_eq!(c.max_restart_attempts, 2);
        assert_eq!(c.max_queue, 9);
        assert_eq!(c.stall_timeout, Some(Duration::from_secs(20)));
        assert_eq!(c.balance_factor, 0.0);
        assert_eq!(c.ring_capacity, 128 * 1024);
        assert!(c.test_handlers);
        assert_eq!(c.max_connections, 10);
        assert_eq!(c.worker_address_space, Some(0));
        c.validate().unwrap();
        let c = Config::from_toml_str("sandboxDir = \"/tmp/y\"").unwrap();
        assert_eq!(c.sandbox_dir, PathBuf::from("/tmp/y"));
    }

    #[test]
    fn unknown_toml_key_is_an_error_naming_it() {
        let e = Config::from_toml_str("worker_count = 2\nworkr_cuont = 3").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }));
        assert!(e.to_string().contains("workr_cuont"), "{e}");
    }

    #[test]
    fn bad_toml_values_are_errors_naming_the_key() {
        for (doc, needle) in [
            ("request_timeout = \"soon\"", "request_timeout"),
            ("request_timeout = -5", "negative"),
            ("request_timeout = 1.5", "duration"),
            ("max_memory = \"lots\"", "max_memory"),
            ("max_memory = -1", "negative"),
            ("worker_count = \"four\"", "worker_count"),
            ("cores = \"x\"", "cores"),
            ("cores = -1", "negative"),
            ("bind = \"localhost:80\"", "bind"),
            ("port = 70000", "port"),
        ] {
            let e = Config::from_toml_str(doc).unwrap_err();
            assert!(e.to_string().contains(needle), "{doc}: {e}");
        }
    }

    #[test]
    fn load_file_reads_and_reports_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("moltbot.toml");
        std::fs::write(&p, "workerCount = 2\n").unwrap();
        assert_eq!(Config::load_file(&p).unwrap().worker_count, 2);
        let missing = dir.path().join("nope.toml");
        let e = Config::load_file(&missing).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(e.to_string().contains("nope.toml"), "{e}");
        std::fs::write(&p, "bogus = 1\n").unwrap();
        let e = Config::load_file(&p).unwrap_err();
        assert!(e.to_string().contains("moltbot.toml"), "{e}");
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn durations_parse_as_ms_or_humantime() {
        assert_eq!(parse_duration("120000"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration(" 1h 30m "), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in [
            "",
            "  ",
            "5 parsecs",
            "-5",
            "1.5",
            "s",
            "99999999999999999999999",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_parse_with_units() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("1048576", MIB),
            ("512MiB", 512 * MIB),
            ("512mib", 512 * MIB),
            ("512 MiB", 512 * MIB),
            ("512MB", 512_000_000),
            ("1GiB", GIB),
            ("1GB", 1_000_000_000),
            ("64KiB", 64 * KIB),
            ("64K", 64 * KIB),
            ("64k", 64 * KIB),
            ("64KB", 64_000),
            ("2M", 2 * MIB),
            ("1T", 1 << 40),
            ("1TB", 1_000_000_000_000),
            ("10B", 10),
            ("1.5GiB", 3 * GIB / 2),
            ("0.5KiB", 512),
            (".5KiB", 512),
        ];
        for &(s, want) in cases {
            assert_eq!(parse_size(s), Ok(want), "{s:?}");
        }
        for bad in [
            "",
            "MiB",
            "12XB",
            "1.2.3MiB",
            "5.",
            "-1",
            "1e6",
            "0.1KiB",
            "lots",
            "99999999999999999999",
            "20000000TiB",
            "16EiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        let e = parse_size("12XB").unwrap_err();
        assert!(e.contains("unknown unit"), "{e}");
    }

    #[test]
    fn format_size_round_trips() {
        assert_eq!(format_size(512 * MIB), "512MiB");
        assert_eq!(format_size(2 * MIB), "2MiB");
        assert_eq!(format_size(1536), "1536B");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(0), "0B");
        for v in [0, 1, 1000, 1024, 1536, 3 * GIB, u64::MAX, 1 << 40] {
            assert_eq!(parse_size(&format_size(v)), Ok(v), "{v}");
        }
    }

    #[test]
    fn cores_parse_as_count_or_list() {
        assert_eq!("2".parse::<Cores>(), Ok(Cores::Count(2)));
        assert_eq!("0,1".parse::<Cores>(), Ok(Cores::List(vec![0, 1])));
        assert_eq!("[0, 3]".parse::<Cores>(), Ok(Cores::List(vec![0, 3])));
        assert_eq!("5,".parse::<Cores>(), Ok(Cores::List(vec![5])));
        assert!("a,b".parse::<Cores>().is_err());
        assert!("two".parse::<Cores>().is_err());
        assert_eq!(Cores::List(vec![1, 2, 3]).count(), 3);
        assert_eq!(Cores::Count(4).count(), 4);
        assert_eq!(Cores::List(vec![0, 1]).to_string(), "[0, 1]");
        let c = Config::from_toml_str("cores = 2").unwrap();
        assert_eq!(c.cores, Some(Cores::Count(2)));
        let c = Config::from_toml_str("cores = [0, 1]").unwrap();
        assert_eq!(c.cores, Some(Cores::List(vec![0, 1])));
    }

    /// A key, a sample value for it, and the check that the value took.
    type Sample = (&'static str, &'static str, fn(&Config) -> bool);

    /// A sample value per key that differs from the default, and the check that it took.
    fn env_samples() -> Vec<Sample> {
        vec![
            ("worker_count", "7", |c| c.worker_count == 7),
            ("sandbox_dir", "/srv/m", |c| {
                c.sandbox_dir == Path::new("/srv/m")
            }),
            ("max_concurrent", "3", |c| c.max_concurrent == 3),
            ("max_queue", "0", |c| c.max_queue == 0),
            ("request_timeout", "5s", |c| {
                c.request_timeout == Duration::from_secs(5)
            }),
            ("heartbeat_interval", "100", |c| {
                c.heartbeat_interval == Duration::from_millis(100)
            }),
            ("stall_timeout", "1s", |c| {
                c.stall_timeout == Some(Duration::from_secs(1))
            }),
            ("max_memory", "64MiB", |c| c.max_memory == 64 * MIB),
            ("max_requests", "9", |c| c.max_requests == 9),
            ("max_requests_jitter", "0.5", |c| {
                c.max_requests_jitter == 0.5
            }),
            ("restart_delay", "2s", |c| {
                c.restart_delay == Duration::from_secs(2)
            }),
            ("max_restart_delay", "1m", |c| {
                c.max_restart_delay == Duration::from_secs(60)
            }),
            ("stable_after", "10s", |c| {
                c.stable_after == Duration::from_secs(10)
            }),
            ("max_restart_attempts", "9", |c| c.max_restart_attempts == 9),
            ("restart_window", "2m", |c| {
                c.restart_window == Duration::from_secs(120)
            }),
            ("failed_cooldown", "7s", |c| {
                c.failed_cooldown == Duration::from_secs(7)
            }),
            ("balance_factor", "1.5", |c| c.balance_factor == 1.5),
            ("max_users", "7", |c| c.max_users == 7),
            ("ring_capacity", "1MiB", |c| c.ring_capacity == MIB as usize),
            ("drain_timeout", "4s", |c| {
                c.drain_timeout == Duration::from_secs(4)
            }),
            ("worker_program", "/bin/w", |c| {
                c.worker_program.as_deref() == Some(Path::new("/bin/w"))
            }),
            ("worker_command", "python3 agent.py", |c| {
                c.worker_command.as_deref()
                    == Some(&["python3".to_string(), "agent.py".to_string()][..])
            }),
            ("worker_read_paths", "/opt/a:/opt/b", |c| {
                c.worker_read_paths == [PathBuf::from("/opt/a"), PathBuf::from("/opt/b")]
            }),
            ("test_handlers", "yes", |c| c.test_handlers),
            ("bind", "0.0.0.0", |c| {
                c.bind == IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            }),
            ("port", "8080", |c| c.port == 8080),
            ("cores", "0,1", |c| c.cores == Some(Cores::List(vec![0, 1]))),
            ("token", "abc", |c| c.token.as_deref() == Some("abc")),
            ("max_header_bytes", "8KiB", |c| c.max_header_bytes == 8192),
            ("max_headers", "20", |c| c.max_headers == 20),
            ("max_body_bytes", "2048", |c| c.max_body_bytes == 2048),
            ("max_uri_bytes", "1KiB", |c| c.max_uri_bytes == 1024),
            ("header_read_timeout", "3s", |c| {
                c.header_read_timeout == Duration::from_secs(3)
            }),
            ("idle_timeout", "4s", |c| {
                c.idle_timeout == Duration::from_secs(4)
            }),
            ("max_connections", "5", |c| c.max_connections == 5),
            ("worker_nofile", "256", |c| c.worker_nofile == 256),
            ("worker_address_space", "4GiB", |c| {
                c.worker_address_space == Some(4 * GIB)
            }),
            ("landlock", "off", |c| !c.landlock),
        ]
    }

    #[test]
    fn every_key_has_an_env_variable() {
        let samples = env_samples();
        let sample_keys: Vec<&str> = samples.iter().map(|s| s.0).collect();
        assert_eq!(sample_keys, KEYS, "a key without an env test");
        for (key, value, check) in samples {
            let var = format!("MOLTBOT_{}", key.to_ascii_uppercase());
            let mut c = Config::default();
            assert!(!check(&c), "{key}: sample equals the default");
            c.apply_env(env(&[(var.as_str(), value)])).unwrap();
            assert!(check(&c), "{var}={value} did not apply");
        }
    }

    #[test]
    fn every_key_is_accepted_in_toml() {
        // The serialized default lists every serializable key; the rest are optional.
        let ser = Config::default().to_toml_string().unwrap();
        let optional = [
            "stall_timeout",
            "worker_program",
            "worker_command",
            "worker_read_paths",
            "cores",
            "token",
            "worker_address_space",
        ];
        for key in KEYS {
            let present = ser.lines().any(|l| l.starts_with(&format!("{key} =")));
            assert!(
                present || optional.contains(key),
                "{key} missing from {ser}"
            );
        }
        for key in optional {
            let value = match key {
                "worker_command" => "[\"python3\", \"agent.py\"]",
                "worker_read_paths" => "[\"/opt/a\"]",
                "stall_timeout" => "\"20s\"",
                "worker_address_space" => "\"4GiB\"",
                "cores" => "2",
                _ => "\"x\"",
            };
            Config::from_toml_str(&format!("{key} = {value}")).unwrap();
        }
    }

    #[test]
    fn env_unknown_moltbot_vars_and_others_are_ignored() {
        let mut c = Config::default();
        c.apply_env(env(&[
            ("MOLTBOT_WORKER_ID", "worker-3"),
            ("MOLTBOT_SANDBOX_ROOT", "/x"),
            ("MOLTBOT_CONFIG", "/nonexistent.toml"),
            ("WORKER_COUNT", "99"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn env_malformed_value_names_the_variable() {
        for (var, value) in [
            ("MOLTBOT_WORKER_COUNT", "many"),
            ("MOLTBOT_REQUEST_TIMEOUT", "soon"),
            ("MOLTBOT_MAX_MEMORY", "big"),
            ("MOLTBOT_LANDLOCK", "maybe"),
            ("MOLTBOT_BIND", "nowhere"),
            ("MOLTBOT_PORT", "-1"),
            ("MOLTBOT_SANDBOX_DIR", ""),
            ("MOLTBOT_WORKER_COUNT", ""),
        ] {
            let e = Config::default()
                .apply_env(env(&[(var, value)]))
                .unwrap_err();
            match &e {
                ConfigError::Env { var: v, .. } => assert_eq!(v, var),
                other => panic!("{other:?}"),
            }
            assert!(e.to_string().contains(var), "{e}");
        }
    }

    #[test]
    fn env_empty_value_unsets_optional_keys() {
        let mut c = Config {
            stall_timeout: Some(Duration::from_secs(20)),
            cores: Some(Cores::Count(2)),
            token: Some("t".into()),
            ..Config::default()
        };
        c.apply_env(env(&[
            ("MOLTBOT_STALL_TIMEOUT", ""),
            ("MOLTBOT_CORES", ""),
            ("MOLTBOT_GATEWAY_TOKEN", ""),
        ]))
        .unwrap();
        assert_eq!(c.stall_timeout, None);
        assert_eq!(c.cores, None);
        assert_eq!(c.token, None);
    }

    #[test]
    fn gateway_token_env_wins_over_generic_token() {
        for order in [
            env(&[
                ("MOLTBOT_GATEWAY_TOKEN", "gw"),
                ("MOLTBOT_TOKEN", "generic"),
            ]),
            env(&[
                ("MOLTBOT_TOKEN", "generic"),
                ("MOLTBOT_GATEWAY_TOKEN", "gw"),
            ]),
        ] {
            let mut c = Config::default();
            c.apply_env(order).unwrap();
            assert_eq!(c.token.as_deref(), Some("gw"));
        }
    }

    #[test]
    fn flags_parse_and_apply() {
        let cli = Cli::try_parse_from([
            "x",
            "-w",
            "3",
            "-s",
            "/tmp/sb",
            "--balance-factor",
            "0",
            "--max-concurrent",
            "2",
            "--max-queue",
            "5",
            "--request-timeout",
            "1500",
            "--heartbeat-interval",
            "1s",
            "--stall-timeout",
            "4s",
            "--max-memory",
            "128MiB",
            "--max-requests",
            "10",
            "--max-requests-jitter",
            "0.2",
            "--restart-delay",
            "50ms",
            "--max-restart-delay",
            "2s",
            "--stable-after",
            "3s",
            "--max-restart-attempts",
            "4",
            "--restart-window",
            "10s",
            "--failed-cooldown",
            "2s",
            "--ring-capacity",
            "256KiB",
            "--worker-program",
            "/bin/w",
            "--test-handlers",
            "--bind",
            "127.0.0.2",
            "-p",
            "0",
            "--cores",
            "0,1",
            "--max-connections",
            "9",
            "--header-read-timeout",
            "2s",
            "--idle-timeout",
            "3s",
            "--max-body-bytes",
            "64KiB",
            "--drain-timeout",
            "1s",
        ])
        .unwrap();
        let mut c = Config::default();
        c.apply_pool_args(&cli.pool);
        c.apply_gateway_args(&cli.gw);
        assert_eq!(c.worker_count, 3);
        assert_eq!(c.sandbox_dir, PathBuf::from("/tmp/sb"));
        assert_eq!(c.balance_factor, 0.0);
        assert_eq!(c.max_concurrent, 2);
        assert_eq!(c.max_queue, 5);
        assert_eq!(c.request_timeout, Duration::from_millis(1500));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(c.stall_timeout(), Duration::from_secs(4));
        assert_eq!(c.max_memory, 128 * MIB);
        assert_eq!(c.max_requests, 10);
        assert_eq!(c.max_requests_jitter, 0.2);
        assert_eq!(c.restart_delay, Duration::from_millis(50));
        assert_eq!(c.max_restart_delay, Duration::from_secs(2));
        assert_eq!(c.stable_after, Duration::from_secs(3));
        assert_eq!(c.max_restart_attempts, 4);
        assert_eq!(c.restart_window, Duration::from_secs(10));
        assert_eq!(c.failed_cooldown, Duration::from_secs(2));
        assert_eq!(c.ring_capacity, 256 * 1024);
        assert_eq!(c.worker_program, Some(PathBuf::from("/bin/w")));
        assert!(c.test_handlers);
        assert_eq!(c.bind, "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(c.port, 0);
        assert_eq!(c.cores, Some(Cores::List(vec![0, 1])));
        assert_eq!(c.max_connections, 9);
        assert_eq!(c.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.idle_timeout, Duration::from_secs(3));
        assert_eq!(c.max_body_bytes, 64 * 1024);
        assert_eq!(c.drain_timeout, Duration::from_secs(1));
        c.validate().unwrap();
    }

    #[test]
    fn flags_reject_garbage_and_there_is_no_token_flag() {
        assert!(Cli::try_parse_from(["x", "--request-timeout", "soon"]).is_err());
        assert!(Cli::try_parse_from(["x", "--max-memory", "lots"]).is_err());
        assert!(Cli::try_parse_from(["x", "--cores", "a"]).is_err());
        assert!(Cli::try_parse_from(["x", "--token", "t"]).is_err());
        let cli = Cli::try_parse_from(["x", "--cores", "2"]).unwrap();
        assert_eq!(cli.gw.cores, Some(Cores::Count(2)));
    }

    #[test]
    fn test_handlers_flag_is_hidden() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == "test_handlers")
            .unwrap();
        assert!(arg.is_hide_set());
    }

    #[test]
    fn resolve_layers_file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        std::fs::write(
            &p,
            "worker_count = 2\nmax_concurrent = 3\nmax_queue = 4\nport = 1000\n",
        )
        .unwrap();
        let pool = PoolArgs {
            config: Some(p.clone()),
            workers: Some(6),
            ..PoolArgs::default()
        };
        let gw = GatewayArgs {
            port: Some(2000),
            ..GatewayArgs::default()
        };
        let c = Config::resolve(
            &pool,
            Some(&gw),
            env(&[
                ("MOLTBOT_WORKER_COUNT", "5"),
                ("MOLTBOT_MAX_CONCURRENT", "8"),
                ("MOLTBOT_PORT", "3000"),
            ]),
        )
        .unwrap();
        assert_eq!(c.worker_count, 6, "flag beats env and file");
        assert_eq!(c.max_concurrent, 8, "env beats file");
        assert_eq!(c.max_queue, 4, "file beats default");
        assert_eq!(c.port, 2000, "gateway flag beats env");
        // Without gateway args the env value stays.
        let c = Config::resolve(&pool, None, env(&[("MOLTBOT_PORT", "3000")])).unwrap();
        assert_eq!(c.port, 3000);
    }

    #[test]
    fn resolve_reads_moltbot_config_env_unless_flag_given() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        std::fs::write(&a, "worker_count = 2\n").unwrap();
        std::fs::write(&b, "worker_count = 3\n").unwrap();
        let a_str = a.to_str().unwrap();
        let c = Config::resolve(&PoolArgs::default(), None, env(&[(CONFIG_ENV, a_str)])).unwrap();
        assert_eq!(c.worker_count, 2);
        let pool = PoolArgs {
            config: Some(b),
            ..PoolArgs::default()
        };
        let c = Config::resolve(&pool, None, env(&[(CONFIG_ENV, a_str)])).unwrap();
        assert_eq!(c.worker_count, 3);
        let c = Config::resolve(&PoolArgs::default(), None, Vec::new()).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn resolve_validates() {
        let pool = PoolArgs {
            workers: Some(0),
            ..PoolArgs::default()
        };
        let e = Config::resolve(&pool, None, Vec::new()).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "worker_count",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn validate_worker_count() {
        for (n, ok) in [(0, false), (1, true), (1024, true), (1025, false)] {
            let c = Config {
                worker_count: n,
                ..Config::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{n}");
        }
        let c = Config {
            worker_count: 0,
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "worker_count");
    }

    #[test]
    fn validate_balance_factor() {
        for (f, ok) in [
            (0.0, true),
            (1.0, true),
            (1.25, true),
            (0.5, false),
            (-1.0, false),
            (f64::NAN, false),
            (f64::INFINITY, false),
        ] {
            let c = Config {
                balance_factor: f,
                ..Config::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{f}");
            if !ok {
                assert_eq!(invalid_key(&c), "balance_factor");
            }
        }
    }

    #[test]
    fn validate_ring_capacity() {
        for (rc, ok) in [
            (64 * KIB, true),
            (GIB, true),
            (32 * KIB, false),
            (2 * GIB, false),
            (3 * MIB, false),
        ] {
            let c = Config {
                ring_capacity: rc as usize,
                max_body_bytes: 1024,
                ..Config::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{rc}");
            if !ok {
                assert_eq!(invalid_key(&c), "ring_capacity");
            }
        }
    }

    #[test]
    fn validate_body_must_fit_a_ring_frame() {
        let c = Config {
            ring_capacity: MIB as usize,
            max_body_bytes: MIB as usize,
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "max_body_bytes");
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("raise ring_capacity"), "{msg}");
        let c = Config {
            ring_capacity: MIB as usize,
            max_body_bytes: (MIB - RING_FRAME_OVERHEAD) as usize,
            ..Config::default()
        };
        c.validate().unwrap();
        let c = Config {
            max_body_bytes: 0,
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "max_body_bytes");
    }

    #[test]
    fn validate_non_zero_counts_and_durations() {
        let cases: Vec<(Config, &str)> = vec![
            (
                Config {
                    max_concurrent: 0,
                    ..Config::default()
                },
                "max_concurrent",
            ),
            (
                Config {
                    request_timeout: Duration::ZERO,
                    ..Config::default()
                },
                "request_timeout",
            ),
            (
                Config {
                    heartbeat_interval: Duration::ZERO,
                    ..Config::default()
                },
                "heartbeat_interval",
            ),
            (
                Config {
                    max_requests: 0,
                    ..Config::default()
                },
                "max_requests",
            ),
            (
                Config {
                    stable_after: Duration::ZERO,
                    ..Config::default()
                },
                "stable_after",
            ),
            (
                Config {
                    max_restart_attempts: 0,
                    ..Config::default()
                },
                "max_restart_attempts",
            ),
            (
                Config {
                    restart_window: Duration::ZERO,
                    ..Config::default()
                },
                "restart_window",
            ),
            (
                Config {
                    failed_cooldown: Duration::ZERO,
                    ..Config::default()
                },
                "failed_cooldown",
            ),
            (
                Config {
                    header_read_timeout: Duration::ZERO,
                    ..Config::default()
                },
                "header_read_timeout",
            ),
            (
                Config {
                    idle_timeout: Duration::ZERO,
                    ..Config::default()
                },
                "idle_timeout",
            ),
            (
                Config {
                    max_connections: 0,
                    ..Config::default()
                },
                "max_connections",
            ),
            (
                Config {
                    max_users: 0,
                    ..Config::default()
                },
                "max_users",
            ),
            (
                Config {
                    sandbox_dir: PathBuf::new(),
                    ..Config::default()
                },
                "sandbox_dir",
            ),
            (
                Config {
                    worker_program: Some(PathBuf::new()),
                    ..Config::default()
                },
                "worker_program",
            ),
        ];
        for (c, key) in cases {
            assert_eq!(invalid_key(&c), key);
        }
        // Zero is meaningful for these.
        let c = Config {
            max_queue: 0,
            restart_delay: Duration::ZERO,
            drain_timeout: Duration::ZERO,
            port: 0,
            ..Config::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn validate_stall_timeout_exceeds_heartbeat() {
        let c = Config {
            heartbeat_interval: Duration::from_secs(5),
            stall_timeout: Some(Duration::from_secs(5)),
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "stall_timeout");
        let c = Config {
            stall_timeout: Some(Duration::from_secs(6)),
            ..c
        };
        c.validate().unwrap();
    }

    #[test]
    fn validate_memory_jitter_and_restart_delays() {
        let c = Config {
            max_memory: 8 * MIB,
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "max_memory");
        for j in [1.0, -0.1, f64::NAN] {
            let c = Config {
                max_requests_jitter: j,
                ..Config::default()
            };
            assert_eq!(invalid_key(&c), "max_requests_jitter", "{j}");
        }
        let c = Config {
            max_requests_jitter: 0.0,
            ..Config::default()
        };
        c.validate().unwrap();
        let c = Config {
            restart_delay: Duration::from_secs(10),
            max_restart_delay: Duration::from_secs(5),
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "max_restart_delay");
    }

    #[test]
    fn validate_cores() {
        for (cores, ok) in [
            (Cores::Count(0), false),
            (Cores::Count(1), true),
            (Cores::Count(1025), false),
            (Cores::List(vec![]), false),
            (Cores::List(vec![0, 0]), false),
            (Cores::List(vec![3, 1]), true),
        ] {
            let c = Config {
                cores: Some(cores.clone()),
                ..Config::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{cores:?}");
            if !ok {
                assert_eq!(invalid_key(&c), "cores");
            }
        }
    }

    #[test]
    fn validate_token_and_non_loopback_bind() {
        let public = Config {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ..Config::default()
        };
        assert_eq!(invalid_key(&public), "token");
        assert!(
            public
                .validate()
                .unwrap_err()
                .to_string()
                .contains(TOKEN_ENV)
        );
        let ok = Config {
            token: Some("abc.DEF-123".into()),
            ..public.clone()
        };
        ok.validate().unwrap();
        for bad in ["", "has space", "new\nline", "ünï"] {
            let c = Config {
                token: Some(bad.into()),
                ..Config::default()
            };
            assert_eq!(invalid_key(&c), "token", "{bad:?}");
        }
        let v6 = Config {
            bind: "::1".parse().unwrap(),
            ..Config::default()
        };
        v6.validate().unwrap();
    }

    #[test]
    fn validate_http_limits() {
        let cases: Vec<(Config, &str)> = vec![
            (
                Config {
                    max_header_bytes: 512,
                    ..Config::default()
                },
                "max_header_bytes",
            ),
            (
                Config {
                    max_header_bytes: 2 << 20,
                    ..Config::default()
                },
                "max_header_bytes",
            ),
            (
                Config {
                    max_headers: 0,
                    ..Config::default()
                },
                "max_headers",
            ),
            (
                Config {
                    max_headers: 2000,
                    ..Config::default()
                },
                "max_headers",
            ),
            (
                Config {
                    max_uri_bytes: 8,
                    ..Config::default()
                },
                "max_uri_bytes",
            ),
            (
                Config {
                    max_uri_bytes: 32 * 1024,
                    ..Config::default()
                },
                "max_uri_bytes",
            ),
            (
                Config {
                    worker_nofile: 8,
                    ..Config::default()
                },
                "worker_nofile",
            ),
            (
                Config {
                    worker_nofile: 1 << 21,
                    ..Config::default()
                },
                "worker_nofile",
            ),
            (
                Config {
                    worker_address_space: Some(100 * MIB),
                    ..Config::default()
                },
                "worker_address_space",
            ),
        ];
        for (c, key) in cases {
            assert_eq!(invalid_key(&c), key);
        }
        let c = Config {
            worker_address_space: Some(0),
            ..Config::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn stall_timeout_defaults_to_three_heartbeats() {
        let c = Config {
            heartbeat_interval: Duration::from_millis(200),
            ..Config::default()
        };
        assert_eq!(c.stall_timeout(), Duration::from_millis(600));
        let c = Config {
            stall_timeout: Some(Duration::from_secs(2)),
            ..c
        };
        assert_eq!(c.stall_timeout(), Duration::from_secs(2));
    }

    #[test]
    fn backoff_grows_by_half_and_is_capped() {
        let c = Config {
            restart_delay: Duration::from_secs(1),
            max_restart_delay: Duration::from_secs(3),
            ..Config::default()
        };
        assert_eq!(c.backoff_delay(0), Duration::from_secs(1));
        assert_eq!(c.backoff_delay(1), Duration::from_secs(1));
        assert_eq!(c.backoff_delay(2), Duration::from_millis(1500));
        assert_eq!(c.backoff_delay(3), Duration::from_millis(2250));
        assert_eq!(c.backoff_delay(4), Duration::from_secs(3));
        assert_eq!(c.backoff_delay(u32::MAX), Duration::from_secs(3));
        let zero = Config {
            restart_delay: Duration::ZERO,
            ..Config::default()
        };
        assert_eq!(zero.backoff_delay(10), Duration::ZERO);
    }

    #[test]
    fn jittered_limits_stay_in_range() {
        let c = Config {
            max_requests: 1000,
            max_requests_jitter: 0.1,
            ..Config::default()
        };
        assert_eq!(c.jittered_max_requests(0.0), 1000);
        assert_eq!(c.jittered_max_requests(1.0), 900);
        assert_eq!(c.jittered_max_requests(0.5), 950);
        assert_eq!(c.jittered_max_requests(f64::NAN), 1000);
        assert_eq!(c.jittered_max_requests(7.0), 900);
        for i in 0..=100 {
            let v = c.jittered_max_requests(f64::from(i) / 100.0);
            assert!((900..=1000).contains(&v), "{v}");
        }
        let one = Config {
            max_requests: 1,
            max_requests_jitter: 0.9,
            ..Config::default()
        };
        assert_eq!(one.jittered_max_requests(1.0), 1);
    }

    #[test]
    fn address_space_limit_is_derived_unless_set() {
        let c = Config::default();
        assert_eq!(
            c.worker_address_space_limit(3),
            Some(4 * 512 * MIB + GIB + 2 * 2 * MIB * 3)
        );
        let c = Config {
            worker_address_space: Some(0),
            ..Config::default()
        };
        assert_eq!(c.worker_address_space_limit(3), None);
        let c = Config {
            worker_address_space: Some(5 * GIB),
            ..Config::default()
        };
        assert_eq!(c.worker_address_space_limit(3), Some(5 * GIB));
    }

    #[test]
    fn worker_program_defaults_to_current_exe() {
        let c = Config::default();
        assert_eq!(
            c.resolved_worker_program().unwrap(),
            std::env::current_exe().unwrap()
        );
        let c = Config {
            worker_program: Some("/bin/w".into()),
            ..c
        };
        assert_eq!(
            c.resolved_worker_program().unwrap(),
            PathBuf::from("/bin/w")
        );
    }

    #[test]
    fn serializes_humanly_without_the_token() {
        let c = Config {
            token: Some("hunter2".into()),
            cores: Some(Cores::List(vec![0, 1])),
            ..Config::default()
        };
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["request_timeout"], "2m");
        assert_eq!(json["heartbeat_interval"], "5s");
        assert_eq!(json["max_memory"], "512MiB");
        assert_eq!(json["ring_capacity"], "2MiB");
        assert_eq!(json["cores"], serde_json::json!([0, 1]));
        assert_eq!(json["bind"], "127.0.0.1");
        assert!(json.get("token").is_none());
        let text = serde_json::to_string(&c).unwrap();
        assert!(!text.contains("hunter2"));
        let toml_text = c.to_toml_string().unwrap();
        assert!(!toml_text.contains("hunter2"));
    }

    #[test]
    fn serialized_toml_round_trips() {
        let c = Config {
            worker_count: 3,
            stall_timeout: Some(Duration::from_millis(1500)),
            cores: Some(Cores::Count(2)),
            worker_program: Some("/bin/w".into()),
            worker_address_space: Some(3 * GIB),
            max_body_bytes: 1000,
            balance_factor: 1.25,
            ..Config::default()
        };
        let text = c.to_toml_string().unwrap();
        assert_eq!(Config::from_toml_str(&text).unwrap(), c, "{text}");
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), c);
    }
}
