//! Playing a compromised worker: the test takes the worker's socket descriptors with
//! `pidfd_getfd` (code running in the worker holds the very same ones) and misuses them as such
//! code could.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// Copies of every socket descriptor worker `pid` holds beyond its stdio: its wake sockets,
/// which the gateway passed over its standard input at start (stdin is `/dev/null` after that).
pub fn worker_sockets(pid: u32) -> Vec<OwnedFd> {
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid as i32).expect("pid"),
        rustix::process::PidfdFlags::empty(),
    )
    .expect("pidfd_open");
    let mut sockets = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds") {
        let fd = fd.expect("fd");
        let is_socket =
            std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Some(n) = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if is_socket && n > 2 {
            sockets.push(
                rustix::process::pidfd_getfd(&pidfd, n, rustix::process::PidfdGetfdFlags::empty())
                    .expect("pidfd_getfd"),
            );
        }
    }
    assert!(!sockets.is_empty(), "the worker holds no socket");
    sockets
}

/// Floods every socket worker `pid` holds until `replaced()` is true or `limit` passes;
/// checks `replaced` every 20 ms. Returns the bytes written and whether it was replaced.
pub fn flood_wake_sockets(
    pid: u32,
    limit: Duration,
    mut replaced: impl FnMut() -> bool,
) -> (u64, bool) {
    let sockets = worker_sockets(pid);
    let start = Instant::now();
    let mut check = start;
    let mut written = 0u64;
    let bytes = [1u8; 64];
    while start.elapsed() < limit {
        let mut progress = false;
        for s in &sockets {
            // The descriptions are the worker's: non-blocking, so a full buffer is EAGAIN.
            if let Ok(n) = rustix::io::write(s, &bytes) {
                written += n as u64;
                progress |= n > 0;
            }
        }
        if !progress {
            std::thread::yield_now();
        }
        if check.elapsed() >= Duration::from_millis(20) {
            check = Instant::now();
            if replaced() {
                return (written, true);
            }
        }
    }
    (written, replaced())
}
