//! Will these options restore this state? Answered before any QEMU starts,
//! in words, instead of QEMU's one-line error after it has started.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use qemu_monitor::QemuVersion;

use crate::argv;
use crate::error::{Error, Result};
use crate::restore::Checked;

/// QEMU's default `-m` when none is given.
const DEFAULT_RAM_MIB: u64 = 128;

pub fn check(
    checked: &Checked,
    binary: &Path,
    args: &[String],
    env: &BTreeMap<String, String>,
) -> Result<()> {
    let mut differences = Vec::new();
    let dest_version = qemu_version(binary, env)?;

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
        let saved_opts = &m.vm_options;
        let new_opts = argv::vm_options(args);
        if *saved_opts != new_opts {
            differences.push(format!(
                "the VM's options differ from those it was saved with:\n      saved: {}\n      given: {}",
                saved_opts.join(" "),
                new_opts.join(" ")
            ));
        }
    }

    let saved_ram_mib = match (&checked.summary, &checked.manifest) {
        (Some(s), _) => s.main_ram.as_ref().map(|r| r.mib),
        (None, Some(m)) => Some(m.ram_bytes >> 20),
        _ => None,
    };
    let given_ram_mib = ram_mib(args);
    if let (Some(saved), Some(given)) = (saved_ram_mib, given_ram_mib) {
        if saved != given {
            differences.push(format!(
                "RAM: the state holds {saved} MiB of guest RAM (-m {saved}); these options give {given} MiB"
            ));
        }
    }

    let saved_machine = checked
        .summary
        .as_ref()
        .and_then(|s| s.machine_type.clone())
        .or_else(|| checked.manifest.as_ref().and_then(|m| m.machine.clone()));
    if let Some(saved) = saved_machine {
        let asked = argv::machine(args);
        if let Some(given) = resolve_machine(binary, env, asked.as_deref())? {
            if given != saved {
                differences.push(format!(
                    "machine type: the state is {saved}; these options give {given}{}",
                    match &asked {
                        Some(a) if *a != given => format!(" (-M {a})"),
                        None => " (QEMU's default)".to_string(),
                        _ => String::new(),
                    }
                ));
            }
        }
    }

    if differences.is_empty() {
        Ok(())
    } else {
        Err(Error::Mismatch {
            path: checked.path.clone(),
            differences,
        })
    }
}

fn qemu_version(binary: &Path, env: &BTreeMap<String, String>) -> Result<QemuVersion> {
    let out = Command::new(binary)
        .arg("--version")
        .envs(env)
        .output()
        .map_err(|source| Error::Launch {
            binary: binary.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Error::Protocol(format!(
                "{} --version said {:?}",
                binary.display(),
                text.trim()
            ))
        })
}

/// `-m 32`, `-m 32M`, `-m 1G`, `-m size=512M,slots=2` in MiB; QEMU's default if absent.
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

/// The versioned machine type `asked` means on this QEMU (`pc` → `pc-i440fx-7.2`),
/// from `-M help`; `None` asked means QEMU's default.
fn resolve_machine(
    binary: &Path,
    env: &BTreeMap<String, String>,
    asked: Option<&str>,
) -> Result<Option<String>> {
    let out = Command::new(binary)
        .args(["-M", "help"])
        .envs(env)
        .output()
        .map_err(|source| Error::Launch {
            binary: binary.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines().skip(1) {
        let mut words = line.split_whitespace();
        let Some(name) = words.next() else { continue };
        let target = line
            .split("(alias of ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .unwrap_or(name);
        let is_default = line.contains("(default)");
        match asked {
            Some(a) if a == name => return Ok(Some(target.to_string())),
            None if is_default => return Ok(Some(target.to_string())),
            _ => {}
        }
    }
    Ok(asked.map(String::from))
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
