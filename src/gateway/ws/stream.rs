//! The connection's socket as the WebSocket codec reads it: reads are counted against the
//! budget a client has before it authenticates.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

/// A TCP stream whose reads stop with an error once `budget` bytes were read (`None`: no
/// budget). The codec reads ahead, so the budget bounds what an unauthenticated client can make
/// the gateway buffer, whatever its frames claim.
pub struct Metered {
    inner: TcpStream,
    budget: Rc<Cell<Option<usize>>>,
    /// Bytes the socket accepted so far: whether a blocked send makes progress.
    written: Rc<Cell<u64>>,
}

impl Metered {
    /// `inner`, read within `budget`.
    pub fn new(inner: TcpStream, budget: Rc<Cell<Option<usize>>>) -> Metered {
        Metered {
            inner,
            budget,
            written: Rc::default(),
        }
    }

    /// The count of bytes written so far, shared (it keeps counting).
    pub fn written(&self) -> Rc<Cell<u64>> {
        self.written.clone()
    }

    /// Makes the socket's close a reset (`SO_LINGER` 0): what the client has not taken is
    /// dropped at once instead of being held by the kernel while the client's window stays
    /// shut (its zero-window probes back off to two minutes).
    pub fn reset_on_close(&self) {
        let _ = rustix::net::sockopt::set_socket_linger(&self.inner, Some(Duration::ZERO));
    }
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let budget = self.budget.get();
        let want = match budget {
            Some(0) => {
                return Poll::Ready(Err(io::Error::other(
                    "read budget before authentication exhausted",
                )));
            }
            Some(b) => buf.len().min(b),
            None => buf.len(),
        };
        let polled = Pin::new(&mut self.inner).poll_read(cx, &mut buf[..want]);
        if let (Poll::Ready(Ok(n)), Some(b)) = (&polled, budget) {
            self.budget.set(Some(b.saturating_sub(*n)));
        }
        polled
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written.set(self.written.get() + *n as u64);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}
