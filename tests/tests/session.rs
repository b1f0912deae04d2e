//! Sessions, as socat and nc give them: on a terminal (a pseudo-terminal
//! here) the prompt is shown and each typed line runs; QMP events are printed
//! as they arrive, not when the next command is typed; the session ends as
//! soon as QEMU closes, with its last words, while the terminal or the pipe
//! is still open; a raw terminal relays keys to QEMU's own line editor and
//! socat's escape key ends it, restoring the terminal.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use recipe_tests::{bin, qemus, Vm};

const WAIT: Duration = Duration::from_secs(20);

/// Output of a child, collected by a thread, searched as it arrives.
struct Output {
    chunks: Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl Output {
    fn collect(mut reader: impl Read + Send + 'static) -> Output {
        let (tx, chunks) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Output {
            chunks,
            seen: Vec::new(),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Waits until `pattern` has appeared after byte `from`; returns where it ends.
    fn wait_for(&mut self, pattern: &str, from: usize) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.text();
            if let Some(at) = text.get(from..).and_then(|t| t.find(pattern)) {
                return from + at + pattern.len();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(_) => panic!("no {pattern:?} within {WAIT:?}; got {text:?}"),
            }
        }
    }

    /// Everything up to the end of the stream.
    fn rest(&mut self) -> String {
        while let Ok(chunk) = self.chunks.recv_timeout(WAIT) {
            self.seen.extend_from_slice(&chunk);
        }
        self.text()
    }
}

/// A child on a pseudo-terminal: its stdin, stdout and stderr are the
/// terminal, as when a person runs it.
struct OnTerminal {
    child: Child,
    master: std::fs::File,
    /// Kept to read the terminal's modes after the child exits.
    slave: OwnedFd,
    out: Output,
}

fn on_terminal(program: &Path, args: &[String]) -> OnTerminal {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors; the other arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    for fd in [master, slave] {
        // Children other tests start meanwhile must not inherit the terminal:
        // its output would not end while they hold it.
        // SAFETY: fd was just opened by openpty.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: both descriptors were just opened and are owned here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()));
    // SAFETY: setsid and ioctl are async-signal-safe; the child gets the
    // terminal as its controlling terminal, as a login shell's child would.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let master = std::fs::File::from(master);
    let out = Output::collect(master.try_clone().unwrap());
    OnTerminal {
        child,
        master,
        slave,
        out,
    }
}

impl OnTerminal {
    fn type_keys(&mut self, keys: &[u8]) {
        self.master.write_all(keys).unwrap();
    }
}

/// The terminal's local modes (ECHO, ICANON, ...).
fn lflag(terminal: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: termios is plain data filled in by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is an open terminal.
    assert_eq!(unsafe { libc::tcgetattr(terminal.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

/// Waits for a child to exit, failing the test after the deadline.
fn exit_of(mut child: Child) -> ExitStatus {
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(WAIT) {
        Ok(status) => status.unwrap(),
        Err(_) => {
            // SAFETY: kills the child this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("it did not exit within {WAIT:?}");
        }
    }
}

fn link(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::os::unix::fs::symlink(bin("monitor-send"), &path).unwrap();
    path
}

#[test]
fn a_terminal_session_shows_the_prompt_and_runs_each_typed_line() {
    let links = tempfile::tempdir().unwrap();
    let nc = link(links.path(), "nc");
    for qemu in qemus() {
        let mut vm = Vm::none(&qemu);
        let mut t = on_terminal(&nc, &["-U".into(), vm.hmp.display().to_string()]);
        let at = t.out.wait_for("(qemu) ", 0);
        assert!(t.out.text().starts_with("QEMU "), "{}", t.out.text());
        t.type_keys(b"stop\n");
        let at = t.out.wait_for("(qemu) ", at);
        assert_eq!(vm.status(), "paused");
        t.type_keys(b"info status\n");
        let at = t.out.wait_for("VM status: paused", at);
        let at = t.out.wait_for("(qemu) ", at);
        // Enter on an empty line prompts again, as QEMU's monitor does.
        t.type_keys(b"\n");
        t.out.wait_for("(qemu) ", at);
        // Ctrl-D: the end of input.
        t.type_keys(&[4]);
        assert!(exit_of(t.child).success());
    }
}

#[test]
fn qmp_events_appear_as_they_arrive_without_a_command_typed() {
    let links = tempfile::tempdir().unwrap();
    let socat = link(links.path(), "socat");
    for qemu in qemus() {
        let mut vm = Vm::none(&qemu);
        // The test kit holds its own session; this socket is the session under test.
        let qmp2 = vm.qmp_path.clone();
        let mut t = on_terminal(
            &socat,
            &["-".into(), format!("UNIX-CONNECT:{}", qmp2.display())],
        );
        let at = t.out.wait_for("{\"QMP\"", 0);
        t.type_keys(b"{\"execute\":\"qmp_capabilities\"}\n");
        let at = t.out.wait_for("{\"return\": {}}", at);
        // Another client stops the VM; the idle session shows the event.
        vm.qmp().execute("stop", None).unwrap();
        t.out.wait_for("\"event\": \"STOP\"", at);
        t.type_keys(&[4]);
        assert!(exit_of(t.child).success());
    }
}

#[test]
fn a_terminal_session_ends_when_qemu_exits_with_its_last_words() {
    let links = tempfile::tempdir().unwrap();
    let socat = link(links.path(), "socat");
    for qemu in qemus() {
        let mut vm = Vm::none(&qemu);
        // The test kit holds its own session; this socket is the session under test.
        let qmp2 = vm.qmp_path.clone();
        let mut t = on_terminal(
            &socat,
            &["-".into(), format!("UNIX-CONNECT:{}", qmp2.display())],
        );
        let at = t.out.wait_for("{\"QMP\"", 0);
        t.type_keys(b"{\"execute\":\"qmp_capabilities\"}\n");
        t.out.wait_for("{\"return\": {}}", at);
        // QEMU goes while the terminal stays open: the session ends, and
        // shows the SHUTDOWN QEMU sent as it went.
        let _ = vm.qmp().execute("quit", None);
        let status = exit_of(t.child);
        assert!(status.success(), "{status}");
        // With the last holder of the terminal gone, its output ends.
        drop(t.slave);
        assert!(t.out.rest().contains("\"event\": \"SHUTDOWN\""));
        vm.wait_exit();
    }
}

/// The terminal forms of recipes: a VM control tool's `monitor` command
/// (`-,raw,echo=0`), a launcher's hint (`-,rawer`), OpenRC's qemush
/// (`-,echo=0,icanon=0`), each with socat's escape key.
#[test]
fn a_raw_terminal_relays_keys_to_qemus_editor_and_the_escape_key_ends_it() {
    let links = tempfile::tempdir().unwrap();
    let socat = link(links.path(), "socat");
    for qemu in qemus() {
        for stdio in [
            "-,raw,echo=0,escape=0x0f",
            "-,rawer,escape=0x0f",
            "-,echo=0,icanon=0,escape=0x0f",
        ] {
            let mut vm = Vm::none(&qemu);
            let mut t = on_terminal(
                &socat,
                &[stdio.into(), format!("UNIX-CONNECT:{}", vm.hmp.display())],
            );
            let at = t.out.wait_for("(qemu) ", 0);
            assert_eq!(
                lflag(&t.slave) & (libc::ECHO | libc::ICANON),
                0,
                "{stdio}: keys go as typed, without the terminal's echo"
            );
            // QEMU's editor: type `stpo`, Backspace twice, `op`, Enter (a raw
            // terminal sends \r). QEMU echoes and redraws; the command is `stop`.
            t.type_keys(b"stpo\x7f\x7fop\r");
            t.out.wait_for("(qemu) ", at);
            assert_eq!(vm.status(), "paused", "{stdio}");
            t.type_keys(&[0x0f]);
            assert!(exit_of(t.child).success(), "{stdio}");
            assert_ne!(
                lflag(&t.slave) & libc::ICANON,
                0,
                "{stdio}: the terminal's modes are restored"
            );
        }
    }
}

#[test]
fn a_pipe_held_open_gets_events_as_they_come_and_ends_when_qemu_does() {
    for qemu in qemus() {
        let mut vm = Vm::none(&qemu);
        // The test kit holds its own session; this socket is the session under test.
        let qmp2 = vm.qmp_path.clone();
        let mut child = Command::new(bin("monitor-send"))
            .args(["-", &format!("UNIX-CONNECT:{}", qmp2.display())])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut out = Output::collect(child.stdout.take().unwrap());
        stdin
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"stop\"}\n")
            .unwrap();
        let at = out.wait_for("\"event\": \"STOP\"", 0);
        let at = out.wait_for("{\"return\": {}}", at);
        vm.qmp().execute("cont", None).unwrap();
        let at = out.wait_for("\"event\": \"RESUME\"", at);
        let _ = vm.qmp().execute("quit", None);
        // stdin is still open: the session ends because QEMU did.
        let status = exit_of(child);
        assert!(status.success(), "{status}");
        assert!(out.rest()[at..].contains("SHUTDOWN"), "{}", out.text());
        drop(stdin);
        vm.wait_exit();
    }
}

/// nc's `-w` and socat's `-T` are idle timeouts: a pipe held open but
/// silent ends the session, after every command was confirmed.
#[test]
fn an_idle_timeout_ends_a_session_whose_input_stays_open() {
    for qemu in qemus() {
        let mut vm = Vm::none(&qemu);
        for args in [
            vec![
                "-w".to_string(),
                "1".into(),
                "-U".into(),
                vm.hmp.display().to_string(),
            ],
            vec![
                "-T".to_string(),
                "1".into(),
                "-".into(),
                format!("UNIX-CONNECT:{}", vm.hmp.display()),
            ],
        ] {
            vm.qmp().execute("cont", None).unwrap();
            let mut child = Command::new(bin("monitor-send"))
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let mut out = Output::collect(child.stdout.take().unwrap());
            stdin.write_all(b"stop\ninfo status\n").unwrap();
            out.wait_for("VM status: paused", 0);
            let status = exit_of(child);
            assert!(status.success(), "{args:?}: {status}");
            drop(stdin);
        }
    }
}

/// Ctrl-C where the terminal modes keep signals on (`echo=0,icanon=0`, as
/// OpenRC's qemush uses) ends the session, and the terminal is usable after.
#[test]
fn ctrl_c_in_a_terminal_session_restores_the_terminal() {
    let links = tempfile::tempdir().unwrap();
    let socat = link(links.path(), "socat");
    let qemu = &qemus()[0];
    let vm = Vm::none(qemu);
    let mut t = on_terminal(
        &socat,
        &[
            "-,echo=0,icanon=0".into(),
            format!("UNIX-CONNECT:{}", vm.hmp.display()),
        ],
    );
    t.out.wait_for("(qemu) ", 0);
    assert_eq!(lflag(&t.slave) & libc::ICANON, 0);
    t.type_keys(&[3]);
    let status = exit_of(t.child);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status}");
    let modes = lflag(&t.slave);
    assert_ne!(modes & libc::ICANON, 0, "canonical mode is back");
    assert_ne!(modes & libc::ECHO, 0, "echo is back");
}
