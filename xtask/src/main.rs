//! The project's tasks, in plain Rust: `cargo xtask <task>`.

mod bench;
mod dist;
mod e2e;
mod fuzz;
mod guest;
mod linux_guest;
mod qemu;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// The project's tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TransportArg {
    Exec,
    Unix,
    Tcp,
    File,
    /// `qemu-migrate save` and `restore` instead of the recipe's line.
    QemuMigrate,
    /// `qemu-migrate save --instant` and `restore`: RAM as an image the restore maps.
    QemuMigrateInstant,
    /// `qemu-migrate snapshot` while the guest runs, and `restore`.
    QemuMigrateSnapshot,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum MonitorArg {
    Hmp,
    Qmp,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum GuestArg {
    Test,
    Linux,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AccelArg {
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SabotageArg {
    WrongMemory,
    Truncate,
    Reboot,
    FlipRam,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Boot the test guest with the recipe's options, save it with the recipe's
    /// line through monitor-send, restore it, and check it carried on.
    E2e {
        /// The QEMU binary (default: qemu-system-x86_64 on PATH).
        #[arg(long)]
        qemu: Option<PathBuf>,
        /// Accelerator (default: KVM if it really runs a guest here, else TCG).
        #[arg(long, value_enum)]
        accel: Option<AccelArg>,
        #[arg(long, value_enum, default_value = "exec")]
        transport: TransportArg,
        #[arg(long, value_enum, default_value = "hmp")]
        monitor: MonitorArg,
        #[arg(long, value_enum, default_value = "test")]
        guest: GuestArg,
        /// A kernel of your own (e.g. IncludeOS's chainloader), booted instead of the test guest.
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        #[arg(long, requires = "kernel", default_value = "")]
        append: String,
        /// Every variant against every QEMU installed (7.2 and 10.0 side by side),
        /// and --upgrade.
        #[arg(long)]
        all: bool,
        /// Save on the oldest QEMU installed, restore on the newest (test and
        /// Linux guests, every transport both support).
        #[arg(long)]
        upgrade: bool,
        /// Break the restore on purpose, to see the checks catch it.
        #[arg(long, value_enum)]
        sabotage: Option<SabotageArg>,
        /// Install QEMU, socat and nc first where missing (root and apt-get).
        #[arg(long)]
        install_deps: bool,
    },
    /// A .deb of monitor-send and qemu-migrate with man pages and completions
    /// (target/dist/), built with dpkg-deb.
    Dist,
    /// fmt, clippy and every test, against every QEMU installed.
    Test {
        /// Install QEMU 7.2, 10.0, socat and nc first where missing.
        #[arg(long)]
        install_deps: bool,
    },
    /// Speed and delivery, beside nc, socat and the seed's recipe.
    Bench {
        #[arg(long, default_value = "200")]
        runs: usize,
        #[arg(long, default_value = "100")]
        delivery_runs: usize,
        /// Guest RAM (MiB) for the save rows.
        #[arg(long, default_value = "1024")]
        ram: u32,
        /// How much of it the guest writes (MiB).
        #[arg(long, default_value = "600")]
        fill: u32,
        /// Only the instant-restore rows (1, 4 and 8 GiB guests, clones).
        #[arg(long)]
        instant_only: bool,
        /// Only the instant restore of the 1 GiB guest by the shape of its
        /// RAM (`-m`, libvirt-shaped, two NUMA nodes).
        #[arg(long)]
        shapes_only: bool,
        /// Only the live migration rows (local, TCP in clear, TCP with TLS).
        #[arg(long)]
        live_only: bool,
        /// Only the save rows (the recipe, save, snapshot, restore, the bounds).
        #[arg(long)]
        save_only: bool,
    },
    /// Build the test guest (fixtures/guest) into target/guest.
    BuildGuest,
    /// Fuzz the migration stream reader for a bounded time.
    Fuzz {
        #[arg(long, default_value = "60")]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = project_root();
    let result = match cli.task {
        Task::Test { install_deps } => test::run(&root, install_deps),
        Task::Bench {
            runs,
            delivery_runs,
            ram,
            fill,
            instant_only,
            shapes_only,
            live_only,
            save_only,
        } => bench::run(
            &root,
            &bench::Args {
                runs,
                delivery_runs,
                ram_mib: ram,
                fill_mib: fill,
                instant_only,
                shapes_only,
                live_only,
                save_only,
            },
        ),
        Task::Fuzz { seconds } => fuzz::run(&root, seconds),
        Task::Dist => dist::run(&root).map(drop),
        Task::BuildGuest => {
            guest::build(&root.join("target/guest")).map(|p| println!("{}", p.display()))
        }
        Task::E2e {
            qemu,
            accel,
            transport,
            monitor,
            guest,
            kernel,
            initrd,
            append,
            all,
            upgrade,
            sabotage,
            install_deps,
        } => {
            let options = e2e_cli::Options {
                qemu,
                accel: accel.map(|a| match a {
                    AccelArg::Kvm => e2e::Accel::Kvm,
                    AccelArg::Tcg => e2e::Accel::Tcg,
                }),
                transport: match transport {
                    TransportArg::Exec => e2e::Transport::Exec,
                    TransportArg::Unix => e2e::Transport::Unix,
                    TransportArg::Tcp => e2e::Transport::Tcp,
                    TransportArg::File => e2e::Transport::File,
                    TransportArg::QemuMigrate => e2e::Transport::QemuMigrate,
                    TransportArg::QemuMigrateInstant => e2e::Transport::QemuMigrateInstant,
                    TransportArg::QemuMigrateSnapshot => e2e::Transport::QemuMigrateSnapshot,
                },
                monitor: match monitor {
                    MonitorArg::Hmp => e2e::MonitorKind::Hmp,
                    MonitorArg::Qmp => e2e::MonitorKind::Qmp,
                },
                guest: match (kernel, guest) {
                    (Some(kernel), _) => e2e::GuestKind::Custom {
                        kernel,
                        initrd,
                        append,
                    },
                    (None, GuestArg::Test) => e2e::GuestKind::Test,
                    (None, GuestArg::Linux) => e2e::GuestKind::Linux,
                },
                all,
                upgrade,
                sabotage: sabotage.map(|s| match s {
                    SabotageArg::WrongMemory => e2e::Sabotage::WrongMemory,
                    SabotageArg::Truncate => e2e::Sabotage::Truncate,
                    SabotageArg::Reboot => e2e::Sabotage::Reboot,
                    SabotageArg::FlipRam => e2e::Sabotage::FlipRam,
                }),
                install_deps,
            };
            e2e_cli::run(&root, &options)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The e2e task's driver: which scenarios, and the report.
mod e2e_cli {
    use std::path::{Path, PathBuf};

    use anyhow::bail;

    use crate::{e2e, qemu, test::cargo};

    pub struct Options {
        pub qemu: Option<PathBuf>,
        pub accel: Option<e2e::Accel>,
        pub transport: e2e::Transport,
        pub monitor: e2e::MonitorKind,
        pub guest: e2e::GuestKind,
        pub all: bool,
        pub upgrade: bool,
        pub sabotage: Option<e2e::Sabotage>,
        pub install_deps: bool,
    }

    pub fn run(root: &Path, o: &Options) -> anyhow::Result<()> {
        if o.install_deps {
            qemu::install_deps(root)?;
        }
        let guest = test_guest::build(&root.join("target/guest"))?;
        cargo(root, &["build", "-q", "-p", "monitor-send"], &[])?;
        let qemus = e2e::qemus(o.qemu.as_deref(), o.all || o.upgrade)?;
        let linux = if o.all || o.upgrade || o.guest == e2e::GuestKind::Linux {
            let l = crate::linux_guest::prepare(&root.join("target/linux-guest"))?;
            Some(e2e::GuestFiles {
                kernel: l.kernel,
                initrd: l.initrd,
                append: l.append,
            })
        } else {
            None
        };
        let kit = e2e::Kit {
            root: root.to_path_buf(),
            guest: guest.clone(),
            monitor_send: root.join("target/debug/monitor-send"),
            linux,
        };
        let mut scenarios = Vec::new();
        for q in &qemus {
            let accel = o.accel.unwrap_or_else(|| e2e::probe_accel(q, &guest));
            println!(
                "QEMU {} ({}): {}",
                q.version,
                q.binary.display(),
                match (accel, o.accel.is_some()) {
                    (e2e::Accel::Kvm, _) => "KVM",
                    (e2e::Accel::Tcg, true) => "TCG (as asked)",
                    (e2e::Accel::Tcg, false) => "TCG (KVM does not run a guest here)",
                }
            );
            if o.upgrade && !o.all {
                continue;
            }
            if o.all {
                scenarios.extend(e2e::all_scenarios(q, accel, true));
            } else {
                scenarios.push(e2e::Scenario {
                    qemu: q.clone(),
                    accel,
                    transport: o.transport,
                    monitor: o.monitor,
                    guest: o.guest.clone(),
                    sabotage: o.sabotage,
                    restore_qemu: None,
                });
            }
        }
        // -- across a QEMU upgrade (upgrade.rs)
        if o.all || o.upgrade {
            scenarios.extend(crate::e2e::upgrade::scenarios(&qemus, o.accel, &guest)?);
        }
        // --
        let mut failed = 0;
        for sc in &scenarios {
            match e2e::run_one(&kit, sc) {
                Ok(r) => e2e::print_report(&r),
                Err(f) => {
                    failed += 1;
                    println!("FAIL {}\n  {f}", sc.name());
                }
            }
        }
        if failed > 0 {
            bail!("{failed} of {} e2e runs failed", scenarios.len());
        }
        Ok(())
    }
}

/// The workspace root, whatever directory cargo was run from.
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}
