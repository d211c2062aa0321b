//! [`SimDevice`]: the device handle, its threads, and its [`DeviceMmu`] implementation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use hetmm_core::device::{
    Completion, CopyOp, DeviceCaps, DeviceError, DeviceFault, DeviceMmu, Done, FaultCancel, MapEntry, MapTarget,
    PeerWindow, PhysAddr,
};
use hetmm_core::types::{Prot, VaRange, BLOCK_SIZE, PAGE_SIZE};
use parking_lot::{Mutex, RwLock};

use crate::compute::{new_launch, BlockCtx, Bounds, Grid, Launch, WorkerMsg};
use crate::copy::{CopyCounters, EngineMsg};
use crate::fault::FaultBuffer;
use crate::link::Link;
use crate::memory::PhysMem;
use crate::pagetable::{Census, PageTable, Target, Translation, VA_LIMIT};
use crate::tlb::{coalesce, Tlb};
use crate::usage::UseTable;
use crate::{SimConfig, SimError, SimStats};

/// How long dropping the last handle waits for the device's threads.
const JOIN_LIMIT: Duration = Duration::from_secs(5);

/// A value on its own cache lines (per-worker TLBs are locked by their worker on every access).
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) kernels: AtomicU64,
    pub(crate) blocks: AtomicU64,
    pub(crate) invalidate_calls: AtomicU64,
}

/// State shared by the handles and the device's threads.
pub(crate) struct Shared {
    pub(crate) cfg: SimConfig,
    pub(crate) mem: PhysMem,
    pub(crate) pt: RwLock<Option<PageTable>>,
    pub(crate) tlbs: Box<[Padded<Mutex<Tlb>>]>,
    pub(crate) faults: FaultBuffer,
    pub(crate) stopping: AtomicBool,
    pub(crate) copy: CopyCounters,
    pub(crate) counters: Counters,
    pub(crate) link: Link,
    pub(crate) uses: UseTable,
    /// The regions of the address space the device is attached to: memory a CPU access may
    /// fault on (see `BlockCtx`'s copies).
    pub(crate) regions: ManagedRegions,
    copy_tx: Sender<EngineMsg>,
    work_tx: Sender<WorkerMsg>,
}

/// The regions of an address space, by start, as its device learns them
/// (`region_added`/`region_removed`). Looked up on every copy a kernel makes from or into a
/// buffer of its own, so each thread keeps the map it last read and takes the lock only when
/// the map changed since: a read lock per copy made the `graph` workload's kernel, which copies
/// a few words at a time, 3.6x slower (with its scalar loads, which need no look-up at all).
#[derive(Debug)]
pub(crate) struct ManagedRegions {
    /// Never the same for two maps: names the map in the threads' copies.
    id: u64,
    map: RwLock<Arc<BTreeMap<u64, u64>>>,
    /// Bumped on every change, under the lock.
    gen: AtomicU64,
}

/// A map this thread read: the map's id, its generation then, and what it held.
type Seen = Option<(u64, u64, Arc<BTreeMap<u64, u64>>)>;

thread_local! {
    static SEEN: std::cell::RefCell<Seen> = const { std::cell::RefCell::new(None) };
}

impl Default for ManagedRegions {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ManagedRegions { id: NEXT.fetch_add(1, Ordering::Relaxed), map: RwLock::default(), gen: AtomicU64::new(0) }
    }
}

impl ManagedRegions {
    pub(crate) fn insert(&self, start: u64, len: u64) {
        let mut m = self.map.write();
        Arc::make_mut(&mut m).insert(start, len);
        self.gen.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn remove(&self, start: u64) {
        let mut m = self.map.write();
        Arc::make_mut(&mut m).remove(&start);
        self.gen.fetch_add(1, Ordering::Release);
    }

    /// Whether `[s, e)` overlaps a region.
    pub(crate) fn overlaps(&self, s: u64, e: u64) -> bool {
        // Read before the map: a change after this read is seen on the next call.
        let gen = self.gen.load(Ordering::Acquire);
        SEEN.with(|seen| {
            let mut seen = seen.borrow_mut();
            if !matches!(&*seen, Some((id, g, _)) if *id == self.id && *g == gen) {
                *seen = Some((self.id, gen, Arc::clone(&self.map.read())));
            }
            seen.as_ref().is_some_and(|(_, _, map)| {
                map.range(..e).next_back().is_some_and(|(&start, &len)| start.saturating_add(len) > s)
            })
        })
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("cfg", &self.cfg)
            .field("stopping", &self.stopping)
            .field("page_table", &self.pt.read().as_ref().map(PageTable::census))
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let s = &self.shared;
        s.stopping.store(true, Ordering::SeqCst);
        s.faults.wake_all();
        for _ in 0..s.cfg.copy_engines {
            let _ = s.copy_tx.send(EngineMsg::Stop);
        }
        for _ in 0..s.cfg.compute_workers {
            let _ = s.work_tx.send(WorkerMsg::Stop);
        }
        let me = std::thread::current().id();
        let deadline = Instant::now() + JOIN_LIMIT;
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            // A kernel holding the last handle drops it on a worker thread: never wait for
            // oneself.
            if t.thread().id() == me {
                continue;
            }
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                log::warn!("sim: thread {:?} did not stop in {JOIN_LIMIT:?}; detaching it", t.thread().name());
            }
        }
    }
}

/// A simulated accelerator: its own physical memory, page table, per-warp TLBs, replayable
/// fault buffer, copy engines and compute engine. Cheap to clone (a shared handle); dropping
/// the last clone stops its threads.
#[derive(Clone, Debug)]
pub struct SimDevice {
    h: Arc<Handle>,
}

impl SimDevice {
    /// Starts a device: reserves its memory (lazily backed) and starts its copy engines and
    /// compute workers. Fails on an invalid configuration or when memory or threads cannot
    /// be had.
    pub fn new(cfg: SimConfig) -> Result<Self, SimError> {
        cfg.validate()?;
        let mem = PhysMem::new(cfg.memory_bytes, cfg.prefault)?;
        let (copy_tx, copy_rx) = crossbeam_channel::unbounded();
        let (work_tx, work_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            mem,
            pt: RwLock::new(None),
            tlbs: (0..cfg.compute_workers).map(|_| Padded(Mutex::new(Tlb::new()))).collect(),
            faults: FaultBuffer::new(cfg.fault_buffer_entries),
            stopping: AtomicBool::new(false),
            copy: CopyCounters::default(),
            counters: Counters::default(),
            link: Link::new(cfg.link_gbps),
            uses: UseTable::default(),
            regions: ManagedRegions::default(),
            copy_tx,
            work_tx,
            cfg,
        });
        let h = Arc::new(Handle { shared: shared.clone(), threads: Mutex::new(Vec::new()) });
        for i in 0..shared.cfg.copy_engines {
            let (s, rx) = (shared.clone(), copy_rx.clone());
            let t = std::thread::Builder::new()
                .name(format!("sim-copy-{i}"))
                .spawn(move || crate::copy::engine_loop(&s.mem, &rx, &s.copy, &s.stopping))
                .map_err(|e| SimError::Thread(e.to_string()))?;
            h.threads.lock().push(t);
        }
        for i in 0..shared.cfg.compute_workers {
            let (s, rx) = (shared.clone(), work_rx.clone());
            let t = std::thread::Builder::new()
                .name(format!("sim-warp-{i}"))
                .spawn(move || crate::compute::worker_loop(&s, i as u32, &rx))
                .map_err(|e| SimError::Thread(e.to_string()))?;
            h.threads.lock().push(t);
        }
        Ok(Self { h })
    }

    fn s(&self) -> &Shared {
        &self.h.shared
    }

    /// The configuration the device was started with.
    pub fn config(&self) -> &SimConfig {
        &self.s().cfg
    }

    /// How many faults the core should fetch at a time (`SimConfig::fault_batch`).
    pub fn fault_batch(&self) -> usize {
        self.s().cfg.fault_batch
    }

    /// Faults written to the buffer and not fetched yet.
    pub fn pending_faults(&self) -> usize {
        self.s().faults.pending_len()
    }

    /// Launches `kernel` over `grid`: the compute workers claim blocks and run the closure once
    /// per block. Returns at once; wait on the [`Launch`]. Fails without running anything when
    /// the device has no page table ([`DeviceError::NoPageTable`]) or its faults were shut down
    /// by [`DeviceMmu::shutdown_faults`] (detached; [`DeviceError::Shutdown`] until a new page
    /// table is created).
    ///
    /// # Safety
    ///
    /// Until the kernel ends, no Rust reference may point into memory it writes, and no `&mut`
    /// into memory it reads. The device reads and writes memory the CPU maps too: host pages
    /// through remote mappings, and data the manager moves between host and device memory
    /// for its faults (revoking the CPU's mappings of pages the kernel writes). The compiler
    /// assumes memory under a `&` does not change, and memory under a `&mut` is not read by
    /// others. (`hetmm::Device::launch` keeps this with the buffers' borrow counts.)
    pub unsafe fn launch<F>(&self, grid: Grid, kernel: F) -> Result<Launch, DeviceError>
    where
        F: Fn(&BlockCtx<'_>) -> Result<(), DeviceError> + Send + Sync + 'static,
    {
        // SAFETY: the caller keeps `launch`'s contract, which is `launch_within`'s.
        unsafe { self.launch_within(grid, None, kernel) }
    }

    /// [`launch`](Self::launch), with the kernel's accesses held to `bounds` (every other
    /// access fails the kernel with [`DeviceError::Undeclared`]); `None` allows all.
    ///
    /// # Safety
    ///
    /// As for [`launch`](Self::launch), for the memory inside `bounds` (all of it if `None`).
    pub unsafe fn launch_within<F>(&self, grid: Grid, bounds: Option<Bounds>, kernel: F) -> Result<Launch, DeviceError>
    where
        F: Fn(&BlockCtx<'_>) -> Result<(), DeviceError> + Send + Sync + 'static,
    {
        let s = self.s();
        if s.stopping.load(Ordering::Relaxed) || s.faults.is_shutdown() {
            return Err(DeviceError::Shutdown);
        }
        if s.pt.read().is_none() {
            return Err(DeviceError::NoPageTable);
        }
        s.counters.kernels.fetch_add(1, Ordering::Relaxed);
        let (launch, tokens) = new_launch(grid, bounds, kernel, s.cfg.compute_workers);
        for t in tokens {
            // Fails only when every worker is gone; the token then fails its blocks as it drops.
            let _ = s.work_tx.send(WorkerMsg::Run(t));
        }
        Ok(launch)
    }

    /// Looks `va` up in the device page table (without setting the accessed bit or touching
    /// any TLB). `None` when unmapped or when there is no page table.
    pub fn translate(&self, va: u64) -> Option<Translation> {
        self.s().pt.read().as_ref().and_then(|pt| pt.translate(va))
    }

    /// What the page table holds (`None` without a page table).
    pub fn page_table_census(&self) -> Option<Census> {
        self.s().pt.read().as_ref().map(PageTable::census)
    }

    /// Counters.
    pub fn stats(&self) -> SimStats {
        let s = self.s();
        let mut st = SimStats::default();
        for t in s.tlbs.iter() {
            let tlb = t.0.lock();
            let c = &tlb.counters;
            st.tlb_hits += c.hits;
            st.tlb_misses += c.misses;
            st.page_walks += c.walks;
            st.tlb_entries_invalidated += c.invalidated;
            st.remote_bytes += c.remote_bytes;
            st.access_notices += c.notices;
        }
        let f = s.faults.counters();
        st.faults_raised = f.raised;
        st.faults_fetched = f.fetched;
        st.faults_cancelled = f.cancelled;
        st.fault_buffer_full_waits = f.buffer_full_waits;
        st.replays = f.replays;
        st.tlb_invalidations = s.counters.invalidate_calls.load(Ordering::Relaxed);
        st.bytes_h2d = s.copy.h2d.load(Ordering::Relaxed);
        st.bytes_d2h = s.copy.d2h.load(Ordering::Relaxed);
        st.bytes_d2d = s.copy.d2d.load(Ordering::Relaxed);
        st.bytes_from_peers = s.copy.peer.load(Ordering::Relaxed);
        st.bytes_zeroed = s.copy.zero.load(Ordering::Relaxed);
        st.copy_pieces = s.copy.ops.load(Ordering::Relaxed);
        st.copy_batches = s.copy.batches.load(Ordering::Relaxed);
        st.kernels_launched = s.counters.kernels.load(Ordering::Relaxed);
        st.blocks_run = s.counters.blocks.load(Ordering::Relaxed);
        st.link_busy_ns = s.link.busy_ns();
        st
    }

    fn flush_all_tlbs(&self) {
        for t in self.s().tlbs.iter() {
            t.0.lock().flush();
        }
    }
}

/// Checks a virtual range for the page table: non-empty, page aligned, below the VA limit.
fn check_va(start: u64, len: u64) -> Result<VaRange, DeviceError> {
    let r = VaRange::new(start, len);
    match VaRange::checked(start, len) {
        Some(r) if r.is_page_aligned() && r.end() <= VA_LIMIT => Ok(r),
        _ => Err(DeviceError::BadRange(r)),
    }
}

impl DeviceMmu for SimDevice {
    fn caps(&self) -> DeviceCaps {
        DeviceCaps {
            name: "sim".into(),
            page_sizes: PAGE_SIZE | BLOCK_SIZE,
            replayable_faults: true,
            coherent: false,
            remote_host_access: true,
            peer: self.s().cfg.peer_copies.then(|| PeerWindow { fabric: "sim", base: self.s().mem.base_addr() }),
            region_bound: false,
            memory_bytes: self.s().mem.len(),
        }
    }

    fn physical_ranges(&self) -> Vec<(PhysAddr, u64)> {
        vec![(PhysAddr(0), self.s().mem.len())]
    }

    fn create_page_table(&self) -> Result<(), DeviceError> {
        let s = self.s();
        if s.stopping.load(Ordering::Relaxed) {
            return Err(DeviceError::Shutdown);
        }
        let mut pt = s.pt.write();
        if pt.is_some() {
            return Err(DeviceError::Other("the device page table already exists".into()));
        }
        *pt = Some(PageTable::new());
        drop(pt);
        s.faults.reset();
        self.flush_all_tlbs();
        Ok(())
    }

    unsafe fn destroy_page_table(&self) {
        *self.s().pt.write() = None;
        self.flush_all_tlbs();
    }

    /// Validates the whole batch first (virtual ranges, device physical ranges, host addresses
    /// page aligned), so a failed call changes nothing.
    unsafe fn map(&self, entries: &[MapEntry]) -> Result<(), DeviceError> {
        let s = self.s();
        let mut todo = Vec::with_capacity(entries.len());
        for e in entries {
            let r = check_va(e.va, e.len)?;
            let target = match e.target {
                MapTarget::Device(PhysAddr(pa)) => {
                    if pa % PAGE_SIZE != 0 {
                        return Err(DeviceError::BadPhysical { addr: pa, len: e.len });
                    }
                    s.mem.check(pa, e.len)?;
                    Target::Device(pa)
                }
                MapTarget::Host(h) => {
                    let a = h.0 as u64;
                    if a == 0 || !a.is_multiple_of(PAGE_SIZE) || a.checked_add(e.len).is_none() {
                        return Err(DeviceError::Other(format!(
                            "host aperture target {a:#x}+{:#x} for {r} is not a valid page-aligned range",
                            e.len
                        )));
                    }
                    Target::Host(a)
                }
                // Another simulated device's arena: the same kind of remote access as host memory
                // (the peer link is the link), never this device's own memory.
                MapTarget::Peer(p) => {
                    if p.0 % PAGE_SIZE != 0 {
                        return Err(DeviceError::Other(format!("peer target {:#x} for {r} is not page aligned", p.0)));
                    }
                    crate::copy::check_peer(&s.mem, p, e.len)?;
                    Target::Host(p.0)
                }
            };
            todo.push((r, target, e.prot));
        }
        let mut pt = s.pt.write();
        let pt = pt.as_mut().ok_or(DeviceError::NoPageTable)?;
        for (r, target, prot) in todo {
            pt.map(r.start, r.len, target, prot);
        }
        Ok(())
    }

    fn unmap(&self, ranges: &[VaRange]) -> Result<(), DeviceError> {
        for r in ranges {
            check_va(r.start, r.len)?;
        }
        let mut pt = self.s().pt.write();
        let pt = pt.as_mut().ok_or(DeviceError::NoPageTable)?;
        for r in ranges {
            pt.unmap(*r);
        }
        Ok(())
    }

    fn protect(&self, ranges: &[(VaRange, Prot)]) -> Result<(), DeviceError> {
        for (r, _) in ranges {
            check_va(r.start, r.len)?;
        }
        let mut pt = self.s().pt.write();
        let pt = pt.as_mut().ok_or(DeviceError::NoPageTable)?;
        for (r, p) in ranges {
            pt.protect(*r, *p);
        }
        Ok(())
    }

    fn invalidate_tlb(&self, ranges: &[VaRange]) {
        let s = self.s();
        let merged = coalesce(ranges);
        if merged.is_empty() {
            return;
        }
        s.counters.invalidate_calls.fetch_add(1, Ordering::Relaxed);
        for t in s.tlbs.iter() {
            // Taking the lock waits for the worker's in-flight access (shootdown).
            t.0.lock().invalidate(&merged);
        }
    }

    unsafe fn copy(&self, ops: &[CopyOp]) -> Result<Box<dyn Completion>, DeviceError> {
        let s = self.s();
        if s.stopping.load(Ordering::Relaxed) {
            return Err(DeviceError::Shutdown);
        }
        crate::copy::validate(&s.mem, ops)?;
        let ops: Vec<CopyOp> = ops.iter().copied().filter(|o| !o.is_empty()).collect();
        if ops.is_empty() {
            return Ok(Box::new(Done));
        }
        Ok(Box::new(crate::copy::submit(&s.copy_tx, &ops, &s.copy)?))
    }

    fn fetch_faults(&self, max: usize, out: &mut Vec<DeviceFault>) -> usize {
        self.s().faults.fetch(max, out)
    }

    fn wait_for_faults(&self, timeout: Duration) -> bool {
        let s = self.s();
        s.faults.wait(timeout, &s.stopping)
    }

    fn replay(&self, cancel: &[(u64, hetmm_core::types::Access, FaultCancel)]) {
        self.s().faults.replay(cancel);
    }

    fn shutdown_faults(&self) {
        self.s().faults.shutdown();
    }

    fn take_access_notices(&self, out: &mut Vec<VaRange>) {
        let mut regions = Vec::new();
        self.s().faults.take_notices(&mut regions);
        out.extend(regions.into_iter().map(|r| VaRange::new(r, BLOCK_SIZE)));
    }

    /// Forgets the use counts of the region's 2 MiB ranges, so that a region mapped there later
    /// does not start hot. Counts still in a worker's TLB slot (under 64 KiB of accesses per
    /// range; see `usage::USE_FLUSH`) may land later.
    fn region_removed(&self, app: VaRange) {
        self.s().uses.take(app);
        self.s().regions.remove(app.start);
    }

    fn region_added(&self, app: VaRange, _backing: hetmm_core::device::HostAddr) -> Result<(), DeviceError> {
        self.s().regions.insert(app.start, app.len);
        Ok(())
    }

    fn take_access_counts(&self, range: VaRange) -> Option<u64> {
        (self.s().cfg.access_counter_threshold > 0).then(|| self.s().uses.take(range))
    }

    fn take_accessed(&self, range: VaRange) -> Option<Vec<u64>> {
        let s = self.s();
        let taken = s.pt.read().as_ref().map(|pt| pt.take_accessed(range)).unwrap_or_default();
        // The bits are set by page-table walks, which a cached translation spares later
        // accesses: the range's go too (as an OS flushes the TLB when it clears accessed bits),
        // or a page in constant use would never be seen accessed again.
        for t in s.tlbs.iter() {
            t.0.lock().invalidate(&[range]);
        }
        Some(taken)
    }
}

#[cfg(test)]
mod managed_tests {
    use super::ManagedRegions;

    /// A thread that read the map sees every later change on its next look-up, and two maps
    /// never answer for each other.
    #[test]
    fn lookups_follow_every_change() {
        let (a, b) = (ManagedRegions::default(), ManagedRegions::default());
        assert!(!a.overlaps(0x1000, 0x2000));
        a.insert(0x1000, 0x1000);
        assert!(a.overlaps(0x1fff, 0x3000) && a.overlaps(0, 0x1001));
        assert!(!a.overlaps(0x2000, 0x3000) && !a.overlaps(0, 0x1000));
        assert!(!b.overlaps(0x1000, 0x2000), "another map's region");
        a.remove(0x1000);
        assert!(!a.overlaps(0x1000, 0x2000), "a removed region");
        a.insert(u64::MAX - 0xfff, 0x1000);
        assert!(a.overlaps(u64::MAX - 1, u64::MAX));
    }
}
