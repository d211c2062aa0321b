//! Eviction: choosing victim blocks on a device and moving their pages back to host backing.
//! Host backing exists for every page, so eviction never loses data. Victim order is policy:
//! UVM's FIFO by first residency, or hetmm's job-aware LRU (blocks of finished jobs first, then
//! those that came back after eviction least often lately, then least recently touched,
//! refreshed from the device's accessed bits). On a capacity-thrashing device, a block the
//! access counters find much hotter than the coolest candidate ([`candidates`], [`heat_of`])
//! takes that one's place. Pinned ranges are never chosen, nor, on a device that cannot fault
//! (a GPU), the blocks a launch is getting ready. hetmm also evicts in the background, keeping
//! free about as much memory as faults had to evict lately (up to a watermark), so eviction
//! overlaps migration instead of sitting in the fault path.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::block::Block;
use crate::error::Result;
use crate::policy::Eviction;
use crate::space::{AddressSpace, DeviceSlot};
use crate::stats::{add, add_since};
use crate::types::{Proc, VaRange, BLOCK_SIZE, PAGE_SIZE};

/// Candidates examined per LRU choice.
const LRU_SAMPLE: usize = 32;

/// What an eviction attempt achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Evicted {
    /// A block was evicted.
    Freed,
    /// Nothing was evicted, but some candidate was busy (locked by another thread): memory may
    /// free up soon.
    Busy,
    /// Nothing can be evicted.
    Nothing,
}

/// Evicts one block from `slot`'s device, skipping the block at `exclude` (the one being serviced,
/// whose lock the caller holds), blocks another thread holds, and pinned blocks.
pub(crate) fn evict_one(space: &AddressSpace, slot: &DeviceSlot, exclude: u64) -> Result<Evicted> {
    match space.config.policy.eviction {
        Eviction::Fifo => evict_fifo(space, slot, exclude),
        Eviction::JobAwareLru => evict_lru(space, slot, exclude),
    }
}

pub(crate) fn pinned(space: &AddressSpace, blk: &Block) -> bool {
    pinned_span(space, VaRange::new(blk.base, blk.npages as u64 * PAGE_SIZE))
}

/// Whether any of `span` is pinned.
fn pinned_span(space: &AddressSpace, span: VaRange) -> bool {
    space.attrs.read().any_pinned(span)
}

/// Whether a launch is getting `blk` ready on a device that cannot fault: the launch has just
/// migrated it, or is migrating it, and checks it is there before the kernel starts.
fn held_by_job(slot: &DeviceSlot, blk: &Block) -> bool {
    !slot.caps.replayable_faults && !blk.launching.is_empty()
}

/// Whether only launches prepared by other threads hold `blk`: they let go once their kernels
/// are launched (milliseconds), so the memory is busy, worth waiting for. A block this thread's
/// own launch holds (alone or shared with another's) never frees while this thread waits: a
/// launch larger than the device is refused at once.
fn held_by_other_launches(blk: &Block) -> bool {
    !blk.launching.contains(&std::thread::current().id())
}

/// An eviction attempt in flight on a device, counted in `DeviceSlot::evicting` while it lives.
struct InFlight<'a>(&'a DeviceSlot);

impl<'a> InFlight<'a> {
    fn new(slot: &'a DeviceSlot) -> Self {
        slot.evicting.fetch_add(1, Ordering::AcqRel);
        InFlight(slot)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.evicting.fetch_sub(1, Ordering::AcqRel);
    }
}

fn evict_fifo(space: &AddressSpace, slot: &DeviceSlot, exclude: u64) -> Result<Evicted> {
    let me = Proc::Device(slot.id);
    let tries = slot.evict_queue.lock().len();
    let mut busy = false;
    for _ in 0..tries {
        let Some(front) = slot.evict_queue.lock().front().copied() else { break };
        // A pinned block goes round without its lock being taken or an attempt counted: two
        // searches of a device full of pinned memory saw each other's attempts on pinned blocks
        // (locked a moment, or counted in flight) and reported `Busy` instead of `Nothing`, and
        // their faults waited out the patience for memory instead of being served remotely
        // (found by an audit). Pins change under the attributes' lock, not the block's.
        let region = space.region_at(front.0);
        let pin =
            region.as_ref().is_some_and(|r| front.1 < r.blocks.len() && pinned_span(space, r.block_span(front.1)));
        let _attempt = {
            let mut q = slot.evict_queue.lock();
            if q.front() != Some(&front) {
                // Another search took it meanwhile: busy if that search is attempting an
                // eviction (counted under this lock, before it let the queue go), which may free
                // memory any moment. Without this, two searches that took each other's fronts
                // used up their tries and both reported `Nothing` (a spurious out-of-memory)
                // once the other attempt had ended. Pinned entries going round count nothing.
                busy |= slot.evicting.load(Ordering::Acquire) > 0;
                continue;
            }
            q.pop_front();
            if pin {
                q.push_back(front);
                continue;
            }
            // Counted before the queue's lock is released: until the attempt ends, another
            // thread finds the victim in neither the queue nor free memory.
            InFlight::new(slot)
        };
        let (region_start, bidx) = front;
        let Some(region) = region else { continue };
        let Some(cell) = region.blocks.get(bidx) else { continue };
        let base = region.block_span(bidx).start;
        if base == exclude {
            // The caller's own block: locked by the caller, not busy.
            slot.evict_queue.lock().push_back((region_start, bidx));
            continue;
        }
        // Never wait for a block lock here: the caller holds one, and another service thread may
        // hold this one while it waits for ours.
        let Some(mut blk) = cell.try_lock() else {
            busy = true;
            slot.evict_queue.lock().push_back((region_start, bidx));
            continue;
        };
        let held = held_by_job(slot, &blk);
        if held || pinned(space, &blk) {
            busy |= held && held_by_other_launches(&blk);
            slot.evict_queue.lock().push_back((region_start, bidx));
            continue;
        }
        blk.queued_on.remove(me);
        match evict_block(space, &region, &mut blk, slot) {
            Ok(true) => return Ok(Evicted::Freed),
            Ok(false) => {}
            Err(e) => {
                // The block keeps its device pages (a failed copy leaves the source valid): it
                // stays a candidate for later. No other victim is tried now: copies that fail
                // (or time out, after `copy_timeout` each) would most likely fail for it too.
                blk.queued_on.insert(me);
                slot.evict_queue.lock().push_back((region_start, bidx));
                return Err(e);
            }
        }
    }
    // Another thread's attempt in flight (the background evictor's, say) may free memory any
    // moment: busy, so that the caller waits for it rather than failing.
    Ok(if busy || slot.evicting.load(Ordering::Acquire) > 0 { Evicted::Busy } else { Evicted::Nothing })
}

/// How [`evict_lru`] ranks a candidate (lowest first): blocks of finished jobs, then those that
/// came back after eviction least often (lately: a block untouched for a thrashing window counts
/// as never), then the least recently touched.
type Rank = (bool, u32, u64);

/// A block in a device's eviction queue: its region's start and its index there.
pub(crate) type Queued = (u64, usize);

/// What a look at the first [`LRU_SAMPLE`] blocks of a device's eviction queue that can be
/// evicted now finds (touch times refreshed from the device's accessed bits, heat from its access
/// counters): the lowest-ranked, which eviction takes, and the coolest (lowest heat).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Candidates {
    victim: Option<(Rank, Queued)>,
    /// The coolest candidate and its heat (see [`heat_of`]).
    pub(crate) coolest: Option<(f64, Queued)>,
}

impl Candidates {
    /// How often the block eviction would take came back after eviction lately.
    pub(crate) fn victim_refaults(&self) -> Option<u32> {
        self.victim.map(|((_, refaults, _), _)| refaults)
    }
}

/// See [`Candidates`]; `exclude` as in [`evict_one`].
pub(crate) fn candidates(space: &AddressSpace, slot: &DeviceSlot, exclude: u64) -> Candidates {
    let me = Proc::Device(slot.id);
    let now = space.tick();
    let sample: Vec<Queued> = slot.evict_queue.lock().iter().take(LRU_SAMPLE).copied().collect();
    let mut found = Candidates::default();
    for (rs, bidx) in sample {
        let Some(region) = space.region_at(rs) else { continue };
        let Some(mut blk) = region.blocks.get(bidx).and_then(|c| c.try_lock()) else { continue };
        if blk.base == exclude || blk.resident_on(me).is_empty() || pinned(space, &blk) || held_by_job(slot, &blk) {
            continue;
        }
        if let Some(acc) = slot.mmu.take_accessed(VaRange::new(blk.base, blk.npages as u64 * PAGE_SIZE)) {
            if !acc.is_empty() {
                blk.touch(slot.id, now);
            }
        }
        // Read at every look, though only the thrashing response compares heats: counts taken
        // often are aged from about when they were made, not lumped as new.
        let heat = heat_of(space, slot, &mut blk, now);
        let touched = blk.touched_by(slot.id);
        let recent = now.saturating_sub(touched) < crate::fault::THRASH_WINDOW_NS;
        let key = (!(blk.job_done && blk.active_jobs == 0), if recent { blk.refaults(slot.id) } else { 0 }, touched);
        if found.victim.is_none_or(|(k, _)| key < k) {
            found.victim = Some((key, (rs, bidx)));
        }
        if found.coolest.is_none_or(|(h, _)| heat < h) {
            found.coolest = Some((heat, (rs, bidx)));
        }
    }
    found
}

/// `blk`'s heat on `slot`'s device at `now`: the accesses its access counters counted, each
/// halved for every [`crate::block::HEAT_HALF_LIFE_NS`] since (0 where the policy leaves access
/// counters off or the device has none). Taking the counts clears them on the device, so every
/// reader goes through here.
pub(crate) fn heat_of(space: &AddressSpace, slot: &DeviceSlot, blk: &mut Block, now: u64) -> f64 {
    if !space.config.policy.access_counters {
        return 0.0;
    }
    let counted = slot.mmu.take_access_counts(VaRange::new(blk.base, blk.npages as u64 * PAGE_SIZE));
    blk.add_heat(slot.id, now, counted.unwrap_or(0))
}

fn evict_lru(space: &AddressSpace, slot: &DeviceSlot, exclude: u64) -> Result<Evicted> {
    if let Some((_, victim)) = candidates(space, slot, exclude).victim {
        if evict_queued(space, slot, victim)? {
            return Ok(Evicted::Freed);
        }
    }
    // Nothing suitable in the sample: fall back to the queue order.
    evict_fifo(space, slot, exclude)
}

/// Evicts the queued block `at` from `slot`'s device if it is still there and free (not locked
/// by another thread); returns whether it freed memory. On failure the block stays queued.
pub(crate) fn evict_queued(space: &AddressSpace, slot: &DeviceSlot, at: Queued) -> Result<bool> {
    // The region may have been reshaped since the sample: look the block up again.
    let Some(region) = space.region_at(at.0) else { return Ok(false) };
    let Some(mut blk) = region.blocks.get(at.1).and_then(|c| c.try_lock()) else { return Ok(false) };
    // Pinned, or taken by a launch, since the sample (neither takes the block's lock).
    if pinned(space, &blk) || held_by_job(slot, &blk) {
        return Ok(false);
    }
    // The block keeps its place in the queue (unlike a victim taken from the front): back on the
    // device, it is among the first blocks `candidates` samples, where the times it came back
    // keep it. Queued again at the end, it fell out of the sample, which then held blocks that
    // never came back, and eviction took those: `bench --workload gemm,stencil,graph,random
    // --policy hetmm --oversub 1.5,2 --repeat 5`, builds alternated on a quiet machine, `random`
    // evicted 2.6-4x as many blocks and took 1.5-1.7x as long, `stencil` 1.05-1.13x.
    let r = evict_block(space, &region, &mut blk, slot);
    if r.is_err() {
        // Ranked as just used, as a failed FIFO victim goes to the queue's back: it ranked
        // lowest again, and while it could not be evicted nothing on the device could (found
        // by an audit).
        blk.touch(slot.id, space.tick());
        // Nor is it a finished job's any more: that key ranks before the touch time, and such a
        // block was picked again first on every later search (found by an audit).
        blk.job_done = false;
    }
    r
}

/// Moves every page `slot` holds in `blk` back to host backing.
fn evict_block(
    space: &AddressSpace,
    region: &crate::space::Region,
    blk: &mut Block,
    slot: &DeviceSlot,
) -> Result<bool> {
    let me = Proc::Device(slot.id);
    let victims = blk.resident_on(me);
    if victims.is_empty() {
        return Ok(false);
    }
    let t = Instant::now();
    let copied = crate::migrate::evict_from(space, region, blk, slot)?;
    blk.evicted_by(slot.id, space.tick());
    add_since(&space.stats.ns_evict, t);
    add(&space.stats.evictions, 1);
    // Only what was copied: read duplicates the CPU holds too move nothing.
    add(&space.stats.bytes_evicted, copied as u64 * PAGE_SIZE);
    Ok(true)
}

/// Most pages the background evictor keeps free on a device of `total` pages: the watermark's
/// share, rounded to whole blocks (it evicts whole blocks) while under one. On a device so small
/// that the share is under half a block (6 MiB at 5%), none: keeping one of three blocks free
/// would cost a third of the memory, and the evictor would throw out data still in use (`gemm`
/// at oversubscription 2 moved about 3x the bytes and ran 15% slower that way).
pub(crate) fn free_cap(total: u64, mark: f64) -> u64 {
    // No more than the whole device, whatever the (public, `f64`) watermark says.
    let share = ((total as f64 * mark) as u64).min(total);
    let block = BLOCK_SIZE / PAGE_SIZE;
    if share.saturating_mul(2) < block {
        0
    } else {
        share.max(block)
    }
}

/// How often the free-memory target of the background evictor halves while no fault has had to
/// evict.
const TARGET_DECAY: Duration = Duration::from_millis(100);

/// Background evictor of one device. It keeps free about as much memory as the fault path had to
/// evict lately (`DeviceSlot::demand_evictions`), up to the policy's watermark, so a fault finds
/// room instead of evicting first; the target halves every [`TARGET_DECAY`] without such
/// evictions.
pub(crate) fn background_loop(space: Weak<AddressSpace>, slot: Arc<DeviceSlot>) {
    let (mut target, mut since) = (0u64, Instant::now());
    while !slot.is_detached() {
        {
            let g = slot.evict_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            drop(slot.evict_wake.wait_timeout(g, Duration::from_millis(20)));
        }
        let Some(space) = space.upgrade() else { return };
        let mark = space.config.policy.free_watermark;
        let (_, total) = slot.free_and_total();
        let cap = free_cap(total, mark);
        let demand = slot.demand_evictions.swap(0, Ordering::AcqRel);
        if demand > 0 {
            target = (target + demand * (BLOCK_SIZE / PAGE_SIZE)).min(cap);
            since = Instant::now();
        } else if since.elapsed() >= TARGET_DECAY {
            target /= 2;
            since = Instant::now();
        }
        if target == 0 {
            continue;
        }
        let Ok(_gate) = space.enter() else { return };
        // Never beside a reshape: it moves the blocks it keeps between regions, and their places
        // in the eviction queue with them (`AddressSpace::requeue`).
        let Some(_shape) = space.reshape.try_read() else { continue };
        let mut rounds = 0;
        while !slot.is_detached() && slot.free_and_total().0 < target && rounds < 64 {
            match evict_one(&space, &slot, u64::MAX) {
                Ok(Evicted::Freed) => {
                    rounds += 1;
                    add(&space.stats.background_evictions, 1);
                }
                Ok(_) => break,
                Err(e) => {
                    log::warn!("background eviction on {:?}: {e}", slot.id);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_free_target_never_costs_more_than_the_watermark_rounds_to() {
        let block = BLOCK_SIZE / PAGE_SIZE;
        // 6 MiB at 5%: 0.3 MiB, under half a block: no background eviction.
        assert_eq!(free_cap(3 * block, 0.05), 0);
        // 32 MiB at 5%: 1.6 MiB rounds up to one block.
        assert_eq!(free_cap(16 * block, 0.05), block);
        // 512 MiB at 5%: the share itself.
        assert_eq!(free_cap(256 * block, 0.05), (256 * block) / 20);
        assert_eq!(free_cap(256 * block, 0.0), 0);
    }

    /// `Policy::free_watermark` is a public `f64`: a share beyond the whole device (infinity, or
    /// any value over 1) is capped at the device. Uncapped, `f64::INFINITY` gave `u64::MAX`, and
    /// the fault path's `npages + free_cap(..)` (`fault::arrival`) overflowed: a panic in debug
    /// builds, a wrapped comparison in release.
    #[test]
    fn a_watermark_beyond_the_whole_device_is_capped_at_the_device() {
        let block = BLOCK_SIZE / PAGE_SIZE;
        for mark in [f64::INFINITY, 1e30, 2.0] {
            assert_eq!(free_cap(16 * block, mark), 16 * block, "watermark {mark}");
        }
        assert_eq!(free_cap(16 * block, f64::NAN), 0);
    }
}
