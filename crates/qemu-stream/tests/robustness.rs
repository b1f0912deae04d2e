//! Cut, damaged and foreign inputs: always a report or a one-line error, never a
//! panic, never a huge allocation.

mod common;

use std::io::Cursor;

use common::{fixture, ALL};
use qemu_stream::{inspect, inspect_seekable, StreamError, Summary};

/// An item the reader reads whole is at most a device section or the JSON
/// description; a truncation must be reported within that distance of the cut.
const MAX_ITEM: u64 = 128 << 10;

fn assert_truncated(s: &Summary, cut: usize, ctx: &str) {
    assert!(
        !s.complete,
        "{ctx}: prefix of {cut} bytes reported complete"
    );
    let Some(StreamError::Truncated { offset, .. }) = &s.error else {
        panic!(
            "{ctx}: prefix of {cut} bytes: expected truncation, got {:?}",
            s.stopped
        );
    };
    let cut = cut as u64;
    assert!(
        *offset <= cut,
        "{ctx}: truncation at {offset} is past the cut at {cut}"
    );
    // A mapped-ram block's page region is one item, as large as the block.
    let largest_block = s.ram_blocks.iter().map(|b| b.size).max().unwrap_or(0);
    let max_item = if s.mapped_ram {
        largest_block + (2 << 20)
    } else {
        MAX_ITEM
    };
    assert!(
        cut - offset <= max_item,
        "{ctx}: truncation at {offset} is far before the cut at {cut}"
    );
    assert_eq!(s.total_bytes, cut, "{ctx}");
    assert!(
        s.stopped.as_ref().is_some_and(|st| st.kind == "truncated"),
        "{ctx}"
    );
}

fn check_prefix(bytes: &[u8], cut: usize, ctx: &str, seekable_too: bool) {
    let prefix = &bytes[..cut];
    let mut runs = vec![("pipe", inspect(prefix))];
    if seekable_too {
        runs.push(("seekable", inspect_seekable(Cursor::new(prefix))));
    }
    for (how, r) in runs {
        match r {
            Ok(s) => assert_truncated(&s, cut, &format!("{ctx} ({how})")),
            // Only a cut inside the 8-byte header is "not a stream".
            Err(e) => {
                assert!(cut < 8, "{ctx} ({how}): prefix of {cut} bytes: {e}");
                assert_eq!(e.to_string().lines().count(), 1);
            }
        }
    }
}

#[test]
fn every_prefix_of_a_small_stream_is_truncated() {
    let bytes = fixture("microvm-7.2-exec");
    // Every cut through the front-to-back reader; the seekable one differs only
    // in how it finds the description, so every fifth cut is enough there.
    for cut in 0..bytes.len() {
        check_prefix(&bytes, cut, "microvm-7.2-exec", cut % 5 == 0);
    }
}

#[test]
fn sampled_prefixes_of_every_stream_are_truncated() {
    for name in ALL {
        let bytes = fixture(name);
        let n = bytes.len();
        let mut cuts: Vec<usize> = (0..300).chain(n.saturating_sub(300)..n).collect();
        // Odd strides land at every position within a page record over the run.
        cuts.extend((0..n).step_by((n / 300).max(4099) | 1));
        for cut in cuts {
            check_prefix(&bytes, cut, name, true);
        }
    }
}

/// Runs both entry points; any outcome but a panic is fine, but an `Ok` must not
/// claim a damaged stream is whole unless the damage was in bytes the reader skips.
fn run_both(data: &[u8]) -> Vec<Result<Summary, StreamError>> {
    vec![inspect(data), inspect_seekable(Cursor::new(data))]
}

#[test]
fn flipped_bytes_in_structure_give_errors_not_panics() {
    let bytes = fixture("pc-7.2-exec");
    // Offsets read from the stream itself (fixtures/streams/README.md describes it):
    // header, configuration length, section id, RAM block name and length,
    // the first page record's flags.
    let targets: &[(usize, &str)] = &[
        (0, "magic"),
        (7, "version"),
        (8, "configuration marker"),
        (12, "machine type length"),
        (0x1b, "section id"),
        (0x1f, "section name length"),
        (0x38, "block name"),
        (0x3b, "block length"),
        (0x36, "total RAM size"),
        (0xbf, "footer"),
    ];
    for &(at, what) in targets {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut d = bytes.clone();
            d[at] ^= flip;
            for r in run_both(&d) {
                match r {
                    Err(e) => assert_eq!(e.to_string().lines().count(), 1, "{what}: {e}"),
                    Ok(s) => assert!(
                        !s.complete,
                        "{what} flipped by {flip:#x} still reads as complete"
                    ),
                }
            }
        }
    }
}

#[test]
fn huge_length_fields_do_not_allocate() {
    let mut d = b"QEVM\0\0\0\x03\x07".to_vec();
    d.extend_from_slice(&u32::MAX.to_be_bytes());
    let s = inspect(&d[..]).unwrap();
    assert!(
        matches!(s.error, Some(StreamError::Corrupt { offset: 9, .. })),
        "{:?}",
        s.error
    );

    // A VM description that claims 4 GiB.
    let mut d = fixture("microvm-7.2-exec");
    let desc = d.iter().rposition(|&b| b == 0x06).unwrap();
    let json_at = d
        .windows(2)
        .rposition(|w| w == [0x06, 0x00])
        .unwrap_or(desc);
    d.truncate(json_at + 1);
    d.extend_from_slice(&u32::MAX.to_be_bytes());
    for r in run_both(&d) {
        let s = r.unwrap();
        assert!(!s.complete);
    }

    // A RAM total near u64::MAX and a block as large.
    let mut d = b"QEVM\0\0\0\x03\x07\0\0\0\x02pc\x01\0\0\0\x01\x03ram\0\0\0\0\0\0\0\x04".to_vec();
    d.extend_from_slice(&(!0xfffu64 | 0x04).to_be_bytes());
    d.extend_from_slice(b"\x06pc.ram");
    d.extend_from_slice(&(!0xfffu64).to_be_bytes());
    d.extend_from_slice(&0x0000_0000_0000_0008u64.to_be_bytes());
    d.extend_from_slice(b"\x06pc.ram");
    let s = inspect(&d[..]).unwrap();
    assert!(!s.complete);
}

#[test]
fn every_single_byte_flip_of_a_small_stream_is_safe() {
    let bytes = fixture("microvm-7.2-exec");
    // The JSON description is text QEMU only reads for debugging; flip the binary part.
    let end = bytes.len().min(20_000);
    for at in (0..end).step_by(7) {
        let mut d = bytes.clone();
        d[at] ^= 0x5a;
        for r in run_both(&d) {
            if let Err(e) = r {
                assert_eq!(e.to_string().lines().count(), 1);
            }
        }
    }
}

fn one_line_not_a_stream(data: &[u8], says: &str) {
    for r in run_both(data) {
        let e = r.expect_err("not a stream");
        assert!(matches!(e, StreamError::NotAStream(_)), "{e:?}");
        let msg = e.to_string();
        assert_eq!(msg.lines().count(), 1, "{msg}");
        assert!(msg.starts_with("not a QEMU migration stream"), "{msg}");
        assert!(msg.contains(says), "{msg:?} should say {says:?}");
    }
}

#[test]
fn foreign_inputs_are_named_in_one_line() {
    one_line_not_a_stream(b"", "empty");
    one_line_not_a_stream(b"hello, this is a text file\n", "text");
    // The first bytes `qemu-img create -f qcow2` writes: magic, version 3.
    one_line_not_a_stream(b"QFI\xfb\0\0\0\x03\0\0\0\0\0\0\0\0", "qcow2");
    one_line_not_a_stream(b"QFI\xfb", "qcow2");
    one_line_not_a_stream(b"LibvirtQemudSave\x02\0\0\0", "libvirt");
    one_line_not_a_stream(b"\x1f\x8b\x08\0", "gzip");
    one_line_not_a_stream(b"QEV", "");
    let mut x = 0x1234_5678_9abc_def0u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    one_line_not_a_stream(&random, "starts with bytes");
}

#[test]
fn unknown_version_is_named() {
    for r in run_both(b"QEVM\0\0\0\x02rest") {
        let e = r.unwrap_err();
        assert!(matches!(e, StreamError::UnsupportedVersion(2)), "{e:?}");
    }
}

#[test]
fn trailing_garbage_is_not_complete() {
    let mut d = fixture("microvm-7.2-exec");
    d.extend_from_slice(b"junk");
    // The seekable reader no longer finds the description at the very end, the
    // pipe reader sees bytes after it: both must say so.
    for r in run_both(&d) {
        let s = r.unwrap();
        assert!(!s.complete, "{:?}", s.stopped);
        assert!(s.device_state_complete);
    }
}
