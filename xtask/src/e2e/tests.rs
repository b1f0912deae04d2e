//! Breaking the restore on purpose: each way is caught and named.

use std::path::PathBuf;
use std::process::Command;

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
        let qemu = qemu::probe(&bin).unwrap_or_else(|| panic!("{} does not run", bin.display()));
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
