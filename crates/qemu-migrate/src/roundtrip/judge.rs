//! Judging what the restored guest printed and holds: the expected and
//! rejected lines, the counter, a panic, the RAM region.

use super::*;

impl Run<'_> {
    /// Waits for what must come after the restore, then judges it all.
    pub(super) fn after_restore(
        &mut self,
        dest: &mut Option<Vm>,
        after: usize,
    ) -> Result<(), Failure> {
        let c = self.check;
        let deadline = Instant::now() + c.timeout;
        let counter = c.counter.clone();
        let expect = c.expect.clone();
        let want = c.counter_after;
        let panic = c.panic.clone();
        let reject = c.reject.clone();
        let ready_line = self.ready_line;
        let before = self.report.counter_before;
        let alive = || {
            dest.as_mut()
                .is_none_or(|v| !v.launched().is_some_and(|l| l.has_exited()))
        };
        if counter.is_none() && expect.is_empty() {
            // Nothing to wait for: watch for what must not come.
            let until = Instant::now() + c.watch;
            self.serial.wait(until, alive, |lines| {
                lines[ready_line.min(lines.len())..].iter().any(|(_, l)| {
                    panic.as_ref().is_some_and(|p| p.is_match(l))
                        || reject.iter().any(|r| r.is_match(l))
                })
            });
        } else {
            self.serial.wait(deadline, alive, |lines| {
                let new = &lines[after.min(lines.len())..];
                let bad = lines[ready_line.min(lines.len())..].iter().any(|(_, l)| {
                    panic.as_ref().is_some_and(|p| p.is_match(l))
                        || reject.iter().any(|r| r.is_match(l))
                });
                let expected = expect
                    .iter()
                    .all(|e| new.iter().any(|(_, l)| e.is_match(l)));
                let values: Vec<u64> = counter
                    .as_ref()
                    .map(|r| new.iter().filter_map(|(_, l)| count(r, l)).collect())
                    .unwrap_or_default();
                let counted = counter.is_none() || values.len() >= want;
                // A counter that went down will not recover: judged at once.
                let restarted = before
                    .into_iter()
                    .chain(values.iter().copied())
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w[1] <= w[0]);
                bad || restarted || (expected && counted)
            });
        }
        self.check_panic(ready_line)?;
        self.check_reject()?;
        let lines: Vec<String> = self.serial.lines().iter().map(|(_, l)| l.clone()).collect();
        if let Some(counter) = &c.counter {
            let after_values: Vec<u64> = lines[after.min(lines.len())..]
                .iter()
                .filter_map(|l| count(counter, l))
                .collect();
            self.report.counter_after.clone_from(&after_values);
            let before = self.report.counter_before;
            let mut previous = before;
            for &v in &after_values {
                if previous.is_some_and(|p| v <= p) {
                    return fail(
                        FailureKind::CounterRestarted,
                        "counter",
                        format!(
                            "the counter went from {} to {v} after the restore: it started over \
                             (before the save it reached {})",
                            previous.unwrap_or(0),
                            before.map_or("nothing".into(), |b| b.to_string())
                        ),
                    );
                }
                previous = Some(v);
            }
            if after_values.len() < c.counter_after {
                return fail(
                    FailureKind::CounterRestarted,
                    "counter",
                    format!(
                        "the destination printed {} counter line(s) within {:?}, {} wanted; it \
                         printed: {}",
                        after_values.len(),
                        c.timeout,
                        c.counter_after,
                        self.tail(after)
                    ),
                );
            }
            self.passed(
                "counter",
                format!(
                    "source ..{}, destination {}..{}",
                    before.map_or("?".into(), |b| b.to_string()),
                    after_values[0],
                    after_values[after_values.len() - 1]
                ),
            );
        }
        for e in &c.expect {
            if !lines[after.min(lines.len())..]
                .iter()
                .any(|l| e.is_match(l))
            {
                return fail(
                    FailureKind::ExpectedMissing,
                    "expect",
                    format!(
                        "no line matching {:?} after the restore within {:?}; the destination \
                         printed: {}",
                        e.as_str(),
                        c.timeout,
                        self.tail(after)
                    ),
                );
            }
            self.passed("expect", format!("{:?} seen after the restore", e.as_str()));
        }
        if let Some(vm) = dest.as_mut() {
            if vm.launched().is_some_and(|l| l.has_exited()) {
                let e = vm.exited("after the restore");
                return fail(FailureKind::RestoreRefused, "restore", said(&e));
            }
        }
        for r in &c.reject {
            self.passed("reject", format!("{:?} not seen once ready", r.as_str()));
        }
        Ok(())
    }

    pub(super) fn record_counter_before(&mut self, upto: usize) {
        if let Some(counter) = &self.check.counter {
            self.report.counter_before = self.serial.lines()[..upto.min(self.serial.lines().len())]
                .iter()
                .filter_map(|(_, l)| count(counter, l))
                .next_back();
        }
    }

    pub(super) fn check_panic(&mut self, from: usize) -> Result<(), Failure> {
        let Some(p) = &self.check.panic else {
            return Ok(());
        };
        let lines = self.serial.lines();
        if let Some((_, l)) = lines[from.min(lines.len())..]
            .iter()
            .find(|(_, l)| p.is_match(l))
        {
            return fail(
                FailureKind::Panic,
                "panic",
                format!("the guest panicked: {l:?}"),
            );
        }
        Ok(())
    }

    pub(super) fn check_reject(&mut self) -> Result<(), Failure> {
        let lines = self.serial.lines();
        for r in &self.check.reject {
            if let Some((_, l)) = lines[self.ready_line.min(lines.len())..]
                .iter()
                .find(|(_, l)| r.is_match(l))
            {
                return fail(
                    FailureKind::Rebooted,
                    "reject",
                    format!(
                        "{l:?} (matching {:?}) appeared after the guest was ready: it booted \
                         afresh instead of carrying on",
                        r.as_str()
                    ),
                );
            }
        }
        Ok(())
    }

    /// `pmemsave` of the region from a paused VM.
    pub(super) fn dump(
        &mut self,
        vm: &mut Vm,
        region: RamRegion,
        side: &str,
    ) -> Result<Vec<u8>, Failure> {
        let path = self.check.workdir.join(format!("ram-{side}.bin"));
        let _ = std::fs::remove_file(&path);
        let out = vm
            .monitor
            .human_command(&format!(
                "pmemsave {} {} \"{}\"",
                region.addr,
                region.size,
                path.display()
            ))
            .or_else(|e| fail(FailureKind::RamDiffers, "ram", e.to_string()))?;
        let bytes = std::fs::read(&path).or_else(|e| {
            fail(
                FailureKind::RamDiffers,
                "ram",
                format!("pmemsave on the {side} wrote nothing ({e}): {}", out.trim()),
            )
        })?;
        let _ = std::fs::remove_file(&path);
        Ok(bytes)
    }

    pub(super) fn compare_ram(
        &mut self,
        dest: &mut Vm,
        region: RamRegion,
        before: &[u8],
    ) -> Result<(), Failure> {
        let after = self.dump(dest, region, "destination")?;
        if let Some(i) = before.iter().zip(&after).position(|(a, b)| a != b) {
            return fail(
                FailureKind::RamDiffers,
                "ram",
                format!(
                    "guest RAM at {:#x} is {:#04x} on the destination, {:#04x} when saved",
                    region.addr + i as u64,
                    after[i],
                    before[i]
                ),
            );
        }
        if after.len() != before.len() {
            return fail(
                FailureKind::RamDiffers,
                "ram",
                format!("{} bytes read back, {} saved", after.len(), before.len()),
            );
        }
        self.passed(
            "ram",
            format!(
                "{:#x}+{:#x} identical after the restore",
                region.addr, region.size
            ),
        );
        Ok(())
    }

    pub(super) fn passed(&mut self, check: &str, detail: String) {
        self.report.checks.push(Passed {
            check: check.into(),
            detail,
        });
    }

    /// The last lines from `from` on, for a failure's detail.
    pub(super) fn tail(&self, from: usize) -> String {
        let lines = self.serial.lines();
        let new = &lines[from.min(lines.len())..];
        let shown: Vec<&str> = new
            .iter()
            .skip(new.len().saturating_sub(5))
            .map(|(_, l)| l.as_str())
            .collect();
        if shown.is_empty() {
            "nothing".into()
        } else {
            format!("{shown:?}")
        }
    }
}
