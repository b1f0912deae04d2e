//! The RAM image: the main RAM block's pages at their offsets in a sparse
//! file, zero pages left as holes; written while QEMU streams, read back
//! for a full check or an export.
//!
//! Its checksum is one a writer can compute while pages arrive in any order
//! and more than once: a CRC-32 of every page, kept in a table (4 bytes per
//! page: 1 MiB per 1 GiB of RAM, the last write of a page replacing its
//! entry), and the image's checksum is the CRC-32 of that table. A reader
//! recomputes it front to back.
//!
//! The same table gives a checksum per chunk of [`CHUNK_BYTES`] (the CRC-32
//! of its pages' CRC-32s), which locates damage: a check that finds one
//! chunk wrong names its offsets. Where the file system has fs-verity, the
//! finished image is also sealed with it ([`ImageWriter::new`]'s `seal`),
//! and its digest recorded: see [`super::check`].

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use qemu_stream::split::{PageFn, PageSink, PageSource};
use serde::{Deserialize, Serialize};

use crate::os;

/// Pages written in one go when they come in address order.
const RUN_MAX: usize = 1 << 20;
/// How much is written between nudges to the kernel to start writeback.
const WRITEBACK_STEP: u64 = 32 << 20;
/// The size of a checksummed chunk: 4 MiB, so a manifest holds 8 hex
/// digits per 4 MiB of RAM (16 KiB for 8 GiB) and a damaged range is
/// named to within 4 MiB.
pub const CHUNK_BYTES: u64 = 4 << 20;

/// The chunk size for pages of `page_size`: [`CHUNK_BYTES`], or one page
/// where pages are larger.
pub(crate) fn chunk_bytes(page_size: u64) -> u64 {
    CHUNK_BYTES.max(page_size) / page_size * page_size
}

/// What identifies the very image file a save wrote, unchanged since:
/// any write, truncation, hole punch, rename or copy changes one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, seconds and nanoseconds.
    pub mtime: [i64; 2],
    /// Last status change (set by the kernel, not by `touch`), seconds and nanoseconds.
    pub ctime: [i64; 2],
}

impl Identity {
    /// The identity of the file at `path`.
    ///
    /// # Errors
    /// When it cannot be read.
    pub fn of(path: &Path) -> io::Result<Identity> {
        let m = std::fs::metadata(path)?;
        Ok(Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: [m.mtime(), m.mtime_nsec()],
            ctime: [m.ctime(), m.ctime_nsec()],
        })
    }
}

/// CRC-32 of a page of zeros of `page_size` bytes.
fn zero_crc(page_size: u64) -> u32 {
    crc32fast::hash(&vec![0u8; page_size as usize])
}

/// The image's checksum from its page table.
fn table_crc(crcs: &[u32]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for c in crcs {
        h.update(&c.to_le_bytes());
    }
    h.finalize()
}

/// The checksum of each chunk of `chunk_pages` pages, from the page table.
fn chunk_crcs(crcs: &[u32], chunk_pages: usize) -> Vec<u32> {
    crcs.chunks(chunk_pages.max(1)).map(table_crc).collect()
}

/// Writes pages into the image as the split moves them out of the stream.
#[derive(Debug)]
pub(crate) struct ImageWriter {
    file: File,
    sync: bool,
    seal: bool,
    page_size: u64,
    size: u64,
    zero_crc: u32,
    crcs: Vec<u32>,
    /// Pages holding data in the file (a zero page sent later must clear them).
    written: Vec<u64>,
    run_start: u64,
    run: Vec<u8>,
    since_writeback: u64,
}

/// What the image holds once written.
#[derive(Debug, Clone)]
pub(crate) struct Written {
    pub crc: u32,
    pub data_pages: u64,
    pub zero_pages: u64,
    /// The checksum of each chunk of [`chunk_bytes`].
    pub chunks: Vec<u32>,
    /// The fs-verity digest the image was sealed with, where the file system has it.
    pub verity: Option<String>,
}

impl ImageWriter {
    /// A writer into `file`; `seal`: once finished, seal the image with
    /// fs-verity where the file system has it (only for a QEMU that maps it
    /// from a read-only descriptor: a sealed file never opens for writing).
    pub(crate) fn new(file: File, sync: bool, seal: bool) -> ImageWriter {
        ImageWriter {
            file,
            sync,
            seal,
            page_size: 4096,
            size: 0,
            zero_crc: 0,
            crcs: Vec::new(),
            written: Vec::new(),
            run_start: 0,
            run: Vec::with_capacity(RUN_MAX),
            since_writeback: 0,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.run.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(&self.run, self.run_start)?;
        self.since_writeback += self.run.len() as u64;
        self.run.clear();
        if self.sync && self.since_writeback >= WRITEBACK_STEP {
            // Start writing out what is there while QEMU still streams, so
            // the final fsync has less to wait for.
            os::start_writeback(&self.file, 0, 0);
            self.since_writeback = 0;
        }
        Ok(())
    }

    fn index(&self, offset: u64) -> io::Result<usize> {
        if offset >= self.size || !offset.is_multiple_of(self.page_size) {
            return Err(io::Error::other(format!(
                "page offset 0x{offset:x} outside the block or unaligned"
            )));
        }
        Ok((offset / self.page_size) as usize)
    }

    /// Flushes what is pending and seals the image when asked; returns the
    /// file (open read-only once sealed, still locked) and what it holds.
    pub(crate) fn finish(mut self) -> io::Result<(File, Written)> {
        self.flush()?;
        self.file.set_len(self.size)?;
        let zero = self.crcs.iter().filter(|&&c| c == self.zero_crc).count() as u64;
        let chunk_pages = (chunk_bytes(self.page_size) / self.page_size) as usize;
        let mut written = Written {
            crc: table_crc(&self.crcs),
            data_pages: self.crcs.len() as u64 - zero,
            zero_pages: zero,
            chunks: chunk_crcs(&self.crcs, chunk_pages),
            verity: None,
        };
        let mut file = self.file;
        if self.seal && self.size > 0 {
            let (f, digest) = os::seal(file)?;
            file = f;
            written.verity = digest;
        }
        Ok((file, written))
    }
}

impl PageSink for ImageWriter {
    fn block(&mut self, _name: &str, bytes: u64, page_size: u64) -> io::Result<()> {
        self.page_size = page_size;
        self.size = bytes;
        self.zero_crc = zero_crc(page_size);
        let pages = bytes.div_ceil(page_size) as usize;
        self.crcs = vec![self.zero_crc; pages];
        self.written = vec![0; pages.div_ceil(64)];
        // The file grows as pages are written (appending is ext4's fast path;
        // writing into a file already sized is measurably slower), and gets
        // the block's size when finished: every page not written is a hole.
        Ok(())
    }

    fn page(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let i = self.index(offset)?;
        self.crcs[i] = crc32fast::hash(data);
        self.written[i / 64] |= 1 << (i % 64);
        let run_end = self.run_start + self.run.len() as u64;
        if offset >= self.run_start && offset < run_end {
            // Sent again while still pending: replace it in place.
            let at = (offset - self.run_start) as usize;
            self.run[at..at + data.len()].copy_from_slice(data);
            return Ok(());
        }
        if offset != run_end || self.run.len() + data.len() > RUN_MAX {
            self.flush()?;
            self.run_start = offset;
        }
        self.run.extend_from_slice(data);
        Ok(())
    }

    fn zero(&mut self, offset: u64) -> io::Result<()> {
        let i = self.index(offset)?;
        self.crcs[i] = self.zero_crc;
        if self.written[i / 64] & (1 << (i % 64)) == 0 {
            // A hole already reads as zero: nothing to write.
            return Ok(());
        }
        // Data from an earlier pass of a live save: overwrite it.
        self.page(offset, &vec![0u8; self.page_size as usize])?;
        self.crcs[i] = self.zero_crc;
        Ok(())
    }

    fn current(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.flush()?;
        // Past the end written so far reads as zero, as it will in the image.
        buf.fill(0);
        let mut at = 0;
        while at < buf.len() {
            match self.file.read_at(&mut buf[at..], offset + at as u64)? {
                0 => break,
                n => at += n,
            }
        }
        Ok(())
    }
}

/// Reads an image front to back, page by page.
#[derive(Debug)]
pub(crate) struct ImageReader {
    file: File,
}

impl ImageReader {
    pub(crate) fn open(path: &Path) -> io::Result<ImageReader> {
        Ok(ImageReader {
            file: File::open(path)?,
        })
    }

    /// Reads the image front to back and calls `chunk(index, checksum)` as
    /// each chunk of `chunk_bytes` is done (see the module docs), then
    /// returns the whole image's checksum. `chunk` may end the read early
    /// with an error.
    pub(crate) fn chunk_sums(
        &mut self,
        page_size: u64,
        chunk_bytes: u64,
        chunk: &mut dyn FnMut(u64, u32) -> io::Result<()>,
    ) -> io::Result<u32> {
        let zero_crc = zero_crc(page_size);
        let mut whole = crc32fast::Hasher::new();
        let mut part = crc32fast::Hasher::new();
        let mut index = 0u64;
        self.pages(page_size, &mut |offset, page| {
            let n = offset / chunk_bytes;
            if n != index {
                chunk(index, std::mem::take(&mut part).finalize())?;
                index = n;
            }
            let c = page.map_or(zero_crc, crc32fast::hash).to_le_bytes();
            whole.update(&c);
            part.update(&c);
            Ok(())
        })?;
        if self.file.metadata()?.len() > 0 {
            chunk(index, part.finalize())?;
        }
        Ok(whole.finalize())
    }
}

/// Where the next data at or after `offset` starts (`SEEK_DATA`), or where
/// the hole there ends (`SEEK_HOLE`); `None` past the last data. A
/// filesystem without hole reporting calls the whole file data, which is
/// still right, only slower.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor this reader owns; it only moves the
    // file offset, which this reader does not otherwise use (it reads at
    // explicit offsets).
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

impl PageSource for ImageReader {
    /// Reads only the image's data; its holes are zero pages without a read.
    fn pages(&mut self, page_size: u64, f: &mut PageFn<'_>) -> io::Result<()> {
        let size = self.file.metadata()?.len();
        if !size.is_multiple_of(page_size) {
            return Err(io::Error::other("the image ends inside a page"));
        }
        let ps = page_size as usize;
        let zero = vec![0u8; ps];
        let mut buf = vec![0u8; RUN_MAX];
        let mut offset = 0u64;
        while offset < size {
            let (data, end) = match seek(&self.file, offset, libc::SEEK_DATA) {
                Ok(None) => (size, size),
                Ok(Some(d)) => {
                    let d = d / page_size * page_size;
                    let e = seek(&self.file, d, libc::SEEK_HOLE)?.unwrap_or(size);
                    (
                        d.max(offset),
                        e.div_ceil(page_size).saturating_mul(page_size).min(size),
                    )
                }
                // No hole reporting here: all of it is data.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (offset, size),
                Err(e) => return Err(e),
            };
            while offset < data {
                f(offset, None)?;
                offset += page_size;
            }
            while offset < end {
                let n = ((end - offset) as usize).min(buf.len());
                self.file.read_exact_at(&mut buf[..n], offset)?;
                for page in buf[..n].chunks_exact(ps) {
                    f(offset, (page != zero.as_slice()).then_some(page))?;
                    offset += page_size;
                }
            }
        }
        Ok(())
    }
}
