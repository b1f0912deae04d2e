//! The walk through the stream: header, configuration, sections, end marker.

use crate::format::*;
use crate::input::Input;
use crate::summary::{DeviceSection, MainRam, MappedRamBlock, RamBlock, Summary};
use crate::vmdesc::{self, VmDesc, MAX_JSON};
use crate::StreamError;

mod ram;

/// Longest a device section may run when its end has to be found by scanning.
const MAX_SCAN: u64 = 64 << 20;
/// Machine type names are short; QEMU stores the length in 32 bits, we do not believe it.
const MAX_MACHINE_NAME: u32 = 255;
const MAX_INSTANCE_ID: u32 = 1 << 20;
const MAX_SECTION_VERSION: u32 = 1 << 16;
/// QEMU has a few dozen capabilities.
const MAX_CAPS: u32 = 256;

pub(crate) fn header(inp: &mut Input<'_>) -> Result<u32, StreamError> {
    let head = inp.peek(16)?;
    let magic = head
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    if magic != Some(QEMU_VM_FILE_MAGIC) {
        return Err(StreamError::NotAStream(identify(head)));
    }
    let version = head
        .get(4..8)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    match version {
        None => Err(StreamError::NotAStream(
            "only the magic is there: the header is cut short".to_owned(),
        )),
        Some(QEMU_VM_FILE_VERSION) => {
            inp.skip(8, || "the header".to_owned())?;
            Ok(QEMU_VM_FILE_VERSION)
        }
        Some(v) => Err(StreamError::UnsupportedVersion(v)),
    }
}

/// Names what the bytes look like instead, for a one-line verdict.
fn identify(head: &[u8]) -> String {
    if head.is_empty() {
        return "the input is empty".to_owned();
    }
    let starts = |m: &[u8]| head.starts_with(m);
    if starts(b"QFI\xfb") {
        return "this is a qcow2 disk image".to_owned();
    }
    if starts(b"LibvirtQemudSave") || starts(b"LibvirtQemudPart") {
        return "this is a libvirt save image (a libvirt header precedes the QEMU stream)"
            .to_owned();
    }
    if starts(&[0x1f, 0x8b]) {
        return "this is gzip-compressed data (decompress it first)".to_owned();
    }
    if starts(b"\x28\xb5\x2f\xfd") {
        return "this is zstd-compressed data (decompress it first)".to_owned();
    }
    if starts(b"\x7fELF") {
        return "this is an ELF file (a guest memory dump or a program?)".to_owned();
    }
    if starts(b"QEVM") {
        return "the header is cut short".to_owned();
    }
    if head
        .iter()
        .all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace())
    {
        return "the input is text".to_owned();
    }
    let hex: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("it starts with bytes {} instead of QEVM", hex.join(" "))
}

pub(crate) struct Walker<'s> {
    pub s: &'s mut Summary,
    desc: Option<VmDesc>,
    ignore_shared: bool,
    ram_section_id: Option<u32>,
    /// Block index of the last record, for records with the CONTINUE flag.
    current_block: Option<usize>,
    /// Section ids of iterative sections other than RAM (their bodies are opaque).
    other_iterative: Vec<u32>,
}

/// QEMU's ids (section names, RAM block names, machine types) are printable ASCII
/// such as `0000:00:01.0/virtio-rng`; anything else means the length was misread.
fn ascii_name(raw: &[u8]) -> Option<&str> {
    if raw.iter().all(|&c| (0x20..0x7f).contains(&c)) {
        std::str::from_utf8(raw).ok()
    } else {
        None
    }
}

fn quoted(name: &[u8]) -> String {
    format!("\"{}\"", String::from_utf8_lossy(name).escape_debug())
}

impl<'s> Walker<'s> {
    pub(crate) fn new(s: &'s mut Summary, desc: Option<VmDesc>) -> Self {
        if let Some(d) = &desc {
            s.vm_description_offset = Some(d.offset);
            if let Some(p) = d.page_size.filter(|p| p.is_power_of_two() && *p >= 512) {
                s.page_size = p;
            }
        }
        Walker {
            s,
            desc,
            ignore_shared: false,
            ram_section_id: None,
            current_block: None,
            other_iterative: Vec::new(),
        }
    }

    fn corrupt(at: u64, expected: impl Into<String>, found: impl Into<String>) -> StreamError {
        StreamError::Corrupt {
            offset: at,
            expected: expected.into(),
            found: found.into(),
        }
    }

    /// Reads the sections up to the end marker and whatever follows it.
    pub(crate) fn body(&mut self, inp: &mut Input<'_>) -> Result<(), StreamError> {
        loop {
            let at = inp.pos();
            let kind = inp.u8(|| "a section type byte (or the end-of-stream marker)".to_owned())?;
            match kind {
                QEMU_VM_EOF => return self.after_eof(inp),
                QEMU_VM_CONFIGURATION => self.configuration(inp, at)?,
                QEMU_VM_SECTION_START | QEMU_VM_SECTION_FULL => {
                    self.section_start(inp, at, kind)?
                }
                QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => self.section_part(inp, at)?,
                QEMU_VM_COMMAND => self.command(inp, at)?,
                other => {
                    return Err(Self::corrupt(
                        at,
                        "a section type (0x00-0x04, 0x07, 0x08)",
                        format!("0x{other:02x}"),
                    ))
                }
            }
        }
    }

    fn after_eof(&mut self, inp: &mut Input<'_>) -> Result<(), StreamError> {
        let at = inp.pos();
        self.s.device_state_complete = true;
        if inp.at_end()? {
            // Only `-machine suppress-vmdesc=on` leaves the description out; far more
            // often a stream ending here was cut (e.g. the writer was killed).
            return Err(StreamError::Truncated {
                offset: at,
                expected: "the JSON VM description QEMU writes after the end marker (the device state before it is whole)".to_owned(),
            });
        }
        let tag = inp.u8(|| "the VM description marker".to_owned())?;
        if tag != QEMU_VM_VMDESCRIPTION {
            return Err(Self::corrupt(
                at,
                "end of input or the VM description (0x06) after the end marker",
                format!("0x{tag:02x}"),
            ));
        }
        let len = u64::from(inp.be32(|| "the VM description length".to_owned())?);
        if len > MAX_JSON {
            return Err(Self::corrupt(
                at,
                format!("a VM description of at most {MAX_JSON} bytes"),
                format!("{len} bytes"),
            ));
        }
        self.s.vm_description_offset = Some(at);
        // Walking the JSON would need it all in memory; its length has been
        // checked and a seekable input has already parsed it from the end.
        inp.skip(len, || format!("the {len}-byte JSON VM description"))?;
        let extra = inp.drain()?;
        if extra > 0 {
            return Err(Self::corrupt(
                inp.pos().saturating_sub(extra),
                "end of input after the VM description",
                format!("{extra} more bytes"),
            ));
        }
        self.s.complete = true;
        Ok(())
    }

    fn configuration(&mut self, inp: &mut Input<'_>, at: u64) -> Result<(), StreamError> {
        let len = inp.be32(|| "the machine type length".to_owned())?;
        if len == 0 || len > MAX_MACHINE_NAME {
            return Err(Self::corrupt(
                at + 1,
                format!("a machine type name of 1..={MAX_MACHINE_NAME} bytes"),
                format!("length {len}"),
            ));
        }
        let mut buf = [0u8; 255];
        let name_at = inp.pos();
        let name = inp.bytes_into(len as u8, &mut buf, || "the machine type name".to_owned())?;
        let Some(name) = ascii_name(name) else {
            return Err(Self::corrupt(name_at, "a machine type name", quoted(name)));
        };
        self.s.machine_type = Some(name.to_owned());
        while inp.peek(1)? == [QEMU_VM_SUBSECTION] {
            self.config_subsection(inp)?;
        }
        Ok(())
    }

    fn config_subsection(&mut self, inp: &mut Input<'_>) -> Result<(), StreamError> {
        let at = inp.pos();
        inp.skip(1, String::new)?;
        let n = inp.u8(|| "a configuration subsection name length".to_owned())?;
        let mut buf = [0u8; 255];
        let name = inp
            .bytes_into(n, &mut buf, || "a configuration subsection name".to_owned())?
            .to_vec();
        let _version = inp.be32(|| "a configuration subsection version".to_owned())?;
        match name.as_slice() {
            b"configuration/capabilities" => {
                let count = inp.be32(|| "the capability count".to_owned())?;
                if count > MAX_CAPS {
                    return Err(Self::corrupt(
                        at,
                        format!("at most {MAX_CAPS} capabilities"),
                        count.to_string(),
                    ));
                }
                for _ in 0..count {
                    let n = inp.u8(|| "a capability name length".to_owned())?;
                    let cap = inp.bytes_into(n, &mut buf, || "a capability name".to_owned())?;
                    let cap = String::from_utf8_lossy(cap).into_owned();
                    match cap.as_str() {
                        "x-ignore-shared" => self.ignore_shared = true,
                        "mapped-ram" => self.s.mapped_ram = true,
                        _ => {}
                    }
                    self.s.capabilities.push(cap);
                }
            }
            b"configuration/target-page-bits" => {
                let bits = inp.be32(|| "the target page bits".to_owned())?;
                if !(9..=30).contains(&bits) {
                    return Err(Self::corrupt(
                        at,
                        "target page bits in 9..=30",
                        bits.to_string(),
                    ));
                }
                self.s.page_size = 1u64 << bits;
            }
            b"configuration/uuid" => inp.skip(16, || "the VM UUID".to_owned())?,
            other => {
                let key = String::from_utf8_lossy(other).into_owned();
                let len = self
                    .desc
                    .as_ref()
                    .and_then(|d| d.config_subsections.get(&key).copied());
                match len {
                    Some(len) => inp.skip(len, || format!("configuration subsection {key}"))?,
                    None => {
                        return Err(StreamError::Unsupported {
                            offset: at,
                            what: format!("unknown configuration subsection {}", quoted(other)),
                        })
                    }
                }
            }
        }
        Ok(())
    }

    fn command(&mut self, inp: &mut Input<'_>, at: u64) -> Result<(), StreamError> {
        let cmd = inp.be16(|| "a command number".to_owned())?;
        let len = inp.be16(|| "a command length".to_owned())?;
        let name = command_name(cmd);
        if cmd == 7 {
            // The payload is a nested stream (postcopy); skipping its length field
            // would land in the middle of it.
            return Err(StreamError::Unsupported {
                offset: at,
                what: "a postcopy package (MIG_CMD_PACKAGED)".to_owned(),
            });
        }
        inp.skip(u64::from(len), || format!("the data of command {name}"))?;
        *self.s.commands.entry(name.to_owned()).or_insert(0) += 1;
        Ok(())
    }

    fn section_start(&mut self, inp: &mut Input<'_>, at: u64, kind: u8) -> Result<(), StreamError> {
        let id = inp.be32(|| "a section id".to_owned())?;
        let n = inp.u8(|| "a section name length".to_owned())?;
        let name_at = inp.pos();
        if n == 0 {
            return Err(Self::corrupt(
                name_at - 1,
                "a section name",
                "an empty name",
            ));
        }
        let mut buf = [0u8; 255];
        let raw = inp.bytes_into(n, &mut buf, || "a section name".to_owned())?;
        let Some(name) = ascii_name(raw) else {
            return Err(Self::corrupt(name_at, "a section name", quoted(raw)));
        };
        let name = name.to_owned();
        let instance_id = inp.be32(|| format!("the instance id of section {name}"))?;
        let version_id = inp.be32(|| format!("the version of section {name}"))?;
        // Instance ids count devices of one kind and versions count format
        // revisions: both stay small, and a misread length lands on bytes that
        // are not.
        if instance_id > MAX_INSTANCE_ID || version_id > MAX_SECTION_VERSION {
            return Err(Self::corrupt(
                at,
                format!("a section header (instance id <= {MAX_INSTANCE_ID}, version <= {MAX_SECTION_VERSION})"),
                format!("section {name:?} instance {instance_id}, version {version_id}"),
            ));
        }
        let sec = DeviceSection {
            name,
            instance_id,
            version_id,
            section_id: id,
            offset: at,
        };
        if kind == QEMU_VM_SECTION_START {
            let is_ram = sec.name == "ram" && instance_id == 0;
            self.s.iterative.push(sec);
            if is_ram {
                if version_id != 4 {
                    return Err(StreamError::Unsupported {
                        offset: at,
                        what: format!("RAM section version {version_id} (this reader knows 4)"),
                    });
                }
                self.ram_section_id = Some(id);
                self.ram_records(inp)?;
            } else {
                self.other_iterative.push(id);
                return self.skip_by_scan(inp, id, at);
            }
        } else {
            let key = (sec.name.clone(), instance_id);
            let len = self
                .desc
                .as_ref()
                .and_then(|d| d.sections.get(&key).copied());
            let what = format!(
                "the state of device {} (instance {})",
                sec.name, instance_id
            );
            self.s.devices.push(sec);
            match len {
                Some(len) => inp.skip(len, || what)?,
                None => return self.skip_by_scan(inp, id, at),
            }
        }
        self.footer(inp, id)
    }

    fn section_part(&mut self, inp: &mut Input<'_>, at: u64) -> Result<(), StreamError> {
        let id = inp.be32(|| "a section id".to_owned())?;
        if Some(id) == self.ram_section_id {
            self.ram_records(inp)?;
            self.footer(inp, id)
        } else if self.other_iterative.contains(&id) {
            self.skip_by_scan(inp, id, at)
        } else {
            Err(Self::corrupt(
                at + 1,
                "the id of a section started earlier",
                id.to_string(),
            ))
        }
    }

    /// Checks the footer after a section, and learns from the first section whether
    /// this stream has footers at all.
    fn footer(&mut self, inp: &mut Input<'_>, id: u32) -> Result<(), StreamError> {
        let at = inp.pos();
        match self.s.section_footers {
            Some(false) => return Ok(()),
            None => {
                let has = inp.peek(1)? == [QEMU_VM_SECTION_FOOTER];
                self.s.section_footers = Some(has);
                if !has {
                    return Ok(());
                }
            }
            Some(true) => {}
        }
        let tag = inp.u8(|| format!("the footer of section {id}"))?;
        let got = inp.be32(|| format!("the footer of section {id}"))?;
        if tag != QEMU_VM_SECTION_FOOTER || got != id {
            return Err(Self::corrupt(
                at,
                format!("the footer of section {id} (7e {id:08x})"),
                format!("{tag:02x} {got:08x}"),
            ));
        }
        Ok(())
    }

    /// Without a VM description a device section can only be stepped over by
    /// finding its footer, then checking that a plausible record follows.
    fn skip_by_scan(&mut self, inp: &mut Input<'_>, id: u32, at: u64) -> Result<(), StreamError> {
        if self.s.section_footers == Some(false) {
            return Err(StreamError::Unsupported {
                offset: at,
                what: "a device section in a stream without section footers and without a VM description".to_owned(),
            });
        }
        let body_at = inp.pos();
        let mut want = [QEMU_VM_SECTION_FOOTER, 0, 0, 0, 0];
        want[1..].copy_from_slice(&id.to_be_bytes());
        loop {
            let scanned = inp.pos().saturating_sub(body_at);
            let limit = MAX_SCAN.saturating_sub(scanned);
            let found = inp.scan_to(QEMU_VM_SECTION_FOOTER, limit)?;
            if !found && inp.pos().saturating_sub(body_at) > MAX_SCAN {
                return Err(StreamError::Unsupported {
                    offset: at,
                    what: format!("no footer for section {id} within {MAX_SCAN} bytes"),
                });
            }
            let ahead = inp.peek(5 + 1 + 4 + 1 + 255 + 8)?;
            if ahead.len() < 5 {
                return Err(StreamError::Truncated {
                    offset: at,
                    expected: format!("the body of section {id} and its footer"),
                });
            }
            if ahead.starts_with(&want) && plausible_next(ahead.get(5..).unwrap_or(&[])) {
                inp.skip(5, String::new)?;
                self.s.section_footers = Some(true);
                self.s.sections_found_by_scan += 1;
                return Ok(());
            }
            inp.advance_one();
        }
    }
}

/// Whether what follows a candidate footer looks like the next record.
fn plausible_next(b: &[u8]) -> bool {
    let be32 = |i: usize| -> Option<u32> {
        b.get(i..i + 4)
            .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    };
    match b.first() {
        None => true,
        Some(&QEMU_VM_EOF) => matches!(b.get(1), None | Some(&QEMU_VM_VMDESCRIPTION)),
        Some(&QEMU_VM_SECTION_START) | Some(&QEMU_VM_SECTION_FULL) => {
            let Some(id) = be32(1) else { return true };
            let Some(&n) = b.get(5) else {
                return id < (1 << 16);
            };
            let n = usize::from(n);
            let Some(name) = b.get(6..6 + n) else {
                return false;
            };
            let printable = n > 0 && name.iter().all(|c| c.is_ascii_graphic() || *c == b' ');
            let small = |v: Option<u32>| v.is_none_or(|v| v < (1 << 16));
            id < (1 << 16) && printable && small(be32(6 + n)) && small(be32(10 + n))
        }
        Some(&QEMU_VM_SECTION_PART) | Some(&QEMU_VM_SECTION_END) => {
            be32(1).is_none_or(|id| id < (1 << 16))
        }
        Some(&QEMU_VM_COMMAND) => b.get(1..3).is_none_or(|c| c[0] == 0 && c[1] < 0x20),
        _ => false,
    }
}

/// The block that holds guest RAM: the board's well-known names first, then the
/// largest block that is not a ROM or video memory.
pub(crate) fn main_ram(blocks: &[RamBlock]) -> Option<MainRam> {
    const KNOWN: [&str; 7] = [
        "pc.ram",
        "mach-virt.ram",
        "ram",
        "s390.ram",
        "ppc_spapr.ram",
        "microvm.ram",
        "riscv_virt_board.ram",
    ];
    let b = KNOWN
        .iter()
        .find_map(|k| blocks.iter().find(|b| b.name == *k))
        .or_else(|| {
            blocks
                .iter()
                .filter(|b| {
                    !b.name.starts_with("/rom@")
                        && !b.name.contains(".rom")
                        && !b.name.contains(".bios")
                        && !b.name.contains("vram")
                        && !b.name.contains("flash")
                })
                .max_by_key(|b| b.size)
        })?;
    Some(MainRam {
        block: b.name.clone(),
        bytes: b.size,
        mib: b.size >> 20,
    })
}

pub(crate) fn walk(inp: &mut Input<'_>, s: &mut Summary, desc: Option<VmDesc>) {
    s.page_size = DEFAULT_TARGET_PAGE_SIZE;
    let mut w = Walker::new(s, desc);
    let r = w.body(inp);
    if let Err(e) = r {
        if matches!(e, StreamError::Truncated { .. }) {
            // Count the few bytes of the item that was cut short.
            let _ = inp.drain();
        }
        w.s.stop(e);
    }
    w.s.total_bytes = inp.pos();
}

pub(crate) fn load_desc<R: std::io::Read + std::io::Seek>(
    f: &mut R,
    len: u64,
) -> std::io::Result<Option<VmDesc>> {
    let d = vmdesc::locate(f, len)?;
    f.seek(std::io::SeekFrom::Start(0))?;
    Ok(d)
}
