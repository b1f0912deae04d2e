//! `qemu-migrate inspect` on a bare state file from the user's recipe: what
//! it says matches what the saving QEMU reported; `--check` and `restore`
//! refuse options that cannot work, and the right ones restore it.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use recipe_tests::{bin, qemus, recipe_options, spawn_lines, tick, Vm};

const WAIT: Duration = Duration::from_secs(60);

/// `info ramblock`: (name, used bytes) of every block.
fn ramblocks(vm: &mut Vm) -> Vec<(String, u64)> {
    let text = vm.qmp().human_command("info ramblock").unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let used = u64::from_str_radix(f.get(4)?.trim_start_matches("0x"), 16).ok()?;
            Some((f[0].to_string(), used))
        })
        .collect()
}

#[test]
fn a_bare_recipe_file_is_described_checked_and_restored() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = recipe_options(dir.path());
        options.extend(["-device".to_string(), "virtio-rng-pci".to_string()]);
        let (mut vm, serial) = Vm::start_with_serial(&qemu, &options);
        serial.wait_for(0, WAIT, "tick 2", |l| tick(l) == Some(2));
        let blocks = ramblocks(&mut vm);
        let machine = vm
            .qmp()
            .execute(
                "qom-get",
                Some(serde_json::json!({"path": "/machine", "property": "type"})),
            )
            .unwrap();
        let machine = machine
            .as_str()
            .unwrap()
            .trim_end_matches("-machine")
            .to_string();

        // The recipe's own line, through monitor-send.
        vm.enable_migration_events();
        let statefile = dir.path().join("statefile");
        let mut send = Command::new(bin("monitor-send"))
            .args(["-w", "0", "-U"])
            .arg(&vm.hmp)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(
            send.stdin.take().unwrap(),
            "migrate \"exec:cat > {}\"\n",
            statefile.display()
        )
        .unwrap();
        assert!(send.wait().unwrap().success());
        assert_eq!(vm.wait_migration_end(WAIT), "completed");
        let last_saved = serial
            .snapshot()
            .iter()
            .filter_map(|l| tick(l))
            .max()
            .unwrap();

        let out = Command::new(bin("qemu-migrate"))
            .args(["inspect", "--json"])
            .arg(&statefile)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let stream = &report["stream"];
        assert_eq!(stream["machine_type"], machine.as_str());
        assert_eq!(stream["main_ram"]["mib"], 32);
        let seen: Vec<(String, u64)> = stream["ram_blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_string(),
                    b["size"].as_u64().unwrap(),
                )
            })
            .collect();
        let mut want = blocks.clone();
        want.sort();
        let mut got = seen.clone();
        got.sort();
        assert_eq!(got, want, "RAM blocks: inspect vs info ramblock");
        assert!(
            stream["devices"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["name"] == "0000:00:02.0/virtio-rng"),
            "{stream}"
        );
        assert_eq!(report["restorable"], true);

        // Options that cannot restore it are named before anything starts.
        let mut wrong = options.clone();
        let m = wrong.iter().position(|a| a == "-m").unwrap();
        wrong[m + 1] = "64".into();
        let out = Command::new(bin("qemu-migrate"))
            .args(["inspect", "--check", "--qemu"])
            .arg(&qemu)
            .arg(&statefile)
            .arg("--")
            .args(&wrong)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(
                "RAM: the state holds 32 MiB of guest RAM (-m 32); these options give 64 MiB"
            ),
            "{err}"
        );

        let out = Command::new(bin("qemu-migrate"))
            .args(["inspect", "--check", "--qemu"])
            .arg(&qemu)
            .arg(&statefile)
            .arg("--")
            .args(&options)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("these options can restore it"));

        // And with them, it restores and carries on.
        drop(vm);
        let (mut restore, lines) = spawn_lines(
            Command::new(bin("qemu-migrate"))
                .args(["restore", "--qemu"])
                .arg(&qemu)
                .arg(&statefile)
                .arg("--")
                .args(&options),
        );
        let first = lines.wait_for(0, WAIT, "a tick after restore", |l| tick(l).is_some());
        let after = lines.snapshot();
        assert!(!after.iter().any(|l| l.starts_with("BOOT")), "{after:?}");
        let n = tick(&after[first]).unwrap();
        assert!(
            n > last_saved && n <= last_saved + 2,
            "first tick {n}, last saved {last_saved}"
        );
        // A signal to qemu-migrate reaches the VM it runs in the foreground.
        // SAFETY: a signal to a process this test started.
        unsafe { libc::kill(restore.id() as i32, libc::SIGTERM) };
        restore.wait().unwrap();
    }
}
