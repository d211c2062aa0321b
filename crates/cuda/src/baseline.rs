//! The limits hetmm's CUDA figures are judged against, measured the way a CUDA programmer would
//! do the same work without hetmm: raw pinned `cuMemcpyAsync`, `cuMemAlloc` plus explicit
//! copies, and `cuMemAllocManaged` with and without `cuMemPrefetchAsync`. All need a GPU.

use std::time::{Duration, Instant};

use crate::driver::{self, DeviceAlloc, ManagedAlloc, PinnedHost};
use crate::kernels::{self, Dims, Value, MUL_MAT, STREAM_SUM, TILE};
use crate::{CudaDevice, CudaError};

/// Longest wait for one baseline step.
const WAIT: Duration = Duration::from_secs(600);

fn wait_stream(dev: &CudaDevice, stream: &cudarc::driver::CudaStream) -> Result<(), CudaError> {
    let ev = driver::record(stream)?;
    match driver::wait_events(std::slice::from_ref(&ev), Instant::now() + WAIT)? {
        true => Ok(()),
        false => Err(CudaError::Config(format!("{}: a baseline step took longer than {WAIT:?}", dev.name()))),
    }
}

/// The median, of an even count the mean of the two middle values (as `hetmm bench`'s own).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Refuses an allocation that would not fit in the GPU's free memory (less 256 MiB).
fn fits(dev: &CudaDevice, bytes: u64, what: &str) -> Result<(), CudaError> {
    let (free, _) = dev.mem_info()?;
    if bytes.saturating_add(256 << 20) > free {
        return Err(CudaError::Config(format!(
            "{what}: {} MiB would not fit in the {} MiB free on the GPU",
            bytes >> 20,
            free >> 20
        )));
    }
    Ok(())
}

/// Raw pinned copy bandwidth in bytes per second, host to device and device to host: `bytes`
/// between `cuMemAllocHost` memory and `cuMemAlloc` memory, one `cuMemcpyAsync` per direction on
/// one stream, median of `reps`.
pub fn pinned_copy_bandwidth(dev: &CudaDevice, bytes: u64, reps: usize) -> Result<(f64, f64), CudaError> {
    fits(dev, bytes, "pinned copy baseline")?;
    let gpu = dev.gpu();
    let mut host = PinnedHost::new(gpu, bytes)?;
    host.as_mut_slice().iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    let buf = DeviceAlloc::new(gpu, bytes)?;
    let stream = gpu.stream()?;
    let (mut h2d, mut d2h) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        // SAFETY: `host` is pinned host memory of `bytes` bytes and `buf` device memory of the
        // same size, both alive until the stream is waited on just below.
        unsafe { driver::copy_htod(gpu, &stream, buf.ptr(), host.ptr(), bytes)? };
        wait_stream(dev, &stream)?;
        h2d.push(bytes as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        // SAFETY: as above, in the other direction; nothing else touches `host` meanwhile.
        unsafe { driver::copy_dtoh(gpu, &stream, host.ptr(), buf.ptr(), bytes)? };
        wait_stream(dev, &stream)?;
        d2h.push(bytes as f64 / t.elapsed().as_secs_f64());
    }
    Ok((median(h2d), median(d2h)))
}

/// Timing of the explicit-copies `mul_mat`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExplicitTiming {
    /// Copies in, kernel, copy out, from pageable host memory: what hetmm's launch replaces.
    pub total: Duration,
    /// The kernel alone.
    pub kernel: Duration,
}

/// `r = a x b` the classic way: `cuMemAlloc` three matrices, copy `a` and `b` in from pageable
/// host memory, run the same `mul_mat` kernel, copy `r` out. Returns `r` and the timing.
pub fn explicit_mul_mat(
    dev: &CudaDevice,
    a: &[f32],
    b: &[f32],
    m: usize,
) -> Result<(Vec<f32>, ExplicitTiming), CudaError> {
    let n = m.checked_mul(m).filter(|&n| n > 0 && a.len() >= n && b.len() >= n);
    let n = n.ok_or_else(|| CudaError::Kernel(format!("explicit mul_mat: inputs hold fewer than {m} x {m} values")))?;
    let bytes = n as u64 * 4;
    fits(dev, 3 * bytes, "explicit mul_mat baseline")?;
    let gpu = dev.gpu();
    let stream = dev.compute_stream();
    dev.compile_kernels()?;
    let mut r = vec![0f32; n];
    // Allocated before the clock starts, as hetmm's side allocates its buffers outside its own
    // timing: the time is the copies in, the kernel and the copy out (three allocations in the
    // time, found by an audit, favoured hetmm).
    let (da, db, dr) = (DeviceAlloc::new(gpu, bytes)?, DeviceAlloc::new(gpu, bytes)?, DeviceAlloc::new(gpu, bytes)?);
    let t = Instant::now();
    // SAFETY: `a` and `b` hold `n` values and outlive the wait below; the device buffers hold
    // `bytes` each.
    unsafe {
        driver::copy_htod(gpu, stream, da.ptr(), a.as_ptr() as usize, bytes)?;
        driver::copy_htod(gpu, stream, db.ptr(), b.as_ptr() as usize, bytes)?;
    }
    wait_stream(dev, stream)?;
    let tiles = (m as u64).div_ceil(u64::from(TILE)) as u32;
    let dims = Dims { grid: (tiles, tiles, 1), block: (TILE, TILE, 1) };
    let args = [Value::U64(dr.ptr()), Value::U64(da.ptr()), Value::U64(db.ptr()), Value::U64(m as u64)];
    let tk = Instant::now();
    // SAFETY: the arguments match `mul_mat`'s parameters; the three device buffers hold m*m
    // values each and live until the launch is waited on.
    let launch = unsafe { dev.launch_raw(&MUL_MAT, dims, &args)? };
    launch.wait(WAIT)?;
    let kernel = tk.elapsed();
    // SAFETY: `r` holds `n` values, not touched until the wait below.
    unsafe { driver::copy_dtoh(gpu, stream, r.as_mut_ptr() as usize, dr.ptr(), bytes)? };
    if let Err(e) = wait_stream(dev, stream) {
        // The copy may still write `r` and read `dr`: both are leaked rather than freed under it.
        std::mem::forget(r);
        std::mem::forget(dr);
        return Err(e);
    }
    // Timed before the frees: each waits for the GPU on a thread of its own (bounded), a cost
    // an explicit-copies program would not pay there.
    let total = t.elapsed();
    drop((da, db, dr));
    Ok((r, ExplicitTiming { total, kernel }))
}

/// Result of a managed-memory stream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ManagedRun {
    /// From the first GPU step (prefetch or launch) to the kernel's end.
    pub elapsed: Duration,
    /// The sum the kernel computed matched the CPU's.
    pub verified: bool,
}

/// A stream over `n` u64 values in `cuMemAllocManaged` memory that the CPU wrote first: the GPU
/// reads every value once, by demand paging, or after `cuMemPrefetchAsync` when `prefetch`.
/// Refuses sizes that do not fit in the GPU's free memory (managed memory is never
/// oversubscribed here).
pub fn managed_stream(dev: &CudaDevice, n: u64, prefetch: bool, seed: u64) -> Result<ManagedRun, CudaError> {
    let blocks = kernels::stream_sum_blocks(n);
    let bytes =
        n.checked_mul(8).filter(|&b| b > 0).ok_or_else(|| CudaError::Kernel("managed stream: bad size".into()))?;
    fits(dev, bytes + u64::from(blocks) * 8, "managed-memory stream baseline")?;
    dev.compile_kernels()?;
    let gpu = dev.gpu();
    let stream = dev.compute_stream();
    let mut src = ManagedAlloc::new(gpu, bytes)?;
    let mut out = ManagedAlloc::new(gpu, u64::from(blocks) * 8)?;
    // First touch on the CPU.
    let mut expect = 0u64;
    for (i, c) in src.host_mut(WAIT)?.chunks_exact_mut(8).enumerate() {
        let v = i as u64 ^ seed;
        c.copy_from_slice(&v.to_ne_bytes());
        expect = expect.wrapping_add(v);
    }
    out.host_mut(WAIT)?.fill(0);
    let t = Instant::now();
    if prefetch {
        src.prefetch(stream)?;
        out.prefetch(stream)?;
    }
    let dims = Dims { grid: (blocks, 1, 1), block: (kernels::THREADS, 1, 1) };
    let args = [Value::U64(src.ptr()), Value::U64(n), Value::U64(out.ptr())];
    // SAFETY: the arguments match `stream_sum`; `src` holds n values and `out` `blocks`
    // values, both managed memory alive, and not touched by the host, until the wait below.
    let launch = unsafe { dev.launch_raw(&STREAM_SUM, dims, &args)? };
    launch.wait(WAIT)?;
    let elapsed = t.elapsed();
    let got = out
        .host_mut(WAIT)?
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
        .fold(0u64, u64::wrapping_add);
    Ok(ManagedRun { elapsed, verified: got == expect })
}
