//! The worker process: its start and confinement (`runtime`, `isolation`), its end of each lane
//! (`lane`), and what serves the lanes: the built-in handlers (`serve`, `handlers`) or an agent
//! program (`bridge`).

pub mod bridge;
pub mod handlers;
pub mod isolation;
mod lane;
pub mod runtime;
// Not called by the runtime yet: `--cell openclaw` and its config key come in the wiring change.
#[allow(dead_code)]
pub mod relay;
mod serve;
