//! Beyond one machine: gateway nodes behind a real HAProxy (tools/haproxy-cluster.cfg.in) on
//! loopback. Each user sticks to one node, and on it to one worker.

mod gw;

use std::collections::HashMap;
use std::process::{Command, Stdio};

use gw::{GatewayProc, Options, wait_until};

const HAPROXY: &str = "/usr/sbin/haproxy";

struct Haproxy(std::process::Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn users_stick_to_one_node_and_one_worker_through_haproxy() {
    assert!(
        std::path::Path::new(HAPROXY).exists(),
        "{HAPROXY} is required (Debian package haproxy; .ci/run installs it)"
    );
    let nodes = [
        GatewayProc::start(Options::new(2)),
        GatewayProc::start(Options::new(2)),
    ];
    let port = free_port();
    let servers: String = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("    server node{i} {} check inter 200ms\n", n.addr))
        .collect();
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tools/haproxy-cluster.cfg.in"
    ))
    .expect("config template");
    let cfg = template
        .replace("@PORT@", &port.to_string())
        .replace("@SERVERS@\n", &servers);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg_path = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg_path, cfg).expect("write config");
    let check = Command::new(HAPROXY)
        .arg("-c")
        .arg("-f")
        .arg(&cfg_path)
        .output()
        .expect("haproxy -c");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let _haproxy = Haproxy(
        Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy"),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_until("haproxy to serve", || {
        gw::http_request(&url, "GET", "/livez", &[], None).is_ok_and(|r| r.status == 200)
    });

    // 60 users, 5 requests each, through HAProxy.
    let mut worker_of: HashMap<String, String> = HashMap::new();
    for round in 0..5 {
        for u in 0..60 {
            let user = format!("cluster-user-{u}");
            let body = format!("{round}");
            let r = gw::http_request(
                &url,
                "POST",
                "/v1/echo",
                &[("x-moltbot-user", &user)],
                Some(body.as_bytes()),
            )
            .expect("request through haproxy");
            assert_eq!(r.status, 200);
            assert_eq!(r.body, body.as_bytes());
            let w = r.header("x-moltbot-worker").expect("worker").to_string();
            let prev = worker_of.entry(user.clone()).or_insert_with(|| w.clone());
            assert_eq!(*prev, w, "{user} changed worker");
        }
    }
    // Every user is assigned on exactly one node, the same one every time.
    let mut per_node = [0usize; 2];
    for u in 0..60 {
        let user = format!("cluster-user-{u}");
        let assigned: Vec<usize> = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                let v: serde_json::Value = n
                    .request("GET", &format!("/v1/users/{user}/worker"), &[], None)
                    .json()
                    .expect("json");
                v["assigned"] == true
            })
            .map(|(i, _)| i)
            .collect();
        assert_eq!(assigned.len(), 1, "{user} is on nodes {assigned:?}");
        per_node[assigned[0]] += 1;
    }
    // Consistent hashing spreads them over both nodes.
    assert!(per_node.iter().all(|&n| n > 0), "{per_node:?}");
    for n in &nodes {
        let s = n.status();
        assert_eq!(
            s["routingTableSize"].as_u64().unwrap_or(0) as usize,
            per_node[nodes.iter().position(|x| x.addr == n.addr).unwrap_or(0)]
        );
    }
}
