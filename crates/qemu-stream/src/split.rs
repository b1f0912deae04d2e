//! Rewriting a stream on the fly: [`split`] moves RAM blocks' pages out of
//! the stream (each block into its own [`PageSink`], e.g. a sparse image at
//! the pages' offsets) and leaves a valid stream of everything else; [`join`]
//! puts them back from a [`PageSource`] each, giving a plain stream again.
//!
//! The stream's own rules (migration/ram.c) that the rewrite keeps:
//! - A page record is `be64(offset | flags)`, then the block's name unless
//!   `RAM_SAVE_FLAG_CONTINUE` says "the block of the last named record".
//!   Dropping records can change which block was named last, so every
//!   record that is kept is re-checked against what the *output* named last,
//!   and gets its name back where the two differ.
//! - A page may be sent more than once (a live save re-sends dirtied pages):
//!   the last one wins. Records of the block are moved out in order, and once
//!   one of them has to stay in the stream (an XBZRLE delta, a compressed
//!   page), every later one stays too, so the stream's copies are always the
//!   newer ones and are loaded over the image. This holds for each moved
//!   block on its own.
//! - Sections whose extent cannot be known without the VM description that
//!   QEMU writes last (device state) are passed through with everything
//!   after them. QEMU sends all RAM before the non-iterative device sections
//!   (`qemu_savevm_state_complete_precopy`, migration/savevm.c), so in
//!   practice nothing of the block is left to move by then; if records do
//!   follow, they stay in the stream, after the image's copies, and the
//!   output is first brought back in step with a small RAM section of its
//!   own (the rewriter's `resync`).

use std::io::{self, Read, Write};

use serde::Serialize;

use crate::format::*;

/// Read buffer: a pipe's worth, so a page is nearly always a slice of it.
const BUF_SIZE: usize = 1 << 20;
/// Machine and block names are stored with a one-byte length: at most 255.
const MAX_NAME: usize = 255;
/// QEMU has a few dozen capabilities.
const MAX_CAPS: u32 = 256;

/// Where the pages moved out of the stream go.
pub trait PageSink {
    /// The block was announced: `bytes` long, in pages of `page_size`.
    /// Called once, before any page.
    ///
    /// # Errors
    /// Whatever preparing the destination fails with; the split stops.
    fn block(&mut self, name: &str, bytes: u64, page_size: u64) -> io::Result<()>;
    /// A page of data at `offset` in the block (it may come again later: the last one wins).
    ///
    /// # Errors
    /// A failed write; the split stops.
    fn page(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// A page that is all zero (`RAM_SAVE_FLAG_ZERO`).
    ///
    /// # Errors
    /// A failed write; the split stops.
    fn zero(&mut self, offset: u64) -> io::Result<()>;
    /// The content the sink holds for `offset` now, into `buf` (one page).
    ///
    /// # Errors
    /// A failed read; the split stops.
    fn current(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Called with each page's offset and data (`None`: all zero).
pub type PageFn<'a> = dyn FnMut(u64, Option<&[u8]>) -> io::Result<()> + 'a;

/// Where [`join`] takes the block's pages from.
pub trait PageSource {
    /// Calls `f` for every page of the block in order, with `None` for a page
    /// that is all zero.
    ///
    /// # Errors
    /// A failed read, or what `f` returns.
    fn pages(&mut self, page_size: u64, f: &mut PageFn<'_>) -> io::Result<()>;
}

/// What a split or join did with one of the blocks it was asked to move.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct MovedBlock {
    /// The block's name, as asked for.
    pub name: String,
    /// Whether the stream's block list announced it (else nothing was moved).
    pub announced: bool,
    /// Its size in bytes.
    pub bytes: u64,
    /// Page records of the block moved out (split) or put in (join) with data.
    pub pages: u64,
    /// Zero-page records of the block moved out or put in.
    pub zero_pages: u64,
    /// Records of the block that stayed in the stream (see the module docs).
    pub pages_kept: u64,
}

/// What a split or join did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SplitReport {
    /// The blocks asked for, in the order asked.
    pub blocks: Vec<MovedBlock>,
    /// Target page size.
    pub page_size: u64,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written to the output stream.
    pub bytes_out: u64,
    /// Where, and why, the rest of the input was copied through unparsed.
    pub passed_through: Option<(u64, String)>,
    /// Small RAM sections added to keep block names in step (see the module docs).
    pub resyncs: u64,
    /// Whether the input reached its end-of-stream marker before its end.
    /// (Only known when the input was parsed that far, i.e. not after
    /// [`SplitReport::passed_through`].)
    pub saw_eof: bool,
}

/// Why a split or join stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SplitError {
    /// Reading the input failed.
    #[error("reading the stream at byte {offset}: {source}")]
    Read {
        /// Input offset.
        offset: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Writing the output stream failed.
    #[error("writing the stream: {0}")]
    Write(#[source] io::Error),
    /// The page sink or source failed.
    #[error("the RAM image: {0}")]
    Pages(#[source] io::Error),
    /// The input is not what QEMU writes.
    #[error("at byte {offset}: {what}")]
    Format {
        /// Input offset.
        offset: u64,
        /// What was found, in words.
        what: String,
    },
    /// The input ended inside an item.
    #[error("the stream ends at byte {offset}, inside {what}")]
    Truncated {
        /// Input offset of the item.
        offset: u64,
        /// What was being read.
        what: String,
    },
}

/// Moves the pages of the RAM blocks named in `blocks` out of the stream
/// read from `input`, each into its own sink, and everything else to `out`
/// as a valid stream. A block the stream does not announce is left alone
/// (the report says so). `progress` is called with the bytes read so far
/// after every read.
///
/// # Errors
/// [`SplitError`] saying what failed and where; a stream that simply ends
/// early (a cancelled migration) is not an error: the report says so.
pub fn split<R: Read, W: Write>(
    input: R,
    blocks: Vec<(&str, &mut dyn PageSink)>,
    out: W,
    progress: &mut dyn FnMut(u64),
) -> Result<SplitReport, SplitError> {
    let (names, sinks): (Vec<&str>, Vec<_>) = blocks.into_iter().unzip();
    let mut rw = Rewriter::new(input, &names, out, Mode::Split(sinks), progress);
    rw.run()?;
    Ok(rw.finish())
}

/// Writes the stream read from `input` (a split's output) to `out` with the
/// pages of every block in `blocks` put back from its source, right after
/// the block list: a plain stream QEMU loads into an ordinary VM.
///
/// # Errors
/// As [`split`]; also when the input never announces one of the blocks.
pub fn join<R: Read, W: Write>(
    input: R,
    blocks: Vec<(&str, &mut dyn PageSource)>,
    out: W,
) -> Result<SplitReport, SplitError> {
    let mut noop = |_| {};
    let (names, sources): (Vec<&str>, Vec<_>) = blocks.into_iter().unzip();
    let mut rw = Rewriter::new(input, &names, out, Mode::Join(sources, false), &mut noop);
    rw.run()?;
    if let Some(b) = rw.report.blocks.iter().find(|b| !b.announced) {
        return Err(SplitError::Format {
            offset: rw.src.pos,
            what: format!("the stream never announces RAM block {:?}", b.name),
        });
    }
    Ok(rw.finish())
}

enum Mode<'m> {
    /// A sink per block asked for.
    Split(Vec<&'m mut dyn PageSink>),
    /// A source per block asked for, and whether their pages went in already.
    Join(Vec<&'m mut dyn PageSource>, bool),
}

/// A buffered, forward-only reader that knows its offset.
struct Src<'p, R> {
    r: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Input offset of `buf[start]`.
    pos: u64,
    read: u64,
    eof: bool,
    progress: &'p mut dyn FnMut(u64),
}

impl<R: Read> Src<'_, R> {
    fn fill(&mut self, n: usize) -> Result<usize, SplitError> {
        let n = n.min(BUF_SIZE);
        while self.end - self.start < n && !self.eof {
            if self.buf.len() - self.start < n {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.r.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(k) => {
                    self.end += k;
                    self.read += k as u64;
                    (self.progress)(self.read);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(SplitError::Read {
                        offset: self.pos,
                        source,
                    })
                }
            }
        }
        Ok(self.end - self.start)
    }

    /// Exactly `n` bytes, not consumed.
    fn peek(&mut self, n: usize, what: &str) -> Result<&[u8], SplitError> {
        if self.fill(n)? < n {
            return Err(SplitError::Truncated {
                offset: self.pos,
                what: what.to_owned(),
            });
        }
        Ok(&self.buf[self.start..self.start + n])
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.pos += n as u64;
    }

    fn at_end(&mut self) -> Result<bool, SplitError> {
        Ok(self.fill(1)? == 0)
    }
}

struct Rewriter<'m, 'p, R, W> {
    src: Src<'p, R>,
    out: W,
    mode: Mode<'m>,
    page_size: u64,
    ignore_shared: bool,
    /// Blocks from the block list: name, size, and which block asked for
    /// it is (an index into the report's blocks and the mode's sinks).
    blocks: Vec<(String, u64, Option<usize>)>,
    ram_section: Option<u32>,
    ram_ended: bool,
    footers: Option<bool>,
    /// The block the input named last, and the one the output did.
    src_last: Option<usize>,
    out_last: Option<usize>,
    /// Each moved block's last moved-out page, for a resync.
    last_moved: Vec<Option<u64>>,
    /// Records of each moved block stay in the stream from now on.
    keep: Vec<bool>,
    report: SplitReport,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl<'m, 'p, R: Read, W: Write> Rewriter<'m, 'p, R, W> {
    fn new(r: R, want: &[&str], out: W, mode: Mode<'m>, progress: &'p mut dyn FnMut(u64)) -> Self {
        Rewriter {
            src: Src {
                r,
                buf: vec![0u8; BUF_SIZE],
                start: 0,
                end: 0,
                pos: 0,
                read: 0,
                eof: false,
                progress,
            },
            out,
            mode,
            page_size: DEFAULT_TARGET_PAGE_SIZE,
            ignore_shared: false,
            blocks: Vec::new(),
            ram_section: None,
            ram_ended: false,
            footers: None,
            src_last: None,
            out_last: None,
            last_moved: vec![None; want.len()],
            keep: vec![false; want.len()],
            report: SplitReport {
                blocks: want
                    .iter()
                    .map(|n| MovedBlock {
                        name: (*n).to_owned(),
                        ..MovedBlock::default()
                    })
                    .collect(),
                ..SplitReport::default()
            },
        }
    }

    fn finish(mut self) -> SplitReport {
        self.report.bytes_in = self.src.pos;
        self.report.page_size = self.page_size;
        self.report
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<(), SplitError> {
        self.out.write_all(bytes).map_err(SplitError::Write)?;
        self.report.bytes_out += bytes.len() as u64;
        Ok(())
    }

    /// Copies `n` input bytes to the output.
    fn pass(&mut self, n: usize, what: &str) -> Result<(), SplitError> {
        let Rewriter {
            src, out, report, ..
        } = self;
        let b = src.peek(n, what)?;
        out.write_all(b).map_err(SplitError::Write)?;
        report.bytes_out += n as u64;
        src.consume(n);
        Ok(())
    }

    fn format(&self, what: impl Into<String>) -> SplitError {
        SplitError::Format {
            offset: self.src.pos,
            what: what.into(),
        }
    }

    fn run(&mut self) -> Result<(), SplitError> {
        let head = self.src.peek(8, "the stream header")?;
        if be32(head) != QEMU_VM_FILE_MAGIC || be32(&head[4..]) != QEMU_VM_FILE_VERSION {
            return Err(self.format("not a QEMU migration stream (version 3)"));
        }
        self.pass(8, "the stream header")?;
        loop {
            if self.src.at_end()? {
                break;
            }
            let kind = self.src.peek(1, "a section type")?[0];
            match kind {
                QEMU_VM_CONFIGURATION => {
                    if let Err(why) = self.configuration()? {
                        return self.pass_through(why);
                    }
                }
                QEMU_VM_SECTION_START => {
                    let b = self.src.peek(6, "a section header")?;
                    let (id, n) = (be32(&b[1..]), usize::from(b[5]));
                    let b = self.src.peek(6 + n + 8, "a section header")?;
                    let name = b[6..6 + n].to_vec();
                    let (instance, version) = (be32(&b[6 + n..]), be32(&b[10 + n..]));
                    if name != b"ram" || instance != 0 || self.ram_section.is_some() {
                        let why = format!(
                            "an iterative section {:?} this writer does not parse",
                            String::from_utf8_lossy(&name)
                        );
                        return self.pass_through(why);
                    }
                    if version != 4 {
                        return Err(self.format(format!("RAM section version {version} (4 known)")));
                    }
                    self.pass(6 + n + 8, "a section header")?;
                    self.ram_section = Some(id);
                    self.ram_records()?;
                    self.footer(id)?;
                }
                QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => {
                    let id = be32(&self.src.peek(5, "a section header")?[1..]);
                    if Some(id) != self.ram_section {
                        return self.pass_through(format!("section {id}, not RAM"));
                    }
                    self.pass(5, "a section header")?;
                    self.ram_records()?;
                    self.footer(id)?;
                    if kind == QEMU_VM_SECTION_END {
                        self.ram_ended = true;
                    }
                }
                QEMU_VM_COMMAND => {
                    let b = self.src.peek(5, "a command")?;
                    let (cmd, len) = (u16::from_be_bytes([b[1], b[2]]), b[3..5].to_vec());
                    if cmd == 7 {
                        return self.pass_through("a postcopy package".into());
                    }
                    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
                    self.pass(5 + len, "a command")?;
                }
                QEMU_VM_EOF => {
                    self.report.saw_eof = true;
                    return self.pass_through("the end of the device state".into());
                }
                QEMU_VM_SECTION_FULL => {
                    return self.pass_through("device state".into());
                }
                other => return Err(self.format(format!("section type 0x{other:02x}"))),
            }
        }
        Ok(())
    }

    /// Copies the rest of the input as it is.
    fn pass_through(&mut self, why: String) -> Result<(), SplitError> {
        if !self.ram_ended && self.src_last != self.out_last {
            self.resync()?;
        }
        self.report.passed_through = Some((self.src.pos, why));
        loop {
            let n = self.src.fill(BUF_SIZE)?;
            if n == 0 {
                return Ok(());
            }
            self.pass(n, "the rest of the stream")?;
        }
    }

    /// Makes the output name the block the input named last, so a later
    /// CONTINUE record copied through means the same block to QEMU: a RAM
    /// section of one page, the block's last moved-out page as it is now
    /// (what the image holds for it, so loading it changes nothing).
    fn resync(&mut self) -> Result<(), SplitError> {
        let (Some(id), Some(last)) = (self.ram_section, self.src_last) else {
            return Ok(());
        };
        let Some(w) = self.blocks[last].2 else {
            return Ok(());
        };
        let Some(offset) = self.last_moved[w] else {
            return Ok(());
        };
        let mut page = vec![0u8; self.page_size as usize];
        if let Mode::Split(sinks) = &mut self.mode {
            sinks[w]
                .current(offset, &mut page)
                .map_err(SplitError::Pages)?;
        }
        let mut rec = vec![QEMU_VM_SECTION_PART];
        rec.extend_from_slice(&id.to_be_bytes());
        rec.extend_from_slice(&(offset | RAM_SAVE_FLAG_PAGE).to_be_bytes());
        let name = self.blocks[last].0.as_bytes();
        rec.push(name.len() as u8);
        rec.extend_from_slice(name);
        rec.extend_from_slice(&page);
        rec.extend_from_slice(&RAM_SAVE_FLAG_EOS.to_be_bytes());
        if self.footers == Some(true) {
            rec.push(QEMU_VM_SECTION_FOOTER);
            rec.extend_from_slice(&id.to_be_bytes());
        }
        self.emit(&rec)?;
        self.out_last = Some(last);
        self.report.resyncs += 1;
        Ok(())
    }

    /// The configuration section; `Ok(Err(why))` when it holds something
    /// this writer cannot step over or that changes the RAM layout.
    fn configuration(&mut self) -> Result<Result<(), String>, SplitError> {
        let b = self.src.peek(5, "the configuration")?;
        let len = be32(&b[1..]) as usize;
        if len == 0 || len > MAX_NAME {
            return Err(self.format(format!("a machine type name of {len} bytes")));
        }
        self.src.peek(5 + len, "the machine type")?;
        let mut at = 5 + len;
        loop {
            let more = self.src.peek(at + 1, "the configuration");
            if !matches!(more, Ok(b) if b[at] == QEMU_VM_SUBSECTION) {
                break;
            }
            let n = usize::from(self.src.peek(at + 2, "a subsection")?[at + 1]);
            let b = self.src.peek(at + 2 + n + 4, "a subsection")?;
            let name = b[at + 2..at + 2 + n].to_vec();
            at += 2 + n + 4;
            match name.as_slice() {
                b"configuration/capabilities" => {
                    let count = be32(&self.src.peek(at + 4, "the capabilities")?[at..]);
                    if count > MAX_CAPS {
                        return Err(self.format(format!("{count} capabilities")));
                    }
                    at += 4;
                    for _ in 0..count {
                        let n = usize::from(self.src.peek(at + 1, "a capability")?[at]);
                        let b = self.src.peek(at + 1 + n, "a capability")?;
                        let cap = b[at + 1..at + 1 + n].to_vec();
                        at += 1 + n;
                        match cap.as_slice() {
                            b"x-ignore-shared" => self.ignore_shared = true,
                            b"mapped-ram" => {
                                return Ok(Err("a mapped-ram stream".into()));
                            }
                            _ => {}
                        }
                    }
                }
                b"configuration/target-page-bits" => {
                    let bits = be32(&self.src.peek(at + 4, "the page bits")?[at..]);
                    if !(9..=30).contains(&bits) {
                        return Err(self.format(format!("target page bits {bits}")));
                    }
                    self.page_size = 1 << bits;
                    at += 4;
                }
                b"configuration/uuid" => at += 16,
                other => {
                    return Ok(Err(format!(
                        "configuration subsection {:?}",
                        String::from_utf8_lossy(other)
                    )))
                }
            }
        }
        self.pass(at, "the configuration")?;
        Ok(Ok(()))
    }

    fn footer(&mut self, id: u32) -> Result<(), SplitError> {
        if self.footers.is_none() {
            let next = self.src.fill(1)?;
            self.footers = Some(next > 0 && self.src.buf[self.src.start] == QEMU_VM_SECTION_FOOTER);
        }
        if self.footers == Some(true) {
            let b = self.src.peek(5, "a section footer")?;
            if b[0] != QEMU_VM_SECTION_FOOTER || be32(&b[1..]) != id {
                return Err(self.format(format!("the footer of section {id}")));
            }
            self.pass(5, "a section footer")?;
        }
        Ok(())
    }

    fn ram_records(&mut self) -> Result<(), SplitError> {
        let mask = self.page_size - 1;
        loop {
            let word = be64(self.src.peek(8, "a RAM record")?);
            let flags = word & mask;
            let addr = word & !mask;
            if flags & RAM_SAVE_FLAG_MEM_SIZE != 0 {
                if flags != RAM_SAVE_FLAG_MEM_SIZE {
                    return Err(self.format(format!("RAM flags 0x{flags:x}")));
                }
                self.pass(8, "a RAM record")?;
                self.block_list(addr)?;
                if let Mode::Join(_, false) = self.mode {
                    self.inject()?;
                }
                continue;
            }
            if flags & RAM_SAVE_FLAG_MULTIFD_FLUSH != 0
                && flags & !(RAM_SAVE_FLAG_MULTIFD_FLUSH | RAM_SAVE_FLAG_EOS) == 0
            {
                self.pass(8, "a RAM record")?;
                if flags & RAM_SAVE_FLAG_EOS != 0 {
                    return Ok(());
                }
                continue;
            }
            let cont = flags & RAM_SAVE_FLAG_CONTINUE != 0;
            let kind = flags & !RAM_SAVE_FLAG_CONTINUE;
            if kind == RAM_SAVE_FLAG_EOS && !cont {
                self.pass(8, "a RAM record")?;
                return Ok(());
            }
            if ![
                RAM_SAVE_FLAG_ZERO,
                RAM_SAVE_FLAG_PAGE,
                RAM_SAVE_FLAG_XBZRLE,
                RAM_SAVE_FLAG_COMPRESS_PAGE,
            ]
            .contains(&kind)
            {
                return Err(self.format(format!("a RAM record with flags 0x{flags:x}")));
            }
            // The record's header: the word, and the name unless CONTINUE.
            let (block, head_len) = if cont {
                let b = self
                    .src_last
                    .ok_or_else(|| self.format("a CONTINUE record before any named one"))?;
                (b, 8)
            } else {
                let n = usize::from(self.src.peek(9, "a RAM block name")?[8]);
                let name = self.src.peek(9 + n, "a RAM block name")?[9..].to_vec();
                let i = self
                    .blocks
                    .iter()
                    .position(|(b, _, _)| b.as_bytes() == name)
                    .ok_or_else(|| {
                        let name = String::from_utf8_lossy(&name).into_owned();
                        self.format(format!("RAM block {name:?}, not in the block list"))
                    })?;
                (i, 9 + n)
            };
            if addr >= self.blocks[block].1 {
                return Err(self.format(format!(
                    "offset 0x{addr:x} outside RAM block {}",
                    self.blocks[block].0
                )));
            }
            self.src_last = Some(block);
            let moved = self.blocks[block].2;
            let ps = self.page_size as usize;
            if let Some(w) = moved.filter(|&w| !self.keep[w]) {
                if let Mode::Split(sinks) = &mut self.mode {
                    let sink = &mut sinks[w];
                    let report = &mut self.report.blocks[w];
                    match kind {
                        RAM_SAVE_FLAG_ZERO => {
                            let fill = self.src.peek(head_len + 1, "a zero page")?[head_len];
                            self.src.consume(head_len + 1);
                            if fill == 0 {
                                sink.zero(addr).map_err(SplitError::Pages)?;
                            } else {
                                sink.page(addr, &vec![fill; ps])
                                    .map_err(SplitError::Pages)?;
                            }
                            report.zero_pages += 1;
                            self.last_moved[w] = Some(addr);
                            continue;
                        }
                        RAM_SAVE_FLAG_PAGE => {
                            let b = self.src.peek(head_len + ps, "a page of RAM")?;
                            sink.page(addr, &b[head_len..]).map_err(SplitError::Pages)?;
                            self.src.consume(head_len + ps);
                            report.pages += 1;
                            self.last_moved[w] = Some(addr);
                            continue;
                        }
                        // A delta or compressed page: from here on the
                        // block's records stay in the stream.
                        _ => self.keep[w] = true,
                    }
                }
            }
            if let Some(w) = moved {
                self.report.blocks[w].pages_kept += 1;
            }
            // The header, named where the output last named another block.
            if self.out_last == Some(block) || !cont {
                self.pass(head_len, "a RAM record")?;
            } else {
                let name = self.blocks[block].0.clone();
                let mut h = (word & !RAM_SAVE_FLAG_CONTINUE).to_be_bytes().to_vec();
                h.push(name.len() as u8);
                h.extend_from_slice(name.as_bytes());
                self.emit(&h)?;
                self.src.consume(head_len);
            }
            self.out_last = Some(block);
            let body = match kind {
                RAM_SAVE_FLAG_ZERO => 1,
                RAM_SAVE_FLAG_PAGE => ps,
                RAM_SAVE_FLAG_XBZRLE => {
                    let b = self.src.peek(3, "an XBZRLE page")?;
                    3 + usize::from(u16::from_be_bytes([b[1], b[2]]))
                }
                _ => {
                    let len = be32(self.src.peek(4, "a compressed page")?) as usize;
                    if len > 2 * ps + 64 {
                        return Err(self.format(format!("a compressed page of {len} bytes")));
                    }
                    4 + len
                }
            };
            self.pass(body, "a RAM record's data")?;
        }
    }

    /// The block list after `RAM_SAVE_FLAG_MEM_SIZE`, copied as it is.
    fn block_list(&mut self, total: u64) -> Result<(), SplitError> {
        let mut left = total;
        while left > 0 {
            let n = usize::from(self.src.peek(1, "a RAM block name")?[0]);
            if n == 0 {
                return Err(self.format("an empty RAM block name"));
            }
            let b = self.src.peek(1 + n + 8, "a RAM block entry")?;
            let name = String::from_utf8_lossy(&b[1..1 + n]).into_owned();
            let size = be64(&b[1 + n..]);
            if size == 0 || size > left {
                return Err(self.format(format!("RAM block {name} of {size} bytes")));
            }
            left -= size;
            self.pass(1 + n + 8, "a RAM block entry")?;
            // A block's page size comes only with postcopy and hugepages:
            // told apart from the next name (whose length byte is never 0)
            // as the reader does (parse.rs, maybe_page_size).
            if !self.ignore_shared {
                if let Ok(b) = self.src.peek(8, "") {
                    let v = be64(b);
                    if b[0] == 0
                        && v.is_power_of_two()
                        && v > self.page_size
                        && v <= 1 << 34
                        && (left > 0 || v > 0xffff)
                    {
                        self.pass(8, "a RAM block page size")?;
                    }
                }
            } else {
                self.pass(8, "a RAM block address")?;
            }
            let wanted = self
                .report
                .blocks
                .iter()
                .position(|b| b.name == name && !b.announced);
            if let Some(w) = wanted {
                let b = &mut self.report.blocks[w];
                b.announced = true;
                b.bytes = size;
                if let Mode::Split(sinks) = &mut self.mode {
                    sinks[w]
                        .block(&name, size, self.page_size)
                        .map_err(SplitError::Pages)?;
                }
            }
            self.blocks.push((name, size, wanted));
        }
        Ok(())
    }

    /// Join: every page of every block asked for, right after the block list.
    fn inject(&mut self) -> Result<(), SplitError> {
        let Mode::Join(sources, done) = &mut self.mode else {
            return Ok(());
        };
        *done = true;
        let ps = self.page_size;
        for (i, (name, size, wanted)) in self.blocks.iter().enumerate() {
            let Some(w) = *wanted else {
                continue;
            };
            let out = &mut self.out;
            let report = &mut self.report;
            let mut named = false;
            let mut expected = 0u64;
            let mut rec = Vec::with_capacity(ps as usize + 300);
            let (mut pages, mut zero_pages) = (0u64, 0u64);
            sources[w]
                .pages(ps, &mut |offset, data| {
                    if offset != expected || offset >= *size {
                        return Err(io::Error::other(format!(
                            "page at 0x{offset:x} where 0x{expected:x} was due"
                        )));
                    }
                    expected += ps;
                    rec.clear();
                    let kind = if data.is_some() {
                        RAM_SAVE_FLAG_PAGE
                    } else {
                        RAM_SAVE_FLAG_ZERO
                    };
                    let cont = if named { RAM_SAVE_FLAG_CONTINUE } else { 0 };
                    rec.extend_from_slice(&(offset | kind | cont).to_be_bytes());
                    if !named {
                        rec.push(name.len() as u8);
                        rec.extend_from_slice(name.as_bytes());
                        named = true;
                    }
                    match data {
                        Some(d) => {
                            rec.extend_from_slice(d);
                            pages += 1;
                        }
                        None => {
                            rec.push(0);
                            zero_pages += 1;
                        }
                    }
                    report.bytes_out += rec.len() as u64;
                    out.write_all(&rec)
                })
                .map_err(SplitError::Pages)?;
            if expected != *size {
                return Err(SplitError::Pages(io::Error::other(format!(
                    "the image of {name} gave {expected} of the block's {size} bytes"
                ))));
            }
            report.blocks[w].pages += pages;
            report.blocks[w].zero_pages += zero_pages;
            if named {
                self.out_last = Some(i);
            }
        }
        Ok(())
    }
}
