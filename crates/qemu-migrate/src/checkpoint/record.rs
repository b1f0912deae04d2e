//! What a save records of the VM's disks, and the check a restore makes
//! before anything starts: every recorded image still as it was.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The VM's disk images at the save: with `--with-disks`, the frozen images
/// each restore puts a fresh overlay on; without, the images the state
/// belongs with, which a restore refuses once they changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// `true` for a checkpoint (`save --with-disks`): the images are frozen
    /// and every restore writes to an overlay of its own.
    pub frozen: bool,
    /// QEMU's working directory, against which relative paths on its
    /// command line were resolved.
    pub cwd: PathBuf,
    /// Each writable disk backed by files.
    pub disks: Vec<Disk>,
}

/// One writable disk of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// QEMU's name for it: the drive id (`virtio0`) or the `-blockdev` node name.
    pub name: String,
    /// The `-blockdev` node the saved command line defines its top image
    /// with (`images[0]`); `None` for a `-drive` or `-hda`, known by file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The guest-visible size in bytes.
    pub virtual_size: u64,
    /// Its image chain at the save, top first. A restore of a checkpoint
    /// puts its overlay on `images[0]`.
    pub images: Vec<Image>,
    /// The overlay the saved VM went on writing to, when it lived on after
    /// a checkpoint (`--then stop` or `resume`). It is not part of the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_overlay: Option<PathBuf>,
}

/// One image file as it was at the save.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Absolute path.
    pub path: PathBuf,
    /// The block node that read it, when it had a name of its own
    /// (a `-blockdev` node, or one of the overlays a checkpoint made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// QEMU's format driver: `raw`, `qcow2`.
    pub format: String,
    /// The file's size in bytes.
    pub size: u64,
    /// Its modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
    /// CRC-32 of samples of its content (see [`fingerprint`]).
    pub fingerprint: String,
}

/// How many bytes each sample covers.
const SAMPLE: u64 = 64 * 1024;
/// How many samples are spread over the file between its first and last.
const SAMPLES: u64 = 14;

/// A fingerprint of a file's content, cheap enough for a multi-GiB image
/// at every save and restore: CRC-32 of its first and last 64 KiB and of
/// 64 KiB at 14 evenly spaced places between (the whole file when it is
/// smaller than that). It catches a file replaced or rewritten; a write
/// that falls between the samples changes the modification time, which is
/// recorded beside it.
///
/// # Errors
/// [`Error::File`] when the file cannot be read.
pub fn fingerprint(path: &Path) -> Result<String> {
    let file = File::open(path).map_err(Error::file(path, "reading a disk image"))?;
    let size = file
        .metadata()
        .map_err(Error::file(path, "reading a disk image"))?
        .len();
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; usize::try_from(SAMPLE).unwrap_or(1 << 16)];
    let mut offsets = vec![0];
    if size > SAMPLE * (SAMPLES + 2) {
        let step = size / (SAMPLES + 1);
        offsets.extend((1..=SAMPLES).map(|k| (k * step) & !4095));
        offsets.push(size - SAMPLE);
    } else {
        offsets.extend((1..size.div_ceil(SAMPLE)).map(|k| k * SAMPLE));
    }
    for offset in offsets {
        let n = file
            .read_at(&mut buf, offset)
            .map_err(Error::file(path, "reading a disk image"))?;
        hasher.update(&buf[..n]);
    }
    Ok(format!("crc32:{:08x}", hasher.finalize()))
}

impl Image {
    /// The image at `path` as it is now.
    ///
    /// # Errors
    /// [`Error::File`] when it cannot be read.
    pub fn read(path: &Path, format: &str) -> Result<Image> {
        let meta = std::fs::metadata(path).map_err(Error::file(path, "reading a disk image"))?;
        Ok(Image {
            path: path.to_path_buf(),
            node: None,
            format: format.to_string(),
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            fingerprint: fingerprint(path)?,
        })
    }

    /// What changed since the save, in words; `None` when nothing did.
    #[must_use]
    pub fn changed(&self) -> Option<String> {
        let now = match Image::read(&self.path, &self.format) {
            Ok(now) => now,
            Err(Error::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Some("it is gone".into())
            }
            Err(e) => return Some(format!("it cannot be read: {e}")),
        };
        let mut what = Vec::new();
        if now.size != self.size {
            what.push(format!("{} bytes, {} at the save", now.size, self.size));
        }
        if now.fingerprint != self.fingerprint {
            what.push("its content differs".to_string());
        }
        if now.mtime_ns != self.mtime_ns {
            what.push("it was modified since".to_string());
        }
        (!what.is_empty()).then(|| what.join(", "))
    }
}

impl DiskRecord {
    /// Every recorded image that is no longer as it was, each with what changed.
    #[must_use]
    pub fn changed(&self) -> Vec<(&Image, String)> {
        self.disks
            .iter()
            .flat_map(|d| &d.images)
            .filter_map(|i| i.changed().map(|why| (i, why)))
            .collect()
    }

    /// Refuses, in words, a restore onto images that changed since the save.
    ///
    /// # Errors
    /// [`Error::Disk`] naming each changed image and what to do.
    pub fn verify(&self, statefile: &Path) -> Result<()> {
        let changed = self.changed();
        if changed.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = changed
            .iter()
            .map(|(i, why)| format!("{} ({}): {why}", i.path.display(), i.format))
            .collect();
        let advice = if self.frozen {
            "a checkpoint's images must stay as they were frozen; it cannot be restored any more"
        } else {
            "the disk was written after the save (a restored guest ran on it, or the VM went on): \
             loading this state onto it would corrupt the guest's file systems. A state saved \
             with `save --with-disks` can be restored again and again"
        };
        Err(Error::Disk(format!(
            "{}: the disk images it was saved with changed:\n  - {}\n{advice}",
            statefile.display(),
            list.join("\n  - ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_anywhere_sampled_or_a_new_mtime_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, vec![7u8; 4 << 20]).unwrap();
        let image = Image::read(&path, "raw").unwrap();
        assert_eq!(image.changed(), None);
        let f = File::options().write(true).open(&path).unwrap();
        f.write_at(b"x", 0).unwrap();
        assert!(image.changed().unwrap().contains("its content differs"));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(image.changed().as_deref(), Some("it is gone"));
    }
}
