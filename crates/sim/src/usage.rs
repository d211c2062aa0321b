//! Use counters: every access a kernel makes, to its own memory or to memory it maps remotely,
//! counted per 2 MiB of virtual addresses in 64-byte transactions, as NVIDIA's access counters
//! can count local ("MIMC") as well as remote ("MOMC") accesses. The core reads and clears them
//! per block ([`hetmm_core::device::DeviceMmu::take_access_counts`]) to tell how hot a resident
//! block is beside one it serves remotely: accessed bits only say a block was used, not how much.
//!
//! Workers count in their TLB counters (under the lock every access holds anyway) and add to the
//! shared table only once a region's count builds up or another region takes its slot, so the
//! table's lock is taken once per 64 KiB a worker accesses in a region, not per access.

use std::collections::HashMap;

use parking_lot::Mutex;

use hetmm_core::types::{align_down, VaRange};

/// The counters' granularity.
pub(crate) const USE_REGION: u64 = 2 << 20;
/// Bytes per counted access (one transaction).
pub(crate) const USE_BYTES: u64 = 64;
/// Transactions a worker's slot holds before it adds them to the table (64 KiB).
pub(crate) const USE_FLUSH: u32 = 1024;

/// The device's use counters, per 2 MiB region.
#[derive(Debug, Default)]
pub(crate) struct UseTable {
    counts: Mutex<HashMap<u64, u64>>,
}

impl UseTable {
    /// Adds `n` transactions to `region`'s count.
    pub(crate) fn add(&self, region: u64, n: u32) {
        *self.counts.lock().entry(region).or_insert(0) += u64::from(n);
    }

    /// Takes (returns and clears) the transactions counted in the regions `range` overlaps.
    pub(crate) fn take(&self, range: VaRange) -> u64 {
        if range.len == 0 {
            return 0;
        }
        let mut counts = self.counts.lock();
        let mut sum = 0u64;
        let mut r = align_down(range.start, USE_REGION);
        while r < range.end() {
            sum = sum.saturating_add(counts.remove(&r).unwrap_or(0));
            r = match r.checked_add(USE_REGION) {
                Some(next) => next,
                None => break,
            };
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_returns_the_regions_counts_once() {
        let t = UseTable::default();
        t.add(0, 5);
        t.add(USE_REGION, 7);
        t.add(USE_REGION, 1);
        t.add(3 * USE_REGION, 100);
        assert_eq!(t.take(VaRange::new(USE_REGION + 4096, 4096)), 8);
        assert_eq!(t.take(VaRange::new(USE_REGION, USE_REGION)), 0, "taken once");
        assert_eq!(t.take(VaRange::new(0, 4 * USE_REGION)), 105);
        assert_eq!(t.take(VaRange::new(0, 0)), 0);
    }
}
