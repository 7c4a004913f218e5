//! Park and wake: how an idle consumer sleeps without missing a producer's frame.
//!
//! The consumer announces that it is about to park by setting a flag in shared memory, checks
//! its rings once more, and only then sleeps. The producer, after publishing a frame, looks at
//! the flag and issues a wake-up only if it is set. With a `SeqCst` fence on both sides between
//! the store and the load (Dekker's pattern), at least one of them sees the other's write: either
//! the consumer sees the new frame and does not sleep, or the producer sees the flag and wakes
//! it. Under load consumers never park, so there is no syscall per message.
//!
//! Two ways to sleep: a worker (a plain thread) sleeps on a futex on the flag word itself; a
//! gateway core (a glommio reactor) awaits a readable Unix socket, because a reactor can wait on
//! a file descriptor but not on a futex. [`wake_pair`] makes the socket pair; the sending end is
//! inherited by the worker processes.

use core::sync::atomic::{AtomicU32, Ordering, fence};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use rustix::thread::futex;

/// Consumer: announce the intent to park. Re-check for data after this and before sleeping.
#[inline]
pub fn announce_park(flag: &AtomicU32) {
    flag.store(1, Ordering::SeqCst);
    fence(Ordering::SeqCst);
}

/// Consumer: withdraw the announcement (data arrived, or it woke up). Returns true if a
/// producer had already cleared it, i.e. took the right to send one wake-up.
#[inline]
pub fn cancel_park(flag: &AtomicU32) -> bool {
    flag.swap(0, Ordering::Relaxed) == 0
}

/// Producer: after publishing, tells whether the consumer must be woken. Clears the flag, so
/// among several producers only one issues the wake-up.
#[inline]
pub fn wake_needed(flag: &AtomicU32) -> bool {
    fence(Ordering::SeqCst);
    flag.load(Ordering::Relaxed) != 0 && flag.swap(0, Ordering::AcqRel) != 0
}

/// Why [`futex_park`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkOutcome {
    /// A producer woke us.
    Woken,
    /// The flag was already cleared: a producer got there before we slept.
    NotParked,
    /// The timeout passed.
    TimedOut,
    /// A signal or a spurious return.
    Interrupted,
}

/// Sleeps on `flag` while it still holds 1 (the announced park), at most `timeout`.
pub fn futex_park(flag: &AtomicU32, timeout: Duration) -> ParkOutcome {
    let ts = rustix::time::Timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    // Shared (not PRIVATE): the word lives in memory mapped by two processes.
    match futex::wait(flag, futex::Flags::empty(), 1, Some(&ts)) {
        Ok(()) => ParkOutcome::Woken,
        Err(rustix::io::Errno::AGAIN) => ParkOutcome::NotParked,
        Err(rustix::io::Errno::TIMEDOUT) => ParkOutcome::TimedOut,
        Err(_) => ParkOutcome::Interrupted,
    }
}

/// Wakes a consumer sleeping in [`futex_park`] on `flag`.
pub fn futex_unpark(flag: &AtomicU32) {
    let _ = futex::wake(flag, futex::Flags::empty(), 1);
}

/// The most bytes one [`WakeReceiver::drain`] reads.
pub const DRAIN_MAX: usize = 4096;

/// The sending end of a wake socket: one byte means "look at your rings".
#[derive(Debug)]
pub struct WakeSender {
    fd: OwnedFd,
}

/// The receiving end of a wake socket.
#[derive(Debug)]
pub struct WakeReceiver {
    fd: OwnedFd,
}

/// A connected, non-blocking, close-on-exec pair of wake sockets.
pub fn wake_pair() -> io::Result<(WakeSender, WakeReceiver)> {
    let (a, b) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::shutdown(&a, rustix::net::Shutdown::Read)?;
    Ok((WakeSender { fd: a }, WakeReceiver { fd: b }))
}

impl WakeSender {
    /// Sends a wake-up. A full socket buffer already holds pending wake-ups, so it is ignored,
    /// as is a receiver that is gone.
    pub fn notify(&self) {
        let _ = rustix::io::write(&self.fd, &[1u8]);
    }

    /// Makes this descriptor survive `exec` so that a child process can use it, and returns
    /// its number for the child's command line.
    pub fn inheritable(&self) -> io::Result<RawFd> {
        rustix::io::fcntl_setfd(&self.fd, rustix::io::FdFlags::empty())?;
        Ok(self.fd.as_raw_fd())
    }

    /// Takes over a wake socket inherited from the parent under descriptor number `fd`, after
    /// checking that it is an open Unix stream socket. Sets close-on-exec again, so that it is
    /// not passed further down.
    pub fn from_inherited(fd: RawFd) -> io::Result<WakeSender> {
        if fd < 3 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "wake fd must not be stdio",
            ));
        }
        // SAFETY: `fd` is only borrowed for the duration of the checks; fcntl on a closed or
        // foreign number fails with EBADF rather than misbehaving.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        rustix::io::fcntl_getfd(borrowed)?;
        let ty = rustix::net::sockopt::socket_type(borrowed)?;
        if ty != SocketType::STREAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "wake fd is not a stream socket",
            ));
        }
        rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC)?;
        // SAFETY: the descriptor is open (checked above) and was handed to this process by its
        // parent for exactly this purpose; nothing else in the process owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(WakeSender { fd })
    }
}

impl AsFd for WakeSender {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl WakeReceiver {
    /// Reads and discards pending wake-ups, at most [`DRAIN_MAX`] bytes (a sender that writes
    /// without pause must not keep the receiver in this loop). Returns how many it read.
    pub fn drain(&self) -> usize {
        self.drain_checked().unwrap_or(0)
    }

    /// Like [`WakeReceiver::drain`], but tells a closed socket (the sending side is gone:
    /// end-of-file, or an error) from an empty one: `None` when closed.
    pub fn drain_checked(&self) -> Option<usize> {
        let mut buf = [0u8; 256];
        let mut n = 0;
        while n < DRAIN_MAX {
            match rustix::io::read(&self.fd, &mut buf) {
                Ok(0) => return None,
                Ok(k) => {
                    n += k;
                    if k < buf.len() {
                        return Some(n);
                    }
                }
                Err(rustix::io::Errno::AGAIN) => return Some(n),
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return None,
            }
        }
        Some(n)
    }

    /// Blocks until a wake-up arrives or `timeout` passes (for threads that are not a reactor).
    /// Returns true if woken.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) => Ok(false),
            Ok(_) => Ok(self.drain() > 0),
            Err(rustix::io::Errno::INTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives up the descriptor, e.g. to register it with an async reactor (see [`adopt_fd`]).
    pub fn into_owned_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for WakeReceiver {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Hands an owned descriptor to a type that takes ownership through `FromRawFd` (such as an
/// async runtime's socket type), so that callers need no `unsafe` of their own.
pub fn adopt_fd<T: FromRawFd>(fd: OwnedFd) -> T {
    // SAFETY: `fd` is an open descriptor owned by us; into_raw_fd relinquishes that ownership,
    // which `T` takes over. Nothing else refers to the descriptor afterwards.
    unsafe { T::from_raw_fd(fd.into_raw_fd()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn flag_protocol() {
        let f = AtomicU32::new(0);
        assert!(!wake_needed(&f));
        announce_park(&f);
        assert!(wake_needed(&f));
        assert!(!wake_needed(&f), "only one producer wakes");
        announce_park(&f);
        assert!(!cancel_park(&f), "nobody took the announcement");
        assert!(!wake_needed(&f));
        announce_park(&f);
        assert!(wake_needed(&f));
        assert!(cancel_park(&f), "a producer took it: one wake-up is due");
    }

    #[test]
    fn futex_park_returns_at_once_when_flag_cleared() {
        let f = AtomicU32::new(0);
        assert_eq!(
            futex_park(&f, Duration::from_secs(30)),
            ParkOutcome::NotParked
        );
    }

    #[test]
    fn futex_wake_from_another_thread() {
        let f = Arc::new(AtomicU32::new(0));
        announce_park(&f);
        let g = f.clone();
        let h = std::thread::spawn(move || {
            // Sleeps until woken; the waker below only fires after the flag is set.
            while g.load(Ordering::SeqCst) == 1 {
                futex_park(&g, Duration::from_secs(60));
            }
        });
        if wake_needed(&f) {
            futex_unpark(&f);
        }
        h.join().unwrap();
    }

    #[test]
    fn wake_socket_round_trip() {
        let (tx, rx) = wake_pair().unwrap();
        assert!(!rx.wait(Duration::from_millis(1)).unwrap());
        tx.notify();
        tx.notify();
        assert!(rx.wait(Duration::from_secs(30)).unwrap());
        assert_eq!(rx.drain(), 0);
    }

    #[test]
    fn from_inherited_rejects_bad_fds() {
        assert!(WakeSender::from_inherited(0).is_err());
        assert!(WakeSender::from_inherited(987_654).is_err());
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(WakeSender::from_inherited(file.as_raw_fd()).is_err());
    }

    #[test]
    fn drain_checked_tells_closed_from_empty() {
        let (tx, rx) = wake_pair().unwrap();
        assert_eq!(rx.drain_checked(), Some(0));
        tx.notify();
        assert_eq!(rx.drain_checked(), Some(1));
        drop(tx);
        // Another test of this binary may be forking a child right now, whose copy of `tx`
        // lives until its exec closes it: wait for end-of-file, with a generous deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match rx.drain_checked() {
                None => break,
                Some(0) if std::time::Instant::now() < deadline => {
                    let _ = rx.wait(Duration::from_millis(100));
                }
                other => panic!("still open after the deadline: {other:?}"),
            }
        }
    }

    #[test]
    fn full_socket_does_not_block() {
        let (tx, rx) = wake_pair().unwrap();
        for _ in 0..100_000 {
            tx.notify();
        }
        assert!(rx.drain() > 0);
    }
}
