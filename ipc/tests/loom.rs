//! Model checks, with loom, of the ring's publish/consume protocol and of the park/wake
//! handshake. Run by `tools/loom` (`RUSTFLAGS="--cfg loom"`): the crate is then built with
//! loom's atomics, so these run the real ring and wake code while loom explores the thread
//! interleavings and the values each relaxed or acquire load may return. The ring's payload
//! bytes carry loom access records (one per 16-byte unit), so a read of bytes whose write is not
//! ordered before it (an unpublished frame), or a write over bytes still being read, fails the
//! model. The futex is modelled with loom's mutex and condition variable ("sleep only if the
//! word still holds 1", atomic with respect to a wake), without a timeout: a lost wake-up leaves
//! the consumer asleep for good, which loom reports as a deadlock.
//!
//! Bounds: at most `LOOM_MAX_PREEMPTIONS` preemptions per execution (`tools/loom` sets 3).
#![cfg(loom)]

use loom::thread;
use moltbot_ipc::wake::{announce_park, cancel_park, futex_park, futex_unpark, wake_needed};
use moltbot_ipc::{AlignedBuf, HeapRing, Producer, RingError};
use std::time::Duration;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

fn push_retrying(p: &mut Producer, data: &[u8]) {
    loop {
        match p.push(data) {
            Ok(()) => return,
            Err(RingError::Full) => thread::yield_now(),
            Err(e) => panic!("push: {e}"),
        }
    }
}

/// Two frames through a 256-byte ring: the second (128 bytes) does not fit before the end, so
/// the producer publishes a padding frame, waits for the consumer to release the first
/// (176 bytes), and writes the second at offset 0, over the bytes the first one used, with
/// atomic stores from a private buffer (`push_buf`, as the gateway writes its requests). The
/// consumer must get both whole, in order: the first read in place, the second copied.
#[test]
fn frames_arrive_whole_and_in_order_across_the_wrap() {
    model(|| {
        let ring = HeapRing::new(256).unwrap();
        let (mut p, mut c) = ring.split().unwrap();
        let producer = thread::spawn(move || {
            push_retrying(&mut p, &[1; 160]);
            let mut second = AlignedBuf::new();
            second.zeroed_mut(100).fill(2);
            loop {
                match p.push_buf(&second) {
                    Ok(()) => break,
                    Err(RingError::Full) => thread::yield_now(),
                    Err(e) => panic!("push_buf: {e}"),
                }
            }
        });
        let mut got = 0;
        let mut buf = AlignedBuf::new();
        while got < 2 {
            let Some(f) = c
                .peek()
                .expect("an honest producer's ring is never corrupt")
            else {
                thread::yield_now();
                continue;
            };
            if got == 0 {
                assert_eq!(f.bytes(), &[1; 160][..]);
            } else {
                f.copy_into(&mut buf);
                assert_eq!(buf.as_slice(), &[2; 100][..]);
            }
            f.release();
            got += 1;
        }
        producer.join().unwrap();
        assert!(c.peek().unwrap().is_none());
    });
}

/// Frames published one after the other while the consumer reads: each is seen exactly once,
/// in order, never before it is complete.
#[test]
fn every_frame_is_seen_once_in_order() {
    model(|| {
        let ring = HeapRing::new(256).unwrap();
        let (mut p, mut c) = ring.split().unwrap();
        let producer = thread::spawn(move || {
            for i in 0..3u8 {
                push_retrying(&mut p, &[i; 40]);
            }
        });
        let mut next = 0u8;
        while next < 3 {
            match c.peek().unwrap() {
                Some(f) => {
                    assert_eq!(f.bytes(), &[next; 40][..]);
                    f.release();
                    next += 1;
                }
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
    });
}

/// The consumer parks when its ring is empty (announce, re-check, sleep on the futex); the
/// producer publishes and wakes it only if it finds the announcement. Every interleaving ends
/// with the frame consumed: no lost wake-up.
#[test]
fn a_parking_consumer_is_never_left_asleep_with_a_frame() {
    model(|| {
        let ring = HeapRing::new(256).unwrap();
        let (mut p, mut c) = ring.split().unwrap();
        let producer = thread::spawn(move || {
            p.push(b"wake up").unwrap();
            if wake_needed(p.parked_flag()) {
                futex_unpark(p.parked_flag());
            }
        });
        loop {
            if let Some(f) = c.peek().unwrap() {
                assert_eq!(f.bytes(), b"wake up");
                f.release();
                break;
            }
            announce_park(c.parked_flag());
            if c.has_data().unwrap() {
                cancel_park(c.parked_flag());
                continue;
            }
            futex_park(c.parked_flag(), Duration::from_secs(1));
            cancel_park(c.parked_flag());
        }
        producer.join().unwrap();
    });
}

/// The worker's case: one park word for the consumer, several producers (one per gateway core)
/// each publishing on a ring of its own and waking the consumer only if it finds the word set.
/// Every interleaving ends with both frames consumed: whichever producer comes second, it
/// either sees the consumer's announcement or the consumer sees its frame.
#[test]
fn a_consumer_parked_for_two_producers_is_never_left_asleep() {
    model(|| {
        let word = loom::sync::Arc::new(loom::sync::atomic::AtomicU32::new(0));
        let (a, b) = (HeapRing::new(256).unwrap(), HeapRing::new(256).unwrap());
        let (pa, mut ca) = a.split().unwrap();
        let (pb, mut cb) = b.split().unwrap();
        let spawn = |mut p: Producer, word: loom::sync::Arc<loom::sync::atomic::AtomicU32>| {
            thread::spawn(move || {
                p.push(b"frame").unwrap();
                if wake_needed(&word) {
                    futex_unpark(&word);
                }
            })
        };
        let ta = spawn(pa, word.clone());
        let tb = spawn(pb, word.clone());
        let mut seen = 0;
        while seen < 2 {
            let mut got = false;
            for c in [&mut ca, &mut cb] {
                if let Some(f) = c.peek().unwrap() {
                    f.release();
                    seen += 1;
                    got = true;
                }
            }
            if got {
                continue;
            }
            announce_park(&word);
            if ca.has_data().unwrap() || cb.has_data().unwrap() {
                cancel_park(&word);
                continue;
            }
            futex_park(&word, Duration::from_secs(1));
            cancel_park(&word);
        }
        ta.join().unwrap();
        tb.join().unwrap();
    });
}
