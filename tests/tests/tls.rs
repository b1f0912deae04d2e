//! A receiver lets in only the sender that holds its key or certificates.
//! Against real QEMUs on every version installed: a raw socket client that
//! sends another VM's real stream, garbage, a client that connects and stays
//! silent, a QEMU source with the wrong key, and `qemu-migrate live` with the
//! wrong key are each refused while the destination keeps waiting; the right
//! sender then migrates the guest, which ticks on there. The key is in no
//! process's command line or environment, no output, no manifest.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use recipe_tests::{
    bin, free_port, guest_logged_to, has_exited, key_file, log_ticks, qemus, wait_tick_above, Vm,
};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

/// A `qemu-migrate --json receive`, its stdout lines on a channel and its
/// stderr in a file; killed on drop.
struct Receiver {
    child: Child,
    lines: mpsc::Receiver<Value>,
    stderr: PathBuf,
    /// Everything it printed on stdout.
    stdout: Arc<Mutex<String>>,
    /// Its QEMU, once it said which: it outlives a receiver killed after
    /// the guest arrived (the guest is no longer the receiver's to end).
    qemu: Option<u32>,
}

impl Receiver {
    fn start(qemu: &Path, dir: &Path, security: &[&str], port: u16, guest: &[String]) -> Receiver {
        let stderr = dir.join("receiver.stderr");
        let mut child = Command::new(bin("qemu-migrate"))
            .args(["--json", "receive"])
            .args(security)
            .arg("--listen")
            .arg(format!("tcp:127.0.0.1:{port}"))
            .arg("--qemu")
            .arg(qemu)
            .arg("--")
            .args(guest)
            .args(["-display", "none", "-monitor"])
            .arg(format!(
                "unix:{},server,nowait",
                dir.join("dest.hmp").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting qemu-migrate receive");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let all = Arc::clone(&stdout);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                *all.lock().unwrap() += &format!("{line}\n");
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        Receiver {
            child,
            lines,
            stderr,
            stdout,
            qemu: None,
        }
    }

    /// Waits for its `listening` line; the pid of its QEMU.
    fn listening(&mut self) -> u32 {
        let pid = self.wait_for("listening")["pid"].as_u64().unwrap() as u32;
        self.qemu = Some(pid);
        pid
    }

    fn wait_for(&self, key: &str) -> Value {
        let deadline = Instant::now() + LONG;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the receiver never said {key}: {}", self.said()));
            if v.get(key).is_some() {
                return v;
            }
        }
    }

    fn said(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Whether it said anything but progress since it listened.
    fn received_anything(&self) -> bool {
        self.lines.try_iter().any(|v| v.get("received").is_some())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = self.qemu.filter(|p| !has_exited(*p)) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

/// What the destination's human monitor answers to `command`.
fn hmp(dir: &Path, command: &str) -> String {
    let out = Command::new(bin("monitor-send"))
        .arg(dir.join("dest.hmp"))
        .arg(command)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The destination's `info status`.
fn dest_status(dir: &Path) -> String {
    hmp(dir, "info status")
}

/// Sends `bytes` on a new connection and waits for the receiver to close it.
fn refused_after_sending(port: u16, bytes: &[u8]) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // The receiver may close before all is written.
    let _ = s.write_all(bytes);
    s.set_read_timeout(Some(LONG)).unwrap();
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the receiver kept a connection that sent junk open: {e}"),
        }
    }
}

/// A real VM stream of another guest than the one the receiver waits for.
fn foreign_stream(qemu: &Path, dir: &Path) -> Vec<u8> {
    let mut other = Vm::start(qemu, &guest_logged_to(&dir.join("other.log")));
    wait_tick_above(&dir.join("other.log"), 1);
    let file = dir.join("foreign.stream");
    other
        .qmp()
        .execute(
            "migrate",
            Some(json!({ "uri": format!("exec:cat > {}", file.display()) })),
        )
        .unwrap();
    assert_eq!(other.wait_migration_end(LONG), "completed");
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.starts_with(b"QEVM"), "not a QEMU stream");
    bytes
}

/// The source QEMU itself tries `migrate tcp:` with TLS credentials of the
/// given type from `dir`; returns the migration's end status, and leaves
/// the source as it was.
fn qemu_migrates_with(src: &mut Vm, qom_type: &str, dir: &Path, port: u16) -> String {
    let q = src.qmp();
    let mut args =
        json!({ "qom-type": qom_type, "id": "intruder", "endpoint": "client", "dir": dir });
    if qom_type == "tls-creds-psk" {
        args["username"] = "qemu".into();
    }
    q.execute("object-add", Some(args)).unwrap();
    q.execute(
        "migrate-set-parameters",
        Some(json!({ "tls-creds": "intruder" })),
    )
    .unwrap();
    q.execute(
        "migrate",
        Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })),
    )
    .unwrap();
    let end = src.wait_migration_end(LONG);
    let q = src.qmp();
    q.execute("migrate-set-parameters", Some(json!({ "tls-creds": "" })))
        .unwrap();
    q.execute("object-del", Some(json!({ "id": "intruder" })))
        .unwrap();
    end
}

/// A key QEMU reads itself (`keys.psk` in a private directory).
fn qemu_key_dir(dir: &Path) -> PathBuf {
    let d = dir.join("intruder-key");
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    let key = std::fs::read_to_string(key_file(&d)).unwrap();
    std::fs::write(d.join("keys.psk"), format!("qemu:{}", key.trim())).unwrap();
    d
}

fn read_proc(pid: u32, what: &str) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/{what}")).unwrap_or_default())
        .replace('\0', " ")
}

fn live(src: &Vm, security: &[&str], port: u16) -> Child {
    Command::new(bin("qemu-migrate"))
        .args(["--json", "live"])
        .args(security)
        .arg("--monitor")
        .arg(&src.hmp)
        .arg("--to")
        .arg(format!("tcp:127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn only_the_sender_with_the_key_gets_its_vm_in_and_the_key_is_never_shown() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (right_dir, wrong_dir) = (dir.path().join("right"), dir.path().join("wrong"));
        std::fs::create_dir(&right_dir).unwrap();
        std::fs::create_dir(&wrong_dir).unwrap();
        let (right, wrong) = (key_file(&right_dir), key_file(&wrong_dir));
        let secret = std::fs::read_to_string(&right).unwrap().trim().to_string();
        let log = dir.path().join("serial.log");
        let guest = guest_logged_to(&log);
        let mut src = Vm::start(&qemu, &guest);
        src.enable_migration_events();
        wait_tick_above(&log, 1);
        let foreign = foreign_stream(&qemu, dir.path());

        let port = free_port();
        let right_arg = right.to_str().unwrap();
        let mut receiver =
            Receiver::start(&qemu, dir.path(), &["--tls-psk", right_arg], port, &guest);
        let dest_pid = receiver.listening();

        // Intruders, one after the other, and one that stays silent throughout.
        let _silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
        refused_after_sending(port, &foreign);
        refused_after_sending(port, b"GET / HTTP/1.0\r\n\r\n");
        let end = qemu_migrates_with(&mut src, "tls-creds-psk", &qemu_key_dir(dir.path()), port);
        assert_eq!(
            end,
            "failed",
            "{}: a wrong-key QEMU got through",
            qemu.display()
        );
        let out = live(&src, &["--tls-psk", wrong.to_str().unwrap()], port)
            .wait_with_output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("key"), "{stderr}");
        assert_eq!(src.status(), "running");
        // The destination was not disturbed: it still waits, nothing received.
        assert!(!has_exited(dest_pid), "{}", receiver.said());
        assert!(
            dest_status(dir.path()).contains("inmigrate"),
            "{}",
            dest_status(dir.path())
        );
        assert!(!receiver.received_anything());

        // QEMU reads the key from a private directory, which goes with the migration.
        let key_dir = hmp(dir.path(), "qom-get /objects/qemu-migrate-tls dir");
        let key_dir = PathBuf::from(key_dir.trim().trim_matches('"'));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key_dir), 0o700, "{}", key_dir.display());
        assert_eq!(mode(&key_dir.join("keys.psk")), 0o600);

        // The key is nowhere a user or another process could read it.
        let mut seen = String::new();
        for pid in [receiver.child.id(), dest_pid, src.pid()] {
            seen += &read_proc(pid, "cmdline");
            seen += &read_proc(pid, "environ");
        }

        // The right sender migrates the guest, which ticks on there.
        let before = *log_ticks(&log).last().unwrap();
        let right_live = live(&src, &["--tls-psk", right_arg], port);
        seen += &read_proc(right_live.id(), "cmdline");
        let out = right_live.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{}: {stderr}", qemu.display());
        let received = receiver.wait_for("received");
        assert_eq!(received["state"], "running", "{received}");
        assert_eq!(received["pid"].as_u64(), Some(u64::from(dest_pid)));
        wait_tick_above(&log, before + 2);
        assert!(
            !key_dir.exists(),
            "{} outlived the migration",
            key_dir.display()
        );
        seen += &String::from_utf8_lossy(&out.stdout);
        seen += &stderr;
        // It said whom it refused, and why (QEMU's words on stderr, ours as notes).
        let said = receiver.said();
        assert!(said.contains("TLS handshake failed"), "{said}");
        let notes = receiver.stdout.lock().unwrap().clone();
        assert!(
            notes.contains("refused a connection") && notes.contains("still waiting"),
            "{notes}"
        );
        seen += &said;
        seen += &notes;

        // A save of the received VM is in clear again, and its manifest names no key.
        let statefile = dir.path().join("statefile");
        let save = Command::new(bin("qemu-migrate"))
            .args(["save", "--then", "quit", "--monitor"])
            .arg(dir.path().join("dest.hmp"))
            .arg(&statefile)
            .output()
            .unwrap();
        assert!(
            save.status.success(),
            "{}",
            String::from_utf8_lossy(&save.stderr)
        );
        seen += &std::fs::read_to_string(dir.path().join("statefile.manifest.json")).unwrap();
        assert!(
            std::fs::read(&statefile).unwrap().starts_with(b"QEVM"),
            "the received VM still migrates through TLS"
        );
        assert!(!seen.contains(&secret), "the key was shown: {seen}");
    }
}

/// A CA, and a host's certificates signed by it, as libvirt lays them out.
fn certificates(dir: &Path, name: &str) -> PathBuf {
    let pki = dir.join(name);
    std::fs::create_dir(&pki).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&pki)
            .output()
            .expect("running openssl (.ci/install-deps installs it)");
        assert!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca-key.pem", "-out", "ca-cert.pem"]);
    run(&ca);
    for (who, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let mut req = vec!["req", "-subj", "/CN=127.0.0.1"];
        req.extend(ec);
        let (key, csr, cert) = (
            format!("{who}-key.pem"),
            format!("{who}.csr"),
            format!("{who}-cert.pem"),
        );
        req.extend(["-keyout", &key, "-out", &csr]);
        run(&req);
        std::fs::write(pki.join("ext.cnf"), ext).unwrap();
        run(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-extfile",
            "ext.cnf",
            "-out",
            &cert,
        ]);
    }
    pki
}

#[test]
fn with_certificates_only_a_sender_of_the_same_ca_gets_in() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let pki = certificates(dir.path(), "pki");
        let other = certificates(dir.path(), "other-ca");
        let log = dir.path().join("serial.log");
        let guest = guest_logged_to(&log);
        let mut src = Vm::start(&qemu, &guest);
        src.enable_migration_events();
        wait_tick_above(&log, 1);
        let port = free_port();
        let pki_arg = pki.to_str().unwrap();
        let mut receiver =
            Receiver::start(&qemu, dir.path(), &["--tls-x509", pki_arg], port, &guest);
        let dest_pid = receiver.listening();

        let end = qemu_migrates_with(&mut src, "tls-creds-x509", &other, port);
        assert_eq!(
            end,
            "failed",
            "{}: another CA's QEMU got through",
            qemu.display()
        );
        let out = live(&src, &["--tls-x509", other.to_str().unwrap()], port)
            .wait_with_output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!has_exited(dest_pid));
        assert!(dest_status(dir.path()).contains("inmigrate"));

        let out = live(&src, &["--tls-x509", pki_arg], port)
            .wait_with_output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            qemu.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let received = receiver.wait_for("received");
        assert_eq!(received["state"], "running", "{received}");
        let before = *log_ticks(&log).last().unwrap();
        wait_tick_above(&log, before + 2);
    }
}

#[test]
fn without_a_key_a_tcp_migration_is_refused_and_insecure_says_so() {
    let qemu = &qemus()[0];
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("qemu-migrate"))
        .args(["receive", "--listen", "tcp:127.0.0.1:1", "--qemu"])
        .arg(qemu)
        .args(["--", "-M", "none"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--tls-psk FILE") && stderr.contains("--insecure"),
        "{stderr}"
    );
    // A key others may read is refused before anything starts.
    let key = key_file(dir.path());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(bin("qemu-migrate"))
        .args(["receive", "--listen", "tcp:127.0.0.1:1", "--tls-psk"])
        .arg(&key)
        .args(["--qemu"])
        .arg(qemu)
        .args(["--", "-M", "none"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");
    // --insecure says in words what it gives up.
    let port = free_port();
    let mut rx = Command::new(bin("qemu-migrate"))
        .args(["--json", "receive", "--insecure", "--listen"])
        .arg(format!("tcp:127.0.0.1:{port}"))
        .arg("--qemu")
        .arg(qemu)
        .args(["--", "-M", "none", "-display", "none"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(rx.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening"), "{line}");
    let _ = rx.kill();
    let out = rx.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("RAM crosses the network in clear"),
        "{stderr}"
    );
}

#[test]
fn a_receiver_killed_while_waiting_leaves_neither_its_qemu_nor_the_key_behind() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path());
        let none = ["-M".to_string(), "none".to_string()];
        let mut receiver = Receiver::start(
            &qemu,
            dir.path(),
            &["--tls-psk", key.to_str().unwrap()],
            free_port(),
            &none,
        );
        let dest_pid = receiver.listening();
        let key_dir = hmp(dir.path(), "qom-get /objects/qemu-migrate-tls dir");
        let key_dir = PathBuf::from(key_dir.trim().trim_matches('"'));
        assert!(key_dir.join("keys.psk").exists(), "{}", key_dir.display());
        receiver.child.kill().unwrap();
        let _ = receiver.child.wait();
        let deadline = Instant::now() + LONG;
        while (!has_exited(dest_pid) || key_dir.exists()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            has_exited(dest_pid),
            "{}: its QEMU outlived it",
            qemu.display()
        );
        assert!(
            !key_dir.exists(),
            "{} outlived the receiver",
            key_dir.display()
        );
    }
}
