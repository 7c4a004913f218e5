//! The load generator's own CPU over the measured period (every thread of this process, user
//! and system): on a machine the client shares with the server, what each request costs the
//! client bounds what the server can reach, so a comparison states it.

use std::time::{Duration, Instant};

use serde::Serialize;

/// The time a CPU-time clock reads (this process's, or this thread's).
fn cpu_time(clock: rustix::time::ClockId) -> Duration {
    let t = rustix::time::clock_gettime(clock);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// CPU time of this process, every thread included.
fn process_cpu() -> Duration {
    cpu_time(rustix::time::ClockId::ProcessCPUTime)
}

/// Reads this process's CPU time when measuring starts and when it ends.
#[derive(Debug, Default)]
pub struct ClientMeter {
    /// CPU time and wall clock at the start of the measured period.
    started: Option<(Duration, Instant)>,
}

impl ClientMeter {
    /// True once [`ClientMeter::start`] was called.
    pub fn is_started(&self) -> bool {
        self.started.is_some()
    }

    /// The first reading: the measured period begins.
    pub fn start(&mut self) {
        self.started = Some((process_cpu(), Instant::now()));
    }

    /// The figures of the measured period for `requests` requests; None if it never started.
    pub fn finish(&self, requests: u64) -> Option<ClientCpu> {
        let (cpu0, wall0) = self.started?;
        Some(ClientCpu::of(
            requests,
            process_cpu().saturating_sub(cpu0),
            wall0.elapsed(),
        ))
    }
}

/// The client's CPU over the measured period. Serializes as the report's `client_cpu`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientCpu {
    /// CPU seconds (user + system) of every thread of the load generator.
    pub seconds: f64,
    /// Measured requests per client CPU second; None when no CPU time was seen.
    pub requests_per_cpu_second: Option<f64>,
    /// `seconds` over the wall-clock seconds measured: the cores the client kept busy.
    pub cores: f64,
}

impl ClientCpu {
    /// The figures of `requests` served while the client used `cpu` over `wall`.
    pub fn of(requests: u64, cpu: Duration, wall: Duration) -> ClientCpu {
        let seconds = cpu.as_secs_f64();
        let wall = wall.as_secs_f64();
        ClientCpu {
            seconds,
            requests_per_cpu_second: (seconds > 0.0).then(|| requests as f64 / seconds),
            cores: if wall > 0.0 { seconds / wall } else { 0.0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_follow_from_the_readings() {
        let c = ClientCpu::of(1000, Duration::from_millis(500), Duration::from_secs(2));
        assert_eq!(c.seconds, 0.5);
        assert_eq!(c.requests_per_cpu_second, Some(2000.0));
        assert_eq!(c.cores, 0.25);
        let idle = ClientCpu::of(10, Duration::ZERO, Duration::ZERO);
        assert_eq!(idle.requests_per_cpu_second, None);
        assert_eq!(idle.cores, 0.0);
    }

    #[test]
    fn the_meter_counts_the_cpu_this_process_uses_after_its_start() {
        let mut m = ClientMeter::default();
        assert!(m.finish(1).is_none(), "not started");
        m.start();
        assert!(m.is_started());
        // Work on another thread counts too: the load threads are not the one that reads.
        // It spins until it has used 50 ms of CPU itself, however loaded the machine is.
        let spun = std::thread::spawn(|| {
            let mut x = 0u64;
            while cpu_time(rustix::time::ClockId::ThreadCPUTime) < Duration::from_millis(50) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            x
        });
        let _ = spun.join();
        let c = m.finish(100).expect("started");
        assert!(c.seconds >= 0.05, "the other thread's 50 ms count: {c:?}");
        assert!(c.requests_per_cpu_second.is_some());
    }
}
