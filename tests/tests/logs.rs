//! The VM's own files when a second QEMU takes it over: a restore (and a
//! local live migration's destination) appends to the serial log the first
//! QEMU wrote instead of truncating it, and the restore pre-flight probe
//! opens none of the VM's files for writing and none of its sockets.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use recipe_tests::{guest_logged_to, log_ticks, migrate, qemus, save_then_quit, wait_log, Vm};

/// The recipe guest with its serial console in `log` instead of stdio.
fn logged_options(dir: &Path, log: &Path, extra: &[String]) -> Vec<String> {
    let payload = dir.join("hello.bin");
    std::fs::write(&payload, b"hello from the payload\n").unwrap();
    let mut o = guest_logged_to(log);
    o.extend(["-initrd".to_string(), payload.display().to_string()]);
    o.extend(extra.iter().cloned());
    o
}

#[test]
fn a_restored_vm_appends_to_the_serial_log_it_had() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut source = Vm::start(&qemu, &logged_options(dir.path(), &log, &[]));
        wait_log(&log, "tick 3 before the save", |t| t.contains(&3));
        let statefile = dir.path().join("state");
        save_then_quit(&source.hmp, &statefile);
        source.wait_exit();
        let before = std::fs::read(&log).unwrap();
        let last = *log_ticks(&log).last().unwrap();

        let pidfile = dir.path().join("pid");
        let out = migrate()
            .args(["restore", "--daemonize", "--pidfile"])
            .arg(&pidfile)
            .arg(&statefile)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_log(&log, "ticks of the restored guest", |t| {
            t.last().is_some_and(|&n| n > last + 1)
        });
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: a signal to the QEMU this test restored.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let after = std::fs::read(&log).unwrap();
        assert!(
            after.starts_with(&before),
            "the log before the save is kept, untouched"
        );
        assert!(!after.contains(&0), "no NULs (a truncation under a writer)");
        let t = log_ticks(&log);
        assert!(
            t.windows(2).all(|w| w[1] == w[0] + 1),
            "one continuous count across the restore: {t:?}"
        );
    }
}

#[test]
fn the_preflight_probe_opens_none_of_the_vms_files() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let disk = dir.path().join("disk.qcow2");
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg("16M")
            .status()
            .expect("qemu-img (package qemu-utils)");
        assert!(made.success());
        let sock = dir.path().join("extra.sock");
        let options = logged_options(
            dir.path(),
            &log,
            &[
                "-drive".into(),
                format!("file={},format=qcow2,if=virtio", disk.display()),
                "-chardev".into(),
                format!("socket,id=extra,path={},server=on,wait=off", sock.display()),
            ],
        );
        let vm = Vm::start(&qemu, &options);
        wait_log(&log, "tick 2", |t| t.contains(&2));
        let statefile = dir.path().join("state");
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
        let sock_inode = std::fs::metadata(&sock).unwrap().ino();
        let disk_mtime = std::fs::metadata(&disk).unwrap().mtime_nsec();
        let log_before = std::fs::read(&log).unwrap();

        // The VM still runs, holding its disk, log and socket; the probe
        // starts a QEMU with the same options beside it.
        let out = migrate()
            .args(["inspect", "--check", "--qemu"])
            .arg(&qemu)
            .arg(&statefile)
            .arg("--")
            .args(&options)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
        assert!(said.contains("these options can restore it"), "{said}");
        assert_eq!(
            std::fs::metadata(&sock).unwrap().ino(),
            sock_inode,
            "the VM's socket is its own"
        );
        assert_eq!(std::fs::metadata(&disk).unwrap().mtime_nsec(), disk_mtime);
        let log_after = std::fs::read(&log).unwrap();
        assert!(
            log_after.starts_with(&log_before),
            "the log was not truncated"
        );
        assert!(!log_after.contains(&0));
    }
}

/// The QEMUs a process started, leaving out its own forks (its watchdog).
fn qemu_children(pid: u32) -> Vec<u32> {
    let own = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|c| {
            let stat = std::fs::read_to_string(format!("/proc/{c}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
            ppid == Some(pid) && std::fs::read_link(format!("/proc/{c}/exe")).ok() != own
        })
        .collect()
}

#[test]
fn a_failed_local_live_migration_leaves_the_sources_log_intact() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let vm = Vm::start(&qemu, &logged_options(dir.path(), &log, &[]));
        wait_log(&log, "tick 2", |t| t.contains(&2));
        let live = recipe_tests::slow_live_midway(&vm.hmp);
        // The destination has the log open now; it dies mid-migration.
        let before = std::fs::read(&log).unwrap();
        let dest = qemu_children(live.id());
        assert_eq!(dest.len(), 1, "{dest:?}");
        // SAFETY: a signal to the destination QEMU of this test's migration.
        unsafe { libc::kill(dest[0] as i32, libc::SIGKILL) };
        let end = live.wait_with_output().unwrap();
        assert_eq!(
            end.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&end.stderr)
        );
        let last = *log_ticks(&log).last().unwrap();
        wait_log(&log, "the source ticking on", |t| {
            t.iter().any(|&n| n > last)
        });
        let after = std::fs::read(&log).unwrap();
        assert!(
            after.starts_with(&before),
            "the source's log was not truncated"
        );
        assert!(!after.contains(&0), "no NULs in the source's log");
    }
}
