//! How the CLI shows progress: a bar on a terminal, JSON lines for scripts.

use std::io::Write;
use std::sync::Mutex;

use std::io::IsTerminal;

use qemu_migrate::progress::{Progress, Quiet};

use crate::Cli;

pub struct Bar(indicatif::ProgressBar);

impl Bar {
    pub fn new() -> Bar {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Bar(bar)
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bar {
    fn update(&self, phase: &str, done: u64, total: Option<u64>) {
        if let Some(t) = total {
            // The stream carries a little more than the RAM it describes.
            self.0.set_length(t.max(done));
        }
        self.0.set_message(phase.to_string());
        self.0.set_position(done);
    }

    fn note(&self, text: &str) {
        self.0.println(format!("qemu-migrate: {text}"));
    }
}

pub struct JsonLines(Mutex<()>);

impl JsonLines {
    pub fn new() -> JsonLines {
        JsonLines(Mutex::new(()))
    }
}

impl Progress for JsonLines {
    fn update(&self, phase: &str, done: u64, total: Option<u64>) {
        let _guard = self.0.lock();
        let line = serde_json::json!({ "progress": phase, "done": done, "total": total });
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    fn note(&self, text: &str) {
        let _guard = self.0.lock();
        let line = serde_json::json!({ "note": text });
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// How progress is shown: a bar on a terminal, JSON lines with --json, else nothing.
pub(crate) enum Shown {
    Bar(Bar),
    Json(JsonLines),
    Quiet(Quiet),
}

impl Shown {
    pub(crate) fn new(cli: &Cli) -> Shown {
        if cli.json {
            Shown::Json(JsonLines::new())
        } else if !cli.quiet && std::io::stderr().is_terminal() {
            Shown::Bar(Bar::new())
        } else {
            Shown::Quiet(Quiet)
        }
    }

    pub(crate) fn progress(&self) -> &dyn Progress {
        match self {
            Shown::Bar(b) => b,
            Shown::Json(j) => j,
            Shown::Quiet(q) => q,
        }
    }

    pub(crate) fn done(&self) {
        if let Shown::Bar(b) = self {
            b.finish();
        }
    }
}
