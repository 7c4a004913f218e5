//! The restart policy of a slot: growing delays between crash restarts, and `failed` after too
//! many crashes in the restart window.
//!
//! The state lives with the slot, not with the process, so a respawn does not forget earlier
//! crashes (the TypeScript version reset it on every respawn, so its limit never triggered).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::Config;

/// Why a worker process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitKind {
    /// It crashed or exited on its own.
    Crashed,
    /// The monitor killed it for not heartbeating.
    Stalled,
    /// The monitor killed it for breaking the ring protocol.
    Violation,
    /// A requested recycle (max requests / max memory) or stop.
    Requested,
}

/// What to do after a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start a successor after this delay.
    RestartAfter(Duration),
    /// Too many crashes: mark the slot failed until this instant, then try again.
    FailUntil(Instant),
}

/// The parameters, from the configuration.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    /// Config the delays come from.
    config: std::sync::Arc<Config>,
}

/// Per-slot restart bookkeeping.
#[derive(Debug, Default, Clone)]
pub struct RestartState {
    crashes: VecDeque<Instant>,
    consecutive: u32,
}

impl RestartPolicy {
    /// A policy with the configured delays and limits.
    pub fn new(config: std::sync::Arc<Config>) -> Self {
        RestartPolicy { config }
    }

    /// Decides after a process that ran for `ran_for` ended with `kind` at `now`.
    pub fn on_exit(
        &self,
        state: &mut RestartState,
        kind: &ExitKind,
        ran_for: Duration,
        now: Instant,
    ) -> Decision {
        let c = &self.config;
        if ran_for >= c.stable_after {
            state.consecutive = 0;
        }
        if *kind == ExitKind::Requested {
            return Decision::RestartAfter(Duration::ZERO);
        }
        state.consecutive = state.consecutive.saturating_add(1);
        state.crashes.push_back(now);
        while let Some(&t) = state.crashes.front() {
            if now.duration_since(t) > c.restart_window {
                state.crashes.pop_front();
            } else {
                break;
            }
        }
        if state.crashes.len() > c.max_restart_attempts as usize {
            return Decision::FailUntil(now + c.failed_cooldown);
        }
        Decision::RestartAfter(c.backoff_delay(state.consecutive))
    }

    /// The cool-down of a failed slot is over: it gets a fresh window.
    pub fn on_retry(&self, state: &mut RestartState) {
        state.crashes.clear();
        state.consecutive = 0;
    }
}

impl RestartState {
    /// Crashes counted in the current window.
    pub fn recent_crashes(&self) -> usize {
        self.crashes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn policy() -> RestartPolicy {
        let c = Config {
            restart_delay: Duration::from_millis(100),
            max_restart_delay: Duration::from_millis(300),
            stable_after: Duration::from_secs(10),
            max_restart_attempts: 3,
            restart_window: Duration::from_secs(60),
            failed_cooldown: Duration::from_secs(30),
            ..Config::default()
        };
        RestartPolicy::new(Arc::new(c))
    }

    #[test]
    fn delay_grows_by_half_and_is_capped() {
        let p = policy();
        let mut s = RestartState::default();
        let t = Instant::now();
        let short = Duration::from_millis(10);
        let d: Vec<Decision> = (0..3)
            .map(|i| {
                p.on_exit(
                    &mut s,
                    &ExitKind::Crashed,
                    short,
                    t + Duration::from_millis(i),
                )
            })
            .collect();
        assert_eq!(
            d,
            vec![
                Decision::RestartAfter(Duration::from_millis(100)),
                Decision::RestartAfter(Duration::from_millis(150)),
                Decision::RestartAfter(Duration::from_millis(225)),
            ]
        );
    }

    #[test]
    fn more_than_max_attempts_in_window_fails_and_history_survives_respawns() {
        let p = policy();
        let mut s = RestartState::default();
        let t = Instant::now();
        let short = Duration::from_millis(10);
        for i in 0..3 {
            assert!(matches!(
                p.on_exit(
                    &mut s,
                    &ExitKind::Stalled,
                    short,
                    t + Duration::from_secs(i)
                ),
                Decision::RestartAfter(_)
            ));
        }
        let d = p.on_exit(
            &mut s,
            &ExitKind::Crashed,
            short,
            t + Duration::from_secs(3),
        );
        assert_eq!(d, Decision::FailUntil(t + Duration::from_secs(33)));
        p.on_retry(&mut s);
        assert_eq!(s.recent_crashes(), 0);
        assert_eq!(
            p.on_exit(
                &mut s,
                &ExitKind::Crashed,
                short,
                t + Duration::from_secs(40)
            ),
            Decision::RestartAfter(Duration::from_millis(100))
        );
    }

    #[test]
    fn crashes_outside_the_window_do_not_count() {
        let p = policy();
        let mut s = RestartState::default();
        let t = Instant::now();
        let short = Duration::from_millis(10);
        for i in 0..10u64 {
            let d = p.on_exit(
                &mut s,
                &ExitKind::Crashed,
                short,
                t + Duration::from_secs(61 * i),
            );
            assert!(matches!(d, Decision::RestartAfter(_)), "crash {i}: {d:?}");
        }
    }

    #[test]
    fn stable_run_resets_the_delay_and_recycles_are_free() {
        let p = policy();
        let mut s = RestartState::default();
        let t = Instant::now();
        let short = Duration::from_millis(10);
        p.on_exit(&mut s, &ExitKind::Crashed, short, t);
        p.on_exit(&mut s, &ExitKind::Crashed, short, t);
        assert_eq!(
            p.on_exit(&mut s, &ExitKind::Crashed, Duration::from_secs(11), t),
            Decision::RestartAfter(Duration::from_millis(100))
        );
        assert_eq!(
            p.on_exit(&mut s, &ExitKind::Requested, short, t),
            Decision::RestartAfter(Duration::ZERO)
        );
        assert_eq!(s.recent_crashes(), 3);
    }
}
