//! The files a saved guest's memory depends on: the disk images it had
//! open for writing and the `-kernel`, `-initrd` and `-bios` it was started
//! with. A save records what each was; a restore refuses, before any QEMU
//! starts, a file that changed or went missing since. A guest resumed over
//! a disk that changed under it holds caches describing another disk, and
//! corrupts its filesystem (libvirt's `virsh restore` manual warns of this
//! and checks nothing); firmware that changed size makes QEMU reject the
//! stream only after it started.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::argv;
use crate::vm::Vm;

/// How much of a disk image its fingerprint covers: a qcow2 header, its
/// L1 and refcount tables in a small image; a raw disk's boot sector and
/// partition table.
const DISK_HEAD: u64 = 64 * 1024;

/// What a file is to the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Role {
    /// A disk image open for writing.
    Disk,
    /// `-kernel`.
    Kernel,
    /// `-initrd` (each module of a multiboot `-initrd`).
    Initrd,
    /// `-bios`.
    Bios,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Disk => "disk",
            Role::Kernel => "-kernel",
            Role::Initrd => "-initrd",
            Role::Bios => "-bios",
        }
    }
}

/// A file as it was when the VM was saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GuardedFile {
    /// Its path, absolute.
    pub path: PathBuf,
    /// What it is to the VM.
    pub role: Role,
    /// The image format, for a disk (`qcow2`, `raw`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Inode number (a file replaced by another has a new one).
    pub inode: u64,
    /// CRC-32 of the whole file (boot files) or of its first 64 KiB (disks).
    pub crc32: String,
}

/// What `vm` depends on now: its writable disk images and boot files.
/// Paths relative to QEMU's working directory are made absolute.
///
/// # Errors
/// When the monitor fails.
pub fn record(vm: &mut Vm) -> crate::Result<Vec<GuardedFile>> {
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", vm.pid())).ok();
    let absolute = |p: &str| -> PathBuf {
        let p = Path::new(p);
        match &cwd {
            Some(c) if p.is_relative() => c.join(p),
            _ => p.to_path_buf(),
        }
    };
    let mut out = Vec::new();
    for dev in vm.monitor.block_devices()? {
        let Some(image) = dev.image.filter(|_| !dev.read_only) else {
            continue;
        };
        let Some(path) = image.path() else {
            continue; // a network image or another protocol: no file to follow
        };
        if let Some(f) = describe(
            &absolute(&path.to_string_lossy()),
            Role::Disk,
            Some(image.format),
        ) {
            out.push(f);
        }
    }
    for (path, role) in boot_files(vm.args()) {
        if let Some(f) = describe(&absolute(&path), role, None) {
            out.push(f);
        }
    }
    Ok(out)
}

/// `-kernel`, each `-initrd` module (a multiboot `-initrd "mod args,mod2"`)
/// and `-bios` when it names a file (not a firmware name QEMU looks up).
fn boot_files(args: &[String]) -> Vec<(String, Role)> {
    let mut out = Vec::new();
    if let Some(k) = argv::last_value(args, "-kernel") {
        out.push((k.to_string(), Role::Kernel));
    }
    if let Some(i) = argv::last_value(args, "-initrd") {
        for module in i.split(',') {
            if let Some(path) = module.split_whitespace().next() {
                out.push((path.to_string(), Role::Initrd));
            }
        }
    }
    if let Some(b) = argv::last_value(args, "-bios") {
        if b.contains('/') {
            out.push((b.to_string(), Role::Bios));
        }
    }
    out
}

/// The file at `path` now; `None` for what is no regular file (a block
/// device, a network image), which this cannot follow.
fn describe(path: &Path, role: Role, format: Option<String>) -> Option<GuardedFile> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    let limit = if role == Role::Disk {
        DISK_HEAD
    } else {
        u64::MAX
    };
    Some(GuardedFile {
        path: path.to_path_buf(),
        role,
        format,
        size: meta.len(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        inode: meta.ino(),
        crc32: format!("{:08x}", crc_head(path, limit).ok()?),
    })
}

fn crc_head(path: &Path, limit: u64) -> std::io::Result<u32> {
    let mut f = std::fs::File::open(path)?.take(limit);
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

/// How each file differs from what the save recorded, in words; empty
/// when none does. Boot files are compared by content (a copy of the same
/// kernel is the same kernel); disks also by inode and modification time,
/// since any write to them since the save matters.
pub fn changes(files: &[GuardedFile]) -> Vec<String> {
    let mut out = Vec::new();
    for saved in files {
        let what = format!("{} {}", saved.role.name(), saved.path.display());
        let Some(now) = describe(&saved.path, saved.role, saved.format.clone()) else {
            out.push(format!("{what} is missing (or no longer a regular file)"));
            continue;
        };
        let mut why = Vec::new();
        if now.size != saved.size {
            why.push(format!(
                "its size is {} bytes, was {}",
                now.size, saved.size
            ));
        }
        if now.crc32 != saved.crc32 {
            why.push("its content differs".to_string());
        }
        if saved.role == Role::Disk {
            if now.inode != saved.inode {
                why.push("it was replaced by another file".to_string());
            } else if now.mtime_ns != saved.mtime_ns {
                why.push("it was written to".to_string());
            }
        }
        if !why.is_empty() {
            out.push(format!("{what} changed since the save: {}", why.join(", ")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn finds_boot_files() {
        let args = v("-m 32 -kernel k.elf -initrd mod1,mod2 -bios bios-256k.bin");
        assert_eq!(
            boot_files(&args),
            vec![
                ("k.elf".to_string(), Role::Kernel),
                ("mod1".to_string(), Role::Initrd),
                ("mod2".to_string(), Role::Initrd),
            ]
        );
        assert_eq!(
            boot_files(&v("-bios /srv/fw.bin")),
            vec![("/srv/fw.bin".to_string(), Role::Bios)]
        );
    }

    #[test]
    fn a_changed_file_is_named_with_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![1u8; 4096]).unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, b"kernel").unwrap();
        let files = vec![
            describe(&disk, Role::Disk, Some("raw".into())).unwrap(),
            describe(&kernel, Role::Kernel, None).unwrap(),
        ];
        assert!(changes(&files).is_empty());
        // Same content in a new file: a kernel is the same kernel, a disk is not the same disk.
        std::fs::remove_file(&kernel).unwrap();
        std::fs::write(&kernel, b"kernel").unwrap();
        let copy = dir.path().join("copy");
        std::fs::copy(&disk, &copy).unwrap();
        std::fs::rename(&copy, &disk).unwrap();
        let c = changes(&files);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0].contains("replaced by another file"), "{c:?}");
        std::fs::remove_file(&disk).unwrap();
        std::fs::write(&kernel, b"kernel2").unwrap();
        let c = changes(&files);
        assert!(
            c[0].ends_with("is missing (or no longer a regular file)"),
            "{c:?}"
        );
        assert!(
            c[1].contains("its size is 7 bytes, was 6, its content differs"),
            "{c:?}"
        );
    }
}
