//! Open-loop scheduling (as wrk2): at a total rate R over C connections, request number g of
//! the whole run (g = connection index + k·C for a connection's k-th request) is due at g/R
//! after the start. Latency is measured from that intended time, not from when the request
//! could actually be sent, so a stalled server cannot hide the requests it delayed
//! ("coordinated omission").

use std::time::{Duration, Instant};

/// The send schedule of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    rate: f64,
    connections: u64,
    index: u64,
}

impl Schedule {
    /// Connection `index` of `connections`, total `rate` requests/s, starting at `start`.
    /// `rate` must be positive and finite (checked by [`crate::Config::validate`]).
    pub fn new(start: Instant, rate: f64, connections: usize, index: usize) -> Schedule {
        Schedule {
            start,
            rate,
            connections: connections.max(1) as u64,
            index: index as u64,
        }
    }

    /// When this connection's `k`-th request (0-based) is due.
    pub fn at(&self, k: u64) -> Instant {
        let slot = self
            .index
            .saturating_add(k.saturating_mul(self.connections));
        // Beyond ~500 years Duration::from_secs_f64 would panic; no run lasts that long.
        let secs = (slot as f64 / self.rate).min(1.0e10);
        self.start + Duration::from_secs_f64(secs)
    }

    /// Requests from the `k`-th on that were due in the measured period (from
    /// `measure_start`, before `stop`): those a run behind schedule never sent.
    pub fn unsent(&self, k: u64, measure_start: Instant, stop: Instant) -> u64 {
        (k..)
            .map(|k| self.at(k))
            .take_while(|&t| t < stop)
            .filter(|&t| t >= measure_start)
            .count() as u64
    }

    /// Time between two requests of this connection.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64((self.connections as f64 / self.rate).min(1.0e10))
    }
}

/// Latency of a request that was due at `intended` and whose answer arrived at `done`.
/// In closed loop `intended` is the moment the request was written.
pub fn latency(intended: Instant, done: Instant) -> Duration {
    done.saturating_duration_since(intended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_interleave_into_an_even_stream() {
        let t0 = Instant::now();
        let (rate, conns) = (1000.0, 4);
        let schedules: Vec<_> = (0..conns)
            .map(|i| Schedule::new(t0, rate, conns, i))
            .collect();
        let mut all: Vec<Duration> = schedules
            .iter()
            .flat_map(|s| (0..25).map(move |k| s.at(k) - t0))
            .collect();
        all.sort();
        assert_eq!(all.len(), 100);
        for (g, d) in all.iter().enumerate() {
            let want = Duration::from_micros(1000 * g as u64);
            let err = d.abs_diff(want);
            assert!(
                err < Duration::from_nanos(10),
                "slot {g}: {d:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn one_connection_sends_every_c_over_r() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 200.0, 10, 3);
        assert_eq!(s.interval(), Duration::from_millis(50));
        assert!((s.at(0) - t0).abs_diff(Duration::from_millis(15)) < Duration::from_nanos(10));
        assert!((s.at(4) - t0).abs_diff(Duration::from_millis(215)) < Duration::from_nanos(10));
        assert!(s.at(u64::MAX) > s.at(1_000_000));
    }

    #[test]
    fn latency_counts_from_the_intended_time() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 100.0, 1, 0);
        // Request 2 was due at 20 ms, could only be sent at 45 ms (the previous answer was
        // late) and was answered at 50 ms: 30 ms, not 5 ms.
        let done = t0 + Duration::from_millis(50);
        let l = latency(s.at(2), done);
        assert!(l.abs_diff(Duration::from_millis(30)) < Duration::from_nanos(10));
        // Never negative.
        assert_eq!(latency(done, t0), Duration::ZERO);
    }

    #[test]
    fn unsent_requests_are_those_due_in_the_measured_period() {
        let t0 = Instant::now();
        // Every 10 ms; measured from 25 ms; stop at 100 ms: due at 30, 40, ..., 90.
        let s = Schedule::new(t0, 100.0, 1, 0);
        let (from, stop) = (
            t0 + Duration::from_millis(25),
            t0 + Duration::from_millis(100),
        );
        assert_eq!(s.unsent(0, from, stop), 7);
        assert_eq!(s.unsent(5, from, stop), 5);
        assert_eq!(s.unsent(10, from, stop), 0);
    }
}
