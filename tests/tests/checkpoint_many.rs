//! One VM checkpointed again and again: overlay names do not grow (the
//! 15th checkpoint once failed with "File name too long"), a checkpoint
//! that fails after the disks were switched says that the VM now writes
//! to its new overlay, and the last checkpoint restores.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use recipe_tests::{migrate, qemus, recipe_options, spawn_lines, tick, Vm};

const WAIT: Duration = Duration::from_secs(60);

fn checkpoint(vm: &Vm, target: &Path, fault: Option<&str>) -> Output {
    let mut cmd = migrate();
    cmd.args(["checkpoint", "--force", "--then", "resume", "--monitor"])
        .arg(&vm.hmp)
        .arg(target);
    if let Some(f) = fault {
        cmd.env("QEMU_MIGRATE_FAULT", f);
    }
    cmd.output().unwrap()
}

#[test]
fn a_vm_checkpointed_twenty_times_keeps_short_overlay_names_and_a_failed_one_says_where_it_writes()
{
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.raw");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let mut options = recipe_options(dir.path());
        options.extend([
            "-drive".to_string(),
            format!("file={},format=raw,if=ide", disk.display()),
        ]);
        let (mut vm, _serial) = Vm::start_ticking(&qemu, &options);
        let target = dir.path().join("state");

        // A checkpoint failing at its commit, after the disk was switched.
        let out = checkpoint(&vm, &target, Some("1:error"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(
            err.contains("stay switched to the new overlays")
                && err.contains("disk.raw.after-state.1.qcow2"),
            "{err}"
        );
        assert_eq!(vm.status(), "running", "{err}");

        for n in 2..=21 {
            let out = checkpoint(&vm, &target, None);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "checkpoint {n}: {err}");
        }
        // Every overlay is named after the disk, never after an overlay.
        let overlays: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".after-"))
            .collect();
        assert_eq!(overlays.len(), 21, "{overlays:?}");
        for name in &overlays {
            assert!(
                name.starts_with("disk.raw.after-state.") && name.matches(".after-").count() == 1,
                "{name}"
            );
        }

        // The last checkpoint restores, its guest carrying on.
        let _ = vm.qmp().execute("quit", None);
        vm.wait_exit();
        let (mut child, lines) = spawn_lines(
            migrate()
                .arg("restore")
                .arg(&target)
                .stderr(Stdio::inherit()),
        );
        lines.wait_for(0, WAIT, "a tick of the restored guest", |l| {
            tick(l).is_some()
        });
        assert!(
            !lines.snapshot().iter().any(|l| l.starts_with("BOOT ")),
            "{:?}",
            lines.snapshot()
        );
        recipe_tests::monitor_quit(&vm.hmp);
        assert!(child.wait().unwrap().success());
    }
}
