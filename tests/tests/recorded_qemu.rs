//! Only the recorded QEMU runs (see the `trust` module of the library): a
//! save records the SHA-256 of the binary its VM ran; a restore runs that
//! binary while its content is unchanged, refuses it in words once it
//! changed, and runs whatever `--qemu` names. A manifest of an older
//! version (no digest) restores with a warning; an environment variable
//! the manifest sets and a restore leaves out is named. A missing binary
//! is reported with who named it and what to do.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use recipe_tests::{migrate, qemus, recipe_options, save_then_quit, Vm};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn saved(qemu: &Path, dir: &Path) -> PathBuf {
    let (mut source, _) = Vm::start_ticking(qemu, &recipe_options(dir));
    let statefile = dir.join("state");
    save_then_quit(&source.hmp, &statefile);
    source.wait_exit();
    statefile
}

fn manifest(statefile: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(statefile.with_file_name("state.manifest.json")).unwrap())
        .unwrap()
}

fn edit_manifest(statefile: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut m = manifest(statefile);
    edit(&mut m);
    std::fs::write(
        statefile.with_file_name("state.manifest.json"),
        serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();
}

/// `restore --daemonize` of `statefile` with `extra`; its output, and the
/// restored QEMU ended if one runs.
fn restore(statefile: &Path, extra: &[&str]) -> Output {
    let (out, pid) = recipe_tests::restore_daemonized(statefile, extra);
    if let Some(pid) = pid {
        // SAFETY: a signal to the QEMU this test restored.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        testkit::wait_gone(pid as u32, Duration::from_secs(30));
    }
    out
}

fn restored(out: &Output, what: &str) -> String {
    let err = stderr(out);
    assert!(out.status.success(), "{what}: {err}");
    err
}

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn a_restore_runs_the_recorded_qemu_only_while_unchanged_or_when_named_with_qemu() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let statefile = saved(&qemu, dir.path());
        let m = manifest(&statefile);
        let binary = PathBuf::from(m["qemu"].as_str().unwrap());
        assert_eq!(
            m["qemu_sha256"].as_str(),
            Some(sha256sum(&binary).as_str()),
            "the save records the digest of the binary its VM ran"
        );
        restored(&restore(&statefile, &[]), "the very binary, unchanged");

        // Changed since the save, as after an upgrade in place: the digest
        // recorded is not the binary's any more.
        edit_manifest(&statefile, |m| m["qemu_sha256"] = "0".repeat(64).into());
        let out = restore(&statefile, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        for words in [
            binary.display().to_string(),
            "its content changed since the save".into(),
            format!("--qemu {}", binary.display()),
        ] {
            assert!(err.contains(&words), "expected {words:?} in: {err}");
        }
        let binary_arg = binary.display().to_string();
        restored(
            &restore(&statefile, &["--qemu", &binary_arg]),
            "the changed binary named with --qemu",
        );

        // An older version's manifest: no digest, run with a warning.
        edit_manifest(&statefile, |m| {
            m.as_object_mut().unwrap().remove("qemu_sha256");
            m["env"] =
                serde_json::json!({ "LD_PRELOAD": "/nowhere/evil.so", "QEMU_AUDIO_DRV": "none" });
        });
        let err = restored(&restore(&statefile, &[]), "an older manifest");
        assert!(
            err.contains("warning: the manifest") && err.contains("records no digest of its QEMU"),
            "{err}"
        );
        assert!(
            err.contains("the manifest sets LD_PRELOAD for QEMU; it was not applied"),
            "a dropped variable is named: {err}"
        );
        assert!(!err.contains("QEMU_AUDIO_DRV"), "{err}");
    }
}

#[test]
fn a_missing_qemu_binary_says_which_who_named_it_and_what_to_do() {
    let qemu = &qemus()[0];
    let dir = tempfile::tempdir().unwrap();
    let statefile = saved(qemu, dir.path());
    let gone = dir.path().join("uninstalled/qemu-system-x86_64");
    let original = manifest(&statefile)["qemu"].clone();
    edit_manifest(&statefile, |m| {
        m["qemu"] = gone.display().to_string().into()
    });
    let err = stderr(&restore(&statefile, &[]));
    for words in [
        format!("the QEMU binary {} is not there", gone.display()),
        "it ran the saved VM, and the manifest".into(),
        "Install it again, or give --qemu PATH".into(),
    ] {
        assert!(err.contains(&words), "expected {words:?} in: {err}");
    }
    assert!(!err.contains("entity not found"), "{err}");

    edit_manifest(&statefile, |m| m["qemu"] = original);
    let err = stderr(&restore(&statefile, &["--qemu", "/nowhere/qemu"]));
    assert!(
        err.contains("the QEMU binary /nowhere/qemu given with --qemu is not there"),
        "{err}"
    );

    // A state file with no manifest runs the default binary from PATH.
    let bare = dir.path().join("bare");
    std::fs::copy(&statefile, &bare).unwrap();
    let out = migrate()
        .env("PATH", "/nowhere")
        .args(["restore", "--daemonize"])
        .arg(&bare)
        .arg("--")
        .args(recipe_options(dir.path()))
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    for words in [
        "the QEMU binary qemu-system-x86_64 (the default",
        "on PATH (/nowhere)",
        "give --qemu PATH",
    ] {
        assert!(err.contains(words), "expected {words:?} in: {err}");
    }
}
