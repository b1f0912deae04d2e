//! The RAM section: the block list, page records and mapped-ram regions
//! (migration/ram.c: ram_save_setup, ram_save_page, ram_load_precopy).

use super::{ascii_name, main_ram, quoted, Input, MappedRamBlock, RamBlock, StreamError, Walker};
use crate::format::*;

impl Walker<'_> {
    pub(super) fn block_name(&mut self, inp: &mut Input<'_>) -> Result<usize, StreamError> {
        let at = inp.pos();
        let n = inp.u8(|| "a RAM block name length".to_owned())?;
        let mut buf = [0u8; 255];
        let name = inp.bytes_into(n, &mut buf, || "a RAM block name".to_owned())?;
        match self
            .s
            .ram_blocks
            .iter()
            .position(|b| b.name.as_bytes() == name)
        {
            Some(i) => Ok(i),
            None => Err(Self::corrupt(
                at,
                "the name of a RAM block from the block list",
                quoted(name),
            )),
        }
    }

    /// RAM records until `EOS`: the block list, page records, flush markers.
    pub(super) fn ram_records(&mut self, inp: &mut Input<'_>) -> Result<(), StreamError> {
        let mask = self.s.page_size.saturating_sub(1);
        loop {
            let at = inp.pos();
            let word = inp.be64(|| "a RAM record header (address and flags)".to_owned())?;
            let flags = word & mask;
            let addr = word & !mask;
            if flags & RAM_SAVE_FLAG_MEM_SIZE != 0 {
                if flags & !RAM_SAVE_FLAG_MEM_SIZE != 0 {
                    return Err(Self::corrupt(
                        at,
                        "RAM flags",
                        format!("0x{flags:x} (MEM_SIZE combined with others)"),
                    ));
                }
                self.block_list(inp, addr)?;
                continue;
            }
            if flags & RAM_SAVE_FLAG_MULTIFD_FLUSH != 0
                && flags & !RAM_SAVE_FLAG_MULTIFD_FLUSH & !RAM_SAVE_FLAG_EOS == 0
            {
                self.s.pages.multifd_flushes += 1;
                if flags & RAM_SAVE_FLAG_EOS != 0 {
                    return Ok(());
                }
                continue;
            }
            let cont = flags & RAM_SAVE_FLAG_CONTINUE != 0;
            let kind = flags & !RAM_SAVE_FLAG_CONTINUE;
            if kind == RAM_SAVE_FLAG_EOS && !cont {
                return Ok(());
            }
            let known = [
                RAM_SAVE_FLAG_ZERO,
                RAM_SAVE_FLAG_PAGE,
                RAM_SAVE_FLAG_XBZRLE,
                RAM_SAVE_FLAG_COMPRESS_PAGE,
            ];
            if !known.contains(&kind) {
                if kind == RAM_SAVE_FLAG_HOOK {
                    return Err(StreamError::Unsupported {
                        offset: at,
                        what: "an RDMA hook record (RAM_SAVE_FLAG_HOOK)".to_owned(),
                    });
                }
                return Err(Self::corrupt(
                    at,
                    "a RAM record (page, zero page or end of section)",
                    format!("flags 0x{flags:x}"),
                ));
            }
            let block = if cont {
                match self.current_block {
                    Some(b) => b,
                    None => {
                        return Err(Self::corrupt(
                            at,
                            "a block name before the first CONTINUE record",
                            format!("flags 0x{flags:x}"),
                        ))
                    }
                }
            } else {
                self.block_name(inp)?
            };
            self.current_block = Some(block);
            let Some(b) = self.s.ram_blocks.get_mut(block) else {
                return Err(Self::corrupt(at, "a known RAM block", "none"));
            };
            if addr >= b.size {
                return Err(Self::corrupt(
                    at,
                    format!("an address inside {} (size 0x{:x})", b.name, b.size),
                    format!("0x{addr:x}"),
                ));
            }
            match kind {
                RAM_SAVE_FLAG_ZERO => {
                    b.zero_pages += 1;
                    self.s.pages.zero += 1;
                    inp.u8(|| "the fill byte of a zero page".to_owned())?;
                }
                RAM_SAVE_FLAG_PAGE => {
                    b.normal_pages += 1;
                    self.s.pages.normal += 1;
                    let ps = self.s.page_size;
                    inp.skip(ps, || format!("a {ps}-byte page of RAM at 0x{addr:x}"))?;
                }
                RAM_SAVE_FLAG_XBZRLE => {
                    let enc = inp.u8(|| "the XBZRLE encoding byte".to_owned())?;
                    if enc != ENCODING_FLAG_XBZRLE {
                        return Err(Self::corrupt(
                            at,
                            "XBZRLE encoding flag 0x01",
                            format!("0x{enc:02x}"),
                        ));
                    }
                    let len = inp.be16(|| "the XBZRLE data length".to_owned())?;
                    inp.skip(u64::from(len), || "XBZRLE page data".to_owned())?;
                    *self.s.pages.other.entry("xbzrle".to_owned()).or_insert(0) += 1;
                }
                _ => {
                    let len = inp.be32(|| "the compressed page length".to_owned())?;
                    let limit = self.s.page_size.saturating_mul(2).saturating_add(64);
                    if u64::from(len) > limit {
                        return Err(Self::corrupt(
                            at,
                            format!("a compressed page of at most {limit} bytes"),
                            format!("{len} bytes"),
                        ));
                    }
                    inp.skip(u64::from(len), || "compressed page data".to_owned())?;
                    *self
                        .s
                        .pages
                        .other
                        .entry("compressed".to_owned())
                        .or_insert(0) += 1;
                }
            }
        }
    }

    /// The block list that follows `RAM_SAVE_FLAG_MEM_SIZE`: blocks until their
    /// used lengths add up to the announced total.
    fn block_list(&mut self, inp: &mut Input<'_>, total: u64) -> Result<(), StreamError> {
        self.s.ram_total = Some(total);
        let mut left = total;
        while left > 0 {
            let at = inp.pos();
            let n = inp.u8(|| "a RAM block name length".to_owned())?;
            if n == 0 {
                return Err(Self::corrupt(at, "a RAM block name", "an empty name"));
            }
            let mut buf = [0u8; 255];
            let raw = inp.bytes_into(n, &mut buf, || "a RAM block name".to_owned())?;
            let Some(name) = ascii_name(raw) else {
                return Err(Self::corrupt(at + 1, "a RAM block name", quoted(raw)));
            };
            let name = name.to_owned();
            let size = inp.be64(|| format!("the size of RAM block {name}"))?;
            if size > left {
                return Err(Self::corrupt(
                    at,
                    format!(
                        "a RAM block no larger than the {left} bytes left of the announced total"
                    ),
                    format!("{name} of {size} bytes"),
                ));
            }
            if size == 0 {
                return Err(Self::corrupt(
                    at,
                    "a RAM block of non-zero size",
                    format!("{name} of 0 bytes"),
                ));
            }
            left -= size;
            let page_size = self.maybe_page_size(inp, left)?;
            let addr = if self.ignore_shared {
                Some(inp.be64(|| format!("the address of RAM block {name}"))?)
            } else {
                None
            };
            let block = RamBlock {
                name,
                size,
                page_size,
                addr,
                mapped_ram: None,
                normal_pages: 0,
                zero_pages: 0,
            };
            // Listed before its mapped-ram pages are read, so a cut inside them
            // still reports the block.
            let copy = block.clone();
            self.s.ram_blocks.push(block);
            if self.s.mapped_ram {
                let m = self.mapped_ram_block(inp, &copy)?;
                if let Some(b) = self.s.ram_blocks.last_mut() {
                    b.mapped_ram = m;
                }
            }
        }
        self.s.main_ram = main_ram(&self.s.ram_blocks);
        Ok(())
    }

    /// QEMU sends a block's host page size only with postcopy and only when it
    /// differs from the target's, and the stream does not say whether postcopy was
    /// on. A name length byte is never 0, while a big-endian page size always
    /// starts with 0, so the next bytes tell: a power of two above the target page
    /// size where a name (or the next record) should be is a page size.
    fn maybe_page_size(
        &mut self,
        inp: &mut Input<'_>,
        left: u64,
    ) -> Result<Option<u64>, StreamError> {
        if self.ignore_shared || self.s.mapped_ram {
            return Ok(None);
        }
        let ahead = inp.peek(8)?;
        let Ok(b) = <[u8; 8]>::try_from(ahead) else {
            return Ok(None);
        };
        let v = u64::from_be_bytes(b);
        let page_like = v.is_power_of_two() && v > self.s.page_size && v <= (1 << 34);
        // After the last block an EOS or flush record follows; those have small values.
        if b[0] == 0 && page_like && (left > 0 || v > 0xffff) {
            inp.skip(8, String::new)?;
            return Ok(Some(v));
        }
        Ok(None)
    }

    fn mapped_ram_block(
        &mut self,
        inp: &mut Input<'_>,
        b: &RamBlock,
    ) -> Result<Option<MappedRamBlock>, StreamError> {
        let at = inp.pos();
        let what = || format!("the mapped-ram header of {}", b.name);
        let version = inp.be32(what)?;
        if version != MAPPED_RAM_HDR_VERSION {
            return Err(Self::corrupt(
                at,
                "mapped-ram header version 1",
                version.to_string(),
            ));
        }
        let page_size = inp.be64(what)?;
        let bitmap_offset = inp.be64(what)?;
        let pages_offset = inp.be64(what)?;
        if self.ignore_shared && bitmap_offset == 0 && pages_offset == 0 {
            // A shared block: its memory is not in the file at all.
            return Ok(None);
        }
        if !page_size.is_power_of_two() || !(512..=(1 << 30)).contains(&page_size) {
            return Err(Self::corrupt(
                at + 4,
                "a mapped-ram page size",
                page_size.to_string(),
            ));
        }
        let pages = b.size.div_ceil(page_size);
        let bitmap_len = pages.div_ceil(8);
        let here = inp.pos();
        let bitmap_end = bitmap_offset.checked_add(bitmap_len);
        let ok = bitmap_offset >= here && bitmap_end.is_some_and(|e| e <= pages_offset);
        if !ok {
            return Err(Self::corrupt(
                at,
                format!("a bitmap at or after byte {here}, before the pages"),
                format!("bitmap at {bitmap_offset}, pages at {pages_offset}"),
            ));
        }
        let name = b.name.clone();
        inp.skip(bitmap_offset - here, || {
            format!("the gap before the bitmap of {name}")
        })?;
        let mut present = 0u64;
        let full_bytes = pages / 8;
        let mut seen = 0u64;
        let tail_bits = (pages % 8) as u32;
        inp.stream(
            bitmap_len,
            |chunk| {
                for &byte in chunk {
                    let bits = if seen < full_bytes {
                        byte
                    } else {
                        byte & ((1u16 << tail_bits) - 1) as u8
                    };
                    present += u64::from(bits.count_ones());
                    seen += 1;
                }
            },
            || format!("the mapped-ram bitmap of {name}"),
        )?;
        let end = pages_offset.checked_add(b.size).ok_or_else(|| {
            Self::corrupt(
                at,
                "a pages region inside 64-bit offsets",
                pages_offset.to_string(),
            )
        })?;
        let here = inp.pos();
        inp.skip(end.saturating_sub(here), || {
            format!("the pages of {name} (mapped-ram)")
        })?;
        self.s.pages.normal += present;
        self.s.pages.absent += pages.saturating_sub(present);
        Ok(Some(MappedRamBlock {
            page_size,
            bitmap_offset,
            pages_offset,
            pages_present: present,
        }))
    }
}
