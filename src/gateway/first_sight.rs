//! First assignments of users, batched per core.
//!
//! A user's first request appends to the routing table and fsyncs it, off the reactor on
//! glommio's blocking thread (one per core). Sent there one by one, a burst of new users would
//! queue for one fsync each; instead the first sights that arrive while a batch is being
//! persisted wait together and go as the next batch, with one fsync
//! ([`StickyRouter::route_many`]).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use crate::error::RouteError;
use crate::router::StickyRouter;

type Waiter = (String, oneshot::Sender<Result<usize, RouteError>>);

/// One core's queue of users waiting for their first assignment.
#[derive(Default)]
pub struct FirstSight {
    /// Users waiting for the next batch, with where to send each result.
    waiting: RefCell<Vec<Waiter>>,
    /// A task is persisting batches (and takes the waiting ones when it is done).
    running: Cell<bool>,
}

impl FirstSight {
    /// The slot of `user`, assigned (and persisted) with the other first sights of its batch.
    pub async fn route(
        self: &Rc<Self>,
        router: &Arc<StickyRouter>,
        user: String,
    ) -> Result<usize, RouteError> {
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().push((user, tx));
        if !self.running.replace(true) {
            glommio::spawn_local(self.clone().persist(router.clone())).detach();
        }
        rx.await.unwrap_or_else(|_| {
            Err(RouteError::Internal(
                "the first assignment was abandoned".into(),
            ))
        })
    }

    /// Persists batches until no user waits.
    async fn persist(self: Rc<Self>, router: Arc<StickyRouter>) {
        loop {
            let batch = std::mem::take(&mut *self.waiting.borrow_mut());
            if batch.is_empty() {
                self.running.set(false);
                return;
            }
            let (users, senders): (Vec<String>, Vec<_>) = batch.into_iter().unzip();
            let r = router.clone();
            let (results, users) = glommio::executor()
                .spawn_blocking(move || {
                    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
                    (r.route_many(&refs), users)
                })
                .await;
            let mut logged = false;
            for ((tx, result), user) in senders.into_iter().zip(results).zip(&users) {
                let result = result.map_err(RouteError::from);
                if let Err(e) = &result {
                    // A full table is the configured limit at work (and any client can provoke
                    // it): not logged. A failure to persist is, once per batch.
                    if !matches!(
                        e,
                        RouteError::UserLimit(_)
                            | RouteError::CellsTaken(_)
                            | RouteError::InvalidUser(_)
                    ) && !logged
                    {
                        tracing::error!(user, "routing table: {e}");
                        logged = true;
                    }
                }
                let _ = tx.send(result);
            }
        }
    }
}
