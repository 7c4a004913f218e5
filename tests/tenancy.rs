//! Tenancy: a user is who their credential says. Real gateways with users created by the real
//! `moltbot users` command: a user's token acts as that user only, on every endpoint, and
//! every attempt to reach another user is refused before any worker sees it; revocation and
//! rotation take effect on connections that stay open; signed tokens are checked; the users
//! file's troubles are clear at start and harmless at run time.

mod gw;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use gw::{Client, GatewayProc, HttpResponse, Options, wait_until};
use serde_json::{Value, json};

/// The operator token of these tests.
const OPERATOR: &str = "operator-token-of-the-tenancy-tests";

/// Runs `moltbot users ARGS --users-file FILE` and returns its stdout; panics if it fails.
fn users(file: &Path, args: &[&str]) -> String {
    let out = users_cmd(file, args);
    assert!(
        out.status.success(),
        "moltbot users {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 stdout")
}

fn users_cmd(file: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moltbot"))
        .arg("users")
        .args(args)
        .arg("--users-file")
        .arg(file)
        .env_remove("MOLTBOT_GATEWAY_TOKEN")
        .env_remove("MOLTBOT_USERS_FILE")
        .stdin(Stdio::null())
        .output()
        .expect("run moltbot users")
}

/// A new user's token (the one line `moltbot users add` prints).
fn add_user(file: &Path, id: &str) -> String {
    let out = users(file, &["add", id]);
    let token = out.trim_end_matches('\n');
    assert!(!token.is_empty() && !token.contains('\n'), "{out:?}");
    token.to_string()
}

/// A gateway of `workers` slots with this users file, the operator token, and `more` options.
fn gateway(workers: usize, file: &Path, more: Options) -> GatewayProc {
    let mut opts = more;
    opts.args
        .extend(["--users-file".to_string(), file.display().to_string()]);
    with_operator(workers, opts)
}

/// A gateway of `workers` slots with the operator token and `opts`.
fn with_operator(workers: usize, mut opts: Options) -> GatewayProc {
    opts.workers = workers;
    opts.env
        .push(("MOLTBOT_GATEWAY_TOKEN".into(), OPERATOR.into()));
    GatewayProc::start(opts)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn call(
    g: &GatewayProc,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResponse {
    let auth = token.map(bearer);
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    if let Some(a) = &auth {
        h.push(("authorization", a));
    }
    g.request(method, path, &h, body)
}

fn error_code(r: &HttpResponse) -> String {
    r.json::<Value>().map_or_else(
        |_| String::new(),
        |v| v["error"]["code"].as_str().unwrap_or_default().to_string(),
    )
}

/// The operator's view of `/status`.
fn status(g: &GatewayProc) -> Value {
    call(g, "GET", "/status", Some(OPERATOR), &[], None)
        .json()
        .expect("status JSON")
}

/// Requests the worker of `slot` has answered so far.
fn served_by(g: &GatewayProc, slot: usize) -> u64 {
    status(g)["workers"][slot]["requestsProcessed"]
        .as_u64()
        .expect("requestsProcessed")
}

fn slot_of(r: &HttpResponse) -> usize {
    r.header("x-moltbot-worker")
        .and_then(|w| w.strip_prefix("worker-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no worker header: {} {}", r.status, r.text()))
}

/// A request another user's token tries: method, path, headers, body.
type Attempt = (
    &'static str,
    &'static str,
    Vec<(&'static str, String)>,
    Option<Vec<u8>>,
);

struct Users {
    _dir: tempfile::TempDir,
    file: PathBuf,
}

fn users_file() -> Users {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("users.json");
    Users { _dir: dir, file }
}

#[test]
fn a_user_token_reaches_only_its_own_user_on_every_endpoint() {
    let u = users_file();
    let alice = add_user(&u.file, "alice");
    let bob = add_user(&u.file, "bob");
    // A user with a non-ASCII id, for the normalisation attempts: "zoë" in NFC.
    let zoe = add_user(&u.file, "zo\u{eb}");
    let g = gateway(3, &u.file, Options::new(3));
    let json = [("content-type", "application/json")];

    // Each user writes its own session through its own token (no user named: the token's).
    for (token, value) in [(&alice, "1"), (&bob, "2"), (&zoe, "3")] {
        let r = call(
            &g,
            "PUT",
            "/v1/sessions/notes",
            Some(token),
            &json,
            Some(value.as_bytes()),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let bob_slot = slot_of(&call(
        &g,
        "GET",
        "/v1/sessions/notes",
        Some(&bob),
        &[],
        None,
    ));
    let zoe_slot = slot_of(&call(
        &g,
        "GET",
        "/v1/sessions/notes",
        Some(&zoe),
        &[],
        None,
    ));
    let alice_slot = slot_of(&call(
        &g,
        "GET",
        "/v1/sessions/notes",
        Some(&alice),
        &[],
        None,
    ));
    assert!(
        alice_slot != bob_slot && alice_slot != zoe_slot,
        "the test needs alice on a worker of her own"
    );
    let before = (served_by(&g, bob_slot), served_by(&g, zoe_slot));

    // Alice reads and writes her own state, naming herself or nobody.
    let r = call(&g, "GET", "/v1/sessions/notes", Some(&alice), &[], None);
    assert_eq!((r.status, r.text().as_str()), (200, "1"));
    let r = call(
        &g,
        "GET",
        "/v1/sessions/notes",
        Some(&alice),
        &[("x-moltbot-user", "alice")],
        None,
    );
    assert_eq!((r.status, r.text().as_str()), (200, "1"));
    let r = call(
        &g,
        "POST",
        "/v1/route",
        Some(&alice),
        &json,
        Some(br#"{"type":"session","payload":{"action":"get","name":"notes"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json::<Value>().unwrap()["payload"]["value"], 1);
    let r = call(&g, "GET", "/v1/users/alice/worker", Some(&alice), &[], None);
    assert_eq!(r.status, 200, "{}", r.text());

    // Every way of reaching bob (or zoë under another spelling) with alice's token.
    let header = |user: &str| vec![("x-moltbot-user", user.to_string())];
    let attempts: Vec<Attempt> = vec![
        ("GET", "/v1/sessions/notes", header("bob"), None),
        (
            "PUT",
            "/v1/sessions/notes",
            header("bob"),
            Some(b"666".to_vec()),
        ),
        ("DELETE", "/v1/sessions/notes", header("bob"), None),
        ("GET", "/v1/sessions", header("bob"), None),
        (
            "POST",
            "/v1/agent",
            header("bob"),
            Some(br#"{"message":"hi"}"#.to_vec()),
        ),
        ("POST", "/v1/echo", header("bob"), Some(b"x".to_vec())),
        ("POST", "/v1/echo", header("Bob"), Some(b"x".to_vec())),
        ("POST", "/v1/echo", header("zo\u{eb}"), Some(b"x".to_vec())),
        (
            "POST",
            "/v1/echo",
            header("zoe\u{308}"),
            Some(b"x".to_vec()),
        ),
        (
            "POST",
            "/v1/route",
            vec![],
            Some(br#"{"type":"echo","userId":"bob","payload":{}}"#.to_vec()),
        ),
        (
            "POST",
            "/v1/route",
            vec![],
            Some(
                r#"{"type":"session","userId":"zoe\u0308","payload":{"action":"list"}}"#
                    .as_bytes()
                    .to_vec(),
            ),
        ),
        (
            "POST",
            "/v1/route",
            header("alice"),
            Some(br#"{"type":"echo","userId":"bob","payload":{}}"#.to_vec()),
        ),
        ("GET", "/v1/users/bob/worker", vec![], None),
        ("GET", "/v1/users/%62ob/worker", vec![], None),
        ("GET", "/v1/users/zo%C3%AB/worker", vec![], None),
        ("GET", "/v1/users/Alice/worker", vec![], None),
        ("GET", "/status", vec![], None),
        ("GET", "/metrics", vec![], None),
    ];
    for (method, path, headers, body) in &attempts {
        let mut h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        h.push(("content-type", "application/json"));
        let r = call(&g, method, path, Some(&alice), &h, body.as_deref());
        assert_eq!(
            (r.status, error_code(&r).as_str()),
            (403, "FORBIDDEN"),
            "{method} {path} {headers:?}: {}",
            r.text()
        );
        assert_eq!(
            r.header("x-moltbot-worker"),
            None,
            "{method} {path}: reached a worker"
        );
    }
    // Bob's and zoë's workers received nothing, and bob's state is untouched.
    assert_eq!((served_by(&g, bob_slot), served_by(&g, zoe_slot)), before);
    let r = call(&g, "GET", "/v1/sessions/notes", Some(&bob), &[], None);
    assert_eq!((r.status, r.text().as_str()), (200, "2"));
    let r = call(&g, "GET", "/v1/sessions", Some(&bob), &[], None);
    assert_eq!(r.json::<Value>().unwrap(), json!({"names": ["notes"]}));

    // The operator acts for anyone it names, and reads the gateway's state.
    let r = call(
        &g,
        "GET",
        "/v1/sessions/notes",
        Some(OPERATOR),
        &[("x-moltbot-user", "bob")],
        None,
    );
    assert_eq!((r.status, r.text().as_str()), (200, "2"));
    let r = call(&g, "GET", "/v1/users/bob/worker", Some(OPERATOR), &[], None);
    assert_eq!(r.status, 200);
    let s = status(&g);
    assert_eq!(s["auth"]["users"]["activeUsers"], 3, "{s}");
    let r = call(&g, "GET", "/metrics", Some(OPERATOR), &[], None);
    let forbidden = r
        .text()
        .lines()
        .find(|l| l.starts_with("moltbot_auth_failures_total{reason=\"forbidden\"}"))
        .map(str::to_string)
        .expect("auth failures metric");
    assert!(
        forbidden.ends_with(&format!(" {}", attempts.len())),
        "{forbidden}"
    );
    assert!(!r.text().contains("alice"), "no user id in metrics labels");
}

#[test]
fn without_a_valid_credential_every_user_request_is_401_and_says_nothing_of_users() {
    let u = users_file();
    let alice = add_user(&u.file, "alice");
    let revoked = add_user(&u.file, "ghost");
    users(&u.file, &["revoke", "ghost"]);
    let g = gateway(1, &u.file, Options::new(1));
    let mut bodies = Vec::new();
    for token in [
        None,
        Some("mbt_nope"),
        Some(revoked.as_str()),
        Some("Basic x"),
    ] {
        // Anonymous claims of a user are no longer anyone, loopback or not.
        let r = call(
            &g,
            "POST",
            "/v1/echo",
            token,
            &[("x-moltbot-user", "alice")],
            Some(b"x"),
        );
        assert_eq!((r.status, error_code(&r).as_str()), (401, "UNAUTHORIZED"));
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert!(!r.text().contains("alice") && !r.text().contains("ghost"));
        bodies.push(r.body.clone());
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "an unknown and a revoked token must be answered alike"
    );
    // The probes need no credential; a valid one still works.
    assert_eq!(call(&g, "GET", "/livez", None, &[], None).status, 200);
    assert_eq!(call(&g, "GET", "/readyz", None, &[], None).status, 200);
    let r = call(&g, "POST", "/v1/echo", Some(&alice), &[], Some(b"hi"));
    assert_eq!((r.status, r.text().as_str()), (200, "hi"));
    let m = call(&g, "GET", "/metrics", Some(OPERATOR), &[], None).text();
    for (reason, n) in [("missing", 1), ("unknown", 2), ("revoked", 1)] {
        let line = format!("moltbot_auth_failures_total{{reason=\"{reason}\"}} {n}");
        assert!(m.contains(&line), "{line} not in\n{m}");
    }
}

/// A keep-alive connection is checked at each request: revoked, its next request is 401;
/// rotated, the old token stops and the new one works; other users' connections carry on.
#[test]
fn revoke_and_rotate_take_effect_without_a_restart_and_spare_other_connections() {
    let u = users_file();
    let alice = add_user(&u.file, "alice");
    let bob = add_user(&u.file, "bob");
    let g = gateway(2, &u.file, Options::new(2));
    let echo = |c: &mut Client, token: &str| {
        let auth = bearer(token);
        c.call("POST", "/v1/echo", &[("authorization", &auth)], b"x")
            .status
    };
    let mut alice_conn = Client::new(&g);
    let mut bob_conn = Client::new(&g);
    assert_eq!(echo(&mut alice_conn, &alice), 200);
    assert_eq!(echo(&mut bob_conn, &bob), 200);

    let revoked_at = Instant::now();
    users(&u.file, &["revoke", "alice"]);
    // Polled on the same connection, which stays open: the first 401 is the revocation.
    wait_until("alice's revocation in force", || {
        echo(&mut alice_conn, &alice) == 401
    });
    eprintln!(
        "TENANCY-FIGURES revocation in force after {:?}",
        revoked_at.elapsed()
    );
    assert_eq!(
        echo(&mut bob_conn, &bob),
        200,
        "bob's connection carries on"
    );

    let new_bob = users(&u.file, &["rotate", "bob"]);
    let new_bob = new_bob.trim_end();
    assert_ne!(new_bob, bob);
    wait_until("bob's old token refused", || {
        echo(&mut bob_conn, &bob) == 401
    });
    // The same connection, with the new token.
    assert_eq!(echo(&mut bob_conn, new_bob), 200);
    // Alice comes back with a new token.
    let alice2 = add_user(&u.file, "alice");
    wait_until("alice's new token accepted", || {
        echo(&mut alice_conn, &alice2) == 200
    });
    assert_eq!(
        echo(&mut alice_conn, &alice),
        401,
        "the old token stays revoked"
    );
    // `users list` knows when each was last used, and never shows a token.
    let list = users(&u.file, &["list", "--format", "json"]);
    assert!(!list.contains(&alice2) && !list.contains(new_bob), "{list}");
}

/// SIGHUP re-reads the users file at once; a file that turns malformed leaves the last good
/// table in force and says so in `/status`; fixing it clears that.
#[test]
fn a_broken_users_file_at_run_time_keeps_the_last_good_table() {
    let u = users_file();
    let alice = add_user(&u.file, "alice");
    let g = gateway(1, &u.file, Options::new(1));
    let good = std::fs::read(&u.file).expect("users file");
    std::fs::write(&u.file, b"{ not json").expect("break the file");
    g.signal(rustix::process::Signal::HUP);
    wait_until("the broken file reported", || {
        status(&g)["auth"]["users"]["error"].is_string()
    });
    let r = call(&g, "POST", "/v1/echo", Some(&alice), &[], Some(b"x"));
    assert_eq!(r.status, 200, "the last good table stays in force");
    assert!(
        g.log().contains("previous users table stays in force"),
        "{}",
        g.log()
    );
    std::fs::write(&u.file, &good).expect("restore the file");
    wait_until("the error cleared", || {
        status(&g)["auth"]["users"]["error"].is_null()
    });
    assert_eq!(
        call(&g, "POST", "/v1/echo", Some(&alice), &[], Some(b"x")).status,
        200
    );
    assert!(!g.log().contains(&alice), "a token was logged");
}

/// A gateway whose only credentials are its users file stays closed to requests without one
/// when the file is emptied by hand or deleted while it runs: neither is a revocation, and
/// the deleted file's last table stays in force.
#[test]
fn a_users_file_emptied_or_deleted_at_run_time_does_not_open_the_gateway() {
    let u = users_file();
    let alice = add_user(&u.file, "alice");
    let file = u.file.display().to_string();
    let g = GatewayProc::start(Options::new(1).args(&["--users-file", &file]));
    let anonymous = |g: &GatewayProc| {
        g.request(
            "POST",
            "/v1/echo",
            &[("x-moltbot-user", "mallory")],
            Some(b"x"),
        )
        .status
    };
    assert_eq!(anonymous(&g), 401);

    let kept = std::fs::read(&u.file).expect("users file");
    std::fs::write(&u.file, br#"{"version":1,"users":[]}"#).expect("empty the file");
    wait_until("the empty table loaded", || {
        call(&g, "POST", "/v1/echo", Some(&alice), &[], Some(b"x")).status == 401
    });
    assert_eq!(
        anonymous(&g),
        401,
        "an emptied users file opened the gateway"
    );

    std::fs::write(&u.file, &kept).expect("restore the file");
    wait_until("alice's table loaded again", || {
        call(&g, "POST", "/v1/echo", Some(&alice), &[], Some(b"x")).status == 200
    });
    std::fs::remove_file(&u.file).expect("delete the file");
    wait_until("the deleted file noticed", || {
        g.log()
            .contains("does not exist; the previous users table stays in force")
    });
    assert_eq!(
        anonymous(&g),
        401,
        "a deleted users file opened the gateway"
    );
    assert_eq!(
        call(&g, "POST", "/v1/echo", Some(&alice), &[], Some(b"x")).status,
        200,
        "the last table stays in force"
    );
}

#[test]
fn a_users_file_that_cannot_be_used_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.json");
    let malformed = dir.path().join("malformed.json");
    std::fs::write(&malformed, b"{\"version\":1,\"users\":[{\"id\":").expect("write");
    let a_directory = dir.path().join("a-directory");
    std::fs::create_dir(&a_directory).expect("mkdir");
    for file in [&missing, &malformed, &a_directory] {
        let base = dir.path().join("workers");
        let (status, stderr) = gw::run_moltbot(
            &[
                "gateway",
                "-p",
                "0",
                "-w",
                "1",
                "-s",
                base.to_str().expect("utf-8"),
                "--users-file",
                file.to_str().expect("utf-8"),
            ],
            &[],
        );
        assert!(!status.success(), "{}: started anyway", file.display());
        assert!(
            stderr.contains(&*file.to_string_lossy()),
            "the error names the file: {stderr}"
        );
        assert!(!base.join("gateway.port").exists(), "it never listened");
    }
}

/// With no credential of any kind, a gateway on loopback serves as before: requests name their
/// user (the demo), and a stray bearer token is ignored.
#[test]
fn without_credentials_loopback_keeps_working() {
    let g = GatewayProc::start(Options::new(1));
    let r = g.request(
        "POST",
        "/v1/echo",
        &[("x-moltbot-user", "alice")],
        Some(b"x"),
    );
    assert_eq!(r.status, 200);
    let r = g.request(
        "POST",
        "/v1/echo",
        &[
            ("x-moltbot-user", "alice"),
            ("authorization", "Bearer whatever"),
        ],
        Some(b"x"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(g.request("GET", "/status", &[], None).status, 200);
}

/// A non-loopback gateway needs some credential; a user is one.
#[test]
fn a_public_gateway_starts_with_users_and_no_operator_token() {
    let u = users_file();
    let alice = add_user(&u.file, "alice");
    let g = GatewayProc::start(Options::new(1).args(&[
        "--bind",
        "0.0.0.0",
        "--users-file",
        u.file.to_str().expect("utf-8"),
    ]));
    let r = call(&g, "POST", "/v1/echo", Some(&alice), &[], Some(b"x"));
    assert_eq!(r.status, 200, "{}", r.text());
    // Without an operator token, the gateway's state is nobody's to read.
    assert_eq!(
        call(&g, "GET", "/status", Some(&alice), &[], None).status,
        403
    );
}

mod jwt {
    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()).expect("key"),
        )
        .expect("encode")
    }

    #[test]
    fn signed_tokens_act_as_their_subject_and_bad_ones_are_refused() {
        let g = with_operator(
            2,
            Options::new(2).env("MOLTBOT_JWT_SECRET", SECRET).args(&[
                "--jwt-audience",
                "moltbot",
                "--jwt-issuer",
                "https://idp.test",
            ]),
        );
        let good = json!({"sub": "carol", "aud": "moltbot", "iss": "https://idp.test", "exp": now() + 600});
        let carol = token(good.clone(), SECRET);
        let r = call(&g, "PUT", "/v1/sessions/n", Some(&carol), &[], Some(b"7"));
        assert_eq!(r.status, 200, "{}", r.text());
        let r = call(
            &g,
            "GET",
            "/v1/sessions/n",
            Some(OPERATOR),
            &[("x-moltbot-user", "carol")],
            None,
        );
        assert_eq!((r.status, r.text().as_str()), (200, "7"), "acted as carol");
        let r = call(
            &g,
            "GET",
            "/v1/sessions/n",
            Some(&carol),
            &[("x-moltbot-user", "dave")],
            None,
        );
        assert_eq!(r.status, 403);

        let with = |k: &str, v: Value| {
            let mut c = good.clone();
            c[k] = v;
            c
        };
        let none_alg = {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            format!(
                "{}.{}.",
                b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
                b64.encode(good.to_string())
            )
        };
        let truncated = carol[..carol.len() - 5].to_string();
        let bad = [
            ("garbage", "not.a.jwt".to_string()),
            ("truncated", truncated),
            ("expired", token(with("exp", json!(now() - 3600)), SECRET)),
            (
                "audience",
                token(with("aud", json!("someone-else")), SECRET),
            ),
            (
                "issuer",
                token(with("iss", json!("https://evil.test")), SECRET),
            ),
            ("alg none", none_alg),
            (
                "wrong key",
                token(good.clone(), "another-secret-of-at-least-32-bytes!"),
            ),
        ];
        for (what, t) in &bad {
            let r = call(&g, "POST", "/v1/echo", Some(t), &[], Some(b"x"));
            assert_eq!(r.status, 401, "{what}: {}", r.text());
        }
        let m = call(&g, "GET", "/metrics", Some(OPERATOR), &[], None).text();
        assert!(
            m.contains("moltbot_auth_failures_total{reason=\"expired\"} 1"),
            "{m}"
        );
    }
}
