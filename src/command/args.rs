//! The configuration flags: clap arguments made from the flags the configuration keys
//! declare (`crate::config`). clap takes each value as a string and checks it with the key's
//! parser, the one TOML and the environment go through; [`Config::resolve`] parses it again
//! when it applies the flags, so a flag, a variable and a TOML string mean the same.

use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Command, FromArgMatches};

use crate::config::{self, Config, ConfigError, FlagGroup, KEYS, Key};

/// The id (and long name) of the config file flag.
const CONFIG_ARG: &str = "config";

/// The values of the flags that were given, as typed, by key name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagValues(Vec<(&'static str, String)>);

impl FlagValues {
    /// The value given for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `key`'s value as if its flag had been given.
    pub fn set(&mut self, key: &'static str, value: impl Into<String>) {
        let value = value.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.0.push((key, value)),
        }
    }

    /// `(key name, value)` pairs, as [`Config::resolve`] takes them.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.0.iter().map(|(k, v)| (*k, v.as_str()))
    }

    /// Reads the flags of `keys` from parsed arguments.
    fn read(&mut self, m: &ArgMatches, keys: impl Iterator<Item = &'static Key>) {
        for key in keys {
            if key.kind.switch {
                if let Ok(Some(true)) = m.try_get_one::<bool>(key.name) {
                    self.set(key.name, "true");
                }
            } else if let Ok(Some(v)) = m.try_get_one::<String>(key.name) {
                self.set(key.name, v.clone());
            }
        }
    }
}

/// The pool flags shared by `moltbot gateway`, `moltbot workers demo` and `moltbot workers
/// info`, and `--config`.
#[derive(Debug, Clone, Default)]
pub struct PoolArgs {
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// The pool flags given.
    pub flags: FlagValues,
}

/// The gateway flags of `moltbot gateway` and `moltbot workers demo`. There is deliberately no
/// `--token`: a token on the command line leaks through `ps`; use `MOLTBOT_GATEWAY_TOKEN` or
/// the config file.
#[derive(Debug, Clone, Default)]
pub struct GatewayArgs {
    /// The gateway flags given.
    pub flags: FlagValues,
}

impl PoolArgs {
    /// The configuration: defaults < file (`--config`, else `$MOLTBOT_CONFIG`) < `env` < these
    /// flags and `gateway`'s, validated.
    pub fn resolve(
        &self,
        gateway: Option<&GatewayArgs>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let gateway_flags = gateway.into_iter().flat_map(|g| g.flags.iter());
        Config::resolve(
            self.config.as_deref(),
            env,
            self.flags.iter().chain(gateway_flags),
        )
    }
}

/// The keys whose flags `moltbot users` takes: those that say where the users file is.
const USERS_FILE_KEYS: [&str; 2] = ["sandbox_dir", "users_file"];

/// `--config`, `-s/--sandbox-dir` and `--users-file`: the arguments of the commands that edit
/// the users file (`moltbot users ...`). They run no pool, so their `--help` lists no pool
/// settings, and [`UsersFileArgs::resolve`] checks only the keys they use.
#[derive(Debug, Clone, Default)]
pub struct UsersFileArgs {
    /// `--config` and the flags given, resolved like every other command's.
    pub pool: PoolArgs,
}

impl UsersFileArgs {
    /// The configuration, layered as [`PoolArgs::resolve`] layers it, with the values of the
    /// keys that locate the users file checked, and nothing else: a config file made for a
    /// gateway that binds a public address, whose token only that gateway's environment
    /// holds, must still tell `moltbot users` where the file is.
    pub fn resolve(
        &self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let cfg = Config::layer(self.pool.config.as_deref(), env, self.pool.flags.iter())?;
        for key in users_file_keys() {
            (key.check)(&cfg).map_err(|message| ConfigError::Invalid {
                key: key.name,
                message,
            })?;
        }
        Ok(cfg)
    }
}

fn users_file_keys() -> impl Iterator<Item = &'static Key> {
    USERS_FILE_KEYS
        .iter()
        .map(|name| config::key(name).expect("a declared key"))
}

/// The keys whose flag belongs to `group`.
fn keys_of(group: FlagGroup) -> impl Iterator<Item = &'static Key> {
    KEYS.iter()
        .filter(move |k| k.flag.is_some_and(|f| f.group == group))
}

/// The clap argument of `key`'s flag.
fn arg(key: &'static Key) -> Arg {
    let flag = key.flag.expect("a key with a flag");
    let mut help = key.meaning().replace('`', "");
    if !key.kind.switch {
        help.push_str(&format!(" [default: {}]", key.default_text()));
    }
    help.push_str(&format!(" [env: {}]", key.env_var()));
    let mut arg = Arg::new(key.name).long(flag.long).help(help);
    if let Some(c) = flag.short {
        arg = arg.short(c);
    }
    if key.kind.switch {
        return arg.action(ArgAction::SetTrue);
    }
    arg.action(ArgAction::Set)
        .value_name(flag.value_name.unwrap_or(key.kind.value_name))
        .value_parser(move |s: &str| key.parse(s).map(|()| s.to_string()))
}

/// `--config FILE`.
fn config_arg() -> Arg {
    Arg::new(CONFIG_ARG)
        .long(CONFIG_ARG)
        .value_name("FILE")
        .value_parser(clap::value_parser!(PathBuf))
        .help("TOML config file [default: $MOLTBOT_CONFIG if set, else none]")
}

fn add_flags(cmd: Command, group: FlagGroup) -> Command {
    keys_of(group).fold(cmd, |cmd, key| cmd.arg(arg(key)))
}

impl clap::Args for PoolArgs {
    fn augment_args(cmd: Command) -> Command {
        add_flags(cmd.arg(config_arg()), FlagGroup::Pool)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for PoolArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut args = PoolArgs::default();
        args.update_from_arg_matches(m)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        if let Ok(Some(path)) = m.try_get_one::<PathBuf>(CONFIG_ARG) {
            self.config = Some(path.clone());
        }
        self.flags.read(m, keys_of(FlagGroup::Pool));
        Ok(())
    }
}

impl clap::Args for UsersFileArgs {
    fn augment_args(cmd: Command) -> Command {
        users_file_keys().fold(cmd.arg(config_arg()), |cmd, key| cmd.arg(arg(key)))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for UsersFileArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut args = UsersFileArgs::default();
        args.update_from_arg_matches(m)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        if let Ok(Some(path)) = m.try_get_one::<PathBuf>(CONFIG_ARG) {
            self.pool.config = Some(path.clone());
        }
        self.pool.flags.read(m, users_file_keys());
        Ok(())
    }
}

impl clap::Args for GatewayArgs {
    fn augment_args(cmd: Command) -> Command {
        add_flags(cmd, FlagGroup::Gateway)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for GatewayArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut args = GatewayArgs::default();
        args.update_from_arg_matches(m)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        self.flags.read(m, keys_of(FlagGroup::Gateway));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::path::Path;
    use std::time::Duration;

    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::config::Cores;

    const MIB: u64 = 1 << 20;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        pool: PoolArgs,
        #[command(flatten)]
        gw: GatewayArgs,
    }

    fn apply(cli: &Cli) -> Config {
        let mut c = Config::default();
        c.apply_flags(cli.pool.flags.iter().chain(cli.gw.flags.iter()))
            .unwrap();
        c
    }

    #[test]
    fn flags_parse_and_apply() {
        let cli = Cli::try_parse_from([
            "x",
            "-w",
            "3",
            "-s",
            "/tmp/sb",
            "--balance-factor",
            "0",
            "--max-concurrent",
            "2",
            "--max-queue",
            "5",
            "--request-timeout",
            "1500",
            "--heartbeat-interval",
            "1s",
            "--stall-timeout",
            "4s",
            "--max-memory",
            "128MiB",
            "--max-requests",
            "10",
            "--max-requests-jitter",
            "0.2",
            "--restart-delay",
            "50ms",
            "--max-restart-delay",
            "2s",
            "--stable-after",
            "3s",
            "--max-restart-attempts",
            "4",
            "--restart-window",
            "10s",
            "--failed-cooldown",
            "2s",
            "--ring-capacity",
            "256KiB",
            "--worker-program",
            "/bin/w",
            "--bind",
            "127.0.0.2",
            "-p",
            "0",
            "--cores",
            "0,1",
            "--max-connections",
            "9",
            "--header-read-timeout",
            "2s",
            "--idle-timeout",
            "3s",
            "--max-body-bytes",
            "64KiB",
            "--drain-timeout",
            "1s",
        ])
        .unwrap();
        let c = apply(&cli);
        assert_eq!(c.worker_count, 3);
        assert_eq!(c.sandbox_dir, PathBuf::from("/tmp/sb"));
        assert_eq!(c.balance_factor, 0.0);
        assert_eq!(c.max_concurrent, 2);
        assert_eq!(c.max_queue, 5);
        assert_eq!(c.request_timeout, Duration::from_millis(1500));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(c.stall_timeout(), Duration::from_secs(4));
        assert_eq!(c.max_memory, 128 * MIB);
        assert_eq!(c.max_requests, 10);
        assert_eq!(c.max_requests_jitter, 0.2);
        assert_eq!(c.restart_delay, Duration::from_millis(50));
        assert_eq!(c.max_restart_delay, Duration::from_secs(2));
        assert_eq!(c.stable_after, Duration::from_secs(3));
        assert_eq!(c.max_restart_attempts, 4);
        assert_eq!(c.restart_window, Duration::from_secs(10));
        assert_eq!(c.failed_cooldown, Duration::from_secs(2));
        assert_eq!(c.ring_capacity, 256 * 1024);
        assert_eq!(c.worker_program, Some(PathBuf::from("/bin/w")));
        assert_eq!(c.bind, "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(c.port, 0);
        assert_eq!(c.cores, Some(Cores::List(vec![0, 1])));
        assert_eq!(c.max_connections, 9);
        assert_eq!(c.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.idle_timeout, Duration::from_secs(3));
        assert_eq!(c.max_body_bytes, 64 * 1024);
        assert_eq!(c.drain_timeout, Duration::from_secs(1));
        c.validate().unwrap();
        assert!(c.explicit("max_connections"));
        assert!(!c.explicit("max_users"));
    }

    #[test]
    fn absent_flags_change_nothing() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.pool.flags, FlagValues::default());
        assert_eq!(cli.gw.flags, FlagValues::default());
        assert_eq!(cli.pool.config, None);
        let c = apply(&cli);
        assert!(c.sources.iter().next().is_none(), "{:?}", c.sources);
    }

    #[test]
    fn flags_reject_garbage_and_there_is_no_token_flag() {
        for bad in [
            &["x", "--request-timeout", "soon"][..],
            &["x", "--max-memory", "lots"],
            &["x", "--cores", "a"],
            &["x", "-w", "many"],
            &["x", "--token", "t"],
            &["x", "--landlock"],
            &["x", "--test-handlers", "yes"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        let e = Cli::try_parse_from(["x", "--request-timeout", "soon"]).unwrap_err();
        assert!(e.to_string().contains("not a duration"), "{e}");
        let cli = Cli::try_parse_from(["x", "--cores", "2"]).unwrap();
        assert_eq!(cli.gw.flags.get("cores"), Some("2"));
        assert_eq!(apply(&cli).cores, Some(Cores::Count(2)));
    }

    /// Fault injection is a build feature of the tests, never a setting: no flag, no key.
    #[test]
    fn nothing_switches_on_fault_injection() {
        assert!(Cli::try_parse_from(["x", "--test-handlers"]).is_err());
        for toml in ["test_handlers = true", "testHandlers = true"] {
            let e = Config::from_toml_str(toml).unwrap_err().to_string();
            assert!(e.contains("unknown"), "{e}");
        }
    }

    #[test]
    fn every_declared_flag_is_an_argument_with_the_declared_names() {
        let cmd = Cli::command();
        for key in KEYS {
            let arg = cmd.get_arguments().find(|a| a.get_id() == key.name);
            let Some(flag) = key.flag else {
                assert!(arg.is_none(), "{} has no flag but an argument", key.name);
                continue;
            };
            let arg = arg.unwrap_or_else(|| panic!("no argument for {}", key.name));
            assert_eq!(arg.get_long(), Some(flag.long), "{}", key.name);
            assert_eq!(arg.get_short(), flag.short, "{}", key.name);
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(help.contains(&key.env_var()), "{}: {help}", key.name);
        }
    }

    #[derive(clap::Parser, Debug)]
    struct UsersCli {
        #[command(flatten)]
        files: UsersFileArgs,
    }

    #[test]
    fn users_file_args_take_the_location_flags_only() {
        let cli =
            UsersCli::try_parse_from(["x", "-s", "/srv/m", "--users-file", "/srv/u.json"]).unwrap();
        assert_eq!(cli.files.pool.flags.get("sandbox_dir"), Some("/srv/m"));
        assert_eq!(cli.files.pool.flags.get("users_file"), Some("/srv/u.json"));
        for pool_only in [&["x", "-w", "3"][..], &["x", "--max-memory", "1GiB"]] {
            assert!(
                UsersCli::try_parse_from(pool_only).is_err(),
                "{pool_only:?}"
            );
        }
        let help = UsersCli::command().render_long_help().to_string();
        assert!(help.contains("MOLTBOT_USERS_FILE"), "{help}");
        assert!(!help.contains("--workers"), "{help}");
    }

    #[test]
    fn users_file_args_resolve_a_gateway_config_that_would_not_validate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        // A configuration the gateway would refuse (a stall timeout below the heartbeat), but
        // that says where the users file is.
        std::fs::write(
            &p,
            "heartbeat_interval = \"5s\"\nstall_timeout = \"1s\"\nsandbox_dir = \"/srv/m\"\n",
        )
        .unwrap();
        let cli = UsersCli::try_parse_from(["x", "--config", p.to_str().unwrap()]).unwrap();
        assert!(cli.files.pool.resolve(None, Vec::new()).is_err());
        let c = cli.files.resolve(Vec::new()).unwrap();
        assert_eq!(c.users_path(), Path::new("/srv/m/users.json"));
        let env = vec![("MOLTBOT_USERS_FILE".to_string(), "/srv/u.json".to_string())];
        let c = cli.files.resolve(env).unwrap();
        assert_eq!(c.users_path(), Path::new("/srv/u.json"));
        let env = vec![("MOLTBOT_WORKER_COUNT".to_string(), "many".to_string())];
        assert!(
            cli.files.resolve(env).is_err(),
            "a malformed value is still refused"
        );
    }

    #[test]
    fn config_flag_and_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        std::fs::write(&p, "max_queue = 4\nport = 1000\n").unwrap();
        let cli = Cli::try_parse_from(["x", "--config", p.to_str().unwrap(), "-p", "7"]).unwrap();
        assert_eq!(cli.pool.config.as_deref(), Some(Path::new(&p)));
        let env = vec![("MOLTBOT_PORT".to_string(), "3000".to_string())];
        let c = cli.pool.resolve(Some(&cli.gw), env.clone()).unwrap();
        assert_eq!((c.max_queue, c.port), (4, 7));
        // `workers info` resolves without the gateway flags.
        let c = cli.pool.resolve(None, env).unwrap();
        assert_eq!(c.port, 3000);
    }
}
