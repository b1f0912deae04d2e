//! `qemu-migrate`: the command line over the `qemu-migrate` library; see
//! `--help`. Flags, progress display, signals and exit statuses live here;
//! what a save, restore or migration means lives in the library.

mod progress;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};
use qemu_migrate::live::{self, AfterLive, Destination, LiveOptions, ReceiveOptions, VmSpec};
use qemu_migrate::progress::{Progress, Quiet};
use qemu_migrate::restore::{self, RestoreOptions};
use qemu_migrate::save::{self, SaveOptions, Then};
use qemu_migrate::vm::Console;
use qemu_migrate::{Error, ErrorKind, Manifest, Vm};

const AFTER_HELP: &str = "\
Examples:
  qemu-migrate save --monitor /tmp/qemu-sock /tmp/statefile
  qemu-migrate restore /tmp/statefile
  qemu-migrate restore /tmp/recipe-state -- -m 32 -nodefaults -kernel k ...   (a file with no manifest)
  qemu-migrate inspect /tmp/statefile --json
  qemu-migrate save --instant --monitor /tmp/qemu-sock /tmp/statefile   (RAM in statefile.ram)
  qemu-migrate restore --clone /tmp/statefile     (another VM from it, its own sockets)
  qemu-migrate export /tmp/statefile > plain-stream   (an instant save as one stream)
  qemu-migrate live --monitor /tmp/qemu-sock --to local
  qemu-migrate receive --listen tcp:0.0.0.0:4444 -- -m 256 ...   (on the other host, then:)
  qemu-migrate live --monitor /tmp/qemu-sock --to tcp:otherhost:4444

Exit status:
  0  done
  1  bad arguments, or the monitor socket or QEMU could not be reached or started
  2  refused before anything changed: incomplete or damaged state file, options
     that cannot restore it, a VM already saved (postmigrate) or busy
  3  the migration failed or QEMU exited; nothing half-written is left
  4  cancelled (Ctrl-C): the migration was cancelled and the guest resumed";

/// Save, restore and inspect QEMU VMs with the exact same options.
#[derive(Debug, Parser)]
#[command(name = "qemu-migrate", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Progress and results as JSON lines on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// No progress bar.
    #[arg(long, short, global = true)]
    quiet: bool,
}

/// The exit status for an error, as `--help` documents it.
fn exit_code(e: &Error) -> u8 {
    match e.kind() {
        ErrorKind::Refused => 2,
        ErrorKind::Failed => 3,
        ErrorKind::Cancelled => 4,
        _ => 1,
    }
}

/// Writes a line to stdout. A reader that went away (`| head`) does not
/// stop the operation, which may be holding a VM: the output is dropped.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Save a running VM to a state file (and STATEFILE.manifest.json beside it).
    Save {
        /// The VM's monitor socket (HMP or QMP), e.g. /tmp/qemu-sock.
        #[arg(long)]
        monitor: String,
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
        /// Keep guest RAM as an image beside the state file (STATEFILE.ram), which a
        /// restore maps instead of loading: restores take the same time at any RAM size.
        /// Where the VM's memory layout cannot be kept so, a plain stream is saved (and
        /// the reason said).
        #[arg(long)]
        instant: bool,
    },
    /// Start a VM from a state file with the options it was saved with.
    Restore {
        statefile: PathBuf,
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
        /// For an instant save: read the whole RAM image and check its checksum first
        /// (by default its size and identity are checked, and it is read whole only
        /// when it is not the very file the save wrote).
        #[arg(long)]
        verify: bool,
        /// Start another VM from this state while the first runs: its own monitor and
        /// serial sockets and logs (PATH.cloneN); refused if both would write one disk.
        #[arg(long)]
        clone: bool,
        /// QEMU options to use instead of the manifest's (required for a file with no manifest).
        #[arg(last = true)]
        qemu_args: Vec<String>,
    },
    /// Write an instant save as one plain QEMU stream on stdout, e.g. for
    /// `-incoming "exec: qemu-migrate export STATEFILE"`.
    Export { statefile: PathBuf },
    /// Move a running VM to a new QEMU while the guest runs; the source ends
    /// only after the destination confirms the guest runs there.
    Live {
        /// The VM's monitor socket (HMP or QMP), e.g. /tmp/qemu-sock.
        #[arg(long)]
        monitor: String,
        /// `local` (a new QEMU on this host) or tcp:HOST:PORT (a `qemu-migrate receive`).
        #[arg(long, default_value = "local")]
        to: Destination,
        /// The longest pause allowed for the final copy, in milliseconds (QEMU's default: 300).
        #[arg(long, value_name = "MS")]
        downtime_limit: Option<u64>,
        /// Bandwidth cap in MiB/s (default: none).
        #[arg(long, value_name = "MIB_PER_S")]
        bandwidth: Option<u64>,
        /// Don't throttle a guest that dirties RAM faster than it can be sent.
        #[arg(long)]
        no_auto_converge: bool,
        /// What becomes of the source once the destination runs.
        #[arg(long, default_value = "quit",
              value_parser = PossibleValuesParser::new(["quit", "stop"])
                  .map(|s| s.parse::<AfterLive>().expect("a listed value")))]
        then: AfterLive,
        /// Deadline for each monitor reply, in seconds.
        #[arg(long, default_value = "30")]
        timeout: u64,
    },
    /// Start a QEMU that waits for a live migration on a TCP port, then run it.
    Receive {
        /// Where to wait for the migration: tcp:ADDR:PORT.
        #[arg(long, value_name = "tcp:ADDR:PORT")]
        listen: String,
        /// Start QEMU from a `qemu-migrate save` manifest instead of options after --.
        #[arg(long, conflicts_with = "qemu_args")]
        manifest: Option<PathBuf>,
        /// The QEMU binary (default: the manifest's, else qemu-system-x86_64).
        #[arg(long)]
        qemu: Option<PathBuf>,
        /// Once the guest runs, leave it in the background instead of in this terminal.
        #[arg(long)]
        daemonize: bool,
        /// With --daemonize: write QEMU's pid here.
        #[arg(long, requires = "daemonize")]
        pidfile: Option<PathBuf>,
        /// QEMU options, exactly as the source VM runs.
        #[arg(last = true, required_unless_present = "manifest")]
        qemu_args: Vec<String>,
    },
    /// Say what a state file holds, and whether it is complete.
    Inspect {
        statefile: PathBuf,
        /// Also say whether these QEMU options (after --) would restore it.
        #[arg(long)]
        check: bool,
        /// With --check: the QEMU that would restore it (default: qemu-system-x86_64).
        #[arg(long, requires = "check")]
        qemu: Option<PathBuf>,
        #[arg(last = true)]
        qemu_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    // SIGPIPE stays ignored (Rust's default): a QEMU that closes the pipe
    // it loads from, or a reader of our output that goes away, is an error
    // to report in words, never a silent death with a VM half-handled.
    let cli = Cli::parse();
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, Arc::clone(&cancel));
    }
    match run(&cli, cancel) {
        Ok(code) => code,
        Err(e) => {
            let code = exit_code(&e);
            if cli.json {
                say!(
                    "{}",
                    serde_json::json!({ "error": e.to_string(), "exit": code })
                );
            }
            eprintln!("qemu-migrate: {e}");
            ExitCode::from(code)
        }
    }
}

enum Shown {
    Bar(progress::Bar),
    Json(progress::JsonLines),
    Quiet(Quiet),
}

impl Shown {
    fn new(cli: &Cli) -> Shown {
        if cli.json {
            Shown::Json(progress::JsonLines::new())
        } else if !cli.quiet && std::io::stderr().is_terminal() {
            Shown::Bar(progress::Bar::new())
        } else {
            Shown::Quiet(Quiet)
        }
    }

    fn progress(&self) -> &dyn Progress {
        match self {
            Shown::Bar(b) => b,
            Shown::Json(j) => j,
            Shown::Quiet(q) => q,
        }
    }

    fn done(&self) {
        if let Shown::Bar(b) = self {
            b.finish();
        }
    }
}

fn run(cli: &Cli, cancel: Arc<AtomicBool>) -> Result<ExitCode, Error> {
    if let Cmd::Restore { statefile, .. }
    | Cmd::Inspect { statefile, .. }
    | Cmd::Export { statefile } = &cli.command
    {
        qemu_migrate::instant::not_the_image(statefile)?;
    }
    match &cli.command {
        Cmd::Save {
            monitor,
            statefile,
            live,
            then,
            bandwidth,
            timeout,
            no_sync,
            instant,
        } => {
            let mut vm = Vm::attach(monitor.as_str(), Duration::from_secs(*timeout))?;
            let mut options = SaveOptions::default();
            options.instant = *instant;
            options.live = *live;
            options.bandwidth = bandwidth.map(|m| m << 20);
            options.then = *then;
            options.no_sync = *no_sync;
            options.cancel = cancel;
            let shown = Shown::new(cli);
            let report = save::save(&mut vm, statefile, &options, shown.progress());
            shown.done();
            let report = report?;
            let m = &report.manifest;
            if let (Some(why), false) = (&report.fallback, cli.json) {
                eprintln!("qemu-migrate: not an instant save: {why}");
            }
            if cli.json {
                say!(
                    "{}",
                    serde_json::json!({ "saved": report.path, "seconds": report.elapsed.as_secs_f64(), "manifest": m, "fallback": report.fallback })
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
                if let Some(l) = &m.instant {
                    eprintln!(
                        "  RAM image {}: {} MiB, {:.1} MB of data ({} pages), the rest holes",
                        l.image,
                        l.block_bytes >> 20,
                        (l.data_pages * l.page_size) as f64 / 1e6,
                        l.data_pages
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restore {
            statefile,
            qemu,
            paused,
            daemonize,
            pidfile,
            verify,
            clone,
            qemu_args,
        } => {
            let mut options = RestoreOptions::default();
            options.verify = *verify;
            options.clone = *clone;
            options.qemu.clone_from(qemu);
            options.paused = *paused;
            options.args = (!qemu_args.is_empty()).then(|| qemu_args.clone());
            options.console = console(*daemonize);
            options.cancel = cancel;
            let shown = Shown::new(cli);
            let restored = restore::restore(statefile, &options, shown.progress());
            shown.done();
            let restored = restored?;
            let pid = restored.vm.pid();
            if cli.json {
                say!(
                    "{}",
                    serde_json::json!({ "restored": statefile, "pid": pid, "seconds": restored.elapsed.as_secs_f64(), "renamed": restored.renamed })
                );
            } else if *daemonize || !cli.quiet {
                eprintln!(
                    "restored {} in {:.2} s (QEMU pid {pid})",
                    statefile.display(),
                    restored.elapsed.as_secs_f64()
                );
            }
            if !cli.json {
                for (from, to) in &restored.renamed {
                    eprintln!("  the clone's {} is {}", from.display(), to.display());
                }
            }
            hand_over(restored.vm, *daemonize, pidfile.as_deref())
        }
        Cmd::Export { statefile } => {
            let stdout = std::io::stdout().lock();
            qemu_migrate::instant::export(statefile, stdout)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Inspect {
            statefile,
            check,
            qemu,
            qemu_args,
        } => inspect(cli, statefile, check.then(|| qemu.clone()), qemu_args),
        Cmd::Live {
            monitor,
            to,
            downtime_limit,
            bandwidth,
            no_auto_converge,
            then,
            timeout,
        } => {
            let mut vm = Vm::attach(monitor.as_str(), Duration::from_secs(*timeout))?;
            let mut options = LiveOptions::default();
            options.downtime_limit = downtime_limit.map(Duration::from_millis);
            options.bandwidth = bandwidth.map(|m| m << 20);
            options.auto_converge = !*no_auto_converge;
            options.then = *then;
            options.cancel = cancel;
            let shown = Shown::new(cli);
            let report = live::live(&mut vm, to, &options, shown.progress());
            shown.done();
            let r = report?;
            if cli.json {
                say!(
                    "{}",
                    serde_json::json!({
                        "migrated": r.destination.to_string(),
                        "seconds": r.elapsed.as_secs_f64(),
                        "total_time_ms": r.migration.total_time_ms,
                        "downtime_ms": r.migration.downtime_ms,
                        "bytes": r.migration.transferred,
                        "pid": r.destination_pid,
                        "state": r.destination_state,
                        "source_sockets": r.source_sockets,
                    })
                );
            } else {
                eprintln!(
                    "migrated to {} in {:.2} s: downtime {} ms, {:.1} MB sent; the guest is {} \
                     there{}",
                    r.destination,
                    r.elapsed.as_secs_f64(),
                    r.migration
                        .downtime_ms
                        .map_or("unknown".to_string(), |d| d.to_string()),
                    r.migration.transferred as f64 / 1e6,
                    r.destination_state,
                    r.destination_pid
                        .map_or(String::new(), |p| format!(" (QEMU pid {p})")),
                );
                for s in &r.source_sockets {
                    eprintln!(
                        "the paused source keeps its socket at {}; do not resume it while the \
                         destination runs",
                        s.display()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Receive {
            listen,
            manifest,
            qemu,
            daemonize,
            pidfile,
            qemu_args,
        } => {
            let spec = match manifest {
                Some(m) => VmSpec::Manifest(m.clone()),
                None => VmSpec::Args(qemu_args.clone()),
            };
            let mut options = ReceiveOptions::default();
            options.qemu.clone_from(qemu);
            options.console = console(*daemonize);
            options.cancel = cancel;
            let receiver = live::Receiver::start(listen, &spec, &options)?;
            if cli.json {
                say!(
                    "{}",
                    serde_json::json!({ "listening": receiver.listen, "pid": receiver.vm.pid() })
                );
            } else if !cli.quiet {
                eprintln!(
                    "waiting for a migration on {} (QEMU pid {})",
                    receiver.listen,
                    receiver.vm.pid()
                );
            }
            let shown = Shown::new(cli);
            let received = receiver.finish(&options, shown.progress());
            shown.done();
            let received = received?;
            let pid = received.vm.pid();
            if cli.json {
                say!(
                    "{}",
                    serde_json::json!({ "received": listen, "state": received.state, "pid": pid, "seconds": received.elapsed.as_secs_f64() })
                );
            } else if *daemonize || !cli.quiet {
                eprintln!(
                    "received the VM in {:.2} s; the guest is {} (QEMU pid {pid})",
                    received.elapsed.as_secs_f64(),
                    received.state
                );
            }
            hand_over(received.vm, *daemonize, pidfile.as_deref())
        }
    }
}

/// Where a launched QEMU's console goes: this terminal, or nowhere in the background.
fn console(daemonize: bool) -> Console {
    if daemonize {
        Console::Null
    } else {
        Console::Terminal
    }
}

/// Leaves a VM launched here running: in the background (with its pid in
/// `pidfile`), or in the foreground with this terminal until it ends.
fn hand_over(
    mut vm: Vm,
    daemonize: bool,
    pidfile: Option<&std::path::Path>,
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
    // way it does for any signal.
    forward_signals(pid);
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

fn inspect(
    cli: &Cli,
    statefile: &std::path::Path,
    check_with: Option<Option<PathBuf>>,
    qemu_args: &[String],
) -> Result<ExitCode, Error> {
    let manifest = Manifest::load(statefile)?;
    // The check reads a bare stream through already; its summary is reused.
    let mut verdict = restore::check(statefile);
    let summary = match verdict.as_mut().ok().and_then(|c| c.summary.take()) {
        Some(s) => s,
        None => qemu_stream::inspect_file(statefile).map_err(|e| Error::BadStateFile {
            path: statefile.to_path_buf(),
            reason: e.to_string(),
        })?,
    };
    // An instant save's RAM image: its identity, or read whole with --check.
    let layout = manifest.as_ref().and_then(|m| m.instant.clone());
    let mut image_check = None;
    if let (Ok(_), Some(l)) = (&verdict, &layout) {
        match qemu_migrate::instant::check_image(statefile, l, check_with.is_some(), &Quiet) {
            Ok(c) => image_check = Some(c),
            Err(e) => verdict = Err(e),
        }
    }
    let image_words = image_check.map(|c| match c {
        qemu_migrate::instant::ImageCheck::Identity => {
            "the very file the save wrote, unchanged (size and identity; --check reads it whole)"
        }
        _ => "read in full, its checksum matches",
    });
    if cli.json {
        say!(
            "{}",
            serde_json::json!({
                "file": statefile,
                "stream": summary,
                "manifest": manifest,
                "ram_image": image_words,
                "restorable": verdict.is_ok(),
                "problem": verdict.as_ref().err().map(|e| e.to_string()),
            })
        );
    } else {
        say!("{summary}");
        if let Some(m) = &manifest {
            say!(
                "manifest: saved by QEMU {} ({}) from a {} guest\n  options: {}",
                m.qemu_version,
                m.qemu.display(),
                if m.guest_was_running {
                    "running"
                } else {
                    "paused"
                },
                m.vm_options.join(" ")
            );
        }
        if let Some(l) = &layout {
            say!(
                "layout: instant: RAM block {} ({} MiB) in {}: {} pages of data, {} zero (holes), \
                 {} left in the stream; restore it with qemu-migrate, or by hand with \
                 -incoming \"exec: qemu-migrate export {}\"",
                l.block,
                l.block_bytes >> 20,
                l.image,
                l.data_pages,
                l.zero_pages,
                l.pages_in_stream,
                statefile.display()
            );
            if let Some(w) = image_words {
                say!("RAM image: {w}");
            }
        }
        match &verdict {
            Ok(_) => say!(
                "complete: yes{}",
                if manifest.is_some() {
                    ", checksum matches"
                } else {
                    ""
                }
            ),
            Err(e) => say!("complete: no: {e}"),
        }
    }
    let mut checked = verdict?;
    if let Some(binary) = check_with {
        checked.summary = Some(summary);
        // Without options, the check is of the QEMU and options recorded.
        let (binary, args, env) = match (&manifest, qemu_args.is_empty()) {
            (Some(m), true) => (
                binary.unwrap_or_else(|| m.qemu.clone()),
                m.args.clone(),
                m.env.clone(),
            ),
            _ => (
                binary.unwrap_or_else(|| "qemu-system-x86_64".into()),
                qemu_args.to_vec(),
                Default::default(),
            ),
        };
        qemu_migrate::preflight::check(&checked, &binary, &args, &env)?;
        if !cli.json {
            say!("these options can restore it");
        }
    }
    Ok(ExitCode::SUCCESS)
}
