//! `qemu-migrate inspect`: what a state file holds, whether it is whole,
//! and whether given options would restore it.

use std::path::PathBuf;
use std::process::ExitCode;

use qemu_migrate::Error;

use crate::Cli;
use qemu_migrate::argv::redact;
use qemu_migrate::checkpoint;
use qemu_migrate::progress::Quiet;
use qemu_migrate::restore;
use qemu_migrate::Manifest;

use crate::restore::previous_save_note;

/// The options of `qemu-migrate inspect`.
#[derive(Debug, clap::Args)]
pub(crate) struct InspectArgs {
    pub(crate) statefile: PathBuf,
    /// Also read an instant save's RAM images whole (every chunk checked), and say
    /// whether these QEMU options (after --) would restore it.
    #[arg(long)]
    check: bool,
    /// With --check: the QEMU that would restore it (default: qemu-system-x86_64).
    #[arg(long, requires = "check")]
    qemu: Option<PathBuf>,
    #[arg(last = true)]
    qemu_args: Vec<String>,
}

pub(crate) fn inspect(args: &InspectArgs, cli: &Cli) -> Result<ExitCode, Error> {
    let InspectArgs {
        statefile,
        check,
        qemu,
        qemu_args,
    } = args;
    show(cli, statefile, check.then(|| qemu.clone()), qemu_args)
}

fn show(
    cli: &Cli,
    statefile: &std::path::Path,
    check_with: Option<Option<PathBuf>>,
    qemu_args: &[String],
) -> Result<ExitCode, Error> {
    // The check reads a bare stream through already; its summary is reused.
    let mut verdict = restore::check(statefile);
    // The manifest that describes the stream (the previous save's, after an
    // interrupted replacement), else the one beside it.
    let manifest = match &verdict {
        Ok(c) => c.manifest.as_ref().map(Manifest::redacted),
        Err(_) => Manifest::load(statefile)?.map(|mut m| {
            m.previous = None;
            m.redacted()
        }),
    };
    let summary = match verdict.as_mut().ok().and_then(|c| c.summary.take()) {
        Some(s) => s,
        None => qemu_stream::inspect_file(statefile).map_err(|e| Error::BadStateFile {
            path: statefile.to_path_buf(),
            reason: e.to_string(),
        })?,
    };
    // An instant save's RAM images: digest or identity, or read whole with --check.
    let layout = manifest.as_ref().and_then(|m| m.instant.clone());
    let mut image_checks = Vec::new();
    if let (Ok(_), Some(l)) = (&verdict, &layout) {
        match qemu_migrate::instant::check_image(statefile, l, check_with.is_some(), &Quiet) {
            Ok(c) => image_checks = c,
            Err(e) => verdict = Err(e),
        }
    }
    let image_json: Option<Vec<serde_json::Value>> = layout.as_ref().map(|l| {
        l.images
            .iter()
            .enumerate()
            .map(|(n, i)| {
                let how = image_checks.get(n);
                serde_json::json!({
                    "image": i.image,
                    "checked": how,
                    "words": how.map(|c| c.words()),
                    "chunks": i.chunks.as_ref().map(|c| c.crc32.len() / 8),
                    "chunk_bytes": i.chunks.as_ref().map(|c| c.bytes),
                    "verity": i.verity,
                })
            })
            .collect()
    });
    if cli.json {
        say!(
            "{}",
            serde_json::json!({
                "file": statefile,
                "stream": summary,
                "manifest": manifest,
                "ram_images": image_json,
                "stream_checksum": verdict.is_ok() && manifest.is_some(),
                "restorable": verdict.is_ok(),
                "previous_save": verdict.as_ref().is_ok_and(|c| c.previous_save),
                "problem": verdict.as_ref().err().map(|e| redact(&e.to_string())),
                "disks": manifest.as_ref().and_then(|m| m.checkpoint.as_ref()).map(disks_json),
            })
        );
    } else {
        say!("{summary}");
        if verdict.as_ref().is_ok_and(|c| c.previous_save) {
            say!("{}", previous_save_note(statefile));
        }
        if let Some(m) = &manifest {
            say!(
                "manifest: saved by QEMU {} ({}) from a {} guest\n  options: {}",
                m.qemu_version,
                m.qemu.display(),
                if m.guest_was_running {
                    "running"
                } else {
                    "paused"
                },
                m.vm_options.join(" ")
            );
            if let Some(r) = &m.checkpoint {
                say!("{}", disks_text(r));
            }
        }
        if let Some(l) = &layout {
            for i in &l.images {
                let from = i
                    .backend
                    .as_ref()
                    .map(|id| format!(" (memory backend {id})"))
                    .unwrap_or_default();
                say!(
                    "layout: instant: RAM block {}{from} ({} MiB) in {}: {} pages of data, {} \
                     zero (holes), {} left in the stream",
                    i.block,
                    i.block_bytes >> 20,
                    i.image,
                    i.data_pages,
                    i.zero_pages,
                    i.pages_in_stream,
                );
            }
            say!(
                "  restore it with qemu-migrate, or by hand with -incoming \"exec: qemu-migrate \
                 export {}\"",
                statefile.display()
            );
            for (i, how) in l.images.iter().zip(&image_checks) {
                let hint = if *how == qemu_migrate::instant::ImageCheck::Identity {
                    "; --check reads it whole"
                } else {
                    ""
                };
                say!("RAM image {}: {}{hint}", i.image, how.words());
            }
        }
        match &verdict {
            Ok(_) => say!(
                "complete: yes{}",
                if manifest.is_some() {
                    ", the stream's checksum matches"
                } else {
                    ""
                }
            ),
            Err(e) => say!("complete: no: {}", redact(&e.to_string())),
        }
    }
    let mut checked = verdict?;
    if let Some(binary) = check_with {
        checked.summary = Some(summary);
        // Without options, the check is of the QEMU and options recorded.
        let (binary, args, env) = match (&manifest, qemu_args.is_empty()) {
            (Some(m), true) => (
                binary.unwrap_or_else(|| m.qemu.clone()),
                m.args.clone(),
                m.env.clone(),
            ),
            _ => (
                binary.unwrap_or_else(|| "qemu-system-x86_64".into()),
                qemu_args.to_vec(),
                Default::default(),
            ),
        };
        qemu_migrate::preflight::check(&checked, &binary, &args, &env)?;
        if !cli.json {
            say!("these options can restore it");
        }
    }
    Ok(ExitCode::SUCCESS)
}
/// `inspect`: the images a state needs, and whether each is as it was.
fn disks_text(r: &checkpoint::DiskRecord) -> String {
    let mut out = vec![if r.frozen && r.disks.is_empty() {
        "checkpoint: the VM had no writable disk stored in a file to freeze".to_string()
    } else if r.frozen {
        "checkpoint: disks frozen at the save; each restore gets fresh overlays on:".to_string()
    } else {
        "disks at the save (a restore refuses them once changed):".to_string()
    }];
    for d in &r.disks {
        for (level, i) in d.images.iter().enumerate() {
            let state = match i.changed() {
                None => "intact".to_string(),
                Some(why) => format!("CHANGED: {why}"),
            };
            // The node, where it is not the disk's own name already.
            let node = match &i.node {
                Some(n) if *n != d.name => format!(", node {n}"),
                _ => String::new(),
            };
            out.push(format!(
                "  {}{} {} ({}, {} bytes{node}): {state}",
                d.name,
                if level == 0 { "" } else { " backing" },
                i.path.display(),
                i.format,
                i.size
            ));
        }
    }
    out.join("\n")
}
fn disks_json(r: &checkpoint::DiskRecord) -> serde_json::Value {
    let images: Vec<serde_json::Value> = r
        .disks
        .iter()
        .flat_map(|d| d.images.iter().map(move |i| (d, i)))
        .map(|(d, i)| {
            serde_json::json!({
                "disk": d.name,
                "node": i.node,
                "path": i.path,
                "format": i.format,
                "size": i.size,
                "intact": i.changed().is_none(),
                "problem": i.changed(),
            })
        })
        .collect();
    serde_json::json!({ "frozen": r.frozen, "images": images })
}
