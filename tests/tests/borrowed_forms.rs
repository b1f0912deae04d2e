//! The nc and socat forms' contract: stdout carries what QEMU said, cleaned
//! (the banner, each reply, QEMU's error text; no echo, prompt or escape
//! codes), and the exit status is the tool's; `MONITOR_SEND_STRICT=1` gives
//! monitor-send's own statuses and messages. Nothing is lost silently:
//! commands QEMU could not take any more are reported.

use assert_cmd::Command;
use recipe_tests::{bin, qemus, Vm};

fn nc() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nc");
    std::os::unix::fs::symlink(bin("monitor-send"), &path).unwrap();
    (dir, path)
}

#[test]
fn stdout_is_the_banner_and_the_replies_cleaned() {
    let (_links, nc) = nc();
    for qemu in qemus() {
        let vm = Vm::none(&qemu);
        let out = Command::new(&nc)
            .arg("-NU")
            .arg(&vm.hmp)
            .write_stdin("info status\nstop\nfrobnicate\ninfo status\n")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        let version = recipe_tests::qemu_version(&qemu);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!(
                "QEMU {version} monitor - type 'help' for more information\n\
                 VM status: running\n\
                 unknown command: 'frobnicate'\n\
                 VM status: paused\n"
            )
        );
        assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    }
}

#[test]
fn strict_mode_gives_monitor_sends_own_exit_statuses() {
    let (_links, nc) = nc();
    for qemu in qemus() {
        let vm = Vm::none(&qemu);
        let out = Command::new(&nc)
            .env("MONITOR_SEND_STRICT", "1")
            .arg("-NU")
            .arg(&vm.hmp)
            .write_stdin("frobnicate\n")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stdout).contains("unknown command: 'frobnicate'"));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "monitor-send: {}: QEMU refused `frobnicate`: unknown command: 'frobnicate'\n",
                vm.hmp.display()
            )
        );
        let out = Command::new(&nc)
            .env("MONITOR_SEND_STRICT", "1")
            .arg("-NU")
            .arg(&vm.hmp)
            .write_stdin(format!("echo {}\nstop\n", "x".repeat(5000)))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(4), "a refused line");
    }
}

#[test]
fn commands_qemu_could_not_take_any_more_are_reported() {
    let (_links, nc) = nc();
    for qemu in qemus() {
        let mut vm = Vm::none(&qemu);
        let out = Command::new(&nc)
            .arg("-NU")
            .arg(&vm.hmp)
            .write_stdin("quit\nstop\n")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "monitor-send: {}: QEMU closed the connection; 1 command not sent\n",
                vm.hmp.display()
            )
        );
        assert!(vm.wait_exit().success());
    }
}
