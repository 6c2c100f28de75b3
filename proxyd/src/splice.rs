//! Moving bytes between sockets for both data planes: reads and writes driven by tokio's
//! readiness on shared references (so one task can read a socket while it writes it), a read
//! buffer, and splice(2) through a pipe so that large bodies and tunnels never pass through
//! proxyd's memory. Bodies are read from a [`Source`] and written to a [`Sink`]: two sockets
//! are spliced, anything else (a TLS stream) is copied.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, Ready};
use tokio::net::{TcpStream, UnixStream};

/// Where a body is read from.
pub trait Source: Send {
    /// Reads into `buf`; 0 at the end of the stream.
    fn read(&mut self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// The socket underneath, when bytes may be spliced from it.
    fn socket(&self) -> Option<&Socket> {
        None
    }
    /// Waits until a read would find bytes (or the end), where the source can tell.
    fn ready(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        async { Ok(()) }
    }
}

/// Where a body is written to.
pub trait Sink: Send {
    /// Writes all of `buf`.
    fn write_all(&mut self, buf: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Ends the writing side.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
    /// The socket underneath, when bytes may be spliced into it.
    fn socket(&self) -> Option<&Socket> {
        None
    }
}

impl Source for &Socket {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Socket::read(self, buf).await
    }

    async fn ready(&mut self) -> io::Result<()> {
        self.0.readable().await.map(drop)
    }

    fn socket(&self) -> Option<&Socket> {
        Some(self)
    }
}

impl Sink for &Socket {
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        Socket::write_all(self, buf).await
    }

    async fn finish(&mut self) {
        self.shutdown_write();
    }

    fn socket(&self) -> Option<&Socket> {
        Some(self)
    }
}

/// Any tokio stream (half) as a [`Source`] or [`Sink`]; its bytes are copied.
pub struct Stream<T>(pub T);

impl<T: AsyncRead + Unpin + Send> Source for Stream<T> {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).await
    }
}

impl<T: AsyncWrite + Unpin + Send> Sink for Stream<T> {
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        AsyncWriteExt::write_all(&mut self.0, buf).await
    }

    async fn finish(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

/// When bytes last moved on a connection, either way.
pub struct Activity {
    started: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// Bytes moved now.
    pub fn moved(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Ends once nothing has moved for `idle`, with the error that says so.
    pub async fn quiet(&self, idle: Duration) -> io::Error {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let since = self.started.elapsed().saturating_sub(last);
            if since >= idle {
                return io::Error::new(io::ErrorKind::TimedOut, format!("idle for {idle:?}"));
            }
            tokio::time::sleep(idle - since).await;
        }
    }
}

/// The most one read into a [`Buf`] takes.
pub const READ_SIZE: usize = 16 * 1024;
/// The most one splice moves; the pipe is grown to this size when the system allows.
const PIPE_SIZE: usize = 1 << 20;

/// A non-blocking stream socket (Unix or TCP) registered with tokio. Reads and writes take
/// `&self`, so one task can wait to read and to write at once.
pub struct Socket(AsyncFd<OwnedFd>);

impl Socket {
    /// Takes over a tokio Unix stream.
    pub fn unix(s: UnixStream) -> io::Result<Socket> {
        Socket::new(s.into_std()?.into())
    }

    /// Takes over a tokio TCP stream.
    pub fn tcp(s: TcpStream) -> io::Result<Socket> {
        Socket::new(s.into_std()?.into())
    }

    fn new(fd: OwnedFd) -> io::Result<Socket> {
        // SAFETY: the OwnedFd is open and owned by the AsyncFd for its whole life.
        unsafe { AsyncFd::register(fd) }
            .map(Socket)
            .map_err(|e| e.into_parts().1)
    }

    fn fd(&self) -> RawFd {
        self.0.get_ref().as_raw_fd()
    }

    /// Runs the non-blocking `op` until it does not block. An answer shorter than `want` means
    /// the socket had no more to give (or no more room), so its readiness is cleared without
    /// another syscall to find out.
    async fn retry(
        &self,
        interest: Interest,
        want: usize,
        mut op: impl FnMut(RawFd) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let fd = self.fd();
        loop {
            let mut guard = self.0.ready(interest).await?;
            match op(fd) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Ok(n) if n < want && n > 0 => {
                    guard.clear_ready_matching(if interest.is_readable() {
                        Ready::READABLE
                    } else {
                        Ready::WRITABLE
                    });
                    return Ok(n);
                }
                r => return r,
            }
        }
    }

    /// Reads into `buf`; 0 at the end of the stream.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len();
        self.retry(Interest::READABLE, want, |fd| {
            // SAFETY: `buf` is valid for `buf.len()` writable bytes.
            cvt(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
        })
        .await
    }

    /// Writes all of `buf`.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self
                .retry(Interest::WRITABLE, buf.len(), |fd| {
                    // SAFETY: `buf` is valid for `buf.len()` readable bytes.
                    cvt(unsafe {
                        libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL)
                    })
                })
                .await?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Ends the writing side (the peer reads the end of the stream).
    pub fn shutdown_write(&self) {
        // SAFETY: a plain syscall on a valid descriptor.
        unsafe { libc::shutdown(self.fd(), libc::SHUT_WR) };
    }

    /// Whether an idle pooled connection is still usable: open, and nothing unasked for
    /// waiting.
    pub fn idle_and_open(&self) -> bool {
        let mut b = [0u8; 1];
        // SAFETY: `b` is valid for one writable byte.
        let n = unsafe {
            libc::recv(
                self.fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }
}

fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `fut`, or a `TimedOut` error after `idle`.
async fn within<T>(idle: Duration, fut: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(idle, fut).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("idle for {idle:?}"),
        ))
    })
}

/// Bytes read from a socket and not yet used: a head being parsed, and what came after it.
/// It is allocated when the first bytes arrive, at one read's size, and grows only for a head
/// that does not fit, so an idle connection costs no buffer and a busy one little memory.
pub struct Buf {
    data: Vec<u8>,
    cap: usize,
    start: usize,
    end: usize,
}

impl Buf {
    /// An empty buffer holding at most `cap` bytes.
    pub fn new(cap: usize) -> Buf {
        Buf {
            data: Vec::new(),
            cap,
            start: 0,
            end: 0,
        }
    }

    /// The unused bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Marks `n` bytes used.
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Whether the buffer cannot take more.
    pub fn is_full(&self) -> bool {
        self.start == 0 && self.end == self.cap
    }

    /// Reads more from `s`, at most [`READ_SIZE`] bytes so that a body following a head is
    /// mostly left for splicing; returns how many bytes came (0 at the end of the stream).
    pub async fn fill(&mut self, s: &mut impl Source) -> io::Result<usize> {
        if self.data.is_empty() {
            // An idle connection holds no buffer until its peer sends something.
            s.ready().await?;
        }
        if self.data.len() - self.end < READ_SIZE {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.data.len() - self.end < READ_SIZE && self.data.len() < self.cap {
            let grown = (self.data.len() * 2).max(READ_SIZE).min(self.cap);
            self.data.resize(grown, 0);
        }
        let room = (self.data.len() - self.end).min(READ_SIZE);
        let n = s.read(&mut self.data[self.end..self.end + room]).await?;
        self.end += n;
        Ok(n)
    }
}

/// A pipe for splice(2), both ends non-blocking.
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    /// A new pipe, as large as the system allows up to 1 MiB.
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two fresh descriptors that nothing else owns.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: a plain fcntl; a refusal leaves the default size, which also works.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(Pipe { r, w })
    }

    /// Moves up to `max` bytes from `from` into the pipe (which must be empty); 0 at the end of
    /// the stream.
    async fn fill(&self, from: &Socket, max: u64, idle: Duration) -> io::Result<usize> {
        let w = self.w.as_raw_fd();
        let len = max.min(PIPE_SIZE as u64) as usize;
        within(
            idle,
            from.retry(Interest::READABLE, len, |fd| splice(fd, w, len)),
        )
        .await
    }

    /// Moves the `n` bytes in the pipe to `to`.
    async fn drain(&self, to: &Socket, mut n: usize, idle: Duration) -> io::Result<()> {
        let r = self.r.as_raw_fd();
        while n > 0 {
            n -= within(idle, to.retry(Interest::WRITABLE, n, |fd| splice(r, fd, n))).await?;
        }
        Ok(())
    }

    /// Moves exactly `n` bytes from `from` to `to`; `idle` bounds each wait.
    pub async fn exact(
        &self,
        from: &Socket,
        to: &Socket,
        mut n: u64,
        idle: Duration,
    ) -> io::Result<()> {
        while n > 0 {
            let got = self.fill(from, n, idle).await?;
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.drain(to, got, idle).await?;
            n -= got as u64;
        }
        Ok(())
    }

    /// Moves everything `from` sends to `to`, then ends `to`'s writing side; returns the count.
    pub async fn to_end(&self, from: &Socket, to: &Socket, idle: Duration) -> io::Result<u64> {
        self.paced(from, to, idle, |_| Duration::ZERO).await
    }

    /// As [`Pipe::to_end`], and after each chunk waits as long as `pause` says for its size
    /// (a byte budget).
    pub async fn paced(
        &self,
        from: &Socket,
        to: &Socket,
        idle: Duration,
        mut pause: impl FnMut(usize) -> Duration,
    ) -> io::Result<u64> {
        let mut total = 0;
        loop {
            let got = self.fill(from, u64::MAX, idle).await?;
            if got == 0 {
                to.shutdown_write();
                return Ok(total);
            }
            self.drain(to, got, idle).await?;
            total += got as u64;
            let owed = pause(got);
            if !owed.is_zero() {
                tokio::time::sleep(owed).await;
            }
        }
    }
}

/// Splices `a` and `b` together both ways until both have finished, nothing has moved either way
/// for `idle` (a download to a silent client is not idle), or `limit` has passed. `pace` hears of
/// each chunk, `true` for a→b, and says how long to wait before the next one that way. Returns
/// the bytes carried (a→b, b→a).
pub async fn both_ways(
    a: &Socket,
    b: &Socket,
    idle: Duration,
    limit: Duration,
    pace: impl Fn(bool, usize) -> Duration,
) -> io::Result<(u64, u64)> {
    let (there, back) = (Pipe::new()?, Pipe::new()?);
    let activity = Activity::default();
    let moved = |there: bool, n: usize| {
        activity.moved();
        pace(there, n)
    };
    let carried = async {
        tokio::try_join!(
            there.paced(a, b, limit, |n| moved(true, n)),
            back.paced(b, a, limit, |n| moved(false, n)),
        )
    };
    let ended = async {
        tokio::select! {
            r = carried => r,
            e = activity.quiet(idle) => Err(e),
        }
    };
    tokio::time::timeout(limit, ended).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the connection lived longer than {limit:?}"),
        )
    })?
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the call; null offsets mean "the current position".
    cvt(unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    })
}
