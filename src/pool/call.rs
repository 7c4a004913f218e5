//! A request as the core sees it, from whichever caller (an HTTP connection, a library
//! caller) to its user's worker. Its wire form is [`moltbot_ipc::Request`], written by the lane
//! straight into the ring.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

pub use moltbot_ipc::{Kind, Method};

/// One request to a user's worker.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// What the worker is asked to do.
    pub kind: Kind,
    /// The method it arrived with (meaningful for `session`).
    pub method: Method,
    /// The user; validated by [`crate::pool::dispatch::Dispatch::new`].
    pub user: &'a str,
    /// Kind-specific target: a session name, a fault action, an RPC method; often empty.
    pub target: &'a str,
    /// The caller's own id of the request (an RPC `req` id), passed untouched; often empty.
    pub call_id: &'a str,
    /// The caller takes the answer's interim parts ([`crate::pool::reply::Replies::next`]).
    pub stream: bool,
    /// The payload, opaque to the gateway.
    pub body: &'a [u8],
    /// Where the bytes of the final answer are counted while it lives (the caller's tally of
    /// what it holds: an HTTP connection closes a client that leaves too much unread).
    pub held: Option<&'a Arc<AtomicUsize>>,
}

impl<'a> Call<'a> {
    /// A request of `kind` as `route()` and `/v1/route` send it: the kind's usual method, no
    /// target.
    pub fn of_kind(kind: Kind, user: &'a str, body: &'a [u8]) -> Call<'a> {
        let method = match kind {
            Kind::HealthCheck => Method::Get,
            _ => Method::Post,
        };
        Call {
            kind,
            method,
            user,
            target: "",
            call_id: "",
            stream: false,
            body,
            held: None,
        }
    }
}

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(1);

/// A request id for answers that carry one (`requestId`), unique within this process:
/// `<pid hex>-<sequence>`.
pub fn next_request_id() -> String {
    format!(
        "{:x}-{}",
        std::process::id(),
        REQUEST_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}
