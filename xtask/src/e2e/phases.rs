//! The phases of a scenario, in order: the guest and its options, booting
//! the source, saving (the recipe's line or the library), starting the
//! destination. The checks that it carried on are in `checks`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qemu_monitor::Monitor;
use test_guest::{tick, Banner};

use super::running::{accel_args, free_port, harness, Running};
use super::upgrade;
use super::{fail, Failure, GuestKind, Kit, MonitorKind, Sabotage, Scenario, Transport, WAIT};

/// Ticks the source prints before the save.
pub(super) const TICKS_BEFORE: u64 = 3;

/// The guest and the options that run it, with the paths of one scenario's directory.
pub(super) struct Setup<'a> {
    sc: &'a Scenario,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    pub(super) append: String,
    pub(super) ram_mib: u32,
    /// What the test guest's banner must report of its `-initrd`.
    pub(super) payload: Vec<u8>,
    pub(super) dir: PathBuf,
    /// The user's monitor socket, where the recipe's line goes.
    pub(super) sock: PathBuf,
    pub(super) dest_sock: PathBuf,
    pub(super) state: PathBuf,
    /// Private QMP sockets from which the harness watches (the user's
    /// socket is for the recipe's line alone).
    pub(super) harness_src: PathBuf,
    pub(super) harness_dest: PathBuf,
}

impl<'a> Setup<'a> {
    /// The guest, booted as IncludeOS's chainloader is: -kernel, -append, -initrd.
    pub(super) fn new(kit: &Kit, sc: &'a Scenario, dir: &Path) -> Result<Setup<'a>, Failure> {
        let payload_path = dir.join("hello.bin");
        let payload: Vec<u8> = b"hello from the e2e payload\n".repeat(100);
        fs::write(&payload_path, &payload).map_err(Failure::of("setup"))?;
        let (kernel, initrd, append, ram_mib) = match &sc.guest {
            GuestKind::Test => (
                kit.guest.clone(),
                Some(payload_path),
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
        Ok(Setup {
            sc,
            kernel,
            initrd,
            append,
            ram_mib,
            payload,
            dir: dir.to_path_buf(),
            sock: dir.join("qemu-sock"),
            dest_sock: dir.join("qemu-sock-dest"),
            state: dir.join("statefile"),
            harness_src: dir.join("harness-source.sock"),
            harness_dest: dir.join("harness-destination.sock"),
        })
    }

    /// The recipe's options with `ram` MiB, the user's monitor at `sock`,
    /// and the harness's QMP socket at `harness`.
    pub(super) fn args(&self, ram: u32, sock: &Path, harness: &Path) -> Vec<String> {
        let mut a = accel_args(self.sc.accel);
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
            self.kernel.display().to_string(),
            "-append".into(),
            self.append.clone(),
        ]);
        if let Some(i) = &self.initrd {
            a.extend(["-initrd".into(), i.display().to_string()]);
        }
        let flag = match self.sc.monitor {
            MonitorKind::Hmp => "-monitor",
            MonitorKind::Qmp => "-qmp",
        };
        a.extend([
            flag.into(),
            format!("unix:{},server,nowait", sock.display()),
            "-qmp".into(),
            format!("unix:{},server,nowait", harness.display()),
        ]);
        a
    }

    /// The destination's RAM: the source's, or twice it when sabotaged.
    fn dest_ram(&self) -> u32 {
        if self.sc.sabotage == Some(Sabotage::WrongMemory) {
            self.ram_mib * 2
        } else {
            self.ram_mib
        }
    }
}

/// The booted source and what its boot showed.
pub(super) struct Source {
    pub(super) running: Running,
    pub(super) banner_line: String,
    /// Whether the guest prints `tick N` lines (a user's guest may not).
    pub(super) ticking: bool,
    pub(super) boot_to_first_tick: Duration,
    pub(super) guest_to_first_tick: Duration,
}

/// Boots the source and checks its banner; waits for its first ticks.
pub(super) fn boot_source(
    setup: &Setup,
    checks: &mut Vec<&'static str>,
) -> Result<Source, Failure> {
    let sc = setup.sc;
    let src = Running::start(
        &sc.qemu,
        &setup.args(setup.ram_mib, &setup.sock, &setup.harness_src),
        &setup.dir,
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
    check_banner(setup, &banner_line, checks)?;
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
    Ok(Source {
        running: src,
        banner_line,
        ticking,
        boot_to_first_tick,
        guest_to_first_tick,
    })
}

/// The test guest echoes its -append and its -initrd's size and checksum;
/// the Linux guest prints its own banner.
fn check_banner(
    setup: &Setup,
    banner_line: &str,
    checks: &mut Vec<&'static str>,
) -> Result<(), Failure> {
    match setup.sc.guest {
        GuestKind::Test => {
            let Some(banner) = Banner::parse(banner_line) else {
                return fail(
                    "banner",
                    format!("not the test guest's banner: {banner_line:?}"),
                );
            };
            let sum = test_guest::adler32(&setup.payload);
            if banner.cmdline != setup.append
                || banner.module_size != setup.payload.len() as u64
                || banner.module_sum != sum
            {
                return fail(
                    "banner",
                    format!(
                        "the guest did not get the -append/-initrd it was given: {banner_line:?} \
                         (expected cmdline {:?}, module_size {}, module_sum {sum:08x})",
                        setup.append,
                        setup.payload.len(),
                    ),
                );
            }
            checks.push("banner");
        }
        GuestKind::Linux => {
            if !banner_line.starts_with(crate::linux_guest::BANNER) {
                return fail(
                    "banner",
                    format!("not the Linux test guest's banner: {banner_line:?}"),
                );
            }
            checks.push("banner");
        }
        GuestKind::Custom { .. } => {}
    }
    Ok(())
}

/// For a live migration the destination listens before the source sends:
/// returns the URI to migrate to and the waiting destination.
pub(super) fn listen_first(setup: &Setup) -> Result<(String, Option<Running>), Failure> {
    let sc = setup.sc;
    let state = setup.state.display();
    Ok(match sc.transport {
        Transport::Exec => (format!("exec:cat > {state}"), None),
        Transport::File => (format!("file:{state}"), None),
        Transport::QemuMigrate | Transport::QemuMigrateInstant | Transport::QemuMigrateSnapshot => {
            (String::new(), None)
        }
        Transport::Unix | Transport::Tcp => {
            let incoming = if sc.transport == Transport::Unix {
                format!("unix:{}", setup.dir.join("migration.sock").display())
            } else {
                format!("tcp:127.0.0.1:{}", free_port())
            };
            let mut args = setup.args(setup.ram_mib, &setup.dest_sock, &setup.harness_dest);
            args.extend(["-incoming".into(), incoming.clone()]);
            upgrade::pin_by_hand(sc, &mut args);
            let dest = Running::start(upgrade::dest_qemu(sc), &args, &setup.dir, "destination")?;
            // A command is answered from QEMU's main loop, which runs only
            // once its incoming side is set up (the greeting may come earlier,
            // from the monitor's own thread).
            let mut c = harness(&setup.harness_dest, WAIT)?;
            c.status().map_err(Failure::of("monitor"))?;
            c.close().map_err(Failure::of("monitor"))?;
            (incoming, Some(dest))
        }
    })
}

/// Saves the source: the recipe's line through monitor-send, or the
/// library's save. Returns how long it took to complete.
pub(super) fn save(
    kit: &Kit,
    setup: &Setup,
    uri: &str,
    watch: &mut Monitor,
) -> Result<Duration, Failure> {
    if setup.sc.transport.by_library() {
        // The orchestrator, through the user's own monitor socket.
        let started = Instant::now();
        let mut vm =
            qemu_migrate::Vm::attach(setup.sock.clone(), WAIT).map_err(Failure::of("save"))?;
        let mut options = qemu_migrate::save::SaveOptions::default();
        options.then = qemu_migrate::save::Then::Quit;
        options.instant = setup.sc.transport == Transport::QemuMigrateInstant;
        options.snapshot = setup.sc.transport == Transport::QemuMigrateSnapshot;
        let report = qemu_migrate::save::save(
            &mut vm,
            &setup.state,
            &options,
            &qemu_migrate::progress::Quiet,
        )
        .map_err(Failure::of("save"))?;
        if options.snapshot && report.fallback.is_some() {
            return fail(
                "save",
                format!("not saved as a snapshot: {:?}", report.fallback),
            );
        }
        if options.instant && report.manifest.instant.is_none() {
            return fail(
                "save",
                format!("not saved in the instant layout: {:?}", report.fallback),
            );
        }
        return Ok(started.elapsed());
    }
    // The recipe's line, through monitor-send in the recipe's own nc form.
    let line = match setup.sc.monitor {
        MonitorKind::Hmp => format!("migrate \"{uri}\""),
        MonitorKind::Qmp => {
            serde_json::json!({"execute": "migrate", "arguments": {"uri": uri}}).to_string()
        }
    };
    let dispatched = Instant::now();
    let mut send = Command::new(&kit.monitor_send)
        .args(["-w", "0", "-U"])
        .arg(&setup.sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Failure::new(
                "setup",
                format!("running {}: {e}", kit.monitor_send.display()),
            )
        })?;
    // `echo -e "...\n"` sends the line and an empty one.
    let _ = send
        .stdin
        .take()
        .expect("piped")
        .write_all(format!("{line}\n\n").as_bytes());
    let out = send.wait_with_output().map_err(Failure::of("setup"))?;
    if !out.status.success() {
        return fail(
            "save",
            format!(
                "monitor-send: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        );
    }
    // Done when QEMU says so.
    let info = watch
        .wait_migration(Instant::now() + WAIT, |_| {})
        .map_err(Failure::of("save"))?;
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
    Ok(took)
}

/// The QEMU that took over, and how the harness watches it.
pub(super) struct Destination {
    pub(super) running: Running,
    /// Its QMP socket for the harness.
    pub(super) harness: PathBuf,
    /// Where its restore time counts from: the end of the save for a live
    /// destination or the library's restore, its own start otherwise.
    pub(super) restore_from: Instant,
}

/// Starts the destination: the waiting live one, the library's restore, or
/// a QEMU with the recipe's `-incoming`.
pub(super) fn start_destination(
    setup: &Setup,
    live: Option<Running>,
) -> Result<Destination, Failure> {
    let sc = setup.sc;
    let started = Instant::now();
    if let Some(running) = live {
        return Ok(Destination {
            running,
            harness: setup.harness_dest.clone(),
            restore_from: started,
        });
    }
    if sc.transport.by_library() && sc.sabotage != Some(Sabotage::Reboot) {
        // The restore starts QEMU with the source's very options.
        let mut options = qemu_migrate::restore::RestoreOptions::default();
        options.console = qemu_migrate::vm::Console::Pipe;
        options.qemu = sc.restore_qemu.as_ref().map(|q| q.binary.clone());
        if sc.sabotage == Some(Sabotage::WrongMemory) {
            options.args = Some(setup.args(setup.dest_ram(), &setup.sock, &setup.harness_src));
        }
        let restored =
            qemu_migrate::restore::restore(&setup.state, &options, &qemu_migrate::progress::Quiet)
                .map_err(Failure::of("restore"))?;
        return Ok(Destination {
            running: Running::restored(restored.vm, &setup.dir, started)?,
            harness: setup.harness_src.clone(),
            restore_from: started,
        });
    }
    let mut args = setup.args(setup.dest_ram(), &setup.dest_sock, &setup.harness_dest);
    if sc.sabotage != Some(Sabotage::Reboot) {
        let incoming = match sc.transport {
            Transport::File => format!("file:{}", setup.state.display()),
            _ => format!("exec: cat {}", setup.state.display()),
        };
        args.extend(["-incoming".into(), incoming]);
    }
    upgrade::pin_by_hand(sc, &mut args);
    let running = Running::start(upgrade::dest_qemu(sc), &args, &setup.dir, "destination")?;
    Ok(Destination {
        restore_from: running.started,
        running,
        harness: setup.harness_dest.clone(),
    })
}
