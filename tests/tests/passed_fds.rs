//! VMs as launchers start them: libvirt and podman hand QEMU file
//! descriptors (`-chardev socket,fd=N`, `-add-fd`), not paths. A save reads
//! what each descriptor is while the VM runs; a named one comes back by its
//! name after a restore, and one with no name is refused before anything
//! irreversible (`--then quit`), recorded by a save that keeps the VM, and
//! asked for by the restore (`--replace`) before any QEMU starts.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use recipe_tests::{bin, guest_logged_to, has_exited, log_ticks, qemus, wait_tick_above};

/// A QEMU started with descriptors of the test's at fixed numbers, killed
/// when the test ends.
struct Launched(Child);

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `qemu args...` with each `(fd, number)` open as that number, as a
/// launcher passes them.
fn launch(qemu: &Path, args: &[String], fds: &[(&OwnedFd, i32)]) -> Launched {
    let pairs: Vec<(i32, i32)> = fds.iter().map(|(f, n)| (f.as_raw_fd(), *n)).collect();
    let mut cmd = Command::new(qemu);
    cmd.args(args)
        .args(["-display", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: dup2 and fcntl are async-signal-safe; the numbers are free in the child
    // (above its standard streams), and dup2 clears close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            for &(from, to) in &pairs {
                // dup2 onto itself would leave close-on-exec set.
                if from == to {
                    libc::fcntl(to, libc::F_SETFD, 0);
                } else if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Launched(cmd.spawn().expect("starting QEMU"))
}

fn migrate(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(bin("qemu-migrate"))
        .args(args)
        .output()
        .expect("running qemu-migrate")
}

fn said(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What the monitor at `sock` says of the run state (HMP or QMP).
fn status(sock: &Path, qmp: bool) -> String {
    let mut cmd = Command::new(bin("monitor-send"));
    if qmp {
        cmd.arg("--json")
            .arg(sock)
            .arg(r#"{"execute":"query-status"}"#);
    } else {
        cmd.arg(sock).arg("info status");
    }
    let out = cmd.output().expect("running monitor-send");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kill_pidfile(pidfile: &Path) {
    if let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    {
        // SAFETY: a signal to the QEMU this test restored.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn boots(log: &Path) -> usize {
    String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default())
        .lines()
        .filter(|l| l.starts_with("BOOT "))
        .count()
}

/// libvirt's monitor: a listening socket it made, passed as a descriptor.
#[test]
fn a_monitor_passed_as_a_descriptor_answers_at_its_path_after_a_restore() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("monitor.sock");
        let listener: OwnedFd = std::os::unix::net::UnixListener::bind(&sock)
            .unwrap()
            .into();
        let log = dir.path().join("serial.log");
        let mut args = guest_logged_to(&log);
        args.extend(
            [
                "-chardev",
                "socket,id=charmonitor,fd=3,server=on,wait=off",
                "-mon",
                "chardev=charmonitor,id=monitor,mode=control",
            ]
            .map(String::from),
        );
        let vm = launch(&qemu, &args, &[(&listener, 3)]);
        drop(listener);
        wait_tick_above(&log, 1);

        let statefile = dir.path().join("state");
        let out = migrate(&[
            "save".as_ref(),
            "--then".as_ref(),
            "quit".as_ref(),
            "--monitor".as_ref(),
            sock.as_os_str(),
            statefile.as_os_str(),
        ]);
        assert!(out.status.success(), "{}: {}", qemu.display(), said(&out));
        let last = *log_ticks(&log).last().unwrap();
        let manifest = std::fs::read_to_string(dir.path().join("state.manifest.json")).unwrap();
        assert!(
            !manifest.contains("fd=3") && manifest.contains(&format!("path={}", sock.display())),
            "{manifest}"
        );
        drop(vm);

        let pidfile = dir.path().join("restored.pid");
        let out = migrate(&[
            "restore".as_ref(),
            "--daemonize".as_ref(),
            "--pidfile".as_ref(),
            pidfile.as_os_str(),
            statefile.as_os_str(),
        ]);
        let answer = status(&sock, true);
        wait_tick_above(&log, last + 1);
        kill_pidfile(&pidfile);
        assert!(out.status.success(), "{}: {}", qemu.display(), said(&out));
        assert!(
            answer.contains(r#""running""#),
            "{}: {answer}",
            qemu.display()
        );
        assert_eq!(boots(&log), 1, "{}: the guest booted again", qemu.display());
    }
}

/// A descriptor with no name (one end of a socket pair): nothing
/// irreversible happens until the user supplies what replaces it.
#[test]
fn a_descriptor_with_no_name_is_refused_before_the_vm_is_lost_and_replaced_at_restore() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let theirs: OwnedFd = theirs.into();
        let log = dir.path().join("serial.log");
        let hmp = dir.path().join("hmp.sock");
        let mut args = guest_logged_to(&log);
        args.extend(
            [
                "-chardev".to_string(),
                "socket,id=peer,fd=4".to_string(),
                "-monitor".to_string(),
                format!("unix:{},server,nowait", hmp.display()),
            ]
            .iter()
            .cloned(),
        );
        let mut vm = launch(&qemu, &args, &[(&theirs, 4)]);
        drop(theirs);
        wait_tick_above(&log, 1);
        let statefile = dir.path().join("state");

        let out = migrate(&[
            "save".as_ref(),
            "--then".as_ref(),
            "quit".as_ref(),
            "--monitor".as_ref(),
            hmp.as_os_str(),
            statefile.as_os_str(),
        ]);
        assert!(!out.status.success(), "{}", qemu.display());
        let err = said(&out);
        assert!(
            err.contains("socket,id=peer,fd=4") && err.contains("--replace"),
            "{}: {err}",
            qemu.display()
        );
        assert!(!statefile.exists());
        assert!(
            status(&hmp, false).contains("running"),
            "{}",
            qemu.display()
        );

        let out = migrate(&[
            "save".as_ref(),
            "--then".as_ref(),
            "stop".as_ref(),
            "--monitor".as_ref(),
            hmp.as_os_str(),
            statefile.as_os_str(),
        ]);
        assert!(out.status.success(), "{}: {}", qemu.display(), said(&out));
        assert!(said(&out).contains("--replace"), "{}", said(&out));
        let _ = Command::new(bin("monitor-send"))
            .arg(&hmp)
            .arg("quit")
            .output();
        let _ = vm.0.wait();
        assert!(has_exited(vm.0.id()));
        drop(ours);
        let last = *log_ticks(&log).last().unwrap();

        let out = migrate(&[
            "restore".as_ref(),
            "--daemonize".as_ref(),
            statefile.as_os_str(),
        ]);
        assert!(!out.status.success(), "{}", qemu.display());
        let err = said(&out);
        assert!(
            err.contains("refusing the restore") && err.contains("fd=4"),
            "{}: {err}",
            qemu.display()
        );
        assert!(
            std::os::unix::net::UnixStream::connect(&hmp).is_err(),
            "{}: a QEMU was started although the restore was refused",
            qemu.display()
        );

        let peer = dir.path().join("peer.sock");
        let pidfile = dir.path().join("restored.pid");
        let out = migrate(&[
            "restore".as_ref(),
            "--daemonize".as_ref(),
            "--pidfile".as_ref(),
            pidfile.as_os_str(),
            "--replace".as_ref(),
            "fd=4".as_ref(),
            format!("path={},server=on,wait=off", peer.display()).as_ref(),
            statefile.as_os_str(),
        ]);
        let answer = status(&hmp, false);
        if out.status.success() {
            wait_tick_above(&log, last + 1);
        }
        kill_pidfile(&pidfile);
        assert!(out.status.success(), "{}: {}", qemu.display(), said(&out));
        assert!(answer.contains("running"), "{}: {answer}", qemu.display());
        assert_eq!(boots(&log), 1, "{}: the guest booted again", qemu.display());
    }
}
