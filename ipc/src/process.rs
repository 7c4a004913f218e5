//! Child processes that must not outlive their parent.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes the child of `cmd` receive SIGKILL when the thread that spawns it dies, and fail to
/// start if that parent is already gone by the time the child runs (the race between fork and
/// `prctl`).
///
/// Used by a worker for the agent program it runs: if the worker is killed (SIGKILL after a
/// stall, or with the gateway), its agent must not linger as an orphan.
pub fn die_with_parent(cmd: &mut Command) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe operations are allowed. It only makes the prctl(PR_SET_PDEATHSIG) and
    // getppid system calls (rustix issues them directly: no allocation, no locks) and returns;
    // std reports an error to the parent through its exec pipe and exits the child with _exit.
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

#[cfg(test)]
mod tests {
    #[test]
    fn child_runs_normally() {
        let mut cmd = std::process::Command::new("true");
        super::die_with_parent(&mut cmd);
        assert!(cmd.status().unwrap().success());
    }
}
