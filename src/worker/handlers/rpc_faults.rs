//! Fault injection over the OpenClaw protocol, for the tests (only with the `fault-injection`
//! feature): RPC methods `test.*` that crash, stall or stream and then crash, so that the
//! tests can break a worker in the middle of a WebSocket run.
//!
//! - `test.crash`: aborts the process before answering;
//! - `test.slow` `{"ms": N}`: answers `accepted`, sleeps N ms, then answers `{"sleptMs": N}`;
//! - `test.stream-then-crash`: answers `accepted`, sends one `agent` event, then aborts.

use std::time::Duration;

use moltbot_ipc::ArchivedRequest;
use serde::Deserialize;
use serde_json::json;

use super::{Fail, HandlerReply, Outcome};
use crate::worker::lane::Emit;

/// `test.slow`: the longest sleep.
const MAX_SLOW_MS: u64 = 600_000;

/// Runs the fault method of `req` (its path starts with `test.`).
pub(super) fn handle(req: &ArchivedRequest<'_>, emit: &mut dyn Emit) -> Outcome {
    let run_id = format!("test-{}", req.request_id.to_native());
    let accepted = json!({"runId": run_id, "status": "accepted", "acceptedAt": 0}).to_string();
    match &*req.path {
        "test.crash" => std::process::abort(),
        "test.slow" => {
            #[derive(Deserialize)]
            struct Slow {
                ms: u64,
            }
            let s: Slow = serde_json::from_slice(&req.body).map_err(|e| {
                Fail::bad("INVALID_REQUEST", format!("expected {{\"ms\": N}}: {e}"))
            })?;
            if s.ms > MAX_SLOW_MS {
                return Err(Fail::bad(
                    "INVALID_REQUEST",
                    format!("ms must be at most {MAX_SLOW_MS}"),
                ));
            }
            emit.accepted(accepted.as_bytes());
            std::thread::sleep(Duration::from_millis(s.ms));
            Ok(HandlerReply::json(&json!({ "sleptMs": s.ms })))
        }
        "test.stream-then-crash" => {
            emit.accepted(accepted.as_bytes());
            let event = json!({"runId": run_id, "seq": 1, "stream": "lifecycle", "ts": 0,
                "data": {"phase": "start"}});
            emit.event("agent", event.to_string().as_bytes());
            std::process::abort()
        }
        other => Err(Fail::bad(
            "INVALID_REQUEST",
            format!("unknown test method {other:?}"),
        )),
    }
}
