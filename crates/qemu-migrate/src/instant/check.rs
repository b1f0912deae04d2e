//! Checking an instant save's RAM images without reading them before the
//! guest runs: an image may be gigabytes, and an instant restore's point is
//! not to read it first. Its identity (device, inode, size, times) proves
//! nobody changed the file through the file system, but not that the disk
//! returns what was written: a bit flipped below the file system keeps the
//! inode and the times. Two schemes cover that, chosen per image at the save:
//!
//! - **fs-verity** (ext4 with the `verity` feature, btrfs, f2fs, XFS on
//!   recent kernels; `CONFIG_FS_VERITY`): the finished image is sealed
//!   (SHA-256, 4 KiB blocks) and its digest recorded in the manifest. A
//!   restore asks the kernel for the digest again (O(1)) and refuses any
//!   other; from then on the kernel checks each page as QEMU faults it in
//!   from the file, and a damaged one is an I/O error (`SIGBUS` to QEMU, which
//!   ends) rather than guest memory. A sealed file is read-only for good: a
//!   later save replaces it by a rename, as every save does, and nothing
//!   opens it for writing. QEMU before 8.2 opens a memory backend's file
//!   read-write, which a sealed file refuses, so saves by those QEMUs are not
//!   sealed, and a sealed image is refused in words to them.
//! - **Chunk checksums** everywhere else (and recorded beside the digest
//!   too, for a copy of the save that lost its seal): the CRC-32 of each
//!   4 MiB chunk's page CRC-32s, computed as the save writes the image
//!   ([`super::image`]). Right after a restore starts the guest, a process of
//!   its own at the lowest CPU and I/O priority reads the image through the
//!   page cache (what QEMU maps) and compares each chunk. On a mismatch it
//!   stops the VM (`stop` on the restore's own monitor connection) and says
//!   which image, which chunk and which bytes are damaged, and how to recover.
//!   It ends when the check is done or the QEMU is gone. The guest may read a
//!   damaged page before the check reaches it: the check bounds how long it
//!   runs on, it cannot make it never happen; `restore --verify` reads every
//!   chunk before QEMU starts, for a guest that must not run on damage at all.
//!
//! A save written before chunk checksums were recorded is checked whole in
//! the background the same way (damage found, but not located).

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::image::{chunk_bytes, ImageReader};
use super::Image;
use crate::error::{Error, Result};
use crate::os;
use crate::vm::Vm;

/// The checksums of an image's chunks, as the manifest records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunks {
    /// Bytes per chunk (the last one may be shorter).
    pub bytes: u64,
    /// The checksum of each chunk in order (the CRC-32 of its pages'
    /// CRC-32s), 8 hex digits each, concatenated.
    pub crc32: String,
}

impl Chunks {
    /// The record of `sums`, chunks of `bytes`.
    pub(crate) fn of(bytes: u64, sums: &[u32]) -> Chunks {
        Chunks {
            bytes,
            crc32: sums.iter().map(|c| format!("{c:08x}")).collect(),
        }
    }

    /// The checksum of chunk `index`, as recorded.
    fn get(&self, index: u64) -> Option<&str> {
        let at = usize::try_from(index).ok()?.checked_mul(8)?;
        self.crc32.get(at..at + 8)
    }

    /// How many chunks are recorded.
    fn count(&self) -> u64 {
        (self.crc32.len() / 8) as u64
    }
}

/// Where an image differs from what the save wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The image file.
    pub image: PathBuf,
    /// The damaged chunk: its number, first and last byte; `None` when the
    /// save recorded no chunks (only the whole image is known damaged).
    pub chunk: Option<(u64, u64, u64)>,
    /// How many chunks the image has.
    pub chunks: u64,
    /// The checksum read, and the one the save recorded.
    pub got: String,
    /// The one the save recorded.
    pub want: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.chunk {
            Some((n, first, last)) => write!(
                f,
                "chunk {n} of {} (bytes {first}-{last}, 0x{first:x}-0x{last:x}) is damaged: its \
                 checksum is {}, the save recorded {} (manifest)",
                self.chunks, self.got, self.want
            ),
            None => write!(
                f,
                "damaged: its checksum is {}, the save recorded {} (manifest)",
                self.got, self.want
            ),
        }
    }
}

/// The marker of a read ended on purpose (damage found, or QEMU gone).
const ENDED: &str = "the check ended early";

/// Reads image `image` (the file `path`) whole and compares it with the
/// save's checksums: every chunk, where the save recorded them, else the
/// whole. Returns the first damage found, reading no further. `go_on` is
/// asked before each chunk, and ends the read (`Ok(None)`) when it says no.
///
/// # Errors
/// When the image cannot be read.
pub(crate) fn read_whole(
    path: &Path,
    image: &Image,
    go_on: &mut dyn FnMut() -> bool,
) -> io::Result<Option<Damage>> {
    let mut reader = ImageReader::open(path)?;
    let size = image.block_bytes;
    let mut damage = None;
    let (bytes, recorded) = match &image.chunks {
        Some(c) => (c.bytes, Some(c)),
        None => (chunk_bytes(image.page_size), None),
    };
    let count = size.div_ceil(bytes);
    let whole = reader.chunk_sums(image.page_size, bytes, &mut |n, sum| {
        if let Some(c) = recorded {
            let got = format!("{sum:08x}");
            let want = c.get(n).unwrap_or("(none)");
            if got != want {
                damage = Some(Damage {
                    image: path.to_path_buf(),
                    chunk: Some((n, n * bytes, ((n + 1) * bytes).min(size) - 1)),
                    chunks: count.max(c.count()),
                    got,
                    want: want.to_string(),
                });
                return Err(io::Error::other(ENDED));
            }
        }
        if go_on() {
            Ok(())
        } else {
            Err(io::Error::other(ENDED))
        }
    });
    match whole {
        _ if damage.is_some() => Ok(damage),
        Err(e) if e.to_string() == ENDED => Ok(None),
        Err(e) => Err(e),
        Ok(sum) => {
            let got = format!("{sum:08x}");
            Ok((got != image.image_crc32).then(|| Damage {
                image: path.to_path_buf(),
                chunk: None,
                chunks: count,
                got,
                want: image.image_crc32.clone(),
            }))
        }
    }
}

/// Starts the background check of `images` (of the instant save
/// `statefile`) for the VM just restored from them (see the module docs);
/// returns the paths of the images it checks.
///
/// # Errors
/// [`Error::Os`] when its process cannot be started.
pub(crate) fn in_background(vm: &Vm, statefile: &Path, images: Vec<Image>) -> Result<Vec<PathBuf>> {
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let pid = vm.pid();
    let statefile = std::path::absolute(statefile).unwrap_or_else(|_| statefile.to_path_buf());
    let paths = images
        .iter()
        .map(|i| statefile.with_file_name(&i.image))
        .collect();
    os::spawn_background(vm.monitor.as_raw_fd(), move |socket| {
        for image in &images {
            let path = statefile.with_file_name(&image.image);
            match read_whole(&path, image, &mut || os::is_running(pid)) {
                Ok(None) => {}
                Ok(Some(damage)) => {
                    let stopped = stop(socket);
                    os::write_stderr(&words(&statefile, &damage, pid, stopped));
                    return;
                }
                Err(_) if !os::is_running(pid) => return,
                Err(e) => {
                    os::write_stderr(&format!(
                        "qemu-migrate: the RAM image {} of the VM restored from {} (QEMU pid \
                         {pid}) could not be checked: {e}. The VM runs on it unchecked; \
                         `qemu-migrate inspect --check {}` reads it whole.\n",
                        path.display(),
                        statefile.display(),
                        statefile.display()
                    ));
                    return;
                }
            }
        }
    })?;
    Ok(paths)
}

/// What the background check says when it finds `damage`.
fn words(statefile: &Path, damage: &Damage, pid: u32, stopped: io::Result<()>) -> String {
    let state = match stopped {
        Ok(()) => "The VM was stopped (paused) so that it does not run on".to_string(),
        Err(e) => format!(
            "The VM could not be stopped ({e}): stop it yourself (`stop` on its monitor), as it \
             runs on"
        ),
    };
    format!(
        "qemu-migrate: the RAM image {} of the VM restored from {} (QEMU pid {pid}): {damage}. \
         The file is the very one the save wrote, so the damage is below the file system (the \
         disk returned other bytes). {state} that memory; the guest may already have read it. \
         Do not resume or save this VM: quit it, and restore from an intact copy of the save \
         (`qemu-migrate inspect --check FILE` reads one whole) or from an earlier save.\n",
        damage.image.display(),
        statefile.display(),
    )
}

/// Stops the VM over the restore's own QMP connection, which this process
/// inherited (capabilities already negotiated): `stop`, then its answer,
/// past any events, within a deadline.
fn stop(socket: std::os::unix::net::UnixStream) -> io::Result<()> {
    const DEADLINE: Duration = Duration::from_secs(10);
    socket.set_write_timeout(Some(DEADLINE))?;
    socket.set_read_timeout(Some(DEADLINE))?;
    socket.set_nonblocking(false)?;
    (&socket).write_all(b"{\"execute\": \"stop\", \"id\": \"image-check\"}\n")?;
    let mut lines = BufReader::new(&socket);
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            return Err(io::Error::other("QEMU closed its monitor"));
        }
        if line.contains("\"image-check\"") {
            if line.contains("\"return\"") {
                return Ok(());
            }
            return Err(io::Error::other(line.trim().to_string()));
        }
    }
}

/// The damage found in an image a restore was about to map: a refusal.
pub(crate) fn refusal(statefile: &Path, damage: &Damage) -> Error {
    Error::BadStateFile {
        path: damage.image.clone(),
        reason: format!(
            "the RAM image of {} is {damage}; restore from an intact copy of the save or from an \
             earlier save",
            statefile.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instant::image::Identity;

    fn image_of(path: &Path, page_size: u64, chunk: u64, pages: &[Vec<u8>]) -> Image {
        let crcs: Vec<u32> = pages.iter().map(|p| crc32fast::hash(p)).collect();
        let per = (chunk / page_size) as usize;
        let sums: Vec<u32> = crcs
            .chunks(per)
            .map(|c| {
                let mut h = crc32fast::Hasher::new();
                c.iter().for_each(|x| h.update(&x.to_le_bytes()));
                h.finalize()
            })
            .collect();
        let mut whole = crc32fast::Hasher::new();
        crcs.iter().for_each(|x| whole.update(&x.to_le_bytes()));
        std::fs::write(path, pages.concat()).unwrap();
        Image {
            image: "s.ram".into(),
            block: "pc.ram".into(),
            backend: None,
            block_bytes: page_size * pages.len() as u64,
            page_size,
            data_pages: pages.len() as u64,
            zero_pages: 0,
            pages_in_stream: 0,
            image_crc32: format!("{:08x}", whole.finalize()),
            identity: Identity::of(path).unwrap(),
            chunks: Some(Chunks::of(chunk, &sums)),
            verity: None,
        }
    }

    #[test]
    fn a_flipped_bit_is_found_and_its_chunk_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.ram");
        let pages: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 4096]).collect();
        let image = image_of(&path, 4096, 16384, &pages);
        assert_eq!(read_whole(&path, &image, &mut || true).unwrap(), None);

        // One bit in page 21: chunk 5 (pages 20-23, bytes 81920-98303).
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[21 * 4096 + 100] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let damage = read_whole(&path, &image, &mut || true).unwrap().unwrap();
        assert_eq!(damage.chunk, Some((5, 81920, 98303)));
        assert_eq!(damage.chunks, 10);
        let said = damage.to_string();
        assert!(
            said.contains("chunk 5 of 10") && said.contains("0x14000-0x17fff"),
            "{said}"
        );

        // A save without chunk checksums: found, not located.
        let mut old = image.clone();
        old.chunks = None;
        let damage = read_whole(&path, &old, &mut || true).unwrap().unwrap();
        assert_eq!(damage.chunk, None);
    }

    #[test]
    fn a_check_told_to_stop_ends_without_a_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.ram");
        let pages: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 4096]).collect();
        let mut image = image_of(&path, 4096, 4096, &pages);
        image.image_crc32 = "00000000".into();
        let mut asked = 0;
        let verdict = read_whole(&path, &image, &mut || {
            asked += 1;
            asked < 3
        })
        .unwrap();
        assert_eq!((verdict, asked), (None, 3));
    }
}
