//! Reading process facts from `/proc`.

/// Resident set size of `pid` in bytes, from `/proc/<pid>/statm` (None if the process is gone
/// or the file is unreadable).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(rustix::param::page_size() as u64))
}

/// True if a process with this pid exists (it may be a zombie).
pub fn alive(pid: u32) -> bool {
    pid != 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_rss_is_positive() {
        assert!(super::rss_bytes(std::process::id()).unwrap() > 0);
        assert!(super::rss_bytes(u32::MAX).is_none());
        assert!(super::alive(std::process::id()));
        assert!(!super::alive(0));
    }
}
