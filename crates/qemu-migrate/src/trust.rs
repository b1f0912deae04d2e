//! What a restore trusts, as ssh treats its keys: a manifest names a binary
//! to run and an environment to run it in, so whoever can write one gets
//! the rights of whoever restores it. A restore therefore takes a manifest
//! and state file only from the invoking user (or root), never writable by
//! others; runs only a binary owned by root or the invoking user and not
//! writable by others, and only the very binary the save recorded (its
//! SHA-256) unless `--qemu` names another; applies only `QEMU_*`
//! variables, and says which others it dropped; and does not run, as root,
//! a VM that another user's QEMU ran unless told to.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, QemuFrom, Result};
use crate::manifest::Manifest;
use crate::os;

/// Refuses `path` (a manifest or state file; `what` says which) when it
/// belongs to another user than the invoking one or root, or others may
/// write it.
///
/// # Errors
/// [`Error::Untrusted`] saying why; [`Error::File`] when it cannot be read.
pub fn check_file(path: &Path, what: &'static str) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(Error::file(path, "checking who owns it"))?;
    check_owner_and_mode(path, &meta, what)
}

fn check_owner_and_mode(path: &Path, meta: &std::fs::Metadata, what: &'static str) -> Result<()> {
    let me = os::uid();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(Error::Untrusted {
            path: path.to_path_buf(),
            reason: format!(
                "the {what} belongs to {}, not to {}: it could make this restore run anything",
                os::user_name(meta.uid()),
                if me == 0 {
                    "root".to_string()
                } else {
                    format!("{} or root", os::user_name(me))
                }
            ),
        });
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(Error::Untrusted {
            path: path.to_path_buf(),
            reason: format!(
                "the {what} is writable by others (mode {:o}): chmod go-w it if it is yours and unchanged",
                meta.permissions().mode() & 0o7777
            ),
        });
    }
    Ok(())
}

/// The QEMU binary a manifest names, resolved (`PATH` for a bare name, symlinks
/// followed) and refused unless owned by root or the invoking user and not
/// writable by others.
///
/// # Errors
/// [`Error::Untrusted`], or [`Error::QemuNotFound`] (no such binary).
pub fn check_binary(binary: &Path) -> Result<PathBuf> {
    check_binary_from(binary, QemuFrom::Default)
}

fn check_binary_from(binary: &Path, from: QemuFrom) -> Result<PathBuf> {
    let real = find(binary).ok_or_else(|| Error::QemuNotFound {
        binary: binary.to_path_buf(),
        from,
    })?;
    let meta = std::fs::metadata(&real).map_err(|source| Error::Launch {
        binary: binary.to_path_buf(),
        source,
    })?;
    check_owner_and_mode(&real, &meta, "QEMU binary")?;
    Ok(real)
}

/// The file `binary` names (`PATH` searched for a bare name), symlinks followed.
fn find(binary: &Path) -> Option<PathBuf> {
    let found = if binary.components().count() == 1 {
        std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(binary))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.is_file())
    } else {
        Some(binary.to_path_buf())
    };
    found.and_then(|p| std::fs::canonicalize(p).ok())
}

/// The QEMU binary a restore (or a receive from a manifest) runs: the one
/// given with `--qemu`, else the manifest's, else `qemu-system-x86_64`
/// from `PATH`; with a line for each thing the user should know. The
/// manifest's is run only if trusted (see [`check_binary`]) and, when the
/// save recorded its SHA-256, only while its content is still that.
/// A manifest of an older version, with no digest, runs it with a warning.
///
/// # Errors
/// [`Error::QemuNotFound`] saying who named the binary; [`Error::Untrusted`]
/// for a binary changed since the save, or not trusted.
pub fn recorded_qemu(
    manifest: Option<(&Path, &Manifest)>,
    given: Option<&Path>,
) -> Result<(PathBuf, Vec<String>)> {
    let mut warnings = Vec::new();
    if let Some(g) = given {
        if find(g).is_none() {
            return Err(Error::QemuNotFound {
                binary: g.to_path_buf(),
                from: QemuFrom::Given,
            });
        }
        return Ok((g.to_path_buf(), warnings));
    }
    let Some((path, m)) = manifest else {
        let default = PathBuf::from("qemu-system-x86_64");
        if find(&default).is_none() {
            return Err(Error::QemuNotFound {
                binary: default,
                from: QemuFrom::Default,
            });
        }
        return Ok((default, warnings));
    };
    let real = check_binary_from(&m.qemu, QemuFrom::Manifest(path.to_path_buf()))?;
    match &m.qemu_sha256 {
        Some(recorded) => {
            let now = file_sha256(&real).map_err(|source| Error::Launch {
                binary: real.clone(),
                source,
            })?;
            if !now.eq_ignore_ascii_case(recorded) {
                return Err(Error::Untrusted {
                    path: real.clone(),
                    reason: format!(
                        "its content changed since the save (SHA-256 {}…, the save recorded \
                         {}…, in {}): it is not the QEMU that ran the saved VM (an upgrade, or \
                         someone replaced it). Give --qemu {} to run it all the same, or --qemu \
                         another QEMU",
                        &now[..12],
                        recorded.get(..12).unwrap_or(recorded),
                        path.display(),
                        real.display()
                    ),
                });
            }
        }
        None => warnings.push(format!(
            "the manifest {} records no digest of its QEMU (a save by an older version), so \
             {} is run without knowing it is the one that saved the VM; give --qemu to choose \
             the binary, and save again to record it",
            path.display(),
            real.display()
        )),
    }
    Ok((m.qemu.clone(), warnings))
}

/// SHA-256 of the file at `path`, 64 hex digits.
///
/// # Errors
/// When it cannot be read.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    sha256_of(std::fs::File::open(path)?)
}

/// SHA-256 of the binary process `pid` runs, read through `/proc/PID/exe`
/// (the very file, even deleted or replaced since); `None` when it cannot be read.
pub(crate) fn exe_sha256(pid: u32) -> Option<String> {
    file_sha256(Path::new(&format!("/proc/{pid}/exe"))).ok()
}

/// SHA-256 of the binary `binary` names (`PATH` searched for a bare name);
/// `None` when there is none or it cannot be read.
pub(crate) fn binary_sha256(binary: &Path) -> Option<String> {
    file_sha256(&find(binary)?).ok()
}

fn sha256_of(mut file: impl std::io::Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Only the `QEMU_*` variables of a manifest's environment (QEMU's module
/// and firmware paths); `LD_PRELOAD` and the like are never applied.
pub fn qemu_env(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    env.iter()
        .filter(|(k, _)| k.starts_with("QEMU_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A line for each variable of a manifest's environment that
/// [`qemu_env`] leaves out, naming it.
pub fn dropped_env(env: &BTreeMap<String, String>) -> Vec<String> {
    env.keys()
        .filter(|k| !k.starts_with("QEMU_"))
        .map(|k| {
            format!(
                "the manifest sets {k} for QEMU; it was not applied: only QEMU_* variables \
                 (QEMU's module and firmware paths) are"
            )
        })
        .collect()
}

/// Refuses, for root, a VM that another user's QEMU ran (`qemu_uid`),
/// unless `as_root`: restoring it as root would give that VM root's rights.
///
/// # Errors
/// [`Error::Untrusted`].
pub fn check_runs_as(statefile: &Path, qemu_uid: Option<u32>, as_root: bool) -> Result<()> {
    let me = os::uid();
    match qemu_uid {
        Some(u) if me == 0 && u != 0 && !as_root => Err(Error::Untrusted {
            path: statefile.to_path_buf(),
            reason: format!(
                "it was saved from a QEMU run by {}; restoring it as root would run that VM \
                 with root's rights: restore it as that user, or give --as-root",
                os::user_name(u)
            ),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_of_a_running_binary_is_of_the_file_it_runs_even_replaced_since() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sleeper");
        std::fs::copy("/bin/sleep", &path).unwrap();
        let original = file_sha256(&path).unwrap();
        let mut child = std::process::Command::new(&path).arg("60").spawn().unwrap();
        // Upgraded as a package manager does: the old file unlinked, a new one put there.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"#!/bin/sh\nexit 0\n").unwrap();
        let running = exe_sha256(child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(running.as_deref(), Some(original.as_str()));
        assert_ne!(file_sha256(&path).unwrap(), original);
        assert_eq!(original.len(), 64);
    }

    #[test]
    fn only_qemu_variables_are_applied_and_each_other_one_is_named() {
        let env: BTreeMap<String, String> = [("LD_PRELOAD", "/x.so"), ("QEMU_MODULE_DIR", "/m")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        assert_eq!(
            qemu_env(&env).keys().collect::<Vec<_>>(),
            ["QEMU_MODULE_DIR"]
        );
        let dropped = dropped_env(&env);
        assert_eq!(dropped.len(), 1);
        assert!(dropped[0].contains("LD_PRELOAD"), "{dropped:?}");
    }
}
