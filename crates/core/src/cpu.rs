//! The CPU side as the core sees it: one [`CpuMmu`] per shared region, supplied by the host layer
//! (on Linux: a memfd mapped twice, userfaultfd on the application's view). The core never calls
//! the OS itself; the host layer calls back into the core with [`CpuFaultHandler`].

use crate::device::HostAddr;
use crate::types::{Access, Prot, VaRange};

/// One part of a shared region as a `fork()` child must see it (see [`CpuMmu::fork_child`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForkPart {
    /// Application addresses (page aligned, inside the CPU side's range).
    pub range: VaRange,
    /// The protection the program has on it.
    pub prot: Prot,
}

/// An error from the host layer, with the facts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host {op} on {range} failed: {}", errno_text(*errno))]
pub struct HostError {
    /// The operation ("revoke", "map", "populate", ...).
    pub op: &'static str,
    /// The range it was applied to.
    pub range: VaRange,
    /// The OS error number, or [`HostError::RACED`].
    pub errno: i32,
}

fn errno_text(errno: i32) -> String {
    if errno == HostError::RACED {
        "raced the program's munmap or mremap of the range".into()
    } else {
        format!("errno {errno}")
    }
}

/// CPU page-table and backing operations for one shared region. All ranges are page aligned and
/// inside the region.
pub trait CpuMmu: Send + Sync + std::fmt::Debug {
    /// The region's application-visible range.
    fn range(&self) -> VaRange;

    /// Removes the CPU's mappings of the ranges (application view only; the backing keeps its
    /// data). When this returns no CPU thread can access them without faulting.
    fn revoke(&self, ranges: &[VaRange]) -> Result<(), HostError>;

    /// Makes sure backing pages exist for the ranges, zero-filled where they had none.
    fn populate(&self, ranges: &[VaRange]) -> Result<(), HostError>;

    /// Maps the ranges in the CPU page table from their backing and wakes threads waiting on
    /// faults in them. `writable == false` maps them write-protected (a write faults).
    fn map(&self, ranges: &[VaRange], writable: bool) -> Result<(), HostError>;

    /// Write-protects (`writable == false`) or un-protects the CPU's existing mappings of the
    /// ranges (absent pages are skipped). A write to a write-protected page faults.
    fn protect(&self, ranges: &[VaRange], writable: bool) -> Result<(), HostError>;

    /// Wakes threads waiting on faults in the range without mapping (they retry).
    fn wake(&self, range: VaRange) -> Result<(), HostError>;

    /// Frees the backing of the ranges (their data is dropped; a later access reads zeros).
    fn discard(&self, ranges: &[VaRange]) -> Result<(), HostError>;

    /// The manager's address of the backing of `va` (valid while the region lives). Copy engines
    /// read and write host data here. Linear over the region (`backing(va + d)` is
    /// `backing(va) + d`), so a run of pages is one copy.
    fn backing(&self, va: u64) -> HostAddr;

    /// Changes the CPU protection of the application's view of `range` (`mprotect`).
    fn set_prot(&self, _range: VaRange, _prot: crate::types::Prot) -> Result<(), HostError> {
        Ok(())
    }

    /// Runs in the child process of a `fork()`, on its only thread, before `fork` returns there:
    /// once per CPU side, with the parts of live regions it backs. The host backing holds the
    /// data of every page of them as of the fork (the core copied data held only by devices
    /// there while preparing), except the ranges in `lost` (a device copy failed), which must not
    /// be readable in the child. The implementation gives the child what `fork()` of ordinary
    /// memory gives: private memory becomes a private copy, shared memory stays shared. The
    /// parent waits until this returns (or the child dies), so the copy is as of the fork.
    ///
    /// It runs in the child of a multithreaded process: only plain system calls, no locks other
    /// threads may have held, no allocation, no logging. The default does nothing.
    fn fork_child(&self, _parts: &[ForkPart], _lost: &[VaRange]) -> Result<(), HostError> {
        Ok(())
    }

    /// Whether the host backing of `range` holds only zero bytes (for snapshots: a read-only
    /// mapped page of zeros is reported like Linux's zero page). `false` when unknown.
    fn reads_zero(&self, _range: VaRange) -> bool {
        false
    }

    /// Which pages of `range` the CPU's page table maps, one entry each, where the core does
    /// not track it (mirrored memory, which the CPU accesses without faulting through the
    /// core; for snapshots). `None` when unknown.
    fn cpu_present(&self, _range: VaRange) -> Option<Vec<bool>> {
        None
    }
}

impl HostError {
    /// In place of an errno: a revoke, write-protect or map that raced the program's unmap or
    /// remap of the memory. The CPU may still map the pages at their new addresses (or, for a
    /// map, the old addresses may show something else now), so nothing may be done on the
    /// strength of it; try again once the change is applied
    /// ([`AddressSpace::settle`]). Negative, so that no OS error (EAGAIN from an ioctl whose
    /// retries ran out, say) is taken for it.
    ///
    /// [`AddressSpace::settle`]: crate::AddressSpace::settle
    pub const RACED: i32 = -1;

    /// Whether this is a revoke, write-protect or map that raced an unmap or remap (see
    /// [`HostError::RACED`]).
    pub fn raced(&self) -> bool {
        matches!(self.op, "revoke" | "protect" | "map") && self.errno == Self::RACED
    }
}

/// What the host layer calls when the CPU faults on a shared region.
pub trait CpuFaultHandler: Send + Sync {
    /// Services a CPU fault at `va`: brings the data back and maps it (through
    /// [`CpuMmu::map`]), then returns. On error the host layer must still release the faulting
    /// thread (it raises SIGBUS on it rather than letting it hang).
    fn cpu_fault(&self, va: u64, access: Access) -> Result<(), crate::error::CoreError>;

    /// Applies a CPU-side address-space change (unmap, remap, discard) read from the OS.
    fn cpu_event(&self, _ev: crate::invalidate::CpuEvent) -> Result<(), crate::error::CoreError> {
        Ok(())
    }

    /// Called with `true` when an event was read and queued, `false` once it was applied:
    /// while events are pending, device faults on addresses no region covers are retried
    /// rather than cancelled (the region may be arriving at its new address).
    fn event_queued(&self, _queued: bool) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raced revoke is told apart from any OS error: a write-protect whose EAGAIN retries ran
    /// out (errno 11) is a failure, not a race to retry (RACED was EAGAIN's number).
    #[test]
    fn a_race_is_no_errno() {
        let range = VaRange::new(0x1000, 0x1000);
        let raced = HostError { op: "protect", range, errno: HostError::RACED };
        assert!(raced.raced());
        assert!(raced.to_string().contains("raced the program's munmap or mremap"), "{raced}");
        let eagain = HostError { op: "protect", range, errno: 11 };
        assert!(!eagain.raced());
        assert!(eagain.to_string().ends_with("errno 11"), "{eagain}");
    }
}
