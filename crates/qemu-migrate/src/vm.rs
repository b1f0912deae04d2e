//! A QEMU to work on: attached to by its monitor socket, or launched here.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qemu_monitor::{MigrationStatus, Monitor, MonitorAddr, Options, QemuVersion, RunState};

use crate::error::{Error, Result};
use crate::os;

/// How long QEMU may take to connect to and greet its monitor.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A VM and the monitor session that drives it.
#[derive(Debug)]
pub struct Vm {
    pub(crate) monitor: Monitor,
    pid: u32,
    binary: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    version: QemuVersion,
    pub(crate) child: Option<Launched>,
    /// What of the command line a second QEMU can have (attached VMs only).
    pub(crate) replay: crate::replay::Plan,
    /// SHA-256 of the binary it runs, begun when attached (see [`Vm::binary_sha256`]).
    exe_sha256: Mutex<ExeDigest>,
}

/// The digest of a QEMU's binary: being read in the background, or read.
#[derive(Debug)]
enum ExeDigest {
    Reading(std::thread::JoinHandle<Option<String>>),
    Read(Option<String>),
    /// Of `/proc/PID/exe`, when asked.
    NotBegun,
    /// Of the binary a launched QEMU was started as (a launcher script
    /// that execs QEMU is the file a restore runs again), when asked.
    OfFile(PathBuf),
}

/// Whether the monitor at `addr` shares a mux chardev with a console (see
/// [`qemu_monitor::Options::mux_escape`]): the command line of the QEMU
/// listening there says so.
pub(crate) fn is_mux_monitor(addr: &MonitorAddr) -> bool {
    // Read from the kernel's tables: a probing connection would be a
    // client of its own to a monitor that serves one at a time.
    let inodes: Vec<u64> = match addr {
        MonitorAddr::Path(path) => {
            let name = path.to_string_lossy();
            os::unix_sockets()
                .into_iter()
                .filter(|s| s.listening && s.name == name)
                .map(|s| s.inode)
                .collect()
        }
        MonitorAddr::Abstract(n) => os::unix_sockets()
            .into_iter()
            .filter(|s| s.listening && s.name.strip_prefix('@') == Some(n.as_str()))
            .map(|s| s.inode)
            .collect(),
        MonitorAddr::Tcp { port, .. } => os::tcp_listeners()
            .into_iter()
            .filter(|(_, a)| a.port() == *port)
            .map(|(i, _)| i)
            .collect(),
    };
    if inodes.is_empty() {
        return false;
    }
    let pid = os::socket_holders(&inodes, std::process::id())
        .into_iter()
        .next();
    let Some(args) = pid.and_then(|p| os::process_info(p).ok()).map(|i| i.args) else {
        return false;
    };
    crate::argv::is_mux_socket(&args, addr)
}

/// A QEMU this process started: its handle, private socket directory and
/// stderr. It is killed when dropped, unless the [`Vm`] was detached.
#[derive(Debug)]
pub struct Launched {
    child: Child,
    _dir: os::RunDir,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_thread: Option<std::thread::JoinHandle<()>>,
    kill_on_drop: bool,
}

impl Launched {
    /// What QEMU printed on stderr so far (it is also passed through when in the foreground).
    #[must_use]
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned()
    }

    /// Whether QEMU has exited, without waiting.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// QEMU's stdout, with [`Console::Pipe`]: the guest's serial console.
    /// Taken once.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Waits for QEMU to exit; returns its status and everything it printed on stderr.
    ///
    /// # Errors
    /// When waiting for the process fails.
    pub fn wait(&mut self) -> std::io::Result<(ExitStatus, String)> {
        let status = self.child.wait()?;
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        Ok((status, self.stderr()))
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        // A launched QEMU outlives this handle only when asked to (`detach`).
        if self.kill_on_drop {
            let _ = self.child.kill();
            // Let go while it cannot be reaped yet: its pid is still its own.
            os::keeper::release(self.child.id());
            let _ = self.child.wait();
        }
    }
}

/// Where a launched QEMU's stdin and stdout go: what a guest with
/// `-serial stdio` reads and prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Console {
    /// This process's own (a restore in the foreground).
    Terminal,
    /// Nowhere (in the background).
    #[default]
    Null,
    /// A pipe the caller reads from the launched child's stdout.
    Pipe,
}

impl Console {
    /// Whether the console is this process's terminal.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        self == Console::Terminal
    }
}

/// How to start a QEMU.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct LaunchOptions {
    /// Where its stdin and stdout go.
    pub console: Console,
    /// Pass QEMU's stderr through to ours as well as keeping it.
    pub show_stderr: bool,
    /// Environment variables to set (`QEMU_*` module and firmware paths).
    pub env: BTreeMap<String, String>,
    /// Descriptors QEMU gets at the numbers beside them, as a launcher
    /// passes them (0 and 1 stand for its stdin and stdout, in place of
    /// what `console` says).
    pub passed: Vec<(Arc<std::os::fd::OwnedFd>, i32)>,
}

impl LaunchOptions {
    /// A QEMU whose console goes to `console`, its stderr passed through
    /// when that is the terminal.
    #[must_use]
    pub fn new(console: Console, env: BTreeMap<String, String>) -> LaunchOptions {
        LaunchOptions {
            console,
            show_stderr: console.is_terminal(),
            env,
            passed: Vec::new(),
        }
    }
}

/// QEMU serves one monitor client at a time: a second save would wait in
/// silence for the first to let the monitor go. When another qemu-migrate
/// holds the lock of the VM behind `addr`, say so at once instead.
fn refuse_if_busy(addr: &MonitorAddr) -> Result<()> {
    let MonitorAddr::Path(path) = addr else {
        return Ok(());
    };
    let held = os::held_vms();
    if held.is_empty() {
        return Ok(());
    }
    match held.iter().find(|pid| os::listens_on(**pid, path)) {
        Some(&pid) => Err(Error::Busy {
            pid,
            migration: None,
        }),
        None => Ok(()),
    }
}

impl Vm {
    /// The monitor session: typed commands in QEMU's words.
    pub fn monitor(&mut self) -> &mut Monitor {
        &mut self.monitor
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The QEMU binary (`/proc/PID/exe` for an attached VM).
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// SHA-256 of the binary [`Vm::binary`] names, 64 hex digits: for an
    /// attached VM, of the very file it runs (`/proc/PID/exe`, read in the
    /// background from the attach on); for a QEMU started here, of the file
    /// it was started as, read when first asked. `None` when it cannot be read.
    pub fn binary_sha256(&self) -> Option<String> {
        let mut d = self.exe_sha256.lock().expect("digest lock");
        let read = match std::mem::replace(&mut *d, ExeDigest::NotBegun) {
            ExeDigest::Reading(t) => t.join().ok().flatten(),
            ExeDigest::Read(r) => r,
            ExeDigest::NotBegun => crate::trust::exe_sha256(self.pid),
            ExeDigest::OfFile(path) => crate::trust::binary_sha256(&path),
        };
        *d = ExeDigest::Read(read.clone());
        read
    }

    /// The command line without argv[0].
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// `QEMU_*` variables of its environment.
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    /// QEMU's version.
    pub fn version(&self) -> QemuVersion {
        self.version
    }

    /// The QEMU this process started, if it did.
    pub fn launched(&mut self) -> Option<&mut Launched> {
        self.child.as_mut()
    }

    /// Attaches to a running QEMU by its monitor socket (HMP or QMP).
    ///
    /// # Errors
    /// When the socket cannot be reached, is not a QEMU monitor, or the
    /// process behind it cannot be read.
    pub fn attach(monitor: impl Into<MonitorAddr>, timeout: Duration) -> Result<Vm> {
        let monitor = monitor.into();
        refuse_if_busy(&monitor)?;
        let options = Options {
            timeout,
            wait_socket: None,
            mux_escape: is_mux_monitor(&monitor),
        };
        let mut monitor = qemu_monitor::connect(monitor, &options)?;
        let pid = match monitor.tcp_addrs() {
            // TCP has no peer credentials: the connection's other end is
            // found in the kernel's tables, which only show this host.
            Some((local, peer)) => {
                os::tcp_peer_process(local, peer).ok_or_else(|| Error::NotLocal {
                    addr: monitor.addr().to_string(),
                })?
            }
            None => monitor.peer_pid()?,
        };
        let info = os::process_info(pid)?;
        let version = monitor.version()?;
        // A VM restored from an instant save is still the user's VM.
        let args = crate::instant::without_image_options(info.args);
        // Descriptors become the names a second QEMU can open.
        let replay = crate::replay::plan(pid, &args);
        // Read while the save runs, from the file QEMU runs (its binary may
        // have been replaced on disk since it started).
        let exe_sha256 = std::thread::Builder::new()
            .name("qemu-digest".into())
            .spawn(move || crate::trust::exe_sha256(pid))
            .map_or(ExeDigest::NotBegun, ExeDigest::Reading);
        Ok(Vm {
            monitor,
            pid,
            binary: info.binary,
            args: replay.args.clone(),
            env: info.env,
            version,
            child: None,
            replay,
            exe_sha256: Mutex::new(exe_sha256),
        })
    }

    /// Starts `binary args...` with a private QMP socket added, and connects to it.
    ///
    /// # Errors
    /// When QEMU cannot be started, or exits before its monitor answers
    /// (with what it said on stderr).
    pub fn launch(binary: &Path, args: &[String], options: &LaunchOptions) -> Result<Vm> {
        let dir = os::RunDir::new("qmp-")?;
        // QEMU connects to this socket while it starts (see QmpListener):
        // no connect of ours races its start-up.
        let qmp = qemu_monitor::QmpListener::bind(dir.path().join("qmp.sock"))?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .arg("-qmp")
            .arg(qmp.qemu_arg())
            .envs(&options.env)
            .stderr(Stdio::piped());
        match options.console {
            Console::Terminal => {}
            Console::Null => {
                cmd.stdin(Stdio::null()).stdout(Stdio::null());
            }
            Console::Pipe => {
                cmd.stdin(Stdio::null()).stdout(Stdio::piped());
            }
        }
        let mut passed = Vec::new();
        for (fd, number) in &options.passed {
            let copy = fd
                .try_clone()
                .map_err(Error::os("passing a descriptor to QEMU"))?;
            match number {
                0 => {
                    cmd.stdin(copy);
                }
                1 => {
                    cmd.stdout(copy);
                }
                n => passed.push((copy, *n)),
            }
        }
        os::pass_fds(&mut cmd, passed);
        // Until handed over, it ends with this process, from before its exec on.
        os::keeper::end_with_us(&mut cmd)?;
        let mut child = cmd.spawn().map_err(|source| Error::Launch {
            binary: binary.to_path_buf(),
            source,
        })?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_thread = child.stderr.take().map(|mut pipe| {
            let keep = Arc::clone(&stderr);
            let show = options.show_stderr;
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if show {
                        use std::io::Write;
                        // QEMU quotes the option it rejects, inline
                        // secrets and all: shown redacted, kept whole.
                        let shown = crate::argv::redact(&String::from_utf8_lossy(&buf[..n]));
                        let _ = std::io::stderr().write_all(shown.as_bytes());
                    }
                    keep.lock()
                        .expect("stderr lock")
                        .extend_from_slice(&buf[..n]);
                }
            })
        });
        let mut launched = Launched {
            child,
            _dir: dir,
            stderr,
            stderr_thread,
            kill_on_drop: true,
        };
        let session = accept_while_alive(qmp, &mut launched)?;
        let pid = launched.child.id();
        let version = session.version();
        Ok(Vm {
            monitor: Monitor::Qmp(session),
            pid,
            binary: binary.to_path_buf(),
            args: args.to_vec(),
            env: options.env.clone(),
            version,
            child: Some(launched),
            replay: crate::replay::Plan::default(),
            exe_sha256: Mutex::new(ExeDigest::OfFile(binary.to_path_buf())),
        })
    }

    /// Starts a QEMU that waits for a migration (`-incoming defer`) to take
    /// over a VM run with `args`, with migration events on.
    ///
    /// # Errors
    /// As [`Vm::launch`].
    pub fn launch_incoming(binary: &Path, args: &[String], options: &LaunchOptions) -> Result<Vm> {
        let mut launch_args = crate::argv::restart_options(args);
        launch_args.extend(["-incoming".to_string(), "defer".to_string()]);
        let mut vm = Vm::launch(binary, &launch_args, options)?;
        vm.monitor.set_capability("events", true)?;
        Ok(vm)
    }

    /// Waits for the incoming migration to be loaded (its `MIGRATION`
    /// event says `completed`); `on_tick` runs between events, and may
    /// stop the wait with an error.
    ///
    /// # Errors
    /// [`Error::QemuExited`] with QEMU's words when it rejects the stream;
    /// whatever `on_tick` returns.
    pub fn wait_loaded(
        &mut self,
        tick: Duration,
        mut on_tick: impl FnMut(&mut Vm) -> Result<()>,
    ) -> Result<()> {
        loop {
            match self.monitor.next_event(tick) {
                Ok(Some(e)) => match qemu_monitor::migration_event_status(&e) {
                    Some(MigrationStatus::Completed) => return Ok(()),
                    // QEMU prints why on stderr and exits.
                    Some(MigrationStatus::Failed) => {
                        return Err(self.exited("while loading the state"))
                    }
                    _ => {}
                },
                Ok(None) => on_tick(self)?,
                Err(_) => return Err(self.exited("while loading the state")),
            }
        }
    }

    /// Ends QEMU (`quit`) and waits, up to `timeout`, for its process to be
    /// gone, so that the VM's sockets and disks are free when this returns
    /// (a restore started right after would otherwise find them held).
    ///
    /// # Errors
    /// The monitor's error when `quit` is not accepted.
    pub fn quit_and_wait(&mut self, timeout: Duration) -> Result<()> {
        self.monitor.quit()?;
        os::wait_gone(self.pid, timeout);
        Ok(())
    }

    /// Lets a launched QEMU run on after this `Vm` is gone; returns its pid.
    #[must_use = "the pid is the only handle left on the QEMU"]
    pub fn detach(mut self) -> u32 {
        if let Some(l) = self.child.as_mut() {
            l.kill_on_drop = false;
        }
        self.hand_over();
        self.pid
    }

    /// Undoes [`Vm::hand_over`]: the launched QEMU ends with this process
    /// again if this one dies (a check that restored a VM only to look at it).
    ///
    /// # Errors
    /// [`Error::Os`] when the keeper process cannot be started or told.
    pub fn end_with_this_process(&mut self) -> Result<()> {
        if self.child.is_some() {
            os::keeper::adopt(self.pid)?;
        }
        Ok(())
    }

    /// Hands a launched QEMU over: until now it ends with this process if
    /// this one dies (`kill -9` included), from now on it outlives it (a
    /// VM restored in the foreground runs on). Dropping the `Vm` still ends
    /// it unless [`Vm::detach`]ed.
    pub fn hand_over(&mut self) {
        if self.child.is_some() {
            os::keeper::release(self.pid);
        }
    }

    /// Refuses a VM that cannot start a migration now (already migrated,
    /// still loading, broken, or migrating); returns whether its guest runs.
    /// `verb` says what was asked: `save`, `migrate`.
    ///
    /// # Errors
    /// [`Error::NotMigratable`], [`Error::Busy`], or the monitor's error.
    pub fn check_migratable(&mut self, verb: &'static str) -> Result<bool> {
        let state = self.monitor.status()?;
        match state {
            RunState::Postmigrate
            | RunState::Inmigrate
            | RunState::FinishMigrate
            | RunState::Prelaunch
            | RunState::Shutdown
            | RunState::InternalError => {
                return Err(Error::NotMigratable {
                    pid: self.pid,
                    state,
                    verb,
                })
            }
            _ => {}
        }
        let before = self.monitor.migration()?;
        if !before.status.is_final() && before.status != MigrationStatus::None {
            return Err(Error::Busy {
                pid: self.pid,
                migration: Some(before.status),
            });
        }
        // Asked before the guest is paused: a migration QEMU blocks would
        // only fail once started (QMP says why; HMP has no such query).
        let reasons = self.monitor.migration_blockers().unwrap_or_default();
        if !reasons.is_empty() {
            return Err(Error::Blocked {
                verb: if verb == "save" { "save" } else { "migrate" },
                pid: self.pid,
                reasons,
            });
        }
        Ok(state.is_running())
    }

    /// Refuses, before anything changes, a save that ends the VM
    /// (`--then quit`) when a new QEMU could not start it again: a
    /// descriptor with no name to open. A save that keeps the VM records
    /// them, and its restore asks for them (`--replace`).
    ///
    /// # Errors
    /// [`Error::NotReplayable`] with each part and how to supply it.
    pub fn check_replayable(&self, then: crate::save::Then) -> Result<()> {
        if then != crate::save::Then::Quit || self.replay.unreplayable.is_empty() {
            return Ok(());
        }
        Err(Error::NotReplayable {
            verb: "save --then quit",
            items: unreplayable_words(&self.replay.unreplayable),
        })
    }

    /// Refuses, before any RAM moves, a live migration whose destination
    /// could not be started as the VM runs: a descriptor with no name, or,
    /// on this host, a backend process that serves one QEMU at a time.
    ///
    /// # Errors
    /// [`Error::NotReplayable`] with each part and what to do.
    pub fn check_live_replayable(&mut self, local: bool) -> Result<()> {
        let mut items = unreplayable_words(&self.replay.unreplayable);
        if local {
            items.extend(crate::argv::ports_kept_by_the_source(&self.args));
        }
        for b in &self.replay.backends {
            if local {
                items.push(format!(
                    "the VM depends on {} (\"{}\") at {}, which serves this QEMU: a second QEMU on \
                     this host needs a backend of its own; save and restore the VM instead \
                     (the restore starts the backend again)",
                    b.name(),
                    b.argv.join(" "),
                    b.socket.display()
                ));
            }
        }
        if let Ok(reasons) = self.monitor.migration_blockers() {
            items.extend(reasons.into_iter().map(|r| format!("QEMU: {r}")));
        }
        if items.is_empty() {
            return Ok(());
        }
        Err(Error::NotReplayable {
            verb: "live migration",
            items,
        })
    }

    /// Puts a guest that was running back to running, whatever paused it
    /// (a completed or failed migration, our own `stop`). Best effort: used
    /// on the way out of a failure, where the first error is the one to report.
    pub fn resume_quietly(&mut self) {
        if self.monitor.status().is_ok_and(|s| !s.is_running()) {
            let _ = self.monitor.cont_after_migration();
        }
    }

    /// QEMU's stderr so far, when it was launched here.
    pub fn stderr(&self) -> String {
        self.child
            .as_ref()
            .map(Launched::stderr)
            .unwrap_or_default()
    }

    /// An error for a QEMU that is gone, with what it said.
    pub fn exited(&mut self, during: &str) -> Error {
        let stderr = match self.child.as_mut() {
            Some(l) => l.wait().map(|(_, s)| s).unwrap_or_default(),
            None => String::new(),
        };
        Error::QemuExited {
            during: during.to_string(),
            stderr,
        }
    }
}

/// Takes the QMP connection of a just-started QEMU, or its own words when
/// it exits instead.
fn accept_while_alive(
    qmp: qemu_monitor::QmpListener,
    launched: &mut Launched,
) -> Result<qemu_monitor::QmpSession> {
    match qmp.accept(launched.child.id(), START_TIMEOUT) {
        Ok(s) => Ok(s),
        Err(e) => {
            // A QEMU that fails after opening its monitor (a missing
            // disk) closes it as it exits: its own words are the error.
            os::wait_gone(launched.child.id(), Duration::from_secs(2));
            if let Ok(Some(status)) = launched.child.try_wait() {
                let (_, stderr) = launched.wait().unwrap_or((status, String::new()));
                return Err(Error::QemuExited {
                    during: format!("while starting ({status})"),
                    stderr,
                });
            }
            Err(e.into())
        }
    }
}

/// The version a QEMU binary reports (`QEMU emulator version 7.2.22 (...)`).
///
/// # Errors
/// [`Error::Launch`] when it cannot be run or says no version.
pub fn binary_version(binary: &Path, env: &BTreeMap<String, String>) -> Result<QemuVersion> {
    let launch = |source| Error::Launch {
        binary: binary.to_path_buf(),
        source,
    };
    let out = Command::new(binary)
        .arg("--version")
        .envs(env)
        .output()
        .map_err(launch)?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version_banner(&text).ok_or_else(|| {
        launch(std::io::Error::other(format!(
            "--version said {:?}",
            text.trim()
        )))
    })
}

/// `QEMU emulator version 7.2.22 (Debian ...)` → 7.2.22.
#[must_use]
pub fn parse_version_banner(text: &str) -> Option<QemuVersion> {
    text.split_whitespace().nth(3).and_then(|v| v.parse().ok())
}

/// Each unreplayable argument in words, with the `--replace` that supplies it.
pub(crate) fn unreplayable_words(items: &[crate::replay::Unreplayable]) -> Vec<String> {
    items
        .iter()
        .map(|u| {
            format!(
                "{}: {}; save without --then quit and restore with --replace '{}' 'NEW' \
                 (NEW as QEMU takes it, e.g. path=/run/x.sock in place of fd=N)",
                crate::argv::redact(&u.arg),
                u.why,
                crate::argv::redact(&u.arg)
            )
        })
        .collect()
}
