//! An instant save on storage its restoring QEMU cannot map it from.
//!
//! QEMU 8.2 and later open the images read-only (see the module docs of
//! [`super`]), so a save on read-only storage (a `mount -o ro`, a read-only
//! bind mount, an image sealed with fs-verity) restores from where it is.
//! QEMU before 8.2 opens a memory backend's file for writing, even for a
//! private mapping, and fails ("can't open backing store … Read-only file
//! system"). For those, `restore --into DIR` first copies the save into
//! `DIR` (the stream, the manifest, the images with their holes kept,
//! every chunk's checksum checked as it is read) and maps the copies:
//! `DIR/NAME` is then a whole save of its own, which stays for later
//! restores. Without `--into`, the restore is refused before QEMU starts,
//! saying so.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use qemu_monitor::QemuVersion;

use super::image::ImageReader;
use super::{read_only_images, Layout, READ_ONLY_IMAGES};
use crate::error::{Error, Result};
use crate::progress::Progress;
use qemu_stream::split::PageSource;

/// Why the image at `path` cannot be opened for writing, where it cannot.
fn not_writable(path: &Path) -> Option<std::io::Error> {
    // Opened for writing and closed at once: no byte and no time changes.
    match File::options().write(true).open(path) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(e),
    }
}

/// The state file whose images a QEMU `qemu` restore maps: `statefile`
/// itself where it can, else its copy made in `into` (see the module
/// docs), with whether it is a copy.
///
/// # Errors
/// [`Error::BadStateFile`] when the images must be copied and `into` is
/// not given (saying to give it), or a copy is damaged; [`Error::File`]
/// when the copy cannot be made.
pub(crate) fn mappable(
    statefile: &Path,
    layout: &Layout,
    qemu: QemuVersion,
    into: Option<&Path>,
    progress: &dyn Progress,
) -> Result<(PathBuf, bool)> {
    if read_only_images(qemu) {
        return Ok((statefile.to_path_buf(), false));
    }
    let blocked = layout.images.iter().find_map(|i| {
        let path = statefile.with_file_name(&i.image);
        not_writable(&path).map(|e| (path, e))
    });
    let Some((image, why)) = blocked else {
        return Ok((statefile.to_path_buf(), false));
    };
    let Some(dir) = into else {
        return Err(Error::BadStateFile {
            path: image,
            reason: format!(
                "the RAM image cannot be opened for writing ({}), and QEMU {qemu} maps guest \
                 RAM only from a file it can write (QEMU {READ_ONLY_IMAGES} and later map it \
                 read-only): give `restore --into DIR`, a writable directory, to restore from a \
                 copy of the save made there, or restore with QEMU {READ_ONLY_IMAGES} or later \
                 (--qemu)",
                crate::error::os_message(&why)
            ),
        });
    };
    copy_save(statefile, layout, dir, progress).map(|copy| (copy, true))
}

/// Copies the instant save `statefile` into `dir` under its own name.
fn copy_save(
    statefile: &Path,
    layout: &Layout,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    let name = statefile.file_name().unwrap_or_default();
    let copy = dir.join(name);
    let taken = std::iter::once(copy.clone())
        .chain(std::iter::once(crate::manifest::path_for(&copy)))
        .chain(layout.images.iter().map(|i| dir.join(&i.image)))
        .find(|p| p.symlink_metadata().is_ok());
    if let Some(p) = taken {
        return Err(Error::BadStateFile {
            path: statefile.to_path_buf(),
            reason: format!(
                "--into: {} exists already (a copy of an earlier restore?): restore that copy \
                 itself, or give another directory",
                p.display()
            ),
        });
    }
    let mut made = Made(Vec::new());
    let copy_file = |from: &Path, to: &Path, made: &mut Vec<PathBuf>| -> Result<()> {
        let mut src = File::open(from).map_err(Error::file(from, "reading the save to copy"))?;
        let mut dst = crate::os::create_private(to)
            .map_err(Error::file(to, "creating the copy of the save"))?;
        made.push(to.to_path_buf());
        std::io::copy(&mut src, &mut dst)
            .and_then(|_| dst.sync_all())
            .map_err(Error::file(to, "writing the copy of the save"))?;
        Ok(())
    };
    for image in &layout.images {
        let from = statefile.with_file_name(&image.image);
        let to = dir.join(&image.image);
        progress.update("copying the RAM image", 0, Some(image.block_bytes));
        let dst = crate::os::create_private(&to)
            .map_err(Error::file(&to, "creating the copy of the RAM image"))?;
        made.0.push(to.clone());
        let mut reader =
            ImageReader::open(&from).map_err(Error::file(&from, "reading the RAM image"))?;
        reader
            .pages(image.page_size, &mut |offset, page| match page {
                Some(data) => dst.write_all_at(data, offset),
                None => Ok(()),
            })
            .and_then(|()| dst.set_len(image.block_bytes))
            .and_then(|()| dst.sync_all())
            .map_err(Error::file(&to, "writing the copy of the RAM image"))?;
        progress.update(
            "copying the RAM image",
            image.block_bytes,
            Some(image.block_bytes),
        );
        // The copy is what QEMU maps: every chunk of it checked, as read back.
        if let Some(damage) = super::check::read_whole(&to, image, &mut || true)
            .map_err(Error::file(&to, "reading the copy of the RAM image"))?
        {
            return Err(super::check::refusal(statefile, &damage));
        }
    }
    copy_file(statefile, &copy, &mut made.0)?;
    let manifest = crate::manifest::path_for(statefile);
    copy_file(&manifest, &crate::manifest::path_for(&copy), &mut made.0)?;
    let _ = crate::os::durable::sync_dir_of(&copy);
    made.0.clear();
    Ok(copy)
}

/// Files made so far, removed unless cleared (a copy that failed leaves nothing).
struct Made(Vec<PathBuf>);

impl Drop for Made {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}
