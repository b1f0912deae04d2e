//! `qemu-migrate save --instant` against a real QEMU: guest RAM goes into
//! `STATE.ram`, a sparse image the restore maps instead of loading. The
//! restored guest (and a clone beside it) carries on where it was saved;
//! a damaged image is refused before QEMU starts; `export` gives back one
//! plain stream that QEMU restores by hand; where the layout cannot serve,
//! the save says so and writes a plain stream.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use recipe_tests::{
    assert_carries_on, bin, migrate, qemus, recipe_options, spawn_lines, tick, Lines, Vm,
};

const WAIT: Duration = Duration::from_secs(60);

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A ticking recipe VM saved with `--instant --then quit`; its last tick, and
/// the ended source (its directory holds the sockets the restored VM reuses).
fn saved_instant(qemu: &Path, dir: &Path, extra: &[&str]) -> (PathBuf, u64, Vm) {
    let mut options = recipe_options(dir);
    options.extend(extra.iter().map(|s| s.to_string()));
    let (mut source, serial) = Vm::start_ticking(qemu, &options);
    serial.wait_for(0, WAIT, "tick 2", |l| tick(l) == Some(2));
    let statefile = dir.join("state");
    ok(migrate()
        .args(["save", "--instant", "--then", "quit", "--monitor"])
        .arg(&source.hmp)
        .arg(&statefile)
        .output()
        .unwrap());
    assert!(source.wait_exit().success(), "--then quit ends the source");
    let last = serial
        .snapshot()
        .iter()
        .filter_map(|l| tick(l))
        .max()
        .unwrap();
    (statefile, last, source)
}

/// A foreground `qemu-migrate restore`, ended (with its QEMU, to which it
/// passes the signal on) if the test fails before it quits the VM.
struct Restored(std::process::Child);

impl Restored {
    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.0.wait()
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: a signal to the restore this test started.
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
}

fn restore(args: &[&str], statefile: &Path) -> (Restored, Lines) {
    let (child, lines) = spawn_lines(migrate().arg("restore").args(args).arg(statefile));
    (Restored(child), lines)
}

fn quit(sock: &Path) {
    let q = Command::new(bin("monitor-send"))
        .arg(sock)
        .arg("quit")
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
}

#[test]
fn an_instant_save_restores_and_a_clone_runs_beside_it() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (statefile, last, source) = saved_instant(&qemu, dir.path(), &[]);
        let image = dir.path().join("state.ram");
        let meta = std::fs::metadata(&image).unwrap();
        assert_eq!(meta.len(), 32 << 20, "the image is the guest's RAM size");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("state.manifest.json")).unwrap())
                .unwrap();
        let data = manifest["instant"]["data_pages"].as_u64().unwrap() * 4096;
        let allocated = meta.blocks() * 512;
        assert!(
            allocated < meta.len() && allocated <= data + (1 << 20),
            "zero pages are holes: {allocated} bytes allocated for {data} of data"
        );
        assert!(
            std::fs::metadata(&statefile).unwrap().len() < 4 << 20,
            "the stream carries no guest RAM"
        );

        let (mut first, first_lines) = restore(&[], &statefile);
        assert_carries_on(&qemu, &first_lines, last);

        // A clone, while the first runs: its own monitor socket.
        let (mut clone, clone_lines) = restore(&["--clone"], &statefile);
        assert_carries_on(&qemu, &clone_lines, last);
        let hmp = source.hmp.clone();
        let clone_hmp = source.dir.path().join("hmp.sock.clone1");
        assert!(clone_hmp.exists(), "the clone has its own monitor socket");
        quit(&clone_hmp);
        assert!(clone.wait().unwrap().success());
        // The first VM kept its socket, and ran on beside the clone.
        let before = first_lines.snapshot().len();
        first_lines.wait_for(before, WAIT, "the first VM still ticking", |l| {
            tick(l).is_some()
        });
        // The restored VM is the user's VM: saved again, its options are its
        // own (not the image mapping), and it restores again.
        let again = dir.path().join("again");
        ok(migrate()
            .args(["save", "--instant", "--then", "quit", "--monitor"])
            .arg(&hmp)
            .arg(&again)
            .output()
            .unwrap());
        assert!(first.wait().unwrap().success());
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("again.manifest.json")).unwrap())
                .unwrap();
        assert!(!m["instant"].is_null(), "{m}");
        assert!(
            !m["args"].to_string().contains("memory-backend"),
            "{}",
            m["args"]
        );
        let last = first_lines
            .snapshot()
            .iter()
            .filter_map(|l| tick(l))
            .max()
            .unwrap();
        let (mut second, second_lines) = restore(&[], &again);
        assert_carries_on(&qemu, &second_lines, last);
        quit(&hmp);
        assert!(second.wait().unwrap().success());
    }
}

#[test]
fn a_damaged_or_missing_ram_image_is_refused_before_qemu_starts() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (statefile, _, _source) = saved_instant(&qemu, dir.path(), &[]);
        let image = dir.path().join("state.ram");
        let good = std::fs::read(&image).unwrap();
        let restore_err = |extra: &[&str]| {
            let out = migrate()
                .arg("restore")
                .args(extra)
                .arg(&statefile)
                .output()
                .unwrap();
            assert_eq!(
                out.status.code(),
                Some(2),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stderr).into_owned()
        };

        // One byte of guest RAM changed: the file is no longer the one saved,
        // so it is read whole and its checksum compared.
        let at = good.iter().position(|&b| b != 0).unwrap();
        let mut flipped = good.clone();
        flipped[at] ^= 0x40;
        std::fs::write(&image, &flipped).unwrap();
        let err = restore_err(&[]);
        // Named by its chunk: 4 MiB of the 32.
        let chunk = at >> 22;
        let named = format!(
            "chunk {chunk} of 8 (bytes {}-{}",
            chunk << 22,
            ((chunk + 1) << 22) - 1
        );
        assert!(err.contains(&named), "{err}");
        assert!(err.contains("is damaged: its checksum is"), "{err}");

        std::fs::write(&image, &good[..good.len() - 4096]).unwrap();
        let err = restore_err(&[]);
        assert!(err.contains("incomplete or altered"), "{err}");

        std::fs::remove_file(&image).unwrap();
        let err = restore_err(&[]);
        assert!(err.contains("the RAM image of"), "{err}");
        assert!(err.contains("is missing"), "{err}");

        // Put back (a new file: not the one saved), it passes the full check.
        std::fs::write(&image, &good).unwrap();
        let report = migrate()
            .args(["inspect", "--check"])
            .arg(&statefile)
            .output()
            .unwrap();
        assert!(
            report.status.success(),
            "{}",
            String::from_utf8_lossy(&report.stderr)
        );
        let text = String::from_utf8_lossy(&report.stdout);
        assert!(
            text.contains("RAM image state.ram: read in full: every chunk's checksum matches"),
            "{text}"
        );

        // The image given where the state file is meant: named.
        let out = migrate().arg("inspect").arg(&image).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("this is the RAM image of the instant save"),
            "{err}"
        );
    }
}

#[test]
fn an_export_is_a_plain_stream_that_qemu_restores_by_hand() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (statefile, last, _source) = saved_instant(&qemu, dir.path(), &[]);
        let plain = dir.path().join("plain");
        let out = migrate()
            .arg("export")
            .arg(&statefile)
            .stdout(std::fs::File::create(&plain).unwrap())
            .output()
            .unwrap();
        ok(out);
        let out = migrate()
            .args(["inspect", "--json"])
            .arg(&plain)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["stream"]["complete"], true, "{v}");
        let ram = v["stream"]["ram_blocks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "pc.ram")
            .unwrap()
            .clone();
        let pages = ram["normal_pages"].as_u64().unwrap() + ram["zero_pages"].as_u64().unwrap();
        assert_eq!(
            pages * 4096,
            32 << 20,
            "every page of pc.ram is in the exported stream"
        );

        // By hand, as the recipe restores: the exported stream through exec:.
        let mut options = recipe_options(dir.path());
        options.extend([
            "-incoming".to_string(),
            format!(
                "exec: {} export {}",
                bin("qemu-migrate").display(),
                statefile.display()
            ),
        ]);
        let (mut vm, lines) = Vm::start_with_serial(&qemu, &options);
        vm.enable_migration_events();
        // Saved paused (qemu-migrate pauses first): it loads paused, as the recipe's would.
        let deadline = std::time::Instant::now() + WAIT;
        while vm.status() != "paused" {
            assert!(std::time::Instant::now() < deadline, "{}", vm.stderr());
            vm.qmp().next_event(Duration::from_millis(50)).ok();
        }
        vm.qmp().execute("cont", None).unwrap();
        assert_carries_on(&qemu, &lines, last);
    }
}

#[test]
fn where_the_layout_cannot_serve_a_plain_stream_is_saved_and_the_reason_said() {
    for qemu in qemus() {
        // A balloon gives pages back by punching holes into the file behind
        // guest RAM: only QEMU 8.2 and later can map the image read-only,
        // which stops it (see instant_shapes.rs for those).
        let old = !recipe_tests::at_least(&qemu, 8, 2);
        let mut cases = vec![(
            vec![
                "-object".to_string(),
                "memory-backend-file,id=shared,size=32M,mem-path=MEM,share=on".to_string(),
                "-machine".to_string(),
                "memory-backend=shared".to_string(),
            ],
            "share=on",
        )];
        if old {
            cases.push((
                vec!["-device".to_string(), "virtio-balloon-pci".to_string()],
                "virtio-balloon",
            ));
        }
        for (extra, reason) in cases {
            let dir = tempfile::tempdir().unwrap();
            let mut options = recipe_options(dir.path());
            let mem = dir.path().join("guest-memory").display().to_string();
            options.extend(extra.iter().map(|a| a.replace("MEM", &mem)));
            let (source, _) = Vm::start_ticking(&qemu, &options);
            let statefile = dir.path().join("state");
            let err = ok(migrate()
                .args(["save", "--instant", "--monitor"])
                .arg(&source.hmp)
                .arg(&statefile)
                .output()
                .unwrap());
            assert!(
                err.contains("not an instant save") && err.contains(reason),
                "{err}"
            );
            assert!(statefile.exists());
            assert!(!dir.path().join("state.ram").exists());
        }
    }
}

#[test]
fn a_clone_that_would_share_a_writable_disk_is_refused_in_words() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let drive = format!("file={},format=raw,if=ide", disk.display());
        let (statefile, _, _source) = saved_instant(&qemu, dir.path(), &["-drive", &drive]);
        let out = migrate()
            .args(["restore", "--clone"])
            .arg(&statefile)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("writable disk") && err.contains("disk.img"),
            "{err}"
        );
    }
}

#[test]
fn a_live_instant_save_keeps_the_last_copy_of_every_page() {
    // Saved while the guest sweeps its RAM: pages are sent again as they
    // change, and the image must hold the last copy of each.
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let options = recipe_options(dir.path());
        let (mut source, serial) = Vm::start_ticking(&qemu, &options);
        let banner = serial.snapshot()
            [serial.wait_for(0, WAIT, "the banner", |l| l.starts_with("BOOT "))]
        .clone();
        let (start, end) = test_guest::Banner::parse(&banner).unwrap().sweep.unwrap();
        let statefile = dir.path().join("state");
        ok(migrate()
            .args(["save", "--instant", "--live", "--then", "quit", "--monitor"])
            .arg(&source.hmp)
            .arg(&statefile)
            .output()
            .unwrap());
        assert!(source.wait_exit().success());
        let last = serial
            .snapshot()
            .iter()
            .filter_map(|l| tick(l))
            .max()
            .unwrap();

        let (mut restored, lines) = restore(&[], &statefile);
        assert_carries_on(&qemu, &lines, last);
        let dump = dir.path().join("sweep.bin");
        for cmd in [
            "stop".to_string(),
            format!("pmemsave {start} {} \"{}\"", end - start, dump.display()),
        ] {
            let out = Command::new(bin("monitor-send"))
                .arg(&source.hmp)
                .arg(&cmd)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        test_guest::check_sweep(&std::fs::read(&dump).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", qemu.display()));
        quit(&source.hmp);
        assert!(restored.wait().unwrap().success());
    }
}

/// Clones of one instant save started at the same moment all run, each with
/// its own number: only a second restore of the VM itself is refused.
#[test]
fn clones_started_together_all_run() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (statefile, _, source) = saved_instant(&qemu, dir.path(), &[]);
        let clones: Vec<std::process::Child> = (0..3)
            .map(|i| {
                migrate()
                    .args(["restore", "--clone", "--daemonize", "--pidfile"])
                    .arg(dir.path().join(format!("clone-{i}.pid")))
                    .arg(&statefile)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<_> = clones
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        let mut pids = Vec::new();
        for i in 0..3 {
            if let Ok(p) = std::fs::read_to_string(dir.path().join(format!("clone-{i}.pid"))) {
                pids.push(p.trim().parse::<i32>().unwrap());
            }
        }
        for &pid in &pids {
            // SAFETY: a signal to a clone this test restored.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for out in &outs {
            assert!(
                out.status.success(),
                "{}: {}",
                qemu.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(pids.len(), 3);
        for n in 1..=3 {
            let hmp = source.dir.path().join(format!("hmp.sock.clone{n}"));
            assert!(hmp.exists(), "clone {n} has its own monitor socket");
        }
    }
}
