//! VMs as launchers start them: every command line of
//! `fixtures/launchers/corpus.toml` (libvirt, podman, lima, quickemu, the
//! NixOS test driver, syzkaller, kata, runqemu…, each adapted only as far
//! as TCG and local paths require) is saved and restored, saved in the
//! instant layout and restored, live-migrated on this host, and
//! checkpointed and restored, on every QEMU installed.
//!
//! The contract, per shape and operation: either the guest carries on (it
//! ticks on from where it was and never boots again, every monitor of the
//! command line answers at its old address with the VM running, and the
//! console log from before is still there), or the operation is refused in
//! words while the VM keeps running. A refusal counts only where the corpus
//! says it is expected (`refuse`, with words the message must hold);
//! anything else, and above all a VM that is gone, fails the test.
//!
//! `LAUNCHERS=name,name` runs only those entries, `LAUNCHERS_CORPUS=FILE`
//! the lines of another file of the same form.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use recipe_tests::{bin, free_port, guest, has_exited, log_ticks, qemus};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Corpus {
    vm: Vec<Entry>,
}

/// One command line, as `fixtures/launchers/corpus.toml` describes it.
#[derive(Debug, Deserialize)]
struct Entry {
    name: String,
    source: String,
    /// `test`: the test guest boots; `none`: the firmware cannot boot it,
    /// and the line is kept for what a VM without a guest still shows.
    guest: String,
    console: String,
    /// `hmp:ADDRESS` or `qmp:ADDRESS`, the first one driving the operations.
    monitors: Vec<String>,
    #[serde(default)]
    setup: Vec<String>,
    /// Processes the VM depends on (a TPM emulator), started before QEMU,
    /// each until it forks into the background.
    #[serde(default)]
    backends: Vec<String>,
    args: String,
    /// Operations (`save`, `instant`, `live`, `checkpoint`) this shape is
    /// refused for, with words the refusal must hold (`a|b`: either).
    #[serde(default)]
    refuse: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Save,
    Instant,
    Live,
    Checkpoint,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Save => "save",
            Op::Instant => "instant",
            Op::Live => "live",
            Op::Checkpoint => "checkpoint",
        }
    }
}

fn corpus() -> Vec<Entry> {
    let path = std::env::var_os("LAUNCHERS_CORPUS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/launchers/corpus.toml"),
        PathBuf::from,
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let corpus: Corpus =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let only: Option<Vec<String>> = std::env::var("LAUNCHERS")
        .ok()
        .map(|s| s.split(',').map(String::from).collect());
    corpus
        .vm
        .into_iter()
        .filter(|e| e.guest == "test")
        .filter(|e| only.as_ref().is_none_or(|o| o.contains(&e.name)))
        .collect()
}

/// How long any one wait of a case may take.
const WAIT: Duration = Duration::from_secs(60);

/// One entry made concrete in a directory of its own: placeholders filled,
/// images made. Every process whose command line names the directory is
/// killed when it is dropped (the QEMUs, daemonized or restored, included).
struct Case {
    dir: tempfile::TempDir,
    ports: BTreeMap<String, u16>,
    args: Vec<String>,
    console: PathBuf,
    monitors: Vec<(bool, String)>,
}

impl Case {
    fn new(e: &Entry) -> Case {
        let dir = tempfile::Builder::new()
            .prefix("l-")
            .tempdir_in("/tmp")
            .unwrap();
        let mut case = Case {
            dir,
            ports: BTreeMap::new(),
            args: Vec::new(),
            console: PathBuf::new(),
            monitors: Vec::new(),
        };
        case.args = case
            .fill(&e.args)
            .split_whitespace()
            .map(String::from)
            .collect();
        case.console = PathBuf::from(case.fill(&e.console));
        case.monitors = e
            .monitors
            .iter()
            .map(|m| {
                let m = case.fill(m);
                let (kind, addr) = m.split_once(':').expect("kind:address");
                match kind {
                    // A human monitor on a mux chardev shared with a console.
                    "mux" => (
                        false,
                        format!("mux:{}", addr.strip_prefix("unix:").unwrap_or(addr)),
                    ),
                    _ => (kind == "qmp", addr.to_string()),
                }
            })
            .collect();
        for b in &e.backends {
            let b = case.fill(b);
            let mut words = b.split_whitespace();
            // Not piped: a backend in the background would hold the pipes open.
            let status = Command::new(words.next().expect("a program"))
                .args(words)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap_or_else(|e| panic!("{b}: {e}"));
            assert!(status.success(), "{b}: {status}");
            // A backend that went into the background listens soon after:
            // wait for the sockets its command line names.
            let dir = case.dir.path().display().to_string();
            for word in b.split([' ', ',', '=', ':']) {
                if word.starts_with(&dir) && word.ends_with(".sock") {
                    let deadline = Instant::now() + WAIT;
                    while !Path::new(word).exists() {
                        assert!(Instant::now() < deadline, "{b}: {word} never appeared");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
        for s in &e.setup {
            let s = case.fill(s);
            let out = Command::new("qemu-img")
                .args(s.split_whitespace())
                .output()
                .expect("qemu-img (Debian's qemu-utils)");
            assert!(out.status.success(), "qemu-img {s}: {}", said(&out));
        }
        case
    }

    /// `{dir}`, `{kernel}` and `{portN}` replaced.
    fn fill(&mut self, s: &str) -> String {
        let mut out = s
            .replace("{dir}", &self.dir.path().display().to_string())
            .replace("{kernel}", &guest().display().to_string());
        if out.contains("{vncdisplay}") {
            let display = *self
                .ports
                .entry("vncdisplay".into())
                .or_insert_with(free_vnc_display);
            out = out.replace("{vncdisplay}", &display.to_string());
        }
        while let Some(start) = out.find("{port") {
            let end = start + out[start..].find('}').expect("a closed placeholder");
            let key = out[start + 1..end].to_string();
            let port = *self.ports.entry(key).or_insert_with(free_port);
            out.replace_range(start..=end, &port.to_string());
        }
        out
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start(&self, qemu: &Path) -> Result<(), String> {
        let stderr = std::fs::File::create(self.path("qemu.stderr")).unwrap();
        let mut child = Command::new(qemu)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting QEMU: {e}"))?;
        if self.args.iter().any(|a| a == "-daemonize") {
            let status = child.wait().unwrap();
            if !status.success() {
                return Err(format!("QEMU did not start: {}", self.qemu_said()));
            }
        } else {
            // Ended by the directory's sweep, like every other QEMU of the case.
            std::mem::forget(child);
        }
        if self.args.iter().any(|a| a == "-S") {
            self.command(0, "cont")?;
        }
        let deadline = Instant::now() + WAIT;
        while !log_ticks(&self.console).iter().any(|&t| t > 2) {
            if Instant::now() > deadline {
                return Err(format!(
                    "the guest printed no tick 3 in {}: {}",
                    self.console.display(),
                    self.qemu_said()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn qemu_said(&self) -> String {
        std::fs::read_to_string(self.path("qemu.stderr")).unwrap_or_default()
    }

    /// Runs `cont` or asks the run state through monitor `i`; returns what it printed.
    fn command(&self, i: usize, what: &str) -> Result<String, String> {
        let (qmp, addr) = &self.monitors[i];
        if let Some(path) = addr.strip_prefix("mux:") {
            return mux_command(
                Path::new(path),
                if what == "cont" {
                    "cont"
                } else {
                    "info status"
                },
            );
        }
        let mut cmd = Command::new(bin("monitor-send"));
        cmd.args(["--timeout", "10s", "--wait-socket", "10s"]);
        if *qmp {
            let json = match what {
                "cont" => r#"{"execute":"cont"}"#,
                _ => r#"{"execute":"query-status"}"#,
            };
            cmd.arg("--json").arg(addr).arg(json);
        } else {
            cmd.arg(addr).arg(if what == "cont" {
                "cont"
            } else {
                "info status"
            });
        }
        let out = cmd.output().map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("monitor {addr}: {}{text}", said(&out)))
        }
    }

    /// Every monitor answers, with the VM running.
    fn monitors_answer(&self) -> Result<(), String> {
        for (i, (qmp, addr)) in self.monitors.iter().enumerate() {
            let text = self.command(i, "status")?;
            let running = if *qmp {
                text.contains(r#""status":"running""#)
            } else {
                text.contains("VM status: running")
            };
            if !running {
                return Err(format!("monitor {addr} answers, but not running: {text}"));
            }
        }
        Ok(())
    }

    /// Nothing of the tool's is left beside the VM's sockets and files.
    fn no_leftovers(&self) -> Result<(), String> {
        let left: Vec<String> = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".qemu-migrate-"))
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("left beside the VM's files: {left:?}"))
        }
    }

    /// After the operation: the guest ticks on past `last`, never booted
    /// again, and the console log from before is kept.
    fn carries_on(&self, last: u64) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        while !log_ticks(&self.console).iter().any(|&t| t > last + 2) {
            if Instant::now() > deadline {
                return Err(format!(
                    "no tick after {last} in the console log (last: {:?})",
                    log_ticks(&self.console).last()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log =
            String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned();
        // Firmware may print before the banner on the same line (SeaBIOS's
        // "Booting from ROM..").
        let boots = log.matches("BOOT qemu-migrate test guest").count();
        if boots == 0 {
            return Err("the console log from before the operation is gone".into());
        }
        if boots > 1 {
            return Err("the guest booted again instead of carrying on".into());
        }
        if log_ticks(&self.console).first() != Some(&1) {
            return Err("the console log lost its first lines".into());
        }
        self.monitors_answer()?;
        self.pidfile_names_the_vm()?;
        self.host_forwards_listen()?;
        self.no_leftovers()
    }

    /// Every TCP host forward of a user-mode network (`hostfwd=tcp::2222-:22`,
    /// how launchers reach the guest's ssh) and the VNC server take
    /// connections again.
    fn host_forwards_listen(&self) -> Result<(), String> {
        for arg in &self.args {
            for rule in arg
                .split(',')
                .filter_map(|p| p.strip_prefix("hostfwd=tcp:"))
            {
                let (host, rest) = rule.split_once(':').unwrap_or(("", rule));
                let port: u16 = rest.split('-').next().unwrap_or_default().parse().unwrap();
                let host = if host.is_empty() { "127.0.0.1" } else { host };
                std::net::TcpStream::connect((host, port))
                    .map_err(|e| format!("host forward {rule}: {host}:{port}: {e}"))?;
            }
        }
        // The VNC server (`-vnc HOST:N`), where launchers watch the screen.
        if let Some(at) = self.args.iter().position(|a| a == "-vnc") {
            let display = self.args[at + 1].split(',').next().unwrap_or_default();
            if let Some((host, n)) = display.rsplit_once(':') {
                if let (false, Ok(n)) = (host.starts_with("unix"), n.parse::<u16>()) {
                    let host = if host.is_empty() { "127.0.0.1" } else { host };
                    std::net::TcpStream::connect((host, 5900 + n))
                        .map_err(|e| format!("VNC {display}: {e}"))?;
                }
            }
        }
        Ok(())
    }

    /// A `-pidfile` names the QEMU that runs the VM now.
    fn pidfile_names_the_vm(&self) -> Result<(), String> {
        let Some(at) = self.args.iter().position(|a| a == "-pidfile") else {
            return Ok(());
        };
        let pidfile = &self.args[at + 1];
        let text = std::fs::read_to_string(pidfile)
            .map_err(|e| format!("the VM's pidfile {pidfile}: {e}"))?;
        let pid: i32 = text
            .trim()
            .parse()
            .map_err(|_| format!("the VM's pidfile {pidfile} holds {text:?}"))?;
        if processes_naming(&self.dir.path().display().to_string()).contains(&pid) {
            Ok(())
        } else {
            Err(format!(
                "the VM's pidfile {pidfile} names {pid}, which is not its QEMU"
            ))
        }
    }

    fn migrate(&self, args: &[&str]) -> Output {
        Command::new(bin("qemu-migrate"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("running qemu-migrate")
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        let needle = self.dir.path().display().to_string();
        for _ in 0..100 {
            let pids = processes_naming(&needle);
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // SAFETY: a signal to a process this case started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `line` on the human monitor of the mux chardev at `path`: when the
/// console has the focus nothing greets, and Ctrl-A c brings the monitor
/// forward, as a person at the console would type it.
fn mux_command(path: &Path, line: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let read_until = |s: &mut std::os::unix::net::UnixStream, what: &str, within: Duration| {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(what) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(String::from_utf8_lossy(&got).into_owned());
            }
            s.set_read_timeout(Some(left)).unwrap();
            match s.read(&mut buf) {
                Ok(0) => return Err(String::from_utf8_lossy(&got).into_owned()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        Ok(String::from_utf8_lossy(&got).into_owned())
    };
    if read_until(&mut s, "(qemu) ", Duration::from_millis(300)).is_err() {
        s.write_all(b"\x01c").map_err(|e| e.to_string())?;
        read_until(&mut s, "(qemu) ", Duration::from_secs(10))
            .map_err(|got| format!("{}: no monitor after Ctrl-A c: {got:?}", path.display()))?;
    }
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    read_until(&mut s, "\r\n(qemu) ", Duration::from_secs(10))
        .map_err(|got| format!("{}: no reply to {line}: {got:?}", path.display()))
}

/// A VNC display number whose port (5900 + N) was free a moment ago, and
/// that no other case of this run was given (they run side by side).
fn free_vnc_display() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    loop {
        let d = 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 3000;
        if std::net::TcpListener::bind(("127.0.0.1", 5900 + d)).is_ok() {
            return d;
        }
    }
}

/// Processes (other than this one) whose command line holds `needle`.
fn processes_naming(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            !has_exited(pid as u32) && String::from_utf8_lossy(&cmd).contains(needle)
        })
        .collect()
}

fn said(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// Whether `message` holds the words the corpus expects: one of the
/// alternatives of `expected`, written `a|b` (QEMUs word one refusal
/// differently).
fn says(message: &str, expected: &str) -> bool {
    expected.split('|').any(|w| message.contains(w))
}

/// The outcome of one entry under one operation on one QEMU.
enum Outcome {
    CarriedOn,
    Refused(String),
}

fn run(qemu: &Path, e: &Entry, op: Op) -> Result<Outcome, String> {
    let case = Case::new(e);
    case.start(qemu)?;
    let first = &case.monitors[0].1;
    let monitor = first.strip_prefix("mux:").unwrap_or(first).to_string();
    let state = case.path("state");
    let state = state.to_str().unwrap();
    let out = match op {
        Op::Save => case.migrate(&["save", "--then", "quit", "--monitor", &monitor, state]),
        Op::Instant => case.migrate(&[
            "save",
            "--instant",
            "--then",
            "quit",
            "--monitor",
            &monitor,
            state,
        ]),
        Op::Checkpoint => case.migrate(&[
            "save",
            "--with-disks",
            "--then",
            "quit",
            "--monitor",
            &monitor,
            state,
        ]),
        Op::Live => case.migrate(&["live", "--to", "local", "--monitor", &monitor]),
    };
    if !out.status.success() {
        return refused(&case, e, op, &format!("{} failed", op.name()), &out);
    }
    let words = format!("{}{}", String::from_utf8_lossy(&out.stdout), said(&out));
    let mut fell_back = None;
    if op == Op::Instant && words.contains("saved as a plain stream") {
        // A fallback is a refusal of the layout: only where the corpus
        // expects it, in its words.
        // The save went on as a plain stream, which must restore as well.
        match e.refuse.get(op.name()) {
            Some(expected) if says(&words, expected) => fell_back = Some(words),
            _ => return Err(format!("the instant layout fell back: {words}")),
        }
    }
    let last = log_ticks(&case.console).last().copied().unwrap_or(0);
    if op != Op::Live {
        let out = case.migrate(&["restore", "--daemonize", state]);
        if !out.status.success() {
            return Err(format!(
                "the save succeeded, the restore failed: {}",
                said(&out)
            ));
        }
    }
    case.carries_on(last)?;
    Ok(match fell_back {
        Some(words) => Outcome::Refused(format!(
            "the layout, then carried on as a plain save: {words}"
        )),
        None => Outcome::CarriedOn,
    })
}

/// A failed operation is a refusal only when the VM still runs and the
/// corpus expects it, in the words it names.
fn refused(case: &Case, e: &Entry, op: Op, what: &str, out: &Output) -> Result<Outcome, String> {
    let message = said(out);
    if let Err(lost) = case.monitors_answer() {
        return Err(format!("{what} ({message}) and the VM is lost: {lost}"));
    }
    case.no_leftovers()?;
    match e.refuse.get(op.name()) {
        Some(words) if says(&message, words) => Ok(Outcome::Refused(message)),
        Some(words) => Err(format!(
            "{what}, but not in the expected words ({words:?}): {message}"
        )),
        None => Err(format!("{what} (the VM still runs): {message}")),
    }
}

/// Runs every entry under `op` on every QEMU and fails with the whole table.
fn every_shape(op: Op) {
    let entries = corpus();
    assert!(!entries.is_empty(), "no launcher lines to run");
    let mut failures = Vec::new();
    let mut table = Vec::new();
    for qemu in qemus() {
        for e in &entries {
            let result = run(&qemu, e, op);
            let line = match &result {
                Ok(Outcome::CarriedOn) => "carried on".to_string(),
                Ok(Outcome::Refused(m)) => format!("refused: {m}"),
                Err(m) => format!("FAILED: {m}"),
            };
            table.push(format!("{} {:<40} {line}", qemu.display(), e.name));
            if result.is_err() {
                failures.push(format!(
                    "{} ({}) on {}: {line}",
                    e.name,
                    e.source,
                    qemu.display()
                ));
            }
        }
    }
    eprintln!("{}:\n{}", op.name(), table.join("\n"));
    assert!(
        failures.is_empty(),
        "{}:\n{}",
        op.name(),
        failures.join("\n")
    );
}

#[test]
fn every_launcher_shape_carries_on_after_save_and_restore() {
    every_shape(Op::Save);
}

#[test]
fn every_launcher_shape_carries_on_after_an_instant_save_and_restore() {
    every_shape(Op::Instant);
}

#[test]
fn every_launcher_shape_carries_on_after_a_local_live_migration() {
    every_shape(Op::Live);
}

#[test]
fn every_launcher_shape_carries_on_after_a_checkpoint_and_restore() {
    every_shape(Op::Checkpoint);
}
