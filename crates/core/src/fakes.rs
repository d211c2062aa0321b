//! Fakes of the outside world for tests and benchmarks of the core alone (with the `fakes`
//! feature outside the crate's own tests).

use parking_lot::Mutex;

use crate::cpu::{CpuMmu, ForkPart, HostError};
use crate::device::HostAddr;
use crate::types::VaRange;

/// A CPU side for tests that look at the core's page states rather than at CPU page tables:
/// mapping calls do nothing, the backing is a vector addressed by offset (`HostAddr` is
/// `va - range.start`), and the fork hook's calls are recorded.
#[derive(Debug)]
pub struct PlainCpu {
    pub(crate) range: VaRange,
    /// Every `fork_child` call: its parts and lost ranges.
    pub(crate) forked: Mutex<Vec<(Vec<ForkPart>, Vec<VaRange>)>>,
}

impl PlainCpu {
    /// A CPU side for the region `range`.
    pub fn new(range: VaRange) -> PlainCpu {
        PlainCpu { range, forked: Mutex::new(Vec::new()) }
    }
}

impl CpuMmu for PlainCpu {
    fn range(&self) -> VaRange {
        self.range
    }
    fn revoke(&self, _: &[VaRange]) -> Result<(), HostError> {
        Ok(())
    }
    fn populate(&self, _: &[VaRange]) -> Result<(), HostError> {
        Ok(())
    }
    fn map(&self, _: &[VaRange], _: bool) -> Result<(), HostError> {
        Ok(())
    }
    fn protect(&self, _: &[VaRange], _: bool) -> Result<(), HostError> {
        Ok(())
    }
    fn wake(&self, _: VaRange) -> Result<(), HostError> {
        Ok(())
    }
    fn discard(&self, _: &[VaRange]) -> Result<(), HostError> {
        Ok(())
    }
    fn backing(&self, va: u64) -> HostAddr {
        HostAddr((va - self.range.start) as usize)
    }
    fn fork_child(&self, parts: &[ForkPart], lost: &[VaRange]) -> Result<(), HostError> {
        self.forked.lock().push((parts.to_vec(), lost.to_vec()));
        Ok(())
    }
}
