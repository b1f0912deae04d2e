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

/// `-w 0` and `-u` return once QEMU has dispatched the last command: a
/// `migrate` without `-d`, which holds the monitor until the migration ends,
/// is still running when they return.
#[test]
fn send_and_go_returns_while_a_migration_still_runs() {
    let links = tempfile::tempdir().unwrap();
    for name in ["nc", "socat"] {
        std::os::unix::fs::symlink(bin("monitor-send"), links.path().join(name)).unwrap();
    }
    for qemu in qemus() {
        for (tool, args) in [("nc", vec!["-w", "0", "-U"]), ("socat", vec!["-u", "-"])] {
            let options = ["-M", "pc", "-accel", "tcg", "-m", "32", "-nodefaults"];
            let mut vm = Vm::start(&qemu, &options);
            vm.enable_migration_events();
            let sock = vm.hmp.display().to_string();
            let target = if tool == "nc" {
                sock
            } else {
                format!("unix-connect:{sock}")
            };
            // The stream goes into a FIFO nobody reads yet: the migration
            // lasts until the test starts reading it.
            let fifo = vm.dir.path().join("stream");
            let c_path = std::ffi::CString::new(fifo.display().to_string()).unwrap();
            // SAFETY: a valid C string and mode.
            assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
            let line = format!("migrate \"exec:cat > {}\"\n", fifo.display());
            let out = Command::new(links.path().join(tool))
                .args(&args)
                .arg(&target)
                .write_stdin(line)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{tool}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let status = vm.qmp().execute("query-migrate", None).unwrap();
            assert!(
                matches!(status["status"].as_str(), Some("setup" | "active")),
                "{tool}: {status}"
            );
            let reader = std::thread::spawn(move || {
                let mut f = std::fs::File::open(&fifo).unwrap();
                std::io::copy(&mut f, &mut std::io::sink()).unwrap()
            });
            let end = vm.qmp().execute("query-migrate", None).unwrap();
            if end["status"] != "completed" {
                assert_eq!(
                    vm.wait_migration_end(std::time::Duration::from_secs(60)),
                    "completed"
                );
            }
            assert!(reader.join().unwrap() > 0, "the stream was read");
        }
    }
}
