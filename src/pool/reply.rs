//! What comes back for a request: the worker's answer, validated, or the error that took its
//! place, delivered by the lane's owner to the caller that submitted it.
//!
//! A request has one [`ReplyTo`] (held by its lane until the worker answers, dies, or the pool
//! stops) and one [`Replies`] (held by its caller). The pair carries one final [`Outcome`]; a
//! request that streams adds its events to the same pair, ahead of that final outcome.

use std::ops::Range;
use std::time::{Duration, Instant};

use moltbot_ipc::AlignedBuf;

use crate::error::RouteError;

/// The final outcome of a request.
pub type Outcome = Result<Reply, RouteError>;

/// A worker's answer, validated, in a private copy of its frame.
#[derive(Debug)]
pub struct Reply {
    /// The slot that answered.
    pub slot: usize,
    /// HTTP-style status from the handler (100..=599).
    pub status: u16,
    /// The handler's error code (`""` on success); `[A-Za-z0-9_:.-]`, at most 64 bytes.
    pub error_code: String,
    /// Handler time in microseconds.
    pub duration_us: u64,
    frame: AlignedBuf,
    body: Range<usize>,
}

impl Reply {
    /// A reply whose body is `frame[body]` (checked by the caller to lie inside the frame).
    pub(crate) fn new(
        slot: usize,
        status: u16,
        error_code: String,
        duration_us: u64,
        frame: AlignedBuf,
        body: Range<usize>,
    ) -> Reply {
        let body = if body.end <= frame.len() && body.start <= body.end {
            body
        } else {
            0..0
        };
        Reply {
            slot,
            status,
            error_code,
            duration_us,
            frame,
            body,
        }
    }

    /// The payload.
    pub fn body(&self) -> &[u8] {
        &self.frame.as_slice()[self.body.clone()]
    }

    /// True for 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The lane's end of a request's replies.
#[derive(Debug)]
pub struct ReplyTo(oneshot::Sender<Outcome>);

/// The caller's end of a request's replies.
#[derive(Debug)]
pub struct Replies(oneshot::Receiver<Outcome>);

/// A connected pair.
pub fn reply_pair() -> (ReplyTo, Replies) {
    let (tx, rx) = oneshot::channel();
    (ReplyTo(tx), Replies(rx))
}

impl ReplyTo {
    /// Delivers the final outcome. A caller that is gone (its client left) is no error.
    pub fn finish(self, outcome: Outcome) {
        let _ = self.0.send(outcome);
    }
}

impl Replies {
    /// Waits for the final outcome. The lane's owner answers every request it accepted, by
    /// its deadline at the latest; a lane that went away without answering means the pool
    /// stopped.
    pub async fn outcome(self) -> Outcome {
        self.0.await.unwrap_or(Err(RouteError::ShuttingDown))
    }

    /// Blocks for the final outcome until `deadline`; then `TIMEOUT` (of `timeout`).
    pub fn outcome_by(self, deadline: Instant, timeout: Duration) -> Outcome {
        match self.0.recv_deadline(deadline) {
            Ok(outcome) => outcome,
            Err(oneshot::RecvTimeoutError::Timeout) => Err(RouteError::Timeout(timeout)),
            Err(oneshot::RecvTimeoutError::Disconnected) => Err(RouteError::ShuttingDown),
        }
    }
}
