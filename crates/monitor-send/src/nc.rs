//! OpenBSD nc's grammar, as recipes use it: `nc [-N] [-d] [-q S] [-w S] -U PATH`.

use std::time::Duration;

use qemu_monitor::MonitorAddr;

use crate::job::{Commands, Job, Mode, Output};

/// nc options that mean something for a unix socket client and are honoured.
const FLAGS: &str = "NdUvCn46";
/// nc options that take a value and are honoured.
const VALUED: &str = "qw";

pub fn parse(args: &[String]) -> Result<Job, String> {
    let mut path: Option<String> = None;
    let mut unix = false;
    let mut no_stdin = false;
    let mut verbose = false;
    let mut wait: Option<i64> = None;
    let mut quit: Option<i64> = None;
    let mut positional = Vec::new();

    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            positional.extend(args[i..].iter().cloned());
            break;
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
                let secs: i64 = value
                    .parse()
                    .map_err(|_| format!("-{c} {value}: not a number of seconds"))?;
                if c == 'w' {
                    wait = Some(secs);
                } else {
                    quit = Some(secs);
                }
                break;
            }
            if !FLAGS.contains(c) {
                return Err(unsupported(c));
            }
            match c {
                'U' => unix = true,
                'd' => no_stdin = true,
                'v' => verbose = true,
                // -N (shut down on EOF) is what monitor-send always does; -C
                // (CRLF), -n (no DNS), -4/-6 change nothing on a unix socket.
                _ => {}
            }
        }
    }

    if !unix {
        return Err(
            "only unix sockets are supported: use -U PATH (TCP connections to a monitor are not)"
                .into(),
        );
    }
    match positional.as_slice() {
        [p] => path = Some(p.clone()),
        [] => {}
        [_, extra, ..] => {
            return Err(format!(
                "unexpected argument {extra:?}: -U takes one socket path and no port"
            ))
        }
    }
    let path = path.ok_or("missing socket path: use -U PATH")?;

    let mut job = Job::new(MonitorAddr::parse(&path));
    job.qmp_passthrough = true;
    job.verbose = verbose;
    job.output = Output::Plain;
    if no_stdin {
        job.commands = Commands::None;
    }
    // -w 0 and -q 0 mean "send and go" in recipes: dispatch without waiting
    // for output. A positive value bounds every wait, like nc's idle timeout.
    job.mode = if wait == Some(0) || quit == Some(0) {
        Mode::Dispatch
    } else {
        Mode::Reply
    };
    if let Some(secs) = [wait, quit].into_iter().flatten().filter(|&s| s > 0).min() {
        job.timeout = Duration::from_secs(secs as u64);
    }
    Ok(job)
}

fn unsupported(c: char) -> String {
    let what = match c {
        'l' => " (listen)",
        'k' => " (keep listening)",
        'u' => " (UDP)",
        'z' => " (port scan)",
        'p' => " (source port)",
        's' => " (source address)",
        'x' | 'X' => " (proxy)",
        't' => " (telnet)",
        'c' => " (crlf)",
        'e' => " (execute)",
        _ => "",
    };
    format!("nc option -{c}{what} is not supported for a monitor socket")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn recipe_forms() {
        let job = parse(&args("-w 0 -U /tmp/qemu-sock")).unwrap();
        assert_eq!(job.mode, Mode::Dispatch);
        assert_eq!(job.addr, MonitorAddr::parse("/tmp/qemu-sock"));

        let job = parse(&args("-NU /tmp/s")).unwrap();
        assert_eq!(job.mode, Mode::Reply);

        let job = parse(&args("-q 1 -w 1 -U /tmp/s")).unwrap();
        assert_eq!(job.timeout, Duration::from_secs(1));

        let job = parse(&args("-Uw0 @abstract")).unwrap();
        assert_eq!(job.mode, Mode::Dispatch);
        assert_eq!(job.addr, MonitorAddr::Abstract("abstract".into()));

        assert_eq!(
            parse(&args("-d -U /tmp/s")).unwrap().commands,
            Commands::None
        );
    }

    #[test]
    fn refuses_what_a_monitor_socket_cannot_do() {
        assert_eq!(
            parse(&args("-l -U /tmp/s")).unwrap_err(),
            "nc option -l (listen) is not supported for a monitor socket"
        );
        assert!(parse(&args("localhost 4444")).unwrap_err().contains("TCP"));
        assert!(parse(&args("-U"))
            .unwrap_err()
            .contains("missing socket path"));
        assert!(parse(&args("-w x -U /s"))
            .unwrap_err()
            .contains("not a number"));
    }
}
