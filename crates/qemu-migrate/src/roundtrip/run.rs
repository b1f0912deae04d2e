//! One check's run: the VM booted, saved and restored (or migrated) by
//! the chosen transport.

use super::*;

pub(super) struct Run<'a> {
    pub(super) check: &'a Check,
    pub(super) report: &'a mut Report,
    pub(super) args: Vec<String>,
    pub(super) serial: Follow,
    /// Where the guest's lines after "ready" start.
    pub(super) ready_line: usize,
}

impl<'a> Run<'a> {
    pub(super) fn new(check: &'a Check, report: &'a mut Report) -> Result<Run<'a>, Failure> {
        std::fs::create_dir_all(&check.workdir).or_else(|e| {
            fail(
                FailureKind::Setup,
                "setup",
                format!("{}: {e}", check.workdir.display()),
            )
        })?;
        let log = check.workdir.join("serial.log");
        let _ = std::fs::remove_file(&log);
        for f in ["state", "state.manifest.json", "state.ram"] {
            let _ = std::fs::remove_file(check.workdir.join(f));
        }
        let mut args = serial::to_file(&check.args, &log)
            .or_else(|e| fail(FailureKind::Setup, "setup", e.0))?;
        if check.transport == Transport::LiveLocal {
            // The destination's monitor, reachable once the migration hands it over.
            args.extend([
                "-qmp".into(),
                format!(
                    "unix:{},server,nowait",
                    check.workdir.join("roundtrip-qmp.sock").display()
                ),
            ]);
        }
        Ok(Run {
            check,
            report,
            args,
            serial: Follow::new(&log),
            ready_line: 0,
        })
    }

    pub(super) fn go(&mut self) -> Result<(), Failure> {
        let c = self.check;
        let launched = Instant::now();
        let mut src = Vm::launch(
            &c.qemu,
            &self.args,
            &LaunchOptions::new(Console::Null, c.env.clone()),
        )
        .or_else(|e| fail(FailureKind::BootFailed, "boot", said(&e)))?;

        // Ready.
        let deadline = launched + c.timeout;
        let ready = &c.ready;
        let panic = c.panic.clone();
        let found = self.serial.wait(
            deadline,
            || !src.launched().is_some_and(|l| l.has_exited()),
            |lines| {
                lines.iter().any(|(_, l)| {
                    ready.is_match(l) || panic.as_ref().is_some_and(|p| p.is_match(l))
                })
            },
        );
        self.check_panic(0)?;
        if !found {
            if src.launched().is_some_and(|l| l.has_exited()) {
                let e = src.exited("before the guest was ready");
                return fail(FailureKind::BootFailed, "boot", said(&e));
            }
            return fail(
                FailureKind::Timeout,
                "ready",
                format!(
                    "no line matching {:?} within {:?}; the guest printed: {}",
                    ready.as_str(),
                    c.timeout,
                    self.tail(0)
                ),
            );
        }
        let lines = self.serial.lines();
        let idx = lines
            .iter()
            .position(|(_, l)| ready.is_match(l))
            .expect("found");
        self.ready_line = idx + 1;
        self.report.ready_seconds = Some((lines[idx].0 - launched).as_secs_f64());
        let detail = format!(
            "{:?}, {:.2} s after QEMU started",
            lines[idx].1,
            (lines[idx].0 - launched).as_secs_f64()
        );
        self.passed("ready", detail);

        // A counter to continue from.
        if let Some(counter) = &c.counter {
            let from = self.ready_line.saturating_sub(1);
            let seen = self.serial.wait(
                Instant::now() + c.timeout,
                || !src.launched().is_some_and(|l| l.has_exited()),
                |lines| {
                    lines[from..]
                        .iter()
                        .any(|(_, l)| count(counter, l).is_some())
                },
            );
            if !seen {
                return fail(
                    FailureKind::Timeout,
                    "counter",
                    format!(
                        "the source printed no line matching {:?} after it was ready",
                        counter.as_str()
                    ),
                );
            }
        }
        self.check_reject()?;

        let (dest, reap, after) = match c.transport {
            Transport::File | Transport::Instant | Transport::Snapshot => self.by_file(src)?,
            Transport::LiveLocal | Transport::LiveTcp => self.live(src)?,
        };
        let _reap = reap;
        let mut dest = dest;
        self.after_restore(&mut dest, after)?;
        if let Some(vm) = dest.as_mut() {
            let _ = vm.monitor.quit();
        }
        Ok(())
    }

    /// Saves to a file and restores it; returns the destination and the
    /// first line that is the destination's.
    pub(super) fn by_file(&mut self, mut src: Vm) -> Result<(Option<Vm>, Reap, usize), Failure> {
        let c = self.check;
        let state = c.workdir.join("state");
        let snapshot = c.transport == Transport::Snapshot;
        if snapshot {
            if c.ram.is_some() {
                let _ = src.monitor.quit();
                return fail(
                    FailureKind::SaveFailed,
                    "save",
                    "--ram compares the source's RAM after the save with the restored one; a \
                     snapshot holds the instant it began, and the guest ran on after: check \
                     it by its serial counter",
                );
            }
            // The state is of the instant the snapshot begins: the counter
            // must carry on from what the source had printed by then.
            self.serial.poll();
            let upto = self.serial.lines().len();
            self.record_counter_before(upto);
        }
        let options = SaveOptions {
            then: if c.ram.is_some() {
                Then::Stop
            } else {
                Then::Quit
            },
            // The state lives only as long as the check.
            no_sync: true,
            cancel: Arc::clone(&c.cancel),
            instant: c.transport == Transport::Instant,
            snapshot,
            ..SaveOptions::default()
        };
        let saved = save::save(&mut src, &state, &options, &Quiet)
            .or_else(|e| fail(kind_of(&e, FailureKind::SaveFailed), "save", said(&e)))?;
        if let Some(why) = &saved.fallback {
            // A check of the instant path (or of a snapshot) that ran the
            // plain one would pass for the wrong reason.
            let _ = src.monitor.quit();
            let what = if snapshot {
                "as a snapshot"
            } else {
                "in the instant layout"
            };
            return fail(
                FailureKind::SaveFailed,
                "save",
                format!("the VM cannot be saved {what}: {why}"),
            );
        }
        self.report.save_seconds = Some(saved.elapsed.as_secs_f64());
        self.report.state_bytes = Some(saved.manifest.stream_bytes);
        self.passed(
            "save",
            format!(
                "{:.1} MB in {:.2} s",
                saved.manifest.stream_bytes as f64 / 1e6,
                saved.elapsed.as_secs_f64()
            ),
        );
        let source_ram = match c.ram {
            Some(region) => {
                let dump = self.dump(&mut src, region, "source")?;
                let _ = src.monitor.quit();
                Some(dump)
            }
            None => None,
        };
        if let Some(l) = src.launched() {
            let _ = l.wait();
        }
        drop(src);
        self.serial.poll();
        let after = self.serial.lines().len();
        if !snapshot {
            self.record_counter_before(after);
        }

        let options = RestoreOptions {
            qemu: c.restore_qemu.clone(),
            paused: c.ram.is_some(),
            console: Console::Null,
            cancel: Arc::clone(&c.cancel),
            ..RestoreOptions::default()
        };
        let restored = restore::restore(&state, &options, &Quiet).or_else(|e| {
            fail(
                kind_of(&e, FailureKind::RestoreRefused),
                "restore",
                said(&e),
            )
        })?;
        self.report.restore_seconds = Some(restored.elapsed.as_secs_f64());
        self.report.pinned_machine.clone_from(&restored.pinned);
        let mut dest = restored.vm;
        // A check's VM ends with the check, whatever ends it.
        dest.end_with_this_process()
            .or_else(|e| fail(FailureKind::Setup, "setup", said(&e)))?;
        let mapped = restored
            .manifest
            .as_ref()
            .is_some_and(|m| m.instant.is_some());
        let loaded = format!(
            "QEMU {} in {:.2} s",
            if mapped {
                "mapped the RAM image and loaded the rest of the state"
            } else {
                "loaded the state"
            },
            restored.elapsed.as_secs_f64()
        );
        self.passed("restore", self.pinned_words(&loaded));
        if let (Some(region), Some(before)) = (c.ram, source_ram) {
            self.compare_ram(&mut dest, region, &before)?;
            dest.monitor
                .cont()
                .or_else(|e| fail(FailureKind::RestoreRefused, "restore", e.to_string()))?;
        }
        Ok((Some(dest), Reap(None), after))
    }

    /// Migrates live to a local QEMU or a receiver on 127.0.0.1.
    pub(super) fn live(&mut self, mut src: Vm) -> Result<(Option<Vm>, Reap, usize), Failure> {
        let c = self.check;
        let mut options = LiveOptions {
            cancel: Arc::clone(&c.cancel),
            destination_qemu: c.restore_qemu.clone(),
            ..LiveOptions::default()
        };
        if c.ram.is_some() {
            // The region can be compared only while nothing writes it.
            src.monitor
                .stop()
                .or_else(|e| fail(FailureKind::SaveFailed, "save", e.to_string()))?;
            options.then = live::AfterLive::Stop;
        }
        self.serial.poll();
        let after = self.serial.lines().len();
        let started = Instant::now();
        let (outcome, dest) = match c.transport {
            Transport::LiveTcp => {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
                    .or_else(|e| fail(FailureKind::Setup, "setup", e.to_string()))?;
                let mut args = self.args.clone();
                // A receiver knows no source: the source's machine type is given it here.
                if c.restore_qemu.is_some() {
                    if let Ok(Some(m)) = machine::resolve(&c.qemu, &c.env, &self.args) {
                        if let Some((pinned, p)) = machine::pin(&args, &m) {
                            let newer = machine::resolve(
                                c.restore_qemu.as_deref().unwrap_or(&c.qemu),
                                &c.env,
                                &args,
                            )
                            .ok()
                            .flatten()
                            .is_some_and(|d| machine::is_newer(&d, &m));
                            if newer {
                                args = pinned;
                                self.report.pinned_machine = Some(p);
                            }
                        }
                    }
                }
                let stop_receiver = Arc::new(AtomicBool::new(false));
                // Over TCP the check runs as users should: with QEMU's TLS and a key.
                let (_key_dir, security) = live::one_time_key()
                    .or_else(|e| fail(FailureKind::Setup, "setup", e.to_string()))?;
                let ro = ReceiveOptions {
                    qemu: Some(c.restore_qemu.clone().unwrap_or_else(|| c.qemu.clone())),
                    console: Console::Null,
                    cancel: Arc::clone(&stop_receiver),
                    security: Some(security.clone()),
                };
                let receiver = live::Receiver::start(
                    &format!("tcp:127.0.0.1:{port}"),
                    &VmSpec::Args(args),
                    &ro,
                )
                .or_else(|e| fail(FailureKind::RestoreRefused, "restore", said(&e)))?;
                let waiting = std::thread::spawn(move || receiver.finish(&ro, &Quiet));
                let to = Destination::Tcp {
                    host: "127.0.0.1".into(),
                    port,
                };
                let mut options = options.clone();
                options.security = Some(security);
                let outcome = live::live(&mut src, &to, &options, &Quiet);
                if outcome.is_err() {
                    // The receiver waits for a stream that will not come.
                    stop_receiver.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                let received = waiting.join().expect("the receiver thread does not panic");
                match (outcome, received) {
                    (Ok(r), Ok(received)) => {
                        let mut vm = received.vm;
                        let _ = vm.end_with_this_process();
                        (Ok(r), Some(vm))
                    }
                    (Ok(_), Err(e)) | (Err(e), _) => (Err(e), None),
                }
            }
            _ => (
                live::live(&mut src, &Destination::Local, &options, &Quiet),
                None,
            ),
        };
        let r = outcome.or_else(|e| {
            let kind = match &e {
                Error::MigrationFailed(_) | Error::QemuExited { .. } => FailureKind::RestoreRefused,
                e => kind_of(e, FailureKind::RestoreRefused),
            };
            fail(kind, "restore", said(&e))
        })?;
        self.report.save_seconds = Some(started.elapsed().as_secs_f64());
        self.report.restore_seconds = r.migration.downtime_ms.map(|ms| ms as f64 / 1000.0);
        self.report.state_bytes = Some(r.migration.transferred);
        if self.report.pinned_machine.is_none() {
            self.report.pinned_machine.clone_from(&r.pinned);
        }
        let reap = Reap(r.destination_pid.filter(|_| dest.is_none()));
        if let Some(pid) = reap.0 {
            let _ = crate::os::keeper::adopt(pid);
        }
        let mut dest = match dest {
            Some(d) => d,
            None => Vm::attach(self.check.workdir.join("roundtrip-qmp.sock"), c.timeout)
                .or_else(|e| fail(FailureKind::RestoreRefused, "restore", said(&e)))?,
        };
        self.passed(
            "migrate",
            self.pinned_words(&format!(
                "{:.1} MB sent in {:.2} s, downtime {}, the guest {} on the destination",
                r.migration.transferred as f64 / 1e6,
                started.elapsed().as_secs_f64(),
                r.migration
                    .downtime_ms
                    .map_or("unknown".into(), |d| format!("{d} ms")),
                r.destination_state
            )),
        );
        if let Some(region) = c.ram {
            let before = self.dump(&mut src, region, "source")?;
            let _ = src.monitor.quit();
            self.compare_ram(&mut dest, region, &before)?;
            dest.monitor
                .cont()
                .or_else(|e| fail(FailureKind::RestoreRefused, "restore", e.to_string()))?;
        }
        drop(src);
        self.record_counter_before(after);
        Ok((Some(dest), reap, after))
    }

    pub(super) fn pinned_words(&self, base: &str) -> String {
        match &self.report.pinned_machine {
            Some(p) => format!("{base}; {p}"),
            None => base.to_string(),
        }
    }
}
