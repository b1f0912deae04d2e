//! Times `inspect_file` (and `inspect` over a plain reader) on a stream file and
//! prints the report and the rate: `cargo run --release --example throughput -- F`.

use std::time::Instant;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: throughput STREAM_FILE");
        std::process::exit(2);
    };
    for (how, seekable) in [("inspect_file", true), ("inspect (pipe-like)", false)] {
        let t = Instant::now();
        let r = if seekable {
            qemu_stream::inspect_file(&path)
        } else {
            std::fs::File::open(&path)
                .map_err(|e| qemu_stream::StreamError::Open {
                    path: path.clone().into(),
                    source: e,
                })
                .and_then(qemu_stream::inspect)
        };
        let dt = t.elapsed();
        match r {
            Ok(s) => {
                if seekable {
                    print!("{s}");
                }
                let gbs = s.total_bytes as f64 / dt.as_secs_f64() / 1e9;
                println!(
                    "{how}: {} bytes in {:.3} s = {gbs:.2} GB/s",
                    s.total_bytes,
                    dt.as_secs_f64()
                );
            }
            Err(e) => println!("{how}: {e}"),
        }
    }
}
