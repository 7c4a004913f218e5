//! The gateway's reading of what a (hostile) worker writes into a lane: the response ring
//! (positions, frame headers, payload bytes), the decoding of response frames and the checks
//! of `LaneClient::deliver`, and the recovery of the request ring from the worker's `head` and
//! `claimed` positions.
//!
//! The fuzzer plays the worker: it publishes well-formed responses through a real `Producer`,
//! publishes raw frames, scribbles anywhere in the ring's data area (also between the gateway's
//! check of a frame and its copy, as a concurrent writer would) and stores any value into the
//! positions. The writes a worker process could make directly go through a `Tamper`, which acts
//! while the worker's own end of that ring is dropped (a worker writing its mapping by hand
//! has no honest end left to speak of); such a worker gets an end again after the recovery.
//! The gateway side runs the lane's code path: `peek`, `copy_frame`, `release`,
//! `decode_response`, request-id match, `check_fields`, and on a violation the recovery
//! (`reset_producer`, re-attach). Nothing may panic or read outside the ring (ASan), and as
//! long as the worker only used its `Producer`, every response must arrive intact and in order.
#![no_main]

use std::collections::{HashSet, VecDeque};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use moltbot::pool::lane::decode_response;
use moltbot_ipc::{AlignedBuf, Consumer, HeapRing, Producer, RingError, Tamper};

/// A ring for one direction of the lane. `HeapRing` allocates exactly `ring_bytes(capacity)`,
/// so ASan flags any access past the ring.
fn new_ring(capacity: usize) -> HeapRing {
    HeapRing::new(capacity).expect("capacity is a power of two >= 256")
}

/// A position as the worker may store it: relative to a current one (mostly plausible), or raw.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Pos {
    /// Current value plus `delta` frames of 16 bytes (wrapping).
    Frames(i16),
    /// Current value plus `delta` bytes (usually misaligned).
    Bytes(i16),
    Raw(u64),
}

impl Pos {
    fn apply(self, current: u64) -> u64 {
        match self {
            Pos::Frames(d) => current.wrapping_add_signed(i64::from(d) * 16),
            Pos::Bytes(d) => current.wrapping_add_signed(i64::from(d)),
            Pos::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// The worker answers a request properly (or with fields the gateway must refuse).
    Respond {
        /// Index into the pending ids (or an unknown id when out of range).
        id: u8,
        status: u16,
        duration_us: u64,
        error_code: String,
        body: Vec<u8>,
    },
    /// The worker publishes a frame with arbitrary payload bytes.
    RawFrame(Vec<u8>),
    /// The worker reserves a frame, scribbles it, and commits a length of its choosing.
    Commit {
        reserve: u16,
        used: u16,
        fill: u8,
    },
    /// The worker writes bytes anywhere in the response ring's data area.
    Scribble {
        offset: u16,
        bytes: Vec<u8>,
    },
    /// The worker writes a frame header (length, tag) at a 16-aligned offset.
    FrameHeader {
        slot: u16,
        len: u32,
        tag: Tag,
    },
    /// The worker stores a value into the response ring's `tail`.
    SetTail(Pos),
    /// The worker stores into the response ring's `head` or `claimed` (the gateway's own).
    SetRespHead(Pos),
    /// The gateway reads up to `n` responses (a `poll`), with the worker rewriting the frame
    /// between `peek` and the copy when `race` has bytes.
    Poll {
        n: u8,
        race: Option<(u16, Vec<u8>)>,
    },
    /// `has_work`'s check.
    HasData,
    /// The gateway submits a request (into the request ring).
    Submit {
        len: u8,
    },
    /// The worker stores into the request ring's `head` / `claimed`.
    SetReqHead(Pos),
    SetReqClaimed(Pos),
    /// The worker stores into the request ring's `tail` (the gateway's own).
    SetReqTail(Pos),
    /// The worker takes the next request.
    WorkerTakes,
    /// The worker dies: the gateway recovers the lane (as `LaneClient::recover`) and a new
    /// worker attaches.
    Recover,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Tag {
    Data,
    Pad,
    Raw(u32),
}

impl Tag {
    fn value(self) -> u32 {
        match self {
            Tag::Data => 0x444d_5246,
            Tag::Pad => 0x504d_5246,
            Tag::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// log2 of the ring capacity minus 8: 256..=2048 bytes, so that wraps are frequent.
    capacity: u8,
    ops: Vec<Op>,
}

/// A response the honest worker published, as the gateway must read it back.
#[derive(Debug)]
struct Expected {
    request_id: u64,
    status: u16,
    duration_us: u64,
    error_code: String,
    body: Vec<u8>,
}

struct Lane {
    capacity: usize,
    resp_ring: HeapRing,
    req_ring: HeapRing,
    /// The worker's end of the response ring (None while its positions make no sense to it).
    worker: Option<Producer>,
    /// The gateway's end of the response ring (`LaneClient::resp`: attached once, for life).
    gateway: Consumer,
    /// The gateway's end of the request ring (`LaneClient::req`).
    requests: Producer,
    /// The worker's end of the request ring.
    worker_requests: Option<Consumer>,
    /// Requests waiting for an answer (`LaneClient::pending`).
    pending: HashSet<u64>,
    /// Ring end of each request, in ring order (`LaneClient::outstanding`).
    outstanding: VecDeque<(u64, u64)>,
    /// Requests the worker has not answered yet (an honest worker answers each once).
    unanswered: HashSet<u64>,
    next_id: u64,
    /// The lane saw a violation: no reads until recovery (`LaneClient::poisoned`).
    poisoned: bool,
    /// The worker only ever used its Producer properly since the last recovery.
    honest: bool,
    expected: VecDeque<Expected>,
    frame: AlignedBuf,
}

impl Lane {
    fn new(capacity: usize) -> Lane {
        let resp_ring = new_ring(capacity);
        let req_ring = new_ring(capacity);
        Lane {
            capacity,
            worker: Some(resp_ring.take_producer().expect("fresh ring")),
            gateway: resp_ring.take_consumer().expect("fresh ring"),
            requests: req_ring.take_producer().expect("fresh ring"),
            worker_requests: Some(req_ring.take_consumer().expect("fresh ring")),
            resp_ring,
            req_ring,
            pending: HashSet::new(),
            outstanding: VecDeque::new(),
            unanswered: HashSet::new(),
            next_id: 1,
            poisoned: false,
            honest: true,
            expected: VecDeque::new(),
            frame: AlignedBuf::new(),
        }
    }

    fn tamper(&mut self) {
        self.honest = false;
        self.expected.clear();
    }

    fn poison(&mut self, why: &str) {
        assert!(
            !self.honest,
            "an honest worker's response was refused: {why}"
        );
        self.poisoned = true;
    }

    /// The worker's end of the response ring: refused while its positions are broken and the
    /// gateway has not recovered the ring yet.
    fn worker(&mut self) -> Option<&mut Producer> {
        if self.worker.is_none() {
            self.worker = self.resp_ring.take_producer().ok();
        }
        self.worker.as_mut()
    }

    /// The worker writes the response ring directly (its end is dropped meanwhile).
    fn worker_writes_responses(&mut self, write: impl FnOnce(&mut Tamper<'_>)) {
        self.tamper();
        self.worker = None;
        let mut t = self
            .gateway
            .tamper()
            .expect("no worker end of the response ring is taken");
        write(&mut t);
    }

    /// The worker writes the request ring directly (its end is dropped meanwhile).
    fn worker_writes_requests(&mut self, write: impl FnOnce(&mut Tamper<'_>)) {
        self.worker_requests = None;
        let mut t = self
            .requests
            .tamper()
            .expect("no worker end of the request ring is taken");
        write(&mut t);
    }

    fn respond(&mut self, id: u8, status: u16, duration_us: u64, code: &str, body: &[u8]) {
        let mut ids: Vec<u64> = self.unanswered.iter().copied().collect();
        ids.sort_unstable();
        let request_id = match ids.get(usize::from(id)) {
            Some(&known) => known,
            None => {
                // An answer to no request (or a second one): a violation.
                self.tamper();
                u64::from(id) + 1_000_000
            }
        };
        let resp = moltbot_ipc::Response {
            request_id,
            duration_us,
            status,
            part: moltbot_ipc::Part::Final,
            body,
            error_code: code,
            event: "",
        };
        let Some(worker) = self.worker() else { return };
        let pushed = worker.push_with(resp.encoded_len_bound(), |slot| resp.encode_into(slot));
        match pushed {
            Ok(Ok(())) => {
                self.unanswered.remove(&request_id);
                if self.honest {
                    self.expected.push_back(Expected {
                        request_id,
                        status,
                        duration_us,
                        error_code: code.to_owned(),
                        body: body.to_vec(),
                    });
                }
            }
            Ok(Err(e)) => panic!("encoding into its own bound failed: {e}"),
            Err(RingError::Full | RingError::TooLarge { .. }) => {}
            Err(RingError::Corrupt(why)) => assert!(!self.honest, "honest producer: {why}"),
        }
    }

    /// `LaneClient::drain_responses` + `deliver`, for at most `n` frames. `Err` when poisoned.
    fn poll(&mut self, n: u8, mut race: Option<(u16, Vec<u8>)>) -> Result<(), ()> {
        if self.poisoned {
            return Err(());
        }
        for _ in 0..n {
            let before = self.gateway.position();
            if let Some((offset, bytes)) = race.take() {
                // A writer racing with the gateway: the frame at the head was looked at, then
                // rewritten before the look that copies it.
                if let Ok(Some(f)) = self.gateway.peek() {
                    assert!(f.len() <= self.capacity - 16);
                }
                self.worker_writes_responses(|t| t.write_data(offset.into(), &bytes));
            }
            let f = match self.gateway.peek() {
                Ok(None) => return Ok(()),
                Ok(Some(f)) => f,
                Err(RingError::Corrupt(why)) => {
                    self.poison(why);
                    return Err(());
                }
                Err(e) => panic!("peek: unexpected {e:?}"),
            };
            let end = f.end();
            let total = (16 + f.len().div_ceil(16) * 16) as u64;
            assert!(end - total >= before && end % 16 == 0);
            assert!(f.len() <= self.capacity - 16);
            f.copy_into(&mut self.frame);
            assert_eq!(self.frame.len(), f.len());
            assert_eq!(self.frame.as_slice().as_ptr() as usize % 16, 0);
            f.release();
            assert_eq!(self.gateway.position(), end);
            if let Err(why) = self.deliver() {
                self.poison(why);
                return Err(());
            }
        }
        Ok(())
    }

    fn deliver(&mut self) -> Result<(), &'static str> {
        let frame = self.frame.as_slice();
        let expected = if self.honest {
            Some(self.expected.pop_front().expect("a frame nobody published"))
        } else {
            None
        };
        let r = decode_response(frame)?;
        assert!(r.body.start <= r.body.end && r.body.end <= frame.len());
        let body = &frame[r.body.clone()];
        if let Some(e) = &expected {
            assert_eq!(r.request_id, e.request_id);
            assert_eq!(r.status, e.status);
            assert_eq!(r.duration_us, e.duration_us);
            assert_eq!(r.error_code, e.error_code);
            assert_eq!(body, &e.body[..]);
        }
        if !self.pending.remove(&r.request_id) {
            return Err("response to an unknown request id");
        }
        if r.check_fields().is_ok() {
            assert!((100..=599).contains(&r.status));
            assert!(r.error_code.len() <= 64);
            assert!(
                r.error_code
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_:.-".contains(&b))
            );
        }
        self.prune_outstanding();
        Ok(())
    }

    fn prune_outstanding(&mut self) {
        while let Some(&(_, id)) = self.outstanding.front() {
            if self.pending.contains(&id) {
                break;
            }
            self.outstanding.pop_front();
        }
    }

    fn submit(&mut self, len: u8) {
        if !self.poisoned {
            let body = vec![0x5a; usize::from(len) * 4];
            let req = moltbot_ipc::Request {
                request_id: self.next_id,
                deadline_us: 0,
                kind: moltbot_ipc::Kind::Echo,
                method: moltbot_ipc::Method::Post,
                user_id: "user-a",
                path: "",
                call_id: "",
                stream: false,
                body: &body,
            };
            match self
                .requests
                .push_with(req.encoded_len_bound(), |slot| req.encode_into(slot))
            {
                Ok(Ok(())) => {
                    self.pending.insert(self.next_id);
                    self.outstanding
                        .push_back((self.requests.position(), self.next_id));
                    self.next_id += 1;
                }
                Ok(Err(e)) => panic!("encoding into its own bound failed: {e}"),
                // The worker broke the request ring's head: the lane poisons itself.
                Err(RingError::Corrupt(_)) => self.poisoned = true,
                Err(RingError::Full | RingError::TooLarge { .. }) => {}
            }
        }
        self.worker_takes_request();
    }

    /// The worker takes the next request, if it can read one.
    fn worker_takes_request(&mut self) {
        let Some(c) = self.worker_requests.as_mut() else {
            return;
        };
        match c.peek() {
            Ok(Some(f)) => {
                f.claim();
                let mut buf = AlignedBuf::new();
                f.copy_into(&mut buf);
                if let Ok(req) = moltbot_ipc::access_request(buf.as_slice()) {
                    self.unanswered.insert(req.request_id.to_native());
                }
                f.release();
            }
            Ok(None) => {}
            // Only after the fuzzer stored garbage into the request ring's positions.
            Err(_) => self.worker_requests = None,
        }
    }

    /// `LaneClient::recover` after the worker died, then a successor attaches.
    fn recover(&mut self) {
        // The worker process is gone, and with it its ends.
        self.worker = None;
        self.worker_requests = None;
        // 1. Answers the dead worker completed; after a violation the ring is dropped unread.
        // Reset either way, which republishes the gateway's own positions.
        let _ = self.poll(u8::MAX, None);
        self.gateway.reset_producer();
        // 2. Fail what it took, keep what it never read.
        let tail = self.requests.position();
        match self.requests.peer_positions() {
            Ok((head, claimed)) => {
                assert!(
                    head <= claimed && claimed <= tail,
                    "{head} {claimed} {tail}"
                );
                let taken = claimed.max(head);
                for &(end, id) in &self.outstanding {
                    if end <= taken {
                        self.pending.remove(&id);
                    }
                }
                if self.requests.discard_until(taken).is_err() {
                    self.discard_all();
                }
            }
            Err(_) => self.discard_all(),
        }
        self.prune_outstanding();
        self.poisoned = false;
        // 3. The successor attaches to both rings from what the gateway left in them.
        self.worker = Some(
            self.resp_ring
                .take_producer()
                .expect("a successor worker must attach to the recovered response ring"),
        );
        self.worker_requests = Some(
            self.req_ring
                .take_consumer()
                .expect("a successor worker must attach to the recovered request ring"),
        );
        // Nothing is left in the response ring, and the successor is honest until it is not.
        assert!(!self.gateway.has_data().expect("recovered response ring"));
        self.honest = true;
        self.expected.clear();
        self.unanswered.clear();
    }

    fn discard_all(&mut self) {
        let end = self.requests.position();
        self.requests
            .discard_until(end)
            .expect("discarding up to the producer's own position");
        self.pending.clear();
        self.outstanding.clear();
    }
}

fuzz_target!(|input: Input| {
    let capacity = 256usize << (input.capacity % 4);
    let mut lane = Lane::new(capacity);
    for op in input.ops.into_iter().take(256) {
        match op {
            Op::Respond {
                id,
                status,
                duration_us,
                error_code,
                body,
            } => lane.respond(id, status, duration_us, &error_code, &body),
            Op::RawFrame(bytes) => {
                lane.tamper();
                if let Some(w) = lane.worker() {
                    let _ = w.push(&bytes);
                }
            }
            Op::Commit {
                reserve,
                used,
                fill,
            } => {
                lane.tamper();
                if let Some(w) = lane.worker()
                    && let Ok(mut r) = w.reserve(reserve.into())
                {
                    r.as_mut_slice().fill(fill);
                    r.commit(used.into());
                }
            }
            Op::Scribble { offset, bytes } => {
                lane.worker_writes_responses(|t| t.write_data(offset.into(), &bytes));
            }
            Op::FrameHeader { slot, len, tag } => {
                lane.worker_writes_responses(|t| {
                    t.write_frame_header(slot.into(), len, tag.value());
                });
            }
            Op::SetTail(p) => lane.worker_writes_responses(|t| {
                let v = p.apply(t.tail());
                t.set_tail(v);
            }),
            Op::SetRespHead(p) => lane.worker_writes_responses(|t| {
                let (head, claimed) = (p.apply(t.head()), p.apply(t.claimed()));
                t.set_head(head);
                t.set_claimed(claimed);
            }),
            Op::Poll { n, race } => {
                let _ = lane.poll(n, race);
            }
            Op::HasData => {
                if lane.gateway.has_data().is_err() {
                    assert!(!lane.honest, "an honest worker's ring reads as corrupt");
                }
            }
            Op::Submit { len } => lane.submit(len),
            Op::SetReqHead(p) => lane.worker_writes_requests(|t| {
                let v = p.apply(t.head());
                t.set_head(v);
            }),
            Op::SetReqTail(p) => lane.worker_writes_requests(|t| {
                let v = p.apply(t.tail());
                t.set_tail(v);
            }),
            Op::WorkerTakes => lane.worker_takes_request(),
            Op::SetReqClaimed(p) => lane.worker_writes_requests(|t| {
                let v = p.apply(t.claimed());
                t.set_claimed(v);
            }),
            Op::Recover => lane.recover(),
        }
    }
    let _ = lane.poll(u8::MAX, None);
    lane.recover();
});
