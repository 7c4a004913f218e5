//! The load engine of `moltbot-bench` (in process) against a real `moltbot gateway` with two
//! workers: short bounded runs, closed and open loop, every answer verified.

mod gw;

use std::time::Duration;

use moltbot_bench::{Config, Dist, Endpoint, Protocol, Report, Stop, Target, WsMethod};

fn config(gw: &gw::GatewayProc) -> Config {
    let mut cfg = Config::new(Target::parse(&gw.url()).expect("gateway URL"));
    cfg.threads = 2;
    cfg.connections = 8;
    cfg.users = 100;
    cfg.warmup = Duration::from_millis(200);
    cfg.stop = Stop::Duration(Duration::from_secs(1));
    cfg.timeout = gw::DEADLINE;
    cfg
}

fn assert_clean(r: &Report, gw: &gw::GatewayProc) {
    assert!(
        r.is_clean(),
        "{:?}\nproblems: {:?}\n{}\ngateway log:\n{}",
        r.failures(),
        r.problems,
        r.render_table(),
        gw.log()
    );
    assert_eq!(r.errors.total(), 0);
    assert_eq!(r.sticky_violations, 0);
    assert_eq!(r.no_worker_header, 0);
    assert_eq!(r.per_worker.values().sum::<u64>(), r.requests);
    assert_eq!(r.status.get(&200).copied(), Some(r.requests));
}

#[test]
fn closed_and_open_loop_against_a_gateway_with_two_workers() {
    let gw = gw::GatewayProc::start(gw::Options::new(2));

    // Closed loop, 8 connections, 100 users drawn uniformly, 1 s.
    let cfg = config(&gw);
    let mut ticks = Vec::new();
    let closed =
        moltbot_bench::run_with_progress(&cfg, |p| ticks.push(*p)).expect("closed-loop run");
    // 1.2 s in all: at least the 1 s progress tick, measured counts never above the total.
    assert!(!ticks.is_empty());
    assert!(
        ticks
            .iter()
            .all(|p| p.requests <= closed.requests && p.errors == 0)
    );
    assert_clean(&closed, &gw);
    assert!(closed.requests > 0);
    assert_eq!(closed.per_worker.len(), 2, "{:?}", closed.per_worker);
    assert!(
        closed
            .per_worker
            .keys()
            .all(|w| w == "worker-0" || w == "worker-1")
    );
    assert_eq!(closed.users_seen, 100);
    // The load generator's own CPU over the measured second: two threads sending and reading.
    let client = closed.client_cpu.as_ref().expect("client CPU measured");
    assert!(client.seconds > 0.0, "{client:?}");
    assert!(client.requests_per_cpu_second.is_some(), "{client:?}");

    // The gateway assigned exactly the users the bench drew.
    let status = gw.status();
    assert_eq!(status["routingTableSize"], 100);

    // Open loop at a modest rate, Zipf-distributed users.
    let mut open = config(&gw);
    open.rate = Some(400.0);
    open.dist = Dist::Zipf;
    let report = moltbot_bench::run(&open).expect("open-loop run");
    assert_clean(&report, &gw);
    assert!(report.requests > 0);
    assert_eq!(report.config.mode, "open");
}

#[test]
fn route_and_agent_endpoints_are_verified_too() {
    let gw = gw::GatewayProc::start(gw::Options::new(2));
    for endpoint in [Endpoint::Route, Endpoint::Agent] {
        let mut cfg = config(&gw);
        cfg.endpoint = endpoint;
        cfg.users = 20;
        cfg.warmup = Duration::ZERO;
        cfg.stop = Stop::Requests(300);
        let r = moltbot_bench::run(&cfg).expect("run");
        assert_clean(&r, &gw);
        assert_eq!(r.requests, 300, "{}", endpoint.name());
    }
}

#[test]
fn a_token_protected_gateway_refuses_the_bench_without_it() {
    let gw = gw::GatewayProc::start(gw::Options::new(1).env("MOLTBOT_GATEWAY_TOKEN", "s3cret"));
    let mut cfg = config(&gw);
    cfg.threads = 1;
    cfg.connections = 2;
    cfg.warmup = Duration::ZERO;
    cfg.stop = Stop::Requests(20);
    let refused = moltbot_bench::run(&cfg).expect("run");
    assert_eq!(refused.errors.status, 20);
    assert_eq!(refused.status.get(&401).copied(), Some(20));
    assert!(!refused.is_clean());

    cfg.token = Some("s3cret".into());
    let ok = moltbot_bench::run(&cfg).expect("run");
    assert_clean(&ok, &gw);
    assert_eq!(ok.requests, 20);
}

/// A WebSocket run: no error of any kind, every measured answer `ok`, and over `health` (whose
/// payload names the worker) every user on one worker.
fn assert_ws_clean(r: &Report, gw: &gw::GatewayProc) {
    assert!(
        r.is_clean(),
        "{:?}\nproblems: {:?}\n{}\ngateway log:\n{}",
        r.failures(),
        r.problems,
        r.render_table(),
        gw.log()
    );
    assert_eq!(r.errors.total(), 0);
    let ws = r.ws.as_ref().expect("the ws section of the report");
    assert_eq!(ws.outcomes.get("ok").copied(), Some(r.requests));
    assert_eq!(ws.outcomes.len(), 1, "{:?}", ws.outcomes);
    assert!(ws.handshakes >= r.config.connections as u64);
    assert!(r.status.is_empty(), "no HTTP statuses over WebSocket");
    assert_eq!(r.sticky_violations, 0);
}

#[test]
fn websocket_health_rpcs_with_several_in_flight_per_connection() {
    let gw = gw::GatewayProc::start(gw::Options::new(2));
    let mut cfg = config(&gw);
    cfg.protocol = Protocol::Ws;
    cfg.depth = 4;
    cfg.connections = 6;
    let r = moltbot_bench::run(&cfg).expect("ws run");
    assert_ws_clean(&r, &gw);
    assert!(r.requests > 0);
    assert_eq!(r.config.protocol, "ws");
    assert_eq!((r.config.ws_method, r.config.depth), (Some("health"), 4));
    // `health` names its worker: every answer is counted on one.
    assert_eq!(r.per_worker.values().sum::<u64>(), r.requests);
    assert!(r.users_seen >= 1 && r.users_seen <= 6, "{}", r.users_seen);
    assert!(r.ws.as_ref().and_then(|w| w.agent.as_ref()).is_none());

    // The JSON document carries the same figures.
    let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
    assert_eq!(v["ws"]["outcomes"]["ok"], r.requests);
    assert_eq!(v["errors"]["handshake"], 0);
    assert_eq!(v["errors"]["protocol"], 0);
    assert!(v["latency_us"]["p999"].as_f64().is_some_and(|p| p > 0.0));

    // A fixed number of requests over many connections that each keep 8 in flight.
    let mut counted = config(&gw);
    counted.protocol = Protocol::Ws;
    counted.depth = 8;
    counted.warmup = Duration::ZERO;
    counted.stop = Stop::Requests(500);
    let r = moltbot_bench::run(&counted).expect("ws run");
    assert_ws_clean(&r, &gw);
    assert_eq!(r.requests, 500);
}

#[test]
fn websocket_connections_authenticate_with_the_token() {
    let gw = gw::GatewayProc::start(gw::Options::new(1).env("MOLTBOT_GATEWAY_TOKEN", "s3cret"));
    let mut cfg = config(&gw);
    cfg.protocol = Protocol::Ws;
    cfg.threads = 1;
    cfg.connections = 2;
    cfg.warmup = Duration::ZERO;
    cfg.stop = Stop::Requests(6);
    let refused = moltbot_bench::run(&cfg).expect("run");
    // Every connect is refused: each refusal uses up one request of the count.
    assert_eq!(refused.errors.handshake, 6, "{}", refused.render_table());
    assert_eq!(refused.requests, 0);
    assert!(
        refused
            .problems
            .iter()
            .any(|p| p.contains("AUTH_TOKEN_MISSING")),
        "{:?}",
        refused.problems
    );

    cfg.token = Some("s3cret".into());
    cfg.stop = Stop::Requests(40);
    let ok = moltbot_bench::run(&cfg).expect("run");
    assert_ws_clean(&ok, &gw);
    assert_eq!(ok.requests, 40);
}

/// Streamed `agent` runs over 4 WebSocket connections, 2 in flight each, 20 users.
fn agent_config(gw: &gw::GatewayProc) -> Config {
    let mut cfg = config(gw);
    cfg.protocol = Protocol::Ws;
    cfg.ws_method = WsMethod::Agent;
    cfg.depth = 2;
    cfg.connections = 4;
    cfg.users = 20;
    cfg
}

/// The agent stages of a run, once every measured run was accepted and streamed an event.
fn every_run_streamed(r: &Report) -> moltbot_bench::AgentStages {
    let a =
        r.ws.as_ref()
            .and_then(|w| w.agent)
            .expect("agent stages in the report");
    assert_eq!(a.accepted, r.requests, "{}", r.render_table());
    assert_eq!(a.first_event, r.requests, "{}", r.render_table());
    a
}

#[test]
fn websocket_agent_runs_report_their_stages() {
    let gw = gw::GatewayProc::start(gw::Options::new(2));
    let cfg = agent_config(&gw);
    let r = moltbot_bench::run(&cfg).expect("ws agent run");
    assert_ws_clean(&r, &gw);
    assert!(r.requests > 0);
    // Every measured run was accepted and streamed events before its final answer.
    let a = every_run_streamed(&r);
    assert_eq!(a.runs_without_event, 0);
    assert!(a.events >= 2 * r.requests, "{} events", a.events);
    // The stages in their order: accepted and first event no later than the final answer.
    assert!(a.accepted_us.p50 > 0.0 && a.first_event_us.p50 > 0.0);
    assert!(a.accepted_us.p50 <= a.final_us.p50);
    assert!(a.first_event_us.p50 <= a.final_us.p50);
    assert_eq!(a.final_us, r.latency_us);
    // The loopback floor was measured after the run, and what the gateway adds is the event
    // delay less it.
    assert!(
        a.event_delay > 0 && a.loopback_floor > 0,
        "{}",
        r.render_table()
    );
    assert!(a.loopback_floor_us.p50 > 0.0);
    assert_eq!(
        a.gateway_adds_us.p99,
        (a.event_delay_us.p99 - a.loopback_floor_us.p99).max(0.0)
    );
    assert!(r.render_table().contains("gw adds"), "{}", r.render_table());

    let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
    assert!(
        v["ws"]["agent"]["loopback_floor_us"]["p99"]
            .as_f64()
            .is_some()
    );
    assert!(
        v["ws"]["agent"]["gateway_adds_us"]["p50"]
            .as_f64()
            .is_some()
    );
    for stage in ["accepted_us", "first_event_us", "final_us"] {
        for q in ["p50", "p99"] {
            assert!(
                v["ws"]["agent"][stage][q].as_f64().is_some_and(|x| x > 0.0),
                "{stage}.{q} in {v}"
            );
        }
    }
    assert_eq!(v["config"]["ws_method"], "agent");
}

#[test]
fn websocket_agent_runs_in_open_loop_follow_the_schedule() {
    let gw = gw::GatewayProc::start(gw::Options::new(2));
    let mut cfg = agent_config(&gw);
    cfg.threads = 1;
    // 50 runs a second, measured for 1 s after 200 ms: 50 runs were due in that second (one
    // either side for the rounding of the schedule's boundaries). A closed loop would send
    // thousands.
    cfg.rate = Some(50.0);
    let r = moltbot_bench::run(&cfg).expect("open-loop ws agent run");
    assert_ws_clean(&r, &gw);
    assert_eq!(r.config.mode, "open");
    let due = r.requests + r.unsent + r.errors.total();
    assert!((49..=51).contains(&due), "{due} due\n{}", r.render_table());
    let a = every_run_streamed(&r);
    assert!(a.first_event_us.p50 <= a.final_us.p50);
}
