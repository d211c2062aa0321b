//! The address space (GMEM's `gm_as`): shared regions with their blocks, the attached devices
//! with their allocators and fault-service threads, and the public operations on them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::alloc::BuddyAllocator;
use crate::block::{Block, CpuMap, Page, PageMask};
use crate::cpu::{CpuFaultHandler, CpuMmu};
use crate::device::{DeviceCaps, DeviceMmu};
use crate::error::{CoreError, Result};
use crate::migrate;
use crate::policy::{Prefetcher, TreePrefetcher};
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
    /// Prefetcher for device faults.
    pub prefetcher: Arc<dyn Prefetcher>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            fault_around: BLOCK_SIZE,
            copy_timeout: Duration::from_secs(60),
            prefetcher: Arc::new(TreePrefetcher::default()),
        }
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

/// A shared region: one contiguous range of shared virtual memory with its blocks.
#[derive(Debug)]
pub struct Region {
    /// The range (start 2 MiB aligned).
    pub range: VaRange,
    /// Protection the program asked for.
    pub prot: Prot,
    pub(crate) cpu: Arc<dyn CpuMmu>,
    pub(crate) blocks: Vec<Mutex<Block>>,
    freed: AtomicBool,
}

impl Region {
    /// Index of the block holding `va`.
    pub(crate) fn block_index(&self, va: u64) -> usize {
        ((va - self.range.start) / BLOCK_SIZE) as usize
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
    pub(crate) mmu: Arc<dyn DeviceMmu>,
    pub(crate) caps: DeviceCaps,
    pub(crate) alloc: Mutex<BuddyAllocator>,
    pub(crate) evict_queue: Mutex<VecDeque<(u64, usize)>>,
    pub(crate) batch: usize,
    detached: AtomicBool,
    service: Mutex<Option<JoinHandle<()>>>,
}

impl DeviceSlot {
    pub(crate) fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }
}

/// One address space shared by the CPU and every attached device.
#[derive(Debug)]
pub struct AddressSpace {
    regions: RwLock<BTreeMap<u64, Arc<Region>>>,
    devices: RwLock<Vec<Option<Arc<DeviceSlot>>>>,
    pub(crate) stats: Stats,
    pub(crate) config: CoreConfig,
    shutting_down: AtomicBool,
}

impl AddressSpace {
    /// A new, empty address space.
    pub fn new(config: CoreConfig) -> Arc<Self> {
        Arc::new(AddressSpace {
            regions: RwLock::new(BTreeMap::new()),
            devices: RwLock::new(Vec::new()),
            stats: Stats::default(),
            config,
            shutting_down: AtomicBool::new(false),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    // ----- regions -----

    /// Adds a shared region whose CPU side is `cpu` (its range must start 2 MiB aligned).
    pub fn add_region(&self, cpu: Arc<dyn CpuMmu>, prot: Prot) -> Result<VaRange> {
        let range = cpu.range();
        let checked = VaRange::checked(range.start, range.len).ok_or(CoreError::Empty { start: range.start })?;
        if !checked.is_page_aligned() || range.start % BLOCK_SIZE != 0 {
            return Err(CoreError::Unaligned(range));
        }
        // Lock order: devices before regions (as in `attach`), so that every device learns of
        // every region exactly once.
        let devices = self.devices.read();
        let mut regions = self.regions.write();
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(CoreError::ShuttingDown);
        }
        let overlaps = regions.range(..range.end()).next_back().is_some_and(|(_, r)| r.range.end() > range.start);
        if overlaps {
            return Err(CoreError::Overlap(range));
        }
        let live: Vec<&Arc<DeviceSlot>> = devices.iter().flatten().filter(|s| !s.is_detached()).collect();
        for (k, slot) in live.iter().enumerate() {
            if let Err(source) = slot.mmu.region_added(range, cpu.backing(range.start)) {
                for done in &live[..k] {
                    done.mmu.region_removed(range);
                }
                return Err(CoreError::Device { device: slot.id, source });
            }
        }
        let nblocks = range.len.div_ceil(BLOCK_SIZE) as usize;
        let blocks = (0..nblocks)
            .map(|b| {
                let base = range.start + b as u64 * BLOCK_SIZE;
                let npages = ((range.end() - base).min(BLOCK_SIZE) / PAGE_SIZE) as usize;
                Mutex::new(Block::new(base, npages))
            })
            .collect();
        regions.insert(range.start, Arc::new(Region { range, prot, cpu, blocks, freed: AtomicBool::new(false) }));
        Ok(range)
    }

    /// Removes the region starting at `start`: devices lose their mappings and device memory is
    /// freed (the data is gone). Returns the CPU side for the caller to release.
    pub fn remove_region(&self, start: u64) -> Result<Arc<dyn CpuMmu>> {
        let region = self.regions.write().remove(&start).ok_or(CoreError::NotShared(VaRange::new(start, PAGE_SIZE)))?;
        region.freed.store(true, Ordering::Release);
        for cell in &region.blocks {
            let mut blk = cell.lock();
            migrate::drop_device_copies(self, &mut blk);
        }
        for slot in self.devices.read().iter().flatten() {
            slot.mmu.region_removed(region.range);
        }
        Ok(Arc::clone(&region.cpu))
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
                    mmu.destroy_page_table();
                    return Err(CoreError::Device { device: id, source });
                }
            }
        }
        let caps = mmu.caps();
        let slot = Arc::new(DeviceSlot {
            id,
            alloc: Mutex::new(BuddyAllocator::new(&mmu.physical_ranges())),
            mmu,
            caps,
            evict_queue: Mutex::new(VecDeque::new()),
            batch: opts.fault_batch.max(1),
            detached: AtomicBool::new(false),
            service: Mutex::new(None),
        });
        if slot.caps.replayable_faults {
            let (w, s) = (Arc::downgrade(self), Arc::clone(&slot));
            let h = std::thread::Builder::new()
                .name(format!("hetmm-dev{}-faults", id.0))
                .spawn(move || crate::fault::service_loop(w, s))
                .map_err(|e| CoreError::Device {
                    device: id,
                    source: crate::device::DeviceError::Other(e.to_string()),
                })?;
            *slot.service.lock() = Some(h);
        }
        if idx == devices.len() {
            devices.push(Some(slot));
        } else {
            devices[idx] = Some(slot);
        }
        Ok(id)
    }

    /// An attached device that still holds data, even while it is being detached (for paths
    /// that move data off it).
    pub(crate) fn holder(&self, id: DeviceId) -> Result<Arc<DeviceSlot>> {
        self.devices.read().get(id.0 as usize).and_then(Clone::clone).ok_or(CoreError::Detached(id))
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
        Ok(self.slot(id)?.caps.clone())
    }

    /// Device memory free and total, in bytes.
    pub fn device_memory(&self, id: DeviceId) -> Result<(u64, u64)> {
        let s = self.slot(id)?;
        let a = s.alloc.lock();
        Ok((a.free_pages() * PAGE_SIZE, a.total_pages() * PAGE_SIZE))
    }

    /// Detaches a device: its pending faults fail, its data comes back to the CPU, its page table
    /// is destroyed.
    pub fn detach(&self, id: DeviceId) -> Result<()> {
        let slot = self.slot(id)?;
        slot.detached.store(true, Ordering::Release);
        slot.mmu.shutdown_faults();
        if let Some(h) = slot.service.lock().take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        let me = Proc::Device(id);
        let regions: Vec<Arc<Region>> = self.regions.read().values().cloned().collect();
        let mut result = Ok(());
        for region in regions {
            for cell in &region.blocks {
                let mut blk = cell.lock();
                let here = blk.resident_on(me);
                if here.is_empty() {
                    continue;
                }
                if let Err(e) = migrate::to_cpu(self, &region, &mut blk, &here) {
                    log::error!("detach: bringing block {:#x} back from {id:?}: {e}", blk.base);
                    result = Err(e);
                }
            }
        }
        for region in self.regions.read().values() {
            slot.mmu.region_removed(region.range);
        }
        slot.mmu.destroy_page_table();
        if let Some(s) = self.devices.write().get_mut(id.0 as usize) {
            *s = None;
        }
        result
    }

    // ----- migration -----

    /// Moves the pages of `range` to `to` in bulk (an explicit prefetch; the same per-block
    /// service as a fault). For a device, the pages end up mapped there; for the CPU, they end up
    /// in host backing and are mapped on the next CPU access.
    pub fn migrate(&self, start: u64, len: u64, to: Proc) -> Result<()> {
        let range = self.check_range(start, len)?;
        let region = self.region_of(range.start).ok_or(CoreError::NotShared(range))?;
        let slot = match to {
            Proc::Cpu => None,
            Proc::Device(d) => Some(self.slot(d)?),
        };
        let first = region.block_index(range.start);
        let last = region.block_index(range.end() - 1);
        for bidx in first..=last {
            let mut blk = region.blocks[bidx].lock();
            if region.is_freed() {
                return Err(CoreError::NotShared(range));
            }
            let want = pages_in(&blk, &range);
            match &slot {
                None => migrate::to_cpu(self, &region, &mut blk, &want)?,
                Some(s) => migrate::to_device(self, &region, &mut blk, s, &want)?,
            }
        }
        Ok(())
    }

    /// Services a CPU fault at `va` (see [`CpuFaultHandler`]).
    fn service_cpu_fault(&self, va: u64, _access: Access) -> Result<()> {
        let t = Instant::now();
        let region = self.region_of(va).ok_or(CoreError::NotShared(VaRange::new(va, PAGE_SIZE)))?;
        let around = self.config.fault_around.clamp(PAGE_SIZE, BLOCK_SIZE);
        let chunk_start = align_down(va, around).max(region.range.start);
        let chunk = VaRange::new(chunk_start, (chunk_start + around).min(region.range.end()) - chunk_start);
        let mut blk = region.blocks[region.block_index(va)].lock();
        let want = pages_in(&blk, &chunk);
        let fault_page = ((align_down(va, PAGE_SIZE) - blk.base) / PAGE_SIZE) as usize;

        let mut on_device = PageMask::default();
        let mut empty = PageMask::default();
        for i in want.iter() {
            let r = blk.pages[i].resident;
            if r.is_empty() {
                empty.set(i);
            } else if !r.has(Proc::Cpu) {
                on_device.set(i);
            }
        }
        migrate::to_cpu(self, &region, &mut blk, &on_device)?;
        if !empty.is_empty() {
            region.cpu.populate(&migrate::ranges(&blk, &empty))?;
            for i in empty.iter() {
                blk.pages[i].resident.insert(Proc::Cpu);
            }
        }
        let mut map = PageMask::default();
        for i in want.iter() {
            if blk.pages[i].cpu == CpuMap::None {
                map.set(i);
            }
        }
        // The faulting page is always mapped, whatever the state says (the program may have
        // dropped its mapping behind our back).
        map.set(fault_page);
        let writable = region.prot.contains(Prot::WRITE);
        region.cpu.map(&migrate::ranges(&blk, &map), writable)?;
        let state = if writable { CpuMap::Write } else { CpuMap::Read };
        for i in map.iter() {
            blk.pages[i].cpu = state;
        }
        add(&self.stats.cpu_faults, 1);
        add(&self.stats.cpu_fault_pages, (on_device.count() + empty.count()) as u64);
        add_since(&self.stats.ns_cpu_fault, t);
        Ok(())
    }

    /// Detaches every device and refuses new work. Called by the owner before dropping; safe to
    /// call twice.
    pub fn shutdown(&self) {
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
        self.service_cpu_fault(va, access)
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        self.shutdown();
    }
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
