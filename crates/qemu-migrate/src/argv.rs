//! A QEMU command line: what identifies the VM, and what only wires it to
//! this particular run (monitors, -incoming, -daemonize, -pidfile).

use std::path::{Path, PathBuf};

/// Options that take a value and only wire this run; left out of the VM's identity.
const RUN_OPTIONS_WITH_VALUE: &[&str] = &[
    "-loadvm",
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
/// itself, and -loadvm, whose state the migration replaces, and without unix sockets in directories that are gone or that
/// QEMU is to connect to and are gone (a VM restored by qemu-migrate carries
/// the private QMP socket of that run).
#[must_use]
pub fn restart_options(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let a = canonical(&args[i]);
        // `-loadvm` loaded a snapshot when the VM first started: a QEMU
        // taking the VM over gets its state from the migration instead.
        if matches!(a, "-incoming" | "-pidfile" | "-loadvm") {
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
            let waits_not = not_waiting(a, value);
            let value = waits_not.as_deref().unwrap_or(value);
            match appending(a, value, i) {
                Some(rewritten) => out.extend(rewritten),
                None if waits_not.is_some() => out.extend([args[i].clone(), value.to_string()]),
                None => {
                    out.push(args[i].clone());
                    i += 1;
                    continue;
                }
            }
            i += 2;
            continue;
        }
        out.push(args[i].clone());
        i += 1;
    }
    out
}

/// Options whose value is a character device in the short form
/// (`file:PATH`, `unix:...`, `stdio`, `null`).
const CHARDEV_SHORTHANDS: &[&str] = &["-serial", "-parallel", "-debugcon"];

/// A server socket that does not hold QEMU's start until a client
/// connects: `server` without `nowait` (or `server=on` without
/// `wait=off`) makes QEMU wait, and the client the first run waited for (a
/// launcher's test harness) is not there for a QEMU that takes over: it
/// would wait for good. Any socket chardev form, short or long.
fn not_waiting(option: &str, value: &str) -> Option<String> {
    let socket = match option {
        "-chardev" => {
            let first = value.split(',').next()?;
            matches!(first, "socket" | "backend=socket")
        }
        "-monitor" | "-qmp" | "-qmp-pretty" | "-serial" | "-parallel" | "-debugcon" => {
            ["unix:", "tcp:", "telnet:", "websocket:", "vsock:"]
                .iter()
                .any(|p| value.starts_with(p))
        }
        _ => false,
    };
    let parts: Vec<&str> = value.split(',').collect();
    let on = |p: &str, key: &str| {
        p == key
            || [("on"), ("yes"), ("true")]
                .iter()
                .any(|v| p == format!("{key}={v}"))
    };
    let server = parts.iter().any(|p| on(p, "server"));
    let off = |p: &str| matches!(p, "nowait" | "wait=off" | "wait=no" | "wait=false");
    if !socket || !server || parts.iter().any(|p| off(p)) {
        return None;
    }
    let mut kept: Vec<&str> = parts.into_iter().filter(|p| !on(p, "wait")).collect();
    kept.push("wait=off");
    Some(kept.join(","))
}

/// A chardev that appends to its files instead of truncating them: the
/// second QEMU of a VM (restore, live destination, revert) must not wipe
/// the log the first one wrote. A `file` backend gets `append=on`, and any
/// backend's `logfile=` (libvirt's serial sockets and ptys log so) gets
/// `logappend=on` (QEMU's chardev/char.c and char-file.c open either with
/// O_APPEND when asked, else with O_TRUNC). `-serial file:X` has no room for
/// options in its short form, so it becomes `-chardev
/// file,id=…,path=X,append=on -serial chardev:…`.
fn appending(option: &str, value: &str, index: usize) -> Option<Vec<String>> {
    if option == "-chardev" {
        let keys: Vec<&str> = value
            .split(',')
            .map(|p| p.split_once('=').map_or(p, |(k, _)| k))
            .collect();
        let backend = value.split(',').next()?;
        let backend = backend.strip_prefix("backend=").unwrap_or(backend);
        let mut out = value.to_string();
        if backend == "file" && !keys.contains(&"append") {
            out.push_str(",append=on");
        }
        if keys.contains(&"logfile") && !keys.contains(&"logappend") {
            out.push_str(",logappend=on");
        }
        return (out != value).then(|| vec![option.to_string(), out]);
    }
    let logs_without_append = value.split(',').any(|p| p.starts_with("logfile="))
        && !value.split(',').any(|p| p.starts_with("logappend="));
    if logs_without_append
        && matches!(
            option,
            "-monitor" | "-qmp" | "-qmp-pretty" | "-serial" | "-parallel" | "-debugcon"
        )
    {
        // The short forms take chardev options too (`unix:P,server,logfile=L`).
        return Some(vec![option.to_string(), format!("{value},logappend=on")]);
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

/// A user-mode network's host forward (`hostfwd=tcp::2222-:22`), held
/// back from a second QEMU while the first holds its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostForward {
    /// The netdev's id, as `hostfwd_add` takes it.
    pub netdev: String,
    /// The rule, as written after `hostfwd=`.
    pub rule: String,
}

/// `args` without the host forwards of their user-mode networks (`-netdev
/// user`, `-nic user`, `-net user`), which listen on host ports a second
/// QEMU cannot have while the first runs; each network without an id gets
/// one, so the forwards can be added back by name (`hostfwd_add`) once the
/// first QEMU is gone.
#[must_use]
pub fn without_host_forwards(args: &[String]) -> (Vec<String>, Vec<HostForward>) {
    let mut out = Vec::with_capacity(args.len());
    let mut forwards = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let option = canonical(&args[i]);
        let value = args.get(i + 1);
        let user = value.is_some_and(|v| {
            let first = v.split(',').next().unwrap_or_default();
            first == "user" || first == "type=user"
        });
        if !(matches!(option, "-netdev" | "-nic" | "-net") && user) {
            out.push(args[i].clone());
            i += 1;
            continue;
        }
        let value = value.expect("checked above");
        let parts: Vec<&str> = value.split(',').collect();
        let rules: Vec<&str> = parts
            .iter()
            .filter_map(|p| p.strip_prefix("hostfwd="))
            .collect();
        if rules.is_empty() {
            out.extend([args[i].clone(), value.clone()]);
            i += 2;
            continue;
        }
        let mut kept: Vec<String> = parts
            .iter()
            .filter(|p| !p.starts_with("hostfwd="))
            .map(|p| (*p).to_string())
            .collect();
        let id = match parts.iter().find_map(|p| p.strip_prefix("id=")) {
            Some(id) => id.to_string(),
            None => {
                let id = format!("qemu-migrate-{}{i}", &option[1..]);
                kept.push(format!("id={id}"));
                id
            }
        };
        forwards.extend(rules.into_iter().map(|r| HostForward {
            netdev: id.clone(),
            rule: r.to_string(),
        }));
        out.extend([args[i].clone(), kept.join(",")]);
        i += 2;
    }
    (out, forwards)
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

/// Whether the socket at `addr` is, in `args`, a mux chardev with a
/// monitor on it: `-chardev socket,…,mux=on` (its monitor a `-mon`), or a
/// short form with `mon:` (`-serial mon:unix:PATH,server`).
#[must_use]
pub fn is_mux_socket(args: &[String], addr: &qemu_monitor::MonitorAddr) -> bool {
    use qemu_monitor::MonitorAddr;
    let names = |value: &str| -> bool {
        let parts: Vec<&str> = value.split(',').collect();
        let get = |k: &str| parts.iter().find_map(|p| p.strip_prefix(k));
        let is_abstract = parts
            .iter()
            .any(|p| matches!(*p, "abstract" | "abstract=on"));
        match addr {
            MonitorAddr::Path(p) => !is_abstract && get("path=").is_some_and(|v| Path::new(v) == p),
            MonitorAddr::Abstract(n) => is_abstract && get("path=") == Some(n.as_str()),
            MonitorAddr::Tcp { port, .. } => get("port=") == Some(port.to_string().as_str()),
        }
    };
    let short_names = |value: &str| -> bool {
        let Ok(short) = MonitorAddr::from_option(value) else {
            return false;
        };
        match (&short, addr) {
            (MonitorAddr::Tcp { port: a, .. }, MonitorAddr::Tcp { port: b, .. }) => a == b,
            (MonitorAddr::Path(p), MonitorAddr::Abstract(n)) => {
                value.contains("abstract=on") && p.as_os_str() == n.as_str()
            }
            _ => short == *addr,
        }
    };
    args.windows(2).any(|w| match canonical(&w[0]) {
        "-chardev" => w[1].split(',').any(|p| matches!(p, "mux=on" | "mux")) && names(&w[1]),
        "-serial" | "-monitor" | "-parallel" => w[1].strip_prefix("mon:").is_some_and(short_names),
        _ => false,
    })
}

/// What the source of a live migration on one host listens on that the
/// destination can neither share nor be handed, in words: a SPICE server's
/// ports (`-spice port=N`, `tls-port=N`; SPICE takes no listening
/// descriptor) and a VNC server's websocket or port range.
#[must_use]
pub fn ports_kept_by_the_source(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for w in args.windows(2) {
        match canonical(&w[0]) {
            "-spice" => {
                for part in w[1].split(',') {
                    if let Some((key @ ("port" | "tls-port"), port)) = part.split_once('=') {
                        if port != "0" {
                            out.push(format!(
                                "the VM's SPICE server listens on TCP port {port} (-spice {key}={port}), \
                                 which a second QEMU on this host cannot take while the first holds it; \
                                 save and restore the VM instead"
                            ));
                        }
                    }
                }
            }
            "-vnc" => {
                if let Some(o) = w[1]
                    .split(',')
                    .find(|o| o.starts_with("websocket") || o.starts_with("to="))
                {
                    out.push(format!(
                        "the VM's VNC server has {o}, whose ports a second QEMU on this host cannot \
                         take while the first holds them; save and restore the VM instead"
                    ));
                }
            }
            _ => {}
        }
    }
    out
}

/// How [`option_parts`] gives a comma of a value, which QEMU's option
/// syntax writes doubled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Commas {
    /// `,,` stays `,,`: a part can be written back as it was.
    KeepDoubled,
    /// `,,` becomes `,`: the value itself.
    Undoubled,
}

/// The parts of an option value (`socket,id=c,path=/a,,b`): `,` separates,
/// `,,` is a comma of a value.
pub(crate) fn option_parts(value: &str, commas: Commas) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        let part = out.last_mut().expect("never empty");
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                part.push_str(if commas == Commas::KeepDoubled {
                    ",,"
                } else {
                    ","
                });
            }
            ',' => out.push(String::new()),
            c => part.push(c),
        }
    }
    out
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
        // libvirt's serial: a socket (or pty) that logs to a file.
        assert_eq!(
            restart_options(&v("-chardev socket,id=s0,path=/tmp/s.sock,server=on,wait=off,logfile=/l/s.log -chardev pty,id=p,logfile=/l/p.log,logappend=off -chardev file,id=f,path=/l/f,logfile=/l/g")),
            v("-chardev socket,id=s0,path=/tmp/s.sock,server=on,wait=off,logfile=/l/s.log,logappend=on -chardev pty,id=p,logfile=/l/p.log,logappend=off -chardev file,id=f,path=/l/f,logfile=/l/g,append=on,logappend=on")
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
            // A server socket without nowait would make the new QEMU wait for a client.
            v("-m 32 -nodefaults -serial stdio -kernel k -monitor unix:/tmp/s,server,nowait --qmp unix:/q,server,wait=off")
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
    fn a_taken_over_vm_waits_for_no_client_and_appends_to_short_form_logs() {
        assert_eq!(
            restart_options(&v("-qmp unix:/tmp/a,server,wait -qmp unix:/tmp/b,server -monitor unix:/tmp/c,server,nowait -chardev socket,id=s,path=/tmp/d,server=on -chardev socket,id=t,path=/tmp/e,server=on,wait=off -serial unix:/tmp/f,server,nowait,logfile=/l/f.log -chardev socket,id=u,path=/tmp/g -qmp tcp:127.0.0.1:1,server=on,wait=on")),
            v("-qmp unix:/tmp/a,server,wait=off -qmp unix:/tmp/b,server,wait=off -monitor unix:/tmp/c,server,nowait -chardev socket,id=s,path=/tmp/d,server=on,wait=off -chardev socket,id=t,path=/tmp/e,server=on,wait=off -serial unix:/tmp/f,server,nowait,logfile=/l/f.log,logappend=on -qmp tcp:127.0.0.1:1,server=on,wait=off")
        );
    }

    #[test]
    fn spice_ports_and_vnc_websockets_are_kept_by_the_source() {
        let said = ports_kept_by_the_source(&v(
            "-spice disable-ticketing=on,port=5930,addr=127.0.0.1 -vnc 127.0.0.1:1,websocket=on -spice port=0,unix=on",
        ));
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(said[0].contains("SPICE") && said[0].contains("5930"));
        assert!(said[1].contains("websocket"));
        assert!(ports_kept_by_the_source(&v("-vnc :1 -display none")).is_empty());
    }

    #[test]
    fn finds_monitors_on_mux_chardevs() {
        use qemu_monitor::MonitorAddr;
        let args = v("-chardev socket,id=console,path=/r/console.sock,server=on,wait=off,mux=on -mon console -serial mon:telnet:127.0.0.1:4444,server,nowait -chardev socket,id=q,path=/r/q.sock,server=on -mon q,mode=control -chardev socket,id=a,path=abs,abstract=on,server=on,mux=on");
        assert!(is_mux_socket(&args, &MonitorAddr::parse("/r/console.sock")));
        assert!(is_mux_socket(&args, &MonitorAddr::tcp("localhost", 4444)));
        assert!(is_mux_socket(&args, &MonitorAddr::Abstract("abs".into())));
        assert!(!is_mux_socket(&args, &MonitorAddr::parse("/r/q.sock")));
        assert!(!is_mux_socket(&args, &MonitorAddr::parse("abs")));
    }

    #[test]
    fn host_forwards_are_held_back_by_netdev_name() {
        let (args, fwd) = without_host_forwards(&v(
            "-netdev user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp::8080-:80,guestfwd=tcp:10.0.2.100:1-cmd:x -nic user,model=e1000,hostfwd=tcp::2223-:22 -net user,hostfwd=udp::53-:53 -netdev tap,id=t0,hostfwd=x -nic user",
        ));
        assert_eq!(
            args,
            v("-netdev user,id=n0,guestfwd=tcp:10.0.2.100:1-cmd:x -nic user,model=e1000,id=qemu-migrate-nic2 -net user,id=qemu-migrate-net4 -netdev tap,id=t0,hostfwd=x -nic user")
        );
        let said: Vec<String> = fwd
            .iter()
            .map(|f| format!("{} {}", f.netdev, f.rule))
            .collect();
        assert_eq!(
            said,
            [
                "n0 tcp:127.0.0.1:2222-:22",
                "n0 tcp::8080-:80",
                "qemu-migrate-nic2 tcp::2223-:22",
                "qemu-migrate-net4 udp::53-:53"
            ]
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
