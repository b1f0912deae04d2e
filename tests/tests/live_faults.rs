//! `qemu-migrate live` killed (kill -9) in the middle of a local
//! migration: its watchdog kills the half-loaded destination, gives the
//! source back the user's socket paths, cancels the migration, puts QEMU's
//! settings back and resumes the guest, within seconds.

use std::path::Path;
use std::time::{Duration, Instant};

use qemu_monitor::Options;
use recipe_tests::{guest_logged_to, log_ticks, qemus, wait_tick_above, Vm};

/// Who answers on a monitor path, and in what state.
fn who(path: &Path) -> (u32, String) {
    let options = Options {
        timeout: Duration::from_secs(10),
        wait_socket: None,
        mux_escape: false,
    };
    let mut m =
        qemu_monitor::connect(path, &options).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let pid = m.peer_pid().unwrap();
    let state = m.status().unwrap();
    (pid, state.name().to_string())
}

#[test]
fn a_local_live_migration_killed_midway_leaves_the_source_as_it_was() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let options = guest_logged_to(&log);
        let mut vm = Vm::start(&qemu, &options);
        wait_tick_above(&log, 1);
        let cap =
            vm.qmp().execute("query-migrate-parameters", None).unwrap()["max-bandwidth"].clone();

        let mut live = recipe_tests::slow_live_midway(&vm.hmp);
        let killed_at = Instant::now();
        live.kill().unwrap();
        // Its stderr ends when the watchdog, which shares it, is done.
        let end = live.wait_with_output().unwrap();
        let took = killed_at.elapsed();
        let err = String::from_utf8_lossy(&end.stderr);
        assert!(
            err.contains("died before the destination confirmed"),
            "{err}"
        );
        assert!(took < Duration::from_secs(10), "{took:?}");

        // (The test's own QMP session holds the source's QMP socket.)
        assert_eq!(who(&vm.hmp), (vm.pid(), "running".to_string()));
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("qemu-migrate"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(vm.status(), "running");
        assert_eq!(
            vm.qmp().execute("query-migrate-parameters", None).unwrap()["max-bandwidth"],
            cap
        );
        let last = *log_ticks(&log).last().unwrap();
        wait_tick_above(&log, last);
    }
}

#[test]
fn during_a_local_live_migration_the_vms_sockets_answer_from_the_source_and_a_second_save_is_refused_at_once(
) {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut vm = Vm::start(&qemu, &guest_logged_to(&log));
        wait_tick_above(&log, 1);
        let qmp = vm.hmp.with_file_name("qmp.sock");

        let mut live = recipe_tests::slow_live_midway(&vm.hmp);
        // The destination waits for the guest's state; the user's socket
        // paths still lead to the VM that runs.
        assert_eq!(who(&qmp), (vm.pid(), "running".to_string()));
        // A second save is refused in words while the first holds the
        // monitor, not left waiting for it.
        let out = recipe_tests::migrate()
            .args(["save", "--monitor"])
            .arg(&vm.hmp)
            .arg(dir.path().join("second"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("another qemu-migrate is already saving or migrating this VM"),
            "{err}"
        );
        assert!(
            live.try_wait().unwrap().is_none(),
            "the live migration runs on"
        );
        live.kill().unwrap();
        let _ = live.wait_with_output();
        assert_eq!(who(&qmp), (vm.pid(), "running".to_string()));
        assert_eq!(vm.status(), "running");
    }
}
