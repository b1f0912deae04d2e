//! The round-trip check: does this VM survive a save and restore (or a live
//! migration), on this QEMU or across an upgrade? It boots the VM, waits
//! until its serial console says it is ready, saves and restores it (or
//! migrates it), and judges from the console what a user cares about:
//!
//! - `expect`: lines that must appear after the restore;
//! - `reject`: lines that must never appear after the guest was ready (the
//!   boot banner: a guest that printed it again booted afresh);
//! - `counter`: a number the guest prints (one capture group) that must go on
//!   increasing across the restore rather than start over;
//! - `ram`: a region of guest RAM, read with `pmemsave` from the paused
//!   source and the restored destination before it runs, that must be identical;
//! - `panic`: lines that mean the guest panicked, at any time.
//!
//! Every QEMU of the check writes the guest's first serial port to one file
//! (`append=on`): the destination carries on where the source stopped, and
//! the log is the whole story. Each wait has a deadline.
//!
//! ```no_run
//! use qemu_migrate::roundtrip::{self, Check};
//! let mut check = Check::new("qemu-system-x86_64".into(), vec!["-m".into(), "32".into()],
//!                            regex::Regex::new("tick 3").unwrap(), "/tmp/rt".into());
//! check.counter = Some(regex::Regex::new(r"^tick (\d+)").unwrap());
//! let report = roundtrip::run(&check);
//! println!("{report}");
//! ```

mod judge;
mod report;
mod run;
pub mod serial;

use run::Run;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use regex::Regex;
use serde::Serialize;

use crate::error::Error;
use crate::live::{self, Destination, LiveOptions, ReceiveOptions, VmSpec};
use crate::machine::{self, Pinned};
use crate::progress::Quiet;
use crate::restore::{self, RestoreOptions};
use crate::save::{self, SaveOptions, Then};
use crate::vm::{Console, LaunchOptions, Vm};
use serial::Follow;

pub use report::junit;

/// How the state goes from the source to the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Transport {
    /// `qemu-migrate save` to a file, then `restore`.
    #[default]
    File,
    /// A live migration to a new QEMU on this host.
    LiveLocal,
    /// A live migration over TCP on 127.0.0.1 to a `receive`r.
    LiveTcp,
    /// `qemu-migrate save --instant`, then a restore that maps the RAM image.
    Instant,
    /// `qemu-migrate snapshot` (the guest runs while RAM is written), then
    /// `restore`: the guest must carry on from the instant the snapshot began.
    Snapshot,
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Transport, String> {
        match s {
            "file" => Ok(Transport::File),
            "live-local" => Ok(Transport::LiveLocal),
            "live-tcp" => Ok(Transport::LiveTcp),
            "instant" => Ok(Transport::Instant),
            "snapshot" => Ok(Transport::Snapshot),
            _ => Err(format!(
                "{s:?}: expected file, live-local, live-tcp, instant or snapshot"
            )),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::File => "file",
            Transport::LiveLocal => "live-local",
            Transport::LiveTcp => "live-tcp",
            Transport::Instant => "instant",
            Transport::Snapshot => "snapshot",
        })
    }
}

/// A region of guest-physical RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RamRegion {
    /// Its first byte.
    pub addr: u64,
    /// Its length.
    pub size: u64,
}

impl std::str::FromStr for RamRegion {
    type Err = String;

    /// `ADDR:SIZE`, each decimal or `0x` hex, SIZE with an optional K/M/G.
    fn from_str(s: &str) -> Result<RamRegion, String> {
        let bad = || format!("{s:?}: expected ADDR:SIZE, e.g. 0x400000:1M");
        let (a, n) = s.split_once(':').ok_or_else(bad)?;
        let addr = number(a).ok_or_else(bad)?;
        let size = number(n).filter(|&n| n > 0).ok_or_else(bad)?;
        Ok(RamRegion { addr, size })
    }
}

fn number(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, scale) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(h) => u64::from_str_radix(h, 16).ok()?,
        None => digits.parse().ok()?,
    };
    n.checked_mul(scale)
}

/// What to check.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Check {
    /// The QEMU that boots and saves the VM.
    pub qemu: PathBuf,
    /// The QEMU that restores it (default: the same); a newer one gets the
    /// saved machine type pinned.
    pub restore_qemu: Option<PathBuf>,
    /// `QEMU_*` environment for both.
    pub env: BTreeMap<String, String>,
    /// The VM's options, with its serial console on stdio (or none given).
    pub args: Vec<String>,
    /// How the state goes over.
    pub transport: Transport,
    /// The guest is ready to be saved once a line matches.
    pub ready: Regex,
    /// How long the boot, and each wait after the restore, may take.
    pub timeout: Duration,
    /// Lines that must appear after the restore, each.
    pub expect: Vec<Regex>,
    /// Lines that must not appear once the guest was ready.
    pub reject: Vec<Regex>,
    /// A number (its first capture group) that must go on increasing.
    pub counter: Option<Regex>,
    /// How many counter lines the destination must print.
    pub counter_after: usize,
    /// Lines that mean the guest panicked.
    pub panic: Option<Regex>,
    /// A RAM region that must be identical on both sides.
    pub ram: Option<RamRegion>,
    /// With neither `expect` nor `counter`: how long the restored guest is
    /// watched for `reject` and `panic` lines.
    pub watch: Duration,
    /// Where the state file, serial log and QEMUs' stderr go.
    pub workdir: PathBuf,
    /// Set (e.g. by a signal handler) to stop.
    pub cancel: Arc<AtomicBool>,
}

impl Check {
    /// A check of `args` on `qemu`, ready at `ready`, working in `workdir`;
    /// the rest at its defaults (file transport, a 60 s timeout, 2 s of
    /// watching, IncludeOS's and Linux's panic lines).
    pub fn new(qemu: PathBuf, args: Vec<String>, ready: Regex, workdir: PathBuf) -> Check {
        Check {
            qemu,
            restore_qemu: None,
            env: BTreeMap::new(),
            args,
            transport: Transport::File,
            ready,
            timeout: Duration::from_secs(60),
            expect: Vec::new(),
            reject: Vec::new(),
            counter: None,
            counter_after: 2,
            panic: Some(Regex::new(DEFAULT_PANIC).expect("a valid pattern")),
            ram: None,
            watch: Duration::from_secs(2),
            workdir,
            cancel: Arc::default(),
        }
    }
}

/// IncludeOS's panic signature and Linux's.
pub const DEFAULT_PANIC: &str = r"\*\*\*\* PANIC \*\*\*\*|Kernel panic - not syncing";

/// Why a check failed, for callers that map failures to exit statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum FailureKind {
    /// The check could not be set up (options, work directory).
    Setup,
    /// QEMU did not start, or exited before the guest was ready.
    BootFailed,
    /// The guest was not ready in time (or printed no counter before the save).
    Timeout,
    /// The guest printed a panic line.
    Panic,
    /// The save (or the migration's source side) failed.
    SaveFailed,
    /// QEMU (or the check before it) refused the state on restore.
    RestoreRefused,
    /// A rejected line appeared after the guest was ready: it booted afresh.
    Rebooted,
    /// The counter started over, or stopped, after the restore.
    CounterRestarted,
    /// An expected line did not appear after the restore.
    ExpectedMissing,
    /// The RAM region differs between source and destination.
    RamDiffers,
    /// Cancelled on request.
    Cancelled,
}

/// A failed check: which, and what was seen.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// The check that failed, in words (`ready`, `counter`).
    pub check: String,
    /// What was seen.
    pub detail: String,
}

/// One check and its outcome, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Passed {
    /// Its name.
    pub check: String,
    /// What was seen.
    pub detail: String,
}

/// What a check did and found.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Report {
    /// Whether every check passed.
    pub passed: bool,
    /// The first failure.
    pub failure: Option<Failure>,
    /// The checks that passed, in order.
    pub checks: Vec<Passed>,
    /// The saving QEMU's version.
    pub qemu: String,
    /// The restoring QEMU's version.
    pub restore_qemu: String,
    /// How the state went over.
    pub transport: Transport,
    /// The machine type pinned for a newer restoring QEMU.
    pub pinned_machine: Option<Pinned>,
    /// From QEMU's start to the ready line, in seconds.
    pub ready_seconds: Option<f64>,
    /// The save (or whole live migration), in seconds.
    pub save_seconds: Option<f64>,
    /// The restore, to the guest running, in seconds.
    pub restore_seconds: Option<f64>,
    /// The state file's size.
    pub state_bytes: Option<u64>,
    /// The last counter value before the save.
    pub counter_before: Option<u64>,
    /// The counter values after the restore.
    pub counter_after: Vec<u64>,
    /// The whole check, in seconds.
    pub total_seconds: f64,
    /// The serial log, the state and QEMUs' stderr.
    pub workdir: PathBuf,
}

/// Runs the check; the report says what passed and what failed.
pub fn run(check: &Check) -> Report {
    let started = Instant::now();
    let version = |q: &Path| {
        crate::vm::binary_version(q, &check.env)
            .map(|v| v.to_string())
            .unwrap_or_else(|_| "unknown".into())
    };
    let mut report = Report {
        passed: false,
        failure: None,
        checks: Vec::new(),
        qemu: version(&check.qemu),
        restore_qemu: version(check.restore_qemu.as_deref().unwrap_or(&check.qemu)),
        transport: check.transport,
        pinned_machine: None,
        ready_seconds: None,
        save_seconds: None,
        restore_seconds: None,
        state_bytes: None,
        counter_before: None,
        counter_after: Vec::new(),
        total_seconds: 0.0,
        workdir: check.workdir.clone(),
    };
    let outcome = Run::new(check, &mut report).and_then(|mut r| r.go());
    if let Err(f) = outcome {
        report.failure = Some(f);
    } else {
        report.passed = true;
    }
    report.total_seconds = started.elapsed().as_secs_f64();
    report
}

fn fail<T>(kind: FailureKind, check: &str, detail: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        kind,
        check: check.into(),
        detail: detail.into(),
    })
}

/// What QEMU said, for a failure's detail.
fn said(e: &Error) -> String {
    e.to_string()
}

/// A QEMU the check started some other way than `Vm::launch` (a live
/// migration's detached destination): killed when the check ends, and by
/// the keeper (see `os::keeper`) if the check dies first.
struct Reap(Option<u32>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill only sends a signal, to a QEMU this check started.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            crate::os::keeper::release(pid);
        }
    }
}

/// A library error's failure kind: a refusal before anything changed is the
/// state refused; anything else is `otherwise`.
fn kind_of(e: &Error, otherwise: FailureKind) -> FailureKind {
    match e.kind() {
        crate::ErrorKind::Cancelled => FailureKind::Cancelled,
        crate::ErrorKind::Refused => FailureKind::RestoreRefused,
        _ => otherwise,
    }
}

/// The counter's value on `line`, if it is a counter line.
fn count(re: &Regex, line: &str) -> Option<u64> {
    re.captures(line)?.get(1)?.as_str().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ram_regions() {
        assert_eq!(
            "0x400000:1M".parse::<RamRegion>().unwrap(),
            RamRegion {
                addr: 0x40_0000,
                size: 1 << 20
            }
        );
        assert_eq!(
            "4096:0x1000".parse::<RamRegion>().unwrap(),
            RamRegion {
                addr: 4096,
                size: 4096
            }
        );
        assert!("0x400000".parse::<RamRegion>().is_err());
        assert!("1:0".parse::<RamRegion>().is_err());
    }

    #[test]
    fn reads_counters() {
        let re = Regex::new(r"^tick (\d+)").unwrap();
        assert_eq!(count(&re, "tick 12"), Some(12));
        assert_eq!(count(&re, "BOOT"), None);
    }
}
