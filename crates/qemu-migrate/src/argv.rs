//! A QEMU command line: what identifies the VM, and what only wires it to
//! this particular run (monitors, -incoming, -daemonize, -pidfile).

use std::path::PathBuf;

/// Options that take a value and only wire this run; left out of the VM's identity.
const RUN_OPTIONS_WITH_VALUE: &[&str] = &[
    "-monitor",
    "-qmp",
    "-qmp-pretty",
    "-mon",
    "-incoming",
    "-pidfile",
    "-chroot",
    "-runas",
];
/// Flags that only concern this run.
const RUN_FLAGS: &[&str] = &["-daemonize", "-S"];

/// Canonical spelling: QEMU accepts `--opt` for `-opt`.
fn canonical(arg: &str) -> &str {
    if arg.starts_with("--") && arg.len() > 2 {
        &arg[1..]
    } else {
        arg
    }
}

/// The VM's options without those that wire it to one run: the part that
/// must be the same when it is restored.
///
/// ```
/// let args: Vec<String> = "-m 32 -monitor unix:/tmp/s,server,nowait -kernel k -daemonize"
///     .split(' ')
///     .map(String::from)
///     .collect();
/// assert_eq!(qemu_migrate::argv::vm_options(&args), ["-m", "32", "-kernel", "k"]);
/// ```
#[must_use]
pub fn vm_options(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let a = canonical(&args[i]);
        if RUN_OPTIONS_WITH_VALUE.contains(&a) {
            i += 2;
            continue;
        }
        if RUN_FLAGS.contains(&a) {
            i += 1;
            continue;
        }
        // A chardev that only serves a monitor is wiring too, but which one
        // does cannot be known without following -mon; chardevs stay.
        out.push(args[i].clone());
        i += 1;
    }
    out
}

/// The options to start a QEMU that takes over a VM with: the original
/// run's options (its monitors too, so the user's recipes keep working)
/// without -incoming, -daemonize, -pidfile and -S, which the taker sets
/// itself, and without unix sockets in directories that are gone or that
/// QEMU is to connect to and are gone (a VM restored by qemu-migrate carries
/// the private QMP socket of that run).
#[must_use]
pub fn restart_options(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let a = canonical(&args[i]);
        if matches!(a, "-incoming" | "-pidfile") {
            i += 2;
            continue;
        }
        if matches!(a, "-daemonize" | "-S") {
            i += 1;
            continue;
        }
        if let Some((path, server)) = args.get(i + 1).and_then(|v| unix_socket_path(&args[i], v)) {
            let dir_gone = path
                .parent()
                .is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir());
            // A socket QEMU connects to must be there, or QEMU will not start.
            if dir_gone || (!server && !path.exists()) {
                i += 2;
                continue;
            }
        }
        if let Some(value) = args.get(i + 1) {
            if let Some(rewritten) = appending(a, value, i) {
                out.extend(rewritten);
                i += 2;
                continue;
            }
        }
        out.push(args[i].clone());
        i += 1;
    }
    out
}

/// Options whose value is a character device in the short form
/// (`file:PATH`, `unix:...`, `stdio`, `null`).
const CHARDEV_SHORTHANDS: &[&str] = &["-serial", "-parallel", "-debugcon"];

/// A file chardev that appends instead of truncating: the second QEMU of a
/// VM (restore, live destination) must not wipe the log the first one
/// wrote. `-serial file:X` has no room for options in its short form, so
/// it becomes `-chardev file,id=…,path=X,append=on -serial chardev:…`
/// (QEMU's chardev/char-file.c: `append` opens with O_APPEND, else O_TRUNC).
fn appending(option: &str, value: &str, index: usize) -> Option<Vec<String>> {
    if option == "-chardev" {
        let mut parts = value.split(',');
        if parts.next()? != "file" || value.split(',').any(|p| p.starts_with("append=")) {
            return None;
        }
        return Some(vec![option.to_string(), format!("{value},append=on")]);
    }
    if CHARDEV_SHORTHANDS.contains(&option) {
        let path = value.strip_prefix("file:")?;
        let id = format!("qemu-migrate-{}{index}", &option[1..]);
        return Some(vec![
            "-chardev".to_string(),
            format!("file,id={id},path={},append=on", path.replace(',', ",,")),
            option.to_string(),
            format!("chardev:{id}"),
        ]);
    }
    None
}

/// The options of a QEMU that only shows what a VM's migration stream
/// would hold (the restore pre-flight probe): the VM's devices and RAM,
/// but none of its files opened for writing and none of its sockets. Every
/// chardev becomes a `null` one (its id kept), short-form ones `null`;
/// drives are opened read-only, unlocked, with writes going to a throwaway
/// overlay (`snapshot=on`), since a device needs its drive to exist.
/// `-blockdev` nodes have no such overlay and stay as writable as given
/// (an IDE disk refuses a read-only one), but unlocked: the probe, which
/// never runs the guest, writes nothing to them and does not stand in the
/// way of the VM that holds them.
pub fn probe_options(args: &[String]) -> Vec<String> {
    let args = vm_options(args);
    let mut out = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let a = canonical(&args[i]);
        let Some(value) = args.get(i + 1) else {
            out.push(args[i].clone());
            break;
        };
        let replaced = match a {
            "-chardev" => {
                let id = value.split(',').find_map(|p| p.strip_prefix("id="));
                id.map(|id| format!("null,id={id}"))
            }
            _ if CHARDEV_SHORTHANDS.contains(&a) => (!matches!(value.as_str(), "none" | "null")
                && !value.starts_with("chardev:"))
            .then(|| "null".to_string()),
            "-drive" if value.split(',').any(|p| p.starts_with("file=")) => {
                Some(format!("{value},snapshot=on,file.locking=off"))
            }
            "-blockdev" => Some(unlocked(value)),
            "-hda" | "-hdb" | "-hdc" | "-hdd" => {
                let index = a.as_bytes()[3] - b'a';
                out.push("-drive".to_string());
                out.push(format!(
                    "file={},index={index},media=disk,snapshot=on,file.locking=off",
                    value.replace(',', ",,")
                ));
                i += 2;
                continue;
            }
            _ => None,
        };
        match replaced {
            Some(v) => {
                out.push(args[i].clone());
                out.push(v);
                i += 2;
            }
            None => {
                out.push(args[i].clone());
                i += 1;
            }
        }
    }
    out
}

/// Protocol drivers with image locking (QEMU's block/file-posix.c).
const LOCKING_DRIVERS: &[&str] = &["file", "host_device", "host_cdrom"];

/// A `-blockdev` value (key=value or JSON) with image locking off for its
/// node, when a locking protocol node, and for an inline `file` child.
fn unlocked(value: &str) -> String {
    if value.trim_start().starts_with('{') {
        if let Ok(serde_json::Value::Object(mut m)) = serde_json::from_str(value) {
            let locks = |m: &serde_json::Map<String, serde_json::Value>| {
                m.get("driver")
                    .and_then(|d| d.as_str())
                    .is_some_and(|d| LOCKING_DRIVERS.contains(&d))
            };
            if locks(&m) {
                m.insert("locking".into(), "off".into());
            }
            if let Some(serde_json::Value::Object(file)) = m.get_mut("file") {
                if locks(file) {
                    file.insert("locking".into(), "off".into());
                }
            }
            return serde_json::Value::Object(m).to_string();
        }
        return value.to_string();
    }
    let get = |key: &str| {
        value
            .split(',')
            .find_map(|p| p.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    };
    let mut out = value.to_string();
    if get("driver").is_some_and(|d| LOCKING_DRIVERS.contains(&d)) {
        out.push_str(",locking=off");
    }
    if get("file.filename").is_some()
        && get("file.driver").is_none_or(|d| LOCKING_DRIVERS.contains(&d))
    {
        out.push_str(",file.locking=off");
    }
    out
}

/// The value of the last `-name VALUE` (QEMU lets later options win).
#[must_use]
pub fn last_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let mut found = None;
    let mut i = 0;
    while i + 1 < args.len() {
        if canonical(&args[i]) == name {
            found = Some(args[i + 1].as_str());
            i += 2;
        } else {
            i += 1;
        }
    }
    found
}

/// The machine type asked for (`-M pc` or `-machine q35,accel=tcg`), if any.
pub fn machine(args: &[String]) -> Option<String> {
    let v = last_value(args, "-M").or_else(|| last_value(args, "-machine"))?;
    let first = v.split(',').next()?;
    match first.strip_prefix("type=") {
        Some(t) => Some(t.to_string()),
        None if first.contains('=') => v
            .split(',')
            .find_map(|p| p.strip_prefix("type="))
            .map(String::from),
        None => Some(first.to_string()),
    }
}

/// Whether the VM's serial port (or monitor) is on QEMU's stdio: then a
/// restore hands it the terminal.
#[must_use]
pub fn uses_stdio(args: &[String]) -> bool {
    args.windows(2).any(|w| {
        matches!(
            canonical(&w[0]),
            "-serial" | "-monitor" | "-chardev" | "-mon"
        ) && (w[1] == "stdio" || w[1].starts_with("stdio,") || w[1].contains("backend=stdio"))
    }) || args.iter().any(|a| canonical(a) == "-nographic")
}

/// The path of a unix socket that `OPTION VALUE` makes QEMU listen on.
pub(crate) fn unix_server_path(option: &str, value: &str) -> Option<PathBuf> {
    unix_socket_path(option, value).and_then(|(path, server)| server.then_some(path))
}

/// The path of a unix socket that `OPTION VALUE` makes QEMU listen on or
/// connect to, and whether it listens.
fn unix_socket_path(option: &str, value: &str) -> Option<(PathBuf, bool)> {
    let option = option.strip_prefix('-').unwrap_or(option);
    let option = option.strip_prefix('-').unwrap_or(option);
    let (path, opts): (&str, Vec<&str>) = match option {
        "monitor" | "qmp" | "qmp-pretty" | "serial" | "parallel" | "gdb" => {
            let rest = value.strip_prefix("unix:")?;
            let mut parts = rest.split(',');
            (parts.next()?, parts.collect())
        }
        "chardev" => {
            let mut parts = value.split(',');
            if parts.next()? != "socket" {
                return None;
            }
            let parts: Vec<&str> = parts.collect();
            let path = parts.iter().find_map(|p| p.strip_prefix("path="))?;
            (path, parts)
        }
        _ => return None,
    };
    let server = opts
        .iter()
        .any(|o| matches!(*o, "server" | "server=on" | "server=yes" | "server=true"));
    (!path.is_empty()).then(|| (PathBuf::from(path), server))
}

/// Keys whose values are secrets in QEMU options: `-object secret,data=…`,
/// spice's `password=…`.
const SECRET_KEYS: &[&str] = &["data", "password", "passwd"];

/// `text` (an option, a command line, an error that quotes one) with every
/// inline secret replaced by `***`, for display. Flags such as vnc's
/// `password=on` stay as they are.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'outer: while !rest.is_empty() {
        for key in SECRET_KEYS {
            let at_boundary =
                out.is_empty() || out.ends_with([',', ' ', '\t', '\n', '"', '\'', '{']);
            if at_boundary && rest.starts_with(key) && rest[key.len()..].starts_with('=') {
                let value_start = key.len() + 1;
                let value_len = rest[value_start..]
                    .find([',', ' ', '\t', '\n', '"', '\''])
                    .unwrap_or(rest.len() - value_start);
                let value = &rest[value_start..value_start + value_len];
                out.push_str(&rest[..value_start]);
                if matches!(value, "on" | "off" | "yes" | "no" | "true" | "false") {
                    out.push_str(value);
                } else {
                    out.push_str("***");
                }
                rest = &rest[value_start + value_len..];
                continue 'outer;
            }
        }
        let c = rest.chars().next().expect("not empty");
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_chardevs_append_when_a_vm_is_taken_over() {
        assert_eq!(
            restart_options(&v("-m 32 -serial file:/l/s,x.log -chardev file,id=c,path=/l/c.log -chardev file,id=d,path=/l/d,append=off")),
            v("-m 32 -chardev file,id=qemu-migrate-serial2,path=/l/s,,x.log,append=on -serial chardev:qemu-migrate-serial2 -chardev file,id=c,path=/l/c.log,append=on -chardev file,id=d,path=/l/d,append=off")
        );
    }

    #[test]
    fn the_probe_opens_no_file_for_writing_and_no_socket() {
        assert_eq!(
            probe_options(&v("-m 32 -serial file:/l/s.log -chardev socket,id=c,path=/s,server=on -debugcon stdio -serial chardev:c -drive file=/d.qcow2,format=qcow2,if=virtio -hda /h.img -monitor unix:/m,server")),
            v("-m 32 -serial null -chardev null,id=c -debugcon null -serial chardev:c -drive file=/d.qcow2,format=qcow2,if=virtio,snapshot=on,file.locking=off -drive file=/h.img,index=0,media=disk,snapshot=on,file.locking=off")
        );
    }

    #[test]
    fn the_probe_takes_no_lock_on_blockdev_images() {
        let args = vec![
            "-blockdev".to_string(),
            r#"{"driver":"file","filename":"/d/top.qcow2","node-name":"s1","auto-read-only":true}"#.to_string(),
            "-blockdev".to_string(),
            r#"{"node-name":"f1","driver":"qcow2","file":"s1"}"#.to_string(),
            "-blockdev".to_string(),
            r#"{"node-name":"o","driver":"qcow2","file":{"driver":"file","filename":"/o.qcow2"},"backing":"f1"}"#.to_string(),
            "-blockdev".to_string(),
            "driver=qcow2,node-name=k,file.driver=file,file.filename=/k.qcow2".to_string(),
            "-blockdev".to_string(),
            "driver=nbd,node-name=n,server.type=unix,server.path=/s".to_string(),
        ];
        let out = probe_options(&args);
        let json = |i: usize| -> serde_json::Value { serde_json::from_str(&out[i]).unwrap() };
        assert_eq!(json(1)["locking"], "off");
        assert_eq!(json(1)["filename"], "/d/top.qcow2");
        assert!(json(3).get("locking").is_none());
        assert_eq!(json(5)["file"]["locking"], "off");
        assert_eq!(json(5)["backing"], "f1");
        assert_eq!(out[7], format!("{},file.locking=off", args[7]));
        assert_eq!(out[9], args[9]);
    }

    #[test]
    fn secrets_are_redacted_for_display() {
        assert_eq!(
            redact("-object secret,id=s0,data=hunter2,format=raw -spice port=5,password=pw -vnc :1,password=on"),
            "-object secret,id=s0,data=***,format=raw -spice port=5,password=*** -vnc :1,password=on"
        );
        assert_eq!(
            redact("qemu: -object secret,id=s,data=x y: Parameter 'format' expects"),
            "qemu: -object secret,id=s,data=*** y: Parameter 'format' expects"
        );
        assert_eq!(redact("metadata=1,userdata=2"), "metadata=1,userdata=2");
        assert_eq!(redact("data=abc"), "data=***");
    }

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn identity_leaves_out_wiring() {
        let args = v("-m 32 -nodefaults -serial stdio -kernel k -monitor unix:/tmp/s,server,nowait -incoming defer -S --qmp unix:/q,server -daemonize -pidfile p");
        assert_eq!(
            vm_options(&args),
            v("-m 32 -nodefaults -serial stdio -kernel k")
        );
        assert_eq!(
            restart_options(&args),
            v("-m 32 -nodefaults -serial stdio -kernel k -monitor unix:/tmp/s,server,nowait --qmp unix:/q,server")
        );
    }

    #[test]
    fn finds_listening_unix_sockets() {
        assert_eq!(
            unix_server_path("-monitor", "unix:/tmp/qemu-sock,server,nowait"),
            Some(PathBuf::from("/tmp/qemu-sock"))
        );
        assert_eq!(
            unix_server_path("--qmp", "unix:/tmp/q,server=on,wait=off"),
            Some(PathBuf::from("/tmp/q"))
        );
        assert_eq!(
            unix_server_path("-chardev", "socket,id=c,path=/tmp/s,server=on"),
            Some(PathBuf::from("/tmp/s"))
        );
        assert_eq!(unix_server_path("-monitor", "unix:/tmp/c"), None);
        assert_eq!(unix_server_path("-serial", "stdio"), None);
    }

    #[test]
    fn drops_sockets_in_vanished_directories() {
        let args = v("-m 32 -qmp unix:/nonexistent-dir-x/qmp.sock,server,nowait -monitor unix:/tmp/m,server,nowait -qmp unix:/nonexistent-dir-y/qmp.sock -chardev socket,id=c,path=/nonexistent-sock-z -incoming defer");
        assert_eq!(
            restart_options(&args),
            v("-m 32 -monitor unix:/tmp/m,server,nowait")
        );
    }

    #[test]
    fn finds_machine_and_stdio() {
        assert_eq!(machine(&v("-M pc -m 1")), Some("pc".into()));
        assert_eq!(machine(&v("-machine q35,accel=tcg")), Some("q35".into()));
        assert_eq!(
            machine(&v("-machine accel=tcg,type=pc-i440fx-7.2")),
            Some("pc-i440fx-7.2".into())
        );
        assert_eq!(machine(&v("-m 1")), None);
        assert!(uses_stdio(&v("-serial stdio")));
        assert!(!uses_stdio(&v("-serial file:/x")));
    }
}
