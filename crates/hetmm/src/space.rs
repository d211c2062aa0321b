//! [`Space`]: what safe code may do with the core address space behind a [`crate::Hetmm`].
//!
//! The buffers' slices ([`crate::BufRef`], [`crate::BufMut`]) are sound because nothing changes
//! a buffer's memory behind them: kernels and discards go through checks that count them. The
//! core's own calls cannot see those counts, and several change memory (a `DontNeed`, an unmap
//! or reshape of the core's view of a range, a discard). So safe code gets this view, whose
//! calls read state or move data without changing it; the whole address space is
//! [`crate::Hetmm::space_unchecked`].

use std::sync::Arc;

use hetmm_core::block::Page;
use hetmm_core::device::DeviceCaps;
use hetmm_core::error::CoreError;
use hetmm_core::stats::StatsSnapshot;
use hetmm_core::types::{DeviceId, VaRange};
use hetmm_core::{AddressSpace, ForkGuard, ForkHold};

/// The calls of the core address space that change no memory (see the module notes): state,
/// statistics, and moves of data that keep its contents.
///
/// A discard through it does not compile (it would zero a buffer under its slices):
///
/// ```compile_fail
/// # fn f(hm: &hetmm::Hetmm, buf: &hetmm::SharedBuf<u8>) {
/// let s = buf.as_slice();
/// hm.space().advise(buf.ptr(), 4096, hetmm::Advice::DontNeed);
/// # }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Space<'a>(pub(crate) &'a Arc<AddressSpace>);

impl<'a> Space<'a> {
    /// See [`AddressSpace::settle`].
    pub fn settle(&self) -> Result<(), CoreError> {
        self.0.settle()
    }
    /// See [`AddressSpace::check_span`].
    pub fn check_span(&self, start: u64, len: u64) -> Result<VaRange, CoreError> {
        self.0.check_span(start, len)
    }
    /// See [`AddressSpace::span_parts`].
    pub fn span_parts(&self, start: u64, len: u64) -> Result<Vec<VaRange>, CoreError> {
        self.0.span_parts(start, len)
    }
    /// See [`AddressSpace::any_shared`].
    pub fn any_shared(&self, range: VaRange) -> bool {
        self.0.any_shared(range)
    }
    /// See [`AddressSpace::page_state`].
    pub fn page_state(&self, va: u64) -> Option<Page> {
        self.0.page_state(va)
    }
    /// See [`AddressSpace::stats`].
    pub fn stats(&self) -> StatsSnapshot {
        self.0.stats()
    }
    /// See [`AddressSpace::device_caps`].
    pub fn device_caps(&self, id: DeviceId) -> Result<DeviceCaps, CoreError> {
        self.0.device_caps(id)
    }
    /// See [`AddressSpace::device_memory`].
    pub fn device_memory(&self, id: DeviceId) -> Result<(u64, u64), CoreError> {
        self.0.device_memory(id)
    }
    /// See [`AddressSpace::check_exclusive`].
    pub fn check_exclusive(&self, start: u64, len: u64, dev: DeviceId) -> Result<bool, CoreError> {
        self.0.check_exclusive(start, len, dev)
    }
    /// See [`AddressSpace::evict_device`] (the data comes home unchanged).
    pub fn evict_device(&self, dev: DeviceId) -> Result<(), CoreError> {
        self.0.evict_device(dev)
    }
    /// See [`AddressSpace::inject_alloc_failures`].
    pub fn inject_alloc_failures(&self, dev: DeviceId, count: u32) -> Result<(), CoreError> {
        self.0.inject_alloc_failures(dev, count)
    }
    /// See [`AddressSpace::hold_forks`].
    pub fn hold_forks(&self) -> Result<ForkHold<'a>, CoreError> {
        self.0.hold_forks()
    }
    /// See [`AddressSpace::forks_waiting`].
    pub fn forks_waiting(&self) -> usize {
        self.0.forks_waiting()
    }
    /// See [`AddressSpace::fork_prepare`] (device-only data is copied home unchanged). Until
    /// the guard is dropped, an access of this thread to shared memory that must fault (data
    /// on a device) waits for the guard: a deadlock, as locking a held mutex again.
    pub fn fork_prepare(&self) -> Option<ForkGuard> {
        self.0.fork_prepare()
    }
}
