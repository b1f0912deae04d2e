//! Will these options restore this state? Answered before any QEMU starts,
//! in words, instead of QEMU's one-line error after it has started.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::Path;

use qemu_monitor::QemuVersion;

use crate::argv;
use crate::error::{Error, Result};
use crate::os;
use crate::restore::Checked;
use crate::vm::{binary_version, LaunchOptions, Vm};
use crate::UNCAPPED;

/// QEMU's default `-m` when none is given.
const DEFAULT_RAM_MIB: u64 = 128;

/// Refuses, in words, a QEMU or options that cannot restore `checked`;
/// says which version that QEMU is.
///
/// # Errors
/// [`Error::Mismatch`] listing every difference; errors of starting the probe QEMU.
pub fn check(
    checked: &Checked,
    binary: &Path,
    args: &[String],
    env: &BTreeMap<String, String>,
) -> Result<QemuVersion> {
    let mut differences = Vec::new();
    let dest_version = binary_version(binary, env)?;
    if let Some(m) = &checked.manifest {
        if let Ok(saved) = m.qemu_version.parse::<QemuVersion>() {
            if dest_version < saved {
                differences.push(format!(
                    "QEMU {dest_version} ({}) is older than QEMU {saved} that saved it; QEMU loads \
                     only states from its own or older versions",
                    binary.display()
                ));
            }
        }
        // The very QEMU (same path, same version) and options it was saved
        // with: nothing else can differ (its boot files and disks are
        // guarded apart).
        if m.qemu == binary
            && m.qemu_version == dest_version.to_string()
            && m.vm_options == argv::vm_options(args)
        {
            return verdict(checked, differences).map(|()| dest_version);
        }
    }
    let read;
    let saved = match &checked.summary {
        Some(s) => s,
        None => {
            read = qemu_stream::inspect_file(&checked.path).map_err(|e| Error::BadStateFile {
                path: checked.path.clone(),
                reason: e.to_string(),
            })?;
            &read
        }
    };
    let given = probe(binary, args, env)?;
    differences.extend(compare(saved, &given, args));
    verdict(checked, differences).map(|()| dest_version)
}

fn verdict(checked: &Checked, differences: Vec<String>) -> Result<()> {
    if differences.is_empty() {
        Ok(())
    } else {
        Err(Error::Mismatch {
            path: checked.path.clone(),
            differences,
        })
    }
}

/// What a VM started with `args` would send: asked of QEMU itself, by
/// starting it paused and reading its own migration stream. It knows which
/// devices and RAM blocks its options create far better than any guess.
///
/// # Errors
/// [`Error::QemuExited`] with QEMU's words when it refuses the options.
pub fn probe(
    binary: &Path,
    args: &[String],
    env: &BTreeMap<String, String>,
) -> Result<qemu_stream::Summary> {
    const FD_NAME: &str = "qemu-migrate-probe";
    let mut probe_args = argv::probe_options(args);
    probe_args.extend(["-S".to_string(), "-display".to_string(), "none".to_string()]);
    let mut vm = Vm::launch(
        binary,
        &probe_args,
        &LaunchOptions::new(crate::vm::Console::Null, env.clone()),
    )
    .map_err(|e| match e {
        Error::QemuExited { stderr, .. } => Error::QemuExited {
            during: "while checking the options (QEMU refused them)".into(),
            stderr,
        },
        e => e,
    })?;
    vm.monitor
        .set_migration_parameter("max-bandwidth", UNCAPPED)?;
    let (read_end, write_end) = os::pipe()?;
    vm.monitor.migrate_to_fd(FD_NAME, write_end.as_fd())?;
    drop(write_end);
    let summary = qemu_stream::inspect(read_end);
    let _ = vm.monitor.quit();
    summary.map_err(|e| {
        vm.exited(&format!(
            "while checking the options (its own stream could not be read: {e})"
        ))
    })
}

/// The differences that would make QEMU refuse the state, or load it into
/// a VM other than the one that saved it, in words.
#[must_use]
pub fn compare(
    saved: &qemu_stream::Summary,
    given: &qemu_stream::Summary,
    args: &[String],
) -> Vec<String> {
    let mut out = Vec::new();
    if let (Some(a), Some(b)) = (&saved.machine_type, &given.machine_type) {
        if a != b {
            let asked = match argv::machine(args) {
                Some(m) if m != *b => format!(" (-M {m})"),
                Some(_) => String::new(),
                None => " (QEMU's default)".into(),
            };
            out.push(format!(
                "machine type: the state is {a}; these options give {b}{asked}"
            ));
        }
    }
    let main = saved.main_ram.as_ref().map(|r| r.block.as_str());
    for block in &saved.ram_blocks {
        match given.ram_blocks.iter().find(|b| b.name == block.name) {
            None => out.push(format!(
                "RAM block {} ({}) is in the state, but these options create no such block \
                 (a device with its own memory or ROM is missing)",
                block.name,
                size(block.size)
            )),
            Some(b) if b.size != block.size && Some(block.name.as_str()) == main => {
                out.push(format!(
                    "RAM: the state holds {} MiB of guest RAM (-m {}); these options give {} MiB",
                    block.size >> 20,
                    block.size >> 20,
                    b.size >> 20
                ))
            }
            Some(b) if b.size != block.size => out.push(format!(
                "RAM block {}: {} in the state, {} with these options",
                block.name,
                size(block.size),
                size(b.size)
            )),
            Some(_) => {}
        }
    }
    for b in &given.ram_blocks {
        if !saved.ram_blocks.iter().any(|s| s.name == b.name) {
            out.push(format!(
                "RAM block {} ({}) exists only with these options",
                b.name,
                size(b.size)
            ));
        }
    }
    let key = |d: &qemu_stream::DeviceSection| (d.name.clone(), d.instance_id);
    for d in &saved.devices {
        if !given.devices.iter().any(|g| key(g) == key(d)) {
            out.push(format!(
                "device {} (instance {}) is in the state, but these options do not create it",
                d.name, d.instance_id
            ));
        }
    }
    for g in &given.devices {
        if !saved.devices.iter().any(|d| key(g) == key(d)) {
            out.push(format!(
                "device {} (instance {}) is created by these options but is not in the state: \
                 it would start from reset, not as it was saved",
                g.name, g.instance_id
            ));
        }
    }
    out
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// `-m 32`, `-m 32M`, `-m 1G`, `-m size=512M,slots=2` in MiB; QEMU's default if absent.
#[must_use]
pub fn ram_mib(args: &[String]) -> Option<u64> {
    let Some(v) = argv::last_value(args, "-m") else {
        return Some(DEFAULT_RAM_MIB);
    };
    let size = v
        .split(',')
        .find_map(|p| p.strip_prefix("size="))
        .unwrap_or_else(|| v.split(',').next().unwrap_or(v));
    let (num, unit) = size.split_at(
        size.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(size.len()),
    );
    let n: u64 = num.parse().ok()?;
    match unit.to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => Some(n),
        "G" | "GB" | "GIB" => Some(n * 1024),
        "T" | "TB" => Some(n * 1024 * 1024),
        "K" | "KB" => Some(n / 1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn reads_ram_sizes() {
        assert_eq!(ram_mib(&v("-m 32")), Some(32));
        assert_eq!(ram_mib(&v("-m 1G")), Some(1024));
        assert_eq!(ram_mib(&v("-m size=512M,slots=2,maxmem=2G")), Some(512));
        assert_eq!(ram_mib(&v("-nodefaults")), Some(128));
    }
}
