//! Saving a VM to a state file: paused, uncapped, through a pipe into our
//! own writer, into a private temporary file beside the target, synced and
//! renamed only when QEMU says the migration completed.
//!
//! Replacing an earlier save is crash-safe: the commit is the one every
//! kind of save shares ([`crate::commit`]); a save killed before it leaves
//! the old save untouched and its temporary files, which the next save of
//! the same target removes (a running save holds a lock on its own, so only
//! dead ones are removed).

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
use crate::guard;
use crate::manifest::{self, Manifest};
use crate::os::{self, SaveFiles, VmLock};
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
    /// Replace an existing target (crash-safely); refused otherwise.
    pub force: bool,
    /// Set (e.g. by a signal handler) to cancel the save.
    pub cancel: Arc<AtomicBool>,
    /// Write the instant layout: guest RAM as an image beside the stream,
    /// which a restore maps instead of loading ([`crate::instant`]).
    pub instant: bool,
    /// A checkpoint: freeze every writable disk under a qcow2 overlay in the
    /// same pause (implies a paused save); see [`crate::checkpoint`].
    pub with_disks: bool,
    /// A point-in-time snapshot: the guest runs throughout and the state is
    /// the instant the save began ([`crate::snapshot`]); a paused save
    /// where QEMU cannot make one (the report says why).
    pub snapshot: bool,
    /// Resume the guest (paused for a checkpoint's disks) as soon as QEMU
    /// has taken the device state of a snapshot.
    pub(crate) resume_when_captured: bool,
    /// QEMU's migration capabilities this save changed, and the values to
    /// put back (by the save, or by its watchdog if it dies).
    pub(crate) capabilities_back: Vec<(&'static str, bool)>,
}

/// Capabilities a one-way stream into a file cannot have: they need QEMU
/// to read back from the stream (a return path) or several channels. A VM
/// left with one on (by an earlier migration, or by hand) failed every save
/// with "Unable to write to file: Bad file descriptor". Dependents first.
const TWO_WAY: &[&str] = &[
    "switchover-ack",
    "postcopy-preempt",
    "postcopy-ram",
    "return-path",
    "zero-copy-send",
    "mapped-ram",
    "multifd",
];

/// Turns off what of [`TWO_WAY`] is on; returns what to put back.
fn one_way(vm: &mut Vm) -> Result<Vec<(&'static str, bool)>> {
    let mut back = Vec::new();
    for &cap in TWO_WAY {
        if vm.monitor.capability(cap)? == Some(true) {
            if let Err(e) = vm.monitor.set_capability(cap, false) {
                put_capabilities_back(&mut vm.monitor, &back);
                return Err(e.into());
            }
            back.push((cap, true));
        }
    }
    Ok(back)
}

/// Sets the capabilities of `back` to their values again, last changed first.
fn put_capabilities_back(monitor: &mut qemu_monitor::Monitor, back: &[(&'static str, bool)]) {
    for (cap, on) in back.iter().rev() {
        let _ = monitor.set_capability(cap, *on);
    }
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
    /// Why an instant save was written as a plain stream, when it was.
    pub fallback: Option<String>,
    /// Why a live save was made with the guest paused, when it was (a known QEMU bug).
    pub paused_for: Option<String>,
    /// What could not be tidied up once the save was in place (it is).
    pub warnings: Vec<String>,
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
    // -- a known QEMU bug: a live save of several RAM blocks is made paused
    let mut options = options.clone();
    let paused_for = if options.live && vm.monitor.status()?.is_running() {
        crate::known_bugs::dirty_sync_abort(vm)?
    } else {
        None
    };
    if let Some(why) = &paused_for {
        options.live = false;
        progress.note(&format!("the guest is saved paused, not live: {why}"));
    }
    // --
    options.capabilities_back = one_way(vm)?;
    let report = save_with(vm, path, options, progress);
    report.map(|r| SaveReport { paused_for, ..r })
}

/// [`save`], the capabilities of a one-way stream set: a snapshot where
/// asked and QEMU can, else a plain save; QEMU's capabilities put back.
fn save_with(
    vm: &mut Vm,
    path: &Path,
    mut options: SaveOptions,
    progress: &dyn Progress,
) -> Result<SaveReport> {
    let put_back = |vm: &mut Vm, back: &[(&'static str, bool)]| {
        // Not after `--then quit`.
        if vm.monitor.status().is_ok() {
            put_capabilities_back(&mut vm.monitor, back);
        }
    };
    let mut not_snapshot = None;
    if options.snapshot {
        match crate::snapshot::enable(vm) {
            Ok(Ok(())) => options
                .capabilities_back
                .push((crate::snapshot::CAPABILITY, false)),
            Ok(Err(why)) => not_snapshot = Some(why),
            Err(e) => {
                put_back(vm, &options.capabilities_back);
                return Err(e);
            }
        }
    }
    let run = |vm: &mut Vm, options: &SaveOptions| {
        if options.instant {
            crate::instant::save(vm, path, options, progress)
        } else {
            save_plain(vm, path, options, progress)
        }
    };
    // A snapshot QEMU refuses only once the migration starts (what it can
    // track) is made again paused, as one refused up front is.
    let mut report = None;
    if not_snapshot.is_none() {
        let tried = run(vm, &options);
        match &tried {
            Err(Error::MigrationFailed(why))
                if options.snapshot && crate::snapshot::refused_at_start(why) =>
            {
                not_snapshot = Some(format!("QEMU could not start a background snapshot: {why}"));
            }
            _ => report = Some(tried),
        }
    }
    if let Some(why) = &not_snapshot {
        progress.note(&format!("not a snapshot, saved paused: {why}"));
        if let Some(i) = options
            .capabilities_back
            .iter()
            .position(|(c, _)| *c == crate::snapshot::CAPABILITY)
        {
            crate::snapshot::disable(vm);
            options.capabilities_back.remove(i);
        }
        let mut paused = options.clone();
        paused.snapshot = false;
        paused.live = false;
        report = Some(run(vm, &paused));
    }
    let report = report.expect("a save was run");
    put_back(vm, &options.capabilities_back);
    let mut report = report?;
    if let Some(why) = not_snapshot {
        let why = format!("{why}: saved with the guest paused, as a plain save is");
        report.fallback = Some(match report.fallback.take() {
            Some(other) => format!("{why}; {other}"),
            None => why,
        });
    } else if options.snapshot && options.then == Then::Stop {
        // The snapshot let the guest run; a save leaves it paused if asked.
        vm.monitor.stop()?;
    }
    Ok(report)
}

/// [`save`] as a plain stream.
pub(crate) fn save_plain(
    vm: &mut Vm,
    path: &Path,
    options: &SaveOptions,
    progress: &dyn Progress,
) -> Result<SaveReport> {
    let started = Instant::now();
    let _lock = VmLock::take(vm.pid())?;

    let was_running = vm.check_migratable("save")?;
    vm.check_replayable(options.then)?;
    settle(path, &[]);
    let previous = replaced_save(path, options.force)?;
    let ram_bytes = vm.monitor.ram_size()?;
    // A checkpoint freezes the disks at one instant: the memory's too (a
    // snapshot's, once QEMU has taken the device state, runs on).
    let live = (options.live || options.snapshot) && !options.with_disks;
    let mut disks = Freeze::prepare(vm, path, options.with_disks, options.then != Then::Quit)?;

    let old_bandwidth = vm.monitor.migration_parameter("max-bandwidth")?;

    // From here on this process changes the VM; if it dies, the watchdog
    // puts it back (see `put_back`).
    let watchdog = {
        let addr = vm.monitor.addr().clone();
        let resume = was_running && !live;
        let then = options.then;
        let target = path.to_path_buf();
        let settings = (old_bandwidth, options.capabilities_back.clone());
        os::Watchdog::spawn(move |last| {
            put_back(&addr, resume, &settings, then, last == Some(COMMITTED));
            settle(&target, &[]);
        })?
    };
    let (files, file) = SaveFiles::create(path)?;

    if was_running && !live {
        if let Err(e) = vm.monitor.stop() {
            files.remove();
            return Err(e.into());
        }
    }
    if let Err(e) = disks.freeze(vm) {
        files.remove();
        if was_running && !live {
            let _ = vm.monitor.cont();
        }
        return Err(e);
    }
    disks.keep_overlays();
    let noted = |e: Error| match disks.left_on_overlays() {
        Some(note) => Error::Noted {
            source: Box::new(e),
            note,
        },
        None => e,
    };
    // After the migration completed: nothing kept, the guest resumed.
    let failed_after = |vm: &mut Vm, e: Error| {
        files.remove();
        if was_running && !live {
            let _ = vm.monitor.cont_after_migration();
        }
        noted(e)
    };
    let mut options = options.clone();
    options.resume_when_captured = options.snapshot && options.with_disks && was_running;
    let options = &options;
    let result = run_migration(vm, file, path, ram_bytes, options, progress);
    // Put QEMU's own setting back whatever happened.
    let _ = vm
        .monitor
        .set_migration_parameter("max-bandwidth", old_bandwidth);

    let (copied, info) = match result {
        Ok(r) => r,
        Err(e) => {
            files.remove();
            if was_running && !live && !matches!(e, Error::QemuExited { .. }) {
                let _ = vm.monitor.cont();
            }
            return Err(noted(e));
        }
    };

    // Disks are flushed and let go by QEMU at completion: what they are now
    // is what the saved memory describes.
    // A plain save's disks are guarded by `guard`; a checkpoint's frozen
    // images by their own record.
    let recorded = guard::record(vm).and_then(|g| Ok((g, disks.record()?.filter(|r| r.frozen))));
    let (mut guarded, checkpoint) = recorded.map_err(|e| failed_after(vm, e))?;
    if checkpoint.is_some() {
        // A checkpoint's disks are its frozen images, guarded by its own
        // record; the overlays the VM now writes to are no part of the save.
        guarded.retain(|f| f.role != guard::Role::Disk);
    }
    let args = disks.current_args(vm.args());
    let mut manifest = manifest_of(
        vm,
        args,
        &copied.head,
        (copied.bytes, copied.crc),
        ram_bytes,
        was_running,
        guarded,
    );
    manifest.checkpoint = checkpoint;
    let committed = crate::commit::Staged {
        target: path,
        files: &files,
        stream: &copied.file,
        parts: Vec::new(),
        previous,
        sync: !options.no_sync,
        cancel: &options.cancel,
    }
    .place()
    .and_then(|placed| placed.commit(&manifest));
    let committed = committed.map_err(|e| failed_after(vm, e))?;
    finish(
        vm,
        options.then,
        watchdog,
        SaveReport {
            manifest,
            path: path.to_path_buf(),
            elapsed: started.elapsed(),
            migration: info,
            fallback: None,
            paused_for: None,
            warnings: committed.warnings,
        },
    )
}

/// The manifest of a save just written: the VM as it ran (`args`), the
/// stream (its first bytes, its length and CRC) and the files it guards.
/// Neither instant layout nor checkpoint: the caller adds its own.
pub(crate) fn manifest_of(
    vm: &Vm,
    args: Vec<String>,
    head: &[u8],
    (stream_bytes, crc): (u64, u32),
    ram_bytes: u64,
    was_running: bool,
    files: Vec<guard::GuardedFile>,
) -> Manifest {
    let machine = qemu_stream::inspect(head).ok().and_then(|s| s.machine_type);
    Manifest {
        format: manifest::FORMAT.to_string(),
        qemu: vm.binary().to_path_buf(),
        qemu_version: vm.version().to_string(),
        qemu_sha256: vm.binary_sha256(),
        vm_options: argv::vm_options(&args),
        args,
        env: vm.env().clone(),
        machine,
        ram_bytes,
        stream_bytes,
        crc32: format!("{crc:08x}"),
        guest_was_running: was_running,
        saved_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        transport: "fd".into(),
        qemu_uid: os::process_uid(vm.pid()),
        files,
        previous: None,
        committing: false,
        instant: None,
        checkpoint: None,
        unreplayable: vm.replay.unreplayable.clone(),
        backends: vm.replay.backends.clone(),
    }
}

/// How long `--then quit` waits for QEMU's process to be gone.
const QUIT_WAIT: Duration = Duration::from_secs(30);

/// The end of a save that is on disk: the watchdog told it is committed,
/// `then` carried out, the watchdog let go.
pub(crate) fn finish(
    vm: &mut Vm,
    then: Then,
    mut watchdog: os::Watchdog,
    report: SaveReport,
) -> Result<SaveReport> {
    watchdog.step(COMMITTED);
    match then {
        Then::Stop => {}
        Then::Resume => vm.monitor.cont_after_migration()?,
        Then::Quit => vm.quit_and_wait(QUIT_WAIT)?,
    }
    watchdog.dismiss();
    Ok(report)
}

/// The save at `target` that this one replaces, as its manifest describes
/// the stream there now (`None` when there is none, or it is not a save).
///
/// # Errors
/// [`Error::Exists`] when something is at `target` and `force` is not set.
pub(crate) fn replaced_save(target: &Path, force: bool) -> Result<Option<Box<Manifest>>> {
    let state = std::fs::symlink_metadata(target).ok();
    let manifest_there = std::fs::symlink_metadata(manifest::path_for(target)).is_ok();
    if state.is_none() && !manifest_there {
        return Ok(None);
    }
    // A save killed in its commit before its stream was in place, where
    // there was no save: nothing is there but its leftovers.
    if state.is_none() && Manifest::load(target).is_ok_and(|m| m.is_some_and(|m| m.committing)) {
        return Ok(None);
    }
    if !force {
        return Err(Error::Exists {
            path: target.to_path_buf(),
            is_save: manifest_there,
        });
    }
    let (Some(state), Ok(Some(mut current))) = (state, Manifest::load(target)) else {
        return Ok(None);
    };
    // A save killed in the middle of its commit leaves a manifest whose
    // `previous` describes the stream: keep whichever one does.
    let older = current.previous.take();
    let mut candidates: Vec<Box<Manifest>> = [Some(Box::new(current)), older]
        .into_iter()
        .flatten()
        .filter(|m| m.stream_bytes == state.len())
        .collect();
    if candidates.len() > 1 {
        let crc = crate::restore::crc_file(target)?;
        candidates.retain(|m| m.describes(state.len(), crc));
    }
    Ok(candidates.into_iter().next())
}

/// Finishes or undoes what a dead save of `target` left ([`crate::commit::settle`]),
/// saying so on stderr.
pub(crate) fn settle(target: &Path, placed: &[PathBuf]) {
    if let Some(done) = crate::commit::settle(target, placed) {
        os::write_stderr(&format!("qemu-migrate: {done}\n"));
    }
}

/// The watchdog's step after the save is committed: from then on, a death
/// of this process leaves the save and does what `--then` asked.
pub(crate) const COMMITTED: u8 = b'C';

/// Run by the watchdog when the saving process died: a migration still
/// running is cancelled, QEMU's bandwidth cap put back, and the guest
/// resumed if it ran and the save was not committed; once committed, what
/// `--then` asked is done. Best effort, each step on its own; one line on
/// stderr says what was done.
pub(crate) fn put_back(
    addr: &qemu_monitor::MonitorAddr,
    resume: bool,
    (bandwidth, capabilities): &(u64, Vec<(&'static str, bool)>),
    then: Then,
    committed: bool,
) {
    let options = qemu_monitor::Options {
        timeout: Duration::from_secs(10),
        wait_socket: Some(Duration::from_secs(5)),
        mux_escape: crate::vm::is_mux_monitor(addr),
    };
    let Ok(mut monitor) = qemu_monitor::connect(addr.clone(), &options) else {
        os::write_stderr(
            "qemu-migrate: the save died; its monitor could not be reached to put the VM back\n",
        );
        return;
    };
    if monitor
        .migration()
        .is_ok_and(|m| !m.status.is_final() && m.status != MigrationStatus::None)
    {
        let _ = monitor.migrate_cancel();
        let _ = monitor.wait_migration(Instant::now() + Duration::from_secs(10), |_| {});
    }
    let _ = monitor.set_migration_parameter("max-bandwidth", *bandwidth);
    put_capabilities_back(&mut monitor, capabilities);
    let done = if committed {
        match then {
            Then::Stop => "the save was complete; the VM stays paused as asked",
            Then::Resume => {
                let _ = monitor.cont_after_migration();
                "the save was complete; the guest was resumed as asked"
            }
            Then::Quit => {
                let _ = monitor.quit();
                "the save was complete; QEMU was ended as asked"
            }
        }
    } else if resume && monitor.status().is_ok_and(|s| !s.is_running()) {
        let _ = monitor.cont_after_migration();
        "the save did not finish; the guest was resumed"
    } else {
        "the save did not finish; the VM is as it was"
    };
    os::write_stderr(&format!(
        "qemu-migrate: the saving process died: {done}, and QEMU's bandwidth cap put back\n"
    ));
}

/// Sends the VM's state through a pipe into `file`; returns what was copied
/// once QEMU reports the migration completed.
fn run_migration(
    vm: &mut Vm,
    file: File,
    target: &Path,
    ram_bytes: u64,
    options: &SaveOptions,
    progress: &dyn Progress,
) -> Result<(Copied, MigrationInfo)> {
    let sync = !options.no_sync;
    stream(
        vm,
        ram_bytes,
        options,
        progress,
        move |pipe, written| copy(pipe, file, written, sync),
        |copied: &mut Copied| {
            copied.error.take().map(|source| Error::File {
                path: target.to_path_buf(),
                what: "writing the state file",
                source,
            })
        },
    )
}

/// How long QEMU may take to connect to the stream socket of a save
/// through a TCP monitor (it connects as soon as `migrate` is read).
const CONNECT_BACK: Duration = Duration::from_secs(10);

/// Starts QEMU's migration into a stream this process reads. Through a
/// unix-socket monitor, a pipe handed over with `getfd`; a TCP monitor
/// carries no descriptors, so QEMU connects to a unix socket of ours in a
/// private directory instead (`migrate unix:PATH`), and the stream is read
/// from that connection the same way.
pub(crate) fn start_outgoing(vm: &mut Vm) -> Result<PipeReader> {
    if vm.monitor.can_pass_fds() {
        let (read_end, write_end) = os::pipe()?;
        vm.monitor.migrate_to_fd(FD_NAME, write_end.as_fd())?;
        // QEMU holds its own copy now; ours must go, or the writer never sees EOF.
        drop(write_end);
        return Ok(read_end);
    }
    let dir = tempfile::Builder::new()
        .prefix("qemu-migrate-stream-")
        .tempdir()
        .map_err(Error::os(
            "creating a private directory for the stream socket",
        ))?;
    // A QEMU running as another user (`-runas`, a launcher's own user)
    // must be able to reach the socket: the directory becomes its.
    let qemu_uid = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(format!("/proc/{}", vm.pid()))
            .map_err(Error::os("reading who QEMU runs as"))?,
    );
    if qemu_uid != os::uid() {
        std::os::unix::fs::chown(dir.path(), Some(qemu_uid), None).map_err(Error::file(
            dir.path(),
            "handing the stream socket's directory to QEMU's user",
        ))?;
    }
    let path = dir.path().join("stream.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .map_err(Error::file(&path, "listening for QEMU's migration stream"))?;
    vm.monitor.migrate(&format!("unix:{}", path.display()))?;
    if !os::readable(&listener, CONNECT_BACK) {
        let _ = vm.monitor.migrate_cancel();
        return Err(Error::Os {
            what: "waiting for QEMU to connect to the stream socket",
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "QEMU did not connect to {} within {} s (a QEMU in a chroot or \
                     under another user cannot reach it)",
                    path.display(),
                    CONNECT_BACK.as_secs()
                ),
            ),
        });
    }
    let (stream, _) = listener
        .accept()
        .map_err(Error::file(&path, "accepting QEMU's migration stream"))?;
    Ok(PipeReader::from(std::os::fd::OwnedFd::from(stream)))
}

/// How long a snapshot of a checkpoint may take to capture device state.
const CAPTURE_WAIT: Duration = Duration::from_secs(30);

/// Resumes the guest of a checkpoint's snapshot, paused for its disks, once
/// QEMU has taken the device state: RAM is sent only after that, so the
/// first growth of what was sent once the migration is active says so.
/// (QEMU 7.2 resumes the guest itself then; later ones keep the state it
/// had, paused.)
fn resume_once_captured(vm: &mut Vm) -> Result<()> {
    let deadline = Instant::now() + CAPTURE_WAIT;
    let mut first_active = None;
    while Instant::now() < deadline {
        let m = vm.monitor.migration()?;
        if m.status.is_final() {
            break;
        }
        if m.status == MigrationStatus::Active {
            match first_active {
                None => first_active = Some(m.transferred),
                Some(sent) if m.transferred > sent => break,
                Some(_) => {}
            }
        }
        // Polling QEMU, whose only word for it is the counter.
        std::thread::sleep(Duration::from_millis(1));
    }
    if !vm.monitor.status()?.is_running() {
        vm.monitor.cont_after_migration()?;
    }
    Ok(())
}

/// The one way a save streams: QEMU's bandwidth cap set, the VM's state sent
/// through a pipe to `writer` on a thread of its own (which counts what it
/// read in its second argument), progress reported and a cancellation
/// honoured while it runs. `failed` says whether the writer failed, and
/// how: QEMU's migration is then cancelled too. Returns the writer's result
/// once QEMU reports the migration completed.
pub(crate) fn stream<T: Send + 'static>(
    vm: &mut Vm,
    ram_bytes: u64,
    options: &SaveOptions,
    progress: &dyn Progress,
    writer: impl FnOnce(PipeReader, &AtomicU64) -> T + Send + 'static,
    failed: impl FnOnce(&mut T) -> Option<Error>,
) -> Result<(T, MigrationInfo)> {
    vm.monitor
        .set_migration_parameter("max-bandwidth", options.bandwidth.unwrap_or(UNCAPPED))?;
    let read_end = start_outgoing(vm)?;
    if options.resume_when_captured {
        resume_once_captured(vm)?;
    }

    let read = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    {
        let read = Arc::clone(&read);
        std::thread::Builder::new()
            .name("save-writer".into())
            .spawn(move || {
                let _ = tx.send(writer(read_end, &read));
            })
            .map_err(Error::os("starting the thread that writes the state file"))?;
    }
    let mut cancelled = false;
    let mut written = loop {
        match rx.recv_timeout(PROGRESS_TICK) {
            Ok(w) => break w,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                progress.update("saving", read.load(Ordering::Relaxed), Some(ram_bytes));
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
    progress.update("saving", read.load(Ordering::Relaxed), Some(ram_bytes));
    let failure = failed(&mut written);
    if failure.is_some() {
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
    if let Some(e) = failure {
        return Err(e);
    }
    if cancelled || options.cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled(
            "the save was cancelled; nothing was kept".into(),
        ));
    }
    match info.status {
        MigrationStatus::Completed => Ok((written, info)),
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
