//! Child processes that must not outlive their parent, and that inherit nothing by accident;
//! and finding a process's descendants.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd`'s child start with no descriptor of this process but its stdio and `keep`.
///
/// Rust opens its own descriptors close-on-exec, but a process may hold others it inherited
/// without that flag (from a shell, a supervisor, or the program embedding the pool); without
/// this they would pass to every worker and agent, outside their sandbox. In the child, just
/// before `exec`, every other descriptor is marked close-on-exec (`close_range` with
/// `CLOSE_RANGE_CLOEXEC`), rather than closed, so that std's own error-reporting pipe keeps
/// working until the `exec`.
pub fn inherit_only(cmd: &mut Command, keep: &[RawFd]) {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .filter(|&fd| fd > 2)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    // SAFETY: runs between fork and exec, where only async-signal-safe calls are allowed: it
    // reads `keep` (allocated before the fork) and makes close_range/getrlimit/fcntl system
    // calls only; no allocation, no lock.
    unsafe {
        cmd.pre_exec(move || {
            let mut first = 3u32;
            for &fd in &keep {
                if fd > first {
                    cloexec_range(first, fd - 1)?;
                }
                first = fd + 1;
            }
            cloexec_range(first, u32::MAX)
        });
    }
}

/// Marks every descriptor of this process from 3 up close-on-exec, here in the parent, so that
/// a child started afterwards inherits only its stdio, with no code of ours between fork and
/// exec ([`inherit_only`] runs there). A command without such code is started by std with
/// `posix_spawn`, which shares this process's memory until the exec (vfork) instead of copying
/// its page tables: its threads take no copy-on-write faults afterwards.
///
/// Descriptors this process inherited without the flag (from a shell or a supervisor) are the
/// ones this catches; Rust and this workspace open theirs close-on-exec. One that another
/// thread opens without the flag between this call and the spawn would still pass.
pub fn cloexec_all() -> std::io::Result<()> {
    cloexec_range(3, u32::MAX)
}

/// Marks descriptors `first..=last` close-on-exec (async-signal-safe, and safe beside other
/// threads: it changes flags only).
fn cloexec_range(first: u32, last: u32) -> std::io::Result<()> {
    // SAFETY: close_range only changes descriptor flags; it reads no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            last,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
        return Err(err);
    }
    cloexec_by_fcntl(first, last)
}

/// The same for kernels before 5.11: one fcntl per descriptor number, up to the open-files
/// limit.
fn cloexec_by_fcntl(first: u32, last: u32) -> std::io::Result<()> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20)
        .min(1 << 20);
    let end = u64::from(last)
        .min(limit.saturating_sub(1))
        .min(i32::MAX as u64);
    for fd in u64::from(first)..=end {
        // SAFETY: fcntl on a descriptor number reads no memory of ours. A number that is not
        // open fails with EBADF (ignored); one another thread closes and reuses meanwhile gets
        // close-on-exec, which only keeps it out of children.
        unsafe {
            let flags = libc::fcntl(fd as RawFd, libc::F_GETFD);
            if flags >= 0
                && flags & libc::FD_CLOEXEC == 0
                && libc::fcntl(fd as RawFd, libc::F_SETFD, flags | libc::FD_CLOEXEC) != 0
            {
                let err = std::io::Error::last_os_error();
                // Closed by another thread since the F_GETFD: nothing left to mark.
                if err.raw_os_error() != Some(libc::EBADF) {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

/// Makes the child of `cmd` receive SIGKILL when the thread that spawns it dies, and fail to
/// start if that parent is already gone by the time the child runs (the race between fork and
/// `prctl`).
///
/// Used by a worker for the agent program it runs: if the worker is killed (SIGKILL after a
/// stall, or with the gateway), its agent must not linger as an orphan.
pub fn die_with_parent(cmd: &mut Command) {
    let parent = rustix::process::getpid();
    // SAFETY: runs between fork and exec, where only async-signal-safe calls are allowed: only
    // the prctl(PR_SET_PDEATHSIG) and getppid system calls (rustix: no allocation, no lock); std
    // reports an error through its exec pipe and leaves with _exit.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            if rustix::process::getppid() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(
                    rustix::io::Errno::SRCH.raw_os_error(),
                ));
            }
            Ok(())
        });
    }
}

/// Makes the child of `cmd` start on `cpus` only (its CPU affinity, which its threads and
/// children inherit). The mask is set in the child before `exec`, so no thread of the program
/// ever runs elsewhere. Advisory: a CPU the child may not use (a cpuset of the cgroup) leaves
/// its inherited affinity as it was rather than failing the start. An empty list changes
/// nothing.
pub fn run_on_cpus(cmd: &mut Command, cpus: &[usize]) {
    let Some(set) = cpu_set(cpus) else {
        return;
    };
    // SAFETY: runs between fork and exec, where only async-signal-safe calls are allowed: one
    // sched_setaffinity system call on a mask built before the fork (no allocation, no lock).
    unsafe {
        cmd.pre_exec(move || {
            let _ = rustix::thread::sched_setaffinity(None, &set);
            Ok(())
        });
    }
}

/// The affinity mask of `cpus`, or `None` if the list is empty or names no CPU the mask can
/// hold.
pub fn cpu_set(cpus: &[usize]) -> Option<rustix::thread::CpuSet> {
    let mut set = rustix::thread::CpuSet::new();
    for &c in cpus {
        if c < rustix::thread::CpuSet::MAX_CPU {
            set.set(c);
        }
    }
    (set.count() > 0).then_some(set)
}

/// The most descendants [`descendants`] visits: a process that forks without end must not make
/// its observer read `/proc` without end.
pub const MAX_DESCENDANTS: usize = 1024;

/// The live descendants of `pid` (children, their children, …), at most [`MAX_DESCENDANTS`],
/// from `/proc/PID/task/TID/children`: the kernel's own parent links of every thread, so a
/// child forked by any thread is found, a process cannot claim to be someone's descendant, and
/// one that double-forks away is not counted.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut next = vec![pid];
    while let Some(p) = next.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.filter_map(Result::ok) {
            let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for child in children.split_ascii_whitespace() {
                let Ok(child) = child.parse::<u32>() else {
                    continue;
                };
                if found.len() >= MAX_DESCENDANTS || child == pid || found.contains(&child) {
                    continue;
                }
                found.push(child);
                next.push(child);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    /// What the descriptors of a child process point to (`pipe:[inode]` and alike), the
    /// child started through `restrict`.
    fn child_targets(restrict: impl FnOnce(&mut std::process::Command)) -> Vec<String> {
        let mut cmd = std::process::Command::new("find");
        cmd.args(["/proc/self/fd", "-mindepth", "1", "-printf", "%l\\n"]);
        restrict(&mut cmd);
        let out = cmd.output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn target(fd: &impl AsRawFd) -> String {
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_child_inherits_only_stdio_and_what_it_is_given() {
        // Two pipes without close-on-exec, as a launcher might leave them.
        let (given, _w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::empty()).unwrap();
        let (stray, _w2) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::empty()).unwrap();
        let (given_t, stray_t) = (target(&given), target(&stray));
        // Without the restriction the child sees both (the premise of the test).
        let all = child_targets(|_| {});
        assert!(all.contains(&given_t) && all.contains(&stray_t), "{all:?}");
        // Restricted: only the given one passes.
        let fds = child_targets(|c| super::inherit_only(c, &[given.as_raw_fd()]));
        assert!(fds.contains(&given_t), "{fds:?}");
        assert!(!fds.contains(&stray_t), "{fds:?}");
        let none = child_targets(|c| super::inherit_only(c, &[]));
        assert!(
            !none.contains(&given_t) && !none.contains(&stray_t),
            "{none:?}"
        );
    }

    #[test]
    fn the_fallback_marks_the_range_close_on_exec() {
        let (a, _b) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::empty()).unwrap();
        let flags = |fd| rustix::io::fcntl_getfd(fd).unwrap();
        assert!(!flags(&a).contains(rustix::io::FdFlags::CLOEXEC));
        let n = a.as_raw_fd() as u32;
        super::cloexec_by_fcntl(n, n).unwrap();
        assert!(flags(&a).contains(rustix::io::FdFlags::CLOEXEC));
    }

    /// The CPUs a child started through `restrict` may run on (`Cpus_allowed_list`).
    fn child_cpus(restrict: impl FnOnce(&mut std::process::Command)) -> String {
        let mut cmd = std::process::Command::new("grep");
        cmd.args(["-h", "^Cpus_allowed_list:", "/proc/self/status"]);
        restrict(&mut cmd);
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .trim_start_matches("Cpus_allowed_list:")
            .trim()
            .to_string()
    }

    #[test]
    fn a_child_starts_on_the_cpus_it_is_given() {
        let mine = rustix::thread::sched_getaffinity(None).unwrap();
        let allowed: Vec<usize> = (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| mine.is_set(c))
            .collect();
        let last = *allowed.last().unwrap();
        // Without it the child has this thread's CPUs (the premise).
        let all = child_cpus(|_| {});
        if allowed.len() > 1 {
            assert_ne!(all, last.to_string());
        }
        assert_eq!(
            child_cpus(|c| super::run_on_cpus(c, &[last])),
            last.to_string()
        );
        // An empty list, or CPUs beyond what a mask holds, leave the affinity alone.
        assert_eq!(child_cpus(|c| super::run_on_cpus(c, &[])), all);
        assert!(super::cpu_set(&[usize::MAX]).is_none());
        // This thread's own affinity is untouched.
        assert_eq!(rustix::thread::sched_getaffinity(None).unwrap(), mine);
    }

    #[test]
    fn child_runs_normally() {
        let mut cmd = std::process::Command::new("true");
        super::die_with_parent(&mut cmd);
        assert!(cmd.status().unwrap().success());
    }
}
