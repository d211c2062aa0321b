//! Migration mechanics for one block, called with the block's lock held. Every change of a
//! page's residency or mapping happens here:
//! - [`to_device`]: the device becomes the only holder (exclusive, read-write);
//! - [`duplicate_to_device`]: the device gets a read-only copy beside the others;
//! - [`map_remote`]: the data stays in host memory and the device maps it remotely;
//! - [`place_on_peer`] then [`map_peer`]: the data goes to a peer device (its preferred
//!   location) and the faulting device maps that copy through the peer's window;
//! - [`to_cpu`]: the CPU becomes the only holder; [`cpu_duplicate`]: the CPU gets a read-only copy;
//! - [`drop_device_copies`] / [`discard`]: the data is gone (memory freed or discarded).
//!
//! Order of every migration (decision 3, "never divergent content"): first remove write access
//! everywhere but the source, then copy, then map the destination. Copies exist side by side
//! only while nobody can write them. A failed step leaves the source as the valid copy.
//!
//! Data held only by other devices comes straight from their memory where the device reaches it
//! peer to peer ([`crate::device::PeerWindow`]), and through host memory otherwise.

use std::sync::Arc;
use std::time::Instant;

use crate::block::{Block, CpuMap, PageMask};
use crate::device::{CopyOp, MapEntry, MapTarget, PeerWindow, PhysAddr};
use crate::error::{CoreError, Result};
use crate::space::{AddressSpace, DeviceSlot, Region};
use crate::stats::{add, add_since};
use crate::types::{DeviceId, Proc, ProcMask, Prot, VaRange, PAGES_PER_BLOCK, PAGE_SIZE};

/// Ranges of virtual addresses covering the pages of `m` in `blk`.
pub(crate) fn ranges(blk: &Block, m: &PageMask) -> Vec<VaRange> {
    m.runs().into_iter().map(|(s, e)| VaRange::new(blk.va(s), (e - s) as u64 * PAGE_SIZE)).collect()
}

/// Pages of `m` whose state satisfies `f`.
pub(crate) fn select(blk: &Block, m: &PageMask, f: impl Fn(&crate::block::Page) -> bool) -> PageMask {
    let mut out = PageMask::default();
    for i in m.iter() {
        if f(&blk.pages[i]) {
            out.set(i);
        }
    }
    out
}

/// Devices holding a copy of any page of `m`.
fn device_holders(blk: &Block, m: &PageMask) -> ProcMask {
    ProcMask(m.iter().fold(0, |acc, i| acc | blk.pages[i].resident.0) & !ProcMask::only(Proc::Cpu).0)
}

/// Devices that hold a copy of any page of `m` or map one (their own copy or the host page).
fn devices_reaching(blk: &Block, m: &PageMask) -> ProcMask {
    let cpu = ProcMask::only(Proc::Cpu).0;
    ProcMask(m.iter().fold(0, |acc, i| acc | blk.pages[i].resident.0 | blk.pages[i].dev_mapped.0) & !cpu)
}

/// Removes `slot`'s remote mappings (of host pages) among `m`, before it maps its own copies.
fn unmap_own_remote(space: &AddressSpace, blk: &mut Block, slot: &DeviceSlot, m: &PageMask) -> Result<()> {
    let me = Proc::Device(slot.id);
    let remote = select(blk, m, |p| p.dev_mapped.has(me) && !p.resident.has(me));
    unmap_on(space, blk, slot, &remote)
}

/// Runs of pages whose device pages are physically contiguous: `(first page, count, first pa)`.
fn pa_runs(blk: &Block, id: DeviceId, m: &PageMask) -> Vec<(usize, usize, PhysAddr)> {
    let mut out: Vec<(usize, usize, PhysAddr)> = Vec::new();
    let Some(pas) = blk.pas(id) else { return out };
    for i in m.iter() {
        let Some(pa) = pas.get(i) else { continue };
        match out.last_mut() {
            Some((s, n, p)) if *s + *n == i && p.0 + *n as u64 * PAGE_SIZE == pa.0 => *n += 1,
            _ => out.push((i, 1, pa)),
        }
    }
    out
}

/// Whether `slot`'s device maps only whole 2 MiB blocks (no 4 KiB entries, as CUDA's VMM with
/// its 2 MiB granularity). For such a device a block is resident, mapped and protected there
/// whole or not at all: every operation on its copies is widened to the whole block ([`widen`]),
/// and its pages come from one 2 MiB physical chunk (a partial last block of a region keeps the
/// rest of its chunk as slack, freed with the block).
pub(crate) fn whole_blocks(slot: &DeviceSlot) -> bool {
    slot.caps.page_sizes & PAGE_SIZE == 0
}

/// `m` widened to the whole block when `slot` maps whole blocks only (and `m` is not empty).
fn widen(blk: &Block, slot: &DeviceSlot, m: &PageMask) -> PageMask {
    if whole_blocks(slot) && !m.is_empty() {
        PageMask::full(blk.npages)
    } else {
        *m
    }
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
    let m = &widen(blk, slot, m);
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
        blk.pages[i].peer_mapped.remove(me);
    }
    Ok(())
}

/// Removes every mapping of `m` that reaches a device's copy through its peer window: done
/// before the pages' holders change, so no device keeps reaching memory that is freed, moved
/// or no longer the only copy it was mapped as.
pub(crate) fn unmap_peer_maps(space: &AddressSpace, blk: &mut Block, m: &PageMask) -> Result<()> {
    let mut devs = ProcMask::EMPTY;
    for i in m.iter() {
        devs.0 |= blk.pages[i].peer_mapped.0;
    }
    for d in devs.devices() {
        let slot = space.holder(d)?;
        let here = select(blk, m, |p| p.peer_mapped.has(Proc::Device(d)));
        unmap_on(space, blk, &slot, &here)?;
    }
    Ok(())
}

/// Unmaps `m` from every device except `keep`.
pub(crate) fn unmap_others(space: &AddressSpace, blk: &mut Block, m: &PageMask, keep: Option<DeviceId>) -> Result<()> {
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
        let rw = select(blk, &widen(blk, &slot, m), |p| p.dev_mapped.has(me) && !p.dev_ro.has(me));
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

/// Before the device fault path moves `m` to a device: where the CPU maps some page of `m`,
/// revokes the CPU's mappings of the whole block but the pages other work of this service holds
/// (`Policy::revoke_whole_block`), so the faults that follow in the block find nothing to revoke.
pub(crate) fn revoke_block_cpu(space: &AddressSpace, region: &Region, blk: &mut Block, m: &PageMask) -> Result<()> {
    if region.remote || select(blk, m, |p| p.cpu != CpuMap::None).is_empty() {
        return Ok(());
    }
    let idle = PageMask::full(blk.npages).and_not(&blk.busy).or(m);
    revoke_cpu(space, region, blk, &idle)
}

/// The result of a CPU revoke or write-protect, counting those that raced the program's unmap
/// or remap.
fn count_raced(space: &AddressSpace, r: std::result::Result<(), crate::cpu::HostError>) -> Result<()> {
    r.inspect_err(|e| {
        if e.raced() {
            add(&space.stats.revokes_raced, 1);
        }
    })?;
    Ok(())
}

/// Removes the CPU's mappings of `m`.
fn revoke_cpu(space: &AddressSpace, region: &Region, blk: &mut Block, m: &PageMask) -> Result<()> {
    let mapped = select(blk, m, |p| p.cpu != CpuMap::None);
    if mapped.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    count_raced(space, region.cpu.revoke(&ranges(blk, &mapped)))?;
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
    count_raced(space, region.cpu.protect(&ranges(blk, &rw), false))?;
    add_since(&space.stats.ns_revoke, t);
    for i in rw.iter() {
        blk.pages[i].cpu = CpuMap::Read;
    }
    Ok(())
}

/// Submits copies and waits for them, bounded.
fn run_copies(space: &AddressSpace, region: &Region, slot: &DeviceSlot, ops: &[CopyOp]) -> Result<()> {
    match submit_copies(space, slot, ops)? {
        Some(done) => wait_copies(space, region, slot.id, done),
        None => Ok(()),
    }
}

/// Submits copies (none if `ops` is empty); the caller waits for them with [`wait_copies`].
fn submit_copies(space: &AddressSpace, slot: &DeviceSlot, ops: &[CopyOp]) -> Result<Option<Copies>> {
    if ops.is_empty() {
        return Ok(None);
    }
    let t = Instant::now();
    // A failed (timed-out) wait leaks the region's CPU side (`keep_alive_forever`).
    // SAFETY: host addresses are `region.cpu.backing()` of this region's pages, mapped while
    // `region` lives and, after a failed wait, forever; every caller waits for the copies.
    let done = unsafe { slot.mmu.copy(ops) }.map_err(dev_err(slot.id));
    add_since(&space.stats.ns_copy, t);
    done.map(Some)
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
    peers: &Peers,
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
    enqueue(region, blk, slot);
    let mut ops: Vec<CopyOp> = Vec::new();
    let mut bytes = Filled::default();
    for (s, n, pa) in pa_runs(blk, slot.id, need) {
        bytes.add(fill_ops(&mut ops, region, blk, s, n, pa, peers));
    }
    // A driver that panics in `copy` (the service loop catches it and goes on) may have
    // started some of the copies: the pages are forgotten, as after a failed wait, not left
    // recorded as this block's without its data (found by an audit).
    let submitted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| submit_copies(space, slot, &ops)));
    let done = match submitted {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => {
            release_device_pages(slot, blk, need);
            return Err(e);
        }
        Err(panic) => {
            forget_device_pages(slot, blk, need);
            std::panic::resume_unwind(panic);
        }
    };
    if let Some(Err(e)) = done.map(|d| wait_copies(space, region, slot.id, d)) {
        // The copies may still write these pages: they must never go to another block.
        forget_device_pages(slot, blk, need);
        return Err(e);
    }
    add(&space.stats.bytes_to_device, bytes.host);
    add(&space.stats.bytes_device_to_device, bytes.peer);
    add(&space.stats.bytes_zero_filled, bytes.zero);
    Ok(())
}

/// Other devices a device copies from directly: each holder's id, its peer window, and its slot
/// (kept so the holder cannot go while the copy reads its memory).
type Peers = Vec<(DeviceId, PeerWindow, Arc<DeviceSlot>)>;

/// Of the pages of `m` held only by other devices, those `slot`'s device can copy straight from
/// a holder's memory ([`peer_window`]), and those holders.
fn peer_sources(space: &AddressSpace, blk: &Block, slot: &DeviceSlot, m: &PageMask) -> (PageMask, Peers) {
    let (mut direct, mut peers) = (PageMask::default(), Peers::new());
    if slot.caps.peer.is_none() {
        return (direct, peers);
    }
    let elsewhere = only_elsewhere(blk, m, Proc::Device(slot.id));
    for d in device_holders(blk, &elsewhere).devices() {
        let Ok(holder) = space.holder(d) else { continue };
        let Some(w) = peer_window(slot, &holder) else { continue };
        direct = direct.or(&select(blk, &elsewhere, |p| p.resident.has(Proc::Device(d))));
        peers.push((d, w, holder));
    }
    (direct, peers)
}

/// The window through which `slot`'s device reaches `holder`'s memory, if the two are peers. A
/// holder that maps whole blocks only gives up whole blocks ([`widen`]), so it never serves as one.
pub(crate) fn peer_window(slot: &DeviceSlot, holder: &DeviceSlot) -> Option<PeerWindow> {
    let mine = slot.caps.peer?;
    holder.caps.peer.filter(|w| w.reachable_from(&mine) && !whole_blocks(holder))
}

/// Bytes a fill copies from host memory, copies from peers, and zeroes.
#[derive(Clone, Copy, Debug, Default)]
struct Filled {
    host: u64,
    peer: u64,
    zero: u64,
}

impl Filled {
    fn add(&mut self, o: Filled) {
        self.host += o.host;
        self.peer += o.peer;
        self.zero += o.zero;
    }
}

/// After a failed [`map_local`], gives back the device pages [`fill`] just gave `need`: nothing
/// records them as holding the data (it is still where it was), so kept they would be lost to
/// the allocator for good. A failed map installed nothing
/// ([`crate::device::DeviceMmu::map`]), so nothing points at them.
fn undo_fill(slot: &DeviceSlot, blk: &mut Block, need: &PageMask) {
    release_device_pages(slot, blk, need);
}

/// [`map_local`] of `m` right after `fill` gave the block the device pages `need`: on failure
/// they go back to the allocator. A driver that panics in its `map` (the fault service catches
/// it and goes on) may have mapped some of them: `m` is unmapped first, and they are freed only
/// if that works, else forgotten (leaked). Left recorded in the block but not resident, they
/// were overwritten by the next fill and never freed (found by an audit).
fn map_filled(
    space: &AddressSpace,
    blk: &mut Block,
    slot: &DeviceSlot,
    m: &PageMask,
    prot: Prot,
    need: &PageMask,
) -> Result<()> {
    let mapped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| map_local(space, blk, slot, m, prot)));
    match mapped {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            undo_fill(slot, blk, need);
            Err(e)
        }
        Err(panic) => {
            let m = widen(blk, slot, m);
            let rs = ranges(blk, &m);
            let me = Proc::Device(slot.id);
            let unmapped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| slot.mmu.unmap(&rs)));
            if matches!(unmapped, Ok(Ok(()))) {
                slot.mmu.invalidate_tlb(&rs);
                for i in m.iter() {
                    let p = &mut blk.pages[i];
                    p.dev_mapped.remove(me);
                    p.dev_ro.remove(me);
                    p.peer_mapped.remove(me);
                }
                undo_fill(slot, blk, need);
            } else {
                forget_device_pages(slot, blk, need);
            }
            std::panic::resume_unwind(panic)
        }
    }
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

/// Puts the block on the device's eviction queue once. Done as soon as the block holds device
/// memory, before its copies land: another thread short of memory then finds the block busy
/// (locked by its service) and retries, instead of seeing nothing it could ever evict and
/// failing the faults it serves.
pub(crate) fn enqueue(region: &Region, blk: &mut Block, slot: &DeviceSlot) {
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

/// The start of every path that gives `slot`'s device access to `want`: `want` widened to the
/// device's mapping granularity, or `None` for a region served remotely only, which this maps
/// remotely instead.
fn begin_device_access(
    space: &AddressSpace,
    region: &Region,
    blk: &mut Block,
    slot: &DeviceSlot,
    want: &PageMask,
) -> Result<Option<PageMask>> {
    if region.remote {
        map_remote(space, region, blk, slot, want)?;
        return Ok(None);
    }
    slot.attached()?;
    Ok(Some(widen(blk, slot, want)))
}

/// Makes `slot`'s device the only holder of `want`, mapped read-write.
pub(crate) fn to_device(
    space: &AddressSpace,
    region: &Region,
    blk: &mut Block,
    slot: &DeviceSlot,
    want: &PageMask,
) -> Result<()> {
    let Some(want) = &begin_device_access(space, region, blk, slot, want)? else {
        return Ok(());
    };
    let me = Proc::Device(slot.id);
    // Data held only by other devices: copied from them directly where they are peers, else
    // brought home first.
    let (direct, peers) = peer_sources(space, blk, slot, want);
    to_cpu(space, region, blk, &only_elsewhere(blk, want, me).and_not(&direct))?;
    // Nobody else may access the pages from here on: other devices (copies or remote maps), our
    // own remote maps, the CPU. The peers' copies stay until ours are filled from them.
    unmap_others(space, blk, want, Some(slot.id))?;
    unmap_own_remote(space, blk, slot, want)?;
    drop_other_device_copies(space, blk, &want.and_not(&direct), slot.id)?;
    revoke_cpu(space, region, blk, want)?;
    let need = select(blk, want, |p| !p.resident.has(me));
    fill(space, region, blk, slot, &need, want, &peers)?;
    let remap = select(blk, want, |p| !p.dev_mapped.has(me) || p.dev_ro.has(me));
    map_filled(space, blk, slot, &remap, device_prot(region), &need)?;
    // Our copies are the data now and we may write them: the peers' copies go. A peer gone from
    // the address space meanwhile has no pages left to free.
    if let Err(e) = drop_other_device_copies(space, blk, &direct, slot.id) {
        log::warn!("freeing peer copies of block {:#x}: {e}", blk.base);
    }
    for i in want.iter() {
        blk.pages[i].resident = ProcMask::only(me);
    }
    enqueue(region, blk, slot);
    Ok(())
}

/// Places `want` on `holder`'s device, their preferred location, for another device to map
/// there through its peer window ([`map_peer`]): UVM's rule that a fault by a processor able to
/// access the preferred location moves the data there, not to the faulting processor. Pages the
/// holder has already stay as they are; it becomes the only holder of the others, mapped
/// read-write on it ([`to_device`]: every other mapping and copy goes first, its memory comes
/// from its allocator, evicting other blocks there per the eviction policy). Returns the pages
/// moved. On error, as for any migration, the data is where it was.
pub(crate) fn place_on_peer(
    space: &AddressSpace,
    region: &Region,
    blk: &mut Block,
    holder: &DeviceSlot,
    want: &PageMask,
) -> Result<usize> {
    let absent = select(blk, want, |p| !p.resident.has(Proc::Device(holder.id)));
    if absent.is_empty() {
        return Ok(0);
    }
    to_device(space, region, blk, holder, &absent)?;
    add(&space.stats.peer_placed_pages, absent.count() as u64);
    Ok(absent.count())
}

/// Frees the copies other devices hold of `m` (their mappings are already gone).
fn drop_other_device_copies(space: &AddressSpace, blk: &mut Block, m: &PageMask, keep: DeviceId) -> Result<()> {
    let devs = device_holders(blk, m);
    for d in devs.devices().filter(|d| *d != keep) {
        let slot = space.holder(d)?;
        let here = select(blk, &widen(blk, &slot, m), |p| p.resident.has(Proc::Device(d)));
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
    let Some(want) = &begin_device_access(space, region, blk, slot, want)? else {
        return Ok(());
    };
    let me = Proc::Device(slot.id);
    // A new copy appears beside the others: mappings of a peer's copy go first.
    unmap_peer_maps(space, blk, want)?;
    // The source of a copy is a peer holding the data, or else the CPU's: data held only by
    // other devices that are not peers comes into host backing first, their copies kept.
    let (direct, peers) = peer_sources(space, blk, slot, want);
    cpu_duplicate(space, region, blk, &only_elsewhere(blk, want, me).and_not(&direct))?;
    let empty = select(blk, want, |p| p.resident.is_empty());
    populate(space, region, blk, &empty)?;
    write_protect_cpu(space, region, blk, want)?;
    downgrade_devices(space, blk, want)?;
    unmap_own_remote(space, blk, slot, want)?;
    let need = select(blk, want, |p| !p.resident.has(me));
    fill(space, region, blk, slot, &need, want, &peers)?;
    let unmapped = select(blk, want, |p| !p.dev_mapped.has(me));
    map_filled(space, blk, slot, &unmapped, Prot::READ, &need)?;
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
    slot.attached()?;
    let me = Proc::Device(slot.id);
    let want = &widen(blk, slot, want);
    to_cpu(space, region, blk, &only_elsewhere(blk, want, me))?;
    let empty = select(blk, want, |p| p.resident.is_empty());
    populate(space, region, blk, &empty)?;
    // Pages the device holds itself stay mapped to its own copy, mapped again where a failed
    // migration left that copy unmapped (read-only while other copies exist).
    let full = device_prot(region);
    // And where it holds the only copy but maps it read-only (a duplicate whose other copies
    // were evicted): left so, a write served here faulted again (found by an audit).
    let own = select(blk, want, |p| {
        p.resident.has(me) && (!p.dev_mapped.has(me) || (p.dev_ro.has(me) && p.resident == ProcMask::only(me)))
    });
    let shared = select(blk, &own, |p| p.resident != ProcMask::only(me));
    map_local(space, blk, slot, &shared, Prot::READ)?;
    map_local(space, blk, slot, &own.and_not(&shared), full)?;
    let remote = select(blk, want, |p| !p.resident.has(me));
    let t = Instant::now();
    let (mut entries, mut ro) = (Vec::new(), PageMask::default());
    // Read-only where a device holds a copy beside the host's.
    let shared = |i: usize| blk.pages[i].resident.0 & !ProcMask::only(Proc::Cpu).0 != 0;
    for (s, e) in remote.runs() {
        let host = |k: usize| MapTarget::Host(region.cpu.backing(blk.va(k)));
        push_remote_entries(&mut entries, &mut ro, blk, (s, e), full, shared, host);
    }
    // Remote mappings go (unmap + TLB invalidation) before the CPU side is released:
    // `drop_device_copies` on region removal, `unmap_others` when data leaves the host.
    // SAFETY: host addresses are `region.cpu.backing()` of this region's pages, mapped while the
    // CPU side lives, which outlives every remote mapping of them (above).
    let r = unsafe { slot.mmu.map(&entries) };
    add_since(&space.stats.ns_map, t);
    r.map_err(dev_err(slot.id))?;
    mark_mapped(blk, &remote, me, &ro);
    Ok(())
}

/// Appends the remote mappings of pages `s..e` (`run`), one entry per stretch of the same
/// protection: read-only where `shared` says other copies exist, `full` elsewhere. `target(k)`
/// is where page `k` is reached (contiguous over the run); `ro` gets the read-only pages.
fn push_remote_entries(
    entries: &mut Vec<MapEntry>,
    ro: &mut PageMask,
    blk: &Block,
    (s, e): (usize, usize),
    full: Prot,
    shared: impl Fn(usize) -> bool,
    target: impl Fn(usize) -> MapTarget,
) {
    let mut k = s;
    while k < e {
        let mut j = k + 1;
        while j < e && shared(j) == shared(k) {
            j += 1;
        }
        let prot = if shared(k) { Prot::READ } else { full };
        if !prot.contains(Prot::WRITE) {
            ro.set_range(k, j);
        }
        entries.push(MapEntry { va: blk.va(k), len: (j - k) as u64 * PAGE_SIZE, target: target(k), prot });
        k = j;
    }
}

/// Records that `me` maps `m` (read-only where `ro` says) after a remote map succeeded.
fn mark_mapped(blk: &mut Block, m: &PageMask, me: Proc, ro: &PageMask) {
    for i in m.iter() {
        let p = &mut blk.pages[i];
        p.dev_mapped.insert(me);
        if ro.get(i) {
            p.dev_ro.insert(me);
        } else {
            p.dev_ro.remove(me);
        }
    }
}

/// Maps `want` on `slot`'s device to the copy a peer holds (zero-copy over the peer link, as
/// `AccessedBy` asks when the data lives on another device): read-write where that copy is the
/// only one, read-only where copies exist elsewhere. Pages no peer holds (the CPU holds them too,
/// nobody does, or only devices that are not peers) are mapped to host memory by
/// [`map_remote`]; pages the device holds itself stay mapped to its own copy.
pub(crate) fn map_peer(
    space: &AddressSpace,
    region: &Region,
    blk: &mut Block,
    slot: &DeviceSlot,
    want: &PageMask,
) -> Result<()> {
    let Some(want) = &begin_device_access(space, region, blk, slot, want)? else {
        return Ok(());
    };
    let me = Proc::Device(slot.id);
    let (direct, peers) = peer_sources(space, blk, slot, want);
    map_remote(space, region, blk, slot, &want.and_not(&direct))?;
    if direct.is_empty() {
        return Ok(());
    }
    let full = device_prot(region);
    let (mut entries, mut ro) = (Vec::new(), PageMask::default());
    let mut left = direct;
    for (d, w, _) in &peers {
        let holder = Proc::Device(*d);
        let here = select(blk, &left, |p| p.resident.has(holder));
        left = left.and_not(&here);
        // Read-only where the holder's copy is not the only one.
        let shared = |i: usize| blk.pages[i].resident != ProcMask::only(holder);
        for (s, n, pa) in pa_runs(blk, *d, &here) {
            let peer = |k: usize| MapTarget::Peer(w.addr(PhysAddr(pa.0 + (k - s) as u64 * PAGE_SIZE)));
            push_remote_entries(&mut entries, &mut ro, blk, (s, s + n), full, shared, peer);
        }
    }
    let t = Instant::now();
    // SAFETY: each target is a peer's copy (`peer_sources`), kept while it holds the data; the
    // mapping goes (`unmap_peer_maps`, `unmap_others`) before the holders change or it is freed.
    let r = unsafe { slot.mmu.map(&entries) };
    add_since(&space.stats.ns_map, t);
    r.map_err(dev_err(slot.id))?;
    add(&space.stats.peer_mapped_pages, direct.count() as u64);
    mark_mapped(blk, &direct, me, &ro);
    for i in direct.iter() {
        blk.pages[i].peer_mapped.insert(me);
    }
    Ok(())
}

/// Most blocks the allocation of a whole block evicts to make a free 2 MiB chunk before taking
/// single pages (policy `whole_chunks`).
const CHUNK_EVICTIONS: u32 = 4;

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
    // Policy `whole_chunks`: first a chunk or nothing, evicting up to a few blocks to make one
    // (a victim scattered over single pages frees no chunk by itself).
    let mut chunk_only = space.config.policy.whole_chunks && n == PAGES_PER_BLOCK && !whole_blocks(slot);
    let mut chunk_tries = 0;
    loop {
        if let Some(pas) = try_alloc(slot, blk, n, chunk_only) {
            if slot.evicts_in_background.load(std::sync::atomic::Ordering::Acquire) {
                slot.evict_wake.notify_one();
            }
            return Ok(pas);
        }
        let evicted = crate::evict::evict_one(space, slot, blk.base)?;
        if evicted == crate::evict::Evicted::Freed {
            slot.demand_evictions.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            chunk_tries += 1;
            chunk_only &= chunk_tries < CHUNK_EVICTIONS;
            continue;
        }
        if chunk_only {
            // Nothing to evict: single pages, then this block's own spare pages, as usual.
            chunk_only = false;
            continue;
        }
        // Never a pinned block's own pages (found by an audit: a fault elsewhere in a pinned
        // block sent its pinned pages home, to come back on the next fault there). Without
        // them the fault is served remotely, as when pins fill the device.
        let spare = if crate::evict::pinned(space, blk) {
            PageMask::default()
        } else {
            blk.resident_on(Proc::Device(slot.id)).and_not(want).and_not(&blk.busy)
        };
        if spare.is_empty() {
            let bytes = n as u64 * PAGE_SIZE;
            return Err(if evicted == crate::evict::Evicted::Busy {
                CoreError::DeviceMemoryBusy { device: slot.id, bytes }
            } else {
                CoreError::OutOfDeviceMemory { device: slot.id, bytes }
            });
        }
        // Only this device's copies: other devices keep theirs (a launch on one that cannot
        // fault may hold them), as on eviction.
        let copied = evict_pages_from(space, region, blk, slot, &spare)?;
        add(&space.stats.evictions, 1);
        add(&space.stats.bytes_evicted, copied as u64 * PAGE_SIZE);
    }
}

/// One allocation attempt for `n` pages of `blk`: a 2 MiB chunk for a whole block (so the device
/// can use a 2 MiB entry), else (unless `chunk_only`) single pages; all or nothing. A device
/// without 4 KiB pages always gets a chunk, of which the block's pages take the places their
/// addresses have in their 2 MiB window: the device maps the chunk whole at the window, so the
/// first block of a region that starts inside one begins part-way into its chunk.
fn try_alloc(slot: &DeviceSlot, blk: &Block, n: usize, chunk_only: bool) -> Option<Vec<PhysAddr>> {
    let prefer = blk.prev_chunk(slot.id);
    let mut a = slot.alloc.lock();
    // A chunk: the block's previous one where it is free (the device may still have it mapped
    // there), else any.
    let chunk = |a: &mut crate::alloc::BuddyAllocator| match prefer {
        Some(p) if a.alloc_at(p, crate::alloc::MAX_ORDER) => Some(p),
        _ => a.alloc(crate::alloc::MAX_ORDER),
    };
    if whole_blocks(slot) {
        if n == 0 {
            return Some(Vec::new());
        }
        let first = PhysAddr(chunk(&mut a)?.0 + crate::fault::skew_of(blk.base) as u64 * PAGE_SIZE);
        return Some((0..n as u64).map(|k| PhysAddr(first.0 + k * PAGE_SIZE)).collect());
    }
    if n == crate::types::PAGES_PER_BLOCK && !crate::mirror::take_injected_failure(slot) {
        if let Some(base) = chunk(&mut a) {
            return Some((0..n as u64).map(|k| PhysAddr(base.0 + k * PAGE_SIZE)).collect());
        }
    }
    if chunk_only || a.free_pages() < n as u64 {
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
    // No device may still reach a copy that is freed (`unmap_peer_maps` ran first).
    debug_assert!(m.iter().all(|i| blk.pages[i].peer_mapped.is_empty() || blk.pa(slot.id, i).is_none()));
    // A partial block on a whole-block device holds a whole chunk, its pages at their window
    // offsets (`try_alloc`): find the chunk before forgetting them.
    let skew = crate::fault::skew_of(blk.base);
    let chunk_of = |i: usize| {
        let start = blk.pa(slot.id, i)?.0.checked_sub((skew + i) as u64 * PAGE_SIZE)?;
        (start % crate::types::BLOCK_SIZE == 0).then_some(start)
    };
    let slack_chunk =
        (whole_blocks(slot) && blk.npages < PAGES_PER_BLOCK).then(|| m.iter().find_map(chunk_of)).flatten();
    let runs = blk.take_pas(slot.id, m);
    let mut a = slot.alloc.lock();
    for (pa, n) in runs {
        a.free(pa, n);
    }
    if let Some(base) = slack_chunk {
        if (0..blk.npages).all(|i| blk.pa(slot.id, i).is_none()) {
            // The pages before the block's (a region starting inside the window) and after it.
            if skew > 0 {
                a.free(PhysAddr(base), skew as u64);
            }
            let tail = PhysAddr(base + (skew + blk.npages) as u64 * PAGE_SIZE);
            let after = PAGES_PER_BLOCK - skew - blk.npages;
            if after > 0 {
                a.free(tail, after as u64);
            }
        }
    }
}

/// Forgets the device pages of `m` without freeing them: the device may still write them (copies
/// whose wait failed, as the region's CPU side is kept for them in [`wait_copies`]) or map them
/// (an unmap it refused), so they must never be given to another block. They are leaked.
fn forget_device_pages(slot: &DeviceSlot, blk: &mut Block, m: &PageMask) {
    let pages: u64 = blk.take_pas(slot.id, m).iter().map(|&(_, n)| n).sum();
    if pages > 0 {
        log::error!("device {:?}: {pages} pages the device may still use are leaked", slot.id);
    }
}

/// Copies device-only pages of `m` into host backing from one holder each, without unmapping
/// them: the CPU gets a copy beside the device's (read duplication). Device mappings become
/// read-only.
pub(crate) fn cpu_duplicate(space: &AddressSpace, region: &Region, blk: &mut Block, m: &PageMask) -> Result<()> {
    if m.is_empty() {
        return Ok(());
    }
    unmap_peer_maps(space, blk, m)?;
    downgrade_devices(space, blk, m)?;
    let devs = device_holders(blk, m);
    for d in devs.devices() {
        let slot = space.holder(d)?;
        let copy =
            select(blk, &widen(blk, &slot, m), |p| p.resident.has(Proc::Device(d)) && !p.resident.has(Proc::Cpu));
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

/// Copies into host backing the data of every page of `blk` whose only copies are on devices,
/// changing nothing else: no mapping, residency or permission moves, the devices keep their
/// copies and the CPU stays unmapped (a `fork()` child reads the host backing; see
/// [`crate::fork`]). Every holder is tried: a page a failing device holds comes from another
/// holder if it has one. Returns the bytes copied, and on error the pages no device could
/// supply.
pub(crate) fn flush_to_host(space: &AddressSpace, region: &Region, blk: &Block) -> (u64, Result<(), PageMask>) {
    let (copied, left) = copy_device_only(space, region, blk, &PageMask::full(blk.npages), "fork");
    (copied.count() as u64 * PAGE_SIZE, if left.is_empty() { Ok(()) } else { Err(left) })
}

/// Copies into host backing the pages of `m` whose only copies are on devices, one holder each,
/// changing nothing else. Every holder is tried: a page a failing device holds comes from another
/// holder if it has one (the failure is logged, for `what`). Returns the pages copied and those
/// no device could supply.
fn copy_device_only(
    space: &AddressSpace,
    region: &Region,
    blk: &Block,
    m: &PageMask,
    what: &str,
) -> (PageMask, PageMask) {
    let mut left = select(blk, m, |p| !p.resident.is_empty() && !p.resident.has(Proc::Cpu));
    let mut copied = PageMask::default();
    for d in device_holders(blk, &left).devices() {
        let here = select(blk, &left, |p| p.resident.has(Proc::Device(d)));
        let Ok(slot) = space.holder(d) else { continue };
        if let Err(e) = copy_back(space, region, blk, &slot, &here) {
            log::error!("{what}: copying block {:#x} from device {d:?} to host memory: {e}", blk.base);
            continue;
        }
        copied = copied.or(&here);
        left = left.and_not(&here);
    }
    (copied, left)
}

/// Brings the pages `want` of `blk` back into host backing: the CPU becomes the only holder.
/// Devices' copies are unmapped and freed (remote mappings of the host page stay valid). The CPU
/// mapping is left to the caller.
/// Returns the pages copied (those the CPU did not hold already).
pub(crate) fn to_cpu(space: &AddressSpace, region: &Region, blk: &mut Block, want: &PageMask) -> Result<usize> {
    // Each holder gives up its copies in turn; the first one of a page copies it home. Not the
    // last: a holder's good copy was dropped uncopied (another held one), then the last
    // holder's copy home failed and the data was left only where it could not be copied from.
    // A holder whose copy home fails keeps its copies (unmapped) and goes again after the
    // others: a later holder's copy of the same page may come home, and then it only frees its
    // own (it failed the migration though another holder had a good copy; found by a review).
    let mut copied = 0;
    let mut failed = Vec::new();
    for d in device_holders(blk, want).devices() {
        let slot = space.holder(d)?;
        match give_up_pages(space, region, blk, &slot, want, true) {
            Ok(n) => copied += n,
            Err(e) => failed.push((slot, e)),
        }
    }
    for (slot, e) in failed {
        let me = Proc::Device(slot.id);
        // Still the only copy of a page somewhere: the error stands (no second try).
        if widen(blk, &slot, want)
            .iter()
            .any(|i| blk.pages[i].resident.has(me) && !blk.pages[i].resident.has(Proc::Cpu))
        {
            return Err(e);
        }
        copied += give_up_pages(space, region, blk, &slot, want, true)?;
    }
    Ok(copied)
}

/// Takes `slot`'s device's copies out of `blk` (eviction): the pages no other processor holds
/// come home first; other holders keep their copies and mappings (the eviction dropped every
/// device's copies, a launch's on a device that cannot fault included; found by an audit).
/// Peer mappings of the block's pages go first (the state does not say whose copy one reaches;
/// a peer faults it in again). Returns the pages copied.
pub(crate) fn evict_from(space: &AddressSpace, region: &Region, blk: &mut Block, slot: &DeviceSlot) -> Result<usize> {
    let here = blk.resident_on(Proc::Device(slot.id));
    evict_pages_from(space, region, blk, slot, &here)
}

/// [`evict_from`] for the pages `m` only (widened to the whole block on a whole-block device).
pub(crate) fn evict_pages_from(
    space: &AddressSpace,
    region: &Region,
    blk: &mut Block,
    slot: &DeviceSlot,
    m: &PageMask,
) -> Result<usize> {
    give_up_pages(space, region, blk, slot, m, false)
}

/// `slot`'s device gives up its copies of `m` (widened to the whole block on a whole-block
/// device): unmapped, the pages it alone holds copied home (with `all_home`, every page the CPU
/// does not hold, as [`to_cpu`] needs), then freed. Returns the pages copied.
fn give_up_pages(
    space: &AddressSpace,
    region: &Region,
    blk: &mut Block,
    slot: &DeviceSlot,
    m: &PageMask,
    all_home: bool,
) -> Result<usize> {
    let me = Proc::Device(slot.id);
    let here = select(blk, &widen(blk, slot, m), |p| p.resident.has(me));
    if here.is_empty() {
        return Ok(0);
    }
    unmap_peer_maps(space, blk, &here)?;
    let copy =
        select(blk, &here, |p| if all_home { !p.resident.has(Proc::Cpu) } else { p.resident == ProcMask::only(me) });
    unmap_on(space, blk, slot, &here)?;
    // On failure the device pages keep the data (unmapped; the next device fault remaps).
    copy_back(space, region, blk, slot, &copy)?;
    release_device_pages(slot, blk, &here);
    for i in here.iter() {
        blk.pages[i].resident.remove(me);
    }
    for i in copy.iter() {
        blk.pages[i].resident.insert(Proc::Cpu);
    }
    Ok(copy.count())
}

/// Copies the pages of `m` that only devices hold into host backing, one holder each, without
/// unmapping them: when a device refuses to give up pages a reshape the program forced keeps
/// (its munmap or mremap has already happened), their data still comes home, and the CPU holds
/// it from then on (the device's mapping stays recorded, as `drop_device_copies` leaves it, so
/// that a later unmap tries again). Every holder is tried; returns the pages no device could
/// supply.
pub(crate) fn copy_home_keeping_maps(space: &AddressSpace, region: &Region, blk: &mut Block, m: &PageMask) -> PageMask {
    let (copied, left) = copy_device_only(space, region, blk, m, "reshape");
    for i in copied.iter() {
        blk.pages[i].resident.insert(Proc::Cpu);
    }
    left
}

/// Drops every device mapping and copy in `m` without copying (the data is being freed or
/// discarded). Every device is tried; the first error is returned. Every device unmaps before
/// any copy is freed: a device may reach another's copy through its peer window, and freeing it
/// first let the peer reach freed device memory until its own turn came. A copy that a device
/// refusing the unmap may still reach (its own, or a peer's) is forgotten (leaked, never handed
/// out again), and that device's mapping stays recorded, so a later unmap of these pages tries
/// again.
pub(crate) fn drop_device_copies(space: &AddressSpace, blk: &mut Block, m: &PageMask) -> Result<()> {
    let slots: Vec<_> = devices_reaching(blk, m)
        .devices()
        .filter_map(|d| space.holder(d).ok().map(|slot| (d, widen(blk, &slot, m), slot)))
        .collect();
    let mut reached = PageMask::default();
    let mut result = Ok(());
    for (d, wm, slot) in &slots {
        if let Err(e) = unmap_on(space, blk, slot, wm) {
            log::error!("unmapping dropped memory from device {d:?}: {e}; the device pages it reaches are leaked");
            reached = reached.or(&select(blk, wm, |p| p.dev_mapped.has(Proc::Device(*d))));
            result = result.and(Err(e));
        }
    }
    for &(d, ref wm, ref slot) in &slots {
        let here = select(blk, wm, |p| p.resident.has(Proc::Device(d)));
        let free = here.and_not(&reached);
        release_device_pages(slot, blk, &free);
        forget_device_pages(slot, blk, &here.and_not(&free));
        for i in wm.iter() {
            blk.pages[i].resident.remove(Proc::Device(d));
        }
    }
    result
}

/// Drops the data of `m` everywhere: the next touch reads zeros. Pages a device refuses to unmap
/// are left exactly as they were (its copy, its mapping, the CPU's copy): the device may still
/// reach them, so dropping them would let it read and write data nobody else sees. The refusal
/// is returned after the other pages are dropped.
pub(crate) fn discard(space: &AddressSpace, region: &Region, blk: &mut Block, m: &PageMask) -> Result<()> {
    // A whole-block device cannot drop part of a block: bring the block home first, so the pages
    // outside `m` keep their data.
    let devs = device_holders(blk, m);
    let partial = m.count() < blk.npages;
    if partial && devs.devices().any(|d| space.holder(d).is_ok_and(|s| whole_blocks(&s))) {
        to_cpu(space, region, blk, m)?;
    }
    // Unmap everywhere first; only then is it known which pages can go.
    let mapped = devices_reaching(blk, m);
    let mut kept = PageMask::default();
    let mut result = Ok(());
    for d in mapped.devices() {
        let Ok(slot) = space.holder(d) else { continue };
        let wm = widen(blk, &slot, m);
        if let Err(e) = unmap_on(space, blk, &slot, &wm) {
            log::error!("DontNeed: device {d:?} refused to unmap {} pages of block {:#x}: {e}", wm.count(), blk.base);
            let me = Proc::Device(d);
            kept = kept.or(&select(blk, &wm, |p| p.resident.has(me) || p.dev_mapped.has(me)));
            result = result.and(Err(e));
        }
    }
    // A whole-block device holds a whole block or nothing: where a refusal keeps some pages of
    // a block one holds, the whole range is kept (as it was, but unmapped: the next access maps
    // it again). Freeing the rest of its chunk left it holding a piece it could neither map nor
    // fill again (found by an audit).
    if !kept.is_empty() && devs.devices().any(|d| space.holder(d).is_ok_and(|s| whole_blocks(&s))) {
        kept = kept.or(m);
    }
    let m = &m.and_not(&kept);
    let rs = ranges(blk, m);
    // The CPU side first: had the device copies gone before it failed, a page whose only
    // current copy was a device's would have read its stale host bytes.
    let discarded = region.cpu.discard(&rs);
    // The backing is new pages (in part, if the discard failed): a device that pinned the old
    // ones pins these.
    for slot in space.holders() {
        slot.mmu.host_discarded(&rs);
    }
    if let Err(e) = discarded {
        // Part of the host backing may be dropped. A page the CPU holds keeps that copy alone
        // (its data or zeros, whichever the CPU reads now), so that no device's copy differs
        // from it; a page only devices hold keeps their copies (unmapped above: the next access
        // maps them again).
        free_unmapped_copies(space, blk, &select(blk, m, |p| p.resident.has(Proc::Cpu)), mapped);
        return Err(e.into());
    }
    free_unmapped_copies(space, blk, m, mapped);
    for i in m.iter() {
        blk.pages[i] = crate::block::Page::default();
    }
    result
}

/// Frees the copies the devices of `devs` hold of the pages of `m` (which none of them maps).
fn free_unmapped_copies(space: &AddressSpace, blk: &mut Block, m: &PageMask, devs: ProcMask) {
    for d in devs.devices() {
        let Ok(slot) = space.holder(d) else { continue };
        let here = select(blk, m, |p| p.resident.has(Proc::Device(d)));
        release_device_pages(&slot, blk, &here);
    }
    for i in m.iter() {
        blk.pages[i].resident.0 &= ProcMask::only(Proc::Cpu).0;
    }
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
    match bulk_start(space, region, blocks, slot, dup)? {
        Some(mv) => bulk_finish(space, region, blocks, slot, mv),
        None => Ok(0),
    }
}

/// A [`bulk_to_device`] whose copies are in flight: [`bulk_start`] made it, [`bulk_finish`] waits
/// for the copies and maps. In between, the caller keeps the blocks locked and may start the
/// next batch, so the device copies one batch while the CPU revokes the next (explicit
/// migration pipelines its batches this way).
#[derive(Debug)]
pub(crate) struct BulkMove {
    chosen: Vec<PageMask>,
    dup: bool,
    entries: Vec<MapEntry>,
    /// Already mapped on the device (a device that cannot fault maps before its copies).
    mapped: bool,
    done: Option<Copies>,
    /// The wait for `done` failed: the copies may still write the chosen device pages.
    in_flight: bool,
    bytes: Filled,
}

impl BulkMove {
    /// For each of `blocks` (those given to [`bulk_start`]), whether the move takes every page
    /// of it for the device alone: once committed, nothing is left for the per-block pass.
    pub(crate) fn whole(&self, blocks: &[&mut Block]) -> Vec<bool> {
        let mut whole: Vec<bool> =
            blocks.iter().zip(&self.chosen).map(|(b, sel)| !self.dup && sel.count() == b.npages).collect();
        whole.resize(blocks.len(), false);
        whole
    }
}

impl Drop for BulkMove {
    /// Only on a path that skipped [`bulk_finish`] (a panic).
    fn drop(&mut self) {
        abandon(self.done.take());
    }
}

/// Copies whose owner goes without waiting (a panic path): never leave them running into memory
/// that may be reused; bounded like every wait, and leaked if they do not finish.
fn abandon(done: Option<Copies>) {
    if let Some(mut d) = done {
        if d.wait(std::time::Duration::from_secs(60)).is_err() {
            std::mem::forget(d);
        }
    }
}

/// Waits for copies in flight, bounded. If the wait fails a copy may still run: the region's
/// CPU side is leaked so the memory it touches is never unmapped.
fn wait_copies(space: &AddressSpace, region: &Region, device: DeviceId, mut done: Copies) -> Result<()> {
    let t = Instant::now();
    let r = done.wait(space.config.copy_timeout);
    add_since(&space.stats.ns_copy, t);
    r.map_err(|source| {
        region.keep_alive_forever();
        std::mem::forget(done);
        CoreError::Device { device, source }
    })
}

/// The first half of [`bulk_to_device`]: chooses and allocates, revokes the CPU's access and
/// submits the copies. `None` when no page was taken.
pub(crate) fn bulk_start(
    space: &AddressSpace,
    region: &Region,
    blocks: &mut [&mut Block],
    slot: &DeviceSlot,
    dup: bool,
) -> Result<Option<BulkMove>> {
    slot.attached()?;
    if region.remote {
        // Mirrored memory never moves: the fault path maps it remotely.
        return Ok(None);
    }
    // A whole-block device maps a block with one access: no per-page read-only copies.
    let dup = dup && !whole_blocks(slot);
    // Choose pages and allocate, block by block, until memory runs out.
    let mut chosen: Vec<PageMask> = Vec::new();
    for blk in blocks.iter_mut() {
        let full = PageMask::full(blk.npages);
        let mut sel = select(blk, &full, |p| {
            (p.resident.is_empty() || p.resident == ProcMask::only(Proc::Cpu)) && p.dev_mapped.is_empty()
        });
        if whole_blocks(slot) && sel != full {
            // Part of the block is elsewhere: left to the per-block path.
            sel = PageMask::default();
        }
        // Speculative: a whole block that would be scattered (`whole_chunks`) is left to the fault
        // path, which may evict to give it a chunk.
        let chunk_only = space.config.policy.whole_chunks && sel.count() == PAGES_PER_BLOCK;
        let Some(pas) = try_alloc(slot, blk, sel.count(), chunk_only) else { break };
        blk.set_pas(slot.id, sel.iter().zip(pas));
        if !sel.is_empty() {
            enqueue(region, blk, slot);
        }
        chosen.push(sel);
    }
    if chosen.iter().all(PageMask::is_empty) {
        return Ok(None);
    }
    let blocks = &mut blocks[..chosen.len()];
    match bulk_submit(space, region, blocks, &chosen, slot, dup) {
        Ok(Submitted { entries, mapped, done, bytes }) => {
            Ok(Some(BulkMove { chosen, dup, entries, mapped, done, in_flight: false, bytes }))
        }
        Err(e) => {
            for (blk, sel) in blocks.iter_mut().zip(&chosen) {
                release_device_pages(slot, blk, sel);
            }
            Err(e)
        }
    }
}

/// The second half of [`bulk_to_device`]: waits for the copies (bounded), maps, and records the
/// new residency. `blocks` are the ones given to [`bulk_start`], still locked. Returns the pages
/// moved.
pub(crate) fn bulk_finish(
    space: &AddressSpace,
    region: &Region,
    blocks: &mut [&mut Block],
    slot: &DeviceSlot,
    mut mv: BulkMove,
) -> Result<u64> {
    let r = bulk_wait_and_map(space, region, slot, &mut mv);
    bulk_commit(region, blocks, slot, mv, r)
}

/// Waits for a [`BulkMove`]'s copies (bounded) and maps its pages on the device. Touches no
/// block: it may run on another thread while the caller revokes the next batch.
pub(crate) fn bulk_wait_and_map(
    space: &AddressSpace,
    region: &Region,
    slot: &DeviceSlot,
    mv: &mut BulkMove,
) -> Result<()> {
    if let Some(done) = mv.done.take() {
        let r = wait_copies(space, region, slot.id, done);
        mv.in_flight = r.is_err();
        r?;
    }
    if !mv.mapped {
        let t = Instant::now();
        // SAFETY: every target is device memory; no host address is mapped.
        let r = unsafe { slot.mmu.map(&mv.entries) };
        add_since(&space.stats.ns_map, t);
        r.map_err(dev_err(slot.id))?;
    }
    // Counted once the move stands: a failed map gives the pages back, and a retry copies again.
    add(&space.stats.bytes_to_device, mv.bytes.host);
    add(&space.stats.bytes_zero_filled, mv.bytes.zero);
    Ok(())
}

/// Records what [`bulk_wait_and_map`] did (`r`, its result) in the blocks: the new residency,
/// or, if it failed, the device pages given back (the pages stay the CPU's; their CPU mappings
/// are gone, so the next access maps them). Returns the pages moved.
pub(crate) fn bulk_commit(
    region: &Region,
    blocks: &mut [&mut Block],
    slot: &DeviceSlot,
    mv: BulkMove,
    r: Result<()>,
) -> Result<u64> {
    let me = Proc::Device(slot.id);
    let blocks = &mut blocks[..mv.chosen.len()];
    if let Err(e) = r {
        if mv.mapped {
            unmap_entries(slot, &mv.entries, blocks, &mv.chosen);
        }
        for (blk, sel) in blocks.iter_mut().zip(&mv.chosen) {
            if mv.in_flight {
                forget_device_pages(slot, blk, sel);
            } else {
                release_device_pages(slot, blk, sel);
            }
        }
        return Err(e);
    }
    let mut moved = 0;
    for (blk, sel) in blocks.iter_mut().zip(&mv.chosen) {
        for i in sel.iter() {
            let p = &mut blk.pages[i];
            if mv.dup && p.resident.has(Proc::Cpu) {
                p.resident.insert(me);
                p.dev_ro.insert(me);
            } else {
                p.resident = ProcMask::only(me);
                // Mapped with the region's protection (read-only regions stay read-only).
                if device_prot(region).contains(Prot::WRITE) {
                    p.dev_ro.remove(me);
                } else {
                    p.dev_ro.insert(me);
                }
            }
            p.dev_mapped.insert(me);
        }
        // Already queued: `bulk_start` queued each block as it got its pages.
        moved += sel.count() as u64;
    }
    Ok(moved)
}

/// Revokes (or write-protects) the CPU's access to the chosen pages, one call each, and submits
/// their copies. On a device that cannot fault, the pages are also mapped there now, once the
/// CPU's access is taken: no kernel may use them before the migration returns, and the copies
/// then need no map of their own after them. Returns the map entries, whether they are mapped,
/// the copies' completion (none if there were no copies) and the bytes copied and zeroed.
///
/// Everything here runs on the calling thread. Taking the CPU's access on a helper thread while
/// this one mapped the device saved at most the map (about 30 us per 64 MiB batch on an H100,
/// the CUDA backend reusing its mappings) and cost 250-400 us per batch to start and join the
/// thread on that machine's VM: a quarter of a GiB's migration, with the CPU side the limit.
fn bulk_submit(
    space: &AddressSpace,
    region: &Region,
    blocks: &mut [&mut Block],
    chosen: &[PageMask],
    slot: &DeviceSlot,
    dup: bool,
) -> Result<Submitted> {
    // CPU access: write-protect what stays duplicated, revoke what moves; one call each, over
    // ranges merged across blocks (the blocks are in address order).
    let (mut wp, mut revoke) = (Vec::new(), Vec::new());
    for (blk, sel) in blocks.iter().zip(chosen) {
        let (mut wp_m, mut revoke_m) = (PageMask::default(), PageMask::default());
        for i in sel.iter() {
            let p = &blk.pages[i];
            match p.cpu {
                CpuMap::None => {}
                CpuMap::Read if dup && p.resident.has(Proc::Cpu) => {}
                CpuMap::Write if dup && p.resident.has(Proc::Cpu) => wp_m.set(i),
                _ => revoke_m.set(i),
            }
        }
        ranges(blk, &wp_m).into_iter().for_each(|r| push_merged(&mut wp, r));
        ranges(blk, &revoke_m).into_iter().for_each(|r| push_merged(&mut revoke, r));
    }
    // Every caller passes its blocks in address order; one that did not would still get each
    // range taken once, sorted and merged here.
    let (wp, revoke) =
        if wp.is_sorted() && revoke.is_sorted() { (wp, revoke) } else { (coalesce(wp), coalesce(revoke)) };
    let (mut ops, mut entries) = (Vec::new(), Vec::new());
    let mut bytes = Filled::default();
    let prot = device_prot(region);
    for (blk, sel) in blocks.iter().zip(chosen) {
        for (s, n, pa) in pa_runs(blk, slot.id, sel) {
            // Only pages the CPU holds or nobody does are chosen here: no peer sources.
            bytes.add(fill_ops(&mut ops, region, blk, s, n, pa, &Peers::new()));
            entries.push(MapEntry { va: blk.va(s), len: n as u64 * PAGE_SIZE, target: MapTarget::Device(pa), prot });
        }
    }
    // Duplicated pages are mapped read-only, moved ones read-write: split the entries by page.
    let entries = if dup { split_ro(blocks, chosen, slot, prot) } else { entries };
    let mapped = !slot.caps.replayable_faults;
    let t = Instant::now();
    count_raced(space, region.cpu.revoke(&revoke))?;
    count_raced(space, region.cpu.protect(&wp, false))?;
    add_since(&space.stats.ns_revoke, t);
    for (blk, sel) in blocks.iter_mut().zip(chosen) {
        for i in sel.iter() {
            let p = &mut blk.pages[i];
            if p.cpu != CpuMap::None && !(dup && p.resident.has(Proc::Cpu)) {
                p.cpu = CpuMap::None;
            } else if p.cpu == CpuMap::Write {
                p.cpu = CpuMap::Read;
            }
        }
    }
    if mapped {
        let t = Instant::now();
        // SAFETY: every target is device memory; no host address is mapped.
        let r = unsafe { slot.mmu.map(&entries) };
        add_since(&space.stats.ns_map, t);
        r.map_err(dev_err(slot.id))?;
    }
    if ops.is_empty() {
        return Ok(Submitted { entries, mapped, done: None, bytes });
    }
    let t = Instant::now();
    // `bulk_finish` waits for the completion (so does a `BulkMove` dropped unfinished); a failed
    // wait leaks the region's CPU side.
    // SAFETY: host addresses are `region.cpu.backing()` of this region's pages, mapped while
    // `region` lives and, after a failed wait, forever; the copies are waited for (above).
    let done = unsafe { slot.mmu.copy(&ops) }.map_err(dev_err(slot.id));
    add_since(&space.stats.ns_copy, t);
    if done.is_err() && mapped {
        unmap_entries(slot, &entries, blocks, chosen);
    }
    Ok(Submitted { entries, mapped, done: Some(done?), bytes })
}

/// Appends `r` to `v`, merged with the last range where they meet.
fn push_merged(v: &mut Vec<VaRange>, r: VaRange) {
    match v.last_mut() {
        Some(l) if l.end() == r.start => l.len += r.len,
        _ => v.push(r),
    }
}

/// What [`bulk_submit`] did.
struct Submitted {
    entries: Vec<MapEntry>,
    mapped: bool,
    done: Option<Copies>,
    bytes: Filled,
}

/// Undoes a map of `entries` whose device pages are about to be given back (a failed bulk
/// move). If the device refuses, the pages must not be reused while it may still map them: they
/// are forgotten instead (leaked: never freed, never mapped again), and the mapping stays
/// recorded, as `drop_device_copies` leaves a refused one, so that a later unmap tries again.
fn unmap_entries(slot: &DeviceSlot, entries: &[MapEntry], blocks: &mut [&mut Block], chosen: &[PageMask]) {
    let rs: Vec<VaRange> = entries.iter().map(|e| VaRange::new(e.va, e.len)).collect();
    if let Err(e) = slot.mmu.unmap(&rs) {
        log::error!("undoing a failed bulk move on {:?}: {e}", slot.id);
        let me = Proc::Device(slot.id);
        for (blk, sel) in blocks.iter_mut().zip(chosen) {
            forget_device_pages(slot, blk, sel);
            for i in sel.iter() {
                blk.pages[i].dev_mapped.insert(me);
            }
        }
    }
    slot.mmu.invalidate_tlb(&rs);
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

/// Where a fill takes one page from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The CPU's copy (host backing).
    Cpu,
    /// A peer's copy (index into the fill's peers).
    Peer(usize),
    /// Never written: zeros.
    Zero,
}

/// Appends the copies that fill pages `s..s + n` of `blk` on the device, physically contiguous
/// from `pa`: from the CPU's copy where it has one, else from a peer of `peers` holding it, else
/// zeros (never-written pages), one op per piece of the same kind.
fn fill_ops(
    ops: &mut Vec<CopyOp>,
    region: &Region,
    blk: &Block,
    s: usize,
    n: usize,
    pa: PhysAddr,
    peers: &Peers,
) -> Filled {
    let source = |k: usize| {
        let r = blk.pages[k].resident;
        if r.has(Proc::Cpu) {
            return Source::Cpu;
        }
        peers.iter().position(|(d, ..)| r.has(Proc::Device(*d))).map_or(Source::Zero, Source::Peer)
    };
    let mut f = Filled::default();
    let mut k = s;
    while k < s + n {
        let from = source(k);
        let mut e = k + 1;
        while e < s + n && source(e) == from {
            e += 1;
        }
        let dst = PhysAddr(pa.0 + (k - s) as u64 * PAGE_SIZE);
        let len = (e - k) as u64 * PAGE_SIZE;
        match from {
            Source::Cpu => {
                push_host_copies(ops, region, blk.va(k), dst, len);
                f.host += len;
            }
            Source::Peer(j) => {
                let (d, w, _) = &peers[j];
                let runs = pa_runs(blk, *d, &page_range(k, e));
                // A holder has a physical page for every page it holds.
                debug_assert_eq!(runs.iter().map(|r| r.1).sum::<usize>(), e - k);
                for (s2, n2, src) in runs {
                    let to = PhysAddr(dst.0 + (s2 - k) as u64 * PAGE_SIZE);
                    push_op(ops, CopyOp::PeerToDevice { src: w.addr(src), dst: to, len: n2 as u64 * PAGE_SIZE });
                }
                f.peer += len;
            }
            Source::Zero => {
                push_op(ops, CopyOp::Zero { dst, len });
                f.zero += len;
            }
        }
        k = e;
    }
    f
}

/// The pages `s..e` as a mask.
fn page_range(s: usize, e: usize) -> PageMask {
    let mut m = PageMask::default();
    m.set_range(s, e);
    m
}

/// Appends the copies of `len` bytes of the CPU's copy at `va` to device memory at `dst`: one op,
/// since backing is linear over a region (`CpuMmu::backing`); page by page should an
/// implementation break that.
fn push_host_copies(ops: &mut Vec<CopyOp>, region: &Region, va: u64, dst: PhysAddr, len: u64) {
    let (first, last) = (region.cpu.backing(va), region.cpu.backing(va + len - PAGE_SIZE));
    if first.0 as u64 + (len - PAGE_SIZE) == last.0 as u64 {
        push_op(ops, CopyOp::HostToDevice { src: first, dst, len });
        return;
    }
    for k in 0..len / PAGE_SIZE {
        let off = k * PAGE_SIZE;
        push_op(
            ops,
            CopyOp::HostToDevice { src: region.cpu.backing(va + off), dst: PhysAddr(dst.0 + off), len: PAGE_SIZE },
        );
    }
}

/// Appends a copy op, merging it with the previous one when both are contiguous.
fn push_op(ops: &mut Vec<CopyOp>, op: CopyOp) {
    match (ops.last_mut(), op) {
        (Some(CopyOp::HostToDevice { src, dst, len }), CopyOp::HostToDevice { src: s2, dst: d2, len: l2 })
            if src.0 + *len as usize == s2.0 && dst.0 + *len == d2.0 =>
        {
            *len += l2;
        }
        (Some(CopyOp::PeerToDevice { src, dst, len }), CopyOp::PeerToDevice { src: s2, dst: d2, len: l2 })
            if src.0 + *len == s2.0 && dst.0 + *len == d2.0 =>
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

/// Whole blocks coming home for the CPU (read-ahead, explicit migration), copies in flight,
/// device by device: the pages each device holds alone (now unmapped or read-only there) and
/// the copies' completion.
#[derive(Debug)]
pub(crate) struct HomeMove {
    dup: bool,
    per_device: Vec<FromDevice>,
    /// Per block: every page on a device is there alone (none is also the CPU's), and no
    /// duplicates stay, so once finished no device holds any of its pages.
    whole: Vec<bool>,
}

impl HomeMove {
    /// Per block given to [`bulk_home_start`]: whether, once finished, the per-block pass has
    /// nothing left to do there.
    pub(crate) fn whole(&self) -> &[bool] {
        &self.whole
    }
}

/// A batch of copies in flight.
type Copies = Box<dyn crate::device::Completion>;

/// One device's part of a [`HomeMove`]: the device, the pages taken from it and, of those, the
/// ones it copies home (per block), and its copies in flight.
type FromDevice = (Arc<DeviceSlot>, Vec<PageMask>, Vec<PageMask>, Option<Copies>);

impl Drop for HomeMove {
    /// As for [`BulkMove`]: only reached when [`bulk_home_finish`] was skipped.
    fn drop(&mut self) {
        for (.., done) in &mut self.per_device {
            abandon(done.take());
        }
    }
}

/// Starts bringing whole blocks home for the CPU (the CPU read-ahead, explicit migration): one
/// device unmap (or write-protect, for duplicates: `dup` keeps device copies beside the CPU's)
/// and TLB invalidation per device, one batch of copies per device: for each device holding
/// pages of `blocks` alone, takes its write access and submits the copies home.
pub(crate) fn bulk_home_start(
    space: &AddressSpace,
    region: &Region,
    blocks: &mut [&mut Block],
    dup: bool,
) -> Result<HomeMove> {
    for blk in blocks.iter_mut() {
        let all = PageMask::full(blk.npages);
        unmap_peer_maps(space, blk, &all)?;
    }
    let mut devs = ProcMask::EMPTY;
    for blk in blocks.iter() {
        for p in &blk.pages {
            if !p.resident.has(Proc::Cpu) {
                devs.0 |= p.resident.0 & !1;
            }
        }
    }
    let whole = blocks
        .iter()
        .map(|b| !dup && b.pages.iter().all(|p| !p.resident.has(Proc::Cpu) || p.resident.0 & !1 == 0))
        .collect();
    let mut mv = HomeMove { dup, per_device: Vec::new(), whole };
    // A page several devices hold (read duplicates) is copied home from the first of them.
    let mut copied = vec![PageMask::default(); blocks.len()];
    for d in devs.devices() {
        let slot = space.holder(d)?;
        let me = Proc::Device(d);
        let here: Vec<PageMask> = blocks
            .iter()
            .map(|b| select(b, &PageMask::full(b.npages), |p| p.resident.has(me) && !p.resident.has(Proc::Cpu)))
            .collect();
        let copy: Vec<PageMask> = here.iter().zip(&copied).map(|(h, c)| h.and_not(c)).collect();
        for (c, k) in copied.iter_mut().zip(&copy) {
            *c = c.or(k);
        }
        // Nobody may write while the copy runs: device mappings go read-only (dup) or away.
        let mut rs = Vec::new();
        for (blk, m) in blocks.iter().zip(&here) {
            rs.extend(ranges(blk, &select(blk, m, |p| p.dev_mapped.has(me) && (!dup || !p.dev_ro.has(me)))));
        }
        // A whole-block device is given one block per range (it may coalesce them itself).
        let rs = if whole_blocks(&slot) { rs } else { coalesce(rs) };
        if !rs.is_empty() {
            let t = Instant::now();
            if dup {
                let prot: Vec<(VaRange, Prot)> = rs.iter().map(|r| (*r, Prot::READ)).collect();
                slot.mmu.protect(&prot).map_err(dev_err(d))?;
            } else {
                slot.mmu.unmap(&rs).map_err(dev_err(d))?;
            }
            slot.mmu.invalidate_tlb(&rs);
            add_since(&space.stats.ns_map, t);
        }
        for (blk, m) in blocks.iter_mut().zip(&here) {
            for i in m.iter() {
                let p = &mut blk.pages[i];
                if dup {
                    // Only a mapping is read-only: a page held but unmapped has none.
                    if p.dev_mapped.has(me) {
                        p.dev_ro.insert(me);
                    }
                } else {
                    p.dev_mapped.remove(me);
                    p.dev_ro.remove(me);
                }
            }
        }
        let mut ops = Vec::new();
        for (blk, m) in blocks.iter().zip(&copy) {
            for (s, n, pa) in pa_runs(blk, d, m) {
                ops.push(CopyOp::DeviceToHost {
                    src: pa,
                    dst: region.cpu.backing(blk.va(s)),
                    len: n as u64 * PAGE_SIZE,
                });
            }
        }
        let done = if ops.is_empty() {
            None
        } else {
            let t = Instant::now();
            // `bulk_home_finish` waits for the completion (so does a dropped `HomeMove`); a
            // failed wait leaks the region's CPU side.
            // SAFETY: host addresses are `region.cpu.backing()` of this region's pages, mapped
            // while `region` lives and, after a failed wait, forever; the copies are waited for.
            let r = unsafe { slot.mmu.copy(&ops) }.map_err(dev_err(d));
            add_since(&space.stats.ns_copy, t);
            Some(r?)
        };
        mv.per_device.push((slot, here, copy, done));
    }
    Ok(mv)
}

/// The second half of [`bulk_home_start`]: waits for the copies (bounded), then makes the CPU a
/// holder of the pages (the only one, unless `dup`). Returns the pages brought home. On a
/// failed wait the pages stay on their device, unmapped there (the next device access maps
/// them again).
pub(crate) fn bulk_home_finish(
    space: &AddressSpace,
    region: &Region,
    blocks: &mut [&mut Block],
    mut mv: HomeMove,
) -> Result<u64> {
    let mut moved = 0u64;
    for (slot, here, copy, done) in &mut mv.per_device {
        let me = Proc::Device(slot.id);
        if let Some(d) = done.take() {
            wait_copies(space, region, slot.id, d)?;
        }
        for ((blk, m), c) in blocks.iter_mut().zip(here.iter()).zip(copy.iter()) {
            add(&space.stats.bytes_to_host, c.count() as u64 * PAGE_SIZE);
            moved += c.count() as u64;
            if !mv.dup {
                release_device_pages(slot, blk, m);
            }
            for i in m.iter() {
                let p = &mut blk.pages[i];
                if !mv.dup {
                    p.resident.remove(me);
                }
                p.resident.insert(Proc::Cpu);
            }
        }
    }
    Ok(moved)
}

/// After [`bulk_home_finish`], for the read-ahead: never-written pages get zeroed backing, then
/// the CPU maps every page of `blocks` it lacks (read-only where a device keeps a copy). Returns
/// the pages that got backing.
pub(crate) fn map_home(region: &Region, blocks: &mut [&mut Block]) -> Result<u64> {
    let empty: Vec<PageMask> =
        blocks.iter().map(|b| select(b, &PageMask::full(b.npages), |p| p.resident.is_empty())).collect();
    let rs = blocks.iter().zip(&empty).flat_map(|(b, e)| ranges(b, e)).collect();
    region.cpu.populate(&coalesce(rs))?;
    let mut moved = 0;
    for (blk, e) in blocks.iter_mut().zip(&empty) {
        for i in e.iter() {
            blk.pages[i].resident.insert(Proc::Cpu);
        }
        moved += e.count() as u64;
    }
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

#[cfg(test)]
mod whole_block_tests {
    //! The rule for devices without 4 KiB pages (CUDA's VMM maps 2 MiB at a time), with a fake
    //! device that refuses anything but whole 2 MiB chunks.

    use std::sync::Arc;
    use std::time::Duration;

    use parking_lot::Mutex;

    use crate::cpu::CpuFaultHandler;
    use crate::device::*;
    use crate::space::{AddressSpace, AttachOptions, CoreConfig};
    use crate::testing::{run_copies, PlainCpu};
    use crate::types::*;

    /// Accepts only whole blocks (from a 2 MiB boundary or the region's start, to the next
    /// boundary or the region's end) whose device pages sit at their 2 MiB window offsets in
    /// one chunk, as CUDA maps chunks; records what it was asked.
    #[derive(Debug)]
    struct Dev {
        mem: Mutex<Vec<u8>>,
        /// Device-to-host copies fail while set.
        fail_d2h: std::sync::atomic::AtomicBool,
        host: Arc<Mutex<Vec<u8>>>,
        maps: Mutex<Vec<MapEntry>>,
        unmaps: Mutex<Vec<VaRange>>,
        /// Region hook calls: (added?, range).
        hooks: Mutex<Vec<(bool, VaRange)>>,
        /// Host ranges discarded.
        discarded: Mutex<Vec<VaRange>>,
    }

    impl Dev {
        /// The regions it was told of and not told gone.
        fn regions(&self) -> Vec<VaRange> {
            let mut live = Vec::new();
            for &(added, r) in self.hooks.lock().iter() {
                if added {
                    live.push(r);
                } else {
                    live.retain(|l: &VaRange| l.start != r.start);
                }
            }
            live
        }

        /// A whole block: from its 2 MiB boundary or its region's start, to the next boundary
        /// or the region's end.
        fn check(&self, va: u64, len: u64) -> Result<(), DeviceError> {
            let end = va + len;
            let bad = DeviceError::BadRange(VaRange::new(va, len));
            let region = self.regions().into_iter().find(|r| r.contains(va)).ok_or(bad.clone())?;
            let start_ok = va.is_multiple_of(BLOCK_SIZE) || va == region.start;
            let end_ok = end.is_multiple_of(BLOCK_SIZE) || end == region.end();
            let one_window = len > 0 && align_down(va, BLOCK_SIZE) == align_down(end - 1, BLOCK_SIZE);
            if !start_ok || !end_ok || !one_window {
                return Err(bad);
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
                peer: None,
                region_bound: true,
                memory_bytes: self.mem.lock().len() as u64,
            }
        }
        fn physical_ranges(&self) -> Vec<(PhysAddr, u64)> {
            vec![(PhysAddr(0), self.mem.lock().len() as u64)]
        }
        fn create_page_table(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        unsafe fn destroy_page_table(&self) {}
        unsafe fn map(&self, entries: &[MapEntry]) -> Result<(), DeviceError> {
            for e in entries {
                self.check(e.va, e.len)?;
                match e.target {
                    // The chunk is mapped whole at the 2 MiB window: each page at its offset there.
                    MapTarget::Device(pa) if pa.0 % BLOCK_SIZE == e.va % BLOCK_SIZE => {}
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
            let fail = self.fail_d2h.load(std::sync::atomic::Ordering::SeqCst);
            run_copies(&mut self.mem.lock(), &mut self.host.lock(), ops, fail, &[])?;
            Ok(Box::new(Done))
        }
        fn fetch_faults(&self, _: usize, _: &mut Vec<DeviceFault>) -> usize {
            0
        }
        fn wait_for_faults(&self, t: Duration) -> bool {
            std::thread::sleep(t.min(Duration::from_millis(1)));
            false
        }
        fn replay(&self, _: &[(u64, crate::types::Access, FaultCancel)]) {}
        fn shutdown_faults(&self) {}
        fn region_added(&self, app: VaRange, _: HostAddr) -> Result<(), DeviceError> {
            if app.len == PAGE_SIZE {
                return Err(DeviceError::Other("refused".into()));
            }
            self.hooks.lock().push((true, app));
            Ok(())
        }
        fn region_removed(&self, app: VaRange) {
            self.hooks.lock().push((false, app));
        }
        fn host_discarded(&self, ranges: &[VaRange]) {
            self.discarded.lock().extend_from_slice(ranges);
        }
    }

    const BASE: u64 = 0x4000_0000;

    /// A region of two whole blocks and a partial third one (3 pages); a device of `chunks`.
    type World = (Arc<AddressSpace>, Arc<Dev>, DeviceId, Arc<Mutex<Vec<u8>>>);

    fn setup(chunks: u64) -> World {
        setup_at(VaRange::new(BASE, 2 * BLOCK_SIZE + 3 * PAGE_SIZE), chunks)
    }

    /// A region at `region` whose page `p` holds `p ^ 0x5a`, every page written by the CPU; a
    /// device of `chunks`.
    fn setup_at(region: VaRange, chunks: u64) -> World {
        let host = (0..region.len).map(|i| (i / PAGE_SIZE) as u8 ^ 0x5a).collect::<Vec<u8>>();
        let host = Arc::new(Mutex::new(host));
        // No CPU read-ahead: the set-up's sequential faults ask it for the next blocks, and on a
        // loaded machine it brought them home after the test had moved them to the device (a
        // copy home the test made fail then had nothing to copy).
        let mut cfg = CoreConfig::default();
        cfg.policy.cpu_readahead = false;
        let space = AddressSpace::new(cfg);
        let cpu = Arc::new(PlainCpu::new(region));
        space.add_region(cpu, Prot::READ | Prot::WRITE).unwrap();
        // The CPU wrote every page (one fault per block with the default 2 MiB fault-around).
        for va in std::iter::once(region.start)
            .chain((align_up(region.start + 1, BLOCK_SIZE).unwrap()..region.end()).step_by(BLOCK_SIZE as usize))
        {
            space.cpu_fault(va, Access::Write).unwrap();
        }
        let dev = Arc::new(Dev {
            mem: Mutex::new(vec![0; (chunks * BLOCK_SIZE) as usize]),
            fail_d2h: false.into(),
            host: Arc::clone(&host),
            maps: Mutex::new(Vec::new()),
            unmaps: Mutex::new(Vec::new()),
            hooks: Mutex::new(Vec::new()),
            discarded: Mutex::new(Vec::new()),
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

    /// A region starting inside a 2 MiB window (memory a program registers): its first block's
    /// pages sit at their window offsets in the chunk, which the device maps whole at the
    /// window, and the chunk's slack before them and after the region's end comes back with it.
    #[test]
    fn a_region_starting_inside_a_window_keeps_its_pages_at_their_offsets() {
        for region in
            [VaRange::new(BASE + 5 * PAGE_SIZE, 2 * BLOCK_SIZE), VaRange::new(BASE + 5 * PAGE_SIZE, 3 * PAGE_SIZE)]
        {
            let (space, dev, id, host) = setup_at(region, 4);
            let expect = |h: &[u8]| (0..region.len).all(|i| h[i as usize] == (i / PAGE_SIZE) as u8 ^ 0x5a);
            let mut first_pa = None;
            for round in 0..2 {
                space.migrate(region.start, region.len, Proc::Device(id)).unwrap();
                let maps = std::mem::take(&mut *dev.maps.lock());
                let blocks =
                    (align_up(region.end(), BLOCK_SIZE).unwrap() - align_down(region.start, BLOCK_SIZE)) / BLOCK_SIZE;
                assert_eq!(maps.len() as u64, blocks, "one entry per block: {maps:?}");
                assert_eq!(maps.iter().map(|e| e.len).sum::<u64>(), region.len);
                let MapTarget::Device(pa) = maps[0].target else { panic!("{maps:?}") };
                assert_eq!((maps[0].va, pa.0 % BLOCK_SIZE), (region.start, 5 * PAGE_SIZE));
                // The block takes its chunk again when it comes back.
                assert_eq!(*first_pa.get_or_insert(pa), pa, "round {round}");
                assert_eq!(space.device_memory(id).unwrap().0, (4 - blocks) * BLOCK_SIZE);
                // Only the device holds the data now.
                host.lock().fill(0);
                space.migrate(region.start, region.len, Proc::Cpu).unwrap();
                assert!(expect(&host.lock()), "round {round}: the data came home intact");
                assert_eq!(space.device_memory(id).unwrap().0, 4 * BLOCK_SIZE, "every chunk came back whole");
            }
        }
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
    fn blocks_a_launch_gets_ready_are_not_evicted_from_a_device_that_cannot_fault() {
        let (space, _dev, id, _host) = setup(2);
        // A job alone (a launched kernel not yet waited for) pins nothing.
        let running = space.job_begin(&[VaRange::new(BASE, 3 * BLOCK_SIZE)]);
        let job = [VaRange::new(BASE, BLOCK_SIZE)];
        space.launch_prepare(&job);
        let job2 = [VaRange::new(BASE + 2 * BLOCK_SIZE, PAGE_SIZE)];
        space.launch_prepare(&job2);
        space.migrate(BASE, BLOCK_SIZE, Proc::Device(id)).unwrap();
        space.migrate(BASE + BLOCK_SIZE, BLOCK_SIZE, Proc::Device(id)).unwrap();
        // The third block needs a chunk: the first (oldest) is getting ready for a launch, so
        // the second goes (neither the fault path nor the background evictor may take it).
        space.migrate(BASE + 2 * BLOCK_SIZE, PAGE_SIZE, Proc::Device(id)).unwrap();
        assert!(resident_on_dev(&space, id, BASE));
        assert!(!resident_on_dev(&space, id, BASE + BLOCK_SIZE));
        // With every resident block getting ready for a launch, nothing can make room.
        let e = space.migrate(BASE + BLOCK_SIZE, BLOCK_SIZE, Proc::Device(id)).unwrap_err();
        assert!(matches!(e, crate::error::CoreError::OutOfDeviceMemory { .. }), "{e}");
        space.launch_ready(&job);
        space.migrate(BASE + BLOCK_SIZE, BLOCK_SIZE, Proc::Device(id)).unwrap();
        assert!(!resident_on_dev(&space, id, BASE), "once launched, its block could go");
        space.launch_ready(&job2);
        space.job_end(&running);
    }

    #[test]
    fn devices_hear_of_every_region_once() {
        let (space, dev, id, _host) = setup(2);
        let first = VaRange::new(BASE, 2 * BLOCK_SIZE + 3 * PAGE_SIZE);
        // Attached after the region existed: told at attach.
        assert_eq!(*dev.hooks.lock(), vec![(true, first)]);
        let second = VaRange::new(BASE + 4 * BLOCK_SIZE, BLOCK_SIZE);
        space.add_region(Arc::new(PlainCpu::new(second)), Prot::READ).unwrap();
        // A device refusing a region refuses it for the address space.
        let refused = VaRange::new(BASE + 8 * BLOCK_SIZE, PAGE_SIZE);
        let e = space.add_region(Arc::new(PlainCpu::new(refused)), Prot::READ).unwrap_err();
        assert!(matches!(e, crate::error::CoreError::Device { .. }), "{e}");
        assert!(space.check_range(refused.start, PAGE_SIZE).is_err());
        space.remove_region(second.start).unwrap();
        space.detach(id).unwrap();
        assert_eq!(*dev.hooks.lock(), vec![(true, first), (true, second), (false, second), (false, first)]);
    }

    /// The program's own discard (`MADV_REMOVE` punches the host backing, and raises the event
    /// `MADV_DONTNEED` does) tells every device, once for the whole range across blocks, before
    /// device data comes home: a device that pinned the old host pages for DMA copied into pages
    /// nobody saw any more (and one pinning several blocks per piece, told per block, unpinned
    /// and pinned each piece again for every block).
    #[test]
    fn the_programs_discard_tells_the_devices_their_host_pages_changed() {
        let (space, dev, id, _host) = setup(2);
        space.migrate(BASE, BLOCK_SIZE, Proc::Device(id)).unwrap();
        let gone = VaRange::new(BASE + BLOCK_SIZE - PAGE_SIZE, 2 * PAGE_SIZE);
        space.apply_cpu_event(crate::invalidate::CpuEvent::Discard(gone)).unwrap();
        assert_eq!(*dev.discarded.lock(), [gone]);
    }

    #[test]
    fn discarding_part_of_a_block_keeps_the_rest() {
        let (space, dev, id, host) = setup(2);
        space.migrate(BASE, BLOCK_SIZE, Proc::Device(id)).unwrap();
        // The host copy is stale: only the device holds the data now.
        host.lock()[..BLOCK_SIZE as usize].fill(0);
        let gone = VaRange::new(BASE + 10 * PAGE_SIZE, 2 * PAGE_SIZE);
        space.advise(gone.start, gone.len, crate::Advice::DontNeed).unwrap().wait(Duration::from_secs(5)).unwrap();
        assert_eq!(*dev.discarded.lock(), vec![gone]);
        assert_eq!(*dev.unmaps.lock(), vec![VaRange::new(BASE, BLOCK_SIZE)]);
        let h = host.lock();
        assert!((0..BLOCK_SIZE)
            .filter(|i| !gone.contains(BASE + i))
            .all(|i| h[i as usize] == (i / PAGE_SIZE) as u8 ^ 0x5a));
        drop(h);
        assert_eq!(space.device_memory(id).unwrap().0, 2 * BLOCK_SIZE);
    }

    /// A DontNeed of a block a whole-block device holds, while another device refuses to unmap
    /// two pages it duplicates, leaves the whole-block device holding all of the block or none
    /// of it. (Found by an audit: it freed 510 pages of its chunk and kept 2, and the block
    /// could not be mapped there again.)
    #[test]
    fn a_refusal_elsewhere_leaves_a_whole_block_device_its_whole_block() {
        use std::sync::atomic::Ordering::Relaxed;
        let (space, _dev, id, host) = setup(4);
        let fake = Arc::new(crate::testing::FakeDevice::new(4 * BLOCK_SIZE as usize, 0xEE, Arc::clone(&host)));
        let d1 = space.attach(Arc::clone(&fake) as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
        space.migrate(BASE, BLOCK_SIZE, Proc::Device(id)).unwrap();
        space.advise(BASE, 2 * PAGE_SIZE, crate::Advice::ReadMostly(true)).unwrap();
        space.migrate(BASE, 2 * PAGE_SIZE, Proc::Device(d1)).unwrap();
        let p0 = space.page_state(BASE).unwrap();
        assert!(p0.resident.has(Proc::Device(id)) && p0.resident.has(Proc::Device(d1)), "{p0:?}");
        let free0 = space.device_memory(id).unwrap().0;
        fake.fail_unmap.store(true, Relaxed);
        let r = space.advise(BASE, BLOCK_SIZE, crate::Advice::DontNeed).map(drop);
        fake.fail_unmap.store(false, Relaxed);
        assert!(r.is_err(), "the refusal is returned");
        let n = (0..PAGES_PER_BLOCK as u64)
            .filter(|p| space.page_state(BASE + p * PAGE_SIZE).unwrap().resident.has(Proc::Device(id)))
            .count();
        let free1 = space.device_memory(id).unwrap().0;
        let again = space.migrate(BASE, BLOCK_SIZE, Proc::Device(id));
        assert!(n == 0 || n == PAGES_PER_BLOCK, "the device holds {n} of 512 pages (free {free0} -> {free1})");
        assert!(again.is_ok(), "the block cannot go back to the device: {again:?}");
    }
    /// An munmap whose copy home fails (CUDA loses the region's mappings with it, not its
    /// memory): every block whose kept pages stay together in one block keeps its chunk, and
    /// the data comes home once copies work again; a block the munmap cuts in two cannot (its
    /// chunk would back two blocks), and the error says its data was lost.
    #[test]
    fn a_failed_copy_home_in_an_munmap_keeps_what_stays_in_one_block() {
        use std::sync::atomic::Ordering::SeqCst;
        let len = 2 * BLOCK_SIZE + 3 * PAGE_SIZE;
        let expect = |h: &[u8], off: u64| h[off as usize] == (off / PAGE_SIZE) as u8 ^ 0x5a;
        // The last page goes: every block keeps its pages in one piece.
        let (space, dev, id, host) = setup(4);
        space.migrate(BASE, len, Proc::Device(id)).unwrap();
        host.lock().fill(0);
        dev.fail_d2h.store(true, SeqCst);
        space.unmap_range(VaRange::new(BASE + len - PAGE_SIZE, PAGE_SIZE)).expect("nothing is lost");
        dev.fail_d2h.store(false, SeqCst);
        for va in [BASE, BASE + BLOCK_SIZE] {
            assert!(resident_on_dev(&space, id, va), "{va:#x}: {:?}", space.page_state(va));
        }
        // Mapped again whole at their windows (the fake checks each page's window offset).
        space.migrate(BASE, len - PAGE_SIZE, Proc::Device(id)).unwrap();
        space.migrate(BASE, len - PAGE_SIZE, Proc::Cpu).unwrap();
        let h = host.lock();
        assert!((0..len - PAGE_SIZE).all(|off| expect(&h, off)), "the kept pages came home intact");
        drop(h);
        assert_eq!(space.device_memory(id).unwrap().0, 4 * BLOCK_SIZE, "every chunk came back");

        // A page inside the first block goes: that block is cut in two and loses its data.
        let (space, dev, id, host) = setup(4);
        space.migrate(BASE, len, Proc::Device(id)).unwrap();
        host.lock().fill(0);
        dev.fail_d2h.store(true, SeqCst);
        let r = space.unmap_range(VaRange::new(BASE + 7 * PAGE_SIZE, PAGE_SIZE));
        dev.fail_d2h.store(false, SeqCst);
        assert!(r.is_err(), "the loss is reported");
        space.migrate(BASE + BLOCK_SIZE, len - BLOCK_SIZE, Proc::Cpu).unwrap();
        let h = host.lock();
        assert!((BLOCK_SIZE..len).all(|off| expect(&h, off)), "the blocks it did not cut came home intact");
    }
    /// An mremap whose copy home fails: the blocks that stay where they are keep their chunks
    /// (on a whole-chunk device the moved pages cannot keep theirs, and their loss is reported).
    /// All of the region's device data was lost (found by a review).
    #[test]
    fn a_failed_copy_home_in_an_mremap_keeps_the_blocks_that_stay() {
        use std::sync::atomic::Ordering::SeqCst;
        let len = 2 * BLOCK_SIZE + 3 * PAGE_SIZE;
        let (space, dev, id, host) = setup(4);
        space.migrate(BASE, len, Proc::Device(id)).unwrap();
        host.lock().fill(0);
        dev.fail_d2h.store(true, SeqCst);
        let (from, to) = (BASE + 2 * BLOCK_SIZE, BASE + 64 * BLOCK_SIZE);
        let cpu = Arc::new(PlainCpu::new(VaRange::new(to, 3 * PAGE_SIZE)));
        let r = space.remap_range(from, to, 3 * PAGE_SIZE, Some(cpu));
        dev.fail_d2h.store(false, SeqCst);
        assert!(r.is_err(), "the moved pages' loss is reported");
        for va in [BASE, BASE + BLOCK_SIZE] {
            assert!(resident_on_dev(&space, id, va), "{va:#x}: {:?}", space.page_state(va));
        }
        space.migrate(BASE, 2 * BLOCK_SIZE, Proc::Cpu).unwrap();
        let h = host.lock();
        assert!((0..2 * BLOCK_SIZE).all(|off| h[off as usize] == (off / PAGE_SIZE) as u8 ^ 0x5a), "data intact");
    }
}
