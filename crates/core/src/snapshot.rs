//! Snapshots: one entry per page saying where its data is and how it is mapped, like the HMM
//! self-test's SNAPSHOT (`hmm_range_fault` without faulting), from one device's point of view.

use crate::block::{Block, CpuMap};
use crate::error::{CoreError, Result};
use crate::space::AddressSpace;
use crate::types::{DeviceId, Proc, Prot, VaRange, BLOCK_SIZE, PAGE_SIZE};

/// Where a page is, as seen by the device a snapshot is taken for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SnapKind {
    /// No shared memory here, or memory the program mapped with no access (`PROT_NONE`).
    Error,
    /// Nothing mapped by the CPU and no device copy (never touched, or CPU mapping dropped).
    None,
    /// In host memory, mapped by the CPU.
    System,
    /// In host memory, mapped read-only by the CPU, and all zeros (Linux's zero page).
    Zero,
    /// In this device's memory.
    ThisDevice,
    /// In another device's memory.
    OtherDevice(DeviceId),
}

/// One page of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SnapEntry {
    /// Where the page is.
    pub kind: SnapKind,
    /// Access the page allows where it is (READ, or READ | WRITE).
    pub prot: Prot,
    /// Mapped by a 2 MiB (PMD-level) entry: the whole aligned 2 MiB is on the device in one
    /// contiguous chunk.
    pub huge: bool,
}

/// HMM self-test snapshot byte values (`HMM_DMIRROR_PROT_*`).
pub mod hmm {
    /// `HMM_DMIRROR_PROT_ERROR`.
    pub const ERROR: u8 = 0xFF;
    /// `HMM_DMIRROR_PROT_NONE`.
    pub const NONE: u8 = 0x00;
    /// `HMM_DMIRROR_PROT_READ`.
    pub const READ: u8 = 0x01;
    /// `HMM_DMIRROR_PROT_WRITE`.
    pub const WRITE: u8 = 0x02;
    /// `HMM_DMIRROR_PROT_PMD`.
    pub const PMD: u8 = 0x04;
    /// `HMM_DMIRROR_PROT_PUD`.
    pub const PUD: u8 = 0x08;
    /// `HMM_DMIRROR_PROT_ZERO`.
    pub const ZERO: u8 = 0x10;
    /// `HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL`.
    pub const DEV_PRIVATE_LOCAL: u8 = 0x20;
    /// `HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE`.
    pub const DEV_PRIVATE_REMOTE: u8 = 0x30;
}

impl SnapEntry {
    const ERROR: SnapEntry = SnapEntry { kind: SnapKind::Error, prot: Prot::empty(), huge: false };

    /// The HMM self-test byte for a device-private device. As in Linux, a page on another
    /// private device reads as `NONE` (its owner is the only one who can see it).
    pub fn hmm_byte(&self) -> u8 {
        let access = |p: Prot| {
            if p.contains(Prot::WRITE) {
                hmm::WRITE
            } else if p.contains(Prot::READ) {
                hmm::READ
            } else {
                0
            }
        };
        let level = if self.huge { hmm::PMD } else { 0 };
        match self.kind {
            SnapKind::Error => hmm::ERROR,
            SnapKind::None | SnapKind::OtherDevice(_) => hmm::NONE,
            SnapKind::System => access(self.prot) | level,
            SnapKind::Zero => hmm::ZERO | hmm::READ,
            SnapKind::ThisDevice => hmm::DEV_PRIVATE_LOCAL | access(self.prot) | level,
        }
    }
}

impl AddressSpace {
    /// One entry per page of `[start, start + len)` as seen by `dev` (which must be attached).
    /// Holes and pages outside shared memory are [`SnapKind::Error`] entries, not errors.
    pub fn snapshot(&self, start: u64, len: u64, dev: DeviceId) -> Result<Vec<SnapEntry>> {
        if len == 0 {
            return Err(CoreError::Empty { start });
        }
        let range = VaRange::checked(start, len).ok_or(CoreError::Overflow { start, len })?;
        if !range.is_page_aligned() {
            return Err(CoreError::Unaligned(range));
        }
        self.slot(dev)?;
        let _gate = self.enter()?;
        let _shape = self.reshape.read();
        // One entry per page of a user's length: refused, not an abort, where no memory can
        // hold them.
        let n = usize::try_from(range.pages()).map_err(|_| CoreError::Overflow { start, len })?;
        let mut out = Vec::new();
        out.try_reserve_exact(n).map_err(|_| CoreError::Overflow { start, len })?;
        out.resize(n, SnapEntry::ERROR);
        for region in self.overlapping(range) {
            let Some(part) = region.range.intersect(&range) else { continue };
            if !region.prot.contains(Prot::READ) {
                continue;
            }
            let first = region.block_index(part.start);
            let last = region.block_index(part.end() - 1);
            for bidx in first..=last {
                let blk = region.blocks[bidx].lock();
                let huge = huge_on(&blk, dev);
                // The CPU's mappings of mirrored memory are not the core's to track (the CPU
                // touches it without faulting through hetmm): the host's page table tells.
                let span = VaRange::new(blk.base, blk.npages as u64 * PAGE_SIZE);
                let present = if region.remote { region.cpu.cpu_present(span) } else { None };
                for i in 0..blk.npages {
                    let va = blk.va(i);
                    if !part.contains(va) {
                        continue;
                    }
                    let pg = blk.pages[i];
                    let cpu_maps = pg.cpu != CpuMap::None || present.as_ref().is_some_and(|p| p[i]);
                    let me = Proc::Device(dev);
                    let kind = if pg.resident.has(me) && !pg.resident.has(Proc::Cpu) {
                        SnapKind::ThisDevice
                    } else if let Some(d) = pg.resident.devices().find(|_| !pg.resident.has(Proc::Cpu)) {
                        SnapKind::OtherDevice(d)
                    } else if !cpu_maps {
                        SnapKind::None
                    } else if (pg.cpu == CpuMap::Read || !region.prot.contains(Prot::WRITE))
                        && region.cpu.reads_zero(VaRange::new(va, PAGE_SIZE))
                    {
                        SnapKind::Zero
                    } else {
                        SnapKind::System
                    };
                    let prot = match kind {
                        SnapKind::System if pg.cpu == CpuMap::Read => Prot::READ,
                        // A read-only duplicate: this device's mapping allows only reads.
                        SnapKind::ThisDevice if pg.dev_ro.has(me) => Prot::READ,
                        _ => region.prot & (Prot::READ | Prot::WRITE),
                    };
                    let idx = ((va - range.start) / PAGE_SIZE) as usize;
                    out[idx] = SnapEntry { kind, prot, huge: huge && kind == SnapKind::ThisDevice };
                }
            }
        }
        Ok(out)
    }
}

/// Whether `blk` is a whole 2 MiB block resident on `dev` in one aligned, contiguous chunk (so
/// the device maps it with one 2 MiB entry).
fn huge_on(blk: &Block, dev: DeviceId) -> bool {
    if blk.npages as u64 * PAGE_SIZE != BLOCK_SIZE || !blk.base.is_multiple_of(BLOCK_SIZE) {
        return false;
    }
    let Some(pa0) = blk.pa(dev, 0) else { return false };
    pa0.0 % BLOCK_SIZE == 0
        && (0..blk.npages).all(|i| {
            blk.pages[i].resident == crate::types::ProcMask::only(Proc::Device(dev))
                && blk.pa(dev, i).is_some_and(|p| p.0 == pa0.0 + i as u64 * PAGE_SIZE)
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;

    use crate::cpu::{CpuFaultHandler, CpuMmu};
    use crate::device::DeviceMmu;
    use crate::error::CoreError;
    use crate::space::{AddressSpace, AttachOptions, CoreConfig};
    use crate::testing::{FakeDevice, PlainCpu};
    use crate::types::*;

    use super::{hmm, SnapKind};

    const BASE: u64 = 0x7800_0000_0000;

    /// The test's body, in a child process when `child` is set (see below).
    const CHILD_ENV: &str = "HETMM_SNAPSHOT_HUGE_CHILD";

    /// A snapshot of a range far longer than memory can describe (a user's `len`) is refused
    /// with an error: it aborted the process, allocating one entry per page before looking at
    /// anything. Run in a child process, since the failure is an abort, not a panic.
    #[test]
    fn snapshot_of_an_impossibly_long_range_is_an_error_not_an_abort() {
        if std::env::var_os(CHILD_ENV).is_some() {
            let host = Arc::new(Mutex::new(vec![0u8; BLOCK_SIZE as usize]));
            let space = AddressSpace::new(CoreConfig::default());
            let cpu = Arc::new(PlainCpu::new(VaRange::new(BASE, BLOCK_SIZE)));
            space.add_region(Arc::clone(&cpu) as Arc<dyn CpuMmu>, Prot::READ | Prot::WRITE).unwrap();
            let dev = Arc::new(FakeDevice::new(BLOCK_SIZE as usize, 0, host));
            let id = space.attach(dev as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
            let r = space.snapshot(BASE, 1 << 62, id);
            assert!(matches!(r, Err(CoreError::Overflow { .. })), "{:?}", r.map(|v| v.len()));
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "snapshot::tests::snapshot_of_an_impossibly_long_range_is_an_error_not_an_abort"])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "the child died: {:?}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }

    /// A page two peer devices hold as read-only duplicates (read-mostly, copied peer to
    /// peer, no CPU copy) allows each of them only reads: the snapshot said READ | WRITE, from
    /// the region's protection, while a write by the device faults.
    #[test]
    fn snapshot_of_a_read_only_duplicate_on_the_device_says_read() {
        let host = Arc::new(Mutex::new(vec![0x33u8; BLOCK_SIZE as usize]));
        let space = AddressSpace::new(CoreConfig::default());
        let cpu = Arc::new(PlainCpu::new(VaRange::new(BASE, BLOCK_SIZE)));
        space.add_region(Arc::clone(&cpu) as Arc<dyn CpuMmu>, Prot::READ | Prot::WRITE).unwrap();
        space.cpu_fault(BASE, Access::Write).unwrap();
        let mk = || Arc::new(FakeDevice::with_peer_window((4 * BLOCK_SIZE) as usize, 0, Arc::clone(&host)));
        let (d0, d1) = (mk(), mk());
        let id0 = space.attach(d0 as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
        let id1 = space.attach(d1 as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
        space.migrate(BASE, PAGE_SIZE, Proc::Device(id0)).unwrap();
        space.advise(BASE, BLOCK_SIZE, crate::advice::Advice::ReadMostly(true)).unwrap();
        space.migrate(BASE, PAGE_SIZE, Proc::Device(id1)).unwrap();
        let st = space.page_state(BASE).unwrap();
        let snap = space.snapshot(BASE, PAGE_SIZE, id1).unwrap()[0];
        assert!(st.dev_ro.has(Proc::Device(id1)) && !st.resident.has(Proc::Cpu), "no read-only duplicate: {st:?}");
        assert_eq!(snap.kind, SnapKind::ThisDevice);
        assert_eq!(snap.prot, Prot::READ, "device maps it read-only: {st:?}, snapshot {snap:?}");
        assert_eq!(snap.hmm_byte(), hmm::DEV_PRIVATE_LOCAL | hmm::READ);
    }

    /// A CPU side that runs a hook on its first `reads_zero` (the snapshot is then between its
    /// look at the regions and its read of their pages), and records a `reads_zero` after the
    /// caller released it (`remove_region` returned and the test set `released`, as the caller
    /// unmaps the memory then).
    #[derive(Debug)]
    struct Watched {
        range: VaRange,
        hook: Mutex<Option<Hook>>,
        released: std::sync::atomic::AtomicBool,
        used_after_release: std::sync::atomic::AtomicBool,
    }

    struct Hook(Box<dyn FnOnce() + Send>);

    impl std::fmt::Debug for Hook {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Hook")
        }
    }

    impl Watched {
        fn new(range: VaRange) -> Watched {
            Watched { range, hook: Mutex::new(None), released: false.into(), used_after_release: false.into() }
        }
    }

    impl CpuMmu for Watched {
        fn range(&self) -> VaRange {
            self.range
        }
        fn revoke(&self, _: &[VaRange]) -> Result<(), crate::cpu::HostError> {
            Ok(())
        }
        fn populate(&self, _: &[VaRange]) -> Result<(), crate::cpu::HostError> {
            Ok(())
        }
        fn map(&self, _: &[VaRange], _: bool) -> Result<(), crate::cpu::HostError> {
            Ok(())
        }
        fn protect(&self, _: &[VaRange], _: bool) -> Result<(), crate::cpu::HostError> {
            Ok(())
        }
        fn wake(&self, _: VaRange) -> Result<(), crate::cpu::HostError> {
            Ok(())
        }
        fn discard(&self, _: &[VaRange]) -> Result<(), crate::cpu::HostError> {
            Ok(())
        }
        fn backing(&self, va: u64) -> crate::device::HostAddr {
            crate::device::HostAddr((va - self.range.start) as usize)
        }
        fn reads_zero(&self, _range: VaRange) -> bool {
            let hook = self.hook.lock().take();
            if let Some(Hook(f)) = hook {
                f();
            }
            if self.released.load(std::sync::atomic::Ordering::SeqCst) {
                self.used_after_release.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            false
        }
    }

    /// A snapshot over two adjacent regions while the second is removed: `remove_region` waits
    /// for the snapshot (the reshape lock), so the snapshot never reads a CPU side its caller
    /// has already been handed back to release. It took no lock the snapshot holds: removed
    /// (and released) between the snapshot's look at the regions and its read of the second
    /// one's pages, the snapshot went on to ask the released CPU side about its memory. Made
    /// deterministic by a hook in the first region's `reads_zero`, which starts the removal and
    /// waits (bounded) for it to return.
    #[test]
    fn a_snapshot_never_reads_a_region_removed_under_it() {
        use std::sync::atomic::Ordering::SeqCst;
        let (a, b) = (VaRange::new(BASE, BLOCK_SIZE), VaRange::new(BASE + BLOCK_SIZE, BLOCK_SIZE));
        let space = AddressSpace::new(CoreConfig::default());
        let cpu_a = Arc::new(Watched::new(a));
        let cpu_b = Arc::new(Watched::new(b));
        space.add_region(Arc::clone(&cpu_a) as Arc<dyn CpuMmu>, Prot::READ).unwrap();
        space.add_region(Arc::clone(&cpu_b) as Arc<dyn CpuMmu>, Prot::READ).unwrap();
        let host = Arc::new(Mutex::new(vec![0u8; 2 * BLOCK_SIZE as usize]));
        let dev = Arc::new(FakeDevice::new(BLOCK_SIZE as usize, 0, host));
        let id = space.attach(dev as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
        // Read-only regions mapped by the CPU: the snapshot asks each CPU side whether the page
        // reads zeros.
        space.cpu_fault(a.start, Access::Read).unwrap();
        space.cpu_fault(b.start, Access::Read).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let remover = Arc::new(Mutex::new(None));
        {
            let (weak, cpu_b, remover) = (Arc::downgrade(&space), Arc::clone(&cpu_b), Arc::clone(&remover));
            *cpu_a.hook.lock() = Some(Hook(Box::new(move || {
                let t = std::thread::spawn(move || {
                    let space = weak.upgrade().expect("the space lives while the snapshot runs");
                    let r = space.remove_region(b.start).map(|_| ());
                    // The caller releases the CPU side (munmap) once the region is removed.
                    cpu_b.released.store(true, SeqCst);
                    let _ = done_tx.send(());
                    r
                });
                *remover.lock() = Some(t);
                // Without the lock the removal ends at once; with it, it waits for the snapshot.
                let _ = done_rx.recv_timeout(std::time::Duration::from_millis(500));
            })));
        }
        let snap = space.snapshot(a.start, 2 * BLOCK_SIZE, id).unwrap();
        let t = remover.lock().take().expect("the hook ran");
        t.join().unwrap().unwrap();
        assert!(!cpu_b.used_after_release.load(SeqCst), "the snapshot read region b after its removal returned");
        assert_eq!(snap[0].kind, SnapKind::System);
        assert_eq!(snap[(BLOCK_SIZE / PAGE_SIZE) as usize].kind, SnapKind::System, "region b, as it was");
        assert!(space.page_state(b.start).is_none(), "region b is gone after the snapshot");
    }
}
