//! What to send and how to report it, whichever argument form asked; and
//! running it against the monitor.

use std::io::{self, Read, Write};
use std::time::Duration;

use qemu_monitor::{Error, ErrorKind, Monitor, MonitorAddr, Options, Protocol};
use serde_json::{json, Value};

use crate::input::{self, Item};
use crate::terminal::TerminalOptions;

/// Exit statuses, as documented in `--help`.
pub mod exit {
    /// Every command was received and ran.
    pub const OK: u8 = 0;
    /// Bad arguments, or the socket could not be reached: nothing was sent.
    /// In the nc and socat forms (without `MONITOR_SEND_STRICT`), anything
    /// that went wrong on the way, as those tools say it.
    pub const UNREACHABLE: u8 = 1;
    /// QEMU answered at least one command with an error.
    pub const COMMAND_ERROR: u8 = 2;
    /// A command was not confirmed: timeout, early close, or not a QEMU monitor.
    pub const DELIVERY: u8 = 3;
    /// A line was refused before sending (too long, control bytes, not JSON
    /// where JSON began); the other lines were still sent.
    pub const REFUSED: u8 = 4;
}

pub const PROG: &str = "monitor-send";

/// What a command line asks for: a job, or text to print (help, version).
#[derive(Debug)]
pub enum Action {
    Run(Box<Job>),
    Say(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commands {
    Stdin,
    Args(Vec<String>),
    /// Connect and show the greeting only (nc -d, a reversed socat -u).
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Wait for each command's reply (the next prompt, the QMP return).
    Reply,
    /// Return once QEMU has read and dispatched each command (nc -w 0, socat -u).
    Dispatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Command output only; QMP replies as QEMU sent them (the nc/socat forms).
    Plain,
    /// Nothing on stdout (socat -u).
    Quiet,
    /// One JSON object per command.
    Json,
    /// The bytes as QEMU sent them, echo and prompts included.
    Raw,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub addr: MonitorAddr,
    pub commands: Commands,
    pub mode: Mode,
    pub output: Output,
    /// The nc and socat forms print QMP traffic as those tools would.
    pub qmp_passthrough: bool,
    pub protocol: Option<Protocol>,
    pub timeout: Duration,
    pub wait_socket: Option<Duration>,
    pub verbose: bool,
    /// The nc and socat forms: QEMU's words on stdout, the tool's exit status.
    pub borrowed: bool,
    /// In the borrowed forms, the native form's exit statuses and messages
    /// (`MONITOR_SEND_STRICT=1`).
    pub strict: bool,
    /// After the end of input, keep the session until QEMU ends it (socat's `ignoreeof`).
    pub ignoreeof: bool,
    /// End with a half-close and read to QEMU's end (socat's default
    /// `shut-down`); without it (`shut-none`), close once every command is confirmed.
    pub half_close: bool,
    /// Terminal modes for an interactive session (socat's `raw`, `echo=0`, ...).
    pub terminal: TerminalOptions,
    /// A byte on standard input that ends the session (socat's `escape=`).
    pub escape: Option<u8>,
    /// Nothing either way for this long ends a session as the end of input
    /// would (nc's `-w`, socat's `-T`).
    pub idle_timeout: Option<Duration>,
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

impl Job {
    pub fn new(addr: MonitorAddr) -> Self {
        Job {
            addr,
            commands: Commands::Stdin,
            mode: Mode::Reply,
            output: Output::Plain,
            qmp_passthrough: false,
            protocol: None,
            timeout: DEFAULT_TIMEOUT,
            wait_socket: None,
            verbose: false,
            borrowed: false,
            strict: false,
            ignoreeof: false,
            half_close: true,
            terminal: TerminalOptions::default(),
            escape: None,
            idle_timeout: None,
        }
    }
}

/// A failure that ends the run, with its exit status.
struct Fatal {
    status: u8,
    message: String,
}

fn fatal(e: &Error, confirmed: usize) -> Fatal {
    let status = match e.kind() {
        ErrorKind::Unreachable => exit::UNREACHABLE,
        ErrorKind::Command => exit::COMMAND_ERROR,
        ErrorKind::Delivery => exit::DELIVERY,
        ErrorKind::Refused => exit::REFUSED,
    };
    let mut message = e.to_string();
    if matches!(e.kind(), ErrorKind::Delivery | ErrorKind::Refused) {
        message.push_str(&format!(
            "; {confirmed} command{} confirmed before that",
            if confirmed == 1 { "" } else { "s" }
        ));
    }
    Fatal { status, message }
}

struct Runner<'a> {
    job: &'a Job,
    out: io::StdoutLock<'static>,
    confirmed: usize,
    refused_by_qemu: usize,
    refused_before_sending: usize,
}

pub fn run(job: &Job) -> u8 {
    if job.borrowed {
        return crate::session::run(job);
    }
    let mut runner = Runner {
        job,
        out: io::stdout().lock(),
        confirmed: 0,
        refused_by_qemu: 0,
        refused_before_sending: 0,
    };
    match runner.run() {
        Ok(()) if runner.refused_before_sending > 0 => exit::REFUSED,
        Ok(()) if runner.refused_by_qemu > 0 => exit::COMMAND_ERROR,
        Ok(()) => exit::OK,
        Err(f) => {
            let _ = runner.out.flush();
            eprintln!("{PROG}: {}", f.message);
            f.status
        }
    }
}

impl Runner<'_> {
    fn run(&mut self) -> Result<(), Fatal> {
        let job = self.job;
        let options = Options {
            timeout: job.timeout,
            wait_socket: job.wait_socket,
            mux_escape: false,
        };
        let mut monitor =
            qemu_monitor::connect(job.addr.clone(), &options).map_err(|e| fatal(&e, 0))?;
        if let Some(want) = job.protocol {
            if want != monitor.protocol() {
                return Err(Fatal {
                    status: exit::UNREACHABLE,
                    message: format!(
                        "{}: this socket speaks {}, not {} as asked",
                        job.addr,
                        name(monitor.protocol()),
                        name(want)
                    ),
                });
            }
        }
        if job.verbose {
            eprintln!("{PROG}: connected to {} ({})", job.addr, describe(&monitor));
        }
        self.greeting(&monitor);

        match &job.commands {
            Commands::None => {}
            Commands::Args(args) => {
                for arg in args {
                    for item in input::items(format!("{arg}\n").as_bytes()) {
                        self.item(&mut monitor, item)?;
                    }
                }
            }
            Commands::Stdin => {
                let mut stdin = io::stdin().lock();
                let mut parser = input::Input::new();
                let mut items = std::collections::VecDeque::new();
                let mut chunk = vec![0u8; 4096];
                loop {
                    let n = match stdin.read(&mut chunk) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            return Err(Fatal {
                                status: exit::REFUSED,
                                message: format!("reading standard input: {e}"),
                            })
                        }
                    };
                    if n == 0 {
                        parser.finish(&mut items);
                    } else {
                        parser.feed(&chunk[..n], &mut items);
                    }
                    while let Some(item) = items.pop_front() {
                        self.item(&mut monitor, item)?;
                    }
                    if n == 0 {
                        break;
                    }
                }
            }
        }
        // No command at all is fine: connecting was the test (a readiness probe).
        monitor.close().map_err(|e| fatal(&e, self.confirmed))?;
        Ok(())
    }

    /// One piece of input: a command, or a refusal that is reported while
    /// the others are still sent.
    fn item(&mut self, monitor: &mut Monitor, item: Item) -> Result<(), Fatal> {
        match item {
            Item::Line(line) => self.one(monitor, &line),
            Item::Json { text, value } => match monitor {
                Monitor::Qmp(s) => self.qmp_message(s, value),
                Monitor::Hmp(_) => {
                    self.refuse(Error::BadLine {
                        command: text,
                        reason: "it is a QMP (JSON) command and this socket is the human monitor"
                            .into(),
                    });
                    Ok(())
                }
            },
            Item::Bad { text, reason } => {
                self.refuse(Error::BadLine {
                    command: text,
                    reason,
                });
                Ok(())
            }
        }
    }

    fn refuse(&mut self, e: Error) {
        self.refused_before_sending += 1;
        eprintln!("{PROG}: {e}");
    }

    fn greeting(&mut self, monitor: &Monitor) {
        let show = self.job.output == Output::Raw
            || (self.job.commands == Commands::None && self.job.output != Output::Quiet);
        match monitor {
            Monitor::Hmp(s) if show => {
                let _ = writeln!(self.out, "{}", s.banner());
            }
            Monitor::Qmp(s)
                if show || (self.job.qmp_passthrough && self.job.output == Output::Plain) =>
            {
                let _ = writeln!(self.out, "{}", s.greeting().raw);
            }
            _ => {}
        }
        let _ = self.out.flush();
    }

    fn one(&mut self, monitor: &mut Monitor, line: &str) -> Result<(), Fatal> {
        if line.trim().is_empty() {
            // QEMU ignores an empty line; sending it would only cost a round trip.
            return Ok(());
        }
        let result = match monitor {
            Monitor::Hmp(s) => {
                if let Err(e) = qemu_monitor::hmp::check_line(line) {
                    self.refuse(e);
                    return Ok(());
                }
                if self.job.mode == Mode::Dispatch {
                    s.dispatch(line).map(|echo| {
                        if self.job.output == Output::Raw {
                            let _ = self.out.write_all(&echo);
                        }
                    })
                } else {
                    s.command_reply(line)
                        .map(|r| self.print_hmp(line, &r.raw, &r.output))
                }
            }
            Monitor::Qmp(s) => s
                .negotiate()
                .and_then(|()| s.human_command(line))
                .map(|text| {
                    self.print_events(s);
                    self.print_hmp(line, text.as_bytes(), &text)
                }),
        };
        self.settle(line, result)
    }

    /// Counts a command's outcome: QEMU's refusal is reported and the run
    /// goes on, as it would with nc; anything else ends it.
    fn settle(&mut self, line: &str, result: Result<(), Error>) -> Result<(), Fatal> {
        let _ = self.out.flush();
        match result {
            Ok(()) => {
                self.confirmed += 1;
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::Command => {
                self.confirmed += 1;
                self.refused_by_qemu += 1;
                if let (Output::Json, Error::Command { class, message, .. }) = (self.job.output, &e)
                {
                    let _ = writeln!(
                        self.out,
                        "{}",
                        json!({ "command": line, "error": message, "class": class })
                    );
                }
                eprintln!("{PROG}: {e}");
                Ok(())
            }
            Err(e) => Err(fatal(&e, self.confirmed)),
        }
    }

    fn print_hmp(&mut self, line: &str, raw: &[u8], output: &str) {
        let _ = match self.job.output {
            Output::Quiet => Ok(()),
            Output::Plain => self.out.write_all(output.as_bytes()),
            Output::Raw => self.out.write_all(raw),
            Output::Json => writeln!(self.out, "{}", json!({ "command": line, "output": output })),
        };
    }

    fn print_qmp_reply(&mut self, msg: &Value, reply: &qemu_monitor::Reply) {
        let _ = match (&reply.result, self.job.output) {
            (_, Output::Quiet) | (Err(_), Output::Json) => Ok(()),
            (_, Output::Raw) => writeln!(self.out, "{}", reply.raw),
            (_, Output::Plain) if self.job.qmp_passthrough => writeln!(self.out, "{}", reply.raw),
            (Ok(v), Output::Plain) => writeln!(self.out, "{v}"),
            (Ok(v), Output::Json) => {
                writeln!(self.out, "{}", json!({ "command": msg, "return": v }))
            }
            (Err(_), Output::Plain) => Ok(()),
        };
    }

    fn print_events(&mut self, s: &mut qemu_monitor::QmpSession) {
        let events = s.take_events();
        if self.job.output == Output::Raw
            || (self.job.qmp_passthrough && self.job.output == Output::Plain)
        {
            for e in events {
                let _ = writeln!(self.out, "{}", e.raw);
            }
        }
    }

    fn qmp_message(&mut self, s: &mut qemu_monitor::QmpSession, msg: Value) -> Result<(), Fatal> {
        let command = msg
            .get("execute")
            .or_else(|| msg.get("exec-oob"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if !s.is_negotiated() && command != "qmp_capabilities" {
            if let Err(e) = s.negotiate() {
                return Err(fatal(&e, self.confirmed));
            }
        }
        let reply = s.send(&msg).map_err(|e| fatal(&e, self.confirmed))?;
        self.print_events(s);
        self.print_qmp_reply(&msg, &reply);
        let result = reply.result.map(drop).map_err(|e| Error::Command {
            addr: s.addr().clone(),
            command: command.clone(),
            class: Some(e.class),
            message: e.desc,
        });
        self.settle(&msg.to_string(), result)
    }
}

fn name(p: Protocol) -> &'static str {
    match p {
        Protocol::Hmp => "HMP",
        Protocol::Qmp => "QMP",
    }
}

fn describe(m: &Monitor) -> String {
    match m {
        Monitor::Hmp(s) => format!("HMP, QEMU {}", s.version().unwrap_or("of unknown version")),
        Monitor::Qmp(s) => format!("QMP, QEMU {}", s.version()),
    }
}
