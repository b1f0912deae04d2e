//! File systems of their own for the tests: an ext4 image on a loop device
//! (root, as CI runs), mounted; damaged below the file system; made read-only.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{migrate, recipe_options, tick, Vm};

const WAIT: Duration = Duration::from_secs(60);

/// Runs `cmd`, which must succeed; its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An ext4 file system on a loop device, mounted; unmounted and let go when dropped.
#[derive(Debug)]
pub struct LoopFs {
    /// The loop device.
    pub dev: String,
    /// Where it is mounted.
    pub mnt: PathBuf,
}

impl LoopFs {
    /// A 256 MiB ext4 of 4 KiB blocks, with the `verity` feature when asked.
    pub fn new(dir: &Path, features: &[&str]) -> LoopFs {
        let image = dir.join("fs.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(256 << 20))
            .unwrap();
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F", "-b", "4096"]);
        for f in features {
            mkfs.args(["-O", f]);
        }
        run(mkfs.arg(&image));
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&image)
            .output()
            .expect("losetup (util-linux)");
        assert!(
            out.status.success(),
            "this test needs a loop device (root, /dev/loop-control): losetup said {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let fs = LoopFs { dev, mnt };
        run(Command::new("mount").arg(&fs.dev).arg(&fs.mnt));
        fs
    }

    /// Flips bit `mask` of the byte at `offset` of `file` on the block
    /// device itself, below the file system, and drops the page cache so
    /// that the next read of the file comes from the device.
    pub fn rot(&self, file: &Path, offset: u64, mask: u8) {
        let physical = physical_offset(file, offset);
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.dev)
            .unwrap();
        let mut byte = [0u8];
        dev.seek(SeekFrom::Start(physical)).unwrap();
        dev.read_exact(&mut byte).unwrap();
        byte[0] ^= mask;
        dev.seek(SeekFrom::Start(physical)).unwrap();
        dev.write_all(&byte).unwrap();
        dev.sync_all().unwrap();
        drop(dev);
        std::fs::write("/proc/sys/vm/drop_caches", "1").expect("dropping the page cache (root)");
    }
}

impl LoopFs {
    /// Mounts the file system read-only from now on.
    pub fn read_only(&self) {
        run(Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.mnt));
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Where byte `offset` of `file` lies on its block device, from its extent
/// map (`filefrag -v`, FIEMAP, in 4 KiB blocks).
fn physical_offset(file: &Path, offset: u64) -> u64 {
    let map = run(Command::new("filefrag").args(["-v", "-b4096"]).arg(file));
    let block = offset / 4096;
    for line in map.lines() {
        // "   3:       16..      23:      34832..     34839:      8:      ..."
        let fields: Vec<&str> = line
            .split([':', ' ', '.'])
            .filter(|f| !f.is_empty())
            .collect();
        let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if let (Some(_), Some(from), Some(to), Some(phys)) = (num(0), num(1), num(2), num(3)) {
            if (from..=to).contains(&block) {
                return (phys + block - from) * 4096 + offset % 4096;
            }
        }
    }
    panic!(
        "byte {offset} of {} is in no extent:\n{map}",
        file.display()
    );
}

/// A ticking recipe VM (its sockets in `dir`, `extra` options added) saved
/// with `save ARGS --then quit` to `statefile`; the source, ended, whose
/// monitor path the restored VM reuses, and its last tick.
pub fn saved_with(
    qemu: &Path,
    dir: &Path,
    extra: &[String],
    args: &[&str],
    statefile: &Path,
) -> (Vm, u64) {
    let mut options = recipe_options(dir);
    options.extend(extra.iter().cloned());
    let (mut source, serial) = Vm::start_ticking(qemu, &options);
    serial.wait_for(0, WAIT, "tick 2", |l| tick(l) == Some(2));
    let out = migrate()
        .arg("save")
        .args(args)
        .args(["--then", "quit", "--monitor"])
        .arg(&source.hmp)
        .arg(statefile)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(source.wait_exit().success(), "--then quit ends the source");
    let last = serial.snapshot().iter().filter_map(|l| tick(l)).max();
    (source, last.expect("ticks"))
}

/// [`saved_with`] `--instant`, the source returned.
pub fn saved_instant(qemu: &Path, dir: &Path, statefile: &Path) -> Vm {
    saved_with(qemu, dir, &[], &["--instant"], statefile).0
}
