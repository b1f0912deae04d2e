//! TCP monitors (`-monitor tcp:127.0.0.1:PORT,server,nowait`), reached as
//! recipes reach them (`nc HOST PORT`, `socat - TCP:HOST:PORT`, and
//! `monitor-send tcp:HOST:PORT`), with the same guarantee as a unix socket:
//! 300 `stop`s through each form, each checked over QMP.

use std::io::Write;
use std::process::{Command, Stdio};

use recipe_tests::{bin, free_port, qemus, Vm};

const RUNS: usize = 300;

#[test]
fn every_form_delivers_every_command_over_tcp() {
    let links = tempfile::tempdir().unwrap();
    for name in ["nc", "socat"] {
        std::os::unix::fs::symlink(bin("monitor-send"), links.path().join(name)).unwrap();
    }
    for qemu in qemus() {
        let port = free_port();
        let monitor = format!("tcp:127.0.0.1:{port},server,nowait");
        let mut vm = Vm::start(&qemu, &["-M", "none", "-monitor", &monitor]);
        let forms: Vec<(&str, std::path::PathBuf, Vec<String>)> = vec![
            (
                "nc HOST PORT -w 0",
                links.path().join("nc"),
                vec![
                    "-w".into(),
                    "0".into(),
                    "127.0.0.1".into(),
                    port.to_string(),
                ],
            ),
            (
                "nc localhost PORT",
                links.path().join("nc"),
                vec!["localhost".into(), port.to_string()],
            ),
            (
                "socat -u - TCP:HOST:PORT",
                links.path().join("socat"),
                vec!["-u".into(), "-".into(), format!("TCP:127.0.0.1:{port}")],
            ),
            (
                "monitor-send tcp:HOST:PORT",
                bin("monitor-send"),
                vec![format!("tcp:127.0.0.1:{port}")],
            ),
        ];
        for (name, program, args) in forms {
            let mut executed = 0;
            for _ in 0..RUNS {
                vm.qmp().execute("cont", None).expect("cont");
                let mut child = Command::new(&program)
                    .args(&args)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                child.stdin.take().unwrap().write_all(b"stop\n").unwrap();
                let out = child.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "{name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                if vm.status() == "paused" {
                    executed += 1;
                }
            }
            assert_eq!(
                executed,
                RUNS,
                "{name} on {}: {executed}/{RUNS} stops executed",
                qemu.display()
            );
        }
    }
}
