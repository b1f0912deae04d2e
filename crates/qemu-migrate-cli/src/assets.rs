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
    std::fs::write(dir.join(name), qemu_migrate_cli::man::man_page(cmd)?)
}
