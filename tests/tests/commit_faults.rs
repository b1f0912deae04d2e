//! One commit protocol for every kind of save, proved by walking it: for a
//! plain save, an instant save and a checkpoint, to a new target and over
//! an earlier save, a fault is injected at each file-system step of the
//! commit in turn (write, fsync, rename, unlink, directory sync), as an
//! error and as a kill. After each, the guest runs on, the target is the
//! earlier save or the new one (or none, where there was none) and
//! restores, and no file under a save's names belongs to a failed save.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use recipe_tests::{bin, migrate, qemus, recipe_options, spawn_lines, tick, Vm};

const WAIT: Duration = Duration::from_secs(60);

/// A save of `vm` to `target` with a fault at `step` (`N:error`, `N:kill`).
fn save_with_fault(vm: &Vm, target: &Path, kind: &[&str], fault: Option<&str>) -> Output {
    let mut cmd = migrate();
    cmd.args(["save", "--force", "--then", "resume", "--monitor"])
        .arg(&vm.hmp)
        .arg(target)
        .args(kind);
    if let Some(f) = fault {
        cmd.env("QEMU_MIGRATE_FAULT", f);
    }
    // Returns once the save and its watchdog (which shares stderr) ended.
    cmd.output().unwrap()
}

fn inspect(target: &Path) -> serde_json::Value {
    let out = migrate()
        .args(["inspect", "--json"])
        .arg(target)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)))
}

/// The files beside `target` that carry its name.
fn files_of(target: &Path) -> Vec<String> {
    let name = target.file_name().unwrap().to_string_lossy().into_owned();
    let mut found: Vec<String> = std::fs::read_dir(target.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f == &name || f.starts_with(&format!("{name}.")))
        .collect();
    found.sort();
    found
}

/// What a whole save at `target` is made of, by its manifest on disk (and
/// the earlier save's images, while it still describes that one too).
fn save_files(target: &Path) -> Vec<String> {
    let name = target.file_name().unwrap().to_string_lossy().into_owned();
    let manifest = format!("{name}.manifest.json");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.with_file_name(&manifest)).unwrap()).unwrap();
    let mut files = vec![name, manifest];
    for m in [&m, &m["previous"]] {
        // One image is written as older saves wrote it, without a list.
        let layout = &m["instant"];
        let images = layout["images"].as_array().cloned().unwrap_or_else(|| {
            layout["image"]
                .is_string()
                .then(|| layout.clone())
                .into_iter()
                .collect()
        });
        for image in images {
            files.push(image["image"].as_str().unwrap().to_string());
        }
    }
    files.sort();
    files.dedup();
    files
}

/// Restores `target` as a clone beside the running VM and checks that its
/// guest carries on (ticks, never boots again), then ends it.
fn restores(target: &Path, vm: &Vm, what: &str) {
    let dir = vm.hmp.parent().unwrap();
    let (mut child, lines) = spawn_lines(
        migrate()
            .args(["restore", "--clone"])
            .arg(target)
            .stderr(Stdio::piped()),
    );
    lines.wait_for(0, WAIT, what, |l| tick(l).is_some());
    let seen = lines.snapshot();
    assert!(
        !seen.iter().any(|l| l.starts_with("BOOT ")),
        "{what}: the restored guest booted again: {seen:?}"
    );
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("hmp.sock.clone") {
            let _ = Command::new(bin("monitor-send"))
                .arg(e.path())
                .arg("quit")
                .output();
        }
    }
    assert!(child.wait().unwrap().success(), "{what}");
}

/// Walks every step of the commit of a save of `kind` for both faults,
/// over an earlier save (`replacing`) or to a new target each time.
fn walk(kind: &[&str], label: &str) {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (mut vm, _serial) = Vm::start_ticking(&qemu, &recipe_options(dir.path()));
        for replacing in [true, false] {
            for how in ["error", "kill"] {
                let over = dir.path().join(format!("over-{how}"));
                if replacing {
                    let out = save_with_fault(&vm, &over, kind, None);
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                let mut step = 1;
                loop {
                    let target = if replacing {
                        over.clone()
                    } else {
                        dir.path().join(format!("new-{how}-{step}"))
                    };
                    let before = replacing.then(|| inspect(&target)["manifest"]["crc32"].clone());
                    let fault = format!("{step}:{how}");
                    let out = save_with_fault(&vm, &target, kind, Some(&fault));
                    let err = String::from_utf8_lossy(&out.stderr).into_owned();
                    let what = format!("{} {label} {fault} replacing={replacing}", qemu.display());
                    let injected = err.contains("fault injected at step");
                    // The outcome the user sees: killed, failed in words
                    // saying what is at the target, or saved.
                    let saved = if !injected {
                        assert!(out.status.success(), "{what}: {err}");
                        true
                    } else if how == "kill" {
                        assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{what}: {err}");
                        false
                    } else if out.status.success() {
                        assert!(err.contains("saved, but"), "{what}: {err}");
                        true
                    } else {
                        assert_eq!(out.status.code(), Some(3), "{what}: {err}");
                        let kept = if replacing {
                            "is the earlier save, as it was"
                        } else {
                            "nothing was kept at"
                        };
                        assert!(err.contains(kept), "{what}: {err}");
                        false
                    };
                    // The guest runs on whatever happened.
                    assert_eq!(vm.status(), "running", "{what}: {err}");

                    let files = files_of(&target);
                    if files.is_empty() {
                        assert!(!replacing && !saved, "{what}: the save is gone: {err}");
                    } else {
                        let seen = inspect(&target);
                        assert_eq!(seen["restorable"], true, "{what}: {seen} {err}");
                        assert_eq!(seen["previous_save"], false, "{what}: {seen} {err}");
                        // The commit is finished, or, where tidying up after
                        // the stream's rename failed, deliberately left
                        // describing both saves, and said.
                        assert!(
                            seen["manifest"]["committing"].is_null() || err.contains("saved, but"),
                            "{what}: {seen} {err}"
                        );
                        // Only the files of the save there; nothing of a
                        // failed save under its names.
                        let expected = save_files(&target);
                        if err.contains("saved, but") {
                            // The earlier save's images may stay, as said.
                            let extra: Vec<&String> =
                                files.iter().filter(|f| !expected.contains(f)).collect();
                            assert!(
                                expected.iter().all(|f| files.contains(f))
                                    && extra.iter().all(|f| f.contains(".ram")),
                                "{what}: {files:?} {err}"
                            );
                        } else {
                            assert_eq!(files, expected, "{what}: {err}");
                        }
                        let crc = &seen["manifest"]["crc32"];
                        match (&before, saved) {
                            (Some(old), false) if how == "error" => {
                                assert_eq!(crc, old, "{what}: the earlier save was kept")
                            }
                            (Some(old), true) => {
                                assert_ne!(crc, old, "{what}: the new save is in place")
                            }
                            // A kill: the earlier save or the new one.
                            _ => {}
                        }
                        restores(&target, &vm, &what);
                    }
                    if !injected {
                        break;
                    }
                    step += 1;
                    assert!(step < 64, "{what}: the walk never ended");
                }
                // The walk went through the whole commit.
                assert!(step > 5, "{label} {how}: only {step} steps");
            }
        }
        let _ = vm.qmp().execute("quit", None);
        vm.wait_exit();
    }
}

#[test]
fn a_plain_save_is_the_earlier_save_or_the_new_one_at_every_step_of_its_commit() {
    walk(&[], "plain");
}

#[test]
fn an_instant_save_is_the_earlier_save_or_the_new_one_at_every_step_of_its_commit() {
    walk(&["--instant"], "instant");
}

#[test]
fn a_checkpoint_is_the_earlier_one_or_the_new_one_at_every_step_of_its_commit() {
    walk(&["--with-disks"], "checkpoint");
}
