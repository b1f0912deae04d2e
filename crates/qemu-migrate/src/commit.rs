//! Putting a finished save in place: one protocol for every kind of save
//! (a plain stream, a checkpoint, an instant save with its RAM images),
//! replacing an earlier save or not.
//!
//! The promise: at every instant, whatever happens to this process (an
//! error, `kill -9`, a crash of the machine once synced), the target is the
//! earlier save (or none) or the new one, and a restore of it works.
//!
//! Every part was written under a private temporary name beside its final
//! one ([`crate::os::SaveFiles`]). The commit is, each step synced before
//! the next:
//!
//! 1. the parts are synced;
//! 2. the parts other than the stream (RAM images) take their final names,
//!    which are never the old save's ([`crate::instant`] alternates between
//!    two sets of names), so the old save stays whole; the manifest records
//!    their identity as they are now ([`Staged::place`], then the caller
//!    writes the manifest);
//! 3. the *bridge* manifest replaces the old one: the new manifest marked
//!    [`Manifest::committing`], carrying the old one as
//!    [`Manifest::previous`]. Beside the old stream it is the old save (a
//!    restore checks which of the two the stream is);
//! 4. the new stream replaces the old one: from this rename on, the target
//!    is the new save;
//! 5. the new manifest, no longer marked, replaces the bridge;
//! 6. the old save's parts that the new one does not use are removed.
//!
//! A failure before step 4 undoes what was done (the old manifest back, the
//! new parts removed) and says that the target is as it was; a kill leaves
//! the old manifest or the bridge, either of which restores as the old save,
//! and the new parts, which no manifest names but the bridge's unfinished
//! half, and which the next save replaces or removes. After step 4 the save has succeeded: a
//! failure of steps 5 and 6 is a warning, and the old parts are removed only
//! once the new manifest is durable.
//!
//! A kill leaves the bridge and the new parts only for as long as nobody
//! looks: the save's watchdog, which outlives it, [`settle`]s the target at
//! once, and so does the next save; only a crash of the machine leaves them
//! for a restore to read (it restores whichever save the stream is).
//!
//! Every file-system step goes through [`crate::os::durable`], where the
//! tests inject an error or a kill at each one in turn.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::manifest::{self, Manifest};
use crate::os::{durable, SaveFiles};

/// A part of a save besides its stream (a RAM image), written at `partial`.
#[derive(Debug)]
pub(crate) struct Part<'a> {
    /// The part, open.
    pub file: &'a File,
    /// Where it was written.
    pub partial: &'a Path,
    /// Its final name.
    pub name: PathBuf,
}

/// A finished save on its way into place.
#[derive(Debug)]
pub(crate) struct Staged<'a> {
    /// The state file.
    pub target: &'a Path,
    /// The stream's and the manifest's temporary names.
    pub files: &'a SaveFiles,
    /// The stream, open.
    pub stream: &'a File,
    /// The other parts.
    pub parts: Vec<Part<'a>>,
    /// The manifest of the save at `target` now, which this one replaces.
    pub previous: Option<Box<Manifest>>,
    /// Whether to fsync (`--no-sync` skips it: the renames stay atomic, but
    /// a crash of the machine could bring back the old save).
    pub sync: bool,
    /// Set by Ctrl-C: honoured up to the last step before the bridge.
    pub cancel: &'a AtomicBool,
}

/// What a save at `target` is made of: its stream and its RAM images.
fn files_of(target: &Path, m: &Manifest) -> Vec<PathBuf> {
    let mut files = vec![target.to_path_buf()];
    if let Some(layout) = &m.instant {
        files.extend(
            layout
                .images
                .iter()
                .map(|i| target.with_file_name(&i.image)),
        );
    }
    files
}

impl<'a> Staged<'a> {
    /// Steps 1 and 2 of the module docs: everything synced, the parts
    /// under their final names. Dropped without [`Placed::commit`], the
    /// parts are removed again.
    ///
    /// # Errors
    /// [`Error::NotSaved`] (or [`Error::Cancelled`]); the target is as it was.
    pub(crate) fn place(self) -> Result<Placed<'a>> {
        let mut placed = Placed {
            staged: self,
            renamed: Vec::new(),
            committed: false,
        };
        let s = &placed.staged;
        if s.sync {
            durable::fsync(s.stream, &s.files.state)
                .map_err(Error::file(s.target, "syncing the state file"))
                .map_err(|e| placed.not_saved(e))?;
            for p in &s.parts {
                durable::fsync(p.file, p.partial)
                    .map_err(Error::file(&p.name, "syncing the RAM image"))
                    .map_err(|e| placed.not_saved(e))?;
            }
        }
        // The last moment a Ctrl-C still cancels: after this, the save is kept.
        if s.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled(format!(
                "the save was cancelled; {}",
                kept_words(s.target, s.previous.is_some())
            )));
        }
        for i in 0..placed.staged.parts.len() {
            let p = &placed.staged.parts[i];
            durable::rename(p.partial, &p.name)
                .map_err(Error::file(&p.name, "renaming the finished RAM image"))
                .map_err(|e| placed.not_saved(e))?;
            let name = p.name.clone();
            placed.renamed.push(name);
        }
        if placed.staged.sync && !placed.staged.parts.is_empty() {
            durable::sync_dir_of(placed.staged.target)
                .map_err(Error::file(placed.staged.target, "syncing the directory"))
                .map_err(|e| placed.not_saved(e))?;
        }
        Ok(placed)
    }
}

/// A save whose parts are in place, its stream and manifest not yet.
#[derive(Debug)]
pub(crate) struct Placed<'a> {
    staged: Staged<'a>,
    /// Final names this save put a file at.
    renamed: Vec<PathBuf>,
    committed: bool,
}

impl Placed<'_> {
    fn not_saved(&self, source: Error) -> Error {
        Error::NotSaved {
            target: self.staged.target.to_path_buf(),
            had_save: self.staged.previous.is_some(),
            source: Box::new(source),
        }
    }

    /// Steps 3 to 6 of the module docs.
    ///
    /// # Errors
    /// [`Error::NotSaved`] when the save could not be put in place; the
    /// target is then as it was, which the error says.
    pub(crate) fn commit(mut self, manifest: &Manifest) -> Result<Committed> {
        let s = &self.staged;
        let manifest_path = manifest::path_for(s.target);
        let forward = |renamed: &mut Vec<PathBuf>| -> Result<()> {
            let mut bridge = manifest.clone();
            bridge.committing = true;
            bridge.previous.clone_from(&s.previous);
            // Undone whether or not it got in place before failing.
            renamed.push(manifest_path.clone());
            s.put_manifest(&bridge, &manifest_path)?;
            durable::rename(&s.files.state, s.target).map_err(Error::file(
                s.target,
                "renaming the finished state file into place",
            ))
        };
        let mut renamed = std::mem::take(&mut self.renamed);
        let went = forward(&mut renamed);
        self.renamed = renamed;
        if let Err(e) = went {
            return Err(self.not_saved(e));
        }
        self.committed = true;
        let s = &self.staged;

        // The new save is in place; what follows tidies up.
        let mut warnings = Vec::new();
        let durable_now = !s.sync
            || durable::sync_dir_of(s.target)
                .map_err(|e| {
                    warnings.push(format!(
                        "{}: syncing the directory after the state file was renamed into \
                         place: {e}; a crash of this machine could bring back the earlier save",
                        s.target.display()
                    ));
                })
                .is_ok();
        let finished = durable_now
            && s.put_manifest(manifest, &manifest_path)
                .map_err(|e| {
                    warnings.push(format!(
                        "{e}; the earlier save's parts are kept beside the new save until the \
                         next save of it"
                    ));
                })
                .is_ok();
        if let (true, Some(old)) = (finished, &s.previous) {
            let new = files_of(s.target, manifest);
            for f in files_of(s.target, old)
                .into_iter()
                .filter(|f| !new.contains(f))
            {
                if let Err(e) = durable::unlink(&f) {
                    warnings.push(format!(
                        "{}: removing this part of the earlier save: {e}",
                        f.display()
                    ));
                }
            }
        }
        Ok(Committed { warnings })
    }
}

impl Drop for Placed<'_> {
    /// Undoes the steps before the stream's rename: the new parts removed,
    /// the old manifest (or none) back. Best effort: a bridge left by a
    /// failure here still restores as the old save.
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let s = &self.staged;
        let manifest_path = manifest::path_for(s.target);
        for p in self.renamed.iter().filter(|p| **p != manifest_path) {
            let _ = std::fs::remove_file(p);
        }
        if self.renamed.contains(&manifest_path) {
            match &s.previous {
                Some(old) => {
                    let _ = s.put_manifest(old, &manifest_path);
                }
                None => {
                    let _ = std::fs::remove_file(&manifest_path);
                }
            }
        }
        s.files.remove();
        for p in &s.parts {
            let _ = std::fs::remove_file(p.partial);
        }
    }
}

impl Staged<'_> {
    /// Writes `m` under the manifest's temporary name and renames it to
    /// `manifest_path`, synced.
    fn put_manifest(&self, m: &Manifest, manifest_path: &Path) -> Result<()> {
        let _locked = m.write_new(&self.files.manifest, self.sync)?;
        if let Err(e) = durable::rename(&self.files.manifest, manifest_path) {
            let _ = std::fs::remove_file(&self.files.manifest);
            return Err(Error::file(manifest_path, "writing the manifest")(e));
        }
        if self.sync {
            durable::sync_dir_of(manifest_path)
                .map_err(Error::file(manifest_path, "syncing the directory"))?;
        }
        Ok(())
    }
}

/// A committed save.
#[derive(Debug, Default)]
#[must_use]
pub(crate) struct Committed {
    /// What could not be tidied up after the save was in place.
    pub warnings: Vec<String>,
}

/// What is at `target` after a save that did not happen.
pub(crate) fn kept_words(target: &Path, had_save: bool) -> String {
    if had_save {
        format!("{} is the earlier save, as it was", target.display())
    } else {
        format!("nothing was kept at {}", target.display())
    }
}

/// How many RAM images a save may have, for finding their leftovers.
const MAX_IMAGES: usize = 64;

/// Finishes or undoes a commit that a dead save left at `target`, and
/// removes what dead saves left beside it: a bridge manifest becomes the
/// manifest of whichever save the stream is (the new one: finished; the
/// old one: put back; none: removed), and RAM images and temporary files
/// no save uses go; so do the `placed` parts of the dead save (the watchdog
/// knows them), where no manifest names them. Says what it did, if anything.
pub(crate) fn settle(target: &Path, placed: &[PathBuf]) -> Option<String> {
    let said = settle_manifest(target);
    let now = Manifest::load(target).ok().flatten();
    let mut keep = now
        .as_ref()
        .map(|m| files_of(target, m))
        .unwrap_or_default();
    if let Some(p) = now.as_ref().and_then(|m| m.previous.as_deref()) {
        keep.extend(files_of(target, p));
    }
    for part in placed.iter().filter(|p| !keep.contains(p)) {
        if std::fs::symlink_metadata(part).is_ok() {
            let _ = durable::unlink(part);
        }
    }
    said
}

fn settle_manifest(target: &Path) -> Option<String> {
    for name in std::iter::once(target.to_path_buf())
        .chain(crate::instant::all_image_names(target, MAX_IMAGES))
    {
        crate::os::remove_stale_partials(&name);
    }
    let m = Manifest::load(target).ok().flatten()?;
    if !m.committing {
        remove_unused_images(target, &m);
        return None;
    }
    let stream = std::fs::metadata(target)
        .ok()
        .filter(std::fs::Metadata::is_file);
    let crc = stream
        .as_ref()
        .and_then(|_| crate::restore::crc_file(target).ok());
    let is = |m: &Manifest| {
        stream
            .as_ref()
            .zip(crc)
            .is_some_and(|(s, crc)| m.describes(s.len(), crc))
    };
    let manifest_path = manifest::path_for(target);
    let (kept, said) = if is(&m) {
        let mut done = m.clone();
        done.committing = false;
        done.previous = None;
        (
            Some(done),
            "finished the save that was interrupted after its state file was in place",
        )
    } else if let Some(old) = m.previous.as_deref().filter(|p| is(p)) {
        (
            Some(old.clone()),
            "put the earlier save back in place of one that was interrupted",
        )
    } else if stream.is_none() && m.previous.is_none() {
        (
            None,
            "removed what a save interrupted before it finished left",
        )
    } else {
        // Neither save is there: leave everything for a person to read.
        return None;
    };
    match &kept {
        Some(kept) => {
            let (files, _stream) = SaveFiles::create(target).ok()?;
            let put = kept
                .write_new(&files.manifest, true)
                .ok()
                .and_then(|_locked| durable::rename(&files.manifest, &manifest_path).ok());
            files.remove();
            put?;
            let _ = durable::sync_dir_of(&manifest_path);
            remove_unused_images(target, kept);
        }
        None => {
            durable::unlink(&manifest_path).ok()?;
            remove_unused_images(target, &m.without_images());
        }
    }
    Some(format!("{}: {said}", target.display()))
}

/// Removes the RAM images of `target` (`FILE.ram…`, both sets of names)
/// that `m` does not name.
pub(crate) fn remove_unused_images(target: &Path, m: &Manifest) {
    let mut keep = files_of(target, m);
    if let Some(p) = &m.previous {
        keep.extend(files_of(target, p));
    }
    for image in crate::instant::all_image_names(target, MAX_IMAGES) {
        if !keep.contains(&image) && std::fs::symlink_metadata(&image).is_ok() {
            let _ = durable::unlink(&image);
        }
    }
}
