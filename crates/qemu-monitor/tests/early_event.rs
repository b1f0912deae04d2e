//! A QEMU that is still starting can send a client an event before its QMP
//! greeting (it broadcasts RESUME to a monitor that never negotiated). A real
//! QEMU does this only when the connect lands in that window, so a socket
//! that always does it stands in for it here.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use qemu_monitor::{Monitor, Options};

const RESUME: &str =
    r#"{"timestamp": {"seconds": 1795698721, "microseconds": 927331}, "event": "RESUME"}"#;
const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;

/// Serves one client: the event, the greeting, then an empty `return` for
/// every command, echoing its id.
fn racing_qemu(listener: UnixListener) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut out = stream.try_clone().unwrap();
        writeln!(out, "{RESUME}\r\n{GREETING}\r").unwrap();
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let cmd: serde_json::Value = serde_json::from_str(&line).unwrap();
            let reply = serde_json::json!({"return": {}, "id": cmd["id"]});
            writeln!(out, "{reply}\r").unwrap();
        }
    })
}

fn options() -> Options {
    Options {
        timeout: Duration::from_secs(10),
        wait_socket: None,
        mux_escape: false,
    }
}

#[test]
fn an_event_before_the_greeting_is_kept_for_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let server = racing_qemu(UnixListener::bind(&path).unwrap());

    let mut qmp = qemu_monitor::connect_qmp(path.clone(), &options())
        .unwrap_or_else(|e| panic!("connect: {e}"));
    assert_eq!(qmp.version().to_string(), "10.0.2");
    let event = qmp.next_event(Duration::from_secs(1)).unwrap();
    assert_eq!(event.name, "RESUME");
    assert_eq!(event.raw, RESUME);
    qmp.execute("cont", None).unwrap();
    drop(qmp);
    server.join().unwrap();
}

#[test]
fn a_relay_gets_the_greeting_first_and_the_early_event_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let server = racing_qemu(UnixListener::bind(&path).unwrap());

    let monitor = qemu_monitor::connect(path.clone(), &options()).unwrap();
    let Monitor::Qmp(session) = &monitor else {
        panic!("not detected as QMP");
    };
    assert_eq!(session.greeting().raw, GREETING);
    let (socket, pending) = monitor.into_socket();
    assert_eq!(String::from_utf8(pending).unwrap(), format!("{RESUME}\n"));
    drop(socket);
    server.join().unwrap();
}
