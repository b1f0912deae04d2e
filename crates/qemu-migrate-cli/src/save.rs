//! `qemu-migrate save` (and `checkpoint`, its `--with-disks` form).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use qemu_migrate::Error;

use crate::progress::Shown;
use crate::Cli;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use qemu_migrate::save::{self as library, SaveOptions, Then};
use qemu_migrate::{Manifest, Vm};

/// The options of `qemu-migrate save`.
#[derive(Debug, clap::Args)]
pub(crate) struct SaveArgs {
    /// The VM's monitor (HMP or QMP): a socket path, @abstract, unix:PATH, tcp:HOST:PORT or telnet:HOST:PORT, e.g. /tmp/qemu-sock.
    #[arg(long, value_parser = crate::monitor_addr)]
    monitor: qemu_monitor::MonitorAddr,
    statefile: PathBuf,
    /// Save without pausing the guest first.
    #[arg(long)]
    live: bool,
    /// What becomes of the VM after the save.
    #[arg(long, default_value = "stop",
              value_parser = PossibleValuesParser::new(["stop", "quit", "resume"])
                  .map(|s| s.parse::<Then>().expect("a listed value")))]
    then: Then,
    /// Bandwidth cap in MiB/s (default: none).
    #[arg(long)]
    bandwidth: Option<u64>,
    /// Deadline for each monitor reply, in seconds.
    #[arg(long, default_value = "30")]
    timeout: u64,
    /// Do not fsync the state file (faster; not durable across a power cut).
    #[arg(long)]
    no_sync: bool,
    /// Replace an existing STATEFILE (crash-safely: the old save stays
    /// restorable until the new one is complete).
    #[arg(long)]
    force: bool,
    /// Keep guest RAM as an image beside the state file (STATEFILE.ram), which a
    /// restore maps instead of loading: restores take the same time at any RAM size.
    /// Where the VM's memory layout cannot be kept so, a plain stream is saved (and
    /// the reason said).
    #[arg(long)]
    instant: bool,
    /// A checkpoint: freeze every writable disk under a qcow2 overlay in the
    /// same pause, so the state can be restored again and again.
    #[arg(long, conflicts_with = "live")]
    with_disks: bool,
}

pub(crate) fn save(args: &SaveArgs, cli: &Cli, cancel: Arc<AtomicBool>) -> Result<ExitCode, Error> {
    let SaveArgs {
        monitor,
        statefile,
        live,
        then,
        bandwidth,
        timeout,
        no_sync,
        force,
        instant,
        with_disks,
    } = args;
    let mut vm = Vm::attach(monitor.clone(), Duration::from_secs(*timeout))?;
    let mut options = SaveOptions::default();
    options.instant = *instant;
    options.with_disks = *with_disks;
    options.live = *live;
    options.bandwidth = bandwidth.map(|m| m << 20);
    options.then = *then;
    options.no_sync = *no_sync;
    options.force = *force;
    options.cancel = cancel;
    let shown = Shown::new(cli);
    let report = library::save(&mut vm, statefile, &options, shown.progress());
    shown.done();
    let report = report?;
    let m = &report.manifest.redacted();
    if let Some(why) = &report.paused_for {
        eprintln!("qemu-migrate: saved with the guest paused, not live: {why}");
    }
    if let (Some(why), false) = (&report.fallback, cli.json) {
        eprintln!("qemu-migrate: not an instant save: {why}");
    }
    for w in &report.warnings {
        eprintln!("qemu-migrate: saved, but: {w}");
    }
    if cli.json {
        say!(
            "{}",
            serde_json::json!({ "saved": report.path, "seconds": report.elapsed.as_secs_f64(), "manifest": m, "fallback": report.fallback, "paused_for": report.paused_for, "warnings": report.warnings })
        );
    } else {
        eprintln!(
            "saved {}: {:.1} MB in {:.2} s (QEMU {}, {}, {} MiB RAM)",
            report.path.display(),
            m.stream_bytes as f64 / 1e6,
            report.elapsed.as_secs_f64(),
            m.qemu_version,
            m.machine.as_deref().unwrap_or("machine unknown"),
            m.ram_bytes >> 20
        );
        for i in m.instant.iter().flat_map(|l| &l.images) {
            eprintln!(
                "  RAM image {} (block {}): {} MiB, {:.1} MB of data ({} pages), the rest holes",
                i.image,
                i.block,
                i.block_bytes >> 20,
                (i.data_pages * i.page_size) as f64 / 1e6,
                i.data_pages
            );
        }
        checkpoint_said(m);
        for u in &m.unreplayable {
            eprintln!(
                "  warning: {}: {}; its restore needs --replace '{}' NEW",
                u.arg, u.why, u.arg
            );
        }
        for b in &m.backends {
            eprintln!(
                "  the VM depends on {} at {}; a restore starts it again when nothing listens there",
                b.name(),
                b.socket.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// After a save: what a checkpoint froze, and where the VM writes now.
fn checkpoint_said(m: &Manifest) {
    let Some(r) = m.checkpoint.as_ref().filter(|r| r.frozen) else {
        return;
    };
    if r.disks.is_empty() {
        eprintln!("  no writable disk stored in a file: nothing to freeze");
    }
    for d in &r.disks {
        eprintln!(
            "  froze {}: {}{}",
            d.name,
            d.images[0].path.display(),
            d.source_overlay.as_ref().map_or(String::new(), |o| format!(
                "; the VM writes to {}",
                o.display()
            ))
        );
    }
}
