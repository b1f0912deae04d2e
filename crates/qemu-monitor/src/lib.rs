//! A client for QEMU's monitor sockets that never loses a command.
//!
//! QEMU's monitors read their socket slowly (the human monitor one byte per
//! main-loop pass) and throw away what they have not read when the client
//! hangs up. This crate connects to a monitor socket (a path, or `@name` for
//! an abstract socket), tells the human monitor (HMP) from the machine
//! monitor (QMP) by its greeting, sends one command at a time and waits for
//! the proof that QEMU read it, and ends a session with a half-close and a
//! read to the end of the stream. Every wait has a deadline. For a QEMU the
//! caller starts itself, [`QmpListener`] has QEMU connect to the caller
//! instead, so that no connect races QEMU's start-up.
//!
//! ```no_run
//! use qemu_monitor::Options;
//!
//! let mut monitor = qemu_monitor::connect("/tmp/qemu-sock", &Options::default())?;
//! let status = monitor.human_command("info status")?;
//! println!("{status}");
//! monitor.close()?;
//! # Ok::<(), qemu_monitor::Error>(())
//! ```

#![warn(missing_docs)]

mod addr;
mod block;
mod commands;
mod conn;
mod error;
pub mod hmp;
pub mod json;
mod listen;
pub mod qmp;
mod state;
mod telnet;

use std::time::Duration;

pub use addr::MonitorAddr;
pub use block::{
    is_protocol, overlay_node_name, BlockDevice, BlockGraph, BlockNode, DiskSnapshot, DiskWrites,
    ImageInfo, SnapshotTarget,
};
pub use commands::migration_event_status;
pub use conn::Socket;
pub use error::{Error, ErrorKind, Result};
pub use hmp::{HmpReply, HmpSession};
pub use listen::QmpListener;
pub use qmp::{Event, Greeting, QemuVersion, QmpError, QmpSession, Reply};
pub use state::{MigrationInfo, MigrationStatus, RunState};

use conn::{Connection, Wait};

/// How to connect.
#[derive(Debug, Clone)]
pub struct Options {
    /// The deadline of every single wait: greeting, echo, reply.
    pub timeout: Duration,
    /// Wait this long for a missing, refusing or busy socket to accept.
    pub wait_socket: Option<Duration>,
    /// The socket is a mux chardev that the human monitor shares with a
    /// console (`-mon console` on a `mux=on` chardev, `-serial mon:unix:…`):
    /// when the console has the focus nothing greets, and the mux escape
    /// (Ctrl-A c) brings the monitor forward. Only for a socket known to be
    /// one: on a plain monitor busy with another client the escape would
    /// reach the line editor as keys.
    pub mux_escape: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(30),
            wait_socket: None,
            mux_escape: false,
        }
    }
}

/// Which monitor protocol a socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The human monitor (`-monitor`).
    Hmp,
    /// The machine monitor (`-qmp`).
    Qmp,
}

/// A connected monitor of either protocol.
#[derive(Debug)]
pub enum Monitor {
    /// A human monitor session.
    Hmp(HmpSession),
    /// A machine monitor session.
    Qmp(QmpSession),
}

/// Connects and tells the protocol from what QEMU sends first.
pub fn connect(addr: impl Into<MonitorAddr>, options: &Options) -> Result<Monitor> {
    let addr = addr.into();
    let mut conn = Connection::connect(&addr, options.wait_socket)?;
    if options.mux_escape {
        conn.mux = true;
        bring_monitor_forward(&mut conn, options.timeout)?;
    }
    match detect(&mut conn, options.timeout)? {
        Protocol::Hmp => HmpSession::start(conn, options.timeout).map(Monitor::Hmp),
        Protocol::Qmp => QmpSession::start(conn, options.timeout).map(Monitor::Qmp),
    }
}

/// Connects to a human monitor; a QMP socket is an error.
pub fn connect_hmp(addr: impl Into<MonitorAddr>, options: &Options) -> Result<HmpSession> {
    match connect(addr, options)? {
        Monitor::Hmp(s) => Ok(s),
        Monitor::Qmp(s) => Err(Error::NotAMonitor {
            addr: s.addr().clone(),
            detail: "it speaks QMP, not the human monitor".into(),
        }),
    }
}

/// Connects to a machine monitor and negotiates capabilities; an HMP socket is an error.
pub fn connect_qmp(addr: impl Into<MonitorAddr>, options: &Options) -> Result<QmpSession> {
    let addr = addr.into();
    match connect(addr.clone(), options)? {
        Monitor::Qmp(mut s) => {
            s.negotiate()?;
            Ok(s)
        }
        Monitor::Hmp(_) => Err(Error::NotAMonitor {
            addr,
            detail: "it speaks the human monitor (HMP), not QMP".into(),
        }),
    }
}

/// How long a mux socket may stay silent before its focus is taken to be
/// on the console: a monitor that has it greets at once.
const MUX_QUIET: Duration = Duration::from_millis(300);

/// On a mux chardev: when nothing greets, the escape Ctrl-A c moves the
/// focus to the monitor, which then prints its banner and prompt.
fn bring_monitor_forward(conn: &mut Connection, timeout: Duration) -> Result<()> {
    match conn.read_more(&Wait::new(MUX_QUIET.min(timeout), "greeting")) {
        Ok(_) => Ok(()),
        Err(Error::Timeout { .. }) => conn.write_all(
            b"\x01c",
            &Wait::new(timeout, "switching the mux to the monitor"),
        ),
        Err(e) => Err(e),
    }
}

fn detect(conn: &mut Connection, timeout: Duration) -> Result<Protocol> {
    const HMP_START: &[u8] = b"QEMU ";
    let wait = Wait::new(timeout, "greeting")
        .hint(": the monitor may be busy with another client (QEMU serves one at a time)");
    loop {
        let buf = conn.buffered();
        let start = buf
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(buf.len());
        let seen = &buf[start..];
        if seen.first() == Some(&b'{') {
            return Ok(Protocol::Qmp);
        }
        if seen.starts_with(HMP_START) {
            return Ok(Protocol::Hmp);
        }
        let n = seen.len().min(HMP_START.len());
        if n > 0 && seen[..n] != HMP_START[..n] {
            let snippet: String = String::from_utf8_lossy(&seen[..seen.len().min(60)]).into();
            return Err(Error::NotAMonitor {
                addr: conn.addr.clone(),
                detail: format!("it greeted with {snippet:?}"),
            });
        }
        if !conn.read_more(&wait)? {
            return Err(Error::Closed {
                addr: conn.addr.clone(),
                what: "greeting".into(),
                received: String::from_utf8_lossy(conn.buffered()).into_owned(),
            });
        }
    }
}

impl Monitor {
    /// Which protocol this monitor speaks.
    pub fn protocol(&self) -> Protocol {
        match self {
            Monitor::Hmp(_) => Protocol::Hmp,
            Monitor::Qmp(_) => Protocol::Qmp,
        }
    }

    /// Runs an HMP command line on either monitor (QMP: via `human-monitor-command`).
    pub fn human_command(&mut self, line: &str) -> Result<String> {
        match self {
            Monitor::Hmp(s) => s.command(line),
            Monitor::Qmp(s) => {
                s.negotiate()?;
                s.human_command(line)
            }
        }
    }

    /// Sets the deadline of every later wait.
    pub fn set_timeout(&mut self, timeout: Duration) {
        match self {
            Monitor::Hmp(s) => s.set_timeout(timeout),
            Monitor::Qmp(s) => s.set_timeout(timeout),
        }
    }

    /// Ends the session: a half-close, then what QEMU still says, to its end.
    ///
    /// # Errors
    /// When the socket fails or QEMU does not close within the deadline.
    pub fn close(self) -> Result<()> {
        match self {
            Monitor::Hmp(s) => s.close().map(drop),
            Monitor::Qmp(s) => s.close().map(drop),
        }
    }

    /// Gives up the connection as a plain non-blocking socket, with what QEMU
    /// sent after the greeting and was not consumed yet: for a caller that
    /// relays a whole session itself. The greeting stays readable from the
    /// session before this is called.
    pub fn into_socket(self) -> (Socket, Vec<u8>) {
        match self {
            Monitor::Hmp(s) => s.into_socket(),
            Monitor::Qmp(s) => s.into_socket(),
        }
    }
}

/// The session's socket, for a process that inherits it (a forked helper
/// that must reach the same QEMU after this process has gone).
impl std::os::fd::AsRawFd for Monitor {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Monitor::Hmp(s) => s.conn.as_raw_fd(),
            Monitor::Qmp(s) => s.conn.as_raw_fd(),
        }
    }
}
