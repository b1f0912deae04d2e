//! A streaming reader of QEMU's migration stream: the bytes `migrate "exec:cat > F"`,
//! `migrate file:F` (with or without the `mapped-ram` capability) and `savevm`-style
//! tools write.
//!
//! It tells what VM a saved state belongs to (machine type, RAM blocks and the `-m`
//! they imply, device sections), counts the RAM pages, and says whether the stream
//! is whole or where it was cut, in constant memory and at page-cache speed. It never
//! panics on bad input and never sizes an allocation from a length field. Device
//! state is vmstate with no length prefix, so it is stepped over using the JSON VM
//! description QEMU appends to the stream ([`inspect_file`] reads it from the end
//! first); on a pipe, where that is not possible, sections are found by their footers.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/streams/pc-7.2-exec.bin.gz");
//! # let stream = flate2::read::GzDecoder::new(std::fs::File::open(fixture)?);
//! // A state file saved by QEMU 7.2 from a `-m 16` VM (here read from a pipe).
//! let summary = qemu_stream::inspect(stream)?;
//! assert_eq!(summary.machine_type.as_deref(), Some("pc-i440fx-7.2"));
//! assert!(summary.complete, "not restorable: {:?}", summary.stopped);
//! println!("{summary}");
//! # Ok(())
//! # }
//! ```
//!
//! A file on disk: `qemu_stream::inspect_file("vm.state")`, which also
//! steps over device state exactly using the description at the stream's end.

#![warn(missing_docs)]

mod error;
mod format;
mod input;
mod parse;
pub mod split;
mod summary;
mod vmdesc;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

pub use error::StreamError;
pub use summary::{DeviceSection, MainRam, MappedRamBlock, PageCounts, RamBlock, Stopped, Summary};

use input::{Input, Plain, Seekable, Source};

/// Reads a stream from anything readable, front to back, once.
///
/// Returns `Err` only when the input is not a QEMU migration stream at all (or is of
/// an unknown format version, or the first read fails); a stream that is cut short or
/// damaged later gives an `Ok` summary with `complete == false` and
/// [`Summary::stopped`] saying where and why.
///
/// # Errors
/// [`StreamError::NotAStream`] or [`StreamError::UnsupportedVersion`] for input that is no stream this reader knows; [`StreamError::Io`] when the first read fails.
pub fn inspect<R: Read>(r: R) -> Result<Summary, StreamError> {
    let mut src = Plain(r);
    run(&mut src, None)
}

/// Like [`inspect`], for seekable input: reads the VM description from the end
/// first, so device sections are stepped over exactly, and jumps over mapped-ram
/// page regions instead of reading them.
///
/// # Errors
/// As [`inspect`], and when seeking fails.
pub fn inspect_seekable<R: Read + Seek>(mut r: R) -> Result<Summary, StreamError> {
    let io = |e| StreamError::Io {
        offset: 0,
        source: e,
    };
    let start = r.stream_position().map_err(io)?;
    let len = r.seek(SeekFrom::End(0)).map_err(io)?;
    r.seek(SeekFrom::Start(start)).map_err(io)?;
    // The description is located relative to the start of the stream.
    let desc = if start == 0 {
        parse::load_desc(&mut r, len).ok().flatten()
    } else {
        None
    };
    r.seek(SeekFrom::Start(start)).map_err(io)?;
    let mut src = Seekable::new(r).map_err(io)?;
    run(&mut src, desc)
}

/// Opens `path` and inspects it with [`inspect_seekable`]; a pipe or a socket
/// given as a path is read front to back with [`inspect`].
///
/// # Errors
/// [`StreamError::Open`] when the file cannot be opened; as [`inspect`].
pub fn inspect_file(path: impl AsRef<Path>) -> Result<Summary, StreamError> {
    let path = path.as_ref();
    let open_err = |e| StreamError::Open {
        path: path.to_owned(),
        source: e,
    };
    let f = File::open(path).map_err(open_err)?;
    let regular = f.metadata().map_err(open_err)?.is_file();
    if regular {
        inspect_seekable(f)
    } else {
        inspect(f)
    }
}

fn run(src: &mut dyn Source, desc: Option<vmdesc::VmDesc>) -> Result<Summary, StreamError> {
    let mut inp = Input::new(src);
    let stream_version = parse::header(&mut inp)?;
    let mut s = Summary {
        stream_version,
        ..Summary::default()
    };
    parse::walk(&mut inp, &mut s, desc);
    Ok(s)
}
