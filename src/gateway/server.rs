//! A core's executor body: its `SO_REUSEPORT` listener, the accept loop that hands each
//! connection to a task of its own, and the core's end (drain, then stop).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use glommio::net::{TcpListener, UnixStream};

use crate::error::RouteError;
use crate::gateway::reactor::{self, Reactor};
use crate::gateway::shared::Shared;
use crate::gateway::spin::Spin;
use crate::pool::LaneEndpoint;

/// Accepts connections until a stop begins.
pub async fn accept_loop(reactor: Rc<Reactor>, listener: TcpListener) {
    let shared = reactor.shared.clone();
    let max = shared.config.max_connections;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shared.stop_begun().await;
            None
        })
        .await;
        let Some(result) = accepted else { return };
        let stream = match result {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                tracing::warn!(core = reactor.id, "accept: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if reactor.conns.get() >= max {
            reactor.metrics.connection_rejected();
            glommio::spawn_local(crate::gateway::conn::reject(stream)).detach();
            continue;
        }
        reactor.conns.set(reactor.conns.get() + 1);
        shared.connections.fetch_add(1, Ordering::Relaxed);
        reactor.metrics.connection_opened();
        let r = reactor.clone();
        glommio::spawn_local(async move {
            let guard = ConnGuard(r.clone());
            let served = futures_lite::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
                crate::gateway::conn::serve(r, stream),
            ))
            .await;
            if served.is_err() {
                tracing::error!("a connection task panicked; the connection was closed");
            }
            drop(guard);
        })
        .detach();
    }
}

/// Counts a connection out however its task ends.
struct ConnGuard(Rc<Reactor>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let r = &self.0;
        r.conns.set(r.conns.get().saturating_sub(1));
        r.shared.connections.fetch_sub(1, Ordering::Relaxed);
        r.metrics.connection_closed();
    }
}

/// Everything a core thread needs.
pub struct CoreSetup {
    /// Core number.
    pub id: usize,
    /// Its lane endpoint.
    pub endpoint: LaneEndpoint,
    /// Shared state.
    pub shared: Arc<Shared>,
    /// Where to listen.
    pub addr: SocketAddr,
    /// How long the core spins before it parks (the executor is built with its idle spin).
    pub spin: Spin,
}

/// The body of a core's executor: listen, accept, serve; on a stop wait for its connections
/// (up to the drain timeout), then end.
pub async fn run(setup: CoreSetup, bound: std::sync::mpsc::Sender<Result<SocketAddr, String>>) {
    let CoreSetup {
        id,
        endpoint,
        shared,
        addr,
        spin,
    } = setup;
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            let _ = bound.send(Err(format!("cannot listen on {addr}: {e}")));
            return;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    let lane = endpoint.lane;
    let control: UnixStream = moltbot_ipc::wake::adopt_fd(endpoint.wake.into_owned_fd());
    let reactor = Rc::new(Reactor::new(id, shared.clone(), endpoint.set, spin));
    for slot in shared.pool.slots() {
        glommio::spawn_local(reactor::wake_reader(reactor.clone(), slot.clone(), lane)).detach();
    }
    let sweeper = reactor.clone();
    glommio::spawn_local(async move { sweeper.deadlines.sweep().await }).detach();
    let pump_task = glommio::spawn_local(reactor::pump(reactor.clone(), control));
    let _ = bound.send(Ok(local));
    accept_loop(reactor.clone(), listener).await;
    // Draining: connections finish their requests and close; a fast stop or the timeout cuts
    // it short.
    let deadline = Instant::now() + shared.config.drain_timeout;
    while reactor.conns.get() > 0 && !shared.stopping_fast() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    reactor.finished.set(true);
    endpoint.waker.notify();
    pump_task.await;
    // Answers a worker wrote after the pump's last round are still delivered; only what is
    // truly unanswered fails.
    let mut lanes = reactor.lanes.borrow_mut();
    lanes.poll();
    lanes.fail_all(RouteError::ShuttingDown);
}
