//! The byte transport under both protocols: a non-blocking unix or TCP
//! socket where every wait has a deadline.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use crate::addr::MonitorAddr;
use crate::error::{Error, Result};
use crate::telnet::Telnet;

const SOCKET: Token = Token(0);

/// How often a missing or busy socket is tried again while waiting for it.
/// There is no event for "a socket file appeared and accepts", so this polls
/// the thing itself, within the caller's deadline.
const CONNECT_RETRY: Duration = Duration::from_millis(5);

/// What a wait is for, so that a timeout can say so.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wait<'a> {
    pub deadline: Instant,
    pub timeout: Duration,
    pub what: &'a str,
    pub hint: &'static str,
}

impl<'a> Wait<'a> {
    pub fn new(timeout: Duration, what: &'a str) -> Self {
        Wait {
            deadline: Instant::now() + timeout,
            timeout,
            what,
            hint: "",
        }
    }

    pub fn hint(mut self, hint: &'static str) -> Self {
        self.hint = hint;
        self
    }
}

/// The socket under a session: unix (a path or an abstract name) or TCP.
#[derive(Debug)]
enum Stream {
    Unix(mio::net::UnixStream),
    Tcp(mio::net::TcpStream),
}

impl Stream {
    fn connect(addr: &MonitorAddr) -> io::Result<Stream> {
        match addr {
            MonitorAddr::Tcp { host, port } => {
                use std::net::ToSocketAddrs;
                let mut last = None;
                for sa in (host.as_str(), *port).to_socket_addrs()? {
                    match std::net::TcpStream::connect_timeout(&sa, TCP_CONNECT_TIMEOUT) {
                        Ok(s) => {
                            // One small command and its reply per round trip:
                            // Nagle's algorithm would only add delay.
                            s.set_nodelay(true)?;
                            s.set_nonblocking(true)?;
                            return Ok(Stream::Tcp(mio::net::TcpStream::from_std(s)));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "the host name has no address")
                }))
            }
            _ => {
                let sockaddr = addr.socket_addr()?;
                mio::net::UnixStream::connect_addr(&sockaddr).map(Stream::Unix)
            }
        }
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    fn into_socket(self) -> Socket {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: each raw fd comes straight from the stream that owned it.
        match self {
            Stream::Unix(s) => Socket::Unix(unsafe {
                std::os::unix::net::UnixStream::from_raw_fd(s.into_raw_fd())
            }),
            Stream::Tcp(s) => {
                Socket::Tcp(unsafe { std::net::TcpStream::from_raw_fd(s.into_raw_fd()) })
            }
        }
    }
}

impl std::os::fd::AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => {
                let n = s.read(buf)?;
                quick_ack(std::os::fd::AsRawFd::as_raw_fd(s));
                Ok(n)
            }
        }
    }
}

/// Acknowledges what was read at once. QEMU's monitor writes its echo a byte
/// or a few at a time without TCP_NODELAY: each small write waits for the
/// ACK of the previous one, and a delayed ACK (up to 40 ms) would stall every
/// command. Linux turns quick ACKs off again by itself, hence after each read.
fn quick_ack(fd: std::os::fd::RawFd) {
    let on: libc::c_int = 1;
    // SAFETY: fd is an open TCP socket and the option value a valid c_int.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl mio::event::Source for Stream {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.register(registry, token, interests),
            Stream::Tcp(s) => s.register(registry, token, interests),
        }
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.reregister(registry, token, interests),
            Stream::Tcp(s) => s.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.deregister(registry),
            Stream::Tcp(s) => s.deregister(registry),
        }
    }
}

/// A monitor connection handed over as a plain non-blocking socket, for a
/// caller that drives it itself (a terminal session relaying bytes both ways).
#[derive(Debug)]
pub enum Socket {
    /// A unix socket (a path or an abstract name).
    Unix(std::os::unix::net::UnixStream),
    /// A TCP connection.
    Tcp(std::net::TcpStream),
}

impl Socket {
    /// Half-closes: QEMU reads what was sent, then sees the end of input.
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.shutdown(Shutdown::Write),
            Socket::Tcp(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl std::os::fd::AsRawFd for Socket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Socket::Unix(s) => s.as_raw_fd(),
            Socket::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => {
                let n = s.read(buf)?;
                quick_ack(std::os::fd::AsRawFd::as_raw_fd(s));
                Ok(n)
            }
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How long a TCP connect may take before it counts as failed (then retried
/// within the caller's wait, if any).
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected monitor socket with an input buffer.
#[derive(Debug)]
pub(crate) struct Connection {
    stream: Stream,
    poll: Poll,
    events: Events,
    pub addr: MonitorAddr,
    buf: Vec<u8>,
    /// Where the next pattern search may start: bytes before it were searched.
    scanned: usize,
    eof: bool,
    /// Where a telnet command that a read cut in two stands.
    telnet: Telnet,
    /// The socket is a mux chardev shared with a console: descriptors sent
    /// on it do not reach the monitor.
    pub mux: bool,
}

impl Connection {
    /// Connects, retrying a missing, refusing or busy socket until `wait` runs out.
    pub fn connect(addr: &MonitorAddr, wait: Option<Duration>) -> Result<Self> {
        let start = Instant::now();
        let stream = loop {
            match Stream::connect(addr) {
                Ok(s) => break s,
                Err(e) => {
                    let retryable = matches!(
                        e.kind(),
                        io::ErrorKind::NotFound
                            | io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::WouldBlock
                    );
                    match wait {
                        Some(w) if retryable && start.elapsed() < w => {
                            std::thread::sleep(CONNECT_RETRY)
                        }
                        Some(w) if retryable => {
                            return Err(Error::SocketWait {
                                addr: addr.clone(),
                                waited: w,
                                source: e,
                            })
                        }
                        _ => {
                            return Err(Error::Connect {
                                addr: addr.clone(),
                                source: e,
                            })
                        }
                    }
                }
            }
        };
        let io_err = |source| Error::Io {
            addr: addr.clone(),
            source,
        };
        let poll = Poll::new().map_err(io_err)?;
        let mut conn = Connection {
            stream,
            poll,
            events: Events::with_capacity(4),
            addr: addr.clone(),
            buf: Vec::with_capacity(4096),
            scanned: 0,
            eof: false,
            telnet: Telnet::default(),
            mux: false,
        };
        conn.poll
            .registry()
            .register(
                &mut conn.stream,
                SOCKET,
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(io_err)?;
        Ok(conn)
    }

    /// A connection QEMU made to a listening socket of ours.
    pub fn from_unix(stream: mio::net::UnixStream, addr: MonitorAddr) -> io::Result<Self> {
        let mut conn = Connection {
            stream: Stream::Unix(stream),
            poll: Poll::new()?,
            events: Events::with_capacity(4),
            addr,
            buf: Vec::with_capacity(4096),
            scanned: 0,
            eof: false,
            telnet: Telnet::default(),
            mux: false,
        };
        conn.poll.registry().register(
            &mut conn.stream,
            SOCKET,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        Ok(conn)
    }

    /// Gives up the socket, with the bytes read and not yet consumed.
    pub(crate) fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.stream)
    }

    pub fn into_socket(mut self) -> (Socket, Vec<u8>) {
        let _ = self.poll.registry().deregister(&mut self.stream);
        (self.stream.into_socket(), self.buf)
    }

    fn io_error(&self, source: io::Error) -> Error {
        Error::Io {
            addr: self.addr.clone(),
            source,
        }
    }

    fn timeout(&self, wait: &Wait) -> Error {
        Error::Timeout {
            addr: self.addr.clone(),
            what: wait.what.to_string(),
            timeout: wait.timeout,
            hint: wait.hint,
        }
    }

    /// Blocks until the socket may be ready or the deadline passes.
    fn poll_until(&mut self, wait: &Wait) -> Result<()> {
        let now = Instant::now();
        if now >= wait.deadline {
            return Err(self.timeout(wait));
        }
        match self.poll.poll(&mut self.events, Some(wait.deadline - now)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(self.io_error(e)),
        }
    }

    /// Reads whatever is available into the buffer; waits for data if none is.
    /// Returns false at end of stream.
    fn fill(&mut self, wait: &Wait) -> Result<bool> {
        // Monitor traffic comes in small messages; a small buffer also keeps
        // the stack a short-lived client touches (each page a fault) small.
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.telnet.filter(&chunk[..n], &mut self.buf);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.poll_until(wait)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.eof = true;
                    return Ok(false);
                }
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }

    /// Reads until `pattern` arrives and returns everything up to and including it.
    pub fn read_through(&mut self, pattern: &[u8], wait: &Wait) -> Result<Vec<u8>> {
        loop {
            if let Some(end) = self.find(pattern) {
                self.scanned = 0;
                return Ok(self.buf.drain(..end).collect());
            }
            if self.eof || !self.fill(wait)? {
                return Err(Error::Closed {
                    addr: self.addr.clone(),
                    what: wait.what.to_string(),
                    received: String::from_utf8_lossy(&self.buf).into_owned(),
                });
            }
        }
    }

    /// The end of the first `pattern` in the buffer, searching only new bytes.
    fn find(&mut self, pattern: &[u8]) -> Option<usize> {
        let from = self.scanned.saturating_sub(pattern.len() - 1);
        let found = self.buf[from..]
            .windows(pattern.len())
            .position(|w| w == pattern)
            .map(|i| from + i + pattern.len());
        if found.is_none() {
            self.scanned = self.buf.len();
        }
        found
    }

    /// Drops the first `n` buffered bytes: a caller that parsed them.
    pub fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
        self.scanned = 0;
    }

    /// The error for a stream that ended while waiting for `wait`.
    pub fn closed(&self, wait: &Wait) -> Error {
        Error::Closed {
            addr: self.addr.clone(),
            what: wait.what.to_string(),
            received: String::from_utf8_lossy(&self.buf).into_owned(),
        }
    }

    /// Reads more into the buffer (for callers deciding on partial data).
    pub fn read_more(&mut self, wait: &Wait) -> Result<bool> {
        if self.eof {
            return Ok(false);
        }
        self.fill(wait)
    }

    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    pub fn write_all(&mut self, mut data: &[u8], wait: &Wait) -> Result<()> {
        while !data.is_empty() {
            match self.stream.write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Keep reading while we wait, so a peer that echoes what
                    // it reads is never blocked on us.
                    let mut chunk = [0u8; 16 * 1024];
                    match self.stream.read(&mut chunk) {
                        Ok(0) => self.eof = true,
                        Ok(n) => self.telnet.filter(&chunk[..n], &mut self.buf),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.poll_until(wait)?,
                        Err(_) => {}
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return Err(Error::Closed {
                        addr: self.addr.clone(),
                        what: wait.what.to_string(),
                        received: String::from_utf8_lossy(&self.buf).into_owned(),
                    })
                }
                Err(e) => return Err(self.io_error(e)),
            }
        }
        Ok(())
    }

    /// Whether descriptors sent with a message reach QEMU's monitor: on a
    /// unix socket that is no mux.
    pub fn passes_fds(&self) -> bool {
        matches!(self.stream, Stream::Unix(_)) && !self.mux
    }

    /// Both ends' addresses of a TCP connection.
    pub fn tcp_addrs(&self) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
        match &self.stream {
            Stream::Tcp(s) => Some((s.local_addr().ok()?, s.peer_addr().ok()?)),
            Stream::Unix(_) => None,
        }
    }

    /// The process on the other end (the QEMU serving this monitor).
    pub fn peer_pid(&self) -> Result<u32> {
        use std::os::fd::AsRawFd;
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: cred and len are valid for writes of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(self.io_error(io::Error::last_os_error()));
        }
        Ok(cred.pid as u32)
    }

    /// Sends `data` with a file descriptor attached (SCM_RIGHTS), the way
    /// QEMU's `getfd` expects it: the descriptor rides on the command's bytes.
    pub fn write_with_fd(
        &mut self,
        data: &[u8],
        fd: std::os::fd::BorrowedFd,
        wait: &Wait,
    ) -> Result<()> {
        use std::os::fd::AsRawFd;
        const FD_SPACE: usize = 64;
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
        debug_assert!(space <= FD_SPACE);
        let mut control = [0u8; FD_SPACE];
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        loop {
            // SAFETY: msghdr is plain data; every pointer set below outlives the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at `space` bytes, room for one header and one fd.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
                std::ptr::write_unaligned(
                    libc::CMSG_DATA(cmsg).cast::<libc::c_int>(),
                    fd.as_raw_fd(),
                );
            }
            // SAFETY: the socket is open and msg is fully initialised.
            let n = unsafe { libc::sendmsg(self.stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n >= 0 {
                return self.write_all(&data[n as usize..], wait);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => self.poll_until(wait)?,
                _ => return Err(self.io_error(e)),
            }
        }
    }

    /// Half-closes and reads to end of stream, so QEMU sees a clean end after
    /// it has read everything: a full close can make it drop unread input.
    /// Returns what arrived after the last exchange.
    pub fn finish(mut self, wait: &Wait) -> Result<Vec<u8>> {
        match self.stream.shutdown(Shutdown::Write) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(self.buf),
            Err(e) => return Err(self.io_error(e)),
        }
        while !self.eof {
            self.fill(wait)?;
        }
        Ok(self.buf)
    }
}
