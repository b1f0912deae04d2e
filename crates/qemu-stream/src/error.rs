use std::io;
use std::path::PathBuf;

/// Everything that can stop the reader.
///
/// [`crate::inspect`] returns the first three kinds as `Err` (there is nothing to
/// report); once the header has been read, the others end up in
/// [`crate::Summary::error`] next to what had been learned up to that point.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The input does not start with a QEMU migration stream header.
    #[error("not a QEMU migration stream: {0}")]
    NotAStream(String),

    /// The magic is right but the format version is one this reader does not know.
    #[error("QEMU migration stream of format version {0}; only version 3 is supported")]
    UnsupportedVersion(u32),

    /// The file could not be opened or measured.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// The input ended inside an item; `offset` is where that item starts.
    #[error("truncated: the stream ends inside {expected} that starts at byte {offset}")]
    Truncated {
        /// Where the cut item starts.
        offset: u64,
        /// What it was (`a section header`, `a RAM page`).
        expected: String,
    },

    /// A value that cannot be right for a stream QEMU wrote.
    #[error("corrupt at byte {offset}: expected {expected}, found {found}")]
    Corrupt {
        /// Where the value is.
        offset: u64,
        /// What QEMU would have written there.
        expected: String,
        /// What is there.
        found: String,
    },

    /// Valid as far as can be told, but this reader cannot go past it.
    #[error("cannot decode past byte {offset}: {what}")]
    Unsupported {
        /// Where it is.
        offset: u64,
        /// What this reader cannot decode.
        what: String,
    },

    /// The operating system failed a read or a seek.
    #[error("read error at byte {offset}: {source}")]
    Io {
        /// How far reading had come.
        offset: u64,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl StreamError {
    /// The byte offset the error refers to, when it refers to one.
    #[must_use]
    pub fn offset(&self) -> Option<u64> {
        match self {
            StreamError::Truncated { offset, .. }
            | StreamError::Corrupt { offset, .. }
            | StreamError::Unsupported { offset, .. }
            | StreamError::Io { offset, .. } => Some(*offset),
            _ => None,
        }
    }

    /// A short machine-readable name of the error kind.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            StreamError::NotAStream(_) => "not-a-stream",
            StreamError::UnsupportedVersion(_) => "unsupported-version",
            StreamError::Open { .. } => "open",
            StreamError::Truncated { .. } => "truncated",
            StreamError::Corrupt { .. } => "corrupt",
            StreamError::Unsupported { .. } => "unsupported",
            StreamError::Io { .. } => "io",
        }
    }
}
