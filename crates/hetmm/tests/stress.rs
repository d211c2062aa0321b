//! A randomized, seeded stress test: CPU threads and kernels on two small simulated devices
//! (so eviction and oversubscription happen) over an allocated buffer and registered private
//! memory, with random interleavings of CPU reads and writes, kernel reads and writes,
//! migrations, every kind of advice, `protect`, `mprotect`, `munmap`, `mremap` (plain, with
//! `MREMAP_DONTUNMAP`, growing while it moves, growing in place, shrinking and growing again; of
//! memory on a device or duplicated ReadMostly on both), memory moved out of new buffers from
//! `Hetmm::alloc` (kept a while or dropped at once), unregister/register and `fork()`, every byte
//! checked against a reference model.
//!
//! The model is exact: memory is cut into slices, each behind a lock, and whoever holds a
//! slice's lock knows what it holds (a generation; generation 0 is zeros). Content-changing
//! operations (CPU and kernel writes, `DontNeed`, unmapping) happen only under the lock of
//! every slice they touch; operations that must not change content (migrations, prefetches,
//! attribute advice) run on random ranges without locks.
//!
//! `HETMM_STRESS_SEED` runs one seed (`HETMM_STRESS_OPS` operations per thread,
//! `HETMM_STRESS_POLICY` to force a policy); by default a few short seeds run.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hetmm::core::error::CoreError;
use hetmm::core::types::Prot;
use hetmm::sim::{BlockCtx, Grid, SimConfig, SimDevice};
use hetmm::{Access, Advice, Device, Hetmm, Place, SharedBuf, Use};

const PS: u64 = 4096;
const WAIT: Duration = Duration::from_secs(60);

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Word `idx` of generation `gen` (0: zeros).
fn word(gen: u64, idx: u64) -> u64 {
    if gen == 0 {
        0
    } else {
        splitmix64(gen.wrapping_mul(0x1000_0000_01B3) ^ idx) | 1
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// The first word of `[addr, addr + len)` that does not hold generation `gen` (word indices
/// from `idx0`), read by the CPU. Allocation-free (a fork child runs it).
fn cpu_mismatch(addr: u64, len: u64, gen: u64, idx0: u64) -> Option<(u64, u64)> {
    // SAFETY: callers lock every A slice or R slot in `[addr, addr + len)` (or own the mremap
    // test's slot): it stays mapped and readable, no one writes it; A and the slots are 8-aligned.
    let v = unsafe { std::slice::from_raw_parts(addr as *const u64, (len / 8) as usize) };
    for (w, x) in v.iter().enumerate() {
        let want = word(gen, idx0 + w as u64);
        if *x != want {
            return Some((w as u64, *x));
        }
    }
    None
}

fn cpu_check(what: &str, addr: u64, len: u64, gen: u64, idx0: u64) {
    if let Some((w, x)) = cpu_mismatch(addr, len, gen, idx0) {
        panic!(
            "{what}: CPU read {x:#x} at {:#x} (word {w} of {addr:#x}+{len:#x}), want {:#x} (gen {gen})",
            addr + w * 8,
            word(gen, idx0 + w)
        );
    }
}

fn cpu_fill(addr: u64, len: u64, gen: u64, idx0: u64) {
    // SAFETY: as in `cpu_mismatch`: the caller holds the locks of (or owns) the whole range, mapped
    // read-write, so it stays mapped and no other thread reads or writes it meanwhile.
    let v = unsafe { std::slice::from_raw_parts_mut(addr as *mut u64, (len / 8) as usize) };
    for (w, x) in v.iter_mut().enumerate() {
        *x = word(gen, idx0 + w as u64);
    }
}

/// Bytes per unit of the model of A: each unit holds one generation.
const UNIT: u64 = 512;
const UNIT_WORDS: u64 = UNIT / 8;

/// Checks A's units `[u0, u0 + gens.len())` by the CPU.
fn cpu_check_units(what: &str, base: u64, u0: u64, gens: &[u64]) {
    for (k, &g) in gens.iter().enumerate() {
        let u = u0 + k as u64;
        cpu_check(what, base + u * UNIT, UNIT, g, u * UNIT_WORDS);
    }
}

/// Allocation-free check of units (for a fork child).
fn units_match(base: u64, u0: u64, gens: &[u64]) -> bool {
    gens.iter().enumerate().all(|(k, &g)| {
        let u = u0 + k as u64;
        cpu_mismatch(base + u * UNIT, UNIT, g, u * UNIT_WORDS).is_none()
    })
}

/// One piece a kernel checks (and rewrites when `new` is set): `[addr, addr + len)`, words
/// numbered from `idx0`.
#[derive(Clone, Copy, Debug)]
struct Piece {
    addr: u64,
    len: u64,
    idx0: u64,
    old: u64,
    new: Option<u64>,
}

/// Runs one kernel over `pieces` on `dev` (one block per unit-sized or page-sized chunk);
/// returns the first wrong word it read, or the kernel's error.
fn kernel(dev: &Device<SimDevice>, pieces: &[Piece], write: bool) -> Result<Option<String>, hetmm::Error> {
    // (va, words, first word index, old gen, new gen)
    let mut chunks: Vec<(u64, usize, u64, u64, Option<u64>)> = Vec::new();
    for p in pieces {
        let step = if p.len % PS == 0 && p.addr % PS == 0 { PS } else { UNIT };
        let mut off = 0;
        while off < p.len {
            let n = step.min(p.len - off);
            chunks.push((p.addr + off, (n / 8) as usize, p.idx0 + off / 8, p.old, p.new.filter(|_| write)));
            off += n;
        }
    }
    let raw = |p: &Piece| {
        // SAFETY: the caller holds the lock of every slice the pieces cover, and no reference to
        // them lives outside `cpu_mismatch` and `cpu_fill`, which run under the same locks.
        unsafe { Use::raw(p.addr, p.len, if write { Access::Write } else { Access::Read }) }
    };
    let uses: Vec<Use> = pieces.iter().map(raw).collect();
    let bad = Arc::new(Mutex::new(None::<String>));
    let b2 = Arc::clone(&bad);
    let n = chunks.len() as u32;
    let chunks = Arc::new(chunks);
    let k = move |ctx: &BlockCtx| {
        let (va, words, idx0, old, new) = chunks[ctx.block_idx() as usize];
        let mut buf = vec![0u64; words];
        ctx.read_slice(va, &mut buf)?;
        for (j, x) in buf.iter_mut().enumerate() {
            let want = word(old, idx0 + j as u64);
            if *x != want {
                b2.lock().unwrap().get_or_insert(format!(
                    "device read {x:#x} at {:#x}, want {want:#x} (gen {old})",
                    va + j as u64 * 8
                ));
            }
            if let Some(g) = new {
                *x = word(g, idx0 + j as u64);
            }
        }
        if new.is_some() {
            ctx.write_slice(va, &buf)?;
        }
        Ok(())
    };
    dev.launch(Grid::new(n, 1), &uses, k)?.wait_timeout(WAIT)?;
    let r = bad.lock().unwrap().take();
    Ok(r)
}

/// A slot of registered private memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// A PROT_NONE placeholder, not shared.
    Hole,
    /// Registered memory holding generation `gen`.
    Live(u64),
    /// Another mapping took the hole; never used again.
    Gone,
}

struct World {
    hm: Hetmm,
    devs: Vec<Device<SimDevice>>,
    a: SharedBuf<u64>,
    slice: u64,
    /// Units per slice.
    su: u64,
    slices: Vec<Mutex<Vec<u64>>>,
    rbase: u64,
    rslot: u64,
    rslots: Vec<Mutex<Slot>>,
    gen: AtomicU64,
    counts: [AtomicU64; 23],
    /// Buffers whose memory was moved into R slots, kept a while.
    bufs: Mutex<Vec<SharedBuf<u64>>>,
    bg: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The range pinned now (`HETMM_STRESS_PIN`).
    pinned: Mutex<Option<(u64, u64)>>,
    /// Every pin of every thread, to tell running out of device memory legitimately from not.
    pins: Arc<Pins>,
    /// What happened to the R slots lately, printed if the run fails.
    history: Mutex<std::collections::VecDeque<String>>,
    t0: Instant,
    /// A thread failed: the others stop.
    failed: std::sync::atomic::AtomicBool,
}

/// Pins in effect, to tell a migration that ran out of device memory legitimately from one that
/// did not. Eviction skips a block with any pinned page in it, and each device holds two (or
/// eight) blocks: a migration that overlaps a pin of A's blocks (any thread's) may find nothing
/// it can evict, and fails. One that overlaps none must always find something.
#[derive(Default)]
struct Pins {
    /// Pins taken and not yet released.
    held: AtomicU64,
    /// Pins taken or released so far.
    changes: AtomicU64,
    /// Migrations that ran out of device memory while a pin was in effect.
    oom: AtomicU64,
}

/// What [`Pins::mark`] saw: the changes so far, and whether a pin was held.
#[derive(Clone, Copy)]
struct PinMark(u64, bool);

impl Pins {
    /// Taken before a migration starts.
    fn mark(&self) -> PinMark {
        PinMark(self.changes.load(Ordering::SeqCst), self.held.load(Ordering::SeqCst) > 0)
    }
    /// `r`, with running out of device memory taken as done where a pin was in effect at some
    /// time since `since` (counted in `oom`).
    fn allow_oom<E: Into<hetmm::Error>>(&self, since: PinMark, r: Result<(), E>) -> Result<(), hetmm::Error> {
        match r.map_err(Into::into) {
            Err(hetmm::Error::Core(CoreError::OutOfDeviceMemory { .. }))
                if since.1
                    || self.held.load(Ordering::SeqCst) > 0
                    || self.changes.load(Ordering::SeqCst) != since.0 =>
            {
                self.oom.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            r => r,
        }
    }
    /// Pins `s..s+l`: counted as held from before it takes effect.
    fn pin(&self, hm: &Hetmm, s: u64, l: u64) {
        self.held.fetch_add(1, Ordering::SeqCst);
        self.changes.fetch_add(1, Ordering::SeqCst);
        hm.advise(s, l, Advice::Pin(true)).unwrap_or_else(|e| panic!("pin {s:#x}+{l:#x}: {e}"));
    }
    /// Unpins `s..s+l`: counted as held until it has taken effect.
    fn unpin(&self, hm: &Hetmm, s: u64, l: u64) {
        hm.advise(s, l, Advice::Pin(false)).unwrap_or_else(|e| panic!("unpin {s:#x}+{l:#x}: {e}"));
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.held.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many of the latest R slot changes a failed run prints.
const HISTORY: usize = 3000;

const NAMES: [&str; 23] = [
    "cpu",
    "kwrite",
    "kread",
    "migrate",
    "prefetch",
    "dontneed",
    "attr",
    "fork",
    "rmap",
    "runmap",
    "rremap",
    "rcpu",
    "rkernel",
    "rprotect",
    "rmprotect",
    "runreg",
    "madvise",
    "rmigrate",
    "rdontunmap",
    "rgrowmove",
    "rgrow",
    "rshrink",
    "rbuf",
];

impl World {
    fn gen(&self) -> u64 {
        self.gen.fetch_add(1, Ordering::Relaxed)
    }
    fn count(&self, i: usize) {
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }
    /// Records what happened to an R slot (with the time and the thread).
    fn note(&self, what: String) {
        let line = format!("{:>9} us {:?} {what}", self.t0.elapsed().as_micros(), std::thread::current().id());
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(line);
    }
    fn a_addr(&self, i: usize) -> u64 {
        self.a.ptr() + i as u64 * self.slice
    }
    /// The first unit of slice `i`.
    fn u0(&self, i: usize) -> u64 {
        i as u64 * self.su
    }
    fn r_addr(&self, i: usize) -> u64 {
        self.rbase + i as u64 * self.rslot
    }
    fn a_len(&self) -> u64 {
        self.slices.len() as u64 * self.slice
    }
    fn proc(&self, rng: &mut Rng) -> Place {
        match rng.below(3) {
            0 => Place::CPU,
            d => self.devs[d as usize - 1].proc(),
        }
    }
    fn dev(&self, rng: &mut Rng) -> &Device<SimDevice> {
        &self.devs[rng.below(2) as usize]
    }
    /// Up to `max` consecutive slices of A from a random one, locked (try-lock: none taken if
    /// one is busy).
    fn lock_slices(&self, rng: &mut Rng, max: u64) -> Option<(usize, Vec<std::sync::MutexGuard<'_, Vec<u64>>>)> {
        // Half the time near the first block boundary, so neighbours share pages and blocks.
        let hot = ((2 << 20) / self.slice).saturating_sub(8) as usize;
        let first = if rng.chance(2) && hot + 16 < self.slices.len() {
            hot + rng.below(16) as usize
        } else {
            rng.below(self.slices.len() as u64) as usize
        };
        let n = (1 + rng.below(max) as usize).min(self.slices.len() - first);
        let mut v = Vec::new();
        for s in &self.slices[first..first + n] {
            v.push(s.try_lock().ok()?);
        }
        Some((first, v))
    }
    /// A random page-aligned range inside A.
    fn a_range(&self, rng: &mut Rng) -> (u64, u64) {
        let pages = self.a_len() / PS;
        let start = rng.below(pages);
        let cap = if rng.chance(4) { pages } else { 64 };
        let len = 1 + rng.below((pages - start).min(cap));
        (self.a.ptr() + start * PS, len * PS)
    }
}

fn mmap_fixed(addr: u64, len: u64, prot: i32, noreplace: bool) -> bool {
    let flags =
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if noreplace { libc::MAP_FIXED_NOREPLACE } else { libc::MAP_FIXED };
    // SAFETY: NOREPLACE maps only where nothing is mapped; MAP_FIXED only replaces a placeholder
    // of this test's that the caller holds (an R slot under its lock, or the mremap test's range).
    let p = unsafe { libc::mmap(addr as *mut _, len as usize, prot, flags, -1, 0) };
    if p as u64 == addr {
        return true;
    }
    if p != libc::MAP_FAILED {
        // SAFETY: `p` is a mapping the kernel just made elsewhere (no NOREPLACE support); nothing
        // else knows of it.
        unsafe { libc::munmap(p, len as usize) };
    }
    false
}

/// Puts a placeholder back at a slot just unmapped (another thread's mapping may have taken
/// the hole meanwhile: then the slot is gone).
fn reserve(addr: u64, len: u64) -> Slot {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        if mmap_fixed(addr, len, libc::PROT_NONE, true) {
            return Slot::Hole;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Slot::Gone
}

/// Forks; the child runs `ok` (allocation-free) and exits 0 if it holds, 3 if not. Returns
/// the child's wait status.
fn fork_check(ok: impl FnOnce() -> bool) -> i32 {
    // SAFETY: the child only runs `ok` (allocation-free reads of memory the caller holds locked)
    // and `_exit`s: it takes no lock or allocation of the parent's.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = if ok() { 0 } else { 3 };
        // SAFETY: `_exit` takes no pointers and is async-signal-safe; the child ends without
        // unwinding.
        unsafe { libc::_exit(code) };
    }
    common::wait_status(pid)
}

fn step(w: &World, rng: &mut Rng) {
    match rng.below(22) {
        // CPU check + write of A slices (all of each, or some of its units).
        0..=3 => {
            let Some((first, mut g)) = w.lock_slices(rng, 3) else { return };
            for (k, gens) in g.iter_mut().enumerate() {
                let i = first + k;
                let base = w.a.ptr();
                cpu_check_units("cpu", base, w.u0(i), gens);
                if rng.chance(3) {
                    continue;
                }
                let (from, to) = if rng.chance(2) {
                    (0, w.su)
                } else {
                    let a = rng.below(w.su);
                    (a, a + 1 + rng.below(w.su - a))
                };
                let new = w.gen();
                let u = w.u0(i) + from;
                cpu_fill(base + u * UNIT, (to - from) * UNIT, new, u * UNIT_WORDS);
                gens[from as usize..to as usize].fill(new);
            }
            w.count(0);
        }
        // Kernel check + write (or read only) of A slices: pieces of one generation each.
        4..=7 => {
            let Some((first, mut g)) = w.lock_slices(rng, 4) else { return };
            let write = !rng.chance(3);
            let mut pieces = Vec::new();
            for (k, gens) in g.iter().enumerate() {
                let u0 = w.u0(first + k);
                let mut j = 0;
                while j < gens.len() {
                    let mut e = j + 1;
                    while e < gens.len() && gens[e] == gens[j] {
                        e += 1;
                    }
                    let u = u0 + j as u64;
                    let (addr, len) = (w.a.ptr() + u * UNIT, (e - j) as u64 * UNIT);
                    pieces.push(Piece { addr, len, idx0: u * UNIT_WORDS, old: gens[j], new: Some(w.gen()) });
                    j = e;
                }
            }
            let dev = w.dev(rng);
            match kernel(dev, &pieces, write) {
                Ok(None) => {}
                Ok(Some(m)) => panic!("kernel on A slices {first}..+{}: {m}", g.len()),
                Err(e) => panic!("kernel on A slices {first}..+{}: {e}", g.len()),
            }
            if write {
                let base = w.u0(first);
                for p in &pieces {
                    let u = (p.addr - w.a.ptr()) / UNIT;
                    for x in u..u + p.len / UNIT {
                        let k = ((x - base) / w.su) as usize;
                        g[k][((x - base) % w.su) as usize] = p.new.unwrap();
                    }
                }
            }
            w.count(if write { 1 } else { 2 });
        }
        // Migrate a random range of A anywhere (no locks: content must not change).
        8 => {
            let (s, l) = w.a_range(rng);
            let to = w.proc(rng);
            let m = w.pins.mark();
            w.pins
                .allow_oom(m, w.hm.migrate(s, l, to))
                .unwrap_or_else(|e| panic!("migrate {s:#x}+{l:#x} to {to:?}: {e}"));
            w.count(3);
        }
        9 => {
            let (s, l) = w.a_range(rng);
            let to = w.proc(rng);
            let m = w.pins.mark();
            let p = w.hm.advise(s, l, Advice::Prefetch(to)).unwrap_or_else(|e| panic!("prefetch: {e}"));
            if rng.chance(2) {
                w.pins.allow_oom(m, p.wait(WAIT)).unwrap_or_else(|e| panic!("prefetch {s:#x}+{l:#x} to {to:?}: {e}"));
            } else {
                // Wait later, in another thread's time: let it run alongside.
                let pins = Arc::clone(&w.pins);
                let h = std::thread::spawn(move || {
                    pins.allow_oom(m, p.wait(WAIT))
                        .unwrap_or_else(|e| panic!("background prefetch {s:#x}+{l:#x} to {to:?}: {e}"))
                });
                w.bg.lock().unwrap().push(h);
            }
            w.count(4);
        }
        // DontNeed on the whole pages inside locked A slices: zeros.
        10 => {
            let Some((first, mut g)) = w.lock_slices(rng, 3) else { return };
            let s0 = w.a_addr(first);
            let e0 = s0 + g.len() as u64 * w.slice;
            let (s, e) = (s0.div_ceil(PS) * PS, e0 / PS * PS);
            if s >= e {
                return;
            }
            w.hm.advise(s, e - s, Advice::DontNeed).unwrap_or_else(|e| panic!("dontneed: {e}"));
            let base = w.u0(first);
            for x in (s - w.a.ptr()) / UNIT..(e - w.a.ptr()) / UNIT {
                let k = ((x - base) / w.su) as usize;
                g[k][((x - base) % w.su) as usize] = 0;
            }
            w.count(5);
        }
        // Attribute advice on a random range of A.
        11 | 12 => {
            let (s, l) = w.a_range(rng);
            let d = w.dev(rng).proc();
            let advice = match rng.below(7) {
                0 => Advice::PreferredLocation(None),
                1 => Advice::PreferredLocation(Some(w.proc(rng))),
                2 => Advice::ReadMostly(rng.chance(2)),
                3 => Advice::AccessedBy(d, rng.chance(2)),
                4 => Advice::ReadMostly(false),
                _ if std::env::var_os("HETMM_STRESS_PIN").is_some() => {
                    // One pinned range at a time, of all threads, 64 pages or fewer inside one
                    // 2 MiB block. Eviction skips a whole block with any pinned page in it: with
                    // a range per thread (up to two blocks each) the pins soon covered every
                    // block of A, the two-block devices filled with blocks none could evict, and
                    // migrations and kernels legitimately ran out of memory (every run failed).
                    let Ok(mut p) = w.pinned.try_lock() else { return };
                    if let Some((ps, pl)) = p.take() {
                        w.pins.unpin(&w.hm, ps, pl);
                    }
                    let l = l.min(64 * PS).min((((s >> 21) + 1) << 21) - s);
                    // Pinned under the lock: another thread's unpin must not run first.
                    w.pins.pin(&w.hm, s, l);
                    *p = Some((s, l));
                    w.count(6);
                    return;
                }
                _ => {
                    // Pinned memory is never evicted (whole 2 MiB blocks): a pin held while
                    // others fill the small devices makes them legitimately run out. Pin and
                    // unpin at once, to race the attribute with the rest (migrations that run
                    // out meanwhile are allowed to: `Pins`).
                    w.pins.pin(&w.hm, s, l);
                    w.pins.unpin(&w.hm, s, l);
                    w.count(6);
                    return;
                }
            };
            w.hm.advise(s, l, advice).unwrap_or_else(|e| panic!("advise {advice:?}: {e}"));
            w.count(6);
        }
        // fork(): the child checks a locked slice.
        13 => {
            if !rng.chance(4) {
                return;
            }
            if rng.chance(2) {
                let Some((first, g)) = w.lock_slices(rng, 2) else { return };
                let s = fork_check(|| units_match(w.a.ptr(), w.u0(first), &g[0]));
                assert!(
                    libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0,
                    "fork child of A slice {first}: status {s:#x}"
                );
            } else {
                let i = rng.below(w.rslots.len() as u64) as usize;
                let Ok(g) = w.rslots[i].try_lock() else { return };
                let Slot::Live(gen) = *g else { return };
                let s = fork_check(|| cpu_mismatch(w.r_addr(i), w.rslot, gen, 0).is_none());
                assert!(libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0, "fork child of R slot {i}: status {s:#x}");
            }
            w.count(7);
        }
        // The program's own MADV_DONTNEED on A (shared memory: the data stays), no locks.
        14 => {
            let (s, l) = w.a_range(rng);
            // SAFETY: `[s, s + l)` lies inside A, which `w` owns and never unmaps; A is a shared
            // memfd view, so DONTNEED only drops page-table entries, no data.
            assert_eq!(unsafe { libc::madvise(s as *mut _, l as usize, libc::MADV_DONTNEED) }, 0);
            w.count(16);
        }
        // Migrate or prefetch across the registered area while its slots change shape: it may
        // find memory not shared, but must not change any byte.
        15 => {
            let n = w.rslots.len() as u64;
            let i = rng.below(n);
            let k = 1 + rng.below((n - i).min(4));
            let (s, l) = (w.r_addr(i as usize), k * w.rslot);
            let to = w.proc(rng);
            let m = w.pins.mark();
            let r = if rng.chance(2) {
                w.hm.migrate(s, l, to)
            } else {
                w.hm.advise(s, l, Advice::Prefetch(to)).and_then(|p| Ok(p.wait(WAIT)?))
            };
            let r = w.pins.allow_oom(m, r);
            // A host call on memory the program unmapped meanwhile fails, but as a race: the
            // migration tries again once the unmap is applied and finds the memory gone.
            match r {
                Ok(()) | Err(hetmm::Error::Core(CoreError::NotShared(_))) => {}
                Err(e) => panic!("unlocked migrate of R {s:#x}+{l:#x} to {to:?}: {e}"),
            }
            w.count(17);
        }
        // Registered private memory.
        _ => rstep(w, rng),
    }
}

fn rstep(w: &World, rng: &mut Rng) {
    let i = rng.below(w.rslots.len() as u64) as usize;
    let Ok(mut s) = w.rslots[i].try_lock() else { return };
    let before = *s;
    let what = rstep_on(w, rng, i, &mut s);
    w.note(format!("R{i} {what}: {before:?} -> {:?}", *s));
}

/// One random operation on R slot `i` (whose lock the caller holds, `s`); what it was.
fn rstep_on(w: &World, rng: &mut Rng, i: usize, s: &mut Slot) -> &'static str {
    let (a, len) = (w.r_addr(i), w.rslot);
    match *s {
        Slot::Gone => "nothing (gone)",
        Slot::Hole if rng.chance(3) => {
            *s = Slot::Live(buffer_into(w, rng, i, a, len));
            w.count(22);
            "buffer moved in"
        }
        Slot::Hole => {
            assert!(mmap_fixed(a, len, libc::PROT_READ | libc::PROT_WRITE, false));
            let gen = if rng.chance(4) { 0 } else { w.gen() };
            cpu_fill(a, len, gen, 0);
            w.hm.register(a as *const u8, len as usize).unwrap_or_else(|e| panic!("register {a:#x}: {e}"));
            *s = Slot::Live(gen);
            w.count(8);
            "mapped and registered"
        }
        Slot::Live(gen) => match rng.below(14) {
            0 => {
                // SAFETY: we hold Live slot i's lock, so the range is this test's own mapping,
                // which no other thread reads, writes or remaps; `reserve` refills the hole.
                assert_eq!(unsafe { libc::munmap(a as *mut _, len as usize) }, 0);
                *s = reserve(a, len);
                w.count(9);
                "unmapped"
            }
            1 | 11 => {
                rmove(w, rng, i, s, gen);
                "moved away (or not, no room)"
            }
            12 => {
                rgrow(w, rng, i, gen);
                "grown in place (or not)"
            }
            13 => {
                *s = rshrink(w, rng, i, gen);
                w.count(21);
                "shrunk and regrown"
            }
            2 | 3 => {
                cpu_check("R cpu", a, len, gen, 0);
                let new = w.gen();
                // Part of the slot (a page-aligned piece) or all of it.
                if rng.chance(2) {
                    cpu_fill(a, len, new, 0);
                    *s = Slot::Live(new);
                } else {
                    // Rewrite everything but keep the model exact: whole slot.
                    cpu_fill(a, len, new, 0);
                    *s = Slot::Live(new);
                    cpu_check("R cpu reread", a, len, new, 0);
                }
                w.count(11);
                "CPU checked, rewrote"
            }
            4..=6 => {
                let write = !rng.chance(3);
                let p = Piece { addr: a, len, idx0: 0, old: gen, new: Some(w.gen()) };
                match kernel(w.dev(rng), &[p], write) {
                    Ok(None) => {}
                    Ok(Some(m)) => panic!("kernel on R slot {i}: {m}"),
                    Err(e) => panic!("kernel on R slot {i}: {e}"),
                }
                if write {
                    *s = Slot::Live(p.new.unwrap());
                }
                w.count(12);
                if write {
                    "kernel checked, rewrote"
                } else {
                    "kernel checked"
                }
            }
            7 => {
                // hetmm's protect: read-only everywhere (all the slot or some of its pages),
                // reads work, a device write is refused.
                let pages = len / PS;
                // (Protecting part of a slot splits its region; launches and advice naming the
                // whole slot must still work.)
                let (p0, p1) = if rng.chance(2) {
                    (0, pages)
                } else {
                    let x = rng.below(pages);
                    (x, x + 1 + rng.below(pages - x))
                };
                let (pa, pl) = (a + p0 * PS, (p1 - p0) * PS);
                w.hm.protect(pa, pl, Prot::READ).unwrap_or_else(|e| panic!("protect: {e}"));
                let p = Piece { addr: a, len, idx0: 0, old: gen, new: None };
                match kernel(w.dev(rng), &[p], false) {
                    Ok(None) => {}
                    Ok(Some(m)) => panic!("kernel on read-only R slot {i}: {m}"),
                    Err(e) => panic!("read kernel on read-only R slot {i}: {e}"),
                }
                if rng.chance(2) {
                    let dev = w.dev(rng);
                    let r = dev.launch(Grid::new(1, 1), &[], move |ctx: &BlockCtx| ctx.store::<u64>(pa, 7));
                    let r = r.and_then(|mut l| l.wait_timeout(WAIT));
                    assert!(r.is_err(), "a device wrote read-only memory");
                }
                cpu_check("R read-only", a, len, gen, 0);
                w.hm.protect(pa, pl, Prot::READ | Prot::WRITE).unwrap_or_else(|e| panic!("protect rw: {e}"));
                w.count(13);
                "protected read-only, then read-write"
            }
            8 => {
                // The program's own mprotect: read-only, read, writable again.
                // SAFETY: we hold Live slot i's lock: the range is this test's own mapping, which
                // no other thread writes or remaps.
                assert_eq!(unsafe { libc::mprotect(a as *mut _, len as usize, libc::PROT_READ) }, 0);
                cpu_check("R mprotect RO", a, len, gen, 0);
                // SAFETY: as above: slot i's own mapping, under its lock; read-write is its normal
                // protection.
                assert_eq!(unsafe { libc::mprotect(a as *mut _, len as usize, libc::PROT_READ | libc::PROT_WRITE) }, 0);
                if rng.chance(2) {
                    let new = w.gen();
                    cpu_fill(a, len, new, 0);
                    *s = Slot::Live(new);
                }
                w.count(14);
                "mprotected read-only, then read-write"
            }
            9 => {
                // Unregister: ordinary memory with the same bytes; register again.
                w.hm.unregister(a as *const u8, len as usize).unwrap_or_else(|e| panic!("unregister: {e}"));
                cpu_check("R unregistered", a, len, gen, 0);
                let new = w.gen();
                cpu_fill(a, len, new, 0);
                w.hm.register(a as *const u8, len as usize).unwrap_or_else(|e| panic!("re-register {a:#x}: {e}"));
                *s = Slot::Live(new);
                w.count(15);
                "unregistered, rewritten, registered"
            }
            10 => {
                // DontNeed, migrate, prefetch or attributes on the slot.
                let to = w.proc(rng);
                match rng.below(5) {
                    0 => {
                        // SAFETY: the slot is locked, and no reference to it lives outside
                        // `cpu_mismatch` and `cpu_fill`, which run under its lock.
                        let r = unsafe { w.hm.advise_unchecked(a, len, Advice::DontNeed) };
                        r.unwrap_or_else(|e| panic!("R dontneed: {e}"));
                        *s = Slot::Live(0);
                        "DontNeed"
                    }
                    1 => {
                        let m = w.pins.mark();
                        w.pins.allow_oom(m, w.hm.migrate(a, len, to)).unwrap_or_else(|e| panic!("R migrate: {e}"));
                        "migrated"
                    }
                    2 => {
                        let m = w.pins.mark();
                        let p = w.hm.advise(a, len, Advice::Prefetch(to)).unwrap_or_else(|e| panic!("R prefetch: {e}"));
                        w.pins.allow_oom(m, p.wait(WAIT)).unwrap_or_else(|e| panic!("R prefetch: {e}"));
                        "prefetched"
                    }
                    3 => {
                        w.hm.advise(a, len, Advice::ReadMostly(rng.chance(2))).unwrap();
                        "ReadMostly set"
                    }
                    _ => {
                        // The program's MADV_DONTNEED: registered memory keeps its data.
                        // SAFETY: we hold Live slot i's lock, so the range is this test's
                        // registered mapping; hetmm's shared view keeps its data through DONTNEED.
                        assert_eq!(unsafe { libc::madvise(a as *mut _, len as usize, libc::MADV_DONTNEED) }, 0);
                        "the program's MADV_DONTNEED"
                    }
                }
            }
            _ => unreachable!(),
        },
    }
}

/// Checks `[addr, addr + len)` (words from `idx0`) holds `gen` by a kernel on a random device,
/// and has it write `new` there when given; `what` names it in a failure.
fn kernel_check(w: &World, rng: &mut Rng, what: &str, addr: u64, len: u64, gen: u64, new: Option<u64>) {
    let p = Piece { addr, len, idx0: 0, old: gen, new };
    match kernel(w.dev(rng), &[p], new.is_some()) {
        Ok(None) => {}
        Ok(Some(m)) => panic!("{what}: {m}"),
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Checks Live memory `[a, a + len)` holding `gen` at once, by the CPU or a device, or rewrites
/// it by a device; returns what it holds then.
fn check_now(w: &World, rng: &mut Rng, what: &str, a: u64, len: u64, gen: u64) -> u64 {
    match rng.below(4) {
        0 => cpu_check(what, a, len, gen, 0),
        1 => kernel_check(w, rng, what, a, len, gen, None),
        2 => {
            // A device's write must reach every copy: the CPU's and another device's read next.
            let new = w.gen();
            kernel_check(w, rng, what, a, len, gen, Some(new));
            if rng.chance(2) {
                cpu_check(what, a, len, new, 0);
            } else {
                kernel_check(w, rng, what, a, len, new, None);
            }
            return new;
        }
        _ => {}
    }
    gen
}

/// Fills a Hole slot at `[a, a + len)` with the memory of a new buffer from `Hetmm::alloc`
/// (its data written by the CPU, sometimes on a device first), moved there with `mremap` over
/// the placeholder: from then on it is the program's mapping, managed like registered memory.
/// The buffer is dropped at once or kept a while (another thread may drop it later, while the
/// memory moved out of it is in use). Returns the generation it holds.
fn buffer_into(w: &World, rng: &mut Rng, i: usize, a: u64, len: u64) -> u64 {
    let buf = w.hm.alloc::<u64>((len / 8) as usize).unwrap_or_else(|e| panic!("alloc for slot {a:#x}: {e}"));
    let gen = w.gen();
    cpu_fill(buf.ptr(), len, gen, 0);
    let mut on = None;
    if rng.chance(2) {
        let to = w.proc(rng);
        let m = w.pins.mark();
        w.pins
            .allow_oom(m, w.hm.migrate(buf.ptr(), len, to))
            .unwrap_or_else(|e| panic!("migrate a buffer to {to:?}: {e}"));
        on = Some(to);
    }
    w.note(format!("R{i}: buffer {:#x} (gen {gen:#x}, on {on:?}) moving in", buf.ptr()));
    // SAFETY: moves the whole view of our new buffer (no slice of it is alive) over the PROT_NONE
    // placeholder at `a`, a Hole slot whose lock the caller holds: MREMAP_FIXED replaces only that.
    let r = unsafe {
        libc::mremap(buf.ptr() as *mut _, len as usize, len as usize, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, a)
    };
    assert_eq!(r as u64, a, "mremap of a buffer to {a:#x}: {}", std::io::Error::last_os_error());
    let gen = check_now(w, rng, "moved out of a buffer", a, len, gen);
    let mut kept = w.bufs.lock().unwrap();
    if rng.chance(2) {
        kept.push(buf);
    } else {
        w.note(format!("R{i}: its buffer {:#x} dropped at once", buf.ptr()));
    }
    // Up to a few buffers stay; a random one goes.
    if kept.len() > 3 || (!kept.is_empty() && rng.chance(2)) {
        let k = rng.below(kept.len() as u64) as usize;
        let b = kept.swap_remove(k);
        let at = b.ptr();
        drop(b);
        w.note(format!("a kept buffer {at:#x} dropped"));
    }
    gen
}

/// Moves Live slot `i` (holding `gen`; the caller holds its lock, `s`) over a Hole slot `j`:
/// plainly, with `MREMAP_DONTUNMAP` (the old range, left mapped, must be empty memory: zeros,
/// the program's own), or growing into slot `j + 1` too (the new part must be fresh zeros,
/// the program's own, not managed). Sometimes a device holds the data first, or both devices a
/// ReadMostly duplicate each: they must follow the move or be dropped, never show the old data.
fn rmove(w: &World, rng: &mut Rng, i: usize, s: &mut Slot, gen: u64) {
    let n = w.rslots.len();
    let (a, len) = (w.r_addr(i), w.rslot);
    // 0, 1: plain; 2: DONTUNMAP; 3: grown.
    let how = rng.below(4);
    let grow = how == 3;
    // The first free Hole slot (two in a row to grow) from a random one.
    let hole = |j: usize| w.rslots[j].try_lock().ok().filter(|t| **t == Slot::Hole);
    let first = rng.below(n as u64) as usize;
    let Some((j, mut t, t2)) = (0..n).map(|k| (first + k) % n).find_map(|j| {
        if j == i || (grow && (j + 1 >= n || j + 1 == i)) {
            return None;
        }
        let t = hole(j)?;
        let t2 = if grow { Some(hole(j + 1)?) } else { None };
        Some((j, t, t2))
    }) else {
        return;
    };
    let b = w.r_addr(j);
    let mut gen = gen;
    let first = rng.below(4);
    w.note(format!("R{i} moving ({how}) to R{j} (first: {first})"));
    match first {
        0 => {
            let to = w.devs[rng.below(2) as usize].proc();
            let m = w.pins.mark();
            w.pins
                .allow_oom(m, w.hm.migrate(a, len, to))
                .unwrap_or_else(|e| panic!("migrate R slot {i} to {to:?} before a move: {e}"));
        }
        1 => {
            w.hm.advise(a, len, Advice::ReadMostly(true)).unwrap_or_else(|e| panic!("read-mostly R slot {i}: {e}"));
            for d in &w.devs {
                let p = Piece { addr: a, len, idx0: 0, old: gen, new: None };
                match kernel(d, &[p], false) {
                    Ok(None) => {}
                    Ok(Some(m)) => panic!("duplicate of R slot {i} before a move: {m}"),
                    Err(e) => panic!("duplicate of R slot {i} before a move: {e}"),
                }
            }
            if rng.chance(2) {
                cpu_check("R read-mostly before a move", a, len, gen, 0);
            }
        }
        _ => {}
    }
    let fixed = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
    let (new_len, flags) = match how {
        2 => (len, fixed | libc::MREMAP_DONTUNMAP),
        3 => (2 * len, fixed),
        _ => (len, fixed),
    };
    // SAFETY: we hold the locks of Live slot i (our mapping) and of slot j != i (and j + 1 != i
    // when growing), PROT_NONE placeholders of ours: MREMAP_FIXED replaces only those.
    let r = unsafe { libc::mremap(a as *mut _, len as usize, new_len as usize, flags, b) };
    assert_eq!(r as u64, b, "mremap ({how}) of R slot {i} to {j}: {}", std::io::Error::last_os_error());
    if how == 2 {
        // The old range stays mapped: empty, the program's own private memory (its touch is
        // served after the move's event, which the kernel queued first).
        cpu_check("R left behind by MREMAP_DONTUNMAP", a, len, 0, 0);
        if rng.chance(2) {
            let x = w.gen();
            cpu_fill(a, len, x, 0);
            cpu_check("R left behind, rewritten", a, len, x, 0);
        }
        // SAFETY: the old range of Live slot i, whose lock we hold: our own private memory now;
        // `reserve` puts the placeholder back.
        assert_eq!(unsafe { libc::munmap(a as *mut _, len as usize) }, 0);
    }
    *s = reserve(a, len);
    let mut t2_state = None;
    if let Some(mut g) = t2 {
        let c = b + len;
        cpu_check("R grown by a move", c, len, 0, 0);
        if rng.chance(2) {
            // Plain memory now: registered, it is a slot of its own.
            let x = w.gen();
            cpu_fill(c, len, x, 0);
            w.hm.register(c as *const u8, len as usize).unwrap_or_else(|e| panic!("register grown {c:#x}: {e}"));
            *g = Slot::Live(x);
        } else {
            // SAFETY: slot j + 1, whose lock we hold: the part the move grew, our own private
            // memory; `reserve` puts the placeholder back.
            assert_eq!(unsafe { libc::munmap(c as *mut _, len as usize) }, 0);
            *g = reserve(c, len);
        }
        t2_state = Some(*g);
    }
    if rng.chance(2) {
        gen = check_now(w, rng, &format!("R slot {i} moved ({how}) to {j}"), b, len, gen);
    }
    *t = Slot::Live(gen);
    w.note(format!("R{i} moved ({how}) to R{j}: R{j} {:?}, R{} {:?}", *t, j + 1, t2_state));
    w.count(match how {
        2 => 18,
        3 => 19,
        _ => 10,
    });
}

/// Grows Live slot `i` (holding `gen`, under its lock) in place over slot `i + 1`, a Hole whose
/// placeholder is given back to make room (no event: the kernel extends the memfd mapping): the
/// new part is fresh memory, the program's own. It is touched (zeros), then registered as slot
/// `i + 1` or unmapped; or never touched and unmapped, or shrunk away again. Slot `i` keeps its
/// data throughout.
fn rgrow(w: &World, rng: &mut Rng, i: usize, gen: u64) {
    if i + 1 >= w.rslots.len() {
        return;
    }
    let Ok(mut t) = w.rslots[i + 1].try_lock() else { return };
    if *t != Slot::Hole {
        return;
    }
    let (a, len) = (w.r_addr(i), w.rslot);
    let c = a + len;
    // SAFETY: slot i + 1's PROT_NONE placeholder, whose lock we hold.
    assert_eq!(unsafe { libc::munmap(c as *mut _, len as usize) }, 0);
    // SAFETY: grows Live slot i (our mapping, under its lock) in place into the addresses just
    // freed (no MREMAP_MAYMOVE: it fails rather than replace anything another thread mapped there).
    let r = unsafe { libc::mremap(a as *mut _, len as usize, 2 * len as usize, 0) };
    if r as u64 != a {
        // Another thread's mapping took the room.
        *t = reserve(c, len);
        w.note(format!("R{i} not grown: R{} {:?}", i + 1, *t));
        return;
    }
    w.note(format!("R{i} grown in place over R{}", i + 1));
    match rng.below(3) {
        0 => {
            cpu_check("R grown in place", c, len, 0, 0);
            let x = w.gen();
            cpu_fill(c, len, x, 0);
            if rng.chance(2) {
                w.hm.register(c as *const u8, len as usize).unwrap_or_else(|e| panic!("register grown {c:#x}: {e}"));
                *t = Slot::Live(x);
            } else {
                cpu_check("R grown in place, rewritten", c, len, x, 0);
                // SAFETY: the grown part, slot i + 1 (under its lock): our own private memory.
                assert_eq!(unsafe { libc::munmap(c as *mut _, len as usize) }, 0);
                *t = reserve(c, len);
            }
        }
        1 => {
            // SAFETY: shrinks slot i (our mapping, under its lock) back in place: the kernel unmaps
            // the grown part (slot i + 1's addresses, under its lock).
            let r = unsafe { libc::mremap(a as *mut _, 2 * len as usize, len as usize, 0) };
            assert_eq!(r as u64, a, "shrinking R slot {i} back: {}", std::io::Error::last_os_error());
            *t = reserve(c, len);
        }
        _ => {
            // SAFETY: the grown part, slot i + 1 (under its lock), never touched.
            assert_eq!(unsafe { libc::munmap(c as *mut _, len as usize) }, 0);
            *t = reserve(c, len);
        }
    }
    match rng.below(3) {
        0 => cpu_check("R grown, its managed part", a, len, gen, 0),
        1 => kernel_check(w, rng, &format!("R slot {i} grown, its managed part"), a, len, gen, None),
        _ => {}
    }
    w.note(format!("R{i} grown in place: R{} {:?}", i + 1, *t));
    w.count(20);
}

/// Shrinks Live slot `i` (holding `gen`, under its lock) in place to half and grows it again (as
/// `realloc` may): the regrown half is fresh zeros (not the data the shrink gave up), the kept
/// half keeps its data; then the slot is one registration again (the kept half given back,
/// all of it rewritten and registered). What the slot is then.
fn rshrink(w: &World, rng: &mut Rng, i: usize, gen: u64) -> Slot {
    let (a, len) = (w.r_addr(i), w.rslot);
    let half = len / 2;
    // SAFETY: shrinks Live slot i (our mapping, under its lock) in place; the kernel unmaps its
    // second half.
    let r = unsafe { libc::mremap(a as *mut _, len as usize, half as usize, 0) };
    assert_eq!(r as u64, a, "shrinking R slot {i}: {}", std::io::Error::last_os_error());
    if rng.chance(2) {
        kernel_check(w, rng, &format!("R slot {i} shrunk"), a, half, gen, None);
    }
    // SAFETY: grows it in place again into the half it gave up (no MREMAP_MAYMOVE: it fails
    // rather than replace anything another thread mapped there meanwhile).
    let r = unsafe { libc::mremap(a as *mut _, half as usize, len as usize, 0) };
    if r as u64 != a {
        // Another thread's mapping took the half: the slot is given up.
        w.hm.unregister(a as *const u8, half as usize).unwrap_or_else(|e| panic!("unregister shrunk {a:#x}: {e}"));
        // SAFETY: the kept half of slot i, under its lock: our own private memory now.
        assert_eq!(unsafe { libc::munmap(a as *mut _, half as usize) }, 0);
        return reserve(a, len);
    }
    // Words of the second half numbered from `half / 8`: zeros are zeros whatever the number.
    cpu_check("R regrown half", a + half, half, 0, half / 8);
    if rng.chance(2) {
        kernel_check(w, rng, &format!("R slot {i} shrunk and regrown, kept half"), a, half, gen, None);
    }
    cpu_check("R shrunk and regrown, kept half", a, half, gen, 0);
    w.hm.unregister(a as *const u8, half as usize).unwrap_or_else(|e| panic!("unregister kept half {a:#x}: {e}"));
    let new = w.gen();
    cpu_fill(a, len, new, 0);
    w.hm.register(a as *const u8, len as usize).unwrap_or_else(|e| panic!("re-register regrown {a:#x}: {e}"));
    Slot::Live(new)
}

fn run(seed: u64, policy: &str, ops: u64, threads: u64) {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut rng = Rng(seed);
    let big = rng.chance(4);
    let dev_mem: u64 = if big { 16 << 20 } else { 4 << 20 };
    let a_bytes: u64 = if big { 40 << 20 } else { 6 << 20 };
    // Slices in units of 512 bytes: sub-page (neighbours share pages), odd, or whole pages.
    let su = [3u64, 5, 8, 13, 24, 96][rng.below(6) as usize] * if big { 8 } else { 1 };
    let slice = su * UNIT;
    let hm = Hetmm::with_policy(policy).expect("userfaultfd and memfd available");
    let devs = (0..2)
        .map(|_| {
            let cfg = SimConfig {
                memory_bytes: dev_mem,
                compute_workers: 4,
                fault_batch: [8, 32, 256][rng.below(3) as usize],
                ..SimConfig::default()
            };
            hm.attach_sim(SimDevice::new(cfg).unwrap()).unwrap()
        })
        .collect();
    let nslices = a_bytes / slice;
    let a = hm.alloc::<u64>((nslices * slice / 8) as usize).unwrap();
    let nslices = nslices as usize;
    let rslot = PS * [8, 16, 32][rng.below(3) as usize];
    let nr = 24u64;
    // SAFETY: a null hint without MAP_FIXED: a fresh PROT_NONE reservation that replaces no
    // mapping.
    let rbase = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            (nr * rslot) as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(rbase, libc::MAP_FAILED);
    let w = Arc::new(World {
        hm,
        devs,
        a,
        slice,
        su,
        slices: (0..nslices).map(|_| Mutex::new(vec![0; su as usize])).collect(),
        rbase: rbase as u64,
        rslot,
        rslots: (0..nr).map(|_| Mutex::new(Slot::Hole)).collect(),
        gen: AtomicU64::new((seed << 32) | 1),
        counts: Default::default(),
        bufs: Mutex::new(Vec::new()),
        bg: Mutex::new(Vec::new()),
        pinned: Mutex::new(None),
        pins: Arc::default(),
        history: Mutex::new(std::collections::VecDeque::new()),
        t0: Instant::now(),
        failed: Default::default(),
    });
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let w = Arc::clone(&w);
            let mut rng = Rng(splitmix64(seed ^ ((t + 1) * 0x51_7CC1_B727_220A)));
            std::thread::spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    for _ in 0..ops {
                        if w.failed.load(Ordering::Relaxed) {
                            break;
                        }
                        step(&w, &mut rng);
                    }
                }));
                if let Err(e) = ran {
                    // The first failure prints what led to it, before the others run on.
                    if !w.failed.swap(true, Ordering::SeqCst) {
                        print_history(&w);
                    }
                    std::panic::resume_unwind(e);
                }
            })
        })
        .collect();
    let mut failed = None;
    for h in handles {
        if let Err(e) = h.join() {
            failed.get_or_insert(e);
        }
    }
    let bg = std::mem::take(&mut *w.bg.lock().unwrap());
    for h in bg {
        if let Err(e) = h.join() {
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        std::panic::resume_unwind(e);
    }
    if let Some((s, l)) = w.pinned.lock().unwrap().take() {
        w.pins.unpin(&w.hm, s, l);
    }
    // Every byte, by the CPU, at the end.
    for (i, g) in w.slices.iter().enumerate() {
        cpu_check_units("final A", w.a.ptr(), w.u0(i), &g.lock().unwrap());
    }
    for (i, s) in w.rslots.iter().enumerate() {
        if let Slot::Live(g) = *s.lock().unwrap() {
            cpu_check("final R", w.r_addr(i), w.rslot, g, 0);
        }
    }
    assert_eq!(w.hm.stats().cpu_fault_errors, 0, "hetmm failed to serve CPU faults");
    let c: Vec<String> =
        NAMES.iter().zip(w.counts.iter()).map(|(n, c)| format!("{n} {}", c.load(Ordering::Relaxed))).collect();
    let st = w.hm.stats();
    eprintln!(
        "stress seed {seed} {policy} big={big} slice={slice} ops={ops}x{threads}: {}; MiB to devices {}, home {}, \
         between devices {}; pages mapped to a peer's copy {}; migrations out of device memory during a pin {}",
        c.join(", "),
        st.bytes_to_device >> 20,
        st.bytes_to_host >> 20,
        st.bytes_device_to_device >> 20,
        st.peer_mapped_pages,
        w.pins.oom.load(Ordering::Relaxed)
    );
    for (i, s) in w.rslots.iter().enumerate() {
        let s = *s.lock().unwrap();
        if s == Slot::Gone {
            continue;
        }
        if let Slot::Live(_) = s {
            w.hm.unregister(w.r_addr(i) as *const u8, w.rslot as usize).unwrap();
        }
        // SAFETY: every thread is joined; slot i (not Gone) is this test's placeholder or mapping,
        // unregistered above, never used again.
        unsafe { libc::munmap(w.r_addr(i) as *mut _, w.rslot as usize) };
    }
}

/// Prints what happened to the R slots lately and what maps them now (for a failed run).
fn print_history(w: &World) {
    let r = w.rbase..w.rbase + w.rslots.len() as u64 * w.rslot;
    eprintln!("R slots: {:#x}..{:#x}, {:#x} bytes each; their latest changes:", r.start, r.end, w.rslot);
    for line in w.history.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        eprintln!("  {line}");
    }
    eprintln!("the first page of each slot, as the core has it:");
    for i in 0..w.rslots.len() {
        let at = w.r_addr(i);
        eprintln!("  R{i} {at:#x}: {:?}", w.hm.space().page_state(at));
    }
    eprintln!("mappings there now:");
    for m in common::maps_meeting(r.start, r.end) {
        eprintln!("  {}", m.line);
    }
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// A few short seeds of each policy (or the seed `HETMM_STRESS_SEED` names).
#[test]
fn seeded_stress() {
    let ops = env("HETMM_STRESS_OPS").unwrap_or(150);
    let threads = env("HETMM_STRESS_THREADS").unwrap_or(4);
    let forced = std::env::var("HETMM_STRESS_POLICY").ok();
    let seeds: Vec<u64> = match env("HETMM_STRESS_SEED") {
        Some(s) => vec![s],
        None => vec![1, 2],
    };
    for seed in seeds {
        let policy = forced.clone().unwrap_or_else(|| if seed % 2 == 0 { "hetmm" } else { "uvm" }.to_string());
        run(seed, &policy, ops, threads);
    }
}

/// Focused: one thread moves a registered slot back and forth with mremap (checking and
/// rewriting it by the CPU and a device after each move) while another migrates the range
/// covering both places to a device and back: 200 moves, or `HETMM_STRESS_MREMAP=<moves>`
/// (3000 take about 10 s in release mode). A migration's revoke of the old addresses can run
/// after the kernel moved the CPU's page-table entries to the new ones, leaving the CPU a live
/// mapping of a page the core thinks is on the device: before revokes reported such races
/// (`HostError::RACED`), 7 of 8 runs lost a write within 3000 moves; 0 of 26 since. Half the
/// moves go between places 2 MiB apart, where the device's copies travel with the slot.
#[test]
fn mremap_races_migrate() {
    mremap_at_both_distances(false, 0);
}

/// [`mremap_races_migrate`] with memory from `Hetmm::alloc`: the slot starts as a buffer's
/// view, which the program moves into the test's range (while the buffer's data is on the
/// device and another thread migrates it), and drops the buffer at the end.
#[test]
fn mremap_of_a_buffer_races_migrate() {
    mremap_at_both_distances(true, 0);
}

/// [`mremap_races_migrate`] with `MREMAP_DONTUNMAP`: the kernel moves the CPU's page-table
/// entries and leaves the old range mapped, so a revoke that zaps it meanwhile succeeds on
/// nothing, and the CPU keeps a mapping the core does not know of.
#[test]
fn dontunmap_mremap_races_migrate() {
    mremap_at_both_distances(false, libc::MREMAP_DONTUNMAP);
}

/// [`mremap_back_and_forth`] for 200 moves (the suite's short run), or `HETMM_STRESS_MREMAP`:
/// half between places 16 pages apart, half between places 2 MiB apart.
fn mremap_at_both_distances(alloc: bool, extra: i32) {
    let iters = env("HETMM_STRESS_MREMAP").unwrap_or(200);
    let _ = env_logger::builder().is_test(true).try_init();
    mremap_back_and_forth(iters / 2, 16 * PS, alloc, extra);
    mremap_back_and_forth(iters - iters / 2, 2 << 20, alloc, extra);
}

/// [`mremap_races_migrate`] with the two places `apart` bytes apart; `alloc`: the slot is
/// first a buffer's view; each move with the mremap flags `extra` too.
fn mremap_back_and_forth(iters: u64, apart: u64, alloc: bool, extra: i32) {
    let hm = Arc::new(Hetmm::new().unwrap());
    let dev = Arc::new(
        hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: 4 << 20, ..SimConfig::default() }).unwrap()).unwrap(),
    );
    let len = 16 * PS;
    // Far below where the kernel places new mappings (top down): no thread's stack lands in
    // the holes the moves leave.
    let base =
        (0x1000_0000_0000u64..).step_by(1 << 30).find(|&b| mmap_fixed(b, apart + len, libc::PROT_NONE, true)).unwrap();
    let (x, y) = (base, base + apart);
    let buf = if alloc {
        let b = hm.alloc::<u8>(len as usize).unwrap();
        cpu_fill(b.ptr(), len, 1, 0);
        hm.migrate(b.ptr(), len, dev.proc()).unwrap();
        Some(b)
    } else {
        assert!(mmap_fixed(x, len, libc::PROT_READ | libc::PROT_WRITE, false));
        cpu_fill(x, len, 1, 0);
        hm.register(x as *const u8, len as usize).unwrap();
        None
    };
    let b = buf.as_ref().map(|b| b.ptr());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let g = {
        let (hm, dev, stop) = (hm.clone(), dev.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let to = if n.is_multiple_of(2) { dev.proc() } else { Place::CPU };
                if let Some(b) = b {
                    let _ = hm.migrate(b, len, to);
                }
                let _ = hm.migrate(x, apart + len, to);
                let _ = hm.migrate(x, len, to);
                let _ = hm.migrate(y, len, to);
                n += 1;
            }
        })
    };
    let mut gen = 1;
    let mut at = x;
    if let Some(b) = b {
        // SAFETY: moves the buffer's view (no slice of it is alive) over the test's PROT_NONE
        // placeholder at `x`, in its reservation: MREMAP_FIXED replaces only that.
        let r = unsafe {
            libc::mremap(b as *mut _, len as usize, len as usize, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, x)
        };
        assert_eq!(r as u64, x, "{}", std::io::Error::last_os_error());
        cpu_check("moved out of the buffer", x, len, gen, 0);
    }
    for i in 0..iters {
        let to = if at == x { y } else { x };
        // SAFETY: `at` holds the slot, which only this thread maps or moves; `to`, its other place,
        // is a PROT_NONE placeholder in this test's reservation: MREMAP_FIXED replaces only that.
        let r = unsafe {
            libc::mremap(
                at as *mut _,
                len as usize,
                len as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | extra,
                to,
            )
        };
        assert_eq!(r as u64, to, "{}", std::io::Error::last_os_error());
        if extra & libc::MREMAP_DONTUNMAP != 0 {
            // What the move left at `at` reads as empty memory (its touch is served once the
            // move is applied); then it is unmapped (before that, the manager could still be
            // replacing it: a mapping of its own would fill the hole).
            cpu_check(&format!("iteration {i}: left behind"), at, len, 0, 0);
            // SAFETY: what the move left at `at`, this thread's own (empty) memory now.
            assert_eq!(unsafe { libc::munmap(at as *mut _, len as usize) }, 0);
        }
        // Another thread's mapping (a new thread's signal stack) may land in the hole.
        assert_eq!(reserve(at, len), Slot::Hole, "the hole at {at:#x} stayed taken");
        at = to;
        if i % 2 == 0 {
            let p = Piece { addr: at, len, idx0: 0, old: gen, new: Some(gen + 1) };
            match kernel(&dev, &[p], true) {
                Ok(None) => {}
                Ok(Some(m)) => panic!("iteration {i}: {m}"),
                Err(e) => panic!("iteration {i}: {e}"),
            }
            gen += 1;
        }
        cpu_check(&format!("iteration {i}"), at, len, gen, 0);
        gen += 1;
        cpu_fill(at, len, gen, 0);
    }
    stop.store(true, Ordering::Relaxed);
    g.join().unwrap();
    // The buffer's address holds nothing of it any more: dropping it frees nothing of the slot.
    drop(buf);
    cpu_check("end", at, len, gen, 0);
    let st = hm.stats();
    eprintln!(
        "{iters} moves {apart} bytes apart: {} blocks and {} pages moved with their device copies, {} revokes raced",
        st.reshape_blocks_kept, st.reshape_pages_rekeyed, st.revokes_raced
    );
}

/// Two simulated devices of 4 MiB each, attached to `hm`.
fn two_small_devices(hm: &Hetmm) -> Vec<Device<SimDevice>> {
    (0..2)
        .map(|_| {
            hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: 4 << 20, ..SimConfig::default() }).unwrap()).unwrap()
        })
        .collect()
}

/// Focused: registered memory duplicated ReadMostly on both devices (and sometimes written by
/// one device, or the CPU, first) moved with `mremap` over and over, `apart` bytes each way; each
/// device reads it at the new place after every move. `HETMM_STRESS_DUP=<moves>` (default 100).
#[test]
fn read_mostly_duplicates_follow_mremap() {
    let iters = env("HETMM_STRESS_DUP").unwrap_or(100);
    let _ = env_logger::builder().is_test(true).try_init();
    for apart in [16 * PS, 2 << 20] {
        let hm = Hetmm::new().unwrap();
        let devs = two_small_devices(&hm);
        let len = 16 * PS;
        let base = (0x1100_0000_0000u64..)
            .step_by(1 << 30)
            .find(|&b| mmap_fixed(b, apart + len, libc::PROT_NONE, true))
            .unwrap();
        let (x, y) = (base, base + apart);
        assert!(mmap_fixed(x, len, libc::PROT_READ | libc::PROT_WRITE, false));
        let mut gen = 1;
        cpu_fill(x, len, gen, 0);
        hm.register(x as *const u8, len as usize).unwrap();
        let mut at = x;
        let mut rng = Rng(apart);
        for i in 0..iters {
            hm.advise(at, len, Advice::ReadMostly(true)).unwrap();
            match rng.below(3) {
                0 => {
                    gen += 1;
                    let p = Piece { addr: at, len, idx0: 0, old: gen - 1, new: Some(gen) };
                    assert_eq!(kernel(&devs[rng.below(2) as usize], &[p], true).unwrap(), None, "move {i}: write");
                }
                1 => {
                    gen += 1;
                    cpu_fill(at, len, gen, 0);
                }
                _ => {}
            }
            for d in &devs {
                let p = Piece { addr: at, len, idx0: 0, old: gen, new: None };
                assert_eq!(kernel(d, &[p], false).unwrap(), None, "move {i}: duplicate before");
            }
            let to = if at == x { y } else { x };
            // SAFETY: `at` holds the test's registered memory; `to` is its PROT_NONE placeholder in
            // this test's own reservation: MREMAP_FIXED replaces only that.
            let r = unsafe {
                libc::mremap(at as *mut _, len as usize, len as usize, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, to)
            };
            assert_eq!(r as u64, to);
            assert_eq!(reserve(at, len), Slot::Hole);
            at = to;
            for k in 0..2 {
                let d = &devs[(k + i as usize) % 2];
                let p = Piece { addr: at, len, idx0: 0, old: gen, new: None };
                assert_eq!(kernel(d, &[p], false).unwrap(), None, "move {i} ({apart} apart): device {k} after");
            }
            cpu_check(&format!("move {i}"), at, len, gen, 0);
        }
        hm.unregister(at as *const u8, len as usize).unwrap();
        // SAFETY: the test's own reservation (both places), not used after.
        unsafe { libc::munmap(base as *mut _, (apart + len) as usize) };
    }
}

/// Focused: registered memory shrunk to half and grown in place again over and over (its data
/// on a device or the CPU), checked by devices and the CPU each time, then registered whole
/// again. `HETMM_STRESS_SHRINK=<rounds>` (default 100).
#[test]
fn shrink_and_regrow_in_place_keeps_the_kept_half() {
    let iters = env("HETMM_STRESS_SHRINK").unwrap_or(100);
    let _ = env_logger::builder().is_test(true).try_init();
    for policy in ["hetmm", "uvm"] {
        let hm = Hetmm::with_policy(policy).unwrap();
        let devs = two_small_devices(&hm);
        let len = 16 * PS;
        let half = len / 2;
        let a =
            (0x1200_0000_0000u64..).step_by(1 << 30).find(|&b| mmap_fixed(b, 2 * len, libc::PROT_NONE, true)).unwrap();
        assert!(mmap_fixed(a, len, libc::PROT_READ | libc::PROT_WRITE, false));
        // SAFETY: the second half of the test's reservation: room to grow.
        assert_eq!(unsafe { libc::munmap((a + len) as *mut _, len as usize) }, 0);
        let mut gen = 1;
        cpu_fill(a, len, gen, 0);
        hm.register(a as *const u8, len as usize).unwrap();
        let mut rng = Rng(7);
        for i in 0..iters {
            let d = &devs[rng.below(2) as usize];
            match rng.below(3) {
                0 => hm.migrate(a, len, d.proc()).unwrap(),
                1 => {
                    gen += 1;
                    let p = Piece { addr: a, len, idx0: 0, old: gen - 1, new: Some(gen) };
                    assert_eq!(kernel(d, &[p], true).unwrap(), None, "round {i}: write");
                }
                _ => {}
            }
            // SAFETY: shrinks the test's registered memory in place.
            assert_eq!(unsafe { libc::mremap(a as *mut _, len as usize, half as usize, 0) } as u64, a);
            if rng.chance(2) {
                let p = Piece { addr: a, len: half, idx0: 0, old: gen, new: None };
                assert_eq!(kernel(d, &[p], false).unwrap(), None, "round {i}: shrunk");
            }
            // SAFETY: grows it in place again into the half it gave up (nothing else maps there:
            // far below where the kernel places mappings).
            assert_eq!(unsafe { libc::mremap(a as *mut _, half as usize, len as usize, 0) } as u64, a);
            cpu_check(&format!("round {i}: regrown half"), a + half, half, 0, half / 8);
            if rng.chance(2) {
                let p = Piece { addr: a, len: half, idx0: 0, old: gen, new: None };
                assert_eq!(kernel(d, &[p], false).unwrap(), None, "round {i}: kept half");
            }
            cpu_check(&format!("round {i}: kept half"), a, half, gen, 0);
            hm.unregister(a as *const u8, half as usize).unwrap();
            gen += 1;
            cpu_fill(a, len, gen, 0);
            hm.register(a as *const u8, len as usize).unwrap();
        }
        hm.unregister(a as *const u8, len as usize).unwrap();
        // SAFETY: the test's own mapping, not used after.
        unsafe { libc::munmap(a as *mut _, len as usize) };
    }
}

/// Focused: memory of new buffers moved (with `mremap`) right after registered memory that
/// another thread unregisters and registers again meanwhile, 2000 times. Giving the memory back
/// looks past its end for a part the program grew it by in place; it took the moved memory
/// there for such a part while the move was being applied (the buffer's view had forgotten it,
/// the memory's new owner not yet taken it) and replaced it with zeros (seed 6118 of the
/// extended stress test).
#[test]
fn memory_moved_in_beside_memory_given_back_keeps_its_data() {
    let hm = Hetmm::with_policy("hetmm").unwrap();
    let len = 8 * PS;
    let a = (0x1300_0000_0000u64..).step_by(1 << 30).find(|&b| mmap_fixed(b, 2 * len, libc::PROT_NONE, true)).unwrap();
    assert!(mmap_fixed(a, len, libc::PROT_READ | libc::PROT_WRITE, false));
    cpu_fill(a, len, 1, 0);
    hm.register(a as *const u8, len as usize).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let b = a + len;
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                hm.unregister(a as *const u8, len as usize).unwrap();
                hm.register(a as *const u8, len as usize).unwrap();
            }
        });
        // The other thread stops however this one ends (a failed check unwinds through here).
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        let mut kept = None;
        for round in 0..2000u64 {
            let buf = hm.alloc::<u64>((len / 8) as usize).unwrap();
            let gen = round + 2;
            cpu_fill(buf.ptr(), len, gen, 0);
            // SAFETY: moves the whole view of the new buffer (no slice of it is alive) over the
            // test's PROT_NONE placeholder at `b`, which MREMAP_FIXED replaces.
            let r = unsafe {
                libc::mremap(
                    buf.ptr() as *mut _,
                    len as usize,
                    len as usize,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    b,
                )
            };
            assert_eq!(r as u64, b, "{}", std::io::Error::last_os_error());
            // Dropped at once or a round later (the memory moved out stays managed).
            if round % 2 == 0 {
                drop(buf);
            } else {
                kept = Some(buf);
            }
            cpu_check(&format!("round {round}: moved in beside memory given back"), b, len, gen, 0);
            // SAFETY: the moved memory at `b`, the test's own: a placeholder replaces it.
            assert!(mmap_fixed(b, len, libc::PROT_NONE, false));
        }
        drop(kept);
    });
    cpu_check("the registered memory", a, len, 1, 0);
    hm.unregister(a as *const u8, len as usize).unwrap();
    // SAFETY: the test's own mapping and placeholder, unregistered, not used again.
    unsafe { libc::munmap(a as *mut _, 2 * len as usize) };
}
