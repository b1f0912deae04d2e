#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Both entry points take different paths (description from the end vs footer
    // scanning); neither may panic, and the report must render.
    if let Ok(s) = qemu_stream::inspect(data) {
        let _ = s.describe();
        assert!(s.total_bytes <= data.len() as u64);
    }
    if let Ok(s) = qemu_stream::inspect_seekable(Cursor::new(data)) {
        let _ = s.describe();
        assert!(s.total_bytes <= data.len() as u64);
    }
});
