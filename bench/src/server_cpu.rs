//! The server's CPU time over the measured period: utime + stime of the given processes and of
//! their live descendants, from `/proc`, read when measuring starts, about once a second
//! meanwhile, and at the end.
//!
//! Every process of the tree is read on its own and keyed by (pid, start time), so a recycled
//! pid is a new process: `cutime`/`cstime` (the times of reaped children) alone would never
//! count a worker alive for the whole run. A process that appears during the run (a respawned
//! worker) counts all its time if it was born after measuring started.
//!
//! A process that ends is not lost with its last second: its parent's `cutime`/`cstime` grow by
//! its whole time (its own reaped children's included) when the parent reaps it, so each
//! process is counted with the times of the children it reaped, and one that ended within a
//! tree process that is still there is counted in that one (less what it had used before the
//! period). A gateway that recycles its workers many times a second is measured whole, even
//! the workers that lived between two readings. Only a process whose ancestors in the tree all
//! ended (reparented, reaped outside) is counted up to the last reading before its end, and
//! the report says so.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::BenchError;
use crate::config::Target;
use crate::response::ResponseReader;

use moltbot_ipc::process::descendants;

/// Longest wait for a `/status` answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// What one `/proc/PID/stat` line says about CPU time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// The command name (`comm`, up to 15 bytes, may contain spaces and parentheses).
    pub comm: String,
    /// Parent pid (field 4).
    pub ppid: u32,
    /// utime + stime in clock ticks (fields 14 and 15: every thread of the process, the
    /// ended ones included, but no child process).
    pub cpu_ticks: u64,
    /// cutime + cstime (fields 16 and 17): the times of the children it reaped, with theirs.
    pub children_ticks: u64,
    /// When the process started, in clock ticks since boot (field 22).
    pub start_ticks: u64,
}

/// Parses a `/proc/PID/stat` line. The command name sits between the first `(` and the last
/// `)`: it may itself contain `)`, spaces or digits, so fields are counted after the last `)`.
pub fn parse_stat(line: &str) -> Option<Stat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    if close < open {
        return None;
    }
    let comm = line[open + 1..close].to_string();
    let rest: Vec<&str> = line[close + 1..].split_ascii_whitespace().collect();
    // rest[0] is field 3 (the state).
    let field = |n: usize| rest.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    Some(Stat {
        comm,
        ppid: u32::try_from(field(4)?).ok()?,
        cpu_ticks: field(14)?.checked_add(field(15)?)?,
        children_ticks: field(16)?.checked_add(field(17)?)?,
        start_ticks: field(22)?,
    })
}

/// `/proc/PID/stat` of a live (or zombie) process; None once it is gone.
pub fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Clock ticks since boot now (the unit of [`Stat::start_ticks`]).
fn boot_ticks_now(ticks_per_s: u64) -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let ns = u128::from(t.tv_sec.unsigned_abs()) * 1_000_000_000 + t.tv_nsec.unsigned_abs() as u128;
    u64::try_from(ns * u128::from(ticks_per_s) / 1_000_000_000).unwrap_or(u64::MAX)
}

/// One process counted, in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessCpu {
    /// Its pid.
    pub pid: u32,
    /// Its command name.
    pub command: String,
    /// CPU seconds it used within the measured period (as far as it was read).
    pub seconds: f64,
    /// It started after measuring did (all its CPU time counts).
    pub born: bool,
    /// It ended before the last reading.
    pub ended: bool,
    /// It ended within the process of this pid (its parent, or the nearest ancestor still
    /// there), which reaped it: its time is counted there, not here.
    pub counted_in: Option<u32>,
}

/// One process's CPU ticks within the period, before conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessTicks {
    /// Its pid.
    pub pid: u32,
    /// Its command name.
    pub command: String,
    /// utime + stime within the period, with those of the children it reaped (see the module
    /// documentation).
    pub ticks: u64,
    /// Started after measuring did.
    pub born: bool,
    /// Ended before the last reading.
    pub ended: bool,
    /// Ended and reaped within this tree process: counted there.
    pub counted_in: Option<u32>,
}

/// The server's CPU over the measured period. Serializes as the report's `server_cpu`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerCpu {
    /// CPU seconds (user + system) of every process counted.
    pub seconds: f64,
    /// Measured requests per CPU second; None when no CPU time was seen.
    pub requests_per_cpu_second: Option<f64>,
    /// Wall-clock seconds from the first reading to the last.
    pub wall_seconds: f64,
    /// `seconds / wall_seconds`: how many cores the server kept busy on average.
    pub cores: f64,
    /// Every process counted (the given ones, the `/status` workers, their descendants).
    pub pids: Vec<u32>,
    /// Per process.
    pub processes: Vec<ProcessCpu>,
    /// What the figures miss, in words (processes that ended, a `/status` that failed).
    pub notes: Vec<String>,
}

impl ServerCpu {
    /// The figures from per-process ticks.
    pub fn from_ticks(
        requests: u64,
        ticks_per_s: u64,
        wall: Duration,
        processes: Vec<ProcessTicks>,
        mut notes: Vec<String>,
    ) -> ServerCpu {
        let hz = ticks_per_s.max(1) as f64;
        let total: u64 = processes.iter().map(|p| p.ticks).sum();
        let seconds = total as f64 / hz;
        let wall_seconds = wall.as_secs_f64();
        let ended: Vec<String> = processes
            .iter()
            .filter(|p| p.ended && p.counted_in.is_none())
            .map(|p| p.pid.to_string())
            .collect();
        if !ended.is_empty() {
            notes.push(format!(
                "{} process(es) ended during the run outside the measured tree (pid {}): \
                 counted up to the last reading before the end (read about once a second)",
                ended.len(),
                ended.join(", ")
            ));
        }
        ServerCpu {
            seconds,
            requests_per_cpu_second: (total > 0).then(|| requests as f64 / seconds),
            wall_seconds,
            cores: if wall_seconds > 0.0 {
                seconds / wall_seconds
            } else {
                0.0
            },
            pids: processes.iter().map(|p| p.pid).collect(),
            processes: processes
                .into_iter()
                .map(|p| ProcessCpu {
                    pid: p.pid,
                    command: p.command,
                    seconds: p.ticks as f64 / hz,
                    born: p.born,
                    ended: p.ended,
                    counted_in: p.counted_in,
                })
                .collect(),
            notes,
        }
    }
}

/// A gateway's `/status`, to learn its workers' pids.
#[derive(Debug, Clone)]
pub struct StatusSource {
    /// The URL asked (`/status` added when the URL given had no path).
    pub url: String,
    target: Target,
    path: String,
}

impl StatusSource {
    /// `http://host:port` (then `/status`) or `http://host:port/some/path`.
    pub fn parse(url: &str) -> Result<StatusSource, BenchError> {
        let target = Target::parse(url)?;
        let (url, path) = if target.prefix.is_empty() {
            (
                format!("{}/status", url.trim_end_matches('/')),
                "/status".to_string(),
            )
        } else {
            (url.to_string(), target.prefix.clone())
        };
        Ok(StatusSource { url, target, path })
    }

    /// The pids of `workers[].pid` (slots without a process are skipped).
    pub fn worker_pids(&self, token: Option<&str>) -> Result<Vec<u32>, String> {
        let body = self
            .get(token)
            .map_err(|e| format!("GET {}: {e}", self.url))?;
        worker_pids(&body).map_err(|e| format!("GET {}: {e}", self.url))
    }

    fn get(&self, token: Option<&str>) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + STATUS_TIMEOUT;
        let mut s = TcpStream::connect_timeout(&self.target.addr, STATUS_TIMEOUT)
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(STATUS_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let auth = token
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {} HTTP/1.1\r\nhost: {}\r\n{auth}accept: application/json\r\n\
             connection: close\r\n\r\n",
            self.path, self.target.host_header
        );
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut reader = ResponseReader::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no answer within {STATUS_TIMEOUT:?}"));
            }
            s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            let n = s.read(reader.spare()).map_err(|e| e.to_string())?;
            if n == 0 {
                reader.set_eof();
            }
            reader.filled(n);
            if let Some(r) = reader.parse().map_err(|e| e.to_string())? {
                if r.status != 200 {
                    return Err(format!(
                        "status {}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
                    ));
                }
                return Ok(r.body.to_vec());
            }
        }
    }
}

/// `workers[].pid` of a `/status` document.
pub fn worker_pids(body: &[u8]) -> Result<Vec<u32>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let workers = v
        .get("workers")
        .and_then(|w| w.as_array())
        .ok_or("no \"workers\" array")?;
    Ok(workers
        .iter()
        .filter_map(|w| w.get("pid")?.as_u64())
        .filter_map(|p| u32::try_from(p).ok())
        .collect())
}

#[derive(Debug, Clone)]
struct Tracked {
    comm: String,
    /// Parent pid at the latest reading.
    ppid: u32,
    /// Own and reaped children's ticks at the first reading within the period (0 when born
    /// within it).
    first: u64,
    /// Own and reaped children's ticks at the latest reading.
    last: u64,
    born: bool,
    /// Read by the latest scan.
    present: bool,
}

/// Each tracked process's ticks within the period. A process that ended is counted in the
/// nearest ancestor still present (whose reaped-children ticks hold its whole time, through
/// the ended ancestors between them): that ancestor's figure loses what the ended one had
/// used before the period, and the ended one shows 0. One without such an ancestor keeps its
/// last reading.
fn tally(procs: &BTreeMap<(u32, u64), Tracked>) -> Vec<ProcessTicks> {
    // By pid; a pid seen twice (reused) is the one still present.
    let mut by_pid: BTreeMap<u32, &Tracked> = BTreeMap::new();
    for (&(pid, _), t) in procs {
        if t.present || !by_pid.contains_key(&pid) {
            by_pid.insert(pid, t);
        }
    }
    let holder = |t: &Tracked| -> Option<u32> {
        let mut ppid = t.ppid;
        // The chain is at most as long as the tree; the bound guards a pid cycle of reuse.
        for _ in 0..=procs.len() {
            let parent = by_pid.get(&ppid)?;
            if parent.present {
                return Some(ppid);
            }
            ppid = parent.ppid;
        }
        None
    };
    let mut before: BTreeMap<u32, u64> = BTreeMap::new();
    let mut rows: Vec<ProcessTicks> = procs
        .iter()
        .map(|(&(pid, _), t)| {
            let counted_in = if t.present { None } else { holder(t) };
            if let Some(h) = counted_in {
                *before.entry(h).or_default() += t.first;
            }
            ProcessTicks {
                pid,
                command: t.comm.clone(),
                ticks: match counted_in {
                    Some(_) => 0,
                    None => t.last.saturating_sub(t.first),
                },
                born: t.born,
                ended: !t.present,
                counted_in,
            }
        })
        .collect();
    for r in &mut rows {
        if !r.ended
            && let Some(b) = before.get(&r.pid)
        {
            r.ticks = r.ticks.saturating_sub(*b);
        }
    }
    rows
}

/// Reads the server's CPU time at the start of the measured period, during it and at its
/// end. See the module documentation.
#[derive(Debug)]
pub struct CpuMeter {
    roots: Vec<u32>,
    status: Vec<StatusSource>,
    token: Option<String>,
    /// Worker pids from `/status`, treated as roots too.
    status_pids: Vec<u32>,
    ticks_per_s: u64,
    /// Boot ticks and instant of the first reading.
    started: Option<(u64, Instant)>,
    procs: BTreeMap<(u32, u64), Tracked>,
    notes: Vec<String>,
}

impl CpuMeter {
    /// A meter of `pids` and the workers each `/status` lists (asked now, and again at the
    /// end for workers that replaced others). Fails if a pid is not a live process or a
    /// `/status` cannot be read.
    pub fn new(
        pids: &[u32],
        status: &[StatusSource],
        token: Option<&str>,
    ) -> Result<CpuMeter, BenchError> {
        for &pid in pids {
            if read_stat(pid).is_none() {
                return Err(BenchError::Config(format!(
                    "--server-pid {pid}: no such process"
                )));
            }
        }
        let mut status_pids = Vec::new();
        for s in status {
            status_pids.extend(s.worker_pids(token).map_err(BenchError::Config)?);
        }
        Ok(CpuMeter {
            roots: pids.to_vec(),
            status: status.to_vec(),
            token: token.map(str::to_string),
            status_pids,
            ticks_per_s: rustix::param::clock_ticks_per_second(),
            started: None,
            procs: BTreeMap::new(),
            notes: Vec::new(),
        })
    }

    /// Whether [`CpuMeter::start`] was called.
    pub fn is_started(&self) -> bool {
        self.started.is_some()
    }

    /// The first reading: the measured period starts now.
    pub fn start(&mut self) {
        self.started = Some((boot_ticks_now(self.ticks_per_s), Instant::now()));
        self.scan();
    }

    /// A reading during the period: follows processes that appeared, keeps the last value
    /// of each for when it ends before the final reading.
    pub fn sample(&mut self) {
        if self.started.is_some() {
            self.scan();
        }
    }

    /// The final reading; `requests` were measured over the period.
    pub fn finish(mut self, requests: u64) -> ServerCpu {
        if self.started.is_none() {
            self.start();
        }
        let mut fresh = Vec::new();
        for s in &self.status {
            match s.worker_pids(self.token.as_deref()) {
                Ok(p) => fresh.extend(p),
                Err(e) => self.notes.push(format!(
                    "{e}: workers that replaced others during the run may be missing"
                )),
            }
        }
        for p in fresh {
            if !self.status_pids.contains(&p) {
                self.status_pids.push(p);
            }
        }
        self.scan();
        let wall = self.started.map(|(_, at)| at.elapsed()).unwrap_or_default();
        let processes = tally(&self.procs);
        ServerCpu::from_ticks(requests, self.ticks_per_s, wall, processes, self.notes)
    }

    /// Reads every process of the trees once.
    fn scan(&mut self) {
        let Some((start_boot, _)) = self.started else {
            return;
        };
        // The load generator itself is a descendant when a root is one of its ancestors
        // (a shell, a test harness): its CPU is the client's, never the server's.
        let me = std::process::id();
        let mut pids: Vec<u32> = Vec::new();
        for &root in self.roots.iter().chain(&self.status_pids) {
            if pids.contains(&root) {
                continue;
            }
            pids.push(root);
            for d in descendants(root) {
                if d != me && !pids.contains(&d) {
                    pids.push(d);
                }
            }
        }
        // The first reading defines the start: nothing it finds was born within the period.
        let first_scan = self.procs.is_empty();
        let mut seen = BTreeSet::new();
        for pid in pids {
            let Some(st) = read_stat(pid) else { continue };
            let key = (pid, st.start_ticks);
            seen.insert(key);
            let total = st.cpu_ticks.saturating_add(st.children_ticks);
            match self.procs.get_mut(&key) {
                Some(t) => {
                    t.last = total.max(t.last);
                    t.comm = st.comm;
                    t.ppid = st.ppid;
                }
                None => {
                    // Born after the first reading (its start tick is at or after it): all its
                    // time is within the period. Otherwise it was there but unseen (not yet a
                    // descendant, not yet listed): count from this reading on.
                    let born = !first_scan && st.start_ticks >= start_boot;
                    self.procs.insert(
                        key,
                        Tracked {
                            comm: st.comm,
                            ppid: st.ppid,
                            first: if born { 0 } else { total },
                            last: total,
                            born,
                            present: true,
                        },
                    );
                }
            }
        }
        for (key, t) in &mut self.procs {
            t.present = seen.contains(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        // Fields 14 and 15 are 7 and 5 (utime, stime), 22 is 900; 4 is the ppid 1.
        let tail = "S 1 10 10 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0 900 1000 200";
        for comm in [
            "moltbot",
            "nginx: worker process",
            "a) b (c",
            "x) 1 2 3 4 5",
            "((()))",
            "",
        ] {
            let line = format!("4242 ({comm}) {tail}\n");
            let st = parse_stat(&line).unwrap_or_else(|| panic!("{line:?}"));
            assert_eq!(st.comm, comm);
            assert_eq!(st.ppid, 1);
            assert_eq!(st.cpu_ticks, 12);
            assert_eq!(st.start_ticks, 900);
        }
        for bad in [
            "",
            "4242 moltbot S 1",
            "4242 (moltbot) S 1 10",
            "4242 )moltbot( S 1 10 10 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0 900",
            "4242 (moltbot) S 1 10 10 0 -1 4194560 100 0 0 0 x 5 0 0 20 0 3 0 900",
        ] {
            assert_eq!(parse_stat(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn own_stat_is_read() {
        let st = read_stat(std::process::id()).expect("own stat");
        assert!(!st.comm.is_empty());
        assert!(st.start_ticks <= boot_ticks_now(rustix::param::clock_ticks_per_second()));
        assert_eq!(read_stat(u32::MAX), None);
    }

    /// Spawns `sh -c 'sleep 30 & wait'` and returns it with the pid of its `sleep`.
    fn shell_with_grandchild() -> (std::process::Child, u32) {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .expect("spawn sh");
        // The shell forks `sleep` at once; wait for the kernel to show it (no fixed sleep).
        let deadline = Instant::now() + Duration::from_secs(30);
        let grandchild = loop {
            if let Some(&g) = descendants(child.id()).first() {
                break Some(g);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::yield_now();
        };
        match grandchild {
            Some(g) => (child, g),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sleep never appeared");
            }
        }
    }

    #[test]
    fn descendants_include_a_grandchild_until_it_ends() {
        let (mut child, grandchild) = shell_with_grandchild();
        assert_eq!(descendants(child.id()), vec![grandchild]);
        assert_eq!(read_stat(grandchild).expect("sleep").ppid, child.id());
        // Other tests of this process may have children too: only inclusion is certain.
        let mine = descendants(std::process::id());
        assert!(
            mine.contains(&child.id()) && mine.contains(&grandchild),
            "{mine:?}"
        );
        assert!(descendants(grandchild).is_empty());
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(grandchild as i32).expect("pid"),
            rustix::process::Signal::TERM,
        )
        .expect("kill sleep");
        child.wait().expect("wait sh");
        assert!(descendants(child.id()).is_empty());
        assert!(descendants(u32::MAX).is_empty());
    }

    #[test]
    fn the_meter_counts_a_descendant_born_during_the_period_and_one_that_ended() {
        let me = std::process::id();
        let mut meter = CpuMeter::new(&[me], &[], None).expect("meter");
        meter.start();
        let (mut child, grandchild) = shell_with_grandchild();
        meter.sample();
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(grandchild as i32).expect("pid"),
            rustix::process::Signal::TERM,
        )
        .expect("kill sleep");
        child.wait().expect("wait sh");
        // Burn CPU in this process until the kernel has charged it two more ticks, so its
        // share is visibly positive.
        let before = read_stat(me).expect("own stat").cpu_ticks;
        let mut x = 0u64;
        while read_stat(me).expect("own stat").cpu_ticks < before + 2 {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        let cpu = meter.finish(1000);
        let by_pid = |p: u32| cpu.processes.iter().find(|x| x.pid == p);
        let own = by_pid(me).expect("own process counted");
        assert!(!own.born && !own.ended, "{own:?}");
        // sh reaped sleep, this process reaped sh: both are counted here.
        let sleep = by_pid(grandchild).expect("sleep counted");
        assert!(sleep.born && sleep.ended, "{sleep:?}");
        assert_eq!(sleep.counted_in, Some(me));
        let sh = by_pid(child.id()).expect("sh counted");
        assert!(sh.born && sh.ended, "{sh:?}");
        assert_eq!(sh.counted_in, Some(me));
        assert!(cpu.pids.contains(&grandchild));
        assert!(cpu.notes.is_empty(), "{:?}", cpu.notes);
        assert!(cpu.seconds > 0.0, "{cpu:?}");
        assert_eq!(cpu.requests_per_cpu_second, Some(1000.0 / cpu.seconds));
    }

    #[test]
    fn the_meter_never_counts_itself() {
        // This process is a descendant of its parent: as the load generator, it is not part
        // of the server even when an ancestor is.
        let me = std::process::id();
        let parent = read_stat(me).expect("own stat").ppid;
        let mut meter = CpuMeter::new(&[parent], &[], None).expect("meter");
        meter.start();
        let cpu = meter.finish(1);
        assert!(cpu.pids.contains(&parent), "{cpu:?}");
        assert!(!cpu.pids.contains(&me), "{cpu:?}");
    }

    #[test]
    fn a_missing_pid_is_refused() {
        let err = CpuMeter::new(&[u32::MAX], &[], None).expect_err("no such pid");
        assert!(err.to_string().contains("no such process"), "{err}");
    }

    fn ticks(pid: u32, ticks: u64, born: bool, ended: bool) -> ProcessTicks {
        ProcessTicks {
            pid,
            command: format!("p{pid}"),
            ticks,
            born,
            ended,
            counted_in: None,
        }
    }

    fn tracked(ppid: u32, first: u64, last: u64, present: bool) -> Tracked {
        Tracked {
            comm: "p".into(),
            ppid,
            first,
            last,
            born: first == 0,
            present,
        }
    }

    #[test]
    fn an_ended_process_is_counted_in_the_ancestor_that_reaped_it() {
        // 10 (a gateway) reaped 20 (a worker there at the start, 30 ticks then), which had
        // reaped 21 (born and ended within the period); 10's reaped-children ticks grew by
        // 20's and 21's whole time. 11 is a worker still running. 40's parent 99 is not in
        // the tree: it keeps its last reading.
        let procs: BTreeMap<(u32, u64), Tracked> = [
            ((10, 1), tracked(1, 500, 500 + 100 + 70 + 20, true)),
            ((11, 2), tracked(10, 40, 90, true)),
            ((20, 3), tracked(10, 30, 60, false)),
            ((21, 4), tracked(20, 0, 5, false)),
            ((40, 5), tracked(99, 7, 12, false)),
        ]
        .into_iter()
        .collect();
        let rows = tally(&procs);
        let row = |pid: u32| rows.iter().find(|r| r.pid == pid).expect("row");
        // 10: its own 100, plus 20's 70 (100 in all, 30 of it before the period) and 21's 20.
        assert_eq!(row(10).ticks, 100 + 70 - 30 + 20);
        assert_eq!((row(10).ended, row(10).counted_in), (false, None));
        assert_eq!(row(11).ticks, 50);
        for pid in [20, 21] {
            assert_eq!(
                (row(pid).ticks, row(pid).counted_in),
                (0, Some(10)),
                "{pid}"
            );
            assert!(row(pid).ended);
        }
        assert_eq!((row(40).ticks, row(40).counted_in), (5, None));
        let cpu = ServerCpu::from_ticks(1, 100, Duration::from_secs(1), rows, vec![]);
        assert_eq!(cpu.notes.len(), 1, "{:?}", cpu.notes);
        assert!(cpu.notes[0].contains("pid 40"), "{:?}", cpu.notes);
    }

    #[test]
    fn a_child_that_lived_between_two_readings_is_counted() {
        // Once told to, sh runs a CPU-bound child to its end, then sleeps: the child is born
        // and reaped between the meter's readings, and only sh's reaped-children ticks hold
        // its time.
        let mut sh = std::process::Command::new("sh")
            .args([
                "-c",
                "read go; sh -c 'i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done'; sleep 30",
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let mut meter = CpuMeter::new(&[sh.id()], &[], None).expect("meter");
        meter.start();
        sh.stdin
            .take()
            .expect("stdin")
            .write_all(b"go\n")
            .expect("tell sh to go");
        // The burner is done once sh's reaped-children ticks stop being 0 and `sleep` runs.
        let deadline = Instant::now() + Duration::from_secs(120);
        let reaped = loop {
            let st = read_stat(sh.id()).expect("sh runs");
            let sleeping = descendants(sh.id())
                .iter()
                .any(|&d| read_stat(d).is_some_and(|s| s.comm == "sleep"));
            if sleeping && st.children_ticks > 0 {
                break st.children_ticks;
            }
            assert!(Instant::now() < deadline, "the burner never ended");
            std::thread::yield_now();
        };
        let cpu = meter.finish(1);
        let _ = sh.kill();
        let _ = sh.wait();
        // All of the burner's time (it started after the first reading); without the reaped
        // children's ticks none of it would count (it was never seen running).
        let hz = rustix::param::clock_ticks_per_second() as f64;
        assert!(
            (cpu.seconds * hz).round() >= reaped as f64,
            "{reaped} ticks reaped, {cpu:?}"
        );
    }

    #[test]
    fn arithmetic_of_the_figures() {
        // 100 ticks/s: 250 + 50 ticks = 3 s over a 2 s period; 6,000 requests.
        let cpu = ServerCpu::from_ticks(
            6000,
            100,
            Duration::from_secs(2),
            vec![ticks(10, 250, false, false), ticks(11, 50, true, true)],
            vec![],
        );
        assert_eq!(cpu.seconds, 3.0);
        assert_eq!(cpu.requests_per_cpu_second, Some(2000.0));
        assert_eq!(cpu.cores, 1.5);
        assert_eq!(cpu.pids, vec![10, 11]);
        assert_eq!(cpu.processes[1].seconds, 0.5);
        assert_eq!(cpu.notes.len(), 1);
        assert!(cpu.notes[0].contains("pid 11"), "{:?}", cpu.notes);
        // No CPU seen: no ratio rather than infinity.
        let idle = ServerCpu::from_ticks(
            5,
            100,
            Duration::ZERO,
            vec![ticks(10, 0, false, false)],
            vec![],
        );
        assert_eq!(idle.requests_per_cpu_second, None);
        assert_eq!(idle.cores, 0.0);
        assert!(idle.notes.is_empty());
    }

    #[test]
    fn worker_pids_come_from_the_status_document() {
        let doc = br#"{"totalWorkers":3,"workers":[{"workerId":"worker-0","pid":101},
            {"workerId":"worker-1","pid":null},{"workerId":"worker-2","pid":103}],
            "gateway":{"cores":2}}"#;
        assert_eq!(worker_pids(doc), Ok(vec![101, 103]));
        assert!(worker_pids(b"{}").is_err());
        assert!(worker_pids(b"<html>").is_err());
    }

    #[test]
    fn status_is_fetched_over_http() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).expect("read");
                assert!(n > 0, "request cut short");
                req.extend_from_slice(&buf[..n]);
            }
            let body = br#"{"workers":[{"pid":7},{"pid":8}]}"#;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).expect("write");
            s.write_all(body).expect("write");
            String::from_utf8(req).expect("utf-8")
        });
        let src = StatusSource::parse(&format!("http://{addr}")).expect("url");
        assert_eq!(src.worker_pids(Some("tok")), Ok(vec![7, 8]));
        let req = server.join().expect("server");
        assert!(req.starts_with("GET /status HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("authorization: Bearer tok\r\n"), "{req}");
        assert_eq!(src.url, format!("http://{addr}/status"));
        let other = StatusSource::parse("http://127.0.0.1:1/admin/status").expect("url");
        assert_eq!(other.path, "/admin/status");
        assert_eq!(other.url, "http://127.0.0.1:1/admin/status");
    }
}
