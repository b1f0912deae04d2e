//! socat's grammar, as recipes use it: `socat [-u] [-t S] [-T S] ADDR ADDR`,
//! one address standard I/O (`-`, `STDIO`, `READLINE`), the other the
//! monitor (`UNIX-CONNECT:PATH`, `UNIX:`, `GOPEN:`, a bare path,
//! `ABSTRACT-CONNECT:NAME`, `TCP:HOST:PORT`), in either order, each with its
//! `,option`s.

use std::time::Duration;

use qemu_monitor::MonitorAddr;

use crate::duration;
use crate::job::{Action, Commands, Job, Mode, Output};
use crate::terminal::TerminalOptions;

/// socat's default `interval` between connection retries.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// `forever` waits for the socket as long as anyone would.
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

pub const HELP: &str = "\
usage: socat [-u | -U] [-t S] [-T S] [-d...] [-v] ADDRESS ADDRESS

monitor-send, linked as socat: socat's grammar toward a QEMU monitor (HMP or
QMP, unix socket or TCP), sending one command at a time and waiting for QEMU's
proof that it read it, so that no command is lost.

One address is standard I/O: -  STDIO  STDIN  READLINE
The other is the monitor:    UNIX-CONNECT:PATH  UNIX-CLIENT:PATH  UNIX:PATH
                             LOCAL:PATH  GOPEN:PATH  a bare /path
                             ABSTRACT-CONNECT:NAME  TCP:HOST:PORT (TCP4, TCP6)
Address options:
  retry=N interval=S forever   wait for the socket to appear and accept
  shut-down (default)          half-close at the end of input, read to QEMU's end
  shut-none shut-close         close once every command is confirmed
  ignoreeof                    (on standard input) keep the session after the end
                               of input, until QEMU closes it
  raw rawer echo=0 icanon=0    (on a terminal) keys go to QEMU as typed, its line
                               editor echoes and edits
  escape=0x0f                  (on a terminal) this key ends the session
  crnl b38400 cs8 sane ...     accepted, with no effect on a monitor
Options: -u (left to right only: send, print nothing), -U (right to left),
  -t S, -T S (inactivity timeout: a session silent that long ends), -d, -v,
  -s, -4, -6, -b N, -lf F ...

Standard output carries what QEMU said (the banner, replies, errors, events),
cleaned of the line editor's escape codes; the exit status is socat's: 0 when
the monitor was reached and every command confirmed (QEMU's error replies
included: they are its words on stdout), 1 otherwise (a line refused too). Set
MONITOR_SEND_STRICT=1 for monitor-send's own exit statuses (see monitor-send --help).
";

#[derive(Debug, PartialEq)]
enum Endpoint {
    Stdio,
    Socket(MonitorAddr),
}

#[derive(Debug, Default)]
struct AddressOptions {
    retry: Option<u32>,
    interval: Option<Duration>,
    forever: bool,
    ignoreeof: bool,
    half_close: Option<bool>,
    terminal: TerminalOptions,
    escape: Option<u8>,
}

pub fn parse(args: &[String]) -> Result<Action, String> {
    let mut unidirectional = false;
    let mut reverse = false;
    let mut verbose = false;
    let mut inactivity: Option<Duration> = None;
    let mut addresses = Vec::new();

    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        // `-,raw,echo=0` is standard I/O with options, not an option.
        if addresses.is_empty() && arg.len() > 1 && arg.starts_with('-') && !arg.starts_with("-,") {
            let mut value = || -> Result<String, String> {
                let v = args
                    .get(i)
                    .cloned()
                    .ok_or_else(|| format!("option {arg} needs a value"))?;
                i += 1;
                Ok(v)
            };
            match arg.as_str() {
                "-u" => unidirectional = true,
                "-U" => {
                    unidirectional = true;
                    reverse = true;
                }
                "-v" | "-x" => verbose = true,
                "-V" | "--version" => return Ok(Action::Say(version())),
                "-h" | "-hh" | "-hhh" | "-?" | "--help" => return Ok(Action::Say(HELP.into())),
                "-t" => {
                    // socat's grace period after EOF; replies are awaited
                    // exactly instead, so it only has to parse.
                    duration::parse(&value()?).map_err(|e| format!("-t: {e}"))?;
                }
                "-T" => {
                    inactivity = Some(duration::parse(&value()?).map_err(|e| format!("-T: {e}"))?)
                }
                // Buffer size, log destinations: nothing a monitor session depends on.
                "-b" | "-lf" | "-lp" => {
                    value()?;
                }
                "-s" | "-4" | "-6" | "-ls" | "-lu" | "-lm" | "-lh" | "-g" => {}
                a if a.starts_with("-ly") => {}
                a if a.starts_with("-d") && a[1..].chars().all(|c| c == 'd') => verbose = true,
                other => {
                    return Err(format!(
                        "socat option {other} has no meaning for a monitor session (see socat -h)"
                    ))
                }
            }
            continue;
        }
        addresses.push(arg.clone());
    }

    let [left, right] = addresses.as_slice() else {
        return Err(format!(
            "socat needs two addresses, standard I/O and the monitor (as in `socat - UNIX-CONNECT:PATH`), got {}",
            addresses.len()
        ));
    };
    let (left, left_opts) = endpoint(left)?;
    let (right, right_opts) = endpoint(right)?;
    let (socket, opts, stdio_opts, stdio_first) = match (left, right) {
        (Endpoint::Stdio, Endpoint::Socket(s)) => (s, right_opts, left_opts, true),
        (Endpoint::Socket(s), Endpoint::Stdio) => (s, left_opts, right_opts, false),
        (Endpoint::Stdio, Endpoint::Stdio) => {
            return Err(
                "one address must be the monitor: UNIX-CONNECT:PATH or TCP:HOST:PORT".into(),
            )
        }
        (Endpoint::Socket(_), Endpoint::Socket(_)) => {
            return Err("one address must be standard I/O: - (or STDIO)".into())
        }
    };

    let mut job = Job::new(socket);
    job.borrowed = true;
    job.qmp_passthrough = true;
    job.verbose = verbose;
    if let Some(t) = inactivity {
        job.timeout = t;
        job.idle_timeout = Some(t);
    }
    if opts.forever {
        job.wait_socket = Some(FOREVER);
    } else if let Some(n) = opts.retry {
        job.wait_socket = Some(opts.interval.unwrap_or(DEFAULT_INTERVAL) * n);
    }
    job.ignoreeof = stdio_opts.ignoreeof;
    job.half_close = opts.half_close.or(stdio_opts.half_close).unwrap_or(true);
    job.terminal = stdio_opts.terminal;
    job.escape = stdio_opts.escape;
    if unidirectional {
        // Data flows left to right (right to left with -U).
        let sends = stdio_first != reverse;
        job.output = Output::Quiet;
        if sends {
            job.mode = Mode::Dispatch;
        } else {
            job.commands = Commands::None;
            job.output = Output::Plain;
        }
    }
    Ok(Action::Run(Box::new(job)))
}

pub fn version() -> String {
    format!(
        "monitor-send {} (as socat: socat's grammar toward a QEMU monitor)\nsocat version 1.7.4 compatible\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// socat's terminal options that have no effect on a monitor session.
const HARMLESS: &[&str] = &[
    "crnl",
    "cr",
    "crlf",
    "sane",
    "ctty",
    "setsid",
    "nonblock",
    "isig",
    "iexten",
    "icrnl",
    "inlcr",
    "igncr",
    "onlcr",
    "ocrnl",
    "opost",
    "ixon",
    "ixoff",
    "ixany",
    "clocal",
    "crtscts",
    "hupcl",
    "parenb",
    "parodd",
    "cstopb",
    "cread",
    "brkint",
    "ignbrk",
    "istrip",
    "echoe",
    "echok",
    "echoke",
    "echoctl",
    "echonl",
    "noflsh",
    "tostop",
    "ispeed",
    "ospeed",
    "vmin",
    "vtime",
    "connect-timeout",
    "keepalive",
    "nodelay",
    "history",
    "noprompt",
    "prompt",
    "noecho",
    "nonblock",
    "unlink-close",
    "type",
    "readbytes",
    "null-eof",
    "lowport",
    "sourceport",
];

fn endpoint(spec: &str) -> Result<(Endpoint, AddressOptions), String> {
    let mut parts = spec.split(',');
    let head = parts.next().unwrap_or_default();
    let mut opts = AddressOptions::default();
    for opt in parts {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let key = key.to_ascii_lowercase();
        match (key.as_str(), value) {
            ("retry", Some(v)) => {
                opts.retry = Some(v.parse().map_err(|_| format!("retry={v}: not a count"))?)
            }
            ("interval", Some(v)) => {
                opts.interval = Some(duration::parse(v).map_err(|e| format!("interval: {e}"))?)
            }
            ("forever", None) => opts.forever = true,
            ("ignoreeof", None) => opts.ignoreeof = true,
            ("shut-down", None) => opts.half_close = Some(true),
            ("shut-none" | "shut-close" | "shut-null", None) => opts.half_close = Some(false),
            ("raw", None) => opts.terminal.raw = true,
            ("rawer", None) => opts.terminal.rawer = true,
            ("echo", v) => opts.terminal.echo = Some(flag(opt, v)?),
            ("icanon", v) => opts.terminal.icanon = Some(flag(opt, v)?),
            ("escape", Some(v)) => opts.escape = Some(byte(v)?),
            (k, _) if HARMLESS.contains(&k) => {}
            // Line speeds (b9600, b38400) and character sizes (cs7, cs8).
            (k, None)
                if (k.starts_with('b') || k.starts_with("cs"))
                    && k.trim_start_matches(['b', 'c', 's']).parse::<u32>().is_ok() => {}
            ("fork" | "reuseaddr" | "max-children", _) => {
                return Err(format!(
                    "socat address option {opt:?} is for serving many clients; a monitor session is one connection: leave it out"
                ))
            }
            _ => {
                return Err(format!(
                    "socat address option {opt:?} has no meaning for a monitor session: leave it out (see socat -h)"
                ))
            }
        }
    }
    if head == "-"
        || ["STDIO", "STDIN", "READLINE"]
            .iter()
            .any(|k| head.eq_ignore_ascii_case(k))
    {
        return Ok((Endpoint::Stdio, opts));
    }
    let Some((keyword, param)) = head.split_once(':') else {
        if head.contains('/') {
            return Ok((Endpoint::Socket(MonitorAddr::parse(head)), opts));
        }
        return Err(format!(
            "socat address {head:?} is not one monitor-send knows: use - for standard I/O and UNIX-CONNECT:PATH or TCP:HOST:PORT for the monitor"
        ));
    };
    let keyword = keyword.to_ascii_uppercase();
    let addr = match keyword.as_str() {
        "UNIX-CONNECT" | "UNIX-CLIENT" | "UNIX" | "LOCAL" | "GOPEN" => {
            MonitorAddr::Path(param.into())
        }
        "ABSTRACT-CONNECT" | "ABSTRACT-CLIENT" | "ABSTRACT" => {
            MonitorAddr::Abstract(param.to_string())
        }
        "TCP" | "TCP4" | "TCP6" | "TCP-CONNECT" | "TCP4-CONNECT" | "TCP6-CONNECT" => {
            let (host, port) = param.rsplit_once(':').ok_or_else(|| {
                format!("socat address {head:?} has no port: use {keyword}:HOST:PORT")
            })?;
            let port = port
                .parse()
                .map_err(|_| format!("socat address {head:?}: port {port:?} is not a number"))?;
            MonitorAddr::tcp(host, port)
        }
        k if k.contains("LISTEN") || k.contains("ACCEPT") || k.contains("RECV") => {
            return Err(format!(
                "socat address type {k} waits for clients, and QEMU's monitor is itself the listening side: connect to it with UNIX-CONNECT:PATH or TCP:HOST:PORT"
            ))
        }
        k if k.starts_with("UDP") || k.contains("DGRAM") || k.contains("SENDTO") => {
            return Err(format!(
                "socat address type {k} is a datagram socket; a QEMU monitor is a stream socket: use UNIX-CONNECT:PATH or TCP:HOST:PORT"
            ))
        }
        k @ ("EXEC" | "SYSTEM" | "SHELL") => {
            return Err(format!(
                "socat address type {k} runs a program; monitor-send relays standard I/O only: use - on that side"
            ))
        }
        other => {
            return Err(format!(
                "socat address type {other} is not one monitor-send knows: use - for standard I/O and UNIX-CONNECT:PATH or TCP:HOST:PORT for the monitor"
            ))
        }
    };
    if param.is_empty() {
        return Err(format!("socat address {head:?} has no socket path"));
    }
    Ok((Endpoint::Socket(addr), opts))
}

fn flag(opt: &str, value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(_) => Err(format!("socat address option {opt:?}: use 0 or 1")),
    }
}

/// `escape=0x0f`, `escape=15`, `escape=^O`.
fn byte(v: &str) -> Result<u8, String> {
    let parsed = if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u8::from_str_radix(hex, 16).ok()
    } else if let Some(c) = v.strip_prefix('^') {
        c.bytes()
            .next()
            .filter(|_| c.len() == 1)
            .map(|b| b.to_ascii_uppercase() ^ 0x40)
    } else {
        v.parse().ok()
    };
    parsed.ok_or_else(|| format!("escape={v}: not a character code (use e.g. 0x0f)"))
}

/// Whether an argument looks like a socat address (so a monitor-send
/// command line is in socat's form).
pub fn looks_like_address(arg: &str) -> bool {
    let head = arg.split(',').next().unwrap_or_default();
    if head == "-" || head.eq_ignore_ascii_case("stdio") || head.eq_ignore_ascii_case("stdin") {
        return true;
    }
    match head.split_once(':') {
        Some((kw, _)) => {
            !kw.is_empty()
                && kw.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && kw.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn job(s: &str) -> Job {
        match parse(&args(s)).unwrap() {
            Action::Run(job) => *job,
            Action::Say(text) => panic!("{s}: said {text}"),
        }
    }

    #[test]
    fn recipe_forms() {
        let j = job("-u - unix-connect:/tmp/qemu-sock");
        assert_eq!(j.mode, Mode::Dispatch);
        assert_eq!(j.output, Output::Quiet);
        assert_eq!(j.addr, MonitorAddr::parse("/tmp/qemu-sock"));

        let j = job("UNIX-CONNECT:/tmp/s STDIO");
        assert_eq!(j.mode, Mode::Reply);
        assert_eq!(j.output, Output::Plain);

        let j = job("stdio,ignoreeof unix-connect:/tmp/q,ignoreeof");
        assert_eq!(j.addr, MonitorAddr::parse("/tmp/q"));
        assert!(j.ignoreeof);
        assert!(!job("- unix:/tmp/q,ignoreeof").ignoreeof);

        assert_eq!(
            job("/run/admin.sock stdio").addr,
            MonitorAddr::parse("/run/admin.sock")
        );
        let j = job("- UNIX-CONNECT:/tmp/s,retry=10,interval=0.1");
        assert_eq!(j.wait_socket, Some(Duration::from_secs(1)));
        let j = job("- ABSTRACT-CONNECT:mon");
        assert_eq!(j.addr, MonitorAddr::Abstract("mon".into()));
        assert_eq!(job("-u unix-connect:/tmp/s -").commands, Commands::None);
    }

    #[test]
    fn address_options_recipes_use() {
        assert!(job("-,shut-down unix-connect:/tmp/s").half_close);
        assert!(!job("- UNIX:/tmp/s,shut-none").half_close);
        let j = job("-,raw,echo=0 unix-connect:/tmp/s");
        assert!(j.terminal.raw && j.terminal.echo == Some(false));
        let j = job("-,rawer,escape=0x0f UNIX-CONNECT:/tmp/s");
        assert!(j.terminal.rawer);
        assert_eq!(j.escape, Some(0x0f));
        assert_eq!(job("-,escape=^O unix:/s").escape, Some(0x0f));
        assert_eq!(
            job("-,echo=0,icanon=0 unix:/s").terminal.icanon,
            Some(false)
        );
        assert!(job("-,ignoreeof unix:/s").ignoreeof);
        job("-,b38400,cs8,crnl,sane GOPEN:/tmp/s");
        job("READLINE,history=/tmp/h UNIX-CONNECT:/tmp/s");
        assert_eq!(
            job("- TCP:localhost:4444").addr,
            MonitorAddr::tcp("localhost", 4444)
        );
        assert_eq!(job("TCP4:[::1]:4444 -").addr, MonitorAddr::tcp("::1", 4444));
    }

    #[test]
    fn help_and_version_answer() {
        for a in ["-V", "-h", "--help"] {
            assert!(matches!(parse(&args(a)).unwrap(), Action::Say(_)), "{a}");
        }
    }

    #[test]
    fn refuses_what_cannot_apply_and_says_what_instead() {
        let e = parse(&args("- UNIX-LISTEN:/tmp/s")).unwrap_err();
        assert!(e.contains("UNIX-CONNECT:PATH"), "{e}");
        let e = parse(&args("- unix-connect:/tmp/s,fork")).unwrap_err();
        assert!(e.contains("leave it out"), "{e}");
        assert!(parse(&args("-L x - unix-connect:/tmp/s"))
            .unwrap_err()
            .contains("-L"));
        assert!(parse(&args("- -")).unwrap_err().contains("the monitor"));
        assert!(parse(&args("-")).unwrap_err().contains("two addresses"));
        assert!(parse(&args("- UDP:h:1")).unwrap_err().contains("stream"));
    }

    #[test]
    fn tells_addresses_from_commands() {
        assert!(looks_like_address("unix-connect:/tmp/s"));
        assert!(looks_like_address("STDIO"));
        assert!(looks_like_address("-"));
        assert!(!looks_like_address("migrate \"exec:cat > f\""));
        assert!(!looks_like_address("/tmp/qemu-sock"));
    }
}
