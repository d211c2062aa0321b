//! `hetmm demo`: the seed's `mul_mat_on_gpu(r, a, b, m)` with no device allocation and no copies.

use std::process::ExitCode;
use std::time::Instant;

use hetmm::kernels::{mul_mat, mul_mat_cpu};
use hetmm::sim::{SimConfig, SimDevice};
use hetmm::{Hetmm, SharedBuf, Use};
use serde_json::json;

/// Options.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Matrix size (m x m f32).
    #[arg(long, default_value_t = 512)]
    m: usize,
    /// Device memory (e.g. 64M, 1G); smaller than the data forces eviction.
    #[arg(long, value_parser = super::size_arg, default_value = "1G")]
    device_mem: u64,
    /// Device: `sim` (the simulated accelerator) or `cuda` (an NVIDIA GPU).
    #[arg(long, default_value = "sim")]
    device: String,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Exact small-integer values: every product and sum is exact in f32, so GPU and CPU agree
/// bit for bit.
fn value(i: usize, salt: usize) -> f32 {
    ((i.wrapping_mul(2_654_435_761).wrapping_add(salt)) % 7) as f32
}

/// The CPU fills `a` and `b` through plain pointers.
fn fill_inputs(a: &mut SharedBuf<f32>, b: &mut SharedBuf<f32>) {
    for (i, v) in a.as_mut_slice().iter_mut().enumerate() {
        *v = value(i, 1);
    }
    for (i, v) in b.as_mut_slice().iter_mut().enumerate() {
        *v = value(i, 2);
    }
}

/// Values of `a` and `b` that differ from what [`fill_inputs`] wrote, plus values of `result`
/// that differ from the CPU's `a x b`: inputs the run lost or changed would otherwise give a
/// wrong product that the check, reading the same inputs back, reproduces.
fn mismatches(result: &[f32], a: &SharedBuf<f32>, b: &SharedBuf<f32>, m: usize) -> usize {
    let bad_inputs = a.as_slice().iter().enumerate().filter(|&(i, v)| *v != value(i, 1)).count()
        + b.as_slice().iter().enumerate().filter(|&(i, v)| *v != value(i, 2)).count();
    let mut expect = vec![0f32; m * m];
    mul_mat_cpu(&mut expect, &a.as_slice(), &b.as_slice(), m);
    bad_inputs + result.iter().zip(&expect).filter(|(x, y)| x != y).count() + result.len().abs_diff(expect.len())
}

/// Refuses matrices of `n` values that this machine cannot hold (three in shared memory, and the
/// copy of `r` and the CPU's product the check makes): they would get the process OOM-killed.
fn beyond_this_machine(n: usize) -> Option<ExitCode> {
    let need = (n as u128) * 4 * 5;
    let total = super::memory_total()?;
    (need > u128::from(total)).then(|| {
        eprintln!(
            "hetmm demo: m x m matrices need at least {} MiB of memory (three, a copy of r and the CPU's check); \
             this machine has {} MiB",
            need >> 20,
            total >> 20
        );
        ExitCode::FAILURE
    })
}

pub fn run(args: &Args) -> Result<ExitCode, hetmm::Error> {
    if args.device == "cuda" {
        return run_cuda(args);
    }
    if args.device != "sim" {
        eprintln!("hetmm demo: unknown device '{}' (use --device sim or --device cuda)", args.device);
        return Ok(ExitCode::FAILURE);
    }
    let m = args.m;
    if m == 0 {
        return Err(hetmm::Error::EmptyAlloc);
    }
    let n = m.checked_mul(m).ok_or(hetmm::Error::SizeOverflow { count: m, size: m })?;
    if let Some(code) = beyond_this_machine(n) {
        return Ok(code);
    }
    // A size within 2 MiB of 2^64 cannot be rounded up to 2 MiB.
    let mem = args
        .device_mem
        .div_ceil(2 << 20)
        .checked_mul(2 << 20)
        .ok_or(hetmm::Error::Sim(hetmm::sim::SimError::BadMemorySize(args.device_mem)))?;
    let hm = Hetmm::new()?;
    let dev = hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: mem, ..SimConfig::default() })?)?;
    let (mut a, mut b, r) = (hm.alloc::<f32>(n)?, hm.alloc::<f32>(n)?, hm.alloc::<f32>(n)?);

    // The CPU fills a and b through plain pointers.
    fill_inputs(&mut a, &mut b);

    // mul_mat_on_gpu(r, a, b, m): the device faults a and b in, computes, and the CPU reads r.
    let t = Instant::now();
    let (grid, k) = mul_mat(r.ptr(), a.ptr(), b.ptr(), m);
    dev.launch(grid, &[Use::read(&a), Use::read(&b), Use::write(&r)], k)?.wait()?;
    let result: Vec<f32> = r.as_slice().to_vec();
    let seconds = t.elapsed().as_secs_f64();

    let mismatches = mismatches(&result, &a, &b, m);
    let verified = mismatches == 0;
    let s = hm.stats();

    if args.json {
        let out = json!({
            "verified": verified, "m": m, "device": "sim", "seconds": seconds,
            "stats": {
                "cpu_faults": s.cpu_faults, "device_faults": s.device_faults, "fault_batches": s.fault_batches,
                "bytes_to_device": s.bytes_to_device, "bytes_to_host": s.bytes_to_host, "evictions": s.evictions,
            },
            "detail": s,
        });
        println!("{out}");
    } else {
        println!("hetmm demo: r = a x b, m = {m}, on the simulated device ({} MiB)", mem >> 20);
        println!(
            "  {} in {seconds:.3} s (device compute plus CPU read-back of r)",
            if verified { "verified against the CPU" } else { "MISMATCH" }
        );
        println!(
            "  device faults {} in {} batches, CPU faults {}, {} MiB to device, {} MiB to host, {} evictions",
            s.device_faults,
            s.fault_batches,
            s.cpu_faults,
            s.bytes_to_device >> 20,
            s.bytes_to_host >> 20,
            s.evictions
        );
        if !verified {
            println!("  {mismatches} of {} values (a, b and r) differ", 3 * n);
        }
    }
    Ok(if verified { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The same demo on an NVIDIA GPU: the CPU's pointers go to the CUDA `mul_mat` kernel; hetmm
/// migrates `a` and `b` to the GPU before the launch (a GPU cannot fault them in) and `r` comes
/// back when the CPU reads it.
fn run_cuda(args: &Args) -> Result<ExitCode, hetmm::Error> {
    use hetmm::cuda::{CudaConfig, CudaDevice, KernelCall};

    if let Some(why) = hetmm::cuda::skip_reason() {
        eprintln!("hetmm demo: --device cuda needs an NVIDIA GPU: {why}");
        return Ok(ExitCode::FAILURE);
    }
    let m = args.m;
    let n = m.checked_mul(m).filter(|&n| n > 0).ok_or(hetmm::Error::SizeOverflow { count: m, size: m })?;
    if let Some(code) = beyond_this_machine(n) {
        return Ok(code);
    }
    let gpu = CudaDevice::new(CudaConfig { memory_bytes: Some(args.device_mem), ..CudaConfig::default() })?;
    let name = gpu.name().to_string();
    let hm = Hetmm::new()?;
    let dev = hm.attach(gpu)?;
    let (mut a, mut b, r) = (hm.alloc::<f32>(n)?, hm.alloc::<f32>(n)?, hm.alloc::<f32>(n)?);
    fill_inputs(&mut a, &mut b);
    dev.driver().compile_kernels()?;

    let t = Instant::now();
    let call = KernelCall::mul_mat((&r).into(), (&a).into(), (&b).into(), m as u64)?;
    dev.launch(&call)?.wait()?;
    let result: Vec<f32> = r.as_slice().to_vec();
    let seconds = t.elapsed().as_secs_f64();

    let mismatches = mismatches(&result, &a, &b, m);
    let verified = mismatches == 0;
    let s = hm.stats();
    let place = dev.driver().region_placement(a.ptr());
    let same = place.is_some_and(|p| p.same_address());
    if args.json {
        let out = json!({
            "verified": verified, "m": m, "device": "cuda", "gpu": name, "seconds": seconds,
            "same_address": same,
            "stats": {
                "cpu_faults": s.cpu_faults, "bytes_to_device": s.bytes_to_device,
                "bytes_to_host": s.bytes_to_host, "evictions": s.evictions,
            },
            "detail": s,
        });
        println!("{out}");
    } else {
        println!("hetmm demo: r = a x b, m = {m}, on {name}");
        println!(
            "  {} in {seconds:.3} s (migration to the GPU, kernel, CPU read-back of r)",
            if verified { "verified against the CPU" } else { "MISMATCH" }
        );
        println!(
            "  device pointers {} host pointers; {} MiB to device, {} MiB to host, {} CPU faults, {} evictions",
            if same { "equal to" } else { "offset from" },
            s.bytes_to_device >> 20,
            s.bytes_to_host >> 20,
            s.cpu_faults,
            s.evictions
        );
        if !verified {
            println!("  {mismatches} of {} values (a, b and r) differ", 3 * n);
        }
    }
    Ok(if verified { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check compares r with the product of the inputs the CPU wrote. It used the inputs as
    /// read back after the run: had the manager lost them (a and b zeros after their trip to
    /// the device), r = 0 x 0 matched the CPU's 0 x 0 and the demo said "verified".
    #[test]
    fn demo_check_catches_inputs_lost_on_the_way() {
        let m = 4;
        let hm = Hetmm::new().unwrap();
        let (a, b) = (hm.alloc::<f32>(m * m).unwrap(), hm.alloc::<f32>(m * m).unwrap());
        // Freshly allocated: zeros, as if the values written had been lost.
        let r = vec![0f32; m * m];
        assert!(mismatches(&r, &a, &b, m) > 0, "zeros in, zeros out passed as verified");
        // And intact inputs with their right product pass.
        let (mut a, mut b) = (a, b);
        fill_inputs(&mut a, &mut b);
        let mut r = vec![0f32; m * m];
        mul_mat_cpu(&mut r, &a.as_slice(), &b.as_slice(), m);
        assert_eq!(mismatches(&r, &a, &b, m), 0);
    }
}
