//! `moltbot-bench` (the binary) against a small in-test HTTP/1.1 server that imitates the
//! gateway's echo endpoint, `x-moltbot-worker` included, and can be told to misbehave: move a
//! user to another worker, answer 503, corrupt an echo, require a token.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest a bench run may take before the test kills it.
const DEADLINE: Duration = Duration::from_secs(60);

/// How the fake gateway behaves.
#[derive(Debug, Clone, Default)]
struct Behaviour {
    /// This user alternates between worker-0 and worker-1 (a sticky violation).
    flip_user: Option<u32>,
    /// Every n-th request overall is answered 503.
    every_503: Option<u64>,
    /// Every n-th request overall gets a corrupted echo.
    corrupt_every: Option<u64>,
    /// Answer with chunked bodies instead of Content-Length.
    chunked: bool,
    /// Require `authorization: Bearer <token>`.
    token: Option<String>,
    /// The n-th request overall is answered only after this stall.
    stall: Option<(u64, Duration)>,
}

#[derive(Default)]
struct Tally {
    served: AtomicU64,
    flips: AtomicU64,
    per_worker: Mutex<BTreeMap<String, u64>>,
}

struct FakeGateway {
    addr: SocketAddr,
    tally: Arc<Tally>,
}

impl FakeGateway {
    fn start(b: Behaviour) -> FakeGateway {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let tally = Arc::new(Tally::default());
        let t = tally.clone();
        // The accept thread ends with the test process; each connection thread ends when the
        // bench closes its connection.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (b, t) = (b.clone(), t.clone());
                std::thread::spawn(move || serve(stream, &b, &t));
            }
        });
        FakeGateway { addr, tally }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn served(&self) -> u64 {
        self.tally.served.load(Ordering::SeqCst)
    }

    fn per_worker(&self) -> BTreeMap<String, u64> {
        self.tally.per_worker.lock().expect("lock").clone()
    }
}

/// One keep-alive connection: parse requests with httparse, answer each.
fn serve(mut s: TcpStream, b: &Behaviour, t: &Tally) {
    let _ = s.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Head.
        let (head_len, body_len, user, auth) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let get = |name: &str| {
                        req.headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| String::from_utf8_lossy(h.value).into_owned())
                    };
                    let len: usize = get("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    break (n, len, get("x-moltbot-user"), get("authorization"));
                }
                Ok(httparse::Status::Partial) => match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                },
                Err(_) => return,
            }
        };
        while buf.len() < head_len + body_len {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf[head_len..head_len + body_len].to_vec();
        buf.drain(..head_len + body_len);
        let n = t.served.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some((k, d)) = b.stall
            && n == k
        {
            // The behaviour under test: a server that stalls (not synchronisation).
            std::thread::sleep(d);
        }

        let user_index: u32 = user
            .as_deref()
            .and_then(|u| u.strip_prefix("user-"))
            .and_then(|i| i.parse().ok())
            .unwrap_or(0);
        let mut worker = user_index % 2;
        if b.flip_user == Some(user_index) {
            worker = (t.flips.fetch_add(1, Ordering::SeqCst) % 2) as u32;
        }
        let worker = format!("worker-{worker}");
        *t.per_worker
            .lock()
            .expect("lock")
            .entry(worker.clone())
            .or_insert(0) += 1;

        let authorized = match &b.token {
            None => true,
            Some(tok) => auth.as_deref() == Some(&format!("Bearer {tok}")),
        };
        let (status, reply) = if !authorized {
            (
                "401 Unauthorized",
                br#"{"error":{"code":"UNAUTHORIZED"}}"#.to_vec(),
            )
        } else if b.every_503.is_some_and(|k| n.is_multiple_of(k)) {
            (
                "503 Service Unavailable",
                br#"{"error":{"code":"QUEUE_FULL"}}"#.to_vec(),
            )
        } else if b.corrupt_every.is_some_and(|k| n.is_multiple_of(k)) {
            let mut r = body.clone();
            if let Some(x) = r.first_mut() {
                *x ^= 1;
            }
            ("200 OK", r)
        } else {
            ("200 OK", body)
        };
        let framing = if b.chunked {
            "transfer-encoding: chunked".to_string()
        } else {
            format!("content-length: {}", reply.len())
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/octet-stream\r\n\
             x-moltbot-worker: {worker}\r\n{framing}\r\n\r\n"
        );
        // Written in pieces so the bench sees responses split across reads.
        let mut pieces: Vec<Vec<u8>> = vec![head.into_bytes()];
        if b.chunked {
            let (a, c) = reply.split_at(reply.len() / 2);
            for part in [a, c] {
                if !part.is_empty() {
                    let mut p = format!("{:x}\r\n", part.len()).into_bytes();
                    p.extend_from_slice(part);
                    p.extend_from_slice(b"\r\n");
                    pieces.push(p);
                }
            }
            pieces.push(b"0\r\n\r\n".to_vec());
        } else {
            pieces.push(reply);
        }
        for p in pieces {
            if s.write_all(&p).is_err() {
                return;
            }
        }
    }
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The JSON report (the run used `--json -`).
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs the bench binary with `args` (killed after [`DEADLINE`]).
fn bench(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moltbot-bench"));
    cmd.args(args)
        .env_remove("MOLTBOT_GATEWAY_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn moltbot-bench");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("moltbot-bench {args:?} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status,
        stdout: out_t.join().expect("stdout thread"),
        stderr: err_t.join().expect("stderr thread"),
    }
}

fn sum(v: &Value) -> u64 {
    v.as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

#[test]
fn counts_and_per_worker_tally_match_the_server() {
    let gw = FakeGateway::start(Behaviour::default());
    let url = gw.url();
    let run = bench(
        &[
            "-t", "2", "-c", "4", "-n", "400", "--warmup", "0", "--users", "20", "--json", "-",
            &url,
        ],
        &[],
    );
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["requests"], 400);
    assert_eq!(gw.served(), 400);
    assert_eq!(j["status"]["200"], 400);
    assert_eq!(
        j["errors"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum::<u64>()),
        Some(0)
    );
    assert_eq!(j["sticky_violations"], 0);
    assert_eq!(j["users_seen"], 20);
    // Same tally as the server's own, worker by worker.
    let server: BTreeMap<String, u64> = gw.per_worker();
    let mine: BTreeMap<String, u64> =
        serde_json::from_value(j["per_worker"].clone()).expect("per_worker");
    assert_eq!(mine, server);
    assert_eq!(sum(&j["per_worker"]), 400);
    assert_eq!(mine.len(), 2);
    assert_eq!(j["config"]["mode"], "closed");
    // The table went to stderr.
    assert!(run.stderr.contains("per worker"), "{}", run.stderr);
}

#[test]
fn a_duration_run_stops_by_itself() {
    let gw = FakeGateway::start(Behaviour {
        chunked: true,
        ..Behaviour::default()
    });
    let url = gw.url();
    let run = bench(
        &[
            "-t", "2", "-c", "4", "-d", "1", "--warmup", "200ms", "--json", "-", &url,
        ],
        &[],
    );
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    let requests = j["requests"].as_u64().expect("requests");
    assert!(requests > 0);
    // Warm-up requests reached the server but are not counted.
    assert!(gw.served() > requests);
    assert!(j["duration_s"].as_f64().expect("duration") >= 1.0);
    assert_eq!(sum(&j["per_worker"]), requests);
    assert_eq!(j["errors"]["body"], 0);
}

#[test]
fn a_user_moving_between_workers_fails_the_run() {
    let gw = FakeGateway::start(Behaviour {
        flip_user: Some(3),
        ..Behaviour::default()
    });
    let url = gw.url();
    let run = bench(
        &[
            "-t", "2", "-c", "4", "-n", "300", "--warmup", "0", "--users", "5", "--json", "-", &url,
        ],
        &[],
    );
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["sticky_violations"], 1);
    assert_eq!(j["sticky_examples"][0]["user"], "user-3");
    assert_eq!(
        j["sticky_examples"][0]["workers"],
        serde_json::json!(["worker-0", "worker-1"])
    );
    assert!(run.stderr.contains("sticky violations"), "{}", run.stderr);
    assert!(run.stderr.contains("user-3"), "{}", run.stderr);
}

#[test]
fn status_503_counts_as_an_error() {
    let gw = FakeGateway::start(Behaviour {
        every_503: Some(5),
        ..Behaviour::default()
    });
    let url = gw.url();
    let args = [
        "-t", "1", "-c", "2", "-n", "200", "--warmup", "0", "--json", "-", &url,
    ];
    let run = bench(&args, &[]);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["requests"], 200);
    assert_eq!(j["errors"]["status"], 40);
    assert_eq!(j["status"]["503"], 40);
    assert_eq!(j["status"]["200"], 160);
    assert!(run.stderr.contains("503"), "{}", run.stderr);

    // --allow-errors: the same report, exit 0.
    let mut allow = args.to_vec();
    allow.insert(0, "--allow-errors");
    let run = bench(&allow, &[]);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.json()["errors"]["status"], 40);
}

#[test]
fn a_wrong_echo_is_detected() {
    let gw = FakeGateway::start(Behaviour {
        corrupt_every: Some(10),
        ..Behaviour::default()
    });
    let url = gw.url();
    let run = bench(
        &[
            "-t", "1", "-c", "2", "-n", "200", "--warmup", "0", "--json", "-", &url,
        ],
        &[],
    );
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["errors"]["body"], 20);
    assert_eq!(j["status"]["200"], 200);
    assert!(run.stderr.contains("echoed body differs"), "{}", run.stderr);
}

#[test]
fn open_loop_sends_exactly_the_requests_asked_for() {
    let gw = FakeGateway::start(Behaviour::default());
    let url = gw.url();
    let run = bench(
        &[
            "-t", "2", "-c", "4", "-n", "100", "--rate", "400", "--warmup", "0", "--dist", "zipf",
            "--users", "50", "--json", "-", &url,
        ],
        &[],
    );
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["requests"], 100);
    assert_eq!(gw.served(), 100);
    assert_eq!(j["config"]["mode"], "open");
    assert_eq!(j["config"]["rate"], 400.0);
    assert_eq!(j["config"]["dist"], "zipf");
}

#[test]
fn open_loop_latency_includes_the_requests_a_stall_delayed() {
    // 100 req/s on one connection; request 10 stalls 300 ms. The requests due during the stall
    // (about 30) are sent late; measured from their intended send times, at least 20 of them
    // waited 100 ms or more, so p90 ≥ 100 ms. Measured from the actual send (coordinated
    // omission), only the stalled request would be slow and p90 would be tiny.
    let gw = FakeGateway::start(Behaviour {
        stall: Some((10, Duration::from_millis(300))),
        ..Behaviour::default()
    });
    let url = gw.url();
    let run = bench(
        &[
            "-t", "1", "-c", "1", "-n", "100", "--rate", "100", "--warmup", "0", "--json", "-",
            &url,
        ],
        &[],
    );
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["requests"], 100);
    let p90 = j["latency_us"]["p90"].as_f64().expect("p90");
    assert!(
        p90 >= 100_000.0,
        "p90 {p90} µs: the stall's victims were not counted"
    );
    assert!(j["latency_us"]["max"].as_f64().expect("max") >= 300_000.0);
}

#[test]
fn open_loop_stops_on_time_and_reports_what_it_could_not_send() {
    // 100 req/s for 1 s on one connection; request 5 (due at 40 ms) is answered after 1.5 s,
    // past the end: the 95 requests due from 50 ms to 990 ms were never sent.
    let gw = FakeGateway::start(Behaviour {
        stall: Some((5, Duration::from_millis(1500))),
        ..Behaviour::default()
    });
    let url = gw.url();
    let run = bench(
        &[
            "-t", "1", "-c", "1", "-d", "1", "--rate", "100", "--warmup", "0", "--json", "-", &url,
        ],
        &[],
    );
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["requests"], 5);
    assert_eq!(j["unsent"], 95);
    assert_eq!(gw.served(), 5);
    assert!(run.stderr.contains("unsent"), "{}", run.stderr);
}

#[test]
fn an_unanswered_request_times_out_and_the_run_goes_on() {
    let gw = FakeGateway::start(Behaviour {
        stall: Some((1, Duration::from_secs(5))),
        ..Behaviour::default()
    });
    let url = gw.url();
    let run = bench(
        &[
            "-t",
            "1",
            "-c",
            "1",
            "-n",
            "5",
            "--timeout",
            "300ms",
            "--warmup",
            "0",
            "--json",
            "-",
            &url,
        ],
        &[],
    );
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["errors"]["timeout"], 1);
    assert_eq!(j["requests"], 4);
    assert!(run.stderr.contains("timeouts"), "{}", run.stderr);
}

#[test]
fn the_token_comes_from_the_environment() {
    let gw = FakeGateway::start(Behaviour {
        token: Some("s3cret".into()),
        ..Behaviour::default()
    });
    let url = gw.url();
    let args = [
        "-t", "1", "-c", "1", "-n", "20", "--warmup", "0", "--json", "-", &url,
    ];
    let ok = bench(&args, &[("MOLTBOT_GATEWAY_TOKEN", "s3cret")]);
    assert!(ok.status.success(), "{}", ok.stderr);
    assert_eq!(ok.json()["config"]["token"], true);
    assert!(
        !ok.stdout.contains("s3cret"),
        "the token leaked into the report"
    );
    let refused = bench(&args, &[]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(refused.json()["status"]["401"], 20);
}

#[test]
fn nothing_listening_is_a_connect_error() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let run = bench(
        &[
            "-t", "1", "-c", "2", "-n", "6", "--warmup", "0", "--json", "-", &url,
        ],
        &[],
    );
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["requests"], 0);
    assert_eq!(j["errors"]["connect"], 6);
    assert!(run.stderr.contains("connect errors"), "{}", run.stderr);
}

#[test]
fn json_file_and_table_on_stdout() {
    let gw = FakeGateway::start(Behaviour::default());
    let url = gw.url();
    let dir = std::env::temp_dir().join(format!("moltbot-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("report.json");
    let p = path.to_string_lossy().into_owned();
    let run = bench(
        &["-c", "2", "-n", "50", "--warmup", "0", "--json", &p, &url],
        &[],
    );
    assert!(run.status.success(), "{}", run.stderr);
    assert!(run.stdout.contains("throughput"), "{}", run.stdout);
    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("report")).expect("json");
    assert_eq!(j["requests"], 50);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_usage_exits_2() {
    for args in [
        vec!["ftp://127.0.0.1:1"],
        vec!["-c", "0", "http://127.0.0.1:1"],
        vec!["--rate", "-5", "http://127.0.0.1:1"],
        vec!["-d", "1", "-n", "5", "http://127.0.0.1:1"],
        vec!["--endpoint", "nope", "http://127.0.0.1:1"],
    ] {
        let run = bench(&args, &[]);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {}", run.stderr);
    }
}

/// A server answering every connection with a `/status` document that lists `pid` as the only
/// worker; returns its URL. The accept thread ends with the test process.
fn status_server(pid: u32) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!(r#"{{"workers":[{{"workerId":"worker-0","pid":{pid}}}]}}"#);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}")
}

#[test]
fn server_cpu_covers_the_given_pid_and_the_workers_of_status() {
    let gw = FakeGateway::start(Behaviour::default());
    // A stand-in worker: a process that /status names.
    let mut worker = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let status = status_server(worker.id());
    // The fake gateway serves from this test process.
    let me = std::process::id().to_string();
    let run = bench(
        &[
            "-c",
            "4",
            "-n",
            "2000",
            "--warmup",
            "0",
            "--server-pid",
            &me,
            "--server-status",
            &status,
            "--json",
            "-",
            &gw.url(),
        ],
        &[],
    );
    let _ = worker.kill();
    let _ = worker.wait();
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    let cpu = &j["server_cpu"];
    let pids: Vec<u64> = cpu["pids"]
        .as_array()
        .expect("pids")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(pids.contains(&u64::from(std::process::id())), "{cpu}");
    assert!(pids.contains(&u64::from(worker.id())), "{cpu}");
    let seconds = cpu["seconds"].as_f64().expect("seconds");
    assert!(seconds >= 0.0);
    match cpu["requests_per_cpu_second"].as_f64() {
        Some(r) => assert!((r - 2000.0 / seconds).abs() <= r * 1e-9, "{cpu}"),
        None => assert_eq!(seconds, 0.0, "{cpu}"),
    }
    assert!(run.stderr.contains("server CPU"), "{}", run.stderr);
}

#[test]
fn a_missing_server_pid_or_status_stops_before_any_load() {
    let gw = FakeGateway::start(Behaviour::default());
    let url = gw.url();
    let run = bench(&["-n", "10", "--server-pid", "4294967295", &url], &[]);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("no such process"), "{}", run.stderr);
    // Nothing listens on port 1.
    let run = bench(
        &["-n", "10", "--server-status", "http://127.0.0.1:1", &url],
        &[],
    );
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("/status"), "{}", run.stderr);
    assert_eq!(gw.served(), 0);
}

#[test]
fn the_plot_holds_this_run_and_earlier_reports() {
    let gw = FakeGateway::start(Behaviour::default());
    let url = gw.url();
    let dir = std::env::temp_dir().join(format!("moltbot-bench-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let (first, run_svg, both_svg) = (path("first.json"), path("run.svg"), path("both.svg"));

    let run = bench(
        &[
            "-c", "2", "-n", "300", "--warmup", "0", "--json", &first, &url,
        ],
        &[],
    );
    assert!(run.status.success(), "{}", run.stderr);
    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(&first).expect("report")).expect("json");
    let curve = j["percentiles"].as_array().expect("percentiles");
    assert!(curve.len() > 150, "{}", curve.len());
    assert_eq!(curve.last().expect("max")[0], 100.0);

    let add = format!("first={first}");
    let run = bench(
        &[
            "-c",
            "2",
            "-n",
            "300",
            "--warmup",
            "0",
            "--plot",
            &run_svg,
            "--plot-add",
            &add,
            "--plot-name",
            "second",
            &url,
        ],
        &[],
    );
    assert!(run.status.success(), "{}", run.stderr);
    let svg = std::fs::read_to_string(&run_svg).expect("svg");
    assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 2);
    assert!(svg.contains("<title>second</title>") && svg.contains("<title>first</title>"));

    // The plot command: earlier reports only, nothing run.
    let served = gw.served();
    let a = format!("a={first}");
    let b = format!("b={first}");
    let run = bench(&["plot", &both_svg, &a, &b, "--title", "T & U"], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    let svg = std::fs::read_to_string(&both_svg).expect("svg");
    assert_eq!(svg.matches("<polyline").count(), 2);
    assert!(svg.contains(">T &amp; U</text>"));

    // A report that cannot be read is refused before any load or output.
    let missing = format!("m={}", path("missing.json"));
    let run = bench(&["plot", &path("x.svg"), &missing], &[]);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("missing.json"), "{}", run.stderr);
    assert!(!dir.join("x.svg").exists());
    let run = bench(
        &[
            "-n",
            "10",
            "--plot",
            &path("y.svg"),
            "--plot-add",
            &missing,
            &url,
        ],
        &[],
    );
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert_eq!(gw.served(), served);
    let _ = std::fs::remove_dir_all(&dir);
}
