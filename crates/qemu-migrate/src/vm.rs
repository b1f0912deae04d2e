//! A QEMU to work on: attached to by its monitor socket, or launched here.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qemu_monitor::{ErrorKind, MonitorAddr, Options, QemuVersion};

use crate::control::Control;
use crate::error::{Error, Result};

/// How long QEMU may take to start listening on its monitor.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a starting QEMU's socket is tried while it is not up yet.
const START_RETRY: Duration = Duration::from_millis(2);

/// A VM and the monitor session that drives it.
#[derive(Debug)]
pub struct Vm {
    pub control: Control,
    pub pid: u32,
    /// The QEMU binary (`/proc/PID/exe`).
    pub binary: PathBuf,
    /// The command line without argv[0].
    pub args: Vec<String>,
    /// `QEMU_*` variables of its environment.
    pub env: BTreeMap<String, String>,
    pub version: QemuVersion,
    /// Set when this process started the QEMU.
    pub child: Option<Launched>,
}

/// A QEMU this process started: its handle, private socket directory and stderr.
#[derive(Debug)]
pub struct Launched {
    pub child: Child,
    _dir: tempfile::TempDir,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_thread: Option<std::thread::JoinHandle<()>>,
    kill_on_drop: bool,
}

impl Launched {
    /// What QEMU printed on stderr so far (it is also passed through when in the foreground).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned()
    }

    /// Waits for QEMU to exit; returns its status and everything it printed on stderr.
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
    pub fn is_terminal(self) -> bool {
        self == Console::Terminal
    }
}

/// How to start a QEMU.
#[derive(Debug, Clone, Default)]
pub struct LaunchOptions {
    pub console: Console,
    /// Pass QEMU's stderr through to ours as well as keeping it.
    pub show_stderr: bool,
    pub env: BTreeMap<String, String>,
}

impl Vm {
    /// Attaches to a running QEMU by its monitor socket (HMP or QMP).
    pub fn attach(monitor: impl Into<MonitorAddr>, timeout: Duration) -> Result<Vm> {
        let options = Options {
            timeout,
            wait_socket: None,
        };
        let monitor = qemu_monitor::connect(monitor, &options)?;
        let mut control = Control::from_monitor(monitor)?;
        let pid = control.peer_pid()?;
        let (binary, args, env) = process_info(pid)?;
        let version = control.version()?;
        Ok(Vm {
            control,
            pid,
            binary,
            args,
            env,
            version,
            child: None,
        })
    }

    /// Starts `binary args...` with a private QMP socket added, and connects to it.
    pub fn launch(binary: &Path, args: &[String], options: &LaunchOptions) -> Result<Vm> {
        let dir = tempfile::Builder::new()
            .prefix("qemu-migrate-")
            .tempdir()
            .map_err(Error::file(
                std::env::temp_dir(),
                "creating a private directory",
            ))?;
        let qmp = dir.path().join("qmp.sock");
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .arg("-qmp")
            .arg(format!("unix:{},server,nowait", qmp.display()))
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
                        let _ = std::io::stderr().write_all(&buf[..n]);
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
        let session = connect_while_alive(&qmp, &mut launched)?;
        let pid = launched.child.id();
        let mut control = Control::from_monitor(qemu_monitor::Monitor::Qmp(session))?;
        let version = control.version()?;
        Ok(Vm {
            control,
            pid,
            binary: binary.to_path_buf(),
            args: args.to_vec(),
            env: options.env.clone(),
            version,
            child: Some(launched),
        })
    }

    /// Starts a QEMU that waits for a migration (`-incoming defer`) to take
    /// over a VM run with `args`, with migration events on.
    pub fn launch_incoming(binary: &Path, args: &[String], options: &LaunchOptions) -> Result<Vm> {
        let mut launch_args = crate::argv::restart_options(args);
        launch_args.extend(["-incoming".to_string(), "defer".to_string()]);
        let mut vm = Vm::launch(binary, &launch_args, options)?;
        vm.control.set_capability("events", true)?;
        Ok(vm)
    }

    /// Lets a launched QEMU run on after this `Vm` is gone; returns its pid.
    pub fn detach(mut self) -> u32 {
        if let Some(l) = self.child.as_mut() {
            l.kill_on_drop = false;
        }
        self.pid
    }

    /// Refuses a VM that cannot start a migration now (already migrated,
    /// still loading, broken, or migrating); returns whether its guest runs.
    /// `verb` says what was asked: `save`, `migrate`.
    pub fn check_migratable(&mut self, verb: &str) -> Result<bool> {
        let state = self.control.status()?;
        match state.0.as_str() {
            "postmigrate" => {
                return Err(Error::NotReady(format!(
                    "the VM (QEMU pid {}) is paused after a previous migration (postmigrate): its \
                     state was already saved or moved; `cont` it first to {verb} it again, and \
                     only if no other copy of it runs",
                    self.pid
                )))
            }
            "inmigrate" | "finish-migrate" | "prelaunch" | "shutdown" | "internal-error" => {
                return Err(Error::NotReady(format!(
                    "the VM (QEMU pid {}) cannot be {verb}d in its state {:?}",
                    self.pid, state.0
                )))
            }
            _ => {}
        }
        let before = self.control.query_migrate()?;
        if !before.status.is_final() && before.status != crate::MigrationStatus::None {
            return Err(Error::Busy(format!(
                "a migration of this VM (QEMU pid {}) is already running ({:?})",
                self.pid, before.status
            )));
        }
        Ok(state.is_running())
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

/// Connects to a just-started QEMU's QMP socket, noticing if it exits instead.
fn connect_while_alive(qmp: &Path, launched: &mut Launched) -> Result<qemu_monitor::QmpSession> {
    let deadline = Instant::now() + START_TIMEOUT;
    let options = Options {
        timeout: START_TIMEOUT,
        wait_socket: None,
    };
    loop {
        match qemu_monitor::connect_qmp(qmp.to_path_buf(), &options) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == ErrorKind::Unreachable && Instant::now() < deadline => {
                if let Ok(Some(status)) = launched.child.try_wait() {
                    let (_, stderr) = launched.wait().unwrap_or((status, String::new()));
                    return Err(Error::QemuExited {
                        during: format!("while starting ({status})"),
                        stderr,
                    });
                }
                std::thread::sleep(START_RETRY);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The binary, arguments and `QEMU_*` environment of a process.
fn process_info(pid: u32) -> Result<(PathBuf, Vec<String>, BTreeMap<String, String>)> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let cmdline = std::fs::read(proc.join("cmdline")).map_err(Error::file(
        proc.join("cmdline"),
        "reading the QEMU command line",
    ))?;
    let mut args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.last().is_some_and(String::is_empty) {
        args.pop();
    }
    if args.is_empty() {
        return Err(Error::NotReady(format!(
            "process {pid} has no command line"
        )));
    }
    let argv0 = args.remove(0);
    let binary = std::fs::read_link(proc.join("exe")).unwrap_or_else(|_| PathBuf::from(argv0));
    let env = std::fs::read(proc.join("environ"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter_map(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    let (k, v) = kv.split_once('=')?;
                    k.starts_with("QEMU_")
                        .then(|| (k.to_string(), v.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((binary, args, env))
}
