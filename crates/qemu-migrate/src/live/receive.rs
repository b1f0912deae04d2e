//! The receiving side: a destination QEMU waiting on a TCP port, which
//! answers confirm clients and hands QEMU's stream to it.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use qemu_monitor::RunState;

use super::confirm::{classify, Incoming, Said, State};
use super::destination::{parse_tcp, tcp_uri};
use super::PROGRESS_TICK;
use crate::error::{Error, Result};
use crate::machine;
use crate::manifest::Manifest;
use crate::os;
use crate::progress::Progress;
use crate::vm::{Console, LaunchOptions, Vm};

/// The fd name the receiver hands QEMU the accepted stream under.
const FD_NAME: &str = "qemu-migrate-live";

/// What to start the destination from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum VmSpec {
    /// A `qemu-migrate save` manifest (`STATEFILE.manifest.json`).
    Manifest(PathBuf),
    /// QEMU options, exactly as the source runs.
    Args(Vec<String>),
}

/// How to receive.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ReceiveOptions {
    /// The QEMU binary; by default the manifest's, else `qemu-system-x86_64`.
    pub qemu: Option<PathBuf>,
    /// Where the VM's console (its `-serial stdio`) goes.
    pub console: Console,
    /// Set (e.g. by a signal handler) to stop waiting; QEMU is stopped.
    pub cancel: Arc<AtomicBool>,
}

/// A destination QEMU waiting for a migration on a TCP port.
#[derive(Debug)]
pub struct Receiver {
    /// The waiting QEMU.
    pub vm: Vm,
    /// Where it listens, `tcp:ADDR:PORT`.
    pub listen: String,
    /// The machine type pinned for a QEMU other than the manifest's.
    pub pinned: Option<machine::Pinned>,
    /// What the user should know, a line each (a manifest's variable left
    /// out, a binary run unchecked).
    pub warnings: Vec<String>,
    started: Instant,
    incoming: mpsc::Receiver<Incoming>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Ends the waiting QEMU if this process dies before it has the guest.
    watchdog: Option<crate::os::Watchdog>,
}

/// A received VM: running (or paused, as it was on the source).
#[derive(Debug)]
#[non_exhaustive]
pub struct Received {
    /// The VM; its QEMU is killed when this is dropped unless detached.
    pub vm: Vm,
    /// Running, or paused as it was on the source.
    pub state: RunState,
    /// From the start of the receiver to the guest running.
    pub elapsed: Duration,
}

/// Starts a destination and waits for the migration; see [`Receiver`].
///
/// # Errors
/// As [`Receiver::start`] and [`Receiver::finish`].
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
    ///
    /// # Errors
    /// A malformed address, a port that cannot be listened on, an unreadable
    /// manifest, or QEMU failing to start.
    pub fn start(listen: &str, spec: &VmSpec, options: &ReceiveOptions) -> Result<Receiver> {
        let started = Instant::now();
        let (host, port) = parse_tcp(listen).map_err(|_| Error::BadAddress {
            given: listen.to_string(),
            expected: "tcp:ADDR:PORT",
        })?;
        let mut pinned = None;
        let mut warnings = Vec::new();
        let (binary, args, env) = match spec {
            VmSpec::Manifest(path) => {
                crate::trust::check_file(path, "manifest")?;
                let text = std::fs::read_to_string(path)
                    .map_err(Error::file(path, "reading the manifest"))?;
                let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::BadStateFile {
                    path: path.clone(),
                    reason: format!("not a qemu-migrate manifest: {e}"),
                })?;
                crate::trust::check_runs_as(path, m.qemu_uid, false)?;
                // Only the recorded binary, unchanged, unless --qemu names one.
                let (binary, checked) =
                    crate::trust::recorded_qemu(Some((path, &m)), options.qemu.as_deref())?;
                warnings.extend(checked);
                warnings.extend(crate::trust::dropped_env(&m.env));
                let env = crate::trust::qemu_env(&m.env);
                // -- cross-version: another QEMU gets the saved machine type pinned
                let mut args = m.args;
                if binary != m.qemu {
                    if let Some((a, p)) = m.machine.as_deref().and_then(|s| machine::pin(&args, s))
                    {
                        args = a;
                        pinned = Some(p);
                    }
                }
                // --
                (binary, args, env)
            }
            VmSpec::Args(args) => (
                crate::trust::recorded_qemu(None, options.qemu.as_deref())?.0,
                args.clone(),
                Default::default(),
            ),
        };
        // Bound before QEMU starts, so a taken port fails before anything runs.
        let listener =
            TcpListener::bind((host.as_str(), port)).map_err(|source| Error::Listen {
                addr: listen.to_string(),
                source,
            })?;
        let running = machine::resolve(&binary, &env, &args)?;
        let vm = Vm::launch_incoming(&binary, &args, &LaunchOptions::new(options.console, env))?;
        let watchdog = crate::os::Watchdog::ending(
            vm.pid(),
            "qemu-migrate: the receiving process died before the guest was received; its QEMU was ended\n",
        )?;
        let (tx, incoming) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let version = vm.version().to_string();
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("receive-accept".into())
                .spawn(move || accept_loop(listener, tx, &stop, &version, running))
                .map_err(Error::os("starting the thread that accepts connections"))?
        };
        Ok(Receiver {
            vm,
            listen: tcp_uri(&host, port),
            pinned,
            warnings,
            started,
            incoming,
            stop,
            thread: Some(thread),
            watchdog: Some(watchdog),
        })
    }

    /// Waits for the stream, hands it to QEMU, waits until QEMU loaded it,
    /// and tells every confirm client the outcome.
    ///
    /// # Errors
    /// [`Error::QemuExited`] with QEMU's words when it rejects the stream;
    /// [`Error::Cancelled`].
    pub fn finish(mut self, options: &ReceiveOptions, progress: &dyn Progress) -> Result<Received> {
        let mut confirms = Vec::new();
        let outcome = self.load(&mut confirms, options, progress);
        let said = match &outcome {
            Ok(state) => Said {
                state: if state.is_running() {
                    State::Running
                } else {
                    State::Paused
                },
                qemu: self.vm.version().to_string(),
                pid: Some(self.vm.pid()),
                error: None,
                machine: None,
            },
            Err(e) => Said {
                state: State::Failed,
                qemu: self.vm.version().to_string(),
                pid: None,
                error: Some(e.to_string()),
                machine: None,
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
        self.vm.hand_over();
        if let Some(w) = self.watchdog.take() {
            w.dismiss();
        }
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
    ) -> Result<RunState> {
        let stream = loop {
            match self.incoming.recv_timeout(PROGRESS_TICK) {
                Ok(Incoming::Stream(s)) => break s,
                Ok(Incoming::Confirm(c)) => confirms.push(c),
                Err(_) => {
                    self.check_alive("while waiting for the migration")?;
                    if options.cancel.load(Ordering::Relaxed) {
                        return Err(Error::Cancelled(
                            "no migration was received; QEMU was stopped".into(),
                        ));
                    }
                }
            }
        };
        stream
            .set_read_timeout(None)
            .map_err(Error::os("accepting the migration stream"))?;
        self.vm
            .monitor
            .migrate_incoming_fd(FD_NAME, stream.as_fd())?;
        drop(stream);
        let incoming = &self.incoming;
        self.vm.wait_loaded(PROGRESS_TICK, |vm| {
            let info = vm.monitor.migration()?;
            progress.update("receiving", info.transferred, None);
            while let Ok(Incoming::Confirm(c)) = incoming.try_recv() {
                confirms.push(c);
            }
            if options.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled(
                    "the migration was not received; QEMU was stopped".into(),
                ));
            }
            Ok(())
        })?;
        // QEMU starts the guest before it marks the incoming migration completed.
        let state = self.vm.monitor.status()?;
        Ok(if state.is_running() {
            RunState::Running
        } else {
            RunState::Paused
        })
    }

    fn check_alive(&mut self, during: &str) -> Result<()> {
        let exited = self.vm.child.as_mut().is_some_and(|l| l.has_exited());
        if exited {
            return Err(self.vm.exited(during));
        }
        Ok(())
    }
}

/// Accepts connections until told to stop, sorting QEMU's stream from confirm clients.
fn accept_loop(
    listener: TcpListener,
    tx: mpsc::Sender<Incoming>,
    stop: &AtomicBool,
    qemu: &str,
    machine: Option<String>,
) {
    let listening = Said {
        state: State::Listening,
        qemu: qemu.to_string(),
        pid: None,
        error: None,
        machine,
    };
    let listening = format!(
        "{}\n",
        serde_json::to_string(&listening).expect("serialises")
    );
    while !stop.load(Ordering::Relaxed) {
        if !os::readable(&listener, PROGRESS_TICK) {
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
