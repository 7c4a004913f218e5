//! `moltbot users add|list|revoke|rotate`: the users file (`crate::auth::users`) from the
//! command line.
//!
//! Standard output carries only what a script takes: the token of `add` and `rotate`, alone
//! on one line (`TOKEN=$(moltbot users add alice)`), and the table of `list`. Confirmations and
//! hints go to standard error. A token is printed once, there, and never logged; `list`
//! shows neither tokens nor their hashes.

use std::io::{self, Write as _};
use std::path::PathBuf;
use std::time::SystemTime;

use crate::auth::users::{self, UserInfo, UsersError};
use crate::command::Format;
use crate::command::args::UsersFileArgs;
use crate::config::Config;

/// `moltbot users ...`
#[derive(clap::Subcommand, Debug)]
pub enum UsersCommand {
    /// Add a user and print its new token on stdout (shown only this once; stored hashed).
    Add(UserArgs),
    /// List the users: id, created, last used, active or revoked (never a token).
    List(ListArgs),
    /// Revoke every token of a user.
    Revoke(UserArgs),
    /// Revoke a user's token and print a new one on stdout.
    Rotate(UserArgs),
}

/// The arguments of `add`, `revoke` and `rotate`.
#[derive(clap::Args, Debug, Clone)]
pub struct UserArgs {
    /// The user id, as the gateway will know the user (an id starting with `-` goes after
    /// `--`).
    pub id: String,
    /// Where the users file is.
    #[command(flatten)]
    pub files: UsersFileArgs,
}

/// The arguments of `list`.
#[derive(clap::Args, Debug, Clone)]
pub struct ListArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    pub format: Format,
    /// Where the users file is.
    #[command(flatten)]
    pub files: UsersFileArgs,
}

/// What tells the operator when the change takes effect.
const PICKED_UP: &str = "a running gateway picks the change up within a second";

/// Runs a `moltbot users` command; returns the exit code. Errors carry a message for the
/// operator; `crate::cli` prints them and exits 1.
pub fn run(cmd: UsersCommand) -> anyhow::Result<i32> {
    match cmd {
        UsersCommand::Add(a) => {
            let path = users_path(&a.files)?;
            let token = users::add(&path, &a.id)?;
            print_token(&token, &a.id, "added")?;
            eprintln!(
                "added user {:?} to {}; the token above is shown only this once, and {PICKED_UP}",
                a.id,
                path.display()
            );
        }
        UsersCommand::Rotate(a) => {
            let path = users_path(&a.files)?;
            let token = users::rotate(&path, &a.id)?;
            print_token(&token, &a.id, "rotated")?;
            eprintln!(
                "rotated user {:?}: the previous token is revoked, the one above is shown only \
                 this once, and {PICKED_UP}",
                a.id
            );
        }
        UsersCommand::Revoke(a) => {
            let path = users_path(&a.files)?;
            match users::revoke(&path, &a.id)? {
                0 => eprintln!("user {:?} was revoked already", a.id),
                _ => eprintln!("revoked user {:?}; {PICKED_UP}", a.id),
            }
        }
        UsersCommand::List(a) => {
            let path = users_path(&a.files)?;
            let list = match users::list(&path) {
                Ok(list) => list,
                // No users yet: an empty list, but say where they were looked for, in case
                // it is the wrong place.
                Err(UsersError::Missing { .. }) => {
                    eprintln!("no users: {} does not exist", path.display());
                    Vec::new()
                }
                Err(e) => return Err(e.into()),
            };
            let out = match a.format {
                Format::Json => format!("{}\n", serde_json::to_string_pretty(&list_json(&list))?),
                Format::Human => format_list(&list),
            };
            io::stdout().lock().write_all(out.as_bytes())?;
        }
    }
    Ok(0)
}

fn users_path(files: &UsersFileArgs) -> anyhow::Result<PathBuf> {
    Ok(files.resolve(Config::process_env())?.users_path())
}

/// Prints the token alone on its line. The file already holds its hash, so a failure here
/// (a closed pipe) must say so rather than panic as `println!` would, and how to get
/// another token.
fn print_token(token: &str, id: &str, done: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{token}")
        .and_then(|()| out.flush())
        .map_err(|e| {
            anyhow::anyhow!(
                "user {id:?} was {done}, but its token could not be written to stdout ({e}); \
                 `moltbot users rotate` makes a new one"
            )
        })
}

/// RFC 3339 UTC to the second.
fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn state(u: &UserInfo) -> &'static str {
    if u.is_active() { "active" } else { "revoked" }
}

/// One user of `list --format json`; a struct rather than `json!` so that the fields keep
/// this order.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct UserJson<'a> {
    id: &'a str,
    created: String,
    /// `null` when the gateway recorded no use.
    last_used: Option<String>,
    /// `null` while the user is active.
    revoked: Option<String>,
    state: &'static str,
}

/// `[{id, created, lastUsed, revoked, state}]`.
fn list_json(list: &[UserInfo]) -> Vec<UserJson<'_>> {
    list.iter()
        .map(|u| UserJson {
            id: &u.id,
            created: time(u.created),
            last_used: u.last_used.map(time),
            revoked: u.revoked.map(time),
            state: state(u),
        })
        .collect()
}

/// An aligned table with a header; nothing for no users.
fn format_list(list: &[UserInfo]) -> String {
    if list.is_empty() {
        return String::new();
    }
    let header = ["USER", "CREATED", "LAST USED", "STATE"].map(String::from);
    let rows: Vec<[String; 4]> = std::iter::once(header)
        .chain(list.iter().map(|u| {
            [
                u.id.clone(),
                time(u.created),
                u.last_used.map_or_else(|| "-".to_string(), time),
                state(u).to_string(),
            ]
        }))
        .collect();
    let widths: Vec<usize> = (0..4)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < row.len() {
                let pad = widths[c] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::json;

    use super::*;

    fn info(id: &str, revoked: bool, last_used: Option<u64>) -> UserInfo {
        let t = UNIX_EPOCH + Duration::from_secs(1_735_787_045);
        UserInfo {
            id: id.to_string(),
            created: t,
            revoked: revoked.then_some(t + Duration::from_secs(60)),
            last_used: last_used.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
        }
    }

    #[test]
    fn the_human_list_is_an_aligned_table() {
        let list = [
            info("alice", false, Some(1_735_790_000)),
            info("bob@example.com", true, None),
        ];
        assert_eq!(
            format_list(&list),
            "USER             CREATED               LAST USED             STATE\n\
             alice            2025-01-02T03:04:05Z  2025-01-02T03:53:20Z  active\n\
             bob@example.com  2025-01-02T03:04:05Z  -                     revoked\n"
        );
        assert_eq!(format_list(&[]), "");
    }

    #[test]
    fn the_json_list_has_the_documented_fields() {
        let list = [
            info("alice", false, None),
            info("bob", true, Some(1_735_790_000)),
        ];
        assert_eq!(
            serde_json::to_value(list_json(&list)).unwrap(),
            json!([
                {"id": "alice", "created": "2025-01-02T03:04:05Z", "lastUsed": null,
                 "revoked": null, "state": "active"},
                {"id": "bob", "created": "2025-01-02T03:04:05Z",
                 "lastUsed": "2025-01-02T03:53:20Z", "revoked": "2025-01-02T03:05:05Z",
                 "state": "revoked"},
            ])
        );
    }
}
