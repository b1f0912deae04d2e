//! Live migration: the guest keeps running while its RAM is copied to a new
//! QEMU, and the source is stopped only once the destination says the guest
//! runs there (libvirt's Confirm step). Anything that fails before that
//! cancels the migration and leaves the source running.
//!
//! Two destinations:
//!
//! - `Local`: a new QEMU on this host with the same command line, loading
//!   through a private unix socket. Its QMP socket tells when the guest runs.
//! - `Tcp`: a QEMU on another host started by [`receive`]. The receiver owns
//!   the TCP port: the first bytes of a connection tell QEMU's stream (a TLS
//!   handshake, or `QEVM` with `--insecure`) from a confirm channel, so one
//!   port serves both. The source's `qemu-migrate` opens the confirm channel
//!   before the migration (both sides prove they hold the key, then the
//!   receiver answers with its QEMU version: Prepare) and reads the
//!   destination's final state on it after QEMU reports `completed`
//!   (Confirm). A plain `migrate tcp:...` from a QEMU monitor with the right
//!   TLS credentials still works against a receiver; it just gets no
//!   confirmation. How both channels are secured is in [`Security`].
//!
//! **A known QEMU bug** ([`crate::known_bugs`]): QEMU 9.0 and later under
//! TCG abort the source of a running guest whose RAM is several blocks.
//! Such a guest is paused for its migration and resumed on the destination
//! (its downtime is then the whole migration), and the report says why; a
//! receiver on another host cannot be told to resume it, so that is refused
//! in words. Whenever the source dies during the migration, the error names
//! its death: how it ended and its last words on stderr.
//!
//! Unix sockets the VM listens on (the user's `-monitor unix:/tmp/qemu-sock`)
//! are a trap on one host: the destination unlinks the path and binds its
//! own, and the source, when it quits, unlinks the path again (QEMU cleans up
//! its listening sockets at exit), taking the destination's socket with it.
//! Both QEMUs 7.2 and 10.0 do this. A local migration therefore keeps a hard
//! link to each socket while the two coexist and puts the right one back in
//! place afterwards: the destination's on success, the source's on failure.
//!
//! ```no_run
//! use std::time::Duration;
//! use qemu_migrate::{live, progress::Quiet, Vm};
//!
//! let mut vm = Vm::attach("/tmp/qemu-sock", Duration::from_secs(30))?;
//! let report = live::live(&mut vm, &live::Destination::Local, &live::LiveOptions::default(), &Quiet)?;
//! println!("downtime {:?} ms", report.migration.downtime_ms);
//! # Ok::<(), qemu_migrate::Error>(())
//! ```

mod confirm;
mod destination;
mod handover;
mod receive;
mod tls;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qemu_monitor::{migration_event_status, MigrationInfo, MigrationStatus, Monitor, RunState};

use crate::argv;
use crate::error::{Error, Result};
use crate::os::{self, VmLock};
use crate::progress::Progress;
use crate::vm::Vm;
use crate::UNCAPPED;

use confirm::{Channel, Said, State};
pub use destination::{parse_tcp, Destination};
use handover::{ListenerHandover, SocketHandover};
pub use receive::{receive, ReceiveOptions, Received, Receiver, VmSpec};
pub use tls::{one_time_key, Security, INSECURE_WARNING};

/// How often progress is reported (and an HMP-only source is polled).
const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// What becomes of the source once the destination runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AfterLive {
    /// End the source QEMU.
    #[default]
    Quit,
    /// Leave it paused (postmigrate), a fallback that must not be resumed
    /// while the destination runs.
    Stop,
}

impl std::str::FromStr for AfterLive {
    type Err = String;

    /// `quit` or `stop`.
    fn from_str(s: &str) -> std::result::Result<AfterLive, String> {
        match s {
            "quit" => Ok(AfterLive::Quit),
            "stop" => Ok(AfterLive::Stop),
            _ => Err(format!("{s:?}: expected quit or stop")),
        }
    }
}

/// How to migrate.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LiveOptions {
    /// The longest pause QEMU may take for the final copy; QEMU's default
    /// (300 ms) when unset.
    pub downtime_limit: Option<Duration>,
    /// Bandwidth cap in bytes per second; uncapped by default.
    pub bandwidth: Option<u64>,
    /// Throttle a guest that dirties RAM faster than it can be sent.
    pub auto_converge: bool,
    /// What becomes of the source once the destination runs.
    pub then: AfterLive,
    /// How long the destination may take to confirm after QEMU reports
    /// the migration completed.
    pub confirm_timeout: Duration,
    /// How long the migration may run before it is made to end: cancelled
    /// with the source running on, or, with `timeout_suspend`, finished
    /// with the guest paused (as `virsh migrate --timeout`). A guest that
    /// dirties RAM faster than it can be sent never converges by itself.
    pub timeout: Duration,
    /// At the timeout, pause the guest so the migration finishes (the
    /// destination is resumed once it has the guest) instead of cancelling.
    /// Local destinations only.
    pub timeout_suspend: bool,
    /// Set (e.g. by a signal handler) to cancel; honoured until the source
    /// reports `completed`.
    pub cancel: Arc<AtomicBool>,
    /// The local destination's QEMU, when not the source's (a newer one:
    /// the source's machine type is pinned for it).
    pub destination_qemu: Option<PathBuf>,
    /// How a migration over TCP is secured; `None` refuses one. A local
    /// migration goes through a private unix socket and takes none.
    pub security: Option<Security>,
}

/// [`LiveOptions::timeout`] by default: long enough for any guest that
/// converges at all over a local link, short enough that a throttled guest
/// does not crawl for long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            downtime_limit: None,
            bandwidth: None,
            auto_converge: true,
            then: AfterLive::Quit,
            confirm_timeout: Duration::from_secs(60),
            timeout: DEFAULT_TIMEOUT,
            timeout_suspend: false,
            cancel: Arc::default(),
            destination_qemu: None,
            security: None,
        }
    }
}

/// What a finished live migration did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LiveReport {
    /// Where the VM went.
    pub destination: Destination,
    /// From the start of the command to the destination's confirmation.
    pub elapsed: Duration,
    /// The source's `query-migrate` at completion: bytes, total time, downtime.
    pub migration: MigrationInfo,
    /// The destination QEMU's pid (on its host).
    pub destination_pid: Option<u32>,
    /// Running, or paused for a guest that was paused on the source.
    pub destination_state: RunState,
    /// With `--then stop` on one host: where the paused source's sockets now are.
    pub source_sockets: Vec<PathBuf>,
    /// The machine type pinned for a local destination on another QEMU.
    pub pinned: Option<crate::machine::Pinned>,
    /// What the destination could not take over after the fact, in words
    /// (a host port forward whose port another process took meanwhile).
    pub warnings: Vec<String>,
    /// Why the guest was paused while it moved (a known QEMU bug), in words.
    pub paused_for: Option<String>,
}

/// Migrates `vm` while it runs; see the module docs for the steps.
///
/// # Errors
/// Refusals before anything changes; a failed, cancelled or unconfirmed
/// migration after, with the source running again (or, when QEMU sent the
/// whole state but nobody confirmed it, left paused and said so).
pub fn live(
    vm: &mut Vm,
    to: &Destination,
    options: &LiveOptions,
    progress: &dyn Progress,
) -> Result<LiveReport> {
    let started = Instant::now();
    let _lock = VmLock::take(vm.pid())?;
    let was_running = vm.check_migratable("migrate")?;
    vm.check_live_replayable(matches!(to, Destination::Local))?;
    if matches!(to, Destination::Local) && options.security.is_some() {
        return Err(Error::BadAddress {
            given: to.to_string(),
            expected: "tcp:HOST:PORT with --tls-psk, --tls-x509 or --insecure (a local migration \
                       goes through a private unix socket)",
        });
    }
    let creds = match to {
        Destination::Tcp { .. } => Some(tls::Credentials::load(
            options.security.as_ref(),
            tls::Endpoint::Client,
        )?),
        Destination::Local => None,
    };
    if options.timeout_suspend && !matches!(to, Destination::Local) {
        return Err(Error::BadAddress {
            given: to.to_string(),
            expected: "local with --timeout-suspend (a receiver on another host cannot be told to resume the guest)",
        });
    }
    let ram_bytes = vm.monitor.ram_size()?;
    // -- a known QEMU bug: a running guest with several RAM blocks moves paused
    let paused_for = if was_running {
        crate::known_bugs::dirty_sync_abort(vm)?
    } else {
        None
    };
    if let (Some(why), Destination::Tcp { .. }) = (&paused_for, to) {
        return Err(Error::KnownQemuBug(format!(
            "{why}; a receiver on another host cannot be told to resume a guest paused for its \
             migration: pause it yourself (`stop`), migrate it, and `cont` it on the destination"
        )));
    }
    if let Some(why) = &paused_for {
        progress.note(&format!(
            "the guest is paused while it moves, and resumed on the destination: {why}"
        ));
    }
    // --
    // Its stderr, when that is a file: its last words if it dies.
    let source_stderr = os::StderrTap::of(vm.pid());

    // Prepare: the destination exists and listens before the source changes.
    let mut local = None;
    let mut confirm = None;
    let mut pinned = None;
    let mut sockets = SocketHandover::default();
    let mut forwards = Vec::new();
    let mut warnings = Vec::new();
    let uri = match to {
        Destination::Local => {
            let mut passed = handover::console(vm)?;
            // -- cross-version: another QEMU for the destination, machine type pinned
            let (dest_qemu, dest_args, p) =
                destination::local_qemu(vm, options.destination_qemu.as_deref())?;
            pinned = p;
            // --
            let mut listeners = ListenerHandover::prepare(&dest_args, vm.pid())?;
            passed.append(&mut listeners.fds);
            // Host forwards listen on ports the source holds: the
            // destination gets them once the source is gone.
            let (dest_args, held) = argv::without_host_forwards(&listeners.args);
            forwards = held;
            sockets = SocketHandover::keep_source(vm.args(), vm.pid())?;
            match destination::start_local(vm, &dest_qemu, &dest_args, passed) {
                Ok((mut dest, dir, uri)) => {
                    sockets.source_answers();
                    if let Some(fd) = listeners.vnc.take() {
                        // Both servers accept on the one socket until the source quits.
                        use std::os::fd::AsFd;
                        if let Err(e) = dest
                            .monitor
                            .vnc_listen_on_fd("qemu-migrate-vnc", fd.as_fd())
                        {
                            drop(dest);
                            sockets.back_to_source();
                            return Err(e.into());
                        }
                    }
                    // The VNC server left its private socket: the directory may go.
                    drop(listeners);
                    local = Some((dest, dir));
                    uri
                }
                Err(e) => {
                    sockets.back_to_source();
                    return Err(e);
                }
            }
        }
        Destination::Tcp { host, port } => {
            let creds = creds.as_ref().expect("loaded for TCP");
            let (stream, said) = confirm::open_confirm(host, *port, creds)?;
            if let Ok(theirs) = said.qemu.parse::<qemu_monitor::QemuVersion>() {
                if theirs < vm.version() {
                    return Err(Error::OlderDestination {
                        destination: theirs,
                        source_version: vm.version(),
                    });
                }
            }
            // -- cross-version: the receiver must run the very machine type
            if let (Some(theirs), Some(ours)) = (
                said.machine.as_deref(),
                crate::machine::resolve(vm.binary(), vm.env(), vm.args())?,
            ) {
                if theirs != ours {
                    return Err(Error::DestinationMachine {
                        destination: theirs.to_string(),
                        source_machine: ours,
                    });
                }
            }
            // --
            confirm = Some(stream);
            to.to_string()
        }
    };

    // QEMU's TLS, set on the source only now that the receiver proved itself.
    let tls_on = creds.as_ref().is_some_and(tls::Credentials::is_tls);
    let _installed = match &creds {
        Some(c) => {
            let pid = vm.pid();
            c.install(&mut vm.monitor, tls::Endpoint::Client, pid)?
        }
        None => None,
    };
    let old_bandwidth = match vm.monitor.migration_parameter("max-bandwidth") {
        Ok(b) => b,
        Err(e) => {
            if tls_on {
                tls::remove(&mut vm.monitor);
            }
            return Err(e.into());
        }
    };
    let old_auto_converge = vm.monitor.capability("auto-converge").ok().flatten();
    // From here on, if this process dies, the watchdog puts the VM back.
    let mut watchdog = {
        let undo = Undo {
            source: vm.monitor.addr().clone(),
            source_pid: vm.pid(),
            sockets: sockets.clone(),
            destination_pid: local.as_ref().map(|(d, _)| d.pid()),
            was_running,
            bandwidth: old_bandwidth,
            auto_converge: old_auto_converge,
            then: options.then,
            wait: options.confirm_timeout,
            tls: tls_on,
        };
        match os::Watchdog::spawn(move |last| undo.run(last == Some(CONFIRMED))) {
            Ok(w) => w,
            Err(e) => {
                drop(local);
                sockets.back_to_source();
                if tls_on {
                    tls::remove(&mut vm.monitor);
                }
                return Err(e);
            }
        }
    };
    let outcome = perform(
        vm,
        &uri,
        local.as_mut().map(|(d, _)| d),
        confirm.as_mut(),
        was_running,
        paused_for.is_some(),
        ram_bytes,
        options,
        progress,
    );
    let outcome = outcome.map_err(|e| source_died(vm, &e, source_stderr.as_ref()).unwrap_or(e));

    let (migration, dest_pid, dest_state) = match outcome {
        Ok(done) => done,
        Err(e) => {
            // The destination goes first: a QEMU that exits cleanly would
            // unlink the socket paths that are about to be given back.
            drop(local);
            sockets.back_to_source();
            restore_settings(&mut vm.monitor, old_bandwidth, old_auto_converge);
            if tls_on {
                tls::remove(&mut vm.monitor);
            }
            if was_running && !matches!(e, Error::QemuExited { .. } | Error::SourceDied { .. }) {
                vm.resume_quietly();
            }
            return Err(e);
        }
    };

    // The destination has the guest: from here on it outlives this process
    // (before, the watchdog ends it and the source runs on).
    if let Some((dest, _)) = local.as_mut() {
        dest.hand_over();
    }
    sockets.destination_answers();
    watchdog.step(CONFIRMED);
    let mut source_sockets = Vec::new();
    match options.then {
        AfterLive::Quit => {
            sockets.before_source_quits();
            vm.quit_and_wait(options.confirm_timeout)?;
            sockets.after_source_quit();
            if let Some((dest, _)) = local.as_mut() {
                warnings.extend(add_host_forwards(dest, &forwards));
            }
            if let (Some(pidfile), Some(pid)) = (argv::last_value(vm.args(), "-pidfile"), dest_pid)
            {
                if matches!(to, Destination::Local) {
                    let _ = std::fs::write(pidfile, format!("{pid}\n"));
                }
            }
        }
        AfterLive::Stop => {
            restore_settings(&mut vm.monitor, old_bandwidth, old_auto_converge);
            if tls_on {
                tls::remove(&mut vm.monitor);
            }
            source_sockets = sockets.kept_for_source();
            warnings.extend(forwards.iter().map(|f| {
                format!(
                    "the paused source keeps host port forward {} of {}: the destination has \
                     none until it is added there (hostfwd_add {} {})",
                    f.rule, f.netdev, f.netdev, f.rule
                )
            }));
        }
    }
    if let Some((dest, _dir)) = local {
        let _ = dest.detach();
    }
    watchdog.dismiss();
    Ok(LiveReport {
        destination: to.clone(),
        elapsed: started.elapsed(),
        migration,
        destination_pid: dest_pid,
        destination_state: dest_state,
        source_sockets,
        pinned,
        warnings,
        paused_for,
    })
}

/// When the source QEMU has died (the monitor broke because its process
/// ended) and `e` is what that looked like: an error that names its death.
/// `None` while it lives.
fn source_died(vm: &mut Vm, e: &Error, stderr: Option<&os::StderrTap>) -> Option<Error> {
    let pid = vm.pid();
    let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    if alive(pid) && !os::is_exiting(pid) {
        if !matches!(e, Error::Monitor(_)) {
            return None;
        }
        // A monitor that just broke: the process may be on its way out.
        os::wait_gone(pid, Duration::from_millis(500));
        if alive(pid) && !os::is_exiting(pid) {
            return None;
        }
    }
    let (how, said) = match vm.launched() {
        Some(l) => match l.wait() {
            Ok((status, said)) => (os::status_words(status), said),
            Err(_) => (
                "its exit status could not be read".to_string(),
                String::new(),
            ),
        },
        None => (
            os::zombie_status(pid).unwrap_or_else(|| {
                "its exit status went to the process that started it".to_string()
            }),
            stderr.map(os::StderrTap::written).unwrap_or_default(),
        ),
    };
    let lines = crate::qemu_stderr_lines(&said);
    let last = lines[lines.len().saturating_sub(5)..].join("\n");
    Some(Error::SourceDied {
        pid,
        during: "during the live migration".to_string(),
        how,
        stderr: last,
    })
}

/// Adds the source's host forwards to the destination once the source let
/// go of their ports; says which could not be (the guest runs on without).
fn add_host_forwards(dest: &mut Vm, forwards: &[argv::HostForward]) -> Vec<String> {
    forwards
        .iter()
        .filter_map(|f| {
            let said = dest
                .monitor
                .human_command(&format!("hostfwd_add {} {}", f.netdev, f.rule));
            match said {
                Ok(text) if text.trim().is_empty() => None,
                Ok(text) => Some(format!(
                    "host port forward {} of {}: {}",
                    f.rule,
                    f.netdev,
                    text.trim()
                )),
                Err(e) => Some(format!("host port forward {} of {}: {e}", f.rule, f.netdev)),
            }
        })
        .collect()
}

/// The watchdog's step once the destination confirmed it has the guest.
const CONFIRMED: u8 = b'C';

/// What the watchdog of a live migration needs to put things right if the
/// migrating process dies (kill -9 included).
struct Undo {
    source: qemu_monitor::MonitorAddr,
    source_pid: u32,
    sockets: SocketHandover,
    destination_pid: Option<u32>,
    was_running: bool,
    bandwidth: u64,
    auto_converge: Option<bool>,
    then: AfterLive,
    wait: Duration,
    /// Whether TLS credentials were set on the source, to take out again.
    tls: bool,
}

impl Undo {
    /// Before the destination confirmed: the local destination is killed,
    /// the source gets its sockets back, the migration is cancelled, its
    /// settings put back and the guest resumed. After: the source is ended
    /// (or left paused) and the sockets go to the destination, as `then` asked.
    fn run(mut self, confirmed: bool) {
        let options = qemu_monitor::Options {
            timeout: Duration::from_secs(10),
            wait_socket: Some(Duration::from_secs(5)),
            mux_escape: crate::vm::is_mux_monitor(&self.source),
        };
        let source_addr = |sockets: &SocketHandover, addr: &qemu_monitor::MonitorAddr| match addr {
            qemu_monitor::MonitorAddr::Path(p) => {
                qemu_monitor::MonitorAddr::Path(sockets.source_path(p))
            }
            other => other.clone(),
        };
        if !confirmed {
            if let Some(pid) = self.destination_pid {
                os::kill(pid);
                os::wait_gone(pid, Duration::from_secs(5));
            }
            self.sockets.back_to_source();
            let Ok(mut src) = qemu_monitor::connect(self.source.clone(), &options) else {
                os::write_stderr("qemu-migrate: the migrating process died; the source's monitor could not be reached\n");
                return;
            };
            if src
                .migration()
                .is_ok_and(|m| !m.status.is_final() && m.status != MigrationStatus::None)
            {
                let _ = src.migrate_cancel();
                let _ = src.wait_migration(Instant::now() + Duration::from_secs(10), |_| {});
            }
            restore_settings(&mut src, self.bandwidth, self.auto_converge);
            if self.tls {
                tls::remove(&mut src);
            }
            if self.was_running && src.status().is_ok_and(|s| !s.is_running()) {
                let _ = src.cont_after_migration();
            }
            os::write_stderr(
                "qemu-migrate: the migrating process died before the destination confirmed: the \
                 migration was cancelled, the source has its sockets back and runs as before\n",
            );
            return;
        }
        self.sockets.destination_answers();
        let addr = source_addr(&self.sockets, &self.source);
        let Ok(mut src) = qemu_monitor::connect(addr, &options) else {
            return;
        };
        match self.then {
            AfterLive::Quit => {
                self.sockets.before_source_quits();
                let _ = src.quit();
                os::wait_gone(self.source_pid, self.wait);
                self.sockets.after_source_quit();
            }
            AfterLive::Stop => {
                restore_settings(&mut src, self.bandwidth, self.auto_converge);
                if self.tls {
                    tls::remove(&mut src);
                }
            }
        }
        os::write_stderr(
            "qemu-migrate: the migrating process died after the destination confirmed: the \
             guest runs there, and the source was handled as --then asked\n",
        );
    }
}

/// Puts back the settings a live migration changed on the source.
fn restore_settings(monitor: &mut Monitor, bandwidth: u64, auto_converge: Option<bool>) {
    let _ = monitor.set_migration_parameter("max-bandwidth", bandwidth);
    if let Some(on) = auto_converge {
        let _ = monitor.set_capability("auto-converge", on);
    }
}

/// Runs the migration and the Confirm step; returns the source's final
/// `query-migrate`, the destination's pid and run state.
#[allow(clippy::too_many_arguments)]
fn perform(
    vm: &mut Vm,
    uri: &str,
    mut local: Option<&mut Vm>,
    confirm: Option<&mut Channel>,
    was_running: bool,
    pause_first: bool,
    ram_bytes: u64,
    options: &LiveOptions,
    progress: &dyn Progress,
) -> Result<(MigrationInfo, Option<u32>, RunState)> {
    let src = &mut vm.monitor;
    src.set_capability("events", true)?;
    src.set_capability("auto-converge", options.auto_converge)?;
    src.set_migration_parameter("max-bandwidth", options.bandwidth.unwrap_or(UNCAPPED))?;
    if let Some(limit) = options.downtime_limit {
        let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        src.set_migration_parameter("downtime-limit", ms)?;
    }
    if pause_first {
        // Paused, it moves as a whole and is resumed on the destination,
        // as at a --timeout-suspend.
        src.stop()?;
    }
    src.migrate(uri)?;
    let deadline = Instant::now() + options.timeout;

    let mut dest_done = false;
    let mut dest_gone = None;
    let mut cancelled = false;
    let mut timed_out = None;
    let mut suspended = pause_first;
    let mut receiver_gone = false;
    let info = loop {
        // Wait for something to happen: an event from whichever side has
        // QMP, else one progress tick.
        match local.as_deref_mut() {
            _ if src.has_events() => drop(src.next_event(PROGRESS_TICK)?),
            Some(dest) if dest_gone.is_none() => match dest.monitor.next_event(PROGRESS_TICK) {
                Ok(Some(e)) if migration_event_status(&e) == Some(MigrationStatus::Completed) => {
                    dest_done = true
                }
                Ok(_) => {}
                Err(_) => dest_gone = Some(dest.exited("")),
            },
            _ => std::thread::sleep(PROGRESS_TICK),
        }
        if let Some(dest) = local.as_deref_mut() {
            if dest_gone.is_none() && dest.child.as_mut().is_some_and(|l| l.has_exited()) {
                dest_gone = Some(dest.exited(""));
            }
        }
        let info = src.migration()?;
        progress.update(
            "migrating",
            info.transferred,
            Some(ram_bytes.max(info.total)),
        );
        if info.status.is_final() {
            break info;
        }
        if !cancelled && !suspended && Instant::now() >= deadline {
            if options.timeout_suspend {
                // Nothing dirties RAM any more: the rest is sent and QEMU
                // completes; the destination comes up paused and is resumed.
                src.stop()?;
                suspended = true;
            } else {
                timed_out = Some(info.clone());
                cancelled = true;
                src.migrate_cancel()?;
            }
        }
        if !receiver_gone && confirm.as_ref().is_some_and(|c| peer_closed(c.stream())) {
            // The receiving qemu-migrate is gone: nobody would confirm or
            // run the guest there.
            receiver_gone = true;
        }
        if !cancelled
            && (dest_gone.is_some() || receiver_gone || options.cancel.load(Ordering::Relaxed))
        {
            cancelled = true;
            src.migrate_cancel()?;
        }
    };

    let keeps = if was_running {
        "the source keeps running"
    } else {
        "the source stays paused"
    };
    let interrupted = || Error::Cancelled(format!("the live migration was cancelled; {keeps}"));
    if options.cancel.load(Ordering::Relaxed) && info.status != MigrationStatus::Completed {
        return Err(interrupted());
    }
    // Its QEMU may have gone with it and failed the migration first.
    receiver_gone = receiver_gone
        || (info.status != MigrationStatus::Completed
            && confirm.as_ref().is_some_and(|c| peer_closed(c.stream())));
    if receiver_gone && info.status != MigrationStatus::Completed {
        return Err(Error::MigrationFailed(format!(
            "the receiving qemu-migrate went away during the migration, so it was cancelled; {keeps}"
        )));
    }
    if let Some(at) = timed_out.filter(|_| info.status != MigrationStatus::Completed) {
        return Err(Error::MigrationFailed(format!(
            "it did not converge within {:?} ({} MiB sent, {} MiB still to send), so it was \
             cancelled; {keeps}; give a longer --timeout, a higher --bandwidth, or \
             --timeout-suspend to pause the guest so that it finishes",
            options.timeout,
            at.transferred >> 20,
            at.remaining >> 20
        )));
    }
    // A destination that exits after our cancel only says the stream was cut.
    if let Some(gone) = dest_gone {
        return Err(destination_exited(gone, keeps));
    }
    if info.status != MigrationStatus::Completed {
        let why = info
            .error
            .clone()
            .unwrap_or_else(|| format!("QEMU reports status {:?}", info.status));
        // The receiver may know more (QEMU's own words on the destination).
        let theirs = confirm.and_then(|c| c.read_said(Duration::from_secs(2)).ok());
        return Err(Error::MigrationFailed(match theirs {
            Some(Said {
                state: State::Failed,
                error: Some(e),
                ..
            }) => format!("{why}; the destination said: {e}; {keeps}"),
            _ => format!("{why}; {keeps}"),
        }));
    }
    progress.update(
        "migrating",
        info.transferred,
        Some(ram_bytes.max(info.total)),
    );

    // Confirm: the source stays paused (postmigrate) until the destination
    // says the guest is where the source left it.
    let (pid, state) = match (local, confirm) {
        (Some(dest), _) => {
            let (pid, state) = confirm_local(dest, dest_done, options.confirm_timeout)
                .map_err(|e| destination_exited(e, keeps))?;
            if suspended && was_running && !state.is_running() {
                // Paused at the timeout to finish: it runs on where it now is.
                dest.monitor.cont()?;
                (pid, RunState::Running)
            } else {
                (pid, state)
            }
        }
        (None, Some(c)) => {
            let said = c.read_said(options.confirm_timeout).map_err(|e| {
                Error::MigrationFailed(format!(
                    "QEMU sent the whole state, but the receiver did not confirm ({e}); the \
                     source is left paused (postmigrate): check the destination, and `cont` \
                     the source only if the destination does not run"
                ))
            })?;
            match said.state {
                State::Running => (said.pid, RunState::Running),
                State::Paused => (said.pid, RunState::Paused),
                _ => {
                    return Err(Error::MigrationFailed(format!(
                        "the destination could not start the guest: {}; {keeps}",
                        said.error.unwrap_or_else(|| said.state.name().to_string())
                    )))
                }
            }
        }
        (None, None) => unreachable!("a live migration always has a destination to confirm"),
    };
    if state.is_running() != was_running {
        let expected = if was_running { "running" } else { "paused" };
        return Err(Error::MigrationFailed(format!(
            "the destination guest is {state}, but the source was {expected}; {keeps}"
        )));
    }
    Ok((info, pid, state))
}

/// Whether the other end of `stream` has closed it (a receiver that died):
/// readable, and a peek finds the end rather than data.
fn peer_closed(stream: &std::net::TcpStream) -> bool {
    if !os::readable(stream, Duration::ZERO) {
        return false;
    }
    let _ = stream.set_nonblocking(true);
    let closed = match stream.peek(&mut [0u8; 1]) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    closed
}

fn destination_exited(e: Error, keeps: &str) -> Error {
    let said = match &e {
        Error::QemuExited { stderr, .. } => crate::qemu_stderr_lines(stderr).join(" / "),
        other => other.to_string(),
    };
    Error::MigrationFailed(if said.is_empty() {
        format!("the destination QEMU exited during the migration; {keeps}")
    } else {
        format!("the destination QEMU exited during the migration; {keeps}; it said: {said}")
    })
}

/// Waits for the local destination to finish loading; returns its pid and state.
fn confirm_local(dest: &mut Vm, done: bool, timeout: Duration) -> Result<(Option<u32>, RunState)> {
    let deadline = Instant::now() + timeout;
    if !done {
        dest.wait_loaded(PROGRESS_TICK, |_| {
            if Instant::now() >= deadline {
                return Err(Error::MigrationFailed(format!(
                    "the destination did not finish loading within {timeout:?}"
                )));
            }
            Ok(())
        })
        .map_err(|e| match e {
            Error::QemuExited { stderr, .. } => Error::QemuExited {
                during: String::new(),
                stderr,
            },
            e => e,
        })?;
    }
    // QEMU starts the guest before it marks the incoming migration completed.
    let state = dest.monitor.status().map_err(|_| dest.exited(""))?;
    let state = if state.is_running() {
        RunState::Running
    } else {
        RunState::Paused
    };
    Ok((Some(dest.pid()), state))
}
