//! A machine monitor that QEMU connects to, for a QEMU this program starts.
//!
//! Connecting to a `server` socket of a QEMU that is still starting races its
//! start-up: the socket accepts as soon as it exists, while the monitor is
//! being wired to its I/O thread and the VM starts running. A client that
//! lands in that window can be sent an event before the greeting. With
//! `-qmp unix:PATH` (no `server`) QEMU instead connects to a socket that is
//! already listening, while it parses its options, before any of that runs:
//! the session exists from the start and QEMU greets it when the monitor is
//! ready. The python `qemu.machine` test harness starts QEMU this way too.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::conn::Connection;
use crate::error::{Error, Result};
use crate::{MonitorAddr, QmpSession};

const LISTENER: Token = Token(0);
const PROCESS: Token = Token(1);

/// How often a QEMU is checked for having exited, on a kernel without pidfd.
const EXIT_CHECK: Duration = Duration::from_millis(20);

/// A listening socket for one QEMU's machine monitor; see [`QmpListener::qemu_arg`].
#[derive(Debug)]
pub struct QmpListener {
    listener: mio::net::UnixListener,
    path: PathBuf,
}

impl QmpListener {
    /// Listens at `path` (which must not exist yet).
    ///
    /// # Errors
    /// [`Error::Connect`] when the socket cannot be created there.
    pub fn bind(path: impl Into<PathBuf>) -> Result<QmpListener> {
        let path = path.into();
        let listener = mio::net::UnixListener::bind(&path).map_err(|source| Error::Connect {
            addr: MonitorAddr::Path(path.clone()),
            source,
        })?;
        Ok(QmpListener { listener, path })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The value for QEMU's `-qmp` that makes it connect here (commas in the
    /// path doubled, as QEMU's option syntax wants).
    pub fn qemu_arg(&self) -> String {
        format!(
            "unix:{}",
            self.path.display().to_string().replace(',', ",,")
        )
    }

    /// Waits for the QEMU with process id `pid` to connect, reads its
    /// greeting and negotiates capabilities; `timeout` bounds each wait.
    /// The socket file is removed once QEMU is connected.
    ///
    /// # Errors
    /// [`Error::Exited`] when QEMU exits first (a bad option, say: its stderr
    /// says why), [`Error::Timeout`] when it neither connects nor exits in
    /// time, or what [`QmpSession`] reports on the greeting.
    pub fn accept(mut self, pid: u32, timeout: Duration) -> Result<QmpSession> {
        let addr = MonitorAddr::Path(self.path.clone());
        let io_err = |source| Error::Io {
            addr: addr.clone(),
            source,
        };
        let deadline = Instant::now() + timeout;
        let mut poll = Poll::new().map_err(io_err)?;
        poll.registry()
            .register(&mut self.listener, LISTENER, Interest::READABLE)
            .map_err(io_err)?;
        let pidfd = pidfd_open(pid);
        if let Some(fd) = &pidfd {
            poll.registry()
                .register(&mut SourceFd(&fd.as_raw_fd()), PROCESS, Interest::READABLE)
                .map_err(io_err)?;
        }
        let mut events = Events::with_capacity(2);
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(e)),
            }
            let gone = match &pidfd {
                Some(_) => events.iter().any(|e| e.token() == PROCESS),
                None => has_exited(pid),
            };
            if gone {
                return Err(Error::Exited { addr, pid });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    addr,
                    what: "connection".into(),
                    timeout,
                    hint: ": QEMU is running but did not connect to its monitor",
                });
            }
            let mut wait = deadline - now;
            if pidfd.is_none() {
                wait = wait.min(EXIT_CHECK);
            }
            match poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => events.clear(),
                Err(e) => return Err(io_err(e)),
            }
        };
        let _ = std::fs::remove_file(&self.path);
        let conn = Connection::from_unix(stream, addr).map_err(|source| Error::Io {
            addr: MonitorAddr::Path(self.path.clone()),
            source,
        })?;
        let mut session = QmpSession::start(conn, timeout)?;
        session.negotiate()?;
        Ok(session)
    }
}

/// A descriptor that becomes readable when process `pid` exits; `None` on a
/// kernel without pidfd (before 5.3).
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = libc::c_int::try_from(raw).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the descriptor was just opened and is owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `pid` is gone or a zombie (exited, not yet reaped).
fn has_exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}
