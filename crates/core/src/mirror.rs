//! Mirrored (not migrated) memory and allocation-failure injection.
//!
//! A remote region's data always stays in host memory (file-backed `MAP_SHARED` memory: the
//! file's pages are the truth). A device fault there maps the host page into the device's page
//! table through the system-memory aperture ([`MapTarget::Host`]); writes land in the host page,
//! so in the file.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::block::{Block, PageMask};
use crate::device::{MapEntry, MapTarget};
use crate::error::{CoreError, Result};
use crate::migrate::{device_prot, ranges};
use crate::space::{AddressSpace, DeviceSlot, Region};
use crate::stats::add_since;
use crate::types::{DeviceId, Proc, Prot};

/// Maps the pages `want` of a remote region's block in `slot`'s page table, pointing at their
/// host backing.
pub(crate) fn map_remote(
    space: &AddressSpace,
    region: &Region,
    blk: &mut Block,
    slot: &DeviceSlot,
    want: &PageMask,
) -> Result<()> {
    let me = Proc::Device(slot.id);
    if !slot.caps.remote_host_access {
        return Err(CoreError::NotMigratable(region.range));
    }
    let mut unmapped = PageMask::default();
    for i in want.iter() {
        if !blk.pages[i].dev_mapped.has(me) {
            unmapped.set(i);
        }
    }
    if unmapped.is_empty() {
        return Ok(());
    }
    // Remote mappings cannot do device atomics on host memory.
    let prot = device_prot(region) & (Prot::READ | Prot::WRITE);
    let entries: Vec<MapEntry> = ranges(blk, &unmapped)
        .into_iter()
        .map(|r| MapEntry { va: r.start, len: r.len, target: MapTarget::Host(region.cpu.backing(r.start)), prot })
        .collect();
    let t = Instant::now();
    // SAFETY: every target is the region's own host backing (the manager's alias, contiguous over
    // one region), which stays mapped while the region's CPU side lives. Every path that removes
    // or reshapes a region unmaps its device mappings and invalidates the TLB first
    // (`drop_device_copies`), before the CPU side is released.
    let r = unsafe { slot.mmu.map(&entries) };
    add_since(&space.stats.ns_map, t);
    r.map_err(|source| CoreError::Device { device: slot.id, source })?;
    for i in unmapped.iter() {
        let pg = &mut blk.pages[i];
        pg.dev_mapped.insert(me);
        pg.resident.insert(Proc::Cpu);
    }
    Ok(())
}

/// Consumes one injected 2 MiB allocation failure of `slot`, if any is armed.
pub(crate) fn take_injected_failure(slot: &DeviceSlot) -> bool {
    slot.fail_large_alloc.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
}

impl AddressSpace {
    /// Makes the next `count` 2 MiB device allocations of `dev` fail, as if device memory were
    /// too fragmented (the migration falls back to base pages). For tests (HMM's FAIL_ALLOC).
    pub fn inject_alloc_failures(&self, dev: DeviceId, count: u32) -> Result<()> {
        self.slot(dev)?.fail_large_alloc.store(count, Ordering::Release);
        Ok(())
    }
}
