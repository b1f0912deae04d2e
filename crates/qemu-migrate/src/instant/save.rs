//! `save --instant`: the same save as [`crate::save`] (paused, uncapped,
//! through a pipe, into private temporary files renamed only once QEMU says
//! the migration completed, an existing save replaced by the same commit),
//! with the copy thread splitting the stream as it flows: `pc.ram`'s pages
//! into the image, everything else into the stream. The image is renamed
//! into place before the stream's commit, so a crash between them leaves
//! the previous stream beside a new image, which the image's identity in
//! the manifest lets a restore refuse in words.

use std::fs::File;
use std::io::{BufWriter, PipeReader, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use qemu_monitor::MigrationInfo;
use qemu_stream::split::{self, SplitReport};

use super::image::{Identity, ImageWriter, Written};
use super::{image_path, manifest_with, unsuitable, Layout, BLOCK};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::os::{self, SaveFiles, VmLock};
use crate::progress::Progress;
use crate::save::{SaveOptions, SaveReport};
use crate::vm::Vm;

/// What the copy thread wrote.
struct Split {
    outcome: std::result::Result<SplitReport, split::SplitError>,
    stream: Option<File>,
    stream_crc: u32,
    stream_bytes: u64,
    head: Vec<u8>,
    image: Option<(File, Written)>,
}

/// Saves `vm` to `path` and `path.ram` in the instant layout, or to `path`
/// alone as a plain stream where the layout cannot serve (the report says why).
pub(crate) fn save(
    vm: &mut Vm,
    path: &Path,
    options: &SaveOptions,
    progress: &dyn Progress,
) -> Result<SaveReport> {
    let why = if options.with_disks {
        Some("a checkpoint (--with-disks) keeps its RAM in the stream".to_string())
    } else {
        unsuitable(vm.args())
    };
    if let Some(why) = why {
        let mut plain = options.clone();
        plain.instant = false;
        let mut report = crate::save::save(vm, path, &plain, progress)?;
        report.fallback = Some(format!("{why}: saved as a plain stream"));
        return Ok(report);
    }
    let started = Instant::now();
    let _lock = VmLock::take(vm.pid())?;
    let was_running = vm.check_migratable("save")?;
    vm.check_replayable(options.then)?;
    let previous = crate::save::replaced_save(path, options.force)?;
    os::remove_stale_partials(path);
    let image = image_path(path);
    os::remove_stale_partials(&image);
    let ram_bytes = vm.monitor.ram_size()?;
    let old_bandwidth = vm.monitor.migration_parameter("max-bandwidth")?;

    // From here on this process changes the VM; if it dies, the watchdog
    // puts it back, as for a plain save.
    let watchdog = {
        let addr = vm.monitor.addr().clone();
        let resume = was_running && !options.live;
        let then = options.then;
        os::Watchdog::spawn(move |last| {
            crate::save::put_back(
                &addr,
                resume,
                old_bandwidth,
                then,
                last == Some(crate::save::COMMITTED),
            )
        })?
    };

    // Guest memory, both files: private, never through a planted link.
    let (files, stream_file) = SaveFiles::create(path)?;
    let (image_files, image_file) = match SaveFiles::create(&image) {
        Ok(f) => f,
        Err(e) => {
            files.remove();
            return Err(e);
        }
    };
    let partial = files.state.clone();
    let image_partial = image_files.state.clone();
    let cleanup = || {
        files.remove();
        image_files.remove();
    };

    if was_running && !options.live {
        if let Err(e) = vm.monitor.stop() {
            cleanup();
            return Err(e.into());
        }
    }
    let result = run_migration(
        vm,
        (stream_file, image_file),
        &partial,
        ram_bytes,
        options,
        progress,
    );
    let _ = vm
        .monitor
        .set_migration_parameter("max-bandwidth", old_bandwidth);
    let (written, info) = match result {
        Ok(r) => r,
        Err(e) => {
            cleanup();
            if was_running && !options.live && !matches!(e, Error::QemuExited { .. }) {
                let _ = vm.monitor.cont();
            }
            return Err(e);
        }
    };
    let Split {
        outcome,
        stream: Some(stream_file),
        stream_crc,
        stream_bytes,
        head,
        image: Some((image_file, image_sum)),
    } = written
    else {
        unreachable!("run_migration returns only whole copies");
    };
    let report = outcome.expect("run_migration returns only successful splits");
    // Disks are flushed and let go by QEMU at completion: what they are now
    // is what the saved memory describes.
    let guarded = match crate::guard::record(vm) {
        Ok(f) => f,
        Err(e) => {
            cleanup();
            if was_running && !options.live {
                let _ = vm.monitor.cont_after_migration();
            }
            return Err(e);
        }
    };

    let plain = crate::save::manifest_of(
        vm,
        vm.args().to_vec(),
        &head,
        (stream_bytes, stream_crc),
        ram_bytes,
        was_running,
        guarded,
    );
    // No pc.ram in the stream (another machine), or nothing moved: the
    // stream is whole by itself, and is kept as a plain save.
    let moved = &report.blocks[0];
    let fallback = match moved.announced {
        false => Some(format!(
            "the VM has no RAM block named {BLOCK} (only x86 pc and q35 machines are laid out \
             this way): saved as a plain stream"
        )),
        true if moved.pages + moved.zero_pages == 0 => Some(format!(
            "the stream could not be split ({}): saved as a plain stream",
            report
                .passed_through
                .as_ref()
                .map_or("no page was moved".to_string(), |(_, why)| why.clone())
        )),
        true => None,
    };

    let sync = !options.no_sync;
    let image_name = image
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let commit = || -> Result<Manifest> {
        let manifest = if fallback.is_some() {
            image_files.remove();
            plain.clone()
        } else {
            if sync {
                image_file
                    .sync_all()
                    .map_err(Error::file(&image_partial, "syncing the RAM image"))?;
            }
            std::fs::rename(&image_partial, &image)
                .map_err(Error::file(&image, "renaming the finished RAM image"))?;
            // After the rename, which changes the file's status time.
            let identity =
                Identity::of(&image).map_err(Error::file(&image, "reading the RAM image"))?;
            manifest_with(
                plain.clone(),
                Layout {
                    image: image_name.clone(),
                    block: BLOCK.to_string(),
                    block_bytes: moved.bytes,
                    page_size: report.page_size,
                    data_pages: image_sum.data_pages,
                    zero_pages: image_sum.zero_pages,
                    pages_in_stream: moved.pages_kept,
                    image_crc32: format!("{:08x}", image_sum.crc),
                    identity,
                },
            )
        };
        crate::save::commit(
            &files,
            &stream_file,
            path,
            &manifest,
            previous.clone(),
            sync,
            &options.cancel,
        )?;
        Ok(manifest)
    };
    let manifest = match commit() {
        Ok(m) => m,
        Err(e) => {
            cleanup();
            if was_running && !options.live {
                let _ = vm.monitor.cont_after_migration();
            }
            return Err(e);
        }
    };
    if fallback.is_some() {
        // A plain save replaces an instant one: its old image goes too.
        let _ = std::fs::remove_file(&image);
    }
    crate::save::finish(
        vm,
        options.then,
        watchdog,
        SaveReport {
            manifest,
            path: path.to_path_buf(),
            elapsed: started.elapsed(),
            migration: info,
            fallback,
        },
    )
}

/// Streams the VM's state into the splitting writer, as a plain save
/// streams into its file ([`crate::save::stream`]).
fn run_migration(
    vm: &mut Vm,
    files: (File, File),
    partial: &Path,
    ram_bytes: u64,
    options: &SaveOptions,
    progress: &dyn Progress,
) -> Result<(Split, MigrationInfo)> {
    let sync = !options.no_sync;
    crate::save::stream(
        vm,
        ram_bytes,
        options,
        progress,
        move |pipe, read| copy(pipe, files, read, sync),
        |written: &mut Split| match &written.outcome {
            Err(split::SplitError::Write(e)) => Some(Error::File {
                path: partial.to_path_buf(),
                what: "writing the state file",
                source: std::io::Error::new(e.kind(), e.to_string()),
            }),
            Err(e) => Some(Error::MigrationFailed(format!(
                "the instant layout could not be written ({e}); nothing was kept; save without \
                 --instant"
            ))),
            Ok(_) if written.stream.is_none() || written.image.is_none() => Some(Error::Os {
                what: "writing the state file",
                source: std::io::Error::other("a file could not be finished"),
            }),
            Ok(_) => None,
        },
    )
}

/// The stream's writer: counts, checksums and keeps the head of what it writes.
struct StreamOut {
    inner: BufWriter<File>,
    crc: crc32fast::Hasher,
    bytes: u64,
    head: Vec<u8>,
}

impl Write for StreamOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.bytes += n as u64;
        if self.head.len() < 64 * 1024 {
            let k = n.min(64 * 1024 - self.head.len());
            self.head.extend_from_slice(&buf[..k]);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn copy(pipe: PipeReader, (stream, image): (File, File), read: &AtomicU64, sync: bool) -> Split {
    let mut out = StreamOut {
        inner: BufWriter::with_capacity(1 << 20, stream),
        crc: crc32fast::Hasher::new(),
        bytes: 0,
        head: Vec::new(),
    };
    let mut sink = ImageWriter::new(image, sync);
    // The pipe is dropped when `split` returns: a failed split makes
    // QEMU's next write fail, so the migration fails rather than blocks.
    let outcome = split::split(pipe, vec![(BLOCK, &mut sink)], &mut out, &mut |n| {
        read.store(n, Ordering::Relaxed)
    });
    let outcome = outcome.and_then(|r| {
        out.flush().map_err(split::SplitError::Write)?;
        Ok(r)
    });
    let image = sink.finish();
    let stream = out.inner.into_inner().ok();
    let (outcome, image) = match (outcome, image) {
        (Ok(r), Ok(i)) => (Ok(r), Some(i)),
        (Err(e), _) => (Err(e), None),
        (Ok(_), Err(e)) => (Err(split::SplitError::Pages(e)), None),
    };
    Split {
        outcome,
        stream,
        stream_crc: out.crc.finalize(),
        stream_bytes: out.bytes,
        head: out.head,
        image,
    }
}
