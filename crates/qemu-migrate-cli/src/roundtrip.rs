//! `qemu-migrate roundtrip`: the library's round-trip check, its flags, its
//! report on stdout (or as JSON, or JUnit XML) and its exit statuses.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use qemu_migrate::roundtrip::{self, Check, FailureKind, RamRegion, Transport};
use qemu_migrate::vmrunner::VmJson;
use regex::Regex;

pub const EXIT_CODES: &str = "\
Exit status (vmrunner's where one fits):
  0   every check passed
  1   bad arguments, or the check could not be set up
  66  timeout: the guest was not ready in time (or printed no counter before the save)
  67  the guest panicked
  70  cancelled (Ctrl-C)
  72  boot failed: QEMU did not start, or exited before the guest was ready
  73  the vm.json could not be read
  80  the save failed
  81  QEMU refused the state on restore (or the check before it did)
  82  rebooted: a --reject line appeared after the guest was ready
  83  the counter started over or stopped after the restore
  84  an --expect line did not appear after the restore
  85  the RAM region differs after the restore";

/// The exit status for a failure, as [`EXIT_CODES`] lists them.
pub fn exit_code(kind: FailureKind) -> u8 {
    match kind {
        FailureKind::Setup => 1,
        FailureKind::Timeout => 66,
        FailureKind::Panic => 67,
        FailureKind::Cancelled => 70,
        FailureKind::BootFailed => 72,
        FailureKind::SaveFailed => 80,
        FailureKind::RestoreRefused => 81,
        FailureKind::Rebooted => 82,
        FailureKind::CounterRestarted => 83,
        FailureKind::ExpectedMissing => 84,
        FailureKind::RamDiffers => 85,
        _ => 1,
    }
}

const VM_JSON_UNREADABLE: u8 = 73;

/// Boot a VM, save and restore it (or migrate it), and check from its
/// serial console that it carried on.
#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_CODES)]
pub struct Args {
    /// The guest is ready to be saved once a serial line matches.
    #[arg(long, value_name = "REGEX")]
    ready: Regex,
    /// A line that must appear after the restore (repeatable).
    #[arg(long, value_name = "REGEX")]
    expect: Vec<Regex>,
    /// A line that must not appear once the guest was ready, e.g. its boot banner (repeatable).
    #[arg(long, value_name = "REGEX")]
    reject: Vec<Regex>,
    /// A number the guest prints (one capture group) that must go on increasing.
    #[arg(long, value_name = "REGEX")]
    counter: Option<Regex>,
    /// How many counter lines the restored guest must print.
    #[arg(long, value_name = "N", default_value = "2", requires = "counter")]
    counter_after: usize,
    /// Lines that mean the guest panicked (default: IncludeOS's and Linux's panic lines).
    #[arg(long, value_name = "REGEX")]
    panic: Option<Regex>,
    /// Guest RAM that must be identical after the restore, read with pmemsave
    /// (e.g. 0x400000:1M).
    #[arg(long, value_name = "ADDR:SIZE")]
    ram: Option<RamRegion>,
    /// The QEMU that boots and saves the VM.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// The QEMU that restores it (default: the same; a newer one gets the
    /// saved machine type pinned).
    #[arg(long, value_name = "QEMU")]
    restore_qemu: Option<PathBuf>,
    /// How the state goes over: file (save, restore), live-local or live-tcp
    /// (a live migration on this host, over a unix socket or TCP on 127.0.0.1),
    /// instant (save --instant, a restore that maps the RAM image), snapshot
    /// (a point-in-time snapshot while the guest runs, then a restore).
    #[arg(long, default_value = "file")]
    transport: Transport,
    /// Seconds the boot, and each wait after the restore, may take.
    #[arg(long, value_name = "SECONDS", default_value = "60")]
    timeout: u64,
    /// Without --expect or --counter: seconds the restored guest is watched
    /// for --reject and panic lines.
    #[arg(long, value_name = "SECONDS", default_value = "2")]
    watch: f64,
    /// Boot the VM an IncludeOS vm.json describes (options after -- are added).
    #[arg(long, value_name = "FILE")]
    vm_json: Option<PathBuf>,
    /// With --vm-json: the chainloader that boots the image (default: for a
    /// 64-bit image, $INCLUDEOS_PREFIX/includeos/chainloader).
    #[arg(long, value_name = "FILE", requires = "vm_json")]
    chainloader: Option<PathBuf>,
    /// With --vm-json: the service's command line.
    #[arg(long, value_name = "ARGS", default_value = "", requires = "vm_json")]
    append: String,
    /// Where the state, serial log and QEMUs' stderr go (default: a fresh
    /// directory, removed when every check passes).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Also write the report as JUnit XML.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// The VM's QEMU options, its serial console on stdio.
    #[arg(last = true)]
    qemu_args: Vec<String>,
}

/// Runs the check and prints its report; returns the exit status.
pub fn run(a: &Args, json: bool, cancel: Arc<AtomicBool>) -> ExitCode {
    let args = match &a.vm_json {
        Some(path) => match vm_json_args(path, a) {
            Ok(args) => args,
            Err(e) => {
                eprintln!("qemu-migrate: {e}");
                return ExitCode::from(VM_JSON_UNREADABLE);
            }
        },
        None if a.qemu_args.is_empty() => {
            eprintln!("qemu-migrate: give the VM's QEMU options after --, or --vm-json FILE");
            return ExitCode::from(1);
        }
        None => a.qemu_args.clone(),
    };
    let (workdir, temporary) = match &a.workdir {
        Some(d) => (d.clone(), None),
        None => match tempfile::Builder::new()
            .prefix("qemu-migrate-roundtrip-")
            .tempdir()
        {
            Ok(t) => (t.path().to_path_buf(), Some(t)),
            Err(e) => {
                eprintln!("qemu-migrate: creating a work directory: {e}");
                return ExitCode::from(1);
            }
        },
    };
    let mut check = Check::new(a.qemu.clone(), args, a.ready.clone(), workdir);
    check.restore_qemu.clone_from(&a.restore_qemu);
    check.transport = a.transport;
    check.timeout = Duration::from_secs(a.timeout);
    check.watch = Duration::from_secs_f64(a.watch.max(0.0));
    check.expect.clone_from(&a.expect);
    check.reject.clone_from(&a.reject);
    check.counter.clone_from(&a.counter);
    check.counter_after = a.counter_after;
    if a.panic.is_some() {
        check.panic.clone_from(&a.panic);
    }
    check.ram = a.ram;
    check.cancel = cancel;

    let report = roundtrip::run(&check);
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("a report serialises")
        );
    } else {
        println!("{report}");
    }
    if let Some(path) = &a.junit {
        let name = a
            .vm_json
            .as_deref()
            .and_then(Path::file_stem)
            .map_or("qemu-migrate roundtrip".to_string(), |s| {
                format!("roundtrip {}", s.to_string_lossy())
            });
        if let Err(e) = std::fs::write(path, roundtrip::junit(&report, &name)) {
            eprintln!("qemu-migrate: {}: {e}", path.display());
        }
    }
    match &report.failure {
        None => ExitCode::SUCCESS,
        Some(f) => {
            // Kept for the post-mortem the report points at.
            if let Some(t) = temporary {
                let _ = t.keep();
            }
            ExitCode::from(exit_code(f.kind))
        }
    }
}

fn vm_json_args(path: &Path, a: &Args) -> Result<Vec<String>, qemu_migrate::vmrunner::VmJsonError> {
    let vm = VmJson::load(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut args = vm.qemu_args(base, &a.append, a.chainloader.as_deref())?;
    args.extend(a.qemu_args.iter().cloned());
    Ok(args)
}
