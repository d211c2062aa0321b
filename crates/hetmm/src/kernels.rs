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

/// The slices `(first element, length)` of at most [`SLICE`] elements that block `ctx` walks in a
/// buffer of `n` elements split into [`CHUNK`]-element blocks.
fn block_slices(ctx: &BlockCtx, n: usize) -> impl Iterator<Item = (usize, usize)> {
    let start = ctx.block_idx() as usize * CHUNK;
    let end = (start + CHUNK).min(n);
    (start..end).step_by(SLICE).map(move |i| (i, SLICE.min(end - i)))
}

fn grid(n: usize, per_block: usize) -> Grid {
    Grid { blocks: u32::try_from(n.div_ceil(per_block)).unwrap_or(u32::MAX), threads_per_block: 256 }
}

fn at<T>(base: u64, i: usize) -> u64 {
    base + (i * std::mem::size_of::<T>()) as u64
}

/// `y[i] = a * x[i] + y[i]` over `n` f32 values.
pub fn saxpy(a: f32, x: u64, y: u64, n: usize) -> (Grid, Kernel) {
    let k = move |ctx: &BlockCtx| {
        let (mut xs, mut ys) = (vec![0f32; SLICE], vec![0f32; SLICE]);
        for (i, len) in block_slices(ctx, n) {
            ctx.read_slice(at::<f32>(x, i), &mut xs[..len])?;
            ctx.read_slice(at::<f32>(y, i), &mut ys[..len])?;
            for (yv, xv) in ys[..len].iter_mut().zip(&xs[..len]) {
                *yv += a * xv;
            }
            ctx.write_slice(at::<f32>(y, i), &ys[..len])?;
        }
        Ok(())
    };
    (grid(n, CHUNK), Box::new(k))
}

/// Streams `n` u64 values: reads every one and adds them into `out[block]` (one partial sum per
/// block; `out` needs `grid.blocks` values). Returns the grid.
pub fn stream_sum(src: u64, n: usize, out: u64) -> (Grid, Kernel) {
    let k = move |ctx: &BlockCtx| {
        let mut buf = vec![0u64; SLICE];
        let mut sum = 0u64;
        for (i, len) in block_slices(ctx, n) {
            ctx.read_slice(at::<u64>(src, i), &mut buf[..len])?;
            sum = buf[..len].iter().fold(sum, |s, v| s.wrapping_add(*v));
        }
        ctx.store::<u64>(at::<u64>(out, ctx.block_idx() as usize), sum)
    };
    (grid(n, CHUNK), Box::new(k))
}

/// Like [`stream_sum`], but each value is first XORed with its index (`src[i] ^ i`): a checksum
/// that also sees where each value lies, so data moved to the wrong place (two pages exchanged)
/// changes it, which a plain sum does not.
pub fn stream_checksum(src: u64, n: usize, out: u64) -> (Grid, Kernel) {
    let k = move |ctx: &BlockCtx| {
        let mut buf = vec![0u64; SLICE];
        let mut sum = 0u64;
        for (i, len) in block_slices(ctx, n) {
            ctx.read_slice(at::<u64>(src, i), &mut buf[..len])?;
            sum = buf[..len].iter().zip(i as u64..).fold(sum, |s, (v, j)| s.wrapping_add(v ^ j));
        }
        ctx.store::<u64>(at::<u64>(out, ctx.block_idx() as usize), sum)
    };
    (grid(n, CHUNK), Box::new(k))
}

/// Writes `dst[i] = i as u64 ^ seed` for `n` values.
pub fn stream_write(dst: u64, n: usize, seed: u64) -> (Grid, Kernel) {
    let k = move |ctx: &BlockCtx| {
        let mut buf = vec![0u64; SLICE];
        for (i, len) in block_slices(ctx, n) {
            for (k, v) in buf[..len].iter_mut().enumerate() {
                *v = (i + k) as u64 ^ seed;
            }
            ctx.write_slice(at::<u64>(dst, i), &buf[..len])?;
        }
        Ok(())
    };
    (grid(n, CHUNK), Box::new(k))
}

/// Rows of `r` each block computes in [`mul_mat`].
pub const MUL_MAT_ROWS: usize = 32;

/// Rows of `b` [`mul_mat`] reads at a time (256 KiB at m = 1024: they stay in the L2 cache while
/// every tile of the band takes them in).
const MUL_MAT_K: usize = 64;

/// `r = a x b` for `m x m` row-major f32 matrices: the seed's `mul_mat_on_gpu(r, a, b, m)`.
/// Each block owns a band of rows of `r`, reads its rows of `a` once and streams the rows of `b`
/// (read once per band, 64 at a time), accumulating in block-local memory like a
/// GPU's shared memory. Every element sums its products in `k` order with fused multiply-adds
/// (as a GPU's FMA units do), as [`mul_mat_cpu`] does, so the two agree bit for bit.
pub fn mul_mat(r: u64, a: u64, b: u64, m: usize) -> (Grid, Kernel) {
    let k = move |ctx: &BlockCtx| {
        let i0 = ctx.block_idx() as usize * MUL_MAT_ROWS;
        let rows = MUL_MAT_ROWS.min(m.saturating_sub(i0));
        let mut a_band = vec![0f32; rows * m];
        ctx.read_slice(at::<f32>(a, i0 * m), &mut a_band)?;
        let mut acc = vec![0f32; rows * m];
        let mut b_rows = vec![0f32; MUL_MAT_K.min(m) * m];
        for k0 in (0..m).step_by(MUL_MAT_K) {
            let b_part = &mut b_rows[..MUL_MAT_K.min(m - k0) * m];
            ctx.read_slice(at::<f32>(b, k0 * m), b_part)?;
            band_update(&mut acc, &a_band, k0, b_part, m);
        }
        ctx.write_slice(at::<f32>(r, i0 * m), &acc)
    };
    (grid(m, MUL_MAT_ROWS), Box::new(k))
}

/// Whether this CPU has 512-bit vectors and fused multiply-adds (the standard library caches
/// the answer).
#[cfg(target_arch = "x86_64")]
fn has_avx512_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether this CPU has 256-bit vectors and fused multiply-adds.
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `acc += a_band[.., k0..k0 + kn] x b` for one band: `acc` and `a_band` hold its rows (`m`
/// long), `b` holds `kn` rows of the right-hand matrix starting at row `k0`. Compiled for the
/// widest vectors with fused multiply-adds the CPU has, with a register tile to match
/// (`f32::mul_add` is fused on every path, in hardware or in libm, so the results do not
/// depend on which one runs).
fn band_update(acc: &mut [f32], a_band: &[f32], k0: usize, b: &[f32], m: usize) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_fma() {
        // SAFETY: `band_update_avx512` requires AVX-512F and FMA, which the CPU was just found
        // to have.
        unsafe { band_update_avx512(acc, a_band, k0, b, m) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: `band_update_avx2` requires AVX2 and FMA, which the CPU was just found to have.
        unsafe { band_update_avx2(acc, a_band, k0, b, m) };
        return;
    }
    band_update_tiled::<4, 16>(acc, a_band, k0, b, m);
}

/// [`band_update_tiled`] with 8 x 32 tiles (sixteen 512-bit accumulators), compiled for
/// AVX-512F and FMA.
///
/// # Safety
///
/// The CPU must have AVX-512F and FMA. (The AVX-512 target features are stable from Rust 1.89,
/// the workspace's declared minimum for that reason.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn band_update_avx512(acc: &mut [f32], a_band: &[f32], k0: usize, b: &[f32], m: usize) {
    band_update_tiled::<8, 32>(acc, a_band, k0, b, m);
}

/// [`band_update_tiled`] with 4 x 16 tiles (eight 256-bit accumulators), compiled for AVX2
/// and FMA.
///
/// # Safety
///
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn band_update_avx2(acc: &mut [f32], a_band: &[f32], k0: usize, b: &[f32], m: usize) {
    band_update_tiled::<4, 16>(acc, a_band, k0, b, m);
}

/// The band's update in tiles of `R` rows by `C` columns of `acc`: each tile is held in
/// registers across all the rows of `b`, so every value of `b` loaded serves `R` rows and
/// `acc` is loaded and stored once per call, not once per row of `b`. The columns and rows
/// past the last whole tile are done element by element. Each element of `acc` takes its
/// products in `k` order either way.
#[inline(always)]
fn band_update_tiled<const R: usize, const C: usize>(acc: &mut [f32], a_band: &[f32], k0: usize, b: &[f32], m: usize) {
    let rows = acc.len() / m;
    let (tile_rows, tile_cols) = (rows / R * R, m / C * C);
    for i in (0..tile_rows).step_by(R) {
        for j in (0..tile_cols).step_by(C) {
            tile_update::<R, C>(acc, a_band, k0, b, m, i, j);
        }
    }
    edge_update(acc, a_band, k0, b, m, 0..rows, tile_cols..m);
    edge_update(acc, a_band, k0, b, m, tile_rows..rows, 0..tile_cols);
}

/// One `R x C` tile of `acc` at row `i`, column `j`: loaded into an array the compiler keeps in
/// vector registers, updated with every row of `b`, stored back.
#[inline(always)]
fn tile_update<const R: usize, const C: usize>(
    acc: &mut [f32],
    a_band: &[f32],
    k0: usize,
    b: &[f32],
    m: usize,
    i: usize,
    j: usize,
) {
    let mut t = [[0f32; C]; R];
    for (r, row) in t.iter_mut().enumerate() {
        row.copy_from_slice(&acc[(i + r) * m + j..][..C]);
    }
    for (k, b_row) in b.chunks_exact(m).enumerate() {
        let bk = &b_row[j..j + C];
        for (r, row) in t.iter_mut().enumerate() {
            let aik = a_band[(i + r) * m + k0 + k];
            for (c, bv) in row.iter_mut().zip(bk) {
                *c = aik.mul_add(*bv, *c);
            }
        }
    }
    for (r, row) in t.iter().enumerate() {
        acc[(i + r) * m + j..][..C].copy_from_slice(row);
    }
}

/// `acc += a_band x b` over `rows` x `cols` of `acc`, element by element (the part
/// [`band_update_tiled`]'s tiles do not cover).
fn edge_update(
    acc: &mut [f32],
    a_band: &[f32],
    k0: usize,
    b: &[f32],
    m: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) {
    if cols.is_empty() {
        return;
    }
    for i in rows {
        let acc_row = &mut acc[i * m..(i + 1) * m][cols.clone()];
        for (k, b_row) in b.chunks_exact(m).enumerate() {
            let aik = a_band[i * m + k0 + k];
            for (c, bv) in acc_row.iter_mut().zip(&b_row[cols.clone()]) {
                *c = aik.mul_add(*bv, *c);
            }
        }
    }
}

/// The same product on the CPU, in the same order of fused multiply-adds (for checking).
pub fn mul_mat_cpu(r: &mut [f32], a: &[f32], b: &[f32], m: usize) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: `mul_mat_cpu_avx2` requires AVX2 and FMA, which the CPU was just found to
        // have.
        unsafe { mul_mat_cpu_avx2(r, a, b, m) };
        return;
    }
    mul_mat_cpu_portable(r, a, b, m);
}

#[inline(always)]
fn mul_mat_cpu_portable(r: &mut [f32], a: &[f32], b: &[f32], m: usize) {
    r.fill(0.0);
    for i in 0..m {
        let row = &mut r[i * m..(i + 1) * m];
        for kk in 0..m {
            let aik = a[i * m + kk];
            for (c, bv) in row.iter_mut().zip(&b[kk * m..(kk + 1) * m]) {
                *c = aik.mul_add(*bv, *c);
            }
        }
    }
}

/// [`mul_mat_cpu_portable`] compiled for AVX2 and FMA (without them every `mul_add` is a call
/// into libm).
///
/// # Safety
///
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn mul_mat_cpu_avx2(r: &mut [f32], a: &[f32], b: &[f32], m: usize) {
    mul_mat_cpu_portable(r, a, b, m);
}

/// `b[i] = a[i] * mul + add` (wrapping) over `n` u64 values: a streaming kernel that reads one
/// buffer and writes another.
pub fn stream_map(a: u64, b: u64, n: usize, mul: u64, add: u64) -> (Grid, Kernel) {
    let k = move |ctx: &BlockCtx| {
        let mut buf = vec![0u64; SLICE];
        for (i, len) in block_slices(ctx, n) {
            ctx.read_slice(at::<u64>(a, i), &mut buf[..len])?;
            for v in &mut buf[..len] {
                *v = v.wrapping_mul(mul).wrapping_add(add);
            }
            ctx.write_slice(at::<u64>(b, i), &buf[..len])?;
        }
        Ok(())
    };
    (grid(n, CHUNK), Box::new(k))
}

/// Updates each block of [`gups`] performs.
pub const GUPS_PER_BLOCK: usize = 1024;

/// The `k`-th update of [`gups`] over a table of `n` values: `(index, increment)`. A
/// splitmix64 sequence, so the updates land at pseudo-random indices.
///
/// # Panics
///
/// If `n` is 0 (a table of no values has no index to update).
pub fn gups_update(seed: u64, k: u64, n: usize) -> (usize, u64) {
    let h = splitmix64(seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    ((h % n as u64) as usize, (h >> 40) | 1)
}

/// GUPS-style random updates: `updates` atomic adds of [`gups_update`]`(seed, k, n)` into the
/// u64 table at `table` (`n` values). The sum is order-independent, so the CPU can recompute
/// it.
pub fn gups(table: u64, n: usize, updates: usize, seed: u64) -> (Grid, Kernel) {
    let k = move |ctx: &BlockCtx| {
        let start = ctx.block_idx() as usize * GUPS_PER_BLOCK;
        let end = (start + GUPS_PER_BLOCK).min(updates);
        for k in start..end {
            let (idx, inc) = gups_update(seed, k as u64, n);
            ctx.atomic_add_u64(at::<u64>(table, idx), inc)?;
        }
        Ok(())
    };
    (grid(updates, GUPS_PER_BLOCK), Box::new(k))
}

/// splitmix64's output function.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Rows each block of [`jacobi5`] computes.
pub const JACOBI_ROWS: usize = 16;

/// One Jacobi sweep of a 5-point stencil over a `rows x cols` row-major u32 grid: every interior
/// cell of `dst` becomes the floor of the mean of its four neighbours in `src`; boundary cells
/// are copied. Exact integer arithmetic (values below 2^30 never overflow), so the CPU's
/// [`jacobi5_cpu`] matches bit for bit.
pub fn jacobi5(src: u64, dst: u64, rows: usize, cols: usize) -> (Grid, Kernel) {
    let k = move |ctx: &BlockCtx| {
        let i0 = ctx.block_idx() as usize * JACOBI_ROWS;
        let i1 = (i0 + JACOBI_ROWS).min(rows);
        // Rows i0-1 ..= i1 of src (clamped to the grid), read in one slice.
        let lo = i0.saturating_sub(1);
        let hi = (i1 + 1).min(rows);
        let mut inp = vec![0u32; (hi - lo) * cols];
        ctx.read_slice(at::<u32>(src, lo * cols), &mut inp)?;
        let mut out = vec![0u32; (i1 - i0) * cols];
        for i in i0..i1 {
            let o = &mut out[(i - i0) * cols..(i - i0 + 1) * cols];
            let c = &inp[(i - lo) * cols..(i - lo + 1) * cols];
            if i == 0 || i + 1 == rows {
                o.copy_from_slice(c);
                continue;
            }
            let n = &inp[(i - 1 - lo) * cols..(i - lo) * cols];
            let s = &inp[(i + 1 - lo) * cols..(i + 2 - lo) * cols];
            jacobi_row(o, n, c, s);
        }
        ctx.write_slice(at::<u32>(dst, i0 * cols), &out)
    };
    (grid(rows, JACOBI_ROWS), Box::new(k))
}

fn jacobi_row(o: &mut [u32], n: &[u32], c: &[u32], s: &[u32]) {
    let cols = o.len();
    if cols == 0 {
        return;
    }
    o[0] = c[0];
    o[cols - 1] = c[cols - 1];
    for j in 1..cols.saturating_sub(1) {
        o[j] = (n[j] + s[j] + c[j - 1] + c[j + 1]) / 4;
    }
}

/// [`jacobi5`] on the CPU (for checking).
///
/// # Panics
///
/// If `src` or `dst` holds fewer than `rows * cols` values.
pub fn jacobi5_cpu(src: &[u32], dst: &mut [u32], rows: usize, cols: usize) {
    for i in 0..rows {
        let o = &mut dst[i * cols..(i + 1) * cols];
        let c = &src[i * cols..(i + 1) * cols];
        if i == 0 || i + 1 == rows {
            o.copy_from_slice(c);
        } else {
            jacobi_row(o, &src[(i - 1) * cols..i * cols], c, &src[(i + 1) * cols..(i + 2) * cols]);
        }
    }
}

/// Vertices each block of [`bfs_level`] scans.
pub const BFS_VERTICES: usize = 4096;

/// Distance of a vertex [`bfs_level`] has not reached.
pub const BFS_UNREACHED: u32 = u32::MAX;

/// One level of a top-down breadth-first search over a CSR graph of `nv` vertices (`row_ptr`:
/// `nv + 1` u32 offsets into `col`, u32 neighbour ids; `dist`: `nv` u32): every vertex at
/// distance `level` claims its unreached neighbours for `level + 1` with a compare-and-swap.
/// The number of vertices claimed is added to the u64 at `claimed`. Irregular by nature: the
/// neighbours' distances are gathered from all over `dist`.
pub fn bfs_level(row_ptr: u64, col: u64, dist: u64, nv: usize, level: u32, claimed: u64) -> (Grid, Kernel) {
    let k = move |ctx: &BlockCtx| {
        let v0 = ctx.block_idx() as usize * BFS_VERTICES;
        let v1 = (v0 + BFS_VERTICES).min(nv);
        let mut d = vec![0u32; v1 - v0];
        ctx.read_slice(at::<u32>(dist, v0), &mut d)?;
        if !d.contains(&level) {
            return Ok(());
        }
        let mut rp = vec![0u32; v1 - v0 + 1];
        ctx.read_slice(at::<u32>(row_ptr, v0), &mut rp)?;
        let mut nbrs = Vec::new();
        let mut count = 0u64;
        for (i, _) in d.iter().enumerate().filter(|(_, dv)| **dv == level) {
            let (s, e) = (rp[i] as usize, rp[i + 1] as usize);
            nbrs.resize(e - s, 0u32);
            ctx.read_slice(at::<u32>(col, s), &mut nbrs)?;
            for &u in &nbrs {
                let du = at::<u32>(dist, u as usize);
                if ctx.load::<u32>(du)? == BFS_UNREACHED
                    && ctx.atomic_cas_u32(du, BFS_UNREACHED, level + 1)? == BFS_UNREACHED
                {
                    count += 1;
                }
            }
        }
        if count > 0 {
            ctx.atomic_add_u64(claimed, count)?;
        }
        Ok(())
    };
    (grid(nv, BFS_VERTICES), Box::new(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fractional values whose products and sums round, so a different order or an unfused
    /// multiply-add would show.
    fn values(n: usize, salt: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(salt) % 1000) as f32 / 7.0 - 50.0).collect()
    }

    /// Every tile shape, every compiled path and the element-by-element edge give the same bits
    /// as the CPU's product, at sizes with partial tiles in both directions and several chunks
    /// of `b`'s rows.
    #[test]
    fn tiled_band_updates_agree_bit_for_bit() {
        for m in [1usize, 7, 33, 100, 130] {
            let (a, b) = (values(m * m, 1), values(m * m, 2));
            let mut expect = vec![0f32; m * m];
            mul_mat_cpu(&mut expect, &a, &b, m);
            let mut portable = vec![0f32; m * m];
            mul_mat_cpu_portable(&mut portable, &a, &b, m);
            assert_eq!(bits(&portable), bits(&expect), "m = {m}: mul_mat_cpu's paths differ");
            type Update = fn(&mut [f32], &[f32], usize, &[f32], usize);
            let updates: [(&str, Update); 4] = [
                ("dispatched", band_update),
                ("8x32", band_update_tiled::<8, 32>),
                ("4x16", band_update_tiled::<4, 16>),
                ("edge only", |acc, a_band, k0, b, m| edge_update(acc, a_band, k0, b, m, 0..acc.len() / m, 0..m)),
            ];
            for (name, update) in updates {
                let mut got = vec![0f32; m * m];
                for i0 in (0..m).step_by(MUL_MAT_ROWS) {
                    let rows = MUL_MAT_ROWS.min(m - i0);
                    let (acc, a_band) = (&mut got[i0 * m..(i0 + rows) * m], &a[i0 * m..(i0 + rows) * m]);
                    for k0 in (0..m).step_by(MUL_MAT_K) {
                        let kn = MUL_MAT_K.min(m - k0);
                        update(acc, a_band, k0, &b[k0 * m..(k0 + kn) * m], m);
                    }
                }
                assert_eq!(bits(&got), bits(&expect), "m = {m}: {name} differs from the CPU's product");
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}
