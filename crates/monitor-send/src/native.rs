//! monitor-send's own form: `monitor-send [OPTIONS] SOCKET [COMMAND]...`.

use std::time::Duration;

use clap::Parser;
use qemu_monitor::{MonitorAddr, Protocol};

use crate::duration;
use crate::job::{Commands, Job, Mode, Output};

const AFTER_HELP: &str = "\
Argument forms:
  monitor-send [OPTIONS] SOCKET [COMMAND]...       this form
  monitor-send [-N] [-d] [-q S] [-w S] -U PATH      OpenBSD nc's form (-w 0: dispatch and go)
  monitor-send [-u] [-t S] [-T S] ADDR ADDR         socat's form (-u: dispatch and go, quiet)
  Linked or copied as `nc`, `netcat`, `ncat` or `socat`, it takes that tool's
  form, so `echo stop | nc -w 0 -U /tmp/qemu-sock` in a recipe runs unchanged;
  `nc -h` and `socat -h` list what those forms accept (TCP monitors too:
  `nc HOST PORT`, `socat - TCP:HOST:PORT`).

Every command is confirmed received before the next is sent and before the
connection closes: by its reply, or in dispatch mode by QEMU's echo of the
line's end (HMP) or its reply (QMP). QMP input is read as QEMU reads it: an
object may span lines, several may share one, strings may be single-quoted.

Exit status (this form; the nc and socat forms exit as those tools do, 0 when
the monitor was reached and every command confirmed, unless
MONITOR_SEND_STRICT=1 is set):
  0  every command was received and ran (no command at all: the socket answered)
  1  bad arguments, or the socket could not be reached (nothing was sent)
  2  QEMU answered a command with an error (the other commands still ran)
  3  a command was not confirmed: timeout, early close, or not a QEMU monitor
  4  a line was refused before sending (longer than 4095 bytes, control bytes,
     JSON to the human monitor, not JSON where JSON began); the other lines
     were still sent

Examples:
  monitor-send /tmp/qemu-sock 'info status'
  monitor-send --dispatch /tmp/qemu-sock 'migrate \"exec:cat > /tmp/statefile\"'
  monitor-send --json /tmp/qmp-sock '{\"execute\":\"query-status\"}' 'info version'
  echo 'migrate \"exec:cat > /tmp/statefile\"' | nc -w 0 -U /tmp/qemu-sock";

/// Send commands to a QEMU monitor socket (HMP or QMP) without losing any.
#[derive(Debug, Parser)]
#[command(name = "monitor-send", version, after_help = AFTER_HELP)]
struct Cli {
    /// The monitor's unix socket; `@name` for an abstract socket; `tcp:HOST:PORT` for a TCP monitor.
    #[arg(value_parser = parse_socket)]
    socket: MonitorAddr,
    /// Commands to send, one per argument; read from stdin, one per line, if none.
    commands: Vec<String>,
    /// Expect the machine monitor (QMP); HMP command lines go through human-monitor-command.
    #[arg(long, conflicts_with = "hmp")]
    qmp: bool,
    /// Expect the human monitor (HMP).
    #[arg(long)]
    hmp: bool,
    /// Print one JSON object per command: its output or its error.
    #[arg(long, conflicts_with = "raw")]
    json: bool,
    /// Print the bytes as QEMU sent them, echo and prompts included.
    #[arg(long)]
    raw: bool,
    /// Return once each command is dispatched, without waiting for its output.
    #[arg(long)]
    dispatch: bool,
    /// Deadline for each wait on QEMU (e.g. 500ms, 10s, 2m).
    #[arg(long, value_parser = duration::parse, default_value = "60s")]
    timeout: Duration,
    /// Wait this long for the socket to appear and accept.
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    wait_socket: Option<Duration>,
    /// Say on stderr what was connected to.
    #[arg(short, long)]
    verbose: bool,
}

/// The socket as QEMU's own options write it (`tcp:HOST:PORT`,
/// `telnet:…`, `unix:PATH,server`), or a path.
fn parse_socket(s: &str) -> Result<MonitorAddr, String> {
    MonitorAddr::from_option(s)
}

pub fn parse(args: &[String]) -> Result<Job, clap::Error> {
    // The common call, a socket and commands without options, is what clap
    // would make of it; building clap's parser costs more than the rest of
    // the start-up, at every call of a recipe.
    if let [socket, commands @ ..] = args {
        if args.iter().all(|a| !a.starts_with('-')) {
            if let Ok(addr) = parse_socket(socket) {
                let mut job = Job::new(addr);
                if !commands.is_empty() {
                    job.commands = Commands::Args(commands.to_vec());
                }
                return Ok(job);
            }
        }
    }
    parse_with_clap(args)
}

fn parse_with_clap(args: &[String]) -> Result<Job, clap::Error> {
    let cli = Cli::try_parse_from(
        std::iter::once("monitor-send".to_string()).chain(args.iter().cloned()),
    )?;
    let mut job = Job::new(cli.socket);
    job.commands = if cli.commands.is_empty() {
        Commands::Stdin
    } else {
        Commands::Args(cli.commands)
    };
    job.protocol = match (cli.qmp, cli.hmp) {
        (true, _) => Some(Protocol::Qmp),
        (_, true) => Some(Protocol::Hmp),
        _ => None,
    };
    job.output = if cli.json {
        Output::Json
    } else if cli.raw {
        Output::Raw
    } else {
        Output::Plain
    };
    job.mode = if cli.dispatch {
        Mode::Dispatch
    } else {
        Mode::Reply
    };
    job.timeout = cli.timeout;
    job.wait_socket = cli.wait_socket;
    job.verbose = cli.verbose;
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_path_gives_what_clap_gives() {
        for line in [
            vec!["/tmp/qemu-sock", "info status"],
            vec!["/tmp/qemu-sock"],
            vec!["@abstract", "stop", "cont"],
            vec!["tcp:localhost:4444", "migrate \"exec:cat > /tmp/f\""],
        ] {
            let args: Vec<String> = line.iter().map(|s| s.to_string()).collect();
            assert_eq!(
                format!("{:?}", parse(&args).unwrap()),
                format!("{:?}", parse_with_clap(&args).unwrap()),
                "{line:?}"
            );
        }
    }
}
