//! The core's error type: every variant carries the facts (the range, the device, the errno).

use std::time::Duration;

use crate::cpu::HostError;
use crate::device::DeviceError;
use crate::types::{DeviceId, VaRange};

/// Errors of the core. Nothing changes when one of the input-checking errors is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// Start or length is not a multiple of the page size.
    #[error("range {0} is not page aligned")]
    Unaligned(VaRange),
    /// Zero-length range.
    #[error("empty range at {start:#x}")]
    Empty {
        /// Start address.
        start: u64,
    },
    /// `start + len` overflows the address space.
    #[error("range {start:#x}+{len:#x} overflows")]
    Overflow {
        /// Start address.
        start: u64,
        /// Length.
        len: u64,
    },
    /// No shared region covers the whole range (never allocated, freed, or crosses the end).
    #[error("range {0} is not inside one shared region")]
    NotShared(VaRange),
    /// A new region would overlap an existing one.
    #[error("range {0} overlaps an existing shared region")]
    Overlap(VaRange),
    /// The device was detached from the address space (or never attached).
    #[error("device {0:?} is not attached")]
    Detached(DeviceId),
    /// Attach refused: the address space already has the most devices it can hold.
    #[error("too many devices attached")]
    TooManyDevices,
    /// Device memory could not be found even after evicting everything that can be evicted.
    #[error("device {device:?} is out of memory ({bytes} bytes needed)")]
    OutOfDeviceMemory {
        /// Device.
        device: DeviceId,
        /// Bytes needed.
        bytes: u64,
    },
    /// Device memory is all held by blocks other work is using right now; retrying later may
    /// succeed.
    #[error("device {device:?} memory is busy ({bytes} bytes needed); retry")]
    DeviceMemoryBusy {
        /// Device.
        device: DeviceId,
        /// Bytes needed.
        bytes: u64,
    },
    /// A device operation failed.
    #[error("device {device:?}: {source}")]
    Device {
        /// Device.
        device: DeviceId,
        /// Cause.
        source: DeviceError,
    },
    /// A host (CPU-side) operation failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A bounded wait ran out.
    #[error("{what} did not finish within {after:?}")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// The memory is mirrored (file-backed shared memory), not migratable, or the device cannot
    /// map host memory remotely.
    #[error("range {0} cannot move to device memory (mirrored shared memory)")]
    NotMigratable(VaRange),
    /// The memory's protection does not allow the operation (a device access or migration of
    /// memory the program mapped without the needed rights).
    #[error("range {range} does not allow {needed:?}")]
    Protection {
        /// The range.
        range: VaRange,
        /// What was needed.
        needed: crate::types::Prot,
    },
    /// The address space is being torn down.
    #[error("address space is shutting down")]
    ShuttingDown,
    /// The address space belongs to the parent of a `fork()`: in the child it is inert (its
    /// threads and devices stayed with the parent). The child's copy of shared memory is
    /// ordinary memory; a child that wants devices makes its own address space.
    #[error("address space belongs to the parent process (this is a fork child)")]
    ForkedAway,
}

impl CoreError {
    /// A CPU revoke that raced the program's unmap or remap of the memory: nothing changed on
    /// its strength; the operation is worth retrying once the change is applied.
    pub fn raced(&self) -> bool {
        matches!(self, CoreError::Host(h) if h.raced())
    }
}

/// Result alias.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
