//! `moltbot-bench`: the load generator for the moltbot gateway (a thin CLI over the
//! `moltbot_bench` engine).
//!
//! Exit status: 0 when every answer was verified (or `--allow-errors`), 1 when there were
//! errors or sticky violations, 2 for bad usage or a run that could not start.
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use moltbot_bench::plot::{self, Series};
use moltbot_bench::{Config, Dist, Endpoint, Progress, Protocol, Report, Stop, Target, WsMethod};

/// HTTP/1.1 keep-alive and WebSocket RPC load generator for the moltbot gateway. Verifies every
/// answer (status 200, echoed body, sticky worker per user; over WebSocket the answer to each
/// request id and the stages of agent runs) and exits non-zero on any error or violation.
#[derive(Debug, Parser)]
#[command(
    name = "moltbot-bench",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Target, e.g. http://127.0.0.1:18789 (a path is used as a prefix).
    #[arg(required = true)]
    url: Option<String>,
    /// Load threads [default: number of cores].
    #[arg(short, long)]
    threads: Option<usize>,
    /// Keep-alive connections, spread over the threads.
    #[arg(short, long, default_value_t = 32)]
    connections: usize,
    /// http: requests to --endpoint; ws: the OpenClaw protocol over WebSocket on `/`, each
    /// connection acting for one user (named by `?user=`), RPCs of --ws-method.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Http)]
    protocol: ProtocolArg,
    /// With --protocol ws: requests in flight per connection (HTTP: always 1).
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// With --protocol ws: health (one answer), or agent (accepted, events, final answer).
    #[arg(long, value_enum, default_value_t = WsMethodArg::Health)]
    ws_method: WsMethodArg,
    /// Measured duration: seconds or "500ms", "2m" [default: 10].
    #[arg(short, long, value_parser = parse_secs, conflicts_with = "requests")]
    duration: Option<Duration>,
    /// Stop after this many measured requests instead of a duration.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Distinct users user-0 .. user-{N-1} (ws: each connection's user is drawn when it
    /// connects).
    #[arg(long, default_value_t = 100)]
    users: u32,
    /// How each request's user is drawn.
    #[arg(long, value_enum, default_value_t = DistArg::Uniform)]
    dist: DistArg,
    /// Zipf exponent s (user of rank k drawn with probability ∝ 1/k^s).
    #[arg(long, default_value_t = 1.0)]
    zipf_s: f64,
    /// Endpoint: echo (POST /v1/echo), agent (POST /v1/agent), route (POST /v1/route).
    #[arg(long, value_enum, default_value_t = EndpointArg::Echo)]
    endpoint: EndpointArg,
    /// Request body size in bytes.
    #[arg(long, default_value_t = 64)]
    body_size: usize,
    /// Bearer token (ws: `auth.token` of `connect`).
    #[arg(long, env = "MOLTBOT_GATEWAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Warm-up before measuring (seconds or "500ms"); not counted.
    #[arg(long, value_parser = parse_secs, default_value = "1")]
    warmup: Duration,
    /// Open loop: total requests per second, on a fixed schedule; latency is measured from
    /// the intended send time (coordinated omission corrected). With --protocol ws a
    /// connection has at most --depth requests in flight. Default: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// A request not answered within this is a timeout error.
    #[arg(long, value_parser = parse_secs, default_value = "10")]
    timeout: Duration,
    /// Seed of the user draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the report as JSON to FILE, or to stdout with "-" (the table then goes to
    /// stderr).
    #[arg(long, value_name = "FILE|-")]
    json: Option<String>,
    /// Report errors and violations but exit 0.
    #[arg(long)]
    allow_errors: bool,
    /// Measure the CPU time (user + system, all threads) of this server process and of its
    /// live descendants over the measured period, and report requests per server CPU-second.
    /// Repeatable.
    #[arg(long, value_name = "PID")]
    server_pid: Vec<u32>,
    /// Measure the worker processes a moltbot gateway's `GET /status` lists too (`/status`
    /// when the URL has no path; asked with --token). The gateway's own pid is not in it: add
    /// --server-pid for it. Repeatable.
    #[arg(long, value_name = "URL")]
    server_status: Vec<String>,
    /// Write the latency by percentile of this run (and of --plot-add reports) as an SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<String>,
    /// Another line on the --plot: a name and the --json report of an earlier run. Repeatable.
    #[arg(long, value_name = "NAME=REPORT.json", requires = "plot")]
    plot_add: Vec<String>,
    /// The name of this run's line on the --plot [default: the URL].
    #[arg(long, value_name = "NAME", requires = "plot")]
    plot_name: Option<String>,
    /// The title of the --plot.
    #[arg(long, value_name = "TEXT", requires = "plot", default_value = DEFAULT_TITLE)]
    plot_title: String,
}

/// The title of a plot unless one is given.
const DEFAULT_TITLE: &str = "Latency by percentile";

#[derive(Debug, Subcommand)]
enum Command {
    /// Draw the latency by percentile of earlier runs (their --json reports) into one SVG,
    /// without running anything.
    Plot {
        /// The SVG to write.
        #[arg(value_name = "OUT.svg")]
        out: String,
        /// One line each: a name and a --json report.
        #[arg(value_name = "NAME=REPORT.json", required = true)]
        series: Vec<String>,
        /// The title.
        #[arg(long, default_value = DEFAULT_TITLE)]
        title: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DistArg {
    Uniform,
    Zipf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProtocolArg {
    Http,
    Ws,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WsMethodArg {
    Health,
    Agent,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EndpointArg {
    Echo,
    Agent,
    Route,
}

/// Seconds as a number ("1.5") or a humantime duration ("500ms", "2m").
fn parse_secs(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

fn config(cli: &Cli) -> Result<Config, moltbot_bench::BenchError> {
    let url = cli.url.as_deref().unwrap_or_default();
    let mut cfg = Config::new(Target::parse(url)?);
    if let Some(t) = cli.threads {
        cfg.threads = t;
    }
    cfg.connections = cli.connections;
    cfg.stop = match (cli.requests, cli.duration) {
        (Some(n), _) => Stop::Requests(n),
        (None, Some(d)) => Stop::Duration(d),
        (None, None) => Stop::Duration(Duration::from_secs(10)),
    };
    cfg.warmup = cli.warmup;
    cfg.users = cli.users;
    cfg.dist = match cli.dist {
        DistArg::Uniform => Dist::Uniform,
        DistArg::Zipf => Dist::Zipf,
    };
    cfg.zipf_s = cli.zipf_s;
    cfg.endpoint = match cli.endpoint {
        EndpointArg::Echo => Endpoint::Echo,
        EndpointArg::Agent => Endpoint::Agent,
        EndpointArg::Route => Endpoint::Route,
    };
    cfg.protocol = match cli.protocol {
        ProtocolArg::Http => Protocol::Http,
        ProtocolArg::Ws => Protocol::Ws,
    };
    cfg.ws_method = match cli.ws_method {
        WsMethodArg::Health => WsMethod::Health,
        WsMethodArg::Agent => WsMethod::Agent,
    };
    cfg.depth = cli.depth;
    cfg.body_size = cli.body_size;
    cfg.token = cli.token.clone().filter(|t| !t.is_empty());
    cfg.rate = cli.rate;
    cfg.timeout = cli.timeout;
    cfg.seed = cli.seed;
    cfg.server_pids = cli.server_pid.clone();
    cfg.server_status = cli.server_status.clone();
    cfg.validate()?;
    Ok(cfg)
}

/// One progress line on a terminal, rewritten in place.
struct ProgressLine {
    /// What ends the run, for the "of" part of the line.
    stop: Stop,
    /// The warm-up before measuring, part of a timed run's total.
    warmup: Duration,
    last_requests: u64,
    last_elapsed: Duration,
}

impl ProgressLine {
    fn new(cfg: &Config) -> ProgressLine {
        ProgressLine {
            stop: cfg.stop,
            warmup: cfg.warmup,
            last_requests: 0,
            last_elapsed: Duration::ZERO,
        }
    }

    /// The line for `p`: elapsed time of the whole run (of the planned total when the run is
    /// timed), phase, measured requests (of the planned count when counted), the rate since
    /// the last line, errors.
    fn text(&mut self, p: &Progress) -> String {
        let dt = (p.elapsed - self.last_elapsed.min(p.elapsed)).as_secs_f64();
        let rps = if dt > 0.0 {
            p.requests.saturating_sub(self.last_requests) as f64 / dt
        } else {
            0.0
        };
        self.last_requests = p.requests;
        self.last_elapsed = p.elapsed;
        let phase = if p.measuring { "measuring" } else { "warm-up" };
        let elapsed = p.elapsed.as_secs_f64();
        let (clock, requests) = match self.stop {
            Stop::Duration(d) => (
                format!("{elapsed:>4.0}s of {:.0}s", (self.warmup + d).as_secs_f64()),
                p.requests.to_string(),
            ),
            Stop::Requests(n) => (format!("{elapsed:>4.0}s"), format!("{} of {n}", p.requests)),
        };
        format!(
            "[{clock}] {phase}: {requests} requests, {rps:.0} req/s, {} errors",
            p.errors
        )
    }

    fn show(&mut self, p: &Progress) {
        let text = self.text(p);
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{text}");
        let _ = err.flush();
    }
}

fn write_json(report: &Report, dest: &str) -> std::io::Result<()> {
    let mut doc = report.to_json();
    doc.push('\n');
    if dest == "-" {
        let mut out = std::io::stdout().lock();
        out.write_all(doc.as_bytes())?;
        out.flush()
    } else {
        std::fs::write(dest, doc)
    }
}

/// The series of `NAME=REPORT.json` arguments.
fn added_series(args: &[String]) -> Result<Vec<Series>, String> {
    args.iter()
        .map(|arg| {
            let (name, file) = plot::parse_named(arg)?;
            let text =
                std::fs::read_to_string(&file).map_err(|e| format!("cannot read {file}: {e}"))?;
            Series::from_report_json(&name, &text).map_err(|e| format!("{file}: {e}"))
        })
        .collect()
}

/// Writes the plot of `series` to `out`.
fn write_plot(out: &str, title: &str, series: &[Series]) -> Result<(), String> {
    std::fs::write(out, plot::render_svg(title, series))
        .map_err(|e| format!("cannot write the plot to {out}: {e}"))
}

/// `moltbot-bench plot OUT.svg NAME=REPORT.json ...`
fn plot_command(out: &str, series: &[String], title: &str) -> ExitCode {
    match added_series(series).and_then(|s| write_plot(out, title, &s)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moltbot-bench: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Plot { out, series, title }) = &cli.command {
        return plot_command(out, series, title);
    }
    // Read before the run, so that a wrong name or file costs no benchmark.
    let mut plot_series = match added_series(&cli.plot_add) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("moltbot-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = match config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("moltbot-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(limit) = moltbot_bench::raise_nofile_limit(cfg.connections)
        && limit < cfg.connections as u64 + 16
    {
        eprintln!(
            "moltbot-bench: warning: at most {limit} open files allowed; \
                 {} connections will not all fit",
            cfg.connections
        );
    }
    // Only for someone watching: not when the output goes to a file or a pipe.
    let tty = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
    let mut line = ProgressLine::new(&cfg);
    let result = moltbot_bench::run_with_progress(&cfg, |p| {
        if tty {
            line.show(p);
        }
    });
    if tty {
        eprint!("\r\x1b[K");
    }
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("moltbot-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let table = report.render_table();
    match cli.json.as_deref() {
        Some("-") => eprint!("{table}"),
        _ => print!("{table}"),
    }
    if let Some(dest) = cli.json.as_deref()
        && let Err(e) = write_json(&report, dest)
    {
        eprintln!("moltbot-bench: cannot write the JSON report to {dest}: {e}");
        return ExitCode::from(2);
    }
    if let Some(out) = cli.plot.as_deref() {
        plot_series.insert(
            0,
            Series {
                name: cli
                    .plot_name
                    .clone()
                    .unwrap_or_else(|| report.config.url.clone()),
                points: report.percentiles.clone(),
            },
        );
        if let Err(e) = write_plot(out, &cli.plot_title, &plot_series) {
            eprintln!("moltbot-bench: {e}");
            return ExitCode::from(2);
        }
    }
    if report.unsent > 0 {
        eprintln!(
            "moltbot-bench: warning: {} requests due were never sent: the target did not keep \
             up with --rate {}",
            report.unsent,
            cli.rate.unwrap_or(0.0)
        );
    }
    let failures = report.failures();
    if failures.is_empty() {
        return ExitCode::SUCCESS;
    }
    let label = if cli.allow_errors {
        "warning"
    } else {
        "FAILED"
    };
    for f in &failures {
        eprintln!("moltbot-bench: {label}: {f}");
    }
    for p in report.problems.iter().take(5) {
        eprintln!("moltbot-bench:   e.g. {p}");
    }
    if cli.allow_errors {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(secs: u64, measuring: bool, requests: u64) -> Progress {
        Progress {
            elapsed: Duration::from_secs(secs),
            measuring,
            requests,
            errors: 2,
        }
    }

    #[test]
    fn the_progress_line_shows_the_planned_total() {
        let cfg = Config {
            stop: Stop::Duration(Duration::from_secs(30)),
            warmup: Duration::from_secs(2),
            ..Config::new(Target::parse("http://127.0.0.1:1").unwrap())
        };
        let mut line = ProgressLine::new(&cfg);
        assert_eq!(
            line.text(&progress(1, false, 0)),
            "[   1s of 32s] warm-up: 0 requests, 0 req/s, 2 errors"
        );
        assert_eq!(
            line.text(&progress(3, true, 5000)),
            "[   3s of 32s] measuring: 5000 requests, 2500 req/s, 2 errors"
        );
        let cfg = Config {
            stop: Stop::Requests(100_000),
            ..cfg
        };
        let mut line = ProgressLine::new(&cfg);
        assert_eq!(
            line.text(&progress(4, true, 40_000)),
            "[   4s] measuring: 40000 of 100000 requests, 10000 req/s, 2 errors"
        );
    }

    #[test]
    fn durations_are_seconds_or_humantime() {
        assert_eq!(parse_secs("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_secs("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_secs("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_secs("2m"), Ok(Duration::from_secs(120)));
        for bad in ["-1", "abc", "", "1e400"] {
            assert!(parse_secs(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn flags_map_onto_the_config() {
        let cli = Cli::try_parse_from([
            "moltbot-bench",
            "-t",
            "3",
            "-c",
            "9",
            "-n",
            "77",
            "--users",
            "5",
            "--dist",
            "zipf",
            "--zipf-s",
            "1.2",
            "--endpoint",
            "route",
            "--body-size",
            "10",
            "--token",
            "tok",
            "--warmup",
            "0",
            "--rate",
            "50",
            "--timeout",
            "3s",
            "--seed",
            "9",
            "http://127.0.0.1:1",
        ])
        .expect("flags");
        let cfg = config(&cli).expect("config");
        assert_eq!((cfg.threads, cfg.connections), (3, 9));
        assert_eq!(cfg.stop, Stop::Requests(77));
        assert_eq!((cfg.users, cfg.dist, cfg.zipf_s), (5, Dist::Zipf, 1.2));
        assert_eq!((cfg.endpoint, cfg.body_size), (Endpoint::Route, 10));
        assert_eq!(cfg.token.as_deref(), Some("tok"));
        assert_eq!((cfg.warmup, cfg.rate), (Duration::ZERO, Some(50.0)));
        assert_eq!((cfg.timeout, cfg.seed), (Duration::from_secs(3), 9));

        let cli = Cli::try_parse_from(["moltbot-bench", "http://127.0.0.1:1"]).expect("flags");
        let cfg = config(&cli).expect("config");
        assert_eq!(cfg.stop, Stop::Duration(Duration::from_secs(10)));
        assert_eq!(cfg.rate, None);
        assert_eq!((cfg.protocol, cfg.depth), (Protocol::Http, 1));

        let cli = Cli::try_parse_from([
            "moltbot-bench",
            "--protocol",
            "ws",
            "--depth",
            "4",
            "--ws-method",
            "agent",
            "http://127.0.0.1:1",
        ])
        .expect("flags");
        let cfg = config(&cli).expect("config");
        assert_eq!(
            (cfg.protocol, cfg.depth, cfg.ws_method),
            (Protocol::Ws, 4, WsMethod::Agent)
        );
        // Depth needs WebSocket: HTTP requests are not pipelined.
        let cli = Cli::try_parse_from(["moltbot-bench", "--depth", "4", "http://127.0.0.1:1"])
            .expect("flags");
        assert!(config(&cli).is_err());
        assert!(Cli::try_parse_from(["moltbot-bench", "-d", "1", "-n", "1", "http://x"]).is_err());
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        // A run needs its URL.
        assert!(Cli::try_parse_from(["moltbot-bench"]).is_err());
    }

    #[test]
    fn server_cpu_flags_repeat() {
        let cli = Cli::try_parse_from([
            "moltbot-bench",
            "--server-pid",
            "5",
            "--server-pid",
            "6",
            "--server-status",
            "http://127.0.0.1:1",
            "http://127.0.0.1:1",
        ])
        .expect("flags");
        let cfg = config(&cli).expect("config");
        assert_eq!(cfg.server_pids, vec![5, 6]);
        assert_eq!(cfg.server_status, vec!["http://127.0.0.1:1"]);
        assert!(cfg.measures_server_cpu());
        let cli = Cli::try_parse_from(["moltbot-bench", "http://127.0.0.1:1"]).expect("flags");
        assert!(!config(&cli).expect("config").measures_server_cpu());
        for bad in [
            vec!["moltbot-bench", "--server-pid", "x", "http://127.0.0.1:1"],
            vec!["moltbot-bench", "--server-pid", "-1", "http://127.0.0.1:1"],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn plot_flags_and_the_plot_command() {
        let cli = Cli::try_parse_from([
            "moltbot-bench",
            "--plot",
            "out.svg",
            "--plot-add",
            "a=a.json",
            "--plot-add",
            "b=b.json",
            "--plot-name",
            "me",
            "http://127.0.0.1:1",
        ])
        .expect("flags");
        assert_eq!(cli.plot.as_deref(), Some("out.svg"));
        assert_eq!(cli.plot_add, vec!["a=a.json", "b=b.json"]);
        assert_eq!(cli.plot_name.as_deref(), Some("me"));
        assert_eq!(cli.plot_title, DEFAULT_TITLE);
        // The additions belong to a plot.
        assert!(
            Cli::try_parse_from(["moltbot-bench", "--plot-add", "a=a.json", "http://x"]).is_err()
        );

        let cli = Cli::try_parse_from([
            "moltbot-bench",
            "plot",
            "both.svg",
            "a=a.json",
            "b=b.json",
            "--title",
            "T",
        ])
        .expect("plot command");
        match cli.command {
            Some(Command::Plot { out, series, title }) => {
                assert_eq!(out, "both.svg");
                assert_eq!(series, vec!["a=a.json", "b=b.json"]);
                assert_eq!(title, "T");
            }
            None => panic!("no command"),
        }
        assert!(Cli::try_parse_from(["moltbot-bench", "plot", "x.svg"]).is_err());
        assert!(Cli::try_parse_from(["moltbot-bench", "-c", "2", "plot", "x.svg", "a=b"]).is_err());
    }
}
