//! `qemu-migrate`: the command line over the `qemu-migrate` library; see
//! `--help`. Flags, progress display, signals and exit statuses live here;
//! what a save, restore or migration means lives in the library. One
//! module per subcommand family, each with its options and its handler.

/// Writes a line to stdout. A reader that went away (`| head`) does not
/// stop the operation, which may be holding a VM: the output is dropped.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod assets;
mod inspect;
mod live;
mod progress;
mod restore;
mod roundtrip;
mod save;

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use qemu_migrate::argv::redact;
use qemu_migrate::{Error, ErrorKind};

/// `--monitor`'s value in any form QEMU's own options write it.
fn monitor_addr(s: &str) -> Result<qemu_monitor::MonitorAddr, String> {
    qemu_monitor::MonitorAddr::from_option(s)
}

const AFTER_HELP: &str = "\
Examples:
  qemu-migrate save --monitor /tmp/qemu-sock /tmp/statefile
  qemu-migrate save --with-disks --monitor /tmp/qemu-sock /tmp/ckpt   (or: qemu-migrate checkpoint ...)
  qemu-migrate save --snapshot --monitor /tmp/qemu-sock /tmp/snap    (or: qemu-migrate snapshot ...; the guest runs on)
  qemu-migrate restore --into /tmp/runs /tmp/ckpt   (again and again: each run on a fresh disk overlay)
  qemu-migrate revert --monitor /tmp/qemu-sock /tmp/ckpt
  qemu-migrate restore /tmp/statefile
  qemu-migrate restore /tmp/recipe-state -- -m 32 -nodefaults -kernel k ...   (a file with no manifest)
  qemu-migrate inspect /tmp/statefile --json
  qemu-migrate save --instant --monitor /tmp/qemu-sock /tmp/statefile   (RAM in statefile.ram)
  qemu-migrate restore --clone /tmp/statefile     (another VM from it, its own sockets)
  qemu-migrate export /tmp/statefile > plain-stream   (an instant save as one stream)
  qemu-migrate live --monitor /tmp/qemu-sock --to local
  qemu-migrate receive --tls-psk /etc/qemu-migrate.key --listen tcp:0.0.0.0:4444 -- -m 256 ...   (on the other host, then:)
  qemu-migrate live --tls-psk /etc/qemu-migrate.key --monitor /tmp/qemu-sock --to tcp:otherhost:4444
  qemu-migrate roundtrip --ready 'tick 3' --counter '^tick ([0-9]+)' --reject '^BOOT' -- -m 32 -serial stdio -kernel k

Exit status:
  0  done
  1  bad arguments, or the monitor socket or QEMU could not be reached or started
  2  refused before anything changed: incomplete or damaged state file, options
     that cannot restore it, disks or boot files changed since the save, a save
     target that exists (without --force), a VM already saved (postmigrate) or busy
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

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Save a running VM to a state file (and STATEFILE.manifest.json beside it).
    Save(save::SaveArgs),
    /// Start a VM from a state file with the options it was saved with.
    Restore(restore::RestoreArgs),
    /// Put a running VM back to a checkpoint (`save --with-disks`): a new QEMU with
    /// the same options and monitor sockets, on fresh disk overlays, loaded from it.
    Revert(restore::RevertArgs),
    /// Write an instant save as one plain QEMU stream on stdout, e.g. for
    /// `-incoming "exec: qemu-migrate export STATEFILE"`.
    Export(restore::ExportArgs),
    /// Move a running VM to a new QEMU while the guest runs; the source ends
    /// only after the destination confirms the guest runs there.
    Live(live::LiveArgs),
    /// Start a QEMU that waits for a live migration on a TCP port, then run it.
    Receive(live::ReceiveArgs),
    /// Boot a VM, save and restore it (or migrate it), and check from its
    /// serial console that it carried on: a regression check for CI.
    Roundtrip(Box<roundtrip::Args>),
    /// Write man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    GenerateAssets { dir: std::path::PathBuf },
    /// Say what a state file holds, and whether it is complete.
    Inspect(inspect::InspectArgs),
}

fn main() -> ExitCode {
    // SIGPIPE stays ignored (Rust's default): a QEMU that closes the pipe
    // it loads from, or a reader of our output that goes away, is an error
    // to report in words, never a silent death with a VM half-handled.
    // `checkpoint` is `save --with-disks`.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `snapshot` is `save --snapshot`. Global flags may come first.
    if let Some(at) = argv
        .iter()
        .skip(1)
        .position(|a| !a.to_string_lossy().starts_with('-'))
        .map(|i| i + 1)
    {
        let flag = match argv[at].to_str() {
            Some("checkpoint") => Some("--with-disks"),
            Some("snapshot") => Some("--snapshot"),
            _ => None,
        };
        if let Some(flag) = flag {
            argv.splice(at..=at, ["save".into(), flag.into()]);
        }
    }
    let cli = Cli::parse_from(argv);
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, Arc::clone(&cancel));
    }
    match run(&cli, cancel) {
        Ok(code) => code,
        Err(e) => {
            let code = exit_code(&e);
            // QEMU's errors quote the option they reject, secrets and all.
            let text = redact(&e.to_string());
            if cli.json {
                say!("{}", serde_json::json!({ "error": text, "exit": code }));
            }
            eprintln!("qemu-migrate: {text}");
            ExitCode::from(code)
        }
    }
}

fn run(cli: &Cli, cancel: Arc<AtomicBool>) -> Result<ExitCode, Error> {
    // An instant save's RAM image given where its state file is meant is
    // named as such, whichever command was given it.
    let statefile = match &cli.command {
        Cmd::Restore(a) => Some(&a.statefile),
        Cmd::Inspect(a) => Some(&a.statefile),
        Cmd::Export(a) => Some(&a.statefile),
        _ => None,
    };
    if let Some(statefile) = statefile {
        qemu_migrate::instant::not_the_image(statefile)?;
    }
    match &cli.command {
        Cmd::Roundtrip(args) => Ok(roundtrip::run(args, cli.json, cancel)),
        Cmd::GenerateAssets { dir } => {
            assets::generate(dir).map_err(|source| Error::File {
                path: dir.clone(),
                what: "writing man pages and completions",
                source,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Save(args) => save::save(args, cli, cancel),
        Cmd::Restore(args) => restore::restore(args, cli, cancel),
        Cmd::Revert(args) => restore::revert(args, cli, cancel),
        Cmd::Export(args) => restore::export(args),
        Cmd::Inspect(args) => inspect::inspect(args, cli),
        Cmd::Live(args) => live::live(args, cli, cancel),
        Cmd::Receive(args) => live::receive(args, cli, cancel),
    }
}
