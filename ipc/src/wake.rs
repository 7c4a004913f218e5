//! Park and wake: how an idle consumer sleeps without missing a producer's frame.
//!
//! The consumer announces that it is about to park by setting a flag in shared memory, checks
//! its rings once more, and only then sleeps. The producer, after publishing a frame, looks at
//! the flag and issues a wake-up only if it is set. With a `SeqCst` fence on both sides between
//! the write and the read (Dekker's pattern), at least one of them sees the other's write: either
//! the consumer sees the new frame and does not sleep, or the producer sees the flag and wakes
//! it. Under load consumers never park, so there is no syscall per message.
//!
//! Two ways to sleep: a worker (a plain thread) sleeps on a futex on the flag word itself; a
//! gateway core (a glommio reactor) awaits a readable Unix socket, because a reactor can wait on
//! a file descriptor but not on a futex. [`wake_pair`] makes the socket pair; the sending ends
//! reach a worker process over [`wake_handoff`] (file descriptors passed with `SCM_RIGHTS` on
//! the worker's standard input), so that no descriptor of the gateway is ever made inheritable
//! and no safe function takes ownership of a descriptor by number:
//!
//! ```compile_fail,E0599
//! // There is no way to turn a number into a WakeSender.
//! let tx = moltbot_ipc::WakeSender::from_inherited(5);
//! ```
//!
//! ```compile_fail,E0308
//! let tx = moltbot_ipc::WakeSender::from_fd(5);
//! ```

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

use crate::sync::{AtomicU32, Ordering, fence};

/// Consumer: announce the intent to park. Re-check for data after this and before sleeping.
///
/// The announcement is an exchange rather than a plain store. With a store the handshake is
/// just as correct in the C11 model, but loom, which models `SeqCst` accesses as
/// acquire/release only, then reports a lost wake-up with several producers on one word (the
/// worker's case: one per gateway core); an exchange follows every earlier clear of the word
/// in its order, and the model checks. It costs nothing more: a `SeqCst` store is an exchange
/// on x86 anyway.
#[inline]
pub fn announce_park(flag: &AtomicU32) {
    flag.swap(1, Ordering::SeqCst);
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
#[cfg(not(loom))]
pub fn futex_park(flag: &AtomicU32, timeout: Duration) -> ParkOutcome {
    use rustix::thread::futex;
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
#[cfg(not(loom))]
pub fn futex_unpark(flag: &AtomicU32) {
    let _ = rustix::thread::futex::wake(flag, rustix::thread::futex::Flags::empty(), 1);
}

/// The futex under loom: one wait queue for every word (a kernel hash bucket), whose lock
/// makes "check the word still holds 1, then sleep" atomic with respect to a wake. Loom has no
/// clock: the timeout is ignored, so a lost wake-up leaves the sleeper blocked for good, which
/// loom reports as a deadlock.
#[cfg(loom)]
mod loom_futex {
    loom::lazy_static! {
        pub(super) static ref BUCKET: (loom::sync::Mutex<()>, loom::sync::Condvar) =
            (loom::sync::Mutex::new(()), loom::sync::Condvar::new());
    }
}

/// Sleeps on `flag` while it still holds 1 (loom's model of the futex).
#[cfg(loom)]
pub fn futex_park(flag: &AtomicU32, _timeout: Duration) -> ParkOutcome {
    let (lock, queue) = &*loom_futex::BUCKET;
    let guard = lock.lock().unwrap();
    if flag.load(Ordering::SeqCst) != 1 {
        return ParkOutcome::NotParked;
    }
    drop(queue.wait(guard).unwrap());
    ParkOutcome::Woken
}

/// Wakes the sleepers of [`futex_park`] (loom's model of the futex).
#[cfg(loom)]
pub fn futex_unpark(_flag: &AtomicU32) {
    let (lock, queue) = &*loom_futex::BUCKET;
    let _guard = lock.lock().unwrap();
    queue.notify_all();
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

    /// Takes over a wake socket received from the parent process (see
    /// [`receive_wake_senders`]), after checking that it is a Unix stream socket. Sets
    /// close-on-exec, so that it is not passed further down.
    pub fn from_fd(fd: OwnedFd) -> io::Result<WakeSender> {
        if rustix::net::sockopt::socket_domain(&fd)? != AddressFamily::UNIX
            || rustix::net::sockopt::socket_type(&fd)? != SocketType::STREAM
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a wake socket must be a Unix stream socket",
            ));
        }
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
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

/// Most descriptors one hand-off message carries (the kernel's limit is 253).
const HANDOFF_CHUNK: usize = 64;

/// The parent's end of a hand-off channel: passes wake senders to one child process.
#[derive(Debug)]
pub struct WakeHandoff {
    /// A `SOCK_SEQPACKET` socket, close-on-exec; its peer is the child's standard input.
    fd: OwnedFd,
}

/// A channel to hand wake senders to a child process: the parent keeps the [`WakeHandoff`],
/// the returned descriptor becomes the child's standard input (`Stdio::from`), and is closed in
/// the parent once the child is spawned. Both ends are close-on-exec: only the dup on the
/// child's descriptor 0 crosses the `exec`.
pub fn wake_handoff() -> io::Result<(WakeHandoff, OwnedFd)> {
    let (parent, child) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    Ok((WakeHandoff { fd: parent }, child))
}

impl WakeHandoff {
    /// Sends `senders` to the child (in order, in messages of up to 64 descriptors) and closes
    /// the channel. The child holds its own copies afterwards; the caller may drop its own.
    pub fn send(self, senders: &[WakeSender]) -> io::Result<()> {
        for chunk in senders.chunks(HANDOFF_CHUNK) {
            let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|s| s.fd.as_fd()).collect();
            let msg = SendAncillaryMessage::ScmRights(&fds);
            let mut space = vec![MaybeUninit::uninit(); msg.size()];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(msg) {
                return Err(io::Error::other("ancillary buffer too small"));
            }
            let count = [chunk.len() as u8];
            rustix::net::sendmsg(
                &self.fd,
                &[IoSlice::new(&count)],
                &mut control,
                SendFlags::NOSIGNAL,
            )?;
        }
        Ok(())
    }
}

/// Receives `count` wake senders sent by the parent's [`WakeHandoff::send`] on `from` (the
/// child's standard input), waiting at most `timeout` in all. Fails if the parent closes the
/// channel or sends anything else (a message without descriptors, more than `count`, or
/// sockets that are not Unix stream sockets).
pub fn receive_wake_senders(
    from: BorrowedFd<'_>,
    count: usize,
    timeout: Duration,
) -> io::Result<Vec<WakeSender>> {
    let deadline = Instant::now() + timeout;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut senders = Vec::with_capacity(count);
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(HANDOFF_CHUNK))];
    while senders.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = rustix::time::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as _,
        };
        let mut fds = [PollFd::new(&from, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "received {} of {count} wake sockets from the parent within {timeout:?}",
                        senders.len()
                    ),
                ));
            }
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let mut byte = [0u8; 1];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = rustix::net::recvmsg(
            from,
            &mut [IoSliceMut::new(&mut byte)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        let mut got = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = m {
                got.extend(fds);
            }
        }
        if msg.bytes == 0 {
            return Err(bad("the parent closed the hand-off channel early"));
        }
        if msg.flags.contains(rustix::net::ReturnFlags::CTRUNC)
            || got.is_empty()
            || got.len() != usize::from(byte[0])
            || senders.len() + got.len() > count
        {
            return Err(bad("unexpected hand-off message"));
        }
        for fd in got {
            senders.push(WakeSender::from_fd(fd)?);
        }
    }
    Ok(senders)
}

/// Hands an owned descriptor to a type that takes ownership through `FromRawFd` (such as an
/// async runtime's socket type), so that callers need no `unsafe` of their own.
pub fn adopt_fd<T: FromRawFd>(fd: OwnedFd) -> T {
    // SAFETY: `fd` is an open descriptor owned by us; into_raw_fd relinquishes that ownership,
    // which `T` takes over. Nothing else refers to the descriptor afterwards.
    unsafe { T::from_raw_fd(fd.into_raw_fd()) }
}

#[cfg(all(test, not(loom)))]
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
    fn from_fd_takes_only_unix_stream_sockets() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(WakeSender::from_fd(file.into()).is_err());
        let (a, _b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        assert!(WakeSender::from_fd(a).is_err());
        let (tx, rx) = wake_pair().unwrap();
        let tx = WakeSender::from_fd(tx.fd).unwrap();
        tx.notify();
        assert_eq!(rx.drain(), 1);
    }

    #[test]
    fn wake_senders_are_handed_over_in_order() {
        for n in [1, 3, HANDOFF_CHUNK + 5] {
            let pairs: Vec<_> = (0..n).map(|_| wake_pair().unwrap()).collect();
            let (handoff, child) = wake_handoff().unwrap();
            let senders: Vec<&WakeSender> = pairs.iter().map(|(tx, _)| tx).collect();
            let owned: Vec<WakeSender> = senders
                .iter()
                .map(|s| WakeSender {
                    fd: s.fd.try_clone().unwrap(),
                })
                .collect();
            handoff.send(&owned).unwrap();
            let got = receive_wake_senders(child.as_fd(), n, Duration::from_secs(30)).unwrap();
            assert_eq!(got.len(), n);
            for (i, tx) in got.iter().enumerate() {
                assert!(
                    rustix::io::fcntl_getfd(tx)
                        .unwrap()
                        .contains(rustix::io::FdFlags::CLOEXEC)
                );
                tx.notify();
                for (j, (_, rx)) in pairs.iter().enumerate() {
                    assert_eq!(rx.drain(), usize::from(i == j), "sender {i}, receiver {j}");
                }
            }
        }
    }

    #[test]
    fn receiving_fails_on_silence_early_close_and_junk() {
        let (handoff, child) = wake_handoff().unwrap();
        let e = receive_wake_senders(child.as_fd(), 1, Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        drop(handoff);
        assert!(receive_wake_senders(child.as_fd(), 1, Duration::from_secs(30)).is_err());
        // Too many.
        let (handoff, child) = wake_handoff().unwrap();
        let (a, _) = wake_pair().unwrap();
        let (b, _) = wake_pair().unwrap();
        handoff.send(&[a, b]).unwrap();
        assert!(receive_wake_senders(child.as_fd(), 1, Duration::from_secs(30)).is_err());
        // Bytes without descriptors.
        let (handoff, child) = wake_handoff().unwrap();
        rustix::io::write(&handoff.fd, &[1]).unwrap();
        assert!(receive_wake_senders(child.as_fd(), 1, Duration::from_secs(30)).is_err());
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
