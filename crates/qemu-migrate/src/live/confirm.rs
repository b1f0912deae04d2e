//! The confirm channel between a migrating source and its receiver: one
//! JSON line each way on the receiver's TCP port (Prepare: who listens;
//! Confirm: where the guest is), told apart from QEMU's stream by its first bytes.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::destination::tcp_uri;
use crate::error::{Error, Result};

/// How long a new connection to the receiver may take to say what it is.
pub(super) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// QEMU's migration stream starts with these bytes.
const STREAM_MAGIC: &[u8; 4] = b"QEVM";

/// A connection the listener thread accepted, sorted by its first bytes.
#[derive(Debug)]
pub(super) enum Incoming {
    Stream(TcpStream),
    Confirm(TcpStream),
}

/// The first line a confirm client sends.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Hello {
    #[serde(rename = "qemu-migrate")]
    pub(super) role: String,
}

/// Where the destination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum State {
    /// Waiting for the stream.
    Listening,
    Running,
    Paused,
    Failed,
}

impl State {
    pub(super) fn name(self) -> &'static str {
        match self {
            State::Listening => "listening",
            State::Running => "running",
            State::Paused => "paused",
            State::Failed => "failed",
        }
    }
}

/// A line from the receiver.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Said {
    pub(super) state: State,
    #[serde(default)]
    pub(super) qemu: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
    /// The versioned machine type the receiver's QEMU runs (`pc-i440fx-7.2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) machine: Option<String>,
}

/// Prepare: connects to the receiver, which answers with its state and QEMU version.
pub(super) fn open_confirm(host: &str, port: u16) -> Result<(BufReader<TcpStream>, Said)> {
    let unreachable = |e: std::io::Error| Error::Receiver {
        addr: tcp_uri(host, port),
        detail: format!("no receiver there ({e}); start one on that host first"),
    };
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(unreachable)?
        .next()
        .ok_or_else(|| unreachable(std::io::ErrorKind::NotFound.into()))?;
    let mut stream = TcpStream::connect_timeout(&addr, HELLO_TIMEOUT).map_err(unreachable)?;
    let hello = serde_json::to_string(&Hello {
        role: "confirm".into(),
    })
    .expect("hello serialises");
    stream
        .write_all(format!("{hello}\n").as_bytes())
        .map_err(unreachable)?;
    let mut reader = BufReader::new(stream);
    let said = read_said(&mut reader, HELLO_TIMEOUT).map_err(|e| Error::Receiver {
        addr: tcp_uri(host, port),
        detail: format!("not a qemu-migrate receiver ({e})"),
    })?;
    if said.state != State::Listening {
        return Err(Error::Receiver {
            addr: tcp_uri(host, port),
            detail: format!(
                "the receiver is not waiting for a migration (it is {})",
                said.state.name()
            ),
        });
    }
    Ok((reader, said))
}

/// One line from the receiver, waiting up to `timeout`.
pub(super) fn read_said(
    reader: &mut BufReader<TcpStream>,
    timeout: Duration,
) -> std::io::Result<Said> {
    reader.get_ref().set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the receiver closed the connection",
        ));
    }
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// QEMU's stream or a confirm client, by the first bytes; anything else is dropped.
pub(super) fn classify(stream: TcpStream) -> Option<Incoming> {
    stream.set_read_timeout(Some(HELLO_TIMEOUT)).ok()?;
    let mut head = [0u8; 4];
    let deadline = Instant::now() + HELLO_TIMEOUT;
    loop {
        let n = stream.peek(&mut head).ok()?;
        if n == 0 {
            return None;
        }
        if n == head.len() {
            break;
        }
        if Instant::now() >= deadline {
            return None;
        }
        // The peer sent part of its first write; peek returns at once now.
        std::thread::sleep(Duration::from_millis(1));
    }
    if &head == STREAM_MAGIC {
        return Some(Incoming::Stream(stream));
    }
    // A confirm client's hello line, read byte by byte so nothing after it is lost.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 1024 {
        use std::io::Read;
        match (&stream).read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
    let hello: Hello = serde_json::from_slice(&line).ok()?;
    (hello.role == "confirm").then_some(Incoming::Confirm(stream))
}
