//! An instant save's RAM image damaged below the file system (a bit flipped
//! on the block device: same inode, same times) is never run on silently.
//! The save records a checksum per 4 MiB chunk, and, where the file system
//! has fs-verity, seals the image and records its digest. Without the seal,
//! a restore starts the guest at once and a background check reads the
//! image: it stops the VM and names the damaged chunk; `restore --verify`
//! and `inspect --check` read it first and refuse it, naming the chunk; and
//! a plain `inspect` says it did not read it. With the seal (a kernel with
//! `CONFIG_FS_VERITY`), the digest is checked and the kernel checks every
//! page read.
//!
//! The file systems are ext4 images on loop devices (root, as CI runs).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use recipe_tests::loopfs::{run, saved_instant, LoopFs};
use recipe_tests::{bin, migrate, qemus, spawn_lines, Lines};

const WAIT: Duration = Duration::from_secs(60);
const CHUNK: u64 = 4 << 20;

fn manifest(statefile: &Path) -> serde_json::Value {
    let mut name = statefile.file_name().unwrap().to_os_string();
    name.push(".manifest.json");
    serde_json::from_slice(&std::fs::read(statefile.with_file_name(name)).unwrap()).unwrap()
}

/// A byte of guest data (not a hole) in the second half of the image.
fn data_byte(image: &Path) -> u64 {
    let bytes = std::fs::read(image).unwrap();
    let half = bytes.len() / 2;
    let at = bytes[half..]
        .iter()
        .position(|&b| b != 0)
        .map(|i| half + i)
        .or_else(|| bytes.iter().position(|&b| b != 0))
        .expect("the image holds data");
    at as u64
}

fn identity(path: &Path) -> (u64, u64, i64, i64, i64, i64) {
    let m = std::fs::metadata(path).unwrap();
    (
        m.dev(),
        m.ino(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

fn monitor(sock: &Path, command: &str) -> String {
    run(Command::new(bin("monitor-send")).arg(sock).arg(command))
}

/// Says which chunk of 4 MiB holds `at`, as the tool names it.
fn chunk_words(at: u64) -> String {
    let n = at / CHUNK;
    format!(
        "chunk {n} of 8 (bytes {}-{}",
        n * CHUNK,
        (n + 1) * CHUNK - 1
    )
}

/// The chunk path, on a file system without fs-verity (or a kernel without
/// it): refused when read first, caught in the background otherwise.
fn rot_is_caught_by_the_chunk_checks(qemu: &Path, fs: &LoopFs, dir: &Path, name: &str) {
    let statefile = fs.mnt.join(name);
    let image = fs.mnt.join(format!("{name}.ram"));
    let source = saved_instant(qemu, dir, &statefile);
    let m = manifest(&statefile);
    assert!(m["instant"]["verity"].is_null(), "{}", m["instant"]);
    assert_eq!(m["instant"]["chunks"]["bytes"], CHUNK, "{}", m["instant"]);

    let at = data_byte(&image);
    let before = identity(&image);
    let good = std::fs::read(&image).unwrap()[at as usize];
    fs.rot(&image, at, 0x04);
    assert_eq!(identity(&image), before, "same inode, same times");
    assert_eq!(
        std::fs::read(&image).unwrap()[at as usize],
        good ^ 0x04,
        "the file reads the flipped bit"
    );

    // Not read: inspect says so, and claims nothing about the content.
    let text = run(migrate().arg("inspect").arg(&statefile));
    assert!(
        text.contains(&format!("RAM image {name}.ram: size and identity only"))
            && text.contains("its content was not read"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&run(migrate().args(["--json", "inspect"]).arg(&statefile))).unwrap();
    assert_eq!(json["ram_images"][0]["checked"], "identity", "{json}");

    // Read first: refused, the chunk named.
    for args in [&["inspect", "--check"][..], &["restore", "--verify"][..]] {
        let out = migrate().args(args).arg(&statefile).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&chunk_words(at)), "{args:?}: {err}");
    }

    // Restored at once: the background check stops the VM and names the chunk.
    let (mut child, _console) = spawn_lines(migrate().arg("restore").arg(&statefile));
    let stderr = Lines::collect(child.stderr.take().unwrap());
    let at_line = stderr.wait_for(0, WAIT, "the background check's finding", |l| {
        l.contains("is damaged")
    });
    let said = &stderr.snapshot()[at_line];
    assert!(said.contains(&image.display().to_string()), "{said}");
    assert!(said.contains(&chunk_words(at)), "{said}");
    assert!(said.contains("The VM was stopped"), "{said}");
    assert!(said.contains("restore from an intact copy"), "{said}");
    let status = monitor(&source.hmp, "info status");
    assert!(status.contains("paused"), "{status}");
    monitor(&source.hmp, "quit");
    let _ = child.wait();
}

#[test]
fn a_bit_flipped_below_the_file_system_is_named_by_its_chunk_and_never_run_on_silently() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let fs = LoopFs::new(dir.path(), &[]);
        rot_is_caught_by_the_chunk_checks(&qemu, &fs, dir.path(), "state");
    }
}

#[test]
fn on_a_file_system_with_fs_verity_the_image_is_sealed_and_its_digest_checked() {
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let fs = LoopFs::new(dir.path(), &["verity"]);
        let statefile = fs.mnt.join("state");
        let image = fs.mnt.join("state.ram");
        let _source = saved_instant(&qemu, dir.path(), &statefile);
        let m = manifest(&statefile);
        let Some(digest) = m["instant"]["verity"].as_str().map(String::from) else {
            // Not sealed: a QEMU before 8.2 (it opens the image for writing),
            // or a kernel without CONFIG_FS_VERITY.
            if recipe_tests::at_least(&qemu, 8, 2) {
                eprintln!(
                    "NOT TESTED HERE: fs-verity. This kernel has no CONFIG_FS_VERITY (ext4 \
                     with the verity feature answers EOPNOTSUPP), so the save could not seal \
                     the image; the chunk checks are tested on this file system instead."
                );
            }
            let again = tempfile::tempdir().unwrap();
            rot_is_caught_by_the_chunk_checks(&qemu, &fs, again.path(), "unsealed");
            continue;
        };
        assert!(digest.starts_with("sha256:"), "{digest}");
        assert!(
            std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .is_err(),
            "a sealed image never opens for writing"
        );
        let text = run(migrate().arg("inspect").arg(&statefile));
        assert!(text.contains("sealed with fs-verity"), "{text}");
        let at = data_byte(&image);
        fs.rot(&image, at, 0x04);
        let out = migrate()
            .args(["restore", "--verify"])
            .arg(&statefile)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("fs-verity check failed"), "{err}");
    }
}
