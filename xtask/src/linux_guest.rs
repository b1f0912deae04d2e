//! The Linux test guest for `cargo xtask e2e --guest linux`: Debian's cloud
//! kernel with a busybox initramfs whose `/init` (`fixtures/linux-guest/init`)
//! prints a banner once and `tick N` lines forever. A real kernel exercises
//! what the hand-made guest cannot (APIC timers, page tables, a tty layer), so
//! a restore that only works for toy guests shows up here.
//!
//! The kernel and busybox come from Debian's packages via `apt-get download`,
//! which needs no root; they are fetched once and kept in the cache directory.
//! A machine without apt can put a `vmlinuz-*` and a static `busybox` there
//! by hand.

use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// The guest's first line, printed once per boot: seeing it after a restore
/// means the guest rebooted instead of carrying on.
pub const BANNER: &str = "BOOT linux test guest";

/// `quiet` keeps kernel messages from interleaving with the ticks; `panic=-1`
/// reboots at once if init dies, which the banner then makes visible rather
/// than leaving a silent, hung guest; `init_on_free=1` zeroes what the boot
/// frees, which QEMU then sends as zero pages: the saved state shrinks from
/// about 97 MB to 57 MB with `-m 256`. `no_timer_check`: on a loaded host
/// TCG can miss the kernel's timer-IRQ probe, which then prints `..MP-BIOS
/// bug: 8254 timer not connected` as an error that `quiet` lets through,
/// ahead of the banner.
pub const APPEND: &str = "console=ttyS0 quiet panic=-1 init_on_free=1 no_timer_check";

const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
const BUSYBOX_PACKAGE: &str = "busybox-static";
const INIT: &str = include_str!("../../fixtures/linux-guest/init");

/// What to pass to QEMU as `-kernel`, `-initrd` and `-append`.
#[derive(Debug, Clone)]
pub struct LinuxGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
}

/// Fetches (once, cached under `cache_dir`) Debian's kernel from
/// `linux-image-cloud-amd64` and `busybox-static` with `apt-get download`
/// (no root needed), and builds an initramfs whose init prints ticks.
pub fn prepare(cache_dir: &Path) -> anyhow::Result<LinuxGuest> {
    fs::create_dir_all(cache_dir).with_context(|| format!("creating {}", cache_dir.display()))?;
    let fetching = || format!("fetching the Linux test guest into {}", cache_dir.display());
    let kernel = match cached_kernel(cache_dir)? {
        Some(kernel) => kernel,
        None => fetch_kernel(cache_dir).with_context(fetching)?,
    };
    let busybox = cache_dir.join("busybox");
    if !busybox.is_file() {
        fetch_busybox(cache_dir, &busybox).with_context(fetching)?;
    }
    let busybox_bytes =
        fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let initrd = cache_dir.join("initramfs.cpio");
    write_if_changed(&initrd, &initramfs(&busybox_bytes), cache_dir)?;
    Ok(LinuxGuest {
        kernel,
        initrd,
        append: APPEND.to_string(),
    })
}

fn cached_kernel(cache_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let mut found = Vec::new();
    for entry in
        fs::read_dir(cache_dir).with_context(|| format!("listing {}", cache_dir.display()))?
    {
        let path = entry?.path();
        let is_kernel = path
            .file_name()
            .and_then(OsStr::to_str)
            .is_some_and(|n| n.starts_with("vmlinuz-"));
        if is_kernel && path.is_file() {
            found.push(path);
        }
    }
    // Deterministic if someone left several: the same one every run.
    found.sort();
    Ok(found.pop())
}

fn fetch_kernel(cache_dir: &Path) -> anyhow::Result<PathBuf> {
    // The metapackage holds no kernel, only a dependency on the versioned one.
    let package = kernel_package()?;
    let work = download_and_extract(cache_dir, &package)?;
    let boot = work.path().join("root/boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("{package} has no boot/ directory"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{package} has no boot/vmlinuz-*"))?;
    let kernel = cache_dir.join(vmlinuz.file_name().expect("found by its name"));
    // Same file system (the work directory is inside the cache), so the
    // kernel appears whole or not at all, even with several runs at once.
    fs::rename(&vmlinuz, &kernel).with_context(|| format!("moving {}", vmlinuz.display()))?;
    Ok(kernel)
}

fn fetch_busybox(cache_dir: &Path, dest: &Path) -> anyhow::Result<()> {
    let work = download_and_extract(cache_dir, BUSYBOX_PACKAGE)?;
    let binary = work.path().join("root/bin/busybox");
    fs::rename(&binary, dest).with_context(|| {
        format!(
            "{BUSYBOX_PACKAGE} has no bin/busybox ({})",
            binary.display()
        )
    })
}

/// The versioned `linux-image-*` package that `linux-image-cloud-amd64` depends on.
fn kernel_package() -> anyhow::Result<String> {
    let out = apt(&["apt-cache", "depends", KERNEL_PACKAGE], None)?;
    out.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .map(str::to_string)
        .with_context(|| {
            format!("`apt-cache depends {KERNEL_PACKAGE}` names no linux-image-* package:\n{out}")
        })
}

/// Downloads one package into a fresh directory inside `cache_dir` and
/// extracts it to `root/` there; the directory goes away when dropped.
fn download_and_extract(cache_dir: &Path, package: &str) -> anyhow::Result<tempfile::TempDir> {
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(cache_dir)
        .with_context(|| format!("creating a directory in {}", cache_dir.display()))?;
    apt(&["apt-get", "download", package], Some(work.path()))?;
    let deb = fs::read_dir(work.path())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension() == Some(OsStr::new("deb")))
        .with_context(|| format!("`apt-get download {package}` left no .deb file"))?;
    let root = work.path().join("root");
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .output()
        .with_context(|| {
            format!(
                "running `dpkg-deb -x {}` (is dpkg installed?)",
                deb.display()
            )
        })?;
    if !out.status.success() {
        bail!(
            "`dpkg-deb -x {}` failed ({}): {}",
            deb.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(work)
}

/// Runs an apt command and returns its stdout; failures say which package the
/// guest needs and what to do about it.
fn apt(argv: &[&str], dir: Option<&Path>) -> anyhow::Result<String> {
    let shown = argv.join(" ");
    let needs = format!(
        "the Linux test guest takes its kernel and busybox from Debian's packages \
         `{KERNEL_PACKAGE}` and `{BUSYBOX_PACKAGE}`"
    );
    let by_hand = "or put a `vmlinuz-*` kernel and a static `busybox` into the cache directory \
                   by hand";
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!("`{}` not found: {needs}; install apt, {by_hand}", argv[0])
        }
        Err(e) => return Err(e).with_context(|| format!("running `{shown}`")),
    };
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}\n{needs}: run `{shown}` by hand to see why \
             (`apt-get update` may help), {by_hand}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Rewrites the file only when its content changes, and then by renaming a
/// complete copy into place: a QEMU started from the old file, or another
/// run preparing the same cache, never sees a half-written one.
fn write_if_changed(path: &Path, bytes: &[u8], dir: &Path) -> anyhow::Result<()> {
    if fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    fs::write(tmp.path(), bytes).with_context(|| format!("writing {}", tmp.path().display()))?;
    // A temporary file starts private; QEMU may run as another user.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The initramfs: busybox and `/init`, uncompressed (the kernel takes a
/// plain cpio, and the archive is small enough that gzip would buy little).
fn initramfs(busybox: &[u8]) -> Vec<u8> {
    let executable = |data| Entry::File { mode: 0o755, data };
    cpio(&[
        ("bin", Entry::Dir),
        ("bin/busybox", executable(busybox)),
        ("bin/sh", Entry::Symlink("busybox")),
        // The kernel opens /dev/console for init before anything is mounted;
        // without the node init would start with no stdout at all.
        ("dev", Entry::Dir),
        ("dev/console", Entry::CharDevice { major: 5, minor: 1 }),
        ("proc", Entry::Dir),
        ("sys", Entry::Dir),
        ("init", executable(INIT.as_bytes())),
    ])
}

// ---------------------------------------------------------------------------
// The disk-writing variant (checkpoints with disks): the same kernel and init,
// with the virtio modules in the initramfs and `test_guest_disk=vda` on the
// command line, so init mounts the ext4 disk and appends every tick to it.
// ---------------------------------------------------------------------------

/// The kernel command-line switch that turns the disk writing on.
// Used by tests/tests/checkpoint.rs, which includes this file.
#[allow(dead_code)]
pub const DISK_SWITCH: &str = "test_guest_disk=vda";

/// The modules virtio-blk needs in Debian's cloud kernel, in load order
/// (ext4, jbd2 and the CRCs are built in). The package has no modules.dep;
/// each module's `depends=` says virtio needs virtio_ring.
// Used by tests/tests/checkpoint.rs, which includes this file.
#[allow(dead_code)]
pub const DISK_MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/block/virtio_blk.ko",
];

/// [`prepare`], plus an initramfs (`initramfs-disk.cpio`) holding the virtio
/// modules of the same kernel, fetched once from its package
/// (`linux-image-VERSION`) into `modules-VERSION/` in the cache.
// Used by tests/tests/checkpoint.rs, which includes this file.
#[allow(dead_code)]
pub fn prepare_with_disk(cache_dir: &Path) -> anyhow::Result<LinuxGuest> {
    let plain = prepare(cache_dir)?;
    let version = plain
        .kernel
        .file_name()
        .and_then(OsStr::to_str)
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("the kernel's name is not vmlinuz-VERSION")?
        .to_string();
    let modules_dir = cache_dir.join(format!("modules-{version}"));
    let names: Vec<&str> = DISK_MODULES
        .iter()
        .map(|m| m.rsplit('/').next().expect("a path"))
        .collect();
    if !names.iter().all(|n| modules_dir.join(n).is_file()) {
        fetch_modules(cache_dir, &version, &modules_dir).with_context(|| {
            format!(
                "fetching the virtio modules of linux-image-{version} into {}",
                cache_dir.display()
            )
        })?;
    }
    let busybox = fs::read(cache_dir.join("busybox")).context("reading the cached busybox")?;
    let mut modules = Vec::new();
    for n in &names {
        let path = modules_dir.join(n);
        modules.push((
            format!("lib/modules/{n}"),
            fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        ));
    }
    let initrd = cache_dir.join("initramfs-disk.cpio");
    write_if_changed(
        &initrd,
        &initramfs_with_modules(&busybox, &modules),
        cache_dir,
    )?;
    Ok(LinuxGuest {
        kernel: plain.kernel,
        initrd,
        append: format!("{APPEND} {DISK_SWITCH}"),
    })
}

fn fetch_modules(cache_dir: &Path, version: &str, dest: &Path) -> anyhow::Result<()> {
    let package = format!("linux-image-{version}");
    let work = download_and_extract(cache_dir, &package)?;
    let root = work.path().join(format!("root/lib/modules/{version}"));
    let staging = work.path().join("modules");
    fs::create_dir_all(&staging)?;
    for m in DISK_MODULES {
        let from = root.join(m);
        let name = m.rsplit('/').next().expect("a path");
        fs::copy(&from, staging.join(name)).with_context(|| {
            format!("{package} has no {m} (compressed modules are not supported)")
        })?;
    }
    // Whole or not at all, even with several runs at once.
    match fs::rename(&staging, dest) {
        Ok(()) => Ok(()),
        Err(_) if dest.is_dir() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("moving the modules to {}", dest.display())),
    }
}

/// The initramfs of [`initramfs`] with kernel modules and a mount point added.
fn initramfs_with_modules(busybox: &[u8], modules: &[(String, Vec<u8>)]) -> Vec<u8> {
    let executable = |data| Entry::File { mode: 0o755, data };
    let mut entries = vec![
        ("bin", Entry::Dir),
        ("bin/busybox", executable(busybox)),
        ("bin/sh", Entry::Symlink("busybox")),
        ("dev", Entry::Dir),
        ("dev/console", Entry::CharDevice { major: 5, minor: 1 }),
        ("proc", Entry::Dir),
        ("sys", Entry::Dir),
        ("mnt", Entry::Dir),
        ("lib", Entry::Dir),
        ("lib/modules", Entry::Dir),
        ("init", executable(INIT.as_bytes())),
    ];
    for (name, data) in modules {
        entries.push((name.as_str(), Entry::File { mode: 0o644, data }));
    }
    cpio(&entries)
}

/// A raw disk image of `mib` MiB holding an empty ext4 file system
/// (`mkfs.ext4`, from e2fsprogs).
// Used by tests/tests/checkpoint.rs, which includes this file.
#[allow(dead_code)]
pub fn make_disk(path: &Path, mib: u64) -> anyhow::Result<()> {
    let f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(mib << 20)?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .output()
        .context("running mkfs.ext4 (install e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One member of a cpio archive.
#[derive(Debug)]
enum Entry<'a> {
    Dir,
    File { mode: u32, data: &'a [u8] },
    Symlink(&'a str),
    CharDevice { major: u32, minor: u32 },
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// An archive in the "newc" cpio format, the one the kernel unpacks as an
/// initramfs. Everything is owned by root with mtime 0, so the same inputs
/// give the same bytes.
fn cpio(entries: &[(&str, Entry)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (index, (name, entry)) in entries.iter().enumerate() {
        let (mode, nlink, rdev, data) = match entry {
            Entry::Dir => (S_IFDIR | 0o755, 2, (0, 0), &[][..]),
            Entry::File { mode, data } => (S_IFREG | mode, 1, (0, 0), *data),
            Entry::Symlink(target) => (S_IFLNK | 0o777, 1, (0, 0), target.as_bytes()),
            Entry::CharDevice { major, minor } => (S_IFCHR | 0o600, 1, (*major, *minor), &[][..]),
        };
        // Inode numbers only need to differ: the kernel treats entries with
        // the same number and nlink > 1 as hard links.
        let ino = u32::try_from(index + 1).expect("a small archive");
        cpio_member(&mut out, name, ino, mode, nlink, rdev, data);
    }
    cpio_member(&mut out, "TRAILER!!!", 0, 0, 1, (0, 0), &[]);
    out
}

fn cpio_member(
    out: &mut Vec<u8>,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    (rdev_major, rdev_minor): (u32, u32),
    data: &[u8],
) {
    let size = u32::try_from(data.len()).expect("newc sizes are 32-bit");
    let name_size = u32::try_from(name.len() + 1).expect("a short name");
    // Thirteen fields of eight hex digits after the magic. The dev fields
    // name the file system a file came from (none here); only the "070702"
    // variant fills in the checksum.
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
         {dev_major:08x}{dev_minor:08x}{rdev_major:08x}{rdev_minor:08x}{name_size:08x}{check:08x}",
        uid = 0,
        gid = 0,
        mtime = 0,
        dev_major = 0,
        dev_minor = 0,
        check = 0,
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// Header-plus-name and data each end on a 4-byte boundary; the header
/// starts on one, so padding the running length is the same thing.
fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Member {
        name: String,
        mode: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// The members of an archive, read back by the format's rules.
    fn parse(mut archive: &[u8]) -> Vec<Member> {
        let mut members = Vec::new();
        let mut offset = 0;
        loop {
            assert_eq!(offset % 4, 0, "members start 4-aligned");
            assert_eq!(&archive[..6], b"070701", "newc magic at offset {offset}");
            let field = |i: usize| {
                let hex = std::str::from_utf8(&archive[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(hex, 16).unwrap()
            };
            let (mode, size, name_size) = (field(1), field(6) as usize, field(11) as usize);
            let rdev = (field(9), field(10));
            let name = &archive[110..110 + name_size];
            assert_eq!(name.last(), Some(&0), "names end in NUL");
            let name = String::from_utf8(name[..name_size - 1].to_vec()).unwrap();
            let data_start = (110 + name_size).next_multiple_of(4);
            let data = archive[data_start..data_start + size].to_vec();
            let next = (data_start + size).next_multiple_of(4);
            assert!(archive[data_start + size..next].iter().all(|&b| b == 0));
            if name == "TRAILER!!!" {
                assert_eq!(next, archive.len(), "nothing after the trailer");
                return members;
            }
            members.push(Member {
                name,
                mode,
                rdev,
                data,
            });
            archive = &archive[next..];
            offset += next;
        }
    }

    #[test]
    fn cpio_lists_what_was_put_in_in_newc_format() {
        let archive = cpio(&[
            ("bin", Entry::Dir),
            (
                "bin/tool",
                Entry::File {
                    mode: 0o755,
                    data: b"#!/bin/sh\n",
                },
            ),
            ("bin/sh", Entry::Symlink("tool")),
            ("dev/console", Entry::CharDevice { major: 5, minor: 1 }),
            // Name lengths and sizes around every remainder mod 4 exercise the padding.
            (
                "a",
                Entry::File {
                    mode: 0o644,
                    data: b"x",
                },
            ),
            (
                "ab",
                Entry::File {
                    mode: 0o644,
                    data: b"xy",
                },
            ),
            (
                "abc",
                Entry::File {
                    mode: 0o644,
                    data: b"xyz",
                },
            ),
            (
                "abcd",
                Entry::File {
                    mode: 0o644,
                    data: b"",
                },
            ),
        ]);
        let members = parse(&archive);
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/tool",
                "bin/sh",
                "dev/console",
                "a",
                "ab",
                "abc",
                "abcd"
            ]
        );
        assert_eq!(members[0].mode, 0o040_755);
        assert_eq!(
            (members[1].mode, &members[1].data[..]),
            (0o100_755, &b"#!/bin/sh\n"[..])
        );
        assert_eq!(
            (members[2].mode, &members[2].data[..]),
            (0o120_777, &b"tool"[..])
        );
        assert_eq!((members[3].mode, members[3].rdev), (0o020_600, (5, 1)));
        assert_eq!(members[6].data, b"xyz");

        // The reference reader, where installed, must agree.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cpio");
        fs::write(&path, &archive).unwrap();
        let listed = Command::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(&path)
            .output();
        if let Ok(out) = listed {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let listed = String::from_utf8(out.stdout).unwrap();
            assert_eq!(listed.lines().collect::<Vec<_>>(), names);
        }
    }

    #[test]
    fn initramfs_holds_init_busybox_and_a_console() {
        let members = parse(&initramfs(b"\x7fELF"));
        let find = |name: &str| members.iter().find(|m| m.name == name).unwrap();
        assert_eq!(find("init").data, INIT.as_bytes());
        assert!(
            INIT.contains(BANNER),
            "the init prints the banner this module promises"
        );
        assert_eq!(
            find("bin/busybox").mode & 0o111,
            0o111,
            "busybox is executable"
        );
        assert_eq!(find("dev/console").rdev, (5, 1));
    }
}
