//! Man pages from a clap command.

/// A man page from clap's sections, with the text after the options (exit
/// statuses, examples, argument forms) kept as written: clap_mangen would
/// refill it into paragraphs, which scrambles tables and examples. Used for
/// qemu-migrate's pages and, by `cargo xtask dist`, for monitor-send's.
///
/// # Errors
/// What clap_mangen's renderer reports.
pub fn man_page(cmd: &clap::Command) -> std::io::Result<Vec<u8>> {
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
