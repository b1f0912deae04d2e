//! `cargo xtask e2e`: the user's recipe, end to end, checked. Boots a guest
//! with the IncludeOS boot shape and the recipe's options, saves it with the
//! recipe's own `migrate "exec:cat > STATE"` line sent through monitor-send in
//! nc's form, restores it in a new QEMU with `-incoming "exec: cat STATE"`,
//! and proves from the serial output and RAM that it carried on.

//!
//! The scenario is one function, [`run_one`], over its phases in order
//! (`phases`: the guest's options, boot the source, save, start the
//! destination), the checks that it carried on (`checks`), and the ways to
//! break it on purpose (`sabotage`); `running` holds the QEMUs it starts.

mod checks;
mod phases;
mod running;
mod sabotage;
#[cfg(test)]
mod tests;
pub mod upgrade;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use running::probe_accel;

use crate::qemu::{self, Qemu};

/// The deadline of every wait for QEMU or the guest.
const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Exec,
    Unix,
    Tcp,
    File,
    /// `qemu-migrate save` and `restore` (the library), not the recipe's line.
    QemuMigrate,
    /// The same with `save --instant`: RAM as an image the restore maps.
    QemuMigrateInstant,
    /// `qemu-migrate snapshot` while the guest runs, then `restore`: the
    /// guest carries on from the instant the snapshot began.
    QemuMigrateSnapshot,
}

impl Transport {
    /// Saved and restored by the library rather than by the recipe's line.
    fn by_library(self) -> bool {
        matches!(
            self,
            Transport::QemuMigrate | Transport::QemuMigrateInstant | Transport::QemuMigrateSnapshot
        )
    }
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
            upgrade::versions(self),
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
    pub qemu_version: qemu_monitor::QemuVersion,
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

impl Failure {
    fn new(check: &'static str, detail: impl Into<String>) -> Failure {
        Failure {
            check,
            detail: detail.into(),
            kept: None,
        }
    }

    /// A conversion of any error into a failure of `check`, for `map_err`.
    fn of<E: fmt::Display>(check: &'static str) -> impl Fn(E) -> Failure {
        move |e| Failure::new(check, e.to_string())
    }
}

fn fail<T>(check: &'static str, detail: impl Into<String>) -> Result<T, Failure> {
    Err(Failure::new(check, detail))
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

/// Runs one scenario; on failure its logs stay under target/e2e/NAME.
pub fn run_one(kit: &Kit, sc: &Scenario) -> Result<Report, Failure> {
    let dir = kit.root.join("target/e2e").join(sc.name());
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)
        .map_err(|e| Failure::new("setup", format!("{}: {e}", dir.display())))?;
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

/// The scenario's phases, in order.
fn run_in(kit: &Kit, sc: &Scenario, dir: &Path) -> Result<Report, Failure> {
    let mut checks = Vec::new();
    let setup = phases::Setup::new(kit, sc, dir)?;
    let source = phases::boot_source(&setup, &mut checks)?;
    let mut watch = running::harness(&setup.harness_src, WAIT)?;
    watch
        .set_capability("events", true)
        .map_err(Failure::of("monitor"))?;
    let (uri, live) = phases::listen_first(&setup)?;
    // A snapshot is of the instant it begins: the guest ticks on meanwhile.
    let at_start =
        (sc.transport == Transport::QemuMigrateSnapshot).then(|| checks::Before::of(&source));
    let save = phases::save(kit, &setup, &uri, &mut watch)?;
    checks.push("save completed");
    let state_bytes = fs::metadata(&setup.state).ok().map(|m| m.len());
    let before = at_start.unwrap_or_else(|| checks::Before::of(&source));
    let _ = watch.quit();
    let ticking = source.ticking;
    let mut report = Report {
        name: sc.name(),
        accel: sc.accel,
        qemu_version: sc.qemu.version,
        state_bytes,
        boot_to_first_tick: source.boot_to_first_tick,
        guest_to_first_tick: source.guest_to_first_tick,
        save,
        restore: Duration::ZERO,
        last_tick_before: before.last_tick,
        first_tick_after: 0,
        last_tick_after: 0,
        rate_before: before.rate,
        rate_after: 0.0,
        checks,
    };
    drop(source);

    sabotage::apply_to_state(sc.sabotage, &setup.state, &before.banner_line)?;
    let mut dest = phases::start_destination(&setup, live)?;
    if ticking {
        checks::carried_on(sc, &mut dest, &before, &mut report, dir)?;
    } else {
        checks::carried_on_without_ticks(&mut dest, &before, &mut report)?;
    }
    Ok(report)
}

/// The scenarios `--all` runs on one QEMU.
pub fn all_scenarios(qemu: &Qemu, accel: Accel, with_linux: bool) -> Vec<Scenario> {
    let has_file = (qemu.version.major, qemu.version.minor) >= (8, 2);
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
    add(
        Transport::QemuMigrateInstant,
        MonitorKind::Hmp,
        GuestKind::Test,
    );
    add(
        Transport::QemuMigrateSnapshot,
        MonitorKind::Hmp,
        GuestKind::Test,
    );
    if with_linux {
        add(Transport::Exec, MonitorKind::Hmp, GuestKind::Linux);
        add(Transport::QemuMigrate, MonitorKind::Hmp, GuestKind::Linux);
        add(
            Transport::QemuMigrateInstant,
            MonitorKind::Hmp,
            GuestKind::Linux,
        );
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
