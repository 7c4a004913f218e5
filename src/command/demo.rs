//! `moltbot workers demo`: the guide's walk-through, for real: a gateway on the port, the
//! demo users routed through HTTP requests to it.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::command::args::{GatewayArgs, PoolArgs};
use crate::command::client::{self, Response};
use crate::config::Config;
use crate::gateway::{Gateway, StopMode};

const USERS: [&str; 3] = ["user-a", "user-b", "user-c"];
const TIMEOUT: Duration = Duration::from_secs(30);

/// `moltbot workers demo`
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Pool settings.
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Gateway settings (the demo serves on the port too; `-p 0` picks a free one).
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// Seconds to keep running after the demo (0 = until Ctrl-C).
    #[arg(
        short = 't',
        long = "timeout",
        value_name = "SECONDS",
        default_value_t = 5
    )]
    pub timeout: u64,
}

fn rule() {
    println!("{}", "─".repeat(30));
}

struct Client {
    url: String,
    http: client::Client,
    token: Option<String>,
}

impl Client {
    fn call(
        &self,
        method: &str,
        path: &str,
        user: Option<&str>,
        body: Option<&[u8]>,
    ) -> anyhow::Result<Response> {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        if let Some(u) = user {
            headers.push(("x-moltbot-user", u));
        }
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        Ok(self.http.request(method, path, &headers, body)?)
    }
}

/// Runs the demo; returns the exit code.
pub fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let mut pool_args = args.pool.clone();
    // The demo's own default, taken like a flag (it beats MOLTBOT_WORKER_COUNT).
    if pool_args.flags.get("worker_count").is_none() {
        pool_args.flags.set("worker_count", "3");
    }
    let config = pool_args.resolve(Some(&args.gateway), Config::process_env())?;
    println!(
        "Starting worker pool with {} workers...\n",
        config.worker_count
    );
    let token = config.token.clone();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let gateway = Gateway::start(config)?;
    let url = format!("http://{}", gateway.local_addr());
    let client = Client {
        http: client::Client::new(&url, TIMEOUT)?,
        url,
        token,
    };
    println!("Worker pool ready! Gateway listening on {}\n", client.url);
    let result = walk_through(&client);
    if result.is_ok() {
        if args.timeout == 0 {
            println!("\nRunning until Ctrl-C...");
            let _ = signals.forever().next();
        } else {
            let deadline = std::time::Instant::now() + Duration::from_secs(args.timeout);
            while std::time::Instant::now() < deadline {
                if signals.pending().next().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    println!("\nStopping workers...");
    gateway.stop(StopMode::Drain);
    println!("Done!");
    result.map(|()| 0)
}

fn walk_through(client: &Client) -> anyhow::Result<()> {
    println!("Routing assignments:");
    rule();
    for user in USERS {
        let body = serde_json::json!({
            "type": "agent:message",
            "userId": user,
            "payload": { "message": format!("Hello from {user}") },
        });
        let resp = client.call("POST", "/v1/route", None, Some(body.to_string().as_bytes()))?;
        let json: serde_json::Value =
            serde_json::from_slice(resp.body()).context("route answer")?;
        if resp.status() != 200 || json["success"] != serde_json::Value::Bool(true) {
            bail!(
                "routing {user} failed: {} {}",
                resp.status(),
                String::from_utf8_lossy(resp.body())
            );
        }
        let worker = json["workerId"].as_str().unwrap_or("?");
        println!("  {user:<10} → {worker}");
    }

    println!("\nVerifying sticky routing (10 requests each):");
    rule();
    for user in USERS {
        let mut seen = BTreeSet::new();
        for i in 0..10 {
            let body = format!("{{\"ping\":{i}}}");
            let resp = client.call("POST", "/v1/echo", Some(user), Some(body.as_bytes()))?;
            if resp.status() != 200 || resp.body() != body.as_bytes() {
                bail!("echo for {user} failed: {}", resp.status());
            }
            seen.insert(
                resp.headers()
                    .get("x-moltbot-worker")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_string(),
            );
        }
        let list: Vec<_> = seen.iter().cloned().collect();
        println!("  {user:<10} → always {}", list.join(", "));
        if seen.len() != 1 {
            bail!("{user} reached more than one worker: {list:?}");
        }
    }

    println!("\nWorker Status:");
    rule();
    let resp = client.call("GET", "/status", None, None)?;
    let status: serde_json::Value = serde_json::from_slice(resp.body()).context("status answer")?;
    for w in status["workers"].as_array().into_iter().flatten() {
        let pid = w["pid"]
            .as_u64()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "  {}: {} (pid: {pid})",
            w["workerId"].as_str().unwrap_or("?"),
            w["state"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
