//! hetmm-host: the CPU side of hetmm on Linux.
//!
//! A shared region is a memfd mapped twice ([`mapping::SharedMapping`]): the application's
//! view, registered with a userfaultfd in MISSING | MINOR | WP mode, and the manager's alias,
//! where copy engines read and write. [`Host`] owns the userfaultfd ([`uffd::Uffd`]) and the
//! thread that turns CPU faults into calls of the core's
//! [`CpuFaultHandler`](hetmm_core::cpu::CpuFaultHandler); [`HostRegion`] is the core's
//! [`CpuMmu`](hetmm_core::cpu::CpuMmu) for one region. [`probe`] measures the platform's limits.
//!
//! [`fork`] makes `fork()` give a child its own copy of private hetmm memory (and keeps shared
//! memory shared).
//!
//! All `unsafe` lives in [`uffd`] (ioctls), [`mapping`] (mmap, madvise) and [`fork`]
//! (`pthread_atfork`).
#![warn(missing_docs)]

#[cfg(target_os = "linux")]
mod events;
#[cfg(target_os = "linux")]
pub mod fork;
#[cfg(target_os = "linux")]
mod host;
#[cfg(target_os = "linux")]
pub mod mapping;
#[cfg(target_os = "linux")]
mod maps;
#[cfg(target_os = "linux")]
pub mod mirror;
#[cfg(target_os = "linux")]
mod pagemap;
#[cfg(target_os = "linux")]
pub mod probe;
#[cfg(target_os = "linux")]
pub mod signals;
#[cfg(target_os = "linux")]
pub mod uffd;

#[cfg(all(test, target_os = "linux"))]
mod test_support;

#[cfg(target_os = "linux")]
pub use host::{Host, HostInitError, HostRegion, RegionError};
