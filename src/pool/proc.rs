//! Reading process facts from `/proc`.

/// Resident set size of `pid` in bytes, from `/proc/<pid>/statm` (None if the process is gone
/// or the file is unreadable).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(rustix::param::page_size() as u64))
}

/// The fields of a `/proc/PID/stat` line after the command name, the first being field 3
/// (the state) as proc(5) numbers them. The name is in parentheses and may itself hold
/// spaces and parentheses, so the fields are counted from the last `)`.
pub fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    Some(
        stat[stat.rfind(')')? + 1..]
            .split_ascii_whitespace()
            .collect(),
    )
}

/// CPU time of process `pid`, user and system, all its threads (fields 14 and 15 of
/// `/proc/PID/stat`, in clock ticks).
pub fn cpu_time(pid: u32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields = stat_fields(&stat)?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    let ticks = utime.saturating_add(stime);
    Some(
        std::time::Duration::from_secs(ticks / hz)
            + std::time::Duration::from_nanos(ticks % hz * 1_000_000_000 / hz),
    )
}

pub use moltbot_ipc::process::descendants;

/// True if a process with this pid exists (it may be a zombie).
pub fn alive(pid: u32) -> bool {
    pid != 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    #[test]
    fn descendants_are_found_through_a_grandchild() {
        // sh → sleep: both are descendants of this process; gone after the kill.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let below = loop {
            let d = super::descendants(child.id());
            if !d.is_empty() || std::time::Instant::now() > deadline {
                break d;
            }
            std::thread::yield_now();
        };
        assert_eq!(below.len(), 1, "{below:?}");
        let grandchild = below[0];
        // Other tests of this process may have children too: only inclusion is certain.
        let mine = super::descendants(std::process::id());
        assert!(
            mine.contains(&child.id()) && mine.contains(&grandchild),
            "{mine:?}"
        );
        assert!(super::descendants(grandchild).is_empty());
        let _ = std::process::Command::new("kill")
            .arg(grandchild.to_string())
            .status();
        child.wait().unwrap();
        assert!(super::descendants(u32::MAX).is_empty());
    }

    #[test]
    fn own_cpu_time_grows_and_a_missing_process_has_none() {
        let me = std::process::id();
        let before = super::cpu_time(me).unwrap();
        let start = std::time::Instant::now();
        // Spin until the kernel's tick-grained count moves (bounded by a generous deadline).
        let mut x = 0u64;
        while super::cpu_time(me).unwrap() <= before
            && start.elapsed() < std::time::Duration::from_secs(60)
        {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_add(i));
            }
        }
        assert!(super::cpu_time(me).unwrap() > before);
        assert!(super::cpu_time(u32::MAX).is_none());
    }

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let f = super::stat_fields("12 (a) b (c)) R 1 12 12").unwrap();
        assert_eq!(f, ["R", "1", "12", "12"]);
        assert!(super::stat_fields("no name here").is_none());
    }

    #[test]
    fn own_rss_is_positive() {
        assert!(super::rss_bytes(std::process::id()).unwrap() > 0);
        assert!(super::rss_bytes(u32::MAX).is_none());
        assert!(super::alive(std::process::id()));
        assert!(!super::alive(0));
    }
}
