//! `save --instant`: the same save as [`crate::save`] (paused, uncapped,
//! through a pipe, into private temporary files renamed only once QEMU says
//! the migration completed, an existing save replaced by the same commit),
//! with the copy thread splitting the stream as it flows: each guest RAM
//! block's pages into its image, everything else into the stream. Which
//! blocks those are is asked of QEMU before it starts (`info ramblock`,
//! judged by [`super::shape::targets`]). The images are renamed into place
//! before the stream's commit, so a crash between them leaves the previous
//! stream beside new images, which the images' identity in the manifest
//! lets a restore refuse in words.

use std::fs::File;
use std::io::{BufWriter, PipeReader, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use qemu_monitor::MigrationInfo;
use qemu_stream::split::{self, SplitReport};

use super::image::{Identity, ImageWriter, Written};
use super::shape::{self, Target};
use super::{manifest_with, unsuitable, Image, Layout};
use crate::error::{Error, Result};
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
    images: Option<Vec<(File, Written)>>,
}

/// The blocks a save of `vm` moves into images, or why it cannot.
fn targets(vm: &mut Vm) -> Result<std::result::Result<Vec<Target>, String>> {
    if let Some(why) = unsuitable(vm.args(), vm.version()) {
        return Ok(Err(why));
    }
    let blocks = vm.monitor.ram_blocks()?;
    Ok(shape::targets(vm.args(), &blocks))
}

/// Saves `vm` to `path` and `path.ram` in the instant layout, or to `path`
/// alone as a plain stream where the layout cannot serve (the report says why).
pub(crate) fn save(
    vm: &mut Vm,
    path: &Path,
    options: &SaveOptions,
    progress: &dyn Progress,
) -> Result<SaveReport> {
    let targets = if options.with_disks {
        Err("a checkpoint (--with-disks) keeps its RAM in the stream".to_string())
    } else {
        targets(vm)?
    };
    let targets = match targets {
        Ok(t) => t,
        Err(why) => {
            let mut plain = options.clone();
            plain.instant = false;
            let mut report = crate::save::save_plain(vm, path, &plain, progress)?;
            report.fallback = Some(format!("{why}: saved as a plain stream"));
            return Ok(report);
        }
    };
    let started = Instant::now();
    // The guest runs on through a live save and a snapshot.
    let running = options.live || options.snapshot;
    let _lock = VmLock::take(vm.pid())?;
    let was_running = vm.check_migratable("save")?;
    vm.check_replayable(options.then)?;
    crate::save::settle(path, &[]);
    let previous = crate::save::replaced_save(path, options.force)?;
    // New images never take the names of those of the save they replace:
    // it stays whole until the new one is committed.
    let in_use: Vec<String> = previous
        .as_ref()
        .and_then(|m| m.instant.as_ref())
        .map(|l| l.images.iter().map(|i| i.image.clone()).collect())
        .unwrap_or_default();
    let images = super::image_names(path, targets.len(), &in_use);
    let ram_bytes = vm.monitor.ram_size()?;
    // Its disks, and the refusals they call for, before anything changes.
    let disks = crate::checkpoint::freeze::Freeze::prepare(vm, path, false, false)?;
    let old_bandwidth = vm.monitor.migration_parameter("max-bandwidth")?;

    // From here on this process changes the VM; if it dies, the watchdog
    // puts it back, as for a plain save.
    let watchdog = {
        let addr = vm.monitor.addr().clone();
        let resume = was_running && !running;
        let then = options.then;
        let target = path.to_path_buf();
        let placed = images.clone();
        let settings = (old_bandwidth, options.capabilities_back.clone());
        os::Watchdog::spawn(move |last| {
            crate::save::put_back(
                &addr,
                resume,
                &settings,
                then,
                last == Some(crate::save::COMMITTED),
            );
            crate::save::settle(&target, &placed);
        })?
    };

    // Guest memory, both files: private, never through a planted link.
    let (files, stream_file) = SaveFiles::create(path)?;
    let mut image_files = Vec::new();
    let mut image_fds = Vec::new();
    for image in &images {
        match SaveFiles::create(image) {
            Ok((f, fd)) => {
                image_files.push(f);
                image_fds.push(fd);
            }
            Err(e) => {
                files.remove();
                image_files.iter().for_each(SaveFiles::remove);
                return Err(e);
            }
        }
    }
    let partial = files.state.clone();
    let cleanup = || {
        files.remove();
        image_files.iter().for_each(SaveFiles::remove);
    };

    if was_running && !running {
        if let Err(e) = vm.monitor.stop() {
            cleanup();
            return Err(e.into());
        }
    }
    let blocks: Vec<String> = targets.iter().map(|t| t.block.clone()).collect();
    let result = run_migration(
        vm,
        (stream_file, image_fds),
        blocks,
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
            if was_running && !running && !matches!(e, Error::QemuExited { .. }) {
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
        images: Some(written_images),
    } = written
    else {
        unreachable!("run_migration returns only whole copies");
    };
    let report = outcome.expect("run_migration returns only successful splits");
    // Disks are flushed and let go by QEMU at completion: what they are now
    // is what the saved memory describes.
    // The options as the VM runs: with the overlays of an earlier checkpoint.
    let args = disks.current_args(vm.args());
    let guarded = match crate::guard::record(vm) {
        Ok(f) => f,
        Err(e) => {
            cleanup();
            if was_running && !running {
                let _ = vm.monitor.cont_after_migration();
            }
            return Err(e);
        }
    };

    let plain = crate::save::manifest_of(
        vm,
        args,
        &head,
        (stream_bytes, stream_crc),
        ram_bytes,
        was_running,
        guarded,
    );
    // Nothing moved (no block announced, or a stream the split could not
    // parse): the stream is whole by itself, and is kept as a plain save.
    let moved_any = report
        .blocks
        .iter()
        .any(|b| b.announced && b.pages + b.zero_pages > 0);
    let fallback = (!moved_any).then(|| {
        format!(
            "the stream could not be split ({}): saved as a plain stream",
            report
                .passed_through
                .as_ref()
                .map_or("no page was moved".to_string(), |(_, why)| why.clone())
        )
    });

    // The images QEMU does not migrate (a backend nothing uses), and all
    // of them when the stream is kept whole, are no part of the save.
    let mut parts = Vec::new();
    let mut kept = Vec::new();
    for (i, ((file, sum), moved)) in written_images.iter().zip(&report.blocks).enumerate() {
        if fallback.is_some() || !moved.announced {
            image_files[i].remove();
            continue;
        }
        parts.push(crate::commit::Part {
            file,
            partial: &image_files[i].state,
            name: images[i].clone(),
        });
        kept.push((i, sum, moved));
    }
    let staged = crate::commit::Staged {
        target: path,
        files: &files,
        stream: &stream_file,
        parts,
        previous,
        sync: !options.no_sync,
        cancel: &options.cancel,
    };
    let committed = staged.place().and_then(|placed| {
        let manifest = if fallback.is_some() {
            plain.clone()
        } else {
            let mut laid_out = Vec::new();
            for (i, sum, moved) in kept {
                let image = &images[i];
                // After the rename, which changes the file's status time.
                let identity =
                    Identity::of(image).map_err(Error::file(image, "reading the RAM image"))?;
                laid_out.push(Image {
                    image: file_name(image),
                    block: targets[i].block.clone(),
                    backend: targets[i].backend.clone(),
                    block_bytes: moved.bytes,
                    page_size: report.page_size,
                    data_pages: sum.data_pages,
                    zero_pages: sum.zero_pages,
                    pages_in_stream: moved.pages_kept,
                    image_crc32: format!("{:08x}", sum.crc),
                    identity,
                    chunks: Some(super::Chunks::of(
                        super::image::chunk_bytes(report.page_size),
                        &sum.chunks,
                    )),
                    verity: sum.verity.clone(),
                });
            }
            manifest_with(plain.clone(), Layout { images: laid_out })
        };
        let committed = placed.commit(&manifest)?;
        Ok((manifest, committed))
    });
    let (manifest, committed) = match committed {
        Ok(m) => m,
        Err(e) => {
            cleanup();
            if was_running && !running {
                let _ = vm.monitor.cont_after_migration();
            }
            return Err(e);
        }
    };
    // Images of this target no save uses: of a save this one replaced (a
    // plain save replacing an instant one, one of fewer blocks), of saves
    // killed in their commit. Kept while the manifest still describes the
    // earlier save too.
    if committed.warnings.is_empty() {
        crate::commit::remove_unused_images(path, &manifest);
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
            paused_for: None,
            warnings: committed.warnings,
        },
    )
}

/// Streams the VM's state into the splitting writer, as a plain save
/// streams into its file ([`crate::save::stream`]).
fn run_migration(
    vm: &mut Vm,
    files: (File, Vec<File>),
    blocks: Vec<String>,
    partial: &Path,
    ram_bytes: u64,
    options: &SaveOptions,
    progress: &dyn Progress,
) -> Result<(Split, MigrationInfo)> {
    let sync = !options.no_sync;
    // Sealed with fs-verity only for a QEMU that can map a sealed file.
    let seal = super::read_only_images(vm.version());
    crate::save::stream(
        vm,
        ram_bytes,
        options,
        progress,
        move |pipe, read| copy(pipe, files, &blocks, read, (sync, seal)),
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
            Ok(_) if written.stream.is_none() || written.images.is_none() => Some(Error::Os {
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

fn copy(
    pipe: PipeReader,
    (stream, images): (File, Vec<File>),
    blocks: &[String],
    read: &AtomicU64,
    (sync, seal): (bool, bool),
) -> Split {
    let mut out = StreamOut {
        inner: BufWriter::with_capacity(1 << 20, stream),
        crc: crc32fast::Hasher::new(),
        bytes: 0,
        head: Vec::new(),
    };
    let mut sinks: Vec<ImageWriter> = images
        .into_iter()
        .map(|f| ImageWriter::new(f, sync, seal))
        .collect();
    // The pipe is dropped when `split` returns: a failed split makes
    // QEMU's next write fail, so the migration fails rather than blocks.
    let outcome = split::split(
        pipe,
        blocks
            .iter()
            .map(String::as_str)
            .zip(sinks.iter_mut().map(|s| s as &mut dyn split::PageSink))
            .collect(),
        &mut out,
        &mut |n| read.store(n, Ordering::Relaxed),
    );
    let outcome = outcome.and_then(|r| {
        out.flush().map_err(split::SplitError::Write)?;
        Ok(r)
    });
    let images: std::io::Result<Vec<(File, Written)>> =
        sinks.into_iter().map(ImageWriter::finish).collect();
    let stream = out.inner.into_inner().ok();
    let (outcome, images) = match (outcome, images) {
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
        images,
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}
