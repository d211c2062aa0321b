//! Eviction: when a device allocation fails, choose a victim block on that device and move its
//! pages back to their host backing. Host backing exists for every page, so eviction never loses
//! data. The foundation's victim order is FIFO by first residency (UVM's behaviour); recency- and
//! job-aware policies plug in here.

use std::time::Instant;

use crate::error::Result;
use crate::migrate::to_cpu;
use crate::space::{AddressSpace, DeviceSlot};
use crate::stats::{add, add_since};
use crate::types::{Proc, PAGE_SIZE};

/// Evicts one block from `slot`'s device, skipping the block at `exclude` (the one being serviced,
/// whose lock the caller holds) and blocks another thread holds. Returns whether anything was
/// freed.
pub(crate) fn evict_one(space: &AddressSpace, slot: &DeviceSlot, exclude: u64) -> Result<bool> {
    let me = Proc::Device(slot.id);
    let tries = slot.evict_queue.lock().len();
    for _ in 0..tries {
        let Some((region_start, bidx)) = slot.evict_queue.lock().pop_front() else { break };
        let Some(region) = space.region_at(region_start) else { continue };
        let Some(cell) = region.blocks.get(bidx) else { continue };
        // Never wait for a block lock here: the caller holds one, and another service thread may
        // hold this one while it waits for ours.
        let Some(mut blk) = cell.try_lock().filter(|b| b.base != exclude) else {
            slot.evict_queue.lock().push_back((region_start, bidx));
            continue;
        };
        blk.queued_on.remove(me);
        let victims = blk.resident_on(me);
        if victims.is_empty() {
            continue;
        }
        let t = Instant::now();
        to_cpu(space, &region, &mut blk, &victims)?;
        add_since(&space.stats.ns_evict, t);
        add(&space.stats.evictions, 1);
        add(&space.stats.bytes_evicted, victims.count() as u64 * PAGE_SIZE);
        return Ok(true);
    }
    Ok(false)
}
