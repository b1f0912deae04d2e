//! The project's tasks, in plain Rust: `cargo xtask <task>`.

mod bench;
mod guest;
mod qemu;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

const HELP: &str = "\
cargo xtask <task> [options]

tasks:
  test [--install-deps]   fmt, clippy and every test, against every QEMU installed
                          (--install-deps: install QEMU 7.2, 10.0, socat, nc first)
  bench [--runs N]        speed and delivery, beside nc, socat and the seed's recipe
  build-guest             build the test guest (fixtures/guest) into target/guest
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = project_root();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let result = match args.first().map(String::as_str) {
        Some("test") => test::run(&root, flag("--install-deps")),
        Some("bench") => {
            let runs = value(&args, "--runs").unwrap_or(200);
            bench::run(
                &root,
                &bench::Args {
                    runs,
                    delivery_runs: value(&args, "--delivery-runs").unwrap_or(100),
                },
            )
        }
        Some("build-guest") => guest::build(&root.join("target/guest")).map(|p| {
            println!("{}", p.display());
        }),
        Some("-h" | "--help" | "help") => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprint!("{HELP}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The number after `--name`, if given.
fn value(args: &[String], name: &str) -> Option<usize> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

/// The workspace root, whatever directory cargo was run from.
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}
