//! The worker process (`moltbot worker`, a hidden subcommand the gateway runs in each slot):
//! confine itself, attach to its segment, take its lanes, then serve them until told to stop,
//! with the built-in handlers ([`crate::worker::serve`]) or through an agent program
//! ([`crate::worker::bridge`]).

use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, bail};
use moltbot_ipc::{Segment, WakeSender};

use crate::cell::CellSpec;
use crate::worker::handlers::Handlers;
use crate::worker::isolation::{self, IsolationPolicy};
use crate::worker::lane::Lane;
use crate::worker::{bridge, relay, serve};

/// Command-line arguments of `moltbot worker` (set by the gateway, not by people).
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Slot number.
    #[arg(long)]
    pub slot: usize,
    /// Name of the slot's shared-memory segment.
    #[arg(long)]
    pub segment: String,
    /// Lanes of the segment: the gateway passes this many wake sockets over standard input
    /// (see `moltbot_ipc::wake::receive_wake_senders`), in lane order.
    #[arg(long)]
    pub lanes: usize,
    /// Pid of the gateway; the worker exits if it is not its parent.
    #[arg(long)]
    pub parent_pid: u32,
    /// The sandbox root (also the working directory).
    #[arg(long)]
    pub sandbox: PathBuf,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub heartbeat_ms: u64,
    /// Microseconds an idle serving loop spins before it parks (0: parks at once).
    #[arg(long, default_value_t = 0)]
    pub spin_us: u64,
    /// RLIMIT_NOFILE.
    #[arg(long, default_value_t = 1024)]
    pub nofile: u64,
    /// RLIMIT_AS in bytes (none if absent).
    #[arg(long)]
    pub address_space: Option<u64>,
    /// Do not apply Landlock.
    #[arg(long)]
    pub no_landlock: bool,
    /// Exit (code 0, between requests) after serving this many requests: the recycle limit,
    /// enforced exactly here; the monitor replaces the process.
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Run this program (a JSON array: program and arguments) in the sandbox and bridge the
    /// lanes to it over stdin/stdout instead of the built-in handlers.
    #[arg(long)]
    pub command: Option<String>,
    /// Extra read-only paths for Landlock (the agent program's files).
    #[arg(long = "read-path")]
    pub read_paths: Vec<PathBuf>,
    /// How long a bridged program may take to finish after `shutdown`, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub grace_ms: u64,
    /// Longest line a bridged program may write, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_line: usize,
    /// Relay the lanes to an OpenClaw cell: the package's `openclaw.mjs` (with `--cell-node`
    /// and `--cell-port`).
    #[arg(long, requires_all = ["cell_node", "cell_port"], conflicts_with = "command")]
    pub cell_openclaw: Option<PathBuf>,
    /// The node binary that runs the cell.
    #[arg(long)]
    pub cell_node: Option<PathBuf>,
    /// The cell's port on 127.0.0.1.
    #[arg(long)]
    pub cell_port: Option<u16>,
    /// An idle cell is stopped after this many milliseconds.
    #[arg(long, default_value_t = 600_000)]
    pub cell_idle_ms: u64,
    /// A ready cell leaving its health probe unanswered this long (milliseconds) stops the
    /// heartbeat: the gateway's stall timeout.
    #[arg(long, default_value_t = 15_000)]
    pub cell_stall_ms: u64,
    /// Names of environment variables of this process handed to the cell.
    #[arg(long = "cell-env")]
    pub cell_env: Vec<String>,
    /// The CPUs the programs this worker starts (the agent program, the cell) run on: the
    /// CPUs no gateway core runs on (`worker_placement`). Absent: this worker's own.
    #[arg(long, value_delimiter = ',')]
    pub program_cpus: Vec<usize>,
    /// Start as the slot's standby: attach, confine, then wait on standard input until the
    /// gateway hands over the wake sockets (the slot's worker is gone and its lanes are
    /// recovered), and only then take the lanes. End-of-file or SIGTERM before that: exit 0.
    /// Built-in handlers only.
    #[arg(long, conflicts_with_all = ["command", "cell_openclaw"])]
    pub standby: bool,
}

/// How long a cell may take to admit its client after its start: cold starts took 12–30 s in
/// the tests on an idle machine; a loaded one needs more.
const CELL_START_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the worker until SIGTERM (finish the current request, exit 0) or a fatal error.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    isolation::set_parent_death_signal(args.parent_pid).context("parent death signal")?;
    let policy = IsolationPolicy {
        sandbox_root: args.sandbox.clone(),
        landlock: !args.no_landlock,
        nofile: args.nofile,
        address_space: args.address_space,
        extra_read_only: args.read_paths.clone(),
        extra_read_write: Vec::new(),
    };
    isolation::apply_rlimits(&policy).context("rlimits")?;

    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())
        .context("SIGTERM handler")?;

    let seg = Segment::attach(&args.segment).context("attach segment")?;
    let lanes_n = seg.layout().lanes() as usize;
    if args.lanes != lanes_n {
        bail!("--lanes {} for a segment of {lanes_n} lanes", args.lanes);
    }
    // Standard input becomes /dev/null once the wake sockets are in; opened before Landlock.
    let null = std::fs::File::open("/dev/null").context("/dev/null")?;

    let mut policy = policy;
    if args.cell_openclaw.is_some() {
        // What this slot's cell left when its worker was killed (its helpers outlive it):
        // ended now, before Landlock, which would keep this worker from reading and signalling
        // processes of its predecessor's domain.
        let left = crate::cell::end_leftovers(&args.sandbox.join("cell"));
        if !left.is_empty() {
            tracing::warn!(worker = args.slot, pids = ?left,
                "ended processes the slot's previous cell left running");
        }
        // The cell writes its lifecycle locks under a hard-coded /tmp directory (see
        // crate::cell::process): it must exist before Landlock, which only grants access
        // beneath paths that exist.
        let locks = crate::cell::process::shared_lock_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&locks)
            .with_context(|| format!("creating {}", locks.display()))?;
        policy.extra_read_write.push(locks);
        // Node and openclaw read their own /proc entries (`/proc/self/stat` for the resident
        // size, `/proc/self/mounts`); the cell's processes do not exist yet, so only the whole
        // of /proc can be granted. What it shows of other processes stays guarded: Landlock
        // denies the ptrace-checked entries (environ, mem) of every process outside this
        // domain, the gateway and the other workers included, to a task without
        // CAP_SYS_PTRACE, hence the drop; no secret is on a command line.
        policy.extra_read_only.push(PathBuf::from("/proc"));
        isolation::drop_capabilities().context("capabilities")?;
    }

    // From here on no new files outside the sandbox: the segment is mapped, the fds are open.
    let landlock = isolation::apply_landlock(&policy).context("landlock")?;
    if args.standby && !await_activation(&term)? {
        tracing::info!(worker = args.slot, "standby released before it served");
        return Ok(());
    }
    let wakes = receive_wake_sockets(lanes_n, &null)?;
    let mut lanes = Vec::with_capacity(lanes_n);
    for (i, wake) in wakes.into_iter().enumerate() {
        let ends = seg
            .take_worker_lane(i as u32)
            .with_context(|| format!("lane {i}"))?;
        lanes.push(Lane {
            req: ends.requests,
            resp: ends.responses,
            wake,
        });
    }
    tracing::info!(
        worker = args.slot,
        pid = std::process::id(),
        ?landlock,
        "worker serving {lanes_n} lanes"
    );

    let max_reply = lanes
        .first()
        .map(|l| l.resp.max_payload().saturating_sub(1024))
        .unwrap_or(0);
    if let (Some(openclaw), Some(node), Some(port)) =
        (&args.cell_openclaw, &args.cell_node, args.cell_port)
    {
        let heartbeat = Duration::from_millis(args.heartbeat_ms.max(1));
        let settings = relay::RelaySettings {
            spec: CellSpec {
                node: node.clone(),
                openclaw: openclaw.clone(),
                root: args.sandbox.join("cell"),
                port,
                token: cell_token(),
                env_allow: args.cell_env.clone(),
                cpus: args.program_cpus.clone(),
            },
            idle_timeout: Duration::from_millis(args.cell_idle_ms.max(1)),
            start_timeout: CELL_START_TIMEOUT,
            heartbeat,
            // The gateway's stall timeout: a cell that busy is as stalled as a worker would be.
            stall: Duration::from_millis(args.cell_stall_ms.max(1)),
            max_reply,
            grace: Duration::from_millis(args.grace_ms),
        };
        return relay::run(seg, lanes, settings, &term);
    }
    if let Some(command) = &args.command {
        let argv: Vec<String> =
            serde_json::from_str(command).context("--command must be a JSON array")?;
        let settings = bridge::Settings {
            sandbox: args.sandbox.clone(),
            max_line: args.max_line,
            heartbeat: Duration::from_millis(args.heartbeat_ms.max(1)),
            max_requests: args.max_requests.unwrap_or(u64::MAX),
            grace: Duration::from_millis(args.grace_ms),
            program_cpus: args.program_cpus.clone(),
        };
        return bridge::run(&settings, argv, seg, lanes, &term, max_reply);
    }
    let mut handlers = Handlers::new(
        crate::sandbox::worker_id(args.slot),
        std::process::id(),
        &args.sandbox,
    );
    handlers.set_max_reply_bytes(max_reply);
    let max_requests = args.max_requests.unwrap_or(u64::MAX);
    let idle = serve::Idle {
        park_for: Duration::from_millis((args.heartbeat_ms / 2).clamp(1, 1000)),
        spin: Duration::from_micros(args.spin_us),
    };
    serve::run(seg, lanes, handlers, max_reply, max_requests, &term, idle)
}

/// A fresh random token for the cell's `connect`: made here, given only to the cell (in its
/// environment) and its backend client, so no other process can talk to the cell.
fn cell_token() -> String {
    rand::random::<[u8; 24]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How long a worker waits at start for its wake sockets.
const WAKE_SOCKETS_WITHIN: Duration = Duration::from_secs(10);

/// Receives the lanes' wake sockets, which the gateway sends over this process's standard
/// input right after spawning it, then points standard input at `/dev/null` (the channel has
/// served its purpose; nothing else reads it).
fn receive_wake_sockets(lanes: usize, null: &std::fs::File) -> anyhow::Result<Vec<WakeSender>> {
    let wakes = moltbot_ipc::wake::receive_wake_senders(
        std::io::stdin().as_fd(),
        lanes,
        WAKE_SOCKETS_WITHIN,
    )
    .context("receiving the wake sockets from the gateway on standard input")?;
    rustix::stdio::dup2_stdin(null).context("standard input")?;
    Ok(wakes)
}

/// How often a waiting standby looks at its SIGTERM flag: a signal interrupts the wait, except
/// one that comes just before it starts. Its release by the gateway (end-of-file) is seen at
/// once.
const STANDBY_LOOK: Duration = Duration::from_secs(1);

/// A standby's wait for its activation: true once the gateway has written to the hand-off
/// channel (the wake sockets follow at once), false on SIGTERM or when the gateway closed the
/// channel without writing (released: it is not needed any more).
fn await_activation(term: &AtomicBool) -> anyhow::Result<bool> {
    use rustix::event::{PollFd, PollFlags};
    let stdin = std::io::stdin();
    let ts = rustix::time::Timespec {
        tv_sec: STANDBY_LOOK.as_secs() as i64,
        tv_nsec: STANDBY_LOOK.subsec_nanos() as _,
    };
    loop {
        if term.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(false);
        }
        let mut fds = [PollFd::new(&stdin, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e).context("waiting on the hand-off channel"),
        }
        // A message waits, or the channel is closed: a peek tells which (it leaves the
        // message and its descriptors queued for the receive).
        let mut byte = [0u8; 1];
        let got = rustix::net::recv(
            &stdin,
            &mut byte,
            rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
        );
        return match got {
            Ok((0, _)) => Ok(false),
            Ok(_) => Ok(true),
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => continue,
            Err(e) => Err(e).context("waiting on the hand-off channel"),
        };
    }
}
