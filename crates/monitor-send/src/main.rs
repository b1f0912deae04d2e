//! `monitor-send`: sends commands to a QEMU monitor socket and never loses
//! one. It speaks its own argument form and, as a drop-in, those of OpenBSD
//! nc (`-U PATH`) and socat (`- UNIX-CONNECT:PATH`); see `--help`.

// Started thousands of times from shell recipes, it skips the Rust runtime's
// start-up (stack-guard probing reads /proc/self/maps): a C `main` calls ours.
#![cfg_attr(not(test), no_main)]

mod duration;
mod job;
mod native;
mod nc;
mod socat;

use std::path::Path;

use job::{exit, PROG};

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
        "nc" | "netcat" | "nc.openbsd" => return Form::Nc,
        "socat" => return Form::Socat,
        _ => {}
    }
    if args.iter().any(|a| socat::looks_like_address(a)) {
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
    let code = run();
    // Without the runtime's exit path, nothing flushes stdout for us.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    i32::from(code)
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
        Form::Nc => match nc::parse(&args) {
            Ok(job) => job,
            Err(message) => return usage(&message),
        },
        Form::Socat => match socat::parse(&args) {
            Ok(job) => job,
            Err(message) => return usage(&message),
        },
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
    }
}
