//! The JSON VM description QEMU appends after the end-of-stream marker.
//!
//! Device sections are vmstate with no length prefix, and vmstate can only be
//! walked by knowing every field of every device model. The description records,
//! for each section QEMU wrote, how many bytes each top-level field took and
//! which subsections were sent, which is exactly enough to step over a section.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use serde_json::Value;

use crate::format::{QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION};

/// A description larger than this is not believed (a 1024-vCPU guest writes a few MiB).
pub(crate) const MAX_JSON: u64 = 64 << 20;

const TAIL_CHUNK: usize = 64 << 10;

#[derive(Debug, Default)]
pub(crate) struct VmDesc {
    /// (section name, instance id) -> body length in bytes.
    pub sections: HashMap<(String, u32), u64>,
    /// Configuration subsection name -> body length.
    pub config_subsections: HashMap<String, u64>,
    pub page_size: Option<u64>,
    /// Where the `QEMU_VM_VMDESCRIPTION` byte is.
    pub offset: u64,
}

/// Finds the description by its shape: a `0x06` byte, a big-endian length that
/// reaches exactly to the end of the file, and a `{`. Scans backwards through a
/// fixed buffer so a huge file costs no more memory than a small one.
pub(crate) fn locate<R: Read + Seek>(f: &mut R, len: u64) -> std::io::Result<Option<VmDesc>> {
    // QEMU's JSON writer ends the description with the closing brace; anything
    // else at the very end means there is no description to find, and checking
    // that first keeps a cut or foreign file from costing a 64 MiB backward scan.
    if len == 0 {
        return Ok(None);
    }
    f.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    if last[0] != b'}' {
        return Ok(None);
    }
    let mut buf = vec![0u8; TAIL_CHUNK + 5];
    let lowest = len.saturating_sub(MAX_JSON.saturating_add(5));
    let mut hi = len; // exclusive end of the window still to check for a start byte
    while hi > lowest {
        let lo = hi.saturating_sub(TAIL_CHUNK as u64).max(lowest);
        let want = usize::try_from((len - lo).min((TAIL_CHUNK + 5) as u64)).unwrap_or(0);
        let Some(win) = buf.get_mut(..want) else {
            return Ok(None);
        };
        f.seek(SeekFrom::Start(lo))?;
        f.read_exact(win)?;
        let candidates = usize::try_from(hi - lo).unwrap_or(0);
        for i in (0..candidates).rev() {
            let (Some(&tag), Some(lenb), Some(&brace)) =
                (win.get(i), win.get(i + 1..i + 5), win.get(i + 5))
            else {
                continue;
            };
            if tag != QEMU_VM_VMDESCRIPTION || brace != b'{' {
                continue;
            }
            let jlen = u64::from(u32::from_be_bytes([lenb[0], lenb[1], lenb[2], lenb[3]]));
            let at = lo + i as u64;
            if at.checked_add(5).and_then(|v| v.checked_add(jlen)) != Some(len) || jlen > MAX_JSON {
                continue;
            }
            if let Some(d) = load(f, at, jlen)? {
                return Ok(Some(d));
            }
        }
        hi = lo;
    }
    Ok(None)
}

fn load<R: Read + Seek>(f: &mut R, at: u64, jlen: u64) -> std::io::Result<Option<VmDesc>> {
    // The end-of-stream marker must come right before the description.
    if at == 0 {
        return Ok(None);
    }
    f.seek(SeekFrom::Start(at - 1))?;
    let mut eof = [0u8; 1];
    f.read_exact(&mut eof)?;
    if eof[0] != QEMU_VM_EOF {
        return Ok(None);
    }
    f.seek(SeekFrom::Start(at + 5))?;
    let mut text = Vec::new();
    f.by_ref().take(jlen).read_to_end(&mut text)?;
    let Ok(v) = serde_json::from_slice::<Value>(&text) else {
        return Ok(None);
    };
    let mut d = parse(&v);
    d.offset = at;
    Ok(Some(d))
}

pub(crate) fn parse(v: &Value) -> VmDesc {
    let mut d = VmDesc {
        page_size: v.get("page_size").and_then(Value::as_u64),
        ..VmDesc::default()
    };
    if let Some(devs) = v.get("devices").and_then(Value::as_array) {
        for dev in devs {
            let (Some(name), Some(inst)) = (
                dev.get("name").and_then(Value::as_str),
                dev.get("instance_id")
                    .and_then(Value::as_u64)
                    .and_then(|i| u32::try_from(i).ok()),
            ) else {
                continue;
            };
            if let Some(n) = body_len(dev, 0) {
                d.sections.insert((name.to_owned(), inst), n);
            }
        }
    }
    if let Some(subs) = v
        .get("configuration")
        .and_then(|c| c.get("subsections"))
        .and_then(Value::as_array)
    {
        for s in subs {
            if let (Some(name), Some(n)) =
                (s.get("vmsd_name").and_then(Value::as_str), body_len(s, 0))
            {
                d.config_subsections.insert(name.to_owned(), n);
            }
        }
    }
    d
}

/// Bytes a described vmstate body takes: each field's recorded size (times its
/// length for arrays QEMU described once), then each sent subsection with its
/// header (marker, name length, name, version).
fn body_len(desc: &Value, depth: u32) -> Option<u64> {
    if depth > 32 {
        return None;
    }
    let mut total = 0u64;
    if let Some(fields) = desc.get("fields").and_then(Value::as_array) {
        for f in fields {
            let size = f.get("size").and_then(Value::as_u64)?;
            let count = match f.get("array_len") {
                Some(n) => n.as_u64()?,
                None => 1,
            };
            total = total.checked_add(size.checked_mul(count)?)?;
        }
    }
    if let Some(subs) = desc.get("subsections").and_then(Value::as_array) {
        for s in subs {
            let name = s.get("vmsd_name").and_then(Value::as_str)?;
            let header = 1 + 1 + u64::try_from(name.len()).ok()? + 4;
            total = total
                .checked_add(header)?
                .checked_add(body_len(s, depth + 1)?)?;
        }
    }
    Some(total)
}
