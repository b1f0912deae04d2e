//! Checkpoints that include the disks, against a real QEMU running a Linux
//! guest that writes its tick counter to an ext4 disk and syncs it every
//! tick: `qemu-migrate checkpoint` (`save --with-disks`), then restores of
//! that one checkpoint again and again, and a `revert` of a running VM.
//! Each time the counter on disk carries on from the checkpoint's, the
//! file system checks clean, and the frozen image stays byte for byte as
//! it was. Without `--with-disks`, a second restore onto the disk the first
//! one wrote to is refused in words.
//!
//! Both command-line forms and both monitors: `-drive` through the human
//! monitor (`snapshot_blkdev`), `-blockdev` through QMP (one `transaction`).

#[allow(dead_code, unused_imports, clippy::all, clippy::pedantic)]
#[path = "../../xtask/src/linux_guest.rs"]
mod linux_guest;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::Duration;

use recipe_tests::{migrate, qemus, save_then_quit, spawn_lines, tick, Lines, Vm};

const WAIT: Duration = Duration::from_secs(120);
/// The disk's size: enough for ext4 and hours of ticks, small to copy.
const DISK_MIB: u64 = 32;

fn guest() -> &'static linux_guest::LinuxGuest {
    static GUEST: OnceLock<linux_guest::LinuxGuest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/linux-guest");
        linux_guest::prepare_with_disk(&cache).unwrap_or_else(|e| panic!("{e:#}"))
    })
}

#[derive(Debug, Clone, Copy)]
enum Form {
    /// `-drive file=...,if=virtio`, checkpointed through the human monitor.
    DriveHmp,
    /// `-blockdev` file + raw nodes and a `-device`, through QMP.
    BlockdevQmp,
}

/// The Linux guest with `disk` as its first virtio disk, in `form`.
fn options(disk: &Path, form: Form, qmp2: &Path) -> Vec<String> {
    let g = guest();
    let mut o: Vec<String> = [
        "-accel",
        "tcg",
        "-m",
        "256",
        "-nodefaults",
        "-serial",
        "stdio",
        "-kernel",
    ]
    .map(String::from)
    .to_vec();
    o.push(g.kernel.display().to_string());
    o.push("-initrd".into());
    o.push(g.initrd.display().to_string());
    o.push("-append".into());
    o.push(g.append.clone());
    match form {
        Form::DriveHmp => {
            o.push("-drive".into());
            o.push(format!("file={},format=raw,if=virtio", disk.display()));
        }
        Form::BlockdevQmp => {
            o.push("-blockdev".into());
            o.push(format!(
                "driver=file,node-name=f0,filename={}",
                disk.display()
            ));
            o.extend(
                [
                    "-blockdev",
                    "driver=raw,node-name=d0,file=f0",
                    "-device",
                    "virtio-blk-pci,drive=d0",
                ]
                .map(String::from),
            );
            o.push("-qmp".into());
            o.push(format!("unix:{},server,nowait", qmp2.display()));
        }
    }
    o
}

/// The monitor qemu-migrate is pointed at in `form`.
fn monitor_of(vm: &Vm, form: Form, qmp2: &Path) -> PathBuf {
    match form {
        Form::DriveHmp => vm.hmp.clone(),
        Form::BlockdevQmp => qmp2.to_path_buf(),
    }
}

fn ok(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

/// Ends the QEMU behind a monitor socket.
fn quit(sock: &Path) {
    let options = qemu_monitor::Options {
        timeout: Duration::from_secs(30),
        wait_socket: None,
        mux_escape: false,
    };
    let mut m = qemu_monitor::connect(sock.to_path_buf(), &options).expect("monitor");
    m.quit().expect("quit");
}

/// The ticks the guest wrote to the disk whose top image is `image`, read
/// once its QEMU is gone: the chain converted to raw, the journal replayed
/// as the kernel would at mount, then `fsck.ext4 -n` must find nothing,
/// and `/ticks` is read with debugfs.
fn disk_ticks(image: &Path, format: &str, work: &Path) -> Vec<u64> {
    let raw = work.join("read.raw");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(Command::new("qemu-img")
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(image)
        .arg(&raw));
    run(Command::new("e2fsck")
        .args(["-E", "journal_only", "-y"])
        .arg(&raw));
    run(Command::new("fsck.ext4").args(["-n", "-f"]).arg(&raw));
    let text = run(Command::new("debugfs").args(["-R", "cat /ticks"]).arg(&raw));
    std::fs::remove_file(&raw).unwrap();
    text.lines()
        .map(|l| {
            l.trim()
                .parse()
                .unwrap_or_else(|_| panic!("not a tick on disk: {l:?} in {text:?}"))
        })
        .collect()
}

/// The disk's counter carries on from the checkpoint's: 1, 2, 3, ... with
/// neither gap nor repeat, the checkpoint's ticks as its first ones, and more.
fn assert_continues(after: &[u64], at_checkpoint: &[u64], what: &str) {
    let expected: Vec<u64> = (1..=after.len() as u64).collect();
    assert_eq!(after, expected, "{what}: the ticks on disk are not 1..N");
    assert!(
        after.len() > at_checkpoint.len() && after.starts_with(at_checkpoint),
        "{what}: {} ticks on disk, {} at the checkpoint",
        after.len(),
        at_checkpoint.len()
    );
}

/// The only `*.qcow2` in `dir`.
fn only_overlay(dir: &Path) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    assert_eq!(found.len(), 1, "overlays in {}: {found:?}", dir.display());
    found[0].clone()
}

/// A restored guest's console: it did not boot again, its first tick
/// follows the checkpoint's, and it keeps ticking (and writing) for a while.
fn watch_restored(lines: &Lines, at_checkpoint: u64, what: &str) {
    let first = lines.wait_for(0, WAIT, "a tick after the restore", |l| tick(l).is_some());
    let first_tick = tick(&lines.snapshot()[first]).unwrap();
    lines.wait_for(first, WAIT, "ten more ticks", |l| {
        tick(l).is_some_and(|n| n >= first_tick + 10)
    });
    let seen = lines.snapshot();
    assert!(
        !seen.iter().any(|l| l.starts_with(linux_guest::BANNER)),
        "{what}: the guest booted again: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|l| l.starts_with("RAM MISMATCH") || l.starts_with("DISK")),
        "{what}: {seen:?}"
    );
    assert!(
        first_tick >= at_checkpoint && first_tick <= at_checkpoint + 2,
        "{what}: first tick {first_tick}, {at_checkpoint} on disk at the checkpoint"
    );
}

/// Waits for a foreground restore (or revert) to end after its QEMU quit.
fn wait_ended(mut child: Child, what: &str) {
    let status = child.wait().unwrap();
    assert!(status.success(), "{what} ended with {status}");
}

fn checkpoint_restored_again_and_again(qemu: &Path, form: Form) {
    let what = format!("{} {form:?}", qemu.display());
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    linux_guest::make_disk(&disk, DISK_MIB).unwrap();
    let qmp2 = dir.path().join("qmp2.sock");
    let (mut source, serial) = Vm::start_with_serial(qemu, &options(&disk, form, &qmp2));
    serial.wait_for(0, WAIT, "the disk mounted", |l| l.starts_with("DISK"));
    let mounted = serial
        .snapshot()
        .into_iter()
        .find(|l| l.starts_with("DISK"))
        .unwrap();
    assert_eq!(mounted, "DISK /dev/vda mounted", "{what}");
    serial.wait_for(0, WAIT, "tick 5", |l| tick(l) == Some(5));

    let state = dir.path().join("state");
    let out = migrate()
        .args(["checkpoint", "--then", "resume", "--monitor"])
        .arg(monitor_of(&source, form, &qmp2))
        .arg(&state)
        .output()
        .unwrap();
    let said = ok(&out);
    let source_overlay = dir.path().join("disk.img.after-state.1.qcow2");
    assert!(
        said.contains(&format!("the VM writes to {}", source_overlay.display())),
        "{what}: {said}"
    );
    let frozen = std::fs::read(&disk).unwrap();
    let work = tempfile::tempdir().unwrap();
    let at_checkpoint = disk_ticks(&disk, "raw", work.path());
    let last = *at_checkpoint
        .last()
        .expect("ticks on disk at the checkpoint");

    // The source lives on and writes to its overlay, never to the frozen image.
    let from = serial.snapshot().len();
    serial.wait_for(from, WAIT, "ten more ticks on the source", |l| {
        tick(l).is_some_and(|n| n >= last + 10)
    });
    source.qmp().execute("quit", None).ok();
    source.wait_exit();
    assert_continues(
        &disk_ticks(&source_overlay, "qcow2", work.path()),
        &at_checkpoint,
        &format!("{what}: source"),
    );
    assert!(
        std::fs::read(&disk).unwrap() == frozen,
        "{what}: the source wrote to the frozen image"
    );

    let inspect = migrate().arg("inspect").arg(&state).output().unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains(&format!(
            "{} (raw, {} bytes): intact",
            disk.display(),
            DISK_MIB << 20
        )),
        "{what}: {text}"
    );

    for round in 1..=3 {
        let into = dir.path().join(format!("run{round}"));
        std::fs::create_dir(&into).unwrap();
        let (child, lines) =
            spawn_lines(migrate().args(["restore", "--into"]).arg(&into).arg(&state));
        watch_restored(&lines, last, &format!("{what}: restore {round}"));
        quit(&source.hmp);
        wait_ended(child, "the restore");
        let after = disk_ticks(&only_overlay(&into), "qcow2", work.path());
        assert_continues(&after, &at_checkpoint, &format!("{what}: restore {round}"));
        assert!(
            std::fs::read(&disk).unwrap() == frozen,
            "{what}: restore {round} changed the frozen image"
        );
    }

    // A running VM put back to the checkpoint, without repeating an option.
    let into = dir.path().join("run4");
    std::fs::create_dir(&into).unwrap();
    let (restore, lines) =
        spawn_lines(migrate().args(["restore", "--into"]).arg(&into).arg(&state));
    watch_restored(&lines, last, &format!("{what}: restore 4"));
    let discarded = only_overlay(&into);
    let (revert, lines) = spawn_lines(
        migrate()
            .args(["revert", "--monitor"])
            .arg(monitor_of(&source, form, &qmp2))
            .arg(&state),
    );
    wait_ended(restore, "the reverted VM's restore");
    watch_restored(&lines, last, &format!("{what}: revert"));
    quit(&source.hmp);
    wait_ended(revert, "the revert");
    let now = only_overlay(&into);
    assert_ne!(
        now, discarded,
        "{what}: the revert reused the discarded overlay"
    );
    let after = disk_ticks(&now, "qcow2", work.path());
    assert_continues(&after, &at_checkpoint, &format!("{what}: revert"));
    assert!(
        std::fs::read(&disk).unwrap() == frozen,
        "{what}: the revert changed the frozen image"
    );

    // A frozen image written behind the checkpoint's back: refused, and inspect says so.
    let f = std::fs::File::options().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"x", 0).unwrap();
    drop(f);
    let out = migrate().arg("restore").arg(&state).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{what}: {err}");
    assert!(
        err.contains(&format!("{} (raw): its content differs", disk.display()))
            && err.contains("it cannot be restored any more"),
        "{what}: {err}"
    );
    let inspect = migrate().arg("inspect").arg(&state).output().unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains("CHANGED: its content differs"),
        "{what}: {text}"
    );
}

#[test]
fn a_checkpoint_restores_again_and_again_with_its_disk_as_it_was() {
    for qemu in qemus() {
        checkpoint_restored_again_and_again(&qemu, Form::DriveHmp);
        checkpoint_restored_again_and_again(&qemu, Form::BlockdevQmp);
    }
}

#[test]
fn without_disks_a_second_restore_onto_a_written_disk_is_refused() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        linux_guest::make_disk(&disk, DISK_MIB).unwrap();
        let qmp2 = dir.path().join("qmp2.sock");
        let (mut source, serial) =
            Vm::start_with_serial(&qemu, &options(&disk, Form::DriveHmp, &qmp2));
        serial.wait_for(0, WAIT, "tick 5", |l| tick(l) == Some(5));
        let state = dir.path().join("state");
        save_then_quit(&source.hmp, &state);
        source.wait_exit();
        let work = tempfile::tempdir().unwrap();
        let at_save = disk_ticks(&disk, "raw", work.path());

        // The first restore is sound: the disk is as the state expects it.
        let (child, lines) = spawn_lines(migrate().arg("restore").arg(&state));
        watch_restored(&lines, *at_save.last().unwrap(), "first restore");
        quit(&source.hmp);
        wait_ended(child, "the restore");
        assert_continues(
            &disk_ticks(&disk, "raw", work.path()),
            &at_save,
            "first restore",
        );

        // The guest wrote to the disk since: this state no longer fits it.
        let written = std::fs::read(&disk).unwrap();
        let out = migrate().arg("restore").arg(&state).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", qemu.display());
        assert!(
            err.contains("files have changed since")
                && err.contains(&format!("disk {} changed since the save", disk.display()))
                && err.contains("save --with-disks"),
            "{err}"
        );
        assert!(
            std::fs::read(&disk).unwrap() == written,
            "the refused restore touched the disk"
        );
    }
}

/// The files in `dir`, by name.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A checkpoint of the test guest started with `extra` (`DISK` standing for
/// a file disk), asked through its human monitor, is refused saying
/// `expected`: the VM runs on and no file is left.
fn refused(qemu: &Path, extra: &[&str], expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut options = recipe_tests::recipe_options(dir.path());
    options.extend(
        extra
            .iter()
            .map(|a| a.replace("DISK", &disk.display().to_string())),
    );
    let (mut vm, serial) = Vm::start_with_serial(qemu, &options);
    serial.wait_for(0, WAIT, "tick 2", |l| tick(l) == Some(2));
    let before = names(dir.path());
    let out = migrate()
        .args(["checkpoint", "--monitor"])
        .arg(&vm.hmp)
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}: {err}", qemu.display());
    assert!(err.contains(expected), "{err}");
    assert_eq!(names(dir.path()), before, "a refused checkpoint left files");
    assert_eq!(vm.status(), "running");
}

#[test]
fn disks_that_cannot_be_frozen_are_refused_in_words_before_anything_changes() {
    for qemu in qemus() {
        // A disk that is no file: there is nothing to put an overlay on.
        refused(
            &qemu,
            &[
                "-drive",
                "driver=null-co,if=virtio,id=nothing",
                "-drive",
                "file=DISK,format=raw,if=virtio",
            ],
            "cannot checkpoint this VM's disks: nothing is not a file (null-co://)",
        );
        // A -blockdev node, which the human monitor's snapshot_blkdev cannot reach.
        refused(
            &qemu,
            &[
                "-blockdev",
                "driver=file,node-name=f0,filename=DISK",
                "-blockdev",
                "driver=raw,node-name=d0,file=f0",
                "-device",
                "virtio-blk-pci,drive=d0",
            ],
            "cannot checkpoint through the human monitor: d0 defined with -blockdev",
        );
    }
}

#[test]
fn revert_leaves_a_vm_that_is_not_the_checkpoints_alone() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let mut options = recipe_tests::recipe_options(dir.path());
        options.extend([
            "-drive".to_string(),
            format!("file={},format=raw,if=virtio", disk.display()),
        ]);
        let (mut source, serial) = Vm::start_with_serial(&qemu, &options);
        serial.wait_for(0, WAIT, "tick 2", |l| tick(l) == Some(2));
        let state = dir.path().join("state");
        ok(&migrate()
            .args(["checkpoint", "--then", "quit", "--monitor"])
            .arg(&source.hmp)
            .arg(&state)
            .output()
            .unwrap());
        source.wait_exit();

        // Another VM, on a disk of its own.
        let other = dir.path().join("other.img");
        std::fs::File::create(&other)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let mut options = recipe_tests::recipe_options(other_dir.path());
        options.extend([
            "-drive".to_string(),
            format!("file={},format=raw,if=virtio", other.display()),
        ]);
        let (mut vm, serial) = Vm::start_with_serial(&qemu, &options);
        serial.wait_for(0, WAIT, "tick 2", |l| tick(l) == Some(2));
        let out = migrate()
            .args(["revert", "--monitor"])
            .arg(&vm.hmp)
            .arg(&state)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", qemu.display());
        assert!(
            err.contains(&format!(
                "does not run on the checkpoint's disk images ({}): it is not this checkpoint's VM",
                disk.display()
            )),
            "{err}"
        );
        assert_eq!(vm.status(), "running");
    }
}
