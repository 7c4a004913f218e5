//! Configuration of the gateway and its worker pool.
//!
//! Layers, lowest first: built-in defaults, a TOML file (`--config FILE`, or the file named by
//! `MOLTBOT_CONFIG`; no file is read implicitly), `MOLTBOT_*` environment variables, then
//! command-line flags. [`Config::resolve`] applies all layers and validates; the config
//! records which keys a layer set ([`Config::explicit`]).
//!
//! Every key is declared once, below, with its names (snake_case, and the TypeScript names as
//! aliases), its value kind, default, flag, documentation and own validation. Generated from
//! that: the [`Config`] struct and its `Default`, [`KEYS`] (which TOML reading and writing,
//! the environment, validation, `moltbot workers info` and the README's table go through),
//! and the flags (`crate::command::args` turns the declared flags into clap arguments; this
//! module knows nothing of clap). The declaration is a `macro_rules!` of our own
//! ([`declare`]): figment would layer the sources, but each key would still be spelled out in
//! serde attributes, a clap struct and the docs, and it has nothing to say about flags or the
//! README; the macro keeps a key in one block and needs no dependency. Rules between keys
//! (a body must fit a ring, a stall timeout beyond the heartbeat, ...) are in [`Config::validate`].
//!
//! Adding a key: add its block below (the field, `MOLTBOT_<KEY>`, the flag if any, `--help`,
//! `workers info` and TOML follow), give it a sample value in the tests' `env_samples` (a test
//! insists), and paste the README table that the README test prints.
//!
//! Value forms ([`kind`]): a duration is an integer of milliseconds (as the TypeScript
//! `requestTimeout = 120000`) or a humantime string (`"5s"`, `"250ms"`, `"2m"`); a size is an
//! integer of bytes or a string with a unit (`"512MiB"`). Binary units (`KiB`, `MiB`, `GiB`,
//! `TiB`, and the single letters `K`, `M`, `G`, `T` as in `ulimit`/Docker) are powers of 1024;
//! SI units (`KB`, `MB`, `GB`, `TB`) are powers of 1000. Units are case-insensitive. Each
//! form has one parser, whether the string comes from TOML, the environment or a flag.
//!
//! The bearer token is never taken from a flag (command lines are visible to every local user
//! through `ps`): only from `MOLTBOT_GATEWAY_TOKEN` (or `MOLTBOT_TOKEN`) or the config file, and
//! it is never serialized. The same holds for the HS256 secret of signed tokens (`jwt_secret`,
//! `MOLTBOT_JWT_SECRET`); its file's path (`jwt_secret_file`) is no secret and may be a flag.

pub mod declare;
pub mod kind;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

pub use declare::{Flag, FlagGroup, Key, KindInfo, Source, Sources};
use declare::{at_least, config_keys, gateway, pool, positive, when_set, within};
pub use kind::{
    CellMode, Cores, WorkerPlacement, format_size, parse_command, parse_duration, parse_size,
};

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

/// Longest accepted `worker_spin` and `gateway_spin`.
pub const MAX_SPIN: Duration = Duration::from_millis(10);

/// `worker_spin` and `gateway_spin` when they are not set and every gateway core (lane) and
/// worker can have a CPU of its own.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// Largest accepted worker count.
pub const MAX_WORKERS: usize = 1024;

/// Shortest accepted HS256 secret, in bytes: as long as the SHA-256 output (RFC 7518, 3.2), so
/// that guessing the key is no easier than forging the MAC.
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Largest accepted `jwt_leeway`.
pub const MAX_JWT_LEEWAY: Duration = Duration::from_secs(5 * 60);

/// Ports between two slots' cells: a cell binds its port and the [`CELL_PORT_SPAN`] above it.
pub const CELL_PORT_STRIDE: u16 = 120;
/// The default `max_memory` with a cell: a worker and its OpenClaw gateway, which is
/// 650–850 MB resident when ready and grows past 1 GB with use.
pub const CELL_MAX_MEMORY: u64 = 2 * GIB;

/// The highest offset from its port that a cell binds (see `crate::cell::port_range_free`).
pub const CELL_PORT_SPAN: u16 = crate::cell::process::LAST_OFFSET;

/// Environment variable naming a config file when `--config` is not given.
pub const CONFIG_ENV: &str = "MOLTBOT_CONFIG";

/// Environment variable holding the gateway's bearer token.
pub const TOKEN_ENV: &str = "MOLTBOT_GATEWAY_TOKEN";

/// Prefix of every configuration environment variable.
pub const ENV_PREFIX: &str = "MOLTBOT_";

/// The users file's name in `sandbox_dir` when `users_file` is not set.
pub const USERS_FILE_NAME: &str = "users.json";

config_keys! {
    /// Worker processes (slots).
    worker_count: usize as Count {
        default: 4,
        aliases: ["workerCount"],
        flag: pool("workers").short('w'),
        check: |&n| within(n, 1, MAX_WORKERS),
    }

    /// Base directory of the sandboxes (`<dir>/worker-N/`), the routing table and
    /// `gateway.port`.
    sandbox_dir: PathBuf as Path {
        default: PathBuf::from("/tmp/moltbot-workers"),
        aliases: ["sandboxBaseDir", "sandboxDir", "sandbox_base_dir"],
        flag: pool("sandbox-dir").short('s').value_name("DIR"),
        check: |p| not_empty(p),
    }

    /// Requests in flight per worker; more wait in the admission queue.
    max_concurrent: usize as Count {
        default: 10,
        aliases: ["maxConcurrent"],
        flag: pool("max-concurrent"),
        check: |&n| at_least(n, 1),
    }

    /// Requests that may wait per worker beyond `max_concurrent`; a full queue answers 503.
    max_queue: usize as Count {
        default: 100,
        aliases: ["maxQueue"],
        flag: pool("max-queue"),
    }

    /// A request not answered within this gets 504.
    request_timeout: Duration as Duration {
        default: Duration::from_secs(120),
        aliases: ["requestTimeout"],
        flag: pool("request-timeout"),
        check: positive,
    }

    /// How often a worker bumps its heartbeat and the monitor checks it.
    heartbeat_interval: Duration as Duration {
        default: Duration::from_secs(5),
        aliases: ["heartbeatInterval"],
        flag: pool("heartbeat-interval"),
        check: positive,
    }

    /// A heartbeat not advancing this long marks the worker stalled: SIGKILL, then a respawn.
    ///
    /// Read it through [`Config::stall_timeout`], which applies the default.
    stall_timeout: Option<Duration> as Duration {
        default: None,
        shown: "3 × heartbeat_interval",
        aliases: ["stallTimeout"],
        flag: pool("stall-timeout"),
    }

    /// How long an idle worker spins on its rings before it parks on its futex: a request
    /// arriving within that window is taken without a wake-up. By default 50µs when the CPUs
    /// outnumber the gateway's lanes and the workers together, else 0: where they share CPUs
    /// (and with the clients), a spinning worker takes the CPU from the gateway core or the
    /// client that would produce its next request. At most 10ms.
    ///
    /// Read it through [`Config::worker_spin`], which applies the default.
    worker_spin: Option<Duration> as Duration {
        default: None,
        shown: "50µs if CPUs > lanes + workers, else 0",
        aliases: ["workerSpin"],
        flag: pool("worker-spin"),
        check: when_set(spin_limit),
    }

    /// Where worker processes run. `auto`: when the CPUs do not outnumber the gateway's cores
    /// and the workers together (so workers share CPUs with the cores anyway), a worker runs
    /// on the cores' CPUs while it is light, where a request handed over its ring is served
    /// without waking another CPU, and on the other CPUs while it keeps more than
    /// `worker_busy_share` of a CPU busy, where it does not take the cores' time from other
    /// users' requests; the programs workers start (`worker_command`, cells) run on the other
    /// CPUs. Otherwise, and with `any`, wherever the scheduler puts them. `/status` shows
    /// each worker's side.
    worker_placement: WorkerPlacement as PlacementKind {
        default: WorkerPlacement::Auto,
        aliases: ["workerPlacement"],
        flag: pool("worker-placement"),
    }

    /// With `worker_placement = auto`: the share of one CPU (over a second) above which a
    /// worker moves off the gateway cores' CPUs; it comes back below two fifths of it.
    worker_busy_share: f64 as Float {
        default: 0.5,
        aliases: ["workerBusyShare"],
        flag: pool("worker-busy-share").value_name("F"),
        check: |&f| if f.is_finite() && f > 0.0 && f <= 1.0 {
            Ok(())
        } else {
            Err(format!("{f} must be above 0 and at most 1 (a share of one CPU)"))
        },
    }

    /// How long an idle gateway core spins on its io_uring before it sleeps: a worker's answer
    /// or event, or a client's request, arriving within that window is taken without waking a
    /// sleeping thread. By default 50µs when the CPUs outnumber the gateway's cores and the
    /// workers together, or when the workers run beside the cores (`worker_placement`: a
    /// worker the core wakes takes the CPU from the spinning core); else 50µs while WebSocket
    /// requests are in flight on the core (a run's
    /// events come back one by one) when the CPUs outnumber the cores, and 0 otherwise (a
    /// spinning core would hold the CPU the workers need). Set, it holds at all times. At most
    /// 10ms.
    ///
    /// Read it through [`Config::gateway_spin`] and [`Config::gateway_stream_spin`], which
    /// apply the default.
    gateway_spin: Option<Duration> as Duration {
        default: None,
        shown: "50µs if CPUs > cores + workers or workers run beside the cores; else, if CPUs > cores, 50µs while WebSocket requests are in flight; else 0",
        aliases: ["gatewaySpin"],
        flag: gateway("gateway-spin"),
        check: when_set(spin_limit),
    }

    /// Resident memory above which a worker is recycled gracefully (at least 16MiB). With a
    /// cell it counts the cell's processes too, and the default is 2GiB (a real OpenClaw
    /// gateway is 650–850 MB resident when ready, over 1 GB once used).
    ///
    /// Read it through [`Config::worker_memory_limit`], which applies the cell default.
    max_memory: u64 as Size {
        default: 512 * MIB,
        shown: "512MiB; 2GiB with a cell",
        aliases: ["maxMemory"],
        flag: pool("max-memory"),
        check: |&m| worker_memory(m),
    }

    /// Requests served after which a worker is recycled gracefully (see
    /// `max_requests_jitter`).
    max_requests: u64 as Count {
        default: 10_000,
        aliases: ["maxRequests"],
        flag: pool("max-requests"),
        check: |&n| at_least(n, 1),
    }

    /// Keep a started successor beside each serving worker (built-in handlers only; not with
    /// `worker_command` or a cell): executed, its segment mapped and its Landlock domain
    /// applied, it waits until the worker is gone and its lanes are recovered, then takes
    /// them, so a recycle or a crash leaves the slot's users without a worker for about a
    /// millisecond instead of a spawn and a start. Costs one idle process per slot.
    worker_standby: bool as Bool {
        default: true,
        aliases: ["workerStandby"],
    }

    /// A fraction in [0, 1): each slot's limit is drawn from
    /// [(1 − jitter) × max_requests, max_requests], so that slots do not recycle together.
    max_requests_jitter: f64 as Float {
        default: 0.1,
        aliases: ["maxRequestsJitter"],
        flag: pool("max-requests-jitter").value_name("FRACTION"),
        check: |&j| if j.is_finite() && (0.0..1.0).contains(&j) {
            Ok(())
        } else {
            Err(format!("{j} must be a fraction in [0, 1)"))
        },
    }

    /// Delay before the first respawn after a crash; it grows ×1.5 per consecutive crash.
    restart_delay: Duration as Duration {
        default: Duration::from_secs(1),
        aliases: ["restartDelay"],
        flag: pool("restart-delay"),
    }

    /// Cap of the growing restart delay.
    max_restart_delay: Duration as Duration {
        default: Duration::from_secs(30),
        aliases: ["maxRestartDelay"],
        flag: pool("max-restart-delay"),
    }

    /// A worker that ran this long resets the consecutive-crash count.
    stable_after: Duration as Duration {
        default: Duration::from_secs(30),
        aliases: ["stableAfter"],
        flag: pool("stable-after"),
        check: positive,
    }

    /// More restarts than this within `restart_window` mark the slot `failed`.
    max_restart_attempts: u32 as Count {
        default: 5,
        aliases: ["maxRestartAttempts"],
        flag: pool("max-restart-attempts"),
        check: |&n| at_least(n, 1),
    }

    /// The window in which restarts are counted.
    restart_window: Duration as Duration {
        default: Duration::from_secs(60),
        aliases: ["restartWindow"],
        flag: pool("restart-window"),
        check: positive,
    }

    /// How long a `failed` slot waits before it is tried again.
    failed_cooldown: Duration as Duration {
        default: Duration::from_secs(60),
        aliases: ["failedCooldown"],
        flag: pool("failed-cooldown"),
        check: positive,
    }

    /// Bounded-load factor of the router: 0 = pure consistent hashing, otherwise at least 1.
    balance_factor: f64 as Float {
        default: 1.0,
        aliases: ["balanceFactor"],
        flag: pool("balance-factor").value_name("F"),
        check: |&f| if f.is_finite() && (f == 0.0 || f >= 1.0) {
            Ok(())
        } else {
            Err(format!("{f} must be 0 (off) or at least 1"))
        },
    }

    /// Most users the routing table takes; a new user beyond gets 503 `USER_LIMIT` (known
    /// users keep working).
    ///
    /// Each user costs memory and a line in the table for good, and any client can invent
    /// user ids.
    max_users: usize as Count {
        default: 1_000_000,
        aliases: ["maxUsers"],
        flag: pool("max-users"),
        check: |&n| at_least(n, 1),
    }

    /// Bytes per shared-memory ring: a power of two from 64KiB to 1GiB.
    ring_capacity: usize as Size {
        default: 2 * MIB as usize,
        aliases: ["ringCapacity"],
        flag: pool("ring-capacity"),
        check: |&rc| ring_size(rc as u64),
    }

    /// On SIGTERM and at a recycle, how long in-flight requests may take before the worker
    /// or gateway stops anyway.
    drain_timeout: Duration as Duration {
        default: Duration::from_secs(30),
        aliases: ["drainTimeout"],
        flag: gateway("drain-timeout"),
    }

    /// The binary run as `<program> worker ...` in each slot.
    worker_program: Option<PathBuf> as Path {
        default: None,
        shown: "this executable",
        aliases: ["workerProgram"],
        flag: pool("worker-program"),
        check: when_set(|p: &PathBuf| not_empty(p)),
    }

    /// Bring your own agent: a program (and its arguments, e.g. `python3 agent.py`) that every
    /// worker runs in its sandbox and talks to over stdin/stdout in JSON Lines.
    worker_command: Option<Vec<String>> as CommandLine {
        default: None,
        shown: "the built-in handlers",
        aliases: ["workerCommand"],
        flag: pool("worker-command"),
        check: when_set(|argv: &Vec<String>| match argv.first() {
            Some(p) if !p.is_empty() => Ok(()),
            _ => Err("must name a program".into()),
        }),
    }

    /// Extra paths the agent may read (Landlock), besides the system paths, its own
    /// installation and the files named in `worker_command`.
    worker_read_paths: Vec<PathBuf> as PathList {
        default: Vec::new(),
        aliases: ["workerReadPaths"],
    }

    /// `openclaw`: every worker relays its user's WebSocket frames to a real OpenClaw gateway
    /// (a "cell") of its own, started on demand under `<sandbox>/cell`; one user per cell, so
    /// at most `worker_count` users (`balance_factor` and `max_users` do not apply). `none`:
    /// the built-in handlers or `worker_command`.
    cell: CellMode as CellKind {
        default: CellMode::None,
        flag: pool("cell"),
    }

    /// The Node binary (24 or later) that runs the cells.
    cell_node: Option<PathBuf> as Path {
        default: None,
        shown: "node on PATH",
        flag: pool("cell-node").value_name("FILE"),
        check: when_set(|p: &PathBuf| not_empty(p)),
    }

    /// The OpenClaw package's `openclaw.mjs`; required with `cell = openclaw`.
    cell_openclaw: Option<PathBuf> as Path {
        default: None,
        flag: pool("cell-openclaw").value_name("FILE"),
        check: when_set(|p: &PathBuf| not_empty(p)),
    }

    /// Port of slot 0's cell on 127.0.0.1; slot N's is `cell_port_base + 120 × N` (a cell
    /// binds its port and the 110 above it).
    cell_port_base: u16 as Count {
        default: 19_000,
        flag: pool("cell-port-base").value_name("PORT"),
        check: |&p| at_least(p as usize, 1),
    }

    /// A cell with no request for this long is stopped; the next request starts it again.
    cell_idle_timeout: Duration as Duration {
        default: Duration::from_secs(10 * 60),
        flag: pool("cell-idle-timeout"),
        check: positive,
    }

    /// Names of the gateway's environment variables passed to the cells (model API keys);
    /// nothing else of the environment reaches them.
    cell_env: Vec<String> as NameList {
        default: Vec::new(),
        flag: pool("cell-env"),
        check: |names: &Vec<String>| env_names(names),
    }

    /// Address the gateway listens on; an address other than loopback needs a credential (the
    /// operator `token`, a user, or signed tokens).
    bind: IpAddr as Address {
        default: IpAddr::V4(Ipv4Addr::LOCALHOST),
        flag: gateway("bind"),
    }

    /// Port the gateway listens on (0 = any free port).
    port: u16 as Count {
        default: 18789,
        flag: gateway("port").short('p').value_name("PORT"),
    }

    /// Gateway cores, one pinned executor each: a count (`2`) or a list of core ids (`0,1`).
    /// By default half the available CPUs (at least one): the rest is left to the workers.
    cores: Option<Cores> as CoreSet {
        default: None,
        shown: "half the CPUs, at least 1",
        flag: gateway("cores"),
        check: when_set(core_selection),
    }

    /// HS256 secret that signed tokens (JWT) from an identity provider are verified with, at
    /// least 32 bytes, read from `MOLTBOT_JWT_SECRET` or the file; never a flag.
    ///
    /// Never serialized. At most one of `jwt_secret`, `jwt_secret_file` and
    /// `jwt_public_key_file` is set; none leaves signed tokens refused.
    jwt_secret: Option<String> as Text {
        default: None,
        secret: true,
        check: when_set(|s: &String| hs256_secret(s.as_bytes())),
    }

    /// A file holding the HS256 secret of signed tokens (a trailing line break is not part of
    /// it); read at start-up.
    jwt_secret_file: Option<PathBuf> as Path {
        default: None,
        flag: gateway("jwt-secret-file").value_name("FILE"),
        check: when_set(|p: &PathBuf| not_empty(p)),
    }

    /// A PEM public key that verifies signed tokens: Ed25519 (alg EdDSA) or EC P-256 (alg
    /// ES256), the algorithm taken from the key; read at start-up.
    jwt_public_key_file: Option<PathBuf> as Path {
        default: None,
        flag: gateway("jwt-public-key-file").value_name("FILE"),
        check: when_set(|p: &PathBuf| not_empty(p)),
    }

    /// The issuer (`iss`) a signed token must name, when set.
    jwt_issuer: Option<String> as Text {
        default: None,
        flag: gateway("jwt-issuer").value_name("ISS"),
        check: when_set(|s: &String| not_blank(s)),
    }

    /// The audience (`aud`) a signed token must name, when set.
    jwt_audience: Option<String> as Text {
        default: None,
        flag: gateway("jwt-audience").value_name("AUD"),
        check: when_set(|s: &String| not_blank(s)),
    }

    /// The claim of a signed token that holds the user id (a string).
    jwt_user_claim: String as Text {
        default: String::from("sub"),
        flag: gateway("jwt-user-claim").value_name("CLAIM"),
        check: |s| not_blank(s),
    }

    /// Clock skew allowed on a signed token's `exp` and `nbf`, in whole seconds, at most 5m.
    ///
    /// Beyond a few minutes it no longer absorbs skew but lengthens every token's life.
    jwt_leeway: Duration as Duration {
        default: Duration::from_secs(30),
        flag: gateway("jwt-leeway"),
        check: |&d| if d <= MAX_JWT_LEEWAY {
            Ok(())
        } else {
            Err(format!("must be at most {}", humantime::format_duration(MAX_JWT_LEEWAY)))
        },
    }

    /// Bearer token required on every endpoint but `/livez` and `/readyz`, read from
    /// `MOLTBOT_GATEWAY_TOKEN` (or `MOLTBOT_TOKEN`) or the file; never a flag, since `ps`
    /// shows command lines.
    ///
    /// Never serialized.
    token: Option<String> as Text {
        default: None,
        env: "MOLTBOT_GATEWAY_TOKEN",
        secret: true,
        check: when_set(|t: &String| header_token(t)),
    }

    /// The users file: per-user tokens (hashed), managed with `moltbot users`.
    ///
    /// Read it through [`Config::users_path`], which applies the default.
    users_file: Option<PathBuf> as Path {
        default: None,
        shown: "users.json in sandbox_dir",
        aliases: ["usersFile"],
        flag: pool("users-file").value_name("FILE"),
        check: when_set(|p: &PathBuf| not_empty(p)),
    }

    /// Limit of the request line plus headers; 431 beyond.
    max_header_bytes: usize as Size {
        default: 16 * KIB as usize,
        aliases: ["maxHeaderBytes"],
        check: |&n| if (KIB as usize..=MIB as usize).contains(&n) {
            Ok(())
        } else {
            Err("must be between 1KiB and 1MiB".into())
        },
    }

    /// Limit of the number of request headers; 431 beyond.
    max_headers: usize as Count {
        default: 100,
        aliases: ["maxHeaders"],
        check: |&n| within(n, 1, 1024),
    }

    /// Limit of a request body; 413 beyond. It must fit a ring frame (`ring_capacity` − 4KiB).
    max_body_bytes: usize as Size {
        default: MIB as usize,
        aliases: ["maxBodyBytes"],
        flag: gateway("max-body-bytes"),
        check: |&n| at_least(n, 1),
    }

    /// WebSocket (OpenClaw protocol): interval of the `tick` events each connection gets;
    /// announced as `policy.tickIntervalMs`.
    ws_tick_interval: Duration as Duration {
        default: Duration::from_secs(30),
        aliases: ["wsTickInterval"],
        flag: gateway("ws-tick-interval"),
        check: positive,
    }

    /// WebSocket: bytes queued for a client that does not read before it is closed (1008
    /// "slow consumer"); announced as `policy.maxBufferedBytes`.
    ws_max_buffered_bytes: usize as Size {
        default: 16 * MIB as usize,
        aliases: ["wsMaxBufferedBytes"],
        flag: gateway("ws-max-buffered-bytes"),
        check: |&n| at_least(n, 64 * KIB as usize),
    }

    /// WebSocket: time from the upgrade to a successful `connect`; beyond, close 1008.
    ws_connect_timeout: Duration as Duration {
        default: Duration::from_secs(10),
        aliases: ["wsConnectTimeout"],
        flag: gateway("ws-connect-timeout"),
        check: positive,
    }

    /// Limit of the request target (URI); 414 beyond. At most `max_header_bytes`.
    max_uri_bytes: usize as Size {
        default: 8 * KIB as usize,
        aliases: ["maxUriBytes"],
        check: |&n| at_least(n, 16),
    }

    /// A request head not complete within this gets 408.
    header_read_timeout: Duration as Duration {
        default: Duration::from_secs(10),
        aliases: ["headerReadTimeout"],
        flag: gateway("header-read-timeout"),
        check: positive,
    }

    /// An idle keep-alive connection is closed after this.
    idle_timeout: Duration as Duration {
        default: Duration::from_secs(60),
        aliases: ["idleTimeout"],
        flag: gateway("idle-timeout"),
        check: positive,
    }

    /// Open connections per gateway core; beyond, 503 and close. Unless set, lowered to what
    /// the open-files limit (`ulimit -Hn`) allows.
    max_connections: usize as Count {
        default: 10_000,
        aliases: ["maxConnections"],
        flag: gateway("max-connections"),
        check: |&n| at_least(n, 1),
    }

    /// RLIMIT_NOFILE of worker processes.
    worker_nofile: u64 as Count {
        default: 1024,
        aliases: ["workerNofile"],
        check: |&n| within(n, 16, 1 << 20),
    }

    /// RLIMIT_AS of worker processes (0 = no limit).
    ///
    /// Unset, it is derived: see [`Config::worker_address_space_limit`].
    worker_address_space: Option<u64> as Size {
        default: None,
        shown: "4 × max_memory + 1GiB + rings; none with a cell",
        aliases: ["workerAddressSpace"],
    }

    /// Confine workers with Landlock where the kernel supports it.
    landlock: bool as Bool {
        default: true,
    }
}

// The longer checks of the declaration.

fn not_empty(p: &Path) -> Result<(), String> {
    if p.as_os_str().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(())
    }
}

fn worker_memory(m: u64) -> Result<(), String> {
    if m < 16 * MIB {
        Err(format!(
            "{} is below the minimum of 16MiB (a worker's baseline would recycle it forever)",
            format_size(m)
        ))
    } else {
        Ok(())
    }
}

fn spin_limit(d: &Duration) -> Result<(), String> {
    if *d <= MAX_SPIN {
        Ok(())
    } else {
        Err(format!(
            "at most {}: a longer spin is a busy loop",
            humantime::format_duration(MAX_SPIN)
        ))
    }
}

fn ring_size(rc: u64) -> Result<(), String> {
    if rc.is_power_of_two() && (MIN_RING_CAPACITY..=MAX_RING_CAPACITY).contains(&rc) {
        Ok(())
    } else {
        Err(format!(
            "{} must be a power of two between {} and {}",
            format_size(rc),
            format_size(MIN_RING_CAPACITY),
            format_size(MAX_RING_CAPACITY)
        ))
    }
}

fn core_selection(cores: &Cores) -> Result<(), String> {
    match cores {
        Cores::Count(n) => within(*n, 1, MAX_WORKERS).map_err(|e| format!("count {e}")),
        Cores::List(ids) if ids.is_empty() => Err("the list of core ids is empty".into()),
        Cores::List(ids) => {
            let mut seen = HashSet::new();
            match ids.iter().find(|id| !seen.insert(**id)) {
                Some(id) => Err(format!("core {id} is listed twice")),
                None => Ok(()),
            }
        }
    }
}

/// Environment variable names as the shell writes them: letters, digits and `_`, not starting
/// with a digit.
fn env_names(names: &[String]) -> Result<(), String> {
    for n in names {
        let ok = n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && n.chars().next().is_some_and(|c| !c.is_ascii_digit());
        if !ok {
            return Err(format!("{n:?} is not an environment variable name"));
        }
    }
    Ok(())
}

fn not_blank(s: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(())
    }
}

/// The length rule of an HS256 secret, from the key or a file. The message gives the length,
/// never the secret.
pub(crate) fn hs256_secret(secret: &[u8]) -> Result<(), String> {
    if secret.len() < MIN_HS256_SECRET_BYTES {
        Err(format!(
            "is {} bytes; an HS256 secret needs at least {MIN_HS256_SECRET_BYTES}",
            secret.len()
        ))
    } else {
        Ok(())
    }
}

fn header_token(t: &str) -> Result<(), String> {
    if t.is_empty() {
        Err("must not be empty".into())
    } else if !t.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        Err("must be printable ASCII without spaces (it travels in an HTTP header)".into())
    } else {
        Ok(())
    }
}

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
        /// What is wrong, with the line and the key.
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
    /// A flag has a malformed value, or names no key with a flag.
    #[error("invalid flag {flag}: {message}")]
    Flag {
        /// The flag (`--workers`), or the key when it has none.
        flag: String,
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

/// The key named `name` (snake_case, exactly).
pub fn key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// The README's configuration table: one row per key, with its
/// default, flag and meaning. `moltbot workers info --format markdown` prints it.
pub fn markdown_table() -> String {
    let mut out = String::from("| key | default | flag | meaning |\n|---|---|---|---|\n");
    for k in KEYS {
        let default = match k.shown {
            Some(text) => text.to_string(),
            None => format!("`{}`", k.default_text()),
        };
        let flag = k.flag.map_or_else(String::new, |f| match f.short {
            Some(c) => format!("`-{c}`, `--{}`", f.long),
            None => format!("`--{}`", f.long),
        });
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            k.name,
            default.replace('|', "\\|"),
            flag,
            k.meaning().replace('|', "\\|")
        ));
    }
    out
}

impl Config {
    /// Parses a TOML document (keys as in [`KEYS`], or the TypeScript names). Missing keys
    /// keep their defaults; unknown keys are an error naming the key. Does not validate.
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
        let err = |message: String| ConfigError::Parse {
            origin: origin.to_string(),
            message,
        };
        let table: BTreeMap<String, toml::Spanned<toml::Value>> =
            toml::from_str(s).map_err(|e| err(e.to_string().trim_end().to_string()))?;
        let mut entries: Vec<_> = table.iter().collect();
        entries.sort_by_key(|(_, v)| v.span().start);
        let mut config = Config::default();
        let mut seen = BTreeMap::new();
        for (name, value) in entries {
            config
                .set_toml(&mut seen, name, value.get_ref())
                .map_err(|m| {
                    let line = s[..value.span().start].matches('\n').count() + 1;
                    err(format!("line {line}: {m}"))
                })?;
        }
        Ok(config)
    }

    /// Sets the key named `name` (or an alias) from a TOML value; `seen` holds the names the
    /// document already used, so that a key set twice under two names is an error.
    fn set_toml(
        &mut self,
        seen: &mut BTreeMap<&'static str, String>,
        name: &str,
        value: &toml::Value,
    ) -> Result<(), String> {
        let Some(key) = KEYS.iter().find(|k| k.is_named(name)) else {
            return Err(format!(
                "unknown key `{name}` (`moltbot workers info` lists the keys)"
            ));
        };
        if let Some(first) = seen.insert(key.name, name.to_string()) {
            return Err(format!(
                "`{name}` sets {} again (already set as `{first}`)",
                key.name
            ));
        }
        (key.set_toml)(self, value).map_err(|m| format!("{}: {m}", key.name))?;
        self.sources.set(key.name, Source::File);
        Ok(())
    }

    /// Serializes as TOML (durations as humantime strings, sizes with units; no token).
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(self).map_err(|e| ConfigError::Parse {
            origin: "<serialize>".into(),
            message: e.to_string(),
        })
    }

    /// Applies `MOLTBOT_<UPPER_SNAKE_KEY>` variables (e.g. `MOLTBOT_WORKER_COUNT`), and a key's
    /// own variable where it has one (`MOLTBOT_GATEWAY_TOKEN`, which wins over
    /// `MOLTBOT_TOKEN`). Other `MOLTBOT_*` variables are ignored: workers and tools share the
    /// prefix. An empty value unsets an optional key.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let mut winners = Vec::new();
        for (var, value) in vars {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if let Some(key) = KEYS.iter().find(|k| k.env_override == Some(var.as_str())) {
                winners.push((key, var, value));
                continue;
            }
            let lower = rest.to_ascii_lowercase();
            if let Some(key) = KEYS.iter().find(|k| k.is_env_named(&lower)) {
                self.set_str(key, &value, Source::Env)
                    .map_err(|message| ConfigError::Env { var, message })?;
            }
        }
        for (key, var, value) in winners {
            self.set_str(key, &value, Source::Env)
                .map_err(|message| ConfigError::Env { var, message })?;
        }
        Ok(())
    }

    /// Applies flag values, given as `(key name, value as typed)`; each goes through the same
    /// parser as the key's TOML string and environment variable.
    pub fn apply_flags<'a>(
        &mut self,
        flags: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), ConfigError> {
        for (name, value) in flags {
            let flag_error = |message: String| ConfigError::Flag {
                flag: key(name)
                    .and_then(|k| k.flag)
                    .map_or_else(|| name.to_string(), |f| format!("--{}", f.long)),
                message,
            };
            let Some(key) = key(name).filter(|k| k.flag.is_some()) else {
                return Err(flag_error("no such flag".into()));
            };
            self.set_str(key, value, Source::Flag).map_err(flag_error)?;
        }
        Ok(())
    }

    fn set_str(&mut self, key: &'static Key, value: &str, source: Source) -> Result<(), String> {
        (key.set_str)(self, value)?;
        self.sources.set(key.name, source);
        Ok(())
    }

    /// The whole layering: defaults < file (`file`, else `$MOLTBOT_CONFIG`) < env < flags
    /// (`(key name, value)` pairs), then [`Config::validate`].
    pub fn resolve<'a>(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Config, ConfigError> {
        let cfg = Config::layer(file, env, flags)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The layering of [`Config::resolve`] without its validation: each value is well-formed,
    /// but neither the keys' ranges nor the rules between keys are checked. For commands that
    /// use a few keys and check those themselves: editing the users file needs to know where
    /// it is, not a configuration a gateway could run with.
    pub fn layer<'a>(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let file = file.map(Path::to_path_buf).or_else(|| {
            env.iter()
                .find(|(k, v)| k == CONFIG_ENV && !v.is_empty())
                .map(|(_, v)| PathBuf::from(v))
        });
        let mut cfg = match file {
            Some(path) => Config::load_file(&path)?,
            None => Config::default(),
        };
        cfg.apply_env(env)?;
        cfg.apply_flags(flags)?;
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

    /// Where `key`'s value came from: the file, the environment, a flag, or the default.
    pub fn source(&self, key: &str) -> Source {
        self.sources.get(key)
    }

    /// Whether `key` was chosen rather than left at its default: set by the file, the
    /// environment or a flag, or holding another value than the default (a library user's
    /// `Config { max_connections: 50_000, ..Config::default() }`).
    ///
    /// # Panics
    ///
    /// If `key` is not a configuration key (a typo in the caller).
    pub fn explicit(&self, key_name: &str) -> bool {
        let k = key(key_name).unwrap_or_else(|| panic!("{key_name:?} is not a configuration key"));
        self.source(k.name) != Source::Default || !k.is_default(self)
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

    /// The highest port the cells of every slot bind (`cell_port_base` is the lowest); above
    /// 65535 for a configuration that validation refuses.
    pub fn last_cell_port(&self) -> usize {
        self.cell_port_base as usize
            + CELL_PORT_STRIDE as usize * self.worker_count.saturating_sub(1)
            + CELL_PORT_SPAN as usize
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

    /// The resident memory above which a worker is recycled: `max_memory`, or
    /// [`CELL_MAX_MEMORY`] when a cell runs in each slot and `max_memory` was not chosen.
    pub fn worker_memory_limit(&self) -> u64 {
        if self.cell == CellMode::OpenClaw && !self.explicit("max_memory") {
            CELL_MAX_MEMORY
        } else {
            self.max_memory
        }
    }

    /// How long an idle worker with `lanes` lanes spins before it parks, on a machine with
    /// `cpus` CPUs available: `worker_spin`, or by default [`DEFAULT_SPIN`] when the
    /// CPUs outnumber the lanes (gateway cores) and workers together, else zero.
    pub fn worker_spin(&self, lanes: usize, cpus: usize) -> Duration {
        match self.worker_spin {
            Some(d) => d,
            None if cpus > lanes.saturating_add(self.worker_count) => DEFAULT_SPIN,
            None => Duration::ZERO,
        }
    }

    /// How long an idle gateway core spins before it sleeps, with `cores` cores on a machine
    /// with `cpus` CPUs available, the workers placed beside the cores or not
    /// (`worker_placement`): `gateway_spin`, or by default [`DEFAULT_SPIN`] when the CPUs
    /// outnumber the cores and workers together, or when the workers run beside the cores
    /// (a worker woken by the core then takes the CPU from the spinning core, and the clients
    /// have the other CPUs), else zero.
    pub fn gateway_spin(&self, cores: usize, cpus: usize, workers_beside: bool) -> Duration {
        match self.gateway_spin {
            Some(d) => d,
            None if workers_beside => DEFAULT_SPIN,
            None if cpus > cores.saturating_add(self.worker_count) => DEFAULT_SPIN,
            None => Duration::ZERO,
        }
    }

    /// How long a gateway core spins before it sleeps while WebSocket requests are in flight on
    /// it: `gateway_spin`, or by default [`DEFAULT_SPIN`] when the CPUs outnumber the cores (a
    /// worker then has a CPU to answer on while the core spins, or takes the core's when
    /// placed beside it), else zero.
    pub fn gateway_stream_spin(&self, cores: usize, cpus: usize) -> Duration {
        match self.gateway_spin {
            Some(d) => d,
            None if cpus > cores => DEFAULT_SPIN,
            None => Duration::ZERO,
        }
    }

    /// RLIMIT_AS for workers, or `None` for no limit. Unless configured, derived as
    /// `4 × max_memory + 1 GiB + 2 × ring_capacity × lanes` (`lanes` = gateway cores plus the
    /// in-process lane): headroom for the allocator's virtual reservations and thread stacks
    /// beyond the RSS limit, plus the mapped rings. An explicit 0 disables the limit.
    pub fn worker_address_space_limit(&self, lanes: usize) -> Option<u64> {
        match self.worker_address_space {
            Some(0) => None,
            Some(v) => Some(v),
            // A cell inherits the worker's limits, and Node reserves far more address space
            // than it uses (V8's pointer cage, WebAssembly guard regions): no derived limit.
            None if self.cell == CellMode::OpenClaw => None,
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

    /// Whether signed tokens (JWT) can be verified: one of `jwt_secret`, `jwt_secret_file` and
    /// `jwt_public_key_file` is set.
    pub fn jwt_configured(&self) -> bool {
        self.jwt_secret.is_some()
            || self.jwt_secret_file.is_some()
            || self.jwt_public_key_file.is_some()
    }

    /// The largest request body a ring frame can carry.
    pub fn max_frame_body(&self) -> u64 {
        (self.ring_capacity as u64).saturating_sub(RING_FRAME_OVERHEAD)
    }

    /// The users file: `users_file`, or `users.json` in `sandbox_dir`.
    pub fn users_path(&self) -> PathBuf {
        match &self.users_file {
            Some(p) => p.clone(),
            None => self.sandbox_dir.join(USERS_FILE_NAME),
        }
    }

    /// The worker binary: `worker_program` or the current executable.
    pub fn resolved_worker_program(&self) -> std::io::Result<PathBuf> {
        match &self.worker_program {
            Some(p) => Ok(p.clone()),
            None => std::env::current_exe(),
        }
    }

    /// Checks every key's own range (as declared), then the rules between keys; the error
    /// names the key and what to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for k in KEYS {
            (k.check)(self).map_err(|message| ConfigError::Invalid {
                key: k.name,
                message,
            })?;
        }
        self.validate_across_keys()
    }

    fn validate_across_keys(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        }
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
        if self.cell == CellMode::OpenClaw {
            if self.worker_command.is_some() {
                return bad(
                    "worker_command",
                    "cell = openclaw relays every request to an OpenClaw cell: a worker runs \
                     either a cell or an agent program, so unset worker_command",
                );
            }
            if self.cell_openclaw.is_none() {
                return bad(
                    "cell_openclaw",
                    "cell = openclaw needs the path of the package's openclaw.mjs \
                     (--cell-openclaw FILE)",
                );
            }
            // The cell mode routes one user per cell (bounded load at factor 1, as many users
            // as cells): a setting of these would be silently overridden, so it is refused.
            for name in ["balance_factor", "max_users"] {
                if key(name).is_some_and(|k| !k.is_default(self)) {
                    return bad(
                        name,
                        "does not apply with cell = openclaw, which routes one user per cell \
                         (at most worker_count users); unset it",
                    );
                }
            }
            let last = self.last_cell_port();
            if last > u16::MAX as usize {
                return bad(
                    "cell_port_base",
                    format!(
                        "{}: the cells of {} workers would use ports up to {last}, beyond 65535",
                        self.cell_port_base, self.worker_count
                    ),
                );
            }
        }
        if self.max_restart_delay < self.restart_delay {
            return bad(
                "max_restart_delay",
                "must not be shorter than restart_delay",
            );
        }
        let jwt_keys = [
            ("jwt_secret", self.jwt_secret.is_some()),
            ("jwt_secret_file", self.jwt_secret_file.is_some()),
            ("jwt_public_key_file", self.jwt_public_key_file.is_some()),
        ];
        let mut set_keys = jwt_keys
            .iter()
            .filter(|(_, set)| *set)
            .map(|(name, _)| *name);
        if let (Some(first), Some(second)) = (set_keys.next(), set_keys.next()) {
            return bad(
                second,
                format!(
                    "{first} is set too: signed tokens are verified with one key, so set one of \
                     jwt_secret, jwt_secret_file and jwt_public_key_file"
                ),
            );
        }
        if !self.jwt_configured() {
            // Checks of signed tokens without a key to verify them: a forgotten key, not a
            // choice, so it is said at start-up rather than found as refused tokens.
            for name in ["jwt_issuer", "jwt_audience", "jwt_user_claim", "jwt_leeway"] {
                if key(name).is_some_and(|k| !k.is_default(self)) {
                    return bad(
                        name,
                        "applies to signed tokens, which need a key: set jwt_secret \
                         (MOLTBOT_JWT_SECRET), jwt_secret_file or jwt_public_key_file",
                    );
                }
            }
        }
        if self.max_body_bytes as u64 > self.max_frame_body() {
            return bad(
                "max_body_bytes",
                format!(
                    "{} does not fit a ring frame: at most ring_capacity ({}) − {} = {} bytes; \
                     raise ring_capacity or lower max_body_bytes",
                    format_size(self.max_body_bytes as u64),
                    format_size(self.ring_capacity as u64),
                    format_size(RING_FRAME_OVERHEAD),
                    self.max_frame_body()
                ),
            );
        }
        if self.max_uri_bytes > self.max_header_bytes {
            return bad(
                "max_uri_bytes",
                "must be at most max_header_bytes (the URI is part of the head)",
            );
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

/// Every key but the secret ones and the unset optional ones, in declaration order, in the
/// forms of [`kind`]: durations and sizes as strings with units.
impl Serialize for Config {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let entries: Vec<(&str, toml::Value)> = KEYS
            .iter()
            .filter_map(|k| Some((k.name, k.value(self)?)))
            .collect();
        let mut map = s.serialize_map(Some(entries.len()))?;
        for (name, value) in &entries {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// A map of keys (or aliases) to values, read like the TOML file (e.g. from JSON).
impl<'de> Deserialize<'de> for Config {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Config, D::Error> {
        let map = BTreeMap::<String, toml::Value>::deserialize(d)?;
        let mut config = Config::default();
        let mut seen = BTreeMap::new();
        for (name, value) in &map {
            config
                .set_toml(&mut seen, name, value)
                .map_err(de::Error::custom)?;
        }
        Ok(config)
    }
}
