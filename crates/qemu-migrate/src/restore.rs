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
use crate::os;
use crate::preflight;
use crate::progress::Progress;
use crate::trust;
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
    /// Restore even though disks or boot files changed since the save.
    pub force: bool,
    /// As root, restore a VM that another user's QEMU ran (it then runs as root).
    pub as_root: bool,
    /// Set (e.g. by a signal handler) to cancel the restore.
    pub cancel: Arc<AtomicBool>,
    /// Read an instant save's RAM image in full and compare its checksum
    /// before starting (otherwise only when it is not the very file saved).
    pub verify: bool,
    /// Start another VM from the state while the first runs: sockets and
    /// logs of its own; refused when the two would share a writable disk.
    pub clone: bool,
    /// Where what a restore must write goes: a checkpoint's fresh disk
    /// overlays (default: beside the state file); a copy of an instant save
    /// that a QEMU before 8.2 cannot map where it is (read-only storage).
    pub into: Option<PathBuf>,
    /// Substring replacements in the recorded command line (`--replace OLD
    /// NEW`): what supplies a descriptor the save could not name.
    pub replace: Vec<(String, String)>,
    /// For a revert: how another process brings the VM back from the
    /// checkpoint if this one dies (`kill -9`) once it has begun to end
    /// the old VM and before the new one runs.
    pub revive: Option<Revive>,
}

/// The command that restores a checkpoint in a process of its own, made
/// from the state file and the directory its new overlays go to (when one
/// was chosen); run in place of a revert that died midway.
#[derive(Clone)]
pub struct Revive(pub Arc<ReviveCommand>);

/// Makes the command of a [`Revive`]: from the state file and the overlays' directory.
pub type ReviveCommand = dyn Fn(&Path, Option<&Path>) -> Vec<std::ffi::OsString> + Send + Sync;

impl std::fmt::Debug for Revive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Revive(..)")
    }
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
    /// A newer save of this file was killed while it replaced this one:
    /// `manifest` is the previous save's, which the stream still is.
    pub previous_save: bool,
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
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let partials = os::partials_of(path);
            if let Some(p) = partials.first() {
                return Err(bad(format!(
                    "the save did not finish: only {} exists",
                    p.display()
                )));
            }
            if crate::manifest::path_for(path).exists() {
                return Err(bad(
                    "the save did not finish: its manifest exists, the state file does not".into(),
                ));
            }
            return Err(Error::file(path, "opening the state file")(e));
        }
        Err(e) => return Err(Error::file(path, "opening the state file")(e)),
    };
    crate::trust::check_file(path, "state file")?;
    let manifest_path = crate::manifest::path_for(path);
    if manifest_path.exists() {
        crate::trust::check_file(&manifest_path, "manifest")?;
    }
    let manifest = Manifest::load(path)?;
    match manifest {
        Some(mut m) => {
            let previous = m.previous.take();
            let size_known = meta.len() == m.stream_bytes
                || previous
                    .as_ref()
                    .is_some_and(|p| p.stream_bytes == meta.len());
            if !size_known {
                return Err(bad(format!(
                    "incomplete or altered: {} bytes, but the save wrote {} (manifest)",
                    meta.len(),
                    m.stream_bytes
                )));
            }
            let crc = crc_file(path)?;
            let (manifest, previous_save) = if m.describes(meta.len(), crc) {
                (m, false)
            } else {
                match previous {
                    Some(p) if p.describes(meta.len(), crc) => (*p, true),
                    _ if meta.len() != m.stream_bytes => {
                        return Err(bad(format!(
                            "incomplete or altered: {} bytes, but the save wrote {} (manifest)",
                            meta.len(),
                            m.stream_bytes
                        )))
                    }
                    _ => {
                        return Err(bad(format!(
                            "damaged: its CRC-32 is {crc:08x}, the save recorded {} (manifest)",
                            m.crc32
                        )))
                    }
                }
            };
            Ok(Checked {
                path: path.to_path_buf(),
                stream_bytes: meta.len(),
                manifest: Some(manifest),
                summary: None,
                previous_save,
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
                previous_save: false,
            })
        }
    }
}

pub(crate) fn crc_file(path: &Path) -> Result<u32> {
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
    /// It was the previous save of the file: a newer save was killed while
    /// it replaced it.
    pub previous_save: bool,
    /// From the start of the call to the guest running.
    pub elapsed: Duration,
    /// Paths given their own name for a clone: (the VM's, the clone's).
    pub renamed: Vec<(PathBuf, PathBuf)>,
    /// The machine type given to the options, when they named only an
    /// alias and this QEMU would have resolved it to another version.
    pub pinned: Option<crate::machine::Pinned>,
    /// The fresh overlays a checkpoint's disks were given (the VM writes to them).
    pub overlays: Vec<PathBuf>,
    /// What the user should know of the restore, a line each (an
    /// environment variable of the manifest left out, an unchecked binary).
    pub warnings: Vec<String>,
    /// The copy of an instant save made in `--into`'s directory and run
    /// from (its storage was read-only to this QEMU).
    pub copy: Option<PathBuf>,
    /// An instant save's RAM images whose content is being checked in the
    /// background, as the guest runs (see [`crate::instant::check`]).
    pub checking_in_background: Vec<PathBuf>,
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
    let (args, env, was_running) = match (&checked.manifest, &options.args) {
        (_, Some(args)) => (
            args.clone(),
            checked
                .manifest
                .as_ref()
                .map(|m| trust::qemu_env(&m.env))
                .unwrap_or_default(),
            checked
                .manifest
                .as_ref()
                .is_none_or(|m| m.guest_was_running),
        ),
        (Some(m), None) => (
            crate::replay::replace(&m.args, &options.replace).map_err(|old| {
                Error::BadStateFile {
                    path: path.to_path_buf(),
                    reason: format!(
                        "--replace: no argument of the recorded command line contains {old:?}"
                    ),
                }
            })?,
            trust::qemu_env(&m.env),
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
    if let Some(m) = &checked.manifest {
        trust::check_runs_as(path, m.qemu_uid, options.as_root)?;
    }
    // The manifest's binary runs only if trusted and unchanged since the save.
    let manifest_path = crate::manifest::path_for(path);
    let (binary, mut warnings) = trust::recorded_qemu(
        checked
            .manifest
            .as_ref()
            .map(|m| (manifest_path.as_path(), m)),
        options.qemu.as_deref(),
    )?;
    if let Some(m) = &checked.manifest {
        warnings.extend(trust::dropped_env(&m.env));
    }
    // A clone gets socket and log paths of its own, and is refused a
    // writable disk it would share (see `instant::launch_args`): clones of
    // one save may start together.
    let _restoring = if options.clone {
        None
    } else {
        let lock = os::VmLock::take_restore(path)?;
        refuse_if_still_held(&args, checked.manifest.as_ref())?;
        Some(lock)
    };
    if let Some(m) = &checked.manifest {
        let missing: Vec<_> = m
            .unreplayable
            .iter()
            .filter(|u| u.is_in(&args))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(Error::NotReplayable {
                verb: "restore",
                items: crate::vm::unreplayable_words(&missing),
            });
        }
        crate::replay::check_backends(&m.backends)?;
    }
    if let Some(m) = &checked.manifest {
        let changes = crate::guard::changes(&m.files);
        if !changes.is_empty() && !options.force {
            return Err(Error::FilesChanged {
                path: path.to_path_buf(),
                changes,
            });
        }
    }
    // -- cross-version restore: the state's machine type, pinned (see machine.rs)
    let (args, pinned) = pin_machine(&checked, &binary, args, &env)?;
    // --
    // The disks: as they were saved, or a checkpoint's fresh overlays.
    refuse_unwritable_overlays(&checked, options.into.as_deref())?;
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
    let qemu = preflight::check(&checked, &binary, probe_args, &env)?;
    // An instant save's RAM images are mapped, not loaded; a clone gets paths of its own.
    let crate::instant::Launch {
        args,
        renamed,
        unread,
        copy,
    } = crate::instant::launch_args(
        &checked,
        disks.args.clone(),
        disks.overlays(),
        qemu,
        options,
        progress,
    )?;

    let backends = match &checked.manifest {
        Some(m) => crate::replay::start_backends(&m.backends)?,
        None => crate::replay::Started::default(),
    };
    // A QEMU half-loaded by a restore that died would hold the VM's
    // sockets and disks with no guest to run: it ends with this process
    // (see `os::keeper`) until handed over below.
    let mut vm = Vm::launch_incoming(&binary, &args, &LaunchOptions::new(options.console, env))?;
    load(&mut vm, &checked, options, progress)?;
    let overlays = disks.keep();
    if was_running && !options.paused {
        if !vm.monitor.status()?.is_running() {
            vm.monitor.cont()?;
        }
    } else if options.paused && vm.monitor.status()?.is_running() {
        vm.monitor.stop()?;
    }
    vm.hand_over();
    backends.keep();
    // The images not read before the start: read now, beside the guest.
    let image_checks =
        crate::instant::check::in_background(&vm, copy.as_deref().unwrap_or(path), unread)?;
    // Launchers find their VM by its -pidfile (QEMU removed it when the
    // saved one quit): it names the restored QEMU now. A clone is another VM.
    if !options.clone {
        let pidfile = crate::argv::last_value(&args, "-pidfile").map(Path::new);
        if let Some(pidfile) = pidfile.filter(|p| p.is_absolute()) {
            let _ = std::fs::write(pidfile, format!("{}\n", vm.pid()));
        }
    }
    Ok(Restored {
        vm,
        manifest: checked.manifest,
        previous_save: checked.previous_save,
        elapsed: started.elapsed(),
        renamed,
        pinned,
        overlays,
        warnings,
        checking_in_background: image_checks,
        copy,
    })
}

/// A checkpoint's fresh overlays go beside its state file unless `--into`
/// says elsewhere: where they cannot be made there (read-only storage), the
/// restore is refused before anything starts, saying what to give.
fn refuse_unwritable_overlays(checked: &Checked, into: Option<&Path>) -> Result<()> {
    let frozen = checked
        .manifest
        .as_ref()
        .and_then(|m| m.checkpoint.as_ref())
        .is_some_and(|r| r.frozen && !r.disks.is_empty());
    if !frozen || into.is_some() {
        return Ok(());
    }
    let dir = match checked.path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match os::not_writable_dir(dir) {
        None => Ok(()),
        Some(e) => Err(Error::BadStateFile {
            path: checked.path.clone(),
            reason: format!(
                "a checkpoint's disks run on fresh overlays, made beside it by default, and {} cannot take them ({}): give them a writable directory with `restore --into DIR`",
                dir.display(),
                crate::error::os_message(&e)
            ),
        }),
    }
}

/// Pins the state's machine type into `args` when `binary` would resolve
/// their alias (or its default) to another version of it.
fn pin_machine(
    checked: &Checked,
    binary: &Path,
    args: Vec<String>,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<(Vec<String>, Option<crate::machine::Pinned>)> {
    let saved = match (&checked.manifest, &checked.summary) {
        // The very QEMU and options that saved it resolve as they did.
        (Some(m), _) if m.qemu == binary && m.args == args => return Ok((args, None)),
        (Some(m), _) => m.machine.clone(),
        (None, Some(s)) => s.machine_type.clone(),
        (None, None) => None,
    };
    let Some(saved) = saved else {
        return Ok((args, None));
    };
    let Some((pinned_args, pinned)) = crate::machine::pin(&args, &saved) else {
        return Ok((args, None));
    };
    // Only a newer QEMU is given the older type; an older one is refused by the preflight.
    let here = crate::machine::resolve(binary, env, &args)?;
    if !here
        .as_deref()
        .is_some_and(|h| crate::machine::is_newer(h, &saved))
    {
        return Ok((args, None));
    }
    Ok((pinned_args, Some(pinned)))
}

/// Refuses a restore while a process still listens on one of the VM's unix
/// sockets or has one of its disks open: the saved QEMU (paused after its
/// save) or another restore. Started beside it, the new QEMU would take
/// over the socket paths, which the old one unlinks when it ends.
/// How long a restore waits for an exiting QEMU to let go of the VM's sockets.
const EXITING_WAIT: Duration = Duration::from_secs(10);

fn refuse_if_still_held(args: &[String], manifest: Option<&Manifest>) -> Result<()> {
    let args = crate::argv::restart_options(args);
    for w in args.windows(2) {
        if let Some(sock) = crate::argv::unix_server_path(&w[0], &w[1]) {
            if let Some(pid) = os::socket_listener(&sock) {
                // A QEMU that was just ended (killed, or told to quit) holds
                // its sockets until its last thread has let go of its RAM.
                if os::is_exiting(pid) {
                    os::wait_gone(pid, EXITING_WAIT);
                    if os::socket_listener(&sock).is_none() {
                        continue;
                    }
                }
                return Err(Error::StillHeld {
                    what: format!("its socket {}", sock.display()),
                    pid,
                    name: os::process_name(pid),
                    leftover: leftover(pid),
                });
            }
        }
    }
    let disks = manifest
        .into_iter()
        .flat_map(|m| &m.files)
        .filter(|f| f.role == crate::guard::Role::Disk);
    for disk in disks {
        if let Some(&pid) = os::file_holders(&disk.path).first() {
            return Err(Error::StillHeld {
                what: format!("its disk {}", disk.path.display()),
                pid,
                name: os::process_name(pid),
                leftover: leftover(pid),
            });
        }
    }
    Ok(())
}

/// Words for process `pid` when it is a QEMU that a run of this tool
/// started to take a VM in (`-incoming`, its QMP socket in one of our
/// private directories) and that no running qemu-migrate feeds: the run died
/// before it had loaded the VM (a kill -9 of a version without the keeper
/// of `os::keeper`, or the keeper killed too). It runs no guest.
fn leftover(pid: u32) -> Option<String> {
    let info = os::process_info(pid).ok()?;
    let at = info.args.iter().position(|a| a == "-incoming")?;
    let ours = info
        .args
        .windows(2)
        .any(|w| w[0] == "-qmp" && w[1].contains("/qemu-migrate-"));
    let parent = os::parent_pid(pid)?;
    if !ours || os::process_name(parent) == "qemu-migrate" {
        return None;
    }
    // A restored VM keeps `-incoming` in its command line: only its
    // monitor tells one still waiting.
    let monitor = info
        .args
        .windows(2)
        .filter(|w| matches!(w[0].as_str(), "-monitor" | "-qmp"))
        .find_map(|w| crate::argv::unix_server_path(&w[0], &w[1]))?;
    let addr = qemu_monitor::MonitorAddr::Path(monitor);
    let options = qemu_monitor::Options {
        timeout: Duration::from_secs(2),
        wait_socket: None,
        mux_escape: crate::vm::is_mux_monitor(&addr),
    };
    let state = qemu_monitor::connect(addr, &options).ok()?.status().ok()?;
    if state != qemu_monitor::RunState::Inmigrate {
        return None;
    }
    Some(format!(
        "a QEMU paused waiting for an incoming migration (-incoming {}) that no qemu-migrate \
         feeds any more: the restore, receive or revert that started it died before the VM was loaded, \
         so it runs no guest and holds the VM's sockets and disks for nothing. End it with \
         `kill {pid}`, then run the restore again",
        info.args.get(at + 1).map_or("", String::as_str)
    ))
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
