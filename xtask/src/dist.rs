//! `cargo xtask dist`: a Debian package of the two tools, with their man
//! pages and shell completions, built with `dpkg-deb` from a staged tree
//! (no packaging tool beyond dpkg). qemu-migrate writes its own pages and
//! completions from its clap definition (`qemu-migrate generate-assets`);
//! monitor-send parses three argument grammars by hand, so its pages come
//! from a clap command rebuilt from what its native form's `--help` says.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Arg, ArgAction};
use clap_complete::Shell;

use crate::test::cargo;

const PACKAGE: &str = "qemu-migrate";

/// Builds `target/dist/qemu-migrate_VERSION_ARCH.deb`; returns its path.
pub fn run(root: &Path) -> anyhow::Result<PathBuf> {
    cargo(
        root,
        &[
            "build",
            "--release",
            "-p",
            "monitor-send",
            "-p",
            "qemu-migrate-cli",
            "--bins",
        ],
        &[],
    )?;
    let release = root.join("target/release");
    let dist = root.join("target/dist");
    let stage = dist.join("stage");
    let assets = dist.join("assets");
    for d in [&stage, &assets] {
        let _ = fs::remove_dir_all(d);
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }

    let bin = stage.join("usr/bin");
    fs::create_dir_all(&bin)?;
    for name in ["monitor-send", "qemu-migrate"] {
        fs::copy(release.join(name), bin.join(name)).with_context(|| format!("copying {name}"))?;
        // The release profile keeps line tables for backtraces; a package ships without.
        run_tool(
            Command::new("strip")
                .arg("--strip-debug")
                .arg(bin.join(name)),
        )?;
    }

    // qemu-migrate's own pages and completions.
    run_tool(
        Command::new(release.join("qemu-migrate"))
            .arg("generate-assets")
            .arg(&assets),
    )?;
    // monitor-send's, from its native form's help.
    let help = output(Command::new(release.join("monitor-send")).arg("--help"))?;
    let version = output(Command::new(release.join("monitor-send")).arg("--version"))?;
    let mut ms = monitor_send_command(&help, version.split_whitespace().nth(1).unwrap_or(""));
    ms.build();
    fs::write(
        assets.join("man/monitor-send.1"),
        qemu_migrate_cli::man::man_page(&ms)?,
    )?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut ms, "monitor-send", assets.join("completions"))?;
    }

    let man1 = stage.join("usr/share/man/man1");
    fs::create_dir_all(&man1)?;
    for entry in fs::read_dir(assets.join("man"))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .expect("a file")
            .to_string_lossy()
            .into_owned();
        gzip(&path, &man1.join(format!("{name}.gz")))?;
    }
    let completions = assets.join("completions");
    for (from, to) in [
        (
            "qemu-migrate.bash",
            "usr/share/bash-completion/completions/qemu-migrate",
        ),
        (
            "monitor-send.bash",
            "usr/share/bash-completion/completions/monitor-send",
        ),
        (
            "_qemu-migrate",
            "usr/share/zsh/vendor-completions/_qemu-migrate",
        ),
        (
            "_monitor-send",
            "usr/share/zsh/vendor-completions/_monitor-send",
        ),
        (
            "qemu-migrate.fish",
            "usr/share/fish/vendor_completions.d/qemu-migrate.fish",
        ),
        (
            "monitor-send.fish",
            "usr/share/fish/vendor_completions.d/monitor-send.fish",
        ),
    ] {
        let to = stage.join(to);
        fs::create_dir_all(to.parent().expect("a directory"))?;
        fs::copy(completions.join(from), &to).with_context(|| format!("copying {from}"))?;
    }
    let doc = stage.join("usr/share/doc").join(PACKAGE);
    fs::create_dir_all(&doc)?;
    fs::write(
        doc.join("copyright"),
        "qemu-migrate, monitor-send\n\nLicense: MIT or Apache-2.0, at your option.\n",
    )?;
    gzip(&root.join("README.md"), &doc.join("README.md.gz"))?;

    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let arch = arch.trim();
    let version = env!("CARGO_PKG_VERSION");
    let installed_kib = du_kib(&stage)?;
    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    fs::write(
        debian.join("control"),
        format!(
            "Package: {PACKAGE}\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: qemu-migrate developers <qemu-migrate@localhost>\n\
             Installed-Size: {installed_kib}\n\
             Depends: libc6\n\
             Recommends: qemu-system-x86\n\
             Section: admin\n\
             Priority: optional\n\
             Description: dependable QEMU monitor commands and VM save/restore\n \
             monitor-send sends commands to a QEMU monitor socket without losing any (a\n \
             drop-in for nc -w 0 -U and socat -u in shell recipes); qemu-migrate saves,\n \
             restores, live-migrates and inspects a VM with the exact same options, and\n \
             checks that a VM survives a save and restore (qemu-migrate roundtrip).\n"
        ),
    )?;
    let deb = dist.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    run_tool(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    println!("{}", deb.display());
    Ok(deb)
}

/// A clap command for monitor-send's native form, from its `--help`: the
/// about line, each argument and option with its help, and the text after
/// the options (its other argument forms, exit status, examples).
fn monitor_send_command(help: &str, version: &str) -> clap::Command {
    let about = help.lines().next().unwrap_or_default().to_string();
    let mut cmd = clap::Command::new("monitor-send")
        .about(about)
        .version(version.to_string())
        .disable_help_flag(true)
        .disable_version_flag(true);
    let mut section = "";
    let mut after = Vec::new();
    for line in help.lines().skip(1) {
        if !line.starts_with(' ') && line.ends_with(':') && !line.is_empty() {
            section = if matches!(line, "Arguments:" | "Options:") {
                line
            } else {
                after.push(line);
                "after"
            };
            continue;
        }
        let spec = line.trim_start();
        match section {
            "Arguments:" if !spec.is_empty() => {
                let (name, text) = split_help(spec);
                let id = name.trim_matches(|c| "<>[].".contains(c)).to_lowercase();
                let arg = Arg::new(id.clone())
                    .value_name(id.to_uppercase())
                    .help(text)
                    .required(name.starts_with('<'));
                cmd = cmd.arg(if name.ends_with("...") {
                    arg.num_args(0..).action(ArgAction::Append)
                } else {
                    arg.action(ArgAction::Set)
                });
            }
            "Options:" if spec.starts_with('-') => {
                let (flags, text) = split_help(spec);
                let mut arg = None::<Arg>;
                let mut value = None;
                for part in flags.split([',', ' ']).filter(|p| !p.is_empty()) {
                    if let Some(long) = part.strip_prefix("--") {
                        arg = Some(
                            arg.unwrap_or_else(|| Arg::new(long.to_string()))
                                .long(long.to_string()),
                        );
                    } else if let Some(short) = part.strip_prefix('-') {
                        let c = short.chars().next().unwrap_or('?');
                        arg = Some(arg.unwrap_or_else(|| Arg::new(c.to_string())).short(c));
                    } else if part.starts_with('<') {
                        value = Some(part.trim_matches(|c| c == '<' || c == '>').to_string());
                    }
                }
                if let Some(a) = arg {
                    let a = a.help(text);
                    cmd = cmd.arg(match value {
                        Some(v) => a.value_name(v).action(ArgAction::Set),
                        None => a.action(ArgAction::SetTrue),
                    });
                }
            }
            "after" => after.push(line),
            _ => {}
        }
    }
    cmd.after_help(after.join("\n"))
}

/// `--flag <V>   Its help` → (`--flag <V>`, `Its help`).
fn split_help(spec: &str) -> (String, String) {
    match spec.find("  ") {
        Some(i) => (spec[..i].to_string(), spec[i..].trim().to_string()),
        None => (spec.to_string(), String::new()),
    }
}

fn gzip(from: &Path, to: &Path) -> anyhow::Result<()> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    let mut gz = flate2::write::GzEncoder::new(
        fs::File::create(to).with_context(|| format!("creating {}", to.display()))?,
        flate2::Compression::best(),
    );
    gz.write_all(&bytes)?;
    gz.finish()?;
    Ok(())
}

fn du_kib(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            du_kib(&entry.path())? * 1024
        } else {
            meta.len()
        };
    }
    Ok(total.div_ceil(1024))
}

fn run_tool(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running {}", cmd.get_program().to_string_lossy()))?;
    if !status.success() {
        bail!("{} failed ({status})", cmd.get_program().to_string_lossy());
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {}", cmd.get_program().to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({})",
            cmd.get_program().to_string_lossy(),
            out.status
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_sends_help_becomes_a_command() {
        let help = "Send commands\n\nUsage: monitor-send [OPTIONS] <SOCKET> [COMMANDS]...\n\n\
            Arguments:\n  <SOCKET>       The socket\n  [COMMANDS]...  Commands to send\n\n\
            Options:\n      --qmp                Expect QMP\n      --timeout <TIMEOUT>  Deadline\n  \
            -v, --verbose            Say more\n  -h, --help               Print help\n\n\
            Exit status:\n  0  fine\n";
        let cmd = monitor_send_command(help, "0.1.0");
        let longs: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
        assert_eq!(longs, ["qmp", "timeout", "verbose", "help"]);
        let socket = cmd
            .get_arguments()
            .find(|a| a.get_id() == "socket")
            .unwrap();
        assert!(socket.is_required_set());
        assert!(cmd
            .get_after_help()
            .unwrap()
            .to_string()
            .contains("Exit status:\n  0  fine"));
        cmd.debug_assert();
    }
}
