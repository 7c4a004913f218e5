//! The result of a run: the numbers, the human table and the JSON document.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client_cpu::ClientCpu;
use crate::config::{Config, Protocol, Stop, WsMethod};
use crate::server_cpu::ServerCpu;
use crate::stats::{Merged, WsStats};

/// Errors by kind (measured requests only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    /// Connecting failed or timed out.
    pub connect: u64,
    /// Reading failed or the connection ended mid-response.
    pub read: u64,
    /// Writing the request failed.
    pub write: u64,
    /// No answer within the timeout.
    pub timeout: u64,
    /// The answer is not valid HTTP/1.1 (or more bytes came than one answer).
    pub parse: u64,
    /// The status was not 200 (see `status` for which).
    pub status: u64,
    /// A 200 answer with the wrong body (echo differs, wrong user, wrong worker in the body);
    /// WebSocket: an `ok` answer with the wrong payload (wrong run id, a missing stage).
    pub body: u64,
    /// WebSocket: the upgrade or the `connect` handshake failed.
    pub handshake: u64,
    /// WebSocket: frames that break the protocol (answers to no request, event `seq` gaps).
    pub protocol: u64,
}

impl ErrorCounts {
    /// All errors.
    pub fn total(&self) -> u64 {
        self.connect
            + self.read
            + self.write
            + self.timeout
            + self.parse
            + self.status
            + self.body
            + self.handshake
            + self.protocol
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl LatencySummary {
    /// `self` less `floor`, figure by figure, none below zero.
    pub fn less(&self, floor: &LatencySummary) -> LatencySummary {
        let d = |a: f64, b: f64| (a - b).max(0.0);
        LatencySummary {
            p50: d(self.p50, floor.p50),
            p90: d(self.p90, floor.p90),
            p99: d(self.p99, floor.p99),
            p999: d(self.p999, floor.p999),
            max: d(self.max, floor.max),
            mean: d(self.mean, floor.mean),
        }
    }

    /// From a histogram of nanoseconds (all zero when empty).
    pub fn from_histogram(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// The percentiles of [`Report::percentiles`]: 0 to 90 in steps of 1, then 20 points a decade
/// of 1/(1-p) up to 99.999 (90, 91.09, …, 99, …, 99.9, …, 99.999), then 100 (the maximum).
pub fn curve_percentiles() -> Vec<f64> {
    let mut ps: Vec<f64> = (0..=90).map(f64::from).collect();
    for k in 21..=100 {
        let p = 100.0 - 100.0 * 10f64.powf(-f64::from(k) / 20.0);
        // Rounded so that 99, 99.9, … are exact in the JSON document.
        ps.push((p * 1e6).round() / 1e6);
    }
    ps.push(100.0);
    ps
}

/// `[percentile, latency µs]` at each of [`curve_percentiles`] (empty for no samples).
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<[f64; 2]> {
    if h.is_empty() {
        return Vec::new();
    }
    curve_percentiles()
        .into_iter()
        .map(|p| {
            let ns = if p >= 100.0 {
                h.max()
            } else {
                h.value_at_quantile(p / 100.0)
            };
            [p, ns as f64 / 1000.0]
        })
        .collect()
}

/// A user answered by more than one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StickyExample {
    /// The user id.
    pub user: String,
    /// Every worker that answered it.
    pub workers: Vec<String>,
}

/// The settings of a run, as reported (the token itself is never included).
#[derive(Debug, Clone, Serialize)]
pub struct ConfigSummary {
    /// Target URL.
    pub url: String,
    /// `echo`, `agent` or `route`.
    pub endpoint: &'static str,
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Open-loop rate (requests/s).
    pub rate: Option<f64>,
    /// Load threads used.
    pub threads: usize,
    /// Connections.
    pub connections: usize,
    /// Measured duration asked for (seconds), when stopping by time.
    pub duration_s: Option<f64>,
    /// Measured requests asked for, when stopping by count.
    pub requests: Option<u64>,
    /// Warm-up (seconds).
    pub warmup_s: f64,
    /// Users.
    pub users: u32,
    /// `uniform` or `zipf`.
    pub dist: &'static str,
    /// Zipf exponent.
    pub zipf_s: f64,
    /// Request body size (bytes).
    pub body_size: usize,
    /// Request timeout (seconds).
    pub timeout_s: f64,
    /// Seed of the user draws.
    pub seed: u64,
    /// Whether a bearer token was sent.
    pub token: bool,
    /// `http` or `ws`.
    pub protocol: &'static str,
    /// WebSocket: the RPC method (`health` or `agent`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_method: Option<&'static str>,
    /// Requests in flight per connection.
    pub depth: usize,
}

impl ConfigSummary {
    /// The summary of `cfg`.
    pub fn of(cfg: &Config) -> ConfigSummary {
        ConfigSummary {
            url: cfg.target.url.clone(),
            endpoint: cfg.endpoint.name(),
            mode: if cfg.rate.is_some() { "open" } else { "closed" },
            rate: cfg.rate,
            threads: cfg.effective_threads(),
            connections: cfg.connections,
            duration_s: match cfg.stop {
                Stop::Duration(d) => Some(d.as_secs_f64()),
                Stop::Requests(_) => None,
            },
            requests: match cfg.stop {
                Stop::Requests(n) => Some(n),
                Stop::Duration(_) => None,
            },
            warmup_s: cfg.warmup.as_secs_f64(),
            users: cfg.users,
            dist: cfg.dist.name(),
            zipf_s: cfg.zipf_s,
            body_size: cfg.body_size,
            timeout_s: cfg.timeout.as_secs_f64(),
            seed: cfg.seed,
            token: cfg.token.is_some(),
            protocol: cfg.protocol.name(),
            ws_method: (cfg.protocol == Protocol::Ws).then(|| cfg.ws_method.name()),
            depth: cfg.depth,
        }
    }
}

/// The stages of measured `agent` runs: each from sending the `req` frame (µs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AgentStages {
    /// Runs answered `accepted`.
    pub accepted: u64,
    /// To the `accepted` answer.
    pub accepted_us: LatencySummary,
    /// Runs with an event seen before their final answer.
    pub first_event: u64,
    /// To the first `agent` or `chat` event of the run.
    pub first_event_us: LatencySummary,
    /// To the final answer (the same figures as the report's `latency_us`).
    pub final_us: LatencySummary,
    /// `agent` events stamped by the worker (`data.emittedUs`): from the worker emitting each
    /// to this client reading it, i.e. what the gateway (and the client's own reading) adds.
    pub event_delay: u64,
    /// Those events' delays.
    pub event_delay_us: LatencySummary,
    /// Messages of the loopback floor measured after the run (see [`crate::floor`]): stamped
    /// bursts shaped like the run's over one loopback connection, no gateway in between.
    pub loopback_floor: u64,
    /// Their delays: what one loopback delivery and the client's wake-up cost.
    pub loopback_floor_us: LatencySummary,
    /// The event delay less the loopback floor, at each percentile (zero where the floor is
    /// higher): what the gateway adds to an event.
    pub gateway_adds_us: LatencySummary,
    /// Events of the runs received before their final answers.
    pub events: u64,
    /// Runs whose final answer came with no event of theirs before it.
    pub runs_without_event: u64,
}

/// What a WebSocket run adds to the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WsSummary {
    /// The RPC method.
    pub method: &'static str,
    /// Handshakes completed (warm-up included): one per connection unless some reconnected.
    pub handshakes: u64,
    /// Measured final answers by outcome: `ok` or the error `code`.
    pub outcomes: BTreeMap<String, u64>,
    /// `agent` runs only: the stages of a run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStages>,
}

impl WsSummary {
    fn of(method: WsMethod, ws: &WsStats, final_us: LatencySummary) -> WsSummary {
        WsSummary {
            method: method.name(),
            handshakes: ws.handshakes,
            outcomes: ws.outcomes.clone(),
            agent: (method == WsMethod::Agent).then(|| AgentStages {
                accepted: ws.accepted.len(),
                accepted_us: LatencySummary::from_histogram(&ws.accepted),
                first_event: ws.first_event.len(),
                first_event_us: LatencySummary::from_histogram(&ws.first_event),
                final_us,
                event_delay: ws.event_delay.len(),
                event_delay_us: LatencySummary::from_histogram(&ws.event_delay),
                loopback_floor: 0,
                loopback_floor_us: LatencySummary::default(),
                gateway_adds_us: LatencySummary::default(),
                events: ws.run_events,
                runs_without_event: ws.runs_without_event,
            }),
        }
    }
}

/// The result of a run. Serializes to the `--json` document.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Measured answers (any status).
    pub requests: u64,
    /// Measured time: from the end of the warm-up to the last answer (at least the duration
    /// asked for).
    pub duration_s: f64,
    /// `requests / duration_s`.
    pub rps: f64,
    /// Latency (µs); in open loop from the intended send time.
    pub latency_us: LatencySummary,
    /// The latency curve: `[percentile, latency µs]` pairs (see [`curve_percentiles`]), what
    /// `moltbot-bench plot` draws.
    pub percentiles: Vec<[f64; 2]>,
    /// Errors by kind.
    pub errors: ErrorCounts,
    /// Answers by status code.
    pub status: BTreeMap<u16, u64>,
    /// Answers by `x-moltbot-worker`.
    pub per_worker: BTreeMap<String, u64>,
    /// Answers without `x-moltbot-worker`.
    pub no_worker_header: u64,
    /// Open loop: requests due within the run that were never sent because their connection
    /// was still waiting for earlier answers at the end (the server did not keep up).
    pub unsent: u64,
    /// Users answered by more than one worker (warm-up included).
    pub sticky_violations: u64,
    /// Some of those users.
    pub sticky_examples: Vec<StickyExample>,
    /// Distinct users answered with a worker header.
    pub users_seen: u64,
    /// The first problems seen, described.
    pub problems: Vec<String>,
    /// WebSocket runs: handshakes, outcomes and (for `agent`) the stages of a run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws: Option<WsSummary>,
    /// The server's CPU over the measured period (with `--server-pid`/`--server-status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu: Option<ServerCpu>,
    /// The load generator's own CPU over the measured period (absent when no measured period
    /// began, e.g. a run that ended in its warm-up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cpu: Option<ClientCpu>,
    /// The settings.
    pub config: ConfigSummary,
    /// The merged latency histogram (ns); not serialized.
    #[serde(skip)]
    pub histogram: Histogram<u64>,
}

impl Report {
    /// Builds the report of merged counts over `measured` time.
    pub fn new(cfg: &Config, m: Merged, measured: Duration) -> Report {
        let duration_s = measured.as_secs_f64();
        let latency_us = LatencySummary::from_histogram(&m.hist);
        let ws =
            (cfg.protocol == Protocol::Ws).then(|| WsSummary::of(cfg.ws_method, &m.ws, latency_us));
        Report {
            requests: m.requests,
            duration_s,
            rps: if duration_s > 0.0 {
                m.requests as f64 / duration_s
            } else {
                0.0
            },
            latency_us,
            percentiles: percentile_curve(&m.hist),
            errors: m.errors,
            status: m.status,
            per_worker: m.per_worker,
            no_worker_header: m.no_worker_header,
            unsent: m.unsent,
            sticky_violations: m.sticky_violations,
            sticky_examples: m.sticky_examples,
            users_seen: m.users_seen,
            problems: m.problems,
            ws,
            server_cpu: None,
            client_cpu: None,
            config: ConfigSummary::of(cfg),
            histogram: m.hist,
        }
    }

    /// No error, no sticky violation, and at least one answer.
    pub fn is_clean(&self) -> bool {
        self.failures().is_empty()
    }

    /// Why the run is not clean, one line per reason (empty when clean).
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.requests == 0 {
            out.push("no request was answered".to_string());
        }
        let e = &self.errors;
        for (n, what) in [
            (e.connect, "connect errors"),
            (e.read, "read errors"),
            (e.write, "write errors"),
            (e.timeout, "timeouts"),
            (e.parse, "unparsable responses"),
            (e.body, "responses with a wrong body"),
            (e.handshake, "failed WebSocket handshakes"),
            (e.protocol, "WebSocket protocol violations"),
        ] {
            if n > 0 {
                out.push(format!("{n} {what}"));
            }
        }
        if e.status > 0
            && let Some(ws) = &self.ws
        {
            let codes: Vec<String> = ws
                .outcomes
                .iter()
                .filter(|(s, _)| *s != "ok")
                .map(|(s, n)| format!("{n}×{s}"))
                .collect();
            out.push(format!("{} error answers ({})", e.status, codes.join(", ")));
        } else if e.status > 0 {
            let codes: Vec<String> = self
                .status
                .iter()
                .filter(|(s, _)| **s != 200)
                .map(|(s, n)| format!("{n}×{s}"))
                .collect();
            out.push(format!(
                "{} responses with a status other than 200 ({})",
                e.status,
                codes.join(", ")
            ));
        }
        if self.sticky_violations > 0 {
            let ex: Vec<String> = self
                .sticky_examples
                .iter()
                .map(|x| format!("{} on {}", x.user, x.workers.join(" and ")))
                .collect();
            out.push(format!(
                "{} sticky violations (users answered by more than one worker): {}",
                self.sticky_violations,
                ex.join("; ")
            ));
        }
        out
    }

    /// The JSON document (pretty-printed).
    pub fn to_json(&self) -> String {
        // Plain data with string keys and finite numbers: serialization cannot fail; keep a
        // valid document regardless.
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
    }

    /// The human table.
    pub fn render_table(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let mode = match c.rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => "closed loop".to_string(),
        };
        let dist = if c.dist == "zipf" {
            format!("zipf s={}", c.zipf_s)
        } else {
            c.dist.to_string()
        };
        let what = match c.ws_method {
            Some(m) => format!("ws {m}, {} in flight per connection", c.depth),
            None => c.endpoint.to_string(),
        };
        let _ = writeln!(
            s,
            "moltbot-bench {} ({}): {}, {} threads, {} connections, {} users ({}), {}-byte bodies",
            c.url, what, mode, c.threads, c.connections, c.users, dist, c.body_size
        );
        let _ = writeln!(s, "  {:<13}{}", "requests", self.requests);
        let _ = writeln!(s, "  {:<13}{:.2} s", "duration", self.duration_s);
        let _ = writeln!(s, "  {:<13}{:.1} req/s", "throughput", self.rps);
        if let Some(cpu) = &self.server_cpu {
            render_server_cpu(&mut s, cpu);
        }
        if let Some(cpu) = &self.client_cpu {
            let per = cpu.requests_per_cpu_second.map_or_else(String::new, |r| {
                format!(", {r:.1} requests per client CPU-second")
            });
            let _ = writeln!(
                s,
                "  {:<13}{:.2} CPU-seconds ({:.2} cores busy){per}",
                "client CPU", cpu.seconds, cpu.cores
            );
        }
        if c.rate.is_some() {
            let _ = writeln!(
                s,
                "  {:<13}{} (due but not sent: the server fell behind the rate)",
                "unsent", self.unsent
            );
        }
        let l = &self.latency_us;
        let _ = writeln!(
            s,
            "  {:<13}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "latency", "p50", "p90", "p99", "p99.9", "max", "mean"
        );
        let _ = writeln!(
            s,
            "  {:<13}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "",
            fmt_us(l.p50),
            fmt_us(l.p90),
            fmt_us(l.p99),
            fmt_us(l.p999),
            fmt_us(l.max),
            fmt_us(l.mean)
        );
        if let Some(a) = self.ws.as_ref().and_then(|w| w.agent.as_ref()) {
            for (label, l) in [
                ("  accepted", &a.accepted_us),
                ("  1st event", &a.first_event_us),
                ("  final", &a.final_us),
                ("  event delay", &a.event_delay_us),
                ("  loopback", &a.loopback_floor_us),
                ("  gw adds", &a.gateway_adds_us),
            ] {
                if label == "  loopback" && a.loopback_floor == 0 {
                    break;
                }
                let _ = writeln!(
                    s,
                    "  {:<13}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
                    label,
                    fmt_us(l.p50),
                    fmt_us(l.p90),
                    fmt_us(l.p99),
                    fmt_us(l.p999),
                    fmt_us(l.max),
                    fmt_us(l.mean)
                );
            }
            let _ = writeln!(
                s,
                "  {:<13}{} accepted, {} with events ({} events), {} without an event before the final answer",
                "runs", a.accepted, a.first_event, a.events, a.runs_without_event
            );
        }
        let e = &self.errors;
        let _ = write!(
            s,
            "  {:<13}{} (connect {}, read {}, write {}, timeout {}, parse {}, status {}, body {}",
            "errors",
            e.total(),
            e.connect,
            e.read,
            e.write,
            e.timeout,
            e.parse,
            e.status,
            e.body
        );
        if self.ws.is_some() {
            let _ = write!(s, ", handshake {}, protocol {}", e.handshake, e.protocol);
        }
        let _ = writeln!(s, ")");
        if let Some(ws) = &self.ws {
            let outcomes: Vec<String> = ws
                .outcomes
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let _ = writeln!(
                s,
                "  {:<13}{} ({} handshakes)",
                "answers",
                if outcomes.is_empty() {
                    "-".to_string()
                } else {
                    outcomes.join(", ")
                },
                ws.handshakes
            );
        }
        let status: Vec<String> = self
            .status
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        if self.ws.is_none() {
            let _ = writeln!(
                s,
                "  {:<13}{}",
                "status",
                if status.is_empty() {
                    "-".to_string()
                } else {
                    status.join(", ")
                }
            );
        }
        let mut workers: Vec<(&String, &u64)> = self.per_worker.iter().collect();
        workers.sort_by_key(|(name, _)| natural_key(name));
        if workers.is_empty() {
            let _ = writeln!(s, "  {:<13}-", "per worker");
        }
        for (i, (name, n)) in workers.iter().enumerate() {
            let pct = if self.requests > 0 {
                **n as f64 * 100.0 / self.requests as f64
            } else {
                0.0
            };
            let label = if i == 0 { "per worker" } else { "" };
            let _ = writeln!(s, "  {label:<13}{name:<12}{n:>10}  {pct:5.1}%");
        }
        if self.no_worker_header > 0 {
            let _ = writeln!(
                s,
                "  {:<13}{:<12}{:>10}",
                "", "(no header)", self.no_worker_header
            );
        }
        let _ = writeln!(
            s,
            "  {:<13}{} violations ({} users seen)",
            "sticky", self.sticky_violations, self.users_seen
        );
        for x in &self.sticky_examples {
            let _ = writeln!(s, "  {:<13}{} on {}", "", x.user, x.workers.join(", "));
        }
        s
    }
}

/// The server CPU lines of the table.
fn render_server_cpu(s: &mut String, cpu: &ServerCpu) {
    let per = match cpu.requests_per_cpu_second {
        Some(r) => format!("{r:.1} requests per server CPU-second"),
        None => "no server CPU time seen".to_string(),
    };
    let _ = writeln!(
        s,
        "  {:<13}{:.2} CPU-seconds ({:.2} cores busy, {} processes), {per}",
        "server CPU",
        cpu.seconds,
        cpu.cores,
        cpu.processes.len()
    );
    // Processes that ended inside another (recycled workers, many in a long run) are one line
    // per process that holds them.
    let mut held: BTreeMap<u32, usize> = BTreeMap::new();
    for p in &cpu.processes {
        if let Some(h) = p.counted_in {
            *held.entry(h).or_default() += 1;
        }
    }
    for p in cpu.processes.iter().filter(|p| p.counted_in.is_none()) {
        let mut tags = Vec::new();
        if p.born {
            tags.push("started during the run");
        }
        if p.ended {
            tags.push("ended during the run");
        }
        let reaped;
        if let Some(n) = held.get(&p.pid) {
            reaped = format!("with {n} that ended inside it");
            tags.push(&reaped);
        }
        let tags = if tags.is_empty() {
            String::new()
        } else {
            format!(" ({})", tags.join(", "))
        };
        let _ = writeln!(
            s,
            "  {:<13}pid {:<8}{:<16}{:>8.2} s{tags}",
            "", p.pid, p.command, p.seconds
        );
    }
    for n in &cpu.notes {
        let _ = writeln!(s, "  {:<13}note: {n}", "");
    }
}

/// `worker-10` after `worker-9`.
fn natural_key(name: &str) -> (String, u64) {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (prefix, num) = name.split_at(name.len() - digits);
    (prefix.to_string(), num.parse().unwrap_or(0))
}

/// Microseconds with a fitting unit.
pub fn fmt_us(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.1}µs")
    } else if us < 1000.0 {
        format!("{us:.0}µs")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Target;
    use crate::stats::{ThreadStats, merge};
    use std::time::Instant;

    fn report(f: impl FnOnce(&mut ThreadStats)) -> Report {
        let cfg = Config::new(Target::parse("http://127.0.0.1:1").expect("url"));
        let mut t = ThreadStats::new(10);
        f(&mut t);
        Report::new(&cfg, merge(&[t]), Duration::from_secs(2))
    }

    #[test]
    fn clean_report_and_json_field_names() {
        let r = report(|t| {
            for i in 0..10u32 {
                t.answered(200, Duration::from_micros(100), Instant::now());
                t.workers
                    .observe(i, if i % 2 == 0 { b"worker-0" } else { b"worker-1" }, true);
            }
        });
        assert!(r.is_clean(), "{:?}", r.failures());
        assert_eq!(r.rps, 5.0);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        for key in [
            "requests",
            "duration_s",
            "rps",
            "latency_us",
            "errors",
            "status",
            "per_worker",
            "sticky_violations",
            "config",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        for key in ["p50", "p90", "p99", "p999", "max", "mean"] {
            assert!(
                v["latency_us"][key].as_f64().is_some(),
                "missing latency {key}"
            );
        }
        assert_eq!(v["status"]["200"], 10);
        assert_eq!(v["per_worker"]["worker-1"], 5);
        assert_eq!(v["errors"]["timeout"], 0);
        assert_eq!(v["config"]["endpoint"], "echo");
        assert_eq!(v["config"]["token"], false);
        let table = r.render_table();
        assert!(table.contains("worker-0"), "{table}");
        assert!(table.contains("5.0 req/s"), "{table}");
    }

    #[test]
    fn failures_name_each_problem() {
        let empty = report(|_| {});
        assert_eq!(empty.failures(), vec!["no request was answered"]);
        let r = report(|t| {
            t.answered(200, Duration::from_micros(5), Instant::now());
            t.answered(503, Duration::from_micros(5), Instant::now());
            t.errors.add(crate::stats::ErrorKind::Status);
            t.errors.add(crate::stats::ErrorKind::Timeout);
            t.workers.observe(3, b"worker-0", true);
            t.workers.observe(3, b"worker-1", true);
        });
        let f = r.failures().join("\n");
        assert!(f.contains("1 timeouts"), "{f}");
        assert!(f.contains("1×503"), "{f}");
        assert!(f.contains("user-3 on worker-0 and worker-1"), "{f}");
        assert!(!r.is_clean());
    }

    #[test]
    fn the_percentile_curve_follows_the_histogram() {
        let ps = curve_percentiles();
        assert_eq!(ps.len(), 91 + 80 + 1);
        assert!(ps.windows(2).all(|w| w[0] < w[1]), "{ps:?}");
        for p in [0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 99.99, 99.999, 100.0] {
            assert!(ps.contains(&p), "{p} missing");
        }
        // 1..=100,000 µs once each: the value at p percent is p × 1,000 µs.
        let mut t = ThreadStats::new(1);
        for us in 1..=100_000u64 {
            t.answered(200, Duration::from_micros(us), Instant::now());
        }
        let cfg = Config::new(Target::parse("http://127.0.0.1:1").expect("url"));
        let r = Report::new(&cfg, merge(&[t]), Duration::from_secs(1));
        assert_eq!(r.percentiles.len(), ps.len());
        for &[p, us] in &r.percentiles {
            let want = (p * 1000.0).max(1.0);
            assert!(
                (us - want).abs() <= want * 0.002 + 1.0,
                "p{p}: {us} µs, want {want}"
            );
        }
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(v["percentiles"][50][0], 50.0);
        assert_eq!(v["percentiles"].as_array().map(Vec::len), Some(ps.len()));
        assert!(report(|_| {}).percentiles.is_empty());
    }

    #[test]
    fn client_cpu_is_in_the_table_and_the_json_when_measured() {
        let mut r = report(|t| {
            t.answered(200, Duration::from_micros(100), Instant::now());
        });
        assert!(!r.render_table().contains("client CPU"));
        r.client_cpu = Some(ClientCpu::of(
            3000,
            Duration::from_millis(1500),
            Duration::from_secs(2),
        ));
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(v["client_cpu"]["seconds"], 1.5);
        assert_eq!(v["client_cpu"]["requests_per_cpu_second"], 2000.0);
        assert_eq!(v["client_cpu"]["cores"], 0.75);
        let table = r.render_table();
        assert!(
            table.contains(
                "client CPU   1.50 CPU-seconds (0.75 cores busy), 2000.0 requests per client CPU-second"
            ),
            "{table}"
        );
    }

    #[test]
    fn server_cpu_is_in_the_table_and_the_json_when_measured() {
        let mut r = report(|t| {
            t.answered(200, Duration::from_micros(100), Instant::now());
        });
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert!(v.get("server_cpu").is_none());
        assert!(!r.render_table().contains("server CPU"));
        let p = |pid, ticks, ended| crate::server_cpu::ProcessTicks {
            pid,
            command: "moltbot".into(),
            ticks,
            born: false,
            ended,
            counted_in: None,
        };
        r.server_cpu = Some(ServerCpu::from_ticks(
            3000,
            100,
            Duration::from_secs(2),
            vec![
                p(41, 100, false),
                p(42, 50, true),
                crate::server_cpu::ProcessTicks {
                    counted_in: Some(41),
                    ..p(43, 0, true)
                },
            ],
            vec![],
        ));
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(v["server_cpu"]["seconds"], 1.5);
        assert_eq!(v["server_cpu"]["requests_per_cpu_second"], 2000.0);
        assert_eq!(v["server_cpu"]["pids"], serde_json::json!([41, 42, 43]));
        assert_eq!(v["server_cpu"]["processes"][1]["ended"], true);
        assert_eq!(v["server_cpu"]["processes"][2]["counted_in"], 41);
        let table = r.render_table();
        assert!(
            table.contains("1.50 CPU-seconds (0.75 cores busy, 3 processes), 2000.0 requests per server CPU-second"),
            "{table}"
        );
        assert!(table.contains("pid 42"), "{table}");
        // One that ended inside another is a count on that one's line.
        assert!(!table.contains("pid 43"), "{table}");
        assert!(table.contains("with 1 that ended inside it"), "{table}");
        assert!(table.contains("ended during the run"), "{table}");
        assert!(table.contains("note: 1 process(es) ended"), "{table}");
    }

    #[test]
    fn formats_units_and_sorts_workers_naturally() {
        assert_eq!(fmt_us(3.25), "3.2µs");
        assert_eq!(fmt_us(250.4), "250µs");
        assert_eq!(fmt_us(1500.0), "1.50ms");
        assert_eq!(fmt_us(2_500_000.0), "2.50s");
        let mut names = vec!["worker-10", "worker-9", "worker-1"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(names, vec!["worker-1", "worker-9", "worker-10"]);
    }
}
