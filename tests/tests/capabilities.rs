//! A VM left with migration capabilities that need a two-way or
//! multi-channel stream (postcopy, a return path, multifd), by an earlier
//! migration or by hand, is saved all the same: the save turns them off for
//! its one-way stream and puts them back, and the save restores.

use recipe_tests::{
    guest_logged_to, log_ticks, migrate, monitor_quit, qemus, wait_log, wait_tick_above, Vm,
};
use serde_json::json;

/// Sets QEMU takes together (postcopy does not go with multifd).
const TWO_WAY: [&[&str]; 2] = [&["return-path", "postcopy-ram"], &["multifd"]];

fn capabilities_on(vm: &mut Vm) -> Vec<String> {
    let caps = vm
        .qmp()
        .execute("query-migrate-capabilities", None)
        .unwrap();
    caps.as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == true)
        .map(|c| c["capability"].as_str().unwrap().to_string())
        .collect()
}

fn turn_on(vm: &mut Vm, set: &[&str]) {
    let caps: Vec<_> = set
        .iter()
        .map(|c| json!({"capability": c, "state": true}))
        .collect();
    vm.qmp()
        .execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )
        .unwrap();
}

#[test]
fn a_vm_left_with_postcopy_and_multifd_on_is_saved_and_snapshotted_and_keeps_its_settings() {
    for (qemu, set) in qemus()
        .into_iter()
        .flat_map(|q| TWO_WAY.map(|set| (q.clone(), set)))
    {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut vm = Vm::start(&qemu, &guest_logged_to(&log));
        wait_tick_above(&log, 1);
        turn_on(&mut vm, set);
        let before = capabilities_on(&mut vm);

        for (name, verb) in [("snap", "snapshot"), ("state", "save")] {
            let out = migrate()
                .args([verb, "--then", "resume", "--monitor"])
                .arg(&vm.hmp)
                .arg(dir.path().join(name))
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{verb}: {err}");
            assert!(!err.contains("not a snapshot"), "{verb}: {err}");
            assert_eq!(
                capabilities_on(&mut vm),
                before,
                "{verb}: settings put back"
            );
            assert_eq!(vm.status(), "running");
        }

        let _ = vm.qmp().execute("quit", None);
        vm.wait_exit();
        let seen = log_ticks(&log).len();
        let (out, pid) = recipe_tests::restore_daemonized(&dir.path().join("state"), &[]);
        let _end = recipe_tests::EndOnDrop(pid);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_log(&log, "the restored guest ticking", |t| t.len() > seen + 1);
        monitor_quit(&vm.hmp);
    }
}

#[test]
fn a_save_killed_midway_gets_the_capabilities_it_turned_off_put_back_by_its_watchdog() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut options = guest_logged_to(&log);
        let m = options.iter().position(|o| o == "-m").unwrap();
        options[m + 1] = "256".into();
        options.extend(["-append".into(), "fill=200".into()]);
        let mut vm = Vm::start(&qemu, &options);
        wait_tick_above(&log, 1);
        turn_on(&mut vm, TWO_WAY[0]);
        let before = capabilities_on(&mut vm);

        // Capped at 10 MiB/s: killed once the stream flows.
        let mut save = migrate()
            .args([
                "--json",
                "save",
                "--bandwidth",
                "10",
                "--then",
                "resume",
                "--monitor",
            ])
            .arg(&vm.hmp)
            .arg(dir.path().join("state"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(save.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "the save ended early"
            );
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["done"].as_u64().unwrap_or(0) > 0 {
                break;
            }
        }
        save.kill().unwrap();
        // Its stderr ends when the watchdog, which shares it, is done.
        let end = save.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&end.stderr);
        assert!(err.contains("the saving process died"), "{err}");
        assert_eq!(capabilities_on(&mut vm), before, "{err}");
        assert_eq!(vm.status(), "running", "{err}");
        let _ = vm.qmp().execute("quit", None);
        vm.wait_exit();
    }
}
