//! Where worker processes run (`worker_placement`): beside the gateway's cores while they are
//! light, on the other CPUs while they are busy.
//!
//! A request handed to a worker over its ring wakes the worker wherever the scheduler puts it.
//! Where the workers share the CPUs with the gateway's cores, that is often another CPU than
//! the core's, and each hand-over then wakes a CPU and is answered across CPUs again (an
//! inter-processor interrupt each way, an exit to the hypervisor on a VM). On the core's own
//! CPU a hand-over is a switch between two processes. A worker that keeps a CPU busy, though,
//! would take the core's time from every other user's requests: the monitor moves it to the
//! CPUs no core runs on, and back once it has quietened. The programs workers start (an agent
//! program, a cell) do their users' real work and run on those other CPUs from the start.
//!
//! This is a performance policy, not a boundary: a process may change its own affinity, and a
//! worker that does so only changes where it runs (its CPU time is bounded by nothing here).

use std::time::{Duration, Instant};

use crate::config::{Config, WorkerPlacement};

/// A side of the machine a worker runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The gateway cores' CPUs.
    Cores,
    /// The CPUs no gateway core runs on.
    Spare,
}

impl Side {
    /// `cores` or `spare`, as `/status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Cores => "cores",
            Side::Spare => "spare",
        }
    }

    /// The side's code in a slot's stats (0 is "anywhere").
    pub fn code(self) -> u8 {
        match self {
            Side::Cores => 1,
            Side::Spare => 2,
        }
    }
}

/// The name of a side's [`Side::code`]; `None` for 0 (anywhere).
pub fn side_name(code: u8) -> Option<&'static str> {
    match code {
        1 => Some(Side::Cores.as_str()),
        2 => Some(Side::Spare.as_str()),
        _ => None,
    }
}

/// The CPUs this thread may run on (its affinity mask), in order; if the mask cannot be
/// read, the first `available_parallelism` CPUs.
pub fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect(),
        Err(_) => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    }
}

/// The CPUs of each side, where placement applies.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// The gateway cores' CPUs.
    cores: Vec<usize>,
    /// The other CPUs the gateway may use (never empty).
    spare: Vec<usize>,
    /// The share of one CPU above which a worker is busy.
    busy_share: f64,
}

impl Placement {
    /// The placement of the workers of a gateway whose cores run on `cores`, of the
    /// `available` CPUs; `None` where the workers run anywhere: `worker_placement = any`, CPUs
    /// enough for every core and worker to have one (the workers then spin on their own, see
    /// `worker_spin`), or no CPU left beside the cores.
    pub fn new(config: &Config, cores: &[usize], available: &[usize]) -> Option<Placement> {
        if config.worker_placement == WorkerPlacement::Any
            || available.len() > cores.len().saturating_add(config.worker_count)
        {
            return None;
        }
        let spare: Vec<usize> = available
            .iter()
            .copied()
            .filter(|c| !cores.contains(c))
            .collect();
        if spare.is_empty() || cores.is_empty() {
            return None;
        }
        Some(Placement {
            cores: cores.to_vec(),
            spare,
            busy_share: config.worker_busy_share,
        })
    }

    /// The CPUs of `side`.
    pub fn cpus(&self, side: Side) -> &[usize] {
        match side {
            Side::Cores => &self.cores,
            Side::Spare => &self.spare,
        }
    }

    /// The share of one CPU above which a worker is busy.
    pub fn busy_share(&self) -> f64 {
        self.busy_share
    }
}

/// What a look at a worker's CPU time spans, at least.
pub const WINDOW: Duration = Duration::from_secs(1);

/// A quiet worker comes back beside the cores below this fraction of the busy share: a gap,
/// so that a worker near the threshold does not move at every look.
const RETURN_FRACTION: f64 = 0.4;

/// One worker's CPU use from look to look, and the side it is on.
#[derive(Debug)]
pub struct Occupancy {
    /// Where the worker runs.
    side: Side,
    /// The last look: when, and the worker's CPU time then.
    last: Option<(Instant, Duration)>,
}

impl Occupancy {
    /// A worker that is starting: busy (exec, loading, confining itself), on the spare CPUs.
    pub fn starting() -> Occupancy {
        Occupancy {
            side: Side::Spare,
            last: None,
        }
    }

    /// The worker serves: it moves beside the cores, and its CPU use counts from here.
    pub fn serving(&mut self) -> Side {
        self.side = Side::Cores;
        self.last = None;
        self.side
    }

    /// Where the worker runs.
    pub fn side(&self) -> Side {
        self.side
    }

    /// True when a look at `now` spans a whole window (or is the first).
    pub fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|(at, _)| now.saturating_duration_since(at) >= WINDOW)
    }

    /// Records the worker's CPU time `used` (all its threads) at `now`; returns the side it
    /// must move to, if its share of one CPU since the last look says so.
    pub fn look(&mut self, now: Instant, used: Duration, busy_share: f64) -> Option<Side> {
        let last = self.last.replace((now, used));
        let (at, before) = last?;
        let span = now.saturating_duration_since(at);
        if span.is_zero() {
            return None;
        }
        let share = used.saturating_sub(before).as_secs_f64() / span.as_secs_f64();
        let to = match self.side {
            Side::Cores if share > busy_share => Side::Spare,
            Side::Spare if share < busy_share * RETURN_FRACTION => Side::Cores,
            _ => return None,
        };
        self.side = to;
        Some(to)
    }
}

/// The most threads [`move_process`] moves: a worker that makes threads without end must not
/// make the monitor call the kernel without end.
pub const MAX_THREADS: usize = 1024;

/// Moves every thread of process `pid` (at most [`MAX_THREADS`]) to `cpus`; returns how many
/// it moved. A thread created while this runs inherits its creator's mask, old or new: the
/// next move corrects it.
pub fn move_process(pid: u32, cpus: &[usize]) -> std::io::Result<usize> {
    let set = moltbot_ipc::process::cpu_set(cpus)
        .ok_or_else(|| std::io::Error::other("no CPU to move to"))?;
    let mut moved = 0;
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))?;
    for task in tasks.flatten().take(MAX_THREADS) {
        let tid = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw);
        // A thread that ended meanwhile is not an error.
        if let Some(tid) = tid
            && rustix::thread::sched_setaffinity(Some(tid), &set).is_ok()
        {
            moved += 1;
        }
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(workers: usize, placement: WorkerPlacement) -> Config {
        Config {
            worker_count: workers,
            worker_placement: placement,
            ..Config::default()
        }
    }

    #[test]
    fn placement_applies_only_where_workers_share_cpus_with_the_cores() {
        let p = Placement::new(&config(3, WorkerPlacement::Auto), &[0], &[0, 1]).unwrap();
        assert_eq!(p.cpus(Side::Cores), [0]);
        assert_eq!(p.cpus(Side::Spare), [1]);
        assert_eq!(p.busy_share(), 0.5);
        let p =
            Placement::new(&config(8, WorkerPlacement::Auto), &[2, 5], &[0, 2, 4, 5, 7]).unwrap();
        assert_eq!(
            (p.cpus(Side::Cores), p.cpus(Side::Spare)),
            (&[2, 5][..], &[0, 4, 7][..])
        );
        // `any`; a CPU for every core and worker; no CPU beside the cores.
        assert!(Placement::new(&config(3, WorkerPlacement::Any), &[0], &[0, 1]).is_none());
        assert!(Placement::new(&config(2, WorkerPlacement::Auto), &[0], &[0, 1, 2, 3]).is_none());
        assert!(Placement::new(&config(3, WorkerPlacement::Auto), &[0, 1], &[0, 1]).is_none());
        assert!(Placement::new(&config(3, WorkerPlacement::Auto), &[], &[0, 1]).is_none());
        // Exactly as many CPUs as cores and workers: they share.
        assert!(Placement::new(&config(3, WorkerPlacement::Auto), &[0], &[0, 1, 2, 3]).is_some());
    }

    #[test]
    fn a_busy_worker_moves_to_the_spare_cpus_and_back_once_quiet() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let cpu = |ms: u64| Duration::from_millis(ms);
        let mut o = Occupancy::starting();
        assert_eq!(o.side(), Side::Spare);
        assert_eq!(o.serving(), Side::Cores);
        assert_eq!(o.side(), Side::Cores);
        assert!(o.due(t0));
        // The first look has nothing to compare with.
        assert_eq!(o.look(at(0), cpu(0), 0.5), None);
        assert!(!o.due(at(0) + WINDOW / 2) && o.due(at(1)));
        // 40% of a CPU: light. 70%: busy.
        assert_eq!(o.look(at(1), cpu(400), 0.5), None);
        assert_eq!(o.look(at(2), cpu(1100), 0.5), Some(Side::Spare));
        assert_eq!(o.side(), Side::Spare);
        // Busy still, then between the two thresholds: it stays.
        assert_eq!(o.look(at(3), cpu(2000), 0.5), None);
        assert_eq!(o.look(at(4), cpu(2300), 0.5), None);
        // Below two fifths of the busy share: back.
        assert_eq!(o.look(at(5), cpu(2450), 0.5), Some(Side::Cores));
        // A look at the same instant, or a clock that went back, decides nothing.
        assert_eq!(o.look(at(5), cpu(9000), 0.5), None);
        // Several threads can use more than one CPU: still busy.
        assert_eq!(o.look(at(6), cpu(11_000), 0.5), Some(Side::Spare));
        // Serving again (a successor) starts a new count beside the cores.
        assert_eq!(o.serving(), Side::Cores);
        assert!(o.due(at(6)));
        assert_eq!(o.look(at(7), cpu(0), 0.5), None);
    }

    #[test]
    fn moving_a_process_sets_its_cpus() {
        let allowed = allowed_cpus();
        // Every thread of a real worker is checked by tests/placement.rs.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let last = *allowed.last().unwrap();
        assert_eq!(move_process(child.id(), &[last]).unwrap(), 1);
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("Cpus_allowed_list:"))
            .unwrap();
        assert_eq!(
            line.split_whitespace().nth(1),
            Some(last.to_string().as_str())
        );
        assert!(move_process(child.id(), &[]).is_err());
        let _ = child.kill();
        let _ = child.wait();
        assert!(move_process(u32::MAX, &[last]).is_err());
    }

    #[test]
    fn a_move_stops_at_the_thread_limit() {
        // A process with more threads than the limit (Python, as the agent tests use).
        let script = "import threading, time\n\
                      for _ in range(1100):\n    \
                      threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n\
                      print('ready', flush=True)\n\
                      time.sleep(60)\n";
        let mut child = std::process::Command::new("/usr/bin/python3")
            .args(["-c", script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready");
        assert_eq!(
            move_process(child.id(), &allowed_cpus()).unwrap(),
            MAX_THREADS
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}
