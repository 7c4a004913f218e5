//! One request of a WebSocket connection, from its `req` frame to its final `res`: sent to
//! the user's worker, its interim answer and events streamed back as they arrive.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use crate::error::RouteError;
use crate::gateway::notify::Notify;
use crate::gateway::reactor::Reactor;
use crate::gateway::ws::frames::{self, ErrorShape};
use crate::gateway::ws::hub::{Outbox, Outgoing};
use crate::gateway::ws::presence::Presence;
use crate::pool::call::{Call, Kind, Method};
use crate::pool::reply::{Delivery, Reply};
use moltbot_ipc::Part;

/// A request on its way to the worker and back.
pub(super) struct Run {
    pub(super) reactor: Rc<Reactor>,
    /// The connection's user: the request goes to this user's worker, its events to this
    /// user's connections.
    pub(super) user: String,
    /// The connection that sent it (its answers go there only).
    pub(super) outbox: Arc<Outbox>,
    pub(super) wake: Rc<Notify>,
    pub(super) in_flight: Rc<Cell<usize>>,
    /// The connection's presence at the user's slot (marked when the request is routed).
    pub(super) presence: Rc<Presence>,
    /// The client's request id, untouched.
    pub(super) id: String,
    pub(super) method: String,
    /// The params as sent (`null` when absent).
    pub(super) params: String,
}

impl Run {
    pub(super) async fn run(self) {
        // The worker's answers and events come back while the core spins (see `Spin`): an
        // event emitted soon after the request, or after the previous event, is taken without
        // waking the core.
        let streaming = self.reactor.spin.stream();
        self.serve().await;
        drop(streaming);
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        self.wake.notify();
    }

    fn answer(&self, frame: String) {
        self.outbox.push(Outgoing::Frame(frame));
        self.wake.notify();
    }

    async fn serve(&self) {
        let call = Call {
            kind: Kind::Rpc,
            method: Method::Post,
            user: &self.user,
            target: &self.method,
            call_id: &self.id,
            stream: true,
            body: self.params.as_bytes(),
            held: None,
        };
        let mut replies = match self.reactor.dispatch(&call).await {
            Ok((slot, replies)) => {
                self.presence.at(slot);
                replies
            }
            Err((_, e)) => return self.answer(frames::error_frame(&self.id, &route_error(&e))),
        };
        loop {
            match replies.next().await {
                Delivery::Part(p) => self.part(&p),
                Delivery::Final(Ok(reply)) => {
                    let frame = if reply.is_success() {
                        frames::ok_frame(&self.id, body_text(&reply))
                    } else {
                        let e = frames::worker_error(&reply.error_code, reply.status, reply.body());
                        frames::error_frame(&self.id, &e)
                    };
                    return self.answer(frame);
                }
                Delivery::Final(Err(e)) => {
                    return self.answer(frames::error_frame(&self.id, &route_error(&e)));
                }
            }
        }
    }

    /// An interim part: the `accepted` answer goes to this connection, an event to every
    /// connection of the user.
    fn part(&self, p: &Reply) {
        match p.part {
            Part::Accepted => self.answer(frames::ok_frame(&self.id, body_text(p))),
            Part::Event => {
                let r = &self.reactor;
                let local = r
                    .shared
                    .hub
                    .publish(&self.user, &p.event, body_text(p), r.id);
                r.wake_ws(&local);
            }
            Part::Final => {}
        }
    }
}

/// A reply body as JSON text. The lane let only JSON through for RPC requests; anything else
/// would be a bug there, and becomes `null` rather than a broken frame.
fn body_text(r: &Reply) -> &str {
    std::str::from_utf8(r.body())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or("null")
}

/// The protocol's error for a request the gateway could not get answered.
pub(crate) fn route_error(e: &RouteError) -> ErrorShape {
    let code = match e {
        RouteError::InvalidUser(_)
        | RouteError::InvalidRequest(_)
        | RouteError::TooLarge { .. } => "INVALID_REQUEST",
        _ => "UNAVAILABLE",
    };
    let mut shape = ErrorShape::new(code, e.to_string(), Some(e.code()));
    shape.retryable = Some(e.retryable());
    shape.retry_after_ms = e
        .retry_after()
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    shape
}
