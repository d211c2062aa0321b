//! The address space (GMEM's `gm_as`): shared regions with their blocks, the attached devices
//! with their allocators and fault-service threads, and the public operations on them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::alloc::BuddyAllocator;
use crate::attrs::{Attrs, RangeAttrs};
use crate::block::{Block, CpuMap, Page, PageMask};
use crate::cpu::{CpuFaultHandler, CpuMmu};
use crate::device::{DeviceCaps, DeviceMmu};
use crate::error::{CoreError, Result};
use crate::fork::{Gate, GateGuard};
use crate::migrate;
use crate::policy::{select_residency, Decision, Policy, Reach};
use crate::stats::{add, add_since, Stats, StatsSnapshot};
use crate::types::{
    align_down, Access, DeviceId, Proc, Prot, VaRange, BLOCK_SIZE, MAX_DEVICES, PAGES_PER_BLOCK, PAGE_SIZE,
};

/// Tunables of an address space.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// CPU fault-around: bytes brought back and mapped per CPU fault (a power of two from 4 KiB
    /// to 2 MiB, aligned).
    pub fault_around: u64,
    /// Longest wait for one batch of copies.
    pub copy_timeout: Duration,
    /// The policy (prefetch, eviction, thrashing, service parallelism).
    pub policy: Policy,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig { fault_around: BLOCK_SIZE, copy_timeout: Duration::from_secs(60), policy: Policy::hetmm() }
    }
}

impl CoreConfig {
    /// The default configuration with the policy called `name` (see [`Policy::NAMES`]).
    pub fn with_policy(name: &str) -> Option<Self> {
        Some(CoreConfig { policy: Policy::by_name(name)?, ..CoreConfig::default() })
    }
}

/// Options for attaching a device.
#[derive(Debug, Clone, Copy)]
pub struct AttachOptions {
    /// Most fault entries fetched per batch.
    pub fault_batch: usize,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions { fault_batch: 256 }
    }
}

/// A block named by its region's start and its index there (what eviction queues hold).
pub(crate) type BlockKey = (u64, usize);

/// A shared region: one contiguous range of shared virtual memory with its blocks.
#[derive(Debug)]
pub struct Region {
    /// The range (page aligned; blocks follow absolute 2 MiB boundaries).
    pub range: VaRange,
    /// Protection the program asked for.
    pub prot: Prot,
    /// Mirrored, not migrated: devices map the host pages remotely (file-backed `MAP_SHARED`
    /// memory); nothing ever moves to device memory.
    pub remote: bool,
    pub(crate) cpu: Arc<dyn CpuMmu>,
    pub(crate) blocks: Vec<Mutex<Block>>,
    freed: AtomicBool,
    /// Start of the last chunk the CPU faulted on, and how far read-ahead has been queued.
    last_cpu_chunk: AtomicU64,
    readahead_until: AtomicU64,
}

impl Region {
    /// Validates the range of a new region: non-empty, page aligned, and ending at least one
    /// block below the top of the address space, so that the block arithmetic ([`Region::build`],
    /// [`Region::block_span`]: the end of the region's last 2 MiB block) cannot overflow.
    pub(crate) fn check_new(range: VaRange) -> Result<()> {
        let checked = VaRange::checked(range.start, range.len).ok_or(CoreError::Empty { start: range.start })?;
        if !checked.is_page_aligned() {
            return Err(CoreError::Unaligned(range));
        }
        if range.start.checked_add(range.len).and_then(|end| end.checked_add(BLOCK_SIZE)).is_none() {
            return Err(CoreError::Overflow { start: range.start, len: range.len });
        }
        Ok(())
    }

    /// A region over `range` (checked by [`Region::check_new`]) whose CPU side is `cpu` (which
    /// must accept every sub-range of `range`), with untouched pages.
    pub(crate) fn build(range: VaRange, prot: Prot, cpu: Arc<dyn CpuMmu>, remote: bool) -> Region {
        let first = align_down(range.start, BLOCK_SIZE);
        let nblocks = (range.end() - first).div_ceil(BLOCK_SIZE) as usize;
        let blocks = (0..nblocks)
            .map(|b| {
                let base = (first + b as u64 * BLOCK_SIZE).max(range.start);
                let end = (first + (b as u64 + 1) * BLOCK_SIZE).min(range.end());
                Mutex::new(Block::new(base, ((end - base) / PAGE_SIZE) as usize))
            })
            .collect();
        Region {
            range,
            prot,
            remote,
            cpu,
            blocks,
            freed: AtomicBool::new(false),
            last_cpu_chunk: AtomicU64::new(u64::MAX),
            readahead_until: AtomicU64::new(0),
        }
    }
    /// Index of the block holding `va`.
    pub(crate) fn block_index(&self, va: u64) -> usize {
        ((va - align_down(self.range.start, BLOCK_SIZE)) / BLOCK_SIZE) as usize
    }
    /// The range of block `b` (the region's first and last blocks may be partial).
    pub(crate) fn block_span(&self, b: usize) -> VaRange {
        let first = align_down(self.range.start, BLOCK_SIZE);
        let base = (first + b as u64 * BLOCK_SIZE).max(self.range.start);
        let end = (first + (b as u64 + 1) * BLOCK_SIZE).min(self.range.end());
        VaRange::new(base, end - base)
    }
    pub(crate) fn set_freed(&self) {
        self.freed.store(true, Ordering::Release);
    }
    pub(crate) fn is_freed(&self) -> bool {
        self.freed.load(Ordering::Acquire)
    }
    /// Leaks the CPU side so that its memory stays mapped forever (a copy into it may still be
    /// running after a timed-out wait).
    pub(crate) fn keep_alive_forever(&self) {
        std::mem::forget(Arc::clone(&self.cpu));
    }
}

/// An attached device: its driver, allocator, eviction queue and fault-service thread.
#[derive(Debug)]
pub(crate) struct DeviceSlot {
    pub(crate) id: DeviceId,
    /// This attachment's number ([`NEXT_ATTACHMENT`]): ids are reused, these never are.
    pub(crate) attachment: u64,
    pub(crate) mmu: Arc<dyn DeviceMmu>,
    pub(crate) caps: DeviceCaps,
    pub(crate) alloc: Mutex<BuddyAllocator>,
    pub(crate) evict_queue: Mutex<VecDeque<BlockKey>>,
    pub(crate) batch: usize,
    /// Injected failures: this many coming 2 MiB allocations fail (fall back to base pages).
    pub(crate) fail_large_alloc: AtomicU32,
    /// When allocation started failing for faults (0: it is not failing).
    pub(crate) oom_since: AtomicU64,
    pub(crate) walk: Mutex<std::collections::HashMap<u64, crate::fault::Walk>>,
    pub(crate) ahead_tx: Mutex<Option<mpsc::Sender<crate::fault::Ahead>>>,
    ahead: Mutex<Option<JoinHandle<()>>>,
    detached: AtomicBool,
    /// A detach could not bring every block home: the slot stays, detached, holding that data
    /// (the CPU's faults still copy it home from here) until a later detach finishes.
    sweep_failed: AtomicBool,
    service: Mutex<Option<JoinHandle<()>>>,
    evictor: Mutex<Option<JoinHandle<()>>>,
    /// Wakes the background evictor after allocations. std's futex-based primitives, not
    /// `parking_lot`: the evictor sleeps here most of the time, including when the program
    /// forks (see `crate::fork::Gate`).
    pub(crate) evict_wake: std::sync::Condvar,
    /// Whether this device has a background evictor (to wake).
    pub(crate) evicts_in_background: AtomicBool,
    pub(crate) evict_lock: std::sync::Mutex<()>,
    /// Eviction attempts in flight on this device (a victim's queue entry taken, its lock about
    /// to be held or held): memory may be about to free, so an allocation that finds nothing
    /// else to evict meanwhile is busy, not out of memory.
    pub(crate) evicting: std::sync::atomic::AtomicUsize,
    /// Blocks the fault path had to evict to allocate since the background evictor last looked.
    /// The evictor keeps about that much memory free from then on (up to the watermark): a
    /// working set that fits, or overflows by a block, no longer loses blocks to the whole
    /// watermark only to fault them back.
    pub(crate) demand_evictions: AtomicU64,
    /// Until when (a [`AddressSpace::tick`]) the device is capacity thrashing: a block came
    /// back a second time soon after its eviction. Meanwhile it keeps the blocks that come back
    /// most and serves the others remotely (see `fault::thrash_response`).
    pub(crate) thrash_until: AtomicU64,
}

impl DeviceSlot {
    /// Free and total device pages.
    pub(crate) fn free_and_total(&self) -> (u64, u64) {
        let a = self.alloc.lock();
        (a.free_pages(), a.total_pages())
    }

    pub(crate) fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }

    /// Fails once [`AddressSpace::detach`] has begun. Every path that puts data on the device
    /// or maps it there checks this with the block locked: `detach` sets the flag before it
    /// sweeps the blocks, taking each one's lock, so a migration either ran wholly before the
    /// sweep reached its block (and the sweep brings the data home) or sees the flag.
    pub(crate) fn attached(&self) -> Result<()> {
        if self.is_detached() {
            return Err(CoreError::Detached(self.id));
        }
        Ok(())
    }
}

/// One address space shared by the CPU and every attached device.
#[derive(Debug)]
pub struct AddressSpace {
    /// The fork gate: held shared by every operation that changes page state or
    /// moves data between host and device memory, exclusively while a `fork()` is prepared and
    /// until the child has its copy (see [`crate::fork`]). Outermost lock: taken before
    /// `reshape`, the regions and the block locks.
    pub(crate) gate: Gate,
    /// This process is the child of a `fork()` and the address space belongs to the parent:
    /// every operation fails with [`CoreError::ForkedAway`].
    pub(crate) forked_away: AtomicBool,
    /// Held for reading by every fault service, migration and background eviction, for writing
    /// while regions are split, moved or re-protected (so no fault sees a range missing
    /// mid-change, and no eviction a block between regions).
    pub(crate) reshape: RwLock<()>,
    /// The ranges of every running job, by id ([`AddressSpace::job_begin`]): a block a reshape
    /// rebuilds in place keeps only the jobs that use it.
    pub(crate) jobs: Mutex<std::collections::HashMap<u64, Vec<VaRange>>>,
    /// CPU-side events (unmap, remap, discard) read but not yet applied.
    pub(crate) events_pending: AtomicU64,
    pub(crate) regions: RwLock<BTreeMap<u64, Arc<Region>>>,
    devices: RwLock<Vec<Option<Arc<DeviceSlot>>>>,
    pub(crate) stats: Stats,
    pub(crate) config: CoreConfig,
    pub(crate) attrs: RwLock<RangeAttrs>,
    shutting_down: AtomicBool,
    epoch: Instant,
    me: Weak<AddressSpace>,
    readahead: Mutex<Option<mpsc::Sender<(u64, u64, u64)>>>,
}

impl AddressSpace {
    /// A new, empty address space.
    pub fn new(config: CoreConfig) -> Arc<Self> {
        Arc::new_cyclic(|me| AddressSpace {
            epoch: Instant::now(),
            me: me.clone(),
            readahead: Mutex::new(None),
            regions: RwLock::new(BTreeMap::new()),
            reshape: RwLock::new(()),
            jobs: Mutex::new(std::collections::HashMap::new()),
            gate: Gate::default(),
            forked_away: AtomicBool::new(false),
            events_pending: AtomicU64::new(0),
            devices: RwLock::new(Vec::new()),
            stats: Stats::default(),
            config,
            attrs: RwLock::new(RangeAttrs::default()),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Enters the fork gate (shared). Every operation that changes page state or host/device
    /// data holds it. Fails in the child of a `fork()`, where the address space is inert.
    pub(crate) fn enter(&self) -> Result<GateGuard<'_>> {
        self.not_forked()?;
        Ok(self.gate.enter())
    }

    /// [`AddressSpace::enter`] without waiting (background work skips its turn instead).
    pub(crate) fn try_enter(&self) -> Option<GateGuard<'_>> {
        if self.is_forked_away() {
            return None;
        }
        self.gate.try_enter()
    }

    /// Whether this process is a `fork()` child and the address space belongs to the parent.
    pub fn is_forked_away(&self) -> bool {
        self.forked_away.load(Ordering::Acquire)
    }

    /// Fails with [`CoreError::ForkedAway`] in a `fork()` child, where the address space is
    /// inert.
    pub(crate) fn not_forked(&self) -> Result<()> {
        if self.is_forked_away() {
            return Err(CoreError::ForkedAway);
        }
        Ok(())
    }

    /// Nanoseconds since the address space was made (never 0): the clock of recency and
    /// thrashing decisions.
    pub(crate) fn tick(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    /// Fraction of a device's memory that is free.
    pub(crate) fn free_fraction(&self, slot: &DeviceSlot) -> f64 {
        let (free, total) = slot.free_and_total();
        if total == 0 {
            0.0
        } else {
            free as f64 / total as f64
        }
    }

    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    // ----- regions -----

    /// Adds a shared region whose CPU side is `cpu` (its range must be page aligned).
    pub fn add_region(&self, cpu: Arc<dyn CpuMmu>, prot: Prot) -> Result<VaRange> {
        self.add_region_with(cpu, prot, false)
    }

    /// Adds a region; `remote` makes it mirrored (devices map the host pages, nothing migrates).
    pub fn add_region_with(&self, cpu: Arc<dyn CpuMmu>, prot: Prot, remote: bool) -> Result<VaRange> {
        let range = cpu.range();
        Region::check_new(range)?;
        self.not_forked()?;
        // Through the fork gate: a region added while a fork is prepared (after it listed the
        // regions it privatizes in the child) would stay shared with the parent there.
        let _gate = self.enter()?;
        self.insert_announced(Arc::new(Region::build(range, prot, cpu, remote)), true)?;
        Ok(range)
    }

    /// Inserts `region` after telling every live device about it ([`DeviceMmu::region_added`]).
    /// `must`: a device's refusal undoes the others and fails the insert; otherwise (a region
    /// reshaped from one the devices accepted) it is logged and the region goes in regardless.
    pub(crate) fn insert_announced(&self, region: Arc<Region>, must: bool) -> Result<()> {
        let range = region.range;
        // Lock order: devices before regions (as in `attach`), so that every device learns of
        // every region exactly once.
        let devices = self.devices.read();
        let mut regions = self.regions.write();
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(CoreError::ShuttingDown);
        }
        if !self.overlapping_locked(&regions, range).is_empty() {
            return Err(CoreError::Overlap(range));
        }
        let live: Vec<&Arc<DeviceSlot>> = devices.iter().flatten().filter(|s| !s.is_detached()).collect();
        for (k, slot) in live.iter().enumerate() {
            if let Err(source) = slot.mmu.region_added(range, region.cpu.backing(range.start)) {
                if !must {
                    log::error!("device {:?} refused reshaped region {range}: {source}", slot.id);
                    continue;
                }
                for done in &live[..k] {
                    done.mmu.region_removed(range);
                }
                return Err(CoreError::Device { device: slot.id, source });
            }
        }
        regions.insert(range.start, region);
        Ok(())
    }

    /// Removes the region starting at `start`: devices lose their mappings and device memory is
    /// freed (the data is gone). Returns the CPU side for the caller to release.
    ///
    /// Under the reshape lock held for writing, as every change of the regions' shape: work that
    /// walks regions under it for reading (a snapshot, a fault service, a migration) either ends
    /// before the region goes or finds it gone, never a region half removed whose CPU side the
    /// caller may already have released.
    pub fn remove_region(&self, start: u64) -> Result<Arc<dyn CpuMmu>> {
        let _gate = self.enter()?;
        let _shape = self.reshape.write();
        let region = self.regions.write().remove(&start).ok_or(CoreError::NotShared(VaRange::new(start, PAGE_SIZE)))?;
        region.freed.store(true, Ordering::Release);
        self.attrs.write().clear(region.range);
        for cell in &region.blocks {
            let mut blk = cell.lock();
            let all = PageMask::full(blk.npages);
            if let Err(e) = migrate::drop_device_copies(self, &mut blk, &all) {
                log::error!("removing region {}: {e}", region.range);
            }
        }
        for slot in self.devices.read().iter().flatten() {
            slot.mmu.region_removed(region.range);
        }
        Ok(Arc::clone(&region.cpu))
    }

    /// The range of every shared region, in address order.
    pub fn region_ranges(&self) -> Vec<VaRange> {
        self.regions.read().values().map(|r| r.range).collect()
    }

    /// The ranges of the regions overlapping `range` whose CPU side is `cpu` itself (the same
    /// object), in address order: what is left of a buffer whose memory the program moved or
    /// unmapped in part (the parts moved away are regions of another CPU side).
    pub fn regions_of(&self, range: VaRange, cpu: &dyn CpuMmu) -> Vec<VaRange> {
        self.overlapping(range)
            .into_iter()
            .filter(|r| std::ptr::addr_eq(Arc::as_ptr(&r.cpu), cpu as *const dyn CpuMmu))
            .map(|r| r.range)
            .collect()
    }

    pub(crate) fn region_at(&self, start: u64) -> Option<Arc<Region>> {
        self.regions.read().get(&start).cloned()
    }

    /// The region holding `va`.
    pub(crate) fn region_of(&self, va: u64) -> Option<Arc<Region>> {
        let regions = self.regions.read();
        let (_, r) = regions.range(..=va).next_back()?;
        r.range.contains(va).then(|| Arc::clone(r))
    }

    /// Validates a user range: non-empty, no overflow, page aligned, inside one shared region.
    pub fn check_range(&self, start: u64, len: u64) -> Result<VaRange> {
        if len == 0 {
            return Err(CoreError::Empty { start });
        }
        let range = VaRange::checked(start, len).ok_or(CoreError::Overflow { start, len })?;
        if !range.is_page_aligned() {
            return Err(CoreError::Unaligned(range));
        }
        match self.region_of(start) {
            Some(r) if r.range.contains_range(&range) => Ok(range),
            _ => Err(CoreError::NotShared(range)),
        }
    }

    /// The advice in force at `va`.
    pub fn attrs_at(&self, va: u64) -> Attrs {
        self.attrs.read().get(va)
    }

    /// The state of the page holding `va` (for tests, snapshots and diagnostics).
    pub fn page_state(&self, va: u64) -> Option<Page> {
        let region = self.region_of(va)?;
        let blk = region.blocks[region.block_index(va)].lock();
        Some(blk.pages[((align_down(va, PAGE_SIZE) - blk.base) / PAGE_SIZE) as usize])
    }

    // ----- devices -----

    /// Attaches a device: creates its page table, registers its memory with a buddy allocator,
    /// and (if it reports faults) starts its fault-service thread.
    pub fn attach(self: &Arc<Self>, mmu: Arc<dyn DeviceMmu>, opts: AttachOptions) -> Result<DeviceId> {
        self.not_forked()?;
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(CoreError::ShuttingDown);
        }
        let mut devices = self.devices.write();
        let idx = devices.iter().position(Option::is_none).unwrap_or(devices.len());
        if idx >= MAX_DEVICES {
            return Err(CoreError::TooManyDevices);
        }
        let id = DeviceId(idx as u8);
        mmu.create_page_table().map_err(|source| CoreError::Device { device: id, source })?;
        {
            let regions = self.regions.read();
            let all: Vec<&Arc<Region>> = regions.values().collect();
            for (k, r) in all.iter().enumerate() {
                if let Err(source) = mmu.region_added(r.range, r.cpu.backing(r.range.start)) {
                    for done in &all[..k] {
                        mmu.region_removed(done.range);
                    }
                    // SAFETY: this attach is refused; the device's table was made for it.
                    unsafe { mmu.destroy_page_table() };
                    return Err(CoreError::Device { device: id, source });
                }
            }
        }
        let caps = mmu.caps();
        let slot = Arc::new(DeviceSlot {
            id,
            attachment: NEXT_ATTACHMENT.fetch_add(1, Ordering::Relaxed),
            alloc: Mutex::new(BuddyAllocator::new(&mmu.physical_ranges())),
            mmu,
            caps,
            evict_queue: Mutex::new(VecDeque::new()),
            batch: opts.fault_batch.max(1),
            fail_large_alloc: AtomicU32::new(0),
            oom_since: AtomicU64::new(0),
            walk: Mutex::new(std::collections::HashMap::new()),
            ahead_tx: Mutex::new(None),
            ahead: Mutex::new(None),
            detached: AtomicBool::new(false),
            sweep_failed: AtomicBool::new(false),
            service: Mutex::new(None),
            evictor: Mutex::new(None),
            evict_wake: std::sync::Condvar::new(),
            evicts_in_background: AtomicBool::new(false),
            evicting: std::sync::atomic::AtomicUsize::new(0),
            evict_lock: std::sync::Mutex::new(()),
            demand_evictions: AtomicU64::new(0),
            thrash_until: AtomicU64::new(0),
        });
        if let Err(e) = self.start_threads(&slot) {
            // Those that started stop (they may look the device up: not under `devices`).
            drop(devices);
            slot.detached.store(true, Ordering::Release);
            self.stop_threads(&slot);
            for r in self.regions.read().values() {
                slot.mmu.region_removed(r.range);
            }
            // SAFETY: this attach is refused; the device's table was made for it.
            unsafe { slot.mmu.destroy_page_table() };
            return Err(e);
        }
        if idx == devices.len() {
            devices.push(Some(slot));
        } else {
            devices[idx] = Some(slot);
        }
        Ok(id)
    }

    /// Starts a device's background threads: fault service and cross-block prefetch where it
    /// faults, the background evictor where it would keep memory free.
    fn start_threads(self: &Arc<Self>, slot: &Arc<DeviceSlot>) -> Result<()> {
        if slot.caps.replayable_faults {
            let h = self.spawn_for(slot, "faults", crate::fault::service_loop)?;
            *slot.service.lock() = Some(h);
        }
        if self.config.policy.cross_block && slot.caps.replayable_faults {
            let (tx, rx) = mpsc::channel();
            let h = self.spawn_for(slot, "ahead", move |w, s| crate::fault::ahead_loop(w, s, rx))?;
            *slot.ahead_tx.lock() = Some(tx);
            *slot.ahead.lock() = Some(h);
        }
        // No evictor where it would keep nothing free (see `evict::free_cap`).
        if crate::evict::free_cap(slot.free_and_total().1, self.config.policy.free_watermark) > 0 {
            let h = self.spawn_for(slot, "evict", crate::evict::background_loop)?;
            *slot.evictor.lock() = Some(h);
            slot.evicts_in_background.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Stops a detached device's background threads: its pending faults fail, and the threads
    /// are woken and joined (except the calling thread, should it be one of them).
    fn stop_threads(&self, slot: &DeviceSlot) {
        slot.mmu.shutdown_faults();
        slot.evict_wake.notify_all();
        slot.ahead_tx.lock().take();
        for h in
            [slot.service.lock().take(), slot.evictor.lock().take(), slot.ahead.lock().take()].into_iter().flatten()
        {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }

    /// Starts one of a device's background threads (`hetmm-dev<id>-<what>`).
    fn spawn_for(
        self: &Arc<Self>,
        slot: &Arc<DeviceSlot>,
        what: &str,
        f: impl FnOnce(Weak<AddressSpace>, Arc<DeviceSlot>) + Send + 'static,
    ) -> Result<JoinHandle<()>> {
        let (w, s) = (Arc::downgrade(self), Arc::clone(slot));
        std::thread::Builder::new().name(format!("hetmm-dev{}-{what}", slot.id.0)).spawn(move || f(w, s)).map_err(|e| {
            CoreError::Device { device: slot.id, source: crate::device::DeviceError::Other(e.to_string()) }
        })
    }

    /// An attached device that still holds data, even while it is being detached (for paths
    /// that move data off it).
    pub(crate) fn holder(&self, id: DeviceId) -> Result<Arc<DeviceSlot>> {
        self.devices.read().get(id.0 as usize).and_then(Clone::clone).ok_or(CoreError::Detached(id))
    }

    /// Whether `id` still names the device attached as `mmu` (detaching included), not another
    /// device given the id since: a handle that names its device by id alone reached the next
    /// device attached once its own was detached.
    pub fn is_attached_as(&self, id: DeviceId, mmu: &Arc<dyn DeviceMmu>) -> bool {
        self.holder(id).is_ok_and(|s| std::ptr::addr_eq(Arc::as_ptr(&s.mmu), Arc::as_ptr(mmu)))
    }

    /// The number of the attachment `id` names, if that is still the device attached as `mmu`
    /// (see [`AddressSpace::is_attached_as`]). Unlike the id, no later attachment (in any
    /// address space of the process) has it: a name for a device that outlives its handle
    /// without reaching the next device given the id.
    pub fn attachment_of(&self, id: DeviceId, mmu: &Arc<dyn DeviceMmu>) -> Option<u64> {
        self.holder(id).ok().filter(|s| std::ptr::addr_eq(Arc::as_ptr(&s.mmu), Arc::as_ptr(mmu))).map(|s| s.attachment)
    }

    /// Whether `id` still names attachment `n` ([`AddressSpace::attachment_of`]): `false` once
    /// that device is detached, whatever device has the id since.
    pub fn is_attachment(&self, id: DeviceId, n: u64) -> bool {
        self.holder(id).is_ok_and(|s| s.attachment == n)
    }

    /// Every attached device, detaching ones included.
    pub(crate) fn holders(&self) -> Vec<Arc<DeviceSlot>> {
        self.devices.read().iter().flatten().cloned().collect()
    }

    pub(crate) fn slot(&self, id: DeviceId) -> Result<Arc<DeviceSlot>> {
        self.devices
            .read()
            .get(id.0 as usize)
            .and_then(Clone::clone)
            .filter(|s| !s.is_detached())
            .ok_or(CoreError::Detached(id))
    }

    /// Capabilities of an attached device.
    pub fn device_caps(&self, id: DeviceId) -> Result<DeviceCaps> {
        self.not_forked()?;
        Ok(self.slot(id)?.caps.clone())
    }

    /// Device memory free and total, in bytes.
    pub fn device_memory(&self, id: DeviceId) -> Result<(u64, u64)> {
        let s = self.slot(id)?;
        let a = s.alloc.lock();
        Ok((a.free_pages() * PAGE_SIZE, a.total_pages() * PAGE_SIZE))
    }

    /// Detaches a device: its pending faults fail, its data comes back to the CPU, its page table
    /// is destroyed. If some data cannot be brought back (a copy fails), the device keeps it and
    /// its id, detached (the CPU's faults still copy that data home from it), and the error is
    /// returned: a later `detach` tries again.
    pub fn detach(&self, id: DeviceId) -> Result<()> {
        // In a fork child the device's threads do not exist: nothing to stop or wait for.
        self.not_forked()?;
        let slot = self.holder(id)?;
        if slot.detached.swap(true, Ordering::AcqRel) && !slot.sweep_failed.load(Ordering::Acquire) {
            return Err(CoreError::Detached(id));
        }
        self.stop_threads(&slot);
        let _gate = self.enter()?;
        let me = Proc::Device(id);
        // No region may be reshaped meanwhile: a reshape flushing a block from this device after
        // its page table is gone would fail and leave the block's data behind.
        let _shape = self.reshape.read();
        let regions: Vec<Arc<Region>> = self.regions.read().values().cloned().collect();
        let mut result = Ok(());
        for region in regions {
            for cell in &region.blocks {
                let mut blk = cell.lock();
                // Only this device's copies go: other devices keep theirs (a launch on one that
                // cannot fault may hold them), as on eviction. Its other mappings (host pages
                // mapped remotely, peers' copies through their windows) go too before they are
                // forgotten: left in its page table until it is destroyed, they reached memory
                // that their holders free or reuse meanwhile.
                let gone = migrate::evict_from(self, &region, &mut blk, &slot).and_then(|_| {
                    let mapped = blk.mapped_on(me);
                    migrate::unmap_on(self, &mut blk, &slot, &mapped)
                });
                if let Err(e) = gone {
                    log::error!("detach: bringing block {:#x} back from {id:?}: {e}", blk.base);
                    result = Err(e);
                    continue;
                }
                blk.forget_device(id);
            }
        }
        slot.sweep_failed.store(result.is_err(), Ordering::Release);
        result?;
        for region in self.regions.read().values() {
            slot.mmu.region_removed(region.range);
        }
        // SAFETY: the device is detached from this address space, its data home and nothing
        // of it mapped: no one else manages its memory.
        unsafe { slot.mmu.destroy_page_table() };
        // The id goes to the next device attached, which must not inherit this one's advice.
        self.attrs.write().forget_proc(me);
        if let Some(s) = self.devices.write().get_mut(id.0 as usize) {
            *s = None;
        }
        Ok(())
    }

    // ----- migration -----

    /// Moves the pages of `range` to `to` in bulk (an explicit, synchronous migration; the same
    /// per-block service as a fault). For a device, the pages end up there and mapped (a
    /// read-only copy on read-mostly ranges); for the CPU, they end up in host backing and are
    /// mapped on the next CPU access. The range may span adjacent regions (a buffer part of
    /// which was `protect`ed).
    pub fn migrate(&self, start: u64, len: u64, to: Proc) -> Result<()> {
        self.retrying_races(|| {
            let _gate = self.enter()?;
            let _shape = self.reshape.read();
            let parts = self.span_parts(start, len)?;
            if let Proc::Device(d) = to {
                self.slot(d)?;
            }
            parts.into_iter().try_for_each(|p| self.prefetch_range(p, to))
        })
    }

    /// Runs `op` (which takes and drops its own locks) again, a few times, while it fails
    /// because it raced the program's unmap or remap ([`CoreError::raced`]), each time once the
    /// change is applied.
    pub(crate) fn retrying_races<T>(&self, mut op: impl FnMut() -> Result<T>) -> Result<T> {
        let mut tries = 0;
        loop {
            match op() {
                Err(e) if e.raced() && tries < 8 => {
                    tries += 1;
                    self.settle()?;
                }
                r => return r,
            }
        }
    }

    /// The body of [`AddressSpace::migrate`] and of `Advice::Prefetch` (range already checked;
    /// the caller holds the fork gate).
    pub(crate) fn prefetch_range(&self, range: VaRange, to: Proc) -> Result<()> {
        let region = self.region_of(range.start).ok_or(CoreError::NotShared(range))?;
        let slot = match to {
            Proc::Cpu => None,
            Proc::Device(d) => Some(self.slot(d)?),
        };
        // Whole blocks first, in pipelined batches; the per-block pass below finds them done and
        // takes whatever the bulk pass left (partial blocks, pages elsewhere, memory to evict).
        let t = Instant::now();
        let complete = match &slot {
            None => self.bulk_home(&region, range)?,
            Some(s) => self.bulk_prefetch(&region, range, s)?,
        };
        let bulk = t.elapsed();
        let first = region.block_index(range.start);
        let last = region.block_index(range.end() - 1);
        // Blocks the bulk pass left as the per-block pass would (a microsecond or two each to
        // look at again, 5% of a GiB's migration to a GPU) are skipped.
        let mut complete = complete.into_iter().peekable();
        for bidx in first..=last {
            if complete.next_if(|&b| b <= bidx).is_some_and(|b| b == bidx) {
                continue;
            }
            // A victim another thread is evicting right now (the background evictor) makes
            // memory busy, not full: wait for it, bounded.
            let mut pause = Duration::from_micros(50);
            let deadline = Instant::now() + BUSY_WAIT;
            loop {
                match self.prefetch_block(&region, bidx, range, slot.as_deref()) {
                    Err(CoreError::DeviceMemoryBusy { .. }) if Instant::now() < deadline => {
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_millis(5));
                    }
                    r => break r?,
                }
            }
        }
        log::debug!("migrate {range} to {to:?}: bulk pass {bulk:?}, per-block pass {:?}", t.elapsed() - bulk);
        Ok(())
    }

    /// The per-block part of [`AddressSpace::prefetch_range`] for block `bidx`.
    fn prefetch_block(&self, region: &Region, bidx: usize, range: VaRange, slot: Option<&DeviceSlot>) -> Result<()> {
        let mut blk = region.blocks[bidx].lock();
        if region.is_freed() {
            return Err(CoreError::NotShared(range));
        }
        let want = pages_in(&blk, &range);
        let Some(s) = slot else { return migrate::to_cpu(self, region, &mut blk, &want).map(drop) };
        // Already there (the bulk pass moved it): only the device holds and maps the pages,
        // with the region's protection, and no advice asks for duplicates.
        let me = Proc::Device(s.id);
        let read_only = !migrate::device_prot(region).contains(Prot::WRITE);
        let done = want.iter().all(|i| {
            let p = &blk.pages[i];
            p.resident == crate::types::ProcMask::only(me)
                && p.dev_mapped.has(me)
                && p.dev_ro.has(me) == read_only
                && p.cpu == CpuMap::None
        });
        let span = VaRange::new(blk.base, blk.npages as u64 * PAGE_SIZE);
        if done && self.attrs.read().all_in(span, |a| !a.read_mostly) {
            blk.taken_by(s.id, self.tick());
            return Ok(());
        }
        let attrs = self.attrs.read();
        let mut dup = PageMask::default();
        let within = attrs.within(span);
        for i in want.iter() {
            if within.get(blk.va(i)).read_mostly && !blk.pages[i].resident.is_empty() {
                dup.set(i);
            }
        }
        drop(attrs);
        blk.while_busy(want, |blk| {
            migrate::to_device(self, region, blk, s, &want.and_not(&dup))
                .and_then(|()| migrate::duplicate_to_device(self, region, blk, s, &dup))
        })?;
        blk.taken_by(s.id, self.tick());
        Ok(())
    }

    /// The blocks of `region` that lie wholly inside `range`.
    fn whole_blocks_in(region: &Region, range: VaRange) -> impl Iterator<Item = usize> + '_ {
        let (first, last) = (region.block_index(range.start), region.block_index(range.end() - 1));
        (first..=last).filter(move |&b| {
            let blk = region.block_span(b);
            range.contains_range(&blk)
        })
    }

    /// Explicit migration to a device, bulk part: the whole blocks of `range` that are plain
    /// (CPU-only or never written, not read-mostly) move in pipelined batches (see
    /// [`AddressSpace::pipelined`]); on a device that cannot fault each batch is mapped while the
    /// CPU's access is revoked, before its copies (`migrate::bulk_start`). No eviction: what
    /// does not fit is left to the per-block pass.
    fn bulk_prefetch(&self, region: &Arc<Region>, range: VaRange, slot: &DeviceSlot) -> Result<Vec<usize>> {
        let mut ids: Vec<usize> = Self::whole_blocks_in(region, range).collect();
        {
            let attrs = self.attrs.read();
            if !attrs.is_empty() {
                ids.retain(|&b| attrs.all_in(region.block_span(b), |a| !a.read_mostly));
            }
        }
        let complete = std::cell::RefCell::new(Vec::new());
        self.pipelined(
            region,
            &ids,
            |blocks| migrate::bulk_start(self, region, blocks, slot, false),
            |blocks, mut mv| {
                let whole = mv.whole(blocks);
                let r = migrate::bulk_wait_and_map(self, region, slot, &mut mv);
                migrate::bulk_commit(region, blocks, slot, mv, r)?;
                let now = self.tick();
                for b in blocks.iter_mut() {
                    b.taken_by(slot.id, now);
                }
                note_complete(&complete, region, blocks, whole);
                Ok(())
            },
        )?;
        Ok(complete.into_inner())
    }

    /// Explicit migration to the CPU, bulk part: the whole blocks of `range` come home in
    /// pipelined batches (see [`AddressSpace::pipelined`]), one device unmap and one batch of
    /// copies each. The CPU maps the pages on its next access, as on the per-block path.
    fn bulk_home(&self, region: &Arc<Region>, range: VaRange) -> Result<Vec<usize>> {
        let ids: Vec<usize> = Self::whole_blocks_in(region, range).collect();
        let complete = std::cell::RefCell::new(Vec::new());
        self.pipelined(
            region,
            &ids,
            |blocks| migrate::bulk_home_start(self, region, blocks, false).map(Some),
            |blocks, mv| {
                let whole = mv.whole().to_vec();
                migrate::bulk_home_finish(self, region, blocks, mv)?;
                note_complete(&complete, region, blocks, whole);
                Ok(())
            },
        )?;
        Ok(complete.into_inner())
    }

    /// Runs a bulk move over blocks `ids` of `region` in batches of [`BULK_BATCH`] (the first
    /// of [`FIRST_BULK_BATCH`]), pipelined: batches `i + 1` to `i + PIPELINE_DEPTH` are
    /// started (`start`: CPU work, copies submitted) before batch `i` is finished (`finish`:
    /// wait, map, record), so the copy engines work while the CPU prepares.
    /// Blocks are locked in address order (every other path that holds several block locks only
    /// tries them). Stops at the first batch `start` takes nothing from (memory is full); what is
    /// in flight is always finished, and the first error reported.
    fn pipelined<M>(
        &self,
        region: &Region,
        ids: &[usize],
        start: impl Fn(&mut [&mut Block]) -> Result<Option<M>>,
        finish: impl Fn(&mut [&mut Block], M) -> Result<()>,
    ) -> Result<()> {
        let times = PipeTimes::new(ids.len());
        let done = |(mut guards, m): (Vec<parking_lot::MutexGuard<'_, Block>>, M)| {
            let t = Instant::now();
            let mut blocks: Vec<&mut Block> = guards.iter_mut().map(|g| &mut **g).collect();
            let r = finish(&mut blocks, m);
            PipeTimes::add(&times.finish, t);
            r
        };
        // Batches started and not yet finished, oldest first. Two may wait behind the one just
        // started: the copy engines keep work queued while one batch takes the CPU longer than
        // the copies of the one before it (the CPU side varies by a factor of two or more from
        // batch to batch on a busy machine, while each copy takes the same time).
        let mut pending = std::collections::VecDeque::new();
        let finish_all = |pending: &mut std::collections::VecDeque<_>, mut r: Result<()>| {
            while let Some(p) = pending.pop_front() {
                r = r.and(done(p));
            }
            r
        };
        // A small first batch: the copy engines start sooner (everything before its copies is
        // time they sit idle).
        let (first, rest) = ids.split_at(ids.len().min(FIRST_BULK_BATCH));
        for batch in std::iter::once(first).filter(|b| !b.is_empty()).chain(rest.chunks(BULK_BATCH)) {
            let t = Instant::now();
            let mut guards: Vec<_> = batch.iter().map(|&b| region.blocks[b].lock()).collect();
            PipeTimes::add(&times.lock, t);
            if region.is_freed() {
                break;
            }
            let mut blocks: Vec<&mut Block> = guards.iter_mut().map(|g| &mut **g).collect();
            let t = Instant::now();
            let started = start(&mut blocks);
            PipeTimes::add(&times.start, t);
            drop(blocks);
            match started {
                Ok(Some(m)) => pending.push_back((guards, m)),
                // Nothing taken (memory is full), or an error: what is in flight is finished.
                Ok(None) => return finish_all(&mut pending, Ok(())),
                Err(e) => return finish_all(&mut pending, Ok(())).and(Err(e)),
            }
            if pending.len() > PIPELINE_DEPTH {
                if let Some(oldest) = pending.pop_front() {
                    if let Err(e) = done(oldest) {
                        return finish_all(&mut pending, Err(e));
                    }
                }
            }
        }
        finish_all(&mut pending, Ok(()))
    }

    /// Drops the data of `range` everywhere (`Advice::DontNeed`).
    pub(crate) fn discard_range(&self, range: VaRange) -> Result<()> {
        let _gate = self.enter()?;
        // The region must keep its shape while its blocks are walked (the program may unmap
        // part of it at any time): checked again under the lock.
        let _shape = self.reshape.read();
        let range = self.check_range(range.start, range.len)?;
        let region = self.region_of(range.start).ok_or(CoreError::NotShared(range))?;
        let mut result = Ok(());
        for bidx in region.block_index(range.start)..=region.block_index(range.end() - 1) {
            let mut blk = region.blocks[bidx].lock();
            if region.is_freed() {
                return Err(CoreError::NotShared(range));
            }
            let want = pages_in(&blk, &range);
            // A block a device refused to give up keeps its data; the others are still dropped.
            let r = migrate::discard(self, &region, &mut blk, &want);
            result = result.and(r);
        }
        result
    }

    /// Marks the blocks of `ranges` as used by a running job on a device; returns the token for
    /// [`AddressSpace::job_end`]. Ranges outside shared memory are ignored.
    pub fn job_begin(&self, ranges: &[VaRange]) -> JobToken {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        self.jobs.lock().insert(id, ranges.to_vec());
        self.for_blocks(ranges, |b| {
            b.active_jobs += 1;
            b.job_ids.push(id);
            b.job_done = false;
        });
        JobToken { id, ranges: ranges.to_vec() }
    }

    /// Ends a job: blocks no running job uses any more become the first eviction candidates.
    /// Only blocks the job itself counted lose a count: memory mapped anew at its addresses
    /// since (another job's, maybe) keeps its own.
    pub fn job_end(&self, token: &JobToken) {
        self.jobs.lock().remove(&token.id);
        self.for_blocks(&token.ranges, |b| {
            // A block the job never counted (new memory at its addresses) is not its to mark.
            if let Some(i) = b.job_ids.iter().position(|j| *j == token.id) {
                b.job_ids.swap_remove(i);
                b.active_jobs = b.active_jobs.saturating_sub(1);
                b.job_done = b.active_jobs == 0;
            }
        });
    }

    /// A launch is getting ready to use `ranges` on a device (migrating them there): until
    /// [`AddressSpace::launch_ready`], a device that cannot fault never evicts their blocks, so
    /// migrating one buffer cannot undo the migration of another. Once the kernel runs, evicting
    /// them is safe again: such a device waits for its kernels before unmapping.
    pub fn launch_prepare(&self, ranges: &[VaRange]) {
        let me = std::thread::current().id();
        self.for_blocks(ranges, |b| b.launching.push(me));
    }

    /// Ends [`AddressSpace::launch_prepare`] (the kernel was launched, or the launch failed).
    /// Call it from the thread that called `launch_prepare` (entries name that thread).
    pub fn launch_ready(&self, ranges: &[VaRange]) {
        let me = std::thread::current().id();
        self.for_blocks(ranges, |b| {
            // Not found only if the ranges now cover other blocks (the program moved the memory
            // meanwhile): another launch's entry must not go in its place.
            if let Some(i) = b.launching.iter().position(|t| *t == me) {
                b.launching.swap_remove(i);
            }
        });
    }

    /// Runs `f` on every block `range` meets, locked, with its region and the mask of its pages
    /// inside `range`; under the fork gate and the reshape lock, so that no region changes shape
    /// meanwhile. Stops at the first error.
    pub(crate) fn with_blocks_in(
        &self,
        range: VaRange,
        mut f: impl FnMut(&Region, &mut Block, &PageMask) -> Result<()>,
    ) -> Result<()> {
        let _gate = self.enter()?;
        let _shape = self.reshape.read();
        for region in self.overlapping(range) {
            let Some(part) = region.range.intersect(&range) else { continue };
            for bidx in region.block_index(part.start)..=region.block_index(part.end() - 1) {
                let mut blk = region.blocks[bidx].lock();
                let inside = pages_in(&blk, &part);
                f(&region, &mut blk, &inside)?;
            }
        }
        Ok(())
    }

    fn for_blocks(&self, ranges: &[VaRange], mut f: impl FnMut(&mut Block)) {
        // In a fork child the blocks belong to the parent (a lock may have been held there).
        if self.is_forked_away() {
            return;
        }
        // Every region a range covers: a buffer part of which was `protect`ed since the job began
        // is several.
        for r in ranges {
            for region in self.overlapping(*r) {
                let Some(r) = region.range.intersect(r) else { continue };
                for bidx in region.block_index(r.start)..=region.block_index(r.end() - 1) {
                    f(&mut region.blocks[bidx].lock());
                }
            }
        }
    }

    /// Services a CPU fault at `va` (see [`CpuFaultHandler`]).
    fn service_cpu_fault(&self, va: u64, access: Access) -> Result<()> {
        let _gate = self.enter()?;
        let _shape = self.reshape.read();
        let t = Instant::now();
        let region = self.region_of(va).ok_or(CoreError::NotShared(VaRange::new(va, PAGE_SIZE)))?;
        // The kernel hands on only accesses the mapping allows: one the region does not is the
        // program's own `mprotect` of managed memory (no event tells of it). Served, the page
        // was mapped with the region's protection and the access faulted again, for ever (found
        // by an audit); refused, the thread gets SIGBUS, as `Hetmm::protect`'s docs say.
        let needed = access.needs();
        if !region.prot.contains(needed) {
            return Err(CoreError::Protection { range: VaRange::new(align_down(va, PAGE_SIZE), PAGE_SIZE), needed });
        }
        let around = self.config.fault_around.clamp(PAGE_SIZE, BLOCK_SIZE);
        let chunk = if self.config.policy.cpu_fault_prefetch {
            self.cpu_prefetch_chunk(&region, va)
        } else {
            let start = align_down(va, around).max(region.range.start);
            VaRange::new(start, (start + around).min(region.range.end()) - start)
        };
        let chunk_start = chunk.start;
        // Blocks start at absolute 2 MiB boundaries, or at the region's start.
        let blk_base = align_down(va, BLOCK_SIZE).max(region.range.start);
        let fault_page = ((align_down(va, PAGE_SIZE) - blk_base) / PAGE_SIZE) as usize;
        // Counts the fault and its pages itself, before the mapping wakes the faulting thread.
        self.bring_chunk_home(&region, chunk, Some((fault_page, access)))?;
        add_since(&self.stats.ns_cpu_fault, t);
        if self.config.policy.cpu_readahead {
            self.read_ahead(&region, chunk_start, around);
        }
        Ok(())
    }

    /// The chunk a CPU fault at `va` brings home under [`Policy::cpu_fault_prefetch`]: the run of
    /// pages around the faulting one that the prefetcher picks, given the pages the CPU already
    /// holds, less those the CPU already maps (UVM skips them, to spare their remapping).
    fn cpu_prefetch_chunk(&self, region: &Region, va: u64) -> VaRange {
        let span = region.block_span(region.block_index(va));
        let f = ((align_down(va, PAGE_SIZE) - span.start) / PAGE_SIZE) as usize;
        let blk = region.blocks[region.block_index(va)].lock();
        let mut faulted = PageMask::default();
        faulted.set(f);
        let resident = blk.resident_on(Proc::Cpu);
        // A first touch at the preferred location populates the whole block (UVM's
        // `uvm_perf_prefetch_prenotify_fault_migrations`, for CPU destinations too).
        // Pages are never prefetched away from a set preferred location (UVM's
        // `should_apply_prefetch_logic`): only the faulting page comes.
        let untouched = blk.pages[..blk.npages].iter().all(|p| p.resident.is_empty());
        let attrs = self.attrs.read();
        let preferred = attrs.get(va).preferred;
        let mut pick = if untouched && preferred == Some(Proc::Cpu) {
            PageMask::full(blk.npages)
        } else if preferred.is_some_and(|p| p != Proc::Cpu) {
            PageMask::default()
        } else {
            self.config.policy.prefetcher.prefetch(&faulted, &resident, blk.npages, crate::fault::skew_of(blk.base))
        };
        // Page by page, as the device path gates its extras: a neighbour may prefer another
        // processor than the faulting page does (it was prefetched off its preferred device).
        let within = attrs.within(span);
        let picked = pick;
        for i in picked.iter() {
            if blk.pages[i].cpu != CpuMap::None || within.get(blk.va(i)).preferred.is_some_and(|p| p != Proc::Cpu) {
                pick.clear(i);
            }
        }
        drop(attrs);
        let npages = blk.npages;
        drop(blk);
        pick.set(f);
        let (mut s, mut e) = (f, f + 1);
        while s > 0 && pick.get(s - 1) {
            s -= 1;
        }
        while e < npages && pick.get(e) {
            e += 1;
        }
        VaRange::new(span.start + s as u64 * PAGE_SIZE, (e - s) as u64 * PAGE_SIZE)
    }

    /// Makes the pages of `chunk` (inside one block) accessible to the CPU: data only on devices
    /// comes back (or is duplicated on read-mostly ranges), never-written pages get zeroed
    /// backing, and the chunk is mapped. `fault` is the faulting page and access, always mapped.
    /// Returns the pages that had to be brought or created; with `fault`, counts them and the
    /// fault in the stats.
    fn bring_chunk_home(&self, region: &Region, chunk: VaRange, fault: Option<(usize, Access)>) -> Result<u64> {
        let mut blk = region.blocks[region.block_index(chunk.start)].lock();
        if region.is_freed() {
            return Err(CoreError::NotShared(chunk));
        }
        let want = pages_in(&blk, &chunk);
        let attrs = self.attrs.read();
        let (mut exclusive, mut dup) = (PageMask::default(), PageMask::default());
        let within = attrs.within(chunk);
        // The rest of the chunk is taken for the faulting access, as a device fault's prefetch
        // is: pages next to a write are about to be written too, so copies elsewhere collapse
        // now, not one write fault per page later.
        let around = match fault {
            Some((_, a)) if a >= Access::Write => Access::Write,
            _ => Access::Prefetch,
        };
        for i in want.iter() {
            let access = match fault {
                Some((f, a)) if f == i => a,
                _ => around,
            };
            let reach = Reach { dup_reads: self.config.policy.duplicate_reads, ..Reach::default() };
            match select_residency(&blk.pages[i], &within.get(blk.va(i)), Proc::Cpu, access, reach) {
                Decision::Duplicate => dup.set(i),
                _ => exclusive.set(i),
            }
        }
        drop(attrs);
        let mut on_device = PageMask::default();
        let mut dup_fetch = PageMask::default();
        let mut empty = PageMask::default();
        for i in want.iter() {
            let r = blk.pages[i].resident;
            if r.is_empty() {
                empty.set(i);
            } else if exclusive.get(i) && r.0 & !1 != 0 {
                on_device.set(i);
            } else if dup.get(i) && !r.has(Proc::Cpu) {
                dup_fetch.set(i);
            }
        }
        migrate::to_cpu(self, region, &mut blk, &on_device)?;
        migrate::cpu_duplicate(self, region, &mut blk, &dup_fetch)?;
        migrate::populate(self, region, &mut blk, &empty)?;
        let moved = (on_device.count() + dup_fetch.count() + empty.count()) as u64;
        if fault.is_some() {
            // Counted before the mapping below lets the faulting thread go: a program that reads
            // the counters right after its access finds the fault in them.
            add(&self.stats.cpu_faults, 1);
            add(&self.stats.cpu_fault_pages, moved);
        }
        let writable = region.prot.contains(Prot::WRITE);
        let rw_state = if writable { CpuMap::Write } else { CpuMap::Read };
        for (set, state) in [(&exclusive, rw_state), (&dup, CpuMap::Read)] {
            let mut map = PageMask::default();
            for i in set.iter() {
                if blk.pages[i].cpu != state || fault.is_some_and(|(f, _)| f == i) {
                    map.set(i);
                }
            }
            if map.is_empty() {
                continue;
            }
            // Recorded first: a map that fails part way (refused as raced after its first
            // pages, say) leaves those pages mapped, and a page recorded mapped that is not
            // costs only a spare revoke, where one mapped but recorded not escapes every revoke.
            for i in map.iter() {
                blk.pages[i].cpu = state;
            }
            region.cpu.map(&migrate::ranges(&blk, &map), state == CpuMap::Write)?;
        }
        Ok(moved)
    }

    /// CPU read-ahead: when CPU faults walk a region chunk after chunk, bring the next blocks
    /// home and map them in bulk on a background thread, so the program streams through mapped
    /// memory instead of faulting on every chunk.
    fn read_ahead(&self, region: &Region, chunk_start: u64, around: u64) {
        const AHEAD: u64 = 16;
        let last = region.last_cpu_chunk.swap(chunk_start, Ordering::Relaxed);
        // Sequential: the next chunk, or a chunk inside the window read-ahead already covers
        // (the program skips the chunks read-ahead mapped).
        let mut until = region.readahead_until.load(Ordering::Relaxed);
        if chunk_start <= last {
            // A new walk: forget the old window.
            until = 0;
            region.readahead_until.store(0, Ordering::Relaxed);
        }
        let sequential = last.checked_add(around) == Some(chunk_start) || (chunk_start > last && chunk_start < until);
        if !sequential {
            return;
        }
        // Ask for more only when less than half a window is still ahead of the program.
        if until.saturating_sub(chunk_start) >= AHEAD / 2 * BLOCK_SIZE {
            return;
        }
        let next_block = align_down(chunk_start, BLOCK_SIZE) + BLOCK_SIZE;
        let from = next_block.max(until);
        let to = (next_block + AHEAD * BLOCK_SIZE).min(region.range.end());
        if from >= to {
            return;
        }
        region.readahead_until.store(to, Ordering::Relaxed);
        let mut tx = self.readahead.lock();
        if tx.is_none() {
            let (s, r) = mpsc::channel::<(u64, u64, u64)>();
            let me = self.me.clone();
            if std::thread::Builder::new().name("hetmm-readahead".into()).spawn(move || readahead_loop(me, r)).is_err()
            {
                return;
            }
            *tx = Some(s);
        }
        if let Some(tx) = tx.as_ref() {
            let _ = tx.send((from, to, self.tick()));
        }
    }

    /// Detaches every device and refuses new work. Called by the owner before dropping; safe to
    /// call twice.
    pub fn shutdown(&self) {
        // A fork child's copy of the parent's address space has no threads to stop and no
        // devices of its own: nothing to do (and nothing may wait for the parent's threads).
        if self.is_forked_away() {
            return;
        }
        self.shutting_down.store(true, Ordering::Release);
        let ids: Vec<DeviceId> = self.devices.read().iter().flatten().map(|s| s.id).collect();
        for id in ids {
            if let Err(e) = self.detach(id) {
                log::warn!("shutdown: detaching {id:?}: {e}");
            }
        }
    }
}

impl CpuFaultHandler for AddressSpace {
    fn cpu_fault(&self, va: u64, access: Access) -> Result<()> {
        let r = self.service_cpu_fault(va, access);
        match &r {
            // The host wakes the thread to fault again once the change is applied.
            Err(e) if e.raced() => add(&self.stats.cpu_faults_raced, 1),
            // Outside any region is the host's to retry (a region may be arriving), not a failure.
            Err(e) if !matches!(e, crate::error::CoreError::NotShared(_)) => add(&self.stats.cpu_fault_errors, 1),
            _ => {}
        }
        r
    }
    fn cpu_event(&self, ev: crate::invalidate::CpuEvent) -> Result<()> {
        self.apply_cpu_event(ev)
    }
    fn event_queued(&self, queued: bool) {
        if queued {
            self.events_pending.fetch_add(1, Ordering::AcqRel);
        } else {
            self.events_pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A job's token ([`AddressSpace::job_begin`]): its ranges and its identity.
#[derive(Clone, Debug)]
pub struct JobToken {
    id: u64,
    ranges: Vec<VaRange>,
}

impl JobToken {
    /// The ranges the job named.
    pub fn ranges(&self) -> &[VaRange] {
        &self.ranges
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Brings queued windows of blocks home until the address space is gone.
fn readahead_loop(space: Weak<AddressSpace>, rx: mpsc::Receiver<(u64, u64, u64)>) {
    loop {
        let (from, to, asked) = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(w) => w,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if space.strong_count() == 0 {
                    return;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let Some(space) = space.upgrade() else { return };
        if space.shutting_down.load(Ordering::Acquire) {
            return;
        }
        // Never while a fork is prepared or regions are being reshaped.
        let Some(_gate) = space.try_enter() else { continue };
        let Some(_shape) = space.reshape.try_read() else { continue };
        let Some(region) = space.region_of(from) else { continue };
        if !region.range.contains(to - 1) || region.is_freed() {
            continue;
        }
        // A few blocks at a time, pipelined: step k + 1's copies are submitted before step k is
        // waited for and mapped, so the copy engines work while this thread maps (mapping 4 KiB
        // pages with UFFDIO_CONTINUE costs about half as much as copying them). Each step's
        // blocks stay locked until it is mapped: a program touching them waits for that.
        const STEP: usize = 4;
        let mut b = region.block_index(from);
        let last = region.block_index(to - 1);
        let mut pending: Option<ReadAhead<'_>> = None;
        while b <= last {
            let guards: Vec<_> = (b..=last.min(b + STEP - 1)).filter_map(|i| region.blocks[i].try_lock()).collect();
            b += STEP;
            let started = ReadAhead::start(&space, &region, guards, asked);
            if let Some(prev) = pending.take() {
                prev.finish(&space, &region, from);
            }
            pending = started;
        }
        if let Some(prev) = pending {
            prev.finish(&space, &region, from);
        }
    }
}

/// One step of the CPU read-ahead: its blocks, locked, and their copies home in flight.
/// `mv` is declared first so that, dropped unfinished, it waits for its copies before the
/// block locks go.
struct ReadAhead<'a> {
    mv: migrate::HomeMove,
    guards: Vec<parking_lot::MutexGuard<'a, Block>>,
}

impl<'a> ReadAhead<'a> {
    /// Takes the blocks advice lets come home (advice that wants the data elsewhere, or mapped
    /// remotely from where it is, keeps a block out; ReadMostly blocks come home as duplicates)
    /// and no device has touched since the read-ahead was asked for at tick `asked`, and submits
    /// their copies. None if nothing was started.
    fn start(
        space: &AddressSpace,
        region: &Region,
        mut guards: Vec<parking_lot::MutexGuard<'a, Block>>,
        asked: u64,
    ) -> Option<ReadAhead<'a>> {
        // The read-ahead loop looks the region up under the reshape lock, which `remove_region`
        // takes for writing: it cannot go meanwhile. Checked still, as every block walk does.
        if region.is_freed() {
            return None;
        }
        let mut read_mostly = true;
        {
            let attrs = space.attrs.read();
            // Read-ahead is speculative: it leaves what eviction would not take either, pinned
            // blocks and blocks a launch is getting ready (found by an audit: it took pinned
            // blocks the CPU never touched off the device).
            guards.retain(|g| {
                let span = VaRange::new(g.base, g.npages as u64 * PAGE_SIZE);
                let (allowed, rm) = attrs.prefetch_fit(span, Proc::Cpu);
                let pinned = attrs.any_pinned(span);
                read_mostly &= rm || !allowed || pinned;
                // A block a device faulted in, was given by a migration or used since the
                // request is the device's now: a request served late (this thread waits its
                // turn for the CPUs) brought such blocks home, undoing the newer placement.
                allowed && !pinned && g.launching.is_empty() && g.last_taken() <= asked
            });
        }
        if guards.is_empty() {
            return None;
        }
        let dup = space.config.policy.duplicate_reads || read_mostly;
        let mut blocks: Vec<&mut Block> = guards.iter_mut().map(|g| &mut **g).collect();
        match migrate::bulk_home_start(space, region, &mut blocks, dup) {
            Ok(mv) => Some(ReadAhead { mv, guards }),
            Err(e) => {
                log::debug!("read-ahead of block {:#x}: {e}", blocks.first().map_or(0, |b| b.base));
                None
            }
        }
    }

    /// Waits for the copies, records the CPU as a holder and maps the blocks.
    fn finish(mut self, space: &AddressSpace, region: &Region, from: u64) {
        let mut blocks: Vec<&mut Block> = self.guards.iter_mut().map(|g| &mut **g).collect();
        match migrate::bulk_home_finish(space, region, &mut blocks, self.mv)
            .and_then(|n| Ok(n + migrate::map_home(region, &mut blocks)?))
        {
            Ok(n) => add(&space.stats.prefetched_pages, n),
            Err(e) => log::debug!("read-ahead at {from:#x}: {e}"),
        }
    }
}

/// The next attachment's number (see [`DeviceSlot::attachment`]); process-wide, so that a
/// number from one address space names nothing in another.
static NEXT_ATTACHMENT: AtomicU64 = AtomicU64::new(1);

/// Longest an explicit migration waits for device memory that another thread is evicting.
const BUSY_WAIT: Duration = Duration::from_secs(2);

/// Where a pipelined migration's time went, logged (debug) when it ends: locking batches,
/// starting them (choosing, revoking, submitting) and finishing them (waiting, mapping, recording).
struct PipeTimes {
    blocks: usize,
    lock: std::cell::Cell<Duration>,
    start: std::cell::Cell<Duration>,
    finish: std::cell::Cell<Duration>,
}

impl PipeTimes {
    fn new(blocks: usize) -> PipeTimes {
        PipeTimes { blocks, lock: Default::default(), start: Default::default(), finish: Default::default() }
    }

    fn add(to: &std::cell::Cell<Duration>, since: Instant) {
        to.set(to.get() + since.elapsed());
    }
}

impl Drop for PipeTimes {
    fn drop(&mut self) {
        log::debug!(
            "pipelined {} blocks: locking {:?}, starting {:?}, finishing {:?}",
            self.blocks,
            self.lock.get(),
            self.start.get(),
            self.finish.get()
        );
    }
}

/// Blocks per batch of an explicit migration's bulk pass (64 MiB): large enough that each
/// batch's copies keep the copy engines busy while the CPU prepares the next.
const BULK_BATCH: usize = 32;

/// Batches of a bulk pass in flight behind the one being started (see
/// [`AddressSpace::pipelined`]).
const PIPELINE_DEPTH: usize = 2;

/// Blocks in the first batch of a bulk pass (8 MiB).
const FIRST_BULK_BATCH: usize = 4;

/// Adds to `complete` the index of each of `blocks` whose `whole` is true (a bulk batch that
/// left nothing of it to the per-block pass).
fn note_complete(complete: &std::cell::RefCell<Vec<usize>>, region: &Region, blocks: &[&mut Block], whole: Vec<bool>) {
    let done = blocks.iter().zip(whole).filter(|(_, w)| *w).map(|(b, _)| region.block_index(b.base));
    complete.borrow_mut().extend(done);
}

/// Pages of `blk` inside `range`.
fn pages_in(blk: &Block, range: &VaRange) -> PageMask {
    let mut m = PageMask::default();
    let s = range.start.max(blk.base);
    let e = range.end().min(blk.base + blk.npages as u64 * PAGE_SIZE);
    if s < e {
        m.set_range(((s - blk.base) / PAGE_SIZE) as usize, ((e - blk.base) / PAGE_SIZE) as usize);
    }
    debug_assert!(m.count() <= PAGES_PER_BLOCK);
    m
}

#[cfg(test)]
mod detach_tests {
    //! A detach that cannot bring every block home.

    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;

    use parking_lot::Mutex;

    use crate::cpu::CpuFaultHandler;
    use crate::device::DeviceMmu;
    use crate::fakes::PlainCpu;
    use crate::space::{AddressSpace, AttachOptions, CoreConfig};
    use crate::testing::FakeDevice;
    use crate::types::*;

    const BASE: u64 = 0x8000_0000;

    /// One block at `BASE` (read-ahead off), written by the CPU (0x11 at its start) and then
    /// migrated to a fake device that cannot fault.
    fn block_on_device() -> crate::testing::OneDevice {
        let host = Arc::new(Mutex::new(vec![0u8; BLOCK_SIZE as usize]));
        let mut cfg = CoreConfig::default();
        cfg.policy.cpu_readahead = false;
        let space = AddressSpace::new(cfg);
        space.add_region(Arc::new(PlainCpu::new(VaRange::new(BASE, BLOCK_SIZE))), Prot::READ | Prot::WRITE).unwrap();
        let dev = Arc::new(FakeDevice::new(4 * BLOCK_SIZE as usize, 0xEE, Arc::clone(&host)));
        let id = space.attach(Arc::clone(&dev) as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
        space.cpu_fault(BASE, Access::Write).unwrap();
        host.lock()[0] = 0x11;
        space.migrate(BASE, BLOCK_SIZE, Proc::Device(id)).unwrap();
        assert!(space.page_state(BASE).unwrap().resident == ProcMask::only(Proc::Device(id)));
        (space, dev, id, host)
    }

    /// A detach whose copy home fails for a block keeps the device's slot: the CPU's fault brings
    /// the data home once copies work again. (It used to destroy the page table and empty the
    /// slot, leaving the only copy recorded on a device that was gone: every CPU fault on it
    /// failed with `Detached`.)
    #[test]
    fn a_detach_whose_copy_home_fails_keeps_the_data_reachable() {
        let (space, dev, id, host) = block_on_device();
        dev.fail_d2h.store(true, Relaxed);
        assert!(space.detach(id).is_err());
        dev.fail_d2h.store(false, Relaxed);
        let r = space.cpu_fault(BASE, Access::Read);
        assert!(r.is_ok(), "CPU fault after a failed detach: {r:?}; page {:?}", space.page_state(BASE));
        assert_eq!(host.lock()[0], 0x11);
    }

    /// After such a failed detach, a device attached next does not inherit the block's page
    /// state. (It used to get the same id, and the stale state made the CPU's fault copy the new
    /// device's memory home: the CPU read garbage, not its data.)
    #[test]
    fn a_failed_detach_leaves_no_page_state_for_the_next_device_with_its_id() {
        let (space, dev, id, host) = block_on_device();
        dev.fail_d2h.store(true, Relaxed);
        let _ = space.detach(id);
        let fresh = Arc::new(FakeDevice::new(4 * BLOCK_SIZE as usize, 0xAB, Arc::clone(&host)));
        let id2 = space.attach(Arc::clone(&fresh) as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
        let st = space.page_state(BASE).unwrap();
        let _ = space.cpu_fault(BASE, Access::Read);
        let got = host.lock()[0];
        assert!(
            id2 != id || (!st.resident.has(Proc::Device(id2)) && got == 0x11),
            "new device {id2:?} inherits the old one's page state {st:?}; CPU reads {got:#x}"
        );
    }
}

#[cfg(test)]
mod readahead_tests {
    use crate::testing::{setup4k, BASE4K};
    use crate::types::*;

    /// A read-ahead request served after a device took a block leaves that block on the device:
    /// the request is older than the placement. (Served late, as on a loaded machine, it brought
    /// the block home and undid the migration, which made a test flaky.) Blocks no device touched
    /// since the request still come home.
    #[test]
    fn a_late_read_ahead_leaves_blocks_a_device_took_since() {
        let (space, _dev, id, _host) = setup4k(crate::policy::Policy::hetmm(), 2, 8, true);
        let (a, b) = (BASE4K, BASE4K + BLOCK_SIZE);
        space.migrate(a, BLOCK_SIZE, Proc::Device(id)).unwrap();
        let asked = space.tick();
        space.migrate(b, BLOCK_SIZE, Proc::Device(id)).unwrap();
        let region = space.region_of(a).unwrap();
        let guards = region.blocks.iter().map(|c| c.lock()).collect();
        let started = super::ReadAhead::start(&space, &region, guards, asked).expect("block 0 comes home");
        started.finish(&space, &region, a);
        let dev = ProcMask::only(Proc::Device(id));
        assert!(space.page_state(a).unwrap().resident.has(Proc::Cpu), "block 0 was read ahead");
        assert_eq!(space.page_state(b).unwrap().resident, dev, "block 1, taken since, stayed");
    }
}
