//! What sharing memory the program already has costs: `hm.register` and `hm.unregister` of
//! `SIZE` bytes of private anonymous memory, every page written first (dense) or only one page
//! in 512 (sparse), against a memcpy of the same `SIZE` bytes in the same run. Prints the
//! medians of `REPEAT` rounds in milliseconds and as multiples of the memcpy.
//!
//! `cargo run --release --example register_cost -- [SIZE] [REPEAT]` (default 256M 9).

use std::time::Instant;

use hetmm::core::types::{parse_size, PAGE_SIZE};
use hetmm::Hetmm;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let size = args.next().and_then(|s| parse_size(&s)).unwrap_or(256 << 20) as usize;
    let repeat: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(9).max(1);
    let hm = Hetmm::new()?;
    let page = PAGE_SIZE as usize;
    let (src, mut dst) = (vec![1u8; size], vec![0u8; size]);
    let mut copy = Vec::new();
    let mut times = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    for _ in 0..repeat {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        copy.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(&dst);
        for (k, step) in [1, 512].into_iter().enumerate() {
            let mut m = memmap2::MmapMut::map_anon(size)?;
            m.iter_mut().step_by(page * step).for_each(|x| *x = 1);
            let t = Instant::now();
            hm.register(m.as_ptr(), size)?;
            times[k].0.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            hm.unregister(m.as_ptr(), size)?;
            times[k].1.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(m.iter().step_by(page * step).all(|&x| x == 1), "the bytes stayed");
        }
    }
    let c = median(copy);
    println!("{size} bytes, medians of {repeat}: memcpy {c:.2} ms");
    for ((reg, unreg), what) in times.into_iter().zip(["dense", "sparse (1 page in 512 written)"]) {
        let (r, u) = (median(reg), median(unreg));
        println!("  {what}: register {r:.2} ms ({:.2}x memcpy), unregister {u:.2} ms ({:.2}x)", r / c, u / c);
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
