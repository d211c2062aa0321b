//! Migration across adjacent regions, and exclusive device access (HMM's
//! `make_device_exclusive`).
//!
//! Exclusive access in hetmm: the pages move into the device's memory and are mapped there with
//! atomics allowed; the CPU has no mapping. Any CPU access faults, brings the data back and
//! unmaps the device, which revokes the exclusivity; the device's next atomic faults the page
//! back to it. [`AddressSpace::check_exclusive`] tells whether the device still holds every page.

use crate::error::{CoreError, Result};
use crate::space::AddressSpace;
use crate::types::{DeviceId, Proc, ProcMask, Prot, VaRange, PAGE_SIZE};

impl AddressSpace {
    /// Like [`AddressSpace::migrate`], but the range may cover several adjacent regions (parts
    /// split by `protect` or a partial unmap). A device destination needs every page readable
    /// and migratable; nothing moves when a check fails.
    pub fn migrate_span(&self, start: u64, len: u64, to: Proc) -> Result<()> {
        let range = self.check_span(start, len)?;
        let parts: Vec<(VaRange, Prot, bool)> = self
            .overlapping(range)
            .iter()
            .filter_map(|r| r.range.intersect(&range).map(|p| (p, r.prot, r.remote)))
            .collect();
        if let Proc::Device(d) = to {
            self.slot(d)?;
            for &(p, prot, remote) in &parts {
                if !prot.contains(Prot::READ) {
                    return Err(CoreError::Protection { range: p, needed: Prot::READ });
                }
                if remote {
                    return Err(CoreError::NotMigratable(p));
                }
            }
        }
        for (p, _, _) in parts {
            self.migrate(p.start, p.len, to)?;
        }
        Ok(())
    }

    /// Gives `dev` exclusive access to `[start, start + len)` for atomics (see the module notes).
    /// The memory must be private (migratable) and writable.
    pub fn make_exclusive(&self, start: u64, len: u64, dev: DeviceId) -> Result<()> {
        let range = self.check_span(start, len)?;
        for r in self.overlapping(range) {
            let Some(p) = r.range.intersect(&range) else { continue };
            if r.remote {
                return Err(CoreError::NotMigratable(p));
            }
            if !r.prot.contains(Prot::READ | Prot::WRITE) {
                return Err(CoreError::Protection { range: p, needed: Prot::READ | Prot::WRITE });
            }
        }
        self.migrate_span(start, len, Proc::Device(dev))?;
        // A migration may leave pages shared (read-mostly duplicates keep the CPU's copy and map
        // the device read-only): exclusivity needs the device to be the only holder, mapped
        // read-write, so such pages are collapsed onto it.
        self.retrying_races(|| self.collapse_onto(range, dev))?;
        // Collapsing a later block may have evicted an earlier one from a device too small for
        // the whole range: Ok must mean every page is exclusive (HMM's EXCLUSIVE).
        if !self.check_exclusive(start, len, dev)? {
            return Err(CoreError::OutOfDeviceMemory { device: dev, bytes: range.len });
        }
        Ok(())
    }

    /// Makes `dev` the only holder of every page of `range`, mapped read-write, where it is
    /// not already.
    fn collapse_onto(&self, range: VaRange, dev: DeviceId) -> Result<()> {
        let slot = self.slot(dev)?;
        let me = Proc::Device(dev);
        self.with_blocks_in(range, |region, blk, inside| {
            if region.is_freed() {
                return Err(CoreError::NotShared(range));
            }
            let mut want = *inside;
            for i in inside.iter() {
                let p = &blk.pages[i];
                if p.resident == ProcMask::only(me) && p.dev_mapped == ProcMask::only(me) && !p.dev_ro.has(me) {
                    want.clear(i);
                }
            }
            if want.is_empty() {
                return Ok(());
            }
            blk.while_busy(want, |blk| crate::migrate::to_device(self, region, blk, &slot, &want))
        })
    }

    /// Whether `dev` still holds exclusive access to every page of the range (no CPU access
    /// revoked it since [`AddressSpace::make_exclusive`]). A detached or unknown device is
    /// [`CoreError::Detached`], as for every other operation on a device.
    pub fn check_exclusive(&self, start: u64, len: u64, dev: DeviceId) -> Result<bool> {
        let range = self.check_span(start, len)?;
        self.slot(dev)?;
        let me = Proc::Device(dev);
        let mut va = range.start;
        while va < range.end() {
            let Some(pg) = self.page_state(va) else { return Ok(false) };
            // Only this device holds and maps it: no other device maps its copy peer to peer.
            if pg.resident != crate::types::ProcMask::only(me) || pg.dev_mapped != crate::types::ProcMask::only(me) {
                return Ok(false);
            }
            va += PAGE_SIZE;
        }
        Ok(true)
    }

    /// Moves everything `dev` holds back to host memory (HMM's RELEASE: device memory evicted
    /// to system memory). The device stays attached.
    pub fn evict_device(&self, dev: DeviceId) -> Result<()> {
        let slot = self.slot(dev)?;
        let _gate = self.enter()?;
        let _shape = self.reshape.read();
        let regions: Vec<_> = self.regions.read().values().cloned().collect();
        for r in regions {
            for cell in &r.blocks {
                let mut blk = cell.lock();
                if r.is_freed() {
                    break;
                }
                // Only this device's copies: other devices keep theirs (as on eviction).
                crate::migrate::evict_from(self, &r, &mut blk, &slot)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;

    use crate::advice::Advice;
    use crate::cpu::{CpuFaultHandler, CpuMmu};
    use crate::device::DeviceMmu;
    use crate::space::{AddressSpace, AttachOptions, CoreConfig};
    use crate::testing::{FakeDevice, PlainCpu};
    use crate::types::*;

    const BASE: u64 = 0x7700_0000_0000;
    const LEN: u64 = BLOCK_SIZE;

    /// A space with one read-write region of one block the CPU wrote, and two devices that are
    /// peers of one fabric.
    fn setup() -> (Arc<AddressSpace>, [Arc<FakeDevice>; 2], [DeviceId; 2]) {
        let host = Arc::new(Mutex::new(vec![0x5au8; LEN as usize]));
        let space = AddressSpace::new(CoreConfig::default());
        let cpu = Arc::new(PlainCpu::new(VaRange::new(BASE, LEN)));
        space.add_region(Arc::clone(&cpu) as Arc<dyn CpuMmu>, Prot::READ | Prot::WRITE).unwrap();
        space.cpu_fault(BASE, Access::Write).unwrap();
        let d0 = Arc::new(FakeDevice::with_peer_window((4 * BLOCK_SIZE) as usize, 0, Arc::clone(&host)));
        let d1 = Arc::new(FakeDevice::with_peer_window((4 * BLOCK_SIZE) as usize, 0, Arc::clone(&host)));
        let id0 = space.attach(Arc::clone(&d0) as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
        let id1 = space.attach(Arc::clone(&d1) as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
        (space, [d0, d1], [id0, id1])
    }

    /// `make_exclusive` on memory advised read-mostly still gives the device the only copy:
    /// a read-mostly duplicate leaves the CPU's copy (and mapping), which is no exclusivity.
    #[test]
    fn make_exclusive_on_read_mostly_memory_holds_every_page() {
        let (space, _devs, ids) = setup();
        space.advise(BASE, LEN, Advice::ReadMostly(true)).unwrap();
        space.make_exclusive(BASE, PAGE_SIZE, ids[0]).unwrap();
        let st = space.page_state(BASE).unwrap();
        assert!(
            space.check_exclusive(BASE, PAGE_SIZE, ids[0]).unwrap(),
            "make_exclusive returned Ok but the device is not exclusive: {st:?}"
        );
        // The data is the CPU's, now in the device's only copy.
        let region = space.region_of(BASE).unwrap();
        let blk = region.blocks[0].lock();
        let pa = blk.pa(ids[0], 0).unwrap();
        assert!(_devs[0].mem.lock()[pa.0 as usize..(pa.0 + PAGE_SIZE) as usize].iter().all(|&b| b == 0x5a));
    }

    /// HMM's RELEASE of one device (`evict_device`) moves what *that* device holds home: a
    /// read-only duplicate another device holds of the same page (read-mostly, copied peer to
    /// peer) stays there, mapped, as an eviction from one device leaves the others' copies
    /// (`migrate::evict_from`). `evict_device` goes through `migrate::to_cpu`, which takes every
    /// device's copy of the pages.
    #[test]
    fn releasing_one_device_leaves_another_devices_duplicate() {
        let (space, devs, ids) = setup();
        space.migrate(BASE, PAGE_SIZE, Proc::Device(ids[0])).unwrap();
        space.advise(BASE, LEN, Advice::ReadMostly(true)).unwrap();
        space.migrate(BASE, PAGE_SIZE, Proc::Device(ids[1])).unwrap();
        let st = space.page_state(BASE).unwrap();
        assert!(st.resident.has(Proc::Device(ids[0])) && st.resident.has(Proc::Device(ids[1])), "{st:?}");
        assert!(devs[1].access(BASE, None).is_some(), "device 1 maps its duplicate");
        space.evict_device(ids[0]).unwrap();
        let st = space.page_state(BASE).unwrap();
        assert!(!st.resident.has(Proc::Device(ids[0])), "device 0 released it: {st:?}");
        assert!(
            st.resident.has(Proc::Device(ids[1])) && st.dev_mapped.has(Proc::Device(ids[1])),
            "releasing device 0 took device 1's copy too: {st:?}"
        );
        assert_eq!(devs[1].access(BASE, None), Some(0x5a));
    }

    /// `check_exclusive` for a device that was detached, or never attached, is the error every
    /// other operation on such a device gives (`Detached`): it answered `Ok(false)`, as if the
    /// device had merely lost its exclusivity to a CPU access.
    #[test]
    fn check_exclusive_on_a_detached_or_unknown_device_is_an_error() {
        use crate::error::CoreError;
        let (space, _devs, ids) = setup();
        space.make_exclusive(BASE, PAGE_SIZE, ids[0]).unwrap();
        assert!(space.check_exclusive(BASE, PAGE_SIZE, ids[0]).unwrap());
        space.detach(ids[0]).unwrap();
        let r = space.check_exclusive(BASE, PAGE_SIZE, ids[0]);
        assert!(matches!(r, Err(CoreError::Detached(d)) if d == ids[0]), "detached: {r:?}");
        assert!(matches!(space.migrate(BASE, PAGE_SIZE, Proc::Device(ids[0])), Err(CoreError::Detached(_))));
        let unknown = DeviceId(9);
        let r = space.check_exclusive(BASE, PAGE_SIZE, unknown);
        assert!(matches!(r, Err(CoreError::Detached(d)) if d == unknown), "unknown: {r:?}");
        // A bad range is still reported as such first.
        assert!(matches!(space.check_exclusive(BASE + 1, PAGE_SIZE, ids[1]), Err(CoreError::Unaligned(_))));
        assert!(!space.check_exclusive(BASE, PAGE_SIZE, ids[1]).unwrap(), "device 1 never held it");
    }
}
