//! `qemu-migrate restore`, `revert` and `export`, and handing a VM
//! launched here over: to the background, or to this terminal until it ends.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use qemu_migrate::Error;

use crate::progress::Shown;
use crate::Cli;
use qemu_migrate::checkpoint;
use qemu_migrate::restore::{self as library, RestoreOptions};
use qemu_migrate::vm::Console;
use qemu_migrate::Vm;

/// The options of `qemu-migrate restore`.
#[derive(Debug, clap::Args)]
pub(crate) struct RestoreArgs {
    pub(crate) statefile: PathBuf,
    /// The QEMU binary (default: the one that saved it).
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Keep the guest paused after loading.
    #[arg(long)]
    paused: bool,
    /// Leave the VM running in the background instead of in this terminal.
    #[arg(long)]
    daemonize: bool,
    /// With --daemonize: write QEMU's pid here.
    #[arg(long, requires = "daemonize")]
    pidfile: Option<PathBuf>,
    /// Restore even though the VM's disks or boot files changed since the save.
    #[arg(long)]
    force: bool,
    /// As root, restore a VM that another user's QEMU ran (it will run as root).
    #[arg(long)]
    as_root: bool,
    /// For an instant save: read the whole RAM image and check every chunk before QEMU
    /// starts (by default a sealed image's fs-verity digest is checked, or the very file
    /// the save wrote is read in the background as the guest runs, the VM stopped on a
    /// damaged chunk; any other file is read whole first).
    #[arg(long)]
    verify: bool,
    /// Start another VM from this state while the first runs: its own monitor and
    /// serial sockets and logs (PATH.cloneN); refused if both would write one disk.
    #[arg(long)]
    clone: bool,
    /// What the restore must write goes here: a checkpoint's fresh disk overlays
    /// (default: beside the state file); for a QEMU before 8.2, a copy of an instant
    /// save it cannot map from read-only storage.
    #[arg(long, value_name = "DIR")]
    into: Option<PathBuf>,
    /// Replace OLD by NEW in every argument of the recorded command line: supplies
    /// what the save could not name (a passed descriptor: --replace fd=3 path=/run/x.sock).
    #[arg(long, num_args = 2, value_names = ["OLD", "NEW"], action = clap::ArgAction::Append)]
    replace: Vec<String>,
    /// QEMU options to use instead of the manifest's (required for a file with no manifest).
    #[arg(last = true)]
    qemu_args: Vec<String>,
}

/// The options of `qemu-migrate revert`.
#[derive(Debug, clap::Args)]
pub(crate) struct RevertArgs {
    /// The VM's monitor (HMP or QMP): a socket path, @abstract, unix:PATH, tcp:HOST:PORT or telnet:HOST:PORT.
    #[arg(long, value_parser = crate::monitor_addr)]
    monitor: qemu_monitor::MonitorAddr,
    statefile: PathBuf,
    /// The fresh disk overlays go here (default: where the VM's discarded ones were).
    #[arg(long, value_name = "DIR")]
    into: Option<PathBuf>,
    /// Keep the guest paused after loading.
    #[arg(long)]
    paused: bool,
    /// Leave the VM running in the background instead of in this terminal.
    #[arg(long)]
    daemonize: bool,
    /// With --daemonize: write QEMU's pid here.
    #[arg(long, requires = "daemonize")]
    pidfile: Option<PathBuf>,
    /// The QEMU binary (default: the one that saved the checkpoint, if unchanged since).
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Deadline for each monitor reply, in seconds.
    #[arg(long, default_value = "30")]
    timeout: u64,
}

/// The options of `qemu-migrate export`.
#[derive(Debug, clap::Args)]
pub(crate) struct ExportArgs {
    pub(crate) statefile: PathBuf,
}

pub(crate) fn restore(
    args: &RestoreArgs,
    cli: &Cli,
    cancel: Arc<AtomicBool>,
) -> Result<ExitCode, Error> {
    let RestoreArgs {
        statefile,
        qemu,
        paused,
        daemonize,
        pidfile,
        force,
        as_root,
        verify,
        clone,
        into,
        replace,
        qemu_args,
    } = args;
    let mut options = RestoreOptions::default();
    options.replace = replace
        .chunks_exact(2)
        .map(|p| (p[0].clone(), p[1].clone()))
        .collect();
    options.into.clone_from(into);
    options.force = *force;
    options.as_root = *as_root;
    options.verify = *verify;
    options.clone = *clone;
    options.qemu.clone_from(qemu);
    options.paused = *paused;
    options.args = (!qemu_args.is_empty()).then(|| qemu_args.clone());
    options.console = console(*daemonize);
    options.cancel = Arc::clone(&cancel);
    let shown = Shown::new(cli);
    let restored = library::restore(statefile, &options, shown.progress());
    shown.done();
    let restored = restored?;
    warn(&restored.warnings);
    if restored.previous_save {
        eprintln!("{}", previous_save_note(statefile));
    }
    if *daemonize && !cli.json && qemu_migrate::argv::uses_stdio(restored.vm.args()) {
        eprintln!(
            "qemu-migrate: note: the VM's console is QEMU's stdio (-serial stdio, -nographic or a \
             stdio monitor); in the background it goes to /dev/null. Restore in the foreground to \
             see it, or give the serial port a file or socket (-serial file:PATH)."
        );
    }
    let pid = restored.vm.pid();
    if cli.json {
        say!(
            "{}",
            serde_json::json!({ "restored": statefile, "pid": pid, "seconds": restored.elapsed.as_secs_f64(), "renamed": restored.renamed, "pinned_machine": restored.pinned, "overlays": restored.overlays, "ram_images_checking_in_background": restored.checking_in_background, "copy": restored.copy })
        );
    } else if let Some(p) = &restored.pinned {
        eprintln!("qemu-migrate: {p}");
    }
    if !cli.json && (*daemonize || !cli.quiet) {
        eprintln!(
            "restored {} in {:.2} s (QEMU pid {pid}){}",
            statefile.display(),
            restored.elapsed.as_secs_f64(),
            overlays_said(&restored.overlays)
        );
    }
    if let (false, Some(copy)) = (cli.json, &restored.copy) {
        eprintln!(
            "  restored from a copy of the save, {} (this QEMU cannot map RAM images from read-only storage); the copy stays, and restores again by that name",
            copy.display()
        );
    }
    if !cli.json {
        for (from, to) in &restored.renamed {
            eprintln!("  the clone's {} is {}", from.display(), to.display());
        }
    }
    hand_over(restored.vm, *daemonize, pidfile.as_deref(), &cancel)
}

pub(crate) fn revert(
    args: &RevertArgs,
    cli: &Cli,
    cancel: Arc<AtomicBool>,
) -> Result<ExitCode, Error> {
    let RevertArgs {
        monitor,
        statefile,
        into,
        paused,
        daemonize,
        pidfile,
        qemu,
        timeout,
    } = args;
    let vm = Vm::attach(monitor.clone(), Duration::from_secs(*timeout))?;
    let mut options = RestoreOptions::default();
    options.into.clone_from(into);
    options.qemu.clone_from(qemu);
    options.paused = *paused;
    options.console = console(*daemonize);
    options.cancel = Arc::clone(&cancel);
    options.revive = revive(*paused, qemu.clone(), pidfile.clone());
    let shown = Shown::new(cli);
    let restored = checkpoint::revert(vm, statefile, &options, shown.progress());
    shown.done();
    let restored = restored?;
    warn(&restored.warnings);
    let pid = restored.vm.pid();
    if cli.json {
        say!(
            "{}",
            serde_json::json!({ "reverted": statefile, "pid": pid, "seconds": restored.elapsed.as_secs_f64(), "overlays": restored.overlays })
        );
    } else if *daemonize || !cli.quiet {
        eprintln!(
            "reverted to {} in {:.2} s (new QEMU pid {pid}){}",
            statefile.display(),
            restored.elapsed.as_secs_f64(),
            overlays_said(&restored.overlays)
        );
    }
    hand_over(restored.vm, *daemonize, pidfile.as_deref(), &cancel)
}

pub(crate) fn export(args: &ExportArgs) -> Result<ExitCode, Error> {
    let ExportArgs { statefile } = args;
    let stdout = std::io::stdout().lock();
    qemu_migrate::instant::export(statefile, stdout)?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn previous_save_note(statefile: &std::path::Path) -> String {
    format!(
        "note: {} holds the previous save: a newer save of it was interrupted before it \
         replaced this one",
        statefile.display()
    )
}
/// How a revert killed midway brings its VM back: this very program
/// restores the checkpoint in the background, as the revert would have.
fn revive(
    paused: bool,
    qemu: Option<PathBuf>,
    pidfile: Option<PathBuf>,
) -> Option<library::Revive> {
    let exe = std::env::current_exe().ok()?;
    Some(library::Revive(Arc::new(move |statefile, into| {
        let mut argv: Vec<std::ffi::OsString> =
            vec![exe.clone().into(), "restore".into(), "--daemonize".into()];
        if let Some(p) = &pidfile {
            argv.extend(["--pidfile".into(), p.clone().into()]);
        }
        if let Some(d) = into {
            argv.extend(["--into".into(), d.into()]);
        }
        if let Some(q) = &qemu {
            argv.extend(["--qemu".into(), q.clone().into()]);
        }
        if paused {
            argv.push("--paused".into());
        }
        argv.push(statefile.into());
        argv
    })))
}

/// What the user should know of a restore, a line each on stderr (also
/// with --json, whose stdout stays one object).
fn warn(warnings: &[String]) {
    for w in warnings {
        eprintln!("qemu-migrate: warning: {w}");
    }
}

/// Where a launched QEMU's console goes: this terminal, or nowhere in the background.
pub(crate) fn console(daemonize: bool) -> Console {
    if daemonize {
        Console::Null
    } else {
        Console::Terminal
    }
}
/// Leaves a VM launched here running: in the background (with its pid in
/// `pidfile`), or in the foreground with this terminal until it ends.
pub(crate) fn hand_over(
    mut vm: Vm,
    daemonize: bool,
    pidfile: Option<&std::path::Path>,
    stop: &AtomicBool,
) -> Result<ExitCode, Error> {
    let pid = vm.pid();
    if daemonize {
        if let Some(p) = pidfile {
            std::fs::write(p, format!("{pid}\n")).map_err(|e| Error::File {
                path: p.to_path_buf(),
                what: "writing the pidfile",
                source: e,
            })?;
        }
        let _ = vm.detach();
        return Ok(ExitCode::SUCCESS);
    }
    // A signal meant for this process is passed on to QEMU, which ends the
    // way it does for any signal; one that came between the end of the
    // restore and now (it only set the cancel flag) is passed on too.
    forward_signals(pid);
    if stop.load(std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: a signal to the QEMU this process started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    let launched = vm.launched().expect("a VM handed over was launched here");
    let (status, _) = launched.wait().map_err(|source| Error::Os {
        what: "waiting for QEMU",
        source,
    })?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}
fn forward_signals(pid: u32) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    std::thread::spawn(move || {
        for sig in signals.forever() {
            // SAFETY: kill only sends a signal to the QEMU this process started.
            unsafe {
                libc::kill(pid as libc::pid_t, sig);
            }
        }
    });
}
fn overlays_said(overlays: &[PathBuf]) -> String {
    if overlays.is_empty() {
        return String::new();
    }
    let list: Vec<String> = overlays.iter().map(|p| p.display().to_string()).collect();
    format!("; disks on fresh overlays: {}", list.join(", "))
}
