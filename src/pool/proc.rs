//! Reading process facts from `/proc`.

/// Resident set size of `pid` in bytes, from `/proc/<pid>/statm` (None if the process is gone
/// or the file is unreadable).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(rustix::param::page_size() as u64))
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
    fn own_rss_is_positive() {
        assert!(super::rss_bytes(std::process::id()).unwrap() > 0);
        assert!(super::rss_bytes(u32::MAX).is_none());
        assert!(super::alive(std::process::id()));
        assert!(!super::alive(0));
    }
}
