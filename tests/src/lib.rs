//! Helpers for the cross-crate tests: which QEMUs to test against, starting
//! one with monitor sockets, and the project's binaries.
//!
//! The QEMUs come from `QEMU_BINARIES` (colon-separated paths; `cargo xtask
//! test` sets it to every QEMU it installed), else `qemu-system-x86_64` on
//! PATH. No QEMU is a failure, not a skip: these tests are about QEMU.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod loopfs;

/// Every QEMU the tests must pass on (see [`testkit::qemu::from_env`]).
pub fn qemus() -> Vec<PathBuf> {
    testkit::qemu::from_env()
        .into_iter()
        .map(|q| q.binary)
        .collect()
}

/// `QEMU emulator version 7.2.22 (...)` → `7.2.22`.
pub fn qemu_version(bin: &Path) -> String {
    testkit::qemu::probe(bin).map_or_else(|| "unknown".to_string(), |q| q.version.to_string())
}

/// Whether QEMU `bin` is version `major.minor` or later.
pub fn at_least(bin: &Path, major: u32, minor: u32) -> bool {
    testkit::qemu::probe(bin).is_some_and(|q| (q.version.major, q.version.minor) >= (major, minor))
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

pub use test_guest::{tick, Lines};
pub use testkit::Vm;

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

/// `qemu-migrate save --then quit --monitor HMP STATEFILE`, which must succeed
/// (its stderr is the failure message).
pub fn save_then_quit(hmp: &Path, statefile: &Path) {
    let out = Command::new(bin("qemu-migrate"))
        .args(["save", "--then", "quit", "--monitor"])
        .arg(hmp)
        .arg(statefile)
        .output()
        .expect("running qemu-migrate save");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How long the helpers below wait for a guest (a deadline, not a wait).
const WAIT: Duration = Duration::from_secs(60);

/// The `tick N` counts a guest's serial log file holds so far.
pub fn log_ticks(log: &Path) -> Vec<u64> {
    String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default())
        .lines()
        .filter_map(tick)
        .collect()
}

/// Waits, up to a minute, for the log's ticks to show what `pred` looks
/// for. A file has no event for "a line was appended": it is read again
/// every 20 ms until then.
pub fn wait_log(log: &Path, what: &str, pred: impl Fn(&[u64]) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !pred(&log_ticks(log)) {
        assert!(Instant::now() < deadline, "{what}: {:?}", log_ticks(log));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits, up to a minute, for a tick above `n` in the log.
pub fn wait_tick_above(log: &Path, n: u64) {
    wait_log(log, &format!("no tick above {n}"), |t| {
        t.iter().any(|&x| x > n)
    });
}

/// The test guest (32 MiB; it sweeps 24 MiB of its RAM without end) with
/// its console written to the file `log`.
pub fn guest_logged_to(log: &Path) -> Vec<String> {
    [
        "-accel",
        "tcg",
        "-m",
        "32",
        "-nodefaults",
        "-serial",
        &format!("file:{}", log.display()),
        "-kernel",
        &guest().display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Checks that a restored guest resumed (no banner) and ticks on from `last`.
pub fn assert_carries_on(qemu: &Path, lines: &Lines, last: u64) {
    let first = lines.wait_for(0, WAIT, "a tick after restore", |l| tick(l).is_some());
    lines.wait_for(first, WAIT, "a second tick", |l| {
        tick(l).is_some_and(|n| n > last + 1)
    });
    let seen = lines.snapshot();
    assert!(
        !seen.iter().any(|l| l.starts_with("BOOT ")),
        "{}: the restored guest booted again: {seen:?}",
        qemu.display()
    );
    let t = tick(&seen[first]).unwrap();
    assert!(
        t > last && t <= last + 2,
        "first tick {t}, last saved {last}"
    );
    assert!(!seen.iter().any(|l| l.contains("MISMATCH")), "{seen:?}");
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a QEMU or a
/// receiver to listen on).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Whether process `pid` has exited (gone, or a zombie its parent has not
/// reaped yet).
pub fn has_exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// `qemu-migrate --json live --to local` of the VM at monitor `hmp`, capped
/// at 1 MiB/s so that it cannot converge, returned once its progress says
/// RAM is moving: a live migration caught midway, for fault tests. Its
/// stdout (further progress lines) is left in the child.
pub fn slow_live_midway(hmp: &Path) -> Child {
    use std::io::{BufRead, BufReader};
    let mut live = Command::new(bin("qemu-migrate"))
        .args(["--json", "live", "--monitor"])
        .arg(hmp)
        .args(["--to", "local", "--bandwidth", "1", "--no-auto-converge"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running qemu-migrate live");
    let mut out = BufReader::new(live.stdout.take().expect("piped"));
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).expect("reading live's progress") > 0,
            "live ended early"
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["done"].as_u64().unwrap_or(0) > 0 {
            break;
        }
    }
    // The rest of its progress is not read: it stays in the pipe's buffer.
    live.stdout = Some(out.into_inner());
    live
}

/// The `qemu-migrate` binary, as a command to give arguments to.
pub fn migrate() -> Command {
    Command::new(bin("qemu-migrate"))
}

/// A fresh pre-shared key file for `--tls-psk` in `dir` (`key.psk`, mode
/// 600, the hex key alone), as both hosts of a migration would hold it.
pub fn key_file(dir: &Path) -> PathBuf {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .expect("reading /dev/urandom");
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join("key.psk");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .expect("creating the key file");
    std::io::Write::write_all(&mut f, format!("{hex}\n").as_bytes()).expect("writing the key");
    path
}

/// `qemu-migrate restore --daemonize --pidfile STATEFILE.pid-beside EXTRA
/// STATEFILE`: its output, and the restored QEMU's pid where one started.
pub fn restore_daemonized(statefile: &Path, extra: &[&str]) -> (std::process::Output, Option<i32>) {
    let pidfile = statefile.with_file_name("restored.pid");
    let _ = std::fs::remove_file(&pidfile);
    let out = migrate()
        .args(["restore", "--daemonize", "--pidfile"])
        .arg(&pidfile)
        .args(extra)
        .arg(statefile)
        .output()
        .expect("running qemu-migrate restore");
    let pid = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|p| p.trim().parse().ok());
    (out, pid)
}

/// `quit` through the human monitor at `sock` (monitor-send), which must
/// succeed.
pub fn monitor_quit(sock: &Path) {
    let out = Command::new(bin("monitor-send"))
        .arg(sock)
        .arg("quit")
        .output()
        .expect("running monitor-send");
    assert!(
        out.status.success(),
        "quit through {}: {}",
        sock.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Ends the QEMU with pid `.0` when dropped (a test that fails midway
/// leaves no restored VM behind), if it still runs QEMU.
#[derive(Debug)]
pub struct EndOnDrop(pub Option<i32>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        let Some(pid) = self.0 else { return };
        let is_qemu = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-system"));
        if is_qemu {
            // SAFETY: a signal to a QEMU the test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
