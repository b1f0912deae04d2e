//! No orphans: a QEMU that a run starts ends with it until the run hands it
//! over, whatever ends the run. `restore` is killed (SIGKILL, injected by
//! strace on a system call of each step) before QEMU is forked, while it
//! starts, while it waits for the stream, as it loads, once loaded, just
//! before the guest resumes and as QEMU is handed over: afterwards no process of that run is left (found by
//! the test's own directory in `/proc/*/cmdline`), a line on stderr says
//! what was ended, the next restore works, and it leaves neither the dead
//! runs' private directories nor their lock files. A QEMU left paused in
//! `inmigrate` by an older version is named with its pid and how to end
//! it. A `revert` killed as it stops the old VM, as it ends it, or as the
//! new QEMU starts leaves the VM running from the checkpoint.
//!
//! Each run gets `TMPDIR` and `XDG_RUNTIME_DIR` of the test's own, so what
//! it leaves there is the test's to see.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use recipe_tests::{bin, migrate, qemus, recipe_options, save_then_quit, Vm};

const WAIT: Duration = Duration::from_secs(60);

/// A test's directory and the private ones its runs use.
struct Place {
    dir: tempfile::TempDir,
}

impl Place {
    fn new() -> Place {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        Place { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `cmd` with this place's temporary and runtime directories.
    fn env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env("TMPDIR", self.path().join("tmp"))
            .env("XDG_RUNTIME_DIR", self.path().join("run"))
            .stdin(Stdio::null())
    }

    /// What runs left in the temporary directory and the lock directory.
    fn leftovers(&self) -> Vec<String> {
        let list = |d: PathBuf| -> Vec<String> {
            std::fs::read_dir(&d)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().display().to_string())
                .collect()
        };
        let mut out = list(self.path().join("tmp"));
        out.extend(list(self.path().join("run/qemu-migrate")));
        out
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The processes whose command line names `dir` (this test's QEMUs and
/// runs), but this one.
fn processes_of(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.display().to_string();
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (pid != me && cmdline.contains(&needle) && !recipe_tests::has_exited(pid))
                .then_some((pid, cmdline))
        })
        .collect()
}

/// Waits until no process names `dir`; panics with those left at the deadline.
fn wait_none_left(dir: &Path, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = processes_of(dir);
        let Some((pid, _)) = left.first() else {
            return;
        };
        let now = Instant::now();
        assert!(now < deadline, "{what}: processes left: {left:#?}");
        testkit::wait_gone(*pid, deadline - now);
    }
}

/// A VM of the test guest saved (`save --then quit`) in `place`, with
/// `extra` options.
fn saved(qemu: &Path, place: &Place, extra: &[String]) -> (PathBuf, Vm) {
    let mut options = recipe_options(place.path());
    options.extend(extra.iter().cloned());
    let (mut source, _) = Vm::start_ticking(qemu, &options);
    let statefile = place.path().join("state");
    save_then_quit(&source.hmp, &statefile);
    source.wait_exit();
    (statefile, source)
}

/// `args` of qemu-migrate run under strace, which kills it (SIGKILL) on
/// entering the `when`-th call of `syscall` in its main thread.
fn killed_at(place: &Place, syscall: &str, when: u32, args: &[&std::ffi::OsStr]) -> Output {
    let mut cmd = Command::new("strace");
    cmd.args(["-qq", "-o", "/dev/null", "-e"])
        .arg(format!("trace={syscall}"))
        .arg("-e")
        .arg(format!("inject={syscall}:signal=KILL:when={when}"))
        .arg("--")
        .arg(bin("qemu-migrate"))
        .args(args);
    place.env(&mut cmd).output().expect("running strace")
}

fn kill_and_wait(pid: u32) {
    // SAFETY: a signal to a QEMU this test restored.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    testkit::wait_gone(pid, WAIT);
}

fn pid_in(pidfile: &Path) -> Option<u32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// The steps of a restore's main thread, as the system call that begins
/// each: forking QEMU (the first fork is the keeper's), waiting for QEMU to
/// connect to its monitor, passing it the stream's pipe, and then its QMP
/// commands (`qmp_capabilities` and `migrate-set-capabilities` come
/// first): `migrate-incoming` (the load begins), `query-status` (loaded),
/// `cont` (the guest resumes), and the message that hands QEMU over.
const RESTORE_STEPS: &[(&str, u32, &str, bool)] = &[
    ("clone", 2, "before QEMU is forked", false),
    ("accept4", 1, "while QEMU starts", true),
    ("sendmsg", 1, "while QEMU waits for the stream", true),
    ("sendto", 3, "as the load begins", true),
    ("sendto", 4, "once the state is loaded", true),
    ("sendto", 5, "just before the guest resumes", true),
    ("sendto", 6, "as QEMU is handed over", true),
];

#[test]
fn a_restore_killed_at_any_step_leaves_no_qemu_and_the_next_restore_works() {
    for qemu in qemus() {
        let place = Place::new();
        let (statefile, _source) = saved(&qemu, &place, &[]);
        let pidfile = place.path().join("restored.pid");
        for &(syscall, when, step, started) in RESTORE_STEPS {
            let what = format!("{} killed {step}", qemu.display());
            let out = killed_at(
                &place,
                syscall,
                when,
                &[
                    "restore".as_ref(),
                    "--daemonize".as_ref(),
                    "--pidfile".as_ref(),
                    pidfile.as_os_str(),
                    statefile.as_os_str(),
                ],
            );
            let err = stderr(&out);
            assert!(
                !out.status.success(),
                "{what}: the restore was not killed: {err}"
            );
            assert!(!pidfile.exists(), "{what}: a pidfile was written");
            wait_none_left(place.path(), &what);
            if started {
                assert!(
                    err.contains(
                        "died before it handed over what it had started; ended qemu-system"
                    ),
                    "{what}: {err}"
                );
            }
        }
        let out = place
            .env(migrate().args(["restore", "--daemonize", "--pidfile"]))
            .arg(&pidfile)
            .arg(&statefile)
            .output()
            .unwrap();
        assert!(out.status.success(), "the next restore: {}", stderr(&out));
        let pid = pid_in(&pidfile).expect("the restored QEMU's pid");
        assert!(!recipe_tests::has_exited(pid));
        assert_eq!(
            place.leftovers(),
            Vec::<String>::new(),
            "the dead runs' private directories and locks are swept"
        );
        kill_and_wait(pid);
    }
}

#[test]
fn a_dead_runs_private_directory_is_swept_and_a_live_ones_kept() {
    for qemu in qemus() {
        let place = Place::new();
        let (statefile, _source) = saved(&qemu, &place, &[]);
        // A dead run's directory: its lock file is free.
        let dead = place.path().join("tmp/qemu-migrate-qmp-dead");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join(".run.lock"), b"").unwrap();
        // A restore in the foreground is a live run while its VM runs.
        let mut first = place
            .env(migrate().arg("restore").arg(&statefile))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        let live_dir = loop {
            let found = std::fs::read_dir(place.path().join("tmp"))
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p != &dead
                        && p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("qemu-migrate-qmp-"))
                });
            if let Some(d) = found {
                break d;
            }
            assert!(
                Instant::now() < deadline,
                "the restore made no private directory"
            );
            std::thread::yield_now();
        };
        assert!(!dead.exists(), "the restore swept the dead run's directory");
        assert!(live_dir.join(".run.lock").exists());
        // A signal to the restore in the foreground is passed on to QEMU.
        // SAFETY: a signal to the restore this test started.
        unsafe { libc::kill(first.id() as libc::pid_t, libc::SIGTERM) };
        let _ = first.wait();
        wait_none_left(place.path(), "after the foreground restore");
        assert!(!live_dir.exists(), "removed when its run ended");
    }
}

#[test]
fn a_qemu_left_paused_in_inmigrate_is_named_with_how_to_end_it() {
    for qemu in qemus() {
        let place = Place::new();
        let (statefile, source) = saved(&qemu, &place, &[]);
        // What an older version left when killed while QEMU started: a
        // QEMU waiting for the stream, its QMP socket in a private directory
        // of ours, holding the VM's monitor socket.
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(place.path().join("state.manifest.json")).unwrap(),
        )
        .unwrap();
        let mut args: Vec<String> = manifest["vm_options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let private = place.path().join("tmp/qemu-migrate-qmp-older");
        std::fs::create_dir(&private).unwrap();
        args.extend([
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            format!("unix:{},server,nowait", source.hmp.display()),
            "-qmp".into(),
            format!("unix:{},server,nowait", private.join("qmp.sock").display()),
            "-incoming".into(),
            "defer".into(),
        ]);
        let binary = manifest["qemu"].as_str().unwrap();
        let mut left = Command::new(binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(&source.hmp).is_err() {
            assert!(
                Instant::now() < deadline,
                "the leftover QEMU did not listen"
            );
            std::thread::yield_now();
        }
        let out = place
            .env(migrate().args(["restore", "--daemonize"]))
            .arg(&statefile)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        let pid = left.id();
        for words in [
            format!("still held by process {pid}"),
            "paused waiting for an incoming migration".to_string(),
            "died before the VM was loaded".to_string(),
            format!("`kill {pid}`"),
        ] {
            assert!(err.contains(&words), "expected {words:?} in: {err}");
        }
        let _ = left.kill();
        let _ = left.wait();
        let pidfile = place.path().join("restored.pid");
        let out = place
            .env(migrate().args(["restore", "--daemonize", "--pidfile"]))
            .arg(&pidfile)
            .arg(&statefile)
            .output()
            .unwrap();
        assert!(out.status.success(), "once ended: {}", stderr(&out));
        kill_and_wait(pid_in(&pidfile).unwrap());
    }
}

#[test]
fn a_local_live_migration_killed_as_its_destination_starts_leaves_no_destination() {
    for qemu in qemus() {
        let place = Place::new();
        let (mut vm, _) = Vm::start_ticking(&qemu, &recipe_options(place.path()));
        let source = vm.pid();
        // Killed as the destination QEMU starts, before the migration's own
        // watchdog exists: only the keeper can end it.
        let out = killed_at(
            &place,
            "accept4",
            1,
            &[
                "live".as_ref(),
                "--monitor".as_ref(),
                vm.hmp.as_os_str(),
                "--to".as_ref(),
                "local".as_ref(),
            ],
        );
        let err = stderr(&out);
        assert!(!out.status.success(), "{err}");
        wait_only_left(
            place.path(),
            source,
            "live killed as its destination starts",
        );
        assert!(
            err.contains("died before it handed over what it had started; ended qemu-system"),
            "{err}"
        );
        assert!(
            status(&vm.hmp).contains("running"),
            "the source runs on: {err}"
        );
        kill_and_wait(source);
        vm.wait_exit();
    }
}

/// Asks the VM at `hmp` for its run state.
fn status(hmp: &Path) -> String {
    let options = qemu_monitor::Options {
        timeout: Duration::from_secs(30),
        wait_socket: Some(Duration::from_secs(30)),
        mux_escape: false,
    };
    let mut m = qemu_monitor::connect(hmp.to_path_buf(), &options).expect("monitor");
    m.human_command("info status").expect("info status")
}

/// The steps of a revert's main thread once its checks passed, as the
/// system call that begins each: the old VM's `stop` and `quit` (the
/// fourth and fifth `sendto`, after `info block` and the two messages that
/// leave the old VM and the way back with the keeper), and the new QEMU's
/// start.
const REVERT_STEPS: &[(&str, u32, &str)] = &[
    ("sendto", 4, "as it stops the old VM"),
    ("sendto", 5, "as it ends the old VM"),
    ("accept4", 1, "as the new QEMU starts"),
];

/// Waits until the only process naming `dir` is `pid`.
fn wait_only_left(dir: &Path, pid: u32, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left: Vec<(u32, String)> = processes_of(dir)
            .into_iter()
            .filter(|(p, _)| *p != pid)
            .collect();
        let Some((other, _)) = left.first() else {
            return;
        };
        let now = Instant::now();
        assert!(now < deadline, "{what}: processes left: {left:#?}");
        testkit::wait_gone(*other, deadline - now);
    }
}

#[test]
fn a_revert_killed_at_any_step_leaves_the_vm_running_from_the_checkpoint() {
    for qemu in qemus() {
        let place = Place::new();
        let disk = place.path().join("disk.raw");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let mut options = recipe_options(place.path());
        options.extend([
            "-drive".to_string(),
            format!("file={},format=raw,if=virtio", disk.display()),
        ]);
        let (mut vm, _) = Vm::start_ticking(&qemu, &options);
        let statefile = place.path().join("checkpoint");
        let out = place
            .env(migrate().args(["checkpoint", "--monitor"]))
            .arg(&vm.hmp)
            .arg(&statefile)
            .output()
            .unwrap();
        assert!(out.status.success(), "checkpoint: {}", stderr(&out));
        let pidfile = place.path().join("reverted.pid");
        let mut old = vm.pid();
        for &(syscall, when, step) in REVERT_STEPS {
            let what = format!("{} revert killed {step}", qemu.display());
            let _ = std::fs::remove_file(&pidfile);
            let out = killed_at(
                &place,
                syscall,
                when,
                &[
                    "revert".as_ref(),
                    "--monitor".as_ref(),
                    vm.hmp.as_os_str(),
                    "--daemonize".as_ref(),
                    "--pidfile".as_ref(),
                    pidfile.as_os_str(),
                    statefile.as_os_str(),
                ],
            );
            let err = stderr(&out);
            assert!(
                recipe_tests::has_exited(old),
                "{what}: the old VM was ended: {err}"
            );
            assert!(err.contains("putting things right"), "{what}: {err}");
            let pid =
                pid_in(&pidfile).unwrap_or_else(|| panic!("{what}: no VM was brought back: {err}"));
            assert_ne!(pid, old);
            wait_only_left(place.path(), pid, &what);
            assert!(status(&vm.hmp).contains("running"), "{what}: {err}");
            old = pid;
        }
        kill_and_wait(old);
        vm.wait_exit();
    }
}
