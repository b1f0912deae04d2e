//! The receiving side: a destination QEMU waiting on a TCP port, which
//! answers confirm clients and hands QEMU's stream to it.
//!
//! With TLS the waiting QEMU listens on a private unix socket with its
//! credentials set, and each connection that opens with a TLS handshake is
//! relayed to it: QEMU refuses one that fails the handshake (another key,
//! another CA, not TLS at all) and keeps listening, so nobody without the
//! key disturbs the destination. QEMU takes an incoming migration only
//! once (`migrate-incoming`), which is why the stream is not handed over
//! as a descriptor as it is with `--insecure`. Anything else (a silent
//! client, garbage, a plain stream) is dropped before it reaches QEMU, and
//! a confirm client is answered only once it proved it holds the key.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use qemu_monitor::RunState;

use super::confirm::{classify, read_hello, Incoming, Kind, Peer, Said, State, HELLO_TIMEOUT};
use super::destination::{parse_tcp, tcp_uri};
use super::tls::{self, Credentials, Endpoint, Security};
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
    /// How the migration is secured; `None` refuses to start.
    pub security: Option<Security>,
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
    /// Whether QEMU's stream is TLS (QEMU listens on `_socket_dir`).
    tls: bool,
    /// The key for QEMU, while it may still need it.
    _creds: Option<tls::Installed>,
    /// Where QEMU's TLS socket is.
    _socket_dir: Option<tempfile::TempDir>,
    /// Removes both directories if this process dies before it does.
    _sweeper: Option<crate::os::Watchdog>,
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
        let creds = Credentials::load(options.security.as_ref(), Endpoint::Server)?;
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
        let mut vm =
            Vm::launch_incoming(&binary, &args, &LaunchOptions::new(options.console, env))?;
        let watchdog = crate::os::Watchdog::ending(
            vm.pid(),
            "qemu-migrate: the receiving process died before the guest was received; its QEMU was ended\n",
        )?;
        let pid = vm.pid();
        let installed = creds.install(&mut vm.monitor, Endpoint::Server, pid)?;
        let (socket_dir, to) = if creds.is_tls() {
            let dir = tempfile::Builder::new()
                .prefix("qemu-migrate-receive.")
                .tempdir()
                .map_err(Error::os("creating a private directory for QEMU's socket"))?;
            let socket = dir.path().join("stream.sock");
            vm.monitor
                .migrate_incoming(&format!("unix:{}", socket.display()))?;
            (Some(dir), StreamTo::Relay(socket))
        } else {
            (None, StreamTo::Fd)
        };
        // Killed (kill -9 included) before the end, this process leaves no
        // copy of the key behind: QEMU's watchdog ends QEMU, this one the files.
        let private: Vec<PathBuf> = installed
            .as_ref()
            .and_then(tls::Installed::key_dir)
            .into_iter()
            .chain(socket_dir.as_ref().map(tempfile::TempDir::path))
            .map(PathBuf::from)
            .collect();
        let sweeper = if private.is_empty() {
            None
        } else {
            Some(crate::os::Watchdog::spawn(move |_| {
                for d in private {
                    let _ = std::fs::remove_dir_all(d);
                }
            })?)
        };
        let (tx, incoming) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let listening = Said {
            state: State::Listening,
            qemu: vm.version().to_string(),
            pid: None,
            error: None,
            machine: running,
        };
        let thread = {
            let stop = Arc::clone(&stop);
            let key = *creds.auth_key();
            let server_tls = creds.server_tls();
            std::thread::Builder::new()
                .name("receive-accept".into())
                .spawn(move || accept_loop(listener, tx, &stop, listening, key, server_tls, to))
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
            tls: creds.is_tls(),
            _creds: installed,
            _socket_dir: socket_dir,
            _sweeper: sweeper,
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
        while let Ok(i) = self.incoming.try_recv() {
            if let Incoming::Confirm(c) = i {
                confirms.push(c);
            }
        }
        for mut c in confirms {
            c.say(&said);
        }
        let state = outcome?;
        if self.tls {
            // A later save of this VM goes through a pipe, in clear.
            tls::remove(&mut self.vm.monitor);
        }
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
        confirms: &mut Vec<Peer>,
        options: &ReceiveOptions,
        progress: &dyn Progress,
    ) -> Result<RunState> {
        if !self.tls {
            let stream = loop {
                match self.incoming.recv_timeout(PROGRESS_TICK) {
                    Ok(Incoming::Stream(s)) => break s,
                    Ok(i) => sort(i, confirms, progress, None),
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
        }
        let incoming = &self.incoming;
        self.vm.wait_loaded(PROGRESS_TICK, |vm| {
            let info = vm.monitor.migration()?;
            progress.update("receiving", info.transferred, None);
            while let Ok(i) = incoming.try_recv() {
                sort(i, confirms, progress, Some(info.status));
            }
            if let Some(l) = vm.child.as_mut() {
                if l.has_exited() {
                    return Err(vm.exited("while waiting for the migration"));
                }
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

/// Where an incoming stream goes.
#[derive(Debug, Clone)]
enum StreamTo {
    /// `--insecure`: the first plain stream is handed to QEMU as a descriptor.
    Fd,
    /// TLS: every TLS connection is relayed to QEMU's socket, which
    /// refuses those that fail the handshake and keeps listening.
    Relay(PathBuf),
}

/// At most this many connections are sorted or relayed at once; more are dropped.
const MAX_PENDING: usize = 64;

/// Sorts what the listener thread sent: confirm clients kept, refusals said.
fn sort(
    i: Incoming,
    confirms: &mut Vec<Peer>,
    progress: &dyn Progress,
    status: Option<qemu_monitor::MigrationStatus>,
) {
    use qemu_monitor::MigrationStatus as S;
    match i {
        Incoming::Confirm(c) => confirms.push(c),
        Incoming::Stream(_) => {}
        Incoming::Refused(peer, why) => {
            progress.note(&format!(
                "refused a connection from {peer}: {why}; still waiting"
            ));
        }
        Incoming::Ended(peer) => {
            if matches!(status, Some(S::None | S::Setup)) {
                progress.note(&format!(
                    "refused a connection from {peer}: QEMU's TLS handshake failed (another key \
                     or CA, or not a migration); still waiting"
                ));
            }
        }
    }
}

/// Accepts connections until told to stop, each sorted on its own thread
/// so that a silent one holds up no other.
fn accept_loop(
    listener: TcpListener,
    tx: mpsc::Sender<Incoming>,
    stop: &AtomicBool,
    listening: Said,
    key: [u8; 32],
    server_tls: Option<Arc<rustls::ServerConfig>>,
    to: StreamTo,
) {
    let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // --insecure: QEMU takes one stream; later ones are refused.
    let handed = Arc::new(AtomicBool::new(false));
    while !stop.load(Ordering::Relaxed) {
        if !os::readable(&listener, PROGRESS_TICK) {
            continue;
        }
        let Ok((stream, peer)) = listener.accept() else {
            continue;
        };
        if pending.load(Ordering::Relaxed) >= MAX_PENDING {
            let _ = tx.send(Incoming::Refused(peer, "too many connections at once"));
            continue;
        }
        pending.fetch_add(1, Ordering::Relaxed);
        let (tx, listening, to, mine, handed, server_tls) = (
            tx.clone(),
            listening.clone(),
            to.clone(),
            Arc::clone(&pending),
            Arc::clone(&handed),
            server_tls.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("receive-sort".into())
            .spawn(move || {
                let refused = |why| {
                    let _ = tx.send(Incoming::Refused(peer, why));
                };
                match (classify(&stream), &to) {
                    (Some(Kind::Hello), _) => {
                        let authenticated = read_hello(&stream).and_then(|hello| {
                            // x509: the channel runs through TLS, and only then.
                            let wants_tls =
                                hello.get("tls") == Some(&serde_json::Value::Bool(true));
                            let mut conn = match (&server_tls, wants_tls) {
                                (Some(config), true) => {
                                    tls::server_conn(stream, config, HELLO_TIMEOUT)?
                                }
                                (None, false) => tls::Conn::Plain(stream),
                                _ => return None,
                            };
                            let session =
                                tls::server_handshake(&mut conn, &hello, &key, HELLO_TIMEOUT)?;
                            Some((conn, session))
                        });
                        mine.fetch_sub(1, Ordering::Relaxed);
                        match authenticated {
                            Some((stream, session)) => {
                                let mut peer = Peer { stream, session };
                                // Prepare: the client learns who listens before QEMU sends anything.
                                peer.say(&listening);
                                let _ = tx.send(Incoming::Confirm(peer));
                            }
                            None => refused("a confirm client that did not prove it holds the key"),
                        }
                    }
                    (Some(Kind::PlainStream), StreamTo::Fd) => {
                        mine.fetch_sub(1, Ordering::Relaxed);
                        if handed.swap(true, Ordering::Relaxed) {
                            refused("a second stream while QEMU loads the first");
                        } else {
                            let _ = tx.send(Incoming::Stream(stream));
                        }
                    }
                    (Some(Kind::Tls), StreamTo::Relay(socket)) => {
                        // Counted while it lasts: QEMU gives a handshake no deadline.
                        if relay(stream, socket).is_ok() {
                            let _ = tx.send(Incoming::Ended(peer));
                        }
                        mine.fetch_sub(1, Ordering::Relaxed);
                    }
                    (Some(Kind::PlainStream), StreamTo::Relay(_)) => {
                        mine.fetch_sub(1, Ordering::Relaxed);
                        refused("a stream in clear, and this receiver takes TLS only")
                    }
                    (Some(Kind::Tls), StreamTo::Fd) => {
                        mine.fetch_sub(1, Ordering::Relaxed);
                        refused("a TLS stream, and this receiver was started --insecure")
                    }
                    (None, _) => {
                        mine.fetch_sub(1, Ordering::Relaxed);
                        refused("it said nothing a receiver understands")
                    }
                }
            });
        if spawned.is_err() {
            // The closure, and with it the connection, is dropped.
            pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Relays `stream` both ways to QEMU's socket until either side ends.
fn relay(stream: TcpStream, socket: &std::path::Path) -> std::io::Result<()> {
    let qemu = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(None)?;
    let (from_peer, to_qemu) = (stream.try_clone()?, qemu.try_clone()?);
    let up = std::thread::Builder::new()
        .name("receive-relay".into())
        .spawn(move || {
            // The stream itself: through a pipe, never copied into this process.
            let _ = os::splice_all(from_peer.as_fd(), to_qemu.as_fd());
            let _ = to_qemu.shutdown(std::net::Shutdown::Write);
        })?;
    let (mut from_qemu, mut to_peer) = (qemu, stream);
    let _ = copy(&mut from_qemu, &mut to_peer);
    let _ = to_peer.shutdown(std::net::Shutdown::Both);
    let _ = from_qemu.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
    Ok(())
}

/// Copies until the end (QEMU's side of the handshake: a few KB).
fn copy(from: &mut impl std::io::Read, to: &mut impl Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}
