//! What the CPU's first touch of fresh memory costs: writing every word of a new `hetmm`
//! allocation (with and without a simulated device attached), against the same bytes of fresh
//! anonymous memory and against writing memory already touched. Medians over repeats.
//!
//! `cargo run --release --example first_touch -- [SIZE] [REPEATS]` (default 1G 5).

use std::time::Instant;

use hetmm::sim::{SimConfig, SimDevice};
use hetmm::Hetmm;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn fill(s: &mut [u64]) -> f64 {
    let t = Instant::now();
    for (i, v) in s.iter_mut().enumerate() {
        *v = i as u64;
    }
    std::hint::black_box(&s);
    t.elapsed().as_secs_f64()
}

fn main() -> Result<(), hetmm::Error> {
    let mut args = std::env::args().skip(1);
    let size = args.next().and_then(|s| hetmm::parse_size(&s)).unwrap_or(1 << 30);
    let reps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let n = (size / 8) as usize;
    let gb = size as f64 / 1e9;
    let (mut plain, mut attached, mut anon, mut warm) = (vec![], vec![], vec![], vec![]);
    let hm = Hetmm::new()?;
    let hd = Hetmm::new()?;
    let _dev =
        hd.attach_sim(SimDevice::new(SimConfig { memory_bytes: size, prefault: true, ..SimConfig::default() })?)?;
    // The three kinds take turns going first: memory the kernel has just freed is cheaper to
    // hand out again than memory this VM's host has never backed.
    for rep in 0..reps {
        for k in 0..3 {
            match (rep + k) % 3 {
                0 => {
                    let mut b = hm.alloc::<u64>(n)?;
                    plain.push(fill(&mut b.as_mut_slice()));
                    warm.push(fill(&mut b.as_mut_slice()));
                }
                1 => {
                    let mut b = hd.alloc::<u64>(n)?;
                    attached.push(fill(&mut b.as_mut_slice()));
                }
                _ => {
                    // A large zeroed Vec is fresh mmap'd memory (calloc skips the memset): the
                    // fill faults each 4 KiB page in (THP is only for `madvise`d ranges here).
                    let mut v = vec![0u64; n];
                    anon.push(fill(&mut v));
                }
            }
        }
    }
    let gbps = |v: Vec<f64>| gb / median(v);
    println!(
        "first touch of {gb:.2} GB, medians of {reps}: hetmm {:.2} GB/s, hetmm with a device attached {:.2} GB/s, \
         anonymous memory {:.2} GB/s; memory already touched {:.2} GB/s",
        gbps(plain),
        gbps(attached),
        gbps(anon),
        gbps(warm)
    );
    Ok(())
}
