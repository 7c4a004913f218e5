//! Two-thread stress and park/wake tests of the ring.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use moltbot_ipc::wake::{
    ParkOutcome, announce_park, cancel_park, futex_park, futex_unpark, wake_needed,
};
use moltbot_ipc::{HeapRing, RingError};

/// Deterministic frame content for sequence number `seq`: length and bytes both derived from
/// it, so the consumer can verify every frame without a side channel.
fn frame_for(seq: u64, buf: &mut Vec<u8>) {
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let len = 8 + (x % 700) as usize;
    buf.clear();
    buf.extend_from_slice(&seq.to_le_bytes());
    while buf.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf.push(x as u8);
    }
}

#[test]
fn two_threads_one_million_frames() {
    const N: u64 = 1_000_000;
    let ring = HeapRing::new(64 * 1024).unwrap();
    let (mut p, mut c) = ring.split().unwrap();
    let producer = std::thread::spawn(move || {
        let mut buf = Vec::new();
        for seq in 0..N {
            frame_for(seq, &mut buf);
            loop {
                match p.push(&buf) {
                    Ok(()) => break,
                    Err(RingError::Full) => std::thread::yield_now(),
                    Err(e) => panic!("push: {e}"),
                }
            }
        }
    });
    let mut expected = Vec::new();
    let mut seq = 0;
    while seq < N {
        match c.peek().expect("peek") {
            Some(f) => {
                frame_for(seq, &mut expected);
                assert_eq!(f.bytes(), &expected[..], "frame {seq}");
                f.release();
                seq += 1;
            }
            None => std::thread::yield_now(),
        }
    }
    producer.join().unwrap();
    assert!(c.peek().unwrap().is_none());
}

/// 100,000 rounds of ping-pong where the consumer parks whenever its ring is empty: every
/// round is a race between the consumer going to sleep and the producer's push. A lost
/// wake-up would leave the consumer asleep until its timeout with a frame waiting.
#[test]
fn no_lost_wakeups_in_100k_park_push_races() {
    const ROUNDS: u64 = 100_000;
    let flag = Arc::new(AtomicU32::new(0));
    let (mut p, mut c) = HeapRing::new(4096).unwrap().split().unwrap();
    let (mut ack_p, mut ack_c) = HeapRing::new(4096).unwrap().split().unwrap();
    let f2 = flag.clone();
    let consumer = std::thread::spawn(move || {
        let mut lost = 0u64;
        let mut parked = 0u64;
        let mut got = 0u64;
        while got < ROUNDS {
            if let Some(f) = c.peek().unwrap() {
                let v = u64::from_le_bytes(f.bytes().try_into().unwrap());
                assert_eq!(v, got);
                f.release();
                got += 1;
                ack_p.push(&v.to_le_bytes()).unwrap();
                continue;
            }
            announce_park(&f2);
            if c.has_data().unwrap() {
                cancel_park(&f2);
                continue;
            }
            parked += 1;
            if futex_park(&f2, Duration::from_secs(10)) == ParkOutcome::TimedOut
                && c.has_data().unwrap()
            {
                lost += 1;
            }
            cancel_park(&f2);
        }
        (lost, parked)
    });
    for seq in 0..ROUNDS {
        p.push(&seq.to_le_bytes()).unwrap();
        if wake_needed(&flag) {
            futex_unpark(&flag);
        }
        // Wait for the ack, so that the next push races with the consumer parking again.
        loop {
            if let Some(f) = ack_c.peek().unwrap() {
                f.release();
                break;
            }
            std::hint::spin_loop();
        }
    }
    let (lost, parked) = consumer.join().unwrap();
    assert_eq!(lost, 0, "lost wake-ups");
    assert!(
        parked > 0,
        "the consumer never parked: the race was not exercised"
    );
}

fn thread_cpu() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A parked consumer sleeps in the kernel: over half a second of waiting it burns a small
/// fraction of the CPU time a spinning one would.
#[test]
fn idle_parked_consumer_burns_no_cpu() {
    let mut c = HeapRing::new(4096).unwrap().take_consumer().unwrap();
    let flag = AtomicU32::new(0);
    let start = std::time::Instant::now();
    let cpu0 = thread_cpu();
    while start.elapsed() < Duration::from_millis(500) {
        announce_park(&flag);
        if !c.has_data().unwrap() {
            futex_park(&flag, Duration::from_millis(50));
        }
        cancel_park(&flag);
    }
    let wall = start.elapsed();
    let cpu = thread_cpu() - cpu0;
    assert!(
        cpu * 20 < wall,
        "parked consumer used {cpu:?} of CPU in {wall:?}"
    );
    assert_eq!(flag.load(Ordering::Relaxed), 0);
}
