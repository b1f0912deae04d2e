//! Every argument form of monitor-send delivers every command: 300 `stop`s
//! through each, each checked over a separate QMP socket.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use recipe_tests::{bin, drop_in_dir, qemus, Vm};

const RUNS: usize = 300;

/// Sends `stop` through one form RUNS times, resuming the guest over QMP
/// before each, and counts how often QEMU really stopped.
fn stops_executed(vm: &mut Vm, program: &Path, args: &[String]) -> usize {
    let mut executed = 0;
    for _ in 0..RUNS {
        vm.qmp().execute("cont", None).expect("cont");
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child.stdin.take().unwrap().write_all(b"stop\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        if vm.status() == "paused" {
            executed += 1;
        }
    }
    executed
}

#[test]
fn every_form_delivers_every_command() {
    let links = drop_in_dir();
    let send = bin("monitor-send");
    for qemu in qemus() {
        let mut vm = Vm::none(&qemu);
        let sock = vm.hmp.display().to_string();
        let forms: Vec<(String, std::path::PathBuf, Vec<String>)> = vec![
            (
                "nc form, -w 0".into(),
                send.clone(),
                vec!["-w".into(), "0".into(), "-U".into(), sock.clone()],
            ),
            (
                "socat form, -u".into(),
                send.clone(),
                vec!["-u".into(), "-".into(), format!("unix-connect:{sock}")],
            ),
            ("native form".into(), send.clone(), vec![sock.clone()]),
            (
                "nc link".into(),
                links.path().join("nc"),
                vec!["-w".into(), "0".into(), "-U".into(), sock.clone()],
            ),
            (
                "socat link".into(),
                links.path().join("socat"),
                vec!["-u".into(), "-".into(), format!("unix-connect:{sock}")],
            ),
            (
                "socat link, shut-none".into(),
                links.path().join("socat"),
                vec!["-".into(), format!("UNIX:{sock},shut-none")],
            ),
            (
                "nc link, -q 0".into(),
                links.path().join("nc"),
                vec!["-q".into(), "0".into(), "-U".into(), sock.clone()],
            ),
            (
                "ncat form, --send-only".into(),
                send.clone(),
                vec!["--send-only".into(), "--unixsock".into(), sock.clone()],
            ),
        ];
        for (name, program, args) in forms {
            let n = stops_executed(&mut vm, &program, &args);
            assert_eq!(
                n,
                RUNS,
                "{name} on {}: {n}/{RUNS} stops executed",
                qemu.display()
            );
        }
    }
}
