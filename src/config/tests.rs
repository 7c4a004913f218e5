//! Tests of the declaration, the value forms, the layers and validation.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::kind::Cores;
use super::*;

mod command_forms {
    use super::*;

    #[test]
    fn worker_command_forms() {
        assert_eq!(
            parse_command("python3 agent.py").unwrap(),
            ["python3", "agent.py"]
        );
        assert_eq!(
            parse_command(r#"python3 "my agent.py" -v"#).unwrap(),
            ["python3", "my agent.py", "-v"]
        );
        assert_eq!(
            parse_command(r#"["node", "a b.js"]"#).unwrap(),
            ["node", "a b.js"]
        );
        assert!(parse_command("").is_err());
        assert!(parse_command("python3 'unbalanced").is_err());
        assert!(parse_command("[1, 2]").is_err());
        let c = Config::from_toml_str("worker_command = [\"python3\", \"agent.py\"]").unwrap();
        assert_eq!(c.worker_command.unwrap(), ["python3", "agent.py"]);
        let c = Config::from_toml_str("workerCommand = [\"node\", \"agent.js\"]").unwrap();
        assert_eq!(c.worker_command.unwrap(), ["node", "agent.js"]);
        let mut c = Config::default();
        c.apply_env([(
            "MOLTBOT_WORKER_COMMAND".to_string(),
            "python3 x.py".to_string(),
        )])
        .unwrap();
        assert_eq!(c.worker_command.unwrap(), ["python3", "x.py"]);
        let bad = Config::from_toml_str("worker_command = []").unwrap();
        assert!(bad.validate().is_err());
    }
}

mod layers {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn invalid_key(cfg: &Config) -> &'static str {
        match cfg.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!(c.worker_count, 4);
        assert_eq!(c.sandbox_dir, PathBuf::from("/tmp/moltbot-workers"));
        assert_eq!(c.max_concurrent, 10);
        assert_eq!(c.max_queue, 100);
        assert_eq!(c.request_timeout, Duration::from_millis(120_000));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(5000));
        assert_eq!(c.stall_timeout(), Duration::from_secs(15));
        assert_eq!(c.max_memory, 512 * 1024 * 1024);
        assert_eq!(c.max_requests, 10_000);
        assert_eq!(c.max_requests_jitter, 0.1);
        assert_eq!(c.restart_delay, Duration::from_millis(1000));
        assert_eq!(c.max_restart_delay, Duration::from_secs(30));
        assert_eq!(c.stable_after, Duration::from_secs(30));
        assert_eq!(c.max_restart_attempts, 5);
        assert_eq!(c.restart_window, Duration::from_millis(60_000));
        assert_eq!(c.failed_cooldown, Duration::from_secs(60));
        assert_eq!(c.balance_factor, 1.0);
        assert_eq!(c.ring_capacity, 2 * 1024 * 1024);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.worker_program, None);
        assert_eq!(c.bind, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(c.port, 18789);
        assert_eq!(c.cores, None);
        assert_eq!(c.token, None);
        assert_eq!(c.max_header_bytes, 16 * 1024);
        assert_eq!(c.max_headers, 100);
        assert_eq!(c.max_body_bytes, 1024 * 1024);
        assert_eq!(c.max_uri_bytes, 8 * 1024);
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.worker_nofile, 1024);
        assert_eq!(c.worker_address_space, None);
        assert!(c.landlock);
        c.validate().unwrap();
    }

    #[test]
    fn empty_toml_is_the_default() {
        assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
    }

    #[test]
    fn toml_snake_case_keys() {
        let c = Config::from_toml_str(
            r#"
            worker_count = 3
            sandbox_dir = "/var/moltbot"
            max_concurrent = 20
            max_queue = 7
            request_timeout = "30s"
            heartbeat_interval = 250
            stall_timeout = "2s"
            max_memory = "256MiB"
            max_requests = 5000
            max_requests_jitter = 0.25
            restart_delay = "100ms"
            max_restart_delay = "10s"
            stable_after = "1m"
            max_restart_attempts = 3
            restart_window = 30000
            failed_cooldown = "5s"
            balance_factor = 1.25
            ring_capacity = "4MiB"
            drain_timeout = "3s"
            worker_program = "/usr/bin/moltbot"
            bind = "::1"
            port = 0
            cores = [0, 2]
            token = "s3cret"
            max_header_bytes = "32KiB"
            max_headers = 50
            max_body_bytes = 65536
            max_uri_bytes = "4KiB"
            header_read_timeout = "5s"
            idle_timeout = "90s"
            max_connections = 100
            worker_nofile = 4096
            worker_address_space = "8GiB"
            landlock = false
            "#,
        )
        .unwrap();
        assert_eq!(c.worker_count, 3);
        assert_eq!(c.sandbox_dir, PathBuf::from("/var/moltbot"));
        assert_eq!(c.max_concurrent, 20);
        assert_eq!(c.max_queue, 7);
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(c.stall_timeout(), Duration::from_secs(2));
        assert_eq!(c.max_memory, 256 * MIB);
        assert_eq!(c.max_requests, 5000);
        assert_eq!(c.max_requests_jitter, 0.25);
        assert_eq!(c.restart_delay, Duration::from_millis(100));
        assert_eq!(c.max_restart_delay, Duration::from_secs(10));
        assert_eq!(c.stable_after, Duration::from_secs(60));
        assert_eq!(c.max_restart_attempts, 3);
        assert_eq!(c.restart_window, Duration::from_secs(30));
        assert_eq!(c.failed_cooldown, Duration::from_secs(5));
        assert_eq!(c.balance_factor, 1.25);
        assert_eq!(c.ring_capacity, 4 * MIB as usize);
        assert_eq!(c.drain_timeout, Duration::from_secs(3));
        assert_eq!(c.worker_program, Some(PathBuf::from("/usr/bin/moltbot")));
        assert_eq!(c.bind, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(c.port, 0);
        assert_eq!(c.cores, Some(Cores::List(vec![0, 2])));
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert_eq!(c.max_header_bytes, 32 * 1024);
        assert_eq!(c.max_headers, 50);
        assert_eq!(c.max_body_bytes, 65536);
        assert_eq!(c.max_uri_bytes, 4096);
        assert_eq!(c.header_read_timeout, Duration::from_secs(5));
        assert_eq!(c.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.max_connections, 100);
        assert_eq!(c.worker_nofile, 4096);
        assert_eq!(c.worker_address_space, Some(8 * GIB));
        assert!(!c.landlock);
        c.validate().unwrap();
    }

    #[test]
    fn toml_typescript_camel_case_aliases() {
        let c = Config::from_toml_str(
            r#"
            workerCount = 3
            sandboxBaseDir = "/tmp/x"
            maxConcurrent = 5
            requestTimeout = 60000
            heartbeatInterval = 5000
            maxMemory = 268435456
            maxRequests = 5000
            restartDelay = 1000
            maxRestartAttempts = 2
            restartWindow = 60000
            maxQueue = 9
            stallTimeout = 20000
            maxRequestsJitter = 0.0
            maxRestartDelay = 5000
            stableAfter = 1000
            failedCooldown = 1000
            balanceFactor = 0
            ringCapacity = 131072
            drainTimeout = 1000
            workerProgram = "/bin/true"
            maxHeaderBytes = 8192
            maxHeaders = 10
            maxBodyBytes = 1000
            maxUriBytes = 1000
            headerReadTimeout = 1000
            idleTimeout = 1000
            maxConnections = 10
            workerNofile = 64
            workerAddressSpace = 0
            "#,
        )
        .unwrap();
        assert_eq!(c.worker_count, 3);
        assert_eq!(c.sandbox_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.max_concurrent, 5);
        assert_eq!(c.request_timeout, Duration::from_secs(60));
        assert_eq!(c.max_memory, 256 * MIB);
        assert_eq!(c.max_requests, 5000);
        assert_eq!(c.restart_delay, Duration::from_secs(1));
        assert_eq!(c.max_restart_attempts, 2);
        assert_eq!(c.max_queue, 9);
        assert_eq!(c.stall_timeout, Some(Duration::from_secs(20)));
        assert_eq!(c.balance_factor, 0.0);
        assert_eq!(c.ring_capacity, 128 * 1024);
        assert_eq!(c.max_connections, 10);
        assert_eq!(c.worker_address_space, Some(0));
        c.validate().unwrap();
        let c = Config::from_toml_str("sandboxDir = \"/tmp/y\"").unwrap();
        assert_eq!(c.sandbox_dir, PathBuf::from("/tmp/y"));
    }

    #[test]
    fn unknown_toml_key_is_an_error_naming_it() {
        let e = Config::from_toml_str("worker_count = 2\nworkr_cuont = 3").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }));
        assert!(e.to_string().contains("workr_cuont"), "{e}");
    }

    #[test]
    fn bad_toml_values_are_errors_naming_the_key() {
        for (doc, needle) in [
            ("request_timeout = \"soon\"", "request_timeout"),
            ("request_timeout = -5", "negative"),
            ("request_timeout = 1.5", "duration"),
            ("max_memory = \"lots\"", "max_memory"),
            ("max_memory = -1", "negative"),
            ("worker_count = \"four\"", "worker_count"),
            ("cores = \"x\"", "cores"),
            ("cores = -1", "negative"),
            ("bind = \"localhost:80\"", "bind"),
            ("port = 70000", "port"),
        ] {
            let e = Config::from_toml_str(doc).unwrap_err();
            assert!(e.to_string().contains(needle), "{doc}: {e}");
        }
    }

    #[test]
    fn load_file_reads_and_reports_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("moltbot.toml");
        std::fs::write(&p, "workerCount = 2\n").unwrap();
        assert_eq!(Config::load_file(&p).unwrap().worker_count, 2);
        let missing = dir.path().join("nope.toml");
        let e = Config::load_file(&missing).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(e.to_string().contains("nope.toml"), "{e}");
        std::fs::write(&p, "bogus = 1\n").unwrap();
        let e = Config::load_file(&p).unwrap_err();
        assert!(e.to_string().contains("moltbot.toml"), "{e}");
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn durations_parse_as_ms_or_humantime() {
        assert_eq!(parse_duration("120000"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration(" 1h 30m "), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in [
            "",
            "  ",
            "5 parsecs",
            "-5",
            "1.5",
            "s",
            "99999999999999999999999",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_parse_with_units() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("1048576", MIB),
            ("512MiB", 512 * MIB),
            ("512mib", 512 * MIB),
            ("512 MiB", 512 * MIB),
            ("512MB", 512_000_000),
            ("1GiB", GIB),
            ("1GB", 1_000_000_000),
            ("64KiB", 64 * KIB),
            ("64K", 64 * KIB),
            ("64k", 64 * KIB),
            ("64KB", 64_000),
            ("2M", 2 * MIB),
            ("1T", 1 << 40),
            ("1TB", 1_000_000_000_000),
            ("10B", 10),
            ("1.5GiB", 3 * GIB / 2),
            ("0.5KiB", 512),
            (".5KiB", 512),
        ];
        for &(s, want) in cases {
            assert_eq!(parse_size(s), Ok(want), "{s:?}");
        }
        for bad in [
            "",
            "MiB",
            "12XB",
            "1.2.3MiB",
            "5.",
            "-1",
            "1e6",
            "0.1KiB",
            "lots",
            "99999999999999999999",
            "20000000TiB",
            "16EiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        let e = parse_size("12XB").unwrap_err();
        assert!(e.contains("unknown unit"), "{e}");
    }

    #[test]
    fn format_size_round_trips() {
        assert_eq!(format_size(512 * MIB), "512MiB");
        assert_eq!(format_size(2 * MIB), "2MiB");
        assert_eq!(format_size(1536), "1536B");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(0), "0B");
        for v in [0, 1, 1000, 1024, 1536, 3 * GIB, u64::MAX, 1 << 40] {
            assert_eq!(parse_size(&format_size(v)), Ok(v), "{v}");
        }
    }

    #[test]
    fn cores_parse_as_count_or_list() {
        assert_eq!("2".parse::<Cores>(), Ok(Cores::Count(2)));
        assert_eq!("0,1".parse::<Cores>(), Ok(Cores::List(vec![0, 1])));
        assert_eq!("[0, 3]".parse::<Cores>(), Ok(Cores::List(vec![0, 3])));
        assert_eq!("5,".parse::<Cores>(), Ok(Cores::List(vec![5])));
        assert!("a,b".parse::<Cores>().is_err());
        assert!("two".parse::<Cores>().is_err());
        assert_eq!(Cores::List(vec![1, 2, 3]).count(), 3);
        assert_eq!(Cores::Count(4).count(), 4);
        assert_eq!(Cores::List(vec![0, 1]).to_string(), "[0, 1]");
        let c = Config::from_toml_str("cores = 2").unwrap();
        assert_eq!(c.cores, Some(Cores::Count(2)));
        let c = Config::from_toml_str("cores = [0, 1]").unwrap();
        assert_eq!(c.cores, Some(Cores::List(vec![0, 1])));
    }

    /// A key, a sample value for it, and the check that the value took.
    pub(super) type Sample = (&'static str, &'static str, fn(&Config) -> bool);

    /// A sample value per key that differs from the default, and the check that it took.
    pub(super) fn env_samples() -> Vec<Sample> {
        vec![
            ("worker_count", "7", |c| c.worker_count == 7),
            ("sandbox_dir", "/srv/m", |c| {
                c.sandbox_dir == Path::new("/srv/m")
            }),
            ("max_concurrent", "3", |c| c.max_concurrent == 3),
            ("max_queue", "0", |c| c.max_queue == 0),
            ("request_timeout", "5s", |c| {
                c.request_timeout == Duration::from_secs(5)
            }),
            ("heartbeat_interval", "100", |c| {
                c.heartbeat_interval == Duration::from_millis(100)
            }),
            ("stall_timeout", "1s", |c| {
                c.stall_timeout == Some(Duration::from_secs(1))
            }),
            ("worker_spin", "20us", |c| {
                c.worker_spin == Some(Duration::from_micros(20))
            }),
            ("worker_placement", "any", |c| {
                c.worker_placement == WorkerPlacement::Any
            }),
            ("worker_busy_share", "0.25", |c| c.worker_busy_share == 0.25),
            ("gateway_spin", "30us", |c| {
                c.gateway_spin == Some(Duration::from_micros(30))
            }),
            ("max_memory", "64MiB", |c| c.max_memory == 64 * MIB),
            ("max_requests", "9", |c| c.max_requests == 9),
            ("worker_standby", "off", |c| !c.worker_standby),
            ("max_requests_jitter", "0.5", |c| {
                c.max_requests_jitter == 0.5
            }),
            ("restart_delay", "2s", |c| {
                c.restart_delay == Duration::from_secs(2)
            }),
            ("max_restart_delay", "1m", |c| {
                c.max_restart_delay == Duration::from_secs(60)
            }),
            ("stable_after", "10s", |c| {
                c.stable_after == Duration::from_secs(10)
            }),
            ("max_restart_attempts", "9", |c| c.max_restart_attempts == 9),
            ("restart_window", "2m", |c| {
                c.restart_window == Duration::from_secs(120)
            }),
            ("failed_cooldown", "7s", |c| {
                c.failed_cooldown == Duration::from_secs(7)
            }),
            ("balance_factor", "1.5", |c| c.balance_factor == 1.5),
            ("max_users", "7", |c| c.max_users == 7),
            ("ring_capacity", "1MiB", |c| c.ring_capacity == MIB as usize),
            ("drain_timeout", "4s", |c| {
                c.drain_timeout == Duration::from_secs(4)
            }),
            ("worker_program", "/bin/w", |c| {
                c.worker_program.as_deref() == Some(Path::new("/bin/w"))
            }),
            ("worker_command", "python3 agent.py", |c| {
                c.worker_command.as_deref()
                    == Some(&["python3".to_string(), "agent.py".to_string()][..])
            }),
            ("worker_read_paths", "/opt/a:/opt/b", |c| {
                c.worker_read_paths == [PathBuf::from("/opt/a"), PathBuf::from("/opt/b")]
            }),
            ("cell", "openclaw", |c| c.cell == CellMode::OpenClaw),
            ("cell_node", "/opt/node/bin/node", |c| {
                c.cell_node.as_deref() == Some(Path::new("/opt/node/bin/node"))
            }),
            ("cell_openclaw", "/opt/oc/openclaw.mjs", |c| {
                c.cell_openclaw.as_deref() == Some(Path::new("/opt/oc/openclaw.mjs"))
            }),
            ("cell_port_base", "20000", |c| c.cell_port_base == 20000),
            ("cell_idle_timeout", "90s", |c| {
                c.cell_idle_timeout == Duration::from_secs(90)
            }),
            ("cell_env", "OPENAI_API_KEY, ANTHROPIC_API_KEY", |c| {
                c.cell_env == ["OPENAI_API_KEY", "ANTHROPIC_API_KEY"]
            }),
            ("bind", "0.0.0.0", |c| {
                c.bind == IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            }),
            ("port", "8080", |c| c.port == 8080),
            ("cores", "0,1", |c| c.cores == Some(Cores::List(vec![0, 1]))),
            ("jwt_secret", "0123456789abcdef0123456789abcdef", |c| {
                c.jwt_secret.as_deref() == Some("0123456789abcdef0123456789abcdef")
            }),
            ("jwt_secret_file", "/run/s/jwt", |c| {
                c.jwt_secret_file.as_deref() == Some(Path::new("/run/s/jwt"))
            }),
            ("jwt_public_key_file", "/etc/idp.pem", |c| {
                c.jwt_public_key_file.as_deref() == Some(Path::new("/etc/idp.pem"))
            }),
            ("jwt_issuer", "https://idp.example", |c| {
                c.jwt_issuer.as_deref() == Some("https://idp.example")
            }),
            ("jwt_audience", "moltbot", |c| {
                c.jwt_audience.as_deref() == Some("moltbot")
            }),
            ("jwt_user_claim", "email", |c| c.jwt_user_claim == "email"),
            ("jwt_leeway", "1m", |c| {
                c.jwt_leeway == Duration::from_secs(60)
            }),
            ("token", "abc", |c| c.token.as_deref() == Some("abc")),
            ("users_file", "/srv/u.json", |c| {
                c.users_file.as_deref() == Some(Path::new("/srv/u.json"))
            }),
            ("max_header_bytes", "8KiB", |c| c.max_header_bytes == 8192),
            ("max_headers", "20", |c| c.max_headers == 20),
            ("max_body_bytes", "2048", |c| c.max_body_bytes == 2048),
            ("ws_tick_interval", "5s", |c| {
                c.ws_tick_interval == Duration::from_secs(5)
            }),
            ("ws_max_buffered_bytes", "1MiB", |c| {
                c.ws_max_buffered_bytes == 1 << 20
            }),
            ("ws_connect_timeout", "3s", |c| {
                c.ws_connect_timeout == Duration::from_secs(3)
            }),
            ("max_uri_bytes", "1KiB", |c| c.max_uri_bytes == 1024),
            ("header_read_timeout", "3s", |c| {
                c.header_read_timeout == Duration::from_secs(3)
            }),
            ("idle_timeout", "4s", |c| {
                c.idle_timeout == Duration::from_secs(4)
            }),
            ("max_connections", "5", |c| c.max_connections == 5),
            ("worker_nofile", "256", |c| c.worker_nofile == 256),
            ("worker_address_space", "4GiB", |c| {
                c.worker_address_space == Some(4 * GIB)
            }),
            ("landlock", "off", |c| !c.landlock),
        ]
    }

    #[test]
    fn every_key_has_an_env_variable() {
        let samples = env_samples();
        let sample_keys: Vec<&str> = samples.iter().map(|s| s.0).collect();
        let keys: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
        assert_eq!(sample_keys, keys, "a key without an env test");
        for (key, value, check) in samples {
            let var = format!("MOLTBOT_{}", key.to_ascii_uppercase());
            let mut c = Config::default();
            assert!(!check(&c), "{key}: sample equals the default");
            c.apply_env(env(&[(var.as_str(), value)])).unwrap();
            assert!(check(&c), "{var}={value} did not apply");
        }
    }

    #[test]
    fn every_key_is_accepted_in_toml() {
        // The serialized default lists every serializable key; the rest are optional.
        let ser = Config::default().to_toml_string().unwrap();
        let optional = [
            "stall_timeout",
            "worker_spin",
            "gateway_spin",
            "worker_program",
            "worker_command",
            "worker_read_paths",
            "cell_node",
            "cell_openclaw",
            "cell_env",
            "cores",
            "jwt_secret",
            "jwt_secret_file",
            "jwt_public_key_file",
            "jwt_issuer",
            "jwt_audience",
            "token",
            "users_file",
            "worker_address_space",
        ];
        for key in KEYS.iter().map(|k| k.name) {
            let present = ser.lines().any(|l| l.starts_with(&format!("{key} =")));
            assert!(
                present || optional.contains(&key),
                "{key} missing from {ser}"
            );
        }
        for key in optional {
            let value = match key {
                "worker_command" => "[\"python3\", \"agent.py\"]",
                "worker_read_paths" => "[\"/opt/a\"]",
                "cell_env" => "[\"OPENAI_API_KEY\"]",
                "stall_timeout" => "\"20s\"",
                "worker_spin" | "gateway_spin" => "\"20us\"",
                "worker_address_space" => "\"4GiB\"",
                "cores" => "2",
                _ => "\"x\"",
            };
            Config::from_toml_str(&format!("{key} = {value}")).unwrap();
        }
    }

    #[test]
    fn env_unknown_moltbot_vars_and_others_are_ignored() {
        let mut c = Config::default();
        c.apply_env(env(&[
            ("MOLTBOT_WORKER_ID", "worker-3"),
            ("MOLTBOT_SANDBOX_ROOT", "/x"),
            ("MOLTBOT_CONFIG", "/nonexistent.toml"),
            ("WORKER_COUNT", "99"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn env_malformed_value_names_the_variable() {
        for (var, value) in [
            ("MOLTBOT_WORKER_COUNT", "many"),
            ("MOLTBOT_REQUEST_TIMEOUT", "soon"),
            ("MOLTBOT_MAX_MEMORY", "big"),
            ("MOLTBOT_LANDLOCK", "maybe"),
            ("MOLTBOT_BIND", "nowhere"),
            ("MOLTBOT_PORT", "-1"),
            ("MOLTBOT_SANDBOX_DIR", ""),
            ("MOLTBOT_WORKER_COUNT", ""),
        ] {
            let e = Config::default()
                .apply_env(env(&[(var, value)]))
                .unwrap_err();
            match &e {
                ConfigError::Env { var: v, .. } => assert_eq!(v, var),
                other => panic!("{other:?}"),
            }
            assert!(e.to_string().contains(var), "{e}");
        }
    }

    #[test]
    fn env_empty_value_unsets_optional_keys() {
        let mut c = Config {
            stall_timeout: Some(Duration::from_secs(20)),
            cores: Some(Cores::Count(2)),
            token: Some("t".into()),
            ..Config::default()
        };
        c.apply_env(env(&[
            ("MOLTBOT_STALL_TIMEOUT", ""),
            ("MOLTBOT_CORES", ""),
            ("MOLTBOT_GATEWAY_TOKEN", ""),
        ]))
        .unwrap();
        assert_eq!(c.stall_timeout, None);
        assert_eq!(c.cores, None);
        assert_eq!(c.token, None);
    }

    #[test]
    fn gateway_token_env_wins_over_generic_token() {
        for order in [
            env(&[
                ("MOLTBOT_GATEWAY_TOKEN", "gw"),
                ("MOLTBOT_TOKEN", "generic"),
            ]),
            env(&[
                ("MOLTBOT_TOKEN", "generic"),
                ("MOLTBOT_GATEWAY_TOKEN", "gw"),
            ]),
        ] {
            let mut c = Config::default();
            c.apply_env(order).unwrap();
            assert_eq!(c.token.as_deref(), Some("gw"));
        }
    }

    #[test]
    fn resolve_layers_file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        std::fs::write(
            &p,
            "worker_count = 2\nmax_concurrent = 3\nmax_queue = 4\nport = 1000\n",
        )
        .unwrap();
        let c = Config::resolve(
            Some(&p),
            env(&[
                ("MOLTBOT_WORKER_COUNT", "5"),
                ("MOLTBOT_MAX_CONCURRENT", "8"),
                ("MOLTBOT_PORT", "3000"),
            ]),
            [("worker_count", "6"), ("port", "2000")],
        )
        .unwrap();
        assert_eq!(c.worker_count, 6, "flag beats env and file");
        assert_eq!(c.max_concurrent, 8, "env beats file");
        assert_eq!(c.max_queue, 4, "file beats default");
        assert_eq!(c.port, 2000, "flag beats env");
        assert_eq!(c.source("worker_count"), Source::Flag);
        assert_eq!(c.source("max_concurrent"), Source::Env);
        assert_eq!(c.source("max_queue"), Source::File);
        assert_eq!(c.source("max_users"), Source::Default);
        // Without the flag the env value stays.
        let c = Config::resolve(Some(&p), env(&[("MOLTBOT_PORT", "3000")]), []).unwrap();
        assert_eq!(c.port, 3000);
    }

    #[test]
    fn resolve_reads_moltbot_config_env_unless_flag_given() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        std::fs::write(&a, "worker_count = 2\n").unwrap();
        std::fs::write(&b, "worker_count = 3\n").unwrap();
        let a_str = a.to_str().unwrap();
        let c = Config::resolve(None, env(&[(CONFIG_ENV, a_str)]), []).unwrap();
        assert_eq!(c.worker_count, 2);
        let c = Config::resolve(Some(&b), env(&[(CONFIG_ENV, a_str)]), []).unwrap();
        assert_eq!(c.worker_count, 3);
        let c = Config::resolve(None, Vec::new(), []).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn resolve_validates() {
        let e = Config::resolve(None, Vec::new(), [("worker_count", "0")]).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "worker_count",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn flag_values_name_the_flag_and_keys_without_flags_are_refused() {
        let e = Config::resolve(None, Vec::new(), [("request_timeout", "soon")]).unwrap_err();
        assert!(e.to_string().contains("--request-timeout"), "{e}");
        for name in ["token", "jwt_secret", "landlock", "no_such_key"] {
            let e = Config::default().apply_flags([(name, "x")]).unwrap_err();
            assert!(matches!(e, ConfigError::Flag { .. }), "{name}: {e}");
        }
    }

    #[test]
    fn validate_worker_count() {
        for (n, ok) in [(0, false), (1, true), (1024, true), (1025, false)] {
            let c = Config {
                worker_count: n,
                ..Config::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{n}");
        }
        let c = Config {
            worker_count: 0,
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "worker_count");
    }

    #[test]
    fn validate_balance_factor() {
        for (f, ok) in [
            (0.0, true),
            (1.0, true),
            (1.25, true),
            (0.5, false),
            (-1.0, false),
            (f64::NAN, false),
            (f64::INFINITY, false),
        ] {
            let c = Config {
                balance_factor: f,
                ..Config::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{f}");
            if !ok {
                assert_eq!(invalid_key(&c), "balance_factor");
            }
        }
    }

    #[test]
    fn validate_ring_capacity() {
        for (rc, ok) in [
            (64 * KIB, true),
            (GIB, true),
            (32 * KIB, false),
            (2 * GIB, false),
            (3 * MIB, false),
        ] {
            let c = Config {
                ring_capacity: rc as usize,
                max_body_bytes: 1024,
                ..Config::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{rc}");
            if !ok {
                assert_eq!(invalid_key(&c), "ring_capacity");
            }
        }
    }

    #[test]
    fn validate_body_must_fit_a_ring_frame() {
        let c = Config {
            ring_capacity: MIB as usize,
            max_body_bytes: MIB as usize,
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "max_body_bytes");
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("raise ring_capacity"), "{msg}");
        let c = Config {
            ring_capacity: MIB as usize,
            max_body_bytes: (MIB - RING_FRAME_OVERHEAD) as usize,
            ..Config::default()
        };
        c.validate().unwrap();
        let c = Config {
            max_body_bytes: 0,
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "max_body_bytes");
    }

    #[test]
    fn validate_non_zero_counts_and_durations() {
        let cases: Vec<(Config, &str)> = vec![
            (
                Config {
                    max_concurrent: 0,
                    ..Config::default()
                },
                "max_concurrent",
            ),
            (
                Config {
                    request_timeout: Duration::ZERO,
                    ..Config::default()
                },
                "request_timeout",
            ),
            (
                Config {
                    heartbeat_interval: Duration::ZERO,
                    ..Config::default()
                },
                "heartbeat_interval",
            ),
            (
                Config {
                    max_requests: 0,
                    ..Config::default()
                },
                "max_requests",
            ),
            (
                Config {
                    stable_after: Duration::ZERO,
                    ..Config::default()
                },
                "stable_after",
            ),
            (
                Config {
                    max_restart_attempts: 0,
                    ..Config::default()
                },
                "max_restart_attempts",
            ),
            (
                Config {
                    restart_window: Duration::ZERO,
                    ..Config::default()
                },
                "restart_window",
            ),
            (
                Config {
                    failed_cooldown: Duration::ZERO,
                    ..Config::default()
                },
                "failed_cooldown",
            ),
            (
                Config {
                    header_read_timeout: Duration::ZERO,
                    ..Config::default()
                },
                "header_read_timeout",
            ),
            (
                Config {
                    idle_timeout: Duration::ZERO,
                    ..Config::default()
                },
                "idle_timeout",
            ),
            (
                Config {
                    max_connections: 0,
                    ..Config::default()
                },
                "max_connections",
            ),
            (
                Config {
                    max_users: 0,
                    ..Config::default()
                },
                "max_users",
            ),
            (
                Config {
                    sandbox_dir: PathBuf::new(),
                    ..Config::default()
                },
                "sandbox_dir",
            ),
            (
                Config {
                    worker_program: Some(PathBuf::new()),
                    ..Config::default()
                },
                "worker_program",
            ),
        ];
        for (c, key) in cases {
            assert_eq!(invalid_key(&c), key);
        }
        // Zero is meaningful for these.
        let c = Config {
            max_queue: 0,
            restart_delay: Duration::ZERO,
            drain_timeout: Duration::ZERO,
            port: 0,
            ..Config::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn validate_stall_timeout_exceeds_heartbeat() {
        let c = Config {
            heartbeat_interval: Duration::from_secs(5),
            stall_timeout: Some(Duration::from_secs(5)),
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "stall_timeout");
        let c = Config {
            stall_timeout: Some(Duration::from_secs(6)),
            ..c
        };
        c.validate().unwrap();
    }

    #[test]
    fn validate_memory_jitter_and_restart_delays() {
        let c = Config {
            max_memory: 8 * MIB,
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "max_memory");
        for j in [1.0, -0.1, f64::NAN] {
            let c = Config {
                max_requests_jitter: j,
                ..Config::default()
            };
            assert_eq!(invalid_key(&c), "max_requests_jitter", "{j}");
        }
        let c = Config {
            max_requests_jitter: 0.0,
            ..Config::default()
        };
        c.validate().unwrap();
        let c = Config {
            restart_delay: Duration::from_secs(10),
            max_restart_delay: Duration::from_secs(5),
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "max_restart_delay");
    }

    #[test]
    fn validate_cores() {
        for (cores, ok) in [
            (Cores::Count(0), false),
            (Cores::Count(1), true),
            (Cores::Count(1025), false),
            (Cores::List(vec![]), false),
            (Cores::List(vec![0, 0]), false),
            (Cores::List(vec![3, 1]), true),
        ] {
            let c = Config {
                cores: Some(cores.clone()),
                ..Config::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{cores:?}");
            if !ok {
                assert_eq!(invalid_key(&c), "cores");
            }
        }
    }

    #[test]
    fn validate_jwt_keys() {
        let secret = || Some("k".repeat(MIN_HS256_SECRET_BYTES));
        let with_secret = Config {
            jwt_secret: secret(),
            ..Config::default()
        };
        with_secret.validate().unwrap();
        assert!(with_secret.jwt_configured());
        assert!(!Config::default().jwt_configured());
        for (file_key, c) in [
            (
                "jwt_secret_file",
                Config {
                    jwt_secret_file: Some("/run/s".into()),
                    ..Config::default()
                },
            ),
            (
                "jwt_public_key_file",
                Config {
                    jwt_public_key_file: Some("/etc/idp.pem".into()),
                    ..Config::default()
                },
            ),
        ] {
            c.validate().unwrap();
            assert!(c.jwt_configured(), "{file_key}");
        }

        // The HS256 secret's length.
        for (len, ok) in [(0, false), (31, false), (32, true), (64, true)] {
            let c = Config {
                jwt_secret: Some("s".repeat(len)),
                ..Config::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{len} bytes");
            if !ok {
                assert_eq!(invalid_key(&c), "jwt_secret");
            }
        }
        // Bytes, not characters: 11 × the 3-byte '€' is 33 bytes.
        let c = Config {
            jwt_secret: Some("€".repeat(11)),
            ..Config::default()
        };
        c.validate().unwrap();

        // At most one key.
        let two = Config {
            jwt_secret: secret(),
            jwt_public_key_file: Some("/etc/idp.pem".into()),
            ..Config::default()
        };
        assert_eq!(invalid_key(&two), "jwt_public_key_file");
        let e = two.validate().unwrap_err().to_string();
        assert!(e.contains("jwt_secret is set too"), "{e}");
        let files = Config {
            jwt_secret_file: Some("/run/s".into()),
            jwt_public_key_file: Some("/etc/idp.pem".into()),
            ..Config::default()
        };
        assert_eq!(invalid_key(&files), "jwt_public_key_file");
        let secret_and_file = Config {
            jwt_secret: secret(),
            jwt_secret_file: Some("/run/s".into()),
            ..Config::default()
        };
        assert_eq!(invalid_key(&secret_and_file), "jwt_secret_file");

        // Token checks without a key to check tokens with.
        type Set = fn(&mut Config);
        let lone: [(&str, Set); 4] = [
            ("jwt_issuer", |c| c.jwt_issuer = Some("https://idp".into())),
            ("jwt_audience", |c| c.jwt_audience = Some("moltbot".into())),
            ("jwt_user_claim", |c| c.jwt_user_claim = "email".into()),
            ("jwt_leeway", |c| c.jwt_leeway = Duration::from_secs(5)),
        ];
        for (name, set) in lone {
            let mut c = Config::default();
            set(&mut c);
            assert_eq!(invalid_key(&c), name);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("MOLTBOT_JWT_SECRET"), "{e}");
            c.jwt_secret = secret();
            c.validate().unwrap();
        }
        // The default claim, even named explicitly, needs no key.
        let c = Config::resolve(
            None,
            vec![("MOLTBOT_JWT_USER_CLAIM".to_string(), "sub".to_string())],
            Vec::new(),
        )
        .unwrap();
        assert!(c.explicit("jwt_user_claim"));

        // Their own values.
        for (name, c) in [
            (
                "jwt_issuer",
                Config {
                    jwt_issuer: Some(" ".into()),
                    ..with_secret.clone()
                },
            ),
            (
                "jwt_audience",
                Config {
                    jwt_audience: Some(String::new()),
                    ..with_secret.clone()
                },
            ),
            (
                "jwt_user_claim",
                Config {
                    jwt_user_claim: String::new(),
                    ..with_secret.clone()
                },
            ),
            (
                "jwt_leeway",
                Config {
                    jwt_leeway: MAX_JWT_LEEWAY + Duration::from_secs(1),
                    ..with_secret.clone()
                },
            ),
        ] {
            assert_eq!(invalid_key(&c), name);
        }
        Config {
            jwt_leeway: MAX_JWT_LEEWAY,
            ..with_secret.clone()
        }
        .validate()
        .unwrap();
        Config {
            jwt_leeway: Duration::ZERO,
            ..with_secret
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn jwt_keys_from_flags_and_the_secret_from_the_environment_only() {
        let c = Config::resolve(
            None,
            vec![(
                "MOLTBOT_JWT_SECRET".to_string(),
                "0123456789abcdef0123456789abcdef".to_string(),
            )],
            [
                ("jwt_issuer", "https://idp.example"),
                ("jwt_audience", "moltbot"),
                ("jwt_user_claim", "uid"),
                ("jwt_leeway", "10s"),
            ],
        )
        .unwrap();
        assert_eq!(c.jwt_issuer.as_deref(), Some("https://idp.example"));
        assert_eq!(c.jwt_audience.as_deref(), Some("moltbot"));
        assert_eq!(c.jwt_user_claim, "uid");
        assert_eq!(c.jwt_leeway, Duration::from_secs(10));
        assert_eq!(c.source("jwt_secret"), Source::Env);
        let c =
            Config::resolve(None, Vec::new(), [("jwt_public_key_file", "/etc/idp.pem")]).unwrap();
        assert_eq!(c.jwt_public_key_file, Some(PathBuf::from("/etc/idp.pem")));
        let e = Config::default()
            .apply_flags([("jwt_secret", "0123456789abcdef0123456789abcdef")])
            .unwrap_err();
        assert!(matches!(e, ConfigError::Flag { .. }), "{e}");
    }

    #[test]
    fn validate_token_and_non_loopback_bind() {
        // Whether a public gateway has a credential depends on the users file too: the
        // gateway checks it at start (`tenancy::a_public_gateway_starts_with_users…`), not the
        // configuration.
        let public = Config {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ..Config::default()
        };
        public.validate().unwrap();
        let ok = Config {
            token: Some("abc.DEF-123".into()),
            ..public.clone()
        };
        ok.validate().unwrap();
        for bad in ["", "has space", "new\nline", "ünï"] {
            let c = Config {
                token: Some(bad.into()),
                ..Config::default()
            };
            assert_eq!(invalid_key(&c), "token", "{bad:?}");
        }
        let v6 = Config {
            bind: "::1".parse().unwrap(),
            ..Config::default()
        };
        v6.validate().unwrap();
    }

    #[test]
    fn validate_http_limits() {
        let cases: Vec<(Config, &str)> = vec![
            (
                Config {
                    max_header_bytes: 512,
                    ..Config::default()
                },
                "max_header_bytes",
            ),
            (
                Config {
                    max_header_bytes: 2 << 20,
                    ..Config::default()
                },
                "max_header_bytes",
            ),
            (
                Config {
                    max_headers: 0,
                    ..Config::default()
                },
                "max_headers",
            ),
            (
                Config {
                    max_headers: 2000,
                    ..Config::default()
                },
                "max_headers",
            ),
            (
                Config {
                    max_uri_bytes: 8,
                    ..Config::default()
                },
                "max_uri_bytes",
            ),
            (
                Config {
                    max_uri_bytes: 32 * 1024,
                    ..Config::default()
                },
                "max_uri_bytes",
            ),
            (
                Config {
                    worker_nofile: 8,
                    ..Config::default()
                },
                "worker_nofile",
            ),
            (
                Config {
                    worker_nofile: 1 << 21,
                    ..Config::default()
                },
                "worker_nofile",
            ),
            (
                Config {
                    worker_address_space: Some(100 * MIB),
                    ..Config::default()
                },
                "worker_address_space",
            ),
        ];
        for (c, key) in cases {
            assert_eq!(invalid_key(&c), key);
        }
        let c = Config {
            worker_address_space: Some(0),
            ..Config::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn stall_timeout_defaults_to_three_heartbeats() {
        let c = Config {
            heartbeat_interval: Duration::from_millis(200),
            ..Config::default()
        };
        assert_eq!(c.stall_timeout(), Duration::from_millis(600));
        let c = Config {
            stall_timeout: Some(Duration::from_secs(2)),
            ..c
        };
        assert_eq!(c.stall_timeout(), Duration::from_secs(2));
    }

    #[test]
    fn worker_spin_defaults_to_zero_unless_every_lane_and_worker_has_a_cpu() {
        let c = Config {
            worker_count: 2,
            ..Config::default()
        };
        // 1 lane + 2 workers on 2 CPUs (this machine) or 3: they share.
        assert_eq!(c.worker_spin(1, 2), Duration::ZERO);
        assert_eq!(c.worker_spin(1, 3), Duration::ZERO);
        assert_eq!(c.worker_spin(1, 4), DEFAULT_SPIN);
        assert_eq!(c.worker_spin(8, 16), DEFAULT_SPIN);
        let c = Config {
            worker_spin: Some(Duration::ZERO),
            ..c
        };
        assert_eq!(c.worker_spin(1, 64), Duration::ZERO);
        let c = Config {
            worker_spin: Some(Duration::from_micros(200)),
            ..c
        };
        assert_eq!(c.worker_spin(1, 2), Duration::from_micros(200));
    }

    #[test]
    fn gateway_spin_defaults_to_zero_unless_every_core_and_worker_has_a_cpu_or_workers_are_beside()
    {
        let c = Config {
            worker_count: 3,
            ..Config::default()
        };
        // 1 core + 3 workers on 2 CPUs (this machine) or 4: they share.
        assert_eq!(c.gateway_spin(1, 2, false), Duration::ZERO);
        assert_eq!(c.gateway_spin(1, 4, false), Duration::ZERO);
        assert_eq!(c.gateway_spin(1, 5, false), DEFAULT_SPIN);
        assert_eq!(c.gateway_spin(2, 5, false), Duration::ZERO);
        // Sharing, but with the workers placed beside the cores.
        assert_eq!(c.gateway_spin(1, 2, true), DEFAULT_SPIN);
        assert_eq!(c.gateway_spin(1, 4, true), DEFAULT_SPIN);
        let c = Config {
            gateway_spin: Some(Duration::from_micros(30)),
            ..c
        };
        assert_eq!(c.gateway_spin(1, 2, false), Duration::from_micros(30));
        assert_eq!(c.gateway_spin(1, 2, true), Duration::from_micros(30));
        let c = Config {
            gateway_spin: Some(Duration::ZERO),
            ..c
        };
        assert_eq!(c.gateway_spin(1, 64, false), Duration::ZERO);
        assert_eq!(c.gateway_spin(1, 2, true), Duration::ZERO);
    }

    #[test]
    fn gateway_stream_spin_defaults_to_the_spin_wherever_a_cpu_is_left_beside_the_cores() {
        let c = Config {
            worker_count: 3,
            ..Config::default()
        };
        // 1 core on 2 CPUs (this machine): a worker answers on the other CPU.
        assert_eq!(c.gateway_stream_spin(1, 2), DEFAULT_SPIN);
        assert_eq!(c.gateway_stream_spin(2, 2), Duration::ZERO);
        assert_eq!(c.gateway_stream_spin(1, 1), Duration::ZERO);
        assert_eq!(c.gateway_stream_spin(2, 64), DEFAULT_SPIN);
        for set in [Duration::ZERO, Duration::from_micros(30)] {
            let c = Config {
                gateway_spin: Some(set),
                ..c.clone()
            };
            assert_eq!(c.gateway_stream_spin(1, 2), set);
            assert_eq!(c.gateway_stream_spin(1, 64), set);
        }
    }

    #[test]
    fn gateway_spin_is_at_most_ten_milliseconds() {
        let long = Config {
            gateway_spin: Some(Duration::from_millis(11)),
            ..Config::default()
        };
        let e = long.validate().unwrap_err().to_string();
        assert!(e.contains("gateway_spin") && e.contains("busy loop"), "{e}");
    }

    #[test]
    fn worker_spin_is_at_most_ten_milliseconds() {
        let ok = Config {
            worker_spin: Some(MAX_SPIN),
            ..Config::default()
        };
        ok.validate().unwrap();
        let long = Config {
            worker_spin: Some(Duration::from_millis(11)),
            ..Config::default()
        };
        let e = long.validate().unwrap_err().to_string();
        assert!(e.contains("worker_spin") && e.contains("busy loop"), "{e}");
    }

    #[test]
    fn users_path_defaults_to_users_json_in_the_sandbox_dir() {
        let c = Config {
            sandbox_dir: PathBuf::from("/srv/m"),
            ..Config::default()
        };
        assert_eq!(c.users_path(), Path::new("/srv/m/users.json"));
        let c = Config {
            users_file: Some(PathBuf::from("/etc/moltbot/users.json")),
            ..c
        };
        assert_eq!(c.users_path(), Path::new("/etc/moltbot/users.json"));
        let e = Config {
            users_file: Some(PathBuf::new()),
            ..Config::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration: users_file: must not be empty"
        );
    }

    #[test]
    fn backoff_grows_by_half_and_is_capped() {
        let c = Config {
            restart_delay: Duration::from_secs(1),
            max_restart_delay: Duration::from_secs(3),
            ..Config::default()
        };
        assert_eq!(c.backoff_delay(0), Duration::from_secs(1));
        assert_eq!(c.backoff_delay(1), Duration::from_secs(1));
        assert_eq!(c.backoff_delay(2), Duration::from_millis(1500));
        assert_eq!(c.backoff_delay(3), Duration::from_millis(2250));
        assert_eq!(c.backoff_delay(4), Duration::from_secs(3));
        assert_eq!(c.backoff_delay(u32::MAX), Duration::from_secs(3));
        let zero = Config {
            restart_delay: Duration::ZERO,
            ..Config::default()
        };
        assert_eq!(zero.backoff_delay(10), Duration::ZERO);
    }

    #[test]
    fn jittered_limits_stay_in_range() {
        let c = Config {
            max_requests: 1000,
            max_requests_jitter: 0.1,
            ..Config::default()
        };
        assert_eq!(c.jittered_max_requests(0.0), 1000);
        assert_eq!(c.jittered_max_requests(1.0), 900);
        assert_eq!(c.jittered_max_requests(0.5), 950);
        assert_eq!(c.jittered_max_requests(f64::NAN), 1000);
        assert_eq!(c.jittered_max_requests(7.0), 900);
        for i in 0..=100 {
            let v = c.jittered_max_requests(f64::from(i) / 100.0);
            assert!((900..=1000).contains(&v), "{v}");
        }
        let one = Config {
            max_requests: 1,
            max_requests_jitter: 0.9,
            ..Config::default()
        };
        assert_eq!(one.jittered_max_requests(1.0), 1);
    }

    #[test]
    fn address_space_limit_is_derived_unless_set() {
        let c = Config::default();
        assert_eq!(
            c.worker_address_space_limit(3),
            Some(4 * 512 * MIB + GIB + 2 * 2 * MIB * 3)
        );
        let c = Config {
            worker_address_space: Some(0),
            ..Config::default()
        };
        assert_eq!(c.worker_address_space_limit(3), None);
        let c = Config {
            worker_address_space: Some(5 * GIB),
            ..Config::default()
        };
        assert_eq!(c.worker_address_space_limit(3), Some(5 * GIB));
    }

    #[test]
    fn worker_program_defaults_to_current_exe() {
        let c = Config::default();
        assert_eq!(
            c.resolved_worker_program().unwrap(),
            std::env::current_exe().unwrap()
        );
        let c = Config {
            worker_program: Some("/bin/w".into()),
            ..c
        };
        assert_eq!(
            c.resolved_worker_program().unwrap(),
            PathBuf::from("/bin/w")
        );
    }

    #[test]
    fn serializes_humanly_without_the_token() {
        let c = Config {
            token: Some("hunter2".into()),
            cores: Some(Cores::List(vec![0, 1])),
            ..Config::default()
        };
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["request_timeout"], "2m");
        assert_eq!(json["heartbeat_interval"], "5s");
        assert_eq!(json["max_memory"], "512MiB");
        assert_eq!(json["ring_capacity"], "2MiB");
        assert_eq!(json["cores"], serde_json::json!([0, 1]));
        assert_eq!(json["bind"], "127.0.0.1");
        assert!(json.get("token").is_none());
        let text = serde_json::to_string(&c).unwrap();
        assert!(!text.contains("hunter2"));
        let toml_text = c.to_toml_string().unwrap();
        assert!(!toml_text.contains("hunter2"));
    }

    #[test]
    fn the_jwt_secret_is_never_serialized_nor_shown() {
        let secret = "correct-horse-battery-staple-0123456789";
        let c = Config {
            jwt_secret: Some(secret.into()),
            jwt_issuer: Some("https://idp.example".into()),
            ..Config::default()
        };
        let json = serde_json::to_value(&c).unwrap();
        assert!(json.get("jwt_secret").is_none());
        assert_eq!(json["jwt_issuer"], "https://idp.example");
        assert_eq!(json["jwt_user_claim"], "sub");
        assert_eq!(json["jwt_leeway"], "30s");
        assert!(!serde_json::to_string(&c).unwrap().contains(secret));
        assert!(!c.to_toml_string().unwrap().contains(secret));
        let k = key("jwt_secret").unwrap();
        assert!(k.secret);
        assert_eq!(k.flag, None);
        assert_eq!(k.value(&c), None);
        // Nor in a validation error about it.
        let short = Config {
            jwt_secret: Some("hunter2".into()),
            ..Config::default()
        };
        let e = short.validate().unwrap_err().to_string();
        assert!(e.contains("jwt_secret") && e.contains("7 bytes"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn serialized_toml_round_trips() {
        let c = Config {
            worker_count: 3,
            stall_timeout: Some(Duration::from_millis(1500)),
            cores: Some(Cores::Count(2)),
            worker_program: Some("/bin/w".into()),
            worker_address_space: Some(3 * GIB),
            max_body_bytes: 1000,
            balance_factor: 1.25,
            ..Config::default()
        };
        let text = c.to_toml_string().unwrap();
        assert_eq!(Config::from_toml_str(&text).unwrap(), c, "{text}");
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), c);
    }
}

mod declaration {
    use std::collections::HashSet;

    use super::layers::env_samples;
    use super::*;

    #[test]
    fn names_aliases_flags_and_variables_are_unique() {
        let mut names = HashSet::new();
        let mut longs = HashSet::new();
        let mut shorts = HashSet::new();
        let mut vars = HashSet::new();
        for k in KEYS {
            for name in std::iter::once(&k.name).chain(k.aliases) {
                assert!(names.insert(*name), "TOML name {name} used twice");
            }
            for var in k.env_vars() {
                assert!(vars.insert(var.clone()), "{var} used twice");
            }
            if let Some(f) = k.flag {
                assert!(longs.insert(f.long), "--{} used twice", f.long);
                assert!(
                    f.short.is_none_or(|c| shorts.insert(c)),
                    "{f} short used twice"
                );
                assert_ne!(f.long, "config", "--config is the file");
                assert!(!k.secret, "{} is secret but has a flag", k.name);
            }
            assert!(!k.meaning().is_empty(), "{} has no meaning", k.name);
            assert!(k.meaning().ends_with('.'), "{}: {}", k.name, k.meaning());
            assert!(!k.meaning().contains('|'), "{} breaks the table", k.name);
        }
        assert_eq!(key("token").unwrap().flag, None);
        assert!(!vars.contains(CONFIG_ENV));
    }

    #[test]
    fn the_declared_defaults_are_the_default_config() {
        let c = Config::default();
        for k in KEYS {
            assert!(k.is_default(&c), "{}", k.name);
            assert!(!c.explicit(k.name), "{}", k.name);
        }
        assert_eq!(key("request_timeout").unwrap().default_text(), "2m");
        assert_eq!(
            key("max_memory").unwrap().default_text(),
            "512MiB; 2GiB with a cell"
        );
        assert_eq!(key("balance_factor").unwrap().default_text(), "1.0");
        assert_eq!(
            key("stall_timeout").unwrap().default_text(),
            "3 × heartbeat_interval"
        );
        assert_eq!(key("worker_read_paths").unwrap().default_text(), "none");
    }

    /// A flag, a variable and a TOML string of the same text give the same value: they all go
    /// through the key's one parser.
    #[test]
    fn every_form_goes_through_one_parser() {
        for (name, value, check) in env_samples() {
            let k = key(name).unwrap();
            let mut by_env = Config::default();
            by_env
                .apply_env([(k.env_var(), value.to_string())])
                .unwrap();
            let doc = format!("{name} = {}", toml::Value::String(value.into()));
            let by_toml = Config::from_toml_str(&doc).unwrap_or_else(|e| panic!("{doc}: {e}"));
            assert_eq!(by_toml, by_env, "{doc}");
            assert!(check(&by_toml), "{doc}");
            if k.flag.is_some() {
                let mut by_flag = Config::default();
                by_flag.apply_flags([(name, value)]).unwrap();
                assert_eq!(by_flag, by_env, "--{name}");
            }
        }
        // And the same text is refused alike, with the same message.
        let k = key("request_timeout").unwrap();
        let env_err = Config::default()
            .apply_env([(k.env_var(), "soon".to_string())])
            .unwrap_err()
            .to_string();
        let toml_err = Config::from_toml_str("request_timeout = \"soon\"")
            .unwrap_err()
            .to_string();
        let flag_err = Config::default()
            .apply_flags([("request_timeout", "soon")])
            .unwrap_err()
            .to_string();
        let message = k.parse("soon").unwrap_err();
        for e in [env_err, toml_err, flag_err] {
            assert!(e.contains(&message), "{e}");
        }
    }

    #[test]
    fn sources_record_the_layer_and_do_not_change_equality() {
        let mut c = Config::from_toml_str("max_queue = 100\nworkerCount = 2").unwrap();
        assert_eq!(c.source("max_queue"), Source::File);
        assert_eq!(c.source("worker_count"), Source::File);
        assert!(c.explicit("max_queue"), "set to the default value, but set");
        c.apply_env([("MOLTBOT_MAX_QUEUE".to_string(), "7".to_string())])
            .unwrap();
        assert_eq!(c.source("max_queue"), Source::Env);
        c.apply_flags([("max_queue", "8")]).unwrap();
        assert_eq!(c.source("max_queue"), Source::Flag);
        assert!(!c.explicit("max_connections"));
        let plain = Config {
            max_queue: 8,
            worker_count: 2,
            ..Config::default()
        };
        assert_eq!(c, plain, "where a value came from is not part of it");
        // A library user's struct literal is explicit where it differs from the default.
        let lib = Config {
            max_connections: 50_000,
            ..Config::default()
        };
        assert!(lib.explicit("max_connections"));
        assert!(!lib.explicit("max_queue"));
        let json = serde_json::to_value(&c).unwrap();
        assert!(json.get("sources").is_none());
    }

    #[test]
    #[should_panic(expected = "not a configuration key")]
    fn explicit_refuses_a_misspelt_key() {
        Config::default().explicit("max_conections");
    }

    #[test]
    fn toml_errors_name_the_line_and_a_key_set_twice() {
        let e =
            Config::from_toml_str("worker_count = 2\n\nrequest_timeout = \"soon\"\n").unwrap_err();
        assert!(e.to_string().contains("line 3: request_timeout"), "{e}");
        let e = Config::from_toml_str("worker_count = 2\nworkerCount = 3\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(
            e.to_string()
                .contains("`workerCount` sets worker_count again"),
            "{e}"
        );
        let e = Config::from_toml_str("[gateway]\nport = 1\n").unwrap_err();
        assert!(e.to_string().contains("unknown key `gateway`"), "{e}");
    }

    /// The README's `## Configuration` table is the declaration's: every key with its default,
    /// flag and meaning, and nothing else. On a mismatch, the expected
    /// table is printed; `cargo run -- workers info --format markdown` prints it too.
    #[test]
    fn readme_configuration_table_matches_the_declaration() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split_once("\n## Configuration\n")
            .map(|(_, rest)| rest.split("\n## ").next().unwrap_or(rest))
            .expect("README.md has a ## Configuration section");
        let rows: Vec<&str> = section.lines().filter(|l| l.starts_with('|')).collect();
        let expected_table = markdown_table();
        let expected: Vec<&str> = expected_table.lines().collect();
        let mut problems = Vec::new();
        for want in &expected {
            if !rows.contains(want) {
                let name = want.split('|').nth(1).unwrap_or("").trim();
                match rows
                    .iter()
                    .find(|r| r.split('|').nth(1).map(str::trim) == Some(name))
                {
                    Some(have) => {
                        problems.push(format!("differs:\n  README: {have}\n  want:   {want}"))
                    }
                    None => problems.push(format!("missing: {want}")),
                }
            }
        }
        for have in &rows {
            let name = have.split('|').nth(1).unwrap_or("").trim();
            if !expected
                .iter()
                .any(|w| w.split('|').nth(1).map(str::trim) == Some(name))
            {
                problems.push(format!("extra row: {have}"));
            }
        }
        if problems.is_empty() && rows != expected {
            problems.push("rows out of order".into());
        }
        assert!(
            problems.is_empty(),
            "README.md's configuration table does not match the declaration in src/config/mod.rs:\n\
             {}\n\nReplace the table with this (`cargo run -- workers info --format markdown`):\n\n{expected_table}",
            problems.join("\n")
        );
    }
}

mod cell_mode {
    use super::*;

    #[test]
    fn cell_mode_needs_openclaw_and_forbids_an_agent_program() {
        let no_package = Config::from_toml_str("cell = \"openclaw\"").unwrap();
        let e = no_package.validate().unwrap_err().to_string();
        assert!(e.contains("cell_openclaw"), "{e}");

        let both = Config::from_toml_str(
            "cell = \"openclaw\"\ncell_openclaw = \"/o/openclaw.mjs\"\nworker_command = \"python3 a.py\"",
        )
        .unwrap();
        let e = both.validate().unwrap_err().to_string();
        assert!(e.contains("worker_command"), "{e}");

        for other in ["balance_factor = 2.0", "max_users = 5"] {
            let c = Config::from_toml_str(&format!(
                "cell = \"openclaw\"\ncell_openclaw = \"/o/openclaw.mjs\"\n{other}"
            ))
            .unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("one user per cell"), "{other}: {e}");
        }

        let ok = Config::from_toml_str("cell = \"openclaw\"\ncell_openclaw = \"/o/openclaw.mjs\"")
            .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.cell, CellMode::OpenClaw);
    }

    #[test]
    fn a_cell_raises_the_default_memory_limit_but_not_a_chosen_one() {
        let plain = Config::default();
        assert_eq!(plain.worker_memory_limit(), 512 * MIB);
        let cell =
            Config::from_toml_str("cell = \"openclaw\"\ncell_openclaw = \"/o/openclaw.mjs\"")
                .unwrap();
        assert_eq!(cell.worker_memory_limit(), crate::config::CELL_MAX_MEMORY);
        let chosen = Config::from_toml_str(
            "cell = \"openclaw\"\ncell_openclaw = \"/o/openclaw.mjs\"\nmax_memory = \"3GiB\"",
        )
        .unwrap();
        assert_eq!(chosen.worker_memory_limit(), 3 * 1024 * MIB);
        // Chosen even when equal to the plain default: the operator said so.
        let same = Config::from_toml_str(
            "cell = \"openclaw\"\ncell_openclaw = \"/o/openclaw.mjs\"\nmax_memory = \"512MiB\"",
        )
        .unwrap();
        assert_eq!(same.worker_memory_limit(), 512 * MIB);
    }

    #[test]
    fn cell_ports_must_fit_below_65536_and_names_be_variable_names() {
        let c = Config::from_toml_str(
            "cell = \"openclaw\"\ncell_openclaw = \"/o/openclaw.mjs\"\nworker_count = 4\ncell_port_base = 65300",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cell_port_base"), "{e}");
        assert!(Config::from_toml_str("cell = \"lobster\"").is_err());
        let bad_name = Config::from_toml_str("cell_env = \"A-B\"").and_then(|c| c.validate());
        assert!(bad_name.is_err());
        let names = Config::from_toml_str("cell_env = [\"OPENAI_API_KEY\", \"X_1\"]").unwrap();
        names.validate().unwrap();
    }
}
