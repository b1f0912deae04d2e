//! Across a QEMU upgrade: a VM saved (or migrating) on the oldest QEMU
//! installed restores on the newest and carries on, its machine type pinned
//! to the saved version whether its options named an alias or nothing; the
//! other way round is refused in words before anything starts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use qemu_monitor::{Options, QemuVersion};
use recipe_tests::{
    bin, free_port, migrate, qemu_version, qemus, recipe_options, save_then_quit, spawn_lines,
    tick, Vm,
};

const WAIT: Duration = Duration::from_secs(60);

/// The oldest and newest QEMU the tests run on (the same one when only one is installed).
fn oldest_and_newest() -> (PathBuf, PathBuf) {
    let mut list: Vec<(QemuVersion, PathBuf)> = qemus()
        .into_iter()
        .map(|q| (qemu_version(&q).parse().expect("a QEMU version"), q))
        .collect();
    list.sort_by_key(|(v, _)| *v);
    let oldest = list.first().expect("a QEMU").1.clone();
    let newest = list.last().expect("a QEMU").1.clone();
    (oldest, newest)
}

fn minor(qemu: &Path) -> String {
    let v: QemuVersion = qemu_version(qemu).parse().unwrap();
    format!("{}.{}", v.major, v.minor)
}

/// Saves a ticking test guest started on `qemu` with `machine` (`-M` value,
/// or none); returns the state file and the last tick saved.
fn save_ticking(qemu: &Path, dir: &Path, machine: Option<&str>) -> (PathBuf, u64) {
    let mut options = recipe_options(dir);
    if let Some(m) = machine {
        options.extend(["-M".into(), m.into()]);
    }
    let (mut source, serial) = Vm::start_with_serial(qemu, &options);
    serial.wait_for(0, WAIT, "tick 3", |l| tick(l) == Some(3));
    let statefile = dir.join("statefile");
    save_then_quit(&source.hmp, &statefile);
    assert!(source.wait_exit().success());
    let last = serial.snapshot().iter().filter_map(|l| tick(l)).max();
    (statefile, last.expect("ticks before the save"))
}

#[test]
fn a_state_saved_by_the_oldest_qemu_restores_on_the_newest_and_carries_on() {
    let (oldest, newest) = oldest_and_newest();
    for (machine, family) in [(None, "pc-i440fx"), (Some("q35"), "pc-q35")] {
        let dir = tempfile::tempdir().unwrap();
        let (statefile, last_saved) = save_ticking(&oldest, dir.path(), machine);
        let (restore, restored) = spawn_lines(
            migrate()
                .args(["restore", "--qemu"])
                .arg(&newest)
                .arg(&statefile),
        );
        let first = restored.wait_for(0, WAIT, "a tick after restore", |l| tick(l).is_some());
        let lines = restored.snapshot();
        assert!(
            !lines.iter().any(|l| l.starts_with("BOOT ")),
            "the guest booted again on {}: {lines:?}",
            newest.display()
        );
        let first_tick = tick(&lines[first]).unwrap();
        assert!(
            first_tick > last_saved && first_tick <= last_saved + 2,
            "-M {machine:?}: first tick on {} is {first_tick}, the last saved on {} was {last_saved}",
            newest.display(),
            oldest.display()
        );
        restored.wait_for(first, WAIT, "the guest keeps ticking", |l| {
            tick(l).is_some_and(|n| n > first_tick + 1)
        });
        // SIGTERM, which the foreground restore passes on to its QEMU: a
        // SIGKILL would leave that QEMU running on (the VM is never lost).
        // SAFETY: a signal to the restore this test started.
        unsafe { libc::kill(restore.id() as libc::pid_t, libc::SIGTERM) };
        let out = restore.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let pinned = format!("{family}-{}", minor(&oldest));
        if oldest != newest {
            assert!(
                stderr.contains(&format!("pinned the machine type to {pinned}")),
                "the restore says what it pinned: {stderr}"
            );
        }
    }
}

#[test]
fn a_state_saved_by_a_newer_qemu_is_refused_by_an_older_one_in_words() {
    let (oldest, newest) = oldest_and_newest();
    if oldest == newest {
        eprintln!("one QEMU installed: no older one to refuse");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (statefile, _) = save_ticking(&newest, dir.path(), None);
    let out = migrate()
        .args(["restore", "--qemu"])
        .arg(&oldest)
        .arg(&statefile)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is older than QEMU"), "{stderr}");
}

#[test]
fn a_live_migration_to_a_newer_local_qemu_pins_the_machine_type() {
    let (oldest, newest) = oldest_and_newest();
    // SeaBIOS and no disk: a guest that runs without a console of its own.
    let src = Vm::start(&oldest, &["-accel", "tcg", "-m", "64", "-nodefaults"]);
    let out = migrate()
        .args(["--json", "live", "--to", "local", "--monitor"])
        .arg(&src.hmp)
        .arg("--qemu")
        .arg(&newest)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let done: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a result line")).unwrap();
    assert_eq!(done["state"], "running", "{done}");
    let dest_pid = done["pid"].as_u64().expect("the destination's pid");
    let _dest = KillOnDrop(dest_pid as u32);

    // The user's socket now reaches the destination: the newer QEMU, pinned.
    let options = Options {
        timeout: WAIT,
        wait_socket: None,
        mux_escape: false,
    };
    let mut hmp = qemu_monitor::connect_hmp(src.hmp.clone(), &options).unwrap();
    assert_eq!(u64::from(hmp.peer_pid().unwrap()), dest_pid);
    let version = hmp.command("info version").unwrap();
    assert!(
        version.starts_with(&qemu_version(&newest)),
        "{version} is {}",
        newest.display()
    );
    assert_eq!(
        hmp.command("info status").unwrap().trim(),
        "VM status: running"
    );
    if oldest != newest {
        assert_eq!(
            done["pinned_machine"]["machine"],
            format!("pc-i440fx-{}", minor(&oldest)),
            "{done}"
        );
    }
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

#[test]
fn a_live_migration_to_a_receiver_on_a_newer_qemu_without_the_machine_type_is_refused_in_words() {
    use std::io::{BufRead, BufReader};
    let (oldest, newest) = oldest_and_newest();
    if oldest == newest {
        eprintln!("one QEMU installed: no newer receiver");
        return;
    }
    let guest = ["-accel", "tcg", "-m", "64", "-nodefaults"];
    let src = Vm::start(&oldest, &guest);
    let port = free_port();
    // The receiver is given the source's options, which name no machine type:
    // QEMU 10 would make them pc-i440fx-10.0.
    let mut receiver = Command::new(bin("qemu-migrate"))
        .args(["--json", "receive", "--insecure", "--listen"])
        .arg(format!("tcp:127.0.0.1:{port}"))
        .arg("--qemu")
        .arg(&newest)
        .arg("--")
        .args(guest)
        .args(["-display", "none"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(receiver.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "the receiver said {line:?}");

    let live = migrate()
        .args(["live", "--insecure", "--monitor"])
        .arg(&src.hmp)
        .arg("--to")
        .arg(format!("tcp:127.0.0.1:{port}"))
        .output()
        .unwrap();
    let _ = receiver.kill();
    let _ = receiver.wait();
    let stderr = String::from_utf8_lossy(&live.stderr);
    assert_eq!(live.status.code(), Some(2), "{stderr}");
    let old = format!("pc-i440fx-{}", minor(&oldest));
    assert!(
        stderr.contains(&format!("start the receiver with -M {old}")),
        "{stderr}"
    );
    // Refused before anything changed: the source still runs, and is still the source.
    let options = Options {
        timeout: WAIT,
        wait_socket: None,
        mux_escape: false,
    };
    let mut hmp = qemu_monitor::connect_hmp(src.hmp.clone(), &options).unwrap();
    assert_eq!(
        hmp.command("info status").unwrap().trim(),
        "VM status: running"
    );
    assert_eq!(hmp.peer_pid().unwrap(), src.pid());
}

#[test]
fn a_receiver_on_a_newer_qemu_started_from_a_manifest_pins_the_saved_machine_type() {
    use std::io::{BufRead, BufReader};
    let (oldest, newest) = oldest_and_newest();
    if oldest == newest {
        eprintln!("one QEMU installed: nothing to pin");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (statefile, _) = save_ticking(&oldest, dir.path(), None);
    let port = free_port();
    let mut receiver = Command::new(bin("qemu-migrate"))
        .args(["--json", "receive", "--insecure", "--listen"])
        .arg(format!("tcp:127.0.0.1:{port}"))
        .arg("--qemu")
        .arg(&newest)
        .arg("--manifest")
        .arg(dir.path().join("statefile.manifest.json"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(receiver.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let _ = receiver.kill();
    let _ = receiver.wait();
    let said: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("{e}: the receiver said {line:?} ({})", statefile.display()));
    assert_eq!(
        said["pinned_machine"]["machine"],
        format!("pc-i440fx-{}", minor(&oldest)),
        "{said}"
    );
}
