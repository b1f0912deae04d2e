//! The machine monitor: JSON lines. Replies and events share the socket, so
//! events are set aside in their own queue as replies are waited for.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::conn::{Connection, Wait};
use crate::error::{shorten, Error, Result};

/// QEMU's version as the QMP greeting states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QemuVersion {
    /// `7` of 7.2.22.
    pub major: u32,
    /// `2` of 7.2.22.
    pub minor: u32,
    /// `22` of 7.2.22.
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl std::str::FromStr for QemuVersion {
    type Err = String;

    /// Parses `7.2.22` (and `10.0`, with micro 0).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.trim().split('.').map(|p| p.parse::<u32>());
        match (parts.next(), parts.next(), parts.next()) {
            (Some(Ok(major)), Some(Ok(minor)), micro) => Ok(QemuVersion {
                major,
                minor,
                micro: micro.and_then(|m| m.ok()).unwrap_or(0),
            }),
            _ => Err(format!("not a QEMU version: {s:?}")),
        }
    }
}

/// The greeting QEMU sends on connect.
#[derive(Debug, Clone)]
pub struct Greeting {
    /// QEMU's version.
    pub version: QemuVersion,
    /// The distribution's package string, e.g. `Debian 1:7.2+dfsg-7`.
    pub package: String,
    /// What QMP offers to negotiate (`oob`).
    pub capabilities: Vec<String>,
    /// The line as QEMU sent it.
    pub raw: String,
}

/// An asynchronous event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Its name (`STOP`, `MIGRATION`, `SHUTDOWN`).
    pub name: String,
    /// Its data (`{"status": "completed"}`).
    pub data: Value,
    /// When QEMU sent it.
    pub timestamp: Option<Value>,
    /// The line as QEMU sent it.
    pub raw: String,
}

impl Event {
    /// The event `value` is, if it is one (`raw` is its line).
    fn of(value: &Value, raw: &str) -> Option<Event> {
        let Some(Value::String(name)) = value.get("event") else {
            return None;
        };
        Some(Event {
            name: name.clone(),
            data: value.get("data").cloned().unwrap_or(Value::Null),
            timestamp: value.get("timestamp").cloned(),
            raw: raw.to_string(),
        })
    }
}

/// A reply to one message: its value or QEMU's error.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The command's return value, or QEMU's error.
    pub result: std::result::Result<Value, QmpError>,
    /// The line as QEMU sent it.
    pub raw: String,
}

/// An error reply: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QmpError {
    /// The error class (`GenericError`, `CommandNotFound`).
    pub class: String,
    /// QEMU's message.
    pub desc: String,
}

/// A session with QEMU's machine monitor.
#[derive(Debug)]
pub struct QmpSession {
    pub(crate) conn: Connection,
    greeting: Greeting,
    timeout: Duration,
    events: VecDeque<Event>,
    next_id: u64,
    negotiated: bool,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: GreetingVersion,
    #[serde(default)]
    capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct GreetingVersion {
    qemu: QemuVersion,
    #[serde(default)]
    package: String,
}

/// The most a single QMP message may take: far above any reply QEMU gives.
const MAX_MESSAGE: usize = 64 << 20;

/// Reads one JSON message: a line, or several where the monitor prints
/// them pretty (`-mon …,mode=control,pretty=on`, `-qmp-pretty`), one value
/// spread over lines. Returns the text as it came and what it parses to.
/// Nothing is taken from the buffer until a whole message is there: a
/// wait that runs out mid-message leaves it for the next read.
fn read_json(
    conn: &mut Connection,
    wait: &Wait,
) -> Result<(String, std::result::Result<Value, serde_json::Error>)> {
    loop {
        if let Some((used, found)) = complete_message(conn.buffered()) {
            conn.consume(used);
            if let Some(found) = found {
                return Ok(found);
            }
            continue;
        }
        if !conn.read_more(wait)? {
            return Err(conn.closed(wait));
        }
    }
}

/// The first whole message in `buf`: how many bytes it takes, and its text
/// and value (`None` for blank lines, which are only skipped). `None` while
/// the message is still incomplete.
#[allow(clippy::type_complexity)]
fn complete_message(
    buf: &[u8],
) -> Option<(
    usize,
    Option<(String, std::result::Result<Value, serde_json::Error>)>,
)> {
    let mut from = 0;
    while let Some(at) = buf[from..].iter().position(|&b| b == b'\n') {
        let end = from + at + 1;
        let text = String::from_utf8_lossy(&buf[..end]);
        let text = text.trim();
        if text.is_empty() {
            return Some((end, None));
        }
        // A value can only end on a line that closes one.
        let closes = text.ends_with('}') || text.ends_with(']');
        if closes || end >= MAX_MESSAGE {
            match serde_json::from_str::<Value>(text) {
                Err(e) if e.is_eof() && end < MAX_MESSAGE => {}
                parsed => return Some((end, Some((text.to_string(), parsed)))),
            }
        }
        from = end;
    }
    None
}

enum Message {
    Reply(Reply, Option<Value>),
    Event(Event),
}

impl QmpSession {
    pub(crate) fn start(mut conn: Connection, timeout: Duration) -> Result<Self> {
        let wait = Wait::new(timeout, "QMP greeting");
        // A client that connects while QEMU starts can be sent an event (the
        // RESUME of a VM that starts running) before the greeting: QEMU
        // broadcasts to a monitor that never negotiated. Such an event is
        // kept, in order, for the caller.
        let mut early = VecDeque::new();
        let (raw, value) = loop {
            let (raw, value) = read_json(&mut conn, &wait)?;
            let value: Value = value.map_err(|e| Error::NotAMonitor {
                addr: conn.addr.clone(),
                detail: format!("its greeting is not JSON ({e}): {}", shorten(&raw)),
            })?;
            match Event::of(&value, &raw) {
                Some(event) if value.get("QMP").is_none() => early.push_back(event),
                _ => break (raw, value),
            }
        };
        let not_qmp = |detail: String| Error::NotAMonitor {
            addr: conn.addr.clone(),
            detail,
        };
        let body = value.get("QMP").ok_or_else(|| {
            not_qmp(format!(
                "its greeting has no \"QMP\" key: {}",
                shorten(&raw)
            ))
        })?;
        let body: GreetingBody = serde_json::from_value(body.clone()).map_err(|e| {
            not_qmp(format!(
                "its greeting is malformed ({e}): {}",
                shorten(&raw)
            ))
        })?;
        Ok(QmpSession {
            conn,
            greeting: Greeting {
                version: body.version.qemu,
                package: body.version.package,
                capabilities: body.capabilities,
                raw,
            },
            timeout,
            events: early,
            next_id: 1,
            negotiated: false,
        })
    }

    /// The socket this session is connected to.
    pub fn addr(&self) -> &crate::MonitorAddr {
        &self.conn.addr
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// QEMU's version, from the greeting.
    pub fn version(&self) -> QemuVersion {
        self.greeting.version
    }

    /// Sets the deadline of every later wait.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The deadline of each wait.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether `qmp_capabilities` was accepted (commands are allowed).
    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// Leaves capabilities negotiation; QEMU accepts nothing else before it.
    pub fn negotiate(&mut self) -> Result<()> {
        if !self.negotiated {
            self.execute("qmp_capabilities", None)?;
        }
        Ok(())
    }

    /// Runs a command and returns its `return` value; an error reply is
    /// [`Error::Command`] with QEMU's class and description.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = format!("qemu-monitor-{}", self.next_id);
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let reply = self.send(&msg)?;
        reply.result.map_err(|e| Error::Command {
            addr: self.conn.addr.clone(),
            command: command.to_string(),
            class: Some(e.class),
            message: e.desc,
        })
    }

    /// Runs a command with a file descriptor attached, for `getfd` and `add-fd`.
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: std::os::fd::BorrowedFd,
    ) -> Result<Value> {
        let id = format!("qemu-monitor-{}", self.next_id);
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let reply = self.send_inner(&msg, Some(fd))?;
        reply.result.map_err(|e| Error::Command {
            addr: self.conn.addr.clone(),
            command: command.to_string(),
            class: Some(e.class),
            message: e.desc,
        })
    }

    /// The QEMU process serving this monitor.
    pub fn peer_pid(&self) -> Result<u32> {
        self.conn.peer_pid()
    }

    /// Whether descriptors can be handed to QEMU on this session (`getfd`).
    pub fn passes_fds(&self) -> bool {
        self.conn.passes_fds()
    }

    /// This end's and QEMU's address, on a TCP monitor.
    pub fn tcp_addrs(&self) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
        self.conn.tcp_addrs()
    }

    /// Sends a message as given and returns the reply to it, matched by `id`
    /// when it has one, else the next reply (QMP answers in order).
    pub fn send(&mut self, msg: &Value) -> Result<Reply> {
        self.send_inner(msg, None)
    }

    fn send_inner(&mut self, msg: &Value, fd: Option<std::os::fd::BorrowedFd>) -> Result<Reply> {
        let what = match msg.get("execute").or_else(|| msg.get("exec-oob")) {
            Some(Value::String(c)) => format!("reply to `{c}`"),
            _ => "reply".to_string(),
        };
        let mut line = serde_json::to_vec(msg).expect("a serde_json::Value always serialises");
        line.push(b'\n');
        let wait = Wait::new(self.timeout, &what);
        match fd {
            Some(fd) => self.conn.write_with_fd(&line, fd, &wait)?,
            None => self.conn.write_all(&line, &wait)?,
        }
        let want_id = msg.get("id");
        loop {
            match self.read_message(&wait)? {
                Message::Event(e) => self.events.push_back(e),
                Message::Reply(reply, id) => {
                    if want_id.is_none() || id.as_ref() == want_id {
                        if msg.get("execute").and_then(Value::as_str) == Some("qmp_capabilities")
                            && reply.result.is_ok()
                        {
                            self.negotiated = true;
                        }
                        return Ok(reply);
                    }
                }
            }
        }
    }

    /// Runs an HMP command line through `human-monitor-command`.
    pub fn human_command(&mut self, line: &str) -> Result<String> {
        let out = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": line })),
        )?;
        let text = out.as_str().unwrap_or_default().replace("\r\n", "\n");
        if let Some(message) = crate::hmp::error_message(&text) {
            return Err(Error::Command {
                addr: self.conn.addr.clone(),
                command: line.to_string(),
                class: None,
                message,
            });
        }
        Ok(text)
    }

    /// The next event, waiting up to `timeout` for one.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Event> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        let wait = Wait::new(timeout, "event");
        loop {
            if let Message::Event(e) = self.read_message(&wait)? {
                return Ok(e);
            }
        }
    }

    /// Events received so far and not yet taken.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    fn read_message(&mut self, wait: &Wait) -> Result<Message> {
        let (raw, value) = read_json(&mut self.conn, wait)?;
        let value: Value = value.map_err(|e| Error::NotAMonitor {
            addr: self.conn.addr.clone(),
            detail: format!("it sent a line that is not JSON ({e}): {}", shorten(&raw)),
        })?;
        if let Some(event) = Event::of(&value, &raw) {
            return Ok(Message::Event(event));
        }
        let id = value.get("id").cloned();
        if let Some(ret) = value.get("return") {
            return Ok(Message::Reply(
                Reply {
                    result: Ok(ret.clone()),
                    raw,
                },
                id,
            ));
        }
        if let Some(err) = value.get("error") {
            let err: QmpError = serde_json::from_value(err.clone()).unwrap_or_else(|_| QmpError {
                class: "GenericError".into(),
                desc: err.to_string(),
            });
            return Ok(Message::Reply(
                Reply {
                    result: Err(err),
                    raw,
                },
                id,
            ));
        }
        Err(Error::NotAMonitor {
            addr: self.conn.addr.clone(),
            detail: format!(
                "it sent a message that is neither reply nor event: {}",
                shorten(&raw)
            ),
        })
    }

    /// See [`crate::Monitor::into_socket`]. Events received and not taken
    /// come first in what is pending, one line each, as QEMU sent them.
    pub fn into_socket(self) -> (crate::Socket, Vec<u8>) {
        let (socket, rest) = self.conn.into_socket();
        let mut pending = Vec::new();
        for e in &self.events {
            pending.extend_from_slice(e.raw.as_bytes());
            pending.push(b'\n');
        }
        pending.extend_from_slice(&rest);
        (socket, pending)
    }

    /// Ends the session: half-close, read to the end.
    pub fn close(self) -> Result<Vec<u8>> {
        let timeout = self.timeout;
        self.conn.finish(&Wait::new(timeout, "end of the session"))
    }
}

#[cfg(test)]
mod pretty_tests {
    use super::*;

    #[test]
    fn a_pretty_message_is_whole_or_not_taken() {
        let pretty = b"{\n    \"timestamp\": {\n        \"seconds\": 1\n    },\n    \"event\": \"STOP\"\n}\n{\"return\": {}}\n";
        for cut in 0..pretty.len() {
            let part = &pretty[..cut];
            match complete_message(part) {
                None => assert!(cut < 71, "cut {cut}: the event was whole"),
                Some((used, Some((_, value)))) => {
                    assert_eq!(used, 71, "cut {cut}");
                    assert_eq!(value.unwrap()["event"], "STOP");
                }
                Some((_, None)) => panic!("no blank line here"),
            }
        }
        let (used, found) = complete_message(pretty).unwrap();
        let (used2, found2) = complete_message(&pretty[used..]).unwrap();
        assert!(found.unwrap().1.is_ok());
        assert_eq!(found2.unwrap().1.unwrap()["return"], serde_json::json!({}));
        assert_eq!(used + used2, pretty.len());
    }
}
