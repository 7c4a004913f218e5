//! What comes back for a request: the worker's answer, validated, or the error that took its
//! place, delivered by the lane's owner to the caller that submitted it.
//!
//! A request has one [`ReplyTo`] (held by its lane until the worker answers, dies, or the pool
//! stops) and one [`Replies`] (held by its caller). The pair carries one final [`Outcome`]; a
//! request that streams ([`crate::pool::call::Call::stream`]) also carries its interim parts
//! (the `accepted` answer, events), in the worker's order, ahead of that final outcome.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moltbot_ipc::{AlignedBuf, Part};

use crate::error::RouteError;

/// The final outcome of a request.
pub type Outcome = Result<Reply, RouteError>;

/// Most bytes of interim parts (their frames) a request's caller may leave untaken: beyond,
/// the caller is answered [`RouteError::EventsOverrun`] and the request's later parts are
/// dropped. A caller that does not keep up (a Server-Sent Events client that reads slowly) or
/// a worker that floods one request with events then costs the gateway bounded memory.
pub const MAX_QUEUED_PART_BYTES: usize = 16 << 20;

/// A worker's answer, validated, in a private copy of its frame.
#[derive(Debug)]
pub struct Reply {
    /// The slot that answered.
    pub slot: usize,
    /// HTTP-style status from the handler (200..=599).
    pub status: u16,
    /// The handler's error code (`""` on success); `[A-Za-z0-9_:.-]`, at most 64 bytes.
    pub error_code: String,
    /// Handler time in microseconds.
    pub duration_us: u64,
    /// Which part of the answer this is ([`Part::Final`] for an [`Outcome`]).
    pub part: Part,
    /// The event's name for [`Part::Event`]; `[A-Za-z0-9_:.-]`, 1 to 64 bytes.
    pub event: String,
    frame: AlignedBuf,
    body: Range<usize>,
    /// Where the frame's bytes are counted while this reply lives (see [`Reply::counted_in`]).
    held: Option<Arc<AtomicUsize>>,
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
            part: Part::Final,
            event: String::new(),
            frame,
            body,
            held: None,
        }
    }

    /// This reply as an interim part of its answer.
    pub(crate) fn into_part(mut self, part: Part, event: String) -> Reply {
        self.part = part;
        self.event = event;
        self
    }

    /// Bytes this reply holds (its frame).
    fn held_bytes(&self) -> usize {
        self.frame.len()
    }

    /// This reply, its bytes counted in `held` until it is dropped: the caller's tally of the
    /// answers it holds.
    pub(crate) fn counted_in(mut self, held: Arc<AtomicUsize>) -> Reply {
        held.fetch_add(self.held_bytes(), Ordering::Relaxed);
        self.held = Some(held);
        self
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

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            held.fetch_sub(self.held_bytes(), Ordering::Relaxed);
        }
    }
}

/// The lane's end of a request's replies.
#[derive(Debug)]
pub struct ReplyTo(Sender);

#[derive(Debug)]
enum Sender {
    /// The final outcome only (no allocation beyond the oneshot's).
    Once(oneshot::Sender<Outcome>),
    /// Interim parts, then the final outcome, in order; the bytes of parts not yet taken.
    Stream(flume::Sender<Delivery>, Arc<AtomicUsize>),
}

/// The caller's end of a request's replies.
#[derive(Debug)]
pub struct Replies(Receiver);

#[derive(Debug)]
enum Receiver {
    Once(oneshot::Receiver<Outcome>),
    Stream(flume::Receiver<Delivery>, Arc<AtomicUsize>),
    /// The final outcome was handed out.
    Spent,
}

/// What [`Replies::next`] yields.
#[derive(Debug)]
pub enum Delivery {
    /// An interim part (`accepted`, an event).
    Part(Reply),
    /// The final outcome: nothing follows.
    Final(Outcome),
}

/// A connected pair; `stream`: the pair carries interim parts too.
pub fn reply_pair(stream: bool) -> (ReplyTo, Replies) {
    if stream {
        let (tx, rx) = flume::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        (
            ReplyTo(Sender::Stream(tx, queued.clone())),
            Replies(Receiver::Stream(rx, queued)),
        )
    } else {
        let (tx, rx) = oneshot::channel();
        (ReplyTo(Sender::Once(tx)), Replies(Receiver::Once(rx)))
    }
}

impl ReplyTo {
    /// Delivers an interim part; dropped if the caller did not ask for parts. A caller that
    /// is gone is no error. False (the part dropped) if the caller left more than
    /// [`MAX_QUEUED_PART_BYTES`] of parts untaken: it should then be answered at once.
    #[must_use]
    pub fn part(&self, part: Reply) -> bool {
        if let Sender::Stream(tx, queued) = &self.0 {
            let bytes = part.held_bytes();
            if queued.load(Ordering::Relaxed).saturating_add(bytes) > MAX_QUEUED_PART_BYTES {
                return false;
            }
            queued.fetch_add(bytes, Ordering::Relaxed);
            let _ = tx.send(Delivery::Part(part));
        }
        true
    }

    /// Delivers the final outcome. A caller that is gone (its client left) is no error.
    pub fn finish(self, outcome: Outcome) {
        match self.0 {
            Sender::Once(tx) => {
                let _ = tx.send(outcome);
            }
            Sender::Stream(tx, _) => {
                let _ = tx.send(Delivery::Final(outcome));
            }
        }
    }
}

impl Replies {
    /// Waits for the final outcome, skipping interim parts. The lane's owner answers every
    /// request it accepted, by its deadline at the latest; a lane that went away without
    /// answering means the pool stopped.
    pub async fn outcome(mut self) -> Outcome {
        loop {
            if let Delivery::Final(o) = self.next().await {
                return o;
            }
        }
    }

    /// The next interim part, or the final outcome. After [`Delivery::Final`] the pair is
    /// spent: a further call answers `SHUTTING_DOWN`.
    pub async fn next(&mut self) -> Delivery {
        let gone = || Err(RouteError::ShuttingDown);
        match std::mem::replace(&mut self.0, Receiver::Spent) {
            Receiver::Once(rx) => Delivery::Final(rx.await.unwrap_or_else(|_| gone())),
            Receiver::Stream(rx, queued) => match rx.recv_async().await {
                Ok(Delivery::Part(p)) => {
                    queued.fetch_sub(p.held_bytes(), Ordering::Relaxed);
                    self.0 = Receiver::Stream(rx, queued);
                    Delivery::Part(p)
                }
                Ok(fin) => fin,
                Err(_) => Delivery::Final(gone()),
            },
            Receiver::Spent => Delivery::Final(gone()),
        }
    }

    /// Blocks for the final outcome until `deadline`, skipping interim parts; then `TIMEOUT`
    /// (of `timeout`).
    pub fn outcome_by(self, deadline: Instant, timeout: Duration) -> Outcome {
        match self.0 {
            Receiver::Once(rx) => match rx.recv_deadline(deadline) {
                Ok(outcome) => outcome,
                Err(oneshot::RecvTimeoutError::Timeout) => Err(RouteError::Timeout(timeout)),
                Err(oneshot::RecvTimeoutError::Disconnected) => Err(RouteError::ShuttingDown),
            },
            Receiver::Stream(rx, queued) => loop {
                match rx.recv_deadline(deadline) {
                    Ok(Delivery::Part(p)) => {
                        queued.fetch_sub(p.held_bytes(), Ordering::Relaxed);
                    }
                    Ok(Delivery::Final(o)) => return o,
                    Err(flume::RecvTimeoutError::Timeout) => {
                        return Err(RouteError::Timeout(timeout));
                    }
                    Err(flume::RecvTimeoutError::Disconnected) => {
                        return Err(RouteError::ShuttingDown);
                    }
                }
            },
            Receiver::Spent => Err(RouteError::ShuttingDown),
        }
    }
}
