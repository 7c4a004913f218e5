//! `moltbot workers route USER`: which worker a running gateway routes a user to
//! (`GET /v1/users/{userId}/worker`), without assigning an unseen user.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use crate::command::Format;
use crate::command::status::{DEFAULT_GATEWAY, fetch_json, token_from_env};

/// `moltbot workers route USER`
#[derive(clap::Args, Debug, Clone)]
pub struct RouteArgs {
    /// The user id.
    pub user: String,
    /// URL of the running gateway.
    #[arg(long, default_value = DEFAULT_GATEWAY, env = "MOLTBOT_GATEWAY_URL")]
    pub gateway: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    pub format: Format,
}

/// Prints the user's worker; returns the exit code. Errors (invalid user id, gateway
/// unreachable, a non-200 answer) carry a message for the user; `main` exits 1 on them.
pub fn run(args: RouteArgs) -> anyhow::Result<i32> {
    let out = route_output(
        &args.user,
        &args.gateway,
        args.format,
        token_from_env().as_deref(),
    )?;
    print!("{out}");
    Ok(0)
}

/// What `run` prints.
fn route_output(
    user: &str,
    gateway: &str,
    format: Format,
    token: Option<&str>,
) -> anyhow::Result<String> {
    crate::user::validate_user_id(user).map_err(|e| anyhow::anyhow!("invalid user id: {e}"))?;
    let answer = fetch_json(gateway, &user_path(user), token)?;
    Ok(match format {
        Format::Json => format!("{}\n", serde_json::to_string_pretty(&answer)?),
        Format::Human => format!("{}\n", format_route(&answer, user)?),
    })
}

/// `/v1/users/{user}/worker` with the user id percent-encoded as one path segment.
pub fn user_path(user: &str) -> String {
    format!("/v1/users/{}/worker", percent_encode_segment(user))
}

/// Every byte but the unreserved ones of RFC 3986 (`A-Z a-z 0-9 - . _ ~`).
pub const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes every byte outside the unreserved set. The dot segments `.` and `..` are
/// encoded too, so that nothing on the way normalises them away.
pub fn percent_encode_segment(s: &str) -> String {
    let set = if s == "." || s == ".." {
        NON_ALPHANUMERIC
    } else {
        SEGMENT
    };
    utf8_percent_encode(s, set).to_string()
}

/// The human form of a `{userId, workerId, assigned}` answer:
/// `user-a → worker-1 (assigned)` or `user-x (not yet assigned: would go to worker-2)`.
pub fn format_route(answer: &Value, user: &str) -> anyhow::Result<String> {
    let user = answer.get("userId").and_then(Value::as_str).unwrap_or(user);
    let worker = answer
        .get("workerId")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow::anyhow!("the gateway's answer has no workerId: {answer}"))?;
    Ok(match answer.get("assigned").and_then(Value::as_bool) {
        Some(true) => format!("{user} → {worker} (assigned)"),
        Some(false) => format!("{user} (not yet assigned: would go to {worker})"),
        None => format!("{user} → {worker}"),
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::json;

    use super::*;
    use crate::command::client::testing::serve_json;

    #[test]
    fn percent_encoding() {
        let cases = [
            ("user-a", "user-a"),
            ("A.z_0~9", "A.z_0~9"),
            ("a b/c?d%e#f", "a%20b%2Fc%3Fd%25e%23f"),
            ("ü", "%C3%BC"),
            ("😀", "%F0%9F%98%80"),
            ("+&=;:@", "%2B%26%3D%3B%3A%40"),
            (".", "%2E"),
            ("..", "%2E%2E"),
            ("...", "..."),
            ("a..b", "a..b"),
        ];
        for (input, want) in cases {
            assert_eq!(percent_encode_segment(input), want, "{input:?}");
        }
        assert_eq!(user_path("a/b"), "/v1/users/a%2Fb/worker");
    }

    #[test]
    fn human_route_lines() {
        let assigned = json!({"userId": "user-a", "workerId": "worker-1", "assigned": true});
        assert_eq!(
            format_route(&assigned, "ignored").expect("ok"),
            "user-a → worker-1 (assigned)"
        );
        let unseen = json!({"userId": "user-x", "workerId": "worker-2", "assigned": false});
        assert_eq!(
            format_route(&unseen, "user-x").expect("ok"),
            "user-x (not yet assigned: would go to worker-2)"
        );
        let bare = json!({"workerId": "worker-0"});
        assert_eq!(format_route(&bare, "u").expect("ok"), "u → worker-0");
        assert!(format_route(&json!({"userId": "u"}), "u").is_err());
    }

    #[test]
    fn asks_the_gateway_with_an_encoded_user() {
        let body =
            json!({"userId": "a b/c", "workerId": "worker-1", "assigned": false}).to_string();
        let (url, rx, h) = serve_json(vec![(200, body.clone()), (200, body)]);
        let human = route_output("a b/c", &url, Format::Human, Some("t")).expect("human");
        assert_eq!(human, "a b/c (not yet assigned: would go to worker-1)\n");
        let req = rx.recv().expect("request");
        assert!(
            req.starts_with("GET /v1/users/a%20b%2Fc/worker HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(req.contains("\r\nauthorization: Bearer t\r\n"), "{req}");

        let out = route_output("a b/c", &url, Format::Json, None).expect("json");
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["workerId"], "worker-1");
        assert!(out.contains("\n  \"assigned\": false"), "pretty: {out}");
        h.join().expect("server");
    }

    #[test]
    fn invalid_user_is_refused_before_asking() {
        // Nothing listens on port 1: reaching the network would give a different error.
        for user in ["", "a\nb", &"x".repeat(129)] {
            let err =
                route_output(user, "http://127.0.0.1:1", Format::Human, None).expect_err("invalid");
            assert!(err.to_string().starts_with("invalid user id: "), "{err}");
        }
    }

    #[test]
    fn gateway_errors_are_reported() {
        let body = json!({"error": {"code": "NOT_FOUND", "message": "no such path"}}).to_string();
        let (url, _rx, h) = serve_json(vec![(404, body)]);
        let err = route_output("u", &url, Format::Human, None).expect_err("404");
        assert_eq!(
            err.to_string(),
            format!(
                "gateway at {url} answered 404 to GET /v1/users/u/worker: NOT_FOUND: no such path"
            )
        );
        h.join().expect("server");
    }

    #[derive(clap::Parser, Debug)]
    struct Wrapper {
        #[command(flatten)]
        args: RouteArgs,
    }

    #[test]
    fn arguments() {
        let w = Wrapper::try_parse_from(["x", "user-a", "--gateway", "http://h:1"]).expect("parse");
        assert_eq!(w.args.user, "user-a");
        assert_eq!(w.args.gateway, "http://h:1");
        assert_eq!(w.args.format, Format::Human);
        assert!(Wrapper::try_parse_from(["x"]).is_err(), "USER is required");
    }
}
