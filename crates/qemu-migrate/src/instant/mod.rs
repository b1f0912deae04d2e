//! Instant restore: guest RAM kept as an image that a restored QEMU maps
//! instead of loading, so a restore costs the same for 1 GiB as for 8.
//!
//! `save --instant FILE` writes an image per block of guest RAM and a stream.
//! `FILE.ram` (then `FILE.ram.1`, `FILE.ram.2`, … for a VM whose RAM is
//! several blocks: NUMA nodes, DIMMs) holds a block page for page at its
//! offset, zero pages as holes; `FILE` is a valid QEMU stream of everything
//! else (the configuration, the RAM block list, the other RAM blocks such as
//! ROMs and ACPI tables, device state) whose guest RAM blocks carry no pages.
//! Which blocks are guest RAM, and how each is mapped back, is `shape`'s
//! business. For a VM started with `-m` only, a restore starts QEMU with
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
//! sees is exactly the image plus what the stream carries. A VM whose RAM
//! comes from memory backends (`-object memory-backend-*`, as libvirt
//! always starts one) keeps its own options, but each backend that holds a
//! block becomes a `memory-backend-file` of its image with the same id,
//! size and block name (see `shape`).
//!
//! With QEMU 8.2 or later the images are opened read-only
//! (`readonly=on,rom=off`: still a private, writable mapping), so nothing
//! QEMU does can write to them: in particular not a balloon. QEMU gives a
//! ballooned page back by `ram_block_discard_range` (system/physmem.c),
//! which punches a hole into the file behind a file-backed block even when
//! it is mapped privately (10.0 warns that this "will modify the underlying
//! file"); from a read-only file it refuses ("Discarding RAM with readonly
//! files is not supported") and the page stays. Measured with a Linux guest
//! and its virtio_balloon driver, 256 MiB mapped privately from a file, the
//! balloon inflated by 128 MiB: 7.2 and 10.0 punched 32768 page-sized holes
//! into the file (10.0 with its warning); 10.0 with the file read-only left
//! it unchanged, printing that refusal once per page (32768 lines), and the
//! guest ran on. So a VM with a virtio-balloon is laid out this way on QEMU
//! 8.2 and later, at the cost that its balloon gives no memory back to the
//! host (and QEMU's stderr gets a line per page it was asked for); before
//! 8.2 (no `rom` property: `readonly=on` would make guest RAM read-only) it
//! is saved as a plain stream.
//!
//! **Checks.** The manifest records the stream's CRC-32, the image's
//! checksum (a CRC-32 over the CRC-32 of every page, see [`image`]), a
//! checksum per 4 MiB chunk, the image file's identity (device, inode,
//! size, modification and change times) and, where the file system has
//! fs-verity, the digest the image was sealed with. A restore checks the
//! stream in full (it is small), the image's size, and then:
//! - a sealed image: its digest, asked of the kernel (O(1)), which then
//!   checks every page QEMU reads;
//! - an image that is the very file the save wrote (same identity): its
//!   chunks, read in the background while the guest runs, the VM stopped
//!   on damage;
//! - any other (copied, moved, touched), or with `restore --verify`: every
//!   chunk, read before QEMU starts, and refused on damage.
//!
//! See [`check`] for why, and what each proves.
//!
//! **Where the layout cannot serve**, the save writes a plain stream and says
//! why ([`unsuitable`], `shape::targets`): `-mem-path` or a backend on
//! hugepages, a file backend mapped shared (its file already is the RAM), a
//! backend shared with a vhost-user backend, NUMA nodes without `memdev=`,
//! virtio-mem, a balloon before QEMU 8.2, or a machine with neither `pc.ram`
//! nor a memory backend.
//!
//! **Clones** (`restore --clone`): another VM from the same image while the first
//! runs, with its own sockets and logs; refused when the VM has a writable
//! disk that two VMs would share.

pub mod check;
mod clone;
pub mod image;
mod save;
pub(crate) mod shape;
mod storage;

use std::io::Write;
use std::path::{Path, PathBuf};

use qemu_monitor::QemuVersion;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::progress::Progress;
use crate::restore::{Checked, RestoreOptions};

pub use check::{Chunks, Damage};
pub use image::Identity;
pub(crate) use save::save;

/// The RAM block the layout moves into the image: x86 `pc` and `q35` guest RAM.
pub const BLOCK: &str = "pc.ram";

/// The RAM block a machine makes of `-m` when no backend is given, by
/// machine (QEMU's `default_ram_id`: `pc.ram` for pc and q35, `microvm.ram`
/// for microvm).
pub const MACHINE_BLOCKS: &[&str] = &[BLOCK, "microvm.ram"];

/// One RAM block's image, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The image's file name, beside the state file (`FILE.ram`, `FILE.ram.1`, …).
    pub image: String,
    /// The RAM block it holds, by its name in the stream (`pc.ram`, `m0`, `/objects/m0`).
    pub block: String,
    /// The id of the memory backend (`-object memory-backend-*,id=`) the
    /// block comes from; none for the `pc.ram` of a VM started with `-m` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
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
    /// The checksum of each chunk (none in saves of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Chunks>,
    /// The fs-verity digest the image was sealed with (`sha256:HEX`), where
    /// the file system has fs-verity and the saving QEMU maps it read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<String>,
}

/// How an instant save is laid out, as its manifest records it: an image
/// per RAM block. One `pc.ram` image is written as older saves wrote their
/// only image (its fields inline), which every version reads; several are
/// `{"images": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "LayoutRecord")]
pub struct Layout {
    /// The images, in the order of the stream's block list.
    pub images: Vec<Image>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LayoutRecord {
    Images { images: Vec<Image> },
    One(Box<Image>),
}

impl From<LayoutRecord> for Layout {
    fn from(r: LayoutRecord) -> Layout {
        match r {
            LayoutRecord::Images { images } => Layout { images },
            LayoutRecord::One(image) => Layout {
                images: vec![*image],
            },
        }
    }
}

impl Serialize for Layout {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Images<'a> {
            images: &'a [Image],
        }
        match self.images.as_slice() {
            [one] if one.backend.is_none() => one.serialize(s),
            images => Images { images }.serialize(s),
        }
    }
}

impl Layout {
    /// Bytes of guest RAM in images.
    pub fn bytes(&self) -> u64 {
        self.images.iter().map(|i| i.block_bytes).sum()
    }
}

/// `FILE.ram`: where the (first) RAM image of state file `FILE` lives.
pub fn image_path(statefile: &Path) -> PathBuf {
    image_path_n(statefile, 0)
}

/// Where the RAM image number `n` of state file `FILE` lives: `FILE.ram`,
/// then `FILE.ram.1`, `FILE.ram.2`, …
pub fn image_path_n(statefile: &Path, n: usize) -> PathBuf {
    image_path_in(statefile, "", n)
}

/// The second set of names: `FILE.ram-b`, `FILE.ram-b.1`, …
const SECOND_SET: &str = "-b";

fn image_path_in(statefile: &Path, set: &str, n: usize) -> PathBuf {
    let mut name = statefile.file_name().unwrap_or_default().to_os_string();
    name.push(".ram");
    name.push(set);
    if n > 0 {
        name.push(format!(".{n}"));
    }
    statefile.with_file_name(name)
}

/// The names of the `count` RAM images of a new save of `statefile`: the
/// set of names the save there now (images `in_use`) does not use, so
/// that it stays whole until the new one is committed
/// ([`crate::commit`]). Saves alternate between `FILE.ram`, `FILE.ram.1`…
/// and `FILE.ram-b`, `FILE.ram-b.1`…
#[must_use]
pub fn image_names(statefile: &Path, count: usize, in_use: &[String]) -> Vec<PathBuf> {
    let names = |set: &str| -> Vec<PathBuf> {
        (0..count)
            .map(|n| image_path_in(statefile, set, n))
            .collect()
    };
    let first = names("");
    let clash = first.iter().any(|p| {
        p.file_name()
            .is_some_and(|f| in_use.iter().any(|u| f.to_string_lossy() == *u))
    });
    if clash {
        names(SECOND_SET)
    } else {
        first
    }
}

/// Both sets of names an image of `statefile` may have, for `count` images.
#[must_use]
pub fn all_image_names(statefile: &Path, count: usize) -> Vec<PathBuf> {
    (0..count)
        .flat_map(|n| {
            [
                image_path_in(statefile, "", n),
                image_path_in(statefile, SECOND_SET, n),
            ]
        })
        .collect()
}

/// The state file whose RAM image `path` would be, by its name
/// (`FILE.ram`, `FILE.ram.N`, `FILE.ram-b` or `FILE.ram-b.N` → `FILE`).
fn image_stem(path: &Path) -> Option<PathBuf> {
    let s = path.to_str()?;
    let s = match s.rsplit_once('.') {
        Some((head, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => head,
        _ => s,
    };
    let s = s.strip_suffix(SECOND_SET).unwrap_or(s);
    s.strip_suffix(".ram").map(PathBuf::from)
}

/// When `path` is a RAM image of an instant save (`FILE.ram` beside
/// `FILE` and its manifest), an error that says to use `FILE` instead.
pub fn not_the_image(path: &Path) -> Result<()> {
    let Some(stem) = image_stem(path) else {
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

/// The first QEMU that can open a RAM image read-only yet map it writable
/// (`memory-backend-file`'s `rom` property).
pub(crate) const READ_ONLY_IMAGES: QemuVersion = QemuVersion {
    major: 8,
    minor: 2,
    micro: 0,
};

/// Whether `qemu` opens the images read-only (see the module docs).
pub(crate) fn read_only_images(qemu: QemuVersion) -> bool {
    qemu >= READ_ONLY_IMAGES
}

/// Why a VM run with `args` by QEMU `qemu` cannot use the instant layout, in
/// words; `None` when it can, as far as its options tell (its memory
/// backends are `shape::targets`' to judge).
pub fn unsuitable(args: &[String], qemu: QemuVersion) -> Option<String> {
    let has = |opt: &str| args.iter().any(|a| a == opt || *a == format!("-{opt}"));
    let values = |opt: &str| -> Vec<&str> {
        args.windows(2)
            .filter(|w| w[0] == opt || w[0] == format!("-{opt}"))
            .map(|w| w[1].as_str())
            .collect()
    };
    if has("-mem-path") {
        return Some("the VM's RAM is already file-backed (-mem-path, e.g. hugepages)".into());
    }
    let nodes = values("-numa")
        .into_iter()
        .filter(|v| v.starts_with("node") || v.contains("type=node"));
    for node in nodes {
        if !node.split(',').any(|o| o.starts_with("memdev=")) {
            return Some(format!(
                "the VM has a NUMA node without a memory backend (-numa {node}): give each node its own memdev="
            ));
        }
    }
    let devices = values("-device");
    if let Some(d) = devices.iter().find(|d| d.starts_with("virtio-mem")) {
        let name = d.split(',').next().unwrap_or(d);
        return Some(format!(
            "the VM has a {name} device, which plugs and unplugs guest RAM as it runs"
        ));
    }
    let balloon = devices
        .iter()
        .find(|d| d.starts_with("virtio-balloon"))
        .map(|d| d.split(',').next().unwrap_or(d).to_string())
        .or_else(|| has("-balloon").then(|| "balloon (-balloon)".to_string()));
    if let Some(name) = balloon {
        if !read_only_images(qemu) {
            return Some(format!(
                "the VM has a {name} device, and QEMU {qemu} gives a ballooned page back by punching a hole into the file behind guest RAM, even a privately mapped one: it would damage the RAM image (QEMU {READ_ONLY_IMAGES} and later can map the image read-only)"
            ));
        }
    }
    None
}

/// Paths a clone was given of its own: (the first VM's, the clone's).
pub type Renamed = Vec<(PathBuf, PathBuf)>;

/// `args` without what an instant restore changed (the images as guest
/// RAM): a VM restored that way is the user's VM with the user's options,
/// and is saved, migrated and restored again as such. The `pc.ram` of a
/// `-m` VM loses the two options added for it; a backend rewritten into a
/// file backend of an image gets back its definition from the manifest of
/// the save that image belongs to.
pub fn without_image_options(args: Vec<String>) -> Vec<String> {
    let mut args = args;
    for b in shape::backends(&args) {
        let Some(mem_path) = b.image_path() else {
            continue;
        };
        let Some(own) = saved_definition(Path::new(&mem_path), &b.id) else {
            continue;
        };
        args[b.at] = own;
    }
    let backend = |w: &[String]| {
        w[0] == "-object"
            && MACHINE_BLOCKS
                .iter()
                .any(|id| w[1].starts_with(&format!("memory-backend-file,id={id},")))
            && shape::backends(w)
                .first()
                .is_some_and(|b| b.image_path().is_some())
    };
    let machine = |w: &[String]| {
        w[0] == "-machine"
            && MACHINE_BLOCKS
                .iter()
                .any(|id| w[1] == format!("memory-backend={id}"))
    };
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

/// The `-object` value that defined backend `id` in the VM whose instant
/// save `image` is an image of, as that save's manifest records it.
fn saved_definition(image: &Path, id: &str) -> Option<String> {
    let stem = image_stem(image)?;
    let manifest = Manifest::load(&stem).ok()??;
    let name = image.file_name()?.to_str()?;
    manifest
        .instant?
        .images
        .iter()
        .find(|i| i.image == name && i.backend.as_deref() == Some(id))?;
    let own = shape::backends(&manifest.args)
        .into_iter()
        .find(|b| b.id == id)?;
    manifest.args.get(own.at).cloned()
}

/// The manifest's layout, when `checked` is an instant save.
pub fn layout(checked: &Checked) -> Option<&Layout> {
    checked.manifest.as_ref().and_then(|m| m.instant.as_ref())
}

/// How the image of an instant save was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ImageCheck {
    /// Its size and identity only: the very file the save wrote, unchanged
    /// through the file system since; its content not read (a restore reads
    /// it in the background).
    Identity,
    /// Sealed with fs-verity, with the digest the save recorded: the kernel
    /// checks each page as it is read.
    Verity,
    /// Read in full; every chunk's checksum (or the whole image's, for an
    /// older save) matches.
    Checksum,
}

impl ImageCheck {
    /// What was checked, in words.
    pub fn words(self) -> &'static str {
        match self {
            ImageCheck::Identity => {
                "size and identity only (the very file the save wrote, unchanged through the file system); its content was not read"
            }
            ImageCheck::Verity => {
                "sealed with fs-verity, digest as saved: the kernel checks every page as it is read"
            }
            ImageCheck::Checksum => "read in full: every chunk's checksum matches the save's",
        }
    }
}

/// Checks the images of the instant save `statefile`: their sizes always;
/// then a sealed image's fs-verity digest; an unsealed one's identity, or,
/// when that differs or `full`, every chunk by reading it whole. Says how
/// each image was checked, in the layout's order.
///
/// # Errors
/// [`Error::BadStateFile`] saying what is wrong with which image (for
/// damage, which chunk).
pub fn check_image(
    statefile: &Path,
    layout: &Layout,
    full: bool,
    progress: &dyn Progress,
) -> Result<Vec<ImageCheck>> {
    layout
        .images
        .iter()
        .map(|image| check_one(statefile, image, full, None, progress))
        .collect()
}

fn check_one(
    statefile: &Path,
    layout: &Image,
    full: bool,
    qemu: Option<QemuVersion>,
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
                "the RAM image of {} is missing: an instant save is the state file and its RAM images, {} among them",
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
    if let Some(want) = &layout.verity {
        let got = std::fs::File::open(&path)
            .and_then(|f| crate::os::measure_verity(&f))
            .map_err(Error::file(
                &path,
                "measuring the RAM image's fs-verity digest",
            ))?;
        match got {
            Some(got) if got == *want => {
                if let Some(q) = qemu.filter(|q| !read_only_images(*q)) {
                    return Err(bad(format!(
                        "it is sealed with fs-verity (read-only for good), and QEMU {q} opens guest RAM's file for writing: restore with QEMU {READ_ONLY_IMAGES} or later (--qemu), or from a copy of the save (a copy is not sealed)"
                    )));
                }
                if !full {
                    return Ok(ImageCheck::Verity);
                }
            }
            Some(got) => {
                return Err(bad(format!(
                    "replaced or damaged: its fs-verity digest is {got}, the save sealed it with {want} (manifest)"
                )))
            }
            // Not sealed: a copy of the save (copies lose the seal), checked as any.
            None => {}
        }
    }
    if !full && id == layout.identity {
        return Ok(ImageCheck::Identity);
    }
    progress.update("checking the RAM image", 0, Some(layout.block_bytes));
    let damage = check::read_whole(&path, layout, &mut || true).map_err(|e| {
        if e.raw_os_error() == Some(libc::EIO) && layout.verity.is_some() {
            bad(format!(
                "the kernel's fs-verity check failed while reading it ({e}): it is damaged below the file system; restore from an intact copy of the save or from an earlier save"
            ))
        } else {
            Error::file(&path, "reading the RAM image")(e)
        }
    })?;
    progress.update(
        "checking the RAM image",
        layout.block_bytes,
        Some(layout.block_bytes),
    );
    if let Some(damage) = damage {
        return Err(check::refusal(statefile, &damage));
    }
    Ok(ImageCheck::Checksum)
}

/// How a restore starts its QEMU.
pub(crate) struct Launch {
    /// The options.
    pub args: Vec<String>,
    /// Paths a clone was given of its own.
    pub renamed: Renamed,
    /// Images whose content was not read, for [`check::in_background`].
    pub unread: Vec<Image>,
    /// The copy of the save made with `--into` and mapped (see [`storage`]).
    pub copy: Option<PathBuf>,
}

/// The QEMU options a restore by QEMU `qemu` starts with: `args`, with the
/// images mapped as guest RAM for an instant save, and with sockets and logs
/// of its own for a clone. Checks the images first (see the module docs),
/// and returns those whose content was not read, for [`check::in_background`].
///
/// # Errors
/// [`Error::BadStateFile`] for a damaged or missing image; [`Error::Mismatch`]
/// for options the layout cannot serve or a clone that would share a disk.
pub(crate) fn launch_args(
    checked: &Checked,
    args: Vec<String>,
    own: &[PathBuf],
    qemu: QemuVersion,
    options: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<Launch> {
    let refuse = |why: String| Error::Mismatch {
        path: checked.path.clone(),
        differences: vec![why],
    };
    let with_clone = |args: Vec<String>| {
        if options.clone {
            clone::clone_args(&args, own).map_err(refuse)
        } else {
            Ok((args, Vec::new()))
        }
    };
    let Some(layout) = layout(checked) else {
        let (args, renamed) = with_clone(args)?;
        return Ok(Launch {
            args,
            renamed,
            unread: Vec::new(),
            copy: None,
        });
    };
    if let Some(why) = unsuitable(&args, qemu) {
        return Err(refuse(format!(
            "{why}; an instant save restores only without it"
        )));
    }
    let backends = shape::backends(&args);
    for image in &layout.images {
        match &image.backend {
            Some(id) => {
                let Some(b) = backends.iter().find(|b| &b.id == id) else {
                    return Err(refuse(format!(
                        "the options define no memory backend {id}, whose RAM is the image {}",
                        image.image
                    )));
                };
                if let Some(why) = b.unsuitable() {
                    return Err(refuse(format!(
                        "{why}; an instant save restores only without it"
                    )));
                }
            }
            None if backends.iter().any(|b| b.id == image.block) => {
                return Err(refuse(format!(
                    "the options define a memory backend {0}, but the save's {0} was the machine's own (-m)",
                    image.block
                )));
            }
            None => {}
        }
    }
    // Where QEMU can map them from: in place, or a copy made with --into.
    let (base, copied) = storage::mappable(
        &checked.path,
        layout,
        qemu,
        options.into.as_deref(),
        progress,
    )?;
    let mut unread = Vec::new();
    for image in &layout.images {
        let how = check_one(&base, image, options.verify, Some(qemu), progress)?;
        if how == ImageCheck::Identity {
            unread.push(image.clone());
        }
    }
    // Last, as it reserves the clone's paths.
    let (mut args, renamed) = with_clone(args)?;
    let read_only = read_only_images(qemu);
    for image in &layout.images {
        let path = base.with_file_name(&image.image);
        let path = std::path::absolute(&path).unwrap_or(path);
        match &image.backend {
            Some(id) => {
                // Found above; a clone's options keep the backend where it was.
                if let Some(b) = shape::backends(&args).into_iter().find(|b| &b.id == id) {
                    args[b.at] = b.as_image(&path, &image.block, read_only);
                }
            }
            None => {
                // QEMU's option syntax doubles a comma that belongs to a value.
                let mem_path = path.display().to_string().replace(',', ",,");
                let protect = if read_only {
                    ",readonly=on,rom=off"
                } else {
                    ""
                };
                // The machine's own block (`pc.ram`, `microvm.ram`) under its name.
                args.extend([
                    "-object".to_string(),
                    format!(
                        "memory-backend-file,id={},mem-path={mem_path},share=off,size={},\
                         x-use-canonical-path-for-ramblock-id=off{protect}",
                        image.block, image.block_bytes
                    ),
                    "-machine".to_string(),
                    format!("memory-backend={}", image.block),
                ]);
            }
        }
    }
    Ok(Launch {
        args,
        renamed,
        unread,
        copy: copied.then_some(base),
    })
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
    // Every chunk checked first: what is exported is run by hand, with no
    // check of ours behind it.
    check_image(statefile, layout, true, &crate::progress::Quiet)?;
    let mut sources = Vec::new();
    for i in &layout.images {
        let image = statefile.with_file_name(&i.image);
        sources.push(
            image::ImageReader::open(&image)
                .map_err(Error::file(&image, "reading the RAM image"))?,
        );
    }
    let stream =
        std::fs::File::open(statefile).map_err(Error::file(statefile, "reading the state file"))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
    let report = qemu_stream::split::join(
        std::io::BufReader::with_capacity(1 << 20, stream),
        layout
            .images
            .iter()
            .zip(sources.iter_mut())
            .map(|(i, s)| {
                (
                    i.block.as_str(),
                    s as &mut dyn qemu_stream::split::PageSource,
                )
            })
            .collect(),
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
        // The same, opened read-only (QEMU 8.2+).
        let read_only = v("-m 32 -object memory-backend-file,id=pc.ram,mem-path=/s/state.ram,share=off,size=33554432,x-use-canonical-path-for-ramblock-id=off,readonly=on,rom=off -machine memory-backend=pc.ram");
        assert_eq!(without_image_options(read_only), v("-m 32"));
        // A user's own backend stays.
        let own = v("-m 32 -object memory-backend-ram,id=m0,size=32M -machine memory-backend=m0");
        assert_eq!(without_image_options(own.clone()), own);
    }

    #[test]
    fn a_balloon_is_laid_out_only_where_the_image_can_be_read_only() {
        let old: QemuVersion = "7.2.22".parse().unwrap();
        let new: QemuVersion = "10.0.2".parse().unwrap();
        let balloon = v("-m 32 -device virtio-balloon-pci");
        let why = unsuitable(&balloon, old).unwrap();
        assert!(
            why.contains("virtio-balloon-pci") && why.contains("punching a hole"),
            "{why}"
        );
        assert!(unsuitable(&balloon, new).is_none());
        assert!(unsuitable(&v("-m 32 -kernel k"), old).is_none());
        let own = v("-m 32 -object memory-backend-ram,id=m0,size=32M -machine memory-backend=m0");
        assert!(unsuitable(&own, old).is_none());
        assert!(unsuitable(&v("-m 64 -numa node -numa node"), new).is_some());
        assert!(unsuitable(&v("-object memory-backend-ram,id=m0,size=32M -numa node,memdev=m0 -numa dist,src=0,dst=0,val=10"), new).is_none());
    }

    #[test]
    fn image_names_lead_back_to_their_state_file() {
        let s = Path::new("/d/state");
        assert_eq!(image_path_n(s, 0), Path::new("/d/state.ram"));
        assert_eq!(image_path_n(s, 2), Path::new("/d/state.ram.2"));
        let in_use = ["state.ram".to_string(), "state.ram.1".to_string()];
        assert_eq!(
            image_names(s, 2, &in_use),
            [Path::new("/d/state.ram-b"), Path::new("/d/state.ram-b.1")]
        );
        let in_use = ["state.ram-b".to_string()];
        assert_eq!(image_names(s, 1, &in_use), [Path::new("/d/state.ram")]);
        assert_eq!(image_stem(Path::new("/d/state.ram-b.1")).unwrap(), s);
        assert_eq!(image_stem(Path::new("/d/state.ram.2")).unwrap(), s);
        assert_eq!(image_stem(Path::new("/d/state.ram")).unwrap(), s);
        assert_eq!(image_stem(Path::new("/d/state.1")), None);
    }

    #[test]
    fn a_single_image_manifest_reads_and_writes_as_older_saves_did() {
        let one = serde_json::json!({"image": "s.ram", "block": "pc.ram", "block_bytes": 4096,
            "page_size": 4096, "data_pages": 1, "zero_pages": 0, "pages_in_stream": 0,
            "image_crc32": "00000000",
            "identity": {"dev": 1, "ino": 2, "size": 4096, "mtime": [0, 0], "ctime": [0, 0]}});
        // Saves of older versions have no chunk checksums or digest.
        let layout: Layout = serde_json::from_value(one.clone()).unwrap();
        assert_eq!(layout.images.len(), 1);
        assert_eq!(serde_json::to_value(&layout).unwrap(), one);
        let mut two = layout.clone();
        two.images[0].backend = Some("m0".into());
        two.images.push(two.images[0].clone());
        let text = serde_json::to_value(&two).unwrap();
        assert!(text["images"].is_array());
        assert_eq!(serde_json::from_value::<Layout>(text).unwrap(), two);
    }
}
