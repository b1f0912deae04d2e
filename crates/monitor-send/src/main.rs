//! `monitor-send`: sends commands to a QEMU monitor (a unix socket or TCP)
//! and never loses one. It speaks its own argument form (`job.rs` runs it)
//! and, as a drop-in, those of OpenBSD nc and ncat (`nc.rs`) and socat
//! (`socat.rs`), which run as a session relaying standard input and QEMU's
//! output as those tools do (`session.rs`); see `--help`, `nc -h`, `socat -h`.

// Started thousands of times from shell recipes, it skips the Rust runtime's
// start-up (stack-guard probing reads /proc/self/maps): a C `main` calls ours.
#![cfg_attr(not(test), no_main)]

mod duration;
mod input;
mod job;
mod native;
mod nc;
mod session;
mod socat;
mod terminal;

use std::path::Path;

use job::{exit, Action, PROG};

#[derive(Debug, PartialEq, Eq)]
enum Form {
    Native,
    Nc,
    Socat,
}

/// Which grammar the command line is in: the name it was invoked by first,
/// then its shape.
fn form(argv0: &str, args: &[String]) -> Form {
    let name = Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    match name {
        "nc" | "netcat" | "nc.openbsd" | "ncat" => return Form::Nc,
        "socat" => return Form::Socat,
        _ => {}
    }
    if args
        .iter()
        .any(|a| matches!(a.as_str(), "--unixsock" | "--send-only" | "--recv-only"))
    {
        return Form::Nc;
    }
    // socat's form has two addresses; the native form may start with one
    // (`tcp:HOST:PORT`) and go on with commands.
    if args.iter().filter(|a| socat::looks_like_address(a)).count() >= 2 {
        return Form::Socat;
    }
    let nc_cluster = |a: &String| {
        a.len() > 1
            && !a.starts_with("--")
            && a.starts_with('-')
            && a[1..].chars().all(|c| c.is_ascii_alphanumeric())
            && a.contains('U')
    };
    if args.iter().any(nc_cluster) {
        return Form::Nc;
    }
    Form::Native
}

#[cfg(not(test))]
#[no_mangle]
extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    standard_descriptors();
    let code = run();
    // Without the runtime's exit path, nothing flushes stdout for us.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    i32::from(code)
}

/// Makes sure descriptors 0, 1 and 2 are open before any socket is: started
/// with stdin closed (`<&-`), the monitor socket would become "stdin", and
/// with stdout closed, the commands' output would be written to QEMU.
/// A closed stdin reads as empty, a closed stdout or stderr discards.
/// And a reader of stdout that goes away (`| head -1`) must not kill the
/// process before every command is delivered: SIGPIPE is ignored, and a
/// broken stdout only stops the printing.
#[cfg_attr(test, allow(dead_code))]
fn standard_descriptors() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only inspects the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: a constant C string; open returns the lowest free descriptor, `fd`.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
    // SAFETY: setting a signal's disposition to ignore has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// `MONITOR_SEND_STRICT=1`: the nc and socat forms exit with monitor-send's
/// own statuses and messages instead of the tool's.
fn strict() -> bool {
    std::env::var_os("MONITOR_SEND_STRICT").is_some_and(|v| !v.is_empty() && v != "0")
}

// In a test build the harness has the `main`, and nothing calls this.
#[cfg_attr(test, allow(dead_code))]
fn run() -> u8 {
    let mut argv = std::env::args();
    let argv0 = argv.next().unwrap_or_else(|| PROG.to_string());
    let args: Vec<String> = argv.collect();
    let job = match form(&argv0, &args) {
        Form::Native => match native::parse(&args) {
            Ok(job) => job,
            Err(e) => {
                let _ = e.print();
                return if e.use_stderr() {
                    exit::UNREACHABLE
                } else {
                    exit::OK
                };
            }
        },
        Form::Nc | Form::Socat => {
            let parsed = if form(&argv0, &args) == Form::Nc {
                nc::parse(&args)
            } else {
                socat::parse(&args)
            };
            match parsed {
                Ok(Action::Run(mut job)) => {
                    job.strict = strict();
                    *job
                }
                Ok(Action::Say(text)) => {
                    print!("{text}");
                    return exit::OK;
                }
                Err(message) => return usage(&message),
            }
        }
    };
    job::run(&job)
}

#[cfg_attr(test, allow(dead_code))]
fn usage(message: &str) -> u8 {
    eprintln!("{PROG}: {message}");
    exit::UNREACHABLE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn picks_the_form() {
        assert_eq!(form("/usr/local/bin/nc", &args("-w 0 -U /tmp/s")), Form::Nc);
        assert_eq!(form("socat", &args("- /tmp/s")), Form::Socat);
        assert_eq!(form("monitor-send", &args("-NU /tmp/s")), Form::Nc);
        assert_eq!(
            form("monitor-send", &args("-u - unix-connect:/tmp/s")),
            Form::Socat
        );
        assert_eq!(
            form("monitor-send", &args("-U - unix-connect:/tmp/s")),
            Form::Socat
        );
        assert_eq!(
            form("monitor-send", &args("/tmp/s info status")),
            Form::Native
        );
        assert_eq!(form("monitor-send", &args("--qmp /tmp/s")), Form::Native);
        assert_eq!(
            form("monitor-send", &args("tcp:localhost:4444 stop")),
            Form::Native
        );
        assert_eq!(form("/usr/bin/ncat", &args("--unixsock /tmp/s")), Form::Nc);
    }
}
