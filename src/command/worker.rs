//! `moltbot worker`: the process of one slot.

pub use crate::worker::runtime::WorkerArgs;
use crate::worker::runtime::run as run_worker;

/// Runs the worker; returns the process exit code.
pub fn run(args: WorkerArgs) -> i32 {
    super::init_logging("info");
    match run_worker(args) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("worker failed: {e:#}");
            1
        }
    }
}
