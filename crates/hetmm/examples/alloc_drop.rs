//! What a buffer's life costs outside any device work: `hm.alloc` of `SIZE` bytes, one CPU write
//! per page, and the drop, against `mmap` + the same writes + `munmap` of anonymous memory in the
//! same run. Alternates the two `REPEAT` times (`ROUNDS` buffers each) and prints the medians in
//! microseconds per buffer and their ratio.
//!
//! `cargo run --release --example alloc_drop -- [SIZE] [ROUNDS] [REPEAT]` (default 2M 200 9).

use std::time::Instant;

use hetmm::core::types::{parse_size, PAGE_SIZE};
use hetmm::Hetmm;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let size = args.next().and_then(|s| parse_size(&s)).unwrap_or(2 << 20) as usize;
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(200).max(1);
    let repeat: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(9).max(1);
    let hm = Hetmm::new()?;
    let page = PAGE_SIZE as usize;
    let (mut managed, mut anon) = (Vec::new(), Vec::new());
    for _ in 0..repeat {
        let t = Instant::now();
        for _ in 0..rounds {
            let mut b = hm.alloc::<u8>(size)?;
            b.as_mut_slice().iter_mut().step_by(page).for_each(|x| *x = 1);
            drop(b);
        }
        managed.push(t.elapsed().as_secs_f64() * 1e6 / rounds as f64);
        let t = Instant::now();
        for _ in 0..rounds {
            // A mapping of its own each time: a `Vec` would not do, as glibc raises its mmap
            // threshold after the first free and then hands back the same heap memory, already
            // faulted in (that measured a memset, 30 us, not a buffer's life).
            let mut v = memmap2::MmapMut::map_anon(size)?;
            v.iter_mut().step_by(page).for_each(|x| *x = 1);
            std::hint::black_box(&v);
            drop(v);
        }
        anon.push(t.elapsed().as_secs_f64() * 1e6 / rounds as f64);
    }
    let (m, a) = (median(managed), median(anon));
    println!(
        "{size} bytes per buffer: hm.alloc + a write per page + drop {m:.1} us, anonymous memory the same way {a:.1} us, ratio {:.1} \
         (medians of {repeat} x {rounds})",
        m / a
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
