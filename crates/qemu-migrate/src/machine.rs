//! Versioned machine types across QEMU versions.
//!
//! A state names the machine type it was saved from in full
//! (`pc-i440fx-7.2`). `pc`, `q35` and no `-M` at all are aliases that each
//! QEMU resolves to its own newest version, so a VM saved by 7.2 and started
//! by 10.0 with the same options gets `pc-i440fx-10.0`, and 10.0 refuses the
//! state. QEMU keeps the old versioned types exactly so that a newer QEMU can
//! take the state: pinning the saved type is what makes an upgrade work.
//! A type the user named in full is their choice and is never replaced.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::argv;
use crate::error::{Error, Result};

/// x86's default machine when the options name none.
const DEFAULT_ALIAS: &str = "pc";

/// A machine type the options were given because they named only an alias
/// (or nothing) and the destination QEMU would have resolved it to another version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Pinned {
    /// The versioned type now given, e.g. `pc-i440fx-7.2`.
    pub machine: String,
    /// What the options named: `pc`, `q35`, or `None` for QEMU's default.
    pub instead_of: Option<String>,
}

impl std::fmt::Display for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.instead_of {
            Some(alias) => write!(
                f,
                "pinned the machine type to {} (the state's) instead of -M {alias}",
                self.machine
            ),
            None => write!(
                f,
                "pinned the machine type to {} (the state's) instead of QEMU's default",
                self.machine
            ),
        }
    }
}

/// `pc-i440fx-7.2` → (`pc-i440fx`, `7.2`); `None` for an unversioned type (`microvm`, `pc`).
pub fn split_version(machine: &str) -> Option<(&str, &str)> {
    let (family, version) = machine.rsplit_once('-')?;
    let mut parts = version.split('.');
    let numeric =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    (numeric(parts.next()) && numeric(parts.next()) && parts.next().is_none())
        .then_some((family, version))
}

/// Whether versioned type `a` is a later version than `b` (`pc-i440fx-10.0`
/// after `pc-i440fx-7.2`); `false` for unversioned types.
pub fn is_newer(a: &str, b: &str) -> bool {
    let version = |m| {
        let (_, v) = split_version(m)?;
        let (major, minor) = v.split_once('.')?;
        Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?))
    };
    matches!((version(a), version(b)), (Some(x), Some(y)) if x > y)
}

/// The versioned family an x86 alias stands for.
fn alias_family(alias: &str) -> Option<&'static str> {
    match alias {
        "pc" => Some("pc-i440fx"),
        "q35" => Some("pc-q35"),
        _ => None,
    }
}

/// `args` with `saved` (the state's machine type) pinned when they name only
/// an alias of its family or nothing; `None` when there is nothing to pin
/// (the same type named, another one named on purpose, or an unversioned type).
pub fn pin(args: &[String], saved: &str) -> Option<(Vec<String>, Pinned)> {
    let (family, _) = split_version(saved)?;
    let asked = argv::machine(args);
    let alias = asked.as_deref().unwrap_or(DEFAULT_ALIAS);
    if alias_family(alias)? != family {
        return None;
    }
    // QEMU merges every -M/-machine: a later type wins and the properties
    // (accel=, ...) of earlier ones stay.
    let mut pinned = args.to_vec();
    pinned.extend(["-M".to_string(), saved.to_string()]);
    Some((
        pinned,
        Pinned {
            machine: saved.to_string(),
            instead_of: asked,
        },
    ))
}

/// The versioned machine type `binary` gives a VM started with `args`
/// (`pc` on QEMU 7.2 → `pc-i440fx-7.2`), from its own `-M help`; `None`
/// for a type that has no versions.
///
/// # Errors
/// [`Error::Launch`] when the binary cannot be run.
pub fn resolve(
    binary: &Path,
    env: &BTreeMap<String, String>,
    args: &[String],
) -> Result<Option<String>> {
    let asked = argv::machine(args);
    if let Some(m) = &asked {
        if split_version(m).is_some() {
            return Ok(Some(m.clone()));
        }
    }
    let out = Command::new(binary)
        .args(["-M", "help"])
        .envs(env)
        .output()
        .map_err(|source| Error::Launch {
            binary: binary.to_path_buf(),
            source,
        })?;
    Ok(resolve_in_help(
        &String::from_utf8_lossy(&out.stdout),
        asked.as_deref(),
    ))
}

/// Reads `-M help`: `pc   Standard PC ... (alias of pc-i440fx-7.2)` and
/// `pc-i440fx-7.2   Standard PC ... (default)`.
fn resolve_in_help(help: &str, asked: Option<&str>) -> Option<String> {
    help.lines().find_map(|line| {
        let name = line.split_whitespace().next()?;
        match asked {
            Some(a) if name == a => line
                .rsplit_once("(alias of ")
                .and_then(|(_, rest)| rest.split(')').next())
                .map(str::to_string),
            None if line.trim_end().ends_with("(default)") => {
                split_version(name).map(|_| name.to_string())
            }
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn splits_versioned_types() {
        assert_eq!(split_version("pc-i440fx-7.2"), Some(("pc-i440fx", "7.2")));
        assert_eq!(split_version("pc-q35-10.0"), Some(("pc-q35", "10.0")));
        assert_eq!(split_version("microvm"), None);
        assert_eq!(split_version("pc"), None);
        assert_eq!(split_version("x-remote"), None);
        assert!(is_newer("pc-i440fx-10.0", "pc-i440fx-7.2"));
        assert!(!is_newer("pc-i440fx-7.2", "pc-i440fx-7.2"));
        assert!(!is_newer("pc-i440fx-7.2", "pc-i440fx-10.0"));
    }

    #[test]
    fn pins_aliases_and_the_default_but_never_a_named_type() {
        let (args, p) = pin(&v("-m 32"), "pc-i440fx-7.2").unwrap();
        assert_eq!(args, v("-m 32 -M pc-i440fx-7.2"));
        assert_eq!(p.instead_of, None);
        let (args, p) = pin(&v("-machine q35,accel=tcg"), "pc-q35-7.2").unwrap();
        assert_eq!(args, v("-machine q35,accel=tcg -M pc-q35-7.2"));
        assert_eq!(p.instead_of.as_deref(), Some("q35"));
        assert_eq!(argv::machine(&args).as_deref(), Some("pc-q35-7.2"));
        assert!(pin(&v("-M pc"), "pc-i440fx-7.2").is_some());
        // Another family, a type named in full, an unversioned state: untouched.
        assert_eq!(pin(&v("-m 32"), "pc-q35-7.2"), None);
        assert_eq!(pin(&v("-M q35"), "pc-i440fx-7.2"), None);
        assert_eq!(pin(&v("-M pc-i440fx-10.0"), "pc-i440fx-7.2"), None);
        assert_eq!(pin(&v("-M pc-i440fx-7.2"), "pc-i440fx-7.2"), None);
        assert_eq!(pin(&v("-M microvm"), "microvm"), None);
    }

    #[test]
    fn reads_aliases_and_the_default_from_help() {
        let help = "Supported machines are:\n\
            microvm              microvm (i386)\n\
            pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)\n\
            pc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996) (default)\n\
            q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)\n";
        assert_eq!(
            resolve_in_help(help, Some("pc")).as_deref(),
            Some("pc-i440fx-10.0")
        );
        assert_eq!(
            resolve_in_help(help, Some("q35")).as_deref(),
            Some("pc-q35-10.0")
        );
        assert_eq!(
            resolve_in_help(help, None).as_deref(),
            Some("pc-i440fx-10.0")
        );
        assert_eq!(resolve_in_help(help, Some("microvm")), None);
    }
}
