//! A save's files: private, never through a planted link, under names
//! nobody can guess, locked while the save lives; and finding the leftovers
//! of saves that died.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `FILE.partial`: the name older versions wrote an unfinished state file
/// under; a restore still recognises it.
#[must_use]
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Letters of the random part of a temporary name.
const TAG_LEN: usize = 10;
const TAG_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// An unpredictable tag for a temporary name, from the kernel's random source.
fn random_tag() -> String {
    let mut bytes = [0u8; TAG_LEN];
    // SAFETY: getrandom writes at most `len` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // No getrandom (kernels before 3.17): the clock and pid still make
        // the name hard to guess, and O_EXCL makes a guessed one harmless.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
            ^ u128::from(std::process::id()) << 64;
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (seed >> (i * 12)) as u8;
        }
    }
    bytes
        .iter()
        .map(|b| TAG_CHARS[*b as usize % TAG_CHARS.len()] as char)
        .collect()
}

/// Creates `path` for writing, readable and writable by this user only
/// (`0600` whatever the umask), never through a symlink and never over an
/// existing file (`O_EXCL|O_NOFOLLOW`).
///
/// # Errors
/// The operating system's error: `AlreadyExists` when anything is at `path`.
pub(crate) fn create_private(path: &Path) -> std::io::Result<File> {
    let file = File::options()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // The umask may have taken more away than 0600 does; say exactly 0600.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// [`create_private`], locked (`flock`) until the file is closed: a save's
/// unfinished files are locked while it lives, so that another save can
/// tell a dead one's leftovers (unlocked) from them.
pub(crate) fn create_locked(path: &Path) -> std::io::Result<File> {
    let file = create_private(path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(std::io::Error::other(e.to_string()))
        }
    }
}

/// The unfinished files of one save of `target`, beside it under a name
/// nobody can guess: `TARGET.TAG.partial` (the stream) and
/// `TARGET.TAG.manifest.partial`. The stream file is locked while the save
/// runs, so a later save can tell a dead save's leftovers from a live one.
#[derive(Debug)]
pub struct SaveFiles {
    /// The stream, until it is renamed to the target.
    pub state: PathBuf,
    /// The manifest, until it is renamed beside the target.
    pub manifest: PathBuf,
}

impl SaveFiles {
    /// Creates the stream's temporary file (`0600`, `O_EXCL|O_NOFOLLOW`),
    /// locked; the manifest's name is reserved beside it.
    ///
    /// # Errors
    /// [`Error::File`] when the directory cannot take the file.
    pub fn create(target: &Path) -> Result<(SaveFiles, File)> {
        let name = target.file_name().unwrap_or_default().to_os_string();
        loop {
            let tag = random_tag();
            let with = |suffix: &str| {
                let mut n = name.clone();
                n.push(format!(".{tag}.{suffix}"));
                target.with_file_name(n)
            };
            let files = SaveFiles {
                state: with("partial"),
                manifest: with("manifest.partial"),
            };
            match create_locked(&files.state) {
                Ok(file) => return Ok((files, file)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(Error::file(&files.state, "creating the state file")(e));
                }
            }
        }
    }

    /// Removes both files, where they still exist.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.state);
        let _ = std::fs::remove_file(&self.manifest);
    }
}

/// Whether `file_name` is an unfinished file of a save of `target_name`:
/// `TARGET.TAG.partial` (a stream) or `TARGET.TAG.manifest.partial`.
fn is_partial_of(file_name: &str, target_name: &str, manifests_too: bool) -> bool {
    let Some(rest) = file_name
        .strip_prefix(target_name)
        .and_then(|r| r.strip_prefix('.'))
    else {
        return false;
    };
    let tag = match rest.strip_suffix(".manifest.partial") {
        Some(tag) if manifests_too => tag,
        Some(_) => return false,
        None => match rest.strip_suffix(".partial") {
            Some(tag) => tag,
            None => return false,
        },
    };
    tag.len() == TAG_LEN && tag.bytes().all(|b| TAG_CHARS.contains(&b))
}

fn partials(target: &Path, manifests_too: bool) -> Vec<PathBuf> {
    let Some(name) = target.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|f| is_partial_of(f, name, manifests_too))
        })
        .map(|e| target.with_file_name(e.file_name()))
        .collect()
}

/// The unfinished streams of saves of `target` beside it, whether their
/// save still runs or died (and the old `TARGET.partial`).
pub fn partials_of(target: &Path) -> Vec<PathBuf> {
    let mut found = partials(target, false);
    if partial_path(target).exists() {
        found.push(partial_path(target));
    }
    found
}

/// Removes what saves of `target` that died (killed, crashed machine) left
/// beside it: unfinished streams and manifests nobody holds the lock of.
/// Only this user's files; a save still running keeps its own, locked.
pub fn remove_stale_partials(target: &Path) {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    for partial in partials(target, true) {
        let Ok(file) = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&partial)
        else {
            continue;
        };
        let mine = file.metadata().is_ok_and(|m| m.is_file() && m.uid() == uid);
        if mine && file.try_lock().is_ok() {
            let _ = std::fs::remove_file(&partial);
        }
    }
}

/// Whether `path`, or the nearest directory above it that exists, is on
/// hugetlbfs (a memory backend's `mem-path` may name a file not yet made).
pub fn is_hugetlbfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return false;
    };
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct it is given from a
    // NUL-terminated path that lives across the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type == libc::HUGETLBFS_MAGIC
}
