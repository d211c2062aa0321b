//! The compute engine: worker threads (warp slots) that run the blocks of launched kernels.
//! Every memory access a kernel makes goes through the worker's TLB and, on a miss, the
//! device page table; an access the table does not allow raises a replayable fault and stalls
//! the warp until the core replays.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar};
use std::time::Duration;

use bytemuck::Pod;
use crossbeam_channel::Receiver;
use hetmm_core::device::{Completion, DeviceError};
use hetmm_core::types::{Access, VaRange};
use parking_lot::Mutex;

use crate::device::Shared;
use crate::memory::{host_atomic, host_read, host_write, AtomicOp};
use crate::pagetable::{Target, Translation};
use crate::sync::{lock, wait_until};
use crate::tlb::{Tlb, TlbCounters};

/// How long a stalled warp waits for the replay of its fault (or for space in a full fault
/// buffer) before its access fails with [`DeviceError::Timeout`].
pub const FAULT_WAIT_LIMIT: Duration = Duration::from_secs(60);

/// The shape of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Grid {
    /// Number of blocks.
    pub blocks: u32,
    /// Threads in each block (a kernel loops over [`BlockCtx::threads`]).
    pub threads_per_block: u32,
}

impl Grid {
    /// A grid of `blocks` blocks of `threads_per_block` threads.
    pub const fn new(blocks: u32, threads_per_block: u32) -> Self {
        Self { blocks, threads_per_block }
    }
}

/// The memory a kernel may touch: byte ranges and whether it may write them. An access not
/// wholly inside them fails with [`DeviceError::Undeclared`] before touching anything, as a
/// GPU's access outside its allocations faults. A launch without bounds may touch any memory the
/// device page table maps or the core will fault in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bounds {
    /// `(start, end, writable)`, in the order allowed.
    ranges: Vec<(u64, u64, bool)>,
}

impl Bounds {
    /// No memory at all.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also allows `[start, start + len)` for reading, and for writing and atomics if
    /// `writable`. A range reaching past the end of the address space is cut there.
    pub fn allow(&mut self, start: u64, len: u64, writable: bool) {
        self.ranges.push((start, start.saturating_add(len), writable));
    }

    /// Whether `[va, va + len)` is allowed for `access`: every byte inside some range that
    /// permits it (ranges may abut: a buffer declared in two parts).
    fn check(&self, va: u64, len: u64, access: Access) -> Result<(), DeviceError> {
        let write = matches!(access, Access::Write | Access::Atomic);
        let end = va.checked_add(len).ok_or(DeviceError::BadRange(VaRange::new(va, len)))?;
        let mut cur = va;
        while cur < end {
            let next = self
                .ranges
                .iter()
                .filter(|&&(s, e, w)| s <= cur && cur < e && (w || !write))
                .map(|&(_, e, _)| e)
                .max()
                .ok_or(DeviceError::Undeclared { va, len, access })?;
            cur = next.min(end);
        }
        Ok(())
    }
}

type KernelFn = dyn Fn(&BlockCtx<'_>) -> Result<(), DeviceError> + Send + Sync;

#[derive(Debug, Default)]
struct Progress {
    done: u64,
    error: Option<DeviceError>,
}

/// Waiting uses std's futex-based primitives, not `parking_lot` (see `crate::sync`).
pub(crate) struct LaunchState {
    kernel: Box<KernelFn>,
    grid: Grid,
    bounds: Option<Bounds>,
    next: AtomicU64,
    failed: AtomicBool,
    tokens: AtomicUsize,
    finish: Arc<Finish>,
}

/// How far a launch is: apart from its kernel, so that waiting on a launch ([`Done`]) keeps no
/// closure alive (nor what it captured).
#[derive(Debug)]
struct Finish {
    blocks: u64,
    progress: std::sync::Mutex<Progress>,
    cv: Condvar,
}

impl std::fmt::Debug for LaunchState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchState")
            .field("grid", &self.grid)
            .field("next", &self.next)
            .field("failed", &self.failed)
            .field("progress", &*lock(&self.finish.progress))
            .finish_non_exhaustive()
    }
}

impl LaunchState {
    fn complete(&self, n: u64, r: Result<(), DeviceError>) {
        let f = &self.finish;
        let mut p = lock(&f.progress);
        p.done += n;
        if let Err(e) = r {
            p.error.get_or_insert(e);
        }
        if p.done >= f.blocks {
            f.cv.notify_all();
        }
    }
}

thread_local! {
    /// The launch whose block this thread (a worker) is running, as its [`Finish`]'s address;
    /// 0 when none.
    static RUNNING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A launch's end, to wait for: what [`Launch::done`] gives. It holds no part of the kernel.
#[derive(Debug, Clone)]
pub struct Done {
    finish: Arc<Finish>,
}

impl Done {
    /// Waits, at most `timeout`, until every block has finished or been skipped; returns the
    /// first error a block returned.
    pub fn wait(&self, timeout: Duration) -> Result<(), DeviceError> {
        let f = &self.finish;
        let deadline = crate::sync::deadline_after(timeout);
        let (p, done) = wait_until(&f.cv, lock(&f.progress), deadline, |p| p.done >= f.blocks);
        if !done {
            return Err(DeviceError::Timeout(timeout));
        }
        match &p.error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Whether every block has finished.
    pub fn is_done(&self) -> bool {
        lock(&self.finish.progress).done >= self.finish.blocks
    }

    /// Whether the calling thread is running a block of this launch (a wait for it there would
    /// wait for itself).
    pub fn is_current(&self) -> bool {
        RUNNING.with(std::cell::Cell::get) == Arc::as_ptr(&self.finish) as usize
    }
}

/// A claim on a launch's blocks held by one worker. When the last token of a launch is
/// dropped without its blocks having been claimed (the device went away), the unclaimed blocks
/// fail with [`DeviceError::Shutdown`], so waiting on the launch never hangs.
#[derive(Debug)]
pub(crate) struct Token(Arc<LaunchState>);

impl Drop for Token {
    fn drop(&mut self) {
        if self.0.tokens.fetch_sub(1, Ordering::AcqRel) == 1 {
            // No other token is alive, so no worker is claiming blocks concurrently.
            let blocks = u64::from(self.0.grid.blocks);
            let n = self.0.next.load(Ordering::Acquire);
            if n < blocks {
                self.0.next.store(blocks, Ordering::Release);
                self.0.complete(blocks - n, Err(DeviceError::Shutdown));
            }
        }
    }
}

/// A message to the workers.
#[derive(Debug)]
pub(crate) enum WorkerMsg {
    /// Claim and run blocks of this launch.
    Run(Token),
    /// Exit.
    Stop,
}

/// A launched kernel.
#[derive(Debug, Clone)]
pub struct Launch {
    state: Arc<LaunchState>,
}

impl Launch {
    /// Waits, at most `timeout`, until every block has finished or been skipped; returns the
    /// first error a block returned (then the remaining blocks were skipped).
    pub fn wait(&self, timeout: Duration) -> Result<(), DeviceError> {
        self.done().wait(timeout)
    }

    /// Whether every block has finished.
    pub fn is_done(&self) -> bool {
        self.done().is_done()
    }

    /// The launch's end, to wait for without keeping the kernel alive.
    pub fn done(&self) -> Done {
        Done { finish: Arc::clone(&self.state.finish) }
    }

    /// The launch's grid.
    pub fn grid(&self) -> Grid {
        self.state.grid
    }
}

impl Completion for Launch {
    fn wait(&mut self, timeout: Duration) -> Result<(), DeviceError> {
        Launch::wait(self, timeout)
    }
}

/// Creates the state of a launch and the tokens to hand to `workers` workers.
pub(crate) fn new_launch<F>(grid: Grid, bounds: Option<Bounds>, kernel: F, workers: usize) -> (Launch, Vec<Token>)
where
    F: Fn(&BlockCtx<'_>) -> Result<(), DeviceError> + Send + Sync + 'static,
{
    let n = (grid.blocks as usize).min(workers);
    let state = Arc::new(LaunchState {
        kernel: Box::new(kernel),
        grid,
        bounds,
        next: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        tokens: AtomicUsize::new(n),
        finish: Arc::new(Finish {
            blocks: u64::from(grid.blocks),
            progress: std::sync::Mutex::new(Progress::default()),
            cv: Condvar::new(),
        }),
    });
    let tokens = (0..n).map(|_| Token(state.clone())).collect();
    (Launch { state }, tokens)
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// A worker's thread body.
pub(crate) fn worker_loop(shared: &Shared, worker: u32, rx: &Receiver<WorkerMsg>) {
    let tlb = &shared.tlbs[worker as usize].0;
    while let Ok(msg) = rx.recv() {
        let token = match msg {
            WorkerMsg::Stop => break,
            WorkerMsg::Run(t) => t,
        };
        let ls = &token.0;
        let blocks = u64::from(ls.grid.blocks);
        loop {
            let idx = ls.next.fetch_add(1, Ordering::AcqRel);
            if idx >= blocks {
                break;
            }
            let r = if ls.failed.load(Ordering::Acquire) {
                Ok(()) // skipped after another block's error
            } else if shared.stopping.load(Ordering::Relaxed) {
                Err(DeviceError::Shutdown)
            } else {
                shared.counters.blocks.fetch_add(1, Ordering::Relaxed);
                let ctx =
                    BlockCtx { shared, tlb, worker, block: idx as u32, grid: ls.grid, bounds: ls.bounds.as_ref() };
                RUNNING.with(|r| r.set(Arc::as_ptr(&ls.finish) as usize));
                let r = catch_unwind(AssertUnwindSafe(|| (ls.kernel)(&ctx)));
                RUNNING.with(|r| r.set(0));
                match r {
                    Ok(r) => r,
                    Err(p) => {
                        Err(DeviceError::Other(format!("kernel panicked in block {idx}: {}", panic_message(&*p))))
                    }
                }
            };
            // The block is done once its remote bytes have crossed the link.
            let owed = std::mem::take(&mut tlb.lock().counters.link_owed);
            shared.link.transfer(owed);
            if r.is_err() {
                ls.failed.store(true, Ordering::Release);
            }
            ls.complete(1, r);
        }
    }
}

/// What a kernel block sees: its index, the grid, and the device's memory through the
/// worker's TLB and the device page table.
///
/// Accesses must be naturally aligned for their type (`va % align_of::<T>() == 0`); a
/// misaligned access fails with [`DeviceError::Other`]. An access the page table does not allow
/// stalls the block on a replayable fault; if the core cancels the fault the access returns
/// [`DeviceError::FaultCancelled`], which the kernel should return with `?`.
pub struct BlockCtx<'a> {
    shared: &'a Shared,
    tlb: &'a Mutex<Tlb>,
    worker: u32,
    block: u32,
    grid: Grid,
    bounds: Option<&'a Bounds>,
}

impl std::fmt::Debug for BlockCtx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCtx")
            .field("worker", &self.worker)
            .field("block", &self.block)
            .field("grid", &self.grid)
            .finish()
    }
}

fn misaligned(va: u64, align: usize) -> DeviceError {
    DeviceError::Other(format!("misaligned device access at {va:#x} (alignment {align})"))
}

impl BlockCtx<'_> {
    /// This block's index in `0..grid().blocks`.
    pub fn block_idx(&self) -> u32 {
        self.block
    }

    /// The launch's grid.
    pub fn grid(&self) -> Grid {
        self.grid
    }

    /// The block's thread indices (`0..threads_per_block`).
    pub fn threads(&self) -> std::ops::Range<u32> {
        0..self.grid.threads_per_block
    }

    /// The warp slot (worker) running this block; the `client` of its faults.
    pub fn warp(&self) -> u32 {
        self.worker
    }

    /// Translates `va` for `access` (through the TLB, walking the page table on a miss,
    /// faulting and waiting for replay when the table does not allow it) and runs `f` on the
    /// translation and the worker's counters while holding the TLB, so no invalidation
    /// completes during the access.
    #[inline]
    fn with_translation<R>(
        &self,
        va: u64,
        access: Access,
        mut f: impl FnMut(&Translation, &mut TlbCounters) -> Result<R, DeviceError>,
    ) -> Result<R, DeviceError> {
        let need = access.needs();
        loop {
            {
                let mut tlb = self.tlb.lock();
                let t = match tlb.lookup(va) {
                    Some(t) if t.prot.contains(need) => Some(t),
                    cached => {
                        if let Some(t) = cached {
                            // Permission miss: a faulting entry is never kept.
                            tlb.remove(&t);
                            tlb.counters.hits -= 1;
                            tlb.counters.misses += 1;
                        }
                        tlb.counters.walks += 1;
                        let pt = self.shared.pt.read();
                        let Some(pt) = pt.as_ref() else {
                            return Err(DeviceError::NoPageTable);
                        };
                        match pt.walk(va) {
                            Some(t) if t.prot.contains(need) => {
                                tlb.insert(&t);
                                Some(t)
                            }
                            _ => None,
                        }
                    }
                };
                if let Some(t) = t {
                    return f(&t, &mut tlb.counters);
                }
            }
            self.shared.faults.raise_and_wait(va, access, self.worker, &self.shared.stopping, FAULT_WAIT_LIMIT)?;
        }
    }

    /// Counts an access of `n` bytes at `va` for the use counters ([`crate::usage`]), which are
    /// on with the access counters; `c` is the worker's, under its TLB's lock.
    #[inline]
    fn count_use(&self, c: &mut TlbCounters, va: u64, n: u64) {
        if self.shared.cfg.access_counter_threshold > 0 {
            if let Some((region, k)) = c.count_use(va, n) {
                self.shared.uses.add(region, k);
            }
        }
    }

    /// Runs `f(target, offset, n)` for each translated run of `[va, va + len)`: one
    /// translation per page-table entry (4 KiB or 2 MiB) the range crosses.
    #[inline]
    fn for_runs(
        &self,
        va: u64,
        len: usize,
        access: Access,
        mut f: impl FnMut(Target, usize, usize) -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        if va.checked_add(len as u64).is_none() {
            return Err(DeviceError::BadRange(VaRange::new(va, len as u64)));
        }
        if let Some(b) = self.bounds {
            b.check(va, len as u64, access)?;
        }
        let mut done = 0usize;
        let mut owed = 0u64;
        // Every 2 MiB region whose counter fired (one access may cross several).
        let mut notices: Vec<u64> = Vec::new();
        let threshold = self.shared.cfg.access_counter_threshold;
        while done < len {
            let cur = va + done as u64;
            let n = self.with_translation(cur, access, |t, c| {
                let n = ((t.va + t.size - cur) as usize).min(len - done);
                let target = t.target.offset(cur - t.va);
                f(target, done, n)?;
                self.count_use(c, cur, n as u64);
                if let Target::Host(_) = target {
                    owed += c.remote(n as u64);
                    notices.extend(c.count_access(cur, n as u64, threshold));
                }
                Ok(n)
            })?;
            done += n;
        }
        // Outside the TLB's lock: the wait must not hold up invalidations.
        self.shared.link.transfer(owed);
        for region in notices {
            self.shared.faults.notify_access(region);
        }
        Ok(())
    }

    /// Whether `[addr, addr + len)` touches memory the address space manages: a CPU access
    /// there may fault, and its service invalidates every TLB, this worker's too.
    fn managed(&self, addr: usize, len: usize) -> bool {
        self.shared.regions.overlaps(addr as u64, (addr as u64).saturating_add(len as u64))
    }

    /// Copies device memory at `va` into `out`. The kernel's own buffer may be memory hetmm
    /// manages (a slice of a buffer whose data is on a device): the copy goes through a buffer
    /// of the worker's then, for its fault, taken under this worker's TLB lock, would wait for
    /// that same lock (found by an audit). Kernels' own memory is not managed: no extra copy.
    fn read_bytes(&self, va: u64, out: &mut [u8]) -> Result<(), DeviceError> {
        if self.managed(out.as_ptr() as usize, out.len()) {
            let mut bounce = vec![0u8; out.len()];
            self.read_direct(va, &mut bounce)?;
            out.copy_from_slice(&bounce);
            return Ok(());
        }
        self.read_direct(va, out)
    }

    /// [`Self::read_bytes`] into memory a CPU access cannot fault on.
    fn read_direct(&self, va: u64, out: &mut [u8]) -> Result<(), DeviceError> {
        let mem = &self.shared.mem;
        self.for_runs(va, out.len(), Access::Read, |t, off, n| {
            let dst = &mut out[off..off + n];
            match t {
                Target::Device(pa) => mem.read(pa, dst),
                Target::Host(a) => {
                    // SAFETY: the translation is used under the worker's TLB lock, so it is not
                    // invalidated yet; `map`'s contract keeps the host memory valid until then.
                    unsafe { host_read(a as usize, dst) };
                    Ok(())
                }
            }
        })
    }

    /// Copies `data` to device memory at `va`, through a buffer of the worker's where `data` is
    /// managed memory (see [`Self::read_bytes`]).
    fn write_bytes(&self, va: u64, data: &[u8]) -> Result<(), DeviceError> {
        if self.managed(data.as_ptr() as usize, data.len()) {
            // The copy is the point: the worker's own memory, which no CPU access faults on.
            #[allow(clippy::unnecessary_to_owned)]
            return self.write_direct(va, &data.to_vec());
        }
        self.write_direct(va, data)
    }

    /// [`Self::write_bytes`] from memory a CPU access cannot fault on.
    fn write_direct(&self, va: u64, data: &[u8]) -> Result<(), DeviceError> {
        let mem = &self.shared.mem;
        self.for_runs(va, data.len(), Access::Write, |t, off, n| {
            let src = &data[off..off + n];
            match t {
                Target::Device(pa) => mem.write(pa, src),
                Target::Host(a) => {
                    // SAFETY: as in `read_bytes`.
                    unsafe { host_write(a as usize, src) };
                    Ok(())
                }
            }
        })
    }

    fn atomic(&self, va: u64, op: AtomicOp) -> Result<u64, DeviceError> {
        if !va.is_multiple_of(op.size()) {
            return Err(misaligned(va, op.size() as usize));
        }
        if let Some(b) = self.bounds {
            b.check(va, op.size(), Access::Atomic)?;
        }
        let mem = &self.shared.mem;
        let mut owed = 0u64;
        let mut notice = None;
        let threshold = self.shared.cfg.access_counter_threshold;
        let r = self.with_translation(va, Access::Atomic, |t, c| {
            self.count_use(c, va, op.size());
            match t.target.offset(va - t.va) {
                Target::Device(pa) => mem.atomic(pa, op),
                Target::Host(a) => {
                    owed += c.remote(op.size());
                    notice = c.count_access(va, op.size(), threshold);
                    // SAFETY: as in `read_bytes`.
                    unsafe { host_atomic(a as usize, op) }
                }
            }
        });
        self.shared.link.transfer(owed);
        if let Some(region) = notice {
            self.shared.faults.notify_access(region);
        }
        r
    }

    /// Loads a `T` from `va`.
    #[inline]
    pub fn load<T: Pod>(&self, va: u64) -> Result<T, DeviceError> {
        if !va.is_multiple_of(std::mem::align_of::<T>() as u64) {
            return Err(misaligned(va, std::mem::align_of::<T>()));
        }
        let mut v = T::zeroed();
        // Into a local, which no CPU access faults on: no look-up of managed memory.
        self.read_direct(va, bytemuck::bytes_of_mut(&mut v))?;
        Ok(v)
    }

    /// Stores `v` at `va`.
    #[inline]
    pub fn store<T: Pod>(&self, va: u64, v: T) -> Result<(), DeviceError> {
        if !va.is_multiple_of(std::mem::align_of::<T>() as u64) {
            return Err(misaligned(va, std::mem::align_of::<T>()));
        }
        // From a local (see `load`).
        self.write_direct(va, bytemuck::bytes_of(&v))
    }

    /// Reads `out.len()` consecutive `T`s from `va` (one translation per page-table entry).
    ///
    /// `out` must be the kernel's own memory (a local buffer, as a GPU's registers or shared
    /// memory), not memory hetmm manages: the copy runs under this worker's TLB lock, and a CPU
    /// fault on hetmm's memory there could wait for a migration that waits for that lock. The
    /// same holds for [`BlockCtx::write_slice`]'s `data`.
    #[inline]
    pub fn read_slice<T: Pod>(&self, va: u64, out: &mut [T]) -> Result<(), DeviceError> {
        if !va.is_multiple_of(std::mem::align_of::<T>() as u64) {
            return Err(misaligned(va, std::mem::align_of::<T>()));
        }
        self.read_bytes(va, bytemuck::cast_slice_mut(out))
    }

    /// Writes `data` as consecutive `T`s at `va` (one translation per page-table entry).
    #[inline]
    pub fn write_slice<T: Pod>(&self, va: u64, data: &[T]) -> Result<(), DeviceError> {
        if !va.is_multiple_of(std::mem::align_of::<T>() as u64) {
            return Err(misaligned(va, std::mem::align_of::<T>()));
        }
        self.write_bytes(va, bytemuck::cast_slice(data))
    }

    /// Atomically adds `v` to the `u32` at `va`; returns the previous value. Needs `ATOMIC`.
    pub fn atomic_add_u32(&self, va: u64, v: u32) -> Result<u32, DeviceError> {
        self.atomic(va, AtomicOp::AddU32(v)).map(|p| p as u32)
    }

    /// Atomically adds `v` to the `u64` at `va`; returns the previous value. Needs `ATOMIC`.
    pub fn atomic_add_u64(&self, va: u64, v: u64) -> Result<u64, DeviceError> {
        self.atomic(va, AtomicOp::AddU64(v))
    }

    /// Atomically replaces the `u32` at `va` with `new` if it equals `current`; returns the
    /// previous value (equal to `current` on success). Needs `ATOMIC`.
    pub fn atomic_cas_u32(&self, va: u64, current: u32, new: u32) -> Result<u32, DeviceError> {
        self.atomic(va, AtomicOp::CasU32(current, new)).map(|p| p as u32)
    }
}
