//! Sandbox enforcement a worker applies to itself right after it starts, before it runs any
//! handler: parent-death signal, rlimits and a Landlock ruleset.
//!
//! Order in the worker: [`set_parent_death_signal`] first (so a gateway that dies during start-up
//! takes the worker with it), then [`apply_rlimits`], then map the worker's own shared-memory
//! segment and open whatever else lives outside the sandbox, then [`apply_landlock`] while the
//! process still has a single thread: Landlock restricts the calling thread and the threads and
//! processes it creates afterwards, never threads that already exist.

use std::io;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, LandlockStatus as KernelLandlock, PathBeneath, PathFd,
    RestrictSelf, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope,
};
use rustix::process::{Resource, Rlimit, Signal};
use serde::Serialize;

/// The newest Landlock ABI whose rights this module handles and is tested against. ABI 7 and 8
/// add no filesystem right; ABI 9's `ResolveUnix` would also cut pathname UNIX sockets such as
/// nscd's or systemd-resolved's, which needs its own rules and tests before it is handled.
const TARGET_ABI: ABI = ABI::V6;

/// Read-only system paths a worker needs to run programs, resolve names and verify TLS.
///
/// Not all of `/etc`: workers run as the gateway's user, often root, and `/etc` also holds
/// `shadow`, TLS and SSH private keys and possibly the gateway's own config file with its
/// token (whose path `MOLTBOT_CONFIG` gives away). Only what the loader, libc's name service,
/// time zones and certificate stores read is listed. Entries that are symlinks (often
/// `/etc/resolv.conf`, to `/run/systemd/resolve/`) are opened through the link, so the rule
/// lands on the target only.
const SYSTEM_READ_ONLY: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/sbin",
    // Dynamic loader.
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    // Name service: hosts, users and groups (not their shadow files), services.
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/networks",
    "/etc/passwd",
    "/etc/group",
    "/etc/hostname",
    // Time zone and locale.
    "/etc/localtime",
    "/etc/timezone",
    "/etc/locale.alias",
    // TLS trust stores (certificates, not private keys).
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/pki/ca-trust",
    "/etc/pki/tls/certs",
    "/etc/pki/tls/openssl.cnf",
    "/etc/crypto-policies",
    "/etc/mime.types",
];

/// Device files a worker may read (random numbers, zeros).
const READABLE_DEVICES: &[&str] = &["/dev/zero", "/dev/urandom", "/dev/random"];

/// Smallest `RLIMIT_NOFILE` accepted: stdio, the shared-memory segment, the wake-up descriptors
/// and a few session files.
pub const MIN_NOFILE: u64 = 16;

/// What a worker confines itself to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolationPolicy {
    /// The worker's own sandbox directory: the only place it may write.
    pub sandbox_root: PathBuf,
    /// Apply Landlock at all (config key `landlock`).
    pub landlock: bool,
    /// `RLIMIT_NOFILE`, soft and hard.
    pub nofile: u64,
    /// `RLIMIT_AS` in bytes, soft and hard; `None` leaves it alone.
    pub address_space: Option<u64>,
    /// Further hierarchies the worker may read (and execute), e.g. a tool directory.
    pub extra_read_only: Vec<PathBuf>,
    /// Further hierarchies the worker may read and write: the one directory outside the
    /// sandbox that an OpenClaw cell writes to (its lock files, see `crate::cell::process`).
    pub extra_read_write: Vec<PathBuf>,
}

/// How much of the Landlock ruleset the kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Enforcement {
    /// Every handled right and scope is enforced.
    FullyEnforced,
    /// The kernel enforces an older ABI: some rights or the scopes are missing.
    PartiallyEnforced,
    /// The kernel has no (enabled) Landlock: nothing is enforced.
    NotEnforced,
    /// Landlock is switched off by configuration.
    Disabled,
}

/// Landlock state of a worker (or, from [`probe_landlock`], of this kernel), for `/status` and
/// the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LandlockStatus {
    /// How much is enforced.
    pub enforced: Enforcement,
    /// The kernel's Landlock ABI version; `None` without Landlock (or when not asked).
    pub abi: Option<u32>,
    /// Signals and abstract UNIX sockets are scoped to the worker (ABI 6).
    pub scoped: bool,
}

impl LandlockStatus {
    /// The status of a worker whose Landlock is switched off by configuration.
    pub const DISABLED: LandlockStatus = LandlockStatus {
        enforced: Enforcement::Disabled,
        abi: None,
        scoped: false,
    };
}

/// Why a worker could not isolate itself; the worker exits on any of these.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    /// `prctl(PR_SET_PDEATHSIG)` failed.
    #[error("cannot set the parent-death signal: {0}")]
    ParentDeathSignal(#[source] io::Error),
    /// The parent died (or is not the gateway) before the parent-death signal was armed.
    #[error(
        "parent process is gone: expected parent pid {expected}, getppid() says {}",
        actual.map_or_else(|| "none".to_owned(), |p| p.to_string())
    )]
    ParentGone {
        /// The pid of the gateway that spawned this worker.
        expected: u32,
        /// The current parent pid, if any.
        actual: Option<u32>,
    },
    /// The policy asks for something that cannot work.
    #[error("invalid isolation policy: {0}")]
    InvalidPolicy(String),
    /// `setrlimit` failed.
    #[error("cannot set {resource}: {source}")]
    Rlimit {
        /// The limit, e.g. `RLIMIT_NOFILE`.
        resource: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The sandbox root cannot be opened.
    #[error("cannot open the sandbox root {}: {source}", path.display())]
    SandboxRoot {
        /// The sandbox root.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The sandbox root is not a directory.
    #[error("the sandbox root {} is not a directory", .0.display())]
    SandboxRootNotDir(PathBuf),
    /// Building or applying the Landlock ruleset failed.
    /// Dropping the capabilities failed, or some were left.
    #[error("cannot drop capabilities: {0}")]
    Capabilities(std::io::Error),
    #[error("cannot apply the Landlock ruleset: {0}")]
    Landlock(#[from] landlock::RulesetError),
}

/// Arms `PR_SET_PDEATHSIG = SIGKILL` so this worker dies with the gateway, then checks that the
/// parent is still `expected_parent`: if the gateway died between spawning us and the `prctl`,
/// no signal will ever come and the caller must exit.
///
/// The signal fires when the parent *thread* that spawned us exits, so the gateway spawns
/// workers from a thread that lives as long as it does.
pub fn set_parent_death_signal(expected_parent: u32) -> Result<(), IsolationError> {
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
        .map_err(|e| IsolationError::ParentDeathSignal(e.into()))?;
    let actual =
        rustix::process::getppid().and_then(|p| u32::try_from(p.as_raw_nonzero().get()).ok());
    if actual == Some(expected_parent) {
        Ok(())
    } else {
        Err(IsolationError::ParentGone {
            expected: expected_parent,
            actual,
        })
    }
}

/// Sets `RLIMIT_CORE` = 0 (a core dump could hold other users' data and fill the disk),
/// `RLIMIT_NOFILE` = `nofile` and `RLIMIT_AS` = `address_space` if set, soft and hard alike.
/// Values above the current hard limit are clamped to it: a worker cannot raise a hard limit and
/// does not need to.
pub fn apply_rlimits(p: &IsolationPolicy) -> Result<(), IsolationError> {
    if p.nofile < MIN_NOFILE {
        return Err(IsolationError::InvalidPolicy(format!(
            "nofile {} is below the minimum {MIN_NOFILE}",
            p.nofile
        )));
    }
    if p.address_space == Some(0) {
        return Err(IsolationError::InvalidPolicy(
            "address_space 0 would stop every allocation (use None for no limit)".to_owned(),
        ));
    }
    set_limit(Resource::Core, "RLIMIT_CORE", 0)?;
    set_limit(Resource::Nofile, "RLIMIT_NOFILE", p.nofile)?;
    if let Some(bytes) = p.address_space {
        set_limit(Resource::As, "RLIMIT_AS", bytes)?;
    }
    Ok(())
}

/// Sets both limits of `resource` to `want`, clamped to the current hard limit.
fn set_limit(resource: Resource, name: &'static str, want: u64) -> Result<(), IsolationError> {
    let hard = rustix::process::getrlimit(resource).maximum;
    let value = hard.map_or(want, |h| want.min(h));
    rustix::process::setrlimit(
        resource,
        Rlimit {
            current: Some(value),
            maximum: Some(value),
        },
    )
    .map_err(|e| IsolationError::Rlimit {
        resource: name,
        source: e.into(),
    })
}

/// Drops every capability of the calling thread, for good: the bounding set (so that a
/// program it runs as root does not regain them at exec), the ambient, effective, permitted
/// and inheritable sets. Threads and processes created later inherit the loss.
///
/// Why: Landlock lets a task with `CAP_SYS_PTRACE` (any root process) read the
/// ptrace-guarded `/proc` entries (`environ`, `mem`) of processes outside its domain. Without
/// the capability those stay closed, which is what makes granting `/proc` (the cell mode)
/// safe for a worker running as root.
pub fn drop_capabilities() -> Result<(), IsolationError> {
    use rustix::thread::{self as t, CapabilitySet, CapabilitySets};
    for bit in CapabilitySet::all().iter() {
        // Removing needs CAP_SETPCAP: a process without it has nothing to drop anyway (the
        // check below says if something is left). Unknown capabilities give EINVAL.
        if t::capability_is_in_bounding_set(bit).unwrap_or(false) {
            let _ = t::remove_capability_from_bounding_set(bit);
        }
    }
    let _ = t::clear_ambient_capability_set();
    let none = CapabilitySets {
        effective: CapabilitySet::empty(),
        permitted: CapabilitySet::empty(),
        inheritable: CapabilitySet::empty(),
    };
    t::set_capabilities(None, none).map_err(|e| IsolationError::Capabilities(e.into()))?;
    let left = t::capabilities(None).map_err(|e| IsolationError::Capabilities(e.into()))?;
    if left != none {
        return Err(IsolationError::Capabilities(std::io::Error::other(
            format!("left after the drop: {left:?}"),
        )));
    }
    Ok(())
}

/// Confines the calling thread (and every thread and process it creates later) to the sandbox:
/// full access beneath `sandbox_root`; read and execute beneath the system paths, `/proc/<own
/// pid>` and `extra_read_only`; read on `/dev/{zero,urandom,random}`, read and write on
/// `/dev/null`; nothing else on the filesystem (not `/dev/shm`, not `/tmp`, not other workers'
/// sandboxes, not the routing table, not other processes' `/proc` entries). The network stays
/// open. Where the kernel has ABI 6, signals and abstract UNIX sockets are scoped too, so a worker
/// cannot signal the gateway or another worker.
///
/// Missing read-only paths are skipped. A kernel without Landlock gives
/// [`Enforcement::NotEnforced`] (not an error: the caller logs a warning); `landlock: false`
/// gives [`Enforcement::Disabled`] without touching anything. Call it while the process has a
/// single thread: threads that already exist stay unrestricted.
pub fn apply_landlock(p: &IsolationPolicy) -> Result<LandlockStatus, IsolationError> {
    if !p.landlock {
        return Ok(LandlockStatus::DISABLED);
    }
    let root = PathFd::new(&p.sandbox_root).map_err(|e| IsolationError::SandboxRoot {
        path: p.sandbox_root.clone(),
        source: path_fd_io_error(e),
    })?;
    if !is_dir(&root).map_err(|source| IsolationError::SandboxRoot {
        path: p.sandbox_root.clone(),
        source,
    })? {
        return Err(IsolationError::SandboxRootNotDir(p.sandbox_root.clone()));
    }

    let read_only = AccessFs::from_read(TARGET_ABI);
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(TARGET_ABI))?
        .scope(Scope::from_all(TARGET_ABI))?
        .create()?
        .add_rule(PathBeneath::new(root, AccessFs::from_all(TARGET_ABI)))?;

    let own_proc = PathBuf::from(format!("/proc/{}", std::process::id()));
    let read_only_paths = SYSTEM_READ_ONLY
        .iter()
        .map(PathBuf::from)
        .chain(std::iter::once(own_proc))
        .chain(p.extra_read_only.iter().cloned());
    for path in read_only_paths {
        ruleset = add_optional_rule(ruleset, &path, read_only)?;
    }
    for path in &p.extra_read_write {
        ruleset = add_optional_rule(ruleset, path, AccessFs::from_all(TARGET_ABI))?;
    }
    for dev in READABLE_DEVICES {
        ruleset = add_optional_rule(ruleset, Path::new(dev), AccessFs::ReadFile.into())?;
    }
    ruleset = add_optional_rule(
        ruleset,
        Path::new("/dev/null"),
        AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate,
    )?;

    let status = ruleset.restrict_self()?;
    let enforced = match status.ruleset {
        RulesetStatus::FullyEnforced => Enforcement::FullyEnforced,
        RulesetStatus::PartiallyEnforced => Enforcement::PartiallyEnforced,
        RulesetStatus::NotEnforced => Enforcement::NotEnforced,
    };
    let (abi, effective) = kernel_abi(status.landlock);
    Ok(LandlockStatus {
        enforced,
        abi,
        scoped: enforced != Enforcement::NotEnforced && effective >= ABI::V6,
    })
}

/// What [`apply_landlock`] would achieve on this kernel, without restricting anything (for the
/// gateway's `/status` and start-up log): the kernel's ABI, whether it covers every right this
/// module handles, and whether it scopes signals and abstract sockets.
pub fn probe_landlock() -> LandlockStatus {
    // No flags and no no_new_privs: `apply` only queries the ABI version and returns.
    let kernel = match RestrictSelf::default().no_new_privs(false).apply() {
        Ok(s) => s.landlock,
        Err(_) => KernelLandlock::NotImplemented,
    };
    let (abi, effective) = kernel_abi(kernel);
    let enforced = if effective == ABI::Unsupported {
        Enforcement::NotEnforced
    } else if effective >= TARGET_ABI {
        Enforcement::FullyEnforced
    } else {
        Enforcement::PartiallyEnforced
    };
    LandlockStatus {
        enforced,
        abi,
        scoped: effective >= ABI::V6,
    }
}

/// The kernel's ABI number (as the kernel reports it, even when newer than this crate knows)
/// and the ABI the crate uses.
fn kernel_abi(s: KernelLandlock) -> (Option<u32>, ABI) {
    match s {
        KernelLandlock::Available {
            effective_abi,
            kernel_abi,
        } => {
            let n = kernel_abi
                .and_then(|k| u32::try_from(k).ok())
                .unwrap_or(effective_abi as u32);
            (Some(n), effective_abi)
        }
        KernelLandlock::NotEnabled | KernelLandlock::NotImplemented => (None, ABI::Unsupported),
    }
}

/// Adds a rule granting `access` beneath `path` if it exists; rights that only make sense on
/// directories are dropped for files (the kernel would reject them, and the crate would report
/// the ruleset as only partially enforced).
fn add_optional_rule(
    ruleset: RulesetCreated,
    path: &Path,
    access: BitFlags<AccessFs>,
) -> Result<RulesetCreated, IsolationError> {
    // Skipping a read-only path only takes access away, so any failure to open it is safe.
    let Ok(fd) = PathFd::new(path) else {
        return Ok(ruleset);
    };
    let Ok(dir) = is_dir(&fd) else {
        return Ok(ruleset);
    };
    let access = if dir {
        access
    } else {
        access & (AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Execute | AccessFs::Truncate)
    };
    if access.is_empty() {
        return Ok(ruleset);
    }
    Ok(ruleset.add_rule(PathBeneath::new(fd, access))?)
}

fn is_dir(fd: &PathFd) -> io::Result<bool> {
    let st = rustix::fs::fstat(fd)?;
    Ok(rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir())
}

fn path_fd_io_error(e: landlock::PathFdError) -> io::Error {
    match e {
        landlock::PathFdError::OpenCall { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::{ErrorKind, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
    use std::process::Command;

    /// Set in a re-executed test binary: tells the ignored child tests to run.
    const CHILD_ENV: &str = "MOLTBOT_ISOLATION_TEST_CHILD";
    /// Printed by a child test that ran to completion, so an empty test filter cannot pass.
    const CHILD_DONE: &str = "ISOLATION-CHILD-DONE";

    /// Runs `body` in a fresh thread (Landlock is per thread) and re-raises its panic.
    fn in_thread<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
        match std::thread::spawn(body).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Returns false (and says so on stderr) when this kernel has no Landlock.
    fn landlock_supported() -> bool {
        let probe = probe_landlock();
        if probe.enforced == Enforcement::NotEnforced {
            assert_eq!(probe.abi, None, "{probe:?}");
            eprintln!("landlock unsupported by this kernel: skipped");
            return false;
        }
        assert!(probe.abi >= Some(1), "{probe:?}");
        true
    }

    /// `base/worker-0` (our sandbox), `base/worker-1` with a file, `base/routing-table.jsonl`.
    struct Fixture {
        _base: tempfile::TempDir,
        base: PathBuf,
        w0: PathBuf,
        w1: PathBuf,
    }

    impl Fixture {
        fn new() -> Fixture {
            let tmp = tempfile::tempdir().unwrap();
            let base = tmp.path().to_path_buf();
            let w0 = base.join("worker-0");
            let w1 = base.join("worker-1");
            fs::create_dir_all(w0.join("sessions")).unwrap();
            fs::create_dir_all(w0.join("state")).unwrap();
            fs::create_dir_all(&w1).unwrap();
            fs::write(w1.join("secret.jsonl"), b"other user's data").unwrap();
            fs::write(base.join("routing-table.jsonl"), b"{\"user\":\"a\"}").unwrap();
            Fixture {
                _base: tmp,
                base,
                w0,
                w1,
            }
        }

        fn policy(&self) -> IsolationPolicy {
            IsolationPolicy {
                sandbox_root: self.w0.clone(),
                landlock: true,
                nofile: 1024,
                address_space: None,
                extra_read_only: Vec::new(),
                extra_read_write: Vec::new(),
            }
        }
    }

    fn assert_denied<T: std::fmt::Debug>(what: &str, r: io::Result<T>) {
        match r {
            Err(e) => assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{what}: {e}"),
            Ok(v) => panic!("{what}: allowed ({v:?})"),
        }
    }

    fn read_dir_first(p: &Path) -> io::Result<()> {
        fs::read_dir(p)?.next().transpose().map(|_| ())
    }

    fn parent_pid() -> u32 {
        rustix::process::getppid()
            .map(|p| p.as_raw_nonzero().get() as u32)
            .unwrap_or(1)
    }

    #[test]
    fn probe_agrees_with_what_the_kernel_enforces() {
        // Independent evidence: restrict a throwaway thread and see whether a read outside the
        // sandbox is really refused.
        let f = Fixture::new();
        let policy = f.policy();
        let outside = f.w1.join("secret.jsonl");
        let (applied, denied) = in_thread(move || {
            let applied = apply_landlock(&policy).unwrap();
            (applied, fs::read(&outside).is_err())
        });
        let probe = probe_landlock();
        eprintln!("landlock probe: {probe:?}, applied: {applied:?}");
        assert_eq!(probe.abi, applied.abi);
        assert_eq!(probe.scoped, applied.scoped);
        assert_eq!(probe.enforced, applied.enforced);
        if denied {
            assert!(probe.abi >= Some(1), "{probe:?}");
            assert_ne!(probe.enforced, Enforcement::NotEnforced);
        } else {
            assert_eq!(probe.enforced, Enforcement::NotEnforced);
            assert_eq!(probe.abi, None);
        }
    }

    #[test]
    fn this_machine_has_landlock_when_its_kernel_is_recent() {
        // Landlock ABI 1 arrived in Linux 5.13; when the LSM list is readable it is decisive.
        let lsm = fs::read_to_string("/sys/kernel/security/lsm").ok();
        let listed = lsm
            .as_deref()
            .map(|s| s.split(',').any(|m| m.trim() == "landlock"));
        let probe = probe_landlock();
        match listed {
            Some(true) => assert!(probe.abi >= Some(1), "{probe:?}"),
            Some(false) => assert_eq!(probe.abi, None, "{probe:?}"),
            None => {
                let release = rustix::system::uname()
                    .release()
                    .to_string_lossy()
                    .into_owned();
                let mut nums = release
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u32>().ok());
                let version = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
                eprintln!("kernel {release}, landlock probe {probe:?}");
                if version >= (6, 12) && std::env::var_os("MOLTBOT_NO_LANDLOCK").is_none() {
                    // Every recent distribution kernel enables Landlock; set MOLTBOT_NO_LANDLOCK
                    // to run on one that does not.
                    assert!(probe.abi >= Some(1), "{probe:?}");
                }
            }
        }
    }

    #[test]
    fn restricted_thread_reaches_only_its_own_sandbox() {
        if !landlock_supported() {
            return;
        }
        let f = Fixture::new();
        let policy = f.policy();
        let (w0, w1, base) = (f.w0.clone(), f.w1.clone(), f.base.clone());
        let ppid = parent_pid();
        let ppid_status = PathBuf::from(format!("/proc/{ppid}/status"));
        // Readable before the restriction, so the denials below are Landlock's doing.
        assert!(fs::read(&ppid_status).is_ok());
        assert!(fs::read(w1.join("secret.jsonl")).is_ok());
        let shm = tempfile::Builder::new()
            .prefix("moltbot-isolation-test-")
            .tempfile_in("/dev/shm")
            .ok();
        let shm_path = shm.as_ref().map(|t| t.path().to_path_buf());

        let status = in_thread(move || {
            let status = apply_landlock(&policy).unwrap();

            // Inside the sandbox: everything.
            let a = w0.join("sessions/alice.jsonl");
            fs::write(&a, b"turn 1\n").unwrap();
            fs::OpenOptions::new()
                .append(true)
                .open(&a)
                .unwrap()
                .write_all(b"turn 2\n")
                .unwrap();
            assert_eq!(fs::read(&a).unwrap(), b"turn 1\nturn 2\n");
            let names: Vec<_> = fs::read_dir(w0.join("sessions"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, vec![std::ffi::OsString::from("alice.jsonl")]);
            let b = w0.join("sessions/bob.jsonl");
            fs::rename(&a, &b).unwrap();
            let c = w0.join("state/bob.json");
            fs::rename(&b, &c).unwrap();
            fs::create_dir(w0.join("temp")).unwrap();
            fs::remove_file(&c).unwrap();
            fs::remove_dir(w0.join("temp")).unwrap();

            // Other workers, the gateway's files, the routing table: nothing.
            assert_denied("read worker-1 file", fs::read(w1.join("secret.jsonl")));
            assert_denied("list worker-1", read_dir_first(&w1));
            assert_denied("create in worker-1", fs::File::create(w1.join("x")));
            assert_denied(
                "read routing table",
                fs::read(base.join("routing-table.jsonl")),
            );
            assert_denied("list base", read_dir_first(&base));
            assert_denied("create in base", fs::File::create(base.join("x")));
            fs::write(w0.join("m"), b"m").unwrap();
            assert!(fs::rename(w0.join("m"), w1.join("m")).is_err());
            assert_denied("list /tmp", read_dir_first(Path::new("/tmp")));
            if Path::new("/dev/shm").is_dir() {
                assert_denied("list /dev/shm", read_dir_first(Path::new("/dev/shm")));
            }
            if let Some(p) = &shm_path {
                assert_denied("read another segment", fs::read(p));
            }
            assert_denied("read /proc/1/environ", fs::read("/proc/1/environ"));
            assert_denied("read parent's /proc status", fs::read(&ppid_status));

            // System paths: read-only.
            assert!(fs::read("/etc/passwd").is_ok());
            if Path::new("/etc/hostname").exists() {
                assert!(fs::read("/etc/hostname").is_ok());
            }
            // But not the secrets in /etc (readable to a root worker without Landlock).
            for secret in ["/etc/shadow", "/etc/gshadow"] {
                if Path::new(secret).exists() {
                    assert_denied(secret, fs::read(secret));
                }
            }
            if Path::new("/etc/ssl/private").is_dir() {
                assert_denied(
                    "list /etc/ssl/private",
                    read_dir_first(Path::new("/etc/ssl/private")),
                );
            }
            assert_denied("list /etc", read_dir_first(Path::new("/etc")));
            read_dir_first(Path::new("/usr/lib")).unwrap();
            assert_denied("create in /etc", fs::File::create("/etc/moltbot-escape"));
            assert!(
                fs::read_to_string("/proc/self/statm")
                    .unwrap()
                    .contains(' ')
            );
            let mut zero = [1u8; 8];
            fs::File::open("/dev/urandom")
                .unwrap()
                .read_exact(&mut zero)
                .unwrap();
            fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .unwrap()
                .write_all(b"x")
                .unwrap();

            // Programs still run, and the processes they become are confined too.
            assert!(Command::new("true").status().unwrap().success());
            let out = Command::new("cat")
                .arg(w1.join("secret.jsonl"))
                .output()
                .unwrap();
            assert!(!out.status.success());
            assert!(out.stdout.is_empty());
            status
        });
        drop(shm);

        // The harness thread is still unrestricted.
        assert!(fs::read(f.w1.join("secret.jsonl")).is_ok());
        assert!(status.abi >= Some(1), "{status:?}");
        assert_ne!(status.enforced, Enforcement::NotEnforced);
        if status.abi >= Some(TARGET_ABI as u32) {
            assert_eq!(status.enforced, Enforcement::FullyEnforced, "{status:?}");
        }
    }

    #[test]
    fn scoping_blocks_signals_and_abstract_sockets_outside_the_sandbox() {
        if !landlock_supported() {
            return;
        }
        if !probe_landlock().scoped {
            eprintln!("landlock ABI < 6, no scoping: skipped");
            return;
        }
        let f = Fixture::new();
        let policy = f.policy();
        let name = format!("moltbot-isolation-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixListener::bind_addr(&addr).unwrap();
        let ppid = rustix::process::getppid().unwrap();
        // Allowed before the restriction.
        rustix::process::test_kill_process(ppid).unwrap();
        UnixStream::connect_addr(&addr).unwrap();

        let status = in_thread(move || {
            let status = apply_landlock(&policy).unwrap();
            let kill = rustix::process::test_kill_process(ppid);
            assert_eq!(kill, Err(rustix::io::Errno::PERM));
            assert_denied("connect abstract socket", UnixStream::connect_addr(&addr));
            status
        });
        drop(listener);
        assert!(status.scoped, "{status:?}");
    }

    #[test]
    fn network_stays_open() {
        if !landlock_supported() {
            return;
        }
        let f = Fixture::new();
        let policy = f.policy();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        in_thread(move || {
            apply_landlock(&policy).unwrap();
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"hi").unwrap();
        });
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn extra_read_only_paths_are_readable_not_writable_and_missing_ones_skipped() {
        if !landlock_supported() {
            return;
        }
        let f = Fixture::new();
        let tools = f.base.join("tools");
        fs::create_dir(&tools).unwrap();
        fs::write(tools.join("tool.txt"), b"tool").unwrap();
        let mut policy = f.policy();
        policy.extra_read_only = vec![tools.clone(), f.base.join("does-not-exist")];
        in_thread(move || {
            apply_landlock(&policy).unwrap();
            assert_eq!(fs::read(tools.join("tool.txt")).unwrap(), b"tool");
            read_dir_first(&tools).unwrap();
            assert_denied("write read-only", fs::File::create(tools.join("new")));
            assert_denied(
                "overwrite read-only",
                fs::OpenOptions::new()
                    .write(true)
                    .open(tools.join("tool.txt")),
            );
        });
    }

    #[test]
    fn extra_read_write_paths_are_writable_and_their_siblings_not() {
        if !landlock_supported() {
            return;
        }
        let f = Fixture::new();
        let locks = f.base.join("locks");
        let beside = f.base.join("beside");
        fs::create_dir(&locks).unwrap();
        fs::create_dir(&beside).unwrap();
        let mut policy = f.policy();
        policy.extra_read_write = vec![locks.clone()];
        in_thread(move || {
            apply_landlock(&policy).unwrap();
            fs::write(locks.join("a.lock"), b"").unwrap();
            fs::remove_file(locks.join("a.lock")).unwrap();
            assert_denied("write beside", fs::File::create(beside.join("a.lock")));
        });
    }

    /// The cell mode grants all of /proc and drops the capabilities (see
    /// `crate::worker::runtime`): what holds secrets there must still be closed to the domain,
    /// for processes outside it, also when the tests run as root.
    #[test]
    fn a_readable_proc_still_hides_the_environment_of_processes_outside_the_domain() {
        if !landlock_supported() {
            return;
        }
        let f = Fixture::new();
        let mut outside = std::process::Command::new("sleep")
            .arg("30")
            .env("MOLTBOT_TEST_SECRET", "hunter2")
            .spawn()
            .unwrap();
        let pid = outside.id();
        let mut policy = f.policy();
        policy.extra_read_only = vec![PathBuf::from("/proc")];
        let result = in_thread(move || {
            drop_capabilities().unwrap();
            apply_landlock(&policy).unwrap();
            let stat = fs::read_to_string(format!("/proc/{pid}/stat"));
            let environ = fs::read(format!("/proc/{pid}/environ"));
            (stat, environ)
        });
        let _ = outside.kill();
        let _ = outside.wait();
        let (stat, environ) = result;
        assert!(stat.unwrap().contains("(sleep)"), "/proc is readable");
        assert_denied("another process's environ", environ);
    }

    #[test]
    fn disabled_policy_restricts_nothing() {
        let f = Fixture::new();
        let mut policy = f.policy();
        policy.landlock = false;
        let secret = f.w1.join("secret.jsonl");
        let (status, read) = in_thread(move || {
            let status = apply_landlock(&policy).unwrap();
            (status, fs::read(&secret).is_ok())
        });
        assert_eq!(status, LandlockStatus::DISABLED);
        assert!(read);
    }

    #[test]
    fn bad_sandbox_root_is_an_error() {
        let f = Fixture::new();
        let mut missing = f.policy();
        missing.sandbox_root = f.base.join("worker-9");
        let mut file = f.policy();
        file.sandbox_root = f.base.join("routing-table.jsonl");
        let secret = f.w1.join("secret.jsonl");
        in_thread(move || {
            let e = apply_landlock(&missing).unwrap_err();
            assert!(
                matches!(&e, IsolationError::SandboxRoot { source, .. } if source.kind() == ErrorKind::NotFound),
                "{e}"
            );
            assert!(e.to_string().contains("worker-9"), "{e}");
            let e = apply_landlock(&file).unwrap_err();
            assert!(matches!(e, IsolationError::SandboxRootNotDir(_)), "{e}");
            // A failed apply leaves the thread unrestricted.
            assert!(fs::read(&secret).is_ok());
        });
    }

    #[test]
    fn status_serializes_in_camel_case() {
        let s = LandlockStatus {
            enforced: Enforcement::PartiallyEnforced,
            abi: Some(5),
            scoped: false,
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"enforced":"partiallyEnforced","abi":5,"scoped":false}"#
        );
        assert_eq!(
            serde_json::to_value(LandlockStatus::DISABLED).unwrap(),
            serde_json::json!({"enforced": "disabled", "abi": null, "scoped": false})
        );
    }

    #[test]
    fn invalid_rlimit_policies_are_refused_before_any_change() {
        let before = rustix::process::getrlimit(Resource::Core);
        let mut p = Fixture::new().policy();
        p.nofile = MIN_NOFILE - 1;
        assert!(matches!(
            apply_rlimits(&p),
            Err(IsolationError::InvalidPolicy(_))
        ));
        p.nofile = 1024;
        p.address_space = Some(0);
        assert!(matches!(
            apply_rlimits(&p),
            Err(IsolationError::InvalidPolicy(_))
        ));
        assert_eq!(rustix::process::getrlimit(Resource::Core), before);
    }

    /// Re-executes this test binary to run the ignored test `name` with `env` set.
    fn run_child(name: &str, env: &[(&str, String)]) -> String {
        let module = module_path!();
        let module = module.split_once("::").map_or(module, |(_, rest)| rest);
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--ignored",
            "--exact",
            &format!("{module}::{name}"),
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child {name}: {stdout}\n{stderr}");
        assert!(
            stdout.contains(CHILD_DONE),
            "child {name} did not run: {stdout}\n{stderr}"
        );
        stdout
    }

    #[test]
    fn rlimits_apply_in_a_child_process() {
        run_child("rlimit_child", &[]);
    }

    #[test]
    #[ignore = "child side of rlimits_apply_in_a_child_process"]
    fn rlimit_child() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let mut p = IsolationPolicy {
            sandbox_root: PathBuf::from("/nonexistent"),
            landlock: false,
            nofile: 64,
            address_space: Some(1 << 40),
            extra_read_only: Vec::new(),
            extra_read_write: Vec::new(),
        };
        apply_rlimits(&p).unwrap();
        let both = |v| Rlimit {
            current: Some(v),
            maximum: Some(v),
        };
        assert_eq!(rustix::process::getrlimit(Resource::Core), both(0));
        assert_eq!(rustix::process::getrlimit(Resource::Nofile), both(64));
        assert_eq!(rustix::process::getrlimit(Resource::As), both(1 << 40));

        // More than `nofile` descriptors cannot be open.
        let mut files = Vec::new();
        let err = loop {
            match fs::File::open("/dev/null") {
                Ok(f) if files.len() <= 64 => files.push(f),
                Ok(_) => panic!("opened more than 64 files"),
                Err(e) => break e,
            }
        };
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::MFILE.raw_os_error())
        );
        assert!(files.len() < 64);
        drop(files);

        // Asking for more than the (now lowered) hard limit clamps instead of failing.
        p.nofile = 4096;
        p.address_space = Some(1 << 41);
        apply_rlimits(&p).unwrap();
        assert_eq!(rustix::process::getrlimit(Resource::Nofile), both(64));
        assert_eq!(rustix::process::getrlimit(Resource::As), both(1 << 40));
        println!("{CHILD_DONE}");
    }

    #[test]
    fn parent_death_signal_is_armed_only_for_the_real_parent() {
        let me = std::process::id().to_string();
        run_child("pdeathsig_child", &[("MOLTBOT_TEST_PARENT", me)]);
    }

    #[test]
    #[ignore = "child side of parent_death_signal_is_armed_only_for_the_real_parent"]
    fn pdeathsig_child() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let parent: u32 = std::env::var("MOLTBOT_TEST_PARENT")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            rustix::process::parent_process_death_signal().unwrap(),
            None
        );
        set_parent_death_signal(parent).unwrap();
        assert_eq!(
            rustix::process::parent_process_death_signal().unwrap(),
            Some(Signal::KILL)
        );
        match set_parent_death_signal(parent.wrapping_add(1)) {
            Err(IsolationError::ParentGone { expected, actual }) => {
                assert_eq!(expected, parent.wrapping_add(1));
                assert_eq!(actual, Some(parent));
            }
            other => panic!("expected ParentGone, got {other:?}"),
        }
        println!("{CHILD_DONE}");
    }
}
