//! `qemu-migrate roundtrip`, the check a user runs in CI on their own VM:
//! the test guest and the Linux guest carry on through every transport, on
//! every QEMU and from the oldest to the newest; a guest that does not tick
//! is judged by its lines; a vm.json in vmrunner's shape boots as vmrunner
//! boots it; and each way a restore can go wrong is named with its exit status.
//!
//! The Linux guest comes from `cargo xtask test` (LINUX_GUEST_KERNEL,
//! LINUX_GUEST_INITRD, LINUX_GUEST_APPEND); these tests fail without it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qemu_monitor::{Options, QemuVersion};
use recipe_tests::{bin, guest, qemu_version, qemus, recipe_options};
use serde_json::Value;

const COUNTER: &str = "^tick ([0-9]+)";
const BANNER: &str = "^BOOT";

/// `qemu-migrate --json roundtrip ARGS -- OPTIONS`: its exit status and
/// report. A failed check keeps its work directory: here, in a temporary one.
fn roundtrip(args: &[&str], options: &[String]) -> (i32, Value) {
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().join("work");
    let mut cmd = Command::new(bin("qemu-migrate"));
    cmd.args(["--json", "roundtrip"]).args(args);
    if !args.contains(&"--workdir") {
        cmd.arg("--workdir").arg(&workdir);
    }
    let out = cmd
        .arg("--")
        .args(options)
        .output()
        .expect("running qemu-migrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {stdout}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn assert_passed(code: i32, report: &Value, what: &str) {
    assert_eq!(code, 0, "{what}: {report:#}");
    assert_eq!(report["passed"], true, "{what}: {report:#}");
}

/// The counter carried on: the destination's first value follows the source's last.
fn assert_continued(report: &Value, what: &str) {
    let before = report["counter_before"].as_u64().expect("a counter before");
    let after: Vec<u64> = report["counter_after"]
        .as_array()
        .expect("counter values after")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(
        after[0] > before && after[0] <= before + 2 && after.windows(2).all(|w| w[1] > w[0]),
        "{what}: before {before}, after {after:?}"
    );
}

fn oldest_and_newest() -> (PathBuf, PathBuf) {
    let mut list: Vec<(QemuVersion, PathBuf)> = qemus()
        .into_iter()
        .map(|q| (qemu_version(&q).parse().expect("a QEMU version"), q))
        .collect();
    list.sort_by_key(|(v, _)| *v);
    (list[0].1.clone(), list[list.len() - 1].1.clone())
}

fn minor(qemu: &Path) -> String {
    let v: QemuVersion = qemu_version(qemu).parse().unwrap();
    format!("{}.{}", v.major, v.minor)
}

const TRANSPORTS: [&str; 4] = ["file", "live-local", "live-tcp", "instant"];

/// The test guest's checks: ticks, its banner never again, its sweep region's first MiB.
fn test_guest_checks(qemu: &Path, transport: &str) -> Vec<String> {
    [
        "--qemu",
        &qemu.display().to_string(),
        "--transport",
        transport,
        "--ready",
        "tick 3",
        "--counter",
        COUNTER,
        "--reject",
        BANNER,
        "--expect",
        "^tick",
        "--ram",
        "0x400000:1M",
    ]
    .map(String::from)
    .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_snapshot_roundtrip_carries_on_from_the_instant_the_snapshot_began() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = test_guest_checks(&qemu, "snapshot");
        // A snapshot holds the instant it began; the source's RAM after it
        // is later: judged by the counter alone.
        let ram = args.iter().position(|a| a == "--ram").unwrap();
        args.drain(ram..ram + 2);
        let (code, report) = roundtrip(&strs(&args), &recipe_options(dir.path()));
        let what = format!("{} snapshot", qemu.display());
        assert_passed(code, &report, &what);
        assert_continued(&report, &what);
        // Asked to compare RAM, it says why it cannot.
        let (code, report) = roundtrip(
            &strs(&test_guest_checks(&qemu, "snapshot")),
            &recipe_options(dir.path()),
        );
        assert_ne!(code, 0, "{report:#}");
        assert!(
            report
                .to_string()
                .contains("a snapshot holds the instant it began"),
            "{report:#}"
        );
    }
}

#[test]
fn the_test_guest_carries_on_through_every_transport_on_every_qemu() {
    for qemu in qemus() {
        for transport in TRANSPORTS {
            let dir = tempfile::tempdir().unwrap();
            let (code, report) = roundtrip(
                &strs(&test_guest_checks(&qemu, transport)),
                &recipe_options(dir.path()),
            );
            let what = format!("{} {transport}", qemu.display());
            assert_passed(code, &report, &what);
            assert_continued(&report, &what);
            let checks: Vec<&str> = report["checks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["check"].as_str().unwrap())
                .collect();
            for c in ["ready", "ram", "counter", "expect", "reject"] {
                assert!(checks.contains(&c), "{what}: no {c} check in {checks:?}");
            }
            // The instant transport restores by mapping, not by loading.
            let mapped = report["checks"].as_array().unwrap().iter().any(|c| {
                c["check"] == "restore"
                    && c["detail"]
                        .as_str()
                        .unwrap()
                        .contains("mapped the RAM image")
            });
            assert_eq!(mapped, transport == "instant", "{what}: {report:#}");
        }
    }
}

#[test]
fn a_test_guest_saved_on_the_oldest_qemu_carries_on_on_the_newest() {
    let (oldest, newest) = oldest_and_newest();
    for transport in TRANSPORTS {
        let dir = tempfile::tempdir().unwrap();
        let mut args = test_guest_checks(&oldest, transport);
        args.extend(["--restore-qemu".into(), newest.display().to_string()]);
        let (code, report) = roundtrip(&strs(&args), &recipe_options(dir.path()));
        let what = format!("{} -> {} {transport}", oldest.display(), newest.display());
        assert_passed(code, &report, &what);
        assert_continued(&report, &what);
        assert_eq!(report["restore_qemu"], qemu_version(&newest), "{what}");
        if oldest != newest {
            assert_eq!(
                report["pinned_machine"]["machine"],
                format!("pc-i440fx-{}", minor(&oldest)),
                "{what}: {report:#}"
            );
        }
    }
}

/// Debian's kernel and the busybox initramfs whose init ticks.
fn linux_options(append: Option<&str>) -> Vec<String> {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: run the tests with `cargo xtask test`, which fetches the Linux guest")
        })
    };
    vec![
        "-accel".into(),
        "tcg".into(),
        "-m".into(),
        "256".into(),
        "-nodefaults".into(),
        "-serial".into(),
        "stdio".into(),
        "-kernel".into(),
        var("LINUX_GUEST_KERNEL"),
        "-initrd".into(),
        var("LINUX_GUEST_INITRD"),
        "-append".into(),
        append.map_or_else(|| var("LINUX_GUEST_APPEND"), String::from),
    ]
}

#[test]
fn the_linux_guest_carries_on_on_every_qemu_and_across_the_upgrade() {
    let (oldest, newest) = oldest_and_newest();
    let mut runs: Vec<(PathBuf, PathBuf)> = qemus().into_iter().map(|q| (q.clone(), q)).collect();
    if oldest != newest {
        runs.push((oldest, newest));
    }
    for (from, to) in runs {
        let (code, report) = roundtrip(
            &[
                "--qemu",
                &from.display().to_string(),
                "--restore-qemu",
                &to.display().to_string(),
                "--ready",
                "tick 3",
                "--counter",
                COUNTER,
                "--reject",
                BANNER,
                "--reject",
                "RAM MISMATCH",
            ],
            &linux_options(None),
        );
        let what = format!("Linux {} -> {}", from.display(), to.display());
        assert_passed(code, &report, &what);
        assert_continued(&report, &what);
    }
}

#[test]
fn a_guest_that_does_not_tick_is_judged_by_its_lines() {
    // The Linux guest's kernel with a shell for init that says it is alive, with no number.
    let append = r#"console=ttyS0 quiet panic=-1 no_timer_check rdinit=/bin/busybox -- sh -c "echo BOOT; while :; do echo alive; sleep 0.2; done""#;
    let options = linux_options(Some(append));
    let (code, report) = roundtrip(
        &[
            "--ready", "^alive", "--expect", "^alive", "--reject", BANNER,
        ],
        &options,
    );
    assert_passed(code, &report, "a guest without a counter");
    assert!(report["counter_before"].is_null(), "{report:#}");
}

#[test]
fn a_vm_json_in_vmrunners_shape_boots_through_the_chainloader_and_carries_on() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let vm_json = root.join("fixtures/vmrunner/vm.json");
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("junit.xml");
    let workdir = dir.path().join("work");
    let (code, report) = roundtrip(
        &[
            "--vm-json",
            &vm_json.display().to_string(),
            "--chainloader",
            &guest().display().to_string(),
            "--append",
            "hello",
            "--ready",
            "tick 3",
            "--counter",
            COUNTER,
            "--reject",
            BANNER,
            "--workdir",
            &workdir.display().to_string(),
            "--junit",
            &junit.display().to_string(),
        ],
        &["-accel".into(), "tcg".into()],
    );
    assert_passed(code, &report, "vm.json");
    assert_continued(&report, "vm.json");
    // The guest got what vmrunner gives a 64-bit service: the chainloader's
    // -append, and the image with its arguments as the first module.
    let serial = std::fs::read_to_string(workdir.join("serial.log")).unwrap();
    let banner = serial.lines().next().unwrap();
    let image = std::fs::read(root.join("fixtures/vmrunner/hello.bin")).unwrap();
    assert!(
        banner.contains("cmdline=\"hello\"")
            && banner.contains(&format!("module_size={}", image.len()))
            && banner.contains("modules=2")
            && banner.contains("mem_kib=316"),
        "{banner}"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("<testsuite name=\"roundtrip vm\"") && xml.contains("failures=\"0\""),
        "{xml}"
    );
}

/// Waits for a VM's HMP socket to answer from a QEMU other than `not`, running.
fn running_qemu_at(sock: &Path, not: Option<u32>, deadline: Instant) -> qemu_monitor::HmpSession {
    let options = Options {
        timeout: Duration::from_secs(10),
        wait_socket: None,
        mux_escape: false,
    };
    loop {
        assert!(
            Instant::now() < deadline,
            "no running QEMU at {}",
            sock.display()
        );
        if let Ok(mut s) = qemu_monitor::connect_hmp(sock.to_path_buf(), &options) {
            let new = s.peer_pid().ok().is_some_and(|p| Some(p) != not);
            let running = s
                .command("info status")
                .is_ok_and(|t| t.contains("running"));
            if new && running {
                return s;
            }
        }
        // Polled: the socket appears when a QEMU starts, with no event to wait on.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a check of the test guest whose restored guest is reset from its
/// monitor as soon as it runs: it boots afresh, as a broken restore would.
fn with_reset_after_restore(checks: &[&str]) -> (i32, Value) {
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().join("work");
    let sock = dir.path().join("hmp.sock");
    let mut options = recipe_options(dir.path());
    options.extend([
        "-monitor".into(),
        format!("unix:{},server,nowait", sock.display()),
    ]);
    let manifest = workdir.join("state.manifest.json");
    let reset = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let source = running_qemu_at(&sock, None, deadline).peer_pid().unwrap();
            while !manifest.exists() {
                assert!(Instant::now() < deadline, "the save did not finish");
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut dest = running_qemu_at(&sock, Some(source), deadline);
            dest.command("system_reset").unwrap();
        })
    };
    let mut args = vec!["--workdir", workdir.to_str().unwrap()];
    args.extend_from_slice(checks);
    let out = roundtrip(&args, &options);
    reset.join().expect("the reset was sent");
    out
}

#[test]
fn each_way_a_restore_goes_wrong_is_named_with_its_exit_status() {
    let qemu = qemus().remove(0);
    let q = qemu.display().to_string();
    let kind = |r: &Value| r["failure"]["kind"].as_str().unwrap_or("none").to_string();

    // Not ready in time: 66.
    let dir = tempfile::tempdir().unwrap();
    let (code, report) = roundtrip(
        &["--qemu", &q, "--ready", "never printed", "--timeout", "3"],
        &recipe_options(dir.path()),
    );
    assert_eq!(
        (code, kind(&report).as_str()),
        (66, "timeout"),
        "{report:#}"
    );

    // QEMU does not start: 72.
    let (code, report) = roundtrip(
        &["--qemu", &q, "--ready", "tick 1"],
        &["-no-such-option".to_string()],
    );
    assert_eq!(
        (code, kind(&report).as_str()),
        (72, "boot-failed"),
        "{report:#}"
    );

    // The guest panics (here: a line the check is told means it): 67.
    let (code, report) = roundtrip(
        &["--qemu", &q, "--ready", "tick 5", "--panic", "^tick 2$"],
        &recipe_options(dir.path()),
    );
    assert_eq!((code, kind(&report).as_str()), (67, "panic"), "{report:#}");

    // An expected line never comes: 84.
    let (code, report) = roundtrip(
        &[
            "--qemu",
            &q,
            "--ready",
            "tick 2",
            "--expect",
            "^all services started$",
            "--timeout",
            "5",
        ],
        &recipe_options(dir.path()),
    );
    assert_eq!(
        (code, kind(&report).as_str()),
        (84, "expected-missing"),
        "{report:#}"
    );

    // QEMU refuses the state (a restoring QEMU that gives the VM twice the RAM): 81.
    let wrapper = dir.path().join("qemu-with-more-ram");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec {} \"$@\" -m 64\n", qemu.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (code, report) = roundtrip(
        &[
            "--qemu",
            &q,
            "--restore-qemu",
            wrapper.to_str().unwrap(),
            "--ready",
            "tick 2",
            "--counter",
            COUNTER,
        ],
        &recipe_options(dir.path()),
    );
    assert_eq!(
        (code, kind(&report).as_str()),
        (81, "restore-refused"),
        "{report:#}"
    );
    assert!(
        report["failure"]["detail"]
            .as_str()
            .unwrap()
            .contains("RAM"),
        "{report:#}"
    );

    // The restored guest boots afresh: its banner again is 82 ...
    let (code, report) = with_reset_after_restore(&[
        "--qemu",
        &q,
        "--ready",
        "tick 2",
        "--reject",
        BANNER,
        "--expect",
        "^a line that never comes$",
    ]);
    assert_eq!(
        (code, kind(&report).as_str()),
        (82, "rebooted"),
        "{report:#}"
    );

    // ... and its counter starting over is 83.
    let (code, report) = with_reset_after_restore(&[
        "--qemu",
        &q,
        "--ready",
        "tick 2",
        "--counter",
        COUNTER,
        "--counter-after",
        "1000",
    ]);
    assert_eq!(
        (code, kind(&report).as_str()),
        (83, "counter-restarted"),
        "{report:#}"
    );
}
