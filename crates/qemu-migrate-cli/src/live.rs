//! `qemu-migrate live` and `receive`: a VM moved while it runs.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use qemu_migrate::Error;

use crate::progress::Shown;
use crate::Cli;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use qemu_migrate::live::{
    self as library, AfterLive, Destination, LiveOptions, ReceiveOptions, Security, VmSpec,
};
use qemu_migrate::Vm;

use crate::restore::{console, hand_over};

/// How a migration over TCP is secured: one of the three, on both hosts.
#[derive(Debug, clap::Args)]
#[group(multiple = false)]
pub(crate) struct SecurityArgs {
    /// QEMU's TLS with a pre-shared key from FILE, which both hosts hold:
    /// one line `IDENTITY:HEXKEY` (QEMU's keys.psk form) or the hex key
    /// alone, mode 600; make one with `head -c 32 /dev/urandom | xxd -p -c 64`.
    #[arg(long, value_name = "FILE")]
    tls_psk: Option<PathBuf>,
    /// QEMU's TLS with x509 certificates in DIR, laid out as libvirt's
    /// /etc/pki/qemu: ca-cert.pem, server-cert.pem and server-key.pem for
    /// `receive`, ca-cert.pem, client-cert.pem and client-key.pem for `live`.
    #[arg(long, value_name = "DIR")]
    tls_x509: Option<PathBuf>,
    /// Migrate over TCP in clear, unauthenticated: guest RAM crosses the
    /// network readable by anyone on the way, and anyone who reaches the
    /// port can send a VM.
    #[arg(long)]
    insecure: bool,
}

impl SecurityArgs {
    /// The choice made, saying on stderr what `--insecure` means.
    fn security(&self) -> Option<Security> {
        if self.insecure {
            eprintln!("{}", library::INSECURE_WARNING);
            return Some(Security::Insecure);
        }
        if let Some(f) = &self.tls_psk {
            return Some(Security::Psk(f.clone()));
        }
        self.tls_x509.clone().map(Security::X509)
    }
}

/// The options of `qemu-migrate live`.
#[derive(Debug, clap::Args)]
pub(crate) struct LiveArgs {
    /// The VM's monitor (HMP or QMP): a socket path, @abstract, unix:PATH, tcp:HOST:PORT or telnet:HOST:PORT, e.g. /tmp/qemu-sock.
    #[arg(long, value_parser = crate::monitor_addr)]
    monitor: qemu_monitor::MonitorAddr,
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
    /// The longest the migration may run, in seconds; then it is cancelled
    /// and the source runs on (or see --timeout-suspend).
    #[arg(long, value_name = "SECS", default_value_t = library::DEFAULT_TIMEOUT.as_secs())]
    timeout: u64,
    /// With --to local: the destination's QEMU binary (default: the
    /// source's); a newer one gets the source's machine type pinned.
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// At the timeout, pause the guest so that the migration finishes
    /// (it is resumed on the destination) instead of cancelling it. Local only.
    #[arg(long)]
    timeout_suspend: bool,
    /// Deadline for each monitor reply, in seconds.
    #[arg(long, value_name = "SECS", default_value = "30")]
    reply_timeout: u64,
    #[command(flatten)]
    security: SecurityArgs,
}

/// The options of `qemu-migrate receive`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReceiveArgs {
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
    #[command(flatten)]
    security: SecurityArgs,
    /// QEMU options, exactly as the source VM runs.
    #[arg(last = true, required_unless_present = "manifest")]
    qemu_args: Vec<String>,
}

pub(crate) fn live(args: &LiveArgs, cli: &Cli, cancel: Arc<AtomicBool>) -> Result<ExitCode, Error> {
    let LiveArgs {
        monitor,
        to,
        downtime_limit,
        bandwidth,
        no_auto_converge,
        then,
        timeout,
        qemu,
        timeout_suspend,
        reply_timeout,
        security,
    } = args;
    let mut vm = Vm::attach(monitor.clone(), Duration::from_secs(*reply_timeout))?;
    let mut options = LiveOptions::default();
    options.destination_qemu.clone_from(qemu);
    options.timeout = Duration::from_secs(*timeout);
    options.timeout_suspend = *timeout_suspend;
    options.downtime_limit = downtime_limit.map(Duration::from_millis);
    options.bandwidth = bandwidth.map(|m| m << 20);
    options.auto_converge = !*no_auto_converge;
    options.then = *then;
    options.cancel = cancel;
    if matches!(to, Destination::Tcp { .. }) {
        options.security = security.security();
    } else if security.insecure || security.tls_psk.is_some() || security.tls_x509.is_some() {
        options.security = Some(Security::Insecure);
    }
    let shown = Shown::new(cli);
    let report = library::live(&mut vm, to, &options, shown.progress());
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
                "pinned_machine": r.pinned,
                "warnings": r.warnings,
                "paused_for": r.paused_for,
            })
        );
        if let Some(why) = &r.paused_for {
            eprintln!("qemu-migrate: the guest was paused while it moved: {why}");
        }
    } else {
        for w in &r.warnings {
            eprintln!("qemu-migrate: warning: {w}");
        }
        if let Some(p) = &r.pinned {
            eprintln!("qemu-migrate: {p}");
        }
        if let Some(why) = &r.paused_for {
            eprintln!(
                "qemu-migrate: the guest was paused while it moved, and resumed on the \
                 destination: {why}"
            );
        }
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

/// A receiver's progress whose notes (connections it refused) reach stderr
/// also where no progress is shown: a receiver run by a service manager
/// must still say whom it turned away.
struct Refusals<'a> {
    inner: &'a dyn qemu_migrate::progress::Progress,
    to_stderr: bool,
}

impl qemu_migrate::progress::Progress for Refusals<'_> {
    fn update(&self, phase: &str, done: u64, total: Option<u64>) {
        self.inner.update(phase, done, total);
    }

    fn note(&self, text: &str) {
        if self.to_stderr {
            eprintln!("qemu-migrate: {text}");
        } else {
            self.inner.note(text);
        }
    }
}

pub(crate) fn receive(
    args: &ReceiveArgs,
    cli: &Cli,
    cancel: Arc<AtomicBool>,
) -> Result<ExitCode, Error> {
    let ReceiveArgs {
        listen,
        manifest,
        qemu,
        daemonize,
        pidfile,
        qemu_args,
        security,
    } = args;
    let spec = match manifest {
        Some(m) => VmSpec::Manifest(m.clone()),
        None => VmSpec::Args(qemu_args.clone()),
    };
    let mut options = ReceiveOptions::default();
    options.qemu.clone_from(qemu);
    options.console = console(*daemonize);
    options.cancel = Arc::clone(&cancel);
    options.security = security.security();
    let receiver = library::Receiver::start(listen, &spec, &options)?;
    for w in &receiver.warnings {
        eprintln!("qemu-migrate: warning: {w}");
    }
    if cli.json {
        say!(
            "{}",
            serde_json::json!({ "listening": receiver.listen, "pid": receiver.vm.pid(), "pinned_machine": receiver.pinned })
        );
    } else if !cli.quiet {
        if let Some(p) = &receiver.pinned {
            eprintln!("qemu-migrate: {p}");
        }
        eprintln!(
            "waiting for a migration on {} (QEMU pid {})",
            receiver.listen,
            receiver.vm.pid()
        );
    }
    let shown = Shown::new(cli);
    let progress = Refusals {
        inner: shown.progress(),
        to_stderr: !cli.json && !cli.quiet && !std::io::stderr().is_terminal(),
    };
    let received = receiver.finish(&options, &progress);
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
    hand_over(received.vm, *daemonize, pidfile.as_deref(), &cancel)
}
