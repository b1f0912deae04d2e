//! The reader agrees with what QEMU itself reported for each committed stream
//! (see fixtures/streams/README.md), through both entry points.

mod common;

use std::io::Cursor;

use common::{fixture, ALL};
use qemu_stream::{inspect, inspect_seekable, Summary};

const PC_BLOCKS: [(&str, u64); 6] = [
    ("pc.ram", 0x100_0000),
    ("/rom@etc/acpi/tables", 0x2_0000),
    ("pc.bios", 0x4_0000),
    ("pc.rom", 0x2_0000),
    ("/rom@etc/table-loader", 0x1000),
    ("/rom@etc/acpi/rsdp", 0x1000),
];

struct Expect {
    name: &'static str,
    machine: &'static str,
    normal: u64,
    zero: u64,
    mapped_ram: bool,
    virtio_rng: bool,
    switchover_start: bool,
}

const EXPECT: [Expect; 6] = [
    Expect {
        name: "pc-7.2-exec",
        machine: "pc-i440fx-7.2",
        normal: 49,
        zero: 4177,
        mapped_ram: false,
        virtio_rng: false,
        switchover_start: false,
    },
    Expect {
        name: "q35-7.2-rng-exec",
        machine: "pc-q35-7.2",
        normal: 51,
        zero: 4175,
        mapped_ram: false,
        virtio_rng: true,
        switchover_start: false,
    },
    Expect {
        name: "pc-10.0-exec",
        machine: "pc-i440fx-10.0",
        normal: 50,
        zero: 4176,
        mapped_ram: false,
        virtio_rng: false,
        switchover_start: true,
    },
    Expect {
        name: "pc-10.0-file",
        machine: "pc-i440fx-10.0",
        normal: 50,
        zero: 4176,
        mapped_ram: false,
        virtio_rng: false,
        switchover_start: true,
    },
    Expect {
        name: "q35-10.0-rng-file",
        machine: "pc-q35-10.0",
        normal: 51,
        zero: 4175,
        mapped_ram: false,
        virtio_rng: true,
        switchover_start: true,
    },
    Expect {
        name: "pc-10.0-mapped-ram",
        machine: "pc-i440fx-10.0",
        normal: 50,
        zero: 4176,
        mapped_ram: true,
        virtio_rng: false,
        switchover_start: true,
    },
];

fn check(e: &Expect, s: &Summary, bytes: &[u8]) {
    let ctx = e.name;
    assert!(s.complete, "{ctx}: {:?}", s.stopped);
    assert!(s.device_state_complete, "{ctx}");
    assert_eq!(s.stopped, None, "{ctx}");
    assert_eq!(s.stream_version, 3, "{ctx}");
    assert_eq!(s.total_bytes, bytes.len() as u64, "{ctx}");
    assert_eq!(s.machine_type.as_deref(), Some(e.machine), "{ctx}");
    let blocks: Vec<(&str, u64)> = s
        .ram_blocks
        .iter()
        .map(|b| (b.name.as_str(), b.size))
        .collect();
    assert_eq!(blocks, PC_BLOCKS, "{ctx}");
    assert_eq!(
        s.ram_total,
        Some(16904 * 1024),
        "{ctx}: QEMU's 'total ram: 16904 kbytes'"
    );
    let main = s.main_ram.as_ref().expect("main RAM block");
    assert_eq!(
        (main.block.as_str(), main.mib),
        ("pc.ram", 16),
        "{ctx}: -m 16"
    );
    assert_eq!(s.page_size, 4096, "{ctx}");
    assert_eq!(s.mapped_ram, e.mapped_ram, "{ctx}");
    assert_eq!(s.section_footers, Some(true), "{ctx}");
    // QEMU's 'normal' and 'duplicate' counters; with mapped-ram its duplicates are
    // the pages left out of the file.
    assert_eq!(s.pages.normal, e.normal, "{ctx}");
    if e.mapped_ram {
        assert_eq!((s.pages.zero, s.pages.absent), (0, e.zero), "{ctx}");
        assert_eq!(s.capabilities, ["mapped-ram"], "{ctx}");
        let m = s.ram_blocks[0]
            .mapped_ram
            .as_ref()
            .expect("mapped-ram header");
        assert_eq!(
            m.pages_offset % (1 << 20),
            0,
            "{ctx}: pages aligned to 1 MiB"
        );
    } else {
        assert_eq!((s.pages.zero, s.pages.absent), (e.zero, 0), "{ctx}");
        assert!(s.capabilities.is_empty(), "{ctx}");
    }
    assert!(s.pages.other.is_empty(), "{ctx}");
    assert_eq!(s.devices.len(), 30, "{ctx}");
    for must in ["timer", "cpu", "apic", "globalstate", "acpi_build"] {
        assert!(s.devices.iter().any(|d| d.name == must), "{ctx}: {must}");
    }
    let cpu = s.devices.iter().find(|d| d.name == "cpu").expect("cpu");
    assert_eq!((cpu.instance_id, cpu.version_id), (0, 12), "{ctx}");
    let dma: Vec<u32> = s
        .devices
        .iter()
        .filter(|d| d.name == "dma")
        .map(|d| d.instance_id)
        .collect();
    assert_eq!(dma, [0, 1], "{ctx}");
    let rng = s
        .devices
        .iter()
        .any(|d| d.name == "0000:00:01.0/virtio-rng");
    assert_eq!(rng, e.virtio_rng, "{ctx}");
    let q35 = s.devices.iter().any(|d| d.name == "0000:00:1f.0/ICH9LPC");
    assert_eq!(q35, e.machine.contains("q35"), "{ctx}");
    assert_eq!(s.iterative.len(), 1, "{ctx}");
    assert_eq!(s.iterative[0].name, "ram", "{ctx}");
    assert_eq!(
        s.commands.contains_key("switchover-start"),
        e.switchover_start,
        "{ctx}"
    );
}

#[test]
fn seekable_reader_agrees_with_qemu() {
    for e in &EXPECT {
        let bytes = fixture(e.name);
        let s = inspect_seekable(Cursor::new(&bytes)).expect(e.name);
        check(e, &s, &bytes);
        assert!(s.vm_description_offset.is_some(), "{}", e.name);
        assert_eq!(
            s.sections_found_by_scan, 0,
            "{}: the description sizes every section",
            e.name
        );
    }
}

#[test]
fn pipe_reader_agrees_with_qemu_without_the_description() {
    for e in &EXPECT {
        let bytes = fixture(e.name);
        let s = inspect(&bytes[..]).expect(e.name);
        check(e, &s, &bytes);
        assert_eq!(s.sections_found_by_scan, 30, "{}", e.name);
    }
}

#[test]
fn file_entry_point_reads_a_real_file() {
    let bytes = fixture("pc-10.0-mapped-ram");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.state");
    std::fs::write(&path, &bytes).unwrap();
    let s = qemu_stream::inspect_file(&path).unwrap();
    check(&EXPECT[5], &s, &bytes);
    let missing = qemu_stream::inspect_file(dir.path().join("nope")).unwrap_err();
    assert!(missing.to_string().contains("nope"), "{missing}");
}

#[test]
fn microvm_stream() {
    let bytes = fixture("microvm-7.2-exec");
    let s = inspect_seekable(Cursor::new(&bytes)).unwrap();
    assert!(s.complete, "{:?}", s.stopped);
    assert_eq!(s.machine_type.as_deref(), Some("microvm"));
    let main = s.main_ram.as_ref().unwrap();
    assert_eq!(
        (main.block.as_str(), main.bytes, main.mib),
        ("microvm.ram", 0x20_0000, 2)
    );
    assert_eq!((s.pages.normal, s.pages.zero), (8, 523));
    assert_eq!(s.ram_blocks.len(), 5);
    assert_eq!(s.devices.len(), 14);
}

#[test]
fn report_and_json_say_what_matters() {
    let bytes = fixture("q35-10.0-rng-file");
    let s = inspect_seekable(Cursor::new(&bytes)).unwrap();
    let text = s.describe();
    for want in [
        "pc-q35-10.0",
        "-m 16",
        "pc.ram",
        "virtio-rng",
        "51 normal, 4175 zero",
        "complete",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["machine_type"], "pc-q35-10.0");
    assert_eq!(json["main_ram"]["mib"], 16);
    assert_eq!(json["complete"], true);
    assert!(ALL.contains(&"q35-10.0-rng-file"));
}
