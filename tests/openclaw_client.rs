//! The OpenClaw reference client against a real gateway: `@openclaw/gateway-client` from npm,
//! on Node 24, both installed by `tools/test` (see tests/js/package.json), drives the
//! scenarios of tests/js/scenario.mjs over the gateway's WebSocket with users created by the
//! real `moltbot users add`. Every frame the gateway sends is validated with ajv against the
//! protocol's published JSON Schema (tests/js/lib/validator.mjs); a scenario prints one JSON
//! line, asserted on here.
//!
//! Missing Node or packages fail the tests (with how to install them) rather than skip them: a
//! skipped protocol test would look like a passing one.

mod gw;
mod node;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use gw::{GatewayProc, Options};
use serde_json::Value;
use tempfile::TempDir;

/// How long one Node script may run. Each waits for its own conditions with a 60 s deadline
/// (MOLTBOT_TEST_JS_DEADLINE_MS), possibly several in turn; this only catches a hung process.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `tests/js/SCRIPT ARGS` on Node 24 and returns the JSON line it prints last.
fn run_js(script: &str, args: &[&str]) -> Value {
    node::run_js(script, args, SCRIPT_TIMEOUT)
}

/// Panics with the whole report unless the scenario found nothing wrong.
fn assert_ok(report: &Value) {
    assert!(
        report["ok"] == Value::Bool(true),
        "scenario failed: problems {}\nschema/protocol violations {}\nfull report:\n{}",
        serde_json::to_string_pretty(&report["problems"]).unwrap_or_default(),
        serde_json::to_string_pretty(&report["violations"]).unwrap_or_default(),
        serde_json::to_string_pretty(report).unwrap_or_default()
    );
}

/// A users file with users made by the real `moltbot users add`.
struct Users {
    dir: TempDir,
}

impl Users {
    fn new() -> Users {
        Users {
            dir: tempfile::Builder::new()
                .prefix("moltbot-openclaw-users-")
                .tempdir()
                .expect("temporary directory"),
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("users.json")
    }

    /// The new user's token (`mbt_...`, the one line `moltbot users add` prints).
    fn add(&self, id: &str) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_moltbot"))
            .args(["users", "add", id, "--users-file"])
            .arg(self.file())
            .env_remove("MOLTBOT_GATEWAY_TOKEN")
            .env_remove("MOLTBOT_USERS_FILE")
            .stdin(Stdio::null())
            .output()
            .expect("run moltbot users add");
        assert!(
            out.status.success(),
            "moltbot users add {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).expect("UTF-8 token");
        let token = token.trim_end_matches('\n').to_string();
        assert!(token.starts_with("mbt_"), "not a user token: {token:?}");
        token
    }

    /// A gateway of 2 worker slots serving these users.
    fn gateway(&self) -> GatewayProc {
        GatewayProc::start(
            Options::new(2)
                .args(&["--users-file", &self.file().display().to_string()])
                .args(&["--cores", "2"])
                .env(
                    "MOLTBOT_GATEWAY_TOKEN",
                    "operator-token-of-the-openclaw-tests",
                ),
        )
    }
}

fn ws_url(g: &GatewayProc) -> String {
    format!("ws://{}/", g.addr)
}

/// The scenarios and the validator themselves, against a mock gateway with injected faults
/// (a hello-ok field the schema forbids, a fractional tick ts, a seq gap, a chat delta without
/// its text, an error without a code, non-cumulative text, a run leaking to another user):
/// each must be reported, and a well-behaved mock must pass. Without this the gateway tests
/// below could pass on a validator that accepts anything.
#[test]
fn the_scenarios_and_the_frame_validator_report_a_faulty_mock_gateway() {
    let report = run_js("selftest.mjs", &[]);
    assert!(
        report["ok"] == Value::Bool(true),
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    assert!(report["cases"].as_array().is_some_and(|c| c.len() >= 10));
}

#[test]
fn a_user_token_connects_and_the_read_methods_answer_from_the_users_worker() {
    let users = Users::new();
    let alice = users.add("alice");
    let g = users.gateway();
    let r = run_js(
        "scenario.mjs",
        &[
            "health",
            "--url",
            &ws_url(&g),
            "--token",
            &alice,
            "--methods",
            "health,status,sessions.list,chat.history",
        ],
    );
    assert_ok(&r);
    let hello = &r["hello"];
    assert_eq!(hello["protocol"], 4);
    let methods = hello["features"]["methods"].as_array().expect("methods");
    for m in [
        "health",
        "status",
        "sessions.list",
        "chat.history",
        "agent",
        "chat.send",
    ] {
        assert!(
            methods.iter().any(|x| x == m),
            "hello-ok lacks {m}: {hello}"
        );
    }
    let worker = r["results"]["health"]["payload"]["workerId"]
        .as_str()
        .unwrap_or_else(|| panic!("health without workerId: {r}"));
    assert!(worker.starts_with("worker-"), "{worker}");
    // The validator checked hello-ok against HelloOk and the challenge, not just envelopes.
    let checked = &r["frames"][0]["checkedBy"];
    assert_eq!(checked["result connect"], "HelloOk", "{checked}");
    assert!(
        checked.get("event connect.challenge").is_some(),
        "{checked}"
    );
}

#[test]
fn an_agent_run_is_accepted_then_streams_its_events_then_ends_with_its_final_answer() {
    let users = Users::new();
    let alice = users.add("alice");
    let g = users.gateway();
    let r = run_js(
        "scenario.mjs",
        &["agent", "--url", &ws_url(&g), "--token", &alice],
    );
    // The script checks the order: accepted (runId = idempotencyKey), lifecycle start,
    // cumulative assistant text, one chat final, lifecycle end, then the final answer.
    assert_ok(&r);
    let run = &r["run"];
    assert_eq!(run["accepted"]["runId"], run["runId"], "{run}");
    assert_eq!(run["accepted"]["status"], "accepted", "{run}");
    assert!(!run["final"].is_null(), "no final answer: {run}");
    assert!(r["text"].as_str().is_some_and(|t| !t.is_empty()), "{r}");
    let checked = &r["frames"][0]["checkedBy"];
    assert_eq!(checked["event agent"], "AgentEvent", "{checked}");
    assert_eq!(checked["event chat"], "ChatEvent", "{checked}");
}

#[test]
fn every_connection_of_a_user_sees_its_runs_and_another_users_connection_sees_none() {
    let users = Users::new();
    let alice = users.add("alice");
    let bob = users.add("bob");
    let g = users.gateway();
    // Connections of one user, opened one after another: the kernel spreads them over the two
    // cores (`connId` is `CORE-N`). A round whose connections all landed on one core proves
    // nothing across cores and is run again (each round: 2 × 2^-6 odds).
    for round in 1.. {
        let r = run_js(
            "scenario.mjs",
            &[
                "fanout",
                "--url",
                &ws_url(&g),
                "--token",
                &alice,
                "--other-token",
                &bob,
                "--clients",
                "6",
            ],
        );
        assert_ok(&r);
        let seen = r["runA"]["seenBy"].as_object().expect("seenBy");
        assert_eq!(seen.len(), 6, "{r}");
        assert_eq!(r["leakedToOther"], 0, "{r}");
        let ids: std::collections::BTreeMap<&str, &str> = r["connIds"]
            .as_object()
            .expect("connIds")
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str().expect("connId")))
            .collect();
        let distinct: std::collections::BTreeSet<&str> = ids.values().copied().collect();
        assert_eq!(distinct.len(), 7, "connection ids not distinct: {r}");
        // The runner's user's connections ("a0".."a5"; "b" is the other user's).
        let cores: std::collections::BTreeSet<&str> = ids
            .iter()
            .filter(|(label, _)| label.starts_with('a'))
            .filter_map(|(_, id)| id.split('-').next())
            .collect();
        if cores.len() == 2 {
            break;
        }
        assert!(
            round < 5,
            "every connection landed on one core, {round} times: {r}"
        );
    }
}

#[test]
fn a_bad_token_is_refused_with_1008_and_a_protocol_mismatch_with_1002() {
    let users = Users::new();
    let alice = users.add("alice");
    let g = users.gateway();

    let r = run_js(
        "scenario.mjs",
        &[
            "reject",
            "--url",
            &ws_url(&g),
            "--token",
            "mbt_not-a-token-of-this-gateway",
        ],
    );
    assert_ok(&r);
    let raw = &r["raw"];
    assert_eq!(raw["response"]["ok"], false, "{r}");
    assert_eq!(raw["response"]["error"]["code"], "INVALID_REQUEST", "{r}");
    assert_eq!(raw["close"]["code"], 1008, "{r}");
    // This detail code is what makes the reference client stop reconnecting (every 1 to 30 s,
    // forever, otherwise).
    let client = &r["client"];
    assert_eq!(
        client["connectError"]["details"]["code"], "AUTH_TOKEN_MISMATCH",
        "{r}"
    );
    assert_eq!(
        client["reconnectPaused"]["detailCode"], "AUTH_TOKEN_MISMATCH",
        "{r}"
    );

    let r = run_js(
        "scenario.mjs",
        &[
            "reject",
            "--url",
            &ws_url(&g),
            "--token",
            &alice,
            "--min-protocol",
            "5",
            "--max-protocol",
            "5",
        ],
    );
    assert_ok(&r);
    assert_eq!(r["raw"]["response"]["ok"], false, "{r}");
    assert_eq!(r["raw"]["close"]["code"], 1002, "{r}");
    assert_eq!(
        r["client"]["connectError"]["details"]["code"], "PROTOCOL_MISMATCH",
        "{r}"
    );
}
