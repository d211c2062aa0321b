//! Migration mechanics for one block, called with the block's lock held: moving pages to a
//! device (allocate, revoke the CPU view, copy or zero-fill, map), back to the CPU (unmap,
//! invalidate, copy back, free), and dropping device copies. Policy does not live here: callers
//! decide which pages move where.
//!
//! Order of every migration (decision 3, "never divergent content"): first remove write access
//! everywhere but the source, then copy, then map the destination. A failed step leaves the
//! source as the valid copy.

use std::time::Instant;

use crate::block::{Block, CpuMap, PageMask};
use crate::device::{CopyOp, MapEntry, MapTarget, PhysAddr};
use crate::error::{CoreError, Result};
use crate::space::{AddressSpace, DeviceSlot, Region};
use crate::stats::{add, add_since};
use crate::types::{Proc, ProcMask, Prot, VaRange, PAGES_PER_BLOCK, PAGE_SIZE};

/// Ranges of virtual addresses covering the pages of `m` in `blk`.
pub(crate) fn ranges(blk: &Block, m: &PageMask) -> Vec<VaRange> {
    m.runs().into_iter().map(|(s, e)| VaRange::new(blk.va(s), (e - s) as u64 * PAGE_SIZE)).collect()
}

/// Runs of pages whose device pages are physically contiguous: `(first page, count, first pa)`.
fn pa_runs(blk: &Block, slot: &DeviceSlot, m: &PageMask) -> Vec<(usize, usize, PhysAddr)> {
    let mut out: Vec<(usize, usize, PhysAddr)> = Vec::new();
    for i in m.iter() {
        let Some(pa) = blk.pa(slot.id, i) else { continue };
        match out.last_mut() {
            Some((s, n, p)) if *s + *n == i && p.0 + *n as u64 * PAGE_SIZE == pa.0 => *n += 1,
            _ => out.push((i, 1, pa)),
        }
    }
    out
}

/// Whether `slot`'s device maps only whole 2 MiB blocks (no 4 KiB entries, as CUDA's VMM with
/// its 2 MiB granularity). For such a device a block is resident there whole or not at all:
/// moves to it and from it are widened to the whole block, and its pages come from one 2 MiB
/// physical chunk (a partial last block of a region keeps the rest of its chunk as slack).
pub(crate) fn whole_blocks(slot: &DeviceSlot) -> bool {
    slot.caps.page_sizes & PAGE_SIZE == 0
}

/// Device page-table protection for a region's protection.
fn device_prot(region: &Region) -> Prot {
    if region.prot.contains(Prot::WRITE) {
        Prot::RWA
    } else {
        Prot::READ
    }
}

/// Makes the pages `want` of `blk` resident on and mapped by `slot`'s device.
pub(crate) fn to_device(
    space: &AddressSpace,
    region: &Region,
    blk: &mut Block,
    slot: &DeviceSlot,
    want: &PageMask,
) -> Result<()> {
    let me = Proc::Device(slot.id);
    let whole = PageMask::full(blk.npages);
    let want = if whole_blocks(slot) { &whole } else { want };
    let resident_here = blk.resident_on(me);
    let need = want.and_not(&resident_here);

    // Data on another device goes through the host first (no peer copies yet).
    let mut on_other = PageMask::default();
    for i in need.iter() {
        let r = blk.pages[i].resident;
        if !r.has(Proc::Cpu) && !r.is_empty() {
            on_other.set(i);
        }
    }
    if !on_other.is_empty() {
        to_cpu(space, region, blk, &on_other)?;
    }

    if !need.is_empty() {
        let t = Instant::now();
        let pas = allocate(space, region, slot, blk, &need, want)?;
        add_since(&space.stats.ns_alloc, t);
        for (i, pa) in need.iter().zip(&pas) {
            blk.set_pa(slot.id, i, Some(*pa));
        }
        if let Err(e) = fill_device_pages(space, region, blk, slot, &need) {
            release_device_pages(slot, blk, &need);
            return Err(e);
        }
    }

    // Map everything wanted that the device does not map yet.
    let mut unmapped = PageMask::default();
    for i in want.iter() {
        if !blk.pages[i].dev_mapped.has(me) {
            unmapped.set(i);
        }
    }
    if !unmapped.is_empty() {
        let t = Instant::now();
        let prot = device_prot(region);
        let entries: Vec<MapEntry> = pa_runs(blk, slot, &unmapped)
            .into_iter()
            .map(|(s, n, pa)| MapEntry {
                va: blk.va(s),
                len: n as u64 * PAGE_SIZE,
                target: MapTarget::Device(pa),
                prot,
            })
            .collect();
        // SAFETY: every target is device memory; no host address is mapped.
        let r = unsafe { slot.mmu.map(&entries) };
        add_since(&space.stats.ns_map, t);
        if let Err(source) = r {
            // Pages just filled stay resident on the device (the data is valid there); they
            // are mapped on the next fault.
            return Err(CoreError::Device { device: slot.id, source });
        }
    }
    for i in want.iter() {
        let pg = &mut blk.pages[i];
        pg.resident = ProcMask::only(me);
        pg.dev_mapped.insert(me);
    }
    if !blk.queued_on.has(me) {
        blk.queued_on.insert(me);
        slot.evict_queue.lock().push_back((region.range.start, region.block_index(blk.base)));
    }
    Ok(())
}

/// Revokes the CPU view of `need` and copies (or zero-fills) their data into the device pages
/// already recorded in `blk`.
fn fill_device_pages(
    space: &AddressSpace,
    region: &Region,
    blk: &mut Block,
    slot: &DeviceSlot,
    need: &PageMask,
) -> Result<()> {
    let mut mapped = PageMask::default();
    for i in need.iter() {
        if blk.pages[i].cpu != CpuMap::None {
            mapped.set(i);
        }
    }
    if !mapped.is_empty() {
        let t = Instant::now();
        region.cpu.revoke(&ranges(blk, &mapped))?;
        add_since(&space.stats.ns_revoke, t);
        for i in mapped.iter() {
            blk.pages[i].cpu = CpuMap::None;
        }
    }
    let mut ops: Vec<CopyOp> = Vec::new();
    let (mut h2d, mut zero) = (0, 0);
    for (s, n, pa) in pa_runs(blk, slot, need) {
        // Split each physically contiguous run where the source kind changes.
        let mut i = s;
        while i < s + n {
            let from_cpu = blk.pages[i].resident.has(Proc::Cpu);
            let mut j = i + 1;
            while j < s + n && blk.pages[j].resident.has(Proc::Cpu) == from_cpu {
                j += 1;
            }
            let dst = PhysAddr(pa.0 + (i - s) as u64 * PAGE_SIZE);
            let len = (j - i) as u64 * PAGE_SIZE;
            if from_cpu {
                ops.push(CopyOp::HostToDevice { src: region.cpu.backing(blk.va(i)), dst, len });
                h2d += len;
            } else {
                ops.push(CopyOp::Zero { dst, len });
                zero += len;
            }
            i = j;
        }
    }
    run_copies(space, region, slot, &ops)?;
    add(&space.stats.bytes_to_device, h2d);
    add(&space.stats.bytes_zero_filled, zero);
    Ok(())
}

/// Submits copies and waits for them, bounded.
fn run_copies(space: &AddressSpace, region: &Region, slot: &DeviceSlot, ops: &[CopyOp]) -> Result<()> {
    if ops.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    // SAFETY: every host address comes from `region.cpu.backing()` for pages of this region,
    // whose mapping lives as long as `region`. We wait for the completion before returning; if
    // the wait fails (timeout), `keep_alive_forever` leaks the region's CPU side so the memory
    // a still-running copy touches is never unmapped.
    let mut done = unsafe { slot.mmu.copy(ops) }.map_err(|source| CoreError::Device { device: slot.id, source })?;
    let r = done.wait(space.config.copy_timeout);
    add_since(&space.stats.ns_copy, t);
    if let Err(source) = r {
        region.keep_alive_forever();
        std::mem::forget(done);
        return Err(CoreError::Device { device: slot.id, source });
    }
    Ok(())
}

/// Allocates one device page per page of `need`, evicting other blocks when memory is short, and
/// as a last resort this block's own device pages that are not in `want`.
fn allocate(
    space: &AddressSpace,
    region: &Region,
    slot: &DeviceSlot,
    blk: &mut Block,
    need: &PageMask,
    want: &PageMask,
) -> Result<Vec<PhysAddr>> {
    let n = need.count();
    loop {
        if let Some(pas) = try_alloc(slot, n) {
            return Ok(pas);
        }
        if crate::evict::evict_one(space, slot, blk.base)? {
            continue;
        }
        let spare = blk.resident_on(Proc::Device(slot.id)).and_not(want);
        if spare.is_empty() {
            return Err(CoreError::OutOfDeviceMemory { device: slot.id, bytes: n as u64 * PAGE_SIZE });
        }
        to_cpu(space, region, blk, &spare)?;
        add(&space.stats.evictions, 1);
        add(&space.stats.bytes_evicted, spare.count() as u64 * PAGE_SIZE);
    }
}

/// One allocation attempt: a 2 MiB chunk for a whole block (so the device can use a 2 MiB
/// entry), else single pages; all or nothing. A device without 4 KiB pages always gets a
/// chunk, of which the block uses the first `n` pages.
fn try_alloc(slot: &DeviceSlot, n: usize) -> Option<Vec<PhysAddr>> {
    let mut a = slot.alloc.lock();
    if whole_blocks(slot) {
        let base = a.alloc(crate::alloc::MAX_ORDER)?;
        return Some((0..n as u64).map(|k| PhysAddr(base.0 + k * PAGE_SIZE)).collect());
    }
    if n == crate::types::PAGES_PER_BLOCK {
        if let Some(base) = a.alloc(crate::alloc::MAX_ORDER) {
            return Some((0..n as u64).map(|k| PhysAddr(base.0 + k * PAGE_SIZE)).collect());
        }
    }
    if a.free_pages() < n as u64 {
        return None;
    }
    let out: Vec<PhysAddr> = (0..n).map_while(|_| a.alloc(0)).collect();
    if out.len() == n {
        return Some(out);
    }
    for p in out {
        a.free(p, 1);
    }
    None
}

/// Returns the device pages of `m` to the allocator and forgets them in `blk`.
fn release_device_pages(slot: &DeviceSlot, blk: &mut Block, m: &PageMask) {
    // A partial block on a whole-block device holds a whole chunk: find it before forgetting.
    let slack_chunk = (whole_blocks(slot) && blk.npages < PAGES_PER_BLOCK)
        .then(|| m.iter().find_map(|i| blk.pa(slot.id, i).map(|pa| pa.0 - i as u64 * PAGE_SIZE)))
        .flatten();
    let mut a = slot.alloc.lock();
    for i in m.iter() {
        if let Some(pa) = blk.pa(slot.id, i) {
            a.free(pa, 1);
            blk.set_pa(slot.id, i, None);
        }
    }
    if let Some(base) = slack_chunk {
        if (0..blk.npages).all(|i| blk.pa(slot.id, i).is_none()) {
            let tail = PhysAddr(base + blk.npages as u64 * PAGE_SIZE);
            a.free(tail, (PAGES_PER_BLOCK - blk.npages) as u64);
        }
    }
}

/// Unmaps `m` from `slot`'s page table and invalidates its TLB.
fn unmap_device(space: &AddressSpace, blk: &mut Block, slot: &DeviceSlot, m: &PageMask) -> Result<()> {
    let me = Proc::Device(slot.id);
    let mut mapped = PageMask::default();
    for i in m.iter() {
        if blk.pages[i].dev_mapped.has(me) {
            mapped.set(i);
        }
    }
    if mapped.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    let rs = ranges(blk, &mapped);
    slot.mmu.unmap(&rs).map_err(|source| CoreError::Device { device: slot.id, source })?;
    slot.mmu.invalidate_tlb(&rs);
    add_since(&space.stats.ns_map, t);
    for i in mapped.iter() {
        blk.pages[i].dev_mapped.remove(me);
    }
    Ok(())
}

/// Brings the pages `want` of `blk` back into host backing (the CPU becomes the only holder).
/// The CPU mapping is left to the caller.
pub(crate) fn to_cpu(space: &AddressSpace, region: &Region, blk: &mut Block, want: &PageMask) -> Result<()> {
    let mut devices = ProcMask::EMPTY;
    for i in want.iter() {
        devices.0 |= blk.pages[i].resident.0 & !1;
    }
    for d in devices.devices() {
        let slot = space.holder(d)?;
        let me = Proc::Device(d);
        let mut here = PageMask::default();
        let mut copy = PageMask::default();
        // A whole-block device gives up the whole block (it cannot unmap part of a 2 MiB entry).
        let whole = PageMask::full(blk.npages);
        let from = if whole_blocks(&slot) { &whole } else { want };
        for i in from.iter() {
            let r = blk.pages[i].resident;
            if r.has(me) {
                here.set(i);
                if !r.has(Proc::Cpu) {
                    copy.set(i);
                }
            }
        }
        unmap_device(space, blk, &slot, &here)?;
        let ops: Vec<CopyOp> = pa_runs(blk, &slot, &copy)
            .into_iter()
            .map(|(s, n, pa)| CopyOp::DeviceToHost {
                src: pa,
                dst: region.cpu.backing(blk.va(s)),
                len: n as u64 * PAGE_SIZE,
            })
            .collect();
        // On failure the device pages keep the data (unmapped; the next device fault remaps).
        run_copies(space, region, &slot, &ops)?;
        add(&space.stats.bytes_to_host, copy.count() as u64 * PAGE_SIZE);
        release_device_pages(&slot, blk, &here);
        for i in here.iter() {
            let pg = &mut blk.pages[i];
            pg.resident.remove(me);
            pg.resident.insert(Proc::Cpu);
        }
    }
    Ok(())
}

/// Drops every device copy in `blk` without copying (the memory is being freed or discarded).
pub(crate) fn drop_device_copies(space: &AddressSpace, blk: &mut Block) {
    let mut devices = ProcMask::EMPTY;
    for pg in &blk.pages {
        devices.0 |= (pg.resident.0 | pg.dev_mapped.0) & !1;
    }
    for d in devices.devices() {
        let Ok(slot) = space.holder(d) else { continue };
        let all = PageMask::full(blk.npages);
        if let Err(e) = unmap_device(space, blk, &slot, &all) {
            log::error!("unmapping freed memory from device {d:?}: {e}");
        }
        let here = blk.resident_on(Proc::Device(d));
        release_device_pages(&slot, blk, &here);
        for pg in blk.pages.iter_mut() {
            pg.resident.remove(Proc::Device(d));
            pg.dev_mapped.remove(Proc::Device(d));
        }
    }
}

#[cfg(test)]
mod whole_block_tests {
    //! The rule for devices without 4 KiB pages (CUDA's VMM maps 2 MiB at a time), with a fake
    //! device that refuses anything but whole 2 MiB chunks.

    use std::sync::Arc;
    use std::time::Duration;

    use parking_lot::Mutex;

    use crate::cpu::{CpuFaultHandler, CpuMmu, HostError};
    use crate::device::*;
    use crate::space::{AddressSpace, AttachOptions, CoreConfig};
    use crate::types::*;

    #[derive(Debug)]
    struct Cpu {
        range: VaRange,
    }

    impl CpuMmu for Cpu {
        fn range(&self) -> VaRange {
            self.range
        }
        fn revoke(&self, _: &[VaRange]) -> Result<(), HostError> {
            Ok(())
        }
        fn populate(&self, _: &[VaRange]) -> Result<(), HostError> {
            Ok(())
        }
        fn map(&self, _: &[VaRange], _: bool) -> Result<(), HostError> {
            Ok(())
        }
        fn wake(&self, _: VaRange) -> Result<(), HostError> {
            Ok(())
        }
        fn discard(&self, _: &[VaRange]) -> Result<(), HostError> {
            Ok(())
        }
        fn backing(&self, va: u64) -> HostAddr {
            HostAddr((va - self.range.start) as usize)
        }
    }

    /// Accepts only entries that start on a 2 MiB boundary of both VA and physical memory and
    /// cover 2 MiB (or end at the region's end); records what it was asked.
    #[derive(Debug)]
    struct Dev {
        region_end: u64,
        mem: Mutex<Vec<u8>>,
        host: Arc<Mutex<Vec<u8>>>,
        maps: Mutex<Vec<MapEntry>>,
        unmaps: Mutex<Vec<VaRange>>,
        /// Region hook calls: (added?, range).
        hooks: Mutex<Vec<(bool, VaRange)>>,
    }

    impl Dev {
        fn check(&self, va: u64, len: u64) -> Result<(), DeviceError> {
            let end_ok = len % BLOCK_SIZE == 0 || va + len == self.region_end;
            if va % BLOCK_SIZE != 0 || !end_ok || len > BLOCK_SIZE {
                return Err(DeviceError::BadRange(VaRange::new(va, len)));
            }
            Ok(())
        }
    }

    impl DeviceMmu for Dev {
        fn caps(&self) -> DeviceCaps {
            DeviceCaps {
                name: "whole-block".into(),
                page_sizes: BLOCK_SIZE,
                replayable_faults: false,
                coherent: false,
                remote_host_access: false,
                memory_bytes: self.mem.lock().len() as u64,
            }
        }
        fn physical_ranges(&self) -> Vec<(PhysAddr, u64)> {
            vec![(PhysAddr(0), self.mem.lock().len() as u64)]
        }
        fn create_page_table(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn destroy_page_table(&self) {}
        unsafe fn map(&self, entries: &[MapEntry]) -> Result<(), DeviceError> {
            for e in entries {
                self.check(e.va, e.len)?;
                match e.target {
                    MapTarget::Device(pa) if pa.0 % BLOCK_SIZE == 0 => {}
                    _ => return Err(DeviceError::BadPhysical { addr: 0, len: e.len }),
                }
            }
            self.maps.lock().extend_from_slice(entries);
            Ok(())
        }
        fn unmap(&self, ranges: &[VaRange]) -> Result<(), DeviceError> {
            for r in ranges {
                self.check(r.start, r.len)?;
            }
            self.unmaps.lock().extend_from_slice(ranges);
            Ok(())
        }
        fn protect(&self, _: &[(VaRange, Prot)]) -> Result<(), DeviceError> {
            Ok(())
        }
        fn invalidate_tlb(&self, _: &[VaRange]) {}
        unsafe fn copy(&self, ops: &[CopyOp]) -> Result<Box<dyn Completion>, DeviceError> {
            let (mut mem, mut host) = (self.mem.lock(), self.host.lock());
            for op in ops {
                match *op {
                    CopyOp::HostToDevice { src, dst, len } => {
                        let (s, d, l) = (src.0, dst.0 as usize, len as usize);
                        mem[d..d + l].copy_from_slice(&host[s..s + l]);
                    }
                    CopyOp::DeviceToHost { src, dst, len } => {
                        let (s, d, l) = (src.0 as usize, dst.0, len as usize);
                        host[d..d + l].copy_from_slice(&mem[s..s + l]);
                    }
                    CopyOp::Zero { dst, len } => mem[dst.0 as usize..(dst.0 + len) as usize].fill(0),
                    CopyOp::DeviceToDevice { .. } => unreachable!("no peer copies"),
                }
            }
            Ok(Box::new(Done))
        }
        fn fetch_faults(&self, _: usize, _: &mut Vec<DeviceFault>) -> usize {
            0
        }
        fn wait_for_faults(&self, t: Duration) -> bool {
            std::thread::sleep(t.min(Duration::from_millis(1)));
            false
        }
        fn replay(&self, _: &[(u64, FaultCancel)]) {}
        fn shutdown_faults(&self) {}
        fn region_added(&self, app: VaRange, backing: HostAddr) -> Result<(), DeviceError> {
            if app.len == PAGE_SIZE {
                return Err(DeviceError::Other("refused".into()));
            }
            assert_eq!(backing, HostAddr(0));
            self.hooks.lock().push((true, app));
            Ok(())
        }
        fn region_removed(&self, app: VaRange) {
            self.hooks.lock().push((false, app));
        }
    }

    const BASE: u64 = 0x4000_0000;

    /// A region of two whole blocks and a partial third one (3 pages); a device of `chunks`.
    type World = (Arc<AddressSpace>, Arc<Dev>, DeviceId, Arc<Mutex<Vec<u8>>>);

    fn setup(chunks: u64) -> World {
        let len = 2 * BLOCK_SIZE + 3 * PAGE_SIZE;
        let host = Arc::new(Mutex::new((0..len).map(|i| (i / PAGE_SIZE) as u8 ^ 0x5a).collect::<Vec<u8>>()));
        let space = AddressSpace::new(CoreConfig::default());
        let cpu = Arc::new(Cpu { range: VaRange::new(BASE, len) });
        space.add_region(cpu, Prot::READ | Prot::WRITE).unwrap();
        // The CPU wrote every page (one fault per block with the default 2 MiB fault-around).
        for b in 0..3 {
            space.cpu_fault(BASE + b * BLOCK_SIZE, Access::Write).unwrap();
        }
        let dev = Arc::new(Dev {
            region_end: BASE + len,
            mem: Mutex::new(vec![0; (chunks * BLOCK_SIZE) as usize]),
            host: Arc::clone(&host),
            maps: Mutex::new(Vec::new()),
            unmaps: Mutex::new(Vec::new()),
            hooks: Mutex::new(Vec::new()),
        });
        let id = space.attach(Arc::clone(&dev) as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
        (space, dev, id, host)
    }

    fn resident_on_dev(space: &AddressSpace, id: DeviceId, va: u64) -> bool {
        space.page_state(va).unwrap().resident == ProcMask::only(Proc::Device(id))
    }

    #[test]
    fn one_page_moves_its_whole_block_both_ways() {
        let (space, dev, id, host) = setup(4);
        space.migrate(BASE + 7 * PAGE_SIZE, PAGE_SIZE, Proc::Device(id)).unwrap();
        assert!((0..PAGES_PER_BLOCK as u64).all(|p| resident_on_dev(&space, id, BASE + p * PAGE_SIZE)));
        assert!(!resident_on_dev(&space, id, BASE + BLOCK_SIZE));
        assert_eq!(dev.maps.lock().len(), 1);
        assert_eq!(dev.maps.lock()[0].va, BASE);
        assert_eq!(dev.maps.lock()[0].len, BLOCK_SIZE);
        assert_eq!(space.device_memory(id).unwrap().0, 3 * BLOCK_SIZE);

        // The host copy is stale now; bringing back one page brings back all 512.
        host.lock()[..BLOCK_SIZE as usize].fill(0);
        space.migrate(BASE + 100 * PAGE_SIZE, PAGE_SIZE, Proc::Cpu).unwrap();
        assert_eq!(*dev.unmaps.lock(), vec![VaRange::new(BASE, BLOCK_SIZE)]);
        let h = host.lock();
        assert!((0..BLOCK_SIZE).all(|i| h[i as usize] == (i / PAGE_SIZE) as u8 ^ 0x5a));
        drop(h);
        assert!(space.page_state(BASE).unwrap().resident.has(Proc::Cpu));
        assert_eq!(space.device_memory(id).unwrap().0, 4 * BLOCK_SIZE);
    }

    #[test]
    fn partial_last_block_takes_a_whole_chunk_and_gives_it_back() {
        let (space, dev, id, host) = setup(4);
        let tail = BASE + 2 * BLOCK_SIZE;
        space.migrate(tail + PAGE_SIZE, PAGE_SIZE, Proc::Device(id)).unwrap();
        assert!((0..3).all(|p| resident_on_dev(&space, id, tail + p * PAGE_SIZE)));
        let e = dev.maps.lock()[0];
        assert_eq!((e.va, e.len), (tail, 3 * PAGE_SIZE));
        assert!(matches!(e.target, MapTarget::Device(pa) if pa.0 % BLOCK_SIZE == 0));
        // The rest of the chunk is slack, not handed to anyone else.
        assert_eq!(space.device_memory(id).unwrap().0, 3 * BLOCK_SIZE);
        host.lock()[(2 * BLOCK_SIZE) as usize..].fill(0);
        space.migrate(tail, PAGE_SIZE, Proc::Cpu).unwrap();
        assert_eq!(*dev.unmaps.lock(), vec![VaRange::new(tail, 3 * PAGE_SIZE)]);
        let off = 2 * BLOCK_SIZE + 2 * PAGE_SIZE;
        assert_eq!(host.lock()[off as usize], (off / PAGE_SIZE) as u8 ^ 0x5a);
        assert_eq!(space.device_memory(id).unwrap().0, 4 * BLOCK_SIZE);
    }

    #[test]
    fn eviction_moves_whole_blocks_and_keeps_data() {
        let (space, dev, id, host) = setup(2);
        let len = 2 * BLOCK_SIZE + 3 * PAGE_SIZE;
        space.migrate(BASE, BLOCK_SIZE, Proc::Device(id)).unwrap();
        space.migrate(BASE + BLOCK_SIZE, PAGE_SIZE, Proc::Device(id)).unwrap();
        // A third block needs a chunk: the first block (FIFO) goes back whole.
        space.migrate(BASE + 2 * BLOCK_SIZE, PAGE_SIZE, Proc::Device(id)).unwrap();
        assert!(dev.unmaps.lock().iter().all(|r| r.start % BLOCK_SIZE == 0));
        assert!(space.page_state(BASE).unwrap().resident.has(Proc::Cpu));
        space.migrate(BASE, len, Proc::Cpu).unwrap();
        let h = host.lock();
        assert!((0..len).all(|i| h[i as usize] == (i / PAGE_SIZE) as u8 ^ 0x5a));
        drop(h);
        assert_eq!(space.device_memory(id).unwrap().0, 2 * BLOCK_SIZE);
    }

    #[test]
    fn devices_hear_of_every_region_once() {
        let (space, dev, id, _host) = setup(2);
        let first = VaRange::new(BASE, 2 * BLOCK_SIZE + 3 * PAGE_SIZE);
        // Attached after the region existed: told at attach.
        assert_eq!(*dev.hooks.lock(), vec![(true, first)]);
        let second = VaRange::new(BASE + 4 * BLOCK_SIZE, BLOCK_SIZE);
        space.add_region(Arc::new(Cpu { range: second }), Prot::READ).unwrap();
        // A device refusing a region refuses it for the address space.
        let refused = VaRange::new(BASE + 8 * BLOCK_SIZE, PAGE_SIZE);
        let e = space.add_region(Arc::new(Cpu { range: refused }), Prot::READ).unwrap_err();
        assert!(matches!(e, crate::error::CoreError::Device { .. }), "{e}");
        assert!(space.check_range(refused.start, PAGE_SIZE).is_err());
        space.remove_region(second.start).unwrap();
        space.detach(id).unwrap();
        assert_eq!(*dev.hooks.lock(), vec![(true, first), (true, second), (false, second), (false, first)]);
    }
}
