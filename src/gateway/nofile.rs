//! The open-files limit at start: how many connections per core the descriptors allow.
//!
//! The soft `RLIMIT_NOFILE` is raised as far as needed, up to the hard limit. When the hard
//! limit cannot cover `max_connections` on every core plus what the gateway itself holds,
//! a default `max_connections` is lowered to what fits (and logged at info), while one that
//! was set explicitly is kept and reported as a warning: only that person can act on it.

use crate::config::Config;

/// Descriptors the pool opens once: the sandbox base lock, the routing table, and the
/// monitor's wake socket pair.
const POOL_FIXED: u64 = 4;

/// Descriptors per gateway core: glommio's three io_uring rings and its eventfd, the
/// listener, and the core's lane wake socket pair.
const PER_CORE: u64 = 7;

/// Descriptors per worker besides one per lane: its pidfd (its segment's descriptor is closed
/// once the segment is mapped).
const PER_WORKER: u64 = 1;

/// Descriptors of the one respawn the monitor does at a time, besides one per lane (the
/// sending ends of the new wake sockets): the log file and its duplicate for stderr, the
/// socket pair over which the child receives its wake sockets, the pipe through which the
/// child reports a failed exec, and the sandbox record being written.
const SPAWN: u64 = 7;

/// Room per core for connections being refused (each lives up to the 1 s write timeout of
/// its 503) and files the endpoints open briefly. Without it a core at its connection limit
/// meets EMFILE, and a client over the limit waits in the backlog instead of getting a 503.
const SLACK_PER_CORE: u64 = 64;

/// Assumed descriptors open at start when `/proc/self/fd` cannot be read.
const UNKNOWN_OPEN: u64 = 64;

/// Descriptors the gateway needs besides its connections, with `open` already open (stdio,
/// signal sockets, whatever was inherited), `cores` gateway cores and `workers` workers.
///
/// Each worker has one wake socket per lane (one lane per core) in the gateway, twice during
/// a respawn until the lanes switch to the new worker's sockets.
pub(crate) fn reserved(open: u64, cores: u64, workers: u64) -> u64 {
    let lanes = cores;
    open + POOL_FIXED
        + cores * (PER_CORE + SLACK_PER_CORE)
        + workers * (PER_WORKER + 2 * lanes)
        + SPAWN
        + lanes
}

/// What [`fit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fit {
    /// The soft limit to have (never below the current one).
    pub soft: u64,
    /// Connections per core to allow.
    pub max_connections: usize,
    /// Why.
    pub outcome: Outcome,
}

/// Whether the descriptors cover the connection limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// They do.
    Enough,
    /// `max_connections` was the default and is lowered to what fits.
    Lowered {
        /// The default it was.
        from: usize,
    },
    /// They do not: `max_connections` was set explicitly (and is kept), or not even one
    /// connection per core fits.
    Short {
        /// Descriptors the setting needs.
        need: u64,
        /// Connections per core that would fit (0 when not even one does).
        fits: usize,
    },
}

/// The fitting rule, a pure function of the current `soft` and `hard` limits
/// (`u64::MAX` = unlimited), the descriptors `reserved` for the gateway itself, the number of
/// `cores`, the configured `max_connections` and whether it was set `explicit`ly.
pub(crate) fn fit(
    soft: u64,
    hard: u64,
    reserved: u64,
    cores: usize,
    max_connections: usize,
    explicit: bool,
) -> Fit {
    let cores = cores.max(1) as u64;
    let want = (max_connections as u64)
        .saturating_mul(cores)
        .saturating_add(reserved);
    let soft = soft.max(want.min(hard));
    if soft >= want {
        return Fit {
            soft,
            max_connections,
            outcome: Outcome::Enough,
        };
    }
    let room = usize::try_from(soft.saturating_sub(reserved) / cores).unwrap_or(usize::MAX);
    if explicit || room == 0 {
        return Fit {
            soft,
            max_connections: if explicit { max_connections } else { 1 },
            outcome: Outcome::Short {
                need: want,
                fits: room,
            },
        };
    }
    Fit {
        soft,
        max_connections: room,
        outcome: Outcome::Lowered {
            from: max_connections,
        },
    }
}

/// The log line for a fit: `(true, ..)` for a warning, `(false, ..)` for info; `None` when
/// there is nothing to say.
pub(crate) fn report(
    fit: &Fit,
    old_soft: u64,
    hard: u64,
    reserved: u64,
    cores: usize,
) -> Option<(bool, String)> {
    let hard = if hard == u64::MAX {
        "unlimited".to_string()
    } else {
        hard.to_string()
    };
    let raised = if fit.soft > old_soft {
        format!("raised RLIMIT_NOFILE from {old_soft} to {}; ", fit.soft)
    } else {
        String::new()
    };
    match fit.outcome {
        Outcome::Enough if fit.soft > old_soft => Some((
            false,
            format!(
                "{raised}{} connections on each of {cores} cores and {reserved} descriptors for the gateway fit",
                fit.max_connections
            ),
        )),
        Outcome::Enough => None,
        Outcome::Lowered { from } => Some((
            false,
            format!(
                "{raised}max_connections is {} per core (default {from}): what {cores} cores fit in RLIMIT_NOFILE {} after {reserved} descriptors for the gateway; for more, raise the hard limit (ulimit -Hn) or set max_connections",
                fit.max_connections, fit.soft
            ),
        )),
        Outcome::Short { need, fits } => Some((
            true,
            format!(
                "{raised}max_connections = {} on {cores} cores needs {need} open files ({reserved} of them for the gateway), but the hard RLIMIT_NOFILE is {hard}: at the limit, accepting fails (EMFILE) and clients wait; raise it (ulimit -Hn {need}) or lower max_connections to {fits}",
                fit.max_connections
            ),
        )),
    }
}

/// Descriptors open in this process now.
fn open_now() -> u64 {
    match std::fs::read_dir("/proc/self/fd") {
        // The directory being read is one of them.
        Ok(dir) => (dir.count() as u64).saturating_sub(1),
        Err(_) => UNKNOWN_OPEN,
    }
}

/// Raises the soft open-files limit for `config` on `cores` cores and returns the connection
/// limit per core to use (see the module documentation).
pub(crate) fn ensure_nofile(config: &Config, cores: usize) -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let cur = getrlimit(Resource::Nofile);
    let soft = cur.current.unwrap_or(u64::MAX);
    let hard = cur.maximum.unwrap_or(u64::MAX);
    let reserved = reserved(open_now(), cores as u64, config.worker_count as u64);
    let explicit = config.explicit("max_connections");
    let mut chosen = fit(
        soft,
        hard,
        reserved,
        cores,
        config.max_connections,
        explicit,
    );
    if chosen.soft > soft
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(chosen.soft),
                maximum: cur.maximum,
            },
        )
        .is_err()
    {
        // Not even the soft limit could move: fit into what there is.
        chosen = fit(
            soft,
            soft,
            reserved,
            cores,
            config.max_connections,
            explicit,
        );
    }
    match report(&chosen, soft, hard, reserved, cores) {
        Some((true, msg)) => tracing::warn!("{msg}"),
        Some((false, msg)) => tracing::info!("{msg}"),
        None => tracing::debug!(
            soft,
            reserved,
            max_connections = chosen.max_connections,
            "RLIMIT_NOFILE covers the connection limit"
        ),
    }
    chosen.max_connections
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: u64 = 200;

    #[test]
    fn the_soft_limit_is_raised_to_what_is_needed() {
        let f = fit(1024, 1 << 20, R, 2, 10_000, false);
        assert_eq!(
            f,
            Fit {
                soft: 20_000 + R,
                max_connections: 10_000,
                outcome: Outcome::Enough
            }
        );
        assert!(
            report(&f, 1024, 1 << 20, R, 2)
                .unwrap()
                .1
                .contains("raised")
        );
        // Unlimited hard limit.
        assert_eq!(fit(1024, u64::MAX, R, 2, 10_000, true).soft, 20_000 + R);
        // Never lowered, and nothing to say when it suffices.
        let f = fit(50_000, 50_000, R, 2, 10_000, false);
        assert_eq!((f.soft, f.outcome), (50_000, Outcome::Enough));
        assert_eq!(report(&f, 50_000, 50_000, R, 2), None);
    }

    #[test]
    fn a_default_limit_is_fitted_to_the_hard_limit() {
        // The stock machine: soft = hard = 20000, 2 cores.
        let f = fit(20_000, 20_000, R, 2, 10_000, false);
        assert_eq!(
            f,
            Fit {
                soft: 20_000,
                max_connections: (20_000 - R as usize) / 2,
                outcome: Outcome::Lowered { from: 10_000 }
            }
        );
        let (warn, msg) = report(&f, 20_000, 20_000, R, 2).unwrap();
        assert!(!warn, "the default adapting is not a warning: {msg}");
        assert!(msg.contains("max_connections is 9900 per core"), "{msg}");
        // The soft limit is raised as far as the hard one allows first.
        let f = fit(1024, 8_000, R, 4, 10_000, false);
        assert_eq!(f.soft, 8_000);
        assert_eq!(f.max_connections, (8_000 - R as usize) / 4);
        assert!(f.max_connections as u64 * 4 + R <= 8_000);
    }

    #[test]
    fn an_explicit_unreachable_setting_is_kept_and_reported() {
        let f = fit(1024, 20_000, R, 2, 10_000, true);
        assert_eq!(
            f,
            Fit {
                soft: 20_000,
                max_connections: 10_000,
                outcome: Outcome::Short {
                    need: 20_000 + R,
                    fits: 9_900
                }
            }
        );
        let (warn, msg) = report(&f, 1024, 20_000, R, 2).unwrap();
        assert!(warn, "{msg}");
        assert!(msg.contains("max_connections = 10000"), "{msg}");
        assert!(msg.contains(&format!("ulimit -Hn {}", 20_000 + R)), "{msg}");
        assert!(msg.contains("hard RLIMIT_NOFILE is 20000"), "{msg}");
        assert!(msg.contains("lower max_connections to 9900"), "{msg}");
        assert!(
            msg.contains("raised RLIMIT_NOFILE from 1024 to 20000"),
            "{msg}"
        );
        // An explicit setting that fits is simply met.
        let f = fit(1024, 20_000, R, 2, 5_000, true);
        assert_eq!((f.max_connections, f.outcome), (5_000, Outcome::Enough));
    }

    #[test]
    fn no_room_at_all_is_a_warning_even_for_the_default() {
        let f = fit(100, 100, R, 2, 10_000, false);
        assert_eq!(f.max_connections, 1);
        assert!(matches!(f.outcome, Outcome::Short { .. }));
        assert!(report(&f, 100, 100, R, 2).unwrap().0);
    }

    /// The steady part of [`reserved`] (without the respawn and the slack) is what a gateway
    /// was measured to hold in `/proc/<pid>/fd` with 7 descriptors open at start, for
    /// (cores, workers) = (1, 1), (1, 2), (2, 1), (2, 3), (2, 5).
    #[test]
    fn the_reservation_matches_a_running_gateway() {
        let steady = |cores: u64, workers: u64| {
            let lanes = cores;
            reserved(7, cores, workers) - SPAWN - lanes - cores * SLACK_PER_CORE - workers * lanes
        };
        for ((cores, workers), measured) in [
            ((1, 1), 20),
            ((1, 2), 22),
            ((2, 1), 28),
            ((2, 3), 34),
            ((2, 5), 40),
        ] {
            assert_eq!(
                steady(cores, workers),
                measured,
                "{cores} cores, {workers} workers"
            );
        }
        assert!(reserved(3, 2, 4) > reserved(3, 1, 4));
        assert!(reserved(3, 2, 5) > reserved(3, 2, 4));
    }

    #[test]
    fn the_gateway_fits_a_default_config() {
        let config = Config::default();
        let n = ensure_nofile(&config, 1);
        assert!(n >= 1);
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
        if hard.is_none_or(|h| h >= 10_000 + reserved(open_now(), 1, 4)) {
            assert_eq!(n, 10_000);
        }
    }
}
