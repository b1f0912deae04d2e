//! The scripted session: each line of input sent once the one before it
//! was confirmed, QEMU's replies and events passed on as they come.

use super::*;

pub(super) struct Pump<'a> {
    pub(super) job: &'a Job,
    pub(super) protocol: Protocol,
    pub(super) sock: Socket,
    /// What QEMU sent and was not handled yet.
    pub(super) inbuf: Vec<u8>,
    pub(super) queue: VecDeque<Item>,
    pub(super) input: Input,
    pub(super) stdin_eof: bool,
    pub(super) flight: Option<Flight>,
    pub(super) negotiated: bool,
    pub(super) out: Out,
    pub(super) terminal: bool,
    pub(super) tally: &'a mut Tally,
    pub(super) last_activity: Instant,
}

pub(super) enum Step {
    Go,
    Done,
}

impl Pump<'_> {
    pub(super) fn run(&mut self) {
        // What QEMU sent along with its greeting (an event, say).
        self.handle_socket_bytes();
        loop {
            if let Err(message) = self.send_next() {
                self.fail(exit::DELIVERY, message);
                return;
            }
            if self.flight.is_none() && self.queue.is_empty() && self.stdin_eof {
                self.finish();
                return;
            }
            if self.job.mode == Mode::Dispatch
                && matches!(self.flight, Some(Flight::HmpOutput { .. }))
                && self.queue.is_empty()
                && self.stdin_eof
            {
                // `-w 0`, `-u`: QEMU has read the last command and runs it;
                // a suspended monitor (migrate without -d) would keep us.
                self.flush_output();
                return;
            }
            match self.wait() {
                Ok(Step::Go) => {}
                Ok(Step::Done) => return,
                Err(message) => {
                    self.fail(exit::DELIVERY, message);
                    return;
                }
            }
        }
    }

    pub(super) fn fail(&mut self, status: u8, message: String) {
        if self.tally.failure.is_none() {
            self.tally.failure = Some((status, message));
        }
    }

    /// Waits for standard input or the socket, and handles what came.
    pub(super) fn wait(&mut self) -> Result<Step, String> {
        let sock_fd = self.sock.as_raw_fd();
        // Input is read while a command runs, so that its end is seen in
        // time: `-w 0` returns once a `migrate` is dispatched, not after it.
        let read_stdin = !self.stdin_eof && self.queue.is_empty();
        let mut fds = vec![pollfd(sock_fd, libc::POLLIN)];
        if read_stdin {
            fds.push(pollfd(0, libc::POLLIN));
        }
        let deadline = match (&self.flight, self.job.idle_timeout) {
            (Some(_), _) => Some(self.last_activity + self.job.timeout),
            (None, Some(idle)) => Some(self.last_activity + idle),
            (None, None) => None,
        };
        if !poll(&mut fds, deadline) {
            if self.flight.is_none() {
                // nc's -w, socat's -T: nothing either way for that long ends
                // the session as the end of input would.
                self.stdin_eof = true;
                self.input.finish(&mut self.queue);
                return Ok(Step::Go);
            }
            let what = match &self.flight {
                Some(Flight::HmpEcho { line }) => format!("echo of `{line}`"),
                Some(Flight::HmpOutput { line, .. }) | Some(Flight::Qmp { line, .. }) => {
                    format!("reply to `{line}`")
                }
                None => "reply".into(),
            };
            return Err(format!(
                "{}: no {what} from QEMU within {:?}",
                self.job.addr, self.job.timeout
            ));
        }
        if fds[0].revents != 0 && !self.read_socket()? {
            self.socket_closed();
            return Ok(Step::Done);
        }
        if read_stdin && fds[1].revents != 0 {
            self.read_stdin();
        }
        Ok(Step::Go)
    }

    /// Reads what QEMU sent and handles it; false at the end of the stream.
    pub(super) fn read_socket(&mut self) -> Result<bool, String> {
        let mut chunk = [0u8; CHUNK];
        loop {
            match self.sock.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.inbuf.extend_from_slice(&chunk[..n]);
                    self.last_activity = Instant::now();
                    self.handle_socket_bytes();
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(false),
                Err(e) => return Err(format!("{}: {e}", self.job.addr)),
            }
        }
    }

    pub(super) fn read_stdin(&mut self) {
        let mut chunk = [0u8; CHUNK];
        // SAFETY: reads into a valid buffer from the process's stdin.
        let n = unsafe { libc::read(0, chunk.as_mut_ptr().cast(), chunk.len()) };
        if n > 0 {
            self.last_activity = Instant::now();
            let bytes = &chunk[..n as usize];
            self.input.feed(bytes, &mut self.queue);
            if self.terminal
                && self.protocol == Protocol::Hmp
                && self.flight.is_none()
                && bytes.iter().all(u8::is_ascii_whitespace)
            {
                // Enter on an empty line: QEMU would prompt again.
                self.out.write(PROMPT);
            }
            return;
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) {
                return;
            }
        }
        // The end of input (or input that cannot be read: the same to a recipe).
        self.stdin_eof = true;
        self.input.finish(&mut self.queue);
    }

    /// Sends the next command if none is awaiting its confirmation.
    pub(super) fn send_next(&mut self) -> Result<(), String> {
        while self.flight.is_none() {
            let Some(item) = self.queue.pop_front() else {
                return Ok(());
            };
            match (self.protocol, item) {
                (_, Item::Bad { text, reason }) => self.refuse(text, reason),
                (Protocol::Hmp, Item::Json { text, .. }) => self.refuse(
                    text,
                    "it is a QMP (JSON) command and this socket is the human monitor".into(),
                ),
                (Protocol::Hmp, Item::Line(line)) => {
                    if let Err(e) = hmp::check_line(&line) {
                        self.report_refusal(&e);
                        continue;
                    }
                    self.write_socket(format!("{line}\n").as_bytes())?;
                    self.flight = Some(Flight::HmpEcho { line });
                }
                (Protocol::Qmp, item) => {
                    let is_caps = matches!(&item, Item::Json { value, .. }
                        if value.get("execute").and_then(Value::as_str) == Some("qmp_capabilities"));
                    if !self.negotiated && !is_caps {
                        // QEMU takes nothing else first; say it for the user.
                        self.queue.push_front(item);
                        let msg = json!({"execute": "qmp_capabilities", "id": OWN_ID});
                        self.write_socket(format!("{msg}\n").as_bytes())?;
                        self.flight = Some(Flight::Qmp {
                            line: "qmp_capabilities".into(),
                            kind: QmpKind::Negotiation,
                        });
                        continue;
                    }
                    let (bytes, line, kind) = match item {
                        Item::Json { text, value } => {
                            let name = value
                                .get("execute")
                                .or_else(|| value.get("exec-oob"))
                                .and_then(Value::as_str)
                                .unwrap_or("?")
                                .to_string();
                            (format!("{text}\n"), name, QmpKind::Passthrough)
                        }
                        Item::Line(line) => {
                            let msg = json!({
                                "execute": "human-monitor-command",
                                "arguments": {"command-line": line},
                                "id": OWN_ID,
                            });
                            (format!("{msg}\n"), line, QmpKind::Human)
                        }
                        Item::Bad { .. } => unreachable!("handled above"),
                    };
                    self.write_socket(bytes.as_bytes())?;
                    self.flight = Some(Flight::Qmp { line, kind });
                }
            }
        }
        Ok(())
    }

    pub(super) fn refuse(&mut self, text: String, reason: String) {
        self.report_refusal(&Error::BadLine {
            command: text,
            reason,
        });
    }

    pub(super) fn report_refusal(&mut self, e: &Error) {
        self.tally.refused += 1;
        eprintln!("{PROG}: {e}");
    }

    /// Writes a whole command, reading (not handling) what QEMU sends meanwhile.
    pub(super) fn write_socket(&mut self, mut data: &[u8]) -> Result<(), String> {
        let deadline = Instant::now() + self.job.timeout;
        while !data.is_empty() {
            match self.sock.write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let fd = self.sock.as_raw_fd();
                    let mut fds = [pollfd(fd, libc::POLLOUT | libc::POLLIN)];
                    if !poll(&mut fds, Some(deadline)) {
                        return Err(format!(
                            "{}: QEMU read nothing more within {:?}",
                            self.job.addr, self.job.timeout
                        ));
                    }
                    let mut chunk = [0u8; CHUNK];
                    if let Ok(n) = self.sock.read(&mut chunk) {
                        self.inbuf.extend_from_slice(&chunk[..n]);
                    }
                }
                Err(e) => {
                    return Err(format!(
                        "{}: the connection broke while sending ({e})",
                        self.job.addr
                    ))
                }
            }
        }
        self.last_activity = Instant::now();
        Ok(())
    }

    pub(super) fn quiet(&self) -> bool {
        self.job.output == Output::Quiet
    }

    pub(super) fn handle_socket_bytes(&mut self) {
        match self.protocol {
            Protocol::Hmp => self.handle_hmp(),
            Protocol::Qmp => self.handle_qmp(),
        }
    }

    pub(super) fn handle_hmp(&mut self) {
        loop {
            match &mut self.flight {
                Some(Flight::HmpEcho { line }) => {
                    let Some(end) = find(&self.inbuf, b"\r\n") else {
                        return;
                    };
                    // The echo (with the editor's redraws) is not output.
                    self.inbuf.drain(..end + 2);
                    let line = std::mem::take(line);
                    self.flight = Some(Flight::HmpOutput {
                        line,
                        text: Vec::new(),
                    });
                }
                Some(Flight::HmpOutput { line, text }) => {
                    if let Some(at) = find(&self.inbuf, PROMPT) {
                        let rest: Vec<u8> = self.inbuf.drain(..at + PROMPT.len()).collect();
                        let body = &rest[..at];
                        text.extend_from_slice(body);
                        let (line, text) = (std::mem::take(line), std::mem::take(text));
                        self.flight = None;
                        if !self.quiet() {
                            self.out.text(&hmp::clean_text(body));
                            if self.terminal {
                                self.out.write(PROMPT);
                            }
                        }
                        self.hmp_done(&line, &text);
                        continue;
                    }
                    // Long output is passed on line by line as it comes.
                    if let Some(nl) = self.inbuf.iter().rposition(|&b| b == b'\n') {
                        let body: Vec<u8> = self.inbuf.drain(..=nl).collect();
                        text.extend_from_slice(&body);
                        if !self.quiet() {
                            self.out.text(&hmp::clean_text(&body));
                        }
                    }
                    return;
                }
                _ => {
                    // Output between commands (a migration's end, say).
                    let Some(nl) = self.inbuf.iter().rposition(|&b| b == b'\n') else {
                        if self.inbuf.ends_with(PROMPT) {
                            self.inbuf.clear();
                        }
                        return;
                    };
                    let body: Vec<u8> = self.inbuf.drain(..=nl).collect();
                    if !self.quiet() {
                        let text = hmp::clean_text(&body).replace(PROMPT_TEXT, "");
                        self.out.text(&text);
                    }
                    return;
                }
            }
        }
    }

    pub(super) fn hmp_done(&mut self, line: &str, text: &[u8]) {
        if let Some(message) = hmp::error_message(&hmp::clean_text(text)) {
            self.qemu_error(line, &message);
        }
    }

    pub(super) fn qemu_error(&mut self, line: &str, message: &str) {
        self.tally.qemu_errors += 1;
        if self.job.strict {
            eprintln!(
                "{PROG}: {}: QEMU refused `{line}`: {message}",
                self.job.addr
            );
        }
    }

    pub(super) fn handle_qmp(&mut self) {
        while let Some(nl) = self.inbuf.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.inbuf.drain(..=nl).collect();
            let raw = String::from_utf8_lossy(&raw).trim_end().to_string();
            if raw.is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
            let is_reply = value.get("return").is_some() || value.get("error").is_some();
            let flight = if is_reply { self.flight.take() } else { None };
            let Some(Flight::Qmp { line, kind }) = flight else {
                // Events, and anything unexpected, as QEMU sent them.
                if !self.quiet() {
                    self.out.text(&format!("{raw}\n"));
                }
                continue;
            };
            let error = value
                .get("error")
                .map(|e| e["desc"].as_str().unwrap_or_default().to_string());
            match kind {
                QmpKind::Negotiation => {
                    self.negotiated = error.is_none();
                    if let Some(desc) = error {
                        self.out.text(&format!("{raw}\n"));
                        self.qemu_error(&line, &desc);
                        // Without it nothing else will run: say so once, and stop.
                        self.queue.clear();
                    }
                }
                QmpKind::Passthrough => {
                    if !self.quiet() {
                        self.out.text(&format!("{raw}\n"));
                    }
                    if line == "qmp_capabilities" && error.is_none() {
                        self.negotiated = true;
                    }
                    if let Some(desc) = error {
                        self.qemu_error(&line, &desc);
                    }
                }
                QmpKind::Human => {
                    let text = match (&error, value.get("return")) {
                        (Some(desc), _) => format!("{desc}\n"),
                        (None, Some(Value::String(s))) => s.replace("\r\n", "\n"),
                        _ => String::new(),
                    };
                    if !self.quiet() {
                        self.out.text(&text);
                    }
                    let message = error.or_else(|| hmp::error_message(&text));
                    if let Some(message) = message {
                        self.qemu_error(&line, &message);
                    }
                }
            }
        }
    }

    /// Prints what is left of QEMU's output (its last words).
    pub(super) fn flush_output(&mut self) {
        if self.quiet() || self.inbuf.is_empty() {
            self.inbuf.clear();
            return;
        }
        let rest = std::mem::take(&mut self.inbuf);
        match self.protocol {
            Protocol::Hmp => {
                let text = hmp::clean_text(&rest).replace(PROMPT_TEXT, "");
                self.out.text(&text);
            }
            Protocol::Qmp => self.out.write(&rest),
        }
    }

    /// QEMU closed the connection.
    pub(super) fn socket_closed(&mut self) {
        let flight = self.flight.take();
        if let Some(Flight::HmpOutput { text, .. }) = &flight {
            // What a command said before QEMU went (quit's last words).
            let mut all = text.clone();
            all.extend_from_slice(&self.inbuf);
            self.inbuf = all;
        }
        self.handle_socket_bytes();
        self.flush_output();
        let unconfirmed = match flight {
            Some(Flight::HmpOutput { line, .. }) if hmp::ends_session(&line) => None,
            Some(Flight::HmpEcho { line })
            | Some(Flight::HmpOutput { line, .. })
            | Some(Flight::Qmp { line, .. }) => Some(line),
            None => None,
        };
        let unsent = self
            .queue
            .iter()
            .filter(|i| !matches!(i, Item::Bad { .. }))
            .count();
        if unconfirmed.is_some() || unsent > 0 {
            let mut message = format!("{}: QEMU closed the connection", self.job.addr);
            if let Some(line) = unconfirmed {
                message.push_str(&format!(" before confirming `{line}`"));
            }
            if unsent > 0 {
                message.push_str(&format!(
                    "; {unsent} command{} not sent",
                    if unsent == 1 { "" } else { "s" }
                ));
            }
            self.fail(exit::DELIVERY, message);
        }
    }

    /// Every command is confirmed and the input has ended.
    pub(super) fn finish(&mut self) {
        if self.job.ignoreeof {
            // socat's `ignoreeof` on standard input: the session lasts until QEMU ends it.
            self.drain(None);
            return;
        }
        if !self.job.half_close {
            // `shut-none`: every command is confirmed, so closing loses nothing.
            self.flush_output();
            return;
        }
        // The half-close: QEMU sees the end once it has read everything, and
        // what it still had to say (events, a migration's end) comes first.
        if self.sock.shutdown_write().is_err() {
            self.flush_output();
            return;
        }
        self.drain(Some(self.job.timeout));
    }

    /// Prints what QEMU says until it closes.
    pub(super) fn drain(&mut self, idle: Option<Duration>) {
        loop {
            let mut fds = [pollfd(self.sock.as_raw_fd(), libc::POLLIN)];
            let deadline = idle.map(|d| self.last_activity + d);
            if !poll(&mut fds, deadline) {
                self.flush_output();
                return;
            }
            match self.read_socket() {
                Ok(true) => {}
                Ok(false) | Err(_) => {
                    self.flush_output();
                    return;
                }
            }
        }
    }
}
