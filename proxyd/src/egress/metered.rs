//! An upstream connection that counts what it carries against its VM, waits out the VM's byte
//! budget after each read and write, and marks the connection's activity: what a forwarded
//! request gets that a spliced tunnel gets from [`crate::splice::both_ways`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::routes::Vm;
use crate::splice::Activity;

/// `io`, metered for `vm`.
pub struct Metered<T> {
    io: T,
    vm: Arc<Vm>,
    activity: Arc<Activity>,
    read_pause: Option<Pin<Box<Sleep>>>,
    write_pause: Option<Pin<Box<Sleep>>>,
}

impl<T> Metered<T> {
    /// Meters `io` for `vm`, marking `activity`.
    pub fn new(io: T, vm: Arc<Vm>, activity: Arc<Activity>) -> Metered<T> {
        Metered {
            io,
            vm,
            activity,
            read_pause: None,
            write_pause: None,
        }
    }
}

/// Waits out a pause owed, if any.
fn paused(pause: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> Poll<()> {
    if let Some(p) = pause {
        ready!(p.as_mut().poll(cx));
        *pause = None;
    }
    Poll::Ready(())
}

/// Counts `n` bytes carried; returns the pause they cost.
fn carried(m: &Metered<impl Sized>, outbound: bool, n: usize) -> Option<Pin<Box<Sleep>>> {
    m.activity.moved();
    let owed = m.vm.carried(outbound, n);
    (!owed.is_zero()).then(|| Box::pin(tokio::time::sleep(owed)))
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(paused(&mut this.read_pause, cx));
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read_pause = carried(this, false, n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(paused(&mut this.write_pause, cx));
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        if n > 0 {
            this.write_pause = carried(this, true, n);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
