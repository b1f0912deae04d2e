//! The user's unix socket paths, kept reachable while two QEMUs of one VM
//! coexist on a host (see the module docs of `live`).

use std::path::{Path, PathBuf};

use crate::argv;
use crate::error::{Error, Result};

/// The user's listening unix sockets, kept reachable across a local migration.
#[derive(Debug, Default, Clone)]
pub(super) struct SocketHandover {
    /// (the user's path, the source's socket linked aside, a name for the destination's)
    links: Vec<(PathBuf, PathBuf, PathBuf)>,
}

impl SocketHandover {
    pub(super) fn keep_source(args: &[String], pid: u32) -> Result<SocketHandover> {
        use std::os::unix::fs::FileTypeExt;
        let mut handover = SocketHandover::default();
        for w in args.windows(2) {
            let Some(path) = argv::unix_server_path(&w[0], &w[1]) else {
                continue;
            };
            let is_socket =
                std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket());
            if !is_socket || handover.links.iter().any(|(p, _, _)| *p == path) {
                continue;
            }
            let source = aside(&path, "source", pid);
            let dest = aside(&path, "destination", pid);
            let _ = std::fs::remove_file(&source);
            if let Err(e) = std::fs::hard_link(&path, &source) {
                handover.back_to_source();
                return Err(Error::file(
                    &path,
                    "keeping the source's socket reachable (a hard link beside it)",
                )(e));
            }
            handover.links.push((path, source, dest));
        }
        Ok(handover)
    }

    /// The source's sockets back at the user's paths.
    pub(super) fn back_to_source(&mut self) {
        for (path, source, _) in self.links.drain(..) {
            let _ = std::fs::rename(&source, &path);
        }
    }

    /// The destination's sockets (now at the user's paths) survive the
    /// source's cleanup under a second name.
    pub(super) fn before_source_quits(&self) {
        for (path, _, dest) in &self.links {
            let _ = std::fs::remove_file(dest);
            let _ = std::fs::hard_link(path, dest);
        }
    }

    pub(super) fn after_source_quit(&mut self) {
        for (path, source, dest) in self.links.drain(..) {
            // When the source did not unlink the path, both names are one
            // socket and rename leaves `dest` as it is.
            let _ = std::fs::rename(&dest, &path);
            let _ = std::fs::remove_file(&dest);
            let _ = std::fs::remove_file(&source);
        }
    }

    /// Where the source's socket for the user's `path` is kept while the
    /// destination has the path (the path itself when it is not handed over).
    pub(super) fn source_path(&self, path: &Path) -> PathBuf {
        self.links
            .iter()
            .find(|(p, _, _)| p == path)
            .map_or_else(|| path.to_path_buf(), |(_, source, _)| source.clone())
    }

    pub(super) fn kept_for_source(&mut self) -> Vec<PathBuf> {
        self.links.drain(..).map(|(_, source, _)| source).collect()
    }
}

fn aside(path: &Path, whose: &str, pid: u32) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".qemu-migrate-{whose}-{pid}"));
    path.with_file_name(name)
}
