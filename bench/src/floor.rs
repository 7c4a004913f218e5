//! The loopback floor of an event's delay: what delivering a stamped message over one loopback
//! TCP connection to a reader asleep on epoll costs on this machine, with no gateway in between.
//!
//! An `agent` event's delay (the worker's `emittedUs` to this client reading it) holds the
//! gateway's part and the part any server has: one loopback delivery and the wake-up of the
//! client's thread. Measured right after the run, in bursts shaped like the run's (as many
//! messages per burst as events per run, one burst per run interval of a connection), the floor
//! lets a report say what the gateway adds: the event delay less the floor, per percentile.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustix::event::epoll;

use crate::BenchError;
use crate::stats::{new_histogram, record};
use crate::thread::{os_error, wait_events};

/// Bytes of each message: about an `agent` event frame.
const MESSAGE: usize = 256;

/// How long the floor is measured.
pub const FLOOR_DURATION: Duration = Duration::from_secs(1);

/// Longest wait for the last messages after the sender stopped.
const DRAIN: Duration = Duration::from_secs(5);

/// Maps an I/O error of `what` (the floor's sockets and threads).
fn io(what: &'static str) -> impl Fn(std::io::Error) -> BenchError {
    move |source| BenchError::Os { what, source }
}

/// The shape of the traffic the floor is measured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloorShape {
    /// Messages sent back to back in one burst.
    pub burst: u32,
    /// The pause after each burst.
    pub gap: Duration,
    /// How long bursts are sent.
    pub duration: Duration,
}

impl FloorShape {
    /// Bursts like a run's: `events` over `runs` messages each (at least 1, at most 64), one
    /// every `connections / (runs / measured)` (between 10µs and 100ms), for [`FLOOR_DURATION`].
    pub fn of_run(events: u64, runs: u64, connections: usize, measured: Duration) -> FloorShape {
        let runs = runs.max(1);
        let burst = (events as f64 / runs as f64).round().clamp(1.0, 64.0) as u32;
        let interval = measured.as_secs_f64() * connections.max(1) as f64 / runs as f64;
        FloorShape {
            burst,
            gap: Duration::from_secs_f64(interval.clamp(10e-6, 0.1)),
            duration: FLOOR_DURATION,
        }
    }
}

/// Sends bursts of stamped messages over a loopback connection to a reader on an
/// edge-triggered epoll set (as the load threads read) and returns the delays, in ns, from
/// each stamp to the reader parsing that message.
pub fn measure(shape: &FloorShape) -> Result<Histogram<u64>, BenchError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("floor: bind"))?;
    let addr = listener.local_addr().map_err(io("floor: bind"))?;
    // Connected here, before the sender starts: the accept cannot wait for a sender that
    // failed.
    let out = TcpStream::connect(addr).map_err(io("floor: connect"))?;
    let (inbound, _) = listener.accept().map_err(io("floor: accept"))?;
    std::thread::scope(|s| {
        let sender = std::thread::Builder::new()
            .name("moltbot-bench-floor".into())
            .spawn_scoped(s, move || send(out, shape))
            .map_err(io("floor: cannot start the sender"))?;
        // Dropping the reading side on an error ends the sender (its writes fail).
        let delays = receive(inbound, shape.duration);
        let sent = sender.join().unwrap_or(Err(BenchError::Os {
            what: "floor: the sender",
            source: std::io::Error::other("panicked"),
        }));
        delays.and_then(|d| sent.map(|()| d))
    })
}

/// The sending side: bursts of `shape.burst` messages, each stamped when written, until
/// `shape.duration` has passed; then it closes, which ends the reader.
fn send(mut stream: TcpStream, shape: &FloorShape) -> Result<(), BenchError> {
    stream.set_nodelay(true).map_err(io("floor: nodelay"))?;
    let end = Instant::now() + shape.duration;
    let mut message = [0u8; MESSAGE];
    while Instant::now() < end {
        for _ in 0..shape.burst {
            let stamp = moltbot_ipc::clock::monotonic_us();
            message[..8].copy_from_slice(&stamp.to_le_bytes());
            stream.write_all(&message).map_err(io("floor: write"))?;
        }
        std::thread::sleep(shape.gap);
    }
    Ok(())
}

/// The reading side: waits on epoll, reads what arrived and records each whole message's
/// delay, until end-of-file (or [`DRAIN`] past `duration`, the sender's time).
fn receive(mut stream: TcpStream, duration: Duration) -> Result<Histogram<u64>, BenchError> {
    stream
        .set_nonblocking(true)
        .map_err(io("floor: nonblocking"))?;
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(os_error("epoll_create"))?;
    epoll::add(
        &ep,
        stream.as_fd(),
        epoll::EventData::new_u64(0),
        epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ET,
    )
    .map_err(os_error("epoll_ctl(floor)"))?;
    let mut delays = new_histogram();
    let mut events = Vec::with_capacity(4);
    let mut buf = vec![0u8; 64 * MESSAGE];
    // Bytes of a message split across reads.
    let mut have = 0usize;
    let give_up = Instant::now() + duration + DRAIN;
    loop {
        if Instant::now() > give_up {
            return Ok(delays);
        }
        wait_events(&ep, &mut events, Duration::from_millis(100))?;
        loop {
            match stream.read(&mut buf[have..]) {
                Ok(0) => return Ok(delays),
                Ok(n) => {
                    let now = moltbot_ipc::clock::monotonic_us();
                    have += n;
                    let whole = have / MESSAGE * MESSAGE;
                    for m in buf[..whole].chunks_exact(MESSAGE) {
                        let mut stamp = [0u8; 8];
                        stamp.copy_from_slice(&m[..8]);
                        let delay = now.saturating_sub(u64::from_le_bytes(stamp));
                        record(&mut delays, Duration::from_micros(delay));
                    }
                    buf.copy_within(whole..have, 0);
                    have -= whole;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io("floor: read")(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shape_follows_the_run() {
        // 7 events per run, 8 connections at 40,000 runs/s: a run every 200µs per connection.
        let s = FloorShape::of_run(7_000, 1_000, 8, Duration::from_millis(25));
        assert_eq!(s.burst, 7);
        assert_eq!(s.gap, Duration::from_micros(200));
        // Nothing measured: one message, the longest gap.
        let s = FloorShape::of_run(0, 0, 1, Duration::from_secs(1));
        assert_eq!((s.burst, s.gap), (1, Duration::from_millis(100)));
        let s = FloorShape::of_run(1 << 40, 1, 1, Duration::ZERO);
        assert_eq!((s.burst, s.gap), (64, Duration::from_micros(10)));
    }

    #[test]
    fn every_message_sent_is_measured() {
        let shape = FloorShape {
            burst: 3,
            gap: Duration::from_millis(2),
            duration: Duration::from_millis(100),
        };
        let h = measure(&shape).unwrap();
        // At least one burst, whole bursts only (the reader takes every message to the end).
        assert!(h.len() >= 3, "{}", h.len());
        assert_eq!(h.len() % 3, 0, "{}", h.len());
        // Each delay is below the whole measurement's length.
        assert!(h.max() < 10_000_000_000, "{}", h.max());
    }
}
