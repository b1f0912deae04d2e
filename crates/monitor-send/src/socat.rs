//! socat's grammar, as recipes use it: `socat [-u] [-t S] [-T S] ADDR ADDR`,
//! one address standard I/O, the other the monitor socket.

use std::time::Duration;

use qemu_monitor::MonitorAddr;

use crate::duration;
use crate::job::{Commands, Job, Mode, Output};

/// socat's default `interval` between connection retries.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// `forever` waits for the socket as long as anyone would.
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

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
}

pub fn parse(args: &[String]) -> Result<Job, String> {
    let mut unidirectional = false;
    let mut reverse = false;
    let mut verbose = false;
    let mut inactivity: Option<Duration> = None;
    let mut addresses = Vec::new();

    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if addresses.is_empty() && arg.len() > 1 && arg.starts_with('-') {
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
                "-t" => {
                    // socat's grace period after EOF; replies are awaited
                    // exactly instead, so it only has to parse.
                    duration::parse(&value()?).map_err(|e| format!("-t: {e}"))?;
                }
                "-T" => {
                    inactivity = Some(duration::parse(&value()?).map_err(|e| format!("-T: {e}"))?)
                }
                a if a.starts_with("-d") && a[1..].chars().all(|c| c == 'd') => verbose = true,
                other => {
                    return Err(format!(
                        "socat option {other} is not supported for a monitor socket"
                    ))
                }
            }
            continue;
        }
        addresses.push(arg.clone());
    }

    let [left, right] = addresses.as_slice() else {
        return Err(format!(
            "socat needs exactly two addresses (standard I/O and the monitor socket), got {}",
            addresses.len()
        ));
    };
    let (left, left_opts) = endpoint(left)?;
    let (right, right_opts) = endpoint(right)?;
    let (socket, opts, stdio_first) = match (left, right) {
        (Endpoint::Stdio, Endpoint::Socket(s)) => (s, right_opts, true),
        (Endpoint::Socket(s), Endpoint::Stdio) => (s, left_opts, false),
        (Endpoint::Stdio, Endpoint::Stdio) => {
            return Err("one address must be the monitor socket, e.g. UNIX-CONNECT:PATH".into())
        }
        (Endpoint::Socket(_), Endpoint::Socket(_)) => {
            return Err("one address must be standard I/O (- or STDIO)".into())
        }
    };

    let mut job = Job::new(socket);
    job.qmp_passthrough = true;
    job.verbose = verbose;
    if let Some(t) = inactivity {
        job.timeout = t;
    }
    if opts.forever {
        job.wait_socket = Some(FOREVER);
    } else if let Some(n) = opts.retry {
        job.wait_socket = Some(opts.interval.unwrap_or(DEFAULT_INTERVAL) * n);
    }
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
    Ok(job)
}

fn endpoint(spec: &str) -> Result<(Endpoint, AddressOptions), String> {
    let mut parts = spec.split(',');
    let head = parts.next().unwrap_or_default();
    let mut opts = AddressOptions::default();
    for opt in parts {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        match (key.to_ascii_lowercase().as_str(), value) {
            ("retry", Some(v)) => {
                opts.retry = Some(v.parse().map_err(|_| format!("retry={v}: not a count"))?)
            }
            ("interval", Some(v)) => {
                opts.interval = Some(duration::parse(v).map_err(|e| format!("interval: {e}"))?)
            }
            ("forever", None) => opts.forever = true,
            // Lines are framed by monitor-send itself and replies always
            // awaited, so these two change nothing for a monitor.
            ("crnl", None) | ("ignoreeof", None) => {}
            _ => {
                return Err(format!(
                    "socat address option {opt:?} is not supported for a monitor socket"
                ))
            }
        }
    }
    if head == "-"
        || ["STDIO", "STDIN"]
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
            "socat address {head:?} is not supported: use UNIX-CONNECT:PATH for the monitor socket"
        ));
    };
    let addr = match keyword.to_ascii_uppercase().as_str() {
        "UNIX-CONNECT" | "UNIX-CLIENT" | "UNIX" | "LOCAL" | "GOPEN" => {
            MonitorAddr::Path(param.into())
        }
        "ABSTRACT-CONNECT" | "ABSTRACT-CLIENT" | "ABSTRACT" => {
            MonitorAddr::Abstract(param.to_string())
        }
        other => {
            return Err(format!(
                "socat address type {other} is not supported: a QEMU monitor is a unix socket (UNIX-CONNECT:PATH)"
            ))
        }
    };
    if param.is_empty() {
        return Err(format!("socat address {head:?} has no socket path"));
    }
    Ok((Endpoint::Socket(addr), opts))
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

    #[test]
    fn recipe_forms() {
        let job = parse(&args("-u - unix-connect:/tmp/qemu-sock")).unwrap();
        assert_eq!(job.mode, Mode::Dispatch);
        assert_eq!(job.output, Output::Quiet);
        assert_eq!(job.addr, MonitorAddr::parse("/tmp/qemu-sock"));

        let job = parse(&args("UNIX-CONNECT:/tmp/s STDIO")).unwrap();
        assert_eq!(job.mode, Mode::Reply);
        assert_eq!(job.output, Output::Plain);

        let job = parse(&args("stdio,ignoreeof unix-connect:/tmp/q,ignoreeof")).unwrap();
        assert_eq!(job.addr, MonitorAddr::parse("/tmp/q"));

        let job = parse(&args("/run/admin.sock stdio")).unwrap();
        assert_eq!(job.addr, MonitorAddr::parse("/run/admin.sock"));

        let job = parse(&args("- UNIX-CONNECT:/tmp/s,retry=10,interval=0.1")).unwrap();
        assert_eq!(job.wait_socket, Some(Duration::from_secs(1)));

        let job = parse(&args("- ABSTRACT-CONNECT:mon")).unwrap();
        assert_eq!(job.addr, MonitorAddr::Abstract("mon".into()));

        let job = parse(&args("-u unix-connect:/tmp/s -")).unwrap();
        assert_eq!(job.commands, Commands::None);
    }

    #[test]
    fn refuses_what_a_monitor_socket_cannot_do() {
        assert!(parse(&args("- TCP:localhost:4444"))
            .unwrap_err()
            .contains("TCP"));
        assert!(parse(&args("- UNIX-LISTEN:/tmp/s"))
            .unwrap_err()
            .contains("UNIX-LISTEN"));
        assert!(parse(&args("- unix-connect:/tmp/s,fork"))
            .unwrap_err()
            .contains("fork"));
        assert!(parse(&args("-L x - unix-connect:/tmp/s"))
            .unwrap_err()
            .contains("-L"));
        assert!(parse(&args("- -")).unwrap_err().contains("monitor socket"));
        assert!(parse(&args("-")).unwrap_err().contains("two addresses"));
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
