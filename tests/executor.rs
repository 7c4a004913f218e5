//! The executor the gateway's cores run on (glommio, vendored with local changes; see
//! `vendor/README.md`): preemption keeps working while the reactor keeps its preemption timers
//! armed across loops instead of re-arming them at each one.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

/// How long any awaited condition may take (generous: a loaded 2-core machine).
const DEADLINE: Duration = Duration::from_secs(60);

fn executor(preempt: Duration) -> LocalExecutorBuilder {
    let cpu = core_affinity::get_core_ids()
        .and_then(|ids| ids.first().map(|c| c.id))
        .unwrap_or(0);
    LocalExecutorBuilder::new(Placement::Fixed(cpu)).preempt_timer(preempt)
}

/// A task that never awaits I/O is told to yield again and again: the preemption timer is armed
/// anew after each time it fires, and the loops in between (which keep it) do not lose it.
#[test]
fn a_busy_task_is_preempted_again_after_each_preemption() {
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
