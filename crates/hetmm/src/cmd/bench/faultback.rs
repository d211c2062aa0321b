//! `faultback`: the CPU fault-back path. Data sits on the device; the CPU touches one word per
//! fault-around chunk, for each chunk size: the cost per fault against a raw userfaultfd round
//! trip (a 4 KiB MISSING fault answered by UFFDIO_COPY from another thread), and the bandwidth
//! of bringing the whole buffer back that way against memcpy. The device memory is twice the
//! data (oversubscription 0.5): the data must fit on the device.

use std::time::Instant;

use hetmm::core::types::{BLOCK_SIZE, PAGE_SIZE};
use hetmm::sim::{SimConfig, SimDevice};
use hetmm::{CoreConfig, Hetmm, Policy};
use serde_json::json;

use super::cpuuse::CpuClock;
use super::workloads::{device_memory, Result, Run, Sample};
use super::{human, median};

/// The fault-around chunk sizes measured.
pub const CHUNKS: [u64; 5] = [PAGE_SIZE, 64 << 10, 256 << 10, 1 << 20, BLOCK_SIZE];

/// The oversubscription `faultback` runs at.
pub const OVERSUB: f64 = 0.5;

/// One repeat: one sample per chunk size.
pub fn faultback(r: &Run, uffd_us: f64) -> Result<Vec<Sample>> {
    CHUNKS.iter().map(|&c| one(r, c, uffd_us)).collect()
}

fn one(r: &Run, chunk: u64, uffd_us: f64) -> Result<Sample> {
    // Per-fault latency is measured on a smaller buffer for small chunks (one fault per chunk).
    let bytes = if chunk < (64 << 10) { r.size.min(64 << 20) } else { r.size };
    let n = (bytes / 8).max(1) as usize;
    let bytes = n as u64 * 8;
    let policy = Policy::by_name(r.policy).ok_or_else(|| hetmm::Error::UnknownPolicy(r.policy.to_string()))?;
    // The sweep sets the chunk a CPU fault brings back, whatever the policy's prefetcher would,
    // and each touch must be a fault: no read-ahead either (with hetmm's, most touches found
    // their chunk already back, and the median "fault" was a plain read; found by an audit).
    let policy = Policy { cpu_fault_prefetch: false, cpu_readahead: false, ..policy };
    let hm = Hetmm::with_config(CoreConfig { fault_around: chunk, policy, ..CoreConfig::default() })?;
    let mem = device_memory(bytes, OVERSUB);
    let dev =
        hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: mem, prefault: true, ..SimConfig::default() })?)?;
    let mut buf = hm.alloc::<u64>(n)?;
    let salt = r.rep as u64;
    for (i, v) in buf.as_mut_slice().iter_mut().enumerate() {
        *v = i as u64 ^ salt;
    }
    hm.migrate(buf.ptr(), buf.byte_len().div_ceil(PAGE_SIZE) * PAGE_SIZE, dev.proc())?;
    // Touch one word per chunk: each touch is one fault that brings back `chunk` bytes.
    let stride = (chunk / 8) as usize;
    let s = buf.as_slice();
    let mut per = Vec::with_capacity(n / stride + 1);
    let s0 = hm.stats();
    let c0 = CpuClock::now();
    let t0 = Instant::now();
    let mut sum = 0u64;
    for i in (0..n).step_by(stride) {
        let t = Instant::now();
        sum = sum.wrapping_add(std::hint::black_box(s[i]));
        per.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = c0.until(&CpuClock::now());
    let st = hm.stats().since(&s0);
    let mut ok = (0..n).step_by(stride).fold(0u64, |a, i| a.wrapping_add(i as u64 ^ salt)) == sum;
    // Check every word once (outside the timing), and that no CPU fault failed (as every
    // other workload's row does).
    ok &= s.iter().enumerate().all(|(i, v)| *v == i as u64 ^ salt);
    ok &= st.cpu_fault_errors == 0;
    let lat = median(per);
    let mut extra = serde_json::Map::new();
    extra.insert("chunk".into(), json!(chunk));
    extra.insert("fault_us".into(), json!(lat));
    extra.insert("fault_over_uffd".into(), json!(lat / uffd_us));
    Ok(Sample {
        row: format!("faultback/{}", human(chunk)),
        seconds: secs,
        bytes,
        working_set: bytes,
        device_memory: mem,
        verified: ok,
        stats: st,
        cpu,
        extra,
    })
}
