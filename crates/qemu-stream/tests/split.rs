//! Splitting real QEMU streams into `pc.ram`'s pages and the rest, and
//! joining them back: the rest is a complete stream without those pages,
//! the join is a complete stream with all of them, and splitting the join
//! gives back exactly the same two parts. Streams the layout cannot serve
//! (mapped-ram, a machine without `pc.ram`) pass through whole.

mod common;

use std::io;

use common::{fixture, ALL};
use qemu_stream::split::{join, split, PageFn, PageSink, PageSource, SplitReport};

/// A RAM image in memory.
#[derive(Default)]
struct Image {
    bytes: Vec<u8>,
    page_size: usize,
}

impl PageSink for Image {
    fn block(&mut self, _: &str, bytes: u64, page_size: u64) -> io::Result<()> {
        self.bytes = vec![0; bytes as usize];
        self.page_size = page_size as usize;
        Ok(())
    }
    fn page(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let o = offset as usize;
        self.bytes[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn zero(&mut self, offset: u64) -> io::Result<()> {
        let o = offset as usize;
        self.bytes[o..o + self.page_size].fill(0);
        Ok(())
    }
    fn current(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.bytes[o..o + buf.len()]);
        Ok(())
    }
}

impl PageSource for Image {
    fn pages(&mut self, page_size: u64, f: &mut PageFn<'_>) -> io::Result<()> {
        for (i, p) in self.bytes.chunks(page_size as usize).enumerate() {
            let zero = p.iter().all(|&b| b == 0);
            f(i as u64 * page_size, (!zero).then_some(p))?;
        }
        Ok(())
    }
}

fn split_all(stream: &[u8]) -> (Vec<u8>, Image, SplitReport) {
    let mut out = Vec::new();
    let mut image = Image::default();
    let r = split(stream, vec![("pc.ram", &mut image)], &mut out, &mut |_| {}).expect("splits");
    (out, image, r)
}

#[test]
fn a_split_and_its_join_are_complete_streams_and_split_again_the_same() {
    for name in ALL {
        let original = fixture(name);
        let (rest, mut image, report) = split_all(&original);
        let whole = qemu_stream::inspect(&original[..]).unwrap();
        match name {
            "pc-10.0-mapped-ram" | "microvm-7.2-exec" => {
                // Nothing the layout can serve: the stream passes whole.
                assert_eq!(rest, original, "{name}");
                let b = &report.blocks[0];
                assert_eq!(b.pages + b.zero_pages, 0, "{name}");
                continue;
            }
            _ => {}
        }
        assert!(report.blocks[0].announced, "{name}");
        assert_eq!(report.blocks[0].pages_kept, 0, "{name}");
        assert_eq!(report.resyncs, 0, "{name}");
        let s = qemu_stream::inspect(&rest[..]).unwrap();
        assert!(
            s.complete,
            "{name}: the rest is a complete stream: {:?}",
            s.stopped
        );
        let ram = s.ram_blocks.iter().find(|b| b.name == "pc.ram").unwrap();
        assert_eq!(ram.normal_pages + ram.zero_pages, 0, "{name}");
        assert_eq!(s.devices.len(), whole.devices.len(), "{name}");
        let other = |s: &qemu_stream::Summary| -> Vec<(String, u64, u64)> {
            s.ram_blocks
                .iter()
                .filter(|b| b.name != "pc.ram")
                .map(|b| (b.name.clone(), b.normal_pages, b.zero_pages))
                .collect()
        };
        assert_eq!(
            other(&s),
            other(&whole),
            "{name}: other blocks keep their pages"
        );

        let mut joined = Vec::new();
        let j = join(&rest[..], vec![("pc.ram", &mut image)], &mut joined).expect("joins");
        let size = report.blocks[0].bytes / report.page_size;
        assert_eq!(
            j.blocks[0].pages + j.blocks[0].zero_pages,
            size,
            "{name}: every page is put back"
        );
        let s = qemu_stream::inspect(&joined[..]).unwrap();
        assert!(s.complete, "{name}: the join is complete: {:?}", s.stopped);
        let ram = s.ram_blocks.iter().find(|b| b.name == "pc.ram").unwrap();
        assert_eq!(ram.normal_pages + ram.zero_pages, size, "{name}");

        let (rest2, image2, _) = split_all(&joined);
        assert_eq!(rest2, rest, "{name}: the same rest");
        assert!(image2.bytes == image.bytes, "{name}: the same RAM");
    }
}

/// Several blocks at once (a VM whose RAM is NUMA nodes or DIMMs): each
/// goes to its own sink, the others keep their pages, the join puts every
/// one back, and a block the stream does not have is reported, not an error.
#[test]
fn several_blocks_split_into_their_own_sinks_and_join_back() {
    for name in ["pc-7.2-exec", "q35-10.0-rng-file"] {
        let original = fixture(name);
        let whole = qemu_stream::inspect(&original[..]).unwrap();
        let wanted = ["pc.ram", "pc.bios", "/objects/absent"];
        let mut images: Vec<Image> = (0..wanted.len()).map(|_| Image::default()).collect();
        let mut rest = Vec::new();
        let report = split(
            &original[..],
            wanted
                .iter()
                .copied()
                .zip(images.iter_mut().map(|i| i as &mut dyn PageSink))
                .collect(),
            &mut rest,
            &mut |_| {},
        )
        .expect("splits");
        assert!(report.blocks[0].announced && report.blocks[1].announced);
        assert!(!report.blocks[2].announced, "{name}: no such block");
        let s = qemu_stream::inspect(&rest[..]).unwrap();
        assert!(s.complete, "{name}: {:?}", s.stopped);
        for b in &s.ram_blocks {
            let before = whole.ram_blocks.iter().find(|w| w.name == b.name).unwrap();
            if wanted.contains(&b.name.as_str()) {
                assert_eq!(b.normal_pages + b.zero_pages, 0, "{name}: {}", b.name);
            } else {
                assert_eq!(
                    (b.normal_pages, b.zero_pages),
                    (before.normal_pages, before.zero_pages),
                    "{name}: {} keeps its pages",
                    b.name
                );
            }
        }
        let bios = whole
            .ram_blocks
            .iter()
            .find(|b| b.name == "pc.bios")
            .unwrap();
        assert!(
            images[1].bytes.iter().any(|&b| b != 0),
            "{name}: the BIOS image holds the BIOS"
        );
        assert_eq!(images[1].bytes.len() as u64, bios.size, "{name}");

        // The join needs every block it is given: two of them here.
        let mut joined = Vec::new();
        let (a, b) = images.split_at_mut(1);
        let j = join(
            &rest[..],
            vec![
                ("pc.ram", &mut a[0] as &mut dyn PageSource),
                ("pc.bios", &mut b[0]),
            ],
            &mut joined,
        )
        .expect("joins");
        let s = qemu_stream::inspect(&joined[..]).unwrap();
        assert!(s.complete, "{name}: the join is complete: {:?}", s.stopped);
        for (i, block) in ["pc.ram", "pc.bios"].iter().enumerate() {
            let got = s.ram_blocks.iter().find(|b| b.name == *block).unwrap();
            let pages = report.blocks[i].bytes / report.page_size;
            assert_eq!(got.normal_pages + got.zero_pages, pages, "{name}: {block}");
            assert_eq!(
                j.blocks[i].pages + j.blocks[i].zero_pages,
                pages,
                "{name}: {block}"
            );
        }
        let missing = join(
            &rest[..],
            vec![(
                "/objects/absent",
                &mut Image::default() as &mut dyn PageSource,
            )],
            &mut Vec::new(),
        );
        assert!(
            missing.is_err(),
            "{name}: a join of a block the stream lacks"
        );
    }
}

#[test]
fn a_cut_stream_never_panics_and_says_where() {
    let original = fixture("pc-7.2-exec");
    for cut in (0..original.len()).step_by(original.len() / 97 + 1) {
        let mut out = Vec::new();
        let mut image = Image::default();
        match split(
            &original[..cut],
            vec![("pc.ram", &mut image)],
            &mut out,
            &mut |_| {},
        ) {
            Ok(r) => assert!(r.bytes_in <= cut as u64),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}

#[test]
fn a_damaged_stream_never_panics() {
    for name in ["pc-7.2-exec", "q35-10.0-rng-file"] {
        let original = fixture(name);
        let step = original.len() / 151 + 1;
        for at in (0..original.len()).step_by(step) {
            for flip in [0x01u8, 0xff] {
                let mut bytes = original.clone();
                bytes[at] ^= flip;
                let mut out = Vec::new();
                let mut image = Image::default();
                let _ = split(
                    &bytes[..],
                    vec![("pc.ram", &mut image)],
                    &mut out,
                    &mut |_| {},
                );
                let _ = join(&out[..], vec![("pc.ram", &mut image)], &mut Vec::new());
            }
        }
    }
}
