//! Invalidation: hetmm's mmu-notifier. The CPU side changed (the program unmapped, remapped or
//! discarded part of shared memory, or asked for new protection): every device mapping of the
//! part is removed and its TLB entries invalidated, device memory is freed, and the logical
//! state follows.
//!
//! Regions are reshaped (split, moved, re-protected) under `AddressSpace::reshape` held for
//! writing, so no fault service or migration sees a range missing half-way. Reshaping first
//! brings every device-resident page of the touched regions back to host memory (their data is
//! never lost: host backing exists for every page with data), drops every device mapping, then
//! puts back the surviving parts as new regions with the same per-page CPU state.
//!
//! What hetmm promises for discards: `MADV_DONTNEED` on shared memory keeps the data (like
//! shmem: the next access reads it again); device copies are folded back into host memory.
//! `MADV_REMOVE` frees the host pages: the data of pages in host memory is gone (reads give
//! zeros); pages that were on a device when the discard raced with a device write may keep their
//! pre-discard data (the userfaultfd REMOVE event does not say which of the two calls it was).

use std::sync::Arc;

use crate::block::{Block, Page, PageMask, Pages};
use crate::cpu::CpuMmu;
use crate::error::{CoreError, Result};
use crate::migrate;
use crate::space::{AddressSpace, BlockKey, Region};
use crate::stats::add;
use crate::types::{ProcMask, Prot, VaRange, BLOCK_SIZE, PAGE_SIZE};

/// A region's part that [`AddressSpace::release_range_parts`] released: what
/// [`AddressSpace::add_registered`] takes to add it back.
#[derive(Debug, Clone)]
pub struct Released {
    /// The addresses released.
    pub range: VaRange,
    /// The region's protection.
    pub prot: Prot,
    /// The region's CPU side (it accepts every sub-range of the region).
    pub cpu: Arc<dyn CpuMmu>,
    /// Whether the region was mirrored shared memory.
    pub remote: bool,
}

/// A CPU-side change of the address space, as the host layer reads it from the OS.
#[derive(Debug, Clone)]
pub enum CpuEvent {
    /// `MADV_DONTNEED` / `MADV_REMOVE` of the range by the program.
    Discard(VaRange),
    /// `munmap` of the range.
    Unmap(VaRange),
    /// `mremap` of `[from, from + len)` to `[to, to + len)`. `new_cpu` is the CPU side of the
    /// new range (it must accept every sub-range of it); `None` when the host cannot follow the
    /// move (the data then leaves hetmm's management).
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
        /// The CPU side at the new address.
        new_cpu: Option<Arc<dyn CpuMmu>>,
    },
}

/// One part of a reshaped region.
struct Part {
    range: VaRange,
    prot: Prot,
    cpu: Arc<dyn CpuMmu>,
    remote: bool,
    /// Old address of the part's first page (where its page states come from).
    src: u64,
}

/// How a reshape brings device data home before the regions change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flush {
    /// Everything; if a copy fails nothing changes (a change hetmm makes: nothing is lost).
    AllOrNothing,
    /// `touch` changes protection: as [`Flush::AllOrNothing`], except that blocks wholly inside
    /// it keep their device copies and lose only their device mappings (the next access faults
    /// and is checked against the new protection; see [`Keeps`]).
    Reprotect,
    /// The program moved `touch` to this address (`None`: hetmm cannot follow it there): its
    /// pages travel there with their device copies, whole blocks where the distance is a
    /// multiple of 2 MiB, page by page otherwise ([`Keeps`]). What cannot travel comes home, and
    /// the regions change even if a copy fails (the kernel already moved the mappings): a block
    /// whose copy home fails keeps its device copies, re-keyed into the new regions, where
    /// devices can take pages one by one or its pages stay together in place (see
    /// [`Keeps::rescue`]); elsewhere its device data is lost, and the error reported.
    Moved(Option<u64>),
    /// Everything outside this range, which the program unmapped (its data is dropped
    /// uncopied); the regions change even if a copy fails, as for [`Flush::Moved`].
    Unmapped(VaRange),
}

impl AddressSpace {
    /// Applies a CPU-side event (see [`CpuEvent`]).
    pub fn apply_cpu_event(&self, ev: CpuEvent) -> Result<()> {
        match ev {
            CpuEvent::Discard(r) => self.discard_cpu_range(r),
            CpuEvent::Unmap(r) => self.unmap_range(r).map(drop),
            CpuEvent::Remap { from, to, len, new_cpu } => self.remap_range(from, to, len, new_cpu),
        }
    }

    /// Waits (at most 10 s) until every CPU-side event read from the OS has been applied: after
    /// the program's `munmap`/`mremap`/`madvise` returns, the next hetmm call sees its effect.
    /// Never call it from the thread that applies events.
    pub fn settle(&self) -> Result<()> {
        self.not_forked()?;
        let limit = std::time::Duration::from_secs(10);
        let t = std::time::Instant::now();
        while self.events_pending.load(std::sync::atomic::Ordering::Acquire) != 0 {
            if t.elapsed() > limit {
                return Err(CoreError::Timeout { what: "applying CPU-side events", after: limit });
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        Ok(())
    }

    /// Brings device-resident pages of `range` back to host memory and removes every device
    /// mapping of them (the program discarded its CPU mapping; see the module notes).
    pub fn discard_cpu_range(&self, range: VaRange) -> Result<()> {
        let _gate = self.enter()?;
        let _shape = self.reshape.read();
        let holders = self.holders();
        let mut result = Ok(());
        for region in self.overlapping(range) {
            let Some(part) = region.range.intersect(&range) else { continue };
            // The program may have punched the host backing (`MADV_REMOVE` raises the same event
            // as `MADV_DONTNEED`): a device that pinned those pages for DMA must pin the new ones
            // before the copies home below (its pins held the old pages, which nobody else sees
            // any more). Told once for the whole part, not per block: a device pinning in pieces
            // of several blocks would otherwise unpin a piece for each block and pin it again
            // for each block's copies.
            for slot in &holders {
                slot.mmu.host_discarded(&[part]);
            }
            let first = region.block_index(part.start);
            let last = region.block_index(part.end() - 1);
            for bidx in first..=last {
                let mut blk = region.blocks[bidx].lock();
                if region.is_freed() {
                    break;
                }
                let want = pages_of(&blk.base, blk.npages, &part);
                if let Err(e) = flush_and_unmap(self, &region, &mut blk, &want) {
                    log::error!("discard of {part}: {e}");
                    result = Err(e);
                }
            }
        }
        result
    }

    /// The program unmapped `range`: shared regions lose that part (device mappings removed,
    /// device memory freed). Returns the CPU sides of regions that disappeared entirely.
    pub fn unmap_range(&self, range: VaRange) -> Result<Vec<Arc<dyn CpuMmu>>> {
        // The advice went with the memory (whatever is mapped there next starts without).
        self.cut_range(range, Flush::Unmapped(range))
    }

    /// Takes `range` out of the shared regions (see [`AddressSpace::unmap_range`] and
    /// [`AddressSpace::release_range`]).
    fn cut_range(&self, range: VaRange, flush: Flush) -> Result<Vec<Arc<dyn CpuMmu>>> {
        let mut gone = Vec::new();
        self.cut_range_with(range, flush, |r, parts| {
            if parts.is_empty() {
                gone.push(Arc::clone(&r.cpu));
            }
        })?;
        Ok(gone)
    }

    /// [`AddressSpace::cut_range`], telling `seen` of each region cut and the parts of it kept.
    fn cut_range_with(&self, range: VaRange, flush: Flush, mut seen: impl FnMut(&Region, &[Part])) -> Result<()> {
        self.reshape_regions(
            range,
            flush,
            |s| s.attrs.write().clear(range),
            |r| {
                let parts = parts_outside(r, range);
                seen(r, &parts);
                parts
            },
        )
        .map(drop)
    }

    /// The program moved `[from, from + len)` to `to`: the data follows, device copies included
    /// (whole blocks moved a multiple of 2 MiB, page by page otherwise), and the new range is
    /// shared memory over `new_cpu`.
    pub fn remap_range(&self, from: u64, to: u64, len: u64, new_cpu: Option<Arc<dyn CpuMmu>>) -> Result<()> {
        let old = VaRange::checked(from, len).ok_or(CoreError::Overflow { start: from, len })?;
        // The moved part becomes a region at `to`, whose last block must end below the top.
        to.checked_add(len)
            .and_then(|end| end.checked_add(BLOCK_SIZE))
            .ok_or(CoreError::Overflow { start: to, len })?;
        let followed = new_cpu.is_some();
        let moved_attrs = |s: &AddressSpace| {
            // The advice moves with the memory (or leaves with it).
            let mut attrs = s.attrs.write();
            if followed {
                attrs.move_range(from, to, len);
            } else {
                attrs.clear(old);
            }
        };
        let r = self.reshape_regions(old, Flush::Moved(new_cpu.as_ref().map(|_| to)), moved_attrs, |r| {
            let mut parts = parts_outside(r, old);
            if let (Some(cpu), Some(moved)) = (&new_cpu, r.range.intersect(&old)) {
                parts.push(Part {
                    range: VaRange::new(to + (moved.start - from), moved.len),
                    prot: r.prot,
                    cpu: Arc::clone(cpu),
                    remote: r.remote,
                    src: moved.start,
                });
            }
            parts
        });
        r.map(drop)
    }

    /// Changes the protection of `range` (page aligned, every page shared memory) on the CPU
    /// and on every device together: device mappings are removed (the next device access faults
    /// and is checked against the new protection) and the CPU view is `mprotect`ed. Device
    /// copies stay, except in the blocks the range cuts through, which come home.
    pub fn protect_range(&self, start: u64, len: u64, prot: Prot) -> Result<()> {
        let range = self.check_span(start, len)?;
        let mut cpu_result = Ok(());
        self.reshape_regions(
            range,
            Flush::Reprotect,
            |_| {},
            |r| {
                let mut parts = parts_outside(r, range);
                if let Some(mid) = r.range.intersect(&range) {
                    // A protection the CPU side refused is not given to devices either.
                    let prot = match r.cpu.set_prot(mid, prot) {
                        Ok(()) => prot,
                        Err(e) => {
                            cpu_result = Err(CoreError::Host(e));
                            r.prot
                        }
                    };
                    parts.push(Part { range: mid, prot, cpu: Arc::clone(&r.cpu), remote: r.remote, src: mid.start });
                }
                parts
            },
        )?;
        cpu_result
    }

    /// Stops sharing `range`: every page's data comes back to host memory, devices lose their
    /// mappings, and the parts of regions inside `range` are removed. Returns the CPU sides of
    /// regions that disappeared entirely.
    pub fn release_range(&self, start: u64, len: u64) -> Result<Vec<Arc<dyn CpuMmu>>> {
        let range = self.check_span(start, len)?;
        self.cut_range(range, Flush::AllOrNothing)
    }

    /// [`AddressSpace::release_range`], returning each region's part released: what adds it back
    /// ([`AddressSpace::add_registered`]) if the caller cannot finish giving the memory back
    /// (its advice is gone). The parts hold the CPU sides, as `release_range`'s result does.
    pub fn release_range_parts(&self, start: u64, len: u64) -> Result<Vec<Released>> {
        let range = self.check_span(start, len)?;
        let mut out = Vec::new();
        self.cut_range_with(range, Flush::AllOrNothing, |r, _| {
            if let Some(x) = r.range.intersect(&range) {
                out.push(Released { range: x, prot: r.prot, cpu: Arc::clone(&r.cpu), remote: r.remote });
            }
        })?;
        Ok(out)
    }

    /// Adds shared memory the program already had (`register`): a region over `range` whose CPU
    /// side is `cpu` (which accepts every sub-range of `range`), every page holding data in host
    /// memory and unmapped by the CPU (the next access maps it).
    pub fn add_registered(&self, cpu: Arc<dyn CpuMmu>, range: VaRange, prot: Prot, remote: bool) -> Result<()> {
        Region::check_new(range)?;
        self.not_forked()?;
        let region = Region::build(range, prot, cpu, remote);
        for cell in &region.blocks {
            for pg in cell.lock().pages.iter_mut() {
                pg.resident = ProcMask::only(crate::types::Proc::Cpu);
            }
        }
        self.insert_announced(Arc::new(region), true)
    }

    /// Takes back a part [`AddressSpace::release_range_parts`] released, when the caller could
    /// not finish giving the memory back (a failed unregister): its CPU side's mappings are
    /// revoked first, then it is added as registered memory (its advice is gone). The CPU kept
    /// mapping what it mapped while the memory was shared, and [`AddressSpace::add_registered`]
    /// records every page unmapped: a migration to a device then left the CPU's mapping in
    /// place, the CPU's writes went to host memory and the device's stale copy came home over
    /// them (found by a review).
    pub fn take_back(&self, part: &Released) -> Result<()> {
        part.cpu.revoke(&[part.range])?;
        self.add_registered(Arc::clone(&part.cpu), part.range, part.prot, part.remote)
    }

    /// Validates a range that may cover several adjacent regions: non-empty, no overflow, page
    /// aligned, and every page inside some shared region. Waits for a reshape under way (one
    /// takes regions out before it puts their parts back: a range it did not touch was
    /// reported not shared meanwhile, and `advise` on it failed).
    pub fn check_span(&self, start: u64, len: u64) -> Result<VaRange> {
        if len == 0 {
            return Err(CoreError::Empty { start });
        }
        let range = VaRange::checked(start, len).ok_or(CoreError::Overflow { start, len })?;
        if !range.is_page_aligned() {
            return Err(CoreError::Unaligned(range));
        }
        // Recursive: callers may hold it for reading already (a writer waiting must not block
        // them here).
        let _shape = self.reshape.read_recursive();
        let mut cur = range.start;
        for r in self.overlapping(range) {
            if r.range.start > cur {
                break;
            }
            cur = cur.max(r.range.end());
        }
        if cur < range.end() {
            return Err(CoreError::NotShared(range));
        }
        Ok(range)
    }

    /// [`AddressSpace::check_span`], then the span cut at region boundaries: one range per
    /// region it covers, in order (a buffer part of which was `protect`ed is several regions).
    pub fn span_parts(&self, start: u64, len: u64) -> Result<Vec<VaRange>> {
        let _shape = self.reshape.read_recursive();
        let range = self.check_span(start, len)?;
        Ok(self.overlapping(range).iter().filter_map(|r| r.range.intersect(&range)).collect())
    }

    /// Whether any page of `range` is shared memory.
    pub fn any_shared(&self, range: VaRange) -> bool {
        !self.overlapping(range).is_empty()
    }

    /// Regions overlapping `range`, in address order.
    pub(crate) fn overlapping(&self, range: VaRange) -> Vec<Arc<Region>> {
        let regions = self.regions.read();
        let mut out: Vec<Arc<Region>> = Vec::new();
        if let Some((_, r)) = regions.range(..range.start).next_back() {
            if r.range.end() > range.start {
                out.push(Arc::clone(r));
            }
        }
        out.extend(regions.range(range.start..range.end()).map(|(_, r)| Arc::clone(r)));
        out
    }

    /// Folds the device data of every region overlapping `touch` back to host memory (as
    /// `flush` says), then takes those regions out, drops device mappings and copies, and puts
    /// back the parts `f` returns for each (with the old regions' per-page CPU state). Returns
    /// how many regions were touched.
    fn reshape_regions(
        &self,
        touch: VaRange,
        flush: Flush,
        attrs: impl FnOnce(&AddressSpace),
        mut f: impl FnMut(&Region) -> Vec<Part>,
    ) -> Result<usize> {
        let _gate = self.enter()?;
        let _shape = self.reshape.write();
        // With the reshape lock held for writing nothing moves data meanwhile: every fault
        // service, migration and eviction holds it for reading.
        let touched = self.overlapping(touch);
        let mut keeps = Keeps::new(self, touch, flush);
        let mut flushed = Ok(());
        for r in &touched {
            for (b, cell) in r.blocks.iter().enumerate() {
                if keeps.kept(r, b) {
                    continue;
                }
                let mut blk = cell.lock();
                let mut keep = PageMask::full(blk.npages);
                if let Flush::Unmapped(g) = flush {
                    keep = keep.and_not(&pages_of(&blk.base, blk.npages, &g));
                }
                // Pages whose device copies travel lose their mappings at the old addresses now.
                let travel = keeps.travelling(r, b, &blk);
                if !travel.is_empty() {
                    match migrate::unmap_others(self, &mut blk, &travel, None) {
                        Ok(()) => keep = keep.and_not(&travel),
                        Err(e) => {
                            log::warn!("pages at {:#x} come home instead of moving: {e}", blk.base);
                            keeps.refuse(r, b);
                        }
                    }
                }
                if let Err(e) = flush_and_unmap(self, r, &mut blk, &keep) {
                    if matches!(flush, Flush::AllOrNothing | Flush::Reprotect) {
                        log::error!("reshaping {}: {e}", r.range);
                        return Err(e);
                    }
                    // The kernel has already moved or unmapped the memory: the regions must
                    // follow. The pages stay on their devices where they can be re-keyed into
                    // the new regions; otherwise what this block's device held is lost.
                    if keeps.rescue(self, r, b, &mut blk, &keep) {
                        log::warn!("reshaping {}: {e}; the device copies of block {:#x} stay", r.range, blk.base);
                    } else {
                        // A device refused to give up pages the program kept: their data still
                        // comes home, copied where it lies (it was lost, the pages read zeros;
                        // found by an audit).
                        // Not the pages `rescue` kept on their devices (mapped as they were,
                        // where a device refused the unmap): a CPU copy beside them would
                        // diverge from the device's writes through the mapping it kept.
                        let home = keep.and_not(&keeps.rescued(r, b).unwrap_or_default());
                        let lost = migrate::copy_home_keeping_maps(self, r, &mut blk, &home);
                        log::error!(
                            "reshaping {}: {e}; the kept pages' data came home but for {} pages",
                            r.range,
                            lost.count()
                        );
                        flushed = flushed.and(Err(e));
                    }
                }
            }
        }
        // Exactly the regions flushed: one inserted meanwhile beside them (in the part of `touch`
        // no region covered) is not ours to reshape, and one removed meanwhile is gone.
        let old: Vec<Arc<Region>> = {
            let mut map = self.regions.write();
            let mine: Vec<Arc<Region>> =
                touched.into_iter().filter(|r| map.get(&r.range.start).is_some_and(|m| Arc::ptr_eq(m, r))).collect();
            for r in &mine {
                map.remove(&r.range.start);
            }
            mine
        };
        let mut result = flushed;
        let mut moves = Vec::new();
        let holders = self.holders();
        for r in &old {
            r.set_freed();
            // Each old block's page state as its pages arrive in the new regions (unmade where
            // it was never made: a large region mostly untouched costs nothing here).
            let mut pages: Vec<Pages> = Vec::with_capacity(r.blocks.len());
            // The jobs each old block counts: a block rebuilt in place from them keeps them, so
            // that a running job's end still finds its pieces (and no other job's end does).
            let mut jobs: Vec<Vec<u64>> = Vec::with_capacity(r.blocks.len());
            // Device state of the moved pages that keep their copies, by old address.
            let mut rekeyed = Carried::default();
            for (b, cell) in r.blocks.iter().enumerate() {
                let mut blk = cell.lock();
                jobs.push(blk.job_ids.clone());
                let all = PageMask::full(blk.npages);
                // Moved pages that travel one by one, and pages a failed copy home left on
                // devices: taken together, so that the carried pages stay in address order.
                let mut carry = keeps.rescued(r, b).unwrap_or_default();
                if keeps.rekeys(r, b) {
                    carry = carry.or(&pages_of(&blk.base, blk.npages, &touch));
                }
                if !carry.is_empty() {
                    rekeyed.take(&mut blk, &carry);
                }
                // What is left on devices: copies in the unmapped range (dropped uncopied) and
                // of blocks whose copy home failed after the kernel changed the mappings.
                let mut refused = false;
                if keeps.kept(r, b) || keeps.carried(r, b) {
                    // Moved whole into its new region below, as hot as it was: its unread use
                    // counts go into its heat before the devices forget the region.
                    let now = self.tick();
                    for slot in &holders {
                        crate::evict::heat_of(self, slot, &mut blk, now);
                    }
                } else if let Err(e) = migrate::drop_device_copies(self, &mut blk, &all) {
                    log::error!("reshaping {}: {e}", r.range);
                    result = Err(e);
                    refused = true;
                }
                // Mappings a device refused to give up stay recorded, as `drop_device_copies`
                // leaves them, so that a later unmap of these pages tries again.
                let kept = |m: ProcMask| if refused { m } else { ProcMask::EMPTY };
                pages.push(blk.pages.map(|p| Page {
                    resident: ProcMask(p.resident.0 & ProcMask::only(crate::types::Proc::Cpu).0),
                    cpu: p.cpu,
                    dev_mapped: kept(p.dev_mapped),
                    dev_ro: kept(p.dev_ro),
                    peer_mapped: kept(p.peer_mapped),
                }));
            }
            rekeyed.pas.sort_unstable_by_key(|&(va, d, _)| (va, d.0));
            debug_assert!(rekeyed.pages.windows(2).all(|p| p[0].0 < p[1].0), "carried pages in address order");
            for slot in &holders {
                slot.mmu.region_removed(r.range);
            }
            for part in f(r) {
                let (src, start) = (part.src, part.range.start);
                let new = Region::build(part.range, part.prot, part.cpu, part.remote);
                let mut moved = Vec::new();
                let mut rekeyed_blocks = Vec::new();
                for (nb, cell) in new.blocks.iter().enumerate() {
                    let mut blk = cell.lock();
                    let base = blk.base;
                    if let Some(ob) = keeps.source(r, src + (base - start), blk.npages, src == start) {
                        *blk = std::mem::replace(&mut *r.blocks[ob].lock(), Block::new(base, blk.npages));
                        if src != start {
                            blk.moved_to(base);
                        }
                        moved.push((ob, nb));
                        continue;
                    }
                    if src == start {
                        let span = VaRange::new(base, blk.npages as u64 * PAGE_SIZE);
                        // Only jobs that use this part: one whose ranges lay only in the part
                        // the program unmapped never ends here (its end finds blocks by range).
                        let live = self.jobs.lock();
                        let uses =
                            |id: &u64| live.get(id).is_some_and(|rs| rs.iter().any(|r| r.intersect(&span).is_some()));
                        for (ob, ids) in jobs.iter().enumerate() {
                            if r.block_span(ob).intersect(&span).is_some() {
                                for id in ids.iter().filter(|id| uses(id)) {
                                    if !blk.job_ids.contains(id) {
                                        blk.job_ids.push(*id);
                                    }
                                }
                            }
                        }
                        drop(live);
                        blk.active_jobs = blk.job_ids.len() as u32;
                    }
                    for i in 0..blk.npages {
                        let src = part.src + (base - part.range.start) + i as u64 * PAGE_SIZE;
                        let from = r.range.contains(src).then(|| {
                            let ob = r.block_index(src);
                            pages[ob][((src - r.block_span(ob).start) / PAGE_SIZE) as usize]
                        });
                        // Written only where it differs: an untouched page keeps its block's
                        // state unmade (`Pages`).
                        if let Some(p) = from.filter(|p| *p != blk.pages[i]) {
                            blk.pages[i] = p;
                        }
                    }
                    // Moved pages land at their new addresses, rescued ones where they were.
                    if !rekeyed.pages.is_empty() {
                        let old_base = src + (base - start);
                        if rekeyed.give(self, &new, nb, &mut blk, old_base) {
                            rekeyed_blocks.push(nb);
                        }
                    }
                }
                let new = Arc::new(new);
                let start = new.range.start;
                match self.insert_announced(Arc::clone(&new), false) {
                    Ok(()) => {
                        add(&self.stats.reshape_blocks_kept, moved.len() as u64);
                        moves.extend(moved.into_iter().map(|(ob, nb)| ((r.range.start, ob), (start, nb))));
                    }
                    Err(e) => {
                        log::error!("reshaped part {} dropped: {e}", part.range);
                        let held = moved.iter().map(|&(_, nb)| nb).chain(rekeyed_blocks.iter().copied());
                        result = result.and(self.release_kept(&new, held));
                    }
                }
            }
        }
        self.requeue(&moves);
        // The advice follows under the same hold: nobody sees the new regions with the old advice.
        attrs(self);
        result.map(|()| old.len())
    }

    /// Gives the blocks of `moves` (old region start and block index, new ones) their new places
    /// in every device's eviction queue, keeping their order there.
    fn requeue(&self, moves: &[(BlockKey, BlockKey)]) {
        if moves.is_empty() {
            return;
        }
        let to: std::collections::HashMap<BlockKey, BlockKey> = moves.iter().copied().collect();
        for slot in self.holders() {
            for e in slot.evict_queue.lock().iter_mut() {
                if let Some(n) = to.get(e) {
                    *e = *n;
                }
            }
        }
    }

    /// Brings home and frees the device copies of blocks `which` of a reshaped part that could
    /// not be inserted (its blocks were kept in place on devices).
    fn release_kept(&self, region: &Region, which: impl Iterator<Item = usize>) -> Result<()> {
        let mut result = Ok(());
        for b in which {
            let mut blk = region.blocks[b].lock();
            let all = PageMask::full(blk.npages);
            let r = flush_and_unmap(self, region, &mut blk, &all);
            result = result.and(r).and(migrate::drop_device_copies(self, &mut blk, &all));
        }
        result
    }

    pub(crate) fn overlapping_locked(
        &self,
        map: &std::collections::BTreeMap<u64, Arc<Region>>,
        range: VaRange,
    ) -> Vec<u64> {
        let mut keys = Vec::new();
        if let Some((k, r)) = map.range(..range.start).next_back() {
            if r.range.end() > range.start {
                keys.push(*k);
            }
        }
        keys.extend(map.range(range.start..range.end()).map(|(k, _)| *k));
        keys
    }
}

/// Which blocks a reshape keeps on devices. Where no attached device binds its mappings to
/// regions ([`crate::device::DeviceCaps::region_bound`]):
/// - a block the change does not touch is *kept*: its device copies and mappings stay, and it
///   moves whole into the part that holds it (a 4 KiB munmap in a large buffer brings home only
///   the block around it);
/// - a block inside a range the program moved by a multiple of 2 MiB, or re-protected, is
///   *carried*: its device mappings are removed, its device copies stay, and it moves whole to
///   its new addresses or into the re-protected part (the next device access maps it again,
///   checked against the part's protection: an `mremap` or a `protect` of a large
///   device-resident buffer copies nothing);
/// - the other moved pages are *re-keyed*: their device mappings are removed and each goes,
///   with its device pages, into the block that now holds its address. A block assembled that
///   way is mapped with 4 KiB device entries, its pages not forming one 2 MiB chunk.
///
/// Otherwise every block comes home.
struct Keeps {
    touch: VaRange,
    on: bool,
    /// `touch` moved by a multiple of 2 MiB, or was re-protected: its blocks can be carried.
    carry: bool,
    /// Carried blocks whose old mappings could not be removed (region start, block): they come
    /// home instead.
    refused: Vec<BlockKey>,
    /// `touch` moved: the pages of blocks that cannot be carried whole (moved by a distance
    /// that is not a multiple of 2 MiB, or cut by the moved range's ends) land in other blocks,
    /// so they travel one by one, each with its device pages (re-keyed).
    rekey: bool,
    /// The change is the program's (a move or an unmap): a block whose copy home fails can
    /// keep its device copies, re-keyed (one by one where every device takes 4 KiB pages; see
    /// [`Keeps::rescue`] for devices that map whole 2 MiB chunks).
    can_rescue: bool,
    /// Some device maps whole 2 MiB chunks only, each page at its window offset in its chunk
    /// (CUDA): pages it keeps must stay at their addresses, in one block per chunk.
    chunked: bool,
    /// hetmm follows moved pages (a move it cannot follow leaves nowhere for them to go).
    follow: bool,
    /// Blocks whose copy home failed and whose surviving pages keep their device copies
    /// (region start, block, the pages).
    rescued: Vec<(BlockKey, PageMask)>,
}

impl Keeps {
    fn new(space: &AddressSpace, touch: VaRange, flush: Flush) -> Keeps {
        let holders = space.holders();
        let on = holders.iter().all(|s| s.is_detached() || !s.caps.region_bound);
        let carry = on
            && match flush {
                Flush::Moved(Some(to)) => to.abs_diff(touch.start) % BLOCK_SIZE == 0,
                Flush::Reprotect => true,
                _ => false,
            };
        // Re-keyed pages land on scattered device pages: only for devices with 4 KiB pages.
        let chunked = holders.iter().any(|s| !s.is_detached() && migrate::whole_blocks(s));
        let rekey = matches!(flush, Flush::Moved(Some(_))) && on && !chunked;
        // A region-bound device loses only its mappings with the region, not its memory (the
        // core allocates that): after a failed copy home it too can keep its copies.
        let follow = !matches!(flush, Flush::Moved(None));
        let can_rescue = matches!(flush, Flush::Unmapped(_) | Flush::Moved(_));
        Keeps { touch, on, carry, refused: Vec::new(), rekey, can_rescue, chunked, follow, rescued: Vec::new() }
    }

    /// Block `b` of `r` (locked as `blk`) could not bring `keep` home: those pages keep their
    /// device copies instead, re-keyed into the block that holds their address afterwards
    /// (their device mappings go now, and the next device access maps them again). Where a
    /// device maps whole chunks, only a block whose pages all stay together in one block (one
    /// the change does not cut in two) can: two blocks would share its chunk. Returns whether
    /// all of them did; the device data of the others is lost.
    fn rescue(&mut self, space: &AddressSpace, r: &Region, b: usize, blk: &mut Block, keep: &PageMask) -> bool {
        // Pages moved where hetmm does not follow have no block to land in; on a whole-chunk
        // device moved ones would land at other window offsets of their chunk: only the pages
        // that stay where they are keep their copies there (all of a move's other blocks did
        // not; found by a review).
        let stay = keep.and_not(&pages_of(&blk.base, blk.npages, &self.touch));
        let m = if self.follow && !self.chunked { *keep } else { stay };
        let split = self.chunked && r.block_span(b).minus(self.touch).len() > 1;
        if !self.can_rescue || m.is_empty() || split {
            return false;
        }
        let mut m = m;
        if let Err(e) = migrate::unmap_others(space, blk, &m, None) {
            // Pages that stay at their addresses keep the mappings a device refused to remove:
            // where mappings outlive the reshape (no device is region-bound) they still reach
            // the same copies, and the next CPU access tries the unmap again. Copied home while
            // the device kept writing through its mapping, the two diverged (found by an
            // audit). Moved pages have nowhere to keep them.
            let stay = m.and_not(&pages_of(&blk.base, blk.npages, &self.touch));
            if !self.on || stay.is_empty() {
                log::error!("block {:#x}: its device mappings could not be removed either: {e}", blk.base);
                return false;
            }
            log::warn!("block {:#x}: pages stay on their devices, mapped as they were: {e}", blk.base);
            m = stay;
        }
        let all = m.count() == keep.count();
        self.rescued.push(((r.range.start, b), m));
        all
    }

    /// The pages of block `b` of `r` that [`Keeps::rescue`] kept on devices.
    fn rescued(&self, r: &Region, b: usize) -> Option<PageMask> {
        self.rescued.iter().find(|(k, _)| *k == (r.range.start, b)).map(|(_, m)| *m)
    }

    /// Whether the pages of block `b` of `r` inside `touch` travel one by one with their device
    /// copies, the block not being carried whole (see [`Keeps::rekey`]).
    fn rekeys(&self, r: &Region, b: usize) -> bool {
        self.rekey
            && r.block_span(b).intersect(&self.touch).is_some()
            && !self.carried(r, b)
            && !self.refused.contains(&(r.range.start, b))
    }

    /// Whether block `b` of `r` stays as it is.
    fn kept(&self, r: &Region, b: usize) -> bool {
        self.on && r.block_span(b).intersect(&self.touch).is_none()
    }

    /// Whether block `b` of `r` travels to its new addresses with its device copies. Moved a
    /// multiple of 2 MiB, a block inside `touch` keeps its span (its 2 MiB frame cut by the
    /// moved range, shifted).
    fn carried(&self, r: &Region, b: usize) -> bool {
        self.carry && self.touch.contains_range(&r.block_span(b)) && !self.refused.contains(&(r.range.start, b))
    }

    /// The pages of block `b` of `r` (locked as `blk`) whose device copies travel: all of a
    /// carried block, those inside `touch` of a re-keyed one, none otherwise.
    fn travelling(&self, r: &Region, b: usize, blk: &Block) -> PageMask {
        if self.carried(r, b) {
            PageMask::full(blk.npages)
        } else if self.rekeys(r, b) {
            pages_of(&blk.base, blk.npages, &self.touch)
        } else {
            PageMask::default()
        }
    }

    /// Block `b` of `r` cannot be carried.
    fn refuse(&mut self, r: &Region, b: usize) {
        self.refused.push((r.range.start, b));
    }

    /// The block of `r` whose state a new block of `npages` takes over whole, its first page
    /// having been at `old` (the same address `in_place`): one kept or carried, with the same
    /// span. A part that moved holds only carried blocks (kept ones are outside `touch`).
    fn source(&self, r: &Region, old: u64, npages: usize, in_place: bool) -> Option<usize> {
        if !r.range.contains(old) {
            return None;
        }
        let b = r.block_index(old);
        let span = r.block_span(b);
        let whole = span.start == old && span.pages() == npages as u64;
        // A part in place holds kept blocks, and carried ones where it was re-protected.
        let keeps = self.carried(r, b) || (in_place && self.kept(r, b));
        (whole && keeps).then_some(b)
    }
}

/// The moved pages of a reshape that keep their device copies (see [`Keeps::rekey`]), in
/// address order: each page's state (mappings cleared) and each device page holding it, by old
/// address. Flat and sorted rather than a map: a 64 MiB move carries 16384 pages.
#[derive(Default)]
struct Carried {
    pages: Vec<(u64, Page)>,
    pas: Vec<(u64, crate::types::DeviceId, crate::device::PhysAddr)>,
}

impl Carried {
    /// Takes the pages `m` of `blk` that devices hold out of it with their device copies
    /// (forgotten there, not freed).
    fn take(&mut self, blk: &mut Block, m: &PageMask) {
        let mut devices = ProcMask::EMPTY;
        for i in m.iter() {
            let p = blk.pages[i];
            if p.resident.devices().next().is_none() {
                continue;
            }
            devices.0 |= p.resident.0;
            // Their mappings were removed, but those a device refused to remove for pages that
            // stay where they are, which still reach these copies (see `Keeps::rescue`).
            self.pages.push((blk.va(i), p));
        }
        for d in devices.devices() {
            let me = crate::types::Proc::Device(d);
            let mut here = PageMask::default();
            for i in m.iter().filter(|&i| blk.pages[i].resident.has(me)) {
                if let Some(pa) = blk.pa(d, i) {
                    self.pas.push((blk.va(i), d, pa));
                }
                here.set(i);
            }
            blk.take_pas(d, &here);
            for i in here.iter() {
                blk.pages[i].resident.remove(me);
            }
        }
    }

    /// Gives block `nb` of `new` (locked as `blk`), whose first page was at `old_base`, the
    /// carried pages that land in it, and queues it for eviction on the devices that hold some.
    /// Returns whether it got any.
    fn give(&self, space: &AddressSpace, new: &Region, nb: usize, blk: &mut Block, old_base: u64) -> bool {
        debug_assert_eq!(new.block_index(blk.base), nb);
        let end = old_base + blk.npages as u64 * PAGE_SIZE;
        let within = |va: u64| (va >= old_base && va < end).then(|| ((va - old_base) / PAGE_SIZE) as usize);
        let from = self.pages.partition_point(|&(va, _)| va < old_base);
        let mut got = 0u64;
        for &(va, page) in &self.pages[from..] {
            let Some(i) = within(va) else { break };
            blk.pages[i] = page;
            got += 1;
        }
        let mut holders = ProcMask::EMPTY;
        let from = self.pas.partition_point(|&(va, _, _)| va < old_base);
        for &(va, d, pa) in &self.pas[from..] {
            let Some(i) = within(va) else { break };
            blk.set_pa(d, i, Some(pa));
            holders.insert(crate::types::Proc::Device(d));
        }
        add(&space.stats.reshape_pages_rekeyed, got);
        for d in holders.devices() {
            if let Ok(slot) = space.holder(d) {
                migrate::enqueue(new, blk, &slot);
            }
        }
        got > 0
    }
}

/// The parts of `r` outside `cut`, as they were (same addresses, protection and CPU side).
fn parts_outside(r: &Region, cut: VaRange) -> Vec<Part> {
    let keep = |p: VaRange| Part { range: p, prot: r.prot, cpu: Arc::clone(&r.cpu), remote: r.remote, src: p.start };
    r.range.minus(cut).into_iter().map(keep).collect()
}

/// Pages of a block (`base`, `npages`) inside `range`.
fn pages_of(base: &u64, npages: usize, range: &VaRange) -> PageMask {
    let mut m = PageMask::default();
    let s = range.start.max(*base);
    let e = range.end().min(base + npages as u64 * PAGE_SIZE);
    if s < e {
        m.set_range(((s - base) / PAGE_SIZE) as usize, ((e - base) / PAGE_SIZE) as usize);
    }
    m
}

/// Brings the device-resident pages of `want` back to host memory and removes every device
/// mapping of `want` (remote mappings included).
fn flush_and_unmap(
    space: &AddressSpace,
    region: &Region,
    blk: &mut crate::block::Block,
    want: &PageMask,
) -> Result<()> {
    let mut on_dev = PageMask::default();
    let mut mapped = ProcMask::EMPTY;
    for i in want.iter() {
        let pg = &blk.pages[i];
        if pg.resident.0 & !1 != 0 {
            on_dev.set(i);
        }
        mapped.0 |= pg.dev_mapped.0;
    }
    migrate::to_cpu(space, region, blk, &on_dev)?;
    for d in mapped.devices() {
        let Ok(slot) = space.holder(d) else { continue };
        migrate::unmap_on(space, blk, &slot, want)?;
    }
    Ok(())
}

#[cfg(test)]
mod refused_unmap_tests {
    //! A reshape the program forced (munmap, mremap) keeps recorded the device mappings a device
    //! refused to remove, as `drop_device_copies` leaves them, so that a later unmap tries again.
    //! (The surviving pages used to be rebuilt with `dev_mapped` empty.)
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Arc;

    use parking_lot::Mutex;

    use crate::fakes::PlainCpu;
    use crate::space::{AddressSpace, AttachOptions, CoreConfig};
    use crate::testing::FakeDevice;
    use crate::types::*;

    const S: u64 = 16 * BLOCK_SIZE;

    /// A registered region of two blocks, each page's first byte distinct, all of it moved to
    /// one device (its only copy).
    fn on_device() -> (Arc<AddressSpace>, Arc<FakeDevice>, DeviceId) {
        let len = 2 * BLOCK_SIZE;
        let cfg = CoreConfig {
            fault_around: 64 * 1024,
            policy: crate::policy::Policy {
                prefetcher: Arc::new(crate::policy::NoPrefetch),
                cpu_readahead: false,
                ..crate::policy::Policy::uvm()
            },
            ..CoreConfig::default()
        };
        let space = AddressSpace::new(cfg);
        let host = Arc::new(Mutex::new(vec![0u8; len as usize]));
        let cpu = Arc::new(PlainCpu::new(VaRange::new(S, len)));
        space.add_registered(cpu, VaRange::new(S, len), Prot::READ | Prot::WRITE, false).unwrap();
        let dev = Arc::new(FakeDevice::new((2 * len) as usize, 0xEE, host.clone()));
        let id = space.attach(dev.clone(), AttachOptions::default()).unwrap();
        for off in (0..len).step_by(PAGE_SIZE as usize) {
            host.lock()[off as usize] = 0x40 + (off / PAGE_SIZE % 100) as u8;
        }
        space.migrate(S, len, Proc::Device(id)).unwrap();
        (space, dev, id)
    }

    /// Pages of live regions the device's page table maps but hetmm records as not mapped by it.
    fn mismatches(space: &AddressSpace, dev: &FakeDevice, id: DeviceId) -> Vec<u64> {
        let mut bad: Vec<u64> = dev
            .pt
            .lock()
            .keys()
            .copied()
            // Addresses no region holds any more were dropped with `region_removed`: not counted.
            .filter(|&va| space.page_state(va).is_some_and(|p| !p.dev_mapped.has(Proc::Device(id))))
            .collect();
        bad.sort_unstable();
        bad
    }

    /// munmap of one page while the device refuses unmaps: the error is reported (fine), but
    /// the pages of the cut block that live on stay mapped on the device (to device memory
    /// hetmm leaked on purpose, holding the old data) while hetmm records them as unmapped and
    /// holding nothing: the device keeps reading and writing memory nobody else sees, and no
    /// later unmap is ever tried.
    #[test]
    fn a_refused_unmap_during_munmap_stays_recorded() {
        let (space, dev, id) = on_device();
        dev.fail_unmap.store(true, SeqCst);
        let r = space.unmap_range(VaRange::new(S + 100 * PAGE_SIZE, PAGE_SIZE));
        dev.fail_unmap.store(false, SeqCst);
        assert!(r.is_err(), "the refusal is reported");
        let bad = mismatches(&space, &dev, id);
        assert!(
            bad.is_empty(),
            "{} pages still mapped by the device are recorded as unmapped, e.g. {:#x}: {:?}; device reads {:?}",
            bad.len(),
            bad[0],
            space.page_state(bad[0]),
            dev.access(bad[0], None)
        );
    }

    /// The same for mremap by a distance that is not a multiple of 2 MiB.
    #[test]
    fn a_refused_unmap_during_mremap_stays_recorded() {
        let (space, dev, id) = on_device();
        let to = S + 64 * BLOCK_SIZE + 3 * PAGE_SIZE;
        let from = S + 50 * PAGE_SIZE;
        let cpu = Arc::new(PlainCpu::new(VaRange::new(to - 50 * PAGE_SIZE, 2 * BLOCK_SIZE)));
        dev.fail_unmap.store(true, SeqCst);
        let r = space.remap_range(from, to, PAGE_SIZE, Some(cpu));
        dev.fail_unmap.store(false, SeqCst);
        assert!(r.is_err(), "the refusal is reported");
        let bad = mismatches(&space, &dev, id);
        assert!(
            bad.is_empty(),
            "{} pages still mapped by the device are recorded as unmapped, e.g. {:#x}: {:?}",
            bad.len(),
            bad[0],
            space.page_state(bad[0])
        );
    }
}
