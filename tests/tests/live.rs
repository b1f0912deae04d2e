//! `qemu-migrate live` and `receive` against real QEMUs: on one host over a
//! unix socket, across two network namespaces over TCP, and interrupted by a
//! dying destination or Ctrl-C.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use qemu_monitor::Options;
use recipe_tests::{bin, key_file, qemus, Vm};
use serde_json::Value;

/// A 256 MiB guest that boots without downloads (SeaBIOS, no disk).
const GUEST: &[&str] = &["-M", "pc", "-accel", "tcg", "-m", "256", "-nodefaults"];
const LONG: Duration = Duration::from_secs(60);

/// The guest plus 32 MiB of pseudo-random RAM, so that a migration capped at
/// 1 MiB/s runs for half a minute: long enough to interrupt on purpose.
fn busy_guest(dir: &Path) -> Vec<String> {
    let blob = dir.join("ram.bin");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut data = Vec::with_capacity(32 << 20);
    while data.len() < 32 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&blob, data).expect("writing the RAM blob");
    let mut args: Vec<String> = GUEST.iter().map(|s| s.to_string()).collect();
    args.push("-device".into());
    args.push(format!(
        "loader,file={},addr=0x4000000,force-raw=on",
        blob.display()
    ));
    args
}

/// A `qemu-migrate --json ...` whose stdout lines arrive on a channel.
struct Tool {
    child: Child,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Tool {
    fn spawn(cmd: &mut Command) -> Tool {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting qemu-migrate");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Tool {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a JSON line that `pred` accepts.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            match self.lines.recv_timeout(LONG) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let out = self.child.wait_with_output_now();
                    panic!("no {what}; lines: {:?}; stderr: {out}", self.seen);
                }
            }
        }
    }

    /// Waits for the process to end; returns its exit code and stderr.
    fn finish(mut self) -> (i32, String, Vec<Value>) {
        let status = self.child.wait().expect("wait");
        let stderr = self.child.wait_with_output_now();
        // The reader thread ends at the end of stdout: every line is in.
        self.seen.extend(self.lines.iter());
        (
            status.code().unwrap_or(-1),
            stderr,
            std::mem::take(&mut self.seen),
        )
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

trait StderrNow {
    fn wait_with_output_now(&mut self) -> String;
}

impl StderrNow for Child {
    fn wait_with_output_now(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn live_cmd(monitor: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin("qemu-migrate"));
    c.args(["--json", "live", "--monitor"])
        .arg(monitor)
        .args(extra);
    c
}

/// `info status` through a monitor path, and the pid of the QEMU behind it.
fn hmp_status(path: &Path) -> (String, u32) {
    let options = Options {
        timeout: Duration::from_secs(10),
        wait_socket: None,
        mux_escape: false,
    };
    let mut s = qemu_monitor::connect_hmp(path.to_path_buf(), &options)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()));
    let pid = s.peer_pid().expect("peer pid");
    let text = s.command("info status").expect("info status");
    (text.trim().to_string(), pid)
}

/// Ends a QEMU that the test does not own a handle to.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

/// The QEMUs a process started (the destination of a `live`), leaving
/// out its own forks (the watchdog that puts the VM back if it dies).
fn children(pid: u32) -> Vec<u32> {
    let own = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    all_children(pid)
        .into_iter()
        .filter(|c| std::fs::read_link(format!("/proc/{c}/exe")).ok() != own)
        .collect()
}

fn all_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(pid) {
            if let Ok(p) = entry.file_name().to_string_lossy().parse() {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn local_live_migration_hands_the_guest_and_its_sockets_over() {
    for qemu in qemus() {
        let mut src = Vm::start(&qemu, GUEST);
        assert_eq!(src.status(), "running");
        let src_pid = hmp_status(&src.hmp).1;

        let tool = Tool::spawn(&mut live_cmd(&src.hmp, &["--to", "local"]));
        let (code, stderr, lines) = tool.finish();
        assert_eq!(code, 0, "{}: {stderr}", qemu.display());
        let done = lines.last().expect("a result line");
        assert_eq!(done["state"], "running", "{done}");
        let dest_pid = done["pid"].as_u64().expect("destination pid") as u32;
        let _dest = KillOnDrop(dest_pid);
        eprintln!(
            "{}: local live migration {:.3} s, downtime {} ms, {} bytes",
            qemu.display(),
            done["seconds"],
            done["downtime_ms"],
            done["bytes"]
        );

        // The source ended; the user's socket paths now reach the destination.
        src.wait_event("SHUTDOWN", LONG);
        let (status, pid) = hmp_status(&src.hmp);
        assert_eq!(status, "VM status: running");
        assert_eq!(pid, dest_pid);
        assert_ne!(pid, src_pid);
        let mut qmp = qemu_monitor::connect_qmp(src.qmp_path.clone(), &Options::default())
            .expect("the destination's QMP socket at the user's path");
        qmp.negotiate().expect("qmp_capabilities");
        assert_eq!(qmp.peer_pid().unwrap(), dest_pid);
    }
}

#[test]
fn live_then_stop_leaves_the_source_paused() {
    let qemu = &qemus()[0];
    let mut src = Vm::start(qemu, GUEST);
    let tool = Tool::spawn(&mut live_cmd(
        &src.hmp,
        &["--to", "local", "--then", "stop"],
    ));
    let (code, stderr, lines) = tool.finish();
    assert_eq!(code, 0, "{stderr}");
    let done = lines.last().expect("a result line");
    let _dest = KillOnDrop(done["pid"].as_u64().expect("pid") as u32);
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(hmp_status(&src.hmp).0, "VM status: running");
    let kept = done["source_sockets"].as_array().expect("source sockets");
    assert!(!kept.is_empty(), "{done}");
}

#[test]
fn a_dying_destination_leaves_the_source_running() {
    let qemu = &qemus()[0];
    let dir = tempfile::tempdir().expect("tempdir");
    let args = busy_guest(dir.path());
    let mut src = Vm::start_in(qemu, &args, dir);
    let mut tool = Tool::spawn(&mut live_cmd(
        &src.hmp,
        &["--to", "local", "--bandwidth", "1"],
    ));
    tool.wait_for("migration progress", |v| {
        v["progress"] == "migrating" && v["done"].as_u64() > Some(0)
    });
    let dest = children(tool.pid());
    assert_eq!(dest.len(), 1, "one destination QEMU: {dest:?}");
    Command::new("kill")
        .args(["-KILL", &dest[0].to_string()])
        .status()
        .expect("kill");

    let (code, stderr, _) = tool.finish();
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr
            .contains("the destination QEMU exited during the migration; the source keeps running"),
        "{stderr}"
    );
    assert_eq!(src.status(), "running");
    let (status, pid) = hmp_status(&src.hmp);
    assert_eq!(status, "VM status: running");
    assert_eq!(pid, src.qemu_pid());
}

#[test]
fn ctrl_c_cancels_and_resumes_the_source() {
    let qemu = &qemus()[0];
    let dir = tempfile::tempdir().expect("tempdir");
    let args = busy_guest(dir.path());
    let mut src = Vm::start_in(qemu, &args, dir);
    let mut tool = Tool::spawn(&mut live_cmd(
        &src.hmp,
        &["--to", "local", "--bandwidth", "1"],
    ));
    tool.wait_for("migration progress", |v| {
        v["progress"] == "migrating" && v["done"].as_u64() > Some(0)
    });
    let dest = children(tool.pid());
    Command::new("kill")
        .args(["-INT", &tool.pid().to_string()])
        .status()
        .expect("kill -INT");

    let (code, stderr, _) = tool.finish();
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    assert!(stderr.contains("the source keeps running"), "{stderr}");
    assert_eq!(src.status(), "running");
    let r = src
        .qmp()
        .execute("query-migrate", None)
        .expect("query-migrate");
    assert_eq!(r["status"], "cancelled", "{r}");
    for pid in dest {
        assert!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists()
                || std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty()),
            "the destination QEMU {pid} is still running"
        );
    }
    assert_eq!(hmp_status(&src.hmp).1, src.qemu_pid());
}

trait HmpPid {
    fn qemu_pid(&mut self) -> u32;
}

impl HmpPid for Vm {
    /// The pid of the QEMU behind the test's own QMP session.
    fn qemu_pid(&mut self) -> u32 {
        self.qmp().peer_pid().expect("peer pid")
    }
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct Namespaces {
    a: String,
    b: String,
}

impl Namespaces {
    fn create() -> Namespaces {
        let tag = std::process::id() % 100_000;
        let ns = Namespaces {
            a: format!("qmlive{tag}a"),
            b: format!("qmlive{tag}b"),
        };
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("running ip");
            assert!(
                out.status.success(),
                "`ip {}` failed: {}; this test needs root (network namespaces)",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        };
        ip(&["netns", "add", &ns.a]);
        ip(&["netns", "add", &ns.b]);
        let (va, vb) = (format!("qmv{tag}a"), format!("qmv{tag}b"));
        ip(&[
            "link", "add", &va, "netns", &ns.a, "type", "veth", "peer", "name", &vb, "netns", &ns.b,
        ]);
        for (n, dev, addr) in [(&ns.a, &va, "10.77.0.1/24"), (&ns.b, &vb, "10.77.0.2/24")] {
            ip(&["-n", n, "addr", "add", addr, "dev", dev]);
            ip(&["-n", n, "link", "set", dev, "up"]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        ns
    }

    fn exec(&self, ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Deleting a namespace also deletes the veth end inside it.
        for n in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn live_migration_over_tcp_between_namespaces() {
    let ns = Namespaces::create();
    let keys = tempfile::tempdir().expect("tempdir");
    let key = key_file(keys.path());
    for (i, qemu) in qemus().into_iter().enumerate() {
        let port = (4444 + i).to_string();
        // The source QEMU runs in namespace A: QEMU itself opens the TCP stream.
        let ip = PathBuf::from("ip");
        let mut src_args: Vec<String> = ["netns", "exec", &ns.a]
            .iter()
            .map(|s| s.to_string())
            .collect();
        src_args.push(qemu.display().to_string());
        src_args.extend(GUEST.iter().map(|s| s.to_string()));
        let mut src = Vm::start(&ip, &src_args);

        let dest_dir = tempfile::tempdir().expect("tempdir");
        let dest_hmp = dest_dir.path().join("hmp.sock");
        let dest_qmp = dest_dir.path().join("qmp.sock");
        let mut receiver_cmd = ns.exec(&ns.b, &bin("qemu-migrate"));
        receiver_cmd
            .args(["--json", "receive", "--tls-psk"])
            .arg(&key)
            .arg("--listen")
            .arg(format!("tcp:10.77.0.2:{port}"))
            .arg("--qemu")
            .arg(&qemu)
            .arg("--")
            .args(GUEST)
            .args(["-display", "none", "-monitor"])
            .arg(format!("unix:{},server,nowait", dest_hmp.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server,nowait", dest_qmp.display()));
        let mut receiver = Tool::spawn(&mut receiver_cmd);
        receiver.wait_for("the receiver listening", |v| v.get("listening").is_some());

        let mut live = ns.exec(&ns.a, &bin("qemu-migrate"));
        live.args(["--json", "live", "--tls-psk"])
            .arg(&key)
            .arg("--monitor")
            .arg(&src.hmp)
            .arg("--to")
            .arg(format!("tcp:10.77.0.2:{port}"));
        let (code, stderr, lines) = Tool::spawn(&mut live).finish();
        assert_eq!(code, 0, "{}: {stderr}", qemu.display());
        let done = lines.last().expect("a result line");
        assert_eq!(done["state"], "running", "{done}");
        eprintln!(
            "{}: TCP live migration {:.3} s, downtime {} ms, {} bytes",
            qemu.display(),
            done["seconds"],
            done["downtime_ms"],
            done["bytes"]
        );
        let received = receiver.wait_for("the receiver's result", |v| v.get("received").is_some());
        assert_eq!(received["state"], "running");
        assert_eq!(received["pid"], done["pid"]);

        src.wait_event("SHUTDOWN", LONG);
        let (status, _) = hmp_status(&dest_hmp);
        assert_eq!(status, "VM status: running");
        // Quitting the destination ends the receiver, which ran it in the foreground.
        let mut qmp = qemu_monitor::connect_qmp(dest_qmp.clone(), &Options::default())
            .expect("destination QMP");
        qmp.negotiate().expect("qmp_capabilities");
        let _ = qmp.execute("quit", None);
        let (code, stderr, _) = receiver.finish();
        assert_eq!(code, 0, "{stderr}");
    }
}
