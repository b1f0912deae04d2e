//! A QEMU with an HMP socket and a QMP socket of its own, in a private
//! directory: what the tests drive and watch a VM through.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu_monitor::{MigrationStatus, Monitor, QmpListener, QmpSession};
use tempfile::TempDir;
use test_guest::{tick, Lines};

use crate::process::{Process, Serial};

/// How long QEMU may take to start and answer on its QMP socket: a
/// deadline, not a wait; generous, for a host busy with parallel tests.
const START: Duration = Duration::from_secs(60);

/// A running QEMU with an HMP socket (`hmp`) and a QMP socket (`qmp_path`),
/// killed when dropped.
#[derive(Debug)]
pub struct Vm {
    process: Process,
    /// Its private directory: sockets and `qemu.stderr`.
    pub dir: TempDir,
    /// The human monitor's socket.
    pub hmp: PathBuf,
    /// A machine monitor socket of the VM's own, free for a test to connect
    /// to (the test kit's session is on another, which QEMU connected to).
    pub qmp_path: PathBuf,
    qmp: Option<QmpSession>,
}

impl Vm {
    /// A monitor-only QEMU (`-M none`): starts in milliseconds.
    pub fn none(qemu: &Path) -> Vm {
        Vm::start(qemu, &["-M", "none"])
    }

    /// QEMU with `args` plus `-display none`, the two monitor sockets, and
    /// stderr kept in its directory.
    pub fn start<S: AsRef<OsStr>>(qemu: &Path, args: &[S]) -> Vm {
        let dir = tempfile::tempdir().expect("tempdir");
        Vm::start_in(qemu, args, dir)
    }

    /// [`Vm::start`] in a directory of the caller's.
    pub fn start_in<S: AsRef<OsStr>>(qemu: &Path, args: &[S], dir: TempDir) -> Vm {
        Vm::try_start(qemu, args, dir, Serial::Null).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Vm::start`] for a guest with `-serial stdio`: its output lines too.
    pub fn start_with_serial<S: AsRef<OsStr>>(qemu: &Path, args: &[S]) -> (Vm, Lines) {
        let dir = tempfile::tempdir().expect("tempdir");
        let vm = Vm::try_start(qemu, args, dir, Serial::Lines).unwrap_or_else(|e| panic!("{e}"));
        let lines = vm.process.serial().clone();
        (vm, lines)
    }

    /// Like [`Vm::start_with_serial`] for a guest that ticks: returns once it
    /// has printed `tick 1` (after a `fill=`, the fill is done by then).
    pub fn start_ticking<S: AsRef<OsStr>>(qemu: &Path, args: &[S]) -> (Vm, Lines) {
        let (vm, serial) = Vm::start_with_serial(qemu, args);
        serial.wait_for(0, Duration::from_secs(120), "tick 1", |l| {
            tick(l) == Some(1)
        });
        (vm, serial)
    }

    /// Starts QEMU and connects to its QMP socket; says why when it cannot.
    ///
    /// # Errors
    /// QEMU not starting, or not answering on QMP, with what it said.
    pub fn try_start<S: AsRef<OsStr>>(
        qemu: &Path,
        args: &[S],
        dir: TempDir,
        serial: Serial,
    ) -> Result<Vm, String> {
        let hmp = dir.path().join("hmp.sock");
        let qmp_path = dir.path().join("qmp.sock");
        // The test's session: QEMU connects to it as it starts, so no connect
        // races QEMU's start-up (see qemu_monitor::QmpListener).
        let own =
            QmpListener::bind(dir.path().join("testkit-qmp.sock")).map_err(|e| e.to_string())?;
        let mut all: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
        let hmp_arg = format!("unix:{},server,nowait", hmp.display());
        let qmp_arg = format!("unix:{},server,nowait", qmp_path.display());
        let own_arg = own.qemu_arg();
        let extra = [
            "-display", "none", "-monitor", &hmp_arg, "-qmp", &qmp_arg, "-qmp", &own_arg,
        ];
        all.extend(extra.iter().map(OsStr::new));
        let process = Process::start(qemu, &all, &dir.path().join("qemu.stderr"), serial, None)?;
        let qmp = own
            .accept(process.pid(), START)
            .map_err(|e| format!("{e}; QEMU said: {}", process.said()))?;
        Ok(Vm {
            process,
            dir,
            hmp,
            qmp_path,
            qmp: Some(qmp),
        })
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The test's own QMP session (QEMU serves one client per socket).
    pub fn qmp(&mut self) -> &mut QmpSession {
        self.qmp.as_mut().expect("QMP session")
    }

    /// The test's QMP session as a typed monitor; hand it back with [`Vm::give_back`].
    pub fn monitor(&mut self) -> Monitor {
        Monitor::Qmp(self.qmp.take().expect("QMP session"))
    }

    /// Returns the session taken by [`Vm::monitor`].
    pub fn give_back(&mut self, monitor: Monitor) {
        if let Monitor::Qmp(s) = monitor {
            self.qmp = Some(s);
        }
    }

    /// `query-status`'s status: `running`, `paused`, `postmigrate`, ...
    pub fn status(&mut self) -> String {
        let r = self
            .qmp()
            .execute("query-status", None)
            .expect("query-status");
        r["status"].as_str().unwrap_or_default().to_string()
    }

    /// Everything QEMU printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// QEMU's own words on stderr, on one line.
    pub fn said(&self) -> String {
        self.process.said()
    }

    /// Waits for a QMP event by name (with `migrate-set-capabilities events` on
    /// for migration events).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = self
                .qmp()
                .next_event(left)
                .unwrap_or_else(|e| panic!("waiting for event {name}: {e}"));
            if e.name == name {
                return e.data;
            }
        }
    }

    /// Waits until QEMU exits by itself and returns its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.qmp = None;
        self.process.wait().expect("wait")
    }

    /// Turns on migration events, so that completion can be waited for.
    pub fn enable_migration_events(&mut self) {
        let mut m = self.monitor();
        let r = m.set_capability("events", true);
        self.give_back(m);
        r.expect("migrate-set-capabilities events");
    }

    /// Waits for the migration to end and returns its final status.
    pub fn wait_migration(&mut self, timeout: Duration) -> MigrationStatus {
        let mut m = self.monitor();
        let r = m.wait_migration(Instant::now() + timeout, |_| {});
        self.give_back(m);
        let info = r.expect("query-migrate");
        assert!(
            info.status.is_final(),
            "the migration did not end within {timeout:?}: {:?}",
            info.status
        );
        info.status
    }

    /// Waits for the migration to end; its final status by QEMU's name.
    pub fn wait_migration_end(&mut self, timeout: Duration) -> String {
        let status = self.wait_migration(timeout);
        serde_json::to_value(status)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }

    /// Waits until an incoming migration has finished and the guest runs.
    pub fn wait_running(&mut self, timeout: Duration) {
        if self.status() == "running" {
            return;
        }
        // RESUME follows the status query if the guest was not yet running;
        // the session was open before the query, so it cannot be missed.
        self.wait_event("RESUME", timeout);
    }
}
