//! The worker process: its start and confinement (`runtime`, `isolation`), its end of each lane
//! (`lane`), and what serves the lanes: the built-in handlers (`serve`, `handlers`) or an agent
//! program (`bridge`) or an OpenClaw cell (`relay`).

pub mod bridge;
pub mod handlers;
pub mod isolation;
mod lane;
pub mod relay;
pub mod runtime;
mod serve;
