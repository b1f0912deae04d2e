//! The recipe corpus (`fixtures/recipes/monitor.recipes`): monitor recipes
//! as public projects write them, run unchanged with `nc`, `netcat`, `ncat`
//! and `socat` on PATH being links to monitor-send, each against a fresh
//! QEMU on every QEMU under test. A recipe passes when it did what its author
//! meant: the effect, checked over the test's own QMP socket (the run state,
//! an event, QEMU gone), and the output the recipe consumes.
//!
//! `RECIPE_TOOLS=system` runs the same corpus with the real tools, to see
//! what the drop-in changes (on 2026-11-26: 15 of 82 runs failed, six of
//! them hanging because nc without -N and socat's `ignoreeof` never end).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use recipe_tests::{bin, free_port, path_with, qemus, Vm};

/// Long enough for a loaded machine; a recipe that hangs fails with its name.
const RECIPE_DEADLINE: Duration = Duration::from_secs(30);
const EVENT_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Default)]
struct Recipe {
    name: String,
    fields: BTreeMap<String, Vec<String>>,
    script: String,
}

impl Recipe {
    fn one(&self, key: &str) -> Option<&str> {
        self.fields
            .get(key)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    fn all(&self, key: &str) -> &[String] {
        self.fields.get(key).map(Vec::as_slice).unwrap_or_default()
    }
}

/// Blocks of `# key: value` lines and a script, separated by blank lines;
/// comments before the first `# recipe:` describe the file.
fn parse(text: &str) -> Vec<Recipe> {
    let mut recipes = Vec::new();
    let mut current: Option<Recipe> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("# recipe: ") {
            recipes.extend(current.take());
            current = Some(Recipe {
                name: name.to_string(),
                ..Recipe::default()
            });
            continue;
        }
        let Some(recipe) = current.as_mut() else {
            continue;
        };
        if line.trim().is_empty() {
            recipes.extend(current.take());
            continue;
        }
        match line.strip_prefix("# ").and_then(|l| l.split_once(": ")) {
            Some((key, value)) if recipe.script.is_empty() => recipe
                .fields
                .entry(key.to_string())
                .or_default()
                .push(value.to_string()),
            _ => {
                recipe.script.push_str(line);
                recipe.script.push('\n');
            }
        }
    }
    recipes.extend(current);
    recipes
}

/// `nc`, `netcat`, `ncat` and `socat`, all monitor-send.
fn links() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["nc", "netcat", "ncat", "socat"] {
        std::os::unix::fs::symlink(bin("monitor-send"), dir.path().join(name)).unwrap();
    }
    dir
}

fn run_recipe(qemu: &Path, recipe: &Recipe, links: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("recipe-qmp.sock");
    let (hmp_port, qmp_port) = (free_port(), free_port());
    let args = [
        "-M".to_string(),
        "none".into(),
        "-qmp".into(),
        format!("unix:{},server,nowait", qmp.display()),
        "-monitor".into(),
        format!("tcp:127.0.0.1:{hmp_port},server,nowait"),
        "-qmp".into(),
        format!("tcp:127.0.0.1:{qmp_port},server,nowait"),
    ];
    let mut vm = Vm::start_in(qemu, &args, dir);
    if recipe.one("before") == Some("paused") {
        vm.qmp().execute("stop", None).unwrap();
    }

    let child = Command::new("bash")
        .arg("-c")
        .arg(&recipe.script)
        .env("PATH", path_with(links))
        .env("HMP", &vm.hmp)
        .env("QMP", &qmp)
        .env("HMP_PORT", hmp_port.to_string())
        .env("QMP_PORT", qmp_port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(RECIPE_DEADLINE) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kills the recipe's shell, which this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            return Err(format!("did not finish within {RECIPE_DEADLINE:?}"));
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = || format!("\n--- stdout:\n{stdout}--- stderr:\n{stderr}");

    let want_exit: i32 = recipe.one("exit").map_or(0, |e| e.parse().unwrap());
    if out.status.code() != Some(want_exit) {
        return Err(format!(
            "exit status {:?}, expected {want_exit}{}",
            out.status.code(),
            context()
        ));
    }
    for want in recipe.all("stdout") {
        if !stdout.contains(want.as_str()) {
            return Err(format!("stdout lacks {want:?}{}", context()));
        }
    }
    for unwanted in recipe.all("no-stdout") {
        if stdout.contains(unwanted.as_str()) {
            return Err(format!("stdout has {unwanted:?}{}", context()));
        }
    }
    if let Some(event) = recipe.one("event") {
        vm.wait_event(event, EVENT_WAIT);
    }
    match recipe.one("status") {
        None => {}
        Some("exited") => {
            vm.wait_event("SHUTDOWN", EVENT_WAIT);
            let status = vm.wait_exit();
            if !status.success() {
                return Err(format!("QEMU exited with {status}{}", context()));
            }
        }
        Some(want) => {
            let got = vm.status();
            if got != want {
                return Err(format!("VM {got}, expected {want}{}", context()));
            }
        }
    }
    Ok(())
}

#[test]
fn every_recipe_in_the_corpus_does_what_its_author_meant() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/recipes/monitor.recipes");
    let recipes = parse(&std::fs::read_to_string(&path).unwrap());
    assert!(
        recipes.len() >= 33,
        "the corpus has {} recipes",
        recipes.len()
    );
    for r in &recipes {
        assert!(!r.script.is_empty(), "recipe {:?} has no script", r.name);
        assert!(
            r.one("from").is_some(),
            "recipe {:?} says not where it is from",
            r.name
        );
    }
    // RECIPE_TOOLS=system runs the corpus with the real nc and socat instead,
    // to see what the drop-in changes; expect failures then.
    let links = if std::env::var("RECIPE_TOOLS").as_deref() == Ok("system") {
        tempfile::tempdir().unwrap()
    } else {
        links()
    };
    let mut failures = Vec::new();
    for qemu in qemus() {
        for recipe in &recipes {
            if let Err(e) = run_recipe(&qemu, recipe, links.path()) {
                failures.push(format!(
                    "{} on {}: {e}\n{}",
                    recipe.name,
                    qemu.display(),
                    recipe.script
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} recipe runs failed:\n\n{}",
        failures.len(),
        recipes.len() * qemus().len(),
        failures.join("\n\n")
    );
}

/// The corpus check is no rubber stamp: a recipe whose effect did not
/// happen, or whose output lacks what it consumes, fails.
#[test]
fn a_recipe_that_does_not_do_its_job_fails_the_check() {
    let links = links();
    let qemu = &qemus()[0];
    let wrong_effect =
        &parse("# recipe: x\n# from: here\n# status: paused\necho 'info status' | nc -NU $HMP\n")
            [0];
    assert!(run_recipe(qemu, wrong_effect, links.path()).is_err());
    let wrong_output = &parse("# recipe: x\n# from: here\n# stdout: VM status: paused\necho 'info status' | nc -NU $HMP\n")[0];
    assert!(run_recipe(qemu, wrong_output, links.path()).is_err());
}
