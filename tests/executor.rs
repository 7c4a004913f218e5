//! The executor the gateway's cores run on (glommio, vendored with local changes; see
//! `vendor/README.md`): preemption keeps working while the reactor keeps its preemption timers
//! armed across loops instead of re-arming them at each one, and I/O completions do not
//! interrupt a running executor.

use std::cell::Cell;
use std::io::{Read, Write};
use std::rc::Rc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::{LocalExecutorBuilder, Placement};

/// How long any awaited condition may take (generous: a loaded 2-core machine).
const DEADLINE: Duration = Duration::from_secs(60);

/// The tests here share the first CPU; one at a time, so that none takes it from another.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn first_cpu() -> usize {
    core_affinity::get_core_ids()
        .and_then(|ids| ids.first().map(|c| c.id))
        .unwrap_or(0)
}

fn executor(preempt: Duration) -> LocalExecutorBuilder {
    LocalExecutorBuilder::new(Placement::Fixed(first_cpu())).preempt_timer(preempt)
}

/// A task that never awaits I/O is told to yield again and again: the preemption timer is armed
/// anew after each time it fires, and the loops in between (which keep it) do not lose it.
#[test]
fn a_busy_task_is_preempted_again_after_each_preemption() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const PREEMPTIONS: u32 = 20;
    let seen = executor(Duration::from_millis(2))
        .spawn(|| async {
            let deadline = Instant::now() + DEADLINE;
            let mut seen = 0;
            while seen < PREEMPTIONS && Instant::now() < deadline {
                if glommio::executor().need_preempt() {
                    seen += 1;
                    glommio::yield_if_needed().await;
                }
            }
            seen
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(seen, PREEMPTIONS);
}

/// While one task only yields when preempted, another task's timer still fires and runs: the
/// executor goes back to its reactor at each preemption, and the busy task sees the other's
/// progress.
#[test]
fn a_timer_runs_beside_a_task_that_yields_only_when_preempted() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const TICKS: u32 = 10;
    let ticks = executor(Duration::from_millis(2))
        .spawn(|| async {
            let ticks = Rc::new(Cell::new(0));
            let t = ticks.clone();
            let ticker = glommio::spawn_local(async move {
                for _ in 0..TICKS {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                    t.set(t.get() + 1);
                }
            })
            .detach();
            let deadline = Instant::now() + DEADLINE;
            while ticks.get() < TICKS && Instant::now() < deadline {
                glommio::yield_if_needed().await;
            }
            ticker.await;
            ticks.get()
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(ticks, TICKS);
}

/// An executor that goes idle between short timers sleeps and wakes for each: the preemption
/// timer it keeps while busy never stands in for the timer it sleeps on.
#[test]
fn short_sleeps_between_bursts_of_work_all_end() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const SLEEPS: u32 = 200;
    let (done, ended) = std::sync::mpsc::channel();
    let ex = executor(Duration::from_millis(100))
        .spawn(move || async move {
            for i in 0..SLEEPS {
                // A little work, then a sleep far shorter than the preemption timer.
                let mut x = i;
                for _ in 0..1_000 {
                    x = x.wrapping_mul(31).wrapping_add(7);
                }
                std::hint::black_box(x);
                glommio::timer::sleep(Duration::from_micros(100)).await;
                done.send(i).unwrap();
            }
        })
        .unwrap();
    for i in 0..SLEEPS {
        assert_eq!(ended.recv_timeout(DEADLINE), Ok(i), "sleep {i} never ended");
    }
    ex.join().unwrap();
}

/// The reschedule interrupts `cpu` has taken since boot (`RES` in `/proc/interrupts`), where the
/// kernel counts them.
fn reschedule_interrupts(cpu: usize) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/interrupts").ok()?;
    let mut lines = text.lines();
    let column = lines
        .next()?
        .split_whitespace()
        .position(|h| h == format!("CPU{cpu}"))?;
    let res = lines.find(|l| l.trim_start().starts_with("RES:"))?;
    res.split_whitespace().nth(1 + column)?.parse().ok()
}

/// A socket completion does not interrupt an executor that is running (here: spinning before
/// it parks). Without `IORING_SETUP_COOP_TASKRUN` on the main ring, io_uring completes the poll
/// armed on the socket by queueing task work to the executor's thread and kicking that thread
/// with an inter-processor interrupt, one per message a peer on another CPU sends; with it, the
/// spinning executor sees `IORING_SQ_TASKRUN` and enters the kernel itself. A ping-pong with a
/// peer pinned to another CPU counts the reschedule interrupts of the executor's CPU.
#[test]
fn socket_completions_do_not_interrupt_a_running_executor() {
    const PINGS: u64 = 2_000;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cpus = core_affinity::get_core_ids().unwrap_or_default();
    let cpu = first_cpu();
    let Some(peer_cpu) = cpus.iter().find(|c| c.id != cpu).copied() else {
        eprintln!("skipped: one CPU, no other CPU for the peer");
        return;
    };
    if reschedule_interrupts(cpu).is_none() {
        eprintln!("skipped: /proc/interrupts has no RES line");
        return;
    }
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let ex = LocalExecutorBuilder::new(Placement::Fixed(cpu))
        // Spinning, the executor runs in user space whenever the peer's ping arrives.
        .spin_before_park(Duration::from_secs(5))
        .spawn(move || async move {
            let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            port_tx.send(listener.local_addr().unwrap().port()).unwrap();
            let mut stream = listener.accept().await.unwrap();
            let mut byte = [0u8; 1];
            while stream.read_exact(&mut byte).await.is_ok() {
                if stream.write_all(&byte).await.is_err() {
                    break;
                }
            }
        })
        .unwrap();
    let port = port_rx.recv_timeout(DEADLINE).unwrap();
    let peer = std::thread::spawn(move || {
        assert!(core_affinity::set_for_current(peer_cpu));
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut ping = |n: u64| {
            let mut byte = [0u8; 1];
            for i in 0..n {
                stream.write_all(&[i as u8]).unwrap();
                stream.read_exact(&mut byte).unwrap();
                assert_eq!(byte[0], i as u8);
            }
        };
        ping(100);
        let before = reschedule_interrupts(cpu).unwrap();
        ping(PINGS);
        let after = reschedule_interrupts(cpu).unwrap();
        after - before
    });
    let interrupts = peer.join().unwrap();
    ex.join().unwrap();
    assert!(
        interrupts < PINGS / 4,
        "{interrupts} reschedule interrupts on CPU {cpu} for {PINGS} pings"
    );
}
