//! Hostile WebSocket clients against a real gateway, mostly over raw sockets (the bytes a
//! codec would refuse to write): frames that break RFC 6455, the size limits before and after
//! `connect`, floods, thousands of idle connections, silence, clients that never read, bytes
//! trickled one at a time. Each test ends by proving the gateway still serves a fresh client.

mod gw;
mod ws;

use gw::{GatewayProc, Options, write_bytewise};
use serde_json::json;
use std::io::Write;
use ws::{
    Closed, Raw, connect_params, frame, hello, next_res, open, req, rss_kib, send,
    serves_fresh_client, text_frame, upgrade_request,
};

fn open_gateway(args: &[&str]) -> GatewayProc {
    GatewayProc::start(Options::new(1).args(args))
}

/// A raw connection of `user` that completed the handshake.
fn authed(g: &GatewayProc, user: &str) -> Raw {
    let mut r = Raw::open(g, &format!("/?user={user}"), &[], &[]);
    r.hello(None);
    r
}

#[test]
fn frames_that_break_rfc_6455_close_with_their_codes() {
    let g = open_gateway(&[]);
    // (what, bytes sent before connect or after hello, expected close code)
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked text", frame(true, 0x1, b"{}", false), 1002),
        ("unmasked ping", frame(true, 0x9, b"p", false), 1002),
        ("fragmented ping", frame(false, 0x9, b"p", true), 1002),
        ("fragmented close", frame(false, 0x8, &[3, 232], true), 1002),
        ("reserved opcode", frame(true, 0x3, b"x", true), 1002),
        (
            "RSV bit",
            {
                let mut f = frame(true, 0x1, b"{}", true);
                f[0] |= 0x40;
                f
            },
            1002,
        ),
        ("continuation first", frame(true, 0x0, b"x", true), 1002),
        ("binary", frame(true, 0x2, b"\x00\x01", true), 1003),
        (
            "invalid UTF-8",
            frame(true, 0x1, b"{\"a\":\"\xff\xfe\"}", true),
            1007,
        ),
        (
            "invalid UTF-8 across fragments",
            {
                let mut f = frame(false, 0x1, b"{\"a\":\"\xe2", true);
                f.extend(frame(true, 0x0, b"\x28\xa1\"}", true));
                f
            },
            1007,
        ),
        (
            "control frame over 125 bytes",
            {
                // A ping header claiming 126 bytes (the 16-bit length form).
                let mut f = frame(true, 0x9, &[0u8; 126], true);
                f.truncate(8 + 126);
                f
            },
            1002,
        ),
    ];
    for (what, bytes, code) in &cases {
        for after_hello in [false, true] {
            let mut r = Raw::open(&g, "/?user=rfc", &[], &[]);
            if after_hello {
                r.hello(None);
            } else {
                let ch = r.text();
                assert_eq!(ch["event"], "connect.challenge");
            }
            r.write(bytes);
            let (how, texts) = r.closed();
            assert_eq!(
                how.code(),
                Some(*code),
                "{what} (after hello: {after_hello}): {how:?} {texts:?}"
            );
            assert!(texts.is_empty(), "{what}: {texts:?}");
        }
    }
    // The same bytes pipelined right behind the upgrade (the gateway's early bytes).
    let mut r = Raw::open(&g, "/?user=rfc", &[], &frame(true, 0x1, b"{}", false));
    assert_eq!(r.closed().0.code(), Some(1002));
    serves_fresh_client(&g, None, "rfc");
}

#[test]
fn size_limits_before_and_after_connect_close_with_1009() {
    // Frames up to 200 KiB after connect, so that the pre-auth limits (64 KiB per frame,
    // 128 KiB in all) are what refuses the bigger ones before it.
    let g = GatewayProc::start_overriding(Options::new(1), &[("--max-body-bytes", "200KiB")]);
    // One text frame over 64 KiB before connect.
    let mut r = Raw::open(&g, "/?user=big", &[], &[]);
    r.text();
    r.write(&frame(true, 0x1, &vec![b' '; 65 * 1024], true));
    assert_eq!(
        r.closed().0,
        Closed::Frame(1009, "frame too large before connect".into())
    );
    // Over 128 KiB before connect in frames under 64 KiB each: fragments of one message
    // (which the gateway does not answer, so nothing of its close is lost to unread data).
    let mut r = Raw::open(&g, "/?user=big", &[], &[]);
    r.text();
    let part = vec![b' '; 50 * 1024];
    for (i, op) in [0x1, 0x0, 0x0].into_iter().enumerate() {
        if r.s.write_all(&frame(i == 2, op, &part, true)).is_err() {
            break; // Closed already: the limit passed.
        }
    }
    let (how, _) = r.closed();
    assert_eq!(
        how,
        Closed::Frame(1009, "too much data before connect".into())
    );
    // After connect: a frame within 200 KiB is read (and answered), one beyond is 1009.
    let mut r = authed(&g, "big");
    let pad = "x".repeat(150 * 1024);
    r.write(&text_frame(&req(
        "fits",
        "health",
        Some(json!({ "pad": pad })),
    )));
    let res = r.text();
    assert_eq!(
        (res["id"].as_str(), res["ok"].as_bool()),
        (Some("fits"), Some(true))
    );
    r.write(&frame(true, 0x1, &vec![b' '; 201 * 1024], true));
    assert_eq!(r.closed().0.code(), Some(1009));
    // A frame header that claims 2^62 bytes is refused from the header alone.
    let mut r = authed(&g, "big");
    let mut f = vec![0x81, 0x80 | 127];
    f.extend_from_slice(&(1u64 << 62).to_be_bytes());
    f.extend_from_slice(&[1, 2, 3, 4]);
    r.write(&f);
    assert_eq!(r.closed().0.code(), Some(1009));
    serves_fresh_client(&g, None, "big");
}

#[test]
fn a_ping_flood_neither_stalls_others_nor_grows_the_gateway() {
    // A small outbound bound (the pongs the codec may queue are bounded by the largest frame,
    // a ring frame: the harness's 256 KiB).
    let g = open_gateway(&["--ws-max-buffered-bytes", "1MiB"]);
    let mut flood = authed(&g, "flood");
    let mut other = open(&g, "/?user=other", &[]);
    hello(&mut other, None);
    let pid = g.pid();
    let (_, peak_before) = rss_kib(pid);
    // Far more pong bytes than the kernel's socket buffers hold (~130 MB of pongs the flooder
    // never reads): a gateway that queued every pong would grow by about that much.
    const PINGS: usize = 1_000_000;
    let mut wr = flood.s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let ping = frame(true, 0x9, &[b'p'; 125], true);
        let batch: Vec<u8> = ping.repeat(1000);
        for _ in 0..PINGS / 1000 {
            if wr.write_all(&batch).is_err() {
                return false; // The gateway closed it: allowed.
            }
        }
        true
    });
    // Meanwhile another client is served (on any core).
    let mut n = 0;
    while !writer.is_finished() || n < 20 {
        let id = format!("o{n}");
        send(&mut other, &req(&id, "health", None));
        assert_eq!(next_res(&mut other, &id)["ok"], true);
        n += 1;
    }
    let all_sent = writer.join().expect("writer");
    // The flooder is either still served (its answer after the pongs) or was closed.
    if all_sent {
        flood.write(&text_frame(&req("after", "health", None)));
        loop {
            match flood.read_frame() {
                Some(f) if f.opcode == 0xA => {}
                Some(f) if f.opcode == 0x1 => {
                    let v: serde_json::Value = serde_json::from_slice(&f.payload).expect("JSON");
                    assert_eq!(v["id"], "after", "{v}");
                    break;
                }
                Some(f) if f.opcode == 0x8 => break,
                Some(f) => panic!("unexpected frame {f:?}"),
                None => break,
            }
        }
    }
    let (_, peak_after) = rss_kib(pid);
    assert!(
        peak_after < peak_before + 32 * 1024,
        "the gateway's peak RSS grew from {peak_before} KiB to {peak_after} KiB"
    );
    serves_fresh_client(&g, None, "flood");
}

/// Raises this process's soft open-files limit to its hard limit; returns the soft limit.
fn raise_nofile() -> u64 {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let hard = lim.maximum.unwrap_or(1 << 20);
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(hard),
            maximum: lim.maximum,
        },
    );
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(hard)
}

#[test]
fn ten_thousand_idle_connections_with_ticks_leave_the_gateway_responsive() {
    // The gateway holds one descriptor per connection, and so does this process: the count
    // is what both limits allow (the gateway lowers its own connection limit to fit its
    // limit, which it inherits from this process), with room for the rest of the test.
    let soft = raise_nofile();
    let count = 10_000usize.min((soft as usize).saturating_sub(512));
    assert!(
        count >= 1000,
        "open-files limit {soft} too low for this test"
    );
    if count < 10_000 {
        eprintln!("open-files limit {soft}: {count} idle connections instead of 10000");
    }
    // The connection limit is per gateway core, and the default may run one core: room for
    // every idle connection plus the fresh clients below.
    let limit = (count + 64).to_string();
    let g = open_gateway(&["--ws-tick-interval", "1s", "--max-connections", &limit]);
    // Each connection's upgrade and connect in one write; the gateway answers 101,
    // challenge and hello-ok, then ticks every second, all unread until the end.
    let mut bytes = upgrade_request("/?user=idle", &[]);
    bytes.extend(text_frame(&req(
        "c1",
        "connect",
        Some(connect_params(None)),
    )));
    let mut conns = Vec::with_capacity(count);
    // In batches whose answers are awaited, so that the listen backlog never overflows.
    for batch in 0..count.div_ceil(250) {
        let mut fresh = Vec::new();
        for _ in 0..250.min(count - batch * 250) {
            let mut s = g.connect();
            s.write_all(&bytes).expect("write");
            fresh.push(s);
        }
        for s in fresh {
            let mut r = Raw::after_upgrade(s);
            let ch = r.text();
            assert_eq!(ch["event"], "connect.challenge");
            let res = r.text();
            assert_eq!(res["ok"], true, "{res}");
            conns.push(r);
        }
    }
    // With all of them open: HTTP and a fresh WebSocket client are served.
    let r = g.request("GET", "/healthz", &[], None);
    assert_eq!(r.status, 200, "{}", r.text());
    serves_fresh_client(&g, None, "fresh");
    // Every idle connection is alive and got its ticks, numbered from 1.
    let mut ticked = 0;
    for r in &mut conns {
        let t = r.text();
        assert_eq!(t["event"], "tick", "{t}");
        assert_eq!(t["seq"], 1, "{t}");
        ticked += 1;
    }
    assert_eq!(ticked, count);
    drop(conns);
    serves_fresh_client(&g, None, "fresh");
}

#[test]
fn half_open_connections_are_closed_by_the_timeouts() {
    let g = open_gateway(&[
        "--ws-connect-timeout",
        "500ms",
        "--header-read-timeout",
        "500ms",
        "--idle-timeout",
        "500ms",
    ]);
    // Upgraded, then silence: the connect timeout.
    let mut r = Raw::open(&g, "/?user=h", &[], &[]);
    assert_eq!(r.text()["event"], "connect.challenge");
    assert_eq!(r.closed().0, Closed::Frame(1008, "connect timeout".into()));
    // Half an upgrade request, then silence: the header timeout (408, or just closed).
    let mut s = g.connect();
    let upgrade = upgrade_request("/?user=h", &[]);
    s.write_all(&upgrade[..upgrade.len() / 2]).expect("write");
    let raw = gw::read_until_closed(&mut s);
    assert!(
        raw.is_empty() || gw::status_of(&raw) == 408,
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // TCP connect, then nothing at all.
    let mut s = g.connect();
    let raw = gw::read_until_closed(&mut s);
    assert!(
        raw.is_empty() || gw::status_of(&raw) == 408,
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // A frame cut in the middle before connect: the connect timeout still applies.
    let mut r = Raw::open(&g, "/?user=h", &[], &[]);
    r.text();
    let f = text_frame(&req("c1", "connect", Some(connect_params(None))));
    r.write(&f[..f.len() / 2]);
    assert_eq!(r.closed().0, Closed::Frame(1008, "connect timeout".into()));
    serves_fresh_client(&g, None, "h");
}

/// A socket whose receive buffer is small, so that a client that does not read is noticed
/// without first filling megabytes of kernel buffers.
fn small_receive_buffer(s: &std::net::TcpStream) {
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(s, 4096);
}

#[test]
fn a_client_that_never_reads_is_closed_as_a_slow_consumer() {
    let g = open_gateway(&[
        "--ws-tick-interval",
        "20ms",
        "--ws-max-buffered-bytes",
        "64KiB",
    ]);
    let mut r = authed(&g, "slow");
    small_receive_buffer(&r.s);
    // Many requests with long ids whose answers it never reads (written from a thread: the
    // gateway stops reading them once it cannot send, and the write then blocks until the
    // connection is closed).
    let mut wr = r.s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let id = "i".repeat(250);
        let one = text_frame(&req(&id, "health", None));
        let batch = one.repeat(100);
        for _ in 0..1000 {
            if wr.write_all(&batch).is_err() {
                return;
            }
        }
    });
    // Meanwhile others are served.
    serves_fresh_client(&g, None, "other");
    // Reading now: the answers that made it, then the close (or a reset).
    let (how, _) = r.closed();
    assert!(
        matches!(&how, Closed::Frame(1008, reason) if reason == "slow consumer")
            || how == Closed::Socket,
        "{how:?}"
    );
    writer.join().expect("writer");
    serves_fresh_client(&g, None, "slow");
}

/// A client that neither answers the gateway's close nor closes is reset once the close's
/// second is up: what it has not read is dropped then, not left to the kernel, which delivers
/// it to a client whose window is shut with probes that back off to two minutes (a slow
/// consumer closed after reading all it sent took that long to see its close).
#[test]
fn a_client_that_does_not_answer_the_close_is_reset() {
    let g = open_gateway(&["--ws-connect-timeout", "200ms"]);
    // No `connect` within the timeout: the gateway closes with 1008. The client reads nothing
    // and answers nothing.
    let mut r = Raw::open(&g, "/?user=mute", &[], &[]);
    gw::wait_until("the gateway to reset the connection", || {
        rustix::net::sockopt::socket_error(&r.s)
            .is_ok_and(|e| e == Err(rustix::io::Errno::CONNRESET))
    });
    // What arrived before the reset is still there to read.
    assert_eq!(r.text()["event"], "connect.challenge");
    let (how, _) = r.closed();
    assert_eq!(how, Closed::Frame(1008, "connect timeout".into()));
    serves_fresh_client(&g, None, "mute");
}

/// A client with a tiny receive window (set before it connects, so that the window it
/// announces stays small) and small segments.
fn connect_with_small_buffers(g: &GatewayProc) -> std::net::TcpStream {
    use rustix::net::{AddressFamily, SocketType, sockopt};
    use std::os::fd::AsRawFd;
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    sockopt::set_socket_recv_buffer_size(&fd, 2048).expect("SO_RCVBUF");
    let mss: libc::c_int = 88;
    // SAFETY: `fd` is an open socket for the call; `mss` is a live c_int and its size is given.
    let set = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&raw const mss).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "TCP_MAXSEG");
    rustix::net::connect(&fd, &g.addr).expect("connect");
    let s = std::net::TcpStream::from(fd);
    s.set_write_timeout(Some(gw::DEADLINE)).expect("timeout");
    s.set_read_timeout(Some(gw::DEADLINE)).expect("timeout");
    s
}

/// Before `hello-ok` what the gateway sends is bounded by the connect timeout too: a client
/// that never reads, whose pongs fill the socket's buffers, then sends a frame the gateway
/// must refuse, does not hold the refusal's send (and its connection) open. It is reset.
#[test]
fn a_client_that_does_not_read_before_connect_is_reset_at_the_connect_timeout() {
    let g = open_gateway(&["--ws-connect-timeout", "300ms"]);
    let mut s = connect_with_small_buffers(&g);
    // The upgrade, pings whose pongs it never reads (within the 128 KiB allowed before
    // `connect`), then a first request that is not `connect`. Nothing is ever read.
    let mut bytes = upgrade_request("/?user=deaf", &[]);
    let ping = frame(true, 0x9, &[b'p'; 125], true);
    bytes.extend(ping.repeat(950));
    bytes.extend(text_frame(&req("h1", "health", None)));
    assert!(bytes.len() < 128 * 1024);
    s.write_all(&bytes).expect("write");
    gw::wait_until("the gateway to reset the connection", || {
        rustix::net::sockopt::socket_error(&s).is_ok_and(|e| e == Err(rustix::io::Errno::CONNRESET))
    });
    serves_fresh_client(&g, None, "deaf");
}

#[test]
fn a_connect_trickled_byte_by_byte_still_works() {
    let g = open_gateway(&[]);
    let mut s = g.connect();
    write_bytewise(&mut s, &upgrade_request("/?user=trickle", &[]));
    let mut r = Raw::after_upgrade(s);
    assert_eq!(r.text()["event"], "connect.challenge");
    let f = text_frame(&req("c1", "connect", Some(connect_params(None))));
    write_bytewise(&mut r.s, &f);
    let res = r.text();
    assert_eq!(res["ok"], true, "{res}");
    // A request trickled, with pings interleaved between its fragments.
    let body = req("t1", "health", None).to_string().into_bytes();
    let (a, b) = body.split_at(body.len() / 2);
    let mut bytes = frame(false, 0x1, a, true);
    bytes.extend(frame(true, 0x9, b"between", true));
    bytes.extend(frame(true, 0x0, b, true));
    write_bytewise(&mut r.s, &bytes);
    let res = r.text();
    assert_eq!(
        (res["id"].as_str(), res["ok"].as_bool()),
        (Some("t1"), Some(true))
    );
    serves_fresh_client(&g, None, "trickle");
}

#[test]
fn endless_pipelining_does_not_starve_the_other_users_of_its_worker() {
    // One worker: both users share its admission queue (10 in flight, 100 queued).
    let g = open_gateway(&[]);
    let mut a = authed(&g, "greedy");
    let mut wr = a.s.try_clone().expect("clone");
    const N: usize = 20_000;
    let writer = std::thread::spawn(move || {
        let mut batch = Vec::new();
        for i in 0..N {
            batch.extend(text_frame(&req(&format!("g{i}"), "health", None)));
            if batch.len() > 64 * 1024 || i == N - 1 {
                wr.write_all(&batch).expect("write");
                batch.clear();
            }
        }
    });
    let mut b = open(&g, "/?user=modest", &[]);
    hello(&mut b, None);
    // Every answer the greedy connection gets is a success: its requests wait at the gateway
    // instead of overflowing the worker's queue...
    let mut answered = 0;
    while answered < N {
        let res = a.text();
        if res["event"] == "tick" {
            continue;
        }
        assert_eq!(res["ok"], true, "{res}");
        answered += 1;
        // ...and meanwhile the other user of that worker is admitted too.
        if answered % 2000 == 0 {
            let id = format!("m{answered}");
            send(&mut b, &req(&id, "health", None));
            assert_eq!(next_res(&mut b, &id)["ok"], true);
        }
    }
    writer.join().expect("writer");
    serves_fresh_client(&g, None, "greedy");
}
