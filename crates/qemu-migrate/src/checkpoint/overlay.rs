//! Overlays: a new, empty qcow2 image over a frozen one, written here (the
//! backing file is named, not opened: QEMU may hold it), in a file this
//! process created first so no other file is ever overwritten.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `qemu-img` beside the QEMU binary, else the one on `PATH`.
#[must_use]
pub fn qemu_img(qemu: &Path) -> PathBuf {
    qemu.parent()
        .map(|d| d.join("qemu-img"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("qemu-img"))
}

/// A new, empty file `DIR/STEM.N.qcow2` with the first free N from 1: the
/// name the overlay will have.
///
/// # Errors
/// [`Error::File`] when the directory cannot be written.
pub fn reserve(dir: &Path, stem: &str) -> Result<PathBuf> {
    for n in 1.. {
        let path = dir.join(format!("{stem}.{n}.qcow2"));
        match std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(_) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::file(&path, "creating an overlay")(e)),
        }
    }
    unreachable!("some number is free")
}

/// Writes a qcow2 overlay at `overlay` (a file [`reserve`] made) whose
/// backing file is `backing` in `format`, `size` bytes as the guest sees it.
/// The image is written here, as `qemu-img create -f qcow2 -u -b BACKING -F
/// FORMAT OVERLAY SIZE` would (a version 3 header, one refcount table and
/// block, an empty L1 table), without `qemu-img`'s syncs or a process to
/// start: it holds no data, and QEMU flushes what it writes itself.
///
/// # Errors
/// [`Error::File`] when it cannot be written; [`Error::Disk`] for a backing
/// path too long for the format (1023 bytes).
pub fn create(overlay: &Path, backing: &Path, format: &str, size: u64) -> Result<()> {
    let image =
        qcow2_overlay(backing.as_os_str().as_encoded_bytes(), format, size).ok_or_else(|| {
            Error::Disk(format!(
                "{}: a qcow2 image names its backing file in at most 1023 bytes",
                backing.display()
            ))
        })?;
    std::fs::write(overlay, image).map_err(Error::file(overlay, "writing an overlay"))
}

/// qcow2's cluster: 64 KiB, QEMU's default.
const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// The header's own length in version 3 (docs/interop/qcow2.txt).
const HEADER_LENGTH: u32 = 104;
/// Header extension: the backing file's format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// An empty qcow2 image over `backing`: cluster 0 the header, 1 the refcount
/// table, 2 its one refcount block, then the L1 table, all L2 entries absent
/// (every read goes to the backing file).
fn qcow2_overlay(backing: &[u8], format: &str, size: u64) -> Option<Vec<u8>> {
    if backing.len() > 1023 || format.len() > 64 {
        return None;
    }
    // Each L1 entry covers one L2 table of CLUSTER / 8 entries of CLUSTER bytes.
    let l1_entries = size.div_ceil(CLUSTER * (CLUSTER / 8)).max(1);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER);
    let clusters = 3 + l1_clusters;
    // One refcount block (16-bit counts) covers CLUSTER / 2 clusters.
    if clusters > CLUSTER / 2 {
        return None;
    }
    let mut h = Vec::with_capacity(512);
    let ext_len = u32::try_from(format.len()).ok()?;
    let ext_padded = format.len().next_multiple_of(8);
    let backing_offset = u64::from(HEADER_LENGTH) + 8 + ext_padded as u64 + 8;
    h.extend_from_slice(b"QFI\xfb");
    h.extend_from_slice(&3u32.to_be_bytes()); // version
    h.extend_from_slice(&backing_offset.to_be_bytes());
    h.extend_from_slice(&u32::try_from(backing.len()).ok()?.to_be_bytes());
    h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // no encryption
    h.extend_from_slice(&u32::try_from(l1_entries).ok()?.to_be_bytes());
    h.extend_from_slice(&(3 * CLUSTER).to_be_bytes()); // L1 table
    h.extend_from_slice(&CLUSTER.to_be_bytes()); // refcount table
    h.extend_from_slice(&1u32.to_be_bytes()); // its clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // no snapshots
    h.extend_from_slice(&0u64.to_be_bytes());
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
    h.extend_from_slice(&4u32.to_be_bytes()); // refcount order: 16-bit counts
    h.extend_from_slice(&HEADER_LENGTH.to_be_bytes());
    debug_assert_eq!(h.len(), HEADER_LENGTH as usize);
    h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
    h.extend_from_slice(&ext_len.to_be_bytes());
    h.extend_from_slice(format.as_bytes());
    h.resize(h.len() + ext_padded - format.len(), 0);
    h.extend_from_slice(&[0; 8]); // end of the extensions
    h.extend_from_slice(backing);

    let mut image = vec![0u8; usize::try_from(clusters * CLUSTER).ok()?];
    image[..h.len()].copy_from_slice(&h);
    let cluster = usize::try_from(CLUSTER).ok()?;
    // The refcount table's one entry: the block in cluster 2.
    image[cluster..cluster + 8].copy_from_slice(&(2 * CLUSTER).to_be_bytes());
    // Every cluster of the file is used once.
    for c in 0..usize::try_from(clusters).ok()? {
        let at = 2 * cluster + 2 * c;
        image[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Some(image)
}

/// The file name of `image` up to the first `.after-` (the overlays of
/// checkpoints are named `IMAGE.after-STATEFILE.N.qcow2`): what a new
/// overlay over it is named after, so names do not grow checkpoint by
/// checkpoint.
#[must_use]
pub fn base_name(image: &Path) -> String {
    let name = image.file_name().unwrap_or_default().to_string_lossy();
    match name.find(".after-") {
        Some(at) if at > 0 => name[..at].to_string(),
        _ => name.into_owned(),
    }
}

/// A name made of letters, digits, `-` and `_` only, for a file name.
#[must_use]
pub fn label(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "disk".into()
    } else {
        s
    }
}

/// Overlay files this process made, removed when dropped unless kept.
#[derive(Debug, Default)]
pub struct Made {
    /// The files.
    pub paths: Vec<PathBuf>,
}

impl Made {
    /// Keeps the files: they are in use.
    #[must_use]
    pub fn keep(mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.paths)
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn an_overlay_is_named_after_the_image_below_every_overlay() {
        assert_eq!(base_name(Path::new("/d/disk.qcow2")), "disk.qcow2");
        assert_eq!(
            base_name(Path::new("/d/disk.qcow2.after-state.3.qcow2")),
            "disk.qcow2"
        );
        assert_eq!(
            base_name(Path::new(
                "/d/disk.qcow2.after-state.1.qcow2.after-state.1.qcow2"
            )),
            "disk.qcow2"
        );
    }

    /// QEMU's own tools read the image as an overlay of its backing file
    /// and find nothing wrong with it.
    #[test]
    fn qemu_img_reads_the_overlay_as_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base,odd name.img");
        std::fs::File::create(&base)
            .unwrap()
            .set_len(5 << 30)
            .unwrap();
        let overlay = dir.path().join("o.qcow2");
        create(&overlay, &base, "raw", 5 << 30).unwrap();
        let Ok(out) = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&overlay)
            .output()
        else {
            panic!("qemu-img is needed for this test (Debian's qemu-utils)");
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 5u64 << 30);
        assert_eq!(info["backing-filename"], base.display().to_string());
        assert_eq!(info["backing-filename-format"], "raw");
        let check = std::process::Command::new("qemu-img")
            .arg("check")
            .arg(&overlay)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        // And a write through it lands in the overlay, the base untouched.
        let io = std::process::Command::new("qemu-io")
            .args(["-c", "write -P 0x5a 1G 64k", "-f", "qcow2"])
            .arg(&overlay)
            .output();
        if let Ok(io) = io {
            assert!(
                io.status.success(),
                "{}",
                String::from_utf8_lossy(&io.stderr)
            );
            let check = std::process::Command::new("qemu-img")
                .arg("check")
                .arg(&overlay)
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "{}",
                String::from_utf8_lossy(&check.stdout)
            );
            assert_eq!(std::fs::metadata(&base).unwrap().blocks(), 0);
        }
    }
}
