//! The human monitor: a line editor on a socket. QEMU echoes and redraws
//! every byte it reads, so replies are found by their framing: the echo of
//! the line's end (`\r\n`) marks dispatch, the next `(qemu) ` prompt the end.

use std::time::Duration;

use crate::conn::{Connection, Wait};
use crate::error::{Error, Result};

/// QEMU's line editor keeps 4095 bytes of a line and drops the rest.
pub const MAX_LINE: usize = 4095;

const PROMPT: &[u8] = b"(qemu) ";
const LINE_END_ECHO: &[u8] = b"\r\n";

/// Checks a command line before it is sent: QEMU would silently cut a longer
/// line, and control bytes are editing keys (Tab completes, Ctrl-A moves,
/// ESC starts a key sequence, DEL erases), not text.
pub fn check_line(line: &str) -> Result<()> {
    if line.len() > MAX_LINE {
        return Err(Error::BadLine {
            command: line.to_string(),
            reason: format!(
                "it is {} bytes long and QEMU's monitor keeps only the first {MAX_LINE} of a line",
                line.len()
            ),
        });
    }
    if let Some((i, b)) = line
        .bytes()
        .enumerate()
        .find(|&(_, b)| b < 0x20 || b == 0x7f)
    {
        return Err(Error::BadLine {
            command: line.to_string(),
            reason: format!(
                "byte 0x{b:02x} ({}) at offset {i} is an editing key in QEMU's line editor, not text",
                control_name(b)
            ),
        });
    }
    Ok(())
}

fn control_name(b: u8) -> String {
    match b {
        0x09 => "Tab".into(),
        0x0a => "line feed".into(),
        0x0d => "carriage return".into(),
        0x1b => "Escape".into(),
        0x7f => "Delete".into(),
        0x08 => "Backspace".into(),
        b => format!("Ctrl-{}", (b + 0x40) as char),
    }
}

/// A command's reply: the bytes as QEMU sent them, and the cleaned text.
#[derive(Debug, Clone)]
pub struct HmpReply {
    /// Echo, output and prompt, exactly as received.
    pub raw: Vec<u8>,
    /// The command's output, with `\n` line ends, no echo and no prompt.
    pub output: String,
}

/// A session with QEMU's human monitor.
#[derive(Debug)]
pub struct HmpSession {
    pub(crate) conn: Connection,
    banner: String,
    timeout: Duration,
    /// A command was dispatched without awaiting its reply; its prompt is
    /// still to come and must be consumed before the next command.
    reply_pending: bool,
}

impl HmpSession {
    pub(crate) fn start(mut conn: Connection, timeout: Duration) -> Result<Self> {
        let raw = conn.read_through(PROMPT, &Wait::new(timeout, "monitor prompt"))?;
        let banner = String::from_utf8_lossy(&raw[..raw.len() - PROMPT.len()])
            .trim_end()
            .to_string();
        Ok(HmpSession {
            conn,
            banner,
            timeout,
            reply_pending: false,
        })
    }

    /// The banner QEMU greeted with, e.g. `QEMU 7.2.22 monitor - type 'help' ...`.
    pub fn banner(&self) -> &str {
        &self.banner
    }

    /// QEMU's version as the banner gives it (`7.2.22`).
    pub fn version(&self) -> Option<&str> {
        self.banner
            .strip_prefix("QEMU ")
            .and_then(|rest| rest.split_whitespace().next())
    }

    /// The socket this session is connected to.
    pub fn addr(&self) -> &crate::MonitorAddr {
        &self.conn.addr
    }

    /// How long each wait for QEMU may take.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The deadline of each wait.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs a command and returns its output; QEMU's error replies are errors.
    pub fn command(&mut self, line: &str) -> Result<String> {
        self.command_reply(line).map(|r| r.output)
    }

    /// Runs a command and returns the reply both raw and cleaned. An error
    /// reply is returned as [`Error::Command`].
    pub fn command_reply(&mut self, line: &str) -> Result<HmpReply> {
        let mut raw = self.dispatch(line)?;
        let rest = match self.conn.read_through(
            PROMPT,
            &Wait::new(self.timeout, &format!("reply to `{line}`")),
        ) {
            // `quit` answers by closing: once it was dispatched, that is success.
            Err(Error::Closed { received, .. }) if is_quit(line) => {
                self.reply_pending = false;
                return Ok(HmpReply {
                    raw,
                    output: received,
                });
            }
            other => other?,
        };
        self.reply_pending = false;
        let output = clean_output(&rest[..rest.len() - PROMPT.len()]);
        raw.extend_from_slice(&rest);
        if let Some(message) = error_message(&output) {
            return Err(Error::Command {
                addr: self.conn.addr.clone(),
                command: line.to_string(),
                class: None,
                message,
            });
        }
        Ok(HmpReply { raw, output })
    }

    /// Sends a command and returns as soon as QEMU has read all of it and
    /// started running it (the echo of the line's end), without awaiting its
    /// output: a `migrate` returns at once, yet is never lost.
    pub fn dispatch(&mut self, line: &str) -> Result<Vec<u8>> {
        self.dispatch_inner(line, None)
    }

    /// Runs a command with a file descriptor attached, for `getfd NAME`.
    pub fn command_with_fd(&mut self, line: &str, fd: std::os::fd::BorrowedFd) -> Result<String> {
        let mut raw = self.dispatch_inner(line, Some(fd))?;
        let rest = self.conn.read_through(
            PROMPT,
            &Wait::new(self.timeout, &format!("reply to `{line}`")),
        )?;
        self.reply_pending = false;
        raw.extend_from_slice(&rest);
        let output = clean_output(&rest[..rest.len() - PROMPT.len()]);
        match error_message(&output) {
            Some(message) => Err(Error::Command {
                addr: self.conn.addr.clone(),
                command: line.to_string(),
                class: None,
                message,
            }),
            None => Ok(output),
        }
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

    fn dispatch_inner(
        &mut self,
        line: &str,
        fd: Option<std::os::fd::BorrowedFd>,
    ) -> Result<Vec<u8>> {
        check_line(line)?;
        if self.reply_pending {
            // Until the previous command's prompt is in, a `\r\n` could be its output.
            self.conn.read_through(
                PROMPT,
                &Wait::new(self.timeout, "prompt after the previous command"),
            )?;
            self.reply_pending = false;
        }
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        let what = format!("echo of `{line}`");
        match fd {
            Some(fd) => self
                .conn
                .write_with_fd(&bytes, fd, &Wait::new(self.timeout, &what))?,
            None => self
                .conn
                .write_all(&bytes, &Wait::new(self.timeout, &what))?,
        }
        let echo = self.conn.read_through(
            LINE_END_ECHO,
            &Wait::new(self.timeout, &what)
                .hint(": the monitor may be busy with another client or a long command"),
        )?;
        self.reply_pending = true;
        Ok(echo)
    }

    /// Ends the session without losing anything: half-close, then read to
    /// the end. A dispatched command whose reply was not awaited is not waited
    /// for: QEMU has read it already.
    pub fn close(self) -> Result<Vec<u8>> {
        if self.reply_pending {
            // A suspended monitor (a `migrate` without -d) notices the end of
            // input only when it resumes, so waiting for it would wait for the
            // command; everything was read, so dropping the socket is safe.
            return Ok(Vec::new());
        }
        let timeout = self.timeout;
        self.conn.finish(&Wait::new(timeout, "end of the session"))
    }
}

impl HmpSession {
    /// See [`crate::Monitor::into_socket`].
    pub fn into_socket(self) -> (crate::Socket, Vec<u8>) {
        self.conn.into_socket()
    }
}

fn is_quit(line: &str) -> bool {
    matches!(line.split_whitespace().next(), Some("quit" | "q"))
}

/// Whether QEMU answers this command line by closing the connection (`quit`).
pub fn ends_session(line: &str) -> bool {
    is_quit(line)
}

/// The prompt QEMU's human monitor prints when it is ready for a command.
pub const PROMPT_TEXT: &str = "(qemu) ";

/// Text from the human monitor as a reader wants it: `\r\n` line ends
/// turned into `\n`, and the line editor's terminal sequences (ESC `[` ...
/// a letter, as it redraws the line) left out.
pub fn clean_text(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            0x1b => {
                i += 1;
                if raw.get(i) == Some(&b'[') {
                    i += 1;
                    while i < raw.len() && !raw[i].is_ascii_alphabetic() {
                        i += 1;
                    }
                }
                i += 1;
                continue;
            }
            b'\r' if raw.get(i + 1) == Some(&b'\n') => {}
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The command output with `\r\n` turned into `\n`.
fn clean_output(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).replace("\r\n", "\n")
}

/// QEMU's HMP errors are free text; these are the forms it uses.
pub fn error_message(output: &str) -> Option<String> {
    let is_error = output.lines().any(|l| {
        l.starts_with("unknown command:") || l.starts_with("Error: ") || l.starts_with("Try \"help")
    });
    if !is_error {
        return None;
    }
    let message: Vec<&str> = output
        .lines()
        .filter(|l| !l.starts_with("Try \"help") && !l.trim().is_empty())
        .collect();
    Some(if message.is_empty() {
        output.trim().to_string()
    } else {
        message.join("; ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_long_lines_and_control_bytes() {
        assert!(check_line(&"x".repeat(MAX_LINE)).is_ok());
        let long = check_line(&"x".repeat(5000)).unwrap_err().to_string();
        assert!(long.contains("5000 bytes"), "{long}");
        let tab = check_line("info\tstatus").unwrap_err().to_string();
        assert!(tab.contains("0x09 (Tab) at offset 4"), "{tab}");
        let ctrl_a = check_line("stop\x01").unwrap_err().to_string();
        assert!(ctrl_a.contains("Ctrl-A"), "{ctrl_a}");
    }

    #[test]
    fn cleans_the_line_editors_sequences() {
        assert_eq!(
            clean_text(b"i\x1b[K\x1b[Din\x1b[K\r\nVM status: running\r\n"),
            "iin\nVM status: running\n"
        );
    }

    #[test]
    fn recognises_qemu_error_replies() {
        assert_eq!(
            error_message("unknown command: 'foo'\n").as_deref(),
            Some("unknown command: 'foo'")
        );
        assert_eq!(
            error_message("migrate: string expected\nTry \"help migrate\" for more information\n")
                .as_deref(),
            Some("migrate: string expected")
        );
        assert_eq!(
            error_message("Error: invalid parameter value: foo\n").as_deref(),
            Some("Error: invalid parameter value: foo")
        );
        assert_eq!(error_message("VM status: running\n"), None);
    }
}
