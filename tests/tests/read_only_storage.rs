//! Saves on read-only storage (an ext4 on a loop device, remounted `ro`):
//! an instant save restores from where it is on QEMU 8.2 and later (which
//! map its RAM image read-only); on older QEMUs the restore is refused in
//! words that suggest `--into DIR`, and with it restores from a copy made
//! there. A checkpoint, whose disks need fresh overlays, is refused with
//! the same suggestion, and restores with it.

use std::path::Path;
use std::process::Command;

use recipe_tests::loopfs::{saved_with, LoopFs};
use recipe_tests::{assert_carries_on, at_least, migrate, qemus, spawn_lines};

fn refused(args: &[&str], statefile: &Path) -> String {
    let out = migrate().args(args).arg(statefile).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    err
}

/// `restore ARGS STATEFILE` in the foreground: the guest carries on from
/// `last`; then quit. Returns what the restore said on stderr.
fn restores(qemu: &Path, args: &[&str], statefile: &Path, hmp: &Path, last: u64) -> String {
    let (child, console) = spawn_lines(migrate().arg("restore").args(args).arg(statefile));
    assert_carries_on(qemu, &console, last);
    recipe_tests::monitor_quit(hmp);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_instant_save_on_read_only_storage_restores_or_is_refused_with_into_suggested() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let fs = LoopFs::new(dir.path(), &[]);
        let statefile = fs.mnt.join("state");
        let (source, last) = saved_with(&qemu, dir.path(), &[], &["--instant"], &statefile);
        fs.read_only();
        if at_least(&qemu, 8, 2) {
            // Mapped read-only where it is.
            restores(&qemu, &[], &statefile, &source.hmp, last);
            continue;
        }
        let err = refused(&["restore"], &statefile);
        assert!(
            err.contains("cannot be opened for writing") && err.contains("restore --into DIR"),
            "{err}"
        );
        let into = tempfile::tempdir().unwrap();
        let said = restores(
            &qemu,
            &["--into", &into.path().display().to_string()],
            &statefile,
            &source.hmp,
            last,
        );
        let copy = into.path().join("state");
        assert!(said.contains(&copy.display().to_string()), "{said}");
        for name in ["state", "state.ram", "state.manifest.json"] {
            assert!(into.path().join(name).exists(), "{name}: {said}");
        }
        // The copy is a save of its own.
        let text = recipe_tests::loopfs::run(migrate().args(["inspect", "--check"]).arg(&copy));
        assert!(text.contains("every chunk's checksum matches"), "{text}");
    }
}

#[test]
fn a_checkpoint_on_read_only_storage_is_refused_with_into_suggested_and_restores_with_it() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let fs = LoopFs::new(dir.path(), &[]);
        let disk = fs.mnt.join("disk.qcow2");
        recipe_tests::loopfs::run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&disk)
                .arg("16M"),
        );
        let drive = format!("file={},if=virtio,format=qcow2", disk.display());
        let statefile = fs.mnt.join("ckpt");
        let (source, last) = saved_with(
            &qemu,
            dir.path(),
            &["-drive".into(), drive],
            &["--with-disks"],
            &statefile,
        );
        fs.read_only();
        let err = refused(&["restore"], &statefile);
        assert!(
            err.contains("cannot take them") && err.contains("restore --into DIR"),
            "{err}"
        );
        let into = tempfile::tempdir().unwrap();
        restores(
            &qemu,
            &["--into", &into.path().display().to_string()],
            &statefile,
            &source.hmp,
            last,
        );
        assert!(
            std::fs::read_dir(into.path()).unwrap().count() > 0,
            "the fresh overlay is made there"
        );
    }
}
