//! OpenBSD nc's grammar, and ncat's long options, as recipes use them:
//! `nc [-N] [-d] [-q S] [-w S] -U PATH` or `nc HOST PORT` (a TCP monitor).

use std::time::Duration;

use qemu_monitor::MonitorAddr;

use crate::job::{Action, Commands, Job, Mode, Output};

/// nc options without a value that mean something for a monitor, or nothing harmful.
const FLAGS: &str = "NdUvCn46DzhV";
/// nc options that take a value and are honoured or harmless.
const VALUED: &str = "qwiIOT";

pub const HELP: &str = "\
usage: nc [-46CDdhNnvVz] [-i interval] [-q seconds] [-w timeout] -U path
       nc [options] host port
       ncat [--unixsock] [--send-only | --recv-only] [--wait S] [--idle-timeout S] ...

monitor-send, linked as nc, netcat or ncat: nc's grammar toward a QEMU monitor
(HMP or QMP, unix socket or TCP), sending one line at a time and waiting for
QEMU's proof that it read it, so that no command is lost.

  -U path        the monitor's unix socket (@name: an abstract socket)
  host port      a TCP monitor (-monitor tcp:HOST:PORT,server,nowait)
  -N             half-close on end of input and read to QEMU's end (always done)
  -q seconds     wait for the replies, then quit (-q 0 too)
  -w seconds     idle timeout: bounds every wait on QEMU, and a session silent
                 that long ends; -w 0: return once each command is dispatched,
                 without its output
  -d             send nothing: print the greeting (a readiness probe)
  -z             connect and close: exit 0 if the monitor answers
  -v             say on stderr what was connected to
  -C -D -n -4 -6 -i -I -O -T   accepted, with no effect on a monitor
  --send-only    (ncat) send, print nothing
  --recv-only    (ncat) send nothing, print the greeting

Standard output carries what QEMU said (the banner, replies, errors, events),
cleaned of the line editor's escape codes; the exit status is nc's: 0 when the
monitor was reached and every command confirmed (QEMU's error replies
included: they are its words on stdout), 1 otherwise (a line refused too). Set
MONITOR_SEND_STRICT=1 for monitor-send's own exit statuses (see monitor-send --help).
";

pub fn parse(args: &[String]) -> Result<Action, String> {
    if args.is_empty() {
        return Err(format!(
            "no socket given\n{}",
            HELP.lines().take(3).collect::<Vec<_>>().join("\n")
        ));
    }
    let mut unix = false;
    let mut no_stdin = false;
    let mut scan = false;
    let mut verbose = false;
    let mut send_only = false;
    let mut wait: Option<f64> = None;
    let mut quit: Option<f64> = None;
    let mut positional = Vec::new();

    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            positional.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let mut value = || -> Result<String, String> {
                if let Some(v) = &inline {
                    return Ok(v.clone());
                }
                let v = args
                    .get(i)
                    .cloned()
                    .ok_or_else(|| format!("option --{name} needs a value"))?;
                i += 1;
                Ok(v)
            };
            match name {
                "unixsock" => unix = true,
                "send-only" => send_only = true,
                "recv-only" => no_stdin = true,
                "verbose" => verbose = true,
                "nodns" | "crlf" | "no-shutdown" => {}
                "wait" | "idle-timeout" => wait = Some(seconds(name, &value()?)?),
                "help" => return Ok(Action::Say(HELP.to_string())),
                "version" => return Ok(Action::Say(version())),
                other => return Err(unsupported_long(other)),
            }
            continue;
        }
        let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.is_empty()) else {
            positional.push(arg.clone());
            continue;
        };
        for (at, c) in cluster.char_indices() {
            if VALUED.contains(c) {
                let rest = &cluster[at + c.len_utf8()..];
                let value = if rest.is_empty() {
                    let v = args
                        .get(i)
                        .ok_or_else(|| format!("option -{c} needs a value"))?
                        .clone();
                    i += 1;
                    v
                } else {
                    rest.to_string()
                };
                match c {
                    'w' => wait = Some(seconds("-w", &value)?),
                    'q' => quit = Some(seconds("-q", &value)?),
                    // -i (delay between lines), -I/-O (buffer sizes), -T (TOS):
                    // each line waits for QEMU anyway, and the rest is the kernel's.
                    _ => {}
                }
                break;
            }
            if !FLAGS.contains(c) {
                return Err(unsupported(c));
            }
            match c {
                'U' => unix = true,
                'd' => no_stdin = true,
                'z' => scan = true,
                'v' => verbose = true,
                'h' => return Ok(Action::Say(HELP.to_string())),
                'V' => return Ok(Action::Say(version())),
                // -N (shut down on EOF) is what monitor-send always does; -C
                // (CRLF), -D (debug), -n (no DNS), -4/-6 change nothing here.
                _ => {}
            }
        }
    }

    let addr = match (unix, positional.as_slice()) {
        (true, [path]) => MonitorAddr::parse(path),
        (true, []) => return Err("missing socket path: use -U PATH".into()),
        (true, [_, extra, ..]) => {
            return Err(format!(
                "unexpected argument {extra:?}: -U takes one socket path and no port"
            ))
        }
        (false, [host, port]) => {
            let port: u16 = port.parse().map_err(|_| {
                format!("port {port:?} is not a number: give the monitor's TCP port, as in `nc localhost 4444`")
            })?;
            MonitorAddr::tcp(host, port)
        }
        (false, [one]) => {
            return Err(format!(
                "{one:?} alone is neither a socket nor a host and port: use -U PATH for a unix socket, or HOST PORT"
            ))
        }
        (false, []) => {
            return Err("missing socket: use -U PATH for a unix socket, or HOST PORT".into())
        }
        (false, [_, _, extra, ..]) => {
            return Err(format!(
                "unexpected argument {extra:?}: a monitor is one HOST PORT (port ranges are for scans)"
            ))
        }
    };

    let mut job = Job::new(addr);
    job.borrowed = true;
    job.qmp_passthrough = true;
    job.verbose = verbose;
    job.output = Output::Plain;
    if no_stdin || scan {
        job.commands = Commands::None;
    }
    if scan || send_only {
        job.output = Output::Quiet;
    }
    // `-w 0` means "send and go" in recipes: dispatch without waiting for
    // output. `-q 0` waits for the replies, as nc shows them in practice. A
    // positive value bounds every wait, like nc's idle timeout.
    job.mode = if wait == Some(0.0) {
        Mode::Dispatch
    } else {
        Mode::Reply
    };
    if let Some(secs) = [wait, quit]
        .into_iter()
        .flatten()
        .filter(|&s| s > 0.0)
        .reduce(f64::min)
    {
        job.timeout = Duration::from_secs_f64(secs);
    }
    if let Some(w) = wait.filter(|&w| w > 0.0) {
        job.idle_timeout = Some(Duration::from_secs_f64(w));
    }
    Ok(Action::Run(Box::new(job)))
}

fn seconds(option: &str, value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(s) if s.is_finite() && s <= 1e9 => Ok(s),
        _ => Err(format!("{option} {value}: not a number of seconds")),
    }
}

pub fn version() -> String {
    format!(
        "monitor-send {} (as nc: OpenBSD netcat's and ncat's grammar toward a QEMU monitor)\n",
        env!("CARGO_PKG_VERSION")
    )
}

fn unsupported(c: char) -> String {
    let what = match c {
        'l' | 'k' => {
            " (listen): QEMU's monitor is the listening side; nc connects to it with -U PATH or HOST PORT"
        }
        'u' => " (UDP): a QEMU monitor is a stream socket: use -U PATH or HOST PORT",
        'p' | 's' => " (source port or address): not needed to reach a monitor; leave it out",
        'x' | 'X' => " (proxy): reach the monitor directly with -U PATH or HOST PORT",
        't' => " (telnet): a QEMU monitor speaks no telnet; leave it out",
        'c' | 'e' => " (execute): monitor-send relays standard input and output only",
        'F' => " (pass the descriptor): monitor-send talks to the monitor itself; leave it out",
        'S' | 'Z' => ": not used for a QEMU monitor; leave it out",
        _ => ": not an nc option monitor-send knows (see nc -h)",
    };
    format!("nc option -{c}{what}")
}

fn unsupported_long(name: &str) -> String {
    let what = match name {
        "listen" | "keep-open" | "broker" | "chat" => {
            ": QEMU's monitor is the listening side; connect to it with --unixsock PATH or HOST PORT"
        }
        "udp" | "sctp" => ": a QEMU monitor is a stream socket: use --unixsock PATH or HOST PORT",
        "exec" | "sh-exec" | "lua-exec" => ": monitor-send relays standard input and output only",
        n if n.starts_with("ssl") || n.starts_with("proxy") => {
            ": a QEMU monitor is reached directly, without TLS or a proxy"
        }
        _ => ": not an ncat option monitor-send knows (see nc -h)",
    };
    format!("ncat option --{name}{what}")
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
        let j = job("-w 0 -U /tmp/qemu-sock");
        assert_eq!(j.mode, Mode::Dispatch);
        assert_eq!(j.addr, MonitorAddr::parse("/tmp/qemu-sock"));

        assert_eq!(job("-NU /tmp/s").mode, Mode::Reply);
        assert_eq!(job("-q 0 -U /tmp/s").mode, Mode::Reply);
        assert_eq!(job("-q 1 -w 1 -U /tmp/s").timeout, Duration::from_secs(1));

        let j = job("-Uw0 @abstract");
        assert_eq!(j.mode, Mode::Dispatch);
        assert_eq!(j.addr, MonitorAddr::Abstract("abstract".into()));

        assert_eq!(job("-d -U /tmp/s").commands, Commands::None);
        assert_eq!(
            job("localhost 4444").addr,
            MonitorAddr::tcp("localhost", 4444)
        );
        let z = job("-z 127.0.0.1 4444");
        assert_eq!((z.commands, z.output), (Commands::None, Output::Quiet));
        assert_eq!(job("--unixsock /tmp/s --send-only").output, Output::Quiet);
        assert_eq!(job("--recv-only -U /tmp/s").commands, Commands::None);
    }

    #[test]
    fn help_and_version_answer() {
        for a in ["-h", "--help", "-V", "--version"] {
            assert!(matches!(parse(&args(a)).unwrap(), Action::Say(_)), "{a}");
        }
    }

    #[test]
    fn refuses_what_a_monitor_cannot_use_and_says_what_instead() {
        let e = parse(&args("-l -U /tmp/s")).unwrap_err();
        assert!(e.contains("-U PATH or HOST PORT"), "{e}");
        assert!(parse(&[]).unwrap_err().contains("usage: nc"));
        assert!(parse(&args("-U"))
            .unwrap_err()
            .contains("missing socket path"));
        assert!(parse(&args("-w x -U /s"))
            .unwrap_err()
            .contains("not a number"));
        assert!(parse(&args("--ssl -U /s")).unwrap_err().contains("TLS"));
    }
}
