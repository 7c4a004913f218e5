//! A real child process attaches to a segment by name and echoes 100,000 frames back.
//!
//! The child is this test binary itself, re-executed to run the ignored `echo_child` entry
//! point, which does nothing unless the parent passed it a segment name.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use moltbot_ipc::wake::{announce_park, cancel_park, futex_park, futex_unpark, wake_needed};
use moltbot_ipc::{Producer, RingError, Segment, SegmentLayout};

const FRAMES: u64 = 100_000;
const ENV: &str = "MOLTBOT_IPC_TEST_SEGMENT";

fn payload(seq: u64, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&seq.to_le_bytes());
    let len = 8 + (seq.wrapping_mul(2_654_435_761) % 1500) as usize;
    out.extend((8..len).map(|i| (seq as usize).wrapping_add(i * 7) as u8));
}

fn push_blocking(p: &mut Producer, data: &[u8]) {
    loop {
        match p.push(data) {
            Ok(()) => return,
            Err(RingError::Full) => std::thread::yield_now(),
            Err(e) => panic!("push: {e}"),
        }
    }
}

#[test]
fn child_echoes_100k_frames_and_segment_is_removed() {
    let name = format!(
        "/moltbot-ipc-test-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let seg = Segment::create(&name, SegmentLayout::new(1, 64 * 1024).unwrap(), 0).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "echo_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV, &name)
        .spawn()
        .unwrap();
    let lane = seg.take_gateway_lane(0).unwrap();
    let (mut req, mut resp) = (lane.requests, lane.responses);
    let parked = seg.worker_parked();
    let (mut sent, mut received) = (0u64, 0u64);
    let mut buf = Vec::new();
    let mut expected = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while received < FRAMES {
        assert!(Instant::now() < deadline, "echo stalled at {received}");
        // Keep up to 64 frames in flight.
        while sent < FRAMES && sent - received < 64 {
            payload(sent, &mut buf);
            push_blocking(&mut req, &buf);
            if wake_needed(parked) {
                futex_unpark(parked);
            }
            sent += 1;
        }
        match resp.peek().unwrap() {
            Some(f) => {
                payload(received, &mut expected);
                assert_eq!(f.bytes(), &expected[..], "frame {received}");
                f.release();
                received += 1;
            }
            None => std::thread::yield_now(),
        }
    }
    // An empty frame tells the child to stop.
    push_blocking(&mut req, &[]);
    if wake_needed(parked) {
        futex_unpark(parked);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "child: {status}");
    assert_eq!(seg.header().heartbeat.load(Ordering::Relaxed), FRAMES);
    drop((req, resp));
    drop(seg);
    let path = std::path::Path::new("/dev/shm").join(name.trim_start_matches('/'));
    assert!(!path.exists(), "{path:?} left behind");
}

#[test]
#[ignore = "the child side of child_echoes_100k_frames_and_segment_is_removed"]
fn echo_child() {
    let Ok(name) = std::env::var(ENV) else { return };
    let seg = Segment::attach(&name).unwrap();
    let lane = seg.take_worker_lane(0).unwrap();
    let (mut req, mut resp) = (lane.requests, lane.responses);
    let parked = seg.worker_parked();
    let mut spins = 0u32;
    loop {
        match req.peek().unwrap() {
            Some(f) => {
                spins = 0;
                if f.is_empty() {
                    return;
                }
                let data = f.bytes().to_vec();
                f.release();
                push_blocking(&mut resp, &data);
                seg.header().heartbeat.fetch_add(1, Ordering::Relaxed);
            }
            None if spins < 100 => {
                spins += 1;
                std::hint::spin_loop();
            }
            None => {
                announce_park(parked);
                if !req.has_data().unwrap() {
                    futex_park(parked, Duration::from_secs(1));
                }
                cancel_park(parked);
            }
        }
    }
}
