//! `cargo xtask e2e --upgrade`: the e2e scenarios with the state saved on the
//! oldest QEMU installed and restored on the newest. Through `qemu-migrate`
//! the restore pins the saved machine type itself; the recipe's own lines
//! (exec, unix, tcp) get `-M pc-i440fx-OLD` on the destination, as a user of
//! the recipe must give it by hand. `file:` is left out: QEMU 7.2 has none.

use std::path::Path;

use super::{Accel, GuestKind, MonitorKind, Scenario, Transport};
use crate::qemu::Qemu;

/// The scenarios, or none when only one QEMU version is installed.
pub fn scenarios(
    qemus: &[Qemu],
    accel: Option<Accel>,
    guest: &Path,
) -> anyhow::Result<Vec<Scenario>> {
    let mut by_version: Vec<(qemu_monitor::QemuVersion, &Qemu)> =
        qemus.iter().map(|q| (q.version, q)).collect();
    by_version.sort_by_key(|(v, _)| *v);
    let (Some((old_v, old)), Some((new_v, new))) = (by_version.first(), by_version.last()) else {
        anyhow::bail!("no QEMU to upgrade from");
    };
    if old_v == new_v {
        println!(
            "upgrade: only QEMU {} is installed; nothing to upgrade to",
            old.version
        );
        return Ok(Vec::new());
    }
    println!(
        "upgrade: saved on QEMU {}, restored on QEMU {}",
        old.version, new.version
    );
    let accel = accel.unwrap_or_else(|| super::probe_accel(old, guest));
    let mut list = Vec::new();
    let mut add = |transport, guest| {
        list.push(Scenario {
            qemu: (*old).clone(),
            accel,
            transport,
            monitor: MonitorKind::Hmp,
            guest,
            sabotage: None,
            restore_qemu: Some((*new).clone()),
        })
    };
    for t in [
        Transport::Exec,
        Transport::Unix,
        Transport::Tcp,
        Transport::QemuMigrate,
    ] {
        add(t, GuestKind::Test);
    }
    add(Transport::Exec, GuestKind::Linux);
    add(Transport::QemuMigrate, GuestKind::Linux);
    Ok(list)
}

/// The QEMU that restores.
pub(super) fn dest_qemu(sc: &Scenario) -> &Qemu {
    sc.restore_qemu.as_ref().unwrap_or(&sc.qemu)
}

/// `7.2.22` or `7.2.22-to-10.0.2`, for the scenario's name.
pub(super) fn versions(sc: &Scenario) -> String {
    match &sc.restore_qemu {
        Some(r) => format!("{}-to-{}", sc.qemu.version, r.version),
        None => sc.qemu.version.to_string(),
    }
}

/// A destination started by hand on a newer QEMU needs the saving QEMU's
/// versioned machine type (`pc` would be the newer QEMU's own).
pub(super) fn pin_by_hand(sc: &Scenario, args: &mut Vec<String>) {
    if sc.restore_qemu.is_none() {
        return;
    }
    let v = sc.qemu.version;
    args.extend(["-M".into(), format!("pc-i440fx-{}.{}", v.major, v.minor)]);
}
