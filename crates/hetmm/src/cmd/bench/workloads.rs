//! The workloads. Each call runs one repeat in a fresh address space with a fresh simulated
//! device of `working set / oversub` bytes (whole 2 MiB blocks: see [`device_memory`]), writes
//! the data from the CPU first (so it starts on the CPU), times the workload's own section,
//! checks the result outside the timing, and returns one [`Sample`] per row it reports.

use std::collections::{HashMap, VecDeque};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hetmm::core::stats::StatsSnapshot;
use hetmm::core::types::{BLOCK_SIZE, PAGE_SIZE};
use hetmm::kernels::{
    bfs_level, gups, gups_update, jacobi5, jacobi5_cpu, mul_mat, mul_mat_cpu, splitmix64, stream_checksum, stream_map,
    BFS_UNREACHED,
};
use hetmm::sim::{SimConfig, SimDevice};
use hetmm::{Advice, Device, Hetmm, SharedBuf, Use};
use serde_json::{json, Map, Value};

use super::cpuuse::{CpuClock, CpuUse};

pub type Result<T, E = hetmm::Error> = std::result::Result<T, E>;

/// Advice variants of `pingpong` and `readmostly`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AdviceKind {
    /// No advice.
    None,
    /// `Advice::ReadMostly(true)` on the shared buffer.
    ReadMostly,
}

impl AdviceKind {
    pub fn name(self) -> &'static str {
        match self {
            AdviceKind::None => "none",
            AdviceKind::ReadMostly => "read_mostly",
        }
    }
}

/// One repeat of one workload.
#[derive(Clone, Copy, Debug)]
pub struct Run<'a> {
    pub policy: &'a str,
    pub oversub: f64,
    /// Requested working set (bytes).
    pub size: u64,
    pub advice: AdviceKind,
    pub rep: usize,
    /// The simulated device's link to host memory ([`SimConfig::link_gbps`]).
    pub link_gbps: Option<u32>,
}

/// What one repeat measured for one row.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Row name: the workload, or `workload/variant`.
    pub row: String,
    /// Seconds of the timed section.
    pub seconds: f64,
    /// Bytes the timed section reads and writes, as the program sees them.
    pub bytes: u64,
    /// Bytes of shared memory the workload uses.
    pub working_set: u64,
    /// Bytes of device memory.
    pub device_memory: u64,
    pub verified: bool,
    /// Counters over the timed section.
    pub stats: StatsSnapshot,
    /// CPU time over the timed section: ours, the rest of the machine's, steal.
    pub cpu: CpuUse,
    /// Workload-specific fields.
    pub extra: Map<String, Value>,
}

/// Results the CPU computes once per shape and reuses across runs (inputs are deterministic).
#[derive(Debug, Default)]
pub struct Cache {
    gemm: HashMap<usize, Arc<Vec<f32>>>,
    stencil: HashMap<(usize, usize), Arc<StencilRef>>,
    graph: HashMap<usize, Arc<Graph>>,
}

/// Device memory for a working set at an oversubscription: `ws / oversub` in whole 2 MiB blocks
/// (at least one): rounded up where the working set is meant to fit (oversub at most 1), to the
/// nearest block where it is meant not to. Rounding up there too gave a working set just past a
/// multiple of 2 MiB a whole block more than asked (`graph` at `--size 256M`, x2: really x1.78).
pub fn device_memory(ws: u64, oversub: f64) -> u64 {
    let blocks = ws as f64 / oversub / BLOCK_SIZE as f64;
    let blocks = if oversub <= 1.0 { blocks.ceil() } else { blocks.round() } as u64;
    blocks.max(1).saturating_mul(BLOCK_SIZE)
}

struct Env {
    hm: Hetmm,
    dev: Device<SimDevice>,
    mem: u64,
}

fn env(r: &Run, ws: u64) -> Result<Env> {
    let mem = device_memory(ws, r.oversub);
    let hm = Hetmm::with_policy(r.policy)?;
    let cfg = SimConfig { memory_bytes: mem, prefault: true, link_gbps: r.link_gbps, ..SimConfig::default() };
    let dev = hm.attach_sim(SimDevice::new(cfg)?)?;
    Ok(Env { hm, dev, mem })
}

/// What a timed section moved: the core's counters and the device's remote accesses.
struct Moved {
    core: StatsSnapshot,
    remote_bytes: u64,
    link_ns: u64,
    cpu: CpuUse,
}

/// Waits (at most 250 ms) until the CPU-fault counters stop changing. hetmm adds a CPU fault's
/// time just after it lets the faulting thread go ([`Hetmm::stats`]): a snapshot taken at once
/// can miss it, and the next interval would get it. (The fault and its pages, and a failure, are
/// counted before the thread goes:
/// until that was so, the CPU's set-up writes showed up as CPU faults in device kernels' rows.)
fn settle_counters(e: &Env) {
    let key = |s: StatsSnapshot| (s.cpu_faults, s.cpu_fault_pages, s.cpu_fault_errors, s.ns_cpu_fault);
    let deadline = Instant::now() + Duration::from_millis(250);
    let mut last = key(e.hm.stats());
    loop {
        std::thread::sleep(Duration::from_millis(3));
        let now = key(e.hm.stats());
        if now == last || Instant::now() > deadline {
            return;
        }
        last = now;
    }
}

/// Runs `f` and returns its result, its seconds and the counters it moved.
fn timed<R>(e: &Env, f: impl FnOnce() -> Result<R>) -> Result<(R, f64, Moved)> {
    settle_counters(e);
    let (s0, d0) = (e.hm.stats(), e.dev.driver().stats());
    let c0 = CpuClock::now();
    let t = Instant::now();
    let r = f()?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = c0.until(&CpuClock::now());
    // Outside the timing: the section's last CPU fault is counted in it, not in the next one.
    settle_counters(e);
    let d = e.dev.driver().stats();
    let moved = Moved {
        core: e.hm.stats().since(&s0),
        remote_bytes: d.remote_bytes - d0.remote_bytes,
        link_ns: d.link_busy_ns - d0.link_busy_ns,
        cpu,
    };
    Ok((r, secs, moved))
}

fn sample(row: &str, e: &Env, ws: u64, bytes: u64, secs: f64, moved: Moved, ok: bool) -> Sample {
    // The check's own CPU faults are counted (errors included) before `cpu_fault_errors` is read.
    settle_counters(e);
    let mut extra = Map::new();
    extra.insert("remote_bytes".into(), json!(moved.remote_bytes));
    extra.insert("link_seconds".into(), json!(moved.link_ns as f64 / 1e9));
    extra.insert("link_gbps".into(), json!(e.dev.driver().config().link_gbps));
    Sample {
        row: row.to_string(),
        seconds: secs,
        bytes,
        working_set: ws,
        device_memory: e.mem,
        // A CPU fault hetmm could not serve fails the run even if the data came out right.
        verified: ok && e.hm.stats().cpu_fault_errors == 0,
        stats: moved.core,
        cpu: moved.cpu,
        extra,
    }
}

fn wsum(s: &[u64]) -> u64 {
    s.iter().fold(0u64, |a, v| a.wrapping_add(*v))
}

/// The wrapping sum of `v ^ index` over `s`, whose first value has index `first`: the checksum
/// of [`stream_checksum`], which (unlike a plain sum) changes when values change places.
fn xsum(s: &[u64], first: usize) -> u64 {
    s.iter().zip(first as u64..).fold(0u64, |a, (v, i)| a.wrapping_add(v ^ i))
}

fn seed_of(rep: usize) -> u64 {
    splitmix64(0x5EED ^ rep as u64)
}

/// `stream`: the kernel reads A and writes B = 3 A + seed (u64, half the working set each; both
/// written by the CPU first). Row `stream`: the kernel, through device faults. Row
/// `stream/cpu-reread`: the CPU then reads all of B (half the working set) back, from the device
/// when it fits there.
pub fn stream(r: &Run) -> Result<Vec<Sample>> {
    let n = (r.size / 16).max(1) as usize;
    let ws = n as u64 * 16;
    let e = env(r, ws)?;
    let seed = seed_of(r.rep);
    let mut a = e.hm.alloc::<u64>(n)?;
    let mut b = e.hm.alloc::<u64>(n)?;
    let init = |i: usize| (i as u64) ^ seed.rotate_left(17);
    for (i, v) in a.as_mut_slice().iter_mut().enumerate() {
        *v = init(i);
    }
    b.as_mut_slice().fill(0xDEAD_BEEF_DEAD_BEEF);
    let (grid, k) = stream_map(a.ptr(), b.ptr(), n, 3, seed);
    let ((), secs, st) = timed(&e, || e.dev.launch(grid, &[Use::read(&a), Use::write(&b)], k)?.wait())?;
    let dev_row = sample("stream", &e, ws, ws, secs, st, true);

    // The CPU reads B back: data the device wrote, so on the device (as much of it as fits)
    // whatever the policy does with A's read-only pages.
    let (sum, secs2, st2) = timed(&e, || Ok(black_box(wsum(&b.as_slice()))))?;
    let (sa, sb) = (a.as_slice(), b.as_slice());
    let mut ok = true;
    let mut expect = 0u64;
    for i in 0..n {
        let (x, y) = (init(i), init(i).wrapping_mul(3).wrapping_add(seed));
        ok &= sa[i] == x && sb[i] == y;
        expect = expect.wrapping_add(y);
    }
    ok &= sum == expect;
    let mut dev_row = dev_row;
    // `&=`: the row already fails if a CPU fault could not be served.
    dev_row.verified &= ok;
    dev_row.extra.insert("phase".into(), json!("device"));
    let mut re = sample("stream/cpu-reread", &e, ws, b.byte_len(), secs2, st2, ok);
    re.extra.insert("phase".into(), json!("cpu_reread"));
    Ok(vec![dev_row, re])
}

/// `random`: GUPS-style atomic adds at pseudo-random indices of a u64 table (the whole working
/// set, initialised by the CPU); one update per 4 KiB of table.
pub fn random(r: &Run) -> Result<Vec<Sample>> {
    let n = (r.size / 8).max(1) as usize;
    let ws = n as u64 * 8;
    let updates = (n / 512).max(1024);
    let e = env(r, ws)?;
    let seed = seed_of(r.rep);
    let mut t = e.hm.alloc::<u64>(n)?;
    for (i, v) in t.as_mut_slice().iter_mut().enumerate() {
        *v = i as u64;
    }
    let (grid, k) = gups(t.ptr(), n, updates, seed);
    let ((), secs, st) = timed(&e, || e.dev.launch(grid, &[Use::write(&t)], k)?.wait())?;
    let mut expect: Vec<u64> = (0..n as u64).collect();
    for k in 0..updates as u64 {
        let (i, inc) = gups_update(seed, k, n);
        expect[i] = expect[i].wrapping_add(inc);
    }
    let ok = t.as_slice() == expect[..];
    let mut s = sample("random", &e, ws, updates as u64 * 16, secs, st, ok);
    s.extra.insert("updates".into(), json!(updates));
    s.extra.insert("gups".into(), json!(updates as f64 / secs / 1e9));
    Ok(vec![s])
}

/// Largest matrix side of `gemm` (its compute grows as m^3: this keeps a run near a second on
/// the simulated device).
pub const GEMM_MAX_M: usize = 1024;

fn gemm_value(i: usize, salt: usize) -> f32 {
    ((i.wrapping_mul(2_654_435_761).wrapping_add(salt)) % 7) as f32
}

/// `gemm`: r = a x b (m x m f32, three matrices; m from the working set, capped at
/// [`GEMM_MAX_M`]) with the banded kernel: every band of rows re-reads all of b. Small-integer
/// values keep the products exact, so the check is bit for bit.
pub fn gemm(r: &Run, cache: &mut Cache) -> Result<Vec<Sample>> {
    let m = ((((r.size / 12) as f64).sqrt() as usize) / 16 * 16).clamp(16, GEMM_MAX_M);
    let n = m * m;
    let ws = n as u64 * 12;
    let e = env(r, ws)?;
    let (mut a, mut b, mut c) = (e.hm.alloc::<f32>(n)?, e.hm.alloc::<f32>(n)?, e.hm.alloc::<f32>(n)?);
    for (i, v) in a.as_mut_slice().iter_mut().enumerate() {
        *v = gemm_value(i, 1);
    }
    for (i, v) in b.as_mut_slice().iter_mut().enumerate() {
        *v = gemm_value(i, 2);
    }
    c.as_mut_slice().fill(-1.0);
    let (grid, k) = mul_mat(c.ptr(), a.ptr(), b.ptr(), m);
    let ((), secs, st) = timed(&e, || e.dev.launch(grid, &[Use::read(&a), Use::read(&b), Use::write(&c)], k)?.wait())?;
    let expect = cache
        .gemm
        .entry(m)
        .or_insert_with(|| {
            let mut x = vec![0f32; n];
            let av: Vec<f32> = (0..n).map(|i| gemm_value(i, 1)).collect();
            let bv: Vec<f32> = (0..n).map(|i| gemm_value(i, 2)).collect();
            mul_mat_cpu(&mut x, &av, &bv, m);
            Arc::new(x)
        })
        .clone();
    let ok = c.as_slice() == expect[..]
        && a.as_slice().iter().enumerate().all(|(i, v)| *v == gemm_value(i, 1))
        && b.as_slice().iter().enumerate().all(|(i, v)| *v == gemm_value(i, 2));
    // Bytes the kernel reads and writes: a once, b once per band of rows, r once.
    let bands = m.div_ceil(hetmm::kernels::MUL_MAT_ROWS) as u64;
    let bytes = (n as u64 * 4) * (2 + bands);
    let mut s = sample("gemm", &e, ws, bytes, secs, st, ok);
    s.extra.insert("m".into(), json!(m));
    s.extra.insert("gflops".into(), json!(2.0 * (m as f64).powi(3) / secs / 1e9));
    Ok(vec![s])
}

/// Jacobi sweeps of `stencil` (even: the result ends in the first grid).
pub const STENCIL_ITERS: usize = 4;

#[derive(Debug)]
struct StencilRef {
    init: Vec<u32>,
    /// After the last sweep (in grid 0) and the one before (in grid 1).
    last: Vec<u32>,
    prev: Vec<u32>,
}

/// `stencil`: [`STENCIL_ITERS`] Jacobi sweeps of a 2D 5-point stencil over a square u32 grid,
/// ping-ponging two grids (half the working set each), one launch per sweep.
pub fn stencil(r: &Run, cache: &mut Cache) -> Result<Vec<Sample>> {
    let side = (((r.size / 8) as f64).sqrt() as usize).max(4);
    let (rows, cols) = (side, side);
    let n = rows * cols;
    let ws = n as u64 * 8;
    let reference = cache
        .stencil
        .entry((rows, cols))
        .or_insert_with(|| {
            let init: Vec<u32> = (0..n).map(|i| (splitmix64(i as u64) >> 44) as u32).collect();
            let (mut x, mut y) = (init.clone(), vec![0u32; n]);
            for _ in 0..STENCIL_ITERS / 2 {
                jacobi5_cpu(&x, &mut y, rows, cols);
                jacobi5_cpu(&y, &mut x, rows, cols);
            }
            Arc::new(StencilRef { init, last: x, prev: y })
        })
        .clone();
    let e = env(r, ws)?;
    let mut g0 = e.hm.alloc::<u32>(n)?;
    let mut g1 = e.hm.alloc::<u32>(n)?;
    g0.as_mut_slice().copy_from_slice(&reference.init);
    g1.as_mut_slice().fill(u32::MAX);
    let ((), secs, st) = timed(&e, || {
        for it in 0..STENCIL_ITERS {
            let (src, dst) = if it % 2 == 0 { (&g0, &g1) } else { (&g1, &g0) };
            let (grid, k) = jacobi5(src.ptr(), dst.ptr(), rows, cols);
            e.dev.launch(grid, &[Use::read(src), Use::write(dst)], k)?.wait()?;
        }
        Ok(())
    })?;
    let ok = g0.as_slice() == reference.last[..] && g1.as_slice() == reference.prev[..];
    let bytes = STENCIL_ITERS as u64 * 2 * n as u64 * 4;
    let mut s = sample("stencil", &e, ws, bytes, secs, st, ok);
    s.extra.insert("grid".into(), json!([rows, cols]));
    s.extra.insert("iterations".into(), json!(STENCIL_ITERS));
    Ok(vec![s])
}

#[derive(Debug)]
struct Graph {
    row_ptr: Vec<u32>,
    col: Vec<u32>,
    dist: Vec<u32>,
    levels: u32,
}

impl Graph {
    /// A deterministic pseudo-random graph: 4 to 12 neighbours per vertex (8 on average), half
    /// of them near the vertex, half anywhere.
    fn new(nv: usize) -> Self {
        let mut row_ptr = Vec::with_capacity(nv + 1);
        let mut col = Vec::with_capacity(nv * 8);
        row_ptr.push(0u32);
        for v in 0..nv {
            let h = splitmix64(v as u64 ^ 0x6EA9);
            let deg = 4 + (h % 9) as usize;
            for j in 0..deg {
                let g = splitmix64(h.wrapping_add(j as u64));
                let u = if g & 1 == 0 { (v + 1 + (g >> 1) as usize % 64) % nv } else { (g >> 8) as usize % nv };
                col.push(u as u32);
            }
            row_ptr.push(col.len() as u32);
        }
        let mut dist = vec![BFS_UNREACHED; nv];
        dist[0] = 0;
        let mut q = VecDeque::from([0usize]);
        let mut levels = 0;
        while let Some(v) = q.pop_front() {
            for &u in &col[row_ptr[v] as usize..row_ptr[v + 1] as usize] {
                if dist[u as usize] == BFS_UNREACHED {
                    dist[u as usize] = dist[v] + 1;
                    levels = levels.max(dist[v] + 1);
                    q.push_back(u as usize);
                }
            }
        }
        Graph { row_ptr, col, dist, levels }
    }
}

/// Most levels `graph` runs before giving up.
const GRAPH_MAX_LEVELS: usize = 1024;

/// `graph`: a breadth-first search from vertex 0 over a pseudo-random CSR graph of an eighth of
/// `--size` (about 40 bytes per vertex: a gather per edge is slow on the simulated device),
/// one launch per level, the CPU reading the level's count between
/// launches; the distances are checked against the CPU's BFS.
pub fn graph(r: &Run, cache: &mut Cache) -> Result<Vec<Sample>> {
    let nv = ((r.size / 8 / 40) as usize).max(64);
    let g = cache.graph.entry(nv).or_insert_with(|| Arc::new(Graph::new(nv))).clone();
    let ne = g.col.len();
    let ws = (nv as u64 + 1) * 4 + ne as u64 * 4 + nv as u64 * 4 + GRAPH_MAX_LEVELS as u64 * 8;
    let e = env(r, ws)?;
    let mut rp = e.hm.alloc::<u32>(nv + 1)?;
    let mut col = e.hm.alloc::<u32>(ne.max(1))?;
    let mut dist = e.hm.alloc::<u32>(nv)?;
    let mut claimed = e.hm.alloc::<u64>(GRAPH_MAX_LEVELS)?;
    rp.as_mut_slice().copy_from_slice(&g.row_ptr);
    col.as_mut_slice()[..ne].copy_from_slice(&g.col);
    dist.as_mut_slice().fill(BFS_UNREACHED);
    dist.as_mut_slice()[0] = 0;
    claimed.as_mut_slice().fill(0);
    let (levels, secs, st) = timed(&e, || {
        let mut level = 0usize;
        while level < GRAPH_MAX_LEVELS {
            let slot = claimed.ptr() + level as u64 * 8;
            let (grid, k) = bfs_level(rp.ptr(), col.ptr(), dist.ptr(), nv, level as u32, slot);
            let uses = [Use::read(&rp), Use::read(&col), Use::write(&dist), Use::write(&claimed)];
            e.dev.launch(grid, &uses, k)?.wait()?;
            level += 1;
            if claimed.as_slice()[level - 1] == 0 {
                break;
            }
        }
        Ok(level)
    })?;
    let ok = dist.as_slice() == g.dist[..]
        && rp.as_slice() == g.row_ptr[..]
        && col.as_slice()[..ne] == g.col[..]
        && levels as u32 == g.levels + 1;
    // Bytes: every level scans dist; every edge is read once and its target's distance
    // gathered once.
    let bytes = levels as u64 * nv as u64 * 4 + (nv as u64 + 1) * 4 + ne as u64 * 8;
    let mut s = sample("graph", &e, ws, bytes, secs, st, ok);
    s.extra.insert("vertices".into(), json!(nv));
    s.extra.insert("edges".into(), json!(ne));
    s.extra.insert("levels".into(), json!(levels));
    Ok(vec![s])
}

/// Rounds of `pingpong`.
pub const PINGPONG_ROUNDS: usize = 8;
/// Rounds of `readmostly`.
pub const READMOSTLY_ROUNDS: usize = 8;
/// CPU reader threads of `readmostly`.
pub const READMOSTLY_CPU_THREADS: usize = 2;

const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;

/// A shared u64 buffer of the whole working set for `pingpong`/`readmostly`, written by the CPU,
/// with the advice applied; plus the per-block partial checksums of [`stream_checksum`].
struct ReadBuf {
    buf: SharedBuf<u64>,
    out: SharedBuf<u64>,
    n: usize,
    /// [`xsum`] of the whole buffer: position-sensitive, so exchanged pages fail the checks.
    expect: u64,
    /// What the words were made from (see [`ReadBuf::all_as_written`]).
    seed: u64,
}

impl ReadBuf {
    fn new(e: &Env, n: usize, advice: AdviceKind, seed: u64) -> Result<Self> {
        let mut buf = e.hm.alloc::<u64>(n)?;
        let (grid, _) = stream_checksum(buf.ptr(), n, 0);
        let out = e.hm.alloc::<u64>(grid.blocks as usize)?;
        if advice == AdviceKind::ReadMostly {
            e.hm.advise_buf(&buf, Advice::ReadMostly(true))?.wait(Duration::from_secs(60))?;
        }
        let mut expect = 0u64;
        for (i, v) in buf.as_mut_slice().iter_mut().enumerate() {
            *v = splitmix64(i as u64 ^ seed) >> 8;
            expect = expect.wrapping_add(*v ^ i as u64);
        }
        Ok(ReadBuf { buf, out, n, expect, seed })
    }

    /// The device reads everything; returns whether its checksum was right.
    fn device_read(&self, e: &Env) -> Result<bool> {
        let (grid, k) = stream_checksum(self.buf.ptr(), self.n, self.out.ptr());
        e.dev.launch(grid, &[Use::read(&self.buf), Use::write(&self.out)], k)?.wait()?;
        Ok(wsum(&self.out.as_slice()) == self.expect)
    }

    /// The CPU reads everything, starting at word `from`; returns whether its checksum was right.
    fn cpu_read(&self, from: usize) -> bool {
        let s = self.buf.as_slice();
        let (hi, lo) = s.split_at(from.min(self.n));
        let from = hi.len();
        black_box(xsum(lo, from).wrapping_add(xsum(hi, 0))) == self.expect
    }

    /// The page [`ReadBuf::cpu_write`] changes in `round`, of `pages`.
    fn page_of(round: usize, pages: usize) -> usize {
        (round.wrapping_mul(7919) + 13) % pages
    }

    /// The CPU changes one page (picked by `round`).
    fn cpu_write(&mut self, round: usize) {
        let pages = self.n.div_ceil(WORDS_PER_PAGE);
        let p = Self::page_of(round, pages);
        let first = p * WORDS_PER_PAGE;
        let words = &mut self.buf.as_mut_slice()[first..((p + 1) * WORDS_PER_PAGE).min(self.n)];
        let mut expect = self.expect;
        for (v, i) in words.iter_mut().zip(first as u64..) {
            expect = expect.wrapping_sub(*v ^ i);
            *v = v.wrapping_add(1);
            expect = expect.wrapping_add(*v ^ i);
        }
        self.expect = expect;
    }

    /// After `rounds` rounds (outside the timing): the device's checksum and every word against
    /// the values written: the generator's, plus one for each round that changed its page. The
    /// reads inside the rounds never see the last round's write; a write lost there passed.
    fn all_as_written(&self, e: &Env, rounds: usize) -> Result<bool> {
        let pages = self.n.div_ceil(WORDS_PER_PAGE);
        let mut bumps = vec![0u64; pages];
        for round in 0..rounds {
            bumps[Self::page_of(round, pages)] += 1;
        }
        let words = self
            .buf
            .as_slice()
            .iter()
            .enumerate()
            .all(|(i, v)| *v == (splitmix64(i as u64 ^ self.seed) >> 8).wrapping_add(bumps[i / WORDS_PER_PAGE]));
        Ok(self.device_read(e)? && words)
    }
}

fn advice_extra(s: &mut Sample, advice: AdviceKind, rounds: usize) {
    let st = &s.stats;
    let migrated = st.bytes_to_device + st.bytes_to_host + st.bytes_device_to_device;
    s.extra.insert("rounds".into(), json!(rounds));
    s.extra.insert("bytes_migrated".into(), json!(migrated));
    s.extra.insert("advice_applied".into(), json!(advice.name()));
}

/// `pingpong`: the CPU and the device alternate on one buffer: each round the device reads all
/// of it, then the CPU reads all of it, then the CPU changes one page; every read is checked.
pub fn pingpong(r: &Run) -> Result<Vec<Sample>> {
    let n = (r.size / 8).max(1) as usize;
    let ws = n as u64 * 8;
    let e = env(r, ws)?;
    let mut rb = ReadBuf::new(&e, n, r.advice, seed_of(r.rep))?;
    let (ok, secs, st) = timed(&e, || {
        let mut ok = true;
        for round in 0..PINGPONG_ROUNDS {
            ok &= rb.device_read(&e)?;
            ok &= rb.cpu_read(0);
            rb.cpu_write(round);
        }
        Ok(ok)
    })?;
    let ok = ok && rb.all_as_written(&e, PINGPONG_ROUNDS)?;
    let bytes = PINGPONG_ROUNDS as u64 * 2 * ws;
    let mut s = sample("pingpong", &e, ws, bytes, secs, st, ok);
    advice_extra(&mut s, r.advice, PINGPONG_ROUNDS);
    Ok(vec![s])
}

/// `readmostly`: CPU threads and a device kernel read one buffer at the same time; each round
/// ends with the CPU changing one page; every read is checked.
pub fn readmostly(r: &Run) -> Result<Vec<Sample>> {
    let n = (r.size / 8).max(1) as usize;
    let ws = n as u64 * 8;
    let e = env(r, ws)?;
    let mut rb = ReadBuf::new(&e, n, r.advice, seed_of(r.rep))?;
    let (ok, secs, st) = timed(&e, || {
        let mut ok = true;
        for round in 0..READMOSTLY_ROUNDS {
            let rb_ref = &rb;
            let (dev_ok, cpu_ok) = std::thread::scope(|s| {
                let readers: Vec<_> = (0..READMOSTLY_CPU_THREADS)
                    .map(|t| s.spawn(move || rb_ref.cpu_read(t * n / READMOSTLY_CPU_THREADS)))
                    .collect();
                let dev_ok = rb_ref.device_read(&e);
                let cpu_ok = readers.into_iter().all(|h| h.join().unwrap_or(false));
                (dev_ok, cpu_ok)
            });
            ok &= dev_ok? && cpu_ok;
            rb.cpu_write(round);
        }
        Ok(ok)
    })?;
    let ok = ok && rb.all_as_written(&e, READMOSTLY_ROUNDS)?;
    let bytes = READMOSTLY_ROUNDS as u64 * (READMOSTLY_CPU_THREADS as u64 + 1) * ws;
    let mut s = sample("readmostly", &e, ws, bytes, secs, st, ok);
    advice_extra(&mut s, r.advice, READMOSTLY_ROUNDS);
    s.extra.insert("cpu_threads".into(), json!(READMOSTLY_CPU_THREADS));
    Ok(vec![s])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: &'static str, oversub: f64, size: u64, rep: usize) -> Run<'static> {
        Run { policy, oversub, size, advice: AdviceKind::None, rep, link_gbps: None }
    }

    /// The kernel section of `stream` has the CPU touch nothing, so its counters must show no
    /// CPU fault. hetmm adds a CPU fault's counters just after it lets the faulting thread go:
    /// snapshots taken at once gave the last set-up fault (the CPU writing B) to the kernel's
    /// row, and took the re-read's last fault from its own row.
    #[test]
    fn stream_kernel_row_counts_no_setup_cpu_fault() {
        for rep in 0..6 {
            for policy in ["hetmm", "uvm"] {
                let s = stream(&run(policy, 0.5, 8 << 20, rep)).unwrap();
                let (dev, re) = (&s[0], &s[1]);
                assert!(dev.verified && re.verified);
                assert_eq!(
                    (dev.stats.cpu_faults, dev.stats.cpu_fault_pages),
                    (0, 0),
                    "{policy} rep {rep}: CPU faults counted in the kernel's section: {:?}",
                    dev.stats
                );
                // B (4 MiB) was all on the device: the re-read brought all of it back.
                assert_eq!(re.stats.cpu_fault_pages, (4 << 20) / PAGE_SIZE, "{policy} rep {rep}: {:?}", re.stats);
            }
        }
    }

    /// `pingpong`/`readmostly` check their reads with plain sums: data moved to the wrong
    /// place (two pages exchanged) sums the same, and no full check follows.
    #[test]
    fn read_checks_catch_exchanged_pages() {
        let e = env(&run("hetmm", 0.5, 1 << 20, 0), 1 << 20).unwrap();
        let n = (1usize << 20) / 8;
        let mut rb = ReadBuf::new(&e, n, AdviceKind::None, seed_of(0)).unwrap();
        assert!(rb.cpu_read(0) && rb.device_read(&e).unwrap(), "intact data must pass");
        // Exchange pages 0 and 1 behind the check's back.
        let mut s = rb.buf.as_mut_slice();
        let (p0, rest) = s.split_at_mut(WORDS_PER_PAGE);
        p0.swap_with_slice(&mut rest[..WORDS_PER_PAGE]);
        drop(s);
        assert!(!rb.cpu_read(0), "the CPU's read check passed with two pages exchanged");
        assert!(!rb.cpu_read(n / 2), "the CPU's read check passed with two pages exchanged");
        assert!(!rb.device_read(&e).unwrap(), "the device's read check passed with two pages exchanged");
    }

    /// The check after the rounds sees the last round's write: lost (the page as it was before
    /// it), the rounds' own reads pass, and this one fails. (Found by an audit: no read followed
    /// the last write.)
    #[test]
    fn the_last_rounds_write_is_checked() {
        let e = env(&run("hetmm", 0.5, 1 << 20, 0), 1 << 20).unwrap();
        let n = (1usize << 20) / 8;
        let mut rb = ReadBuf::new(&e, n, AdviceKind::None, seed_of(0)).unwrap();
        for round in 0..3 {
            assert!(rb.cpu_read(0) && rb.device_read(&e).unwrap());
            rb.cpu_write(round);
        }
        assert!(rb.all_as_written(&e, 3).unwrap(), "intact data must pass");
        let first = ReadBuf::page_of(2, n.div_ceil(WORDS_PER_PAGE)) * WORDS_PER_PAGE;
        for v in &mut rb.buf.as_mut_slice()[first..first + WORDS_PER_PAGE] {
            *v = v.wrapping_sub(1);
        }
        assert!(!rb.all_as_written(&e, 3).unwrap(), "the last round's write was lost and the check passed");
    }

    /// At the default `--size 256M`, `graph`'s working set is 32 MiB plus 8 KiB (its `claimed`
    /// counters): device memory rounded *up* to 2 MiB gave it 18 MiB at x2 (really x1.78) while
    /// the table says x2. Factors above 1 must give about the ratio they claim; factors up to 1
    /// must still fit the working set.
    #[test]
    fn graph_at_default_size_gets_the_oversubscription_it_claims() {
        let size: u64 = 256 << 20;
        let nv = ((size / 8 / 40) as usize).max(64);
        let g = Graph::new(nv);
        let ws = (nv as u64 + 1) * 4 + g.col.len() as u64 * 4 + nv as u64 * 4 + GRAPH_MAX_LEVELS as u64 * 8;
        for o in [0.5, 1.0, 1.25, 1.5, 2.0] {
            let mem = device_memory(ws, o);
            let eff = ws as f64 / mem as f64;
            if o <= 1.0 {
                assert!(mem >= ws && (mem as f64) < ws as f64 / o + BLOCK_SIZE as f64, "graph at x{o}: {mem}");
            } else {
                assert!((eff - o).abs() <= 0.05 * o, "graph at x{o}: working set / device memory is {eff:.3}");
            }
        }
        // The rule in general: within half a block of the ratio asked above 1.
        for ws in [(32 << 20) + 8192, 256 << 20, (12 << 20) + 1] {
            for o in [1.25, 1.5, 2.0, 3.0] {
                let mem = device_memory(ws, o) as f64;
                assert!((mem - ws as f64 / o).abs() <= BLOCK_SIZE as f64 / 2.0, "ws {ws} at x{o}: {mem}");
            }
        }
    }
}
