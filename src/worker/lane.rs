//! The worker's end of a lane: the request ring it reads, the response ring it writes, and the
//! socket that wakes the lane's gateway core.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::bail;
use moltbot_ipc::wake::wake_needed;
use moltbot_ipc::{Consumer, Producer, Response, RingError, WakeSender};

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
    h: &moltbot_ipc::SegmentHeader,
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
