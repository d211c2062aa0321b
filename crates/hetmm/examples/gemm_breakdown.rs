//! How far `gemm`'s first launch is from its kernel: the same kernel and matrices as `hetmm bench
//! --workload gemm` (m = 1024, 12 MiB, on a device of `12 MiB / oversub`), run two ways in fresh
//! address spaces, alternated, `REPEAT` times each: the first launch through device faults, and
//! an explicit bulk `Prefetch` of the three matrices followed by the first launch. Each then
//! launches three more times (its "again" figure is the median of those: the kernel's own cost
//! where everything fits). Prints medians in milliseconds.
//!
//! `cargo run --release --example gemm_breakdown -- [OVERSUB] [POLICY] [REPEAT]` (default 0.5
//! hetmm 9).

use std::time::{Duration, Instant};

use hetmm::kernels::mul_mat;
use hetmm::sim::{SimConfig, SimDevice};
use hetmm::{Advice, Hetmm, Use};

const M: usize = 1024;

/// Milliseconds of one repeat: the prefetch (0 without), prefetch and first launch together,
/// and the median of three launches after it.
struct Times {
    prefetch: f64,
    first: f64,
    again: f64,
}

fn main() -> Result<(), hetmm::Error> {
    let mut args = std::env::args().skip(1);
    let oversub: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(0.5);
    let policy = args.next().unwrap_or_else(|| "hetmm".into());
    let repeat: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(9).max(1);
    let block = 2u64 << 20;
    let memory_bytes = (((M * M * 12) as f64 / oversub).ceil() as u64).div_ceil(block).max(1) * block;
    let (mut faults, mut prefetched) = (Vec::new(), Vec::new());
    for _ in 0..repeat {
        faults.push(run(&policy, memory_bytes, false)?);
        prefetched.push(run(&policy, memory_bytes, true)?);
    }
    for (name, v) in [("device faults", faults), ("bulk Prefetch, then launch", prefetched)] {
        println!(
            "{policy} at oversubscription {oversub}, {name}: prefetch {:.1} ms, to the end of the first launch {:.1} ms, \
             each launch after it {:.1} ms (medians of {repeat})",
            median(v.iter().map(|t| t.prefetch)),
            median(v.iter().map(|t| t.first)),
            median(v.iter().map(|t| t.again)),
        );
    }
    Ok(())
}

fn run(policy: &str, memory_bytes: u64, prefetch: bool) -> Result<Times, hetmm::Error> {
    let n = M * M;
    let hm = Hetmm::with_policy(policy)?;
    let dev = hm.attach_sim(SimDevice::new(SimConfig { memory_bytes, prefault: true, ..SimConfig::default() })?)?;
    let (mut a, mut b, mut c) = (hm.alloc::<f32>(n)?, hm.alloc::<f32>(n)?, hm.alloc::<f32>(n)?);
    a.as_mut_slice().iter_mut().enumerate().for_each(|(i, x)| *x = (i % 7) as f32);
    b.as_mut_slice().iter_mut().enumerate().for_each(|(i, x)| *x = (i % 5) as f32);
    c.as_mut_slice().fill(-1.0);
    let launch = || -> Result<(), hetmm::Error> {
        let (grid, k) = mul_mat(c.ptr(), a.ptr(), b.ptr(), M);
        dev.launch(grid, &[Use::read(&a), Use::read(&b), Use::write(&c)], k)?.wait()
    };
    let t = Instant::now();
    if prefetch {
        for buf in [&a, &b, &c] {
            hm.advise_buf(buf, Advice::Prefetch(dev.proc()))?.wait(Duration::from_secs(60))?;
        }
    }
    let t_prefetch = t.elapsed().as_secs_f64();
    launch()?;
    let t_first = t.elapsed().as_secs_f64();
    let mut again = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        launch()?;
        again.push(t.elapsed().as_secs_f64());
    }
    Ok(Times { prefetch: t_prefetch * 1e3, first: t_first * 1e3, again: median(again.into_iter()) * 1e3 })
}

fn median(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
