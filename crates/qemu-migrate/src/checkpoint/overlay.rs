//! Overlays: a new qcow2 image over a frozen one, made with `qemu-img
//! create -u` (the backing file is named, not opened: QEMU may hold it), in
//! a file this process created first so no other file is ever overwritten.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// `qemu-img` beside the QEMU binary, else the one on `PATH`.
#[must_use]
pub fn qemu_img(qemu: &Path) -> PathBuf {
    qemu.parent()
        .map(|d| d.join("qemu-img"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("qemu-img"))
}

/// A new, empty file `DIR/STEM.N.qcow2` with the first free N from 1: the
/// name the overlay will have.
///
/// # Errors
/// [`Error::File`] when the directory cannot be written.
pub fn reserve(dir: &Path, stem: &str) -> Result<PathBuf> {
    for n in 1.. {
        let path = dir.join(format!("{stem}.{n}.qcow2"));
        match std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(_) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::file(&path, "creating an overlay")(e)),
        }
    }
    unreachable!("some number is free")
}

/// Writes a qcow2 overlay at `overlay` (a file [`reserve`] made) whose
/// backing file is `backing` in `format`, `size` bytes as the guest sees it.
///
/// # Errors
/// [`Error::Disk`] with `qemu-img`'s words, or when it is not installed.
pub fn create(
    qemu_img: &Path,
    overlay: &Path,
    backing: &Path,
    format: &str,
    size: u64,
) -> Result<()> {
    let out = Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-u", "-b"])
        .arg(backing)
        .args(["-F", format])
        .arg(overlay)
        .arg(size.to_string())
        .output()
        .map_err(|e| {
            Error::Disk(format!(
                "running {} to create an overlay: {e} (qemu-img comes with QEMU's tools, \
                 Debian's qemu-utils)",
                qemu_img.display()
            ))
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Disk(format!(
        "{}: creating an overlay over {}: qemu-img said: {}",
        overlay.display(),
        backing.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// A name made of letters, digits, `-` and `_` only, for a file name.
#[must_use]
pub fn label(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "disk".into()
    } else {
        s
    }
}

/// Overlay files this process made, removed when dropped unless kept.
#[derive(Debug, Default)]
pub struct Made {
    /// The files.
    pub paths: Vec<PathBuf>,
}

impl Made {
    /// Keeps the files: they are in use.
    #[must_use]
    pub fn keep(mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.paths)
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}
