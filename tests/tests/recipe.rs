//! The user's recipe, unchanged, with `nc` and `socat` on PATH being links to
//! monitor-send: the migrate line yields a complete state file, and a QEMU
//! started with the same options plus `-incoming "exec: cat FILE"` restores it.

use std::process::Command;
use std::time::Duration;

use recipe_tests::{drop_in_dir, path_with, qemus, Vm};

const WAIT: Duration = Duration::from_secs(60);

fn recipe_saves_and_restores(line: &str) {
    let links = drop_in_dir();
    for qemu in qemus() {
        let dir = tempfile::tempdir().unwrap();
        let statefile = dir.path().join("statefile");
        // A guest QEMU can boot without downloads: its own firmware, no disk.
        let options = ["-M", "pc", "-accel", "tcg", "-m", "32", "-nodefaults"];
        let mut source = Vm::start(&qemu, &options);
        source.enable_migration_events();
        let recipe = line
            .replace("/tmp/statefile", &statefile.display().to_string())
            .replace("/tmp/qemu-sock", &source.hmp.display().to_string());
        let out = Command::new("bash")
            .arg("-c")
            .arg(&recipe)
            .env("PATH", path_with(links.path()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{recipe}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            source.wait_migration_end(WAIT),
            "completed",
            "{}",
            qemu.display()
        );

        let incoming = format!("exec: cat {}", statefile.display());
        let mut restore_args: Vec<&str> = options.to_vec();
        restore_args.extend(["-incoming", &incoming]);
        let mut dest = Vm::start(&qemu, &restore_args);
        dest.wait_running(WAIT);
        assert_eq!(dest.status(), "running", "QEMU said: {}", dest.stderr());
        let migrate = dest.qmp().execute("query-migrate", None).unwrap();
        assert_eq!(migrate["status"], "completed", "{migrate}");
    }
}

#[test]
fn nc_recipe_line() {
    recipe_saves_and_restores(
        r#"echo -e "migrate \"exec:cat > /tmp/statefile\"\n" | nc -w 0 -U /tmp/qemu-sock"#,
    );
}

#[test]
fn socat_recipe_line() {
    recipe_saves_and_restores(
        r#"echo -e "migrate \"exec:cat > /tmp/statefile\"\n" | socat -u - unix-connect:/tmp/qemu-sock"#,
    );
}
