//! Kernels for the simulated device: plain Rust closures over a grid of blocks, every memory
//! access translated by the device's TLB and page table. Each function returns the grid and the
//! kernel, ready for [`crate::Device::launch`].

use hetmm_core::device::DeviceError;
use hetmm_sim::{BlockCtx, Grid};

/// Elements each block of the streaming kernels handles (256 KiB of f32).
const CHUNK: usize = 64 * 1024;
/// Elements per slice access inside a block (16 KiB of f32: four pages).
const SLICE: usize = 4096;

type Kernel = Box<dyn Fn(&BlockCtx) -> Result<(), DeviceError> + Send + Sync>;

fn grid(n: usize, per_block: usize) -> Grid {
    Grid { blocks: u32::try_from(n.div_ceil(per_block)).unwrap_or(u32::MAX), threads_per_block: 256 }
}

fn at<T>(base: u64, i: usize) -> u64 {
    base + (i * std::mem::size_of::<T>()) as u64
}

/// `y[i] = a * x[i] + y[i]` over `n` f32 values.
pub fn saxpy(a: f32, x: u64, y: u64, n: usize) -> (Grid, Kernel) {
    let k = move |ctx: &BlockCtx| {
        let start = ctx.block_idx() as usize * CHUNK;
        let end = (start + CHUNK).min(n);
        let (mut xs, mut ys) = (vec![0f32; SLICE], vec![0f32; SLICE]);
        let mut i = start;
        while i < end {
            let len = SLICE.min(end - i);
            ctx.read_slice(at::<f32>(x, i), &mut xs[..len])?;
            ctx.read_slice(at::<f32>(y, i), &mut ys[..len])?;
            for (yv, xv) in ys[..len].iter_mut().zip(&xs[..len]) {
                *yv += a * xv;
            }
            ctx.write_slice(at::<f32>(y, i), &ys[..len])?;
            i += len;
        }
        Ok(())
    };
    (grid(n, CHUNK), Box::new(k))
}

/// Streams `n` u64 values: reads every one and adds them into `out[block]` (one partial sum per
/// block; `out` needs `grid.blocks` values). Returns the grid.
pub fn stream_sum(src: u64, n: usize, out: u64) -> (Grid, Kernel) {
    let k = move |ctx: &BlockCtx| {
        let b = ctx.block_idx() as usize;
        let start = b * CHUNK;
        let end = (start + CHUNK).min(n);
        let mut buf = vec![0u64; SLICE];
        let mut sum = 0u64;
        let mut i = start;
        while i < end {
            let len = SLICE.min(end - i);
            ctx.read_slice(at::<u64>(src, i), &mut buf[..len])?;
            sum = buf[..len].iter().fold(sum, |s, v| s.wrapping_add(*v));
            i += len;
        }
        ctx.store::<u64>(at::<u64>(out, b), sum)
    };
    (grid(n, CHUNK), Box::new(k))
}

/// Writes `dst[i] = i as u64 ^ seed` for `n` values.
pub fn stream_write(dst: u64, n: usize, seed: u64) -> (Grid, Kernel) {
    let k = move |ctx: &BlockCtx| {
        let start = ctx.block_idx() as usize * CHUNK;
        let end = (start + CHUNK).min(n);
        let mut buf = vec![0u64; SLICE];
        let mut i = start;
        while i < end {
            let len = SLICE.min(end - i);
            for (k, v) in buf[..len].iter_mut().enumerate() {
                *v = (i + k) as u64 ^ seed;
            }
            ctx.write_slice(at::<u64>(dst, i), &buf[..len])?;
            i += len;
        }
        Ok(())
    };
    (grid(n, CHUNK), Box::new(k))
}

/// Rows of `r` each block computes in [`mul_mat`].
pub const MUL_MAT_ROWS: usize = 16;

/// `r = a x b` for `m x m` row-major f32 matrices: the seed's `mul_mat_on_gpu(r, a, b, m)`.
/// Each block owns a band of rows of `r`, reads its rows of `a` once and streams the rows of `b`
/// (read once per band), accumulating in block-local memory like a GPU's shared memory.
pub fn mul_mat(r: u64, a: u64, b: u64, m: usize) -> (Grid, Kernel) {
    let k = move |ctx: &BlockCtx| {
        let i0 = ctx.block_idx() as usize * MUL_MAT_ROWS;
        let rows = MUL_MAT_ROWS.min(m.saturating_sub(i0));
        let mut a_band = vec![0f32; rows * m];
        ctx.read_slice(at::<f32>(a, i0 * m), &mut a_band)?;
        let mut acc = vec![0f32; rows * m];
        let mut b_row = vec![0f32; m];
        for kk in 0..m {
            ctx.read_slice(at::<f32>(b, kk * m), &mut b_row)?;
            for (i, acc_row) in acc.chunks_exact_mut(m).enumerate() {
                let aik = a_band[i * m + kk];
                for (c, bv) in acc_row.iter_mut().zip(&b_row) {
                    *c += aik * bv;
                }
            }
        }
        ctx.write_slice(at::<f32>(r, i0 * m), &acc)
    };
    (grid(m, MUL_MAT_ROWS), Box::new(k))
}

/// The same product on the CPU, in the same summation order (for checking).
pub fn mul_mat_cpu(r: &mut [f32], a: &[f32], b: &[f32], m: usize) {
    r.fill(0.0);
    for i in 0..m {
        let row = &mut r[i * m..(i + 1) * m];
        for kk in 0..m {
            let aik = a[i * m + kk];
            for (c, bv) in row.iter_mut().zip(&b[kk * m..(kk + 1) * m]) {
                *c += aik * bv;
            }
        }
    }
}
