//! Private directories of a run (QEMU's monitor socket, a stream socket):
//! removed when the run ends, and by the next run when it was killed.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// The lock file inside a run's directory: held (`flock`) while the run lives.
const LOCK: &str = ".run.lock";
/// Every run directory's name starts with this.
const PREFIX: &str = "qemu-migrate-";
/// A directory of an older version (no lock file) with no socket in use is
/// taken for a dead run's once it is this old: it may be a live run's that
/// has not bound its socket yet.
const UNLOCKED_AGE: Duration = Duration::from_secs(60);

/// A private directory (`0700`) in the temporary directory, named
/// `qemu-migrate-KIND…`, locked while this run lives and removed when
/// dropped. It is made under a name the sweep ignores and renamed once
/// locked, so no other run can take it for a dead one's.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    _lock: File,
}

impl RunDir {
    /// Makes the directory, after removing those of dead runs.
    ///
    /// # Errors
    /// [`Error::File`] when it cannot be made or locked.
    pub fn new(kind: &str) -> Result<RunDir> {
        let tmp = std::env::temp_dir();
        sweep_run_dirs(&tmp);
        let err = |what| Error::file(&tmp, what);
        let made = tempfile::Builder::new()
            .prefix(&format!(".{PREFIX}{kind}"))
            .suffix(".new")
            .tempdir_in(&tmp)
            .map_err(err("creating a private directory"))?;
        let lock = File::options()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(made.path().join(LOCK))
            .map_err(err("creating a private directory's lock"))?;
        lock.try_lock()
            .map_err(|e| err("locking a private directory")(e.into()))?;
        let name = made
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix('.'))
            .and_then(|n| n.strip_suffix(".new"))
            .map(str::to_string)
            .unwrap_or_else(|| format!("{PREFIX}{kind}{}", std::process::id()));
        let path = tmp.join(name);
        std::fs::rename(made.path(), &path).map_err(err("naming a private directory"))?;
        // Renamed: the guard's path is gone, so it removes nothing.
        let _ = made.keep();
        Ok(RunDir { path, _lock: lock })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes this user's run directories in `tmp` whose run is dead: its
/// lock file is free, or, made by an older version without one (named as
/// it named them), it holds only sockets, none of them in use, and is
/// older than a minute.
pub fn sweep_run_dirs(tmp: &Path) {
    let me = super::process::uid();
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    let bound: Vec<String> = super::unix_sockets().into_iter().map(|s| s.name).collect();
    for entry in entries.flatten() {
        let name = entry.file_name();
        // `qemu-migrate-UID` is the lock directory (see `lock.rs`), never a run's.
        let lock_dir = format!("{PREFIX}{me}");
        if !name
            .to_str()
            .is_some_and(|n| n.starts_with(PREFIX) && n != lock_dir)
        {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != me {
            continue;
        }
        match File::options()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path.join(LOCK))
        {
            Ok(lock) => {
                if lock.try_lock().is_ok() {
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
            Err(_) => {
                let old = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_some_and(|age| age > UNLOCKED_AGE);
                let prefix = format!("{}/", path.display());
                let in_use = bound.iter().any(|s| s.starts_with(&prefix));
                // An older version's run directory, by its name, holds sockets
                // and nothing else.
                let only_sockets = std::fs::read_dir(&path).is_ok_and(|d| {
                    let kinds: Vec<bool> = d
                        .flatten()
                        .map(|e| {
                            use std::os::unix::fs::FileTypeExt;
                            e.file_type().is_ok_and(|t| t.is_socket())
                        })
                        .collect();
                    !kinds.is_empty() && kinds.iter().all(|&s| s)
                });
                if old && !in_use && only_sockets && is_older_versions(&name.to_string_lossy()) {
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
    }
}

/// Whether `name` is one an older version gave its run directories:
/// `qemu-migrate-` and six random characters (QEMU's monitor socket), or
/// `qemu-migrate-stream-…` and `qemu-migrate-live-…`.
fn is_older_versions(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return false;
    };
    (rest.len() == 6 && rest.chars().all(|c| c.is_ascii_alphanumeric()))
        || rest.starts_with("stream-")
        || rest.starts_with("live-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_runs_directory_is_removed_and_a_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        // A run killed with SIGKILL leaves its directory, its lock free.
        let dead = tmp.path().join("qemu-migrate-dead");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join(LOCK), b"").unwrap();
        std::fs::write(dead.join("qmp.sock"), b"").unwrap();
        // A live run holds its lock.
        let live = tmp.path().join("qemu-migrate-live");
        std::fs::create_dir(&live).unwrap();
        let held = File::create(live.join(LOCK)).unwrap();
        held.try_lock().unwrap();
        // Someone else's directory, and an older version's that is new.
        let other = tmp.path().join("other");
        let young = tmp.path().join("qemu-migrate-young");
        std::fs::create_dir(&other).unwrap();
        std::fs::create_dir(&young).unwrap();
        // Another part's directory (files, not sockets), however old, is not a run's.
        let other_part = tmp.path().join("qemu-migrate-tls.abcdef");
        std::fs::create_dir(&other_part).unwrap();
        std::fs::write(other_part.join("key"), b"").unwrap();
        File::open(&other_part)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
        assert!(!is_older_versions("qemu-migrate-tls.abcdef"));
        assert!(is_older_versions("qemu-migrate-Ab3xYz"));
        // The lock directory, however old, is never a run's.
        let locks = tmp
            .path()
            .join(format!("qemu-migrate-{}", crate::os::uid()));
        std::fs::create_dir(&locks).unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        File::open(&locks).unwrap().set_modified(old).unwrap();
        sweep_run_dirs(tmp.path());
        assert!(!dead.exists(), "the dead run's directory is removed");
        assert!(live.exists() && other.exists() && young.exists() && locks.exists());
        assert!(other_part.exists());
    }
}
