//! Migration mechanics for one block, called with the block's lock held. Every change of a
//! page's residency or mapping happens here:
//! - [`to_device`]: the device becomes the only holder (exclusive, read-write);
//! - [`duplicate_to_device`]: the device gets a read-only copy beside the others;
//! - [`map_remote`]: the data stays in host memory and the device maps it remotely;
//! - [`to_cpu`]: the CPU becomes the only holder; [`cpu_duplicate`]: the CPU gets a read-only copy;
//! - [`drop_device_copies`] / [`discard`]: the data is gone (memory freed or discarded).
//!
//! Order of every migration (decision 3, "never divergent content"): first remove write access
//! everywhere but the source, then copy, then map the destination. Copies exist side by side
//! only while nobody can write them. A failed step leaves the source as the valid copy.

use std::time::Instant;

use crate::block::{Block, CpuMap, PageMask};
use crate::device::{CopyOp, MapEntry, MapTarget, PhysAddr};
use crate::error::{CoreError, Result};
use crate::space::{AddressSpace, DeviceSlot, Region};
use crate::stats::{add, add_since};
use crate::types::{DeviceId, Proc, ProcMask, Prot, VaRange, PAGE_SIZE};

/// Ranges of virtual addresses covering the pages of `m` in `blk`.
pub(crate) fn ranges(blk: &Block, m: &PageMask) -> Vec<VaRange> {
    m.runs().into_iter().map(|(s, e)| VaRange::new(blk.va(s), (e - s) as u64 * PAGE_SIZE)).collect()
}

/// Pages of `m` whose state satisfies `f`.
fn select(blk: &Block, m: &PageMask, f: impl Fn(&crate::block::Page) -> bool) -> PageMask {
    let mut out = PageMask::default();
    for i in m.iter() {
        if f(&blk.pages[i]) {
            out.set(i);
        }
    }
    out
}

/// Runs of pages whose device pages are physically contiguous: `(first page, count, first pa)`.
fn pa_runs(blk: &Block, id: DeviceId, m: &PageMask) -> Vec<(usize, usize, PhysAddr)> {
    let mut out: Vec<(usize, usize, PhysAddr)> = Vec::new();
    for i in m.iter() {
        let Some(pa) = blk.pa(id, i) else { continue };
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

fn dev_err(d: DeviceId) -> impl FnOnce(crate::device::DeviceError) -> CoreError {
    move |source| CoreError::Device { device: d, source }
}

/// Unmaps the pages of `m` that `slot` maps, and invalidates its TLB.
pub(crate) fn unmap_on(space: &AddressSpace, blk: &mut Block, slot: &DeviceSlot, m: &PageMask) -> Result<()> {
    let me = Proc::Device(slot.id);
    let mapped = select(blk, m, |p| p.dev_mapped.has(me));
    if mapped.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    let rs = ranges(blk, &mapped);
    slot.mmu.unmap(&rs).map_err(dev_err(slot.id))?;
    slot.mmu.invalidate_tlb(&rs);
    add_since(&space.stats.ns_map, t);
    for i in mapped.iter() {
        blk.pages[i].dev_mapped.remove(me);
        blk.pages[i].dev_ro.remove(me);
    }
    Ok(())
}

/// Unmaps `m` from every device except `keep`.
fn unmap_others(space: &AddressSpace, blk: &mut Block, m: &PageMask, keep: Option<DeviceId>) -> Result<()> {
    let mut devs = ProcMask::EMPTY;
    for i in m.iter() {
        devs.0 |= blk.pages[i].dev_mapped.0;
    }
    for d in devs.devices().filter(|d| Some(*d) != keep) {
        let slot = space.holder(d)?;
        unmap_on(space, blk, &slot, m)?;
    }
    Ok(())
}

/// Makes every device mapping of `m` read-only (before a copy appears beside it).
fn downgrade_devices(space: &AddressSpace, blk: &mut Block, m: &PageMask) -> Result<()> {
    let mut devs = ProcMask::EMPTY;
    for i in m.iter() {
        let p = &blk.pages[i];
        devs.0 |= p.dev_mapped.0 & !p.dev_ro.0;
    }
    for d in devs.devices() {
        let slot = space.holder(d)?;
        let me = Proc::Device(d);
        let rw = select(blk, m, |p| p.dev_mapped.has(me) && !p.dev_ro.has(me));
        let rs = ranges(blk, &rw);
        let prot: Vec<(VaRange, Prot)> = rs.iter().map(|r| (*r, Prot::READ)).collect();
        slot.mmu.protect(&prot).map_err(dev_err(d))?;
        slot.mmu.invalidate_tlb(&rs);
        for i in rw.iter() {
            blk.pages[i].dev_ro.insert(me);
        }
    }
    Ok(())
}

/// Removes the CPU's mappings of `m`.
fn revoke_cpu(space: &AddressSpace, region: &Region, blk: &mut Block, m: &PageMask) -> Result<()> {
    let mapped = select(blk, m, |p| p.cpu != CpuMap::None);
    if mapped.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    region.cpu.revoke(&ranges(blk, &mapped))?;
    add_since(&space.stats.ns_revoke, t);
    for i in mapped.iter() {
        blk.pages[i].cpu = CpuMap::None;
    }
    Ok(())
}

/// Write-protects the CPU's read-write mappings of `m`.
fn write_protect_cpu(space: &AddressSpace, region: &Region, blk: &mut Block, m: &PageMask) -> Result<()> {
    let rw = select(blk, m, |p| p.cpu == CpuMap::Write);
    if rw.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    region.cpu.protect(&ranges(blk, &rw), false)?;
    add_since(&space.stats.ns_revoke, t);
    for i in rw.iter() {
        blk.pages[i].cpu = CpuMap::Read;
    }
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
    let mut done = unsafe { slot.mmu.copy(ops) }.map_err(dev_err(slot.id))?;
    let r = done.wait(space.config.copy_timeout);
    add_since(&space.stats.ns_copy, t);
    if let Err(source) = r {
        region.keep_alive_forever();
        std::mem::forget(done);
        return Err(CoreError::Device { device: slot.id, source });
    }
    Ok(())
}

/// Allocates device pages for `need` and fills them from the CPU's copy (or zeros where the page
/// was never written). The CPU's mappings must already be revoked or write-protected.
fn fill(
    space: &AddressSpace,
    region: &Region,
    blk: &mut Block,
    slot: &DeviceSlot,
    need: &PageMask,
    want: &PageMask,
) -> Result<()> {
    if need.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    let pas = allocate(space, region, slot, blk, need, want)?;
    add_since(&space.stats.ns_alloc, t);
    for (i, pa) in need.iter().zip(&pas) {
        blk.set_pa(slot.id, i, Some(*pa));
    }
    let mut ops: Vec<CopyOp> = Vec::new();
    let (mut h2d, mut zero) = (0, 0);
    for (s, n, pa) in pa_runs(blk, slot.id, need) {
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
    if let Err(e) = run_copies(space, region, slot, &ops) {
        release_device_pages(slot, blk, need);
        return Err(e);
    }
    add(&space.stats.bytes_to_device, h2d);
    add(&space.stats.bytes_zero_filled, zero);
    Ok(())
}

/// Maps the pages of `m` to their copies on `slot` with `prot` (replacing any mapping there).
fn map_local(space: &AddressSpace, blk: &mut Block, slot: &DeviceSlot, m: &PageMask, prot: Prot) -> Result<()> {
    if m.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    let entries: Vec<MapEntry> = pa_runs(blk, slot.id, m)
        .into_iter()
        .map(|(s, n, pa)| MapEntry { va: blk.va(s), len: n as u64 * PAGE_SIZE, target: MapTarget::Device(pa), prot })
        .collect();
    // SAFETY: every target is device memory; no host address is mapped.
    let r = unsafe { slot.mmu.map(&entries) };
    add_since(&space.stats.ns_map, t);
    r.map_err(dev_err(slot.id))?;
    let me = Proc::Device(slot.id);
    for i in m.iter() {
        let p = &mut blk.pages[i];
        p.dev_mapped.insert(me);
        if prot.contains(Prot::WRITE) {
            p.dev_ro.remove(me);
        } else {
            p.dev_ro.insert(me);
        }
    }
    Ok(())
}

/// Puts the block on the device's eviction queue once.
fn enqueue(region: &Region, blk: &mut Block, slot: &DeviceSlot) {
    let me = Proc::Device(slot.id);
    if !blk.queued_on.has(me) {
        blk.queued_on.insert(me);
        slot.evict_queue.lock().push_back((region.range.start, region.block_index(blk.base)));
    }
}

/// Pages of `want` whose only copies are on devices other than `me`.
fn only_elsewhere(blk: &Block, want: &PageMask, me: Proc) -> PageMask {
    select(blk, want, |p| !p.resident.has(Proc::Cpu) && !p.resident.has(me) && !p.resident.is_empty())
}

/// Makes `slot`'s device the only holder of `want`, mapped read-write.
pub(crate) fn to_device(
    space: &AddressSpace,
    region: &Region,
    blk: &mut Block,
    slot: &DeviceSlot,
    want: &PageMask,
) -> Result<()> {
    if region.remote {
        return map_remote(space, region, blk, slot, want);
    }
    let me = Proc::Device(slot.id);
    // Data held only by another device goes through the host (no peer copies yet).
    to_cpu(space, region, blk, &only_elsewhere(blk, want, me))?;
    // Nobody else may access the pages from here on: other devices (copies or remote maps), our
    // own remote maps, the CPU.
    unmap_others(space, blk, want, Some(slot.id))?;
    let own_remote = select(blk, want, |p| p.dev_mapped.has(me) && !p.resident.has(me));
    unmap_on(space, blk, slot, &own_remote)?;
    drop_other_device_copies(space, blk, want, slot.id)?;
    revoke_cpu(space, region, blk, want)?;
    let need = select(blk, want, |p| !p.resident.has(me));
    fill(space, region, blk, slot, &need, want)?;
    let remap = select(blk, want, |p| !p.dev_mapped.has(me) || p.dev_ro.has(me));
    map_local(space, blk, slot, &remap, device_prot(region))?;
    for i in want.iter() {
        blk.pages[i].resident = ProcMask::only(me);
    }
    enqueue(region, blk, slot);
    Ok(())
}

/// Frees the copies other devices hold of `m` (their mappings are already gone).
fn drop_other_device_copies(space: &AddressSpace, blk: &mut Block, m: &PageMask, keep: DeviceId) -> Result<()> {
    let mut devs = ProcMask::EMPTY;
    for i in m.iter() {
        devs.0 |= blk.pages[i].resident.0 & !1;
    }
    for d in devs.devices().filter(|d| *d != keep) {
        let slot = space.holder(d)?;
        let here = select(blk, m, |p| p.resident.has(Proc::Device(d)));
        release_device_pages(&slot, blk, &here);
        for i in here.iter() {
            blk.pages[i].resident.remove(Proc::Device(d));
        }
    }
    Ok(())
}

/// Gives `slot`'s device a read-only copy of `want` beside the copies that exist (read
/// duplication). Every holder keeps read-only access until a write collapses the copies.
pub(crate) fn duplicate_to_device(
    space: &AddressSpace,
    region: &Region,
    blk: &mut Block,
    slot: &DeviceSlot,
    want: &PageMask,
) -> Result<()> {
    if region.remote {
        return map_remote(space, region, blk, slot, want);
    }
    let me = Proc::Device(slot.id);
    // The source of a copy is the CPU's: bring data held only by other devices into host backing,
    // keeping their copies.
    cpu_duplicate(space, region, blk, &only_elsewhere(blk, want, me))?;
    let empty = select(blk, want, |p| p.resident.is_empty());
    populate(space, region, blk, &empty)?;
    write_protect_cpu(space, region, blk, want)?;
    downgrade_devices(space, blk, want)?;
    let own_remote = select(blk, want, |p| p.dev_mapped.has(me) && !p.resident.has(me));
    unmap_on(space, blk, slot, &own_remote)?;
    let need = select(blk, want, |p| !p.resident.has(me));
    fill(space, region, blk, slot, &need, want)?;
    let unmapped = select(blk, want, |p| !p.dev_mapped.has(me));
    map_local(space, blk, slot, &unmapped, Prot::READ)?;
    for i in want.iter() {
        blk.pages[i].resident.insert(me);
    }
    enqueue(region, blk, slot);
    Ok(())
}

/// Makes sure host backing exists for pages never written (zeros), so the CPU holds them.
pub(crate) fn populate(_space: &AddressSpace, region: &Region, blk: &mut Block, m: &PageMask) -> Result<()> {
    if m.is_empty() {
        return Ok(());
    }
    region.cpu.populate(&ranges(blk, m))?;
    for i in m.iter() {
        blk.pages[i].resident.insert(Proc::Cpu);
    }
    Ok(())
}

/// Keeps the data of `want` in host memory and maps it remotely on `slot`'s device (zero-copy):
/// read-write where the host copy is the only one, read-only where copies exist elsewhere.
pub(crate) fn map_remote(
    space: &AddressSpace,
    region: &Region,
    blk: &mut Block,
    slot: &DeviceSlot,
    want: &PageMask,
) -> Result<()> {
    let me = Proc::Device(slot.id);
    to_cpu(space, region, blk, &only_elsewhere(blk, want, me))?;
    let empty = select(blk, want, |p| p.resident.is_empty());
    populate(space, region, blk, &empty)?;
    // Pages the device holds itself stay mapped to its own copy.
    let remote = select(blk, want, |p| !p.resident.has(me));
    let t = Instant::now();
    let full = device_prot(region);
    let mut entries = Vec::new();
    let mut ro = PageMask::default();
    for (s, e) in remote.runs() {
        let mut i = s;
        while i < e {
            let shared = blk.pages[i].resident.0 & !1 != 0;
            let mut j = i + 1;
            while j < e && (blk.pages[j].resident.0 & !1 != 0) == shared {
                j += 1;
            }
            let prot = if shared { Prot::READ } else { full };
            if !prot.contains(Prot::WRITE) {
                ro.set_range(i, j);
            }
            entries.push(MapEntry {
                va: blk.va(i),
                len: (j - i) as u64 * PAGE_SIZE,
                target: MapTarget::Host(region.cpu.backing(blk.va(i))),
                prot,
            });
            i = j;
        }
    }
    // SAFETY: the host addresses come from `region.cpu.backing()` for pages of this region; they
    // stay mapped as long as the region's CPU side lives, and every remote mapping is removed
    // (unmap + TLB invalidation) before that side is released: `drop_device_copies` runs on
    // region removal and data leaving the host goes through `unmap_others`.
    let r = unsafe { slot.mmu.map(&entries) };
    add_since(&space.stats.ns_map, t);
    r.map_err(dev_err(slot.id))?;
    for i in remote.iter() {
        let p = &mut blk.pages[i];
        p.dev_mapped.insert(me);
        if ro.get(i) || !full.contains(Prot::WRITE) {
            p.dev_ro.insert(me);
        } else {
            p.dev_ro.remove(me);
        }
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
            if space.config.policy.free_watermark > 0.0 {
                slot.evict_wake.notify_one();
            }
            return Ok(pas);
        }
        let evicted = crate::evict::evict_one(space, slot, blk.base)?;
        if evicted == crate::evict::Evicted::Freed {
            continue;
        }
        let spare = blk.resident_on(Proc::Device(slot.id)).and_not(want).and_not(&blk.busy);
        if spare.is_empty() {
            let bytes = n as u64 * PAGE_SIZE;
            return Err(if evicted == crate::evict::Evicted::Busy {
                CoreError::DeviceMemoryBusy { device: slot.id, bytes }
            } else {
                CoreError::OutOfDeviceMemory { device: slot.id, bytes }
            });
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

/// Copies device-only pages of `m` into host backing from one holder each, without unmapping
/// them: the CPU gets a copy beside the device's (read duplication). Device mappings become
/// read-only.
pub(crate) fn cpu_duplicate(space: &AddressSpace, region: &Region, blk: &mut Block, m: &PageMask) -> Result<()> {
    if m.is_empty() {
        return Ok(());
    }
    downgrade_devices(space, blk, m)?;
    let mut devs = ProcMask::EMPTY;
    for i in m.iter() {
        devs.0 |= blk.pages[i].resident.0 & !1;
    }
    for d in devs.devices() {
        let slot = space.holder(d)?;
        let copy = select(blk, m, |p| p.resident.has(Proc::Device(d)) && !p.resident.has(Proc::Cpu));
        copy_back(space, region, blk, &slot, &copy)?;
        for i in copy.iter() {
            blk.pages[i].resident.insert(Proc::Cpu);
        }
    }
    Ok(())
}

/// D2H copies of `m` from `slot`'s copies into host backing.
fn copy_back(space: &AddressSpace, region: &Region, blk: &Block, slot: &DeviceSlot, m: &PageMask) -> Result<()> {
    if m.is_empty() {
        return Ok(());
    }
    let ops: Vec<CopyOp> = pa_runs(blk, slot.id, m)
        .into_iter()
        .map(|(s, n, pa)| CopyOp::DeviceToHost {
            src: pa,
            dst: region.cpu.backing(blk.va(s)),
            len: n as u64 * PAGE_SIZE,
        })
        .collect();
    run_copies(space, region, slot, &ops)?;
    add(&space.stats.bytes_to_host, m.count() as u64 * PAGE_SIZE);
    Ok(())
}

/// Brings the pages `want` of `blk` back into host backing: the CPU becomes the only holder.
/// Devices' copies are unmapped and freed (remote mappings of the host page stay valid). The CPU
/// mapping is left to the caller.
pub(crate) fn to_cpu(space: &AddressSpace, region: &Region, blk: &mut Block, want: &PageMask) -> Result<()> {
    let mut devices = ProcMask::EMPTY;
    for i in want.iter() {
        devices.0 |= blk.pages[i].resident.0 & !1;
    }
    for d in devices.devices() {
        let slot = space.holder(d)?;
        let me = Proc::Device(d);
        let here = select(blk, want, |p| p.resident.has(me));
        let copy = select(blk, &here, |p| !p.resident.has(Proc::Cpu));
        unmap_on(space, blk, &slot, &here)?;
        // On failure the device pages keep the data (unmapped; the next device fault remaps).
        copy_back(space, region, blk, &slot, &copy)?;
        release_device_pages(&slot, blk, &here);
        for i in here.iter() {
            let pg = &mut blk.pages[i];
            pg.resident.remove(me);
            pg.resident.insert(Proc::Cpu);
        }
    }
    Ok(())
}

/// Drops every device mapping and copy in `m` without copying (the data is being freed or
/// discarded).
pub(crate) fn drop_device_copies(space: &AddressSpace, blk: &mut Block, m: &PageMask) {
    let mut devices = ProcMask::EMPTY;
    for i in m.iter() {
        let pg = &blk.pages[i];
        devices.0 |= (pg.resident.0 | pg.dev_mapped.0) & !1;
    }
    for d in devices.devices() {
        let Ok(slot) = space.holder(d) else { continue };
        if let Err(e) = unmap_on(space, blk, &slot, m) {
            log::error!("unmapping dropped memory from device {d:?}: {e}");
        }
        let here = select(blk, m, |p| p.resident.has(Proc::Device(d)));
        release_device_pages(&slot, blk, &here);
        for i in m.iter() {
            blk.pages[i].resident.remove(Proc::Device(d));
        }
    }
}

/// Drops the data of `m` everywhere: the next touch reads zeros.
pub(crate) fn discard(space: &AddressSpace, region: &Region, blk: &mut Block, m: &PageMask) -> Result<()> {
    drop_device_copies(space, blk, m);
    region.cpu.discard(&ranges(blk, m))?;
    for i in m.iter() {
        blk.pages[i] = crate::block::Page::default();
    }
    Ok(())
}

/// Moves whole blocks to `slot`'s device in one go: one CPU revoke (or write-protect) call, one
/// backing preparation, one batch of copies and one page-table update for all of them, instead
/// of one round of each per block. Only pages that are plain (held by the CPU alone or never
/// written, not mapped by any device) are taken; the others are left to the fault path. No
/// eviction: blocks that do not fit are skipped. `dup`: CPU-held pages become read-only copies
/// (the CPU keeps read access) instead of moving. Returns the pages moved.
pub(crate) fn bulk_to_device(
    space: &AddressSpace,
    region: &Region,
    blocks: &mut [&mut Block],
    slot: &DeviceSlot,
    dup: bool,
) -> Result<u64> {
    if region.remote {
        // Mirrored memory never moves: the fault path maps it remotely.
        return Ok(0);
    }
    let me = Proc::Device(slot.id);
    // Choose pages and allocate, block by block, until memory runs out.
    let mut chosen: Vec<PageMask> = Vec::new();
    for blk in blocks.iter_mut() {
        let sel = select(blk, &PageMask::full(blk.npages), |p| {
            (p.resident.is_empty() || p.resident == ProcMask::only(Proc::Cpu)) && p.dev_mapped.is_empty()
        });
        let Some(pas) = try_alloc(slot, sel.count()) else { break };
        for (i, pa) in sel.iter().zip(&pas) {
            blk.set_pa(slot.id, i, Some(*pa));
        }
        chosen.push(sel);
    }
    let blocks = &mut blocks[..chosen.len()];
    if blocks.is_empty() {
        return Ok(0);
    }
    let result = bulk_fill_and_map(space, region, blocks, &chosen, slot, dup);
    if let Err(e) = result {
        for (blk, sel) in blocks.iter_mut().zip(&chosen) {
            release_device_pages(slot, blk, sel);
        }
        return Err(e);
    }
    let mut moved = 0;
    for (blk, sel) in blocks.iter_mut().zip(&chosen) {
        for i in sel.iter() {
            let p = &mut blk.pages[i];
            if dup && p.resident.has(Proc::Cpu) {
                p.resident.insert(me);
                p.dev_ro.insert(me);
            } else {
                p.resident = ProcMask::only(me);
            }
            p.dev_mapped.insert(me);
        }
        moved += sel.count() as u64;
        enqueue(region, blk, slot);
    }
    Ok(moved)
}

fn bulk_fill_and_map(
    space: &AddressSpace,
    region: &Region,
    blocks: &mut [&mut Block],
    chosen: &[PageMask],
    slot: &DeviceSlot,
    dup: bool,
) -> Result<()> {
    // CPU access: write-protect what stays duplicated, revoke what moves; one call each.
    let (mut wp, mut revoke) = (Vec::new(), Vec::new());
    for (blk, sel) in blocks.iter().zip(chosen) {
        for i in sel.iter() {
            let p = &blk.pages[i];
            match p.cpu {
                CpuMap::None => {}
                CpuMap::Read if dup && p.resident.has(Proc::Cpu) => {}
                CpuMap::Write if dup && p.resident.has(Proc::Cpu) => wp.push(VaRange::new(blk.va(i), PAGE_SIZE)),
                _ => revoke.push(VaRange::new(blk.va(i), PAGE_SIZE)),
            }
        }
    }
    let t = Instant::now();
    region.cpu.revoke(&coalesce(revoke))?;
    region.cpu.protect(&coalesce(wp), false)?;
    add_since(&space.stats.ns_revoke, t);
    let (mut ops, mut entries) = (Vec::new(), Vec::new());
    let (mut h2d, mut zero) = (0, 0);
    let prot = device_prot(region);
    for (blk, sel) in blocks.iter_mut().zip(chosen) {
        for i in sel.iter() {
            let p = &mut blk.pages[i];
            if p.cpu != CpuMap::None && !(dup && p.resident.has(Proc::Cpu)) {
                p.cpu = CpuMap::None;
            } else if p.cpu == CpuMap::Write {
                p.cpu = CpuMap::Read;
            }
        }
        for (s, n, pa) in pa_runs(blk, slot.id, sel) {
            for k in s..s + n {
                let dst = PhysAddr(pa.0 + (k - s) as u64 * PAGE_SIZE);
                if blk.pages[k].resident.has(Proc::Cpu) {
                    push_op(&mut ops, CopyOp::HostToDevice { src: region.cpu.backing(blk.va(k)), dst, len: PAGE_SIZE });
                    h2d += PAGE_SIZE;
                } else {
                    push_op(&mut ops, CopyOp::Zero { dst, len: PAGE_SIZE });
                    zero += PAGE_SIZE;
                }
            }
            entries.push(MapEntry { va: blk.va(s), len: n as u64 * PAGE_SIZE, target: MapTarget::Device(pa), prot });
        }
    }
    run_copies(space, region, slot, &ops)?;
    add(&space.stats.bytes_to_device, h2d);
    add(&space.stats.bytes_zero_filled, zero);
    // Duplicated pages are mapped read-only, moved ones read-write: split the entries by page.
    let entries = if dup { split_ro(blocks, chosen, slot, prot) } else { entries };
    let t = Instant::now();
    // SAFETY: every target is device memory; no host address is mapped.
    let r = unsafe { slot.mmu.map(&entries) };
    add_since(&space.stats.ns_map, t);
    r.map_err(dev_err(slot.id))
}

/// Map entries for the chosen pages: read-only where the CPU keeps a copy, `prot` elsewhere.
fn split_ro(blocks: &[&mut Block], chosen: &[PageMask], slot: &DeviceSlot, prot: Prot) -> Vec<MapEntry> {
    let mut out = Vec::new();
    for (blk, sel) in blocks.iter().zip(chosen) {
        for shared in [true, false] {
            let part = select(blk, sel, |p| p.resident.has(Proc::Cpu) == shared);
            let pr = if shared { Prot::READ } else { prot };
            for (s, n, pa) in pa_runs(blk, slot.id, &part) {
                out.push(MapEntry {
                    va: blk.va(s),
                    len: n as u64 * PAGE_SIZE,
                    target: MapTarget::Device(pa),
                    prot: pr,
                });
            }
        }
    }
    out
}

/// Appends a copy op, merging it with the previous one when both are contiguous.
fn push_op(ops: &mut Vec<CopyOp>, op: CopyOp) {
    match (ops.last_mut(), op) {
        (Some(CopyOp::HostToDevice { src, dst, len }), CopyOp::HostToDevice { src: s2, dst: d2, len: l2 })
            if src.0 + *len as usize == s2.0 && dst.0 + *len == d2.0 =>
        {
            *len += l2;
        }
        (Some(CopyOp::Zero { dst, len }), CopyOp::Zero { dst: d2, len: l2 }) if dst.0 + *len == d2.0 => *len += l2,
        _ => ops.push(op),
    }
}

/// Merges adjacent ranges (sorted input).
fn coalesce(mut v: Vec<VaRange>) -> Vec<VaRange> {
    v.sort_unstable();
    let mut out: Vec<VaRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(l) if l.end() == r.start => l.len += r.len,
            _ => out.push(r),
        }
    }
    out
}

/// Brings whole blocks home for the CPU in one go (CPU read-ahead): one device unmap (or
/// write-protect, for duplicates) and TLB invalidation per device, one batch of copies per
/// device, one backing preparation and one CPU map call for all blocks. `dup`: device copies stay
/// (read-only) beside the CPU's. Returns the pages brought home.
pub(crate) fn bulk_to_cpu(space: &AddressSpace, region: &Region, blocks: &mut [&mut Block], dup: bool) -> Result<u64> {
    let mut devs = ProcMask::EMPTY;
    for blk in blocks.iter() {
        for p in &blk.pages {
            if !p.resident.has(Proc::Cpu) {
                devs.0 |= p.resident.0 & !1;
            }
        }
    }
    let mut moved = 0u64;
    for d in devs.devices() {
        let slot = space.holder(d)?;
        let me = Proc::Device(d);
        let here: Vec<PageMask> = blocks
            .iter()
            .map(|b| select(b, &PageMask::full(b.npages), |p| p.resident.has(me) && !p.resident.has(Proc::Cpu)))
            .collect();
        // Nobody may write while the copy runs: device mappings go read-only (dup) or away.
        let mut rs = Vec::new();
        for (blk, m) in blocks.iter().zip(&here) {
            rs.extend(ranges(blk, &select(blk, m, |p| p.dev_mapped.has(me) && (!dup || !p.dev_ro.has(me)))));
        }
        let rs = coalesce(rs);
        if !rs.is_empty() {
            if dup {
                let prot: Vec<(VaRange, Prot)> = rs.iter().map(|r| (*r, Prot::READ)).collect();
                slot.mmu.protect(&prot).map_err(dev_err(d))?;
            } else {
                slot.mmu.unmap(&rs).map_err(dev_err(d))?;
            }
            slot.mmu.invalidate_tlb(&rs);
        }
        for (blk, m) in blocks.iter_mut().zip(&here) {
            for i in m.iter() {
                let p = &mut blk.pages[i];
                if dup {
                    p.dev_ro.insert(me);
                } else {
                    p.dev_mapped.remove(me);
                    p.dev_ro.remove(me);
                }
            }
        }
        let mut ops = Vec::new();
        for (blk, m) in blocks.iter().zip(&here) {
            for (s, n, pa) in pa_runs(blk, d, m) {
                ops.push(CopyOp::DeviceToHost {
                    src: pa,
                    dst: region.cpu.backing(blk.va(s)),
                    len: n as u64 * PAGE_SIZE,
                });
            }
        }
        run_copies(space, region, &slot, &ops)?;
        for (blk, m) in blocks.iter_mut().zip(&here) {
            add(&space.stats.bytes_to_host, m.count() as u64 * PAGE_SIZE);
            moved += m.count() as u64;
            if !dup {
                release_device_pages(&slot, blk, m);
            }
            for i in m.iter() {
                let p = &mut blk.pages[i];
                if !dup {
                    p.resident.remove(me);
                }
                p.resident.insert(Proc::Cpu);
            }
        }
    }
    // Never-written pages get zeroed backing; then the CPU maps everything it lacks.
    let mut empty = Vec::new();
    for blk in blocks.iter_mut() {
        let e = select(blk, &PageMask::full(blk.npages), |p| p.resident.is_empty());
        empty.extend(ranges(blk, &e));
        for i in e.iter() {
            blk.pages[i].resident.insert(Proc::Cpu);
        }
        moved += e.count() as u64;
    }
    region.cpu.populate(&coalesce(empty))?;
    let writable = region.prot.contains(Prot::WRITE);
    let (mut rw, mut ro) = (Vec::new(), Vec::new());
    for blk in blocks.iter_mut() {
        for i in 0..blk.npages {
            let p = &mut blk.pages[i];
            let shared = p.resident.0 & !1 != 0;
            let want = if writable && !shared { CpuMap::Write } else { CpuMap::Read };
            if p.cpu != want {
                if want == CpuMap::Write { &mut rw } else { &mut ro }
                    .push(VaRange::new(blk.base + i as u64 * PAGE_SIZE, PAGE_SIZE));
                p.cpu = want;
            }
        }
    }
    region.cpu.map(&coalesce(rw), true)?;
    region.cpu.map(&coalesce(ro), false)?;
    Ok(moved)
}
