//! How long a gateway core spins on its io_uring before it sleeps, changed while WebSocket
//! requests are in flight on it.
//!
//! A sleeping core is woken by the worker's write to its wake socket, a context switch that
//! costs tens of microseconds on a VM; a spinning core takes the answer at once. A run's events
//! arrive one by one until its final answer, and each event's delay is what the client sees,
//! so while WebSocket requests are in flight the core spins wherever it does not take the only
//! CPU ([`crate::config::Config::gateway_stream_spin`]). Otherwise it keeps its idle spin,
//! which is zero where the cores and workers do not each have a CPU and the workers may run
//! anywhere: under HTTP load a spinning core holds the CPU the workers need to answer. (With
//! the workers beside the cores, a worker the core wakes takes the CPU from the spinning core,
//! and the core spins at all times: [`crate::config::Config::gateway_spin`].)
//!
//! Whether the spin starts at the request or at the run's `accepted` answer was measured
//! (`tools/event-latency`): from `accepted` the core is often still waking for it when the
//! first event is emitted, and adds 49–65 µs at p99 instead of 34–43.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::CoreMetrics;

/// One core's spin before it parks. Lives on the core's executor thread, which it changes.
#[derive(Debug)]
pub struct Spin {
    /// The spin while no WebSocket request is in flight.
    idle: Duration,
    /// The spin while at least one is.
    streaming: Duration,
    /// WebSocket requests in flight on this core.
    streams: Cell<usize>,
    /// The core's metrics, which show whether it spins.
    metrics: Arc<CoreMetrics>,
}

impl Spin {
    /// A core that spins `idle` before it parks, `streaming` while WebSocket requests are in
    /// flight. The executor starts with `idle`.
    pub fn new(idle: Duration, streaming: Duration, metrics: Arc<CoreMetrics>) -> Spin {
        metrics.set_spinning(!idle.is_zero());
        Spin {
            idle,
            streaming,
            streams: Cell::new(0),
            metrics,
        }
    }

    fn set(&self, d: Duration) {
        glommio::executor().set_spin_before_park((!d.is_zero()).then_some(d));
        self.metrics.set_spinning(!d.is_zero());
    }

    /// Counts a WebSocket request as in flight on this core until the guard is dropped; the
    /// first one switches the executor to the streaming spin, and the end of the last one back.
    pub fn stream(&self) -> Streaming<'_> {
        let n = self.streams.get();
        self.streams.set(n + 1);
        if n == 0 && self.streaming != self.idle {
            self.set(self.streaming);
        }
        Streaming(self)
    }
}

/// A WebSocket request in flight (see [`Spin::stream`]).
#[must_use = "the request counts as in flight while the guard lives"]
pub struct Streaming<'a>(&'a Spin);

impl Drop for Streaming<'_> {
    fn drop(&mut self) {
        let spin = self.0;
        let n = spin.streams.get().saturating_sub(1);
        spin.streams.set(n);
        if n == 0 && spin.streaming != spin.idle {
            spin.set(spin.idle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::timer::sleep;
    use glommio::{LocalExecutorBuilder, Placement};

    /// An executor bound to a CPU, as the gateway's cores are (glommio spins only on those).
    fn bound_executor() -> LocalExecutorBuilder {
        let cpu = core_affinity::get_core_ids()
            .and_then(|ids| ids.first().map(|c| c.id))
            .unwrap_or(0);
        LocalExecutorBuilder::new(Placement::Fixed(cpu))
    }

    /// Voluntary context switches of the calling thread: one each time it blocks (parks).
    fn voluntary_switches() -> i64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }

    /// Parks while waiting on `n` short timers, counting the thread's voluntary switches.
    async fn parks_over_timers(n: u32) -> i64 {
        let before = voluntary_switches();
        for _ in 0..n {
            sleep(Duration::from_millis(1)).await;
        }
        voluntary_switches() - before
    }

    #[test]
    fn a_stream_makes_the_core_spin_through_short_waits_and_its_end_lets_it_sleep() {
        const WAITS: u32 = 50;
        let parks = bound_executor()
            .spawn(|| async {
                // A spin far longer than each wait: while streaming the core never parks.
                let spin = Spin::new(Duration::ZERO, Duration::from_secs(1), Arc::default());
                let idle_before = parks_over_timers(WAITS).await;
                let streaming = {
                    let _first = spin.stream();
                    drop(spin.stream());
                    // Still one stream in flight: still spinning.
                    parks_over_timers(WAITS).await
                };
                let idle_after = parks_over_timers(WAITS).await;
                (idle_before, streaming, idle_after)
            })
            .unwrap()
            .join()
            .unwrap();
        let (idle_before, streaming, idle_after) = parks;
        // An idle wait parks the thread (unless it was preempted for the whole wait before it
        // could park, as happens on a loaded machine); a spinning thread never blocks.
        let waits = i64::from(WAITS);
        assert!(idle_before >= waits / 2, "{parks:?}");
        assert!(idle_after >= waits / 2, "{parks:?}");
        assert!(streaming <= waits / 10, "{parks:?}");
    }

    #[test]
    fn a_stream_outside_a_running_executor_changes_nothing_and_does_not_panic() {
        // As for a run's task dropped with its executor at a stop.
        let metrics = Arc::new(CoreMetrics::default());
        let spin = Spin::new(Duration::ZERO, Duration::from_micros(50), metrics);
        drop(spin.stream());
    }

    #[test]
    fn equal_spins_leave_the_executor_alone() {
        bound_executor()
            .spin_before_park(Duration::from_secs(1))
            .spawn(|| async {
                let spin = Spin::new(
                    Duration::from_micros(50),
                    Duration::from_micros(50),
                    Arc::default(),
                );
                drop(spin.stream());
                // The builder's spin is untouched: timers far shorter than it never park.
                assert!(parks_over_timers(50).await <= 5);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
