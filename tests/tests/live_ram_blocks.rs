//! `qemu-migrate live` and `save --live` of guests whose RAM is several
//! blocks, and a source that dies on the way. QEMU 9.0 and later under TCG
//! abort the source of a running guest with several RAM blocks as the
//! migration syncs the dirty bitmap (an 8 MiB node 0 and a 24 MiB node 1
//! abort 10.0.2 in the first pass): such a guest moves paused and is resumed
//! on the destination, or is saved paused, and the tool says why. A source
//! that dies anyway is named: how it ended and what it said, not a closed
//! connection.

use std::path::Path;
use std::process::Command;

use recipe_tests::{at_least, bin, guest_logged_to, log_ticks, qemus, wait_tick_above, Vm};

/// The logged test guest with its 32 MiB as two NUMA nodes of unequal size.
fn two_nodes(log: &Path) -> Vec<String> {
    let mut options = guest_logged_to(log);
    options.extend(
        [
            "-smp",
            "2",
            "-object",
            "memory-backend-ram,id=m0,size=8M",
            "-object",
            "memory-backend-ram,id=m1,size=24M",
            "-numa",
            "node,memdev=m0",
            "-numa",
            "node,memdev=m1",
        ]
        .map(String::from),
    );
    options
}

#[test]
fn a_running_guest_with_two_numa_nodes_moves_and_runs_on() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut vm = Vm::start(&qemu, &two_nodes(&log));
        wait_tick_above(&log, 2);
        let out = Command::new(bin("qemu-migrate"))
            .args(["live", "--quiet", "--to", "local", "--monitor"])
            .arg(&vm.hmp)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {err}", qemu.display());
        assert!(
            vm.wait_exit().success(),
            "the source quit, it did not abort: {}",
            vm.stderr()
        );
        let paused = err.contains("the guest was paused while it moved");
        assert_eq!(
            paused,
            at_least(&qemu, 9, 0),
            "{}: paused only where QEMU would abort: {err}",
            qemu.display()
        );
        if paused {
            assert!(err.contains("tlb_reset_dirty_range_all"), "{err}");
        }
        // The destination's guest carries on in the same log, without a reboot.
        let last = *log_ticks(&log).last().unwrap();
        wait_tick_above(&log, last + 1);
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.matches("BOOT ").count(), 1, "{text}");
        // Ended through its monitor, which the destination took over.
        let q = Command::new(bin("monitor-send"))
            .arg(&vm.hmp)
            .arg("quit")
            .output()
            .unwrap();
        assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    }
}

#[test]
fn a_source_that_dies_midway_is_named_with_its_own_words() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut vm = Vm::start(&qemu, &guest_logged_to(&log));
        wait_tick_above(&log, 1);
        let live = recipe_tests::slow_live_midway(&vm.hmp);
        // QEMU ends itself on SIGTERM, saying so on stderr.
        // SAFETY: a signal to the QEMU this test started.
        unsafe { libc::kill(vm.pid() as libc::pid_t, libc::SIGTERM) };
        let end = live.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&end.stderr);
        assert!(!end.status.success(), "{err}");
        assert!(
            err.contains(&format!(
                "the source QEMU (pid {}) died during the live migration (exit status 0)",
                vm.pid()
            )),
            "{}: {err}",
            qemu.display()
        );
        assert!(err.contains("terminating on signal 15"), "{err}");
        assert!(err.contains("its guest is gone with it"), "{err}");
        assert!(!err.contains("peer closed"), "{err}");
        vm.wait_exit();
    }
}

#[test]
fn a_live_save_of_two_numa_nodes_is_made_paused_where_qemu_would_abort() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut vm = Vm::start(&qemu, &two_nodes(&log));
        wait_tick_above(&log, 2);
        let state = dir.path().join("state");
        let out = Command::new(bin("qemu-migrate"))
            .args(["save", "--live", "--instant", "--then", "quit", "--monitor"])
            .arg(&vm.hmp)
            .arg(&state)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {err}", qemu.display());
        assert!(
            vm.wait_exit().success(),
            "the source quit, it did not abort: {}",
            vm.stderr()
        );
        assert_eq!(
            err.contains("saved with the guest paused, not live"),
            at_least(&qemu, 9, 0),
            "{}: {err}",
            qemu.display()
        );
        assert!(!err.contains("not an instant save"), "{err}");

        // Restored from its two images, the guest carries on in the same log.
        let last = *log_ticks(&log).last().unwrap();
        let pidfile = dir.path().join("restored.pid");
        let out = Command::new(bin("qemu-migrate"))
            .args(["restore", "--daemonize", "--pidfile"])
            .arg(&pidfile)
            .arg(&state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        wait_tick_above(&log, last + 1);
        let text = std::fs::read_to_string(&log).unwrap();
        // SAFETY: a signal to the QEMU this test restored.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(text.matches("BOOT ").count(), 1, "{text}");
    }
}
