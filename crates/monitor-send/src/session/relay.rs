//! The raw terminal session: keys straight to QEMU's own line editor.

use super::*;

/// A terminal session in raw mode: bytes both ways as they are.
pub(super) fn relay(
    job: &Job,
    mut sock: Socket,
    protocol: Protocol,
    greeting: &str,
    pending: &[u8],
    out: &mut Out,
    tally: &mut Tally,
) {
    let saved = crate::terminal::apply(0, &job.terminal);
    match protocol {
        Protocol::Hmp => {
            out.text(&greeting.replace('\n', "\r\n"));
            out.write(PROMPT);
        }
        Protocol::Qmp => out.text(&greeting.replace('\n', "\r\n")),
    }
    out.write(pending);
    let sock_fd = sock.as_raw_fd();
    let mut stdin_open = true;
    let mut grace: Option<Instant> = None;
    loop {
        let mut fds = vec![pollfd(sock_fd, libc::POLLIN)];
        if stdin_open {
            fds.push(pollfd(0, libc::POLLIN));
        }
        if !poll(&mut fds, grace) {
            break;
        }
        let mut chunk = [0u8; CHUNK];
        if fds[0].revents != 0 {
            match sock.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => out.write(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if stdin_open && fds[1].revents != 0 {
            // SAFETY: reads into a valid buffer from the process's stdin.
            let n = unsafe { libc::read(0, chunk.as_mut_ptr().cast(), chunk.len()) };
            let mut data: &[u8] = if n > 0 { &chunk[..n as usize] } else { &[] };
            // The end of input, or a terminal that went away (EIO): either
            // ends the session rather than polling a dead descriptor.
            let mut end = n == 0
                || (n < 0
                    && !matches!(
                        io::Error::last_os_error().kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ));
            if let Some(at) = job.escape.and_then(|e| data.iter().position(|&b| b == e)) {
                data = &data[..at];
                end = true;
            }
            if write_fully(&mut sock, data).is_err() {
                tally.failure = Some((
                    exit::DELIVERY,
                    format!("{}: the connection broke while sending", job.addr),
                ));
                break;
            }
            if end {
                stdin_open = false;
                let _ = sock.shutdown_write();
                grace = Some(Instant::now() + ESCAPE_GRACE);
            }
        }
    }
    crate::terminal::restore(0, saved);
}
