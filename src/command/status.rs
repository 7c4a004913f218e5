//! `moltbot workers status`: the status of a running gateway (`GET /status`).

use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use crate::command::Format;
use crate::command::client::{Client, Response};

/// The gateway URL used when neither `--gateway` nor `MOLTBOT_GATEWAY_URL` is given.
pub const DEFAULT_GATEWAY: &str = "http://127.0.0.1:18789";

/// How long a CLI request to the gateway may take in total.
const TIMEOUT: Duration = Duration::from_secs(10);

/// `moltbot workers status`
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// URL of the running gateway.
    #[arg(long, default_value = DEFAULT_GATEWAY, env = "MOLTBOT_GATEWAY_URL")]
    pub gateway: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    pub format: Format,
}

/// Prints the gateway's status; returns the exit code. Errors (gateway unreachable, a
/// non-200 answer) carry a message for the user; `main` prints them and exits 1.
pub fn run(args: StatusArgs) -> anyhow::Result<i32> {
    let out = status_output(&args.gateway, args.format, token_from_env().as_deref())?;
    print!("{out}");
    Ok(0)
}

/// What `run` prints.
fn status_output(gateway: &str, format: Format, token: Option<&str>) -> anyhow::Result<String> {
    let status = fetch_json(gateway, "/status", token)?;
    Ok(match format {
        Format::Json => format!("{}\n", serde_json::to_string_pretty(&status)?),
        Format::Human => format_status(&status),
    })
}

/// The bearer token for the gateway: `MOLTBOT_GATEWAY_TOKEN`, else `MOLTBOT_TOKEN` (as the
/// gateway's own configuration reads them); empty means none.
pub fn token_from_env() -> Option<String> {
    token_from(|name| std::env::var(name).ok())
}

fn token_from(var: impl Fn(&str) -> Option<String>) -> Option<String> {
    [crate::config::TOKEN_ENV, "MOLTBOT_TOKEN"]
        .into_iter()
        .find_map(|name| var(name).filter(|t| !t.is_empty()))
}

/// GETs `path` from the gateway and returns its JSON; any other answer than 200 + JSON is an
/// error that says what the gateway answered.
pub(crate) fn fetch_json(gateway: &str, path: &str, token: Option<&str>) -> anyhow::Result<Value> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("accept", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("authorization", auth));
    }
    let resp = Client::new(gateway, TIMEOUT)?.request("GET", path, &headers, None)?;
    if resp.status() != 200 {
        anyhow::bail!(
            "{}",
            describe_failure(gateway, path, token.is_some(), &resp)
        );
    }
    serde_json::from_slice::<Value>(resp.body())
        .with_context(|| format!("{gateway}{path} did not answer with JSON"))
}

/// `gateway at URL answered 401 to GET /status: UNAUTHORIZED: ...` plus a hint where one helps.
fn describe_failure(gateway: &str, path: &str, had_token: bool, resp: &Response) -> String {
    let detail = match serde_json::from_slice::<Value>(resp.body()) {
        Ok(v) => {
            let e = &v["error"];
            match (e["code"].as_str(), e["message"].as_str()) {
                (Some(code), Some(msg)) => format!("{code}: {msg}"),
                (Some(code), None) => code.to_string(),
                (None, Some(msg)) => msg.to_string(),
                (None, None) => v.to_string(),
            }
        }
        Err(_) => String::from_utf8_lossy(resp.body())
            .chars()
            .take(200)
            .collect(),
    };
    let mut out = format!(
        "gateway at {gateway} answered {} to GET {path}",
        resp.status().as_u16()
    );
    if !detail.trim().is_empty() {
        out.push_str(": ");
        out.push_str(detail.trim());
    }
    if resp.status() == 401 {
        out.push_str(if had_token {
            " (check MOLTBOT_GATEWAY_TOKEN: the gateway refused it)"
        } else {
            " (set MOLTBOT_GATEWAY_TOKEN to the gateway's token)"
        });
    }
    out
}

/// A count from the status, or `?` when the gateway did not send it.
fn count(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_u64)
        .map_or_else(|| "?".to_string(), |n| n.to_string())
}

/// `1 worker` / `3 workers`.
fn plural(v: &Value, key: &str, noun: &str) -> String {
    match v.get(key).and_then(Value::as_u64) {
        Some(1) => format!("1 {noun}"),
        Some(n) => format!("{n} {noun}s"),
        None => format!("? {noun}s"),
    }
}

/// Bytes with a binary unit and one decimal (`4.2 MiB`).
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Milliseconds as whole seconds in `1h 2m 3s` form.
pub fn format_uptime_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

/// The human form of a `/status` document: a totals line, then one aligned row per worker.
/// Fields the gateway did not send show as `?` (a pid as `-` when no process runs).
pub fn format_status(status: &Value) -> String {
    let mut out = format!(
        "{}, {} healthy, {} busy, {} queued, {}\n",
        plural(status, "totalWorkers", "worker"),
        count(status, "healthyWorkers"),
        count(status, "busyWorkers"),
        count(status, "queuedRequests"),
        plural(status, "routingTableSize", "user"),
    );
    let workers = status
        .get("workers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let pid = match w.get("pid") {
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Null) => "-".to_string(),
                _ => "?".to_string(),
            };
            let mem = w
                .get("memoryUsage")
                .and_then(Value::as_u64)
                .map_or_else(|| "?".to_string(), format_bytes);
            let up = w
                .get("uptime")
                .and_then(Value::as_u64)
                .map_or_else(|| "?".to_string(), format_uptime_ms);
            vec![
                w.get("workerId")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                w.get("state")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                format!("pid {pid}"),
                format!("req {}", count(w, "requestsProcessed")),
                format!("active {}", count(w, "activeRequests")),
                format!("mem {mem}"),
                format!("up {up}"),
                format!("restarts {}", count(w, "restarts")),
                format!("errors {}", count(w, "errorCount")),
            ]
        })
        .collect();
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, &w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::json;

    use super::*;
    use crate::command::client::testing::serve_json;

    fn sample() -> Value {
        json!({
            "totalWorkers": 3, "healthyWorkers": 2, "busyWorkers": 1, "queuedRequests": 4,
            "routingTableSize": 1, "uptime": 5000,
            "workers": [
                {"workerId": "worker-0", "state": "ready", "pid": 1234, "requestsProcessed": 10,
                 "activeRequests": 0, "memoryUsage": 4404019, "uptime": 12345, "restarts": 0,
                 "errorCount": 0},
                {"workerId": "worker-1", "state": "busy", "pid": 98765, "requestsProcessed": 1500,
                 "activeRequests": 10, "memoryUsage": 512, "uptime": 3723000, "restarts": 2,
                 "errorCount": 7},
                {"workerId": "worker-2", "state": "crashed", "pid": null, "requestsProcessed": 3,
                 "activeRequests": 0, "memoryUsage": 0, "uptime": 0, "restarts": 11}
            ]
        })
    }

    #[test]
    fn human_status_table() {
        let expected = "\
3 workers, 2 healthy, 1 busy, 4 queued, 1 user
worker-0  ready    pid 1234   req 10    active 0   mem 4.2 MiB  up 12s       restarts 0   errors 0
worker-1  busy     pid 98765  req 1500  active 10  mem 512 B    up 1h 2m 3s  restarts 2   errors 7
worker-2  crashed  pid -      req 3     active 0   mem 0 B      up 0s        restarts 11  errors ?
";
        assert_eq!(format_status(&sample()), expected);
    }

    #[test]
    fn human_status_tolerates_missing_fields() {
        assert_eq!(
            format_status(&json!({"workers": "nope"})),
            "? workers, ? healthy, ? busy, ? queued, ? users\n"
        );
        assert_eq!(
            format_status(&json!({"totalWorkers": 1, "workers": [{}]})),
            "1 worker, ? healthy, ? busy, ? queued, ? users\n\
             ?  ?  pid ?  req ?  active ?  mem ?  up ?  restarts ?  errors ?\n"
        );
    }

    #[test]
    fn units() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(512 * 1024 * 1024), "512.0 MiB");
        assert_eq!(format_bytes(3 << 30), "3.0 GiB");
        assert_eq!(format_bytes(u64::MAX), "16384.0 PiB");
        assert_eq!(format_uptime_ms(999), "0s");
        assert_eq!(format_uptime_ms(90_061_000), "1day 1h 1m 1s");
    }

    #[test]
    fn fetches_status_in_both_formats() {
        let body = sample().to_string();
        let (url, rx, h) = serve_json(vec![(200, body.clone()), (200, body)]);
        let human = status_output(&url, Format::Human, None).expect("human");
        assert_eq!(human, format_status(&sample()));
        let req = rx.recv().expect("request");
        assert!(req.starts_with("GET /status HTTP/1.1\r\n"), "{req}");
        assert!(!req.to_ascii_lowercase().contains("authorization"), "{req}");

        let json_out = status_output(&url, Format::Json, Some("tok")).expect("json");
        let back: Value = serde_json::from_str(&json_out).expect("valid json");
        assert_eq!(back, sample());
        assert!(
            json_out.contains("\n  \"busyWorkers\": 1"),
            "pretty: {json_out}"
        );
        let req = rx.recv().expect("request");
        assert!(req.contains("\r\nauthorization: Bearer tok\r\n"), "{req}");
        h.join().expect("server");
    }

    #[test]
    fn non_200_is_a_clear_error() {
        let body = json!({"error": {"code": "UNAUTHORIZED", "message": "missing bearer token",
                                     "retryable": false}})
        .to_string();
        let (url, _rx, h) = serve_json(vec![(401, body), (503, "overloaded".to_string())]);
        let err = status_output(&url, Format::Human, None).expect_err("401");
        let msg = format!("{err:#}");
        assert_eq!(
            msg,
            format!(
                "gateway at {url} answered 401 to GET /status: UNAUTHORIZED: missing bearer \
                 token (set MOLTBOT_GATEWAY_TOKEN to the gateway's token)"
            )
        );
        let err = status_output(&url, Format::Json, None).expect_err("503");
        assert_eq!(
            format!("{err:#}"),
            format!("gateway at {url} answered 503 to GET /status: overloaded")
        );
        h.join().expect("server");
    }

    #[test]
    fn unreachable_gateway_is_a_clear_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        drop(listener);
        let err = status_output(&url, Format::Human, None).expect_err("refused");
        assert!(
            format!("{err:#}").contains("connection refused (is `moltbot gateway` running?)"),
            "{err:#}"
        );
    }

    #[test]
    fn non_json_answer_is_an_error() {
        let (url, _rx, h) = serve_json(vec![(200, "<html>".to_string())]);
        let err = status_output(&url, Format::Human, None).expect_err("not json");
        assert!(
            format!("{err:#}").contains("did not answer with JSON"),
            "{err:#}"
        );
        h.join().expect("server");
    }

    #[test]
    fn token_precedence() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(token_from(vars(&[])), None);
        assert_eq!(
            token_from(vars(&[("MOLTBOT_TOKEN", "b")])),
            Some("b".into())
        );
        assert_eq!(
            token_from(vars(&[
                ("MOLTBOT_TOKEN", "b"),
                ("MOLTBOT_GATEWAY_TOKEN", "a")
            ])),
            Some("a".into())
        );
        assert_eq!(
            token_from(vars(&[
                ("MOLTBOT_TOKEN", "b"),
                ("MOLTBOT_GATEWAY_TOKEN", "")
            ])),
            Some("b".into())
        );
    }

    #[derive(clap::Parser, Debug)]
    struct Wrapper {
        #[command(flatten)]
        args: StatusArgs,
    }

    #[test]
    fn arguments() {
        let w = Wrapper::try_parse_from(["x", "--gateway", "http://h:1", "--format", "json"])
            .expect("parse");
        assert_eq!(w.args.gateway, "http://h:1");
        assert_eq!(w.args.format, Format::Json);
        assert!(Wrapper::try_parse_from(["x", "--format", "xml"]).is_err());
    }
}
