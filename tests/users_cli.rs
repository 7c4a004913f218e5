//! `moltbot users add|list|revoke|rotate`, the real binary against a temporary sandbox
//! directory: what goes to stdout (a token alone, a table; never a token in a list), what the
//! users file holds (hashes, mode 0600), the errors and their exit codes, and where the file
//! is taken from (`-s`, `--users-file`, `--config`, `MOLTBOT_USERS_FILE`).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use tempfile::TempDir;

/// A sandbox directory of its own (not yet created: `add` must create it).
struct Sandbox {
    dir: TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::Builder::new()
                .prefix("moltbot-users-test-")
                .tempdir()
                .expect("temporary directory"),
        }
    }

    fn sandbox(&self) -> PathBuf {
        self.dir.path().join("sandbox")
    }

    fn users_file(&self) -> PathBuf {
        self.sandbox().join("users.json")
    }

    /// `moltbot users <args> -s <sandbox>`.
    fn users(&self, args: &[&str]) -> Output {
        let sandbox = self.sandbox();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-s", sandbox.to_str().unwrap()]);
        users(&all, &[])
    }

    /// `add`, which must succeed; the token.
    fn add(&self, id: &str) -> String {
        token_of(&self.users(&["add", id]))
    }
}

/// `moltbot users <args>` with only `env` of the `MOLTBOT_*` variables (none of the caller's),
/// run to its end.
fn users(args: &[&str], env: &[(&str, &str)]) -> Output {
    users_command(args, env)
        .output()
        .expect("run moltbot users")
}

/// `moltbot users <args>` with only `env` of the `MOLTBOT_*` variables, to run.
fn users_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moltbot"));
    cmd.arg("users").args(args).stdin(Stdio::null());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("MOLTBOT_") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("UTF-8 stdout")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn describe(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    )
}

/// A command that succeeded and printed one line, a token of the documented shape.
fn token_of(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(0), "{}", describe(o));
    let out = stdout(o);
    let token = out.strip_suffix('\n').unwrap_or_else(|| panic!("{out:?}"));
    assert!(!token.contains('\n'), "more than one line: {out:?}");
    assert_token_shape(token);
    token.to_string()
}

fn assert_token_shape(token: &str) {
    let body = token
        .strip_prefix("mbt_")
        .unwrap_or_else(|| panic!("no mbt_ prefix: {token:?}"));
    assert_eq!(body.len(), 43, "{token:?}");
    assert!(
        body.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{token:?}"
    );
}

/// A command that failed with `code`, printed nothing on stdout and `want` on stderr.
fn assert_fails(o: &Output, code: i32, want: &str) {
    assert_eq!(o.status.code(), Some(code), "{}", describe(o));
    assert_eq!(stdout(o), "", "{}", describe(o));
    assert!(stderr(o).contains(want), "want {want:?}\n{}", describe(o));
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().mode() & 0o777
}

fn list_json(s: &Sandbox) -> Vec<Value> {
    let o = s.users(&["list", "--format", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    serde_json::from_str::<Value>(&stdout(&o))
        .unwrap_or_else(|e| panic!("{e}: {}", describe(&o)))
        .as_array()
        .expect("an array")
        .clone()
}

#[test]
fn add_prints_the_token_alone_and_the_file_holds_only_its_hash() {
    let s = Sandbox::new();
    let o = s.users(&["add", "alice"]);
    let token = token_of(&o);
    assert!(
        stderr(&o).contains("added user \"alice\""),
        "{}",
        describe(&o)
    );
    assert!(!stderr(&o).contains(&token), "the token is on stderr too");

    let file = s.users_file();
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&s.sandbox()), 0o700, "the new directory is private");
    let text = fs::read_to_string(&file).unwrap();
    assert!(!text.contains(&token), "the token is in the file");
    assert!(
        !text.contains(&token[4..20]),
        "a part of the token is in the file"
    );
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["users"][0]["id"], "alice");
    let sha = doc["users"][0]["tokens"][0]["sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64);
    assert!(sha.bytes().all(|b| b.is_ascii_hexdigit()), "{sha}");

    // Another user, another token; the file stays private.
    let bob = s.add("bob");
    assert_ne!(bob, token);
    assert_eq!(mode(&file), 0o600);
}

#[test]
fn list_shows_the_users_in_both_formats_and_never_a_token() {
    let s = Sandbox::new();
    let alice = s.add("alice");
    let bob = s.add("bob@example.com");
    assert_eq!(
        s.users(&["revoke", "bob@example.com"]).status.code(),
        Some(0)
    );
    let hashes: Vec<String> = {
        let doc: Value = serde_json::from_slice(&fs::read(s.users_file()).unwrap()).unwrap();
        doc["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["tokens"][0]["sha256"].as_str().unwrap().to_string())
            .collect()
    };

    let o = s.users(&["list"]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let human = stdout(&o);
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(lines.len(), 3, "{human}");
    let cells = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
    assert_eq!(
        cells(lines[0]),
        ["USER", "CREATED", "LAST", "USED", "STATE"]
    );
    let a = cells(lines[1]);
    assert_eq!(
        (a[0].as_str(), a[2].as_str(), a[3].as_str()),
        ("alice", "-", "active")
    );
    let b = cells(lines[2]);
    assert_eq!(
        (b[0].as_str(), b[2].as_str(), b[3].as_str()),
        ("bob@example.com", "-", "revoked")
    );

    let users = list_json(&s);
    assert_eq!(users.len(), 2);
    for u in &users {
        let mut keys: Vec<&str> = u.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["created", "id", "lastUsed", "revoked", "state"],
            "{u}"
        );
        assert!(u["lastUsed"].is_null(), "{u}");
    }
    assert_eq!(users[0]["id"], "alice");
    assert_eq!(users[0]["state"], "active");
    assert!(users[0]["revoked"].is_null());
    assert_eq!(users[1]["id"], "bob@example.com");
    assert_eq!(users[1]["state"], "revoked");
    assert!(users[1]["revoked"].is_string());

    let json = stdout(&s.users(&["list", "--format", "json"]));
    for output in [&human, &json] {
        assert!(!output.contains("mbt_"), "{output}");
        for secret in [&alice, &bob] {
            assert!(!output.contains(&secret[4..]), "a token in {output}");
        }
        for hash in &hashes {
            assert!(!output.contains(&hash[..16]), "a hash in {output}");
        }
    }
}

#[test]
fn list_shows_the_last_use_the_gateway_recorded() {
    let s = Sandbox::new();
    s.add("alice");
    s.add("bob");
    let last_used = PathBuf::from(format!("{}.last-used", s.users_file().display()));
    fs::write(&last_used, r#"{"alice": 1735787045000}"#).unwrap();
    let users = list_json(&s);
    assert_eq!(users[0]["lastUsed"], "2025-01-02T03:04:05Z");
    assert!(users[1]["lastUsed"].is_null());
    let human = stdout(&s.users(&["list"]));
    assert!(
        human
            .lines()
            .nth(1)
            .unwrap()
            .contains("2025-01-02T03:04:05Z"),
        "{human}"
    );
    // A damaged record is no reason to fail.
    fs::write(&last_used, "{").unwrap();
    assert!(list_json(&s)[0]["lastUsed"].is_null());
}

#[test]
fn rotate_prints_a_new_token_revoke_prints_nothing_and_a_revoked_user_can_be_added_again() {
    let s = Sandbox::new();
    let first = s.add("alice");
    let o = s.users(&["rotate", "alice"]);
    let second = token_of(&o);
    assert_ne!(first, second);
    assert!(
        stderr(&o).contains("rotated user \"alice\""),
        "{}",
        describe(&o)
    );
    assert_eq!(list_json(&s)[0]["state"], "active");

    let o = s.users(&["revoke", "alice"]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(stdout(&o), "");
    assert!(
        stderr(&o).contains("revoked user \"alice\""),
        "{}",
        describe(&o)
    );
    assert_eq!(list_json(&s)[0]["state"], "revoked");
    // Revoking again changes nothing and says so.
    let o = s.users(&["revoke", "alice"]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(stderr(&o).contains("revoked already"), "{}", describe(&o));

    // Rotating does not bring a revoked user back; adding does.
    assert_fails(
        &s.users(&["rotate", "alice"]),
        1,
        "user \"alice\" is revoked",
    );
    let third = s.add("alice");
    assert!(third != first && third != second);
    let users = list_json(&s);
    assert_eq!(users.len(), 1);
    assert_eq!(users[0]["state"], "active");
    assert!(users[0]["revoked"].is_null());
}

#[test]
fn errors_exit_1_with_a_clear_message_and_change_nothing() {
    let s = Sandbox::new();
    let file = s.users_file();
    let shown = file.display().to_string();
    assert_fails(
        &s.users(&["revoke", "ghost"]),
        1,
        &format!("no user \"ghost\" in {shown}"),
    );
    assert_fails(&s.users(&["rotate", "ghost"]), 1, "no user \"ghost\"");
    assert!(!file.exists(), "a failed command created the file");

    s.add("alice");
    let before = fs::read(&file).unwrap();
    assert_fails(
        &s.users(&["add", "alice"]),
        1,
        "user \"alice\" already has an active token",
    );
    assert_fails(&s.users(&["revoke", "bob"]), 1, "no user \"bob\"");
    let long = "x".repeat(129);
    for (id, why) in [
        ("", "invalid user id \"\": user id is empty"),
        (
            "a\tb",
            "invalid user id \"a\\tb\": user id contains control character U+0009",
        ),
        ("a\u{202E}b", "control character U+202E"),
        (long.as_str(), "129 bytes long; the limit is 128"),
    ] {
        for cmd in ["add", "revoke", "rotate"] {
            let o = s.users(&[cmd, id]);
            assert_fails(&o, 1, why);
            assert!(
                stderr(&o).starts_with("moltbot users: "),
                "{}",
                describe(&o)
            );
        }
    }
    assert_eq!(
        fs::read(&file).unwrap(),
        before,
        "a refused command wrote the file"
    );
}

/// A user id is what `crate::user::validate_user_id` accepts, the same rule as the gateway's
/// for the ids clients send; one that looks like a path is a name like any other, since no
/// file is named after it.
#[test]
fn a_path_like_user_id_is_only_a_name() {
    let s = Sandbox::new();
    s.add("alice");
    let token = s.add("../x");
    assert_token_shape(&token);
    let users = list_json(&s);
    assert_eq!(users[1]["id"], "../x");
    let mut names: Vec<String> = fs::read_dir(s.sandbox())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["users.json", "users.json.lock"]);
    assert!(!s.dir.path().join("x").exists());
}

#[test]
fn usage_errors_exit_2() {
    let s = Sandbox::new();
    for args in [
        &["add"][..],
        &["frobnicate", "alice"],
        &["list", "--format", "xml"],
        &["add", "alice", "--workers", "3"],
        &[],
    ] {
        let o = s.users(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", describe(&o));
        assert_eq!(stdout(&o), "", "{args:?}");
    }
    assert!(!s.sandbox().exists());
}

#[test]
fn a_malformed_users_file_is_refused_by_name_and_kept() {
    let s = Sandbox::new();
    fs::create_dir(s.sandbox()).unwrap();
    let file = s.users_file();
    fs::write(&file, "{\"version\": 2, \"users\": []}").unwrap();
    let want = format!(
        "users file {} is malformed: version 2 is not supported",
        file.display()
    );
    assert_fails(&s.users(&["add", "alice"]), 1, &want);
    assert_fails(&s.users(&["list"]), 1, &want);
    assert_eq!(
        fs::read_to_string(&file).unwrap(),
        "{\"version\": 2, \"users\": []}"
    );
}

#[test]
fn list_without_a_users_file_is_empty_and_says_where_it_looked() {
    let s = Sandbox::new();
    let o = s.users(&["list"]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(stdout(&o), "");
    assert!(
        stderr(&o).contains(&format!("{} does not exist", s.users_file().display())),
        "{}",
        describe(&o)
    );
    assert!(list_json(&s).is_empty());
}

#[test]
fn the_users_file_comes_from_the_flag_the_environment_or_the_config_file() {
    let s = Sandbox::new();
    let dir = s.dir.path();
    let in_config = dir.join("conf").join("from-config.json");
    let in_env = dir.join("env").join("from-env.json");
    let in_flag = dir.join("flag").join("from-flag.json");
    let config = dir.join("moltbot.toml");
    // A gateway's config that binds a public address with its token in the gateway's
    // environment: `moltbot users` must still read it for the users file.
    fs::write(
        &config,
        format!(
            "bind = \"0.0.0.0\"\nusers_file = \"{}\"\n",
            in_config.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let env_file = in_env.to_str().unwrap();

    token_of(&users(&["add", "c", "--config", config], &[]));
    token_of(&users(&["add", "m"], &[("MOLTBOT_CONFIG", config)]));
    token_of(&users(&["add", "e"], &[("MOLTBOT_USERS_FILE", env_file)]));
    // The environment beats the file, the flag beats both.
    token_of(&users(
        &["add", "ce", "--config", config],
        &[("MOLTBOT_USERS_FILE", env_file)],
    ));
    token_of(&users(
        &[
            "add",
            "f",
            "--config",
            config,
            "--users-file",
            in_flag.to_str().unwrap(),
        ],
        &[("MOLTBOT_USERS_FILE", env_file)],
    ));

    let ids = |file: &Path| -> Vec<String> {
        let o = users(
            &[
                "list",
                "--format",
                "json",
                "--users-file",
                file.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|u| u["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&in_config), ["c", "m"]);
    assert_eq!(ids(&in_env), ["e", "ce"]);
    assert_eq!(ids(&in_flag), ["f"]);
    for file in [&in_config, &in_env, &in_flag] {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    // The sandbox directory alone places it at `<sandbox>/users.json`.
    s.add("s");
    assert_eq!(ids(&s.users_file()), ["s"]);

    // A configuration that does not say where: a clear error, not a default.
    let o = users(&["list"], &[("MOLTBOT_SANDBOX_DIR", "")]);
    assert_fails(&o, 1, "invalid environment variable MOLTBOT_SANDBOX_DIR");
    let o = users(&["list", "--config", "/nonexistent/moltbot.toml"], &[]);
    assert_fails(&o, 1, "cannot read config file /nonexistent/moltbot.toml");
}

#[test]
fn concurrent_commands_lose_no_user() {
    const N: usize = 12;
    let s = Sandbox::new();
    let sandbox = s.sandbox();
    let children: Vec<_> = (0..N)
        .map(|i| {
            let id = format!("user-{i}");
            users_command(&["add", &id, "-s", sandbox.to_str().unwrap()], &[])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn moltbot users add")
        })
        .collect();
    let mut tokens: Vec<String> = children
        .into_iter()
        .map(|c| token_of(&c.wait_with_output().unwrap()))
        .collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), N);
    let users = list_json(&s);
    let mut ids: Vec<&str> = users.iter().map(|u| u["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let mut want: Vec<String> = (0..N).map(|i| format!("user-{i}")).collect();
    want.sort();
    assert_eq!(ids, want);
}
