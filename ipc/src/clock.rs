//! The clock both sides of a ring agree on.

/// Microseconds on the system-wide monotonic clock (the same in every process on the host,
/// unaffected by wall-clock changes), for request deadlines and heartbeats.
pub fn monotonic_us() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    #[test]
    fn monotonic_does_not_go_back() {
        let a = super::monotonic_us();
        let b = super::monotonic_us();
        assert!(b >= a && a > 0);
    }
}
