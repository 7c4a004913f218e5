//! The two messages that cross the rings, as rkyv 0.8 archives.
//!
//! Both borrow their variable-length parts (`&str`, `&[u8]`) so that a producer serializes
//! straight from its own buffers into the reserved ring slot: the body is copied once, from
//! wherever it is into the slot. Consumers read the archive in place (`ArchivedRequest`) or from
//! a private copy (`ArchivedResponse` on the gateway, see [`crate::ring::Consumer::copy_frame`])
//! after checking it with bytecheck.

use core::mem::MaybeUninit;

use rkyv::api::low::{access, to_bytes_in_with_alloc};
use rkyv::rancor::{Error as RancorError, Failure};
use rkyv::ser::allocator::SubAllocator;
use rkyv::ser::writer::Buffer;
use rkyv::with::InlineAsBox;
use rkyv::{Archive, Serialize};

/// What a request asks the worker to do (the TypeScript worker protocol's message types, plus
/// the benchmark echo and, in test builds, fault injection).
#[derive(Archive, Serialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, PartialEq, Eq, Clone, Copy))]
#[repr(u8)]
pub enum Kind {
    /// `agent:message`: one conversational turn.
    AgentMessage = 0,
    /// `agent:command`: a control command for the user's agent (history, reset, ...).
    AgentCommand = 1,
    /// `session`: get/set/delete/list of the user's named session state.
    Session = 2,
    /// `health:check`: answered by the worker loop itself.
    HealthCheck = 3,
    /// `echo`: the body comes back unchanged (benchmarks).
    Echo = 4,
    /// Fault injection (crash, hang, allocate, probe the sandbox): only with the
    /// `fault-injection` feature, which only the tests enable.
    #[cfg(feature = "fault-injection")]
    Test = 5,
    /// An OpenClaw gateway-protocol request (`req` frame): `path` is its method, `call_id` its
    /// id and `body` its `params` exactly as the client sent them (`null` when absent). The
    /// final answer's body is the `payload` (2xx) or the error object (`{"message",
    /// "details"?, "retryable"?, "retryAfterMs"?}`) whose code is the error code.
    Rpc = 6,
}

impl Kind {
    /// The protocol name of this kind (`agent:message`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::AgentMessage => "agent:message",
            Kind::AgentCommand => "agent:command",
            Kind::Session => "session",
            Kind::HealthCheck => "health:check",
            Kind::Echo => "echo",
            #[cfg(feature = "fault-injection")]
            Kind::Test => "test",
            Kind::Rpc => "rpc",
        }
    }

    /// Parses a protocol name. `agent` is accepted as the short form of `agent:message`.
    pub fn parse(name: &str) -> Option<Kind> {
        Some(match name {
            "agent:message" | "agent" => Kind::AgentMessage,
            "agent:command" => Kind::AgentCommand,
            "session" => Kind::Session,
            "health:check" | "health" => Kind::HealthCheck,
            "echo" => Kind::Echo,
            #[cfg(feature = "fault-injection")]
            "test" => Kind::Test,
            "rpc" => Kind::Rpc,
            _ => return None,
        })
    }
}

impl ArchivedKind {
    /// The native value of an archived kind.
    pub fn to_native(self) -> Kind {
        match self {
            ArchivedKind::AgentMessage => Kind::AgentMessage,
            ArchivedKind::AgentCommand => Kind::AgentCommand,
            ArchivedKind::Session => Kind::Session,
            ArchivedKind::HealthCheck => Kind::HealthCheck,
            ArchivedKind::Echo => Kind::Echo,
            #[cfg(feature = "fault-injection")]
            ArchivedKind::Test => Kind::Test,
            ArchivedKind::Rpc => Kind::Rpc,
        }
    }
}

/// The HTTP method a request arrived with (meaningful for `session`).
#[derive(Archive, Serialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, PartialEq, Eq, Clone, Copy))]
#[repr(u8)]
pub enum Method {
    /// GET
    Get = 0,
    /// PUT
    Put = 1,
    /// POST
    Post = 2,
    /// DELETE
    Delete = 3,
}

impl ArchivedMethod {
    /// The native value of an archived method.
    pub fn to_native(self) -> Method {
        match self {
            ArchivedMethod::Get => Method::Get,
            ArchivedMethod::Put => Method::Put,
            ArchivedMethod::Post => Method::Post,
            ArchivedMethod::Delete => Method::Delete,
        }
    }
}

/// Which part of a request's answer a response frame is. A request has exactly one
/// [`Part::Final`] answer; a request sent with `stream` may be preceded by any number of the
/// other parts, in order. A part for a request that does not stream, or for an id the worker
/// was not given, is a protocol violation.
#[derive(Archive, Serialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, PartialEq, Eq, Clone, Copy))]
#[repr(u8)]
pub enum Part {
    /// The answer that ends the request.
    Final = 0,
    /// The interim answer of a two-stage request (the `agent` run's `accepted`).
    Accepted = 1,
    /// An event of the request (`event` names it; the body is its JSON payload).
    Event = 2,
}

impl ArchivedPart {
    /// The native value of an archived part.
    pub fn to_native(self) -> Part {
        match self {
            ArchivedPart::Final => Part::Final,
            ArchivedPart::Accepted => Part::Accepted,
            ArchivedPart::Event => Part::Event,
        }
    }
}

/// A request from a gateway core (or an in-process caller) to a worker.
#[derive(Archive, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// Unique per lane; the response carries it back.
    pub request_id: u64,
    /// Absolute deadline on the system-wide monotonic clock, in microseconds
    /// ([`crate::clock::monotonic_us`]); 0 means none.
    pub deadline_us: u64,
    /// What to do.
    pub kind: Kind,
    /// The HTTP method it arrived with.
    pub method: Method,
    /// The validated user id.
    #[rkyv(with = InlineAsBox)]
    pub user_id: &'a str,
    /// The caller takes the answer's interim parts (events) before the final one.
    pub stream: bool,
    /// Kind-specific target (a session name, a test action, an RPC method); often empty.
    #[rkyv(with = InlineAsBox)]
    pub path: &'a str,
    /// The caller's own id of the request (an RPC `req` id), untouched; often empty.
    #[rkyv(with = InlineAsBox)]
    pub call_id: &'a str,
    /// The payload, opaque to the gateway for the fast paths.
    #[rkyv(with = InlineAsBox)]
    pub body: &'a [u8],
}

/// A worker's answer to one request.
#[derive(Archive, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response<'a> {
    /// The id of the request this answers.
    pub request_id: u64,
    /// Time the handler took, in microseconds.
    pub duration_us: u64,
    /// HTTP-style status: 2xx success, 4xx the request's fault, 5xx the handler's.
    pub status: u16,
    /// Which part of the answer this is.
    pub part: Part,
    /// The payload (JSON for the built-in handlers). First out-of-line field, so it leads the
    /// archive.
    #[rkyv(with = InlineAsBox)]
    pub body: &'a [u8],
    /// Machine-readable error code (`""` on success).
    #[rkyv(with = InlineAsBox)]
    pub error_code: &'a str,
    /// The event's name for [`Part::Event`], else `""`.
    #[rkyv(with = InlineAsBox)]
    pub event: &'a str,
}

/// Failure to encode or decode a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The output buffer is smaller than the archive.
    #[error("message does not fit in {0} bytes")]
    TooLarge(usize),
    /// The bytes are not a valid archive of the expected type.
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// Size of the scratch space rkyv may use while serializing (it needs none for these types;
/// this is a safety margin that costs only stack).
const SCRATCH: usize = 256;

/// Bytes rkyv adds around the variable parts: the root object plus alignment of each part.
const OVERHEAD: usize = 128;

fn encode<T>(value: &T, out: &mut [u8]) -> Result<usize, CodecError>
where
    T: for<'x, 'y> Serialize<rkyv::api::low::LowSerializer<Buffer<'x>, SubAllocator<'y>, Failure>>,
{
    let capacity = out.len();
    let mut scratch = [MaybeUninit::<u8>::uninit(); SCRATCH];
    let written = to_bytes_in_with_alloc::<_, _, Failure>(
        value,
        Buffer::from(out),
        SubAllocator::new(&mut scratch),
    )
    .map_err(|_| CodecError::TooLarge(capacity))?;
    Ok(written.len())
}

impl Request<'_> {
    /// An upper bound of the encoded size; reserving this much always suffices.
    pub fn encoded_len_bound(&self) -> usize {
        OVERHEAD + self.user_id.len() + self.path.len() + self.call_id.len() + self.body.len() + 48
    }

    /// Serializes into `out` (which must be 16-byte aligned) and returns the bytes used.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, CodecError> {
        encode(self, out)
    }
}

impl Response<'_> {
    /// An upper bound of the encoded size; reserving this much always suffices.
    pub fn encoded_len_bound(&self) -> usize {
        OVERHEAD + self.body.len() + self.error_code.len() + self.event.len() + 32
    }

    /// Serializes into `out` (which must be 16-byte aligned) and returns the bytes used.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, CodecError> {
        encode(self, out)
    }
}

/// Checks `bytes` (bytecheck) and returns the archived request.
pub fn access_request(bytes: &[u8]) -> Result<&ArchivedRequest<'static>, CodecError> {
    access::<ArchivedRequest<'static>, RancorError>(bytes)
        .map_err(|e| CodecError::Invalid(e.to_string()))
}

/// Checks `bytes` (bytecheck) and returns the archived response.
pub fn access_response(bytes: &[u8]) -> Result<&ArchivedResponse<'static>, CodecError> {
    access::<ArchivedResponse<'static>, RancorError>(bytes)
        .map_err(|e| CodecError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(16))]
    struct Aligned([u8; 4096]);

    #[test]
    fn request_round_trip() {
        let req = Request {
            request_id: 7,
            deadline_us: 99,
            kind: Kind::Session,
            method: Method::Put,
            user_id: "user-a",
            stream: true,
            path: "notes",
            call_id: "c-1",
            body: b"{\"x\":1}",
        };
        let mut buf = Aligned([0; 4096]);
        let n = req.encode_into(&mut buf.0).unwrap();
        assert!(n <= req.encoded_len_bound());
        let a = access_request(&buf.0[..n]).unwrap();
        assert_eq!(a.request_id, 7);
        assert_eq!(a.deadline_us, 99);
        assert_eq!(a.kind.to_native(), Kind::Session);
        assert_eq!(a.method.to_native(), Method::Put);
        assert_eq!(&*a.user_id, "user-a");
        assert_eq!(&*a.path, "notes");
        assert!(a.stream);
        assert_eq!(&*a.call_id, "c-1");
        assert_eq!(&*a.body, b"{\"x\":1}");
    }

    #[test]
    fn response_round_trip_and_bound() {
        let body = vec![0xabu8; 1000];
        let resp = Response {
            request_id: u64::MAX,
            duration_us: 12,
            status: 502,
            part: Part::Event,
            body: &body,
            error_code: "WORKER_CRASHED",
            event: "agent",
        };
        let mut buf = Aligned([0; 4096]);
        let n = resp.encode_into(&mut buf.0).unwrap();
        assert!(n <= resp.encoded_len_bound(), "{n}");
        let a = access_response(&buf.0[..n]).unwrap();
        assert_eq!(a.request_id, u64::MAX);
        assert_eq!(a.status, 502);
        assert_eq!(&*a.error_code, "WORKER_CRASHED");
        assert_eq!(a.part.to_native(), Part::Event);
        assert_eq!(&*a.event, "agent");
        assert_eq!(&*a.body, &body[..]);
    }

    #[test]
    fn too_small_buffer_is_an_error() {
        let resp = Response {
            request_id: 1,
            duration_us: 0,
            status: 200,
            part: Part::Final,
            body: &[1; 100],
            error_code: "",
            event: "",
        };
        let mut buf = Aligned([0; 4096]);
        assert_eq!(
            resp.encode_into(&mut buf.0[..64]),
            Err(CodecError::TooLarge(64))
        );
    }

    #[test]
    fn garbage_is_rejected_not_panicking() {
        let mut buf = Aligned([0; 4096]);
        for (i, b) in buf.0.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        for len in [0, 1, 7, 8, 16, 40, 64, 200, 4096] {
            let _ = access_response(&buf.0[..len]);
            let _ = access_request(&buf.0[..len]);
        }
        assert!(access_response(&buf.0[..64]).is_err());
    }

    #[test]
    fn kind_names_round_trip() {
        for k in [
            Kind::AgentMessage,
            Kind::AgentCommand,
            Kind::Session,
            Kind::HealthCheck,
            Kind::Echo,
            Kind::Rpc,
            #[cfg(feature = "fault-injection")]
            Kind::Test,
        ] {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("agent"), Some(Kind::AgentMessage));
        assert_eq!(Kind::parse("nope"), None);
    }
}
