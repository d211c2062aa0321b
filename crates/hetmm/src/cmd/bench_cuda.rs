//! `hetmm bench --device cuda`: hetmm on an NVIDIA GPU beside what a CUDA programmer would
//! write without it, measured in the same run.
//!
//! - `copy`: hetmm's migration bandwidth host to device and back (`migrate` of a buffer the CPU
//!   wrote) against raw pinned `cuMemcpyAsync` of the same bytes.
//! - `mul_mat`: the seed's `r = a x b` through hetmm (pointers only) against the same kernel
//!   with `cuMemAlloc` and explicit copies.
//! - `stream`: a kernel reads a buffer the CPU has just written (first touch) through hetmm,
//!   against `cuMemAllocManaged` demand paging and managed memory with `cuMemPrefetchAsync`.
//! - `oversub`: the stream over a working set 1.5x the GPU memory hetmm may use
//!   (`--device-mem`), launched in pieces of half that memory, against raw pinned bandwidth.
//!   Managed memory is shown only where the whole set fits in the GPU's free memory (it is
//!   never oversubscribed here).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use hetmm::core::types::Proc;
use hetmm::cuda::baseline;
use hetmm::cuda::{kernels, Buf, CudaConfig, CudaDevice, KernelCall};
use hetmm::kernels::mul_mat_cpu;
use hetmm::{Hetmm, Launch};
use serde_json::{json, Value};

use super::bench::{human, median, Args};

const WAIT: Duration = Launch::DEFAULT_TIMEOUT;

pub fn run(args: &Args) -> Result<ExitCode, hetmm::Error> {
    if let Some(why) = hetmm::cuda::skip_reason() {
        eprintln!("hetmm bench --device cuda needs an NVIDIA GPU: {why}");
        return Ok(ExitCode::FAILURE);
    }
    let w = args.workload();
    type Workload = fn(&Args) -> Result<Value, hetmm::Error>;
    let table: [(&str, Workload); 4] = [("copy", copy), ("mul_mat", mul_mat), ("stream", stream), ("oversub", oversub)];
    let chosen: Vec<_> = table.iter().filter(|(name, _)| w == "all" || w == *name).collect();
    if chosen.is_empty() {
        eprintln!("hetmm bench --device cuda: unknown workload '{w}' (copy, mul_mat, stream, oversub, all)");
        return Ok(ExitCode::FAILURE);
    }
    // Each workload's row is printed as soon as it is done, and a workload that fails is
    // reported and does not stop the others: GPU time is scarce, partial results are kept.
    let mut ok = true;
    for (name, run_one) in chosen {
        let row = run_one(args).unwrap_or_else(|e| {
            json!({"workload": name, "device": "cuda", "verified": false, "error": e.to_string(),
                   "summary": format!("{name}: failed: {e}")})
        });
        ok &= row["verified"].as_bool() == Some(true);
        if args.json() {
            println!("{row}");
        } else {
            println!("{}", row["summary"].as_str().unwrap_or_default());
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn gpu(mem: u64) -> Result<CudaDevice, hetmm::Error> {
    Ok(CudaDevice::new(CudaConfig { memory_bytes: Some(mem), ..CudaConfig::default() })?)
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// (a) Migration bandwidth both ways against raw pinned copies.
fn copy(args: &Args) -> Result<Value, hetmm::Error> {
    let size = args.size();
    let (raw_h2d, raw_d2h) = {
        let d = gpu(2 << 20)?;
        let (h, dd) = baseline::pinned_copy_bandwidth(&d, size, args.repeat())?;
        (h / 1e9, dd / 1e9)
    };
    let hm = Hetmm::new()?;
    let dev = hm.attach(gpu(size.div_ceil(2 << 20) * (2 << 20))?)?;
    let name = dev.driver().name().to_string();
    let n = (size / 8) as usize;
    let mut buf = hm.alloc::<u64>(n)?;
    let (mut h2d, mut d2h, mut verified) = (Vec::new(), Vec::new(), true);
    // Where the time of the last round went, each way (the core's counters).
    let (mut up_detail, mut down_detail) = (Value::Null, Value::Null);
    for rep in 0..args.repeat() + 1 {
        for (i, v) in buf.as_mut_slice().iter_mut().enumerate() {
            *v = i as u64 ^ rep as u64;
        }
        let s0 = hm.stats();
        let t = Instant::now();
        hm.migrate(buf.ptr(), buf.byte_len(), dev.proc())?;
        let up = t.elapsed().as_secs_f64();
        let s1 = hm.stats();
        let t = Instant::now();
        hm.migrate(buf.ptr(), buf.byte_len(), Proc::Cpu)?;
        let down = t.elapsed().as_secs_f64();
        up_detail = json!(s1.since(&s0));
        down_detail = json!(hm.stats().since(&s1));
        verified &= buf.as_slice().iter().enumerate().all(|(i, v)| *v == i as u64 ^ rep as u64);
        // The first round creates the GPU chunks: not timed.
        if rep > 0 {
            h2d.push(gbps(size, up));
            d2h.push(gbps(size, down));
        }
    }
    let (h2d, d2h) = (median(h2d), median(d2h));
    let st = dev.driver().stats();
    Ok(json!({
        "workload": "copy", "device": "cuda", "gpu": name, "bytes": size, "verified": verified,
        "h2d_gbps": h2d, "d2h_gbps": d2h, "raw_h2d_gbps": raw_h2d, "raw_d2h_gbps": raw_d2h,
        "h2d_ratio": h2d / raw_h2d, "d2h_ratio": d2h / raw_d2h, "staged_bytes": st.bytes_staged,
        "copies": st.copies, "pin_piece": dev.driver().config().pin_piece,
        "up_detail": up_detail, "down_detail": down_detail, "gpu_stats": format!("{st:?}"),
        "summary": format!(
            "copy {}: hetmm migrate H2D {h2d:.2} GB/s = {:.2} of pinned cuMemcpyAsync ({raw_h2d:.2}), \
             D2H {d2h:.2} GB/s = {:.2} of pinned ({raw_d2h:.2})",
            human(size), h2d / raw_h2d, d2h / raw_d2h),
    }))
}

fn value(i: usize, salt: usize) -> f32 {
    ((i.wrapping_mul(2_654_435_761).wrapping_add(salt)) % 7) as f32
}

/// The `a` and `b` that `mul_mat` writes (n values each).
fn expected_inputs(n: usize) -> (Vec<f32>, Vec<f32>) {
    ((0..n).map(|i| value(i, 1)).collect(), (0..n).map(|i| value(i, 2)).collect())
}

/// (b) mul_mat with hetmm against cuMemAlloc + explicit copies.
fn mul_mat(args: &Args) -> Result<Value, hetmm::Error> {
    let m = args.m;
    let n = m.checked_mul(m).filter(|&n| n > 0).ok_or(hetmm::Error::SizeOverflow { count: m, size: m })?;
    // Three f32 matrices in whole 2 MiB blocks, plus room: a huge `--m` is refused, not an
    // overflow (a panic in debug builds, a wrapped, too small device in release).
    let need = (n as u64)
        .checked_mul(12)
        .and_then(|b| b.checked_next_multiple_of(2 << 20))
        .and_then(|b| b.checked_add(6 << 20))
        .ok_or(hetmm::Error::SizeOverflow { count: m, size: m })?;
    let hm = Hetmm::new()?;
    let dev = hm.attach(gpu(need)?)?;
    let name = dev.driver().name().to_string();
    dev.driver().compile_kernels()?;
    let (mut a, mut b, r) = (hm.alloc::<f32>(n)?, hm.alloc::<f32>(n)?, hm.alloc::<f32>(n)?);
    let (mut times, mut result, mut detail) = (Vec::new(), Vec::new(), Value::Null);
    for rep in 0..args.repeat() + 1 {
        // The CPU writes the inputs every time, so every run migrates them.
        for (i, v) in a.as_mut_slice().iter_mut().enumerate() {
            *v = value(i, 1);
        }
        for (i, v) in b.as_mut_slice().iter_mut().enumerate() {
            *v = value(i, 2);
        }
        let s0 = hm.stats();
        let t = Instant::now();
        let call = KernelCall::mul_mat((&r).into(), (&a).into(), (&b).into(), m as u64)?;
        dev.launch(&call)?.wait_timeout(WAIT)?;
        result = r.as_slice().to_vec();
        if rep > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        detail = json!(hm.stats().since(&s0));
    }
    let hetmm_s = median(times);
    // The baselines and the check use the values the CPU wrote, not the inputs read back after
    // hetmm's runs: inputs lost on the way would give both the same wrong product. The inputs
    // must also have come back intact.
    let (a_host, b_host) = expected_inputs(n);
    let inputs_intact = a.as_slice() == a_host[..] && b.as_slice() == b_host[..];
    drop((a, b, r, dev, hm));
    let d = gpu(2 << 20)?;
    let mut ex = Vec::new();
    let mut ex_kernel = Vec::new();
    let mut explicit = Vec::new();
    // Untimed first, as hetmm's first round is: a fresh context's first allocations, copies and
    // launch are not what the repeats compare.
    for rep in 0..args.repeat() + 1 {
        let (res, t) = baseline::explicit_mul_mat(&d, &a_host, &b_host, m)?;
        if rep == 0 {
            continue;
        }
        ex.push(t.total.as_secs_f64());
        ex_kernel.push(t.kernel.as_secs_f64());
        explicit = res;
    }
    let (ex_s, kernel_s) = (median(ex), median(ex_kernel));
    let mut verified = inputs_intact && result == explicit;
    let cpu_checked = m <= 1024;
    if cpu_checked {
        let mut expect = vec![0f32; n];
        mul_mat_cpu(&mut expect, &a_host, &b_host, m);
        verified &= result == expect;
    }
    Ok(json!({
        "workload": "mul_mat", "device": "cuda", "gpu": name, "m": m, "verified": verified,
        "cpu_checked": cpu_checked, "hetmm_seconds": hetmm_s, "explicit_seconds": ex_s,
        "kernel_seconds": kernel_s, "ratio": ex_s / hetmm_s, "detail": detail,
        "summary": format!(
            "mul_mat m={m}: hetmm {:.2} ms end to end vs cudaMalloc + explicit copies {:.2} ms = {:.2} of explicit \
             (kernel alone {:.2} ms)",
            hetmm_s * 1e3, ex_s * 1e3, ex_s / hetmm_s, kernel_s * 1e3),
    }))
}

/// Runs stream_sum over `src` through hetmm (migration included) and checks the sum.
fn hetmm_stream(
    dev: &hetmm::Device<CudaDevice>,
    src: Buf,
    out: &hetmm::SharedBuf<u64>,
    expect: u64,
) -> Result<bool, hetmm::Error> {
    let call = KernelCall::stream_sum(src, out.into())?;
    dev.launch(&call)?.wait_timeout(WAIT)?;
    let blocks = kernels::stream_sum_blocks(src.bytes / 8) as usize;
    Ok(out.as_slice()[..blocks].iter().fold(0u64, |a, v| a.wrapping_add(*v)) == expect)
}

/// (c) First touch: hetmm against managed memory with and without prefetch.
fn stream(args: &Args) -> Result<Value, hetmm::Error> {
    let size = args.size();
    let n = size / 8;
    let hm = Hetmm::new()?;
    let dev = hm.attach(gpu(size.div_ceil(2 << 20) * (2 << 20) + (4 << 20))?)?;
    let name = dev.driver().name().to_string();
    dev.driver().compile_kernels()?;
    let mut src = hm.alloc::<u64>(n as usize)?;
    let out = hm.alloc::<u64>(kernels::stream_sum_blocks(n) as usize)?;
    let (mut times, mut verified, mut detail) = (Vec::new(), true, Value::Null);
    for rep in 0..args.repeat() + 1 {
        let mut expect = 0u64;
        for (i, v) in src.as_mut_slice().iter_mut().enumerate() {
            *v = i as u64 ^ rep as u64;
            expect = expect.wrapping_add(*v);
        }
        let s0 = hm.stats();
        let t = Instant::now();
        verified &= hetmm_stream(&dev, (&src).into(), &out, expect)?;
        if rep > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        detail = json!(hm.stats().since(&s0));
    }
    let hetmm_s = median(times);
    let gpu_stats = format!("{:?}", dev.driver().stats());
    drop((src, out, dev, hm));
    let d = gpu(2 << 20)?;
    let mut baselines = || -> Result<(f64, f64), hetmm::Error> {
        let (mut demand, mut pre) = (Vec::new(), Vec::new());
        // Untimed first, as hetmm's first round is (a fresh context's first managed memory).
        for rep in 0..args.repeat() + 1 {
            let r = baseline::managed_stream(&d, n, false, rep as u64)?;
            verified &= r.verified;
            let p = baseline::managed_stream(&d, n, true, rep as u64)?;
            verified &= p.verified;
            if rep > 0 {
                demand.push(r.elapsed.as_secs_f64());
                pre.push(p.elapsed.as_secs_f64());
            }
        }
        Ok((median(demand), median(pre)))
    };
    let hetmm_gbps = gbps(size, hetmm_s);
    let mut row = json!({"workload": "stream", "device": "cuda", "gpu": name, "bytes": size, "hetmm_gbps": hetmm_gbps,
                         "detail": detail, "gpu_stats": gpu_stats});
    let summary = match baselines() {
        Ok((demand, pre)) => {
            row["managed_gbps"] = json!(gbps(size, demand));
            row["managed_prefetch_gbps"] = json!(gbps(size, pre));
            row["ratio_to_managed"] = json!(demand / hetmm_s);
            row["ratio_to_prefetch"] = json!(pre / hetmm_s);
            format!(
                "stream {} first touch: hetmm {hetmm_gbps:.2} GB/s, cudaMallocManaged {:.2} GB/s ({:.2}x), managed + prefetch {:.2} GB/s ({:.2}x)",
                human(size), gbps(size, demand), demand / hetmm_s, gbps(size, pre), pre / hetmm_s)
        }
        // Without managed memory (a VM that cannot demand-page it) hetmm's figure still stands.
        Err(e) => {
            row["managed_gbps"] = json!(format!("not run: {e}"));
            format!("stream {} first touch: hetmm {hetmm_gbps:.2} GB/s; managed baselines not run: {e}", human(size))
        }
    };
    row["verified"] = json!(verified);
    row["summary"] = json!(summary);
    Ok(row)
}

/// `(offset, bytes, expected sum)` of each piece of `oversub`'s set of u64 `i` at index `i`.
fn oversub_pieces(set: u64, piece: u64) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < set {
        let len = piece.min(set - off);
        let first = off / 8;
        out.push((off, len, (first..first + len / 8).fold(0u64, u64::wrapping_add)));
        off += len;
    }
    out
}

/// (d) A working set 1.5x the GPU memory hetmm may use, streamed in pieces.
fn oversub(args: &Args) -> Result<Value, hetmm::Error> {
    let cap = args.device_mem / (2 << 20) * (2 << 20);
    if cap < (8 << 20) {
        return Err(hetmm::cuda::CudaError::Config("--device-mem must be at least 8M for oversub".into()).into());
    }
    let set = cap / 2 * 3;
    let piece = cap / 2 / (2 << 20) * (2 << 20);
    let (raw_h2d, _) = {
        let d = gpu(2 << 20)?;
        baseline::pinned_copy_bandwidth(&d, piece, args.repeat())?
    };
    let raw_h2d = raw_h2d / 1e9;
    let hm = Hetmm::new()?;
    let dev = hm.attach(gpu(cap)?)?;
    let name = dev.driver().name().to_string();
    dev.driver().compile_kernels()?;
    let n = set / 8;
    let mut src = hm.alloc::<u64>(n as usize)?;
    let out = hm.alloc::<u64>(kernels::stream_sum_blocks(piece / 8) as usize)?;
    for (i, v) in src.as_mut_slice().iter_mut().enumerate() {
        *v = i as u64;
    }
    // The pieces and their expected sums, computed before any timing.
    let pieces = oversub_pieces(set, piece);
    let (mut times, mut verified, mut rounds) = (Vec::new(), true, Vec::new());
    for _ in 0..args.repeat() + 1 {
        let s0 = hm.stats();
        let t = Instant::now();
        for &(off, len, expect) in &pieces {
            verified &= hetmm_stream(&dev, Buf { ptr: src.ptr() + off, bytes: len }, &out, expect)?;
        }
        times.push(t.elapsed().as_secs_f64());
        rounds.push(hm.stats().since(&s0));
    }
    // The first round (chunk creation, the set's first trip) is not timed, nor counted.
    times.remove(0);
    rounds.remove(0);
    // The counters of the median round, beside the median time.
    let mid = {
        let mut order: Vec<usize> = (0..times.len()).collect();
        order.sort_by(|&x, &y| times[x].total_cmp(&times[y]));
        order[order.len() / 2]
    };
    let secs = median(times);
    let g = gbps(set, secs);
    let st = rounds[mid];
    drop((src, out, dev, hm));
    let d = gpu(2 << 20)?;
    let managed = match baseline::managed_stream(&d, n, false, 0) {
        Ok(r) => {
            verified &= r.verified;
            json!(gbps(set, r.elapsed.as_secs_f64()))
        }
        Err(e) => json!(format!("not run: {e}")),
    };
    Ok(json!({
        "workload": "oversub", "device": "cuda", "gpu": name, "cap": cap, "bytes": set, "piece": piece,
        "verified": verified, "hetmm_gbps": g, "raw_h2d_gbps": raw_h2d, "ratio_to_raw": g / raw_h2d,
        "evictions": st.evictions, "bytes_evicted": st.bytes_evicted, "counters": "of the median timed round", "managed_not_oversubscribed_gbps": managed,
        "detail": st,
        "summary": format!(
            "oversub {} over a {} cap: hetmm {g:.2} GB/s = {:.2} of pinned H2D ({raw_h2d:.2}), {} evictions a round; managed (not capped): {managed}",
            human(set), human(cap), g / raw_h2d, st.evictions),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pieces cover the set once, in order, and each expected sum is that of its values.
    #[test]
    fn oversub_pieces_cover_the_set_with_their_sums() {
        let (set, piece) = (3 * (3 << 20), 4 << 20);
        let p = oversub_pieces(set, piece);
        assert_eq!(p.iter().map(|x| x.1).sum::<u64>(), set);
        let mut off = 0;
        for &(o, len, sum) in &p {
            assert_eq!(o, off);
            assert_eq!(sum, (o / 8..(o + len) / 8).sum::<u64>());
            off += len;
        }
    }

    /// mul_mat's reference inputs are the values the CPU writes.
    #[test]
    fn mul_mat_reference_inputs_are_the_written_values() {
        let (a, b) = expected_inputs(10);
        assert!(a.iter().enumerate().all(|(i, v)| *v == value(i, 1)));
        assert!(b.iter().enumerate().all(|(i, v)| *v == value(i, 2)));
    }
}
