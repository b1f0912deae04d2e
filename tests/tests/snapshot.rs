//! `qemu-migrate snapshot`: a point-in-time save of a running VM. The
//! guest ticks on while its RAM is written, and the restored guest carries
//! on from the instant the snapshot began, not from when it ended. Where
//! QEMU refuses a background snapshot, a paused save is made, said so.

use std::path::Path;
use std::process::Output;

use recipe_tests::{guest_logged_to, log_ticks, migrate, qemus, wait_tick_above, Vm};

fn snapshot(hmp: &Path, target: &Path) -> Output {
    // (The first test spawns its own, to watch QEMU's events meanwhile.)
    migrate()
        .args(["snapshot", "--monitor"])
        .arg(hmp)
        .arg(target)
        .output()
        .unwrap()
}

fn last_tick(log: &Path) -> u64 {
    log_ticks(log).last().copied().unwrap_or(0)
}

#[test]
fn a_snapshot_holds_the_instant_it_began_while_the_guest_ticked_on() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        // 1.5 GiB of written RAM: the snapshot takes many ticks to write.
        let mut options = guest_logged_to(&log);
        let m = options.iter().position(|o| o == "-m").unwrap();
        options[m + 1] = "2048".into();
        options.extend(["-append".into(), "fill=1500".into()]);
        let mut vm = Vm::start(&qemu, &options);
        wait_tick_above(&log, 1);

        let target = dir.path().join("snap");
        let _ = vm.qmp().take_events();
        let child = migrate()
            .args(["snapshot", "--monitor"])
            .arg(&vm.hmp)
            .arg(&target)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // QEMU pauses the guest to take its device state, and resumes it
        // (STOP, RESUME): that is the instant the snapshot holds.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let began = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let e = vm
                .qmp()
                .next_event(left)
                .expect("QEMU's RESUME after the device state");
            if e.name == "RESUME" {
                break last_tick(&log);
            }
        };
        let out = child.wait_with_output().unwrap();
        let ended = last_tick(&log);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("ran on while RAM was written"), "{err}");
        // The guest ran on while its RAM was written.
        assert!(
            ended >= began + 3,
            "ticks {began}..{ended} during the snapshot: {err}"
        );
        assert_eq!(vm.status(), "running");
        let _ = vm.qmp().execute("quit", None);
        vm.wait_exit();

        // Restored: it carries on from when the snapshot began.
        let before = log_ticks(&log).len();
        let (restore, pid) = recipe_tests::restore_daemonized(&target, &[]);
        let _end = recipe_tests::EndOnDrop(pid);
        assert!(
            restore.status.success(),
            "{}",
            String::from_utf8_lossy(&restore.stderr)
        );
        wait_tick_above(&log, 0);
        let after: Vec<u64> = {
            recipe_tests::wait_log(&log, "a tick of the restored guest", |t| t.len() > before);
            log_ticks(&log)[before..].to_vec()
        };
        let first = after[0];
        assert!(
            first > began.saturating_sub(1) && first <= began + 2,
            "restored at tick {first}: the snapshot began after tick {began} and ended after {ended}"
        );
        recipe_tests::monitor_quit(&vm.hmp);
    }
}

#[test]
fn where_qemu_refuses_a_background_snapshot_a_paused_save_is_made_and_said() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut vm = Vm::start(&qemu, &guest_logged_to(&log));
        wait_tick_above(&log, 1);
        // Auto-converge, which a background snapshot does not go with.
        vm.qmp()
            .execute(
                "migrate-set-capabilities",
                Some(serde_json::json!({"capabilities": [
                    {"capability": "auto-converge", "state": true}]})),
            )
            .unwrap();
        let target = dir.path().join("snap");
        let out = snapshot(&vm.hmp, &target);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(
            err.contains("not a snapshot") && err.contains("saved with the guest paused"),
            "{err}"
        );
        assert_eq!(vm.status(), "running", "resumed, as a snapshot leaves it");
        let seen = migrate()
            .args(["inspect", "--json"])
            .arg(&target)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&seen.stdout).unwrap();
        assert_eq!(v["restorable"], true, "{v}");
        let _ = vm.qmp().execute("quit", None);
        vm.wait_exit();
    }
}

#[test]
fn a_snapshot_is_also_an_instant_save_and_a_checkpoint_and_each_restores() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.raw");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let log = dir.path().join("serial.log");
        let mut options = guest_logged_to(&log);
        options.extend([
            "-drive".to_string(),
            format!("file={},format=raw,if=ide", disk.display()),
        ]);
        let mut vm = Vm::start(&qemu, &options);
        wait_tick_above(&log, 1);
        for (name, extra) in [("instant", "--instant"), ("checkpoint", "--with-disks")] {
            let target = dir.path().join(name);
            let out = migrate()
                .args(["snapshot", extra, "--monitor"])
                .arg(&vm.hmp)
                .arg(&target)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{name}: {err}");
            assert!(
                err.contains("ran on while RAM was written"),
                "{name}: {err}"
            );
            assert_eq!(vm.status(), "running", "{name}");
            let t = last_tick(&log);
            wait_tick_above(&log, t);
        }
        let _ = vm.qmp().execute("quit", None);
        vm.wait_exit();
        for name in ["instant", "checkpoint"] {
            let before = log_ticks(&log).len();
            let (out, pid) = recipe_tests::restore_daemonized(&dir.path().join(name), &[]);
            let _end = recipe_tests::EndOnDrop(pid);
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            recipe_tests::wait_log(&log, "a tick of the restored guest", |t| {
                t.len() > before + 1
            });
            recipe_tests::monitor_quit(&vm.hmp);
            // Its QEMU gone, the next restore may take the sockets.
            if let Some(pid) = pid {
                testkit::wait_gone(pid as u32, std::time::Duration::from_secs(30));
            }
        }
    }
}
