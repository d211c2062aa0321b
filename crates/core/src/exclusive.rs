//! Migration across adjacent regions, and exclusive device access (HMM's
//! `make_device_exclusive`).
//!
//! Exclusive access in hetmm: the pages move into the device's memory and are mapped there with
//! atomics allowed; the CPU has no mapping. Any CPU access faults, brings the data back and
//! unmaps the device, which revokes the exclusivity; the device's next atomic faults the page
//! back to it. [`AddressSpace::check_exclusive`] tells whether the device still holds every page.

use crate::error::{CoreError, Result};
use crate::space::AddressSpace;
use crate::types::{DeviceId, Proc, Prot, VaRange, PAGE_SIZE};

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
        self.migrate_span(start, len, Proc::Device(dev))
    }

    /// Whether `dev` still holds exclusive access to every page of the range (no CPU access
    /// revoked it since [`AddressSpace::make_exclusive`]).
    pub fn check_exclusive(&self, start: u64, len: u64, dev: DeviceId) -> Result<bool> {
        let range = self.check_span(start, len)?;
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
        self.slot(dev)?;
        let _gate = self.enter()?;
        let _shape = self.reshape.read();
        let regions: Vec<_> = self.regions.read().values().cloned().collect();
        for r in regions {
            for cell in &r.blocks {
                let mut blk = cell.lock();
                if r.is_freed() {
                    break;
                }
                let here = blk.resident_on(Proc::Device(dev));
                if !here.is_empty() {
                    crate::migrate::to_cpu(self, &r, &mut blk, &here)?;
                }
            }
        }
        Ok(())
    }
}
