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
use crate::types::{Proc, ProcMask, Prot, VaRange, PAGE_SIZE};

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

/// Device page-table protection for a region's protection.
pub(crate) fn device_prot(region: &Region) -> Prot {
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
    if region.remote {
        return crate::mirror::map_remote(space, region, blk, slot, want);
    }
    let me = Proc::Device(slot.id);
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
/// entry), else single pages; all or nothing.
fn try_alloc(slot: &DeviceSlot, n: usize) -> Option<Vec<PhysAddr>> {
    let mut a = slot.alloc.lock();
    if n == crate::types::PAGES_PER_BLOCK && !crate::mirror::take_injected_failure(slot) {
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
    let mut a = slot.alloc.lock();
    for i in m.iter() {
        if let Some(pa) = blk.pa(slot.id, i) {
            a.free(pa, 1);
            blk.set_pa(slot.id, i, None);
        }
    }
}

/// Unmaps `m` from `slot`'s page table and invalidates its TLB.
pub(crate) fn unmap_device(space: &AddressSpace, blk: &mut Block, slot: &DeviceSlot, m: &PageMask) -> Result<()> {
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
        for i in want.iter() {
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
