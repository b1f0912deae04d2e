//! Helpers for the cross-crate tests: which QEMUs to test against, starting
//! one with monitor sockets, and the project's binaries.
//!
//! The QEMUs come from `QEMU_BINARIES` (colon-separated paths; `cargo xtask
//! test` sets it to every QEMU it installed), else `qemu-system-x86_64` on
//! PATH. No QEMU is a failure, not a skip: these tests are about QEMU.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qemu_monitor::{Options, QmpSession};
use tempfile::TempDir;

/// Every QEMU the tests must pass on.
pub fn qemus() -> Vec<PathBuf> {
    let list: Vec<PathBuf> = match std::env::var("QEMU_BINARIES") {
        Ok(v) if !v.trim().is_empty() => v
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect(),
        _ => vec![PathBuf::from("qemu-system-x86_64")],
    };
    for q in &list {
        let ok = Command::new(q)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "QEMU {} does not run: install it (.ci/install-deps) or set QEMU_BINARIES",
            q.display()
        );
    }
    list
}

/// `QEMU emulator version 7.2.22 (...)` → `7.2.22`.
pub fn qemu_version(bin: &Path) -> String {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .expect("qemu --version");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(3)
        .unwrap_or("unknown")
        .to_string()
}

/// A path to one of the workspace's binaries. Cargo builds another
/// package's binaries for its own tests only, so `cargo xtask test` builds
/// them first (`cargo build --workspace --bins`).
pub fn bin(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("a target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// A directory with `nc`, `netcat` and `socat` as links to monitor-send,
/// to put first on PATH so a recipe runs unchanged.
pub fn drop_in_dir() -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = bin("monitor-send");
    for name in ["nc", "netcat", "socat"] {
        std::os::unix::fs::symlink(&target, dir.path().join(name)).expect("symlink");
    }
    dir
}

/// PATH with `dir` in front.
pub fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A running QEMU with an HMP socket (`hmp`) and a QMP socket (`qmp`).
#[derive(Debug)]
pub struct Vm {
    child: Child,
    pub dir: TempDir,
    pub hmp: PathBuf,
    pub qmp_path: PathBuf,
    qmp: Option<QmpSession>,
}

impl Vm {
    /// A monitor-only QEMU: starts in milliseconds.
    pub fn none(qemu: &Path) -> Vm {
        Vm::start(qemu, &["-M", "none"])
    }

    /// QEMU with `args` plus `-display none`, the two monitor sockets, and stderr kept in `dir`.
    pub fn start<S: AsRef<std::ffi::OsStr>>(qemu: &Path, args: &[S]) -> Vm {
        let dir = tempfile::tempdir().expect("tempdir");
        Vm::start_in(qemu, args, dir)
    }

    pub fn start_in<S: AsRef<std::ffi::OsStr>>(qemu: &Path, args: &[S], dir: TempDir) -> Vm {
        Vm::spawn(qemu, args, dir, Stdio::null()).0
    }

    /// Like [`Vm::start`] for a guest with `-serial stdio`: its output lines too.
    pub fn start_with_serial<S: AsRef<std::ffi::OsStr>>(qemu: &Path, args: &[S]) -> (Vm, Lines) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vm, out) = Vm::spawn(qemu, args, dir, Stdio::piped());
        (vm, Lines::collect(out.expect("piped stdout")))
    }

    /// Like [`Vm::start_with_serial`] for a guest that ticks: returns once it
    /// has printed `tick 1` (after a `fill=`, the fill is done by then).
    pub fn start_ticking<S: AsRef<std::ffi::OsStr>>(qemu: &Path, args: &[S]) -> (Vm, Lines) {
        let (vm, serial) = Vm::start_with_serial(qemu, args);
        serial.wait_for(0, Duration::from_secs(120), "tick 1", |l| {
            tick(l) == Some(1)
        });
        (vm, serial)
    }

    fn spawn<S: AsRef<std::ffi::OsStr>>(
        qemu: &Path,
        args: &[S],
        dir: TempDir,
        stdout: Stdio,
    ) -> (Vm, Option<std::process::ChildStdout>) {
        let hmp = dir.path().join("hmp.sock");
        let qmp_path = dir.path().join("qmp.sock");
        let stderr = std::fs::File::create(dir.path().join("qemu.stderr")).expect("stderr file");
        let child = Command::new(qemu)
            .args(args)
            .args(["-display", "none"])
            .arg("-monitor")
            .arg(format!("unix:{},server,nowait", hmp.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server,nowait", qmp_path.display()))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", qemu.display()));
        let mut child = child;
        let out = child.stdout.take();
        let mut vm = Vm {
            child,
            dir,
            hmp,
            qmp_path,
            qmp: None,
        };
        let options = Options {
            timeout: Duration::from_secs(20),
            wait_socket: Some(Duration::from_secs(20)),
        };
        match qemu_monitor::connect_qmp(vm.qmp_path.clone(), &options) {
            Ok(s) => vm.qmp = Some(s),
            Err(e) => panic!("{e}; QEMU said: {}", vm.stderr()),
        }
        (vm, out)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The test's own QMP session (QEMU serves one client per socket).
    pub fn qmp(&mut self) -> &mut QmpSession {
        self.qmp.as_mut().expect("QMP session")
    }

    /// `query-status`'s status: `running`, `paused`, `postmigrate`, ...
    pub fn status(&mut self) -> String {
        let r = self
            .qmp()
            .execute("query-status", None)
            .expect("query-status");
        r["status"].as_str().unwrap_or_default().to_string()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.stderr")).unwrap_or_default()
    }

    /// Waits for a QMP event by name (with `migrate-set-capabilities events` on
    /// for migration events).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> serde_json::Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let e = self
                .qmp()
                .next_event(left)
                .unwrap_or_else(|e| panic!("waiting for event {name}: {e}"));
            if e.name == name {
                return e.data;
            }
        }
    }

    /// Waits until QEMU exits by itself and returns its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.qmp = None;
        self.child.wait().expect("wait")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    /// Turns on migration events, so that completion can be waited for.
    pub fn enable_migration_events(&mut self) {
        self.qmp()
            .execute(
                "migrate-set-capabilities",
                Some(
                    serde_json::json!({"capabilities": [{"capability": "events", "state": true}]}),
                ),
            )
            .expect("migrate-set-capabilities events");
    }

    /// Waits for the `MIGRATION` event with a final status and returns it.
    pub fn wait_migration_end(&mut self, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let data = self.wait_event("MIGRATION", left);
            let status = data["status"].as_str().unwrap_or_default().to_string();
            if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
                return status;
            }
        }
    }

    /// Waits until an incoming migration has finished and the guest runs.
    pub fn wait_running(&mut self, timeout: Duration) {
        if self.status() == "running" {
            return;
        }
        // RESUME follows the status query if the guest was not yet running;
        // the session was open before the query, so it cannot be missed.
        self.wait_event("RESUME", timeout);
    }
}

pub use test_guest::{tick, Lines};

/// The user's recipe options (TCG instead of KVM) booting the test guest
/// with a payload written into `dir`, as the recipe boots IncludeOS.
pub fn recipe_options(dir: &Path) -> Vec<String> {
    let payload = dir.join("hello.bin");
    std::fs::write(&payload, b"hello from the payload\n").expect("payload");
    [
        "-accel",
        "tcg",
        "-m",
        "32",
        "-nodefaults",
        "-serial",
        "stdio",
        "-kernel",
        &guest().display().to_string(),
        "-append",
        "-initrd hello.bin",
        "-initrd",
        &payload.display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Starts `cmd` with its stdout collected line by line (a restore in the
/// foreground prints the VM's serial console there).
pub fn spawn_lines(cmd: &mut Command) -> (Child, Lines) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let lines = Lines::collect(child.stdout.take().expect("piped"));
    (child, lines)
}

/// The test guest, built once per test run.
pub fn guest() -> PathBuf {
    static GUEST: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    GUEST
        .get_or_init(|| {
            let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest");
            test_guest::build(&out).unwrap_or_else(|e| panic!("{e}"))
        })
        .clone()
}
