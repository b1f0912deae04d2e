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
//!   the TCP port: the first bytes of a connection tell QEMU's stream
//!   (`QEVM`) from a confirm channel, so one port serves both. The source's
//!   `qemu-migrate` opens the confirm channel before the migration (the
//!   receiver answers with its QEMU version: Prepare) and reads the
//!   destination's final state on it after QEMU reports `completed`
//!   (Confirm). A plain `migrate tcp:...` from a QEMU monitor still works
//!   against a receiver; it just gets no confirmation.
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

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::argv;
use crate::control::{Control, MigrationInfo, MigrationStatus};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::progress::Progress;
use crate::save::{lock_vm, UNCAPPED};
use crate::vm::{Console, LaunchOptions, Vm};

/// How often progress is reported (and an HMP-only source is polled).
const PROGRESS_TICK: Duration = Duration::from_millis(100);
/// How long a new connection to the receiver may take to say what it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// QEMU's migration stream starts with these bytes.
const STREAM_MAGIC: &[u8; 4] = b"QEVM";
/// The fd name the receiver hands QEMU the accepted stream under.
const FD_NAME: &str = "qemu-migrate-live";

/// Where the VM goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A new QEMU on this host, same command line, over a private unix socket.
    Local,
    /// A `qemu-migrate receive --listen tcp:HOST:PORT` on another host.
    Tcp { host: String, port: u16 },
}

impl std::str::FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "local" | "unix" => Ok(Destination::Local),
            _ => {
                let (host, port) = parse_tcp(s)?;
                Ok(Destination::Tcp { host, port })
            }
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Local => f.write_str("local"),
            Destination::Tcp { host, port } => write!(f, "{}", tcp_uri(host, *port)),
        }
    }
}

/// `tcp:HOST:PORT` (`tcp:[::1]:PORT` for IPv6) → host and port.
pub fn parse_tcp(s: &str) -> std::result::Result<(String, u16), String> {
    let bad = || format!("{s:?}: expected local, unix or tcp:HOST:PORT");
    let rest = s.strip_prefix("tcp:").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

fn tcp_uri(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("tcp:[{host}]:{port}")
    } else {
        format!("tcp:{host}:{port}")
    }
}

/// What becomes of the source once the destination runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterLive {
    /// End the source QEMU.
    #[default]
    Quit,
    /// Leave it paused (postmigrate), a fallback that must not be resumed
    /// while the destination runs.
    Stop,
}

#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// The longest pause QEMU may take for the final copy; QEMU's default
    /// (300 ms) when unset.
    pub downtime_limit: Option<Duration>,
    /// Bandwidth cap in bytes per second; uncapped by default.
    pub bandwidth: Option<u64>,
    /// Throttle a guest that dirties RAM faster than it can be sent.
    pub auto_converge: bool,
    pub then: AfterLive,
    /// How long the destination may take to confirm after QEMU reports
    /// the migration completed.
    pub confirm_timeout: Duration,
    /// Set (e.g. by a signal handler) to cancel; honoured until the source
    /// reports `completed`.
    pub cancel: Arc<AtomicBool>,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            downtime_limit: None,
            bandwidth: None,
            auto_converge: true,
            then: AfterLive::Quit,
            confirm_timeout: Duration::from_secs(60),
            cancel: Arc::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LiveReport {
    pub destination: Destination,
    /// From the start of the command to the destination's confirmation.
    pub elapsed: Duration,
    /// The source's `query-migrate` at completion: bytes, total time, downtime.
    pub migration: MigrationInfo,
    /// The destination QEMU's pid (on its host).
    pub destination_pid: Option<u32>,
    /// `running`, or `paused` for a guest that was paused on the source.
    pub destination_state: String,
    /// With `--then stop` on one host: where the paused source's sockets now are.
    pub source_sockets: Vec<PathBuf>,
}

/// Migrates `vm` while it runs; see the module docs for the steps.
pub fn live(
    vm: &mut Vm,
    to: &Destination,
    options: &LiveOptions,
    progress: &dyn Progress,
) -> Result<LiveReport> {
    let started = Instant::now();
    let _lock = lock_vm(vm.pid)?;
    let was_running = vm.check_migratable("migrate")?;
    let ram_bytes = vm.control.ram_size()?;

    // Prepare: the destination exists and listens before the source changes.
    let mut local = None;
    let mut confirm = None;
    let mut sockets = SocketHandover::default();
    let uri = match to {
        Destination::Local => {
            if argv::uses_stdio(&vm.args) {
                return Err(Error::NotReady(
                    "the VM uses its terminal (-serial stdio, -nographic or a stdio monitor), \
                     which a second QEMU on this host cannot take over; use `save` and `restore`, \
                     or give the serial port a socket"
                        .into(),
                ));
            }
            sockets = SocketHandover::keep_source(&vm.args, vm.pid)?;
            match start_local(vm) {
                Ok((dest, dir, uri)) => {
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
            let (stream, said) = open_confirm(host, *port)?;
            if let Ok(theirs) = said.qemu.parse::<qemu_monitor::QemuVersion>() {
                if theirs < vm.version {
                    return Err(Error::NotReady(format!(
                        "the destination runs QEMU {theirs}, older than the source's QEMU {}; \
                         QEMU loads only states from its own or older versions",
                        vm.version
                    )));
                }
            }
            confirm = Some(stream);
            tcp_uri(host, *port)
        }
    };

    let old_bandwidth = vm.control.max_bandwidth()?;
    let old_auto_converge = capability(&mut vm.control, "auto-converge");
    let outcome = perform(
        vm,
        &uri,
        local.as_mut().map(|(d, _)| d),
        confirm.as_mut(),
        was_running,
        ram_bytes,
        options,
        progress,
    );

    let (migration, dest_pid, dest_state) = match outcome {
        Ok(done) => done,
        Err(e) => {
            // The destination goes first: a QEMU that exits cleanly would
            // unlink the socket paths that are about to be given back.
            drop(local);
            sockets.back_to_source();
            restore_settings(&mut vm.control, old_bandwidth, old_auto_converge);
            if was_running && !matches!(e, Error::QemuExited { .. }) {
                resume(&mut vm.control);
            }
            return Err(e);
        }
    };

    let mut source_sockets = Vec::new();
    match options.then {
        AfterLive::Quit => {
            sockets.before_source_quits();
            vm.control.quit()?;
            wait_gone(vm.pid, options.confirm_timeout);
            sockets.after_source_quit();
            if let (Some(pidfile), Some(pid)) = (argv::last_value(&vm.args, "-pidfile"), dest_pid) {
                if matches!(to, Destination::Local) {
                    let _ = std::fs::write(pidfile, format!("{pid}\n"));
                }
            }
        }
        AfterLive::Stop => {
            restore_settings(&mut vm.control, old_bandwidth, old_auto_converge);
            source_sockets = sockets.kept_for_source();
        }
    }
    if let Some((dest, _dir)) = local {
        dest.detach();
    }
    Ok(LiveReport {
        destination: to.clone(),
        elapsed: started.elapsed(),
        migration,
        destination_pid: dest_pid,
        destination_state: dest_state,
        source_sockets,
    })
}

/// Starts the local destination, listening on a unix socket in a private directory.
fn start_local(vm: &Vm) -> Result<(Vm, tempfile::TempDir, String)> {
    let dir = tempfile::Builder::new()
        .prefix("qemu-migrate-live-")
        .tempdir()
        .map_err(Error::file(
            std::env::temp_dir(),
            "creating a private directory",
        ))?;
    let mut dest = Vm::launch_incoming(
        &vm.binary,
        &vm.args,
        &LaunchOptions {
            console: Console::Null,
            show_stderr: false,
            env: vm.env.clone(),
        },
    )?;
    let uri = format!("unix:{}", dir.path().join("migrate.sock").display());
    dest.control.migrate_incoming(&uri)?;
    Ok((dest, dir, uri))
}

/// The user's listening unix sockets, kept reachable across a local migration.
#[derive(Debug, Default)]
struct SocketHandover {
    /// (the user's path, the source's socket linked aside, a name for the destination's)
    links: Vec<(PathBuf, PathBuf, PathBuf)>,
}

impl SocketHandover {
    fn keep_source(args: &[String], pid: u32) -> Result<SocketHandover> {
        use std::os::unix::fs::FileTypeExt;
        let mut handover = SocketHandover::default();
        for w in args.windows(2) {
            let Some(path) = argv::unix_server_path(&w[0], &w[1]) else {
                continue;
            };
            let is_socket =
                std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket());
            if !is_socket || handover.links.iter().any(|(p, _, _)| *p == path) {
                continue;
            }
            let source = aside(&path, "source", pid);
            let dest = aside(&path, "destination", pid);
            let _ = std::fs::remove_file(&source);
            if let Err(e) = std::fs::hard_link(&path, &source) {
                handover.back_to_source();
                return Err(Error::file(
                    &path,
                    "keeping the source's socket reachable (a hard link beside it)",
                )(e));
            }
            handover.links.push((path, source, dest));
        }
        Ok(handover)
    }

    /// The source's sockets back at the user's paths.
    fn back_to_source(&mut self) {
        for (path, source, _) in self.links.drain(..) {
            let _ = std::fs::rename(&source, &path);
        }
    }

    /// The destination's sockets (now at the user's paths) survive the
    /// source's cleanup under a second name.
    fn before_source_quits(&self) {
        for (path, _, dest) in &self.links {
            let _ = std::fs::remove_file(dest);
            let _ = std::fs::hard_link(path, dest);
        }
    }

    fn after_source_quit(&mut self) {
        for (path, source, dest) in self.links.drain(..) {
            // When the source did not unlink the path, both names are one
            // socket and rename leaves `dest` as it is.
            let _ = std::fs::rename(&dest, &path);
            let _ = std::fs::remove_file(&dest);
            let _ = std::fs::remove_file(&source);
        }
    }

    fn kept_for_source(&mut self) -> Vec<PathBuf> {
        self.links.drain(..).map(|(_, source, _)| source).collect()
    }
}

fn aside(path: &Path, whose: &str, pid: u32) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".qemu-migrate-{whose}-{pid}"));
    path.with_file_name(name)
}

/// A capability's current state, read through HMP on either monitor.
fn capability(control: &mut Control, name: &str) -> Option<bool> {
    let text = control.hmp("info migrate_capabilities").ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim() == "on")
    })
}

fn restore_settings(control: &mut Control, bandwidth: u64, auto_converge: Option<bool>) {
    let _ = control.set_max_bandwidth(bandwidth);
    if let Some(on) = auto_converge {
        let _ = control.set_capability("auto-converge", on);
    }
}

/// Puts a source that was running back to running, whatever paused it.
fn resume(control: &mut Control) {
    if control.status().is_ok_and(|s| !s.is_running()) {
        let _ = control.cont_after_migration();
    }
}

/// Runs the migration and the Confirm step; returns the source's final
/// `query-migrate`, the destination's pid and run state.
#[allow(clippy::too_many_arguments)]
fn perform(
    vm: &mut Vm,
    uri: &str,
    mut local: Option<&mut Vm>,
    confirm: Option<&mut BufReader<TcpStream>>,
    was_running: bool,
    ram_bytes: u64,
    options: &LiveOptions,
    progress: &dyn Progress,
) -> Result<(MigrationInfo, Option<u32>, String)> {
    let src = &mut vm.control;
    src.set_capability("events", true)?;
    src.set_capability("auto-converge", options.auto_converge)?;
    src.set_max_bandwidth(options.bandwidth.unwrap_or(UNCAPPED))?;
    if let Some(limit) = options.downtime_limit {
        src.set_parameter("downtime-limit", limit.as_millis() as u64)?;
    }
    src.migrate(uri)?;

    let mut dest_done = false;
    let mut dest_gone = None;
    let mut cancelled = false;
    let info = loop {
        // Wait for something to happen: an event from whichever side has
        // QMP, else one progress tick.
        match (&*src, local.as_deref_mut()) {
            (Control::Qmp(_), _) => drop(src.next_event(PROGRESS_TICK)?),
            (_, Some(dest)) if dest_gone.is_none() => {
                match dest.control.next_event(PROGRESS_TICK) {
                    Ok(Some(e)) if e.name == "MIGRATION" && e.data["status"] == "completed" => {
                        dest_done = true
                    }
                    Ok(_) => {}
                    Err(_) => dest_gone = Some(dest.exited("")),
                }
            }
            _ => std::thread::sleep(PROGRESS_TICK),
        }
        if let Some(dest) = local.as_deref_mut() {
            if dest_gone.is_none() {
                if let Some(l) = dest.child.as_mut() {
                    if let Ok(Some(_)) = l.child.try_wait() {
                        dest_gone = Some(dest.exited(""));
                    }
                }
            }
        }
        let info = src.query_migrate()?;
        progress.update(
            "migrating",
            info.transferred,
            Some(ram_bytes.max(info.total)),
        );
        if info.status.is_final() {
            break info;
        }
        if !cancelled && (dest_gone.is_some() || options.cancel.load(Ordering::Relaxed)) {
            cancelled = true;
            src.migrate_cancel()?;
        }
    };

    let keeps = if was_running {
        "the source keeps running"
    } else {
        "the source stays paused"
    };
    let interrupted = || Error::Interrupted(format!("the live migration was cancelled; {keeps}"));
    if options.cancel.load(Ordering::Relaxed) && info.status != MigrationStatus::Completed {
        return Err(interrupted());
    }
    if let Some(gone) = dest_gone {
        return Err(destination_exited(gone, keeps));
    }
    if info.status != MigrationStatus::Completed {
        let why = info
            .error
            .clone()
            .unwrap_or_else(|| format!("QEMU reports status {:?}", info.status));
        // The receiver may know more (QEMU's own words on the destination).
        let theirs = confirm.and_then(|c| read_said(c, Duration::from_secs(2)).ok());
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
        (Some(dest), _) => confirm_local(dest, dest_done, options.confirm_timeout)
            .map_err(|e| destination_exited(e, keeps))?,
        (None, Some(c)) => {
            let said = read_said(c, options.confirm_timeout).map_err(|e| {
                Error::MigrationFailed(format!(
                    "QEMU sent the whole state, but the receiver did not confirm ({e}); the \
                     source is left paused (postmigrate): check the destination, and `cont` \
                     the source only if the destination does not run"
                ))
            })?;
            match said.state {
                State::Running | State::Paused => (said.pid, said.state.name().to_string()),
                _ => {
                    return Err(Error::MigrationFailed(format!(
                        "the destination could not start the guest: {}; {keeps}",
                        said.error.unwrap_or_else(|| said.state.name().to_string())
                    )))
                }
            }
        }
        (None, None) => {
            return Err(Error::Protocol(
                "a live migration with no destination to confirm".into(),
            ))
        }
    };
    let expected = if was_running { "running" } else { "paused" };
    if state != expected {
        return Err(Error::MigrationFailed(format!(
            "the destination guest is {state}, but the source was {expected}; {keeps}"
        )));
    }
    Ok((info, pid, state))
}

fn destination_exited(e: Error, keeps: &str) -> Error {
    let said = match &e {
        Error::QemuExited { stderr, .. } => stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("failed to open module"))
            .collect::<Vec<_>>()
            .join(" / "),
        other => other.to_string(),
    };
    Error::MigrationFailed(if said.is_empty() {
        format!("the destination QEMU exited during the migration; {keeps}")
    } else {
        format!("the destination QEMU exited during the migration; {keeps}; it said: {said}")
    })
}

/// Waits for the local destination to finish loading; returns its pid and state.
fn confirm_local(
    dest: &mut Vm,
    mut done: bool,
    timeout: Duration,
) -> Result<(Option<u32>, String)> {
    let deadline = Instant::now() + timeout;
    while !done {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Protocol(format!(
                "the destination did not finish loading within {timeout:?}"
            )));
        }
        match dest.control.next_event(left) {
            Ok(Some(e)) if e.name == "MIGRATION" => match e.data["status"].as_str() {
                Some("completed") => done = true,
                Some("failed") => return Err(dest.exited("")),
                _ => {}
            },
            Ok(_) => {}
            Err(_) => return Err(dest.exited("")),
        }
    }
    // QEMU starts the guest before it marks the incoming migration completed.
    let state = dest.control.status().map_err(|_| dest.exited(""))?;
    let state = if state.is_running() {
        "running"
    } else {
        "paused"
    };
    Ok((Some(dest.pid), state.to_string()))
}

/// Waits (bounded) for a process that was told to quit to be gone, so that
/// its cleanup of socket paths is over before they are put back.
fn wait_gone(pid: u32, timeout: Duration) {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd >= 0 {
        // SAFETY: the descriptor was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call; it becomes
        // readable when the process has exited.
        unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
        return;
    }
    if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
        return; // ESRCH: already gone.
    }
    // Kernels before 5.3 have no pidfd: watch /proc instead.
    let deadline = Instant::now() + timeout;
    let stat = PathBuf::from(format!("/proc/{pid}/stat"));
    while Instant::now() < deadline {
        let gone = std::fs::read_to_string(&stat)
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if gone {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---- the confirm channel ----------------------------------------------------

/// The first line a confirm client sends.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    #[serde(rename = "qemu-migrate")]
    role: String,
}

/// Where the destination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum State {
    /// Waiting for the stream.
    Listening,
    Running,
    Paused,
    Failed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Listening => "listening",
            State::Running => "running",
            State::Paused => "paused",
            State::Failed => "failed",
        }
    }
}

/// A line from the receiver.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Said {
    state: State,
    #[serde(default)]
    qemu: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn open_confirm(host: &str, port: u16) -> Result<(BufReader<TcpStream>, Said)> {
    let unreachable = |e: std::io::Error| {
        Error::NotReady(format!(
            "no receiver at {}: {e}; start `qemu-migrate receive --listen {}` there first",
            tcp_uri(host, port),
            tcp_uri(host, port)
        ))
    };
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(unreachable)?
        .next()
        .ok_or_else(|| unreachable(std::io::ErrorKind::NotFound.into()))?;
    let mut stream = TcpStream::connect_timeout(&addr, HELLO_TIMEOUT).map_err(unreachable)?;
    let hello = serde_json::to_string(&Hello {
        role: "confirm".into(),
    })
    .expect("hello serialises");
    stream
        .write_all(format!("{hello}\n").as_bytes())
        .map_err(unreachable)?;
    let mut reader = BufReader::new(stream);
    let said = read_said(&mut reader, HELLO_TIMEOUT).map_err(|e| {
        Error::NotReady(format!(
            "{} is not a `qemu-migrate receive` ({e})",
            tcp_uri(host, port)
        ))
    })?;
    if said.state != State::Listening {
        return Err(Error::NotReady(format!(
            "the receiver at {} is not waiting for a migration (it is {})",
            tcp_uri(host, port),
            said.state.name()
        )));
    }
    Ok((reader, said))
}

fn read_said(reader: &mut BufReader<TcpStream>, timeout: Duration) -> std::io::Result<Said> {
    reader.get_ref().set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the receiver closed the connection",
        ));
    }
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

// ---- the receiving side -------------------------------------------------------

/// What to start the destination from.
#[derive(Debug, Clone)]
pub enum VmSpec {
    /// A `qemu-migrate save` manifest (`STATEFILE.manifest.json`).
    Manifest(PathBuf),
    /// QEMU options, exactly as the source runs.
    Args(Vec<String>),
}

#[derive(Debug, Clone, Default)]
pub struct ReceiveOptions {
    /// The QEMU binary; by default the manifest's, else `qemu-system-x86_64`.
    pub qemu: Option<PathBuf>,
    /// Where the VM's console (its `-serial stdio`) goes.
    pub console: Console,
    pub cancel: Arc<AtomicBool>,
}

/// A connection the listener thread accepted, sorted by its first bytes.
#[derive(Debug)]
enum Incoming {
    Stream(TcpStream),
    Confirm(TcpStream),
}

/// A destination QEMU waiting for a migration on a TCP port.
#[derive(Debug)]
pub struct Receiver {
    pub vm: Vm,
    pub listen: String,
    started: Instant,
    incoming: mpsc::Receiver<Incoming>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A received VM: running (or paused, as it was on the source).
#[derive(Debug)]
pub struct Received {
    pub vm: Vm,
    pub state: String,
    pub elapsed: Duration,
}

/// Starts a destination and waits for the migration; see [`Receiver`].
pub fn receive(
    listen: &str,
    spec: &VmSpec,
    options: &ReceiveOptions,
    progress: &dyn Progress,
) -> Result<Received> {
    Receiver::start(listen, spec, options)?.finish(options, progress)
}

impl Receiver {
    /// Starts QEMU with `-incoming defer` and listens on `listen` (`tcp:ADDR:PORT`).
    pub fn start(listen: &str, spec: &VmSpec, options: &ReceiveOptions) -> Result<Receiver> {
        let started = Instant::now();
        let (host, port) =
            parse_tcp(listen).map_err(|e| Error::NotReady(format!("--listen {e}")))?;
        let (binary, args, env) = match spec {
            VmSpec::Manifest(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(Error::file(path, "reading the manifest"))?;
                let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::BadStateFile {
                    path: path.clone(),
                    reason: format!("not a qemu-migrate manifest: {e}"),
                })?;
                (options.qemu.clone().unwrap_or(m.qemu), m.args, m.env)
            }
            VmSpec::Args(args) => (
                options
                    .qemu
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
                args.clone(),
                Default::default(),
            ),
        };
        // Bound before QEMU starts, so a taken port fails before anything runs.
        let listener = TcpListener::bind((host.as_str(), port))
            .map_err(|e| Error::NotReady(format!("cannot listen on {listen}: {e}")))?;
        let vm = Vm::launch_incoming(
            &binary,
            &args,
            &LaunchOptions {
                console: options.console,
                show_stderr: options.console.is_terminal(),
                env,
            },
        )?;
        let (tx, incoming) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let version = vm.version.to_string();
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || accept_loop(listener, tx, &stop, &version))
        };
        Ok(Receiver {
            vm,
            listen: tcp_uri(&host, port),
            started,
            incoming,
            stop,
            thread: Some(thread),
        })
    }

    /// Waits for the stream, hands it to QEMU, waits until QEMU loaded it,
    /// and tells every confirm client the outcome.
    pub fn finish(mut self, options: &ReceiveOptions, progress: &dyn Progress) -> Result<Received> {
        let mut confirms = Vec::new();
        let outcome = self.load(&mut confirms, options, progress);
        let said = match &outcome {
            Ok(state) => Said {
                state: if state == "running" {
                    State::Running
                } else {
                    State::Paused
                },
                qemu: self.vm.version.to_string(),
                pid: Some(self.vm.pid),
                error: None,
            },
            Err(e) => Said {
                state: State::Failed,
                qemu: self.vm.version.to_string(),
                pid: None,
                error: Some(e.to_string()),
            },
        };
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        while let Ok(Incoming::Confirm(c)) = self.incoming.try_recv() {
            confirms.push(c);
        }
        let line = format!("{}\n", serde_json::to_string(&said).expect("serialises"));
        for mut c in confirms {
            let _ = c.write_all(line.as_bytes());
        }
        let state = outcome?;
        Ok(Received {
            elapsed: self.started.elapsed(),
            state,
            vm: self.vm,
        })
    }

    fn load(
        &mut self,
        confirms: &mut Vec<TcpStream>,
        options: &ReceiveOptions,
        progress: &dyn Progress,
    ) -> Result<String> {
        let stream = loop {
            match self.incoming.recv_timeout(PROGRESS_TICK) {
                Ok(Incoming::Stream(s)) => break s,
                Ok(Incoming::Confirm(c)) => confirms.push(c),
                Err(_) => {
                    self.check_alive("while waiting for the migration")?;
                    if options.cancel.load(Ordering::Relaxed) {
                        return Err(Error::Interrupted(
                            "no migration was received; QEMU was stopped".into(),
                        ));
                    }
                }
            }
        };
        stream
            .set_read_timeout(None)
            .map_err(Error::file("socket", "accepting the migration stream"))?;
        self.vm.control.getfd(FD_NAME, stream.as_fd())?;
        drop(stream);
        self.vm.control.migrate_incoming(&format!("fd:{FD_NAME}"))?;
        loop {
            match self.vm.control.next_event(PROGRESS_TICK) {
                Ok(Some(e)) if e.name == "MIGRATION" => match e.data["status"].as_str() {
                    Some("completed") => break,
                    // QEMU prints why on stderr and exits.
                    Some("failed") => return Err(self.vm.exited("while loading the state")),
                    _ => {}
                },
                Ok(_) => {
                    let info = self.vm.control.query_migrate()?;
                    progress.update("receiving", info.transferred, None);
                    while let Ok(Incoming::Confirm(c)) = self.incoming.try_recv() {
                        confirms.push(c);
                    }
                    if options.cancel.load(Ordering::Relaxed) {
                        return Err(Error::Interrupted(
                            "the migration was not received; QEMU was stopped".into(),
                        ));
                    }
                }
                Err(_) => return Err(self.vm.exited("while loading the state")),
            }
        }
        // QEMU starts the guest before it marks the incoming migration completed.
        let state = self.vm.control.status()?;
        Ok(if state.is_running() {
            "running".into()
        } else {
            "paused".into()
        })
    }

    fn check_alive(&mut self, during: &str) -> Result<()> {
        let exited = self
            .vm
            .child
            .as_mut()
            .is_some_and(|l| matches!(l.child.try_wait(), Ok(Some(_))));
        if exited {
            return Err(self.vm.exited(during));
        }
        Ok(())
    }
}

/// Accepts connections until told to stop, sorting QEMU's stream from confirm clients.
fn accept_loop(listener: TcpListener, tx: mpsc::Sender<Incoming>, stop: &AtomicBool, qemu: &str) {
    let listening = Said {
        state: State::Listening,
        qemu: qemu.to_string(),
        pid: None,
        error: None,
    };
    let listening = format!(
        "{}\n",
        serde_json::to_string(&listening).expect("serialises")
    );
    while !stop.load(Ordering::Relaxed) {
        let mut fds = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut fds, 1, PROGRESS_TICK.as_millis() as libc::c_int) };
        if ready <= 0 {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        let incoming = match classify(stream) {
            Some(Incoming::Confirm(mut c)) => {
                // Prepare: the client learns who listens before QEMU sends anything.
                if c.write_all(listening.as_bytes()).is_err() {
                    continue;
                }
                Incoming::Confirm(c)
            }
            Some(stream) => stream,
            None => continue,
        };
        if tx.send(incoming).is_err() {
            return;
        }
    }
}

/// QEMU's stream or a confirm client, by the first bytes; anything else is dropped.
fn classify(stream: TcpStream) -> Option<Incoming> {
    stream.set_read_timeout(Some(HELLO_TIMEOUT)).ok()?;
    let mut head = [0u8; 4];
    let deadline = Instant::now() + HELLO_TIMEOUT;
    loop {
        let n = stream.peek(&mut head).ok()?;
        if n == 0 {
            return None;
        }
        if n == head.len() {
            break;
        }
        if Instant::now() >= deadline {
            return None;
        }
        // The peer sent part of its first write; peek returns at once now.
        std::thread::sleep(Duration::from_millis(1));
    }
    if &head == STREAM_MAGIC {
        return Some(Incoming::Stream(stream));
    }
    // A confirm client's hello line, read byte by byte so nothing after it is lost.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 1024 {
        use std::io::Read;
        match (&stream).read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
    let hello: Hello = serde_json::from_slice(&line).ok()?;
    (hello.role == "confirm").then_some(Incoming::Confirm(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_destinations() {
        assert_eq!("local".parse(), Ok(Destination::Local));
        assert_eq!("unix".parse(), Ok(Destination::Local));
        assert_eq!(
            "tcp:10.77.0.2:4444".parse(),
            Ok(Destination::Tcp {
                host: "10.77.0.2".into(),
                port: 4444
            })
        );
        assert_eq!(
            "tcp:[::1]:4444"
                .parse::<Destination>()
                .map(|d| d.to_string()),
            Ok("tcp:[::1]:4444".to_string())
        );
        assert!("tcp:host".parse::<Destination>().is_err());
        assert!("10.0.0.1:4444".parse::<Destination>().is_err());
    }

    #[test]
    fn confirm_lines_round_trip() {
        let said: Said =
            serde_json::from_str(r#"{"state":"running","qemu":"7.2.22","pid":7}"#).unwrap();
        assert_eq!(said.state, State::Running);
        assert_eq!(said.pid, Some(7));
        let hello = serde_json::to_string(&Hello {
            role: "confirm".into(),
        })
        .unwrap();
        assert!(!hello.as_bytes().starts_with(STREAM_MAGIC));
    }
}
