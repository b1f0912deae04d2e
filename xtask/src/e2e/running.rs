//! The QEMUs of a scenario: started by the harness with the recipe's
//! options, or by the library's restore; their serial consoles collected.

use std::path::Path;
use std::time::{Duration, Instant};

use qemu_monitor::{Monitor, Options};
use test_guest::{tick, Lines};
use testkit::{Process, Serial};

use super::{Accel, Failure};
use crate::qemu::Qemu;

/// A QEMU of the scenario, with its serial console collected.
pub(super) struct Running {
    qemu: Started,
    pub(super) serial: Lines,
    pub(super) started: Instant,
}

/// Who started the QEMU: the harness, or the library's restore.
enum Started {
    Harness(Process),
    Restored(Box<qemu_migrate::Vm>),
}

impl Running {
    /// Starts `qemu args...`; its stderr and serial console are logged in
    /// `dir` as `ROLE-stderr.log` and `ROLE-serial.log`.
    pub(super) fn start(
        qemu: &Qemu,
        args: &[String],
        dir: &Path,
        role: &str,
    ) -> Result<Running, Failure> {
        let process = Process::start(
            &qemu.binary,
            args,
            &dir.join(format!("{role}-stderr.log")),
            Serial::Lines,
            Some(&dir.join(format!("{role}-serial.log"))),
        )
        .map_err(|e| Failure::new("setup", e))?;
        Ok(Running {
            serial: process.serial().clone(),
            qemu: Started::Harness(process),
            started: Instant::now(),
        })
    }

    /// A VM the library restored with its console on a pipe.
    pub(super) fn restored(
        mut vm: qemu_migrate::Vm,
        dir: &Path,
        started: Instant,
    ) -> Result<Running, Failure> {
        let Some(stdout) = vm.launched().and_then(|l| l.take_stdout()) else {
            return Err(Failure::new(
                "restore",
                "the restored QEMU's console is not a pipe",
            ));
        };
        let log = std::fs::File::create(dir.join("destination-serial.log")).ok();
        Ok(Running {
            qemu: Started::Restored(Box::new(vm)),
            serial: Lines::collect_to(stdout, log),
            started,
        })
    }

    /// QEMU's own words, without the harmless module warnings.
    pub(super) fn said(&self) -> String {
        match &self.qemu {
            Started::Harness(p) => p.said(),
            Started::Restored(vm) => qemu_migrate::qemu_stderr_lines(&vm.stderr()).join(" / "),
        }
    }

    /// Waits for QEMU to exit (it has, or is about to: it refused the state).
    pub(super) fn wait(&mut self) {
        match &mut self.qemu {
            Started::Harness(p) => {
                let _ = p.wait();
            }
            Started::Restored(vm) => {
                if let Some(l) = vm.launched() {
                    let _ = l.wait();
                }
            }
        }
    }
}

/// KVM if it really runs a guest here (a tick within a second or two), else TCG.
pub fn probe_accel(qemu: &Qemu, guest: &Path) -> Accel {
    let Ok(dir) = tempfile::tempdir() else {
        return Accel::Tcg;
    };
    let args: Vec<String> = [
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "32",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-kernel",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([guest.display().to_string()])
    .collect();
    match Running::start(qemu, &args, dir.path(), "kvm-probe") {
        Ok(run)
            if run
                .serial
                // Tick 1 is printed before the timer runs; a KVM that
                // starts the guest but cannot deliver its interrupts (seen
                // with kvm-pvm) stops there, so KVM counts only once the
                // guest ticks on.
                .try_wait_for(0, Duration::from_secs(3), |l| {
                    tick(l).is_some_and(|t| t >= 3)
                })
                .is_ok() =>
        {
            Accel::Kvm
        }
        _ => Accel::Tcg,
    }
}

/// The accelerator's options.
pub(super) fn accel_args(accel: Accel) -> Vec<String> {
    match accel {
        // The recipe's own choice where it works.
        Accel::Kvm => vec!["-cpu".into(), "host".into(), "-enable-kvm".into()],
        Accel::Tcg => vec!["-accel".into(), "tcg".into()],
    }
}

/// A free TCP port on 127.0.0.1 for a live migration.
pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(4444)
}

/// The harness's own monitor session on a QEMU's private QMP socket.
pub(super) fn harness(sock: &Path, timeout: Duration) -> Result<Monitor, Failure> {
    qemu_monitor::connect(
        sock.to_path_buf(),
        &Options {
            timeout,
            wait_socket: Some(Duration::from_secs(20)),
            mux_escape: false,
        },
    )
    .map_err(Failure::of("monitor"))
}
