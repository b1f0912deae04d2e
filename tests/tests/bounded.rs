//! A live migration is bounded: one that cannot converge (a guest that
//! dirties RAM faster than the bandwidth allows) ends at `--timeout`,
//! cancelled with the source running on, or with `--timeout-suspend`
//! finished with the guest paused and resumed on the destination; and the
//! death of the receiving side is noticed within seconds.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use recipe_tests::{
    bin, free_port, guest_logged_to, key_file, log_ticks, qemus, wait_tick_above, Vm,
};

fn live(vm: &Vm, extra: &[&str]) -> (std::process::Output, Duration) {
    let started = Instant::now();
    let out = Command::new(bin("qemu-migrate"))
        .args(["live", "--monitor"])
        .arg(&vm.hmp)
        .args(extra)
        .output()
        .unwrap();
    (out, started.elapsed())
}

fn bandwidth(vm: &mut Vm) -> serde_json::Value {
    vm.qmp().execute("query-migrate-parameters", None).unwrap()["max-bandwidth"].clone()
}

#[test]
fn a_live_migration_that_cannot_converge_is_cancelled_at_its_timeout() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut vm = Vm::start(&qemu, &guest_logged_to(&log));
        wait_tick_above(&log, 1);
        let cap = bandwidth(&mut vm);
        let (out, took) = live(
            &vm,
            &[
                "--to",
                "local",
                "--bandwidth",
                "4",
                "--no-auto-converge",
                "--timeout",
                "3",
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(
            err.contains("it did not converge within 3s")
                && err.contains("the source keeps running"),
            "{err}"
        );
        assert!(took < Duration::from_secs(30), "ended after {took:?}");
        assert_eq!(vm.status(), "running");
        assert_eq!(bandwidth(&mut vm), cap, "the bandwidth cap is QEMU's again");
        let last = *log_ticks(&log).last().unwrap();
        wait_tick_above(&log, last);
    }
}

#[test]
fn with_timeout_suspend_it_finishes_with_the_guest_paused_and_resumed_there() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut vm = Vm::start(&qemu, &guest_logged_to(&log));
        wait_tick_above(&log, 1);
        let (out, _) = live(
            &vm,
            &[
                "--to",
                "local",
                "--bandwidth",
                "16",
                "--no-auto-converge",
                "--timeout",
                "2",
                "--timeout-suspend",
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("the guest is running there"), "{err}");
        vm.wait_exit();
        // The destination took the log over (appending) and ticks on.
        let last = *log_ticks(&log).last().unwrap();
        wait_tick_above(&log, last);
        let status = Command::new(bin("monitor-send"))
            .arg(&vm.hmp)
            .arg("quit")
            .output()
            .unwrap();
        assert!(status.status.success());
    }
}

/// Reads `child`'s stdout JSON lines until one has `key`.
fn wait_line(out: &mut impl BufRead, key: &str) -> serde_json::Value {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "no line with {key}");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v.get(key).is_some_and(|d| !d.is_null() && d != 0) {
                return v;
            }
        }
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_death_of_the_receiving_side_is_noticed_within_seconds() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let options = guest_logged_to(&log);
        let mut vm = Vm::start(&qemu, &options);
        wait_tick_above(&log, 1);
        let addr = format!("tcp:127.0.0.1:{}", free_port());
        let key = key_file(dir.path());
        let mut receiver = Killed(
            Command::new(bin("qemu-migrate"))
                .arg("--json")
                .arg("receive")
                .arg("--tls-psk")
                .arg(&key)
                .args(["--listen", &addr, "--qemu"])
                .arg(&qemu)
                .arg("--")
                .args(&options)
                .args(["-display", "none"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut rx = BufReader::new(receiver.0.stdout.take().unwrap());
        let listening = wait_line(&mut rx, "listening");
        let dest_qemu = listening["pid"].as_u64().unwrap() as i32;

        let mut sender = Killed(
            Command::new(bin("qemu-migrate"))
                .args(["--json", "live", "--monitor"])
                .arg(&vm.hmp)
                .arg("--tls-psk")
                .arg(&key)
                .args(["--to", &addr, "--bandwidth", "1", "--no-auto-converge"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut tx = BufReader::new(sender.0.stdout.take().unwrap());
        wait_line(&mut tx, "done");
        let _ = receiver.0.kill();
        let killed_at = Instant::now();
        let status = sender.0.wait().unwrap();
        let noticed = killed_at.elapsed();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut sender.0.stderr.take().unwrap(), &mut err).unwrap();
        // The receiver's watchdog ended its QEMU, which holds nothing any more.
        let deadline = Instant::now() + Duration::from_secs(10);
        // (A zombie nobody reaped yet has ended too: it holds no file.)
        let alive = |pid: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
            })
        };
        while alive(dest_qemu) {
            if Instant::now() > deadline {
                // SAFETY: the receiver's QEMU, left behind.
                unsafe { libc::kill(dest_qemu, libc::SIGKILL) };
                panic!("the receiver's QEMU outlived it");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(status.code(), Some(3), "{err}");
        assert!(
            err.contains("the receiving qemu-migrate went away"),
            "{err}"
        );
        assert!(
            noticed < Duration::from_secs(5),
            "noticed after {noticed:?}"
        );
        assert_eq!(vm.status(), "running");
    }
}
