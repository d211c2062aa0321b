//! Where the `stream` device-fault path spends its time: the same kernel as `hetmm bench
//! --workload stream` (reads A, writes B, both written by the CPU first), run three ways in
//! fresh address spaces: through device faults, after an explicit bulk `Prefetch`, and again
//! once everything is resident (the kernel's own cost). Prints hetmm's service-time counters
//! (CPU-seconds summed over threads) beside the wall times.
//!
//! `cargo run --release --example stream_breakdown -- [SIZE] [POLICY]` (default 2G hetmm).

use std::time::{Duration, Instant};

use hetmm::kernels::stream_map;
use hetmm::sim::{SimConfig, SimDevice};
use hetmm::{Advice, Hetmm, Use};

fn main() -> Result<(), hetmm::Error> {
    let mut args = std::env::args().skip(1);
    let size = args.next().and_then(|s| hetmm::parse_size(&s)).unwrap_or(2 << 30);
    let policy = args.next().unwrap_or_else(|| "hetmm".into());
    let n = (size / 16) as usize;
    for prefetch in [false, true] {
        let hm = Hetmm::with_policy(&policy)?;
        let sim = SimDevice::new(SimConfig { memory_bytes: size * 2, prefault: true, ..SimConfig::default() })?;
        let dev = hm.attach_sim(sim)?;
        let mut a = hm.alloc::<u64>(n)?;
        let mut b = hm.alloc::<u64>(n)?;
        for (i, v) in a.as_mut_slice().iter_mut().enumerate() {
            *v = i as u64;
        }
        b.as_mut_slice().fill(7);
        let s0 = hm.stats();
        let cpu0 = process_cpu_seconds();
        let t = Instant::now();
        if prefetch {
            let pa = hm.advise_buf(&a, Advice::Prefetch(dev.proc()))?;
            let pb = hm.advise_buf(&b, Advice::Prefetch(dev.proc()))?;
            pa.wait(Duration::from_secs(120))?;
            pb.wait(Duration::from_secs(120))?;
        }
        let t_prefetch = t.elapsed().as_secs_f64();
        let (grid, k) = stream_map(a.ptr(), b.ptr(), n, 3, 1);
        dev.launch(grid, &[Use::read(&a), Use::write(&b)], k)?.wait()?;
        let t_first = t.elapsed().as_secs_f64();
        let busy = process_cpu_seconds() - cpu0;
        let st = hm.stats().since(&s0);
        let (grid, k) = stream_map(a.ptr(), b.ptr(), n, 3, 1);
        let t2 = Instant::now();
        dev.launch(grid, &[Use::read(&a), Use::write(&b)], k)?.wait()?;
        let t_resident = t2.elapsed().as_secs_f64();
        let cpu_s = |ns: u64| ns as f64 * 1e-9;
        println!(
            "{}: total {t_first:.3} s (prefetch {t_prefetch:.3} s), kernel once resident {t_resident:.3} s; \
             process busy {busy:.2} CPU-s ({:.2} CPUs); CPU-seconds: revoke {:.3}, copy {:.3}, allocate {:.3}, map {:.3}; {} device faults in {} batches",
            if prefetch { "bulk Prefetch, then kernel" } else { "device faults" },
            busy / t_first,
            cpu_s(st.ns_revoke),
            cpu_s(st.ns_copy),
            cpu_s(st.ns_alloc),
            cpu_s(st.ns_map),
            st.device_faults,
            st.fault_batches,
        );
    }
    Ok(())
}

/// CPU time of the whole process so far (every thread, those that ended included), from
/// `/proc/self/stat` in clock ticks of 10 ms (USER_HZ is 100 on Linux): coarse, but a phase here
/// lasts tenths of a second. 0 where the file cannot be read.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name (which may hold spaces) closed by the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}
