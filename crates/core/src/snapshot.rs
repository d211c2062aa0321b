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
        let mut out = vec![SnapEntry::ERROR; range.pages() as usize];
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
                for i in 0..blk.npages {
                    let va = blk.va(i);
                    if !part.contains(va) {
                        continue;
                    }
                    let pg = blk.pages[i];
                    let me = Proc::Device(dev);
                    let kind = if pg.resident.has(me) && !pg.resident.has(Proc::Cpu) {
                        SnapKind::ThisDevice
                    } else if let Some(d) = pg.resident.devices().find(|_| !pg.resident.has(Proc::Cpu)) {
                        SnapKind::OtherDevice(d)
                    } else if pg.cpu == CpuMap::None {
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
    if blk.npages as u64 * PAGE_SIZE != BLOCK_SIZE || blk.base % BLOCK_SIZE != 0 {
        return false;
    }
    let Some(pa0) = blk.pa(dev, 0) else { return false };
    pa0.0 % BLOCK_SIZE == 0
        && (0..blk.npages).all(|i| {
            blk.pages[i].resident == crate::types::ProcMask::only(Proc::Device(dev))
                && blk.pa(dev, i).is_some_and(|p| p.0 == pa0.0 + i as u64 * PAGE_SIZE)
        })
}
