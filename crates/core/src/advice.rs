//! Hints (GMEM's `hmadvise`, CUDA's `cudaMemAdvise`/`cudaMemPrefetchAsync`): prefetch in bulk and
//! asynchronously, discard, preferred location, read duplication, accessed-by, pinning.
//! Attributes live in the address space's [`crate::attrs::RangeAttrs`]; the residency decision
//! (`policy::select_residency`) and the evictor consult them.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{CoreError, Result};
use crate::space::AddressSpace;
use crate::types::{DeviceId, Proc, VaRange};

/// A hint about a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// Move the range to this processor now, in bulk, asynchronously (on a read-mostly range a
    /// device gets a read-only copy instead). Wait on the returned [`Pending`].
    Prefetch(Proc),
    /// Drop the data everywhere; the next touch reads zeros. Pages a device refuses to unmap keep
    /// their data everywhere (the device could still reach them), and the refusal is returned.
    DontNeed,
    /// Where the data should live (`None` clears it).
    PreferredLocation(Option<Proc>),
    /// Read duplication on (`true`) or off: readers get their own copies; the first write
    /// collapses them to the writer.
    ReadMostly(bool),
    /// Keep a mapping on this device wherever the data lives (remote access instead of
    /// migration), or stop (`false`).
    AccessedBy(DeviceId, bool),
    /// Never evict the range while pinned (`true`), or allow it again. Eviction works on whole
    /// 2 MiB blocks (the unit of device memory), so a pinned page keeps its whole block on the
    /// device: pins held on many blocks can leave a small device with nothing to evict. The
    /// program's own reshapes are the exception: a partial `munmap`/`mprotect`/`mremap` of a
    /// block brings the block home (pinned pages included), as it does any block it splits.
    Pin(bool),
}

/// Completion of an advice: immediate for attribute changes, a background migration for
/// [`Advice::Prefetch`].
#[derive(Debug)]
pub struct Pending {
    rx: Option<mpsc::Receiver<Result<()>>>,
}

impl Pending {
    pub(crate) fn done() -> Self {
        Pending { rx: None }
    }

    /// Waits until the advice has taken effect, at most `timeout`.
    pub fn wait(self, timeout: Duration) -> Result<()> {
        match self.rx {
            None => Ok(()),
            Some(rx) => match rx.recv_timeout(timeout) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => Err(CoreError::Timeout { what: "prefetch", after: timeout }),
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(CoreError::ShuttingDown),
            },
        }
    }
}

impl AddressSpace {
    /// Applies `advice` to `[start, start + len)` (page aligned, shared memory throughout; it
    /// may span adjacent regions). Attribute changes take effect before this returns; a
    /// prefetch runs in the background.
    pub fn advise(self: &Arc<Self>, start: u64, len: u64, advice: Advice) -> Result<Pending> {
        // Held from the check to the change of the attributes: no munmap or mremap in between
        // (recursive: a reshape waiting must not block the nested reads below).
        let shape = self.reshape.read_recursive();
        let parts = self.span_parts(start, len)?;
        let range = VaRange::new(start, len);
        match advice {
            Advice::Prefetch(to) => {
                if let Proc::Device(d) = to {
                    self.slot(d)?;
                }
                let (tx, rx) = mpsc::channel();
                let me = Arc::clone(self);
                std::thread::Builder::new()
                    .name("hetmm-prefetch".into())
                    .spawn(move || {
                        let r = me.retrying_races(|| {
                            let _gate = me.enter()?;
                            // As `migrate`: no region may be reshaped meanwhile, and the range is
                            // checked again, for the program may have unmapped part of it since.
                            let _shape = me.reshape.read();
                            for part in me.span_parts(range.start, range.len)? {
                                me.prefetch_range(part, to)?;
                            }
                            Ok(())
                        });
                        let _ = tx.send(r);
                    })
                    .map_err(|_| CoreError::ShuttingDown)?;
                Ok(Pending { rx: Some(rx) })
            }
            Advice::DontNeed => {
                drop(shape);
                // Every part is tried: pages a device refuses to give up keep their data, the
                // others go; the first refusal is returned.
                let mut dropped = Ok(());
                for part in parts {
                    let r = self.discard_range(part);
                    dropped = dropped.and(r);
                }
                dropped.map(|()| Pending::done())
            }
            Advice::PreferredLocation(p) => {
                {
                    // The device is checked under the attributes' lock: a detach forgets its
                    // advice under the same lock, so none lands after it.
                    let mut attrs = self.attrs.write();
                    if let Some(Proc::Device(d)) = p {
                        self.slot(d)?;
                    }
                    attrs.update(range, |a| a.preferred = p);
                }
                drop(shape);
                if let Some(Proc::Device(d)) = p {
                    self.unmap_remote_on(d, range)?;
                }
                Ok(Pending::done())
            }
            Advice::ReadMostly(on) => {
                self.attrs.write().update(range, |a| a.read_mostly = on);
                Ok(Pending::done())
            }
            Advice::AccessedBy(d, on) => {
                let p = Proc::Device(d);
                let mut attrs = self.attrs.write();
                self.slot(d)?;
                attrs.update(range, |a| if on { a.accessed_by.insert(p) } else { a.accessed_by.remove(p) });
                Ok(Pending::done())
            }
            Advice::Pin(on) => {
                self.attrs.write().update(range, |a| a.pinned = on);
                drop(shape);
                if on {
                    // Eviction checks the pin under the block's lock and evicts under the same
                    // hold: taking each lock once waits out one that checked before the pin,
                    // so none evicts a pinned block after this returns.
                    self.with_blocks_in(range, |_, _, _| Ok(()))?;
                }
                Ok(Pending::done())
            }
        }
    }
}

impl AddressSpace {
    /// UVM's `preferred_location_unmap_remote_pages`: the new preferred device loses its remote
    /// mappings of the pages of `range` it holds no copy of, so that its next access faults and
    /// residency selection moves the data to it (a device never faults on what it maps, and
    /// with access counters off nothing else would bring the data).
    fn unmap_remote_on(&self, d: DeviceId, range: VaRange) -> Result<()> {
        let slot = self.slot(d)?;
        let me = Proc::Device(d);
        self.with_blocks_in(range, |region, blk, inside| {
            // Mirrored regions are never migrated: remote mappings are all they have.
            if region.remote || region.is_freed() {
                return Ok(());
            }
            let mut remote = *inside;
            for i in inside.iter() {
                if !blk.pages[i].dev_mapped.has(me) || blk.pages[i].resident.has(me) {
                    remote.clear(i);
                }
            }
            if remote.is_empty() {
                return Ok(());
            }
            crate::migrate::unmap_on(self, blk, &slot, &remote)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::device::DeviceFault;
    use crate::policy::Policy;
    use crate::space::{AttachOptions, CoreConfig};
    use crate::types::{Access, Prot, BLOCK_SIZE, PAGE_SIZE};

    /// uvm.md 4, policy gates: "On a first touch, if the destination is the preferred location,
    /// the whole block (2 MB) is populated" (`uvm_perf_prefetch_prenotify_fault_migrations`:
    /// block resident nowhere and `preferred_location == new_residency` fills the whole
    /// region). Under `uvm`, after `PreferredLocation(device)`, the device's first fault in an
    /// untouched block brings only the tree prefetcher's 64 KiB.
    #[test]
    fn uvm_first_touch_at_the_preferred_location_populates_the_whole_block() {
        let (start, len) = (8 * BLOCK_SIZE, BLOCK_SIZE);
        let (space, id) = crate::testing::one_region(Policy::uvm(), start, len);
        let d = Proc::Device(id);
        space.advise(start, len, Advice::PreferredLocation(Some(d))).unwrap().wait(Duration::from_secs(5)).unwrap();
        let slot = space.slot(id).unwrap();
        let mut batch = vec![DeviceFault { va: start, access: Access::Read, client: 0 }];
        let (cancel, _) = crate::fault::service_batch(&space, &slot, &mut batch);
        assert!(cancel.is_empty());
        let on_dev =
            (0..len / PAGE_SIZE).filter(|p| space.page_state(start + p * PAGE_SIZE).unwrap().resident.has(d)).count();
        assert_eq!(on_dev, 512, "whole block populated on the preferred device");
    }

    /// Advice naming a device outlives it: `detach` leaves `PreferredLocation(dev)` and
    /// `AccessedBy(dev)` in the range attributes, and `attach` reuses the lowest free id, so the
    /// next device attached inherits advice the program gave for another one. (UVM drops a GPU
    /// from every range's preferred location and accessed-by set when it is unregistered.) Nor
    /// can the program take the stale `AccessedBy` back: `AccessedBy(dev, false)` is refused as
    /// detached.
    #[test]
    fn advice_naming_a_detached_device_is_dropped() {
        let space = AddressSpace::new(CoreConfig::default());
        let (start, len) = (8 * BLOCK_SIZE, BLOCK_SIZE);
        let host = Arc::new(parking_lot::Mutex::new(vec![0u8; len as usize]));
        space
            .add_region(Arc::new(crate::fakes::PlainCpu::new(VaRange::new(start, len))), Prot::READ | Prot::WRITE)
            .unwrap();
        let dev = || Arc::new(crate::testing::FakeDevice::new(64 * PAGE_SIZE as usize, 0, host.clone()));
        let id = space.attach(dev(), AttachOptions::default()).unwrap();
        let d = Proc::Device(id);
        space.advise(start, len, Advice::PreferredLocation(Some(d))).unwrap();
        space.advise(start, len, Advice::AccessedBy(id, true)).unwrap();
        space.detach(id).unwrap();
        let a = space.attrs_at(start);
        assert!(a.preferred.is_none() && a.accessed_by.is_empty(), "stale advice after detach: {a:?}");
        let id2 = space.attach(dev(), AttachOptions::default()).unwrap();
        assert_eq!(id2, id, "ids are reused");
        let a = space.attrs_at(start);
        assert!(a.preferred.is_none() && a.accessed_by.is_empty(), "the new device inherited: {a:?}");
    }

    /// uvm.md 7.1: SetPreferredLocation "unmaps remote mappings from the preferred processor
    /// on pages not resident there, so that the next access faults and migrates"
    /// (`preferred_location_unmap_remote_pages`). Under `uvm` (access counters off) a device
    /// that maps host memory remotely keeps that mapping after it becomes the preferred
    /// location: it never faults again, and the data never comes to it.
    #[test]
    fn uvm_preferred_location_unmaps_the_preferred_devices_remote_mappings() {
        let (start, len) = (8 * BLOCK_SIZE, BLOCK_SIZE);
        let (space, id) = crate::testing::one_region(Policy::uvm(), start, len);
        let d = Proc::Device(id);
        crate::cpu::CpuFaultHandler::cpu_fault(&*space, start, Access::Write).unwrap();
        space.advise(start, len, Advice::AccessedBy(id, true)).unwrap();
        let slot = space.slot(id).unwrap();
        let mut batch = vec![DeviceFault { va: start, access: Access::Read, client: 0 }];
        let (cancel, _) = crate::fault::service_batch(&space, &slot, &mut batch);
        assert!(cancel.is_empty());
        let p = space.page_state(start).unwrap();
        assert!(p.dev_mapped.has(d) && !p.resident.has(d), "set-up: mapped remotely: {p:?}");
        space.advise(start, len, Advice::AccessedBy(id, false)).unwrap();
        space.advise(start, len, Advice::PreferredLocation(Some(d))).unwrap();
        let p = space.page_state(start).unwrap();
        assert!(!p.dev_mapped.has(d) || p.resident.has(d), "the preferred device still maps host memory: {p:?}");
    }
}
