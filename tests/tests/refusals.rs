//! A restore that cannot work is refused in words, with the exit status
//! `--help` documents, QEMU's own line where QEMU is the one refusing (in
//! the foreground and with `--daemonize`), and no private directory left
//! behind: firmware that changed since the save, `-m` edited in the
//! manifest, another QEMU at the binary's path, and disks that were
//! written, replaced or deleted since the save.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use recipe_tests::{bin, migrate, qemus, recipe_options, save_then_quit, Vm};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Saves a recipe VM started with `extra` options too (`--then quit`);
/// returns the state file and the VM's options.
fn saved(qemu: &Path, dir: &Path, extra: &[String]) -> (PathBuf, Vec<String>) {
    let mut options = recipe_options(dir);
    options.extend(extra.iter().cloned());
    let (mut source, _) = Vm::start_ticking(qemu, &options);
    let statefile = dir.join("state");
    save_then_quit(&source.hmp, &statefile);
    source.wait_exit();
    (statefile, options)
}

/// `qemu-migrate restore ARGS` with a temporary directory of its own,
/// which must be empty again afterwards (no private directory leaked).
fn restore(args: &[&std::ffi::OsStr]) -> Output {
    let tmp = tempfile::tempdir().unwrap();
    let out = migrate()
        .arg("restore")
        .args(args)
        .env("TMPDIR", tmp.path())
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    // The user's lock directory stays (empty: each lock is removed when let go).
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let locks = tmp.path().join(format!("qemu-migrate-{uid}"));
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| *p != locks || std::fs::read_dir(p).unwrap().next().is_some())
        .collect();
    if !out.status.success() {
        assert!(left.is_empty(), "left behind: {left:?}; {}", stderr(&out));
    }
    out
}

fn assert_refused(out: &Output, code: i32, words: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    for w in words {
        assert!(err.contains(w), "expected {w:?} in: {err}");
    }
}

fn kill_pidfile(pidfile: &Path) {
    let pid: i32 = std::fs::read_to_string(pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: a signal to the QEMU this test restored.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

#[test]
fn firmware_that_changed_since_the_save_is_refused_in_words() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let bios = dir.path().join("bios.bin");
        std::fs::copy("/usr/share/seabios/bios-256k.bin", &bios).unwrap();
        let (statefile, _) = saved(
            &qemu,
            dir.path(),
            &["-bios".into(), bios.display().to_string()],
        );
        // A distribution upgrade ships another firmware.
        std::fs::copy("/usr/share/seabios/bios.bin", &bios).unwrap();
        let out = restore(&[statefile.as_os_str()]);
        assert_refused(
            &out,
            2,
            &[
                &format!("-bios {} changed since the save", bios.display()),
                "its size is 131072 bytes, was 262144",
                "--force restores it anyway",
            ],
        );
        // Forced, QEMU itself rejects the stream: its own line, in words, in both modes.
        let out = restore(&[statefile.as_os_str(), "--force".as_ref()]);
        assert_refused(&out, 3, &["QEMU exited", "pc.bios"]);
        let pidfile = dir.path().join("pid");
        let out = restore(&[
            statefile.as_os_str(),
            "--force".as_ref(),
            "--daemonize".as_ref(),
            "--pidfile".as_ref(),
            pidfile.as_os_str(),
        ]);
        assert_refused(&out, 3, &["QEMU exited", "pc.bios"]);
        assert!(!pidfile.exists());
    }
}

#[test]
fn ram_edited_in_the_manifest_is_refused_with_qemus_own_line() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (statefile, _) = saved(&qemu, dir.path(), &[]);
        let manifest = dir.path().join("state.manifest.json");
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        for key in ["args", "vm_options"] {
            let list = m[key].as_array_mut().unwrap();
            let i = list.iter().position(|a| a == "-m").unwrap();
            list[i + 1] = "64".into();
        }
        std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        for daemonize in [false, true] {
            let mut args = vec![statefile.as_os_str()];
            if daemonize {
                args.push("--daemonize".as_ref());
            }
            let out = restore(&args);
            assert_refused(&out, 3, &["QEMU exited", "pc.ram"]);
            assert!(
                stderr(&out).to_lowercase().contains("mismatch"),
                "{}",
                stderr(&out)
            );
        }
    }
}

#[test]
fn another_qemu_at_the_saved_binarys_path_is_refused_in_words() {
    let all = qemus();
    if all.len() < 2 {
        eprintln!("needs two QEMU versions in QEMU_BINARIES");
        return;
    }
    for (i, qemu) in all.iter().enumerate() {
        let other = &all[(i + 1) % all.len()];
        let dir = tempfile::tempdir().unwrap();
        let (statefile, _) = saved(qemu, dir.path(), &[]);
        // The binary the manifest names is now another version.
        let swapped = dir.path().join("qemu-system-x86_64");
        std::fs::write(
            &swapped,
            format!("#!/bin/sh\nexec {} \"$@\"\n", other.display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&swapped, std::fs::Permissions::from_mode(0o755)).unwrap();
        let manifest = dir.path().join("state.manifest.json");
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        m["qemu"] = swapped.display().to_string().into();
        std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        // Its content is not what the save recorded: refused before it runs.
        let out = restore(&[statefile.as_os_str(), "--daemonize".as_ref()]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("its content changed since the save") && err.contains("--qemu"),
            "{err}"
        );
        // Named with --qemu it runs, and the pre-flight finds the other version.
        let out = restore(&[
            statefile.as_os_str(),
            "--daemonize".as_ref(),
            "--qemu".as_ref(),
            swapped.as_os_str(),
        ]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("cannot be restored with these options")
                && (err.contains("machine type: the state is pc-i440fx-")
                    || err.contains("is older than QEMU")),
            "{err}"
        );
    }
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (package qemu-utils; .ci/install-deps installs it)");
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_disk_written_replaced_or_deleted_since_the_save_is_refused_before_qemu_starts() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &disk.display().to_string(),
            "16M",
        ]);
        let (statefile, _) = saved(
            &qemu,
            dir.path(),
            &[
                "-drive".into(),
                format!("file={},format=qcow2,if=virtio", disk.display()),
            ],
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("state.manifest.json")).unwrap())
                .unwrap();
        let files = manifest["files"].as_array().unwrap();
        assert!(
            files.iter().any(|f| f["role"] == "disk"
                && f["format"] == "qcow2"
                && f["path"] == disk.display().to_string()),
            "{manifest}"
        );

        // Unchanged: it restores.
        let pidfile = dir.path().join("pid");
        let out = restore(&[
            statefile.as_os_str(),
            "--daemonize".as_ref(),
            "--pidfile".as_ref(),
            pidfile.as_os_str(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        kill_pidfile(&pidfile);

        let refused = |what: &str| {
            let out = restore(&[statefile.as_os_str(), "--daemonize".as_ref()]);
            assert_refused(
                &out,
                2,
                &[&format!("disk {}", disk.display()), what, "--force"],
            );
        };
        // Written to (by another VM, by qemu-io, by a mount of the image).
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, b"x", 300 * 1024).unwrap();
        drop(f);
        refused("it was written to");
        // Replaced by a copy (of itself, even).
        let copy = dir.path().join("copy.qcow2");
        std::fs::copy(&disk, &copy).unwrap();
        std::fs::rename(&copy, &disk).unwrap();
        refused("it was replaced by another file");
        std::fs::remove_file(&disk).unwrap();
        refused("is missing");
        // Forced: QEMU's own reason, not a closed monitor, in the background too.
        let out = restore(&[
            statefile.as_os_str(),
            "--force".as_ref(),
            "--daemonize".as_ref(),
        ]);
        assert_refused(&out, 3, &["QEMU exited", "Could not open"]);
    }
}

fn info_status(hmp: &Path) -> String {
    let out = Command::new(bin("monitor-send"))
        .arg(hmp)
        .arg("info status")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_restore_is_refused_while_the_saved_vm_holds_its_sockets_and_of_two_at_once_one_wins() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let qcow = dir.path().join("disk.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &qcow.display().to_string(),
            "16M",
        ]);
        let mut options = recipe_options(dir.path());
        options.extend([
            "-drive".to_string(),
            format!("file={},format=qcow2,if=virtio", qcow.display()),
        ]);
        let (mut source, _) = Vm::start_ticking(&qemu, &options);
        let statefile = dir.path().join("state");
        // The default: the source stays paused, holding its sockets and disk.
        let out = migrate()
            .args(["save", "--monitor"])
            .arg(&source.hmp)
            .arg(&statefile)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let out = restore(&[statefile.as_os_str(), "--daemonize".as_ref()]);
        assert_refused(
            &out,
            2,
            &[
                &format!("is still held by process {}", source.pid()),
                "the saved VM, or another restore of it, still runs",
            ],
        );
        assert!(
            info_status(&source.hmp).contains("paused"),
            "the source's socket still works"
        );

        // Once it has ended, two restores at once: exactly one wins, and the
        // user's socket reaches the VM it started.
        let hmp = source.hmp.clone();
        let _ = source.qmp().execute("quit", None);
        source.wait_exit();
        let pidfiles = [dir.path().join("a.pid"), dir.path().join("b.pid")];
        let racers: Vec<_> = pidfiles
            .iter()
            .map(|p| {
                migrate()
                    .args(["restore", "--daemonize", "--pidfile"])
                    .arg(p)
                    .arg(&statefile)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<Output> = racers
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        let winners: Vec<usize> = (0..2).filter(|&i| outs[i].status.success()).collect();
        if winners.len() != 1 {
            pidfiles
                .iter()
                .filter(|p| p.exists())
                .for_each(|p| kill_pidfile(p));
        }
        assert_eq!(
            winners.len(),
            1,
            "{:?}",
            outs.iter().map(stderr).collect::<Vec<_>>()
        );
        let loser = &outs[1 - winners[0]];
        assert_eq!(loser.status.code(), Some(2), "{}", stderr(loser));
        let said = info_status(&hmp);
        let winner_pid: u32 = std::fs::read_to_string(&pidfiles[winners[0]])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        kill_pidfile(&pidfiles[winners[0]]);
        assert!(
            said.contains("running"),
            "the winner answers on {}: {said}",
            hmp.display()
        );
        assert!(winner_pid > 0);
    }
}
