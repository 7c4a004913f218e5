//! The session store: named JSON values per user, in `state/<stem>/<name>.json`.
//!
//! Two forms of `session`: REST (`GET` with a name reads, without one lists; `PUT` stores;
//! `DELETE` removes) and the `/v1/route` form (`POST` with `{"action": "get" | "set" |
//! "delete" | "list", "name", "value"}`). A value is replaced atomically (temp file + rename),
//! so a failed write (a full disk) leaves the previous value in place.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use moltbot_ipc::{ArchivedRequest, Method};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use super::{Fail, HandlerReply, Outcome, checked_user, create_private_dir};
use crate::sandbox::STATE_DIR;
use crate::user::{safe_file_stem, validate_name};

/// `session`, for the worker whose sandbox root is `sandbox`.
pub(super) fn handle(sandbox: &Path, req: &ArchivedRequest<'_>) -> Outcome {
    let user = checked_user(&req.user_id)?;
    let dir = sandbox.join(STATE_DIR).join(safe_file_stem(user));
    let path: &str = &req.path;
    match req.method.to_native() {
        Method::Get if path.is_empty() => list(&dir),
        Method::Get => {
            let name = checked_name(path)?;
            let bytes = read(&dir, name)?;
            Ok(HandlerReply::ok(bytes))
        }
        Method::Put => store(&dir, checked_name(path)?, &req.body),
        Method::Delete => delete(&dir, checked_name(path)?),
        Method::Post => route(&dir, path, &req.body),
    }
}

fn checked_name(name: &str) -> Result<&str, Fail> {
    validate_name(name).map_err(|e| {
        Fail::bad(
            "INVALID_NAME",
            format!("invalid session name {name:?}: {e}"),
        )
    })
}

fn is_json(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

fn value_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// The stored bytes of a session value.
fn read(dir: &Path, name: &str) -> Result<Vec<u8>, Fail> {
    let bytes = match fs::read(value_path(dir, name)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Fail::new(
                404,
                "NOT_FOUND",
                format!("session {name:?} not found"),
            ));
        }
        Err(e) => return Err(Fail::storage("read the session", e)),
    };
    if !is_json(&bytes) {
        return Err(Fail::new(
            500,
            "CORRUPT_STATE",
            format!("session {name:?} does not hold valid JSON"),
        ));
    }
    Ok(bytes)
}

/// Stores a JSON value atomically: a fresh temp file (names starting with `.` are never
/// session names) renamed over the old value.
fn store(dir: &Path, name: &str, value: &[u8]) -> Outcome {
    if !is_json(value) {
        return Err(Fail::bad(
            "INVALID_JSON",
            "the session value must be a JSON value",
        ));
    }
    let target = value_path(dir, name);
    let created = !target.exists();
    create_private_dir(dir).map_err(|e| Fail::storage("create the state directory", e))?;
    // No fsync: a stored value survives the worker being killed (the failure this pool
    // handles); the temp file is removed on failure, which also frees what a partial write
    // took on a full disk.
    let opts = crate::fsutil::WriteOptions {
        mode: 0o600,
        sync: false,
    };
    crate::fsutil::write_atomic(&target, value, opts)
        .map_err(|e| Fail::storage("store the session", e))?;
    Ok(HandlerReply::json(&json!({
        "name": name,
        "stored": true,
        "created": created,
        "bytes": value.len(),
    })))
}

fn delete(dir: &Path, name: &str) -> Outcome {
    match fs::remove_file(value_path(dir, name)) {
        Ok(()) => Ok(HandlerReply::json(
            &json!({ "name": name, "deleted": true }),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Fail::new(
            404,
            "NOT_FOUND",
            format!("session {name:?} not found"),
        )),
        Err(e) => Err(Fail::storage("delete the session", e)),
    }
}

/// The user's session names, sorted (files that are not `<valid name>.json` are skipped).
fn list(dir: &Path) -> Outcome {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(HandlerReply::json(&json!({ "names": [] })));
        }
        Err(e) => return Err(Fail::storage("list the sessions", e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Fail::storage("list the sessions", e))?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if validate_name(name).is_ok() && entry.file_type().is_ok_and(|t| t.is_file()) {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(HandlerReply::json(&json!({ "names": names })))
}

/// `Some(raw)` whenever the field is present, even as `null` (missing stays `None`).
fn present_raw<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// The `/v1/route` form: `{"action", "name", "value"}`; the name may also come from `path`.
fn route(dir: &Path, path: &str, body: &[u8]) -> Outcome {
    #[derive(Deserialize)]
    struct Route {
        action: Option<String>,
        name: Option<String>,
        #[serde(default, deserialize_with = "present_raw")]
        value: Option<Box<RawValue>>,
    }
    let route: Route = serde_json::from_slice(body).map_err(|e| {
        Fail::bad(
            "INVALID_JSON",
            format!("expected {{\"action\": \"get\"|\"set\"|\"delete\"|\"list\", \"name\", \"value\"}}: {e}"),
        )
    })?;
    let action = route.action.ok_or_else(|| {
        Fail::bad(
            "INVALID_PAYLOAD",
            "missing \"action\" (get, set, delete or list)",
        )
    })?;
    let name = || -> Result<&str, Fail> {
        match route.name.as_deref() {
            Some(n) => checked_name(n),
            None if !path.is_empty() => checked_name(path),
            None => Err(Fail::bad("INVALID_NAME", "missing \"name\"")),
        }
    };
    match action.as_str() {
        "get" => {
            let name = name()?;
            let bytes = read(dir, name)?;
            let text = String::from_utf8(bytes).map_err(|_| {
                Fail::new(
                    500,
                    "CORRUPT_STATE",
                    format!("session {name:?} is not UTF-8"),
                )
            })?;
            let value = RawValue::from_string(text).map_err(|_| {
                Fail::new(
                    500,
                    "CORRUPT_STATE",
                    format!("session {name:?} does not hold valid JSON"),
                )
            })?;
            #[derive(Serialize)]
            struct Got<'a> {
                name: &'a str,
                value: &'a RawValue,
            }
            Ok(HandlerReply::json(&Got {
                name,
                value: &value,
            }))
        }
        "set" => {
            let name = name()?;
            let value = route
                .value
                .as_ref()
                .ok_or_else(|| Fail::bad("INVALID_PAYLOAD", "\"set\" needs a \"value\""))?;
            store(dir, name, value.get().as_bytes())
        }
        "delete" => delete(dir, name()?),
        "list" => list(dir),
        other => Err(Fail::bad(
            "UNKNOWN_ACTION",
            format!("unknown action {other:?}; expected get, set, delete or list"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use moltbot_ipc::Method;
    use serde_json::{Value, json};

    use super::super::testing::{Fixture, assert_error, body, fixture};
    use super::*;

    #[test]
    fn session_rest_get_put_delete_list() {
        let mut f = fixture();
        // Empty list first.
        assert_eq!(
            body(&f.session(Method::Get, "user-a", "", b"")),
            json!({"names": []})
        );
        let r = f.session(Method::Put, "user-a", "notes", br#"{"x": [1, 2]}"#);
        assert_eq!(r.status, 200);
        assert_eq!(body(&r)["created"], true);
        let r = f.session(Method::Get, "user-a", "notes", b"");
        assert_eq!((r.status, r.error_code), (200, ""));
        assert_eq!(body(&r), json!({"x": [1, 2]}));
        let r = f.session(Method::Put, "user-a", "notes", b"42");
        assert_eq!(body(&r)["created"], false);
        assert_eq!(f.session(Method::Get, "user-a", "notes", b"").body, b"42");
        f.session(Method::Put, "user-a", "a.b-c_d", b"\"s\"");
        assert_eq!(
            body(&f.session(Method::Get, "user-a", "", b"")),
            json!({"names": ["a.b-c_d", "notes"]})
        );
        // Per user: another user sees nothing.
        assert_error(
            &f.session(Method::Get, "user-b", "notes", b""),
            404,
            "NOT_FOUND",
        );
        assert_eq!(
            body(&f.session(Method::Get, "user-b", "", b"")),
            json!({"names": []})
        );
        let r = f.session(Method::Delete, "user-a", "notes", b"");
        assert_eq!(body(&r), json!({"name": "notes", "deleted": true}));
        assert_error(
            &f.session(Method::Get, "user-a", "notes", b""),
            404,
            "NOT_FOUND",
        );
        assert_error(
            &f.session(Method::Delete, "user-a", "notes", b""),
            404,
            "NOT_FOUND",
        );
        // Stored under state/<stem>/<name>.json, with no temp files left.
        let dir = f.root.join("state").join("user-a");
        let files: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files, ["a.b-c_d.json"]);
    }

    #[test]
    fn session_list_skips_foreign_files() {
        let mut f = fixture();
        f.session(Method::Put, "user-a", "good", b"1");
        let dir = f.root.join("state/user-a");
        fs::write(dir.join(".tmpfile.json"), "1").unwrap();
        fs::write(dir.join("notjson.txt"), "1").unwrap();
        fs::create_dir(dir.join("sub.json")).unwrap();
        assert_eq!(
            body(&f.session(Method::Get, "user-a", "", b"")),
            json!({"names": ["good"]})
        );
    }

    #[test]
    fn session_invalid_names_and_json() {
        let mut f = fixture();
        let long = "n".repeat(65);
        for name in [
            "..",
            "a/b",
            ".hidden",
            long.as_str(),
            "../../etc/passwd",
            "a b",
        ] {
            assert_error(
                &f.session(Method::Get, "user-a", name, b""),
                400,
                "INVALID_NAME",
            );
            assert_error(
                &f.session(Method::Put, "user-a", name, b"1"),
                400,
                "INVALID_NAME",
            );
            assert_error(
                &f.session(Method::Delete, "user-a", name, b""),
                400,
                "INVALID_NAME",
            );
            assert_error(
                &f.route("user-a", json!({"action": "get", "name": name})),
                400,
                "INVALID_NAME",
            );
        }
        assert_error(
            &f.session(Method::Put, "user-a", "", b"1"),
            400,
            "INVALID_NAME",
        );
        assert_error(
            &f.session(Method::Delete, "user-a", "", b""),
            400,
            "INVALID_NAME",
        );
        for bad in [&b"{nope"[..], b"", b"1 2", b"\xff"] {
            assert_error(
                &f.session(Method::Put, "user-a", "x", bad),
                400,
                "INVALID_JSON",
            );
        }
        assert!(!f.root.join("state/user-a/x.json").exists());
        assert_error(&f.session(Method::Get, "", "x", b""), 400, "INVALID_USER");
    }

    #[test]
    fn session_corrupt_value_is_500_not_garbage() {
        let mut f = fixture();
        f.session(Method::Put, "user-a", "v", b"1");
        fs::write(f.root.join("state/user-a/v.json"), "{torn").unwrap();
        assert_error(
            &f.session(Method::Get, "user-a", "v", b""),
            500,
            "CORRUPT_STATE",
        );
        assert_error(
            &f.route("user-a", json!({"action": "get", "name": "v"})),
            500,
            "CORRUPT_STATE",
        );
    }

    #[test]
    fn hostile_users_get_encoded_state_dirs() {
        let mut f = fixture();
        for user in ["../x", "a/b"] {
            assert_eq!(f.session(Method::Put, user, "n", b"1").status, 200);
            let dir = f.root.join("state").join(safe_file_stem(user));
            assert!(dir.join("n.json").is_file());
        }
        assert!(!f.root.join("x").exists());
        assert!(!f.root.join("state/a").exists());
    }

    #[test]
    fn session_route_form() {
        let mut f = fixture();
        let r = f.route(
            "user-a",
            json!({"action": "set", "name": "prefs", "value": {"theme": "dark"}}),
        );
        assert_eq!((r.status, r.error_code), (200, ""));
        assert_eq!(body(&r)["stored"], true);
        let r = f.route("user-a", json!({"action": "get", "name": "prefs"}));
        assert_eq!(
            body(&r),
            json!({"name": "prefs", "value": {"theme": "dark"}})
        );
        // null is a value, not a missing one.
        assert_eq!(
            f.route(
                "user-a",
                json!({"action": "set", "name": "nil", "value": null})
            )
            .status,
            200
        );
        assert_eq!(
            body(&f.session(Method::Get, "user-a", "nil", b"")),
            Value::Null
        );
        assert_eq!(
            body(&f.route("user-a", json!({"action": "list"}))),
            json!({"names": ["nil", "prefs"]})
        );
        let r = f.route("user-a", json!({"action": "delete", "name": "prefs"}));
        assert_eq!(body(&r)["deleted"], true);
        assert_error(
            &f.route("user-a", json!({"action": "get", "name": "prefs"})),
            404,
            "NOT_FOUND",
        );
        assert_error(
            &f.route("user-a", json!({"action": "delete", "name": "prefs"})),
            404,
            "NOT_FOUND",
        );
        // Values stored via REST read back through the route form, whitespace and all.
        f.session(Method::Put, "user-a", "ws", b"  [1, 2]\n");
        assert_eq!(
            body(&f.route("user-a", json!({"action": "get", "name": "ws"}))),
            json!({"name": "ws", "value": [1, 2]})
        );
        // The name may come from the path.
        let r = f.session(Method::Post, "user-a", "ws", br#"{"action":"get"}"#);
        assert_eq!(body(&r)["value"], json!([1, 2]));
    }

    #[test]
    fn session_route_errors() {
        let mut f = fixture();
        assert_error(
            &f.session(Method::Post, "user-a", "", b"{oops"),
            400,
            "INVALID_JSON",
        );
        assert_error(
            &f.route("user-a", json!({"name": "x"})),
            400,
            "INVALID_PAYLOAD",
        );
        assert_error(
            &f.route("user-a", json!({"action": "fly", "name": "x"})),
            400,
            "UNKNOWN_ACTION",
        );
        assert_error(
            &f.route("user-a", json!({"action": "set", "name": "x"})),
            400,
            "INVALID_PAYLOAD",
        );
        assert_error(
            &f.route("user-a", json!({"action": "get"})),
            400,
            "INVALID_NAME",
        );
        assert_error(
            &f.route("user-a", json!({"action": 1})),
            400,
            "INVALID_JSON",
        );
    }

    #[test]
    fn storage_failures_are_500_not_panics() {
        let mut f = fixture();
        // state/<user> is a file: storing fails.
        fs::write(f.root.join("state/user-b"), "x").unwrap();
        for r in [
            f.session(Method::Put, "user-b", "n", b"1"),
            f.route("user-b", json!({"action": "set", "name": "n", "value": 1})),
            f.session(Method::Get, "user-b", "", b""),
        ] {
            assert_error(&r, 500, "STORAGE_ERROR");
            f.assert_no_server_path(&r);
        }
        // The worker keeps serving.
        assert_eq!(f.session(Method::Put, "user-c", "n", b"1").status, 200);
    }

    /// Set for [`full_disk_child`]: the sandbox root, whose `state` is a small tmpfs.
    const FULL_DISK_ROOT: &str = "MOLTBOT_TEST_FULL_DISK_ROOT";
    /// Printed by [`full_disk_child`] when it ran to completion, so an empty filter cannot pass.
    const FULL_DISK_DONE: &str = "FULL-DISK-CHILD-DONE";

    /// A real full disk. A value goes to a fresh temp file that is never a symlink, so no
    /// directory entry can send the write to `/dev/full`; instead [`full_disk_child`] runs in
    /// a child process that `unshare(1)` puts in its own user and mount namespaces, with a
    /// 64 KiB tmpfs mounted over the sandbox's `state` directory. Skipped (with a note) where
    /// that cannot be set up (no `unshare`, no unprivileged user namespaces); the 507
    /// classification itself is covered by a test of the parent module.
    #[test]
    fn a_write_on_a_full_disk_is_507_and_the_user_carries_on() {
        let f = fixture();
        let state = f.root.join("state");
        let module = module_path!();
        let module = module.split_once("::").map_or(module, |(_, rest)| rest);
        let out = std::process::Command::new("unshare")
            .args([
                "--user",
                "--map-root-user",
                "--mount",
                "--propagation=private",
            ])
            .args([
                "sh",
                "-c",
                r#"mount -t tmpfs -o size=64k,mode=0700 moltbot-full "$0" && exec "$@""#,
            ])
            .arg(&state)
            .arg(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                &format!("{module}::full_disk_child"),
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(FULL_DISK_ROOT, &f.root)
            .output();
        let out = match out {
            Ok(out) => out,
            Err(e) => return eprintln!("skipped: cannot run unshare ({e})"),
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stdout.contains("running 1 test") {
            return eprintln!("skipped: no tmpfs in a user namespace here: {stderr}");
        }
        assert!(
            out.status.success() && stdout.contains(FULL_DISK_DONE),
            "{}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status,
        );
        // The tmpfs was the child's alone.
        assert_eq!(fs::read_dir(&state).unwrap().count(), 0);
    }

    #[test]
    #[ignore = "child side of a_write_on_a_full_disk_is_507_and_the_user_carries_on"]
    fn full_disk_child() {
        let Some(root) = std::env::var_os(FULL_DISK_ROOT) else {
            return;
        };
        let mut f = Fixture::over(PathBuf::from(root));
        let set = |f: &mut Fixture, v: i32| {
            f.route(
                "user-a",
                json!({"action": "set", "name": "prefs", "value": v}),
            )
        };
        assert_eq!(set(&mut f, 1).status, 200);
        // Fill the file system.
        let filler = f.root.join("state/filler");
        let mut file = fs::File::create(&filler).unwrap();
        let e = loop {
            if let Err(e) = file.write_all(&[0x5a; 4096]) {
                break e;
            }
        };
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        drop(file);
        for r in [
            set(&mut f, 2),
            f.session(Method::Put, "user-a", "prefs", b"2"),
            f.session(Method::Put, "user-a", "other", b"[1,2,3]"),
        ] {
            assert_error(&r, 507, "INSUFFICIENT_STORAGE");
            f.assert_no_server_path(&r);
        }
        // The old value is intact, no temp file is left behind, reads still work.
        assert_eq!(f.session(Method::Get, "user-a", "prefs", b"").body, b"1");
        assert_eq!(
            body(&f.session(Method::Get, "user-a", "", b"")),
            json!({"names": ["prefs"]})
        );
        let dir = f.root.join("state/user-a");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        // Space again: the next write succeeds.
        fs::remove_file(&filler).unwrap();
        assert_eq!(set(&mut f, 2).status, 200);
        assert_eq!(f.session(Method::Get, "user-a", "prefs", b"").body, b"2");
        let r = f.session(Method::Put, "user-a", "other", b"[1,2,3]");
        assert_eq!(body(&r)["created"], true);
        println!("{FULL_DISK_DONE}");
    }
}
