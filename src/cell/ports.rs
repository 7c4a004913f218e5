//! The cells' fixed ports against the kernel's ephemeral ones.
//!
//! A cell binds a fixed range of loopback ports. The kernel gives any outgoing connection on
//! the machine a local port from `net.ipv4.ip_local_port_range` (minus
//! `net.ipv4.ip_local_reserved_ports`), and a connected socket's local port cannot be bound
//! by a listener: a cell port inside that range can be taken by anyone's connection at any
//! time, and the cell then cannot start until that connection ends.

use std::ops::RangeInclusive;

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The kernel's ephemeral port range, or `None` when it cannot be read.
pub fn ephemeral_ports() -> Option<RangeInclusive<u16>> {
    parse_port_range(&std::fs::read_to_string(PORT_RANGE).ok()?)
}

/// How many of `ports` the kernel may hand to outgoing connections, with the kernel's range:
/// `None` when none (or when the kernel's settings cannot be read).
pub fn ephemeral_overlap(ports: RangeInclusive<u16>) -> Option<(usize, RangeInclusive<u16>)> {
    let range = ephemeral_ports()?;
    let reserved = std::fs::read_to_string(RESERVED)
        .map(|s| parse_reserved(&s))
        .unwrap_or_default();
    let n = unreserved_in(&ports, &range, &reserved);
    (n > 0).then_some((n, range))
}

/// `"32768\t60999\n"` → `32768..=60999`.
fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut it = text.split_ascii_whitespace().map(str::parse::<u16>);
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    (lo <= hi && it.next().is_none()).then_some(lo..=hi)
}

/// `"8080,19000-19500\n"` → `[8080..=8080, 19000..=19500]`; malformed items are skipped.
fn parse_reserved(text: &str) -> Vec<RangeInclusive<u16>> {
    text.trim()
        .split(',')
        .filter_map(|item| {
            let item = item.trim();
            let (lo, hi) = item.split_once('-').unwrap_or((item, item));
            let (lo, hi) = (lo.parse::<u16>().ok()?, hi.parse::<u16>().ok()?);
            (lo <= hi).then_some(lo..=hi)
        })
        .collect()
}

/// The ports of `ports` inside `ephemeral` and in none of `reserved`.
fn unreserved_in(
    ports: &RangeInclusive<u16>,
    ephemeral: &RangeInclusive<u16>,
    reserved: &[RangeInclusive<u16>],
) -> usize {
    let lo = *ports.start().max(ephemeral.start());
    let hi = *ports.end().min(ephemeral.end());
    if lo > hi {
        return 0;
    }
    (lo..=hi)
        .filter(|p| !reserved.iter().any(|r| r.contains(p)))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_files_parse() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_port_range("1024 65535"), Some(1024..=65535));
        for bad in ["", "32768", "60999 32768", "a b", "1 2 3", "1 70000"] {
            assert_eq!(parse_port_range(bad), None, "{bad:?}");
        }
        assert_eq!(parse_reserved("\n"), Vec::<RangeInclusive<u16>>::new());
        assert_eq!(
            parse_reserved("8080,19000-19500,x,9-1\n"),
            vec![8080..=8080, 19000..=19500]
        );
    }

    #[test]
    fn only_unreserved_ports_inside_the_range_count() {
        let eph = 32768..=60999;
        assert_eq!(unreserved_in(&(19000..=19230), &eph, &[]), 0);
        assert_eq!(unreserved_in(&(32700..=32799), &eph, &[]), 32);
        assert_eq!(unreserved_in(&(40000..=40110), &eph, &[]), 111);
        assert_eq!(unreserved_in(&(60990..=61100), &eph, &[]), 10);
        assert_eq!(
            unreserved_in(&(40000..=40110), &eph, &[40000..=40100, 40105..=40105]),
            9
        );
        assert_eq!(unreserved_in(&(40000..=40110), &eph, &[1..=65535]), 0);
    }

    #[test]
    fn this_machine_has_an_ephemeral_range() {
        let range = ephemeral_ports().expect("Linux exposes ip_local_port_range");
        assert!(range.start() <= range.end());
    }
}
