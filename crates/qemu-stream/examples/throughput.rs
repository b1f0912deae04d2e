//! Times `inspect_file` and `inspect` (over a plain reader, as from a pipe) on a
//! stream file, three rounds each, and prints the report and the rates:
//! `cargo run --release -p qemu-stream --example throughput -- FILE`.

use std::time::Instant;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: throughput STREAM_FILE");
        std::process::exit(2);
    };
    let mut printed = false;
    for round in 1..=3 {
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
            let secs = t.elapsed().as_secs_f64();
            match r {
                Ok(s) => {
                    if !printed {
                        print!("{s}");
                        printed = true;
                    }
                    let gbs = s.total_bytes as f64 / secs / 1e9;
                    println!(
                        "round {round} {how}: {} bytes in {secs:.3} s = {gbs:.2} GB/s",
                        s.total_bytes
                    );
                }
                Err(e) => println!("round {round} {how}: {e}"),
            }
        }
    }
}
