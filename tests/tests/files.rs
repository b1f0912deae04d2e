//! The files of a save: private whatever the umask, never written through
//! a planted symlink, an existing target kept unless `--force`, and a
//! replacement that leaves a restorable save (old or new) wherever it is
//! killed, with the next save clearing what the dead one left.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use recipe_tests::{bin, qemus, recipe_options, Vm};

fn migrate() -> Command {
    Command::new(bin("qemu-migrate"))
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

fn save(vm: &Vm, statefile: &Path, extra: &[&str]) -> Output {
    migrate()
        .args(["save", "--then", "resume", "--monitor"])
        .arg(&vm.hmp)
        .arg(statefile)
        .args(extra)
        .output()
        .unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Files beside `statefile` whose name ends in `.partial`.
fn partials(statefile: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(statefile.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".partial"))
        .collect()
}

/// `inspect --json` of a state file.
fn inspect(statefile: &Path) -> serde_json::Value {
    let out = migrate()
        .args(["inspect", "--json"])
        .arg(statefile)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn state_and_manifest_are_private_whatever_the_umask() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (vm, _serial) = Vm::start_ticking(&qemu, &recipe_options(dir.path()));
        let statefile = dir.path().join("state");
        let out = Command::new("sh")
            .arg("-c")
            .arg("umask 000; exec \"$@\"")
            .arg("sh")
            .arg(bin("qemu-migrate"))
            .args(["save", "--then", "resume", "--monitor"])
            .arg(&vm.hmp)
            .arg(&statefile)
            .output()
            .unwrap();
        ok(&out);
        assert_eq!(mode(&statefile), 0o600);
        assert_eq!(mode(&dir.path().join("state.manifest.json")), 0o600);
        assert!(partials(&statefile).is_empty());
    }
}

#[test]
fn an_existing_target_is_refused_unless_forced_and_a_planted_symlink_is_never_followed() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (vm, _serial) = Vm::start_ticking(&qemu, &recipe_options(dir.path()));
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious\n").unwrap();

        // Something that is not a save.
        let statefile = dir.path().join("state");
        std::fs::write(&statefile, b"not a save\n").unwrap();
        let out = save(&vm, &statefile, &[]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(
                "state exists and is not a save of qemu-migrate; give --force to replace it"
            ),
            "{err}"
        );
        assert_eq!(std::fs::read(&statefile).unwrap(), b"not a save\n");

        // Symlinks planted at the target, its manifest and the name older
        // versions wrote to: refused; forced, the links are replaced, not followed.
        std::fs::remove_file(&statefile).unwrap();
        for name in ["state", "state.manifest.json", "state.partial"] {
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        let out = save(&vm, &statefile, &[]);
        assert_eq!(out.status.code(), Some(2));
        ok(&save(&vm, &statefile, &["--force"]));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious\n");
        for path in [&statefile, &dir.path().join("state.manifest.json")] {
            let meta = std::fs::symlink_metadata(path).unwrap();
            assert!(meta.is_file(), "{} is a file of its own", path.display());
            assert_eq!(meta.mode() & 0o7777, 0o600);
        }
        assert_eq!(inspect(&statefile)["restorable"], true);

        // A save replaced without --force: refused in words, kept as it was.
        let before = std::fs::read(&statefile).unwrap();
        let out = save(&vm, &statefile, &[]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("state exists (an earlier save); give --force"),
            "{err}"
        );
        assert_eq!(std::fs::read(&statefile).unwrap(), before);
    }
}

/// Resumes a guest a killed save left paused (the save's own watchdog may
/// already have).
fn resume(vm: &mut Vm) {
    if vm.status() != "running" {
        let _ = vm.qmp().execute("cont", None);
    }
}

#[test]
fn a_save_killed_at_each_step_of_replacing_another_leaves_a_restorable_one() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (mut vm, _serial) = Vm::start_ticking(&qemu, &recipe_options(dir.path()));
        let statefile = dir.path().join("state");
        ok(&save(&vm, &statefile, &[]));

        // The commit renames three times (manifest bridging both saves,
        // stream, final manifest); killed at each, then once it passed them all.
        // The one that leaves the previous save comes last, to be restored.
        for n in [1, 3, 4, 2] {
            let crc_before = inspect(&statefile)["manifest"]["crc32"].clone();
            let out = Command::new("strace")
                .args(["-f", "-o", "/dev/null", "-e"])
                .arg(format!("inject=rename:signal=KILL:when={n}"))
                .arg(bin("qemu-migrate"))
                .args(["save", "--then", "resume", "--force", "--monitor"])
                .arg(&vm.hmp)
                .arg(&statefile)
                .output()
                .unwrap();
            let killed = out.status.signal() == Some(libc::SIGKILL)
                || out.status.code() == Some(128 + libc::SIGKILL);
            assert_eq!(
                killed,
                n < 4,
                "kill at rename {n}: {:?} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            resume(&mut vm);
            let seen = inspect(&statefile);
            assert_eq!(seen["restorable"], true, "kill at rename {n}: {seen}");
            let previous = seen["previous_save"] == true;
            let same = seen["manifest"]["crc32"] == crc_before;
            match n {
                1 => assert!(same && !previous, "{seen}"),
                2 => assert!(same && previous, "{seen}"),
                _ => assert!(!same && !previous, "{seen}"),
            }
            if n == 1 {
                assert!(!partials(&statefile).is_empty(), "the dead save's files");
            }
            if n == 4 {
                // The dead saves' leftovers were cleared by the one that finished.
                assert!(
                    partials(&statefile).is_empty(),
                    "{:?}",
                    partials(&statefile)
                );
            }
        }

        // The previous save, left by the kill between the two halves, restores.
        let hmp = vm.hmp.clone();
        let _ = vm.qmp().execute("quit", None);
        vm.wait_exit();
        let pidfile = dir.path().join("restored.pid");
        let out = migrate()
            .args(["restore", "--daemonize", "--pidfile"])
            .arg(&pidfile)
            .arg(&statefile)
            .output()
            .unwrap();
        let err = ok(&out);
        assert!(err.contains("holds the previous save"), "{err}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let status = Command::new(bin("monitor-send"))
            .arg(&hmp)
            .arg("info status")
            .output()
            .unwrap();
        // SAFETY: a signal to the QEMU this test had restored.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(
            String::from_utf8_lossy(&status.stdout).contains("running"),
            "{}",
            String::from_utf8_lossy(&status.stdout)
        );
    }
}
