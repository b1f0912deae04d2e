//! Whether the destination carried on where the source left off: no fresh
//! boot, the tick count continuing at its rate, the RAM sweep intact.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use test_guest::{tick, Banner};

use super::phases::{Destination, Source};
use super::running::harness;
use super::{fail, Failure, GuestKind, Report, Scenario, WAIT};

/// Ticks the destination must print after its first.
const TICKS_AFTER: u64 = 5;
/// The guest's rate may sag under TCG on a loaded host (QEMU drops timer
/// interrupts it cannot deliver in time); a restore that broke the timer
/// would be far outside this.
const RATE_TOLERANCE: f64 = 0.5;
/// The rate the test and Linux guests tick at: 10 a second.
const NOMINAL_RATE: f64 = 10.0;

/// What the source showed before the save, for comparing with the destination.
pub(super) struct Before {
    /// The guest's first line (the test guest's banner).
    pub(super) banner_line: String,
    pub(super) last_tick: u64,
    pub(super) rate: f64,
}

impl Before {
    pub(super) fn of(source: &Source) -> Before {
        let serial = &source.running.serial;
        Before {
            banner_line: source.banner_line.clone(),
            last_tick: serial
                .snapshot()
                .iter()
                .filter_map(|l| tick(l))
                .max()
                .unwrap_or(0),
            rate: rate(&serial.timed()),
        }
    }
}

/// The checks for a ticking guest; fills in the report's tick figures.
pub(super) fn carried_on(
    sc: &Scenario,
    destination: &mut Destination,
    before: &Before,
    report: &mut Report,
    dir: &Path,
) -> Result<(), Failure> {
    let banner_line = before.banner_line.as_str();
    let dest_harness = destination.harness.as_path();
    let dest = &mut destination.running;
    let first_after = match dest.serial.try_wait_for(0, WAIT, |l| tick(l).is_some()) {
        Ok(i) => i,
        Err(got) => {
            dest.wait();
            let said = dest.said();
            return fail(
                "restore",
                if said.is_empty() {
                    format!("no tick from the destination; it printed {got:?}")
                } else {
                    format!("QEMU refused the state: {said}")
                },
            );
        }
    };
    report.restore = dest.serial.timed()[first_after].0 - destination.restore_from;
    let after = dest.serial.snapshot();
    if let Some(b) = after[..first_after]
        .iter()
        .find(|l| **l == banner_line || l.starts_with("BOOT"))
    {
        return fail(
            "resumed, not rebooted",
            format!("the destination booted afresh: {b:?}"),
        );
    }
    report.checks.push("no reboot");
    let first_tick_after = tick(&after[first_after]).unwrap_or(0);
    if first_tick_after <= before.last_tick || first_tick_after > before.last_tick + 2 {
        return fail(
            "tick continuity",
            format!(
                "the source's last tick was {}, the destination's first is {first_tick_after}",
                before.last_tick
            ),
        );
    }
    report.checks.push("tick continuity");
    let want = first_tick_after + TICKS_AFTER;
    dest.serial
        .try_wait_for(first_after, WAIT, |l| tick(l).is_some_and(|n| n >= want))
        .or_else(|got| {
            fail(
                "tick rate",
                format!("the destination stopped ticking: {got:?}"),
            )
        })?;
    let timed = dest.serial.timed();
    let rate_after = rate(&timed[first_after..]);
    // Under TCG on a busy host the source may have dropped timer ticks, so
    // the destination is compared with both the source and the rate the
    // guest asks for: a restore that broke the timer is far from either.
    let near = |reference: f64| {
        reference > 0.0 && ((rate_after - reference) / reference).abs() <= RATE_TOLERANCE
    };
    let nominal = match sc.guest {
        GuestKind::Test | GuestKind::Linux => Some(NOMINAL_RATE),
        GuestKind::Custom { .. } => None,
    };
    if before.rate > 0.0 && !near(before.rate) && !nominal.is_some_and(near) {
        return fail(
            "tick rate",
            format!(
                "{:.1} ticks/s before, {rate_after:.1} after (the guest ticks at {NOMINAL_RATE}/s)",
                before.rate
            ),
        );
    }
    report.checks.push("tick rate");
    report.first_tick_after = first_tick_after;
    report.last_tick_after = timed.iter().filter_map(|(_, l)| tick(l)).max().unwrap_or(0);
    report.rate_after = rate_after;

    if let Some(m) = dest
        .serial
        .snapshot()
        .iter()
        .find(|l| test_guest::is_ram_mismatch(l))
    {
        return fail("RAM sweep", format!("the guest found its RAM changed: {m}"));
    }
    if sc.guest == GuestKind::Test {
        check_ram(dest_harness, banner_line, dir)?;
        report.checks.push("RAM sweep");
    }
    if let Ok(mut c) = harness(dest_harness, WAIT) {
        let _ = c.quit();
    }
    Ok(())
}

/// The checks that apply to a guest that prints no ticks (a user's own,
/// e.g. an IncludeOS service): QEMU loaded the state and the guest runs, and
/// it did not print its first line again, as a fresh boot would.
pub(super) fn carried_on_without_ticks(
    destination: &mut Destination,
    before: &Before,
    report: &mut Report,
) -> Result<(), Failure> {
    let first_line = before.banner_line.as_str();
    let dest = &mut destination.running;
    let dest_harness = destination.harness.as_path();
    let Ok(mut c) = harness(dest_harness, WAIT) else {
        dest.wait();
        return fail(
            "restore",
            format!("QEMU refused the state: {}", dest.said()),
        );
    };
    c.set_capability("events", true)
        .map_err(Failure::of("restore"))?;
    let info = c
        .wait_migration(Instant::now() + WAIT, |_| {})
        .map_err(Failure::of("restore"))?;
    if !info.status.is_final() {
        return fail("restore", format!("the state did not load within {WAIT:?}"));
    }
    if info.status != qemu_migrate::MigrationStatus::Completed {
        return fail(
            "restore",
            format!("QEMU reports {:?}: {}", info.status, dest.said()),
        );
    }
    report.restore = dest.started.elapsed();
    report.checks.push("restore completed");
    // A fresh boot prints its first line within moments of starting.
    if let Ok(i) = dest
        .serial
        .try_wait_for(0, Duration::from_secs(2), |l| l == first_line)
    {
        return fail(
            "resumed, not rebooted",
            format!(
                "the destination printed the source's first line again: {:?}",
                dest.serial.snapshot()[i]
            ),
        );
    }
    report.checks.push("no reboot");
    let _ = c.quit();
    Ok(())
}

/// Ticks per second over the tick lines among `lines`.
fn rate(lines: &[(Instant, String)]) -> f64 {
    let ticks: Vec<(Instant, u64)> = lines
        .iter()
        .filter_map(|(t, l)| Some((*t, tick(l)?)))
        .collect();
    match (ticks.first(), ticks.last()) {
        (Some(a), Some(b)) if b.1 > a.1 => {
            let secs = (b.0 - a.0).as_secs_f64();
            if secs > 0.0 {
                (b.1 - a.1) as f64 / secs
            } else {
                0.0
            }
        }
        _ => 0.0,
    }
}

/// Stops the destination and reads the sweep region back with `pmemsave`.
fn check_ram(sock: &Path, banner_line: &str, dir: &Path) -> Result<(), Failure> {
    let Some((start, end)) = Banner::parse(banner_line).and_then(|b| b.sweep) else {
        return fail("RAM sweep", "the banner names no sweep region");
    };
    let mut c = harness(sock, WAIT)?;
    c.stop().map_err(Failure::of("RAM sweep"))?;
    let dump = dir.join("sweep.bin");
    c.human_command(&format!(
        "pmemsave {start} {} \"{}\"",
        end - start,
        dump.display()
    ))
    .map_err(Failure::of("RAM sweep"))?;
    let bytes = fs::read(&dump)
        .map_err(|e| Failure::new("RAM sweep", format!("{}: {e}", dump.display())))?;
    test_guest::check_sweep(&bytes).or_else(|e| fail("RAM sweep", e))?;
    let _ = fs::remove_file(&dump);
    c.cont().map_err(Failure::of("RAM sweep"))?;
    Ok(())
}
