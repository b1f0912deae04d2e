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
    let cmd = crate::Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "qemu-migrate", &completions)?;
    }
    Ok(())
}
