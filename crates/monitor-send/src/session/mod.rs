//! The nc and socat forms: a session that relays standard input to the
//! monitor and what QEMU says to standard output, as those tools do, with
//! the guarantee they lack: each command is sent only once the previous one
//! is confirmed (its prompt, its QMP reply), so none is lost to QEMU's
//! hang-up handler. Standard input and the socket are watched together, so
//! QMP events are printed as they arrive and the session ends as soon as
//! QEMU closes, whether or not standard input has ended.
//!
//! On a terminal asked to be raw (socat's `raw`, `rawer`, `echo=0`,
//! `icanon=0`), bytes go both ways untouched and QEMU's own line editor does
//! the editing and echo, as with socat; socat's `escape=` character ends it.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use qemu_monitor::hmp::{self, PROMPT_TEXT};
use qemu_monitor::{Error, ErrorKind, Monitor, Options, Protocol, Socket};
use serde_json::{json, Value};

use crate::input::{Input, Item};
use crate::job::{exit, Commands, Job, Mode, Output, PROG};

mod pump;
mod relay;

use pump::Pump;
use relay::relay;

const PROMPT: &[u8] = PROMPT_TEXT.as_bytes();
/// The id of the messages monitor-send adds itself, so their replies are not printed.
const OWN_ID: &str = "monitor-send";
/// Read buffers: commands and replies are small, and every 4 KiB of stack
/// touched is a page fault at each of the many starts a recipe makes.
const CHUNK: usize = 4096;
/// How long socat waits for the peer after a terminal session's escape character.
const ESCAPE_GRACE: Duration = Duration::from_millis(500);

/// What was sent and still awaits its confirmation.
#[derive(Debug)]
enum Flight {
    /// An HMP line, until QEMU echoes its end (it has read it all).
    HmpEcho { line: String },
    /// An HMP line QEMU is running, until the next prompt.
    HmpOutput { line: String, text: Vec<u8> },
    /// A QMP message, until its reply.
    Qmp { line: String, kind: QmpKind },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QmpKind {
    /// The user's message: its reply is printed as QEMU sent it.
    Passthrough,
    /// An HMP line sent as `human-monitor-command`: its text is printed.
    Human,
    /// Our own `qmp_capabilities`, ahead of the user's first command.
    Negotiation,
}

/// How the session went, for the exit status.
#[derive(Debug, Default)]
struct Tally {
    refused: usize,
    qemu_errors: usize,
    failure: Option<(u8, String)>,
}

/// Standard output that survives its reader going away: the commands still
/// go to QEMU when nobody reads what it says (`nc ... | head -1`).
#[derive(Debug, Default)]
struct Out {
    broken: bool,
}

impl Out {
    fn write(&mut self, mut data: &[u8]) {
        while !self.broken && !data.is_empty() {
            // SAFETY: writes from a valid slice to the process's stdout.
            let n = unsafe { libc::write(1, data.as_ptr().cast(), data.len()) };
            if n > 0 {
                data = &data[n as usize..];
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => {
                    poll(&mut [pollfd(1, libc::POLLOUT)], None);
                }
                _ => self.broken = true,
            }
        }
    }

    fn text(&mut self, s: &str) {
        self.write(s.as_bytes());
    }
}

pub fn run(job: &Job) -> u8 {
    let mut tally = Tally::default();
    session(job, &mut tally);
    if let Some((status, message)) = &tally.failure {
        eprintln!("{PROG}: {message}");
        return if job.strict || *status == exit::UNREACHABLE {
            *status
        } else {
            // nc and socat say 1 for anything that went wrong on the way.
            exit::UNREACHABLE
        };
    }
    if tally.refused > 0 {
        // The other lines were sent, but not every one: say so, as nc says
        // anything that did not go through.
        if job.strict {
            exit::REFUSED
        } else {
            exit::UNREACHABLE
        }
    } else if !job.strict {
        // QEMU's refusals are its words on stdout, as with nc.
        exit::OK
    } else if tally.qemu_errors > 0 {
        exit::COMMAND_ERROR
    } else {
        exit::OK
    }
}

fn status_of(e: &Error) -> u8 {
    match e.kind() {
        ErrorKind::Unreachable => exit::UNREACHABLE,
        ErrorKind::Command => exit::COMMAND_ERROR,
        ErrorKind::Delivery => exit::DELIVERY,
        ErrorKind::Refused => exit::REFUSED,
    }
}

fn session(job: &Job, tally: &mut Tally) {
    let options = Options {
        timeout: job.timeout,
        wait_socket: job.wait_socket,
        mux_escape: false,
    };
    let monitor = match qemu_monitor::connect(job.addr.clone(), &options) {
        Ok(m) => m,
        Err(e) => {
            tally.failure = Some((status_of(&e), e.to_string()));
            return;
        }
    };
    if job.verbose {
        eprintln!("{PROG}: connected to {}", job.addr);
    }
    let protocol = monitor.protocol();
    let greeting = match &monitor {
        Monitor::Hmp(s) => format!("{}\n", s.banner()),
        Monitor::Qmp(s) => format!("{}\n", s.greeting().raw),
    };
    let (sock, pending) = monitor.into_socket();
    let mut out = Out::default();
    let terminal = is_terminal(0) && job.commands == Commands::Stdin;

    if terminal && job.terminal.wants_raw() {
        relay(job, sock, protocol, &greeting, &pending, &mut out, tally);
        return;
    }

    let mut pump = Pump {
        job,
        protocol,
        sock,
        inbuf: pending,
        queue: VecDeque::new(),
        input: Input::new(),
        stdin_eof: job.commands != Commands::Stdin,
        flight: None,
        negotiated: false,
        out,
        terminal,
        tally,
        last_activity: Instant::now(),
    };
    if let Commands::Args(args) = &job.commands {
        for a in args {
            pump.input.feed(a.as_bytes(), &mut pump.queue);
            pump.input.feed(b"\n", &mut pump.queue);
        }
    }
    if job.output != Output::Quiet {
        pump.out.text(&greeting);
        if terminal && protocol == Protocol::Hmp {
            pump.out.write(PROMPT);
        }
    }
    pump.run();
}

fn write_fully(sock: &mut Socket, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match sock.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                poll(&mut [pollfd(sock.as_raw_fd(), libc::POLLOUT)], None);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Waits for any of `fds`; false once `deadline` has passed with none ready.
fn poll(fds: &mut [libc::pollfd], deadline: Option<Instant>) -> bool {
    loop {
        let timeout = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    0
                } else {
                    // Rounded up, so a wait never ends just before its deadline.
                    left.as_millis().saturating_add(1).min(i32::MAX as u128) as i32
                }
            }
        };
        // SAFETY: fds is a valid, initialised array of its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n > 0 {
            return true;
        }
        if n == 0 {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
            continue;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

pub fn is_terminal(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}
