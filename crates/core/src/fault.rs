//! Device fault service: fetch a batch from the device's fault buffer, merge duplicates (the
//! most intrusive access wins), sort by block, service each block once under its lock (policy
//! picks residency and prefetch pages; `migrate` moves them), then replay once for the batch.

use std::cmp::Reverse;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::block::PageMask;
use crate::device::{DeviceFault, FaultCancel};
use crate::policy::select_residency;
use crate::space::{AddressSpace, DeviceSlot};
use crate::stats::add;
use crate::types::{align_down, Access, Proc, Prot, BLOCK_SIZE, PAGE_SIZE};

/// How long the service thread sleeps in the device's fault wait before re-checking for detach.
const POLL: Duration = Duration::from_millis(50);

/// The per-device service thread: runs until the device is detached or the address space is gone.
pub(crate) fn service_loop(space: Weak<AddressSpace>, slot: Arc<DeviceSlot>) {
    let mut batch = Vec::with_capacity(slot.batch);
    while !slot.is_detached() {
        if !slot.mmu.wait_for_faults(POLL) {
            continue;
        }
        batch.clear();
        slot.mmu.fetch_faults(slot.batch, &mut batch);
        if batch.is_empty() {
            continue;
        }
        let Some(space) = space.upgrade() else {
            slot.mmu.shutdown_faults();
            break;
        };
        let cancel = service_batch(&space, &slot, &mut batch);
        slot.mmu.replay(&cancel);
        add(&space.stats.replays, 1);
    }
}

/// Services one batch; returns the faults to cancel, by page.
pub(crate) fn service_batch(
    space: &AddressSpace,
    slot: &DeviceSlot,
    faults: &mut Vec<DeviceFault>,
) -> Vec<(u64, FaultCancel)> {
    let _shape = space.reshape.read();
    let st = &space.stats;
    add(&st.device_faults, faults.len() as u64);
    add(&st.fault_batches, 1);
    for f in faults.iter_mut() {
        f.va = align_down(f.va, PAGE_SIZE);
    }
    faults.sort_unstable_by_key(|f| (f.va, Reverse(f.access)));
    let before = faults.len();
    faults.dedup_by_key(|f| f.va);
    add(&st.duplicate_faults, (before - faults.len()) as u64);

    let mut cancel = Vec::new();
    let mut rest: &[DeviceFault] = faults;
    while let Some(first) = rest.first() {
        let base = align_down(first.va, BLOCK_SIZE);
        let n = rest.iter().take_while(|f| align_down(f.va, BLOCK_SIZE) == base).count();
        let (group, tail) = rest.split_at(n);
        rest = tail;
        service_block(space, slot, group, &mut cancel);
    }
    add(&st.cancelled_faults, cancel.len() as u64);
    cancel
}

/// Services the faults of one 2 MiB block (sorted, deduplicated).
fn service_block(space: &AddressSpace, slot: &DeviceSlot, group: &[DeviceFault], cancel: &mut Vec<(u64, FaultCancel)>) {
    let Some(region) = space.region_of(group[0].va) else {
        // A region may be arriving at this address (a remap event read, not yet applied): let
        // the access retry instead of failing it.
        if space.events_pending.load(std::sync::atomic::Ordering::Acquire) == 0 {
            cancel.extend(group.iter().map(|f| (f.va, FaultCancel::Unmapped)));
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
        cancel.extend(group.iter().map(|f| (f.va, FaultCancel::Unmapped)));
        return;
    }
    let me = Proc::Device(slot.id);
    let mut faulted = PageMask::default();
    for f in group {
        if !region.range.contains(f.va) {
            cancel.push((f.va, FaultCancel::Unmapped));
            continue;
        }
        let needs = f.access.needs() & (Prot::READ | Prot::WRITE);
        if !region.prot.contains(needs) {
            cancel.push((f.va, FaultCancel::Protection));
            continue;
        }
        let i = ((f.va - blk.base) / PAGE_SIZE) as usize;
        if select_residency(&blk.pages[i], me, f.access.max(Access::Read)) == me {
            faulted.set(i);
        }
    }
    if faulted.is_empty() {
        return;
    }
    let resident = blk.resident_on(me);
    let extra = space.config.prefetcher.prefetch(&faulted, &resident, blk.npages);
    let want = faulted.or(&extra);
    add(&space.stats.prefetched_pages, want.and_not(&faulted).and_not(&resident).count() as u64);
    add(&space.stats.blocks_serviced, 1);
    let mut r = crate::migrate::to_device(space, &region, &mut blk, slot, &want);
    if matches!(r, Err(crate::error::CoreError::OutOfDeviceMemory { .. })) && want != faulted {
        // Not enough room for the prefetch: service just what faulted.
        r = crate::migrate::to_device(space, &region, &mut blk, slot, &faulted);
    }
    if let Err(e) = r {
        log::error!("servicing device {:?} faults in block {:#x}: {e}", slot.id, blk.base);
        cancel.extend(faulted.iter().map(|i| (blk.va(i), FaultCancel::ServiceFailed)));
    }
}
