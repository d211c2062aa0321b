//! The CPU side as the core sees it: one [`CpuMmu`] per shared region, supplied by the host layer
//! (on Linux: a memfd mapped twice, userfaultfd on the application's view). The core never calls
//! the OS itself; the host layer calls back into the core with [`CpuFaultHandler`].

use crate::device::HostAddr;
use crate::types::{Access, VaRange};

/// An error from the host layer, with the facts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host {op} on {range} failed: errno {errno}")]
pub struct HostError {
    /// The operation ("revoke", "map", "populate", ...).
    pub op: &'static str,
    /// The range it was applied to.
    pub range: VaRange,
    /// The OS error number.
    pub errno: i32,
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

    /// Readies the manager's view of the backing of the ranges for copy engines (maps it in bulk,
    /// allocating zeroed pages where there were none), so copies do not fault page by page.
    fn prepare(&self, ranges: &[VaRange]) -> Result<(), HostError>;

    /// Frees the backing of the ranges (their data is dropped; a later access reads zeros).
    fn discard(&self, ranges: &[VaRange]) -> Result<(), HostError>;

    /// The manager's address of the backing of `va` (valid while the region lives). Copy engines
    /// read and write host data here.
    fn backing(&self, va: u64) -> HostAddr;
}

/// What the host layer calls when the CPU faults on a shared region.
pub trait CpuFaultHandler: Send + Sync {
    /// Services a CPU fault at `va`: brings the data back and maps it (through
    /// [`CpuMmu::map`]), then returns. On error the host layer must still release the faulting
    /// thread (it raises SIGBUS on it rather than letting it hang).
    fn cpu_fault(&self, va: u64, access: Access) -> Result<(), crate::error::CoreError>;
}
