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

mod report;
pub mod serial;

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
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Transport, String> {
        match s {
            "file" => Ok(Transport::File),
            "live-local" => Ok(Transport::LiveLocal),
            "live-tcp" => Ok(Transport::LiveTcp),
            _ => Err(format!("{s:?}: expected file, live-local or live-tcp")),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::File => "file",
            Transport::LiveLocal => "live-local",
            Transport::LiveTcp => "live-tcp",
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
/// migration's detached destination): killed when the check ends.
struct Reap(Option<u32>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill only sends a signal, to a QEMU this check started.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

struct Run<'a> {
    check: &'a Check,
    report: &'a mut Report,
    args: Vec<String>,
    serial: Follow,
    /// Where the guest's lines after "ready" start.
    ready_line: usize,
}

impl<'a> Run<'a> {
    fn new(check: &'a Check, report: &'a mut Report) -> Result<Run<'a>, Failure> {
        std::fs::create_dir_all(&check.workdir).or_else(|e| {
            fail(
                FailureKind::Setup,
                "setup",
                format!("{}: {e}", check.workdir.display()),
            )
        })?;
        let log = check.workdir.join("serial.log");
        let _ = std::fs::remove_file(&log);
        for f in ["state", "state.manifest.json"] {
            let _ = std::fs::remove_file(check.workdir.join(f));
        }
        let mut args = serial::to_file(&check.args, &log)
            .or_else(|e| fail(FailureKind::Setup, "setup", e.0))?;
        if check.transport == Transport::LiveLocal {
            // The destination's monitor, reachable once the migration hands it over.
            args.extend([
                "-qmp".into(),
                format!(
                    "unix:{},server,nowait",
                    check.workdir.join("roundtrip-qmp.sock").display()
                ),
            ]);
        }
        Ok(Run {
            check,
            report,
            args,
            serial: Follow::new(&log),
            ready_line: 0,
        })
    }

    fn go(&mut self) -> Result<(), Failure> {
        let c = self.check;
        let launched = Instant::now();
        let mut src = Vm::launch(
            &c.qemu,
            &self.args,
            &LaunchOptions::new(Console::Null, c.env.clone()),
        )
        .or_else(|e| fail(FailureKind::BootFailed, "boot", said(&e)))?;

        // Ready.
        let deadline = launched + c.timeout;
        let ready = &c.ready;
        let panic = c.panic.clone();
        let found = self.serial.wait(
            deadline,
            || !src.launched().is_some_and(|l| l.has_exited()),
            |lines| {
                lines.iter().any(|(_, l)| {
                    ready.is_match(l) || panic.as_ref().is_some_and(|p| p.is_match(l))
                })
            },
        );
        self.check_panic(0)?;
        if !found {
            if src.launched().is_some_and(|l| l.has_exited()) {
                let e = src.exited("before the guest was ready");
                return fail(FailureKind::BootFailed, "boot", said(&e));
            }
            return fail(
                FailureKind::Timeout,
                "ready",
                format!(
                    "no line matching {:?} within {:?}; the guest printed: {}",
                    ready.as_str(),
                    c.timeout,
                    self.tail(0)
                ),
            );
        }
        let lines = self.serial.lines();
        let idx = lines
            .iter()
            .position(|(_, l)| ready.is_match(l))
            .expect("found");
        self.ready_line = idx + 1;
        self.report.ready_seconds = Some((lines[idx].0 - launched).as_secs_f64());
        let detail = format!(
            "{:?}, {:.2} s after QEMU started",
            lines[idx].1,
            (lines[idx].0 - launched).as_secs_f64()
        );
        self.passed("ready", detail);

        // A counter to continue from.
        if let Some(counter) = &c.counter {
            let from = self.ready_line.saturating_sub(1);
            let seen = self.serial.wait(
                Instant::now() + c.timeout,
                || !src.launched().is_some_and(|l| l.has_exited()),
                |lines| {
                    lines[from..]
                        .iter()
                        .any(|(_, l)| count(counter, l).is_some())
                },
            );
            if !seen {
                return fail(
                    FailureKind::Timeout,
                    "counter",
                    format!(
                        "the source printed no line matching {:?} after it was ready",
                        counter.as_str()
                    ),
                );
            }
        }
        self.check_reject()?;

        let (dest, reap, after) = match c.transport {
            Transport::File => self.by_file(src)?,
            Transport::LiveLocal | Transport::LiveTcp => self.live(src)?,
        };
        let _reap = reap;
        let mut dest = dest;
        self.after_restore(&mut dest, after)?;
        if let Some(vm) = dest.as_mut() {
            let _ = vm.monitor.quit();
        }
        Ok(())
    }

    /// Saves to a file and restores it; returns the destination and the
    /// first line that is the destination's.
    fn by_file(&mut self, mut src: Vm) -> Result<(Option<Vm>, Reap, usize), Failure> {
        let c = self.check;
        let state = c.workdir.join("state");
        let options = SaveOptions {
            then: if c.ram.is_some() {
                Then::Stop
            } else {
                Then::Quit
            },
            // The state lives only as long as the check.
            no_sync: true,
            cancel: Arc::clone(&c.cancel),
            ..SaveOptions::default()
        };
        let saved = save::save(&mut src, &state, &options, &Quiet)
            .or_else(|e| fail(kind_of(&e, FailureKind::SaveFailed), "save", said(&e)))?;
        self.report.save_seconds = Some(saved.elapsed.as_secs_f64());
        self.report.state_bytes = Some(saved.manifest.stream_bytes);
        self.passed(
            "save",
            format!(
                "{:.1} MB in {:.2} s",
                saved.manifest.stream_bytes as f64 / 1e6,
                saved.elapsed.as_secs_f64()
            ),
        );
        let source_ram = match c.ram {
            Some(region) => {
                let dump = self.dump(&mut src, region, "source")?;
                let _ = src.monitor.quit();
                Some(dump)
            }
            None => None,
        };
        if let Some(l) = src.launched() {
            let _ = l.wait();
        }
        drop(src);
        self.serial.poll();
        let after = self.serial.lines().len();
        self.record_counter_before(after);

        let options = RestoreOptions {
            qemu: c.restore_qemu.clone(),
            paused: c.ram.is_some(),
            console: Console::Null,
            cancel: Arc::clone(&c.cancel),
            ..RestoreOptions::default()
        };
        let restored = restore::restore(&state, &options, &Quiet).or_else(|e| {
            fail(
                kind_of(&e, FailureKind::RestoreRefused),
                "restore",
                said(&e),
            )
        })?;
        self.report.restore_seconds = Some(restored.elapsed.as_secs_f64());
        self.report.pinned_machine.clone_from(&restored.pinned);
        let mut dest = restored.vm;
        let loaded = format!(
            "QEMU loaded the state in {:.2} s",
            restored.elapsed.as_secs_f64()
        );
        self.passed("restore", self.pinned_words(&loaded));
        if let (Some(region), Some(before)) = (c.ram, source_ram) {
            self.compare_ram(&mut dest, region, &before)?;
            dest.monitor
                .cont()
                .or_else(|e| fail(FailureKind::RestoreRefused, "restore", e.to_string()))?;
        }
        Ok((Some(dest), Reap(None), after))
    }

    /// Migrates live to a local QEMU or a receiver on 127.0.0.1.
    fn live(&mut self, mut src: Vm) -> Result<(Option<Vm>, Reap, usize), Failure> {
        let c = self.check;
        let mut options = LiveOptions {
            cancel: Arc::clone(&c.cancel),
            destination_qemu: c.restore_qemu.clone(),
            ..LiveOptions::default()
        };
        if c.ram.is_some() {
            // The region can be compared only while nothing writes it.
            src.monitor
                .stop()
                .or_else(|e| fail(FailureKind::SaveFailed, "save", e.to_string()))?;
            options.then = live::AfterLive::Stop;
        }
        self.serial.poll();
        let after = self.serial.lines().len();
        let started = Instant::now();
        let (outcome, dest) = match c.transport {
            Transport::LiveTcp => {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
                    .or_else(|e| fail(FailureKind::Setup, "setup", e.to_string()))?;
                let mut args = self.args.clone();
                // A receiver knows no source: the source's machine type is given it here.
                if c.restore_qemu.is_some() {
                    if let Ok(Some(m)) = machine::resolve(&c.qemu, &c.env, &self.args) {
                        if let Some((pinned, p)) = machine::pin(&args, &m) {
                            let newer = machine::resolve(
                                c.restore_qemu.as_deref().unwrap_or(&c.qemu),
                                &c.env,
                                &args,
                            )
                            .ok()
                            .flatten()
                            .is_some_and(|d| machine::is_newer(&d, &m));
                            if newer {
                                args = pinned;
                                self.report.pinned_machine = Some(p);
                            }
                        }
                    }
                }
                let stop_receiver = Arc::new(AtomicBool::new(false));
                let ro = ReceiveOptions {
                    qemu: Some(c.restore_qemu.clone().unwrap_or_else(|| c.qemu.clone())),
                    console: Console::Null,
                    cancel: Arc::clone(&stop_receiver),
                };
                let receiver = live::Receiver::start(
                    &format!("tcp:127.0.0.1:{port}"),
                    &VmSpec::Args(args),
                    &ro,
                )
                .or_else(|e| fail(FailureKind::RestoreRefused, "restore", said(&e)))?;
                let waiting = std::thread::spawn(move || receiver.finish(&ro, &Quiet));
                let to = Destination::Tcp {
                    host: "127.0.0.1".into(),
                    port,
                };
                let outcome = live::live(&mut src, &to, &options, &Quiet);
                if outcome.is_err() {
                    // The receiver waits for a stream that will not come.
                    stop_receiver.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                let received = waiting.join().expect("the receiver thread does not panic");
                match (outcome, received) {
                    (Ok(r), Ok(received)) => (Ok(r), Some(received.vm)),
                    (Ok(_), Err(e)) | (Err(e), _) => (Err(e), None),
                }
            }
            _ => (
                live::live(&mut src, &Destination::Local, &options, &Quiet),
                None,
            ),
        };
        let r = outcome.or_else(|e| {
            let kind = match &e {
                Error::MigrationFailed(_) | Error::QemuExited { .. } => FailureKind::RestoreRefused,
                e => kind_of(e, FailureKind::RestoreRefused),
            };
            fail(kind, "restore", said(&e))
        })?;
        self.report.save_seconds = Some(started.elapsed().as_secs_f64());
        self.report.restore_seconds = r.migration.downtime_ms.map(|ms| ms as f64 / 1000.0);
        self.report.state_bytes = Some(r.migration.transferred);
        if self.report.pinned_machine.is_none() {
            self.report.pinned_machine.clone_from(&r.pinned);
        }
        let reap = Reap(r.destination_pid.filter(|_| dest.is_none()));
        let mut dest = match dest {
            Some(d) => d,
            None => Vm::attach(self.check.workdir.join("roundtrip-qmp.sock"), c.timeout)
                .or_else(|e| fail(FailureKind::RestoreRefused, "restore", said(&e)))?,
        };
        self.passed(
            "migrate",
            self.pinned_words(&format!(
                "{:.1} MB sent in {:.2} s, downtime {}, the guest {} on the destination",
                r.migration.transferred as f64 / 1e6,
                started.elapsed().as_secs_f64(),
                r.migration
                    .downtime_ms
                    .map_or("unknown".into(), |d| format!("{d} ms")),
                r.destination_state
            )),
        );
        if let Some(region) = c.ram {
            let before = self.dump(&mut src, region, "source")?;
            let _ = src.monitor.quit();
            self.compare_ram(&mut dest, region, &before)?;
            dest.monitor
                .cont()
                .or_else(|e| fail(FailureKind::RestoreRefused, "restore", e.to_string()))?;
        }
        drop(src);
        self.record_counter_before(after);
        Ok((Some(dest), reap, after))
    }

    fn pinned_words(&self, base: &str) -> String {
        match &self.report.pinned_machine {
            Some(p) => format!("{base}; {p}"),
            None => base.to_string(),
        }
    }

    /// Waits for what must come after the restore, then judges it all.
    fn after_restore(&mut self, dest: &mut Option<Vm>, after: usize) -> Result<(), Failure> {
        let c = self.check;
        let deadline = Instant::now() + c.timeout;
        let counter = c.counter.clone();
        let expect = c.expect.clone();
        let want = c.counter_after;
        let panic = c.panic.clone();
        let reject = c.reject.clone();
        let ready_line = self.ready_line;
        let before = self.report.counter_before;
        let alive = || {
            dest.as_mut()
                .is_none_or(|v| !v.launched().is_some_and(|l| l.has_exited()))
        };
        if counter.is_none() && expect.is_empty() {
            // Nothing to wait for: watch for what must not come.
            let until = Instant::now() + c.watch;
            self.serial.wait(until, alive, |lines| {
                lines[ready_line.min(lines.len())..].iter().any(|(_, l)| {
                    panic.as_ref().is_some_and(|p| p.is_match(l))
                        || reject.iter().any(|r| r.is_match(l))
                })
            });
        } else {
            self.serial.wait(deadline, alive, |lines| {
                let new = &lines[after.min(lines.len())..];
                let bad = lines[ready_line.min(lines.len())..].iter().any(|(_, l)| {
                    panic.as_ref().is_some_and(|p| p.is_match(l))
                        || reject.iter().any(|r| r.is_match(l))
                });
                let expected = expect
                    .iter()
                    .all(|e| new.iter().any(|(_, l)| e.is_match(l)));
                let values: Vec<u64> = counter
                    .as_ref()
                    .map(|r| new.iter().filter_map(|(_, l)| count(r, l)).collect())
                    .unwrap_or_default();
                let counted = counter.is_none() || values.len() >= want;
                // A counter that went down will not recover: judged at once.
                let restarted = before
                    .into_iter()
                    .chain(values.iter().copied())
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w[1] <= w[0]);
                bad || restarted || (expected && counted)
            });
        }
        self.check_panic(ready_line)?;
        self.check_reject()?;
        let lines: Vec<String> = self.serial.lines().iter().map(|(_, l)| l.clone()).collect();
        if let Some(counter) = &c.counter {
            let after_values: Vec<u64> = lines[after.min(lines.len())..]
                .iter()
                .filter_map(|l| count(counter, l))
                .collect();
            self.report.counter_after.clone_from(&after_values);
            let before = self.report.counter_before;
            let mut previous = before;
            for &v in &after_values {
                if previous.is_some_and(|p| v <= p) {
                    return fail(
                        FailureKind::CounterRestarted,
                        "counter",
                        format!(
                            "the counter went from {} to {v} after the restore: it started over \
                             (before the save it reached {})",
                            previous.unwrap_or(0),
                            before.map_or("nothing".into(), |b| b.to_string())
                        ),
                    );
                }
                previous = Some(v);
            }
            if after_values.len() < c.counter_after {
                return fail(
                    FailureKind::CounterRestarted,
                    "counter",
                    format!(
                        "the destination printed {} counter line(s) within {:?}, {} wanted; it \
                         printed: {}",
                        after_values.len(),
                        c.timeout,
                        c.counter_after,
                        self.tail(after)
                    ),
                );
            }
            self.passed(
                "counter",
                format!(
                    "source ..{}, destination {}..{}",
                    before.map_or("?".into(), |b| b.to_string()),
                    after_values[0],
                    after_values[after_values.len() - 1]
                ),
            );
        }
        for e in &c.expect {
            if !lines[after.min(lines.len())..]
                .iter()
                .any(|l| e.is_match(l))
            {
                return fail(
                    FailureKind::ExpectedMissing,
                    "expect",
                    format!(
                        "no line matching {:?} after the restore within {:?}; the destination \
                         printed: {}",
                        e.as_str(),
                        c.timeout,
                        self.tail(after)
                    ),
                );
            }
            self.passed("expect", format!("{:?} seen after the restore", e.as_str()));
        }
        if let Some(vm) = dest.as_mut() {
            if vm.launched().is_some_and(|l| l.has_exited()) {
                let e = vm.exited("after the restore");
                return fail(FailureKind::RestoreRefused, "restore", said(&e));
            }
        }
        for r in &c.reject {
            self.passed("reject", format!("{:?} not seen once ready", r.as_str()));
        }
        Ok(())
    }

    fn record_counter_before(&mut self, upto: usize) {
        if let Some(counter) = &self.check.counter {
            self.report.counter_before = self.serial.lines()[..upto.min(self.serial.lines().len())]
                .iter()
                .filter_map(|(_, l)| count(counter, l))
                .next_back();
        }
    }

    fn check_panic(&mut self, from: usize) -> Result<(), Failure> {
        let Some(p) = &self.check.panic else {
            return Ok(());
        };
        let lines = self.serial.lines();
        if let Some((_, l)) = lines[from.min(lines.len())..]
            .iter()
            .find(|(_, l)| p.is_match(l))
        {
            return fail(
                FailureKind::Panic,
                "panic",
                format!("the guest panicked: {l:?}"),
            );
        }
        Ok(())
    }

    fn check_reject(&mut self) -> Result<(), Failure> {
        let lines = self.serial.lines();
        for r in &self.check.reject {
            if let Some((_, l)) = lines[self.ready_line.min(lines.len())..]
                .iter()
                .find(|(_, l)| r.is_match(l))
            {
                return fail(
                    FailureKind::Rebooted,
                    "reject",
                    format!(
                        "{l:?} (matching {:?}) appeared after the guest was ready: it booted \
                         afresh instead of carrying on",
                        r.as_str()
                    ),
                );
            }
        }
        Ok(())
    }

    /// `pmemsave` of the region from a paused VM.
    fn dump(&mut self, vm: &mut Vm, region: RamRegion, side: &str) -> Result<Vec<u8>, Failure> {
        let path = self.check.workdir.join(format!("ram-{side}.bin"));
        let _ = std::fs::remove_file(&path);
        let out = vm
            .monitor
            .human_command(&format!(
                "pmemsave {} {} \"{}\"",
                region.addr,
                region.size,
                path.display()
            ))
            .or_else(|e| fail(FailureKind::RamDiffers, "ram", e.to_string()))?;
        let bytes = std::fs::read(&path).or_else(|e| {
            fail(
                FailureKind::RamDiffers,
                "ram",
                format!("pmemsave on the {side} wrote nothing ({e}): {}", out.trim()),
            )
        })?;
        let _ = std::fs::remove_file(&path);
        Ok(bytes)
    }

    fn compare_ram(
        &mut self,
        dest: &mut Vm,
        region: RamRegion,
        before: &[u8],
    ) -> Result<(), Failure> {
        let after = self.dump(dest, region, "destination")?;
        if let Some(i) = before.iter().zip(&after).position(|(a, b)| a != b) {
            return fail(
                FailureKind::RamDiffers,
                "ram",
                format!(
                    "guest RAM at {:#x} is {:#04x} on the destination, {:#04x} when saved",
                    region.addr + i as u64,
                    after[i],
                    before[i]
                ),
            );
        }
        if after.len() != before.len() {
            return fail(
                FailureKind::RamDiffers,
                "ram",
                format!("{} bytes read back, {} saved", after.len(), before.len()),
            );
        }
        self.passed(
            "ram",
            format!(
                "{:#x}+{:#x} identical after the restore",
                region.addr, region.size
            ),
        );
        Ok(())
    }

    fn passed(&mut self, check: &str, detail: String) {
        self.report.checks.push(Passed {
            check: check.into(),
            detail,
        });
    }

    /// The last lines from `from` on, for a failure's detail.
    fn tail(&self, from: usize) -> String {
        let lines = self.serial.lines();
        let new = &lines[from.min(lines.len())..];
        let shown: Vec<&str> = new
            .iter()
            .skip(new.len().saturating_sub(5))
            .map(|(_, l)| l.as_str())
            .collect();
        if shown.is_empty() {
            "nothing".into()
        } else {
            format!("{shown:?}")
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
