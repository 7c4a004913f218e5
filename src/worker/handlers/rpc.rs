//! The stand-in agent's side of the OpenClaw gateway protocol: one `req` frame's method and
//! params, answered with the payload of its `res` (or the error object), with the events of a
//! run sent ahead through [`Emit`].

use moltbot_ipc::ArchivedRequest;
use serde_json::json;

use super::{Fail, HandlerReply, Handlers, Outcome};
use crate::worker::lane::Emit;

impl Handlers {
    /// `rpc`: the method is the request's path, its params the body (JSON, `null` if absent).
    pub(super) fn rpc(&mut self, req: &ArchivedRequest<'_>, _emit: &mut dyn Emit) -> Outcome {
        match &*req.path {
            "health" => Ok(HandlerReply::json(&json!({
                "ok": true,
                "workerId": self.worker_id,
                "pid": self.pid,
                "uptimeMs": u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            }))),
            other => Err(Fail::bad(
                "INVALID_REQUEST",
                format!(
                    "unknown method: {}",
                    other.chars().take(64).collect::<String>()
                ),
            )),
        }
    }
}
