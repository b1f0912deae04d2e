//! Bad input to monitor-send: each case gives its exact error and exit status,
//! and nothing is sent that should not be.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::thread;

use assert_cmd::Command;
use recipe_tests::{bin, qemus, Vm};

fn send() -> Command {
    Command::new(bin("monitor-send"))
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn missing_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qemu-sock");
    let out = send().arg(&sock).arg("info status").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr_of(&out),
        format!(
            "monitor-send: {}: No such file or directory\n",
            sock.display()
        )
    );
    // The drop-in forms say the same.
    let out = send()
        .args(["-w", "0", "-U"])
        .arg(&sock)
        .write_stdin("stop\n")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr_of(&out),
        format!(
            "monitor-send: {}: No such file or directory\n",
            sock.display()
        )
    );
}

#[test]
fn refused_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("dead-sock");
    drop(UnixListener::bind(&sock).unwrap()); // the file stays, nobody listens
    let out = send().arg(&sock).arg("info status").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr_of(&out),
        format!("monitor-send: {}: Connection refused\n", sock.display())
    );
}

/// A fake peer for what QEMU cannot be made to do.
fn fake_peer(
    script: impl FnOnce(std::os::unix::net::UnixStream) + Send + 'static,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake-sock");
    let listener = UnixListener::bind(&sock).unwrap();
    thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        script(stream);
    });
    (dir, sock)
}

#[test]
fn silent_peer() {
    let (_dir, sock) = fake_peer(|s| {
        // Says nothing; holds the connection until the client gives up.
        let mut buf = [0u8; 64];
        let _ = (&s).read(&mut buf);
    });
    let out = send()
        .args(["--timeout", "300ms"])
        .arg(&sock)
        .arg("stop")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        stderr_of(&out),
        format!(
            "monitor-send: {}: no greeting from QEMU within 300ms: the monitor may be busy with another client (QEMU serves one at a time); 0 commands confirmed before that\n",
            sock.display()
        )
    );
}

#[test]
fn garbage_peer() {
    let (_dir, sock) = fake_peer(|mut s| {
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
    });
    let out = send().arg(&sock).arg("stop").output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        stderr_of(&out),
        format!(
            "monitor-send: {}: not a QEMU monitor: it greeted with \"HTTP/1.1 400 Bad Request\\r\\n\\r\\n\"; 0 commands confirmed before that\n",
            sock.display()
        )
    );
}

#[test]
fn peer_closes_after_half_a_reply() {
    let (_dir, sock) = fake_peer(|mut s| {
        s.write_all(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
            .unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        s.write_all(&line).unwrap();
        s.write_all(b"\r\nVM sta").unwrap();
        // and hangs up mid-reply
    });
    let out = send().arg(&sock).arg("info status").output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        stderr_of(&out),
        format!(
            "monitor-send: {}: the peer closed the connection while waiting for reply to `info status` (it had sent \"VM sta\"); 0 commands confirmed before that\n",
            sock.display()
        )
    );
}

fn each_qemu(test: impl Fn(&Path, &mut Vm)) {
    for qemu in qemus() {
        let mut vm = Vm::none(&qemu);
        test(&qemu, &mut vm);
    }
}

#[test]
fn unknown_hmp_command_is_an_error_and_the_rest_still_runs() {
    each_qemu(|_, vm| {
        let out = send()
            .arg(&vm.hmp)
            .args(["frobnicate", "stop"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert_eq!(
            stderr_of(&out),
            format!(
                "monitor-send: {}: QEMU refused `frobnicate`: unknown command: 'frobnicate'\n",
                vm.hmp.display()
            )
        );
        assert_eq!(
            vm.status(),
            "paused",
            "the command after the failed one ran"
        );
    });
}

#[test]
fn qmp_error_is_an_error() {
    for qemu in qemus() {
        // The test kit holds a session of its own; monitor-send gets the VM's QMP socket.
        let mut vm = Vm::none(&qemu);
        let qmp2 = vm.qmp_path.clone();
        let out = send()
            .arg("--json")
            .arg(&qmp2)
            .args([
                r#"{"execute":"bogus"}"#,
                "info frob",
                r#"{"execute":"stop"}"#,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert_eq!(
            stderr_of(&out),
            format!(
                "monitor-send: {0}: QEMU refused `bogus`: The command bogus has not been found\n\
                 monitor-send: {0}: QEMU refused `info frob`: unknown command: 'info frob'\n",
                qmp2.display()
            )
        );
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["class"], "CommandNotFound");
        assert_eq!(lines[1]["error"], "unknown command: 'info frob'");
        assert!(lines[2]["return"].is_object());
        assert_eq!(
            vm.status(),
            "paused",
            "the command after the failed ones ran"
        );
    }
}

/// A refused line is reported and the lines after it are still sent; the
/// exit status says a line was refused.
#[test]
fn lines_qemu_would_cut_or_mangle_are_refused_and_the_rest_still_sent() {
    each_qemu(|_, vm| {
        let long = format!("echo {}", "x".repeat(4995));
        let out = send().arg(&vm.hmp).arg(&long).arg("stop").output().unwrap();
        assert_eq!(out.status.code(), Some(4));
        let err = stderr_of(&out);
        assert!(
            err.ends_with(
                "it is 5000 bytes long and QEMU's monitor keeps only the first 4095 of a line\n"
            ),
            "{err}"
        );
        assert_eq!(
            vm.status(),
            "paused",
            "the command after the refused one ran"
        );
        vm.qmp().execute("cont", None).unwrap();

        let out = send()
            .arg(&vm.hmp)
            .write_stdin("cont\x01\nstop\n")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(4));
        assert_eq!(
            stderr_of(&out),
            "monitor-send: refused before sending \"cont\\u{1}\": byte 0x01 (Ctrl-A) at offset 4 is an editing key in QEMU's line editor, not text\n"
        );
        assert_eq!(
            vm.status(),
            "paused",
            "the command after the refused one ran"
        );
    });
}

/// No command at all is a readiness probe: it connects and succeeds.
#[test]
fn empty_input_connects_and_succeeds() {
    each_qemu(|_, vm| {
        let out = send().arg(&vm.hmp).write_stdin("").output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
        assert_eq!(stderr_of(&out), "");
        let out = send()
            .args(["-w", "0", "-U"])
            .arg(&vm.hmp)
            .write_stdin("\n\n")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("QEMU "),
            "the nc form prints the greeting"
        );
    });
}

/// What cannot apply to a monitor is refused, in words that say what to use instead.
#[test]
fn unsupported_nc_and_socat_arguments_are_refused() {
    let cases: &[(&[&str], &str)] = &[
        (&["-l", "-U", "/tmp/s"], "monitor-send: nc option -l (listen): QEMU's monitor is the listening side; nc connects to it with -U PATH or HOST PORT\n"),
        (&["-u", "-U", "/tmp/s"], "monitor-send: nc option -u (UDP): a QEMU monitor is a stream socket: use -U PATH or HOST PORT\n"),
        (
            &["-", "UDP:127.0.0.1:4444"],
            "monitor-send: socat address type UDP is a datagram socket; a QEMU monitor is a stream socket: use UNIX-CONNECT:PATH or TCP:HOST:PORT\n",
        ),
        (
            &["-", "UNIX-LISTEN:/tmp/s"],
            "monitor-send: socat address type UNIX-LISTEN waits for clients, and QEMU's monitor is itself the listening side: connect to it with UNIX-CONNECT:PATH or TCP:HOST:PORT\n",
        ),
        (
            &["-", "unix-connect:/tmp/s,fork"],
            "monitor-send: socat address option \"fork\" is for serving many clients; a monitor session is one connection: leave it out\n",
        ),
    ];
    for (args, expected) in cases {
        let out = send().args(*args).write_stdin("stop\n").output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(stderr_of(&out), *expected, "{args:?}");
    }
    // Under the names nc and socat too.
    let links = recipe_tests::drop_in_dir();
    let out = Command::new(links.path().join("nc"))
        .args(["localhost"])
        .write_stdin("stop\n")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr_of(&out),
        "monitor-send: \"localhost\" alone is neither a socket nor a host and port: use -U PATH for a unix socket, or HOST PORT\n"
    );
}
