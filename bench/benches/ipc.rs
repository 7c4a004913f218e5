//! Criterion benchmarks of the IPC channel, against a Unix socket and loopback TCP measured in
//! the same run.
//!
//! `rtt/*` are cross-process round trips: this binary re-executes itself as an echo child
//! (selected by an environment variable) and measures ping→pong latency.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use moltbot_ipc::wake::{
    ParkOutcome, announce_park, cancel_park, futex_park, futex_unpark, wake_needed,
};
use moltbot_ipc::{
    AlignedBuf, Consumer, Kind, Method, Producer, Request, RingError, Segment, SegmentLayout,
    access_request,
};

const CHILD_ENV: &str = "MOLTBOT_BENCH_CHILD";
const ADDR_ENV: &str = "MOLTBOT_BENCH_ADDR";

fn spawn_child(role: &str, addr: &str) -> Child {
    Command::new(std::env::current_exe().expect("current exe"))
        .env(CHILD_ENV, role)
        .env(ADDR_ENV, addr)
        .spawn()
        .expect("spawn echo child")
}

/// Pushes, retrying while the ring is full (the peer is draining it).
fn push(p: &mut Producer, data: &[u8]) {
    loop {
        match p.push(data) {
            Ok(()) => return,
            Err(RingError::Full) => std::hint::spin_loop(),
            Err(e) => panic!("push: {e}"),
        }
    }
}

/// Waits for one frame; spins, or parks if `park` is set: on `worker_flag` (the worker's
/// futex word), or else on the ring's own park flag.
fn recv(
    c: &mut Consumer,
    buf: &mut [u8],
    worker_flag: Option<&std::sync::atomic::AtomicU32>,
    park: bool,
) -> usize {
    let mut spins = 0u32;
    loop {
        if let Some(f) = c.peek().expect("peek") {
            let n = f.len();
            buf[..n].copy_from_slice(f.bytes());
            f.release();
            return n;
        }
        if park && spins > 64 {
            match worker_flag {
                Some(flag) => {
                    announce_park(flag);
                    if !c.has_data().expect("ring") {
                        let _: ParkOutcome = futex_park(flag, Duration::from_millis(100));
                    }
                    cancel_park(flag);
                }
                None => {
                    announce_park(c.parked_flag());
                    if !c.has_data().expect("ring") {
                        let _: ParkOutcome =
                            futex_park(c.parked_flag(), Duration::from_millis(100));
                    }
                    cancel_park(c.parked_flag());
                }
            }
        } else {
            spins += 1;
            std::hint::spin_loop();
        }
    }
}

fn shm_child(name: &str, park: bool) {
    let seg = Segment::attach(name).expect("attach");
    let lane = seg.take_worker_lane(0).expect("lane");
    let (mut req, mut resp) = (lane.requests, lane.responses);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(&mut req, &mut buf, Some(seg.worker_parked()), park);
        if n == 0 {
            return;
        }
        push(&mut resp, &buf[..n]);
        if wake_needed(resp.parked_flag()) {
            futex_unpark(resp.parked_flag());
        }
    }
}

fn stream_echo(mut s: impl Read + Write) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn child_main(role: &str) {
    let addr = std::env::var(ADDR_ENV).expect("address");
    match role {
        "shm" => shm_child(&addr, false),
        "shm_park" => shm_child(&addr, true),
        "uds" => stream_echo(UnixStream::connect(&addr).expect("connect")),
        "tcp" => {
            let s = TcpStream::connect(&addr).expect("connect");
            s.set_nodelay(true).expect("nodelay");
            stream_echo(s)
        }
        other => panic!("unknown child role {other}"),
    }
}

fn bench_shm(c: &mut Criterion, role: &str, sizes: &[usize]) {
    let park = role == "shm_park";
    let name = format!("/moltbot-bench-{}-{role}", std::process::id());
    let seg = Segment::create(&name, SegmentLayout::new(1, 1 << 20).expect("layout"), 0)
        .expect("segment");
    let mut child = spawn_child(role, &name);
    let lane = seg.take_gateway_lane(0).expect("lane");
    let (mut req, mut resp) = (lane.requests, lane.responses);
    let mut group = c.benchmark_group("rtt");
    for &size in sizes {
        let msg = vec![0x5au8; size];
        let mut buf = vec![0u8; size];
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new(role, size), &size, |b, _| {
            b.iter(|| {
                push(&mut req, &msg);
                if wake_needed(seg.worker_parked()) {
                    futex_unpark(seg.worker_parked());
                }
                recv(&mut resp, &mut buf, None, park)
            })
        });
    }
    group.finish();
    push(&mut req, &[]);
    if wake_needed(seg.worker_parked()) {
        futex_unpark(seg.worker_parked());
    }
    let _ = child.wait();
}

fn bench_stream<S: Read + Write>(c: &mut Criterion, role: &str, mut s: S, child: Child) {
    let msg = [0x5au8; 64];
    let mut buf = [0u8; 64];
    let mut group = c.benchmark_group("rtt");
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new(role, 64), |b| {
        b.iter(|| {
            s.write_all(&msg).expect("write");
            s.read_exact(&mut buf).expect("read");
        })
    });
    group.finish();
    drop(s);
    let mut child = child;
    let _ = child.wait();
}

fn bench_uds(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("moltbot-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tempdir");
    let path = dir.join("echo.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind");
    let child = spawn_child("uds", path.to_str().expect("utf-8 path"));
    let (s, _) = listener.accept().expect("accept");
    bench_stream(c, "uds", s, child);
    let _ = std::fs::remove_dir_all(&dir);
}

fn bench_tcp(c: &mut Criterion) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let child = spawn_child("tcp", &addr);
    let (s, _) = listener.accept().expect("accept");
    s.set_nodelay(true).expect("nodelay");
    bench_stream(c, "tcp", s, child);
}

fn bench_codec(c: &mut Criterion) {
    let body = vec![b'x'; 300];
    let req = Request {
        request_id: 42,
        deadline_us: 1_000_000,
        kind: Kind::AgentMessage,
        method: Method::Post,
        user_id: "user-1234",
        stream: false,
        path: "",
        call_id: "",
        body: &body,
    };
    let mut slot = AlignedBuf::with_capacity(4096);
    c.bench_function("codec/request_encode_access", |b| {
        b.iter(|| {
            let bytes = slot.zeroed_mut(req.encoded_len_bound());
            let n = req.encode_into(bytes).expect("encode");
            let a = access_request(&bytes[..n]).expect("access");
            std::hint::black_box(a.body.len())
        })
    });
}

fn main() {
    if let Ok(role) = std::env::var(CHILD_ENV) {
        child_main(&role);
        return;
    }
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    bench_shm(&mut c, "shm", &[64, 1024]);
    bench_shm(&mut c, "shm_park", &[64]);
    bench_uds(&mut c);
    bench_tcp(&mut c);
    bench_codec(&mut c);
    c.final_summary();
}
