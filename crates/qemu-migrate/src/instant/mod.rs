//! Instant restore: guest RAM kept as an image that a restored QEMU maps
//! instead of loading, so a restore costs the same for 1 GiB as for 8.
//!
//! `save --instant FILE` writes two files. `FILE.ram` holds the main RAM
//! block (`pc.ram`) page for page at its offset, zero pages as holes; `FILE`
//! is a valid QEMU stream of everything else (the configuration, the RAM
//! block list, the other RAM blocks such as ROMs and ACPI tables, device
//! state) whose main block carries no pages. A restore starts QEMU with
//!
//! ```text
//! -object memory-backend-file,id=pc.ram,mem-path=FILE.ram,share=off,size=N,
//!         x-use-canonical-path-for-ramblock-id=off
//! -machine memory-backend=pc.ram
//! ```
//!
//! which keeps the block's name `pc.ram` (so the stream loads into it) and
//! makes guest RAM a private, copy-on-write mapping of the image: pages come
//! from the page cache when the guest touches them, and its writes never
//! reach the file, so any number of VMs can run from one image. QEMU's RAM
//! loader writes only the pages a stream carries, and a QEMU waiting for an
//! incoming migration does not copy its ROM blobs into RAM (`rom_reset`,
//! hw/core/loader.c, skips them in the `inmigrate` state), so what the guest
//! sees is exactly the image plus what the stream carries.
//!
//! **Checks.** The manifest records the stream's CRC-32, the image's
//! checksum (a CRC-32 over the CRC-32 of every page, see [`image`]) and the
//! image file's identity (device, inode, size, modification and change
//! times). A restore checks the stream in full (it is small) and the image's
//! size and identity: an image that is the very file the save wrote,
//! unchanged since, has the content the save checksummed. Any other (copied,
//! moved, touched) is read in full and its checksum compared before QEMU
//! starts, as `restore --verify` and `inspect` always do.
//!
//! **Where the layout cannot serve**, the save writes a plain stream and says
//! why ([`unsuitable`]): RAM from user-defined memory backends, `-mem-path`
//! (hugepages), NUMA, memory hotplug, a device that gives guest RAM back to
//! the host (virtio-balloon, virtio-mem: with QEMU before 8.2 a discard punches
//! holes into a file-backed block's file even when it is mapped privately,
//! which would damage the image), or a machine whose RAM block is not `pc.ram`.
//!
//! **Clones** (`restore --clone`): another VM from the same image while the first
//! runs, with its own sockets and logs; refused when the VM has a writable
//! disk that two VMs would share.

mod clone;
pub mod image;
mod save;

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::argv;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::progress::Progress;
use crate::restore::{Checked, RestoreOptions};

pub use image::Identity;
pub(crate) use save::save;

/// The RAM block the layout moves into the image: x86 `pc` and `q35` guest RAM.
pub const BLOCK: &str = "pc.ram";

/// How an instant save is laid out, as its manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// The image's file name, beside the state file (`FILE.ram`).
    pub image: String,
    /// The RAM block it holds (`pc.ram`).
    pub block: String,
    /// The block's size, which is the image's size.
    pub block_bytes: u64,
    /// Page size of the image.
    pub page_size: u64,
    /// Pages that hold data; the others are zero (holes).
    pub data_pages: u64,
    /// Pages that are zero.
    pub zero_pages: u64,
    /// Records of the block left in the stream (normally 0; they load over the image).
    pub pages_in_stream: u64,
    /// The image's checksum: CRC-32 of the CRC-32s of its pages, 8 hex digits.
    pub image_crc32: String,
    /// The image file as the save left it.
    pub identity: Identity,
}

/// `FILE.ram`: where the RAM image of state file `FILE` lives.
pub fn image_path(statefile: &Path) -> PathBuf {
    let mut name = statefile.file_name().unwrap_or_default().to_os_string();
    name.push(".ram");
    statefile.with_file_name(name)
}

/// When `path` is the RAM image of an instant save (`FILE.ram` beside
/// `FILE` and its manifest), an error that says to use `FILE` instead.
pub fn not_the_image(path: &Path) -> Result<()> {
    let Some(stem) = path
        .to_str()
        .and_then(|s| s.strip_suffix(".ram"))
        .map(PathBuf::from)
    else {
        return Ok(());
    };
    match Manifest::load(&stem) {
        Ok(Some(m)) if m.instant.is_some() && crate::manifest::path_for(path).exists() => Ok(()),
        Ok(Some(m)) if m.instant.is_some() => Err(Error::BadStateFile {
            path: path.to_path_buf(),
            reason: format!(
                "this is the RAM image of the instant save {}: give that file instead",
                stem.display()
            ),
        }),
        _ => Ok(()),
    }
}

/// Why a VM run with `args` cannot use the instant layout, in words; `None` when it can.
pub fn unsuitable(args: &[String]) -> Option<String> {
    let has = |opt: &str| args.iter().any(|a| a == opt || *a == format!("-{opt}"));
    let values = |opt: &str| -> Vec<&str> {
        args.windows(2)
            .filter(|w| w[0] == opt || w[0] == format!("-{opt}"))
            .map(|w| w[1].as_str())
            .collect()
    };
    if has("-numa") {
        return Some("the VM has NUMA nodes (-numa), whose RAM is not one pc.ram block".into());
    }
    if has("-mem-path") {
        return Some("the VM's RAM is already file-backed (-mem-path, e.g. hugepages)".into());
    }
    if values("-object")
        .iter()
        .any(|v| v.starts_with("memory-backend"))
        || values("-machine")
            .iter()
            .chain(values("-M").iter())
            .any(|v| v.contains("memory-backend="))
    {
        return Some(
            "the VM's RAM comes from a user-defined memory backend (-object memory-backend-*)"
                .into(),
        );
    }
    if let Some(m) = argv::last_value(args, "-m") {
        if m.contains("slots=") || m.contains("maxmem=") {
            return Some("the VM has memory hotplug (-m slots=/maxmem=)".into());
        }
    }
    let devices = values("-device");
    if let Some(d) = devices
        .iter()
        .find(|d| d.starts_with("virtio-balloon") || d.starts_with("virtio-mem"))
    {
        let name = d.split(',').next().unwrap_or(d);
        return Some(format!(
            "the VM has a {name} device, which gives guest RAM back to the host: QEMU would punch \
             holes into the shared RAM image"
        ));
    }
    if has("-balloon") {
        return Some("the VM has a balloon device (-balloon)".into());
    }
    None
}

/// Paths a clone was given of its own: (the first VM's, the clone's).
pub type Renamed = Vec<(PathBuf, PathBuf)>;

/// `args` without the two options an instant restore adds (the image as
/// guest RAM): a VM restored that way is the user's VM with the user's
/// options, and is saved, migrated and restored again as such.
pub fn without_image_options(args: Vec<String>) -> Vec<String> {
    let backend = |w: &[String]| {
        w[0] == "-object"
            && w[1].starts_with(&format!("memory-backend-file,id={BLOCK},"))
            && w[1].ends_with("x-use-canonical-path-for-ramblock-id=off")
    };
    let machine = |w: &[String]| w[0] == "-machine" && w[1] == format!("memory-backend={BLOCK}");
    let (Some(b), Some(m)) = (
        args.windows(2).position(backend),
        args.windows(2).position(machine),
    ) else {
        return args;
    };
    args.into_iter()
        .enumerate()
        .filter(|(i, _)| ![b, b + 1, m, m + 1].contains(i))
        .map(|(_, a)| a)
        .collect()
}

/// The manifest's layout, when `checked` is an instant save.
pub fn layout(checked: &Checked) -> Option<&Layout> {
    checked.manifest.as_ref().and_then(|m| m.instant.as_ref())
}

/// How the image of an instant save was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageCheck {
    /// The very file the save wrote, unchanged since (size and identity).
    Identity,
    /// Read in full; its checksum matches the save's.
    Checksum,
}

/// Checks the image of the instant save `statefile`: its size always; its
/// identity, or, when that differs or `full`, its checksum by reading it whole.
///
/// # Errors
/// [`Error::BadStateFile`] saying what is wrong with it.
pub fn check_image(
    statefile: &Path,
    layout: &Layout,
    full: bool,
    progress: &dyn Progress,
) -> Result<ImageCheck> {
    let path = statefile.with_file_name(&layout.image);
    let bad = |reason: String| Error::BadStateFile {
        path: path.clone(),
        reason,
    };
    let id = match Identity::of(&path) {
        Ok(id) => id,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad(format!(
                "the RAM image of {} is missing: an instant save is two files, {} and {}",
                statefile.display(),
                statefile.display(),
                path.display()
            )))
        }
        Err(e) => return Err(Error::file(&path, "reading the RAM image")(e)),
    };
    if id.size != layout.block_bytes {
        return Err(bad(format!(
            "incomplete or altered: {} bytes, but the save wrote {} (manifest)",
            id.size, layout.block_bytes
        )));
    }
    if !full && id == layout.identity {
        return Ok(ImageCheck::Identity);
    }
    progress.update("checking the RAM image", 0, Some(layout.block_bytes));
    let sum = image::ImageReader::open(&path)
        .and_then(|mut r| r.checksum(layout.page_size))
        .map_err(Error::file(&path, "reading the RAM image"))?;
    progress.update(
        "checking the RAM image",
        layout.block_bytes,
        Some(layout.block_bytes),
    );
    let got = format!("{:08x}", sum.crc);
    if got != layout.image_crc32 {
        return Err(bad(format!(
            "damaged: its checksum is {got}, the save recorded {} (manifest)",
            layout.image_crc32
        )));
    }
    Ok(ImageCheck::Checksum)
}

/// The QEMU options a restore starts with: `args`, with the image mapped as
/// guest RAM for an instant save, and with sockets and logs of its own for
/// a clone. Checks the image first (see the module docs).
///
/// # Errors
/// [`Error::BadStateFile`] for a damaged or missing image; [`Error::Mismatch`]
/// for options the layout cannot serve or a clone that would share a disk.
pub(crate) fn launch_args(
    checked: &Checked,
    args: Vec<String>,
    options: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<(Vec<String>, Renamed)> {
    let refuse = |why: String| Error::Mismatch {
        path: checked.path.clone(),
        differences: vec![why],
    };
    let with_clone = |args: Vec<String>| {
        if options.clone {
            clone::clone_args(&args).map_err(refuse)
        } else {
            Ok((args, Vec::new()))
        }
    };
    let Some(layout) = layout(checked) else {
        return with_clone(args);
    };
    if let Some(why) = unsuitable(&args) {
        return Err(refuse(format!(
            "{why}; an instant save restores only without it"
        )));
    }
    check_image(&checked.path, layout, options.verify, progress)?;
    // Last, as it reserves the clone's paths.
    let (mut args, renamed) = with_clone(args)?;
    let image = checked.path.with_file_name(&layout.image);
    let image = std::path::absolute(&image).unwrap_or(image);
    // QEMU's option syntax doubles a comma that belongs to a value.
    let mem_path = image.display().to_string().replace(',', ",,");
    args.extend([
        "-object".to_string(),
        format!(
            "memory-backend-file,id={BLOCK},mem-path={mem_path},share=off,size={},\
             x-use-canonical-path-for-ramblock-id=off",
            layout.block_bytes
        ),
        "-machine".to_string(),
        format!("memory-backend={BLOCK}"),
    ]);
    Ok((args, renamed))
}

/// Writes the instant save `statefile` to `out` as one plain stream, which
/// QEMU restores by hand (`-incoming "exec: qemu-migrate export FILE"`).
///
/// # Errors
/// [`Error::BadStateFile`] when `statefile` is not a complete instant save
/// or its image is damaged; [`Error::File`] when reading or writing fails.
pub fn export(statefile: &Path, out: impl Write) -> Result<qemu_stream::split::SplitReport> {
    let checked = crate::restore::check(statefile)?;
    let Some(layout) = layout(&checked) else {
        return Err(Error::BadStateFile {
            path: statefile.to_path_buf(),
            reason: "not an instant save (it is a plain stream already: use it as it is)".into(),
        });
    };
    check_image(statefile, layout, false, &crate::progress::Quiet)?;
    let image = statefile.with_file_name(&layout.image);
    let mut source =
        image::ImageReader::open(&image).map_err(Error::file(&image, "reading the RAM image"))?;
    let stream =
        std::fs::File::open(statefile).map_err(Error::file(statefile, "reading the state file"))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
    let report = qemu_stream::split::join(
        std::io::BufReader::with_capacity(1 << 20, stream),
        vec![(&layout.block, &mut source)],
        &mut out,
    )
    .map_err(|e| match e {
        qemu_stream::split::SplitError::Write(e) => {
            Error::file("standard output", "writing the stream")(e)
        }
        e => Error::BadStateFile {
            path: statefile.to_path_buf(),
            reason: e.to_string(),
        },
    })?;
    out.flush()
        .map_err(|e| Error::file("standard output", "writing the stream")(e))?;
    Ok(report)
}

/// A manifest for an instant save: `plain`, with its layout and format.
pub(crate) fn manifest_with(mut plain: Manifest, layout: Layout) -> Manifest {
    plain.format = crate::manifest::FORMAT_INSTANT.to_string();
    plain.instant = Some(layout);
    plain
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_image_options_of_a_restore_are_not_the_vms_own() {
        let restored = v("-m 32 -kernel k -object memory-backend-file,id=pc.ram,mem-path=/s/state.ram,share=off,size=33554432,x-use-canonical-path-for-ramblock-id=off -machine memory-backend=pc.ram -qmp unix:/q,server,nowait");
        assert_eq!(
            without_image_options(restored),
            v("-m 32 -kernel k -qmp unix:/q,server,nowait")
        );
        // A user's own backend stays, and the layout refuses it.
        let own = v("-m 32 -object memory-backend-ram,id=m0,size=32M -machine memory-backend=m0");
        assert_eq!(without_image_options(own.clone()), own);
        assert!(unsuitable(&own).is_some());
        assert!(unsuitable(&v("-m 32 -kernel k")).is_none());
    }
}
