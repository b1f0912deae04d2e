//! The instant layout for VMs whose RAM is not one `-m` block: a libvirt-
//! shaped VM (q35, guest RAM from `-object memory-backend-ram`, written as
//! JSON), two NUMA nodes with a backend each, and a DIMM beside `pc.ram`.
//! Each RAM block goes into an image of its own; a restore maps every image
//! (QEMU's own table and its mappings say so), under the block names the
//! stream expects, and the guest carries on; the restored VM keeps the
//! user's options when it is saved again; `inspect` and `export` see every
//! image. With QEMU 8.2+ the images are opened read-only, which keeps a
//! balloon from punching holes into them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use recipe_tests::{
    assert_carries_on, at_least, bin, migrate, qemus, recipe_options, spawn_lines, tick, Lines, Vm,
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

fn manifest(statefile: &Path) -> serde_json::Value {
    let mut name = statefile.file_name().unwrap().to_os_string();
    name.push(".manifest.json");
    serde_json::from_slice(&std::fs::read(statefile.with_file_name(name)).unwrap()).unwrap()
}

/// The images a manifest lists: (file name, block, backend).
fn images(m: &serde_json::Value) -> Vec<(String, String, Option<String>)> {
    let layout = &m["instant"];
    let list = match layout["images"].as_array() {
        Some(l) => l.clone(),
        None => vec![layout.clone()],
    };
    list.iter()
        .map(|i| {
            (
                i["image"].as_str().unwrap().to_string(),
                i["block"].as_str().unwrap().to_string(),
                i["backend"].as_str().map(String::from),
            )
        })
        .collect()
}

/// A ticking VM with `extra` options, saved with `--instant --then quit`;
/// the save's stderr, the last tick, and the ended source.
fn saved(qemu: &Path, dir: &Path, extra: &[&str]) -> (PathBuf, String, u64, Vm) {
    let mut options = recipe_options(dir);
    options.extend(extra.iter().map(|s| s.to_string()));
    let (mut source, serial) = Vm::start_ticking(qemu, &options);
    serial.wait_for(0, WAIT, "tick 2", |l| tick(l) == Some(2));
    let statefile = dir.join("state");
    let said = ok(migrate()
        .args(["save", "--instant", "--then", "quit", "--monitor"])
        .arg(&source.hmp)
        .arg(&statefile)
        .output()
        .unwrap());
    assert!(source.wait_exit().success(), "--then quit ends the source");
    assert!(!said.contains("not an instant save"), "{said}");
    let last = serial
        .snapshot()
        .iter()
        .filter_map(|l| tick(l))
        .max()
        .unwrap();
    (statefile, said, last, source)
}

/// A foreground restore, ended with its QEMU if the test fails first.
struct Restored(std::process::Child);

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

fn hmp(sock: &Path, command: &str) -> String {
    let out = Command::new(bin("monitor-send"))
        .arg(sock)
        .arg(command)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The QEMU whose command line maps `image` (`mem-path=`, or JSON's `"mem-path":`).
fn qemu_mapping(image: &Path) -> u32 {
    let needle = image.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .unwrap_or_else(|| panic!("no QEMU maps {}", image.display()))
}

/// Checks that QEMU `pid` maps every image of `statefile` as guest RAM,
/// each opened read-only where `read_only`.
fn assert_maps_images(pid: u32, statefile: &Path, read_only: bool) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    for (image, block, _) in images(&manifest(statefile)) {
        let path = statefile.with_file_name(&image);
        assert!(
            maps.contains(&path.display().to_string()),
            "{block}: {} is not mapped:\n{maps}",
            path.display()
        );
        if read_only {
            // Every descriptor QEMU holds on the image is read-only.
            for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .flatten()
            {
                if std::fs::read_link(fd.path()).is_ok_and(|l| l == path) {
                    let info = std::fs::read_to_string(format!(
                        "/proc/{pid}/fdinfo/{}",
                        fd.file_name().to_string_lossy()
                    ))
                    .unwrap();
                    let flags = info
                        .lines()
                        .find_map(|l| l.strip_prefix("flags:"))
                        .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                        .unwrap();
                    assert_eq!(flags & 3, 0, "{image} is open for writing: {info}");
                }
            }
        }
    }
}

/// The block names of QEMU's own RAM table.
fn ramblocks(sock: &Path) -> Vec<String> {
    hmp(sock, "info ramblock")
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

#[test]
fn a_libvirt_shaped_vm_restores_from_its_image_and_stays_itself() {
    // As libvirt starts a q35 guest: RAM from a backend named pc.ram, in JSON.
    let backend = r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":33554432,"x-use-canonical-path-for-ramblock-id":false}"#;
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (statefile, _, last, source) = saved(
            &qemu,
            dir.path(),
            &[
                "-machine",
                "q35",
                "-object",
                backend,
                "-machine",
                "memory-backend=pc.ram",
            ],
        );
        let m = manifest(&statefile);
        assert_eq!(
            images(&m),
            vec![(
                "state.ram".to_string(),
                "pc.ram".to_string(),
                Some("pc.ram".to_string())
            )]
        );
        assert!(
            std::fs::metadata(&statefile).unwrap().len() < 4 << 20,
            "the stream carries no guest RAM"
        );
        let (mut restored, lines) = restore(&[], &statefile);
        assert_carries_on(&qemu, &lines, last);
        let image = std::fs::canonicalize(dir.path().join("state.ram")).unwrap();
        assert_maps_images(qemu_mapping(&image), &statefile, at_least(&qemu, 8, 2));
        assert!(ramblocks(&source.hmp).contains(&"pc.ram".to_string()));

        // Saved again, it is the user's VM: the JSON backend, not the image.
        let again = dir.path().join("again");
        ok(migrate()
            .args(["save", "--instant", "--then", "quit", "--monitor"])
            .arg(&source.hmp)
            .arg(&again)
            .output()
            .unwrap());
        assert!(restored.0.wait().unwrap().success());
        let args = manifest(&again)["args"].clone();
        assert!(
            args.as_array().unwrap().iter().any(|a| a == backend),
            "{args}"
        );
        assert!(!args.to_string().contains("mem-path"), "{args}");
        let last = lines
            .snapshot()
            .iter()
            .filter_map(|l| tick(l))
            .max()
            .unwrap();
        let (mut second, second_lines) = restore(&[], &again);
        assert_carries_on(&qemu, &second_lines, last);
        hmp(&source.hmp, "quit");
        assert!(second.0.wait().unwrap().success());
    }
}

#[test]
fn two_numa_nodes_get_an_image_each_and_every_tool_sees_both() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        // Node 1's block is named by its canonical path: the restore must
        // give it that name again.
        let (statefile, said, last, source) = saved(
            &qemu,
            dir.path(),
            &[
                "-smp",
                "2",
                "-object",
                "memory-backend-ram,id=m0,size=16M",
                "-object",
                "memory-backend-memfd,id=m1,size=16M,x-use-canonical-path-for-ramblock-id=on",
                "-numa",
                "node,memdev=m0",
                "-numa",
                "node,memdev=m1",
            ],
        );
        let m = manifest(&statefile);
        assert_eq!(
            images(&m),
            vec![
                (
                    "state.ram".to_string(),
                    "m0".to_string(),
                    Some("m0".to_string())
                ),
                (
                    "state.ram.1".to_string(),
                    "/objects/m1".to_string(),
                    Some("m1".to_string())
                ),
            ],
            "{said}"
        );
        for image in ["state.ram", "state.ram.1"] {
            assert_eq!(
                std::fs::metadata(dir.path().join(image)).unwrap().len(),
                16 << 20
            );
        }

        let report = migrate()
            .args(["inspect", "--check"])
            .arg(&statefile)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&report.stdout);
        assert!(report.status.success(), "{text}");
        assert!(
            text.contains("RAM block m0 (memory backend m0)")
                && text.contains("RAM block /objects/m1 (memory backend m1)"),
            "{text}"
        );

        // The export is one plain stream holding every page of both nodes.
        let plain = dir.path().join("plain");
        ok(migrate()
            .arg("export")
            .arg(&statefile)
            .stdout(std::fs::File::create(&plain).unwrap())
            .output()
            .unwrap());
        let out = migrate()
            .args(["inspect", "--json"])
            .arg(&plain)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["stream"]["complete"], true, "{v}");
        for block in ["m0", "/objects/m1"] {
            let b = v["stream"]["ram_blocks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == block)
                .unwrap_or_else(|| panic!("{block} in {v}"));
            let pages = b["normal_pages"].as_u64().unwrap() + b["zero_pages"].as_u64().unwrap();
            assert_eq!(pages * 4096, 16 << 20, "{block}");
        }

        let (mut restored, lines) = restore(&[], &statefile);
        assert_carries_on(&qemu, &lines, last);
        let image = std::fs::canonicalize(dir.path().join("state.ram")).unwrap();
        assert_maps_images(qemu_mapping(&image), &statefile, at_least(&qemu, 8, 2));
        let blocks = ramblocks(&source.hmp);
        assert!(
            blocks.contains(&"m0".to_string()) && blocks.contains(&"/objects/m1".to_string()),
            "{blocks:?}"
        );

        // A clone from the same images, beside it.
        let (mut clone, clone_lines) = restore(&["--clone"], &statefile);
        assert_carries_on(&qemu, &clone_lines, last);
        hmp(&source.dir.path().join("hmp.sock.clone1"), "quit");
        assert!(clone.0.wait().unwrap().success());
        hmp(&source.hmp, "quit");
        assert!(restored.0.wait().unwrap().success());
    }
}

#[test]
fn a_dimm_gets_an_image_beside_pc_ram() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = recipe_options(dir.path());
        // recipe_options says -m 32; the DIMM needs slots.
        let m = options.iter().position(|a| a == "-m").unwrap();
        options[m + 1] = "32,slots=2,maxmem=256M".to_string();
        options.extend(
            [
                "-object",
                "memory-backend-ram,id=d0,size=32M",
                "-device",
                "pc-dimm,memdev=d0,id=dimm0",
            ]
            .map(String::from),
        );
        let (mut source, serial) = Vm::start_ticking(&qemu, &options);
        serial.wait_for(0, WAIT, "tick 2", |l| tick(l) == Some(2));
        let statefile = dir.path().join("state");
        let said = ok(migrate()
            .args(["save", "--instant", "--then", "quit", "--monitor"])
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
        let mut got = images(&manifest(&statefile));
        got.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(
            got.iter()
                .map(|(_, b, id)| (b.as_str(), id.as_deref()))
                .collect::<Vec<_>>(),
            vec![("d0", Some("d0")), ("pc.ram", None)],
            "{said}"
        );
        let (mut restored, lines) = restore(&[], &statefile);
        assert_carries_on(&qemu, &lines, last);
        let image = std::fs::canonicalize(dir.path().join(&got[0].0)).unwrap();
        assert_maps_images(qemu_mapping(&image), &statefile, at_least(&qemu, 8, 2));
        hmp(&source.hmp, "quit");
        assert!(restored.0.wait().unwrap().success());
    }
}

#[test]
fn with_a_balloon_qemu_8_2_and_later_keep_the_image_read_only() {
    for qemu in qemus().into_iter().filter(|q| at_least(q, 8, 2)) {
        let dir = tempfile::tempdir().unwrap();
        let (statefile, said, last, source) =
            saved(&qemu, dir.path(), &["-device", "virtio-balloon-pci"]);
        assert!(!said.contains("not an instant save"), "{said}");
        let image = std::fs::canonicalize(dir.path().join("state.ram")).unwrap();
        let (mut restored, lines) = restore(&[], &statefile);
        assert_carries_on(&qemu, &lines, last);
        assert_maps_images(qemu_mapping(&image), &statefile, true);
        hmp(&source.hmp, "quit");
        assert!(restored.0.wait().unwrap().success());
    }
}

#[test]
fn a_damaged_second_image_is_refused_and_a_save_of_fewer_blocks_takes_the_rest_away() {
    let nodes = [
        "-object",
        "memory-backend-ram,id=m0,size=16M",
        "-object",
        "memory-backend-ram,id=m1,size=16M",
        "-numa",
        "node,memdev=m0",
        "-numa",
        "node,memdev=m1",
    ];
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let (statefile, _, _, _source) = saved(&qemu, dir.path(), &nodes);
        let second = dir.path().join("state.ram.1");
        let good = std::fs::read(&second).unwrap();
        let refused = || {
            let out = migrate().arg("restore").arg(&statefile).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert_eq!(out.status.code(), Some(2), "{err}");
            err
        };
        // One byte of the second node's RAM changed (a new file, so it is read whole).
        let mut flipped = good.clone();
        flipped[4096] ^= 0x40;
        std::fs::write(&second, &flipped).unwrap();
        let err = refused();
        assert!(
            err.contains("state.ram.1") && err.contains("damaged: its checksum is"),
            "{err}"
        );
        std::fs::remove_file(&second).unwrap();
        let err = refused();
        assert!(
            err.contains("state.ram.1") && err.contains("is missing"),
            "{err}"
        );

        // The same file saved again from a -m VM: one image, under the
        // other set of names (the old save stays whole until the new one
        // is in place), and the old images gone.
        std::fs::write(&second, &good).unwrap();
        let (source, _) = Vm::start_ticking(&qemu, &recipe_options(dir.path()));
        ok(migrate()
            .args([
                "save",
                "--instant",
                "--force",
                "--then",
                "quit",
                "--monitor",
            ])
            .arg(&source.hmp)
            .arg(&statefile)
            .output()
            .unwrap());
        let m = manifest(&statefile);
        assert_eq!(
            images(&m),
            vec![("state.ram-b".to_string(), "pc.ram".to_string(), None)]
        );
        // Recorded as saves before several images were: fields inline.
        assert_eq!(m["instant"]["image"], "state.ram-b", "{m}");
        assert!(m["instant"]["images"].is_null(), "{m}");
        assert!(!second.exists(), "the old second image is removed");
        assert!(
            !dir.path().join("state.ram").exists(),
            "the old first image is removed"
        );
    }
}
