//! Restoring a state file: checked before anything starts, then loaded into
//! a QEMU started with the recorded options through a pipe we feed.

use std::fs::File;
use std::io::{PipeWriter, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::checkpoint;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::os::{self, partial_path};
use crate::preflight;
use crate::progress::Progress;
use crate::vm::{Console, LaunchOptions, Vm};

const PROGRESS_TICK: Duration = Duration::from_millis(100);
const FD_NAME: &str = "qemu-migrate-restore";

/// How to restore.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RestoreOptions {
    /// The QEMU binary; by default the one that saved the file.
    pub qemu: Option<PathBuf>,
    /// Keep the guest paused after loading.
    pub paused: bool,
    /// QEMU options to use instead of the manifest's; required for a bare
    /// state file (one from the shell recipe, with no manifest).
    pub args: Option<Vec<String>>,
    /// Where the VM's console (its `-serial stdio`) goes.
    pub console: Console,
    /// Set (e.g. by a signal handler) to cancel the restore.
    pub cancel: Arc<AtomicBool>,
    /// Where a checkpoint's fresh disk overlays go (default: beside the state file).
    pub into: Option<PathBuf>,
}

/// A state file that passed its checks.
#[derive(Debug)]
#[non_exhaustive]
pub struct Checked {
    /// The state file.
    pub path: PathBuf,
    /// Its manifest, when it has one.
    pub manifest: Option<Manifest>,
    /// What the stream holds, when it was read whole to check it (no manifest).
    pub summary: Option<qemu_stream::Summary>,
    /// Its size.
    pub stream_bytes: u64,
}

/// Checks a state file before anything starts: complete, untampered.
///
/// # Errors
/// [`Error::BadStateFile`] saying what is wrong; [`Error::File`] when it cannot be read.
pub fn check(path: &Path) -> Result<Checked> {
    let bad = |reason: String| Error::BadStateFile {
        path: path.to_path_buf(),
        reason,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && partial_path(path).exists() => {
            return Err(bad(format!(
                "the save did not finish: only {} exists",
                partial_path(path).display()
            )))
        }
        Err(e) => return Err(Error::file(path, "opening the state file")(e)),
    };
    let manifest = Manifest::load(path)?;
    match manifest {
        Some(m) => {
            if meta.len() != m.stream_bytes {
                return Err(bad(format!(
                    "incomplete or altered: {} bytes, but the save wrote {} (manifest)",
                    meta.len(),
                    m.stream_bytes
                )));
            }
            let crc = crc_file(path)?;
            if format!("{crc:08x}") != m.crc32 {
                return Err(bad(format!(
                    "damaged: its CRC-32 is {crc:08x}, the save recorded {} (manifest)",
                    m.crc32
                )));
            }
            Ok(Checked {
                path: path.to_path_buf(),
                stream_bytes: meta.len(),
                manifest: Some(m),
                summary: None,
            })
        }
        None => {
            // No manifest: the stream itself must say it is whole.
            let summary = qemu_stream::inspect_file(path).map_err(|e| bad(e.to_string()))?;
            if !summary.complete {
                let why = summary
                    .stopped
                    .as_ref()
                    .map_or("it does not end".to_string(), |s| s.message.clone());
                return Err(bad(format!("not a complete migration stream: {why}")));
            }
            Ok(Checked {
                path: path.to_path_buf(),
                stream_bytes: meta.len(),
                manifest: None,
                summary: Some(summary),
            })
        }
    }
}

fn crc_file(path: &Path) -> Result<u32> {
    let mut f = File::open(path).map_err(Error::file(path, "reading the state file"))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(Error::file(path, "reading the state file"))?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

/// A restored VM: running (or paused, if asked), with its QEMU launched here.
#[derive(Debug)]
#[non_exhaustive]
pub struct Restored {
    /// The VM; its QEMU is killed when this is dropped unless detached.
    pub vm: Vm,
    /// The manifest it was restored from.
    pub manifest: Option<Manifest>,
    /// From the start of the call to the guest running.
    pub elapsed: Duration,
    /// The fresh overlays a checkpoint's disks were given (the VM writes to them).
    pub overlays: Vec<PathBuf>,
}

/// Checks `path`, starts QEMU with the recorded (or given) options and loads it.
///
/// # Errors
/// Refusals ([`Error::BadStateFile`], [`Error::Mismatch`]) before any QEMU
/// starts; [`Error::QemuExited`] with QEMU's words when it rejects the stream.
pub fn restore(path: &Path, options: &RestoreOptions, progress: &dyn Progress) -> Result<Restored> {
    let started = Instant::now();
    let checked = check(path)?;
    restore_checked(checked, started, options, progress)
}

/// [`restore`] of a state file [`check`] passed.
///
/// # Errors
/// As [`restore`].
pub fn restore_checked(
    checked: Checked,
    started: Instant,
    options: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<Restored> {
    let path = checked.path.as_path();
    let (binary, args, env, was_running) = match (&checked.manifest, &options.args) {
        (_, Some(args)) => (
            options
                .qemu
                .clone()
                .or_else(|| checked.manifest.as_ref().map(|m| m.qemu.clone()))
                .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
            args.clone(),
            checked
                .manifest
                .as_ref()
                .map(|m| m.env.clone())
                .unwrap_or_default(),
            checked
                .manifest
                .as_ref()
                .is_none_or(|m| m.guest_was_running),
        ),
        (Some(m), None) => (
            options.qemu.clone().unwrap_or_else(|| m.qemu.clone()),
            m.args.clone(),
            m.env.clone(),
            m.guest_was_running,
        ),
        (None, None) => {
            return Err(Error::BadStateFile {
                path: path.to_path_buf(),
                reason: "it has no manifest, so QEMU's options are not known: give them after --, \
                         exactly as the VM that saved it was started"
                    .into(),
            })
        }
    };
    // The disks: as they were saved, or a checkpoint's fresh overlays.
    let disks = checkpoint::thaw::thaw(
        checked.manifest.as_ref(),
        path,
        &args,
        options.into.as_deref(),
    )?;
    // The very options saved need no probe; any other QEMU or options are
    // probed with the fresh overlays, never with a checkpoint's frozen images.
    let unchanged = checked
        .manifest
        .as_ref()
        .is_some_and(|m| m.qemu == binary && m.vm_options == crate::argv::vm_options(&args));
    let probe_args = if unchanged { &args } else { &disks.args };
    preflight::check(&checked, &binary, probe_args, &env)?;

    let mut vm = Vm::launch_incoming(
        &binary,
        &disks.args,
        &LaunchOptions::new(options.console, env),
    )?;
    load(&mut vm, &checked, options, progress)?;
    let overlays = disks.keep();
    if was_running && !options.paused {
        if !vm.monitor.status()?.is_running() {
            vm.monitor.cont()?;
        }
    } else if options.paused && vm.monitor.status()?.is_running() {
        vm.monitor.stop()?;
    }
    Ok(Restored {
        vm,
        manifest: checked.manifest,
        elapsed: started.elapsed(),
        overlays,
    })
}

/// Feeds the stream to the waiting QEMU and waits for it to say it loaded.
fn load(
    vm: &mut Vm,
    checked: &Checked,
    options: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let (read_end, write_end) = os::pipe()?;
    vm.monitor.migrate_incoming_fd(FD_NAME, read_end.as_fd())?;
    drop(read_end);

    let file =
        File::open(&checked.path).map_err(Error::file(&checked.path, "reading the state file"))?;
    let fed = Arc::new(AtomicU64::new(0));
    let feeder = {
        let fed = Arc::clone(&fed);
        std::thread::Builder::new()
            .name("restore-feed".into())
            .spawn(move || feed(file, write_end, &fed))
            .map_err(Error::os("starting the thread that feeds QEMU"))?
    };
    let total = checked.stream_bytes;
    let outcome = vm.wait_loaded(PROGRESS_TICK, |_| {
        progress.update("restoring", fed.load(Ordering::Relaxed), Some(total));
        if options.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled(
                "the restore was cancelled; QEMU was stopped".into(),
            ));
        }
        Ok(())
    });
    progress.update("restoring", fed.load(Ordering::Relaxed), Some(total));
    let _ = feeder.join();
    outcome
}

fn feed(mut file: File, mut pipe: PipeWriter, fed: &AtomicU64) {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    while let Ok(n) = file.read(&mut buf) {
        if n == 0 || pipe.write_all(&buf[..n]).is_err() {
            break;
        }
        total += n as u64;
        fed.store(total, Ordering::Relaxed);
    }
}
