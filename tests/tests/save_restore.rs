//! `qemu-migrate save` and `restore` against a real QEMU running the test
//! guest: the restored guest carries on, and every fault leaves nothing
//! half-written and the guest as it was.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use recipe_tests::{
    assert_carries_on, bin, guest, has_exited, migrate, qemus, recipe_options, save_then_quit,
    spawn_lines, tick, Vm,
};

const WAIT: Duration = Duration::from_secs(60);

/// A save of a guest with `fill_mib` of RAM written, running in the background
/// with `--json` progress; returns once the first bytes have been saved.
// The child is returned to the caller, who waits for it.
#[allow(clippy::zombie_processes)]
fn slow_save(
    vm: &Vm,
    statefile: &Path,
    extra: &[&str],
) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = migrate()
        .args(["save", "--json", "--monitor"])
        .arg(&vm.hmp)
        .arg(statefile)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            let end = child.wait_with_output().unwrap();
            panic!(
                "save ended before it made progress: {}",
                String::from_utf8_lossy(&end.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["done"].as_u64().unwrap_or(0) > 0 {
            return (child, out);
        }
    }
}

/// A guest with `fill_mib` of its RAM written, once it has written it.
fn big_guest(qemu: &Path, ram_mib: u32, fill_mib: u32) -> Vm {
    let guest = guest().display().to_string();
    let ram = ram_mib.to_string();
    let append = format!("fill={fill_mib}");
    let (vm, _serial) = Vm::start_ticking(
        qemu,
        &[
            "-accel",
            "tcg",
            "-m",
            &ram,
            "-nodefaults",
            "-serial",
            "stdio",
            "-kernel",
            &guest,
            "-append",
            &append,
        ],
    );
    vm
}

fn assert_nothing_left(statefile: &Path) {
    let dir = statefile.parent().unwrap();
    let left: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("state")
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn recipe_vm_is_saved_and_restored_without_repeating_an_option() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let options = recipe_options(dir.path());
        let (mut source, serial) = Vm::start_with_serial(&qemu, &options);
        serial.wait_for(0, WAIT, "boot banner", |l| l.starts_with("BOOT "));
        serial.wait_for(0, WAIT, "tick 3", |l| tick(l) == Some(3));

        let statefile = dir.path().join("statefile");
        save_then_quit(&source.hmp, &statefile);
        // `--then quit` returns once QEMU is gone: a restore started right
        // after finds the VM's sockets free.
        assert!(
            has_exited(source.pid()),
            "QEMU still runs after save --then quit"
        );
        assert!(statefile.exists() && dir.path().join("statefile.manifest.json").exists());
        assert!(!dir.path().join("statefile.partial").exists());
        let sock = source.hmp.clone();
        assert!(source.wait_exit().success(), "--then quit ends the source");
        let last_saved = serial
            .snapshot()
            .iter()
            .filter_map(|l| tick(l))
            .max()
            .unwrap();

        // Restore in the foreground: the VM's serial console is our stdout.
        let (mut restore, restored) = spawn_lines(migrate().arg("restore").arg(&statefile));
        assert_carries_on(&qemu, &restored, last_saved);

        // The restored VM answers on the socket the user's recipe knows.
        let q = Command::new(bin("monitor-send"))
            .arg(&sock)
            .arg("quit")
            .output()
            .unwrap();
        assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
        assert!(restore.wait().unwrap().success());
    }
}

#[test]
fn qemu_killed_during_a_save_leaves_no_state_file() {
    for qemu in qemus() {
        let vm = big_guest(&qemu, 1024, 600);
        let dir = tempfile::tempdir().unwrap();
        let statefile = dir.path().join("state");
        let (save, _out) = slow_save(&vm, &statefile, &["--bandwidth", "200"]);
        // SAFETY: kill on a pid we started.
        unsafe { libc::kill(vm.pid() as i32, libc::SIGKILL) };
        let out = save.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(3));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("QEMU exited during the save; nothing was kept"),
            "{err}"
        );
        assert_nothing_left(&statefile);
    }
}

#[test]
fn ctrl_c_during_a_save_cancels_it_and_resumes_the_guest() {
    for qemu in qemus() {
        let mut vm = big_guest(&qemu, 1024, 600);
        let dir = tempfile::tempdir().unwrap();
        let statefile = dir.path().join("state");
        let (save, _out) = slow_save(&vm, &statefile, &["--bandwidth", "100"]);
        // SAFETY: a signal to a process we started.
        unsafe { libc::kill(save.id() as i32, libc::SIGINT) };
        let out = save.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(4),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_nothing_left(&statefile);
        assert_eq!(vm.status(), "running");
    }
}

#[test]
fn a_second_save_of_the_same_vm_is_refused() {
    for qemu in qemus() {
        // Once the fill is written: a save of mostly zero pages would be
        // over before the second one starts.
        let vm = big_guest(&qemu, 1024, 600);
        let qmp2 = vm.qmp_path.clone();
        let states = tempfile::tempdir().unwrap();
        let (mut first, _out) =
            slow_save(&vm, &states.path().join("state1"), &["--bandwidth", "100"]);
        let out = migrate()
            .args(["save", "--monitor"])
            .arg(&qmp2)
            .arg(states.path().join("state2"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "another qemu-migrate is already saving or migrating this VM (QEMU pid {})",
                vm.pid()
            )),
            "{err}"
        );
        assert!(!states.path().join("state2").exists());
        assert!(first.wait().unwrap().success());
        assert!(states.path().join("state1").exists());
    }
}

#[test]
fn a_full_disk_fails_the_save_cleanly_and_resumes_the_guest() {
    for qemu in qemus() {
        let mnt = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(mnt.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mounting a small tmpfs needs root (CI runs as root)");
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(self.0).status();
            }
        }
        let _unmount = Unmount(mnt.path());

        let mut vm = big_guest(&qemu, 64, 32);
        let statefile = mnt.path().join("state");
        let out = migrate()
            .args(["save", "--monitor"])
            .arg(&vm.hmp)
            .arg(&statefile)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(
            err.contains(&format!(
                "{}: writing the state file: No space left on device",
                mnt.path().join("state").display()
            )),
            "{err}"
        );
        assert_nothing_left(&statefile);
        assert_eq!(vm.status(), "running");
    }
}

/// A good save of the recipe VM, for the restore checks.
fn saved(qemu: &Path, dir: &Path) -> (PathBuf, Vec<String>) {
    let options = recipe_options(dir);
    let (source, _) = Vm::start_ticking(qemu, &options);
    let statefile = dir.join("state");
    let out = migrate()
        .args(["save", "--monitor"])
        .arg(&source.hmp)
        .arg(&statefile)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (statefile, options)
}

fn restore_err(args: &[&std::ffi::OsStr]) -> String {
    let out = migrate().arg("restore").args(args).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn damaged_state_files_are_refused_before_qemu_starts() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (statefile, _) = saved(&qemu, dir.path());
        let good = std::fs::read(&statefile).unwrap();
        let manifest = dir.path().join("state.manifest.json");
        let good_manifest = std::fs::read(&manifest).unwrap();

        std::fs::write(&statefile, &good[..good.len() - 1]).unwrap();
        let err = restore_err(&[statefile.as_os_str()]);
        assert!(
            err.contains(&format!(
                "incomplete or altered: {} bytes, but the save wrote {}",
                good.len() - 1,
                good.len()
            )),
            "{err}"
        );

        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 0x40;
        std::fs::write(&statefile, &flipped).unwrap();
        assert!(restore_err(&[statefile.as_os_str()]).contains("damaged: its CRC-32 is"));

        std::fs::write(&statefile, &good).unwrap();
        std::fs::write(&manifest, b"{\"format\": \"qemu-migrate/1\", \"qemu\": ").unwrap();
        assert!(restore_err(&[statefile.as_os_str()]).contains("the manifest is damaged"));
        std::fs::write(&manifest, &good_manifest).unwrap();

        // A bare file cut short (the recipe's own kind) is caught by reading the stream.
        std::fs::remove_file(&manifest).unwrap();
        std::fs::write(&statefile, &good[..good.len() / 2]).unwrap();
        let err = restore_err(&[
            statefile.as_os_str(),
            "--".as_ref(),
            "-m".as_ref(),
            "32".as_ref(),
        ]);
        assert!(err.contains("not a complete migration stream"), "{err}");

        std::fs::remove_file(&statefile).unwrap();
        std::fs::write(dir.path().join("state.partial"), b"QEVM").unwrap();
        assert!(restore_err(&[statefile.as_os_str()]).contains("the save did not finish"));
    }
}

#[test]
fn mismatched_options_are_refused_in_words() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (statefile, options) = saved(&qemu, dir.path());
        let with = |edit: &dyn Fn(&mut Vec<String>)| {
            let mut o = options.clone();
            edit(&mut o);
            let mut args: Vec<std::ffi::OsString> = vec![
                statefile.clone().into(),
                "--qemu".into(),
                qemu.clone().into(),
                "--".into(),
            ];
            args.extend(o.into_iter().map(Into::into));
            let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            restore_err(&refs)
        };
        let err = with(&|o| {
            let i = o.iter().position(|a| a == "-m").unwrap();
            o[i + 1] = "64".into();
        });
        assert!(
            err.contains(
                "RAM: the state holds 32 MiB of guest RAM (-m 32); these options give 64 MiB"
            ),
            "{err}"
        );
        let err = with(&|o| o.extend(["-M".into(), "q35".into()]));
        assert!(
            err.contains("machine type: the state is pc-i440fx-"),
            "{err}"
        );
        assert!(err.contains("these options give pc-q35-"), "{err}");
        let err = with(&|o| o.extend(["-device".into(), "virtio-rng-pci".into()]));
        assert!(
            err.contains("device 0000:00:02.0/virtio-rng (instance 0) is created by these options but is not in the state"),
            "{err}"
        );

        // A device only on the source: QEMU itself would say "Unknown savevm section".
        let dir = tempfile::tempdir().unwrap();
        let mut options = recipe_options(dir.path());
        options.extend(["-device".into(), "virtio-rng-pci".into()]);
        let (source, _) = Vm::start_ticking(&qemu, &options);
        let statefile = dir.path().join("state");
        let out = migrate()
            .args(["save", "--monitor"])
            .arg(&source.hmp)
            .arg(&statefile)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        options.truncate(options.len() - 2);
        let mut args: Vec<std::ffi::OsString> = vec![
            statefile.into(),
            "--qemu".into(),
            qemu.clone().into(),
            "--".into(),
        ];
        args.extend(options.into_iter().map(Into::into));
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let err = restore_err(&refs);
        assert!(
            err.contains("device 0000:00:02.0/virtio-rng (instance 0) is in the state, but these options do not create it"),
            "{err}"
        );
    }
}

#[test]
fn a_vm_already_migrated_and_a_socket_that_is_not_qemu_are_clear_errors() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let options = recipe_options(dir.path());
        let (source, _) = Vm::start_ticking(&qemu, &options);
        let first = migrate()
            .args(["save", "--monitor"])
            .arg(&source.hmp)
            .arg(dir.path().join("a"))
            .output()
            .unwrap();
        assert!(first.status.success());
        let again = migrate()
            .args(["save", "--monitor"])
            .arg(&source.hmp)
            .arg(dir.path().join("b"))
            .output()
            .unwrap();
        assert_eq!(again.status.code(), Some(2));
        let err = String::from_utf8_lossy(&again.stderr);
        assert!(
            err.contains("is paused after a previous migration (postmigrate)"),
            "{err}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("not-qemu");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
        let _ = std::io::Read::read(&mut s, &mut [0u8; 16]);
    });
    let out = migrate()
        .args(["save", "--monitor"])
        .arg(&sock)
        .arg(dir.path().join("s"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a QEMU monitor: it greeted with \"SSH-2.0"),
        "{err}"
    );
}

#[test]
fn a_save_puts_qemus_own_settings_back_and_resumes_when_asked() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let options = recipe_options(dir.path());
        let (mut vm, serial) = Vm::start_ticking(&qemu, &options);
        let before =
            vm.qmp().execute("query-migrate-parameters", None).unwrap()["max-bandwidth"].clone();
        let out = migrate()
            .args(["save", "--then", "resume", "--monitor"])
            .arg(&vm.hmp)
            .arg(dir.path().join("state"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after =
            vm.qmp().execute("query-migrate-parameters", None).unwrap()["max-bandwidth"].clone();
        assert_eq!(after, before, "the bandwidth cap is QEMU's again");
        assert_eq!(vm.status(), "running");
        let n = serial.snapshot().len();
        serial.wait_for(n, WAIT, "a tick after the save", |l| tick(l).is_some());
    }
}

#[test]
fn a_qemu_older_than_the_saving_one_is_refused_before_it_starts() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (statefile, _) = saved(&qemu, dir.path());
        // As if a newer QEMU had saved it.
        let manifest = dir.path().join("state.manifest.json");
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        m["qemu_version"] = "99.0.0".into();
        std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        let err = restore_err(&[statefile.as_os_str()]);
        assert!(
            err.contains("is older than QEMU 99.0.0 that saved it"),
            "{err}"
        );
    }
}

#[test]
fn a_save_killed_mid_stream_resumes_the_guest_and_puts_qemus_settings_back() {
    for qemu in qemus() {
        let mut vm = big_guest(&qemu, 1024, 600);
        let bandwidth = |vm: &mut Vm| {
            vm.qmp().execute("query-migrate-parameters", None).unwrap()["max-bandwidth"].clone()
        };
        let before = bandwidth(&mut vm);
        let dir = tempfile::tempdir().unwrap();
        let statefile = dir.path().join("state");
        let (save, _out) = slow_save(&vm, &statefile, &["--bandwidth", "100"]);
        // SAFETY: a signal to a process we started.
        unsafe { libc::kill(save.id() as i32, libc::SIGKILL) };
        // Its stderr ends when the watchdog, which shares it, is done too.
        let out = save.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("the saving process died: the save did not finish; the guest was resumed"),
            "{err}"
        );
        assert_eq!(vm.status(), "running");
        assert_eq!(
            bandwidth(&mut vm),
            before,
            "the bandwidth cap is QEMU's again"
        );
        let migration = vm.qmp().execute("query-migrate", None).unwrap();
        assert!(
            matches!(migration["status"].as_str(), Some("cancelled" | "failed")),
            "{migration}"
        );
        let left = |dir: &Path| {
            std::fs::read_dir(dir)
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".partial")
                })
                .count()
        };
        // The watchdog removed the dead save's stream too.
        assert_eq!(left(dir.path()), 0, "the dead save's stream is gone");
        assert!(!statefile.exists());
        // The next save of the same file runs as if none had been.
        let out = migrate()
            .args(["save", "--then", "resume", "--monitor"])
            .arg(&vm.hmp)
            .arg(&statefile)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(left(dir.path()), 0);
    }
}

#[test]
fn a_restore_killed_while_loading_leaves_no_qemu_holding_the_vms_sockets() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let hmp = dir.path().join("hmp.sock");
        let guest = guest().display().to_string();
        let monitor = format!("unix:{},server,nowait", hmp.display());
        let (source, _serial) = Vm::start_ticking(
            &qemu,
            &[
                "-accel",
                "tcg",
                "-m",
                "1024",
                "-nodefaults",
                "-serial",
                "stdio",
                "-kernel",
                &guest,
                "-append",
                "fill=600",
                "-monitor",
                &monitor,
            ],
        );
        let statefile = dir.path().join("state");
        save_then_quit(&hmp, &statefile);
        // `--then quit` returns once QEMU is gone (600 MiB of guest RAM take
        // a moment to let go of): a restore started right after finds the
        // VM's sockets free.
        assert!(
            has_exited(source.pid()),
            "QEMU still runs after save --then quit"
        );
        drop(source);

        let restore = || {
            migrate()
                .args(["--json", "restore", "--daemonize", "--pidfile"])
                .arg(dir.path().join("pid"))
                .arg(&statefile)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut first = restore();
        let mut out = BufReader::new(first.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "the restore ended early"
            );
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["done"].as_u64().unwrap_or(0) > 0 {
                break;
            }
        }
        first.kill().unwrap();
        // Its stderr ends when the keeper, which shares it, is done.
        let end = first.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&end.stderr);
        assert!(
            err.contains("died before it handed over what it had started; ended qemu-system"),
            "{err}"
        );
        assert!(
            std::os::unix::net::UnixStream::connect(&hmp).is_err(),
            "nothing listens on the VM's socket any more"
        );
        // So the next restore is not refused, and it runs the guest.
        let second = restore().wait_with_output().unwrap();
        assert!(
            second.status.success(),
            "{}",
            String::from_utf8_lossy(&second.stderr)
        );
        let status = Command::new(bin("monitor-send"))
            .arg(&hmp)
            .arg("info status")
            .output()
            .unwrap();
        let pid: i32 = std::fs::read_to_string(dir.path().join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: a signal to the QEMU this test restored.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(String::from_utf8_lossy(&status.stdout).contains("running"));
    }
}

/// A VM saved, then killed, is restored at once: the killed QEMU still
/// holds the VM's sockets while its threads let go of 1 GiB of RAM, and the
/// restore waits for that rather than refusing.
#[test]
fn a_vm_killed_after_its_save_is_restored_at_once() {
    for qemu in qemus() {
        let vm = big_guest(&qemu, 1024, 600);
        let dir = tempfile::tempdir().unwrap();
        let statefile = dir.path().join("state");
        let out = migrate()
            .args(["save", "--then", "stop", "--monitor"])
            .arg(&vm.hmp)
            .arg(&statefile)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // SAFETY: a signal to the QEMU this test started.
        unsafe { libc::kill(vm.pid() as i32, libc::SIGKILL) };
        let pidfile = dir.path().join("restored.pid");
        let out = migrate()
            .args(["restore", "--daemonize", "--pidfile"])
            .arg(&pidfile)
            .arg(&statefile)
            .output()
            .unwrap();
        let restored: Option<u32> = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse().ok());
        if let Some(pid) = restored {
            // SAFETY: a signal to the QEMU this test restored.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        assert!(
            out.status.success(),
            "{}: {}",
            qemu.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(restored.is_some_and(|p| p != vm.pid()));
    }
}
