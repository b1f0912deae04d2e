use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::StreamError;

/// What a migration stream says about the VM that wrote it.
///
/// Filled in as the stream is read, so a truncated or corrupt stream still reports
/// everything before the point where reading stopped ([`Summary::stopped`]).
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    /// Format version from the header (always 3 for QEMU since 2.x).
    pub stream_version: u32,
    /// Machine type from the configuration section, e.g. `pc-i440fx-7.2`.
    pub machine_type: Option<String>,
    /// Migration capabilities QEMU recorded in the configuration section
    /// (only those the destination must match, e.g. `mapped-ram`, `x-ignore-shared`).
    pub capabilities: Vec<String>,
    /// Target page size in bytes.
    pub page_size: u64,
    /// RAM blocks in the order QEMU listed them.
    pub ram_blocks: Vec<RamBlock>,
    /// Total RAM bytes QEMU announced (sum of the blocks' used lengths).
    pub ram_total: Option<u64>,
    /// The block that holds guest memory, and the `-m` value (MiB) it implies.
    pub main_ram: Option<MainRam>,
    /// Sections that carry device state, in stream order.
    pub devices: Vec<DeviceSection>,
    /// Iterative sections (`ram`, and e.g. `block` or `dirty-bitmap` when present).
    pub iterative: Vec<DeviceSection>,
    /// `QEMU_VM_COMMAND`s seen, by name.
    pub commands: BTreeMap<String, u64>,
    /// Page records by kind.
    pub pages: PageCounts,
    /// Whether the RAM was written with the `mapped-ram` capability (QEMU 9.0+,
    /// `file:` transport): pages at fixed file offsets, not in the stream.
    pub mapped_ram: bool,
    /// Whether every section ends with a `0x7e` footer (the default since QEMU 2.6).
    pub section_footers: Option<bool>,
    /// Where QEMU's JSON VM description starts, when it was found.
    pub vm_description_offset: Option<u64>,
    /// Bytes read (or skipped) from the start of the input.
    pub total_bytes: u64,
    /// Device sections that had to be found by scanning for their footer because no
    /// VM description was available (non-seekable input).
    pub sections_found_by_scan: u64,
    /// True once the end-of-stream marker was read: all RAM and device state is
    /// there, which is what a restore needs, even if what follows is missing.
    pub device_state_complete: bool,
    /// True when the stream reached its end marker (and its description, if any)
    /// with nothing wrong on the way.
    pub complete: bool,
    /// Why reading stopped, when it did not reach the end.
    pub stopped: Option<Stopped>,
    /// The error behind [`Summary::stopped`], for callers that want to match on it.
    #[serde(skip)]
    pub error: Option<StreamError>,
}

/// One RAM block as announced in the RAM section's setup.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RamBlock {
    /// QEMU's name for it (`pc.ram`, `/rom@etc/acpi/tables`).
    pub name: String,
    /// Used length in bytes (what `info ramblock` calls "Used").
    pub size: u64,
    /// Host page size, only sent for postcopy when it differs from the target's.
    pub page_size: Option<u64>,
    /// Guest-physical address, only sent with `x-ignore-shared`.
    pub addr: Option<u64>,
    /// Present for mapped-ram streams.
    pub mapped_ram: Option<MappedRamBlock>,
    /// Page records for this block.
    pub normal_pages: u64,
    /// Zero-page records for this block.
    pub zero_pages: u64,
}

/// Where a block's pages live in a mapped-ram file.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MappedRamBlock {
    /// The page size of the bitmap's bits.
    pub page_size: u64,
    /// Stream offset of the block's dirty bitmap.
    pub bitmap_offset: u64,
    /// Stream offset of the block's first page.
    pub pages_offset: u64,
    /// Pages whose bit is set in the block's bitmap (written to the file).
    pub pages_present: u64,
}

/// The guest's main RAM: the largest RAM block, which `-m` sizes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MainRam {
    /// Its block's name (`pc.ram`, `microvm.ram`).
    pub block: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// `bytes` in MiB, rounded down; what `-m` was (`-m 16` gives 16).
    pub mib: u64,
}

/// A section header: what QEMU calls idstr, instance id and version id.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceSection {
    /// The device's id string (`0000:00:02.0/virtio-rng`, `cpu_common`).
    pub name: String,
    /// Which of several devices of that name.
    pub instance_id: u32,
    /// The version of the device's state format.
    pub version_id: u32,
    /// The number the stream refers to the section by.
    pub section_id: u32,
    /// Stream offset of the section header.
    pub offset: u64,
}

/// How many RAM pages of each kind the stream carries.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PageCounts {
    /// Full pages (`RAM_SAVE_FLAG_PAGE`, or set bits of a mapped-ram bitmap).
    pub normal: u64,
    /// Pages sent as a fill byte (`RAM_SAVE_FLAG_ZERO`, QEMU's "duplicate").
    pub zero: u64,
    /// Mapped-ram pages left out of the file (clear bits: zero or never dirtied).
    pub absent: u64,
    /// Records this reader counts but does not decode, by kind
    /// (`xbzrle`, `compressed`).
    pub other: BTreeMap<String, u64>,
    /// `RAM_SAVE_FLAG_MULTIFD_FLUSH` markers (no page data).
    pub multifd_flushes: u64,
}

/// Where and why reading stopped.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Stopped {
    /// `truncated`, `corrupt`, `unsupported` or `io`.
    pub kind: String,
    /// The stream offset, where one is known.
    pub offset: Option<u64>,
    /// The error, in words.
    pub message: String,
}

impl Summary {
    pub(crate) fn stop(&mut self, e: StreamError) {
        self.stopped = Some(Stopped {
            kind: e.kind().to_owned(),
            offset: e.offset(),
            message: e.to_string(),
        });
        self.complete = false;
        self.error = Some(e);
    }

    /// True when the stream stopped because the input ended early.
    #[must_use]
    pub fn is_truncated(&self) -> bool {
        matches!(self.error, Some(StreamError::Truncated { .. }))
    }

    /// A human report: what VM this is, its RAM, its devices, its pages, and
    /// whether the stream is whole.
    #[must_use]
    pub fn describe(&self) -> String {
        self.to_string()
    }
}

fn mib(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.complete {
            "complete".to_owned()
        } else {
            match &self.stopped {
                Some(s) => format!("INCOMPLETE ({})", s.kind),
                None => "INCOMPLETE".to_owned(),
            }
        };
        writeln!(
            f,
            "QEMU migration stream v{}, {} bytes, {}",
            self.stream_version, self.total_bytes, state
        )?;
        writeln!(
            f,
            "machine type: {}",
            self.machine_type.as_deref().unwrap_or("(not recorded)")
        )?;
        if !self.capabilities.is_empty() {
            writeln!(f, "capabilities: {}", self.capabilities.join(", "))?;
        }
        if self.mapped_ram {
            writeln!(f, "layout: mapped-ram (pages at fixed file offsets)")?;
        }
        match &self.main_ram {
            Some(m) => writeln!(
                f,
                "guest RAM: {} in {} (-m {})",
                mib(m.bytes),
                m.block,
                m.mib
            )?,
            None => writeln!(f, "guest RAM: unknown")?,
        }
        if !self.ram_blocks.is_empty() {
            writeln!(f, "RAM blocks ({}):", self.ram_blocks.len())?;
            for b in &self.ram_blocks {
                write!(f, "  {:<32} {:>10}", b.name, mib(b.size))?;
                if let Some(m) = &b.mapped_ram {
                    write!(f, "  {} pages in file", m.pages_present)?;
                } else {
                    write!(f, "  {} pages, {} zero", b.normal_pages, b.zero_pages)?;
                }
                writeln!(f)?;
            }
        }
        let p = &self.pages;
        write!(f, "pages: {} normal, {} zero", p.normal, p.zero)?;
        if self.mapped_ram {
            write!(f, ", {} absent", p.absent)?;
        }
        for (k, n) in &p.other {
            write!(f, ", {n} {k}")?;
        }
        writeln!(f)?;
        writeln!(f, "device sections ({}):", self.devices.len())?;
        for d in &self.devices {
            writeln!(
                f,
                "  {} (instance {}, version {})",
                d.name, d.instance_id, d.version_id
            )?;
        }
        if !self.commands.is_empty() {
            let c: Vec<String> = self
                .commands
                .iter()
                .map(|(k, n)| format!("{k} x{n}"))
                .collect();
            writeln!(f, "commands: {}", c.join(", "))?;
        }
        match &self.stopped {
            Some(s) => writeln!(f, "stopped: {}", s.message),
            None if self.complete => writeln!(f, "end of stream reached"),
            None => Ok(()),
        }
    }
}
