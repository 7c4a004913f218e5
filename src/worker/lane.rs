//! The worker's end of a lane: the request ring it reads, the response ring it writes, and the
//! socket that wakes the lane's gateway core.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::bail;
use moltbot_ipc::wake::wake_needed;
use moltbot_ipc::{Consumer, Part, Producer, Response, RingError, SegmentHeader, WakeSender};

/// A lane as the worker sees it.
pub(crate) struct Lane {
    pub(crate) req: Consumer,
    pub(crate) resp: Producer,
    pub(crate) wake: WakeSender,
}

/// Publishes a response, waiting while the ring is full (the gateway is behind; the heartbeat
/// keeps going because the worker is not stuck), and wakes the gateway core if it sleeps.
pub(crate) fn write_response(
    ring: &mut Producer,
    wake: &WakeSender,
    resp: &Response<'_>,
    h: &SegmentHeader,
) -> anyhow::Result<()> {
    let bound = resp.encoded_len_bound();
    loop {
        match ring.push_with(bound, |slot| resp.encode_into(slot)) {
            Ok(Ok(())) => break,
            Ok(Err(e)) => bail!("encode response: {e}"),
            Err(RingError::Full) => {
                if wake_needed(ring.parked_flag()) {
                    wake.notify();
                }
                h.heartbeat.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) => bail!("response ring: {e}"),
        }
    }
    if wake_needed(ring.parked_flag()) {
        wake.notify();
    }
    Ok(())
}

/// Where a handler sends the interim parts of its answer (the `accepted` answer of a
/// two-stage request, events), before it returns the final one.
pub(crate) trait Emit {
    /// Whether the caller takes interim parts; when false, [`Emit::accepted`] and
    /// [`Emit::event`] drop them (an HTTP request without `Accept: text/event-stream`).
    fn streams(&self) -> bool;
    /// The interim `accepted` answer with its JSON payload.
    fn accepted(&mut self, payload: &[u8]);
    /// An event named `name` (`[A-Za-z0-9_:.-]`, 1 to 64 bytes) with its JSON payload.
    fn event(&mut self, name: &str, payload: &[u8]);
}

/// An [`Emit`] that drops everything, for tests of handlers whose requests do not stream.
#[cfg(test)]
pub(crate) struct NoEmit;

#[cfg(test)]
impl Emit for NoEmit {
    fn streams(&self) -> bool {
        false
    }
    fn accepted(&mut self, _: &[u8]) {}
    fn event(&mut self, _: &str, _: &[u8]) {}
}

/// Writes the interim parts of request `request_id` into a lane's response ring.
pub(crate) struct RingEmit<'a> {
    pub(crate) ring: &'a mut Producer,
    pub(crate) wake: &'a WakeSender,
    pub(crate) header: &'a SegmentHeader,
    pub(crate) request_id: u64,
    /// The request was sent with `stream`.
    pub(crate) stream: bool,
    /// The largest body a part may carry; larger parts are dropped (and logged).
    pub(crate) max_body: usize,
    /// The first failure to write (a corrupt ring): the serving loop ends with it.
    pub(crate) failed: Option<anyhow::Error>,
}

impl RingEmit<'_> {
    fn write(&mut self, part: Part, event: &str, body: &[u8]) {
        if !self.stream || self.failed.is_some() {
            return;
        }
        if body.len() > self.max_body {
            tracing::warn!(
                event,
                bytes = body.len(),
                "an event too large for a ring frame: dropped"
            );
            return;
        }
        let resp = Response {
            request_id: self.request_id,
            duration_us: 0,
            status: 200,
            part,
            body,
            error_code: "",
            event,
        };
        if let Err(e) = write_response(self.ring, self.wake, &resp, self.header) {
            self.failed = Some(e);
        }
    }
}

impl Emit for RingEmit<'_> {
    fn streams(&self) -> bool {
        self.stream
    }
    fn accepted(&mut self, payload: &[u8]) {
        self.write(Part::Accepted, "", payload);
    }
    fn event(&mut self, name: &str, payload: &[u8]) {
        self.write(Part::Event, name, payload);
    }
}
