//! Man pages and shell completions, generated from the command line's own
//! definition so they never drift from `--help`. `cargo xtask dist` runs the
//! hidden `qemu-migrate generate-assets DIR` to package them.

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

/// Writes `DIR/man/*.1` (one page per subcommand too) and
/// `DIR/completions/{qemu-migrate.bash,_qemu-migrate,qemu-migrate.fish}`.
pub fn generate(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let mut cmd = crate::Cli::command().disable_help_subcommand(true);
    cmd.build();
    write_pages(&cmd, &man)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "qemu-migrate", &completions)?;
    }
    Ok(())
}

/// A page for `cmd` and for each of its visible subcommands (`qemu-migrate-save.1`).
fn write_pages(cmd: &clap::Command, dir: &Path) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir)?;
    }
    let name = clap_mangen::Man::new(cmd.clone()).get_filename();
    std::fs::write(dir.join(name), man_page(cmd)?)
}

/// A man page from clap's sections, with the text after the options (exit
/// statuses, examples, argument forms) kept as written: clap_mangen would
/// refill it into paragraphs, which scrambles tables and examples.
fn man_page(cmd: &clap::Command) -> std::io::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut out)?;
    }
    if let Some(after) = cmd.get_after_help() {
        let mut open = false;
        for line in after.to_string().lines() {
            if !line.starts_with(' ') && line.ends_with(':') {
                if open {
                    out.extend_from_slice(b".fi\n");
                }
                let title = line.trim_end_matches(':').to_uppercase();
                out.extend_from_slice(format!(".SH \"{title}\"\n.nf\n").as_bytes());
                open = true;
                continue;
            }
            if !open {
                out.extend_from_slice(b".SH NOTES\n.nf\n");
                open = true;
            }
            let mut text = line.replace('\\', "\\e").replace('-', "\\-");
            if text.starts_with('.') || text.starts_with('\'') {
                text.insert_str(0, "\\&");
            }
            out.extend_from_slice(text.as_bytes());
            out.push(b'\n');
        }
        if open {
            out.extend_from_slice(b".fi\n");
        }
    }
    if cmd.get_version().is_some() {
        man.render_version_section(&mut out)?;
    }
    Ok(out)
}
