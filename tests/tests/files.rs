//! The files of a save: private whatever the umask, never written through
//! a planted symlink, an existing target kept unless `--force`, and a
//! replacement that leaves a restorable save (old or new) wherever it is
//! killed, with its watchdog clearing what the dead one left.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use recipe_tests::{bin, migrate, qemus, recipe_options, Vm};

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

/// `qemu-migrate save --then resume --force` of `vm` to `statefile` under
/// strace, which injects `inject` (e.g. `rename:signal=KILL:when=2`).
/// Returns once the save and its watchdog have both ended.
fn save_under_strace(vm: &Vm, statefile: &Path, inject: &str) -> Output {
    Command::new("strace")
        .args(["-f", "-o", "/dev/null", "-e"])
        .arg(format!("inject={inject}"))
        .arg(bin("qemu-migrate"))
        .args(["save", "--then", "resume", "--force", "--monitor"])
        .arg(&vm.hmp)
        .arg(statefile)
        .output()
        .expect("strace (.ci/install-deps installs it)")
}

fn killed(out: &Output) -> bool {
    out.status.signal() == Some(libc::SIGKILL) || out.status.code() == Some(128 + libc::SIGKILL)
}

#[test]
fn a_save_killed_at_each_step_of_replacing_another_leaves_the_old_or_the_new_one() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (mut vm, _serial) = Vm::start_ticking(&qemu, &recipe_options(dir.path()));
        let statefile = dir.path().join("state");
        ok(&save(&vm, &statefile, &[]));

        // The commit syncs the stream, then renames three times (manifest
        // bridging both saves, stream, final manifest). Killed at each,
        // then once it passed them all; interrupted (Ctrl-C) at the sync.
        // The save's watchdog settles what a kill left at once: the bridge
        // goes back to the old save before the stream's rename, on to the
        // new one after it.
        let cases = [
            ("fsync:signal=KILL:when=1", "old"),
            ("rename:signal=KILL:when=1", "old"),
            ("rename:signal=KILL:when=2", "old"),
            ("rename:signal=KILL:when=3", "new"),
            ("fsync:signal=INT:when=1", "cancelled"),
            ("rename:signal=KILL:when=4", "done"),
        ];
        for (inject, expect) in cases {
            let crc_before = inspect(&statefile)["manifest"]["crc32"].clone();
            let out = save_under_strace(&vm, &statefile, inject);
            let err = String::from_utf8_lossy(&out.stderr);
            match expect {
                "done" => assert!(out.status.success(), "{inject}: {err}"),
                "cancelled" => assert_eq!(out.status.code(), Some(4), "{inject}: {err}"),
                _ => assert!(killed(&out), "{inject}: {:?} {err}", out.status),
            }
            // Whatever happened, the guest runs again: the save's watchdog
            // resumed it if the save itself could not.
            assert_eq!(vm.status(), "running", "{inject}: {err}");
            let seen = inspect(&statefile);
            assert_eq!(seen["restorable"], true, "{inject}: {seen}");
            assert_eq!(seen["previous_save"], false, "{inject}: {seen}");
            let same = seen["manifest"]["crc32"] == crc_before;
            match expect {
                "old" | "cancelled" => assert!(same, "{inject}: {seen}"),
                _ => assert!(!same, "{inject}: {seen}"),
            }
            // Nothing of a dead save is left beside the target.
            assert!(
                partials(&statefile).is_empty(),
                "{inject}: {:?}",
                partials(&statefile)
            );
        }

        // The save there, whichever the kills left, restores.
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
        ok(&out);
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
