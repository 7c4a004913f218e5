//! One HTTP/1.1 connection: keep-alive, pipelining (answers in order), Content-Length and
//! chunked bodies, `Expect: 100-continue`, HTTP/1.0, timeouts, and back-pressure (a client
//! that does not read its answers stops being read from).

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::gateway::answer::{Answer, DIRECT_BODY, write_answer, write_answer_to};
use crate::gateway::endpoints::{self, Prepared};
use crate::gateway::http::{self, BodyFraming, ChunkedDecoder, HttpError, Limits, RequestHead};
use crate::gateway::reactor::Reactor;
use crate::metrics::Endpoint;
use crate::pool::reply::{Delivery, Reply};

/// Most pipelined requests prepared before the first answer is written.
const PIPELINE_DEPTH: usize = 32;
/// Least bytes of answers a connection may hold for a client whose socket takes no more (see
/// [`Conn::held`]); at least two ring frames, so that a large answer and the next one fit.
const HELD_ANSWERS_MIN: usize = 16 << 20;
/// How often a blocked write looks at the bytes of answers its connection holds.
const HELD_CHECK: Duration = Duration::from_millis(20);
/// How long a connection may hold more than its limit of answers without writing one out.
const HELD_STALL: Duration = Duration::from_secs(1);

/// Bytes asked of each read.
const READ_CHUNK: usize = 16 * 1024;
/// Bytes asked of a read while little is buffered: small requests on many idle keep-alive
/// connections then cost 4 KiB each, not 16.
const SMALL_READ: usize = 4 * 1024;

/// Answers 503 and closes: the core is at its connection limit.
pub async fn reject(stream: TcpStream) {
    let a = Answer::error(
        Endpoint::Other,
        503,
        "TOO_MANY_CONNECTIONS",
        "the gateway is at its connection limit",
        true,
        Some(Duration::from_secs(1)),
    );
    answer_and_close(stream, &a).await;
}

/// Writes `a` (giving up after a second: the client may not read) and closes the connection.
pub async fn answer_and_close(mut stream: TcpStream, a: &Answer) {
    let mut out = Vec::with_capacity(256);
    write_answer(&mut out, a, false);
    let write = stream.write_all(&out);
    let _ = glommio::timer::timeout(Duration::from_secs(1), async {
        write.await.map_err(Into::into)
    })
    .await;
    let _ = stream.close().await;
}

/// The bytes read from the socket and not yet consumed.
struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    fn new() -> Self {
        ReadBuf {
            buf: vec![0; SMALL_READ],
            start: 0,
            end: 0,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room for at least `SMALL_READ` more bytes, `READ_CHUNK` once a larger request is being
    /// read (compacting first). The parser's limits bound what accumulates.
    fn spare(&mut self) -> &mut [u8] {
        let want = if self.end - self.start >= SMALL_READ {
            READ_CHUNK
        } else {
            SMALL_READ
        };
        if self.start > 0 && self.buf.len() - self.end < want {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            self.buf.resize(self.end + want, 0);
        }
        &mut self.buf[self.end..]
    }

    fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// Gives back memory after a large request.
    fn shrink(&mut self) {
        if self.buf.len() > READ_CHUNK && self.end - self.start < SMALL_READ {
            let data = self.data().to_vec();
            self.buf = vec![0; SMALL_READ.max(data.len())];
            self.buf[..data.len()].copy_from_slice(&data);
            self.start = 0;
            self.end = data.len();
        }
    }
}

enum ReadOutcome {
    Data,
    Eof,
    TimedOut,
    Closing,
    Failed,
}

struct Conn {
    reactor: Rc<Reactor>,
    stream: TcpStream,
    rb: ReadBuf,
    /// How far the request at the front of `rb` has been parsed.
    front: Partial,
    /// Bytes of the workers' answers to this connection's requests that are still held (in
    /// flight to it, or waiting behind an answer its client has not taken), counted by the
    /// lanes as they arrive. While a write blocks, a client that lets more than `held_limit`
    /// pile up and takes none of it for [`HELD_STALL`] is disconnected: pipelined requests
    /// for large answers cost the gateway bounded memory per connection.
    held: Arc<AtomicUsize>,
    held_limit: usize,
    out: Vec<u8>,
    limits: Limits,
}

impl Conn {
    /// Reads more bytes, giving up at `deadline` (kept by the core's [`Deadlines`], so up to
    /// a grain late); while `idle` (nothing buffered) a stop also ends the wait. An idle
    /// connection's deadline is always ahead (now plus the keep-alive timeout); a partial
    /// request's may have passed already.
    ///
    /// [`Deadlines`]: crate::gateway::deadline::Deadlines
    async fn read_more(&mut self, deadline: Instant, idle: bool) -> ReadOutcome {
        enum Woke {
            Read(std::io::Result<usize>),
            Timer,
            Closing,
        }
        if !idle && deadline <= Instant::now() {
            return ReadOutcome::TimedOut;
        }
        let reactor = self.reactor.clone();
        let stream = &mut self.stream;
        let spare = self.rb.spare();
        let read = async { Woke::Read(stream.read(spare).await) };
        let timer = async {
            reactor.deadlines.until(deadline).await;
            Woke::Timer
        };
        let closing = async {
            if idle {
                reactor.closing.wait().await;
            } else {
                std::future::pending::<()>().await;
            }
            Woke::Closing
        };
        match futures_lite::future::or(read, futures_lite::future::or(timer, closing)).await {
            Woke::Read(Ok(0)) => ReadOutcome::Eof,
            Woke::Read(Ok(n)) => {
                self.rb.filled(n);
                ReadOutcome::Data
            }
            Woke::Read(Err(_)) => ReadOutcome::Failed,
            Woke::Timer => ReadOutcome::TimedOut,
            Woke::Closing => ReadOutcome::Closing,
        }
    }

    async fn flush(&mut self) -> bool {
        if self.out.is_empty() {
            return true;
        }
        // A client that does not read its answers blocks here (bounded by the idle timeout),
        // and meanwhile nothing more is read from it: back-pressure, bounded memory.
        let idle = self.reactor.shared.config.idle_timeout;
        let stream = &mut self.stream;
        let out = &self.out;
        let mut write = std::pin::pin!(stream.write_all(out));
        // Usually the socket takes it all at once: no timer needed.
        let ok = match futures_lite::future::poll_once(&mut write).await {
            Some(r) => r.is_ok(),
            None => {
                let write =
                    glommio::timer::timeout(idle, async { write.await.map_err(Into::into) });
                within_held(&self.held, self.held_limit, write).await
            }
        };
        self.out.clear();
        if self.out.capacity() > 1 << 20 {
            self.out = Vec::new();
        }
        ok
    }

    /// Writes `bytes` to the socket (bounded by the idle timeout and the answers held, like
    /// `flush`).
    async fn write_direct(&mut self, bytes: &[u8]) -> bool {
        let idle = self.reactor.shared.config.idle_timeout;
        let stream = &mut self.stream;
        let write = glommio::timer::timeout(idle, async {
            stream.write_all(bytes).await.map_err(Into::into)
        });
        within_held(&self.held, self.held_limit, write).await
    }

    async fn write_error_and_close(&mut self, e: HttpError) {
        let a = Answer::error(
            Endpoint::Other,
            e.status(),
            e.code(),
            &e.to_string(),
            false,
            None,
        );
        self.reactor
            .metrics
            .record(a.endpoint, a.status, Duration::ZERO);
        write_answer(&mut self.out, &a, false);
        self.flush().await;
    }
}

/// Whether `write` succeeds before the answers `held` for its connection stay over `limit`
/// for [`HELD_STALL`] without going down (a client that does not read while its pipelined
/// requests' answers pile up; one that reads lets them go down as each is written).
async fn within_held<T, E>(
    held: &AtomicUsize,
    limit: usize,
    write: impl std::future::Future<Output = Result<T, E>>,
) -> bool {
    let watch = async {
        let mut before = held.load(Ordering::Relaxed);
        let mut since = Instant::now();
        loop {
            glommio::timer::sleep(HELD_CHECK).await;
            let now = held.load(Ordering::Relaxed);
            if now < before || now <= limit {
                since = Instant::now();
            }
            before = now;
            if now > limit && since.elapsed() >= HELD_STALL {
                return false;
            }
        }
    };
    futures_lite::future::or(async { write.await.is_ok() }, watch).await
}

/// A prepared request waiting for its turn to be answered.
struct Pending {
    prepared: Prepared,
    keep: bool,
    started: Instant,
    /// The request was HEAD: answer without a body.
    head_only: bool,
    /// The client speaks HTTP/1.1: a stream is sent in chunked encoding, else as is, ended by
    /// the connection's close.
    chunked: bool,
}

impl Pending {
    /// A prepared request. The connection stays open after its answer if the client asked
    /// for that, the gateway is not stopping, and the answer is not a stream to an HTTP/1.0
    /// client (whose end only the close can mark).
    fn new(prepared: Prepared, head: &RequestHead, stopping: bool, started: Instant) -> Pending {
        let chunked = head.version == http::Version::Http11;
        let streaming = matches!(prepared, Prepared::Streaming(_));
        Pending {
            keep: head.keep_alive && !stopping && (chunked || !streaming),
            prepared,
            started,
            head_only: head.method == http::Method::Head,
            chunked,
        }
    }
}

/// A request read from the buffer, with its body.
enum Parsed {
    /// A complete request whose body is `rb.data()[head_len..head_len + body_len]`.
    InBuffer { head: RequestHead, body_len: usize },
    /// A complete chunked request, body decoded; `consumed` bytes of the buffer used.
    Decoded {
        head: RequestHead,
        body: Vec<u8>,
        consumed: usize,
    },
    /// More bytes are needed; the head, once complete, is in the [`Partial`].
    Incomplete,
}

/// The request at the front of the read buffer as far as it has been parsed: its head once
/// complete, and a chunked body's decoder and what it decoded. Kept across reads so that each
/// read parses only the bytes that arrived: parsed from the start at every read, a client
/// sending a large head or a chunked body in small segments cost the core time quadratic in
/// its request.
#[derive(Debug, Default)]
struct Partial {
    head: Option<RequestHead>,
    chunked: ChunkedDecoder,
    /// The chunked body decoded so far.
    body: Vec<u8>,
    /// Bytes after the head the decoder has taken.
    raw: usize,
}

/// Tries to take one complete request from the front of the buffer, `front` holding how far
/// earlier calls got with the same request (the buffer only grew since). A complete request
/// leaves `front` empty for the next one.
fn parse_one(data: &[u8], limits: &Limits, front: &mut Partial) -> Result<Parsed, HttpError> {
    let head = match front.head.take() {
        Some(head) => head,
        None => match http::parse_head(data, limits)? {
            Some(head) => head,
            None => return Ok(Parsed::Incomplete),
        },
    };
    let rest = &data[head.head_len..];
    match head.body {
        BodyFraming::None => Ok(Parsed::InBuffer { head, body_len: 0 }),
        BodyFraming::Length(n) => {
            let n = n as usize;
            if rest.len() >= n {
                Ok(Parsed::InBuffer { head, body_len: n })
            } else {
                front.head = Some(head);
                Ok(Parsed::Incomplete)
            }
        }
        BodyFraming::Chunked => {
            let p = front
                .chunked
                .decode(&rest[front.raw..], &mut front.body, limits)?;
            front.raw += p.consumed;
            if p.done {
                let consumed = head.head_len + front.raw;
                let body = std::mem::take(front).body;
                Ok(Parsed::Decoded {
                    head,
                    body,
                    consumed,
                })
            } else if rest.len() > chunked_raw_limit(limits) {
                // The raw chunked bytes stay buffered until the body is complete. Chunk
                // extensions and tiny chunks make them arbitrarily larger than the decoded
                // body, so they are bounded too.
                Err(HttpError::BodyTooLarge)
            } else {
                front.head = Some(head);
                Ok(Parsed::Incomplete)
            }
        }
    }
}

/// Most raw bytes (framing included) a chunked body may take in the buffer: twice the body
/// limit plus 64 KiB, room for any sensible chunking (8-byte chunks cost 1.6×).
fn chunked_raw_limit(limits: &Limits) -> usize {
    limits
        .max_body_bytes
        .saturating_mul(2)
        .saturating_add(64 * 1024)
}

/// Serves a connection until it closes, errs, times out, or the gateway stops.
pub async fn serve(reactor: Rc<Reactor>, stream: TcpStream) {
    let c = &reactor.shared.config;
    let limits = Limits {
        max_header_bytes: c.max_header_bytes,
        max_headers: c.max_headers,
        max_body_bytes: c.max_body_bytes,
        max_uri_bytes: c.max_uri_bytes,
    };
    let mut conn = Conn {
        reactor: reactor.clone(),
        stream,
        rb: ReadBuf::new(),
        front: Partial::default(),
        held: Arc::new(AtomicUsize::new(0)),
        held_limit: HELD_ANSWERS_MIN.max(2 * c.ring_capacity),
        out: Vec::new(),
        limits,
    };
    if let Some((head, early)) = serve_loop(&mut conn).await {
        // The metrics count the upgrade as a request of its own.
        reactor.metrics.request_finished();
        crate::gateway::ws::serve(reactor, conn.stream, head, early).await;
        return;
    }
    let _ = conn.stream.close().await;
}

/// Serves HTTP until the connection ends; `Some` hands it over to WebSocket: the upgrade
/// request and the bytes that followed it.
async fn serve_loop(conn: &mut Conn) -> Option<(RequestHead, Vec<u8>)> {
    let reactor = conn.reactor.clone();
    let shared = reactor.shared.clone();
    let cfg = shared.config.clone();
    // When the first byte of the current head arrived (slow-header defence), and by when its
    // body must be complete once the head is (a minimum upload rate).
    let mut head_started: Option<Instant> = None;
    let mut body_deadline: Option<Instant> = None;
    let mut continue_sent = false;
    // Whether the one read of already-arrived bytes at a drain was done.
    let mut drain_read = false;
    loop {
        if shared.stopping_fast() {
            return None;
        }
        // 1. Prepare every complete request in the buffer (pipelining), in order.
        let mut batch: Vec<Pending> = Vec::new();
        let mut close_after = false;
        let mut need_more;
        'prepare: loop {
            need_more = false;
            while batch.len() < PIPELINE_DEPTH && !close_after {
                if conn.rb.data().is_empty() {
                    need_more = true;
                    break;
                }
                let parsed = match parse_one(conn.rb.data(), &conn.limits, &mut conn.front) {
                    Ok(p) => p,
                    Err(e) => {
                        // Answer what came before, then the error, then close.
                        finish_batch(conn, batch, true).await;
                        conn.write_error_and_close(e).await;
                        return None;
                    }
                };
                let started = Instant::now();
                match parsed {
                    Parsed::Incomplete => {
                        if head_started.is_none() {
                            head_started = Some(started);
                        }
                        let head = conn.front.head.as_ref();
                        if let (Some(h), None) = (head, body_deadline) {
                            body_deadline = Some(started + body_time(&h.body, &cfg));
                        }
                        if head.is_some_and(|h| h.expect_continue)
                            && !continue_sent
                            && batch.is_empty()
                        {
                            conn.out.extend_from_slice(http::CONTINUE_100);
                            if !conn.flush().await {
                                return None;
                            }
                            continue_sent = true;
                        }
                        need_more = true;
                        break;
                    }
                    Parsed::InBuffer { head, body_len }
                        if crate::gateway::ws::is_upgrade(&head) && !shared.stopping() =>
                    {
                        // Answer what came before it, then the connection speaks WebSocket.
                        if !finish_batch(conn, batch, false).await {
                            return None;
                        }
                        reactor.metrics.request_started();
                        conn.rb.consume(head.head_len + body_len);
                        return Some((head, conn.rb.data().to_vec()));
                    }
                    Parsed::InBuffer { head, body_len } => {
                        head_started = None;
                        body_deadline = None;
                        continue_sent = false;
                        reactor.metrics.request_started();
                        let body_start = head.head_len;
                        let prepared = {
                            let data = conn.rb.data();
                            let body = &data[body_start..body_start + body_len];
                            endpoints::prepare(&reactor, &head, body, &conn.held).await
                        };
                        conn.rb.consume(body_start + body_len);
                        let p = Pending::new(prepared, &head, shared.stopping(), started);
                        close_after = !p.keep;
                        batch.push(p);
                    }
                    Parsed::Decoded {
                        head,
                        body,
                        consumed,
                    } => {
                        head_started = None;
                        body_deadline = None;
                        continue_sent = false;
                        reactor.metrics.request_started();
                        conn.rb.consume(consumed);
                        let prepared = endpoints::prepare(&reactor, &head, &body, &conn.held).await;
                        let p = Pending::new(prepared, &head, shared.stopping(), started);
                        close_after = !p.keep;
                        batch.push(p);
                    }
                }
            }
            // Draining: requests that already reached the socket are in flight too. Take them in
            // (once) so that they are answered, the last answer saying `connection: close`,
            // instead of being dropped with the connection.
            if shared.stopping() && !drain_read && !close_after && batch.len() < PIPELINE_DEPTH {
                drain_read = true;
                let soon = Instant::now() + Duration::from_millis(2);
                if matches!(conn.read_more(soon, false).await, ReadOutcome::Data) {
                    continue 'prepare;
                }
            }
            break;
        }

        // 2. Answer them in order.
        if !batch.is_empty() {
            if !finish_batch(conn, batch, false).await || close_after || shared.stopping() {
                return None;
            }
            conn.rb.shrink();
            // The time spent answering was the server's: restart the clocks of a partial
            // request behind the batch (they started when it was seen, before the answers;
            // a slow answer used to time out a client that had done nothing wrong).
            head_started = None;
            body_deadline = None;
            continue;
        }
        // 3. Read more: an idle connection waits up to the keep-alive timeout (and gives way
        //    to a stop); a partial request must complete within the header timeout.
        if need_more {
            let idle = conn.rb.data().is_empty();
            if idle && shared.stopping() {
                if drain_read {
                    return None;
                }
                drain_read = true;
                let soon = Instant::now() + Duration::from_millis(2);
                if matches!(conn.read_more(soon, false).await, ReadOutcome::Data) {
                    continue;
                }
                return None;
            }
            let deadline = match (body_deadline, head_started) {
                _ if idle => Instant::now() + cfg.idle_timeout,
                (Some(d), _) => d,
                (None, Some(t)) => t + cfg.header_read_timeout,
                (None, None) => Instant::now() + cfg.header_read_timeout,
            };
            // After data the head's clock starts where it is parsed, next.
            match conn.read_more(deadline, idle).await {
                ReadOutcome::Data => {}
                ReadOutcome::TimedOut if !idle => {
                    let a = Answer::error(
                        Endpoint::Other,
                        408,
                        "REQUEST_TIMEOUT",
                        "the request was not received in time",
                        false,
                        None,
                    );
                    reactor.metrics.record(a.endpoint, a.status, Duration::ZERO);
                    write_answer(&mut conn.out, &a, false);
                    conn.flush().await;
                    return None;
                }
                ReadOutcome::TimedOut
                | ReadOutcome::Eof
                | ReadOutcome::Closing
                | ReadOutcome::Failed => return None,
            }
        }
    }
}

/// Bytes per second a body must arrive at, at least, once its head is complete.
const MIN_BODY_RATE: u64 = 64 * 1024;

/// Time allowed for a body after its head: the header timeout plus what the body needs at
/// the minimum rate.
fn body_time(framing: &BodyFraming, cfg: &crate::config::Config) -> Duration {
    let bytes = match framing {
        BodyFraming::Length(n) => *n,
        _ => cfg.max_body_bytes as u64,
    };
    cfg.header_read_timeout + Duration::from_secs(bytes / MIN_BODY_RATE)
}

/// Waits for each prepared request in order and writes the answers. False if the connection
/// broke.
///
/// Each answer keeps the connection alive as its request asked, except the last one once a
/// drain began (checked when it is written, not when the batch started): after it the
/// connection closes. `more_follows`: another answer is written after the batch.
async fn finish_batch(conn: &mut Conn, batch: Vec<Pending>, more_follows: bool) -> bool {
    let n = batch.len();
    let mut batch = batch.into_iter().enumerate();
    let written = answer_in_order(conn, &mut batch, n, more_follows).await;
    // Requests behind an answer that could not be written get none: they end here.
    for _ in batch {
        conn.reactor.metrics.request_finished();
    }
    written
}

/// Answers the requests of `batch` in order until one cannot be written (`false`).
async fn answer_in_order(
    conn: &mut Conn,
    batch: &mut impl Iterator<Item = (usize, Pending)>,
    n: usize,
    more_follows: bool,
) -> bool {
    for (i, p) in batch {
        let Pending {
            prepared,
            keep,
            started,
            head_only,
            chunked,
        } = p;
        let answer = match prepared {
            Prepared::Streaming(mut w) if !head_only => match w.next().await {
                Delivery::Final(outcome) => w.answer(outcome),
                Delivery::Part(first) => {
                    let endpoint = crate::metrics::Endpoint::Agent;
                    let last = i + 1 == n && !more_follows;
                    let keep = keep && !(last && conn.reactor.shared.stopping());
                    let (ok, status) = stream_events(conn, w, first, chunked, keep).await;
                    let metrics = &conn.reactor.metrics;
                    metrics.request_finished();
                    metrics.record(endpoint, status, started.elapsed());
                    if !ok {
                        return false;
                    }
                    continue;
                }
            },
            p => p.finish().await,
        };
        let metrics = &conn.reactor.metrics;
        metrics.request_finished();
        metrics.record(answer.endpoint, answer.status, started.elapsed());
        let last = i + 1 == n && !more_follows;
        let keep = keep && !(last && conn.reactor.shared.stopping());
        let direct = !head_only && answer.body.as_slice().len() >= DIRECT_BODY;
        write_answer_to(&mut conn.out, &answer, keep, head_only, !direct);
        if direct {
            // Head, then the body from the worker's answer itself: no copy behind the head.
            if !conn.flush().await || !conn.write_direct(answer.body.as_slice()).await {
                return false;
            }
            continue;
        }
        // Write as answers become ready once the buffer is large, otherwise all at once.
        if (conn.out.len() >= 64 * 1024 || i + 1 == n) && !conn.flush().await {
            return false;
        }
    }
    true
}

/// Writes a streaming answer as Server-Sent Events: a 200 head, one event per worker event
/// (`event: NAME`, the JSON payload as `data`), then the final answer as event `result` (or
/// `error`, with the body the request would have got without streaming), in chunked
/// encoding (`chunked`) or as is. Returns whether the connection is still usable, and the
/// final status.
async fn stream_events(
    conn: &mut Conn,
    mut w: endpoints::Waiting,
    first: Reply,
    chunked: bool,
    keep: bool,
) -> (bool, u16) {
    let worker = crate::gateway::answer::worker_header(w.slot());
    http::write_stream_head(
        &mut conn.out,
        "text/event-stream",
        chunked,
        keep,
        &[("x-moltbot-worker", &worker), ("cache-control", "no-cache")],
    );
    let piece = |out: &mut Vec<u8>, event: &[u8]| {
        if chunked {
            http::write_chunk(out, event);
        } else {
            out.extend_from_slice(event);
        }
    };
    if !conn.flush().await {
        return (false, 200);
    }
    let mut part = first;
    let outcome = loop {
        let mut event = Vec::new();
        sse_event(&mut event, &part.event, part.body());
        piece(&mut conn.out, &event);
        if !conn.flush().await {
            return (false, 200);
        }
        match w.next().await {
            Delivery::Part(p) => part = p,
            Delivery::Final(outcome) => break outcome,
        }
    };
    let a = w.answer(outcome);
    let name = if (200..300).contains(&a.status) {
        "result"
    } else {
        "error"
    };
    let mut event = Vec::new();
    sse_event(&mut event, name, a.body.as_slice());
    piece(&mut conn.out, &event);
    if chunked {
        http::write_last_chunk(&mut conn.out);
    }
    (conn.flush().await, a.status)
}

/// One Server-Sent Event: `event: NAME`, then `data:` lines (one per line of `data`).
fn sse_event(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(if name.is_empty() {
        b"accepted"
    } else {
        name.as_bytes()
    });
    out.push(b'\n');
    for line in data.split(|&b| b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        out.push(b'\n');
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_sent_events_keep_each_line_of_the_data() {
        let mut out = Vec::new();
        sse_event(&mut out, "agent", b"{\"a\":\n1}");
        assert_eq!(out, b"event: agent\ndata: {\"a\":\ndata: 1}\n\n");
    }

    #[test]
    fn chunked_framing_is_bounded_with_the_body() {
        let limits = Limits {
            max_body_bytes: 1024,
            ..Limits::default()
        };
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        let chunk = format!("1;{}\r\nX\r\n", "e".repeat(1000));
        let mut req = head.to_vec();
        while req.len() + chunk.len() <= head.len() + chunked_raw_limit(&limits) {
            req.extend_from_slice(chunk.as_bytes());
        }
        // At the bound: still waiting for more (the decoded body is small).
        let mut front = Partial::default();
        assert!(matches!(
            parse_one(&req, &limits, &mut front),
            Ok(Parsed::Incomplete)
        ));
        assert!(front.head.is_some());
        req.extend_from_slice(chunk.as_bytes());
        assert!(matches!(
            parse_one(&req, &limits, &mut front),
            Err(HttpError::BodyTooLarge)
        ));
        // Ordinary chunking of a body at the limit is far below the bound.
        let mut req = head.to_vec();
        for _ in 0..4 {
            req.extend_from_slice(b"100\r\n");
            req.extend_from_slice(&[b'b'; 256]);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        match parse_one(&req, &limits, &mut Partial::default()) {
            Ok(Parsed::Decoded { body, consumed, .. }) => {
                assert_eq!(body.len(), 1024);
                assert_eq!(consumed, req.len());
            }
            _ => panic!("expected a decoded body"),
        }
    }

    /// What one call to `parse_one` returns for the first request of `data`, as comparable
    /// text: the request's target and body, and the bytes it took.
    fn outcome(p: Result<Parsed, HttpError>, data: &[u8]) -> String {
        match p {
            Ok(Parsed::InBuffer { head, body_len }) => format!(
                "{} {:?} {}",
                head.target,
                &data[head.head_len..head.head_len + body_len],
                head.head_len + body_len
            ),
            Ok(Parsed::Decoded {
                head,
                body,
                consumed,
            }) => format!("{} {body:?} {consumed}", head.target),
            Ok(Parsed::Incomplete) => "incomplete".into(),
            Err(e) => format!("error {e}"),
        }
    }

    /// Fed as the bytes arrive, split anywhere, the parse keeps its place between reads (the
    /// head is parsed once, each chunked byte decoded once) and ends as a parse of the whole.
    #[test]
    fn a_request_parsed_as_it_arrives_is_parsed_once() {
        let limits = Limits::default();
        let requests: [&[u8]; 3] = [
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
3;ext=1\r\nabc\r\n1\r\nd\r\n0\r\nTrailer: t\r\n\r\nGET /next HTTP/1.1\r\n",
            b"POST /l HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /next",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ];
        for data in requests {
            let whole = outcome(parse_one(data, &limits, &mut Partial::default()), data);
            for step in [1, 2, 7] {
                let mut front = Partial::default();
                let mut end = 0;
                let last = loop {
                    end = (end + step).min(data.len());
                    let p = parse_one(&data[..end], &limits, &mut front);
                    if !matches!(p, Ok(Parsed::Incomplete)) || end == data.len() {
                        break outcome(p, data);
                    }
                    if let Some(head) = &front.head {
                        // Every byte after the head that has arrived was decoded once.
                        if head.body == BodyFraming::Chunked {
                            assert_eq!(head.head_len + front.raw, end, "{step}");
                        }
                    }
                };
                assert_eq!(last, whole, "{:?} by {step}", String::from_utf8_lossy(data));
            }
        }
    }
}
