//! `moltbot-echo`: a single-threaded HTTP/1.1 echo server, the upstream behind nginx and
//! HAProxy in `tools/compare` (and the "direct" floor). It plays the part of one worker: it
//! answers every request with the request body and `x-moltbot-worker: <name>`, on keep-alive
//! connections, from one thread on an epoll set, like a gateway worker serves its lanes.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;

use anyhow::Context;
use clap::Parser;
use rustix::event::epoll;
use rustix::io::Errno;

/// A single-threaded HTTP/1.1 echo server.
#[derive(Parser, Debug)]
#[command(name = "moltbot-echo", version)]
struct Args {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Value of the `x-moltbot-worker` header in every answer.
    #[arg(long, default_value = "worker-0")]
    name: String,
    /// Exit after this many seconds (0 = run until killed).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
}

const LISTENER: u64 = u64::MAX;
/// Largest request (head + body) accepted.
const MAX_REQUEST: usize = 2 << 20;

struct Conn {
    stream: TcpStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    /// Registered for writability (output pending).
    want_out: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).context("bind")?;
    listener.set_nonblocking(true)?;
    println!("{}", listener.local_addr()?);
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    epoll::add(
        &ep,
        listener.as_fd(),
        epoll::EventData::new_u64(LISTENER),
        epoll::EventFlags::IN,
    )?;
    let deadline = (args.seconds > 0)
        .then(|| std::time::Instant::now() + std::time::Duration::from_secs(args.seconds));
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut next_id = 0u64;
    let mut events: Vec<epoll::Event> = Vec::with_capacity(1024);
    let timeout = rustix::time::Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    loop {
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Ok(());
        }
        events.clear();
        match epoll::wait(
            &ep,
            rustix::buffer::spare_capacity(&mut events),
            Some(&timeout),
        ) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        for ev in &events {
            let id = ev.data.u64();
            if id == LISTENER {
                while let Ok((stream, _)) = listener.accept() {
                    stream.set_nonblocking(true)?;
                    stream.set_nodelay(true)?;
                    let id = next_id;
                    next_id += 1;
                    epoll::add(
                        &ep,
                        stream.as_fd(),
                        epoll::EventData::new_u64(id),
                        epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
                    )?;
                    conns.insert(
                        id,
                        Conn {
                            stream,
                            inbuf: Vec::with_capacity(4096),
                            out: Vec::with_capacity(4096),
                            written: 0,
                            want_out: false,
                        },
                    );
                }
                continue;
            }
            let close = match conns.get_mut(&id) {
                Some(c) => !serve(c, &args.name, &ep, id),
                None => false,
            };
            if close && let Some(c) = conns.remove(&id) {
                let _ = epoll::delete(&ep, c.stream.as_fd());
            }
        }
    }
}

/// Reads what is there, answers every complete request, writes what it can. False: close.
fn serve(c: &mut Conn, name: &str, ep: &rustix::fd::OwnedFd, id: u64) -> bool {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match rustix::io::read(&c.stream, &mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                c.inbuf.extend_from_slice(&buf[..n]);
                if c.inbuf.len() > MAX_REQUEST {
                    return false;
                }
                if n < buf.len() {
                    break;
                }
            }
            Err(Errno::AGAIN) => break,
            Err(Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
    let mut consumed = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&c.inbuf[consumed..]) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => break,
            Err(_) => return false,
        };
        let len: usize = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
            .unwrap_or(0);
        let start = consumed + head_len;
        if c.inbuf.len() < start + len {
            break;
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {len}\r\nx-moltbot-worker: {name}\r\n\r\n"
        );
        c.out.extend_from_slice(head.as_bytes());
        c.out.extend_from_slice(&c.inbuf[start..start + len]);
        consumed = start + len;
    }
    c.inbuf.drain(..consumed);
    while c.written < c.out.len() {
        match rustix::io::write(&c.stream, &c.out[c.written..]) {
            Ok(n) => c.written += n,
            Err(Errno::AGAIN) => break,
            Err(Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
    if c.written == c.out.len() {
        c.out.clear();
        c.written = 0;
    }
    // Wait for writability only while output is pending (one epoll_ctl per change, not per
    // request).
    let want_out = !c.out.is_empty();
    if want_out == c.want_out {
        return true;
    }
    c.want_out = want_out;
    let mut flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
    if want_out {
        flags |= epoll::EventFlags::OUT;
    }
    epoll::modify(ep, c.stream.as_fd(), epoll::EventData::new_u64(id), flags).is_ok()
}
