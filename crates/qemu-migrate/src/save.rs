//! Saving a VM to a state file: paused, uncapped, through a pipe into our
//! own writer, into `FILE.partial`, synced and renamed only when QEMU says
//! the migration completed.

use std::fs::File;
use std::io::{PipeReader, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qemu_monitor::{MigrationInfo, MigrationStatus};

use crate::argv;
use crate::checkpoint::freeze::Freeze;
use crate::error::{Error, Result};
use crate::manifest::{self, Manifest};
use crate::os::{self, partial_path, VmLock};
use crate::progress::Progress;
use crate::vm::Vm;
use crate::UNCAPPED;
/// How often progress is reported while the stream flows.
const PROGRESS_TICK: Duration = Duration::from_millis(100);
/// Chunk size of the copy from QEMU's pipe to the file.
const CHUNK: usize = os::PIPE_BUFFER;
/// The name the pipe's write end gets in QEMU (`getfd`).
const FD_NAME: &str = "qemu-migrate-save";

/// What to do with the source VM after a successful save.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Then {
    /// Leave it paused, as the recipe does (it can be resumed with `cont`).
    #[default]
    Stop,
    /// End the QEMU process.
    Quit,
    /// Let the guest run on.
    Resume,
}

impl std::str::FromStr for Then {
    type Err = String;

    /// `stop`, `quit` or `resume`.
    fn from_str(s: &str) -> std::result::Result<Then, String> {
        match s {
            "stop" => Ok(Then::Stop),
            "quit" => Ok(Then::Quit),
            "resume" => Ok(Then::Resume),
            _ => Err(format!("{s:?}: expected stop, quit or resume")),
        }
    }
}

/// How to save.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SaveOptions {
    /// Save while the guest runs (a live snapshot of a moving target); by
    /// default the guest is paused first, which is also far faster.
    pub live: bool,
    /// Bandwidth cap in bytes per second; uncapped by default.
    pub bandwidth: Option<u64>,
    /// What becomes of the VM after a successful save.
    pub then: Then,
    /// Skip the fsync: faster, but a crash of this machine soon after could
    /// lose a file that looked complete. The rename stays atomic.
    pub no_sync: bool,
    /// Set (e.g. by a signal handler) to cancel the save.
    pub cancel: Arc<AtomicBool>,
    /// A checkpoint: freeze every writable disk under a qcow2 overlay in the
    /// same pause (implies a paused save); see [`crate::checkpoint`].
    pub with_disks: bool,
}

/// What a finished save wrote.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SaveReport {
    /// The manifest written beside the state file.
    pub manifest: Manifest,
    /// The state file.
    pub path: PathBuf,
    /// From the start of the call to the renamed, synced file.
    pub elapsed: Duration,
    /// QEMU's own account of the migration at completion.
    pub migration: MigrationInfo,
}

/// What the copy thread wrote.
struct Copied {
    bytes: u64,
    crc: u32,
    head: Vec<u8>,
    error: Option<std::io::Error>,
    file: File,
}

/// Saves `vm` to `path` (and `path.manifest.json`).
///
/// # Errors
/// Refusals ([`Error::NotMigratable`], [`Error::Busy`]) before anything
/// changes; a failed or cancelled migration, QEMU's exit or a write error
/// after, each with the guest resumed if it was running and nothing left
/// behind.
pub fn save(
    vm: &mut Vm,
    path: &Path,
    options: &SaveOptions,
    progress: &dyn Progress,
) -> Result<SaveReport> {
    let started = Instant::now();
    let _lock = VmLock::take(vm.pid())?;

    let was_running = vm.check_migratable("save")?;
    let ram_bytes = vm.monitor.ram_size()?;
    // A checkpoint freezes the disks at one instant: the memory's too.
    let live = options.live && !options.with_disks;
    let mut disks = Freeze::prepare(vm, path, options.with_disks, options.then != Then::Quit)?;

    let partial = partial_path(path);
    let file = File::create(&partial).map_err(Error::file(&partial, "creating the state file"))?;

    if was_running && !live {
        vm.monitor.stop()?;
    }
    if let Err(e) = disks.freeze(vm) {
        let _ = std::fs::remove_file(&partial);
        if was_running && !live {
            let _ = vm.monitor.cont();
        }
        return Err(e);
    }
    disks.keep_overlays();
    let old_bandwidth = vm.monitor.migration_parameter("max-bandwidth")?;
    let result = run_migration(vm, file, &partial, ram_bytes, options, progress);
    // Put QEMU's own setting back whatever happened.
    let _ = vm
        .monitor
        .set_migration_parameter("max-bandwidth", old_bandwidth);

    let (copied, info) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            if was_running && !live && !matches!(e, Error::QemuExited { .. }) {
                let _ = vm.monitor.cont();
            }
            return Err(e);
        }
    };

    let machine = qemu_stream::inspect(&copied.head[..])
        .ok()
        .and_then(|s| s.machine_type);
    let checkpoint = match disks.record() {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            if was_running && !live {
                let _ = vm.monitor.cont_after_migration();
            }
            return Err(e);
        }
    };
    let args = disks.current_args(vm.args());
    let manifest = Manifest {
        format: manifest::FORMAT.to_string(),
        qemu: vm.binary().to_path_buf(),
        qemu_version: vm.version().to_string(),
        vm_options: argv::vm_options(&args),
        args,
        env: vm.env().clone(),
        machine,
        ram_bytes,
        stream_bytes: copied.bytes,
        crc32: format!("{:08x}", copied.crc),
        guest_was_running: was_running,
        saved_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        transport: "fd".into(),
        checkpoint,
    };
    let sync = !options.no_sync;
    let commit = || -> Result<()> {
        if sync {
            copied
                .file
                .sync_all()
                .map_err(Error::file(&partial, "syncing the state file"))?;
        }
        manifest.store(path, sync)?;
        std::fs::rename(&partial, path)
            .map_err(Error::file(path, "renaming the finished state file"))?;
        if sync {
            os::sync_dir(path);
        }
        Ok(())
    };
    if let Err(e) = commit() {
        let _ = std::fs::remove_file(&partial);
        let _ = std::fs::remove_file(manifest::path_for(path));
        if was_running && !live {
            let _ = vm.monitor.cont_after_migration();
        }
        return Err(e);
    }

    match options.then {
        Then::Stop => {}
        Then::Resume => vm.monitor.cont_after_migration()?,
        Then::Quit => vm.monitor.quit()?,
    }
    Ok(SaveReport {
        manifest,
        path: path.to_path_buf(),
        elapsed: started.elapsed(),
        migration: info,
    })
}

/// Sends the VM's state through a pipe into `file`; returns what was copied
/// once QEMU reports the migration completed.
fn run_migration(
    vm: &mut Vm,
    file: File,
    partial: &Path,
    ram_bytes: u64,
    options: &SaveOptions,
    progress: &dyn Progress,
) -> Result<(Copied, MigrationInfo)> {
    vm.monitor
        .set_migration_parameter("max-bandwidth", options.bandwidth.unwrap_or(UNCAPPED))?;
    let (read_end, write_end) = os::pipe()?;
    vm.monitor.migrate_to_fd(FD_NAME, write_end.as_fd())?;
    // QEMU holds its own copy now; ours must go, or the copy never sees EOF.
    drop(write_end);

    let written = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    let sync = !options.no_sync;
    {
        let written = Arc::clone(&written);
        std::thread::Builder::new()
            .name("save-copy".into())
            .spawn(move || {
                let _ = tx.send(copy(read_end, file, &written, sync));
            })
            .map_err(Error::os("starting the thread that writes the state file"))?;
    }
    let mut cancelled = false;
    let copied = loop {
        match rx.recv_timeout(PROGRESS_TICK) {
            Ok(c) => break c,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                progress.update("saving", written.load(Ordering::Relaxed), Some(ram_bytes));
                if options.cancel.load(Ordering::Relaxed) && !cancelled {
                    cancelled = true;
                    vm.monitor.migrate_cancel()?;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = vm.monitor.migrate_cancel();
                return Err(Error::Os {
                    what: "writing the state file",
                    source: std::io::Error::other("the thread that writes it panicked"),
                });
            }
        }
    };
    progress.update("saving", copied.bytes, Some(ram_bytes));
    if copied.error.is_some() {
        // Our side failed (a full disk): make sure QEMU stops too.
        let _ = vm.monitor.migrate_cancel();
    }
    // QEMU marks the migration done before it closes its end of the pipe,
    // so this is normally the first answer.
    let settle = Instant::now() + Duration::from_secs(30);
    let info = match vm
        .monitor
        .wait_migration(settle, |_| {})
        .map_err(Error::from)
    {
        Ok(i) => i,
        Err(Error::Monitor(e)) if e.kind() == qemu_monitor::ErrorKind::Delivery => {
            return Err(vm.exited("during the save; nothing was kept"))
        }
        Err(e) => return Err(e),
    };
    if let Some(e) = copied.error {
        return Err(Error::File {
            path: partial.to_path_buf(),
            what: "writing the state file",
            source: e,
        });
    }
    if cancelled || options.cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled(
            "the save was cancelled; nothing was kept".into(),
        ));
    }
    match info.status {
        MigrationStatus::Completed => Ok((copied, info)),
        _ => Err(Error::MigrationFailed(info.error.clone().unwrap_or_else(
            || format!("QEMU reports status {:?}", info.status),
        ))),
    }
}

/// How much is written between nudges to the kernel to start writing it out.
const WRITEBACK_STEP: u64 = 32 << 20;

fn copy(mut pipe: PipeReader, mut file: File, written: &AtomicU64, sync: bool) -> Copied {
    let mut buf = vec![0u8; CHUNK];
    let mut hasher = crc32fast::Hasher::new();
    let mut head = Vec::new();
    let mut bytes = 0u64;
    let error = loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Some(e),
        };
        if let Err(e) = file.write_all(&buf[..n]) {
            break Some(e);
        }
        hasher.update(&buf[..n]);
        if head.len() < 64 * 1024 {
            head.extend_from_slice(&buf[..n.min(64 * 1024 - head.len())]);
        }
        let before = bytes;
        bytes += n as u64;
        written.store(bytes, Ordering::Relaxed);
        if sync && before / WRITEBACK_STEP != bytes / WRITEBACK_STEP {
            // Start writing the finished step to disk now, while QEMU still
            // streams, so the final fsync has little left to wait for.
            let end = bytes / WRITEBACK_STEP * WRITEBACK_STEP;
            os::start_writeback(&file, end - WRITEBACK_STEP, WRITEBACK_STEP);
        }
    };
    // Closing the read end makes QEMU's next write fail, so a failed copy
    // fails the migration rather than blocking it.
    drop(pipe);
    Copied {
        bytes,
        crc: hasher.finalize(),
        head,
        error,
        file,
    }
}
