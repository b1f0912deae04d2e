//! Saving a VM to a state file: paused, uncapped, through a pipe into our
//! own writer, into `FILE.partial`, synced and renamed only when QEMU says
//! the migration completed.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::argv;
use crate::control::{MigrationInfo, MigrationStatus};
use crate::error::{Error, Result};
use crate::manifest::{self, Manifest};
use crate::progress::Progress;
use crate::vm::Vm;

/// QEMU's own default cap is 128 MiB/s; a paused guest is saved uncapped.
pub const UNCAPPED: u64 = 1 << 40;
/// How often progress is reported while the stream flows.
const PROGRESS_TICK: Duration = Duration::from_millis(100);
/// Chunk size of the copy from QEMU's pipe to the file.
const CHUNK: usize = 1 << 20;
/// The name the pipe's write end gets in QEMU (`getfd`).
const FD_NAME: &str = "qemu-migrate-save";

/// What to do with the source VM after a successful save.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Then {
    /// Leave it paused, as the recipe does (it can be resumed with `cont`).
    #[default]
    Stop,
    /// End the QEMU process.
    Quit,
    /// Let the guest run on.
    Resume,
}

#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Save while the guest runs (a live snapshot of a moving target); by
    /// default the guest is paused first, which is also far faster.
    pub live: bool,
    /// Bandwidth cap in bytes per second; uncapped by default.
    pub bandwidth: Option<u64>,
    pub then: Then,
    /// Skip the fsync: faster, but a crash of this machine soon after could
    /// lose a file that looked complete. The rename stays atomic.
    pub no_sync: bool,
    /// Set (e.g. by a signal handler) to cancel the save.
    pub cancel: Arc<AtomicBool>,
}

#[derive(Debug, Clone)]
pub struct SaveReport {
    pub manifest: Manifest,
    pub path: PathBuf,
    pub elapsed: Duration,
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
pub fn save(
    vm: &mut Vm,
    path: &Path,
    options: &SaveOptions,
    progress: &dyn Progress,
) -> Result<SaveReport> {
    let started = Instant::now();
    let _lock = lock_vm(vm.pid)?;

    let was_running = vm.check_migratable("save")?;
    let ram_bytes = vm.control.ram_size()?;

    let partial = partial_path(path);
    let file = File::create(&partial).map_err(Error::file(&partial, "creating the state file"))?;

    if was_running && !options.live {
        vm.control.stop()?;
    }
    let old_bandwidth = vm.control.max_bandwidth()?;
    let result = run_migration(vm, file, &partial, ram_bytes, options, progress);
    // Put QEMU's own setting back whatever happened.
    let _ = vm.control.set_max_bandwidth(old_bandwidth);

    let (copied, info) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            if was_running && !options.live && !matches!(e, Error::QemuExited { .. }) {
                let _ = vm.control.cont();
            }
            return Err(e);
        }
    };

    let machine = qemu_stream::inspect(&copied.head[..])
        .ok()
        .and_then(|s| s.machine_type);
    let manifest = Manifest {
        format: manifest::FORMAT.to_string(),
        qemu: vm.binary.clone(),
        qemu_version: vm.version.to_string(),
        args: vm.args.clone(),
        vm_options: argv::vm_options(&vm.args),
        env: vm.env.clone(),
        machine,
        ram_bytes,
        stream_bytes: copied.bytes,
        crc32: format!("{:08x}", copied.crc),
        guest_was_running: was_running,
        saved_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        transport: "fd".into(),
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
            sync_dir(path);
        }
        Ok(())
    };
    if let Err(e) = commit() {
        let _ = std::fs::remove_file(&partial);
        let _ = std::fs::remove_file(manifest::path_for(path));
        if was_running && !options.live {
            let _ = vm.control.cont_after_migration();
        }
        return Err(e);
    }

    match options.then {
        Then::Stop => {}
        Then::Resume => vm.control.cont_after_migration()?,
        Then::Quit => vm.control.quit()?,
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
    vm.control
        .set_max_bandwidth(options.bandwidth.unwrap_or(UNCAPPED))?;
    let (read_end, write_end) = pipe()?;
    vm.control.getfd(FD_NAME, write_end.as_fd())?;
    // QEMU holds its own copy now; ours must go, or the copy never sees EOF.
    drop(write_end);
    vm.control.migrate(&format!("fd:{FD_NAME}"))?;

    let written = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    let sync = !options.no_sync;
    {
        let written = Arc::clone(&written);
        std::thread::spawn(move || {
            let _ = tx.send(copy(read_end, file, &written, sync));
        });
    }
    let mut cancelled = false;
    let copied = loop {
        match rx.recv_timeout(PROGRESS_TICK) {
            Ok(c) => break c,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                progress.update("saving", written.load(Ordering::Relaxed), Some(ram_bytes));
                if options.cancel.load(Ordering::Relaxed) && !cancelled {
                    cancelled = true;
                    vm.control.migrate_cancel()?;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Error::Protocol("the copy thread died".into()))
            }
        }
    };
    progress.update("saving", copied.bytes, Some(ram_bytes));
    if copied.error.is_some() {
        // Our side failed (a full disk): make sure QEMU stops too.
        let _ = vm.control.migrate_cancel();
    }
    let info = match wait_final(vm) {
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
        return Err(Error::Interrupted(
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

/// The migration's final status. QEMU marks the migration done before it
/// closes its end of the pipe, so this is normally the first answer.
fn wait_final(vm: &mut Vm) -> Result<MigrationInfo> {
    const SETTLE: Duration = Duration::from_secs(30);
    let deadline = Instant::now() + SETTLE;
    loop {
        let info = vm.control.query_migrate()?;
        if info.status.is_final() || Instant::now() >= deadline {
            return Ok(info);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How much is written between nudges to the kernel to start writing it out.
const WRITEBACK_STEP: u64 = 32 << 20;

fn copy(read_end: OwnedFd, mut file: File, written: &AtomicU64, sync: bool) -> Copied {
    let mut pipe = File::from(read_end);
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
            start_writeback(&file, end - WRITEBACK_STEP, WRITEBACK_STEP);
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

fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: an advisory call on an open descriptor; failure only means the
    // final fsync does all the work, as it would without this.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// A pipe with a large buffer, so QEMU and the copy thread rarely wait on each other.
pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::file("pipe", "creating a pipe")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: plain fcntl on an open descriptor; failure only leaves the default size.
    unsafe {
        libc::fcntl(fds[1], libc::F_SETPIPE_SZ, CHUNK as libc::c_int);
    }
    Ok((r, w))
}

pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Makes a rename durable: the directory entry itself is synced.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// One save or migration per VM at a time: an exclusive lock keyed by QEMU's pid.
pub(crate) fn lock_vm(pid: u32) -> Result<File> {
    use std::os::fd::AsRawFd;
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("qemu-migrate-{pid}.lock"));
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(Error::file(&path, "opening the VM's lock file"))?;
    // SAFETY: flock on an open descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Busy(format!(
            "another qemu-migrate is already saving or migrating this VM (QEMU pid {pid})"
        )));
    }
    Ok(f)
}
