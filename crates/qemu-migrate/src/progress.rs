//! Progress reports from long operations, for a bar, JSON lines or nothing.

/// Receives progress as an operation runs.
pub trait Progress: Sync {
    /// `done` of `total` bytes in `phase` (`saving`, `restoring`, `migrating`).
    fn update(&self, phase: &str, done: u64, total: Option<u64>);

    /// Something the person waiting should know while it runs (the report
    /// at the end says it again); nothing by default.
    fn note(&self, _text: &str) {}
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn update(&self, _: &str, _: u64, _: Option<u64>) {}
}
