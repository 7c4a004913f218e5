//! `moltbot workers info`: the architecture and the effective configuration, every key as
//! declared in `crate::config` (its value, where the value came from, its flag and meaning).
//! `--format markdown` prints the README's configuration table from the same declaration.

use serde_json::{Value, json};

use crate::command::args::PoolArgs;
use crate::config::{self, Config, KEYS, Key, Source};

/// Output format of `moltbot workers info`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InfoFormat {
    /// For people: the effective configuration as commented TOML.
    #[default]
    Human,
    /// For programs.
    Json,
    /// The README's configuration table (key, default, flag, meaning).
    Markdown,
}

/// `moltbot workers info`
#[derive(clap::Args, Debug, Clone)]
pub struct InfoArgs {
    /// Pool settings to resolve.
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = InfoFormat::Human)]
    pub format: InfoFormat,
}

const ARCHITECTURE: &str = "\
moltbot gateway: one fixed port, one sandboxed worker process per slot

  client --HTTP/1.1--> :PORT  gateway (glommio, one pinned executor per core)
                                |  parse, auth, userId -> worker (sticky consistent hash,
                                |  bounded load, persisted routing table)
                                |  rkyv request into the shared-memory ring [core -> worker]
                                v
             worker-N process (own sandbox dir, Landlock, rlimits)   <-- monitor thread:
                                |  handler runs, rkyv response into     heartbeats, waitpid,
                                v  the ring [worker -> core]            RSS, restart policy
             the gateway core writes the reply to the socket

Sandbox layout: <sandbox_dir>/worker-N/{sandbox.json, sessions/, state/, cache/, temp/, logs/}";

/// Prints the architecture and the configuration; returns the exit code.
pub fn run(args: InfoArgs) -> anyhow::Result<i32> {
    if args.format == InfoFormat::Markdown {
        print!("{}", config::markdown_table());
        return Ok(0);
    }
    let config = args.pool.resolve(None, Config::process_env())?;
    let landlock = crate::worker::isolation::probe_landlock();
    match args.format {
        InfoFormat::Json => {
            let out = json!({
                "config": config,
                "keys": keys_json(&config),
                "landlock": landlock,
                "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        InfoFormat::Human | InfoFormat::Markdown => {
            println!("{ARCHITECTURE}\n");
            println!("Landlock on this kernel: {landlock:?}\n");
            println!(
                "Effective configuration (defaults < file < MOLTBOT_* environment < flags) as \
                 TOML;\na comment says where a value that is not the default came from, and \
                 `moltbot gateway --help`\nexplains each key.\n"
            );
            print!("{}", human_config(&config));
        }
    }
    Ok(0)
}

/// Every key of the declaration with its value in `config`, where it came from, its default,
/// kind, flag, variables and meaning.
fn keys_json(config: &Config) -> Value {
    KEYS.iter()
        .map(|k| {
            json!({
                "key": k.name,
                "value": k.value(config).map(|v| toml_to_json(&v)),
                "source": source_name(config.source(k.name)),
                "default": k.default_text(),
                "kind": k.kind.name,
                "optional": k.kind.optional,
                "flag": k.flag.map(|f| f.to_string()),
                "env": k.env_vars(),
                "aliases": k.aliases,
                "secret": k.secret,
                "meaning": k.meaning(),
            })
        })
        .collect()
}

fn source_name(s: Source) -> &'static str {
    match s {
        Source::Default => "default",
        Source::File => "file",
        Source::Env => "env",
        Source::Flag => "flag",
    }
}

fn toml_to_json(v: &toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The configuration as TOML, one key per line in declaration order: unset keys (and the
/// token) as comments, and a value set by a layer followed by a comment naming it.
pub fn human_config(config: &Config) -> String {
    let lines: Vec<(String, Option<String>)> = KEYS.iter().map(|k| human_line(k, config)).collect();
    let width = lines
        .iter()
        .filter(|(_, note)| note.is_some())
        .map(|(line, _)| line.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (line, note) in lines {
        match note {
            Some(note) => out.push_str(&format!("{line:<width$}  # {note}\n")),
            None => out.push_str(&format!("{line}\n")),
        }
    }
    out
}

fn human_line(k: &Key, config: &Config) -> (String, Option<String>) {
    let source = config.source(k.name);
    let from = (source != Source::Default).then(|| source.to_string());
    if k.secret {
        let set = k.is_set(config);
        return match (set, from) {
            (true, Some(from)) => (format!("# {}: set by the {from}, not shown", k.name), None),
            (true, None) => (format!("# {}: set, not shown", k.name), None),
            (false, _) => (format!("# {}: unset", k.name), None),
        };
    }
    match k.value(config) {
        Some(v) => (format!("{} = {v}", k.name), from),
        None => match k.default_text().as_str() {
            "none" => (format!("# {}: unset", k.name), from),
            default => (format!("# {}: unset ({default})", k.name), from),
        },
    }
}
