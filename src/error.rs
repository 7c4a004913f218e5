//! The errors a routed request can end with, in the moltbot gateway's error shape.

use std::time::Duration;

/// What went wrong in an I/O error, for a client: the operating system's description of the
/// errno, else the error's kind. Never the error's own text, which wrappers extend with the
/// server's paths (tempfile does).
pub fn io_cause(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
        None => e.kind().to_string(),
    }
}

/// `Retry-After` of a routing table that cannot be written.
pub const TABLE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Why a request was not answered by its worker's handler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The userId is missing or not acceptable.
    #[error("invalid userId: {0}")]
    InvalidUser(String),
    /// The request itself is malformed (unknown type, bad JSON, bad name).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The request does not fit in a ring frame.
    #[error("request of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Bytes the request needs.
        len: usize,
        /// Most bytes accepted.
        max: usize,
    },
    /// The worker died (crashed, was killed as stalled, or broke the protocol) after it had
    /// taken the request. Never retried by the gateway: agent requests are not idempotent.
    #[error("worker-{slot} crashed while handling the request")]
    WorkerCrashed {
        /// The slot.
        slot: usize,
    },
    /// The worker sent a response that does not make sense.
    #[error("worker-{slot} sent an invalid response: {reason}")]
    BadWorkerResponse {
        /// The slot.
        slot: usize,
        /// What was wrong.
        reason: String,
    },
    /// A streaming request's caller left more of its events untaken than the gateway keeps
    /// (a client reading slower than its worker sends, or a worker flooding the request):
    /// the caller is answered with this, the request's later events and answer are dropped.
    #[error("worker-{slot} sent more events than the caller took: over {max} bytes waited")]
    EventsOverrun {
        /// The slot.
        slot: usize,
        /// The bytes of events a caller may leave untaken.
        max: usize,
    },
    /// The worker is failed (restart limit reached), its queue is full, or the pool stops.
    #[error("worker-{slot} is unavailable: {reason}")]
    Unavailable {
        /// The slot.
        slot: usize,
        /// Why.
        reason: String,
        /// When a retry makes sense.
        retry_after: Duration,
    },
    /// No answer within the request timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The gateway is stopping and takes no new requests.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// A new user could not be recorded in the routing table (the disk is full, or another
    /// I/O error): nothing was assigned, known users are unaffected, a retry may succeed.
    #[error("no new user can be assigned right now: the routing table cannot be written ({0})")]
    TableUnavailable(String),
    /// A new user while the routing table holds `max_users` users.
    #[error("no new user can be assigned: the routing table holds its limit of {0} users")]
    UserLimit(usize),
    /// A new user while each of the `n` OpenClaw cells serves a user (`cell = openclaw`).
    #[error(
        "no new user can be assigned: every OpenClaw cell is taken: a cell serves one user ({0} cells)"
    )]
    CellsTaken(usize),
    /// A fault of the gateway itself (e.g. the routing table could not be written).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::router::RouterError> for RouteError {
    fn from(e: crate::router::RouterError) -> Self {
        match e {
            crate::router::RouterError::Full(max) => RouteError::UserLimit(max),
            // Only the cell mode limits the router to one user per slot.
            crate::router::RouterError::SlotsTaken(n) => RouteError::CellsTaken(n),
            crate::router::RouterError::EmptyUser => RouteError::InvalidUser(e.to_string()),
            // The path of the table is the server's business: the client gets the cause only.
            crate::router::RouterError::Io { source, .. } => {
                RouteError::TableUnavailable(io_cause(&source))
            }
            other => RouteError::Internal(other.to_string()),
        }
    }
}

impl RouteError {
    /// Machine-readable code for `errorCode` / `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            RouteError::InvalidUser(_) => "INVALID_USER",
            RouteError::InvalidRequest(_) => "INVALID_REQUEST",
            RouteError::TooLarge { .. } => "PAYLOAD_TOO_LARGE",
            RouteError::WorkerCrashed { .. } => "WORKER_CRASHED",
            RouteError::BadWorkerResponse { .. } => "BAD_WORKER_RESPONSE",
            RouteError::EventsOverrun { .. } => "EVENTS_OVERRUN",
            RouteError::Unavailable { .. } | RouteError::ShuttingDown => "UNAVAILABLE",
            RouteError::Timeout(_) => "TIMEOUT",
            RouteError::UserLimit(_) | RouteError::CellsTaken(_) => "USER_LIMIT",
            RouteError::TableUnavailable(_) => "ROUTING_TABLE_UNAVAILABLE",
            RouteError::Internal(_) => "INTERNAL",
        }
    }

    /// The HTTP status that fits.
    pub fn status(&self) -> u16 {
        match self {
            RouteError::InvalidUser(_) | RouteError::InvalidRequest(_) => 400,
            RouteError::TooLarge { .. } => 413,
            RouteError::WorkerCrashed { .. }
            | RouteError::BadWorkerResponse { .. }
            | RouteError::EventsOverrun { .. } => 502,
            RouteError::Unavailable { .. } | RouteError::ShuttingDown => 503,
            RouteError::UserLimit(_)
            | RouteError::CellsTaken(_)
            | RouteError::TableUnavailable(_) => 503,
            RouteError::Timeout(_) => 504,
            RouteError::Internal(_) => 500,
        }
    }

    /// Whether the same request may succeed later.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            RouteError::Unavailable { .. }
                | RouteError::ShuttingDown
                | RouteError::Timeout(_)
                | RouteError::WorkerCrashed { .. }
                | RouteError::TableUnavailable(_)
        )
    }

    /// Suggested wait before a retry (also sent as `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RouteError::Unavailable { retry_after, .. } => Some(*retry_after),
            RouteError::ShuttingDown => Some(Duration::from_secs(1)),
            // Long enough for an operator (or a log rotation) to free some space.
            RouteError::TableUnavailable(_) => Some(TABLE_RETRY_AFTER),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses() {
        let cases: Vec<(RouteError, &str, u16, bool)> = vec![
            (
                RouteError::InvalidUser("x".into()),
                "INVALID_USER",
                400,
                false,
            ),
            (
                RouteError::TooLarge { len: 2, max: 1 },
                "PAYLOAD_TOO_LARGE",
                413,
                false,
            ),
            (RouteError::UserLimit(5), "USER_LIMIT", 503, false),
            (RouteError::CellsTaken(2), "USER_LIMIT", 503, false),
            (
                RouteError::WorkerCrashed { slot: 1 },
                "WORKER_CRASHED",
                502,
                true,
            ),
            (
                RouteError::Unavailable {
                    slot: 0,
                    reason: "failed".into(),
                    retry_after: Duration::from_secs(3),
                },
                "UNAVAILABLE",
                503,
                true,
            ),
            (
                RouteError::Timeout(Duration::from_secs(1)),
                "TIMEOUT",
                504,
                true,
            ),
            (RouteError::ShuttingDown, "UNAVAILABLE", 503, true),
            (
                RouteError::TableUnavailable("No space left on device".into()),
                "ROUTING_TABLE_UNAVAILABLE",
                503,
                true,
            ),
        ];
        for (e, code, status, retry) in cases {
            assert_eq!(e.code(), code);
            assert_eq!(e.status(), status);
            assert_eq!(e.retryable(), retry, "{e}");
        }
        assert_eq!(
            RouteError::ShuttingDown.retry_after(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(RouteError::WorkerCrashed { slot: 0 }.retry_after(), None);
    }

    #[test]
    fn a_routing_table_that_cannot_be_written_is_transient_and_names_no_path() {
        let e = RouteError::from(crate::router::RouterError::Io {
            path: "/srv/moltbot/routing-table.jsonl".into(),
            source: std::io::Error::from_raw_os_error(28),
        });
        assert_eq!((e.status(), e.code()), (503, "ROUTING_TABLE_UNAVAILABLE"));
        assert!(e.retryable());
        assert_eq!(e.retry_after(), Some(TABLE_RETRY_AFTER));
        let message = e.to_string();
        assert!(!message.contains("/srv"), "{message}");
        assert!(message.contains("No space left on device"), "{message}");
    }
}
