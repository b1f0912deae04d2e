use std::io;
use std::time::Duration;

use crate::addr::MonitorAddr;

/// Everything that can go wrong talking to a monitor. Each variant names the
/// socket, what was being waited for, and what QEMU said where it said anything.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be connected to (missing, refused, not a socket).
    #[error("{addr}: {}", os_message(.source))]
    Connect {
        /// The monitor's socket.
        addr: MonitorAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The socket did not become connectable before the deadline.
    #[error("{addr}: {} (waited {waited:?} for the socket)", os_message(.source))]
    SocketWait {
        /// The monitor's socket.
        addr: MonitorAddr,
        /// How long the socket was waited for.
        waited: Duration,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The QEMU that was to connect to its monitor exited first.
    #[error("{addr}: QEMU (pid {pid}) exited before it connected to its monitor")]
    Exited {
        /// The monitor's socket.
        addr: MonitorAddr,
        /// QEMU's process id.
        pid: u32,
    },
    /// The peer said nothing (more) before the deadline.
    #[error("{addr}: no {what} from QEMU within {timeout:?}{hint}")]
    Timeout {
        /// The monitor's socket.
        addr: MonitorAddr,
        /// What was being waited for.
        what: String,
        /// The deadline.
        timeout: Duration,
        /// What may be the cause.
        hint: &'static str,
    },
    /// The peer closed the connection before the exchange was complete.
    #[error("{addr}: the peer closed the connection while waiting for {what}{}", received_suffix(.received))]
    Closed {
        /// The monitor's socket.
        addr: MonitorAddr,
        /// What was being waited for.
        what: String,
        /// What QEMU had sent until then.
        received: String,
    },
    /// The peer is not a QEMU monitor, or broke the protocol.
    #[error("{addr}: not a QEMU monitor: {detail}")]
    NotAMonitor {
        /// The monitor's socket.
        addr: MonitorAddr,
        /// What was seen.
        detail: String,
    },
    /// QEMU received the command and answered with an error.
    #[error("{addr}: QEMU refused `{command}`: {message}")]
    Command {
        /// The monitor's socket.
        addr: MonitorAddr,
        /// The command.
        command: String,
        /// The QMP error class (`GenericError`, `CommandNotFound`, ...); `None` for HMP.
        class: Option<String>,
        /// QEMU's message.
        message: String,
    },
    /// QEMU answered a command with something this crate cannot read.
    #[error("{addr}: unexpected answer to `{command}`: {}", shorten(.detail))]
    Unexpected {
        /// The monitor's socket.
        addr: MonitorAddr,
        /// The command.
        command: String,
        /// What was seen.
        detail: String,
    },
    /// A command line was refused before anything was sent.
    #[error("refused before sending {:?}: {reason}", shorten(.command))]
    BadLine {
        /// The command.
        command: String,
        /// Why it was refused.
        reason: String,
    },
    /// Reading or writing the socket failed.
    #[error("{addr}: {}", os_message(.source))]
    Io {
        /// The monitor's socket.
        addr: MonitorAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

/// What kind of failure an [`Error`] is, for callers that map failures to exit statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The socket could not be reached: nothing was sent.
    Unreachable,
    /// QEMU answered a command with an error.
    Command,
    /// No confirmation: a timeout, an early close, or a peer that is not QEMU.
    Delivery,
    /// A line was refused before it was sent.
    Refused,
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Connect { .. } | Error::SocketWait { .. } | Error::Exited { .. } => {
                ErrorKind::Unreachable
            }
            Error::Command { .. } => ErrorKind::Command,
            Error::BadLine { .. } => ErrorKind::Refused,
            Error::Timeout { .. }
            | Error::Closed { .. }
            | Error::NotAMonitor { .. }
            | Error::Unexpected { .. }
            | Error::Io { .. } => ErrorKind::Delivery,
        }
    }
}

/// An OS error as nc and socat print it: the message without "(os error N)".
pub(crate) fn os_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn received_suffix(received: &str) -> String {
    if received.is_empty() {
        String::new()
    } else {
        format!(" (it had sent {:?})", shorten(received))
    }
}

pub(crate) fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
