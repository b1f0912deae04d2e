//! `cargo xtask e2e`: the user's recipe, end to end, checked. Boots a guest
//! with the IncludeOS boot shape and the recipe's options, saves it with the
//! recipe's own `migrate "exec:cat > STATE"` line sent through monitor-send in
//! nc's form, restores it in a new QEMU with `-incoming "exec: cat STATE"`,
//! and proves from the serial output and RAM that it carried on.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qemu_monitor::Monitor;
use qemu_monitor::Options;
use test_guest::{tick, Banner, Lines};

use crate::qemu::{self, Qemu};

const WAIT: Duration = Duration::from_secs(60);
/// Ticks the source prints before the save, and the destination after.
const TICKS_BEFORE: u64 = 3;
const TICKS_AFTER: u64 = 5;
/// The guest's rate may sag under TCG on a loaded host (QEMU drops timer
/// interrupts it cannot deliver in time); a restore that broke the timer
/// would be far outside this.
const RATE_TOLERANCE: f64 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Exec,
    Unix,
    Tcp,
    File,
    /// `qemu-migrate save` and `restore` (the library), not the recipe's line.
    QemuMigrate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorKind {
    Hmp,
    Qmp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestKind {
    Test,
    Linux,
    /// A guest of the user's (e.g. IncludeOS's chainloader and a service).
    Custom {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        append: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Breaks the restore on purpose, to show that the checks catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sabotage {
    /// Restore with `-m 64` instead of `-m 32`.
    WrongMemory,
    /// Cut the state file in half.
    Truncate,
    /// Boot the destination afresh instead of restoring.
    Reboot,
    /// Flip a byte of guest RAM inside the state file.
    FlipRam,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub qemu: Qemu,
    pub accel: Accel,
    pub transport: Transport,
    pub monitor: MonitorKind,
    pub guest: GuestKind,
    pub sabotage: Option<Sabotage>,
    /// Restore on this (newer) QEMU instead of `qemu` (`--upgrade`; see upgrade.rs).
    pub restore_qemu: Option<Qemu>,
}

impl Scenario {
    pub fn name(&self) -> String {
        let guest = match &self.guest {
            GuestKind::Test => "test",
            GuestKind::Linux => "linux",
            GuestKind::Custom { .. } => "custom",
        };
        let mut name = format!(
            "qemu-{}-{}-{}-{guest}",
            crate::upgrade::versions(self),
            format!("{:?}", self.transport).to_lowercase(),
            format!("{:?}", self.monitor).to_lowercase()
        );
        if let Some(s) = self.sabotage {
            name.push_str(&format!("-{s:?}").to_lowercase());
        }
        name
    }
}

/// What a passing run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub name: String,
    pub accel: Accel,
    pub qemu_version: String,
    pub state_bytes: Option<u64>,
    pub boot_to_first_tick: Duration,
    pub guest_to_first_tick: Duration,
    pub save: Duration,
    pub restore: Duration,
    pub last_tick_before: u64,
    pub first_tick_after: u64,
    pub last_tick_after: u64,
    pub rate_before: f64,
    pub rate_after: f64,
    pub checks: Vec<&'static str>,
}

/// A failed check: which, what was seen, and where the logs were kept.
#[derive(Debug)]
pub struct Failure {
    pub check: &'static str,
    pub detail: String,
    pub kept: Option<PathBuf>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "check failed: {}: {}", self.check, self.detail)?;
        if let Some(k) = &self.kept {
            write!(
                f,
                "\n  serial logs, QEMU's stderr and the state are kept in {}",
                k.display()
            )?;
        }
        Ok(())
    }
}

fn fail<T>(check: &'static str, detail: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        check,
        detail: detail.into(),
        kept: None,
    })
}

/// What every run needs: the binaries and where to work.
#[derive(Debug, Clone)]
pub struct Kit {
    pub root: PathBuf,
    pub guest: PathBuf,
    pub monitor_send: PathBuf,
    /// The Linux guest's files, when a scenario needs them.
    pub linux: Option<GuestFiles>,
}

/// A guest's kernel, initrd and command line.
#[derive(Debug, Clone)]
pub struct GuestFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
}

/// A QEMU this harness started, with its serial console collected.
struct Running {
    process: Process,
    serial: Lines,
    started: Instant,
}

/// A QEMU started by the harness itself, or by qemu-migrate's restore.
enum Process {
    Started { child: Child, stderr_log: PathBuf },
    Restored(Box<qemu_migrate::Vm>),
}

impl Running {
    /// QEMU's own words, without the harmless module warnings.
    fn said(&self) -> String {
        let stderr = match &self.process {
            Process::Started { stderr_log, .. } => {
                fs::read_to_string(stderr_log).unwrap_or_default()
            }
            Process::Restored(vm) => vm.stderr(),
        };
        stderr
            .lines()
            .filter(|l| !l.contains("failed to open module") && !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" / ")
    }

    /// Waits for QEMU to exit (it has, or is about to: it refused the state).
    fn wait(&mut self) {
        match &mut self.process {
            Process::Started { child, .. } => {
                let _ = child.wait();
            }
            Process::Restored(vm) => {
                if let Some(l) = vm.launched() {
                    let _ = l.wait();
                }
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A restored VM's handle ends its QEMU itself.
        if let Process::Started { child, .. } = &mut self.process {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_qemu(qemu: &Qemu, args: &[String], dir: &Path, role: &str) -> Result<Running, Failure> {
    let stderr_log = dir.join(format!("{role}-stderr.log"));
    let serial_log = fs::File::create(dir.join(format!("{role}-serial.log"))).ok();
    let stderr = fs::File::create(&stderr_log).map_err(|e| Failure {
        check: "setup",
        detail: format!("{}: {e}", stderr_log.display()),
        kept: None,
    })?;
    let mut child = Command::new(&qemu.binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| Failure {
            check: "setup",
            detail: format!("starting {}: {e}", qemu.binary.display()),
            kept: None,
        })?;
    let serial = Lines::collect_to(child.stdout.take().expect("piped"), serial_log);
    Ok(Running {
        process: Process::Started { child, stderr_log },
        serial,
        started: Instant::now(),
    })
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
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "-serial".into(),
        "stdio".into(),
        "-kernel".into(),
        guest.display().to_string(),
    ])
    .collect();
    match start_qemu(qemu, &args, dir.path(), "kvm-probe") {
        Ok(run) => {
            if run
                .serial
                .try_wait_for(0, Duration::from_secs(2), |l| tick(l) == Some(1))
                .is_ok()
            {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        }
        Err(_) => Accel::Tcg,
    }
}

fn accel_args(accel: Accel) -> Vec<String> {
    match accel {
        // The recipe's own choice where it works.
        Accel::Kvm => vec!["-cpu".into(), "host".into(), "-enable-kvm".into()],
        Accel::Tcg => vec!["-accel".into(), "tcg".into()],
    }
}

/// A free TCP port on 127.0.0.1 for a live migration.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(4444)
}

fn control(sock: &Path, timeout: Duration) -> Result<Monitor, Failure> {
    qemu_monitor::connect(
        sock.to_path_buf(),
        &Options {
            timeout,
            wait_socket: Some(Duration::from_secs(20)),
        },
    )
    .map_err(|e| Failure {
        check: "monitor",
        detail: e.to_string(),
        kept: None,
    })
}

fn monitor_err<E: std::fmt::Display>(check: &'static str) -> impl Fn(E) -> Failure {
    move |e| Failure {
        check,
        detail: e.to_string(),
        kept: None,
    }
}

/// Runs one scenario; on failure its logs stay under target/e2e/NAME.
pub fn run_one(kit: &Kit, sc: &Scenario) -> Result<Report, Failure> {
    let dir = kit.root.join("target/e2e").join(sc.name());
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| Failure {
        check: "setup",
        detail: format!("{}: {e}", dir.display()),
        kept: None,
    })?;
    match run_in(kit, sc, &dir) {
        Ok(r) => {
            let _ = fs::remove_dir_all(&dir);
            Ok(r)
        }
        Err(mut f) => {
            f.kept = Some(dir);
            Err(f)
        }
    }
}

fn run_in(kit: &Kit, sc: &Scenario, dir: &Path) -> Result<Report, Failure> {
    let mut checks = Vec::new();
    // The guest, booted as IncludeOS's chainloader is: -kernel, -append, -initrd.
    let payload = dir.join("hello.bin");
    let payload_bytes: Vec<u8> = b"hello from the e2e payload\n".repeat(100);
    fs::write(&payload, &payload_bytes).map_err(|e| Failure {
        check: "setup",
        detail: e.to_string(),
        kept: None,
    })?;
    let (kernel, initrd, append, ram_mib) = match &sc.guest {
        GuestKind::Test => (
            kit.guest.clone(),
            Some(payload.clone()),
            "-initrd hello.bin".to_string(),
            32,
        ),
        GuestKind::Linux => {
            let Some(l) = kit.linux.as_ref() else {
                return fail("setup", "the Linux guest was not prepared");
            };
            (
                l.kernel.clone(),
                Some(l.initrd.clone()),
                l.append.clone(),
                256,
            )
        }
        GuestKind::Custom {
            kernel,
            initrd,
            append,
        } => (kernel.clone(), initrd.clone(), append.clone(), 32),
    };
    let sock = dir.join("qemu-sock");
    let state = dir.join("statefile");
    // The recipe's options, plus a private QMP socket from which the harness
    // watches (the user's socket is for the recipe's line alone).
    let vm_args = |ram: u32, sock: &Path, harness: &Path| -> Vec<String> {
        let mut a = accel_args(sc.accel);
        a.extend(
            [
                "-m",
                &ram.to_string(),
                "-nodefaults",
                "-display",
                "none",
                "-serial",
                "stdio",
            ]
            .map(String::from),
        );
        a.extend([
            "-kernel".into(),
            kernel.display().to_string(),
            "-append".into(),
            append.clone(),
        ]);
        if let Some(i) = &initrd {
            a.extend(["-initrd".into(), i.display().to_string()]);
        }
        let flag = match sc.monitor {
            MonitorKind::Hmp => "-monitor",
            MonitorKind::Qmp => "-qmp",
        };
        a.extend([
            flag.into(),
            format!("unix:{},server,nowait", sock.display()),
        ]);
        a.extend([
            "-qmp".into(),
            format!("unix:{},server,nowait", harness.display()),
        ]);
        a
    };
    let harness_src = dir.join("harness-source.sock");
    let harness_dest = dir.join("harness-destination.sock");

    // The source.
    let src = start_qemu(
        &sc.qemu,
        &vm_args(ram_mib, &sock, &harness_src),
        dir,
        "source",
    )?;
    let banner_idx = src
        .serial
        .try_wait_for(0, WAIT, |l| !l.trim().is_empty())
        .or_else(|got| {
            fail(
                "boot",
                format!(
                    "the source printed nothing: {got:?}; QEMU said: {}",
                    src.said()
                ),
            )
        })?;
    let banner_line = src.serial.snapshot()[banner_idx].clone();
    if sc.guest == GuestKind::Test {
        let banner = Banner::parse(&banner_line).ok_or(()).or_else(|()| {
            fail(
                "banner",
                format!("not the test guest's banner: {banner_line:?}"),
            )
        })?;
        if banner.cmdline != append
            || banner.module_size != payload_bytes.len() as u64
            || banner.module_sum != test_guest::adler32(&payload_bytes)
        {
            return fail(
                "banner",
                format!(
                    "the guest did not get the -append/-initrd it was given: {banner_line:?} \
                     (expected cmdline {append:?}, module_size {}, module_sum {:08x})",
                    payload_bytes.len(),
                    test_guest::adler32(&payload_bytes)
                ),
            );
        }
        checks.push("banner");
    } else if sc.guest == GuestKind::Linux {
        if !banner_line.starts_with(crate::linux_guest::BANNER) {
            return fail(
                "banner",
                format!("not the Linux test guest's banner: {banner_line:?}"),
            );
        }
        checks.push("banner");
    }
    // A guest of the user's may print no ticks: then the checks that need
    // them do not apply.
    let ticking = match sc.guest {
        GuestKind::Custom { .. } => src
            .serial
            .try_wait_for(0, Duration::from_secs(5), |l| tick(l) == Some(1))
            .is_ok(),
        _ => true,
    };
    let (boot_to_first_tick, guest_to_first_tick) = if ticking {
        let first = src
            .serial
            .try_wait_for(0, WAIT, |l| tick(l) == Some(1))
            .or_else(|got| {
                fail(
                    "boot",
                    format!(
                        "no tick 1 from the source: {got:?}; QEMU said: {}",
                        src.said()
                    ),
                )
            })?;
        let timed = src.serial.timed();
        src.serial
            .try_wait_for(first, WAIT, |l| tick(l) == Some(TICKS_BEFORE))
            .or_else(|got| fail("boot", format!("no tick {TICKS_BEFORE}: {got:?}")))?;
        // The guest's own part: from its first line (QEMU and firmware are done).
        (
            timed[first].0 - src.started,
            timed[first].0 - timed[banner_idx].0,
        )
    } else {
        (
            src.serial.timed()[banner_idx].0 - src.started,
            Duration::ZERO,
        )
    };

    let mut watch = control(&harness_src, WAIT)?;
    watch
        .set_capability("events", true)
        .map_err(monitor_err("monitor"))?;

    // For a live migration the destination listens first.
    let dest_sock = dir.join("qemu-sock-dest");
    let (uri, mut live_dest) = match sc.transport {
        Transport::Exec => (format!("exec:cat > {}", state.display()), None),
        Transport::File => (format!("file:{}", state.display()), None),
        Transport::QemuMigrate => (String::new(), None),
        Transport::Unix | Transport::Tcp => {
            let incoming = if sc.transport == Transport::Unix {
                format!("unix:{}", dir.join("migration.sock").display())
            } else {
                format!("tcp:127.0.0.1:{}", free_port())
            };
            let mut args = vm_args(ram_mib, &dest_sock, &harness_dest);
            args.extend(["-incoming".into(), incoming.clone()]);
            crate::upgrade::pin_by_hand(sc, &mut args);
            let dest = start_qemu(crate::upgrade::dest_qemu(sc), &args, dir, "destination")?;
            // A command is answered from QEMU's main loop, which runs only
            // once its incoming side is set up (the greeting may come earlier,
            // from the monitor's own thread).
            let mut c = control(&harness_dest, WAIT)?;
            c.status().map_err(monitor_err("monitor"))?;
            c.close().map_err(monitor_err("monitor"))?;
            (incoming, Some(dest))
        }
    };

    let save = if sc.transport == Transport::QemuMigrate {
        // The orchestrator, through the user's own monitor socket.
        let started = Instant::now();
        let mut vm = qemu_migrate::Vm::attach(sock.clone(), WAIT).map_err(monitor_err("save"))?;
        let mut options = qemu_migrate::save::SaveOptions::default();
        options.then = qemu_migrate::save::Then::Quit;
        qemu_migrate::save::save(&mut vm, &state, &options, &qemu_migrate::progress::Quiet)
            .map_err(monitor_err("save"))?;
        started.elapsed()
    } else {
        // The recipe's line, through monitor-send in the recipe's own nc form.
        let line = match sc.monitor {
            MonitorKind::Hmp => format!("migrate \"{uri}\""),
            MonitorKind::Qmp => {
                serde_json::json!({"execute": "migrate", "arguments": {"uri": uri}}).to_string()
            }
        };
        let dispatched = Instant::now();
        let mut send = Command::new(&kit.monitor_send)
            .args(["-w", "0", "-U"])
            .arg(&sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Failure {
                check: "setup",
                detail: format!("running {}: {e}", kit.monitor_send.display()),
                kept: None,
            })?;
        // `echo -e "...\n"` sends the line and an empty one.
        let _ = send
            .stdin
            .take()
            .expect("piped")
            .write_all(format!("{line}\n\n").as_bytes());
        let out = send.wait_with_output().map_err(|e| Failure {
            check: "setup",
            detail: e.to_string(),
            kept: None,
        })?;
        if !out.status.success() {
            return fail(
                "save",
                format!(
                    "monitor-send: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            );
        }

        // Done when QEMU says so: its MIGRATION event.
        let info = watch
            .wait_migration(Instant::now() + WAIT, |_| {})
            .map_err(monitor_err("save"))?;
        if !info.status.is_final() {
            return fail(
                "save",
                format!(
                    "the migration did not end within {WAIT:?}: {:?}",
                    info.status
                ),
            );
        }
        let took = dispatched.elapsed();
        if info.status != qemu_migrate::MigrationStatus::Completed {
            return fail(
                "save",
                format!(
                    "QEMU reports {:?}: {}",
                    info.status,
                    info.error.unwrap_or_default()
                ),
            );
        }
        took
    };
    checks.push("save completed");
    let state_bytes = fs::metadata(&state).ok().map(|m| m.len());
    let last_tick_before = src
        .serial
        .snapshot()
        .iter()
        .filter_map(|l| tick(l))
        .max()
        .unwrap_or(0);
    let rate_before = rate(&src.serial.timed());
    let _ = watch.quit();
    drop(src);

    match sc.sabotage {
        Some(Sabotage::Truncate) => {
            let len = state_bytes.unwrap_or(0);
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&state)
                .map_err(|e| Failure {
                    check: "setup",
                    detail: e.to_string(),
                    kept: None,
                })?;
            let _ = f.set_len(len / 2);
        }
        Some(Sabotage::FlipRam) => flip_sweep_byte(&state, &banner_line)?,
        _ => {}
    }

    // The destination.
    let restore_started = Instant::now();
    let dest_harness = if sc.transport == Transport::QemuMigrate {
        // The restore starts QEMU with the source's very options.
        harness_src.clone()
    } else {
        harness_dest.clone()
    };
    let mut dest = match live_dest.take() {
        Some(d) => d,
        None if sc.transport == Transport::QemuMigrate && sc.sabotage != Some(Sabotage::Reboot) => {
            let mut options = qemu_migrate::restore::RestoreOptions::default();
            options.console = qemu_migrate::vm::Console::Pipe;
            options.qemu = sc.restore_qemu.as_ref().map(|q| q.binary.clone());
            if sc.sabotage == Some(Sabotage::WrongMemory) {
                options.args = Some(vm_args(ram_mib * 2, &sock, &harness_src));
            }
            let restored =
                qemu_migrate::restore::restore(&state, &options, &qemu_migrate::progress::Quiet)
                    .map_err(monitor_err("restore"))?;
            let mut vm = restored.vm;
            let Some(stdout) = vm.launched().and_then(|l| l.take_stdout()) else {
                return fail("restore", "the restored QEMU's console is not a pipe");
            };
            let log = fs::File::create(dir.join("destination-serial.log")).ok();
            Running {
                process: Process::Restored(Box::new(vm)),
                serial: Lines::collect_to(stdout, log),
                started: restore_started,
            }
        }
        None => {
            let ram = if sc.sabotage == Some(Sabotage::WrongMemory) {
                ram_mib * 2
            } else {
                ram_mib
            };
            let mut args = vm_args(ram, &dest_sock, &harness_dest);
            if sc.sabotage != Some(Sabotage::Reboot) {
                let incoming = match sc.transport {
                    Transport::File => format!("file:{}", state.display()),
                    _ => format!("exec: cat {}", state.display()),
                };
                args.extend(["-incoming".into(), incoming]);
            }
            crate::upgrade::pin_by_hand(sc, &mut args);
            start_qemu(crate::upgrade::dest_qemu(sc), &args, dir, "destination")?
        }
    };
    let restore_from = if matches!(
        sc.transport,
        Transport::Unix | Transport::Tcp | Transport::QemuMigrate
    ) {
        restore_started
    } else {
        dest.started
    };
    if !ticking {
        return untick_checks(
            sc,
            dest,
            &dest_harness,
            &banner_line,
            checks,
            (boot_to_first_tick, save),
            state_bytes,
        );
    }
    let first_after = match dest.serial.try_wait_for(0, WAIT, |l| tick(l).is_some()) {
        Ok(i) => i,
        Err(got) => {
            dest.wait();
            let said = dest.said();
            return fail(
                "restore",
                if said.is_empty() {
                    format!("no tick from the destination; it printed {got:?}")
                } else {
                    format!("QEMU refused the state: {said}")
                },
            );
        }
    };
    let restore = dest.serial.timed()[first_after].0 - restore_from;
    let after = dest.serial.snapshot();
    if let Some(b) = after[..first_after]
        .iter()
        .find(|l| **l == banner_line || l.starts_with("BOOT"))
    {
        return fail(
            "resumed, not rebooted",
            format!("the destination booted afresh: {b:?}"),
        );
    }
    checks.push("no reboot");
    let first_tick_after = tick(&after[first_after]).unwrap_or(0);
    if first_tick_after <= last_tick_before || first_tick_after > last_tick_before + 2 {
        return fail(
            "tick continuity",
            format!(
                "the source's last tick was {last_tick_before}, the destination's first is {first_tick_after}"
            ),
        );
    }
    checks.push("tick continuity");
    let want = first_tick_after + TICKS_AFTER;
    dest.serial
        .try_wait_for(first_after, WAIT, |l| tick(l).is_some_and(|n| n >= want))
        .or_else(|got| {
            fail(
                "tick rate",
                format!("the destination stopped ticking: {got:?}"),
            )
        })?;
    let timed = dest.serial.timed();
    let rate_after = rate(&timed[first_after..]);
    if rate_before > 0.0 && ((rate_after - rate_before) / rate_before).abs() > RATE_TOLERANCE {
        return fail(
            "tick rate",
            format!("{rate_before:.1} ticks/s before, {rate_after:.1} after"),
        );
    }
    checks.push("tick rate");
    let last_tick_after = timed.iter().filter_map(|(_, l)| tick(l)).max().unwrap_or(0);

    if let Some(m) = dest
        .serial
        .snapshot()
        .iter()
        .find(|l| test_guest::is_ram_mismatch(l))
    {
        return fail("RAM sweep", format!("the guest found its RAM changed: {m}"));
    }
    if sc.guest == GuestKind::Test {
        check_ram(&dest_harness, &banner_line, dir)?;
        checks.push("RAM sweep");
    }
    if let Ok(mut c) = control(&dest_harness, WAIT) {
        let _ = c.quit();
    }
    drop(dest);
    Ok(Report {
        name: sc.name(),
        accel: sc.accel,
        qemu_version: sc.qemu.version.clone(),
        state_bytes,
        boot_to_first_tick,
        guest_to_first_tick,
        save,
        restore,
        last_tick_before,
        first_tick_after,
        last_tick_after,
        rate_before,
        rate_after,
        checks,
    })
}

/// The checks that apply to a guest that prints no ticks (a user's own,
/// e.g. an IncludeOS service): QEMU loaded the state and the guest runs, and
/// it did not print its first line again, as a fresh boot would.
fn untick_checks(
    sc: &Scenario,
    mut dest: Running,
    harness: &Path,
    first_line: &str,
    mut checks: Vec<&'static str>,
    (boot, save): (Duration, Duration),
    state_bytes: Option<u64>,
) -> Result<Report, Failure> {
    let mut c = match control(harness, WAIT) {
        Ok(c) => c,
        Err(_) => {
            dest.wait();
            return fail(
                "restore",
                format!("QEMU refused the state: {}", dest.said()),
            );
        }
    };
    c.set_capability("events", true)
        .map_err(monitor_err("restore"))?;
    let info = c
        .wait_migration(Instant::now() + WAIT, |_| {})
        .map_err(monitor_err("restore"))?;
    if !info.status.is_final() {
        return fail("restore", format!("the state did not load within {WAIT:?}"));
    }
    if info.status != qemu_migrate::MigrationStatus::Completed {
        return fail(
            "restore",
            format!("QEMU reports {:?}: {}", info.status, dest.said()),
        );
    }
    let restore = dest.started.elapsed();
    checks.push("restore completed");
    // A fresh boot prints its first line within moments of starting.
    if let Ok(i) = dest
        .serial
        .try_wait_for(0, Duration::from_secs(2), |l| l == first_line)
    {
        return fail(
            "resumed, not rebooted",
            format!(
                "the destination printed the source's first line again: {:?}",
                dest.serial.snapshot()[i]
            ),
        );
    }
    checks.push("no reboot");
    let _ = c.quit();
    Ok(Report {
        name: sc.name(),
        accel: sc.accel,
        qemu_version: sc.qemu.version.clone(),
        state_bytes,
        boot_to_first_tick: boot,
        guest_to_first_tick: Duration::ZERO,
        save,
        restore,
        last_tick_before: 0,
        first_tick_after: 0,
        last_tick_after: 0,
        rate_before: 0.0,
        rate_after: 0.0,
        checks,
    })
}

/// Ticks per second over the tick lines among `lines`.
fn rate(lines: &[(Instant, String)]) -> f64 {
    let ticks: Vec<(Instant, u64)> = lines
        .iter()
        .filter_map(|(t, l)| Some((*t, tick(l)?)))
        .collect();
    match (ticks.first(), ticks.last()) {
        (Some(a), Some(b)) if b.1 > a.1 => {
            let secs = (b.0 - a.0).as_secs_f64();
            if secs > 0.0 {
                (b.1 - a.1) as f64 / secs
            } else {
                0.0
            }
        }
        _ => 0.0,
    }
}

/// Stops the destination and reads the sweep region back with `pmemsave`.
fn check_ram(sock: &Path, banner_line: &str, dir: &Path) -> Result<(), Failure> {
    let Some((start, end)) = Banner::parse(banner_line).and_then(|b| b.sweep) else {
        return fail("RAM sweep", "the banner names no sweep region");
    };
    let mut c = control(sock, WAIT)?;
    c.stop().map_err(monitor_err("RAM sweep"))?;
    let dump = dir.join("sweep.bin");
    c.human_command(&format!(
        "pmemsave {start} {} \"{}\"",
        end - start,
        dump.display()
    ))
    .map_err(monitor_err("RAM sweep"))?;
    let bytes = fs::read(&dump).map_err(|e| Failure {
        check: "RAM sweep",
        detail: format!("{}: {e}", dump.display()),
        kept: None,
    })?;
    test_guest::check_sweep(&bytes).or_else(|e| fail("RAM sweep", e))?;
    let _ = fs::remove_file(&dump);
    c.cont().map_err(monitor_err("RAM sweep"))?;
    Ok(())
}

/// Flips the first byte of the last copy of a sweep page in the stream: a
/// page record is its address with flag bits in the low bits (big-endian),
/// `0x08` a full page, `0x20` "same block as before".
fn flip_sweep_byte(state: &Path, banner_line: &str) -> Result<(), Failure> {
    let Some((start, _)) = Banner::parse(banner_line).and_then(|b| b.sweep) else {
        return fail("setup", "the banner names no sweep region");
    };
    let mut bytes = fs::read(state).map_err(|e| Failure {
        check: "setup",
        detail: e.to_string(),
        kept: None,
    })?;
    let mut target = None;
    for page in 0..64u64 {
        let addr = start + page * 4096;
        let header = (addr | 0x28).to_be_bytes();
        if let Some(i) = bytes.windows(8).rposition(|w| w == header) {
            target = Some(i + 8);
            break;
        }
    }
    let Some(at) = target else {
        return fail("setup", "no sweep page found in the state file to flip");
    };
    bytes[at] = bytes[at].wrapping_add(0x55);
    fs::write(state, bytes).map_err(|e| Failure {
        check: "setup",
        detail: e.to_string(),
        kept: None,
    })
}

/// The scenarios `--all` runs on one QEMU.
pub fn all_scenarios(qemu: &Qemu, accel: Accel, with_linux: bool) -> Vec<Scenario> {
    let has_file = qemu
        .version
        .parse::<qemu_monitor::QemuVersion>()
        .is_ok_and(|v| (v.major, v.minor) >= (8, 2));
    let mut list = Vec::new();
    let mut add = |transport, monitor, guest: GuestKind| {
        list.push(Scenario {
            qemu: qemu.clone(),
            accel,
            transport,
            monitor,
            guest,
            sabotage: None,
            restore_qemu: None,
        })
    };
    add(Transport::Exec, MonitorKind::Hmp, GuestKind::Test);
    add(Transport::Exec, MonitorKind::Qmp, GuestKind::Test);
    add(Transport::Unix, MonitorKind::Hmp, GuestKind::Test);
    add(Transport::Tcp, MonitorKind::Hmp, GuestKind::Test);
    if has_file {
        add(Transport::File, MonitorKind::Hmp, GuestKind::Test);
    }
    add(Transport::QemuMigrate, MonitorKind::Hmp, GuestKind::Test);
    if with_linux {
        add(Transport::Exec, MonitorKind::Hmp, GuestKind::Linux);
        add(Transport::QemuMigrate, MonitorKind::Hmp, GuestKind::Linux);
    }
    list
}

pub fn print_report(r: &Report) {
    let accel = match r.accel {
        Accel::Kvm => "KVM",
        Accel::Tcg => "TCG",
    };
    println!("PASS {} ({accel}, QEMU {})", r.name, r.qemu_version);
    println!(
        "  boot to first tick  {} ms from QEMU's start ({} ms of it the guest's own, after its banner)",
        r.boot_to_first_tick.as_millis(),
        r.guest_to_first_tick.as_millis()
    );
    if let Some(b) = r.state_bytes {
        println!("  state file          {:.1} MB", b as f64 / 1e6);
    }
    println!(
        "  save                {:.2} s (migrate dispatched -> completed)",
        r.save.as_secs_f64()
    );
    println!(
        "  restore             {:.2} s (-> first tick on the destination)",
        r.restore.as_secs_f64()
    );
    println!(
        "  ticks               source ..{}, destination {}..{} ({:.1}/s before, {:.1}/s after)",
        r.last_tick_before, r.first_tick_after, r.last_tick_after, r.rate_before, r.rate_after
    );
    println!("  checks              {}", r.checks.join(", "));
}

/// Where the QEMUs come from for a run.
pub fn qemus(explicit: Option<&Path>, all: bool) -> anyhow::Result<Vec<Qemu>> {
    if let Some(p) = explicit {
        return qemu::probe(p)
            .map(|q| vec![q])
            .ok_or_else(|| anyhow::anyhow!("{} does not run", p.display()));
    }
    let found = qemu::installed();
    if found.is_empty() {
        anyhow::bail!(qemu::INSTALL_HINT);
    }
    Ok(if all {
        found
    } else {
        found.into_iter().take(1).collect()
    })
}

#[cfg(test)]
mod tests {
    //! Breaking the restore on purpose: each way is caught and named.

    use super::*;

    fn kit() -> Kit {
        let root = crate::project_root();
        let guest = test_guest::build(&root.join("target/guest")).expect("guest builds");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-q", "-p", "monitor-send"])
            .current_dir(&root)
            .status()
            .expect("cargo build");
        assert!(status.success());
        Kit {
            monitor_send: root.join("target/debug/monitor-send"),
            root,
            guest,
            linux: None,
        }
    }

    fn each_qemu(sabotage: Option<Sabotage>, expect: impl Fn(&Result<Report, Failure>)) {
        let kit = kit();
        let list: Vec<PathBuf> = match std::env::var("QEMU_BINARIES") {
            Ok(v) if !v.is_empty() => v.split(':').map(PathBuf::from).collect(),
            _ => vec![PathBuf::from("qemu-system-x86_64")],
        };
        for bin in list {
            let qemu =
                qemu::probe(&bin).unwrap_or_else(|| panic!("{} does not run", bin.display()));
            let sc = Scenario {
                qemu,
                accel: Accel::Tcg,
                transport: Transport::Exec,
                monitor: MonitorKind::Hmp,
                guest: GuestKind::Test,
                sabotage,
                restore_qemu: None,
            };
            let r = run_one(&kit, &sc);
            if let Err(f) = &r {
                if let Some(k) = &f.kept {
                    let _ = fs::remove_dir_all(k);
                }
            }
            expect(&r);
        }
    }

    #[test]
    fn an_honest_restore_passes_every_check() {
        each_qemu(None, |r| {
            let r = r.as_ref().unwrap_or_else(|f| panic!("{f}"));
            assert_eq!(
                r.checks,
                [
                    "banner",
                    "save completed",
                    "no reboot",
                    "tick continuity",
                    "tick rate",
                    "RAM sweep"
                ]
            );
        });
    }

    #[test]
    fn a_different_memory_size_is_named_with_qemus_words() {
        each_qemu(Some(Sabotage::WrongMemory), |r| {
            let f = r.as_ref().expect_err("must fail");
            assert_eq!(f.check, "restore");
            assert!(
                f.detail.contains("Size mismatch") || f.detail.contains("Length mismatch"),
                "{f}"
            );
        });
    }

    #[test]
    fn a_truncated_state_file_is_caught() {
        each_qemu(Some(Sabotage::Truncate), |r| {
            let f = r.as_ref().expect_err("must fail");
            assert_eq!(f.check, "restore", "{f}");
        });
    }

    #[test]
    fn a_fresh_boot_instead_of_a_restore_is_caught() {
        each_qemu(Some(Sabotage::Reboot), |r| {
            let f = r.as_ref().expect_err("must fail");
            assert_eq!(f.check, "resumed, not rebooted", "{f}");
        });
    }

    #[test]
    fn a_flipped_byte_of_guest_ram_is_caught() {
        each_qemu(Some(Sabotage::FlipRam), |r| {
            let f = r.as_ref().expect_err("must fail");
            assert_eq!(f.check, "RAM sweep", "{f}");
        });
    }
}
