//! What a restore trusts, as ssh treats its keys: a manifest names a binary
//! to run and an environment to run it in, so whoever can write one gets
//! the rights of whoever restores it. A restore therefore takes a manifest
//! and state file only from the invoking user (or root), never writable by
//! others; runs only a binary owned by root or the invoking user and not
//! writable by others; applies only `QEMU_*` variables; and does not run,
//! as root, a VM that another user's QEMU ran unless told to.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
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
/// [`Error::Untrusted`] or [`Error::Launch`] (no such binary).
pub fn check_binary(binary: &Path) -> Result<PathBuf> {
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
    let real = found
        .and_then(|p| std::fs::canonicalize(p).ok())
        .ok_or_else(|| Error::Launch {
            binary: binary.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
    let meta = std::fs::metadata(&real).map_err(|source| Error::Launch {
        binary: binary.to_path_buf(),
        source,
    })?;
    check_owner_and_mode(&real, &meta, "QEMU binary")?;
    Ok(real)
}

/// Only the `QEMU_*` variables of a manifest's environment (QEMU's module
/// and firmware paths); `LD_PRELOAD` and the like are never applied.
pub fn qemu_env(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    env.iter()
        .filter(|(k, _)| k.starts_with("QEMU_"))
        .map(|(k, v)| (k.clone(), v.clone()))
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
