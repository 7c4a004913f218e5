//! What every load thread does, whatever its protocol: the event loop over its connections
//! (an edge-triggered epoll set, a timerfd for the open-loop schedule, a heap of wake-ups and
//! a periodic timeout scan) and the state the loop keeps. A protocol (HTTP in
//! [`crate::engine`], WebSocket in [`crate::ws`]) owns its connections and implements
//! [`Connections`].

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rustix::event::epoll;
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};

use crate::BenchError;
use crate::config::Config;
use crate::engine::{Counters, Plan, Shared};
use crate::stats::ThreadStats;
use crate::users::{UserPicker, thread_rng};

/// The epoll token of the timerfd (connections use their index).
pub(crate) const TIMER_TOKEN: u64 = u64::MAX;
/// Longest single wait (a safety net: every wait has a reason to end sooner).
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(1);

/// A load thread's connections, as the loop drives them; `i` is a connection's index.
pub(crate) trait Connections<'a> {
    /// The loop's state.
    fn core(&mut self) -> &mut ThreadCore<'a>;
    /// How many connections the thread has.
    fn count(&self) -> usize;
    /// Starts connecting connection `i` (or finishes it, when the run is over).
    fn open(&mut self, i: usize, now: Instant);
    /// Epoll reported `flags` on connection `i`; `now` is when the wait returned.
    fn on_event(&mut self, i: usize, flags: epoll::EventFlags, now: Instant);
    /// A wake-up of connection `i` in the heap came due (it may be stale).
    fn wake(&mut self, i: usize, now: Instant);
    /// Fails what is past its deadline and sets [`ThreadCore::scan_at`].
    fn scan_timeouts(&mut self, now: Instant);
}

/// The loop's state, the same for every protocol.
pub(crate) struct ThreadCore<'a> {
    pub(crate) cfg: &'a Config,
    pub(crate) plan: &'a Plan,
    pub(crate) shared: &'a Shared,
    pub(crate) picker: &'a UserPicker,
    /// This thread's live counters (progress lines).
    pub(crate) counters: &'a Counters,
    pub(crate) epoll: OwnedFd,
    /// Open loop: fires at the earliest entry of `heap`.
    pub(crate) timer: Option<SendTimer>,
    /// Reconnect and open-loop send wake-ups: (when, connection).
    pub(crate) heap: BinaryHeap<Reverse<(Instant, usize)>>,
    pub(crate) rng: SmallRng,
    pub(crate) stats: ThreadStats,
    /// Numbers request bodies and agent messages (unique per thread).
    pub(crate) seq: u64,
    /// Connections not finished: the loop ends at 0.
    pub(crate) live: usize,
    /// When to look for timed-out requests next.
    pub(crate) scan_at: Instant,
}

impl<'a> ThreadCore<'a> {
    /// The state of thread `tid`, which has `count` connections.
    pub(crate) fn new(
        cfg: &'a Config,
        plan: &'a Plan,
        shared: &'a Shared,
        picker: &'a UserPicker,
        tid: usize,
        count: usize,
    ) -> Result<ThreadCore<'a>, BenchError> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(os_error("epoll_create"))?;
        let timer = match cfg.rate {
            None => None,
            Some(_) => Some(SendTimer::new(&epoll)?),
        };
        Ok(ThreadCore {
            cfg,
            plan,
            shared,
            picker,
            counters: &shared.counters[tid],
            epoll,
            timer,
            heap: BinaryHeap::new(),
            rng: thread_rng(cfg.seed, tid),
            stats: ThreadStats::new(cfg.users),
            seq: 0,
            live: count,
            scan_at: plan.t0 + cfg.timeout,
        })
    }

    /// Whether `now` is in the measured part of the run.
    pub(crate) fn measuring(&self, now: Instant) -> bool {
        now >= self.plan.measure_start
    }

    /// Whether connections stop (re)connecting: the run is past its stop, or (request-count
    /// mode) no request is left to claim.
    pub(crate) fn over(&self, now: Instant) -> bool {
        self.plan.past_stop(now) || self.shared.claims_exhausted(self.plan)
    }

    /// A non-blocking connection to the target, registered (edge-triggered) for the events of
    /// connection `i`; true when already connected.
    pub(crate) fn connect(&self, i: usize) -> io::Result<(TcpStream, bool)> {
        let (stream, connected) = connect(self.cfg.target.addr)?;
        epoll::add(
            &self.epoll,
            &stream,
            epoll::EventData::new_u64(i as u64),
            epoll::EventFlags::IN
                | epoll::EventFlags::OUT
                | epoll::EventFlags::RDHUP
                | epoll::EventFlags::ET,
        )
        .map_err(|e| io::Error::other(format!("epoll_ctl: {e}")))?;
        Ok((stream, connected))
    }

    /// The earliest of: a scheduled wake-up, a request timeout, the safety net.
    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = (now + MAX_WAIT).min(self.scan_at);
        if let Some(&Reverse((due, _))) = self.heap.peek() {
            wake = wake.min(due);
        }
        wake
    }

    /// Takes the next wake-up due by `now` off the heap.
    fn pop_due(&mut self, now: Instant) -> Option<usize> {
        let &Reverse((due, i)) = self.heap.peek()?;
        if due > now {
            return None;
        }
        self.heap.pop();
        Some(i)
    }
}

/// Runs the loop until every connection of `conns` has finished.
pub(crate) fn drive<'a>(conns: &mut impl Connections<'a>) -> Result<(), BenchError> {
    let now = Instant::now();
    for i in 0..conns.count() {
        conns.open(i, now);
    }
    let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
    while conns.core().live > 0 {
        let now = Instant::now();
        let core = conns.core();
        let wake = core.next_wake(now);
        if let Some(t) = &mut core.timer {
            t.arm(core.heap.peek().map(|&Reverse((d, _))| d), now);
        }
        wait_events(
            &core.epoll,
            &mut events,
            wake.saturating_duration_since(now),
        )?;
        let now = Instant::now();
        for ev in &events {
            let token = ev.data.u64();
            if token == TIMER_TOKEN {
                if let Some(t) = &mut conns.core().timer {
                    t.drain();
                }
            } else if let Ok(i) = usize::try_from(token)
                && i < conns.count()
            {
                conns.on_event(i, ev.flags, now);
            }
        }
        let now = Instant::now();
        while let Some(i) = conns.core().pop_due(now) {
            conns.wake(i, now);
        }
        if now >= conns.core().scan_at {
            conns.scan_timeouts(now);
        }
    }
    Ok(())
}

/// A non-blocking TCP connection to `addr` with `TCP_NODELAY`; true when already connected.
fn connect(addr: SocketAddr) -> io::Result<(TcpStream, bool)> {
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::sockopt::set_tcp_nodelay(&fd, true)?;
    let connected = match rustix::net::connect(&fd, &addr) {
        Ok(()) => true,
        Err(Errno::INPROGRESS) | Err(Errno::INTR) => false,
        Err(e) => return Err(e.into()),
    };
    Ok((TcpStream::from(fd), connected))
}

/// Open loop: a timerfd on the thread's epoll that fires at the next scheduled send, with
/// sub-millisecond precision (epoll's own timeout has millisecond granularity). Its epoll
/// token is [`TIMER_TOKEN`].
pub(crate) struct SendTimer {
    fd: OwnedFd,
    /// The expiry set last (`None`: disarmed), to skip a syscall when it is unchanged.
    armed: Option<Instant>,
}

impl SendTimer {
    pub(crate) fn new(epoll: &OwnedFd) -> Result<SendTimer, BenchError> {
        let fd = rustix::time::timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )
        .map_err(os_error("timerfd_create"))?;
        epoll::add(
            epoll,
            &fd,
            epoll::EventData::new_u64(TIMER_TOKEN),
            epoll::EventFlags::IN,
        )
        .map_err(os_error("epoll_ctl(timerfd)"))?;
        Ok(SendTimer { fd, armed: None })
    }

    /// Fires at `due` (disarmed for `None`).
    pub(crate) fn arm(&mut self, due: Option<Instant>, now: Instant) {
        if due == self.armed {
            return;
        }
        let value = match due {
            // A zero it_value disarms: use at least 1 ns.
            Some(d) => Timespec::try_from(
                d.saturating_duration_since(now)
                    .max(Duration::from_nanos(1)),
            )
            .unwrap_or(Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            }),
            None => Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        if rustix::time::timerfd_settime(&self.fd, TimerfdTimerFlags::empty(), &spec).is_ok() {
            self.armed = due;
        }
    }

    /// Consumes an expiry (its epoll event).
    pub(crate) fn drain(&mut self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut buf);
        self.armed = None;
    }
}

/// Waits up to `timeout` for events of `epoll` into `events` (cleared first); an interrupted
/// wait returns with none.
pub(crate) fn wait_events(
    epoll: &OwnedFd,
    events: &mut Vec<epoll::Event>,
    timeout: Duration,
) -> Result<(), BenchError> {
    let timeout = Timespec::try_from(timeout).unwrap_or(Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    });
    events.clear();
    match epoll::wait(
        epoll,
        rustix::buffer::spare_capacity(events),
        Some(&timeout),
    ) {
        Ok(_) | Err(Errno::INTR) => Ok(()),
        Err(e) => Err(BenchError::Os {
            what: "epoll_wait",
            source: e.into(),
        }),
    }
}

/// Maps an errno from setting up the engine.
pub(crate) fn os_error(what: &'static str) -> impl Fn(Errno) -> BenchError {
    move |e| BenchError::Os {
        what,
        source: e.into(),
    }
}
