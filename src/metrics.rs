//! Prometheus metrics of the gateway (`GET /metrics`).
//!
//! Each gateway core records into its own [`CoreMetrics`]: plain relaxed atomics that only that
//! core writes, so the hot path takes no lock, allocates nothing and shares no cache line with
//! other cores. A scrape sums every core's counters and adds the pool's state, then renders the
//! OpenMetrics text exposition with `prometheus-client`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::auth::Refusal;
use crate::pool::PoolStatus;

/// The `Content-Type` of [`encode`]'s output (the OpenMetrics text format, which ends in
/// `# EOF`).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prefix of every metric name.
const PREFIX: &str = "moltbot";

/// The endpoint a request was for (the `endpoint` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/route`.
    Route,
    /// `POST /v1/agent`.
    Agent,
    /// `/v1/sessions/{name}`.
    Sessions,
    /// `POST /v1/echo`.
    Echo,
    /// `GET /v1/users/{userId}/worker`.
    Users,
    /// `GET /status`.
    Status,
    /// `GET /livez`.
    Livez,
    /// `GET /readyz`.
    Readyz,
    /// `GET /healthz`.
    Healthz,
    /// `GET /metrics`.
    Metrics,
    /// Anything else (unknown paths, requests that failed before routing).
    Other,
}

impl Endpoint {
    /// Every endpoint, in label order.
    pub const ALL: [Endpoint; 11] = [
        Endpoint::Route,
        Endpoint::Agent,
        Endpoint::Sessions,
        Endpoint::Echo,
        Endpoint::Users,
        Endpoint::Status,
        Endpoint::Livez,
        Endpoint::Readyz,
        Endpoint::Healthz,
        Endpoint::Metrics,
        Endpoint::Other,
    ];

    /// The label value (`route`, `agent`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            Endpoint::Route => "route",
            Endpoint::Agent => "agent",
            Endpoint::Sessions => "sessions",
            Endpoint::Echo => "echo",
            Endpoint::Users => "users",
            Endpoint::Status => "status",
            Endpoint::Livez => "livez",
            Endpoint::Readyz => "readyz",
            Endpoint::Healthz => "healthz",
            Endpoint::Metrics => "metrics",
            Endpoint::Other => "other",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

const ENDPOINTS: usize = Endpoint::ALL.len();

/// The statuses counted under their own label; every other status counts as `other`.
pub const STATUS_CODES: [u16; 17] = [
    100, 200, 201, 204, 400, 401, 404, 405, 408, 413, 414, 431, 500, 502, 503, 504, 505,
];

/// Label values, index-aligned with [`STATUS_CODES`], then `other`.
const STATUS_LABELS: [&str; STATUSES] = [
    "100", "200", "201", "204", "400", "401", "404", "405", "408", "413", "414", "431", "500",
    "502", "503", "504", "505", "other",
];

const STATUSES: usize = STATUS_CODES.len() + 1;

/// Index into [`STATUS_LABELS`]; a match compiles to a jump table, no search on the hot path.
const fn status_index(status: u16) -> usize {
    match status {
        100 => 0,
        200 => 1,
        201 => 2,
        204 => 3,
        400 => 4,
        401 => 5,
        404 => 6,
        405 => 7,
        408 => 8,
        413 => 9,
        414 => 10,
        431 => 11,
        500 => 12,
        502 => 13,
        503 => 14,
        504 => 15,
        505 => 16,
        _ => 17,
    }
}

/// The `status` label a status is counted under (`"200"`, ..., or `"other"`).
pub const fn status_label(status: u16) -> &'static str {
    STATUS_LABELS[status_index(status)]
}

/// Upper bounds of the latency histogram's buckets, in seconds (`+Inf` follows).
pub const LATENCY_BUCKETS_SECONDS: [f64; 17] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// The same bounds in nanoseconds: bucketing compares integers, exactly.
const LATENCY_BOUNDS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Histogram buckets including `+Inf`.
const BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// The bucket a latency falls in: the first bound `>=` it, else `+Inf`.
fn bucket_index(latency: Duration) -> usize {
    let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
    LATENCY_BOUNDS_NS.partition_point(|&bound| bound < ns)
}

fn zeroed<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

/// The metrics one gateway core records. Only that core writes them (relaxed atomics, no
/// contention); a scrape reads every core's.
///
/// Aligned to 128 bytes so that two cores' blocks never share a cache line (or an adjacent-line
/// prefetch pair).
#[derive(Debug)]
#[repr(align(128))]
pub struct CoreMetrics {
    /// Answered requests, `[endpoint][status]`.
    requests: [AtomicU64; ENDPOINTS * STATUSES],
    /// Latency histogram, `[endpoint][bucket]`, per bucket (not cumulative).
    latency_buckets: [AtomicU64; ENDPOINTS * BUCKETS],
    /// Sum of latencies per endpoint, in microseconds.
    latency_sum_us: [AtomicU64; ENDPOINTS],
    /// Requests started and not finished (signed: a scrape may sum cores mid-update).
    in_flight: AtomicI64,
    connections_open: AtomicI64,
    connections_accepted: AtomicU64,
    connections_rejected: AtomicU64,
    /// Refused credentials, by [`Refusal::index`].
    auth_refusals: [AtomicU64; AUTH_REASONS],
    /// 1 while the core spins before it sleeps, else 0.
    spinning: AtomicI64,
}

/// Reasons a credential is refused (the label of `moltbot_auth_failures_total`).
const AUTH_REASONS: usize = Refusal::ALL.len();

impl Default for CoreMetrics {
    fn default() -> Self {
        CoreMetrics {
            requests: zeroed(),
            latency_buckets: zeroed(),
            latency_sum_us: zeroed(),
            in_flight: AtomicI64::new(0),
            connections_open: AtomicI64::new(0),
            connections_accepted: AtomicU64::new(0),
            connections_rejected: AtomicU64::new(0),
            auth_refusals: zeroed(),
            spinning: AtomicI64::new(0),
        }
    }
}

impl CoreMetrics {
    /// A fresh block, all zeros.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one answered request: its endpoint, status and latency.
    pub fn record(&self, endpoint: Endpoint, status: u16, latency: Duration) {
        let e = endpoint.index();
        self.requests[e * STATUSES + status_index(status)].fetch_add(1, Ordering::Relaxed);
        self.latency_buckets[e * BUCKETS + bucket_index(latency)].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_sum_us[e].fetch_add(us, Ordering::Relaxed);
    }

    /// A request was read and is being handled.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request started with [`request_started`](Self::request_started) was answered.
    pub fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// A connection was accepted.
    pub fn connection_opened(&self) {
        self.connections_accepted.fetch_add(1, Ordering::Relaxed);
        self.connections_open.fetch_add(1, Ordering::Relaxed);
    }

    /// An accepted connection was closed.
    pub fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether the core now spins before it sleeps.
    pub fn set_spinning(&self, spinning: bool) {
        self.spinning.store(i64::from(spinning), Ordering::Relaxed);
    }

    /// A connection was refused (too many connections on this core).
    pub fn connection_rejected(&self) {
        self.connections_rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// A request was refused for its credential (no user id: labels stay bounded).
    pub fn auth_refused(&self, why: Refusal) {
        self.auth_refusals[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn add_to(&self, t: &mut Totals) {
        for (sum, a) in t.requests.iter_mut().zip(&self.requests) {
            *sum += a.load(Ordering::Relaxed);
        }
        for (sum, a) in t.latency_buckets.iter_mut().zip(&self.latency_buckets) {
            *sum += a.load(Ordering::Relaxed);
        }
        for (sum, a) in t.latency_sum_us.iter_mut().zip(&self.latency_sum_us) {
            *sum += a.load(Ordering::Relaxed);
        }
        t.in_flight += self.in_flight.load(Ordering::Relaxed);
        t.spinning += self.spinning.load(Ordering::Relaxed);
        t.connections_open += self.connections_open.load(Ordering::Relaxed);
        t.connections_accepted += self.connections_accepted.load(Ordering::Relaxed);
        t.connections_rejected += self.connections_rejected.load(Ordering::Relaxed);
        for (sum, a) in t.auth_refusals.iter_mut().zip(&self.auth_refusals) {
            *sum += a.load(Ordering::Relaxed);
        }
    }
}

/// Facts about the gateway itself for the exposition.
#[derive(Debug, Clone, Copy)]
pub struct GatewayInfo {
    /// The gateway's version (`moltbot_gateway_info{version}`).
    pub version: &'static str,
    /// Time since the gateway started.
    pub uptime: Duration,
    /// Gateway cores (executors).
    pub cores: usize,
    /// Whether the gateway is draining (SIGTERM received).
    pub draining: bool,
}

/// All cores summed.
#[derive(Debug)]
struct Totals {
    requests: [u64; ENDPOINTS * STATUSES],
    latency_buckets: [u64; ENDPOINTS * BUCKETS],
    latency_sum_us: [u64; ENDPOINTS],
    in_flight: i64,
    spinning: i64,
    connections_open: i64,
    connections_accepted: u64,
    connections_rejected: u64,
    auth_refusals: [u64; AUTH_REASONS],
}

impl Default for Totals {
    fn default() -> Self {
        Totals {
            requests: [0; ENDPOINTS * STATUSES],
            latency_buckets: [0; ENDPOINTS * BUCKETS],
            latency_sum_us: [0; ENDPOINTS],
            in_flight: 0,
            spinning: 0,
            connections_open: 0,
            connections_accepted: 0,
            connections_rejected: 0,
            auth_refusals: [0; AUTH_REASONS],
        }
    }
}

/// Worker states of `moltbot_worker_state`, as in the status.
const WORKER_STATES: [&str; 7] = [
    "starting", "ready", "busy", "draining", "stopped", "crashed", "failed",
];

/// One scrape's data, handed to `prometheus-client` as a collector.
#[derive(Debug)]
struct Exposition {
    totals: Totals,
    pool: PoolStatus,
    info: GatewayInfo,
}

type Fmt = Result<(), std::fmt::Error>;

impl Exposition {
    fn encode_http(&self, encoder: &mut DescriptorEncoder<'_>) -> Fmt {
        let t = &self.totals;
        let mut m = encoder.encode_descriptor(
            "http_requests",
            "HTTP requests answered, by endpoint and status",
            None,
            MetricType::Counter,
        )?;
        for ep in Endpoint::ALL {
            for (s, status) in STATUS_LABELS.iter().enumerate() {
                let v = t.requests[ep.index() * STATUSES + s];
                if v == 0 {
                    continue;
                }
                let labels = [("endpoint", ep.as_str()), ("status", *status)];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
            }
        }

        let mut m = encoder.encode_descriptor(
            "http_request_duration",
            "Time from request read to response written, by endpoint",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for ep in Endpoint::ALL {
            let per_bucket = &t.latency_buckets[ep.index() * BUCKETS..(ep.index() + 1) * BUCKETS];
            let count: u64 = per_bucket.iter().sum();
            if count == 0 {
                continue;
            }
            let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_SECONDS
                .iter()
                .copied()
                .chain(std::iter::once(f64::INFINITY))
                .zip(per_bucket.iter().copied())
                .collect();
            let sum = t.latency_sum_us[ep.index()] as f64 / 1e6;
            let labels = [("endpoint", ep.as_str())];
            m.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }

        encoder
            .encode_descriptor(
                "http_requests_in_flight",
                "HTTP requests being handled",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&t.in_flight.max(0))?;
        encoder
            .encode_descriptor(
                "gateway_spinning_cores",
                "Gateway cores that spin on their io_uring before they sleep, now (gateway_spin; \
                 by default where each has a CPU or the workers run beside the cores, or while \
                 WebSocket requests are in flight)",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&t.spinning.max(0))?;
        encoder
            .encode_descriptor(
                "connections_open",
                "Open client connections",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&t.connections_open.max(0))?;
        encoder
            .encode_descriptor(
                "connections_accepted",
                "Client connections accepted",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, u64, u64>(&t.connections_accepted, None)?;
        encoder
            .encode_descriptor(
                "connections_rejected",
                "Client connections refused because a core was at its connection limit",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, u64, u64>(&t.connections_rejected, None)?;
        let mut m = encoder.encode_descriptor(
            "auth_failures",
            "Requests refused for their credential, by reason (missing, unknown, revoked, expired, invalid, forbidden)",
            None,
            MetricType::Counter,
        )?;
        for why in Refusal::ALL {
            let labels = [("reason", why.reason())];
            m.encode_family(&labels)?
                .encode_counter::<NoLabelSet, u64, u64>(&t.auth_refusals[why.index()], None)?;
        }
        Ok(())
    }

    fn encode_pool(&self, encoder: &mut DescriptorEncoder<'_>) -> Fmt {
        let pool = &self.pool;
        encoder
            .encode_descriptor(
                "queue_depth",
                "Requests waiting for admission to a worker, all workers",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&pool.queued_requests)?;
        encoder
            .encode_descriptor(
                "routing_table_size",
                "Users in the routing table",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&pool.routing_table_size)?;
        encoder
            .encode_descriptor(
                "routing_table_syncs",
                "Fsyncs of the routing table (one per batch of first assignments)",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, u64, u64>(&pool.routing_table_syncs, None)?;
        encoder
            .encode_descriptor(
                "workers_healthy",
                "Workers serving: ready, busy, or being replaced by a recycle",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&pool.healthy_workers)?;

        let mut m = encoder.encode_descriptor(
            "worker_state",
            "Worker lifecycle state (1 for the current state, 0 for the others)",
            None,
            MetricType::Gauge,
        )?;
        for w in &pool.workers {
            for state in WORKER_STATES {
                let labels = [("worker", w.worker_id.as_str()), ("state", state)];
                let v: u32 = (w.state == state).into();
                m.encode_family(&labels)?.encode_gauge(&v)?;
            }
        }

        type Field = fn(&crate::pool::WorkerStatus) -> u64;
        let counters: [(&str, &str, Field); 4] = [
            ("worker_restarts", "Worker respawns", |w| w.restarts),
            (
                "worker_crashes",
                "Unrequested worker deaths (crashes, stalls, violations)",
                |w| w.crashes,
            ),
            (
                "worker_requests",
                "Requests answered by the worker (all generations)",
                |w| w.requests_processed,
            ),
            (
                "worker_errors",
                "Requests of the worker that ended in an error",
                |w| w.error_count,
            ),
        ];
        for (name, help, field) in counters {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for w in &pool.workers {
                let labels = [("worker", w.worker_id.as_str())];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, u64, u64>(&field(w), None)?;
            }
        }

        let gauges: [(&str, &str, Option<Unit>, Field); 4] = [
            (
                "worker_active_requests",
                "Requests admitted to the worker and not yet answered",
                None,
                |w| w.active_requests as u64,
            ),
            (
                "worker_queued_requests",
                "Requests waiting for admission to the worker",
                None,
                |w| w.queued_requests as u64,
            ),
            (
                "worker_memory",
                "Resident set size of the worker process",
                Some(Unit::Bytes),
                |w| w.memory_usage,
            ),
            (
                "worker_uptime",
                "Time the current worker process has been running",
                Some(Unit::Seconds),
                // Milliseconds in the status; the unit is seconds, rendered below as f64.
                |w| w.uptime,
            ),
        ];
        for (name, help, unit, field) in gauges {
            let seconds = matches!(unit, Some(Unit::Seconds));
            let mut m = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
            for w in &pool.workers {
                let labels = [("worker", w.worker_id.as_str())];
                let mut f = m.encode_family(&labels)?;
                if seconds {
                    f.encode_gauge(&(field(w) as f64 / 1e3))?;
                } else {
                    f.encode_gauge(&field(w))?;
                }
            }
        }
        Ok(())
    }

    fn encode_gateway(&self, encoder: &mut DescriptorEncoder<'_>) -> Fmt {
        let info = &self.info;
        encoder
            .encode_descriptor("gateway", "The gateway's version", None, MetricType::Info)?
            .encode_info(&[("version", info.version)])?;
        encoder
            .encode_descriptor(
                "gateway_uptime",
                "Time since the gateway started",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?
            .encode_gauge(&info.uptime.as_secs_f64())?;
        encoder
            .encode_descriptor(
                "gateway_cores",
                "Gateway cores (executors)",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&info.cores)?;
        let draining: u32 = info.draining.into();
        encoder
            .encode_descriptor(
                "gateway_draining",
                "1 while the gateway drains before stopping",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&draining)?;
        Ok(())
    }
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Fmt {
        self.encode_http(&mut encoder)?;
        self.encode_pool(&mut encoder)?;
        self.encode_gateway(&mut encoder)
    }
}

/// Renders the exposition (OpenMetrics text, see [`CONTENT_TYPE`]): every core's counters
/// summed, the pool's state and the gateway's facts. Metric names start with `moltbot_`.
pub fn encode(cores: &[Arc<CoreMetrics>], pool: &PoolStatus, extra: &GatewayInfo) -> String {
    let mut totals = Totals::default();
    for core in cores {
        core.add_to(&mut totals);
    }
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(Exposition {
        totals,
        pool: pool.clone(),
        info: *extra,
    }));
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail and the collector only forwards the writer's errors.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!("encoding metrics failed: {e}");
        if !out.ends_with("# EOF\n") {
            out.push_str("# EOF\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::pool::WorkerStatus;

    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// Parses `name{k="v",...} value` lines (the subset the text encoder produces).
    fn parse(text: &str) -> Vec<Sample> {
        let mut out = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().expect("numeric value"),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    (name.to_string(), parse_labels(body))
                }
            };
            out.push(Sample {
                name,
                labels,
                value,
            });
        }
        out
    }

    fn parse_labels(mut body: &str) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        while !body.is_empty() {
            let (key, rest) = body.split_once("=\"").expect("key=\"");
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next().expect("closing quote") {
                    (_, '\\') => value.push(chars.next().expect("escaped char").1),
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.insert(key.to_string(), value);
            body = rest[end + 1..].trim_start_matches(',');
        }
        labels
    }

    fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
        samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = find(samples, name, labels);
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0].value
    }

    fn worker(id: usize, state: &'static str) -> WorkerStatus {
        WorkerStatus {
            worker_id: format!("worker-{id}"),
            state,
            pid: Some(1000 + id as u32),
            standby_pid: None,
            requests_processed: 10 * id as u64 + 1,
            active_requests: id,
            queued_requests: 2 * id,
            last_heartbeat: 0,
            memory_usage: 4 * 1024 * 1024 + id as u64,
            uptime: 12_500,
            restarts: id as u64 + 3,
            crashes: id as u64 + 1,
            error_count: id as u64 + 7,
            generation: 1,
            cpus: None,
            cell: None,
        }
    }

    fn pool(states: &[&'static str]) -> PoolStatus {
        let workers: Vec<WorkerStatus> = states
            .iter()
            .enumerate()
            .map(|(i, s)| worker(i, s))
            .collect();
        PoolStatus {
            total_workers: workers.len(),
            healthy_workers: 1,
            busy_workers: 0,
            queued_requests: 5,
            routing_table_size: 42,
            routing_table_syncs: 7,
            uptime: 1000,
            workers,
        }
    }

    const INFO: GatewayInfo = GatewayInfo {
        version: "1.2.3",
        uptime: Duration::from_millis(7500),
        cores: 2,
        draining: true,
    };

    fn two_cores() -> Vec<Arc<CoreMetrics>> {
        let a = Arc::new(CoreMetrics::new());
        let b = Arc::new(CoreMetrics::default());
        let us = Duration::from_micros;
        a.record(Endpoint::Route, 200, us(30));
        a.record(Endpoint::Route, 200, us(50)); // exactly on the first bound
        a.record(Endpoint::Agent, 503, us(2000));
        b.record(Endpoint::Route, 200, Duration::from_secs(20)); // beyond the last bound
        b.record(Endpoint::Status, 418, us(100));
        b.record(Endpoint::Route, 404, Duration::from_nanos(50_001));
        vec![a, b]
    }

    #[test]
    fn requests_are_summed_over_cores_by_endpoint_and_status() {
        let text = encode(&two_cores(), &pool(&[]), &INFO);
        let s = parse(&text);
        let name = "moltbot_http_requests_total";
        assert_eq!(
            value(&s, name, &[("endpoint", "route"), ("status", "200")]),
            3.0
        );
        assert_eq!(
            value(&s, name, &[("endpoint", "route"), ("status", "404")]),
            1.0
        );
        assert_eq!(
            value(&s, name, &[("endpoint", "agent"), ("status", "503")]),
            1.0
        );
        // 418 is not in the set: counted as "other", never under its own label.
        assert_eq!(
            value(&s, name, &[("endpoint", "status"), ("status", "other")]),
            1.0
        );
        assert!(find(&s, name, &[("status", "418")]).is_empty());
        // Combinations never seen are not exported.
        assert_eq!(find(&s, name, &[]).len(), 4);
    }

    #[test]
    fn latency_histogram_is_cumulative_with_count_and_sum() {
        let text = encode(&two_cores(), &pool(&[]), &INFO);
        let s = parse(&text);
        let bucket = "moltbot_http_request_duration_seconds_bucket";
        let route: Vec<&Sample> = find(&s, bucket, &[("endpoint", "route")]);
        assert_eq!(route.len(), BUCKETS);
        let mut last = 0.0;
        let mut last_le = f64::NEG_INFINITY;
        for b in &route {
            let le: f64 = match b.labels["le"].as_str() {
                "+Inf" => f64::INFINITY,
                v => v.parse().expect("le is a number"),
            };
            assert!(le > last_le, "bounds ascend");
            assert!(b.value >= last, "cumulative counts never decrease");
            last = b.value;
            last_le = le;
        }
        let le = |s: &[&Sample], bound: f64| {
            s.iter()
                .find(|b| b.labels["le"].parse::<f64>().ok() == Some(bound))
                .map(|b| b.value)
                .expect("bucket present")
        };
        // 30 µs and 50 µs are <= 0.00005; 50.001 µs is not.
        assert_eq!(le(&route, 0.00005), 2.0);
        assert_eq!(le(&route, 0.0001), 3.0);
        assert_eq!(le(&route, 10.0), 3.0);
        assert_eq!(route.last().map(|b| b.value), Some(4.0));
        assert_eq!(route.last().map(|b| b.labels["le"].as_str()), Some("+Inf"));

        let count = value(
            &s,
            "moltbot_http_request_duration_seconds_count",
            &[("endpoint", "route")],
        );
        assert_eq!(count, 4.0);
        let sum = value(
            &s,
            "moltbot_http_request_duration_seconds_sum",
            &[("endpoint", "route")],
        );
        // 30 + 50 + 20_000_000 + 50 µs (50.001 µs truncated to whole microseconds).
        assert!((sum - 20.00013).abs() < 1e-9, "sum {sum}");

        let agent = find(&s, bucket, &[("endpoint", "agent")]);
        assert_eq!(le(&agent, 0.001), 0.0);
        assert_eq!(le(&agent, 0.0025), 1.0);
        // Endpoints without requests export no histogram.
        assert!(find(&s, bucket, &[("endpoint", "echo")]).is_empty());
    }

    #[test]
    fn gauges_and_connection_counters() {
        let cores = two_cores();
        cores[0].request_started();
        cores[0].request_started();
        cores[1].request_started();
        cores[0].request_finished();
        cores[0].connection_opened();
        cores[1].connection_opened();
        cores[1].connection_opened();
        cores[1].connection_closed();
        cores[0].connection_rejected();
        let s = parse(&encode(&cores, &pool(&[]), &INFO));
        assert_eq!(value(&s, "moltbot_http_requests_in_flight", &[]), 2.0);
        assert_eq!(value(&s, "moltbot_connections_open", &[]), 2.0);
        assert_eq!(value(&s, "moltbot_connections_accepted_total", &[]), 3.0);
        assert_eq!(value(&s, "moltbot_connections_rejected_total", &[]), 1.0);
        assert_eq!(value(&s, "moltbot_gateway_spinning_cores", &[]), 0.0);
        cores[0].set_spinning(true);
        cores[1].set_spinning(true);
        cores[1].set_spinning(true);
        let s = parse(&encode(&cores, &pool(&[]), &INFO));
        assert_eq!(value(&s, "moltbot_gateway_spinning_cores", &[]), 2.0);
        cores[1].set_spinning(false);
        let s = parse(&encode(&cores, &pool(&[]), &INFO));
        assert_eq!(value(&s, "moltbot_gateway_spinning_cores", &[]), 1.0);

        // A core that finished more than it started never shows a negative gauge.
        let unbalanced = Arc::new(CoreMetrics::new());
        unbalanced.request_finished();
        unbalanced.connection_closed();
        let s = parse(&encode(&[unbalanced], &pool(&[]), &INFO));
        assert_eq!(value(&s, "moltbot_http_requests_in_flight", &[]), 0.0);
        assert_eq!(value(&s, "moltbot_connections_open", &[]), 0.0);
    }

    #[test]
    fn worker_state_is_one_hot() {
        let states = ["ready", "failed", "draining", "mystery"];
        let s = parse(&encode(&[], &pool(&states), &INFO));
        for (i, state) in states.iter().enumerate() {
            let id = format!("worker-{i}");
            let rows = find(&s, "moltbot_worker_state", &[("worker", &id)]);
            assert_eq!(rows.len(), WORKER_STATES.len());
            for r in rows {
                let expected = if r.labels["state"] == *state {
                    1.0
                } else {
                    0.0
                };
                assert_eq!(r.value, expected, "{id} {r:?}");
            }
        }
        let ones = |id: &str| {
            find(&s, "moltbot_worker_state", &[("worker", id)])
                .iter()
                .filter(|r| r.value == 1.0)
                .count()
        };
        assert_eq!(ones("worker-0"), 1);
        assert_eq!(ones("worker-1"), 1);
        // A state outside the known set sets none.
        assert_eq!(ones("worker-3"), 0);
    }

    #[test]
    fn pool_and_worker_metrics() {
        let s = parse(&encode(&[], &pool(&["ready", "busy"]), &INFO));
        assert_eq!(value(&s, "moltbot_queue_depth", &[]), 5.0);
        assert_eq!(value(&s, "moltbot_routing_table_size", &[]), 42.0);
        assert_eq!(value(&s, "moltbot_routing_table_syncs_total", &[]), 7.0);
        assert_eq!(value(&s, "moltbot_workers_healthy", &[]), 1.0);
        let w1 = [("worker", "worker-1")];
        assert_eq!(value(&s, "moltbot_worker_restarts_total", &w1), 4.0);
        assert_eq!(value(&s, "moltbot_worker_crashes_total", &w1), 2.0);
        assert_eq!(value(&s, "moltbot_worker_requests_total", &w1), 11.0);
        assert_eq!(value(&s, "moltbot_worker_errors_total", &w1), 8.0);
        assert_eq!(value(&s, "moltbot_worker_active_requests", &w1), 1.0);
        assert_eq!(value(&s, "moltbot_worker_queued_requests", &w1), 2.0);
        assert_eq!(
            value(&s, "moltbot_worker_memory_bytes", &w1),
            (4 * 1024 * 1024 + 1) as f64
        );
        assert_eq!(value(&s, "moltbot_worker_uptime_seconds", &w1), 12.5);
        assert_eq!(
            value(
                &s,
                "moltbot_worker_requests_total",
                &[("worker", "worker-0")]
            ),
            1.0
        );
    }

    #[test]
    fn gateway_facts_and_openmetrics_framing() {
        let text = encode(&two_cores(), &pool(&["ready"]), &INFO);
        let s = parse(&text);
        assert_eq!(
            value(&s, "moltbot_gateway_info", &[("version", "1.2.3")]),
            1.0
        );
        assert_eq!(value(&s, "moltbot_gateway_uptime_seconds", &[]), 7.5);
        assert_eq!(value(&s, "moltbot_gateway_cores", &[]), 2.0);
        assert_eq!(value(&s, "moltbot_gateway_draining", &[]), 1.0);
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
        assert!(text.contains("# TYPE moltbot_http_requests counter\n"));
        assert!(text.contains("# TYPE moltbot_http_request_duration_seconds histogram\n"));
        assert!(text.contains("# UNIT moltbot_http_request_duration_seconds seconds\n"));
        // Every sample carries the prefix.
        assert!(s.iter().all(|x| x.name.starts_with("moltbot_")));
        // The content type matches the framing the encoder produces.
        assert!(CONTENT_TYPE.starts_with("application/openmetrics-text;"));
        assert!(CONTENT_TYPE.contains("version=1.0.0"));
    }

    #[test]
    fn empty_exposition_still_has_every_family() {
        let text = encode(&[], &pool(&[]), &INFO);
        for family in [
            "moltbot_http_requests",
            "moltbot_http_request_duration_seconds",
            "moltbot_worker_state",
            "moltbot_worker_memory_bytes",
        ] {
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
        let s = parse(&text);
        assert_eq!(value(&s, "moltbot_http_requests_in_flight", &[]), 0.0);
        assert_eq!(value(&s, "moltbot_gateway_draining", &[]), 1.0);
    }

    #[test]
    fn status_bucketing() {
        for code in STATUS_CODES {
            assert_eq!(status_label(code), code.to_string());
        }
        for code in [0, 101, 202, 299, 302, 418, 429, 501, 599, u16::MAX] {
            assert_eq!(status_label(code), "other", "{code}");
        }
    }

    #[test]
    fn endpoint_labels_are_distinct_and_indexed() {
        let mut seen = std::collections::HashSet::new();
        for (i, ep) in Endpoint::ALL.iter().enumerate() {
            assert_eq!(ep.index(), i);
            assert!(seen.insert(ep.as_str()));
        }
        assert_eq!(Endpoint::Route.as_str(), "route");
        assert_eq!(Endpoint::Other.as_str(), "other");
    }

    #[test]
    fn bucket_bounds_agree() {
        for (s, ns) in LATENCY_BUCKETS_SECONDS.iter().zip(LATENCY_BOUNDS_NS) {
            assert_eq!((s * 1e9).round() as u64, ns);
        }
        assert_eq!(bucket_index(Duration::ZERO), 0);
        assert_eq!(bucket_index(Duration::from_secs(10)), BUCKETS - 2);
        assert_eq!(bucket_index(Duration::MAX), BUCKETS - 1);
    }

    #[test]
    fn core_metrics_are_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CoreMetrics>();
        assert_eq!(std::mem::align_of::<CoreMetrics>(), 128);
    }
}
