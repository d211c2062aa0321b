//! Allocation-failure injection (HMM's FAIL_ALLOC), for tests.
//!
//! Mirrored memory (a region with `remote` set: file-backed `MAP_SHARED` memory) never moves:
//! `migrate::to_device` and friends map its host pages remotely instead (`migrate::map_remote`).

use std::sync::atomic::Ordering;

use crate::error::Result;
use crate::space::{AddressSpace, DeviceSlot};
use crate::types::DeviceId;

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
