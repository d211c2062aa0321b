//! hetmm-core: the machine-independent and OS-independent heart of hetmm.
//!
//! Where things live:
//! - [`types`]: addresses, ranges, processors, access kinds.
//! - [`device`]: the [`device::DeviceMmu`] trait devices implement.
//! - [`cpu`]: the [`cpu::CpuMmu`] trait the host layer implements, and the CPU fault entry point.
//! - [`error`], [`stats`]: errors and counters.
//! - [`fork`]: what a `fork()` child sees of shared memory, and how the parent prepares it.
#![warn(missing_docs)]

pub mod cpu;
pub mod device;
pub mod error;
pub mod stats;
pub mod types;

pub mod advice;
pub mod alloc;
pub mod attrs;
pub mod block;
mod evict;
pub mod exclusive;
#[cfg(any(test, feature = "fakes"))]
pub mod fakes;
mod fault;
pub mod fork;
pub mod invalidate;
mod migrate;
mod mirror;
pub mod policy;
pub mod snapshot;
pub mod space;

pub use advice::{Advice, Pending};
pub use fork::{ForkGuard, ForkHold};
pub use policy::Policy;
pub use space::{AddressSpace, AttachOptions, CoreConfig};

#[cfg(test)]
mod testing;
