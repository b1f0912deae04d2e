//! The confirm channel between a migrating source and its receiver, on the
//! receiver's TCP port, told apart from QEMU's stream by its first bytes:
//! the client's hello with its nonce, the receiver's nonce and proof, the
//! client's proof (see `tls`), then signed lines from the receiver
//! (Prepare: who listens; Confirm: where the guest is).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::destination::tcp_uri;
use super::tls::{Conn, Credentials, Session};
use crate::error::{Error, Result};

/// How long a new connection to the receiver may take to say what it is.
pub(super) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// QEMU's migration stream starts with these bytes.
const STREAM_MAGIC: &[u8; 4] = b"QEVM";

/// A connection the listener thread accepted, sorted by its first bytes.
#[derive(Debug)]
pub(super) enum Incoming {
    /// QEMU's plain stream (`--insecure`), to hand to the waiting QEMU.
    Stream(TcpStream),
    /// A confirm client that proved it holds the key.
    Confirm(Peer),
    /// A connection that reached QEMU's TLS socket ended, from this address.
    Ended(std::net::SocketAddr),
    /// A connection refused before it reached QEMU, and why.
    Refused(std::net::SocketAddr, &'static str),
}

/// A confirm client the receiver answers, with the MAC session of its lines.
#[derive(Debug)]
pub(super) struct Peer {
    pub(super) stream: Conn,
    pub(super) session: Session,
}

impl Peer {
    /// Sends `said`, signed; errors are the client's loss.
    pub(super) fn say(&mut self, said: &Said) {
        let text = serde_json::to_string(said).expect("serialises");
        let line = self.session.sign(&text);
        let _ = self.stream.write_all(line.as_bytes());
    }
}

/// The source's end of the confirm channel: the receiver's lines, checked.
#[derive(Debug)]
pub(super) struct Channel {
    reader: BufReader<Conn>,
    session: Session,
}

impl Channel {
    /// The socket, to see whether the receiver went away.
    pub(super) fn stream(&self) -> &TcpStream {
        self.reader.get_ref().tcp()
    }

    /// One line from the receiver, waiting up to `timeout`.
    pub(super) fn read_said(&mut self, timeout: Duration) -> std::io::Result<Said> {
        self.reader
            .get_ref()
            .tcp()
            .set_read_timeout(Some(timeout))?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the receiver closed the connection",
            ));
        }
        let text = self.session.open(line.trim_end())?;
        serde_json::from_str(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
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

/// Prepare: connects to the receiver, proves we hold the key and checks it
/// does, and reads its state and QEMU version.
pub(super) fn open_confirm(host: &str, port: u16, creds: &Credentials) -> Result<(Channel, Said)> {
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
    let tls = creds.server_tls().is_some() || creds.has_client_tls();
    let (hello, pending) = super::tls::client_hello(creds.auth_key(), tls)?;
    stream.write_all(hello.as_bytes()).map_err(unreachable)?;
    let conn = creds
        .client_conn(stream, host, HELLO_TIMEOUT)
        .map_err(|detail| Error::NotAuthenticated {
            addr: tcp_uri(host, port),
            detail: format!("the receiver was not authenticated: {detail}"),
        })?;
    let mut reader = BufReader::new(conn);
    let session = pending
        .finish(&mut reader, HELLO_TIMEOUT)
        .map_err(|detail| Error::NotAuthenticated {
            addr: tcp_uri(host, port),
            detail: format!("the receiver was not authenticated: {detail}"),
        })?;
    let mut channel = Channel { reader, session };
    let said = channel.read_said(HELLO_TIMEOUT).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::NotAuthenticated {
                addr: tcp_uri(host, port),
                detail: "the receiver refused our proof: its key (or CA) differs from ours".into(),
            }
        } else {
            Error::Receiver {
                addr: tcp_uri(host, port),
                detail: format!("not a qemu-migrate receiver ({e})"),
            }
        }
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
    Ok((channel, said))
}

/// What a new connection to the receiver is, by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// QEMU's plain stream (`QEVM`).
    PlainStream,
    /// A TLS handshake (a record of type 22): QEMU's encrypted stream.
    Tls,
    /// A line of JSON: a confirm client's hello.
    Hello,
}

/// Waits (up to [`HELLO_TIMEOUT`]) for the first bytes of `stream`, without
/// taking them; `None` for a peer that stays silent, closes, or sends
/// something else.
pub(super) fn classify(stream: &TcpStream) -> Option<Kind> {
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
    match head {
        h if &h == STREAM_MAGIC => Some(Kind::PlainStream),
        // ContentType handshake, then TLS major version 3.
        [0x16, 0x03, ..] => Some(Kind::Tls),
        [b'{', ..] => Some(Kind::Hello),
        _ => None,
    }
}

/// A confirm client's hello line, read byte by byte so nothing after it is
/// taken; its JSON when it says it is one.
pub(super) fn read_hello(stream: &TcpStream) -> Option<serde_json::Value> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 1024 {
        use std::io::Read;
        match (&*stream).read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
    let hello: serde_json::Value = serde_json::from_slice(&line).ok()?;
    (hello.get("qemu-migrate")? == "confirm").then_some(hello)
}
