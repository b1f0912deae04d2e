//! Disks as launchers give them, against a real QEMU: a libvirt-style
//! `-blockdev` chain (base ← mid ← top, each a `file` node under a `qcow2`
//! node), `-drive` with `if=none` and a device, `if=virtio`, `-hda`, IDE,
//! AHCI and SCSI disks, read-only disks, CD-ROMs, `file.locking=off`,
//! pflash firmware and its variables, `snapshot=on`, and qcow2 images that
//! name their backing file relative to themselves.
//!
//! The contract: a save then a restore carries on (the test guest keeps
//! ticking from where it was, with no second `BOOT` banner), the restored
//! QEMU opens each image once (`query-named-block-nodes` shows every node
//! on its own file), the manifest names the right file for each node, and a
//! checkpoint restores and reverts on a chain; what cannot be restored is
//! refused in words while the VM still runs. The test guest has no disk
//! driver: QEMU still creates, locks and migrates every disk device, which is
//! what the chains and the locks are about.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use qemu_monitor::BlockGraph;
use recipe_tests::{guest_logged_to, log_ticks, migrate, qemus, wait_log, wait_tick_above, Vm};
use serde_json::Value;

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

/// `qemu-img create -f qcow2 [-b BACKING -F qcow2] NAME 16M` in `dir`,
/// the backing file named as given (relative to the new image).
fn qcow2(dir: &Path, name: &str, backing: Option<&str>) -> PathBuf {
    let mut cmd = Command::new("qemu-img");
    cmd.current_dir(dir).args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = backing {
        cmd.args(["-b", b, "-F", "qcow2"]);
    }
    let out = cmd
        .args([name, "16M"])
        .output()
        .expect("qemu-img (package qemu-utils)");
    ok(&out);
    dir.join(name)
}

/// A raw file of `len` bytes.
fn raw(dir: &Path, name: &str, len: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    path
}

/// base ← mid ← top in `dir`, each naming the one below relative to itself.
fn chain(dir: &Path) -> [PathBuf; 3] {
    [
        qcow2(dir, "base.qcow2", None),
        qcow2(dir, "mid.qcow2", Some("base.qcow2")),
        qcow2(dir, "top.qcow2", Some("mid.qcow2")),
    ]
}

/// libvirt's options for the chain: a `file` node and a `qcow2` node per
/// image, each format node given the one below by name, the device on top.
fn libvirt_options(images: &[PathBuf; 3]) -> Vec<String> {
    let mut o = Vec::new();
    for (n, image) in [(3, &images[0]), (2, &images[1]), (1, &images[2])] {
        o.push("-blockdev".to_string());
        o.push(format!(
            r#"{{"driver":"file","filename":"{}","node-name":"libvirt-{n}-storage","auto-read-only":true,"discard":"unmap"}}"#,
            image.display()
        ));
        let backing = if n == 3 {
            "null".to_string()
        } else {
            format!("\"libvirt-{}-format\"", n + 1)
        };
        o.push("-blockdev".to_string());
        o.push(format!(
            r#"{{"node-name":"libvirt-{n}-format","read-only":{},"driver":"qcow2","file":"libvirt-{n}-storage","backing":{backing}}}"#,
            n != 1
        ));
    }
    o.extend(
        [
            "-device",
            "virtio-blk-pci,drive=libvirt-1-format,id=virtio-disk0",
        ]
        .map(String::from),
    );
    o
}

fn monitor_options() -> qemu_monitor::Options {
    qemu_monitor::Options {
        timeout: Duration::from_secs(30),
        wait_socket: None,
        mux_escape: false,
    }
}

/// The block graph of the QEMU behind the QMP socket `qmp`.
fn graph(qmp: &Path) -> BlockGraph {
    let mut m = qemu_monitor::connect(qmp.to_path_buf(), &monitor_options()).expect("monitor");
    m.block_graph().expect("the block graph")
}

/// The files the graph's protocol nodes read, each once: a file opened twice
/// fails the test. A temporary overlay (`snapshot=on`), unlinked as soon as
/// QEMU opened it, is left out.
fn files_opened_once(g: &BlockGraph, what: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = g
        .nodes
        .iter()
        .filter(|n| n.driver == "file")
        .filter_map(|n| n.path())
        .filter(|p| p.exists())
        .collect();
    files.sort();
    let mut unique = files.clone();
    unique.dedup();
    assert_eq!(files, unique, "{what}: a file opened twice: {g:#?}");
    files
}

/// The file node `name` of the graph reads.
fn file_of(g: &BlockGraph, name: &str) -> PathBuf {
    g.node(name)
        .and_then(|n| n.path())
        .unwrap_or_else(|| panic!("no node {name} with a file: {g:#?}"))
}

/// The manifest written beside `state`.
fn manifest(state: &Path) -> Value {
    let text = std::fs::read_to_string(format!("{}.manifest.json", state.display())).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// How many times the guest booted, by its banners in the log.
fn boots(log: &Path) -> usize {
    String::from_utf8_lossy(&std::fs::read(log).unwrap())
        .lines()
        .filter(|l| l.starts_with("BOOT "))
        .count()
}

/// A QEMU a restore left running in the background, ended when dropped.
struct Restored {
    pid: i32,
}

impl Restored {
    /// `qemu-migrate ARGS --daemonize --pidfile P STATE`, which must succeed.
    fn start(args: &[&str], state: &Path, dir: &Path) -> Restored {
        let pidfile = dir.join("restored.pid");
        let _ = std::fs::remove_file(&pidfile);
        ok(&migrate()
            .args(args)
            .args(["--daemonize", "--pidfile"])
            .arg(&pidfile)
            .arg(state)
            .output()
            .unwrap());
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Restored { pid }
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        // SAFETY: a signal to the QEMU this test restored.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        testkit::wait_gone(self.pid.unsigned_abs(), Duration::from_secs(30));
    }
}

/// The guest carried on in the log after a restore of a state saved at
/// tick `last`: more ticks, and still one banner.
fn carries_on(log: &Path, last: u64, what: &str) {
    wait_tick_above(log, last + 2);
    assert_eq!(boots(log), 1, "{what}: the guest booted again");
    // From the last tick before the save (the count may have gone back
    // before it, at a revert), one step at a time.
    let t = log_ticks(log);
    let at = t
        .iter()
        .rposition(|&n| n == last)
        .expect("the last tick saved");
    assert!(
        t[at..].windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: the count did not carry on from {last}: {t:?}"
    );
}

/// The last tick in the log once the VM is gone.
fn last_tick(log: &Path) -> u64 {
    *log_ticks(log).last().expect("ticks before the save")
}

#[test]
fn a_libvirt_chain_is_saved_and_restored_with_each_node_on_its_own_file() {
    for qemu in qemus() {
        let what = format!("{}", qemu.display());
        let dir = tempfile::tempdir().unwrap();
        let images = chain(dir.path());
        let log = dir.path().join("serial.log");
        let mut options = guest_logged_to(&log);
        options.extend(libvirt_options(&images));
        let mut source = Vm::start(&qemu, &options);
        wait_log(&log, "tick 3", |t| t.contains(&3));
        let state = dir.path().join("state");
        ok(&migrate()
            .args(["save", "--then", "quit", "--monitor"])
            .arg(&source.qmp_path)
            .arg(&state)
            .output()
            .unwrap());
        source.wait_exit();
        let last = last_tick(&log);

        // The options are recorded as they were given, and the disk guarded
        // is the one the guest writes to: the top image.
        let m = manifest(&state);
        let recorded: Vec<&str> = m["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        for given in libvirt_options(&images) {
            assert!(
                recorded.contains(&given.as_str()),
                "{what}: {given} not in {recorded:?}"
            );
        }
        let disks: Vec<&str> = m["files"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["role"] == "disk")
            .map(|f| f["path"].as_str().unwrap())
            .collect();
        assert_eq!(disks, [images[2].to_str().unwrap()], "{what}");

        let restored = Restored::start(&["restore"], &state, dir.path());
        carries_on(&log, last, &what);
        let each_on_its_own = |what: &str| {
            let g = graph(&source.qmp_path);
            assert_eq!(files_opened_once(&g, what).len(), 3, "{what}");
            for (n, image) in [(3, &images[0]), (2, &images[1]), (1, &images[2])] {
                assert_eq!(
                    file_of(&g, &format!("libvirt-{n}-storage")),
                    *image,
                    "{what}"
                );
                assert_eq!(
                    file_of(&g, &format!("libvirt-{n}-format")),
                    *image,
                    "{what}"
                );
            }
        };
        each_on_its_own(&what);

        // The options checked by a probe QEMU beside the running VM (another
        // path to the same QEMU, so the probe runs): it takes no image lock.
        let other = dir.path().join("qemu-system-x86_64");
        // A QEMU named bare (found on PATH) is linked by its full path: a
        // relative link of that name would point at itself.
        let target = if qemu.is_absolute() {
            qemu.clone()
        } else {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|d| d.join(&qemu))
                .find(|p| p.is_file())
                .unwrap_or_else(|| panic!("{} is not on PATH", qemu.display()))
        };
        std::os::unix::fs::symlink(&target, &other).unwrap();
        let out = migrate()
            .args(["inspect", "--check", "--qemu"])
            .arg(&other)
            .arg(&state)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            said.contains("these options can restore it"),
            "{what}: {said}"
        );
        each_on_its_own(&format!("{what}, after the probe"));

        // Moved live to a new QEMU on this host: QEMU hands the image locks
        // over at the switch, and the chain is opened as it was.
        let out = migrate()
            .args(["--json", "live", "--to", "local", "--monitor"])
            .arg(&source.qmp_path)
            .output()
            .unwrap();
        ok(&out);
        let done: Value = serde_json::from_str(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .expect("a result line"),
        )
        .unwrap();
        assert_eq!(done["state"], "running", "{what}: {done}");
        assert!(testkit::wait_gone(
            restored.pid.unsigned_abs(),
            Duration::from_secs(30)
        ));
        let moved = Restored {
            pid: done["pid"].as_i64().expect("the destination's pid") as i32,
        };
        let before = last_tick(&log);
        wait_tick_above(&log, before + 2);
        assert_eq!(boots(&log), 1, "{what}: the guest booted again");
        each_on_its_own(&format!("{what}, moved live"));

        // The same through the human monitor, which lists the nodes with `info block -n`.
        let state = dir.path().join("state-hmp");
        ok(&migrate()
            .args(["save", "--then", "quit", "--monitor"])
            .arg(&source.hmp)
            .arg(&state)
            .output()
            .unwrap());
        assert!(testkit::wait_gone(
            moved.pid.unsigned_abs(),
            Duration::from_secs(30)
        ));
        let last = last_tick(&log);
        let _restored = Restored::start(&["restore"], &state, dir.path());
        carries_on(&log, last, &what);
        each_on_its_own(&format!("{what}, through the human monitor"));
    }
}

#[test]
fn a_checkpoint_of_a_libvirt_chain_restores_and_reverts_on_fresh_overlays() {
    for qemu in qemus() {
        let what = format!("{}", qemu.display());
        let dir = tempfile::tempdir().unwrap();
        let images = chain(dir.path());
        let log = dir.path().join("serial.log");
        let mut options = guest_logged_to(&log);
        options.extend(libvirt_options(&images));
        let source = Vm::start(&qemu, &options);
        wait_log(&log, "tick 3", |t| t.contains(&3));
        let state = dir.path().join("ckpt");
        let said = ok(&migrate()
            .args(["checkpoint", "--then", "resume", "--monitor"])
            .arg(&source.qmp_path)
            .arg(&state)
            .output()
            .unwrap());
        let after = dir.path().join("top.qcow2.after-ckpt.1.qcow2");
        assert!(
            said.contains(&format!("the VM writes to {}", after.display())),
            "{what}: {said}"
        );

        // The frozen chain, each image under its own node.
        let m = manifest(&state);
        let disk = &m["checkpoint"]["disks"][0];
        assert_eq!(disk["node"], "libvirt-1-format", "{what}: {disk}");
        let recorded: Vec<(&str, &str)> = disk["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["path"].as_str().unwrap(), i["node"].as_str().unwrap()))
            .collect();
        assert_eq!(
            recorded,
            [
                (images[2].to_str().unwrap(), "libvirt-1-format"),
                (images[1].to_str().unwrap(), "libvirt-2-format"),
                (images[0].to_str().unwrap(), "libvirt-3-format"),
            ],
            "{what}"
        );
        let inspect = migrate().arg("inspect").arg(&state).output().unwrap();
        let text = String::from_utf8_lossy(&inspect.stdout);
        assert!(
            text.contains(&format!(
                "libvirt-1-format backing {} (qcow2, ",
                images[1].display()
            )) && text.contains(", node libvirt-2-format): intact"),
            "{what}: {text}"
        );
        let frozen: Vec<Vec<u8>> = images.iter().map(|i| std::fs::read(i).unwrap()).collect();

        // The source runs on its overlay over the frozen chain.
        let g = graph(&source.qmp_path);
        let files = files_opened_once(&g, &what);
        assert!(files.contains(&after), "{what}: {files:?}");
        let at_checkpoint = last_tick(&log);
        wait_tick_above(&log, at_checkpoint + 3);

        // Revert: the checkpoint's chain under a fresh overlay, the VM's own gone.
        let pidfile = dir.path().join("reverted.pid");
        ok(&migrate()
            .args(["revert", "--daemonize", "--pidfile"])
            .arg(&pidfile)
            .args(["--monitor"])
            .arg(&source.qmp_path)
            .arg(&state)
            .output()
            .unwrap());
        let reverted = Restored {
            pid: std::fs::read_to_string(&pidfile)
                .unwrap()
                .trim()
                .parse()
                .unwrap(),
        };
        // The source printed this tick before the revert, the reverted guest again.
        let again = at_checkpoint + 3;
        wait_log(&log, "the reverted guest's ticks", |t| {
            t.iter().filter(|&&n| n == again).count() >= 2
        });
        assert_eq!(boots(&log), 1, "{what}: the guest booted again");
        assert!(
            !after.exists(),
            "{what}: the discarded overlay is still there"
        );
        let g = graph(&source.qmp_path);
        let files = files_opened_once(&g, &what);
        assert_eq!(files.len(), 4, "{what}: {files:?}");
        for (n, image) in [(3, &images[0]), (2, &images[1])] {
            assert_eq!(
                file_of(&g, &format!("libvirt-{n}-format")),
                *image,
                "{what}"
            );
        }
        let top = g.chain("libvirt-1-format");
        let chain_files: Vec<PathBuf> = top.iter().filter_map(|n| n.path()).collect();
        assert_eq!(chain_files.len(), 4, "{what}: {g:#?}");
        assert_eq!(
            chain_files[1..],
            [images[2].clone(), images[1].clone(), images[0].clone()]
        );
        assert!(top[1].read_only, "{what}: the frozen top is written to");
        drop(reverted);

        // Restored again from the same checkpoint: the same chain, untouched.
        let runs = dir.path().join("runs");
        std::fs::create_dir(&runs).unwrap();
        let restored = Restored::start(
            &["restore", "--into", runs.to_str().unwrap()],
            &state,
            dir.path(),
        );
        wait_log(&log, "the restored guest's ticks", |t| {
            t.iter().filter(|&&n| n == again).count() >= 3
        });
        assert_eq!(boots(&log), 1, "{what}: the guest booted again");
        let g = graph(&source.qmp_path);
        assert_eq!(files_opened_once(&g, &what).len(), 4, "{what}");

        // A clone beside it, on a fresh overlay of its own: both read the
        // frozen chain, neither locks the other out.
        let pidfile = dir.path().join("clone.pid");
        ok(&migrate()
            .args(["restore", "--clone", "--into"])
            .arg(&runs)
            .args(["--daemonize", "--pidfile"])
            .arg(&pidfile)
            .arg(&state)
            .output()
            .unwrap());
        let _clone = Restored {
            pid: std::fs::read_to_string(&pidfile)
                .unwrap()
                .trim()
                .parse()
                .unwrap(),
        };
        let clone_qmp = PathBuf::from(format!("{}.clone1", source.qmp_path.display()));
        let mut m = qemu_monitor::connect(clone_qmp.clone(), &monitor_options()).unwrap();
        assert!(m.status().unwrap().is_running(), "{what}");
        let theirs = files_opened_once(&m.block_graph().unwrap(), &what);
        drop(m);
        let ours = files_opened_once(&graph(&source.qmp_path), &what);
        assert_eq!(theirs.len(), 4, "{what}: {theirs:?}");
        let shared: Vec<&PathBuf> = theirs.iter().filter(|f| ours.contains(f)).collect();
        assert_eq!(shared, [&images[0], &images[1], &images[2]], "{what}");
        drop(restored);
        for (image, before) in images.iter().zip(&frozen) {
            assert!(
                std::fs::read(image).unwrap() == *before,
                "{what}: {} changed",
                image.display()
            );
        }
    }
}

/// One way a launcher gives a VM its disks.
struct Shape {
    name: &'static str,
    /// The options, the test guest's excepted, for files made in `dir`.
    options: fn(&Path) -> Vec<String>,
}

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| (*s).to_string()).collect()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// SeaBIOS, which loads the multiboot test guest, as pflash firmware.
fn seabios(dir: &Path) -> PathBuf {
    let to = dir.join("bios.bin");
    std::fs::copy("/usr/share/seabios/bios-256k.bin", &to)
        .expect("SeaBIOS (package seabios, with qemu-system-x86)");
    to
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "-drive if=none with a virtio-blk-pci device, a chain named relative to each image",
        options: |d| {
            let [_, _, top] = chain(d);
            strings(&[
                "-drive",
                &format!("file={},format=qcow2,if=none,id=d0", path(&top)),
                "-device",
                "virtio-blk-pci,drive=d0",
            ])
        },
    },
    Shape {
        name: "-drive if=virtio",
        options: |d| {
            let disk = raw(d, "disk.img", 1 << 20);
            strings(&[
                "-drive",
                &format!("file={},format=raw,if=virtio", path(&disk)),
            ])
        },
    },
    Shape {
        name: "-hda",
        options: |d| {
            let disk = raw(d, "disk.img", 1 << 20);
            strings(&["-hda", &path(&disk)])
        },
    },
    Shape {
        name: "ide-hd",
        options: |d| {
            let disk = qcow2(d, "disk.qcow2", None);
            strings(&[
                "-drive",
                &format!("file={},format=qcow2,if=none,id=i0", path(&disk)),
                "-device",
                "ide-hd,drive=i0",
            ])
        },
    },
    Shape {
        name: "ahci",
        options: |d| {
            let disk = raw(d, "disk.img", 1 << 20);
            strings(&[
                "-device",
                "ahci,id=ahci0",
                "-drive",
                &format!("file={},format=raw,if=none,id=a0", path(&disk)),
                "-device",
                "ide-hd,drive=a0,bus=ahci0.0",
            ])
        },
    },
    Shape {
        name: "virtio-scsi with scsi-hd",
        options: |d| {
            let [_, mid, _] = chain(d);
            strings(&[
                "-device",
                "virtio-scsi-pci,id=scsi0",
                "-drive",
                &format!("file={},format=qcow2,if=none,id=s0", path(&mid)),
                "-device",
                "scsi-hd,drive=s0,bus=scsi0.0",
            ])
        },
    },
    Shape {
        name: "a read-only disk beside a writable one",
        options: |d| {
            let ro = raw(d, "ro.img", 1 << 20);
            let rw = qcow2(d, "rw.qcow2", None);
            strings(&[
                "-drive",
                &format!("file={},format=raw,if=virtio,readonly=on", path(&ro)),
                "-drive",
                &format!("file={},format=qcow2,if=virtio", path(&rw)),
            ])
        },
    },
    Shape {
        name: "-cdrom",
        options: |d| {
            let iso = raw(d, "cd.iso", 1 << 20);
            strings(&["-cdrom", &path(&iso)])
        },
    },
    Shape {
        name: "-drive media=cdrom",
        options: |d| {
            let iso = raw(d, "cd.iso", 1 << 20);
            let disk = qcow2(d, "disk.qcow2", None);
            strings(&[
                "-drive",
                &format!("media=cdrom,file={}", path(&iso)),
                "-drive",
                &format!("file={},format=qcow2,if=virtio", path(&disk)),
            ])
        },
    },
    Shape {
        name: "file.locking=off",
        options: |d| {
            let [_, _, top] = chain(d);
            strings(&[
                "-drive",
                &format!(
                    "file={},format=qcow2,if=virtio,file.locking=off",
                    path(&top)
                ),
            ])
        },
    },
    Shape {
        name: "pflash: read-only firmware and writable variables",
        options: |d| {
            let code = seabios(d);
            let vars = raw(d, "vars.fd", 256 << 10);
            strings(&[
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    path(&code)
                ),
                "-drive",
                &format!("if=pflash,format=raw,unit=1,file={}", path(&vars)),
            ])
        },
    },
    Shape {
        name: "snapshot=on",
        options: |d| {
            let [_, _, top] = chain(d);
            strings(&[
                "-drive",
                &format!("file={},format=qcow2,if=virtio,snapshot=on", path(&top)),
            ])
        },
    },
    Shape {
        name: "libvirt's -blockdev chain",
        options: |d| libvirt_options(&chain(d)),
    },
    Shape {
        name: "a key=value -blockdev chain",
        options: |d| {
            let [base, _, top] = chain(d);
            strings(&[
                "-blockdev",
                &format!("driver=file,node-name=f-base,filename={}", path(&base)),
                "-blockdev",
                "driver=qcow2,node-name=base,file=f-base,read-only=on",
                "-blockdev",
                &format!(
                    "driver=qcow2,node-name=top,file.driver=file,file.filename={},backing=base",
                    path(&top)
                ),
                "-device",
                "virtio-blk-pci,drive=top",
            ])
        },
    },
];

/// The disks of `shape` as the saved VM had them: a save then a restore, a
/// checkpoint then a restore and a revert, and an instant save then a
/// restore, each carrying on with each file opened once.
fn save_and_checkpoint(qemu: &Path, shape: &Shape) {
    let what = format!("{} {}", qemu.display(), shape.name);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let mut options = guest_logged_to(&log);
    options.extend((shape.options)(dir.path()));
    let mut source = Vm::start(qemu, &options);
    wait_log(&log, "tick 3", |t| t.contains(&3));
    let opened = files_opened_once(&graph(&source.qmp_path), &what);
    let state = dir.path().join("state");
    ok(&migrate()
        .args(["save", "--then", "quit", "--monitor"])
        .arg(&source.qmp_path)
        .arg(&state)
        .output()
        .unwrap());
    source.wait_exit();
    let last = last_tick(&log);
    let restored = Restored::start(&["restore"], &state, dir.path());
    carries_on(&log, last, &what);
    assert_eq!(
        files_opened_once(&graph(&source.qmp_path), &what),
        opened,
        "{what}: the restored QEMU opened other files"
    );

    let ckpt = dir.path().join("ckpt");
    let said = ok(&migrate()
        .args(["checkpoint", "--then", "quit", "--monitor"])
        .arg(&source.qmp_path)
        .arg(&ckpt)
        .output()
        .unwrap());
    drop(restored);
    let last = last_tick(&log);
    let runs = dir.path().join("runs");
    std::fs::create_dir(&runs).unwrap();
    let restored = Restored::start(
        &["restore", "--into", runs.to_str().unwrap()],
        &ckpt,
        dir.path(),
    );
    carries_on(&log, last, &what);
    let now = files_opened_once(&graph(&source.qmp_path), &what);
    let overlays: Vec<&PathBuf> = now.iter().filter(|f| f.starts_with(&runs)).collect();
    let froze = said.matches("froze ").count();
    assert_eq!(overlays.len(), froze, "{what}: {said} {now:?}");
    assert!(
        opened.iter().all(|f| now.contains(f)),
        "{what}: {opened:?} {now:?}"
    );

    if froze == 0 {
        // Nothing frozen tells the checkpoint's VM from another: refused in words.
        let out = migrate()
            .args(["revert", "--monitor"])
            .arg(&source.qmp_path)
            .arg(&ckpt)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains("this checkpoint froze no disk"),
            "{what}: {err}"
        );
        let mut m = qemu_monitor::connect(source.qmp_path.clone(), &monitor_options()).unwrap();
        assert!(m.status().unwrap().is_running(), "{what}");
        return;
    }
    // Reverted to the checkpoint: a new QEMU on fresh overlays, the count
    // going back to the checkpoint's.
    wait_tick_above(&log, last + 3);
    let seen = log_ticks(&log).len();
    let pidfile = dir.path().join("reverted.pid");
    ok(&migrate()
        .args(["revert", "--daemonize", "--pidfile"])
        .arg(&pidfile)
        .args(["--monitor"])
        .arg(&source.qmp_path)
        .arg(&ckpt)
        .output()
        .unwrap());
    drop(restored);
    let reverted = Restored {
        pid: std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap(),
    };
    wait_log(&log, "the reverted guest's ticks", |t| {
        t[seen - 1..]
            .windows(2)
            .position(|w| w[1] < w[0])
            .is_some_and(|back| t.len() > seen + back + 2)
    });
    assert_eq!(boots(&log), 1, "{what}: the guest booted again");
    let reverted_files = files_opened_once(&graph(&source.qmp_path), &what);
    assert_eq!(
        reverted_files
            .iter()
            .filter(|f| f.starts_with(&runs))
            .count(),
        froze,
        "{what}: {reverted_files:?}"
    );
    assert!(
        opened.iter().all(|f| reverted_files.contains(f)),
        "{what}: {opened:?} {reverted_files:?}"
    );

    // The reverted VM saved instantly (its RAM mapped back at restore).
    let instant = dir.path().join("instant");
    ok(&migrate()
        .args(["save", "--instant", "--then", "quit", "--monitor"])
        .arg(&source.qmp_path)
        .arg(&instant)
        .output()
        .unwrap());
    drop(reverted);
    let last = last_tick(&log);
    let _restored = Restored::start(&["restore"], &instant, dir.path());
    carries_on(&log, last, &what);
    assert_eq!(
        files_opened_once(&graph(&source.qmp_path), &what),
        reverted_files,
        "{what}: the instant restore opened other files"
    );
}

#[test]
fn every_shape_of_disk_is_saved_checkpointed_reverted_and_restored() {
    for qemu in qemus() {
        for shape in SHAPES {
            save_and_checkpoint(&qemu, shape);
        }
    }
}

#[test]
fn a_snapshot_on_disk_the_guest_wrote_to_is_refused_in_words_and_the_vm_runs_on() {
    for qemu in qemus() {
        let what = format!("{}", qemu.display());
        let dir = tempfile::tempdir().unwrap();
        let disk = qcow2(dir.path(), "disk.qcow2", None);
        let log = dir.path().join("serial.log");
        let mut options = guest_logged_to(&log);
        options.extend(strings(&[
            "-drive",
            &format!("file={},format=qcow2,if=virtio,snapshot=on", path(&disk)),
        ]));
        let mut vm = Vm::start(&qemu, &options);
        wait_log(&log, "tick 2", |t| t.contains(&2));
        // A write through the disk, as a guest's driver would make.
        vm.qmp()
            .execute(
                "human-monitor-command",
                Some(
                    serde_json::json!({"command-line": "qemu-io virtio0 \"write -P 0x5a 0 64k\""}),
                ),
            )
            .expect("qemu-io");
        let before = std::fs::read(&disk).unwrap();
        for verb in [&["save"][..], &["checkpoint"], &["save", "--instant"]] {
            let state = dir.path().join(verb.join(""));
            let out = migrate()
                .args(verb)
                .args(["--then", "quit", "--monitor"])
                .arg(&vm.qmp_path)
                .arg(&state)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what}: {verb:?}: {err}");
            assert!(
                err.contains(&format!("the guest wrote to virtio0 ({})", disk.display()))
                    && err.contains("snapshot=on"),
                "{what}: {verb:?}: {err}"
            );
            assert!(!state.exists(), "{what}: {verb:?} left a state file");
            assert_eq!(vm.status(), "running", "{what}: {verb:?}");
        }
        assert!(
            std::fs::read(&disk).unwrap() == before,
            "{what}: the image was written"
        );
    }
}

/// Waits, up to two minutes, for the log to hold `text` `times` times. A
/// file has no event for "a line was appended": it is read again every 20 ms.
fn wait_text(log: &Path, text: &str, times: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let now = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        if now.matches(text).count() >= times {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{text:?} not {times} times in the log: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// UEFI firmware as Debian's ovmf package installs it.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

#[test]
fn uefi_firmware_and_its_variables_on_pflash_are_saved_checkpointed_and_restored() {
    assert!(
        Path::new(OVMF_CODE).is_file(),
        "{OVMF_CODE} is missing: install Debian's ovmf package (.ci/install-deps does)"
    );
    for qemu in qemus() {
        let what = format!("{}", qemu.display());
        let dir = tempfile::tempdir().unwrap();
        let vars = dir.path().join("VARS.fd");
        std::fs::copy(OVMF_VARS, &vars).unwrap();
        let log = dir.path().join("serial.log");
        let options = strings(&[
            "-accel",
            "tcg",
            "-m",
            "64",
            "-nodefaults",
            "-serial",
            &format!("file:{}", path(&log)),
            "-drive",
            &format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
            "-drive",
            &format!("if=pflash,format=raw,unit=1,file={}", path(&vars)),
        ]);
        let mut source = Vm::start(&qemu, &options);
        // Saved while the shell counts down to its start-up script.
        wait_text(&log, "in 4 seconds", 1);
        let state = dir.path().join("state");
        ok(&migrate()
            .args(["save", "--then", "quit", "--monitor"])
            .arg(&source.qmp_path)
            .arg(&state)
            .output()
            .unwrap());
        source.wait_exit();
        let m = manifest(&state);
        let guarded: Vec<&str> = m["files"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["role"] == "disk")
            .map(|f| f["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            guarded,
            [path(&vars)],
            "{what}: the writable flash is guarded"
        );

        // The restored firmware counts on to its prompt, without starting again.
        let restored = Restored::start(&["restore"], &state, dir.path());
        wait_text(&log, "Shell>", 1);
        assert_eq!(
            String::from_utf8_lossy(&std::fs::read(&log).unwrap())
                .matches("UEFI Interactive Shell")
                .count(),
            1,
            "{what}: the firmware started again"
        );
        let g = graph(&source.qmp_path);
        let files = files_opened_once(&g, &what);
        let mut expected = vec![PathBuf::from(OVMF_CODE), vars.clone()];
        expected.sort();
        assert_eq!(files, expected, "{what}");

        // A checkpoint puts the variables under an overlay; its restore runs on a fresh one.
        let ckpt = dir.path().join("ckpt");
        let said = ok(&migrate()
            .args(["checkpoint", "--then", "quit", "--monitor"])
            .arg(&source.qmp_path)
            .arg(&ckpt)
            .output()
            .unwrap());
        assert!(
            said.contains(&format!("froze pflash1: {}", vars.display())),
            "{what}: {said}"
        );
        drop(restored);
        let frozen = std::fs::read(&vars).unwrap();
        let runs = dir.path().join("runs");
        std::fs::create_dir(&runs).unwrap();
        let _restored = Restored::start(
            &["restore", "--into", runs.to_str().unwrap()],
            &ckpt,
            dir.path(),
        );
        let mut m = qemu_monitor::connect(source.qmp_path.clone(), &monitor_options()).unwrap();
        assert!(m.status().unwrap().is_running(), "{what}");
        let files = files_opened_once(&m.block_graph().unwrap(), &what);
        assert_eq!(files.len(), 3, "{what}: {files:?}");
        assert!(
            files.contains(&vars) && files.iter().any(|f| f.starts_with(&runs)),
            "{what}: {files:?}"
        );
        assert!(
            std::fs::read(&vars).unwrap() == frozen,
            "{what}: the frozen variables changed"
        );
    }
}

/// A VM that went on after a checkpoint, saved again: the restore runs on
/// the overlay the VM wrote to, over the frozen chain opened read-only, and
/// the checkpoint still restores.
fn saved_after_a_checkpoint(qemu: &Path, drive: bool) {
    let what = format!("{} drive={drive}", qemu.display());
    let dir = tempfile::tempdir().unwrap();
    let images = chain(dir.path());
    let log = dir.path().join("serial.log");
    let mut options = guest_logged_to(&log);
    if drive {
        options.extend(strings(&[
            "-drive",
            &format!("file={},format=qcow2,if=virtio", path(&images[2])),
        ]));
    } else {
        options.extend(libvirt_options(&images));
    }
    let mut source = Vm::start(qemu, &options);
    wait_log(&log, "tick 3", |t| t.contains(&3));
    let ckpt = dir.path().join("ckpt");
    ok(&migrate()
        .args(["checkpoint", "--then", "resume", "--monitor"])
        .arg(&source.qmp_path)
        .arg(&ckpt)
        .output()
        .unwrap());
    let after = dir.path().join("top.qcow2.after-ckpt.1.qcow2");
    let frozen: Vec<Vec<u8>> = images.iter().map(|i| std::fs::read(i).unwrap()).collect();
    let state = dir.path().join("state");
    // Saved through the human monitor: its `info block -n` tells which node
    // the overlay sits on.
    ok(&migrate()
        .args(["save", "--then", "quit", "--monitor"])
        .arg(&source.hmp)
        .arg(&state)
        .output()
        .unwrap());
    source.wait_exit();
    let last = last_tick(&log);
    let restored = Restored::start(&["restore"], &state, dir.path());
    carries_on(&log, last, &what);
    let g = graph(&source.qmp_path);
    assert_eq!(files_opened_once(&g, &what).len(), 4, "{what}: {g:#?}");
    let device = qemu_monitor::connect(source.qmp_path.clone(), &monitor_options())
        .unwrap()
        .block_devices()
        .unwrap();
    let root = device
        .iter()
        .find_map(|d| d.node_name.clone().filter(|_| d.image.is_some()))
        .expect("the disk");
    let chain: Vec<(PathBuf, bool)> = g
        .chain(&root)
        .iter()
        .map(|n| (n.path().unwrap(), n.read_only))
        .collect();
    assert_eq!(
        chain,
        [
            (after.clone(), false),
            (images[2].clone(), true),
            (images[1].clone(), true),
            (images[0].clone(), true)
        ],
        "{what}"
    );
    drop(restored);
    for (image, before) in images.iter().zip(&frozen) {
        assert!(
            std::fs::read(image).unwrap() == *before,
            "{what}: {} changed",
            image.display()
        );
    }
    let last = last_tick(&log);
    let _restored = Restored::start(&["restore"], &ckpt, dir.path());
    wait_log(&log, "the checkpoint's ticks again", |t| {
        t.last().is_some_and(|&n| n < last)
    });
}

#[test]
fn a_vm_saved_after_a_checkpoint_restores_onto_its_own_overlay() {
    for qemu in qemus() {
        saved_after_a_checkpoint(&qemu, false);
        saved_after_a_checkpoint(&qemu, true);
    }
}
