//! Device fault service: fetch a batch from the device's fault buffer, merge duplicates (the
//! most intrusive access wins), sort by block, service each block once under its lock (policy
//! decides per page: migrate, duplicate or map remotely, plus prefetch pages; `migrate` does it),
//! replay once for the batch, then prefetch whole blocks ahead when the faults walk blocks with
//! a stride. The blocks of a batch are serviced by several workers when the policy says so.

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use crate::attrs::RangeAttrs;
use crate::block::PageMask;
use crate::device::{DeviceFault, FaultCancel};
use crate::error::CoreError;
use crate::migrate;
use crate::policy::{select_residency, Decision, Reach, Thrashing};
use crate::space::{AddressSpace, DeviceSlot, Region};

use crate::stats::add;
use crate::types::{align_down, Access, DeviceId, Proc, ProcMask, Prot, VaRange, BLOCK_SIZE, PAGE_SIZE};

/// How long the service thread sleeps in the device's fault wait before re-checking for detach.
const POLL: Duration = Duration::from_millis(50);
/// A block refaulted within this long of its eviction counts as thrashing.
pub(crate) const THRASH_WINDOW_NS: u64 = 2_000_000_000;
/// Most blocks prefetched ahead of a strided walk.
const MAX_AHEAD: usize = 8;
/// Most blocks prefetched ahead while at least half the device's memory is free. A window of
/// 32 MiB or more is revoked from the CPU by moving its page-table entries into the manager's
/// alias (`hetmm_host`), so the copy engines read mapped pages instead of faulting each in:
/// `stream` at 2 GiB took 0.327-0.341 s against 0.362-0.380 s with 8 blocks (four runs of
/// each). Allowed at any free memory, the larger window took memory from blocks in use (graph
/// and gemm 12-17% slower at oversubscription 2); gated so, graph and random measured the same.
const MAX_AHEAD_ROOMY: usize = 32;

/// Fault-walk history of one region on one device, for cross-block prefetch.
#[derive(Debug, Default)]
pub(crate) struct Walk {
    recent: VecDeque<u64>,
    ahead: usize,
    write: bool,
}

/// Most fault entries the service thread makes room for up front.
const PREALLOC_FAULTS: usize = 4096;

/// The per-device service thread: runs until the device is detached or the address space is gone.
pub(crate) fn service_loop(space: Weak<AddressSpace>, slot: Arc<DeviceSlot>) {
    // `slot.batch` comes from the device's configuration (the sim's `fault_batch`, checked only
    // as non-zero): room for it all up front panicked (`usize::MAX`) or aborted the process on a
    // failed allocation (2^40). The vectors grow to what a fetch returns.
    let mut batch = Vec::with_capacity(slot.batch.min(PREALLOC_FAULTS));
    let mut stale = Vec::with_capacity(slot.batch.min(PREALLOC_FAULTS));
    let mut notices = Vec::new();
    while !slot.is_detached() {
        if !slot.mmu.wait_for_faults(POLL) {
            continue;
        }
        batch.clear();
        slot.mmu.fetch_faults(slot.batch, &mut batch);
        notices.clear();
        slot.mmu.take_access_notices(&mut notices);
        if batch.is_empty() && notices.is_empty() {
            continue;
        }
        let Some(space) = space.upgrade() else {
            slot.mmu.shutdown_faults();
            break;
        };
        // A bug in servicing must not end this thread, leaving the device's clients waiting
        // forever: a notice is dropped, a batch cancelled, and service goes on.
        if !notices.is_empty() {
            let run = std::panic::AssertUnwindSafe(|| service_notices(&space, &slot, &notices));
            if std::panic::catch_unwind(run).is_err() {
                log::error!("device {:?} access-notice service panicked; notices dropped", slot.id);
            }
        }
        if batch.is_empty() {
            continue;
        }
        let pages: Vec<u64> = batch.iter().map(|f| align_down(f.va, PAGE_SIZE)).collect();
        let run = std::panic::AssertUnwindSafe(|| service_batch(&space, &slot, &mut batch));
        let (cancel, serviced) = std::panic::catch_unwind(run).unwrap_or_else(|_| {
            log::error!("device {:?} fault service panicked; cancelling the batch", slot.id);
            add(&space.stats.cancelled_faults, pages.len() as u64);
            (pages.into_iter().map(|p| (p, Access::Read, FaultCancel::ServiceFailed)).collect(), Vec::new())
        });
        // UVM's BATCH_FLUSH: discard what queued up meanwhile before replaying. Those clients
        // retry and fault again if they still need service; entries left behind would be
        // serviced after their clients had already gone on (even after the kernel ended).
        let mut flushed = 0;
        while slot.mmu.fetch_faults(slot.batch, &mut stale) > 0 {
            flushed += stale.len();
            stale.clear();
        }
        add(&space.stats.device_faults, flushed as u64);
        add(&space.stats.flushed_faults, flushed as u64);
        slot.mmu.replay(&cancel);
        add(&space.stats.replays, 1);
        if space.config.policy.cross_block {
            plan_ahead(&space, &slot, &serviced);
        }
    }
}

/// A block serviced by a batch, and whether any of its faults wrote.
pub(crate) type Serviced = (u64, bool);

/// A fault to cancel: its page, the access refused (`Access::Read` refuses every access to the
/// page; see `DeviceMmu::replay`) and why.
pub(crate) type Cancel = (u64, Access, FaultCancel);

/// Services one batch; returns the faults to cancel and the blocks serviced.
pub(crate) fn service_batch(
    space: &AddressSpace,
    slot: &DeviceSlot,
    faults: &mut Vec<DeviceFault>,
) -> (Vec<Cancel>, Vec<Serviced>) {
    add(&space.stats.device_faults, faults.len() as u64);
    add(&space.stats.fault_batches, 1);
    let Ok(_gate) = space.enter() else {
        let cancel: Vec<_> =
            faults.iter().map(|f| (align_down(f.va, PAGE_SIZE), Access::Read, FaultCancel::Detached)).collect();
        add(&space.stats.cancelled_faults, cancel.len() as u64);
        return (cancel, Vec::new());
    };
    let _shape = space.reshape.read();
    let st = &space.stats;
    for f in faults.iter_mut() {
        f.va = align_down(f.va, PAGE_SIZE);
    }
    faults.sort_unstable_by_key(|f| (f.va, Reverse(f.access)));
    let before = faults.len();
    faults.dedup_by_key(|f| f.va);
    add(&st.duplicate_faults, (before - faults.len()) as u64);

    let mut groups: Vec<&[DeviceFault]> = Vec::new();
    let mut rest: &[DeviceFault] = faults;
    while let Some(first) = rest.first() {
        let base = align_down(first.va, BLOCK_SIZE);
        let n = rest.iter().take_while(|f| align_down(f.va, BLOCK_SIZE) == base).count();
        let (group, tail) = rest.split_at(n);
        groups.push(group);
        rest = tail;
    }
    let serviced: Vec<(u64, bool)> =
        groups.iter().map(|g| (align_down(g[0].va, BLOCK_SIZE), g.iter().any(|f| f.access >= Access::Write))).collect();
    let workers = space.config.policy.service_workers.clamp(1, groups.len().max(1));
    let cancel = Mutex::new(Vec::new());
    if workers == 1 {
        for g in &groups {
            service_block_caught(space, slot, g, &mut cancel.lock());
        }
    } else {
        // Blocks are independent: workers take them in order from a shared cursor. This thread
        // is one of them (starting a thread costs tens of microseconds here).
        let next = AtomicUsize::new(0);
        let work = || {
            let mut mine = Vec::new();
            while let Some(g) = groups.get(next.fetch_add(1, Ordering::Relaxed)) {
                service_block_caught(space, slot, g, &mut mine);
            }
            cancel.lock().extend(mine);
        };
        std::thread::scope(|s| {
            for _ in 1..workers {
                s.spawn(work);
            }
            work();
        });
    }
    let cancel = cancel.into_inner();
    add(&st.cancelled_faults, cancel.len() as u64);
    (cancel, serviced)
}

/// [`service_block`], a panic in it (a driver bug) cancelling only the faults of its block: the
/// batch's other blocks, served or not, are answered as they would have been (a panic cancelled
/// the whole batch, blocks already mapped included; found by an audit).
fn service_block_caught(space: &AddressSpace, slot: &DeviceSlot, group: &[DeviceFault], cancel: &mut Vec<Cancel>) {
    // What the block's service had refused before it panicked is dropped: the group is
    // cancelled whole, each fault once (a refused fault was counted and replayed twice).
    let before = cancel.len();
    let run = std::panic::AssertUnwindSafe(|| service_block(space, slot, group, cancel));
    if std::panic::catch_unwind(run).is_err() {
        log::error!("device {:?} fault service panicked at {:#x}; cancelling its faults", slot.id, group[0].va);
        cancel.truncate(before);
        cancel.extend(group.iter().map(|f| (f.va, Access::Read, FaultCancel::ServiceFailed)));
    }
}

/// Pages of one block sorted by what to do with them.
#[derive(Clone, Default)]
struct Plan {
    migrate: PageMask,
    duplicate: PageMask,
    /// Mapped to host memory.
    remote: PageMask,
    /// Mapped to a peer device's copy.
    peer: PageMask,
    /// The peer device each page of `peer` is to be served from, where the decision named one:
    /// pages it does not hold yet (their preferred location is there) are placed on it first.
    homes: Vec<(DeviceId, PageMask)>,
    /// Pages of `homes` the prefetcher added (none faulted): left out where the peer has no room.
    home_extra: PageMask,
}

impl Plan {
    fn add(&mut self, i: usize, d: Decision, me: Proc) {
        match d {
            Decision::Migrate(p) if p == me => self.migrate.set(i),
            Decision::Duplicate => self.duplicate.set(i),
            Decision::Remote(Proc::Device(d)) => {
                self.peer.set(i);
                match self.homes.iter_mut().find(|(h, _)| *h == d) {
                    Some((_, m)) => m.set(i),
                    None => {
                        let mut m = PageMask::default();
                        m.set(i);
                        self.homes.push((d, m));
                    }
                }
            }
            Decision::Remote(_) => self.remote.set(i),
            // The CPU or another device cannot be made to hold data by a device's fault; the
            // requester gets its own copy.
            Decision::Migrate(_) => self.migrate.set(i),
        }
    }
    fn is_empty(&self) -> bool {
        self.migrate.is_empty() && self.duplicate.is_empty() && self.remote.is_empty() && self.peer.is_empty()
    }
    fn all(&self) -> PageMask {
        self.migrate.or(&self.duplicate).or(&self.remote).or(&self.peer)
    }
}

/// Devices whose memory `slot`'s device maps peer to peer: those whose windows it reaches.
fn peers_of(space: &AddressSpace, slot: &DeviceSlot) -> ProcMask {
    let mut m = ProcMask::EMPTY;
    if slot.caps.peer.is_none() {
        return m;
    }
    for h in space.holders() {
        if !h.is_detached() && migrate::peer_window(slot, &h).is_some() {
            m.insert(Proc::Device(h.id));
        }
    }
    m
}

/// Counts an evict-and-refault cycle of `blk` on `slot`'s device and decides whether the block
/// is served remotely (`blk.thrashing`). A block that comes back within [`THRASH_WINDOW_NS`] of
/// its eviction has `refaults` counted up (one that comes back later starts again from 0); the
/// second time, the device is capacity thrashing for the next window. While it is, with
/// [`Thrashing::RemoteMap`], the device keeps its hot set (gemm's `b`, read by every band) and
/// maps the rest remotely ([`arrival`] decides). Remote service ends when the thrashing does or
/// when memory frees up. Returns the cooler block a hot arrival is to replace, evicted by
/// [`make_room_for_hot_arrival`] once the service plan shows the block does come in.
fn thrash_response(
    space: &AddressSpace,
    slot: &DeviceSlot,
    blk: &mut crate::block::Block,
    now: u64,
) -> Option<crate::evict::Queued> {
    let me = Proc::Device(slot.id);
    if let Some(refaults) = blk.refaulted(slot.id, now, THRASH_WINDOW_NS) {
        add(&space.stats.thrash_events, 1);
        if refaults >= 2 {
            slot.thrash_until.fetch_max(now.saturating_add(THRASH_WINDOW_NS), Ordering::Relaxed);
        }
    }
    end_remote_service(space, slot, blk, now);
    if blk.thrashing.has(me) {
        return None;
    }
    match arrival(space, slot, blk, now) {
        Arrival::Remote => {
            blk.thrashing.insert(me);
            None
        }
        Arrival::In => None,
        Arrival::Replacing(victim) => Some(victim),
    }
}

/// Evicts `victim`, the cooler block a hot arrival replaces, if the service brings the arriving
/// block to the device (`plan` migrates or duplicates pages of a region that moves): a block of
/// a mirrored region, or one its advice keeps elsewhere, is served remotely whatever the
/// thrashing response said, and evicting for it would free memory nothing takes. If the
/// eviction fails, the allocation evicts as it would anyway.
fn make_room_for_hot_arrival(
    space: &AddressSpace,
    region: &Region,
    slot: &DeviceSlot,
    base: u64,
    plan: &Plan,
    victim: crate::evict::Queued,
) {
    if region.remote || (plan.migrate.is_empty() && plan.duplicate.is_empty()) {
        return;
    }
    match crate::evict::evict_queued(space, slot, victim) {
        Ok(true) => add(&space.stats.hot_arrivals, 1),
        Ok(false) => {}
        Err(e) => log::debug!("thrashing response at {base:#x} on {:?}: {e}", slot.id),
    }
}

/// What the thrashing response does with a block arriving on a device.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Arrival {
    /// Served remotely.
    Remote,
    /// Comes in, making room as any migration does.
    In,
    /// Comes in, taking the place of this much cooler block.
    Replacing(crate::evict::Queued),
}

/// Where the thrashing response puts `blk` arriving on `slot`'s device at `now`. Unless the
/// device is thrashing, holds nothing of the block and is short of memory (taking the block in
/// would make eviction, now or the background evictor's to keep its watermark, take one out),
/// it comes in. Then a block the device's access counters find much hotter than the coolest
/// candidate for eviction ([`hotter_than`]) takes that one's place. Otherwise it is served
/// remotely when it came back after eviction no more often than the block eviction would take
/// plus one: the margin keeps blocks that come back about equally often (stencil's, random's)
/// from taking each other's place at every fault (stencil at oversubscription 2 moved 895-901
/// MiB without it, 705-707 with).
///
/// Refaults alone misjudged the thrashing's onset: once in about 100 loaded runs of
/// `capacity_thrashing_keeps_the_hot_set_and_serves_the_rest_remotely`, a hot block arrived
/// having come back once more than the block eviction would take, the other hot block, and
/// was served remotely for the rest of the run (463-477 MiB over the link instead of under 64).
fn arrival(space: &AddressSpace, slot: &DeviceSlot, blk: &mut crate::block::Block, now: u64) -> Arrival {
    let short = || {
        let (free, total) = slot.free_and_total();
        free < blk.npages as u64 + crate::evict::free_cap(total, space.config.policy.free_watermark)
    };
    if !(thrashing_now(space, slot, now) && blk.resident_on(Proc::Device(slot.id)).is_empty() && short()) {
        return Arrival::In;
    }
    let found = crate::evict::candidates(space, slot, blk.base);
    if let Some((cool, at)) = found.coolest {
        if hotter_than(crate::evict::heat_of(space, slot, blk, now), cool) {
            return Arrival::Replacing(at);
        }
    }
    match found.victim_refaults() {
        Some(r) if blk.refaults(slot.id) <= r.saturating_add(1) => Arrival::Remote,
        _ => Arrival::In,
    }
}

/// Accesses (64-byte transactions) of a whole 2 MiB block read once.
const BLOCK_READ: f64 = (BLOCK_SIZE / 64) as f64;

/// Whether a block of heat `arrival` should take the place of one of heat `resident` on a
/// thrashing device: at least twice as hot, and by more than one read of a whole block. The
/// margin keeps blocks used about equally (those of a kernel reading all its data once per
/// pass, in `readmostly` or `stencil`) from taking each other's place; counting a remote
/// block's passes as refaults without comparing the resident blocks' use churned `readmostly`
/// (400 MiB migrated against 232 at oversubscription 1.5).
fn hotter_than(arrival: f64, resident: f64) -> bool {
    arrival > 2.0 * resident + BLOCK_READ
}

/// Whether `slot`'s device is capacity thrashing at `now`, with the policy's remote-map response.
fn thrashing_now(space: &AddressSpace, slot: &DeviceSlot, now: u64) -> bool {
    space.config.policy.thrashing == Thrashing::RemoteMap
        && slot.caps.remote_host_access
        && now < slot.thrash_until.load(Ordering::Relaxed)
}

/// Ends the thrashing response's remote service of `blk` on `slot`'s device once the thrashing
/// is over or memory has freed up.
fn end_remote_service(space: &AddressSpace, slot: &DeviceSlot, blk: &mut crate::block::Block, now: u64) {
    let me = Proc::Device(slot.id);
    if blk.thrashing.has(me) && (!thrashing_now(space, slot, now) || space.free_fraction(slot) > 0.25) {
        blk.thrashing.remove(me);
    }
}

/// Pages between the 2 MiB boundary and a block starting at `base` (see [`crate::policy::Prefetcher::prefetch`]).
pub(crate) fn skew_of(base: u64) -> usize {
    ((base % BLOCK_SIZE) / PAGE_SIZE) as usize
}

/// What residency selection needs to know about `slot`'s device for `blk`.
fn reach_of(space: &AddressSpace, slot: &DeviceSlot, blk: &crate::block::Block, attrs: &RangeAttrs) -> Reach {
    let me = Proc::Device(slot.id);
    // Peers matter only to accessed-by ranges and to ranges preferring another device (and
    // finding them walks the devices).
    let span = VaRange::new(blk.base, blk.npages as u64 * PAGE_SIZE);
    let other_device = |p: Option<Proc>| matches!(p, Some(d @ Proc::Device(_)) if d != me);
    let need_peers = !attrs.all_in(span, |a| !a.accessed_by.has(me) && !other_device(a.preferred));
    Reach {
        host_remote: slot.caps.remote_host_access,
        thrash_pinned: blk.thrashing.has(me).then_some(Proc::Cpu),
        dup_reads: space.config.policy.duplicate_reads,
        peers: if need_peers { peers_of(space, slot) } else { ProcMask::EMPTY },
    }
}

/// Services access-counter notices: the device used memory it maps remotely heavily. Where
/// residency selection would now bring such pages to the device (the thrashing response that
/// kept them remote is over, or memory freed up), their remote mappings are removed, so that
/// the next access faults and the fault service moves them as it moves any page; pages advice
/// keeps remote (`AccessedBy`, a preferred location elsewhere) stay as they are. Without this,
/// a block the thrashing response served remotely stays remote for as long as the device keeps
/// using it: its accesses never fault again.
pub(crate) fn service_notices(space: &AddressSpace, slot: &DeviceSlot, notices: &[VaRange]) {
    add(&space.stats.access_notices, notices.len() as u64);
    if !space.config.policy.access_counters {
        return;
    }
    let Ok(_gate) = space.enter() else { return };
    let _shape = space.reshape.read();
    for &notice in notices {
        for region in space.overlapping(notice) {
            if region.remote {
                continue; // mirrored: never migrated
            }
            let Some(part) = region.range.intersect(&notice) else { continue };
            for bidx in region.block_index(part.start)..=region.block_index(part.end() - 1) {
                let mut blk = region.blocks[bidx].lock();
                if region.is_freed() {
                    break;
                }
                bring_closer(space, slot, &mut blk);
            }
        }
    }
}

/// The access-counter response for one block (see [`service_notices`]).
fn bring_closer(space: &AddressSpace, slot: &DeviceSlot, blk: &mut crate::block::Block) {
    let me = Proc::Device(slot.id);
    if blk.thrashing.has(me) {
        // Brought closer only where the fault that follows would not serve it remotely again.
        if arrival(space, slot, blk, space.tick()) == Arrival::Remote {
            return;
        }
        blk.thrashing.remove(me);
    }
    let attrs = space.attrs.read();
    let reach = reach_of(space, slot, blk, &attrs);
    let mut closer = PageMask::default();
    for (i, p) in blk.pages.iter().enumerate() {
        if p.dev_mapped.has(me)
            && !p.resident.has(me)
            && !matches!(select_residency(p, &attrs.get(blk.va(i)), me, Access::Prefetch, reach), Decision::Remote(_))
        {
            closer.set(i);
        }
    }
    drop(attrs);
    if closer.is_empty() {
        return;
    }
    match migrate::unmap_on(space, blk, slot, &closer) {
        Ok(()) => add(&space.stats.access_unmapped_pages, closer.count() as u64),
        Err(e) => log::warn!("access-counter response at {:#x} on {:?}: {e}", blk.base, slot.id),
    }
}

/// Services the faults of one 2 MiB block (sorted, deduplicated).
fn service_block(space: &AddressSpace, slot: &DeviceSlot, group: &[DeviceFault], cancel: &mut Vec<Cancel>) {
    let Some(region) = space.region_of(group[0].va) else {
        // Faults outside every region fail; the window's others belong to a region that starts
        // further on (regions need only be page aligned), and are serviced.
        let (none, rest): (Vec<DeviceFault>, Vec<DeviceFault>) =
            group.iter().partition(|f| space.region_of(f.va).is_none());
        // A region may be arriving at this address (a remap event read, not yet applied): let
        // the access retry instead of failing it.
        if space.events_pending.load(Ordering::Acquire) == 0 {
            cancel.extend(none.iter().map(|f| (f.va, Access::Read, FaultCancel::Unmapped)));
        }
        if !rest.is_empty() {
            service_block(space, slot, &rest, cancel);
        }
        return;
    };
    // Faults of this 2 MiB window that belong to a neighbouring region are serviced after.
    let (group, others): (Vec<DeviceFault>, Vec<DeviceFault>) = group.iter().partition(|f| region.range.contains(f.va));
    if !others.is_empty() {
        service_block(space, slot, &others, cancel);
    }
    let group = &group[..];
    let bidx = region.block_index(group[0].va);
    let mut blk = region.blocks[bidx].lock();
    if region.is_freed() {
        cancel.extend(group.iter().map(|f| (f.va, Access::Read, FaultCancel::Unmapped)));
        return;
    }
    let me = Proc::Device(slot.id);
    let policy = &space.config.policy;
    let now = space.tick();
    let replacing = thrash_response(space, slot, &mut blk, now);
    blk.taken_by(slot.id, now);
    let attrs = space.attrs.read();
    let reach = reach_of(space, slot, &blk, &attrs);
    let mut plan = Plan::default();
    let mut faulted = PageMask::default();
    for f in group {
        if !region.range.contains(f.va) {
            cancel.push((f.va, Access::Read, FaultCancel::Unmapped));
            continue;
        }
        let needs = f.access.needs() & (Prot::READ | Prot::WRITE);
        if !region.prot.contains(needs) {
            // Only this access, and stronger ones: a read of the page beside it is served.
            cancel.push((f.va, f.access, FaultCancel::Protection));
            continue;
        }
        let i = ((f.va - blk.base) / PAGE_SIZE) as usize;
        faulted.set(i);
        plan.add(i, select_residency(&blk.pages[i], &attrs.get(f.va), me, f.access.max(Access::Read), reach), me);
    }
    if faulted.is_empty() {
        return;
    }
    // Prefetched pages are taken for the block's most intrusive faulting access: pages next to
    // a write are about to be written too, so they move rather than get read-only copies.
    let block_access = group.iter().map(|f| f.access).max().unwrap_or(Access::Read);
    let prefetch_access = if block_access >= Access::Write { Access::Write } else { Access::Prefetch };
    let resident = blk.resident_on(me);
    let local = plan.migrate.or(&plan.duplicate);
    // Pages the device already has with the access it needs are not prefetched again; read-only
    // copies are, when the block is being written.
    let mut have = PageMask::default();
    for i in resident.iter() {
        let p = &blk.pages[i];
        if p.dev_mapped.has(me) && (prefetch_access < Access::Write || !p.dev_ro.has(me)) {
            have.set(i);
        }
    }
    // A first touch at the preferred location populates the whole block (UVM's
    // `should_apply_prefetch_logic`); otherwise the prefetcher decides.
    let untouched = blk.pages[..blk.npages].iter().all(|p| p.resident.is_empty());
    let pick = |want: &PageMask, held: &PageMask, whole: bool| {
        if whole {
            PageMask::full(blk.npages)
        } else {
            policy.prefetcher.prefetch(want, held, blk.npages, skew_of(blk.base))
        }
    };
    let first_touch_preferred = untouched && faulted.iter().all(|i| attrs.get(blk.va(i)).preferred == Some(me));
    let picked = pick(&local, &resident, first_touch_preferred);
    let extra = picked.and_not(&faulted).and_not(&have);
    let mut prefetched = 0;
    let within = attrs.within(VaRange::new(blk.base, blk.npages as u64 * PAGE_SIZE));
    for i in extra.iter() {
        let a = within.get(blk.va(i));
        match select_residency(&blk.pages[i], &a, me, prefetch_access, reach) {
            Decision::Remote(_) => {}
            // Never prefetched away from a set preferred location (UVM's
            // `should_apply_prefetch_logic`); a read-only copy leaves the data there.
            Decision::Migrate(_) if a.preferred.is_some_and(|p| p != me) => {}
            d => {
                plan.add(i, d, me);
                // Only pages the device gets: one it holds already (a read-only copy a write
                // makes exclusive) moves nothing.
                prefetched += u64::from(!resident.get(i));
            }
        }
    }
    // Pages placed on a preferred peer bring their neighbours there too, as the prefetcher picks
    // toward that device (UVM runs it toward the new residency, whichever processor that is; a
    // first touch of the preferred location populates the whole block). Only pages whose own
    // decision is to be served from that device join, and none the requester maps already.
    let mapped = if plan.homes.is_empty() { PageMask::default() } else { blk.mapped_on(me) };
    for (d, m) in plan.homes.clone() {
        let there = Proc::Device(d);
        let picked = pick(&m, &blk.resident_on(there), untouched);
        for i in picked.and_not(&faulted).and_not(&plan.all()).and_not(&mapped).iter() {
            if select_residency(&blk.pages[i], &within.get(blk.va(i)), me, prefetch_access, reach)
                == Decision::Remote(there)
            {
                plan.add(i, Decision::Remote(there), me);
                plan.home_extra.set(i);
                prefetched += 1;
            }
        }
    }
    let extra = extra.or(&plan.home_extra);
    drop(attrs);
    // A thrashing block is served remotely as a whole: one fault maps all of it. Only the pages
    // the CPU alone holds, or nobody: mapping another device's pages here would bring them
    // home from it first, whatever pins or preferences keep them there (found by an audit).
    let mut rest_n = 0;
    if !plan.remote.is_empty() && blk.thrashing.has(me) {
        let rest = PageMask::full(blk.npages).and_not(&resident).and_not(&plan.all());
        let rest = migrate::select(&blk, &rest, |p| p.resident.0 & !ProcMask::only(Proc::Cpu).0 == 0);
        rest_n = rest.count() as u64;
        plan.remote = plan.remote.or(&rest);
    }
    if let Some(victim) = replacing {
        make_room_for_hot_arrival(space, &region, slot, blk.base, &plan, victim);
    }
    let mut r = apply(space, &region, &mut blk, slot, &plan);
    // Counted once the plan is applied: only the pages the device got.
    let mut counted = if r.is_ok() { prefetched + rest_n } else { 0 };
    if matches!(r, Err(CoreError::OutOfDeviceMemory { .. } | CoreError::DeviceMemoryBusy { .. }))
        && plan.all() != faulted
    {
        // Not enough room for the prefetch: service just what faulted.
        let only = Plan {
            migrate: plan.migrate.and_not(&extra),
            duplicate: plan.duplicate.and_not(&extra),
            remote: plan.remote.and_not(&extra),
            peer: plan.peer.and_not(&extra),
            homes: plan.homes.iter().map(|(d, m)| (*d, m.and_not(&extra))).collect(),
            home_extra: PageMask::default(),
        };
        r = apply(space, &region, &mut blk, slot, &only);
        // The prefetcher's pages were left out; the thrashing block's remote rest was not.
        counted = if r.is_ok() { rest_n } else { 0 };
    }
    add(&space.stats.prefetched_pages, counted);
    if matches!(r, Err(CoreError::OutOfDeviceMemory { .. })) && slot.caps.remote_host_access && !region.remote {
        r = serve_remotely(space, &region, &mut blk, slot, group, &faulted);
    }
    match r {
        Ok(()) => {
            // Counted once served: a service put off or failed serviced nothing (its retry is
            // counted when it succeeds).
            add(&space.stats.blocks_serviced, 1);
            slot.oom_since.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        // Memory is short only because every victim is busy (locked by other services or the
        // prefetcher): leave the faults unserviced so they are raised again after the replay,
        // as UVM throttles; give up only if it lasts.
        Err(CoreError::DeviceMemoryBusy { .. }) if !oom_for_too_long(space, slot) => {
            log::debug!("device {:?} out of memory for block {:#x}; retrying after replay", slot.id, blk.base);
        }
        // The program moved or unmapped memory while the CPU's access was taken: raised again
        // after the replay, served once the change is applied (it waits for this batch).
        Err(e) if e.raced() && !oom_for_too_long(space, slot) => {
            log::debug!(
                "device {:?} fault in block {:#x} raced an unmap or remap; retrying after replay",
                slot.id,
                blk.base
            );
        }
        Err(e) => {
            log::error!("servicing device {:?} faults in block {:#x}: {e}", slot.id, blk.base);
            cancel.extend(faulted.iter().map(|i| (blk.va(i), Access::Read, FaultCancel::ServiceFailed)));
        }
    }
}

/// Serves the faulted pages of `blk` by remote mappings of host memory, where nothing on the
/// device can be evicted for them (its memory is pinned, or held by launches): the kernel runs
/// at the link's speed rather than failing. Pages written or updated atomically first lose the
/// copies other processors hold, so that the host copy, the only one, is mapped writable.
fn serve_remotely(
    space: &AddressSpace,
    region: &Region,
    blk: &mut crate::block::Block,
    slot: &DeviceSlot,
    group: &[DeviceFault],
    faulted: &PageMask,
) -> Result<(), CoreError> {
    let me = Proc::Device(slot.id);
    let mut written = PageMask::default();
    for f in group.iter().filter(|f| f.access >= Access::Write && region.range.contains(f.va)) {
        written.set(((f.va - blk.base) / PAGE_SIZE) as usize);
    }
    // Its own read-only duplicates of written pages go home too: left mapped read-only, the
    // write was reported served and faulted again, in every batch where another fault of the
    // block needed memory (found by an audit).
    let elsewhere = migrate::select(blk, &written, |p| {
        p.resident.0 & !ProcMask::only(Proc::Cpu).0 != 0 && p.resident != ProcMask::only(me)
    });
    migrate::to_cpu(space, region, blk, &elsewhere)?;
    migrate::map_remote(space, region, blk, slot, faulted)?;
    add(&space.stats.oom_remote_pages, faulted.count() as u64);
    log::debug!("device {:?}: block {:#x} served remotely, its memory full", slot.id, blk.base);
    Ok(())
}

/// How long service may keep being put off (allocation failing, revokes racing unmaps and
/// remaps) before faults are cancelled.
const OOM_PATIENCE_NS: u64 = 10_000_000_000;

/// Records a service put off (memory busy, or a revoke that raced an unmap or remap); true once
/// that has lasted longer than the patience without a service succeeding in between.
fn oom_for_too_long(space: &AddressSpace, slot: &DeviceSlot) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    let now = space.tick();
    let since = match slot.oom_since.compare_exchange(0, now, Relaxed, Relaxed) {
        Ok(_) => now,
        Err(t) => t,
    };
    now.saturating_sub(since) > OOM_PATIENCE_NS
}

fn apply(
    space: &AddressSpace,
    region: &Region,
    blk: &mut crate::block::Block,
    slot: &DeviceSlot,
    plan: &Plan,
) -> crate::error::Result<()> {
    if plan.is_empty() {
        return Ok(());
    }
    blk.while_busy(plan.all(), |blk| apply_steps(space, region, blk, slot, plan))
}

fn apply_steps(
    space: &AddressSpace,
    region: &Region,
    blk: &mut crate::block::Block,
    slot: &DeviceSlot,
    plan: &Plan,
) -> crate::error::Result<()> {
    let (fell, dropped) = place_on_peers(space, region, blk, slot, plan)?;
    // Pages that fell back to this device migrate to it; pages dropped are neither placed nor
    // mapped. The plan is copied only then (rare).
    let adjusted;
    let plan = if fell.is_empty() && dropped.is_empty() {
        plan
    } else {
        adjusted =
            Plan { migrate: plan.migrate.or(&fell), peer: plan.peer.and_not(&fell).and_not(&dropped), ..plan.clone() };
        &adjusted
    };
    if !plan.migrate.is_empty() {
        if space.config.policy.revoke_whole_block {
            migrate::revoke_block_cpu(space, region, blk, &plan.migrate)?;
        }
        migrate::to_device(space, region, blk, slot, &plan.migrate)?;
    }
    if !plan.duplicate.is_empty() {
        migrate::duplicate_to_device(space, region, blk, slot, &plan.duplicate)?;
    }
    if !plan.peer.is_empty() {
        migrate::map_peer(space, region, blk, slot, &plan.peer)?;
    }
    if !plan.remote.is_empty() {
        migrate::map_remote(space, region, blk, slot, &plan.remote)?;
    }
    Ok(())
}

/// Places the pages of `plan.peer` on the peer devices they are to be served from where those
/// do not hold them yet (their preferred location: [`migrate::place_on_peer`]), so that
/// [`migrate::map_peer`] then maps `slot`'s device to those copies. Where the peer has no room
/// for the pages the prefetcher added, they are left out (returned second: neither placed nor
/// mapped) and the faulted ones tried alone. Returns first the faulted pages that could not be
/// placed and go to `slot`'s device instead, as where the preferred location is out of reach:
/// the peer's memory is full of what cannot be evicted (pinned, or held by launches), or the
/// peer was detached meanwhile. Memory only busy there (its victims locked by services in
/// flight) is an error, so that the faults are retried after the replay, as for the device's
/// own memory. A region served remotely only is left to `map_peer`, which maps host memory.
fn place_on_peers(
    space: &AddressSpace,
    region: &Region,
    blk: &mut crate::block::Block,
    slot: &DeviceSlot,
    plan: &Plan,
) -> crate::error::Result<(PageMask, PageMask)> {
    let (mut fell, mut dropped) = (PageMask::default(), PageMask::default());
    if region.remote {
        return Ok((fell, dropped));
    }
    for (d, m) in &plan.homes {
        let mut m = m.and(&plan.peer);
        if *d == slot.id || m.is_empty() {
            continue;
        }
        let holder = space.slot(*d);
        let mut placed =
            holder.as_ref().map_err(Clone::clone).and_then(|h| migrate::place_on_peer(space, region, blk, h, &m));
        let extra = m.and(&plan.home_extra);
        if matches!(placed, Err(CoreError::OutOfDeviceMemory { .. } | CoreError::DeviceMemoryBusy { .. }))
            && !extra.is_empty()
        {
            dropped = dropped.or(&extra);
            m = m.and_not(&extra);
            placed =
                holder.as_ref().map_err(Clone::clone).and_then(|h| migrate::place_on_peer(space, region, blk, h, &m));
        }
        match placed {
            Ok(n) => {
                if n > 0 {
                    blk.taken_by(*d, space.tick());
                }
            }
            Err(e @ (CoreError::OutOfDeviceMemory { .. } | CoreError::Detached(_))) => {
                log::debug!(
                    "block {:#x}: preferred peer {d:?} cannot take {} pages ({e}); {:?} takes them",
                    blk.base,
                    m.count(),
                    slot.id
                );
                add(&space.stats.peer_place_fallbacks, m.count() as u64);
                fell = fell.or(&m);
            }
            Err(e) => return Err(e),
        }
    }
    Ok((fell, dropped))
}

/// Cross-block prefetch, first half (service thread): when the blocks serviced in one region
/// advance by a constant stride, ask the device's prefetch thread to make the next blocks along
/// it resident. Walks are tracked per region (a kernel streams several buffers at once), and the
/// window doubles while a walk stays steady. A walk that writes gets exclusive copies.
fn plan_ahead(space: &AddressSpace, slot: &DeviceSlot, serviced: &[Serviced]) {
    let mut reqs = Vec::new();
    {
        let mut walks = slot.walk.lock();
        for &(b, write) in serviced {
            let Some(region) = space.region_of(b.max(1)) else { continue };
            let w = walks.entry(region.range.start).or_default();
            w.write |= write;
            if w.recent.back() == Some(&b) {
                continue;
            }
            w.recent.push_back(b);
            while w.recent.len() > 3 {
                w.recent.pop_front();
            }
            let r: Vec<u64> = w.recent.iter().copied().collect();
            let steady = r.len() == 3 && r[2] > r[1] && r[1] > r[0] && r[2] - r[1] == r[1] - r[0];
            w.ahead = next_ahead(w.ahead, steady, space.free_fraction(slot));
            if steady {
                reqs.push(Ahead {
                    region: region.range.start,
                    last: b,
                    stride: r[2] - r[1],
                    ahead: w.ahead,
                    write: w.write,
                });
            }
        }
        // Forget walks of regions that are gone.
        if walks.len() > 64 {
            walks.retain(|start, _| space.region_at(*start).is_some());
        }
    }
    if let Some(tx) = slot.ahead_tx.lock().as_ref() {
        for r in reqs {
            let _ = tx.send(r);
        }
    }
}

/// The window after `ahead` blocks: doubled while the walk stays `steady` (from 2), up to
/// [`MAX_AHEAD_ROOMY`] while at least half the device's memory is free (`free`, a fraction) and
/// [`MAX_AHEAD`] otherwise; none once it is not steady.
fn next_ahead(ahead: usize, steady: bool, free: f64) -> usize {
    let cap = if free >= 0.5 { MAX_AHEAD_ROOMY } else { MAX_AHEAD };
    if steady {
        (ahead * 2).clamp(2, cap)
    } else {
        0
    }
}

/// A request to the prefetch thread.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ahead {
    /// The start of the region walked (walks are per region).
    region: u64,
    last: u64,
    stride: u64,
    ahead: usize,
    write: bool,
}

/// Cross-block prefetch, second half: the device's prefetch thread. Takes the newest request and
/// moves the window's blocks in bulk, as far as free memory allows without evicting.
pub(crate) fn ahead_loop(space: Weak<AddressSpace>, slot: Arc<DeviceSlot>, rx: std::sync::mpsc::Receiver<Ahead>) {
    while !slot.is_detached() {
        let first = match rx.recv_timeout(POLL) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        // Keep the newest request of each walk (a later request of the same region on the same
        // stride supersedes an earlier one it overlaps; of two buffers streamed at once, the
        // lower one's requests were dropped: found by an audit).
        let mut reqs = vec![first];
        while let Ok(r) = rx.try_recv() {
            let window = (MAX_AHEAD_ROOMY as u64 + 1) * r.stride;
            reqs.retain(|o| {
                !(o.region == r.region && o.stride == r.stride && o.last < r.last && r.last - o.last < window)
            });
            reqs.push(r);
        }
        let Some(space) = space.upgrade() else { return };
        for r in reqs {
            run_ahead(&space, &slot, r);
        }
    }
}

fn run_ahead(space: &AddressSpace, slot: &DeviceSlot, req: Ahead) {
    let Ahead { last, stride, ahead, write: writes, .. } = req;
    let me = Proc::Device(slot.id);
    // Never while a fork is prepared or regions are being reshaped.
    let Some(_gate) = space.try_enter() else { return };
    let Some(_shape) = space.reshape.try_read() else { return };
    let Some(region) = space.region_of(last) else { return };
    let reserve = (slot.free_and_total().1 as f64 * space.config.policy.free_watermark * 2.0) as u64;
    let mut budget = slot.free_and_total().0.saturating_sub(reserve);
    let mut guards = Vec::new();
    let mut read_mostly = true;
    for k in 1..=ahead as u64 {
        let Some(va) = last.checked_add(stride * k).filter(|v| region.range.contains(*v)) else { break };
        let Some(blk) = region.blocks[region.block_index(va)].try_lock() else { continue };
        let span = VaRange::new(blk.base, blk.npages as u64 * PAGE_SIZE);
        let (neutral, rm) = space.attrs.read().prefetch_fit(span, me);
        let plain = neutral && !blk.thrashing.has(me) && blk.resident_on(me).is_empty();
        let n = blk.npages as u64;
        if !plain || region.is_freed() || budget < n {
            continue;
        }
        budget -= n;
        read_mostly &= rm;
        guards.push(blk);
    }
    if guards.is_empty() {
        return;
    }
    let mut blocks: Vec<&mut crate::block::Block> = guards.iter_mut().map(|g| &mut **g).collect();
    let dup = (space.config.policy.duplicate_reads || read_mostly) && !writes;
    match migrate::bulk_to_device(space, &region, &mut blocks, slot, dup) {
        Ok(n) => {
            add(&space.stats.prefetched_pages, n);
            let now = space.tick();
            for b in blocks.iter_mut() {
                b.taken_by(slot.id, now);
            }
        }
        Err(e) => log::debug!("prefetch ahead on {:?}: {e}", slot.id),
    }
}

#[cfg(test)]
mod service_tests {
    //! A fault batch's edge cases, and the thrashing response against a pin landing mid-service.
    use std::sync::Arc;

    use crate::device::DeviceFault;
    use crate::fakes::PlainCpu;
    use crate::space::{AddressSpace, AttachOptions, CoreConfig};
    use crate::testing::FakeDevice;
    use crate::types::{Access, Proc, Prot, VaRange, BLOCK_SIZE};

    /// The prefetch window doubles to 32 blocks with memory to spare, to 8 without, and a
    /// window grown with memory to spare shrinks to 8 once it is short.
    #[test]
    fn the_window_ahead_grows_further_with_memory_to_spare() {
        let grow = |free: f64, from: usize| {
            std::iter::successors(Some(from), move |&a| Some(super::next_ahead(a, true, free)))
        };
        assert_eq!(grow(0.9, 0).take(7).collect::<Vec<_>>(), [0, 2, 4, 8, 16, 32, 32]);
        assert_eq!(grow(0.3, 0).take(5).collect::<Vec<_>>(), [0, 2, 4, 8, 8]);
        assert_eq!(super::next_ahead(32, true, 0.49), 8);
        assert_eq!(super::next_ahead(32, false, 0.9), 0);
    }

    /// A fault at an address no region covers cancels only itself: a valid fault later in the
    /// same 2 MiB window (a region starting mid-window) is serviced, not cancelled as
    /// `Unmapped`. (`service_block` looked up the region of the window's first fault only, and
    /// cancelled the whole group when that one was unmapped.)
    #[test]
    fn a_bad_address_does_not_cancel_valid_faults_in_its_window() {
        let policy = crate::policy::Policy {
            prefetcher: Arc::new(crate::policy::NoPrefetch),
            cpu_readahead: false,
            ..crate::policy::Policy::uvm()
        };
        let space = AddressSpace::new(CoreConfig { policy, ..Default::default() });
        let start = 8 * BLOCK_SIZE + BLOCK_SIZE / 2;
        space.add_region(Arc::new(PlainCpu::new(VaRange::new(start, BLOCK_SIZE))), Prot::READ | Prot::WRITE).unwrap();
        let host = Arc::new(parking_lot::Mutex::new(vec![0u8; 2 * BLOCK_SIZE as usize]));
        let dev = Arc::new(FakeDevice::new(4 * BLOCK_SIZE as usize, 0xEE, host));
        let id = space.attach(dev, AttachOptions::default()).unwrap();
        let slot = space.slot(id).unwrap();
        let (bad, good) = (8 * BLOCK_SIZE, start);
        let mut batch = vec![
            DeviceFault { va: bad, access: Access::Read, client: 0 },
            DeviceFault { va: good, access: Access::Read, client: 1 },
        ];
        let (cancel, _) = super::service_batch(&space, &slot, &mut batch);
        assert!(cancel.iter().any(|c| c.0 == bad), "the bad address is cancelled: {cancel:?}");
        assert!(!cancel.iter().any(|c| c.0 == good), "a valid fault was cancelled: {cancel:?}");
        assert!(space.page_state(good).unwrap().dev_mapped.has(Proc::Device(id)), "the valid fault was not serviced");
    }

    /// Found by an audit: a write fault on a page the device holds as a read-only duplicate (beside the
    /// CPU's copy), faulting in the same block as a page that needs device memory while the
    /// device is full of pinned memory. `to_device` fails (out of memory) and `serve_remotely`
    /// maps only pages the device does not hold, leaving the duplicate mapped read-only: the
    /// fault is reported serviced (not cancelled, `oom_since` reset), yet the write faults again
    /// after the replay, and again in every batch in which another fault of its block needs
    /// memory (each round below), though serving it needs no memory at all.
    #[test]
    fn a_write_to_a_read_duplicate_is_served_when_memory_is_pinned_full() {
        use crate::cpu::CpuFaultHandler;
        use crate::types::PAGE_SIZE;
        let policy = crate::policy::Policy {
            prefetcher: Arc::new(crate::policy::NoPrefetch),
            cpu_readahead: false,
            duplicate_reads: true,
            ..crate::policy::Policy::uvm()
        };
        let space = AddressSpace::new(CoreConfig { policy, ..Default::default() });
        let s = 8 * BLOCK_SIZE;
        space.add_region(Arc::new(PlainCpu::new(VaRange::new(s, 2 * BLOCK_SIZE))), Prot::READ | Prot::WRITE).unwrap();
        let host = Arc::new(parking_lot::Mutex::new(vec![0u8; 2 * BLOCK_SIZE as usize]));
        let fake = Arc::new(FakeDevice::new(BLOCK_SIZE as usize, 0xEE, host));
        let id = space.attach(fake.clone(), AttachOptions::default()).unwrap();
        let me = Proc::Device(id);
        let slot = space.slot(id).unwrap();
        let (a, b) = (s + 5 * PAGE_SIZE, s + 6 * PAGE_SIZE);
        // The CPU writes A; the device reads it: a read-only duplicate on the device.
        space.cpu_fault(a, Access::Write).unwrap();
        let mut batch = vec![DeviceFault { va: a, access: Access::Read, client: 0 }];
        assert!(super::service_batch(&space, &slot, &mut batch).0.is_empty());
        let st = space.page_state(a).unwrap();
        assert!(st.resident.has(me) && st.resident.has(Proc::Cpu) && st.dev_ro.has(me), "{st:?}");
        // The rest of the device's memory holds a pinned block.
        let filler = VaRange::new(s + BLOCK_SIZE, BLOCK_SIZE - PAGE_SIZE);
        space.attrs.write().update(VaRange::new(s + BLOCK_SIZE, BLOCK_SIZE), |x| x.pinned = true);
        space.migrate(filler.start, filler.len, me).unwrap();
        assert_eq!(space.device_memory(id).unwrap().0, 0, "the device is full");
        for round in 0..3 {
            let mut batch = vec![
                DeviceFault { va: a, access: Access::Write, client: 0 },
                DeviceFault { va: b, access: Access::Read, client: 1 },
            ];
            let (cancel, _) = super::service_batch(&space, &slot, &mut batch);
            let writable = fake.pt.lock().get(&a).is_some_and(|e| e.1.contains(Prot::WRITE));
            let cancelled = cancel.iter().any(|c| c.0 == a);
            assert!(
                writable || cancelled,
                "round {round}: the write fault on {a:#x} was neither served (still read-only on the device: {:?}) nor cancelled ({cancel:?}); page {:?}",
                fake.pt.lock().get(&a),
                space.page_state(a)
            );
        }
    }

    /// Found by an audit: the prefetch thread keeps "the newest request of each walk", but walks are per
    /// region and the merge compares only strides and addresses: of two buffers streamed at
    /// once with the same stride (a kernel reading `a` and `b`), less than 33 strides apart,
    /// the request for the lower one is dropped whenever both are queued together, and its
    /// blocks are never prefetched ahead.
    #[test]
    fn queued_prefetch_requests_of_two_regions_are_both_served() {
        let policy = crate::policy::Policy {
            prefetcher: Arc::new(crate::policy::NoPrefetch),
            cpu_readahead: false,
            ..crate::policy::Policy::uvm()
        };
        let space = AddressSpace::new(CoreConfig { policy, ..Default::default() });
        let (a, b) = (8 * BLOCK_SIZE, 16 * BLOCK_SIZE);
        for r in [a, b] {
            space
                .add_region(Arc::new(PlainCpu::new(VaRange::new(r, 8 * BLOCK_SIZE))), Prot::READ | Prot::WRITE)
                .unwrap();
        }
        let host = Arc::new(parking_lot::Mutex::new(vec![0u8; 8 * BLOCK_SIZE as usize]));
        let fake = Arc::new(FakeDevice::new(64 * BLOCK_SIZE as usize, 0xEE, host));
        let id = space.attach(fake, AttachOptions::default()).unwrap();
        let slot = space.slot(id).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for r in [a, b] {
            tx.send(super::Ahead { region: r, last: r + 2 * BLOCK_SIZE, stride: BLOCK_SIZE, ahead: 4, write: false })
                .unwrap();
        }
        drop(tx);
        super::ahead_loop(Arc::downgrade(&space), slot, rx);
        for r in [a, b] {
            for k in 3..7 {
                let st = space.page_state(r + k * BLOCK_SIZE).unwrap();
                assert!(
                    st.resident.has(Proc::Device(id)),
                    "block {k} of the region at {r:#x} was not prefetched ahead"
                );
            }
        }
    }

    /// The thrashing response picks the cooler block a hot arrival replaces (`thrash_response`,
    /// via `evict::candidates`, which skips pinned blocks), and `make_room_for_hot_arrival`
    /// evicts it later through `evict::evict_queued`, which now looks at pins (and
    /// `held_by_job`) again. A pin that lands in between (another thread's `advise(Pin)`; here
    /// made from the hook while the service reads the arriving block's access counts, after the
    /// victim was chosen) keeps the block: it used to be evicted. `evict_lru` has the same gap
    /// between `candidates` and `evict_queued`.
    #[test]
    fn a_block_pinned_after_the_victim_sample_is_not_evicted_for_a_hot_arrival() {
        const READ: u64 = BLOCK_SIZE / 64;
        let policy = crate::policy::Policy {
            prefetcher: Arc::new(crate::policy::NoPrefetch),
            cpu_readahead: false,
            ..crate::policy::Policy::hetmm()
        };
        let space = AddressSpace::new(CoreConfig { policy, ..Default::default() });
        let s = 8 * BLOCK_SIZE;
        space.add_region(Arc::new(PlainCpu::new(VaRange::new(s, 3 * BLOCK_SIZE))), Prot::READ | Prot::WRITE).unwrap();
        let host = Arc::new(parking_lot::Mutex::new(vec![0u8; 3 * BLOCK_SIZE as usize]));
        let fake = Arc::new(FakeDevice::new(2 * BLOCK_SIZE as usize, 0xEE, host));
        let id = space.attach(fake.clone(), AttachOptions::default()).unwrap();
        let me = Proc::Device(id);
        space.migrate(s, 2 * BLOCK_SIZE, me).unwrap();
        assert_eq!(space.device_memory(id).unwrap().0, 0, "two resident blocks fill the device");
        let slot = space.slot(id).unwrap();
        slot.thrash_until.store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        let arriving = s + 2 * BLOCK_SIZE;
        {
            let mut counts = fake.access_counts.lock();
            counts.insert(s, READ);
            counts.insert(s + BLOCK_SIZE, READ);
            counts.insert(arriving, 40 * READ);
        }
        let weak = Arc::downgrade(&space);
        *fake.on_take_counts.lock() = Some(crate::testing::TakeHook(Box::new(move |r: VaRange| {
            if r.start == arriving {
                if let Some(space) = weak.upgrade() {
                    space.attrs.write().update(VaRange::new(s, 2 * BLOCK_SIZE), |a| a.pinned = true);
                }
            }
        })));
        let mut batch = vec![DeviceFault { va: arriving, access: Access::Read, client: 0 }];
        let (cancel, _) = super::service_batch(&space, &slot, &mut batch);
        *fake.on_take_counts.lock() = None;
        assert!(cancel.is_empty(), "{cancel:?}");
        assert!(space.attrs.read().get(s).pinned, "the hook ran: the pin landed");
        let region = space.region_of(s).unwrap();
        for b in 0..2 {
            let blk = region.blocks[b].lock();
            assert!(
                !blk.resident_on(me).is_empty(),
                "pinned block {b} was evicted (hot_arrivals {})",
                space.stats().hot_arrivals
            );
        }
    }
}

#[cfg(test)]
mod service_loop_tests {
    //! The service thread (`service_loop`) driven by a device that delivers faults.
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use parking_lot::Mutex;

    use crate::device::*;
    use crate::fakes::PlainCpu;
    use crate::space::{AddressSpace, AttachOptions, CoreConfig};
    use crate::testing::FakeDevice;
    use crate::types::{Access, Prot, VaRange, BLOCK_SIZE, PAGE_SIZE};

    type Cancels = Vec<(u64, Access, FaultCancel)>;

    /// A `FakeDevice` with a replayable fault buffer the test fills.
    #[derive(Debug)]
    struct QueueDev {
        inner: Arc<FakeDevice>,
        queue: Mutex<VecDeque<DeviceFault>>,
        fetched: std::sync::atomic::AtomicU64,
        replays: Mutex<Vec<Cancels>>,
        /// Faults raised while the first map of a batch is made (warps faulting meanwhile).
        during_map: Mutex<Vec<DeviceFault>>,
        /// Maps of addresses at or above this panic (a driver bug in one block's service).
        panic_from: Mutex<Option<u64>>,
    }

    impl QueueDev {
        fn new(bytes: usize, host_bytes: usize) -> QueueDev {
            let host = Arc::new(Mutex::new(vec![0u8; host_bytes]));
            QueueDev {
                inner: Arc::new(FakeDevice::new(bytes, 0xEE, host)),
                queue: Mutex::default(),
                fetched: 0.into(),
                replays: Mutex::default(),
                during_map: Mutex::default(),
                panic_from: Mutex::default(),
            }
        }
    }

    impl DeviceMmu for QueueDev {
        fn caps(&self) -> DeviceCaps {
            DeviceCaps { replayable_faults: true, ..self.inner.caps() }
        }
        fn physical_ranges(&self) -> Vec<(PhysAddr, u64)> {
            self.inner.physical_ranges()
        }
        fn create_page_table(&self) -> Result<(), DeviceError> {
            self.inner.create_page_table()
        }
        unsafe fn destroy_page_table(&self) {
            // SAFETY: forwarded as given.
            unsafe { self.inner.destroy_page_table() }
        }
        unsafe fn map(&self, entries: &[MapEntry]) -> Result<(), DeviceError> {
            if let Some(p) = *self.panic_from.lock() {
                assert!(!entries.iter().any(|e| e.va >= p), "injected panic in a map");
            }
            let raised: Vec<DeviceFault> = std::mem::take(&mut *self.during_map.lock());
            self.queue.lock().extend(raised);
            // SAFETY: forwarded as given.
            unsafe { self.inner.map(entries) }
        }
        fn unmap(&self, ranges: &[VaRange]) -> Result<(), DeviceError> {
            self.inner.unmap(ranges)
        }
        fn protect(&self, ranges: &[(VaRange, Prot)]) -> Result<(), DeviceError> {
            self.inner.protect(ranges)
        }
        fn invalidate_tlb(&self, ranges: &[VaRange]) {
            self.inner.invalidate_tlb(ranges)
        }
        unsafe fn copy(&self, ops: &[CopyOp]) -> Result<Box<dyn Completion>, DeviceError> {
            // SAFETY: forwarded as given.
            unsafe { self.inner.copy(ops) }
        }
        fn fetch_faults(&self, max: usize, out: &mut Vec<DeviceFault>) -> usize {
            let mut q = self.queue.lock();
            let n = max.min(q.len());
            out.extend(q.drain(..n));
            self.fetched.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
            n
        }
        fn wait_for_faults(&self, timeout: Duration) -> bool {
            if !self.queue.lock().is_empty() {
                return true;
            }
            std::thread::sleep(timeout.min(Duration::from_millis(1)));
            !self.queue.lock().is_empty()
        }
        fn replay(&self, cancel: &[(u64, Access, FaultCancel)]) {
            self.replays.lock().push(cancel.to_vec());
        }
        fn shutdown_faults(&self) {}
    }

    fn setup(blocks: u64) -> (Arc<AddressSpace>, Arc<QueueDev>, u64) {
        let policy = crate::policy::Policy {
            prefetcher: Arc::new(crate::policy::NoPrefetch),
            cpu_readahead: false,
            cross_block: false,
            ..crate::policy::Policy::uvm()
        };
        let space = AddressSpace::new(CoreConfig { policy, ..Default::default() });
        let s = 8 * BLOCK_SIZE;
        let len = blocks * BLOCK_SIZE;
        space.add_region(Arc::new(PlainCpu::new(VaRange::new(s, len))), Prot::READ | Prot::WRITE).unwrap();
        let dev = Arc::new(QueueDev::new(4 * BLOCK_SIZE as usize, len as usize));
        space.attach(dev.clone(), AttachOptions::default()).unwrap();
        (space, dev, s)
    }

    fn wait_replays(dev: &QueueDev, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while dev.replays.lock().len() < n {
            assert!(Instant::now() < deadline, "no replay");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Found by an audit: entries the batch flush discards (faults raised while the batch was serviced) are
    /// fetched but not counted in `device_faults` ("Device fault entries fetched"), and are
    /// counted in `duplicate_faults` ("merged into another entry of the same batch"): the
    /// duplicates exceed the faults.
    #[test]
    fn flushed_entries_are_counted_as_fetched_faults() {
        let (space, dev, s) = setup(1);
        *dev.during_map.lock() =
            (1..4).map(|k| DeviceFault { va: s + k * PAGE_SIZE, access: Access::Read, client: k as u32 }).collect();
        dev.queue.lock().push_back(DeviceFault { va: s, access: Access::Read, client: 0 });
        wait_replays(&dev, 1);
        let st = space.stats();
        let fetched = dev.fetched.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(fetched, 4, "the three faults raised meanwhile were flushed");
        assert!(
            st.duplicate_faults <= st.device_faults,
            "duplicate_faults {} > device_faults {}",
            st.duplicate_faults,
            st.device_faults
        );
        assert_eq!(st.device_faults, fetched, "device_faults is not the entries fetched");
    }

    /// Found by an audit: one block's service panicking (a driver bug) cancels every fault of the batch,
    /// also those of another block that was serviced and mapped before it: their kernels fail
    /// (`ServiceFailed`) though their pages are mapped.
    #[test]
    fn a_panicking_block_does_not_cancel_a_block_already_serviced() {
        let (_space, dev, s) = setup(2);
        *dev.panic_from.lock() = Some(s + BLOCK_SIZE);
        dev.queue.lock().extend([
            DeviceFault { va: s, access: Access::Read, client: 0 },
            DeviceFault { va: s + BLOCK_SIZE, access: Access::Read, client: 1 },
        ]);
        wait_replays(&dev, 1);
        let cancels = dev.replays.lock()[0].clone();
        let mapped = dev.inner.pt.lock().contains_key(&s);
        assert!(mapped, "the first block was serviced");
        assert!(!cancels.iter().any(|c| c.0 == s), "a fault of a block serviced and mapped was cancelled: {cancels:?}");
    }

    /// Reviewing 0cc2397 (`service_block_caught`): a driver panic in the device `map` of one
    /// block's service is caught and only its faults cancelled, but `migrate::to_device` had
    /// already allocated device pages and recorded them in the block (`fill`) without marking
    /// them resident: nothing frees them (the next service allocates again and overwrites them),
    /// so each such panic leaks device memory for good.
    #[test]
    fn a_panic_in_a_map_leaks_no_device_memory() {
        let (space, dev, s) = setup(2);
        let id = crate::types::DeviceId(0);
        let (_, total) = space.device_memory(id).unwrap();
        *dev.panic_from.lock() = Some(s + BLOCK_SIZE);
        dev.queue.lock().push_back(DeviceFault { va: s + BLOCK_SIZE, access: Access::Read, client: 0 });
        wait_replays(&dev, 1);
        *dev.panic_from.lock() = None;
        dev.queue.lock().push_back(DeviceFault { va: s + BLOCK_SIZE, access: Access::Read, client: 0 });
        wait_replays(&dev, 2);
        assert!(dev.inner.pt.lock().contains_key(&(s + BLOCK_SIZE)), "served after the panic");
        space.release_range(s, 2 * BLOCK_SIZE).unwrap();
        let (free, _) = space.device_memory(id).unwrap();
        assert_eq!(free, total, "device memory leaked by the panicking service: {} pages", (total - free) / PAGE_SIZE);
    }
}
