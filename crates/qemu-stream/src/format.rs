//! Numbers from QEMU's savevm format (migration/savevm.c, migration/ram.c).

pub(crate) const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
pub(crate) const QEMU_VM_FILE_VERSION: u32 = 3;

pub(crate) const QEMU_VM_EOF: u8 = 0x00;
pub(crate) const QEMU_VM_SECTION_START: u8 = 0x01;
pub(crate) const QEMU_VM_SECTION_PART: u8 = 0x02;
pub(crate) const QEMU_VM_SECTION_END: u8 = 0x03;
pub(crate) const QEMU_VM_SECTION_FULL: u8 = 0x04;
pub(crate) const QEMU_VM_SUBSECTION: u8 = 0x05;
pub(crate) const QEMU_VM_VMDESCRIPTION: u8 = 0x06;
pub(crate) const QEMU_VM_CONFIGURATION: u8 = 0x07;
pub(crate) const QEMU_VM_COMMAND: u8 = 0x08;
pub(crate) const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;

// RAM record flags, stored in the low bits of the page-aligned address.
pub(crate) const RAM_SAVE_FLAG_ZERO: u64 = 0x02;
pub(crate) const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x04;
pub(crate) const RAM_SAVE_FLAG_PAGE: u64 = 0x08;
pub(crate) const RAM_SAVE_FLAG_EOS: u64 = 0x10;
pub(crate) const RAM_SAVE_FLAG_CONTINUE: u64 = 0x20;
pub(crate) const RAM_SAVE_FLAG_XBZRLE: u64 = 0x40;
pub(crate) const RAM_SAVE_FLAG_HOOK: u64 = 0x80;
pub(crate) const RAM_SAVE_FLAG_COMPRESS_PAGE: u64 = 0x100;
pub(crate) const RAM_SAVE_FLAG_MULTIFD_FLUSH: u64 = 0x200;

pub(crate) const ENCODING_FLAG_XBZRLE: u8 = 0x01;
pub(crate) const MAPPED_RAM_HDR_VERSION: u32 = 1;

/// x86's page size, used until the stream says otherwise.
pub(crate) const DEFAULT_TARGET_PAGE_SIZE: u64 = 4096;

// QEMU_VM_COMMAND sub-commands (enum qemu_vm_cmd).
pub(crate) fn command_name(cmd: u16) -> &'static str {
    match cmd {
        1 => "open-return-path",
        2 => "ping",
        3 => "postcopy-advise",
        4 => "postcopy-listen",
        5 => "postcopy-run",
        6 => "postcopy-ram-discard",
        7 => "packaged",
        8 => "enable-colo",
        9 => "postcopy-resume",
        10 => "recv-bitmap",
        11 => "switchover-start",
        _ => "unknown",
    }
}
