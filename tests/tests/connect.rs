//! Reaching a monitor: waiting for a socket that is not there yet, and
//! Linux abstract sockets.

use std::process::{Command, Stdio};

use recipe_tests::{bin, qemus, Vm};

#[test]
fn wait_socket_connects_once_qemu_is_up() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("late-sock");
        // Started first: the socket does not exist yet.
        let send = Command::new(bin("monitor-send"))
            .args(["--wait-socket", "30s"])
            .arg(&sock)
            .arg("info status")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let monitor = format!("unix:{},server,nowait", sock.display());
        let _vm = Vm::start(&qemu, &["-M", "none", "-monitor", &monitor]);
        let out = send.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "VM status: running\n");

        // socat's retry options mean the same.
        let out = Command::new(bin("monitor-send"))
            .args([
                "-",
                &format!("unix-connect:{},retry=3,interval=0.1", sock.display()),
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        // Nothing to send: a readiness probe, answered with the greeting.
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("QEMU "));
    }
}

#[test]
fn abstract_sockets_are_named_with_an_at_sign() {
    for qemu in qemus() {
        let name = format!("qemu-monitor-test-{}", std::process::id());
        let chardev = format!("socket,id=mon0,path={name},abstract=on,server=on,wait=off");
        let _vm = Vm::start(
            &qemu,
            &[
                "-M",
                "none",
                "-chardev",
                &chardev,
                "-mon",
                "chardev=mon0,mode=readline",
            ],
        );
        let at = format!("@{name}");
        let out = Command::new(bin("monitor-send"))
            .arg(&at)
            .arg("info status")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "VM status: running\n");
        let out = Command::new(bin("monitor-send"))
            .args(["-", &format!("ABSTRACT-CONNECT:{name}")])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("QEMU "));
    }
}

/// A QEMU this program starts connects to a socket of ours: the session is
/// there before QEMU runs its VM, and a QEMU that dies first says so.
#[test]
fn a_started_qemu_connects_to_a_listening_monitor_or_is_reported_gone() {
    use std::time::Duration;
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("own, with a comma.sock");
        let listener = qemu_monitor::QmpListener::bind(&sock).unwrap();
        let mut child = Command::new(&qemu)
            .args([
                "-M",
                "none",
                "-display",
                "none",
                "-qmp",
                &listener.qemu_arg(),
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut qmp = listener
            .accept(child.id(), Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{}: {e}", qemu.display()));
        assert!(qmp.is_negotiated());
        assert!(!sock.exists(), "the socket file is removed once QEMU is in");
        let status = qmp.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "running");
        assert_eq!(qmp.peer_pid().unwrap(), child.id());
        let _ = qmp.execute("quit", None);
        assert!(child.wait().unwrap().success());

        let sock = dir.path().join("never.sock");
        let listener = qemu_monitor::QmpListener::bind(&sock).unwrap();
        let mut child = Command::new(&qemu)
            .args(["-M", "none", "-display", "none", "-no-such-option"])
            .args(["-qmp", &listener.qemu_arg()])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let err = listener
            .accept(child.id(), Duration::from_secs(60))
            .expect_err("QEMU exits on a bad option");
        assert!(
            matches!(err, qemu_monitor::Error::Exited { pid, .. } if pid == child.id()),
            "{err}"
        );
        assert!(err.to_string().contains("never.sock"), "{err}");
        assert!(!child.wait().unwrap().success());
    }
}
