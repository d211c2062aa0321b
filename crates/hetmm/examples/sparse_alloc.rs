//! What a large, sparsely used buffer costs: `hm.alloc` of `SIZE` bytes, a CPU write to one page
//! in every `STRIDE` bytes, and the drop. Prints the time of each step and the process's
//! resident memory after each (from `/proc/self/statm`), so hetmm's own per-page state shows
//! beside the pages written.
//!
//! `cargo run --release --example sparse_alloc -- [SIZE] [STRIDE] [REPEAT]` (default 16G 1G 5).

use std::time::Instant;

use hetmm::core::types::{parse_size, Prot};
use hetmm::Hetmm;

/// Resident memory of this process in MiB.
fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    pages * 4096.0 / (1 << 20) as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let size = args.next().and_then(|s| parse_size(&s)).unwrap_or(16 << 30) as usize;
    let stride = args.next().and_then(|s| parse_size(&s)).unwrap_or(1 << 30).max(4096) as usize;
    let repeat: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5).max(1);
    let hm = Hetmm::new()?;
    for _ in 0..repeat {
        let base = rss_mib();
        let t = Instant::now();
        let mut b = hm.alloc::<u8>(size)?;
        let alloc = t.elapsed();
        let after_alloc = rss_mib() - base;
        let t = Instant::now();
        b.as_mut_slice().iter_mut().step_by(stride).for_each(|x| *x = 1);
        let touch = t.elapsed();
        let after_touch = rss_mib() - base;
        // A reshape: the middle half of the buffer read-only, which splits its region in three.
        let t = Instant::now();
        hm.protect(b.ptr() + size as u64 / 4, size as u64 / 2, Prot::READ)?;
        let protect = t.elapsed();
        let after_protect = rss_mib() - base;
        let t = Instant::now();
        drop(b);
        let free = t.elapsed();
        println!(
            "{size} bytes: alloc {:.2} ms (+{after_alloc:.1} MiB resident), {} writes {:.2} ms (+{after_touch:.1} MiB), \
             protect half {:.2} ms (+{after_protect:.1} MiB), drop {:.2} ms",
            alloc.as_secs_f64() * 1e3,
            size.div_ceil(stride),
            touch.as_secs_f64() * 1e3,
            protect.as_secs_f64() * 1e3,
            free.as_secs_f64() * 1e3,
        );
    }
    Ok(())
}
