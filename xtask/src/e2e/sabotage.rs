//! Breaking a saved state on purpose, to show that the checks catch it.

use std::fs;
use std::path::Path;

use test_guest::Banner;

use super::{fail, Failure, Sabotage};

/// Damages the state file as `sabotage` says; the other sabotages change
/// how the destination starts, not the file.
pub(super) fn apply_to_state(
    sabotage: Option<Sabotage>,
    state: &Path,
    banner_line: &str,
) -> Result<(), Failure> {
    match sabotage {
        Some(Sabotage::Truncate) => {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(state)
                .map_err(Failure::of("setup"))?;
            let len = f.metadata().map_err(Failure::of("setup"))?.len();
            f.set_len(len / 2).map_err(Failure::of("setup"))
        }
        Some(Sabotage::FlipRam) => flip_sweep_byte(state, banner_line),
        _ => Ok(()),
    }
}

/// Flips the first byte of the last copy of a sweep page in the stream: a
/// page record is its address with flag bits in the low bits (big-endian),
/// `0x08` a full page, `0x20` "same block as before".
fn flip_sweep_byte(state: &Path, banner_line: &str) -> Result<(), Failure> {
    let Some((start, _)) = Banner::parse(banner_line).and_then(|b| b.sweep) else {
        return fail("setup", "the banner names no sweep region");
    };
    let mut bytes = fs::read(state).map_err(Failure::of("setup"))?;
    let target = (0..64u64).find_map(|page| {
        let header = ((start + page * 4096) | 0x28).to_be_bytes();
        bytes.windows(8).rposition(|w| w == header).map(|i| i + 8)
    });
    let Some(at) = target else {
        return fail("setup", "no sweep page found in the state file to flip");
    };
    bytes[at] = bytes[at].wrapping_add(0x55);
    fs::write(state, bytes).map_err(Failure::of("setup"))
}
