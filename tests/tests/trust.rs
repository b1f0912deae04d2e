//! What a restore trusts (see the `trust` module of the library): files of
//! another user or writable by others are refused, only a trusted binary
//! runs and only `QEMU_*` variables reach it, inline secrets are never
//! printed, and root does not run another user's VM unless told to.
//! Another user is `nobody`, through util-linux's `setpriv` (the tests run
//! as root, as CI does).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use recipe_tests::{migrate, qemus, recipe_options, restore_daemonized, save_then_quit, Vm};

const NOBODY: u32 = 65534;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn saved(qemu: &Path, dir: &Path, extra: &[&str]) -> PathBuf {
    let mut options = recipe_options(dir);
    options.extend(extra.iter().map(|s| s.to_string()));
    let (mut source, _) = Vm::start_ticking(qemu, &options);
    let statefile = dir.join("state");
    save_then_quit(&source.hmp, &statefile);
    source.wait_exit();
    statefile
}

fn refused(out: &Output, words: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(words), "expected {words:?} in: {err}");
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), None).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn edit_manifest(statefile: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = statefile.with_file_name("state.manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

fn kill(pid: Option<i32>) {
    if let Some(pid) = pid {
        // SAFETY: a signal to a QEMU this test restored.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

#[test]
fn a_manifest_or_state_file_of_another_user_or_writable_by_others_is_refused() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let statefile = saved(&qemu, dir.path(), &[]);
        let manifest = dir.path().join("state.manifest.json");
        for path in [&manifest, &statefile] {
            chown(path, NOBODY);
            let out = migrate().arg("restore").arg(&statefile).output().unwrap();
            refused(&out, "belongs to nobody (uid 65534), not to root");
            chown(path, 0);
            chmod(path, 0o666);
            let out = migrate().arg("restore").arg(&statefile).output().unwrap();
            refused(&out, "is writable by others (mode 666)");
            chmod(path, 0o600);
        }
    }
}

#[test]
fn only_a_trusted_binary_runs_and_only_qemu_variables_reach_it() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let statefile = saved(&qemu, dir.path(), &[]);
        let wrapper = dir.path().join("qemu-wrapper");
        let env_log = dir.path().join("env.log");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nenv >> {}\nexec {} \"$@\"\n",
                env_log.display(),
                qemu.display()
            ),
        )
        .unwrap();
        chmod(&wrapper, 0o755);
        // As if the save had recorded the wrapper (see `recorded_qemu.rs`
        // for a binary whose content changed since).
        let digest = Command::new("sha256sum").arg(&wrapper).output().unwrap();
        let digest = String::from_utf8_lossy(&digest.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        edit_manifest(&statefile, |m| {
            m["qemu"] = wrapper.display().to_string().into();
            m["qemu_sha256"] = digest.into();
            m["env"]["LD_PRELOAD"] = "/nonexistent/evil.so".into();
            m["env"]["QEMU_TRUST_TEST"] = "applied".into();
        });
        let (out, pid) = restore_daemonized(&statefile, &[]);
        kill(pid);
        assert!(out.status.success(), "{}", stderr(&out));
        let env = std::fs::read_to_string(&env_log).unwrap();
        assert!(env.contains("QEMU_TRUST_TEST=applied"), "{env}");
        assert!(!env.contains("LD_PRELOAD"), "{env}");

        std::fs::remove_file(&env_log).unwrap();
        chown(&wrapper, NOBODY);
        let (out, pid) = restore_daemonized(&statefile, &[]);
        kill(pid);
        refused(&out, "the QEMU binary belongs to nobody (uid 65534)");
        chown(&wrapper, 0);
        chmod(&wrapper, 0o777);
        let (out, pid) = restore_daemonized(&statefile, &[]);
        kill(pid);
        refused(&out, "the QEMU binary is writable by others");
        assert!(!env_log.exists(), "the untrusted binary never ran");
    }
}

#[test]
fn inline_secrets_are_never_printed() {
    const SECRET: &str = "hunter2-do-not-print";
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let secret = format!("secret,id=sec0,data={SECRET}");
        let mut options = recipe_options(dir.path());
        options.extend(["-object".to_string(), secret.clone()]);
        let (mut source, _) = Vm::start_ticking(&qemu, &options);
        let statefile = dir.path().join("state");
        let out = migrate()
            .args(["--json", "save", "--then", "quit", "--monitor"])
            .arg(&source.hmp)
            .arg(&statefile)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        source.wait_exit();
        let mut printed = String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out);
        assert!(printed.contains("data=***"), "{printed}");
        // The manifest holds it, privately.
        let manifest = dir.path().join("state.manifest.json");
        assert!(std::fs::read_to_string(&manifest).unwrap().contains(SECRET));
        assert_eq!(
            std::fs::metadata(&manifest).unwrap().permissions().mode() & 0o777,
            0o600
        );
        for json in [false, true] {
            let mut cmd = migrate();
            if json {
                cmd.arg("--json");
            }
            let out = cmd.arg("inspect").arg(&statefile).output().unwrap();
            assert!(out.status.success(), "{}", stderr(&out));
            printed += &String::from_utf8_lossy(&out.stdout);
        }
        // An error of QEMU's that quotes the option.
        edit_manifest(&statefile, |m| {
            for key in ["args", "vm_options"] {
                for a in m[key].as_array_mut().unwrap() {
                    if *a == secret.as_str() {
                        *a = format!("{secret},format=bogus").into();
                    }
                }
            }
        });
        for (json, daemonize) in [(false, true), (true, true), (false, false)] {
            let mut cmd = migrate();
            if json {
                cmd.arg("--json");
            }
            cmd.arg("restore");
            if daemonize {
                cmd.arg("--daemonize");
            }
            // In the foreground QEMU's stderr is passed through as well.
            let out = cmd.arg(&statefile).output().unwrap();
            assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
            printed += &String::from_utf8_lossy(&out.stdout);
            printed += &stderr(&out);
        }
        assert!(printed.contains("QEMU exited"), "{printed}");
        assert!(!printed.contains(SECRET), "{printed}");
    }
}

#[test]
fn root_restores_another_users_vm_only_when_told_to() {
    for qemu in qemus() {
        let home = tempfile::tempdir().unwrap();
        chown(home.path(), NOBODY);
        let options = recipe_options(home.path());
        let hmp = home.path().join("hmp.sock");
        let mut qemu_as_nobody = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(&qemu)
            .args(&options)
            .args(["-display", "none", "-monitor"])
            .arg(format!("unix:{},server,nowait", hmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("setpriv (util-linux)");
        let up = qemu_monitor::connect(
            hmp.as_path(),
            &qemu_monitor::Options {
                timeout: Duration::from_secs(20),
                wait_socket: Some(Duration::from_secs(20)),
                mux_escape: false,
            },
        );
        assert!(up.is_ok(), "QEMU as nobody: {:?}", up.err());
        drop(up);

        let states = tempfile::tempdir().unwrap();
        let statefile = states.path().join("state");
        save_then_quit(&hmp, &statefile);
        let _ = qemu_as_nobody.wait();

        let (out, pid) = restore_daemonized(&statefile, &[]);
        kill(pid);
        refused(
            &out,
            "it was saved from a QEMU run by nobody (uid 65534); restoring it as root would run that VM with root's rights",
        );
        let (out, pid) = restore_daemonized(&statefile, &["--as-root"]);
        kill(pid);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}
