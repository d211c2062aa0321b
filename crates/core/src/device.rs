//! The device trait: the hardware-dependent functions a device driver supplies (GMEM's
//! `struct gm_mmu`, in bulk). Everything here takes ranges and batches, never one PTE at a time.
//!
//! A device has one page table for the one address space it is attached to, its own physical
//! memory (registered with the core's buddy allocator through [`DeviceMmu::physical_ranges`]),
//! copy engines reached through [`DeviceMmu::copy`], and, if it can fault, a replayable fault
//! buffer drained with [`DeviceMmu::fetch_faults`] and resumed with [`DeviceMmu::replay`].

use std::time::Duration;

use crate::types::{Access, Prot, VaRange};

/// A device physical address (an offset into the device's own memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PhysAddr(pub u64);

/// The address of host memory in the manager's view (the alias of a shared region), as seen by
/// the process. Valid while the region lives; see the safety contracts of [`DeviceMmu::copy`] and
/// [`DeviceMmu::map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostAddr(pub usize);

/// An address in a peer window ([`PeerWindow`]): where another device's copy engines read a
/// byte of this device's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddr(pub u64);

/// How the copy engines of other devices reach this device's memory directly, peer to peer (a
/// PCIe BAR or an NVLink aperture), so that data moves between two devices in one copy instead
/// of two through host memory. Devices whose windows name the same `fabric` reach each other's
/// memory: device physical address `pa` is [`PeerAddr`] `base + pa` to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerWindow {
    /// Which devices can use the window (the sim's: every simulated device of the process).
    pub fabric: &'static str,
    /// Where the device's physical address 0 appears in the window.
    pub base: u64,
}

impl PeerWindow {
    /// Whether a device whose own window is `other` can copy from this one.
    pub fn reachable_from(&self, other: &PeerWindow) -> bool {
        self.fabric == other.fabric && self.base != other.base
    }
    /// The address of `pa` of this device in the window.
    pub fn addr(&self, pa: PhysAddr) -> PeerAddr {
        PeerAddr(self.base + pa.0)
    }
}

/// What a device is and can do.
#[derive(Clone, Debug)]
pub struct DeviceCaps {
    /// Short name ("sim", "cuda").
    pub name: String,
    /// Supported page-table entry sizes as a bit mask of sizes (e.g. `4096 | 2 << 20`).
    pub page_sizes: u64,
    /// Whether the device reports page faults and can replay them (GMEM `GM_DEV_CAP_REPLAYABLE`).
    /// A device that cannot fault must have its memory made resident before a launch.
    pub replayable_faults: bool,
    /// Whether the CPU may access the device's memory in place (coherent link). `false` means
    /// device-private memory: a CPU access migrates the data back.
    pub coherent: bool,
    /// Whether the device can map host memory remotely (a system-memory aperture).
    pub remote_host_access: bool,
    /// Its peer window: other devices of the same fabric copy from its memory directly, and it
    /// copies from theirs ([`CopyOp::PeerToDevice`]). `None`: data between it and other devices
    /// goes through host memory.
    pub peer: Option<PeerWindow>,
    /// Whether its virtual addresses and mappings belong to the regions it was told of
    /// ([`DeviceMmu::region_added`]; CUDA reserves device addresses per region), so that they end
    /// with the region. `false`: one page table for the whole address space, whose mappings of a
    /// block outlive a reshape of its region (a partial munmap, mremap or `protect` keeps the
    /// device's copies of the blocks it does not touch, instead of bringing the region home).
    pub region_bound: bool,
    /// Bytes of device memory.
    pub memory_bytes: u64,
}

/// Where a device page-table entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapTarget {
    /// Device memory at this physical address.
    Device(PhysAddr),
    /// Host memory (remote access through the system-memory aperture).
    Host(HostAddr),
    /// Another device's memory, through its [`PeerWindow`] (remote access over the peer link).
    Peer(PeerAddr),
}

/// One mapping to install: `len` bytes of virtual addresses from `va`, backed contiguously by
/// `target`. The device picks its entry sizes (a 2 MiB entry where `va` and the target are 2 MiB
/// aligned and the run covers 2 MiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// First virtual address (page aligned).
    pub va: u64,
    /// Length (page multiple).
    pub len: u64,
    /// Backing.
    pub target: MapTarget,
    /// Permissions.
    pub prot: Prot,
}

/// One copy-engine operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyOp {
    /// Host memory to device memory.
    HostToDevice {
        /// Source.
        src: HostAddr,
        /// Destination.
        dst: PhysAddr,
        /// Bytes.
        len: u64,
    },
    /// Device memory to host memory.
    DeviceToHost {
        /// Source.
        src: PhysAddr,
        /// Destination.
        dst: HostAddr,
        /// Bytes.
        len: u64,
    },
    /// Device memory to device memory on the same device.
    DeviceToDevice {
        /// Source.
        src: PhysAddr,
        /// Destination.
        dst: PhysAddr,
        /// Bytes.
        len: u64,
    },
    /// Another device's memory, through its [`PeerWindow`], to this device's memory.
    PeerToDevice {
        /// Source.
        src: PeerAddr,
        /// Destination.
        dst: PhysAddr,
        /// Bytes.
        len: u64,
    },
    /// Zero-fill device memory.
    Zero {
        /// Destination.
        dst: PhysAddr,
        /// Bytes.
        len: u64,
    },
}

impl CopyOp {
    /// Bytes moved or written.
    pub fn len(&self) -> u64 {
        match *self {
            CopyOp::HostToDevice { len, .. }
            | CopyOp::DeviceToHost { len, .. }
            | CopyOp::DeviceToDevice { len, .. }
            | CopyOp::PeerToDevice { len, .. }
            | CopyOp::Zero { len, .. } => len,
        }
    }
    /// Whether the op moves no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Work submitted to a device that can be waited on (a CUDA event, a sim fence).
pub trait Completion: Send + std::fmt::Debug {
    /// Waits until the work is done, at most `timeout`.
    fn wait(&mut self, timeout: Duration) -> Result<(), DeviceError>;
}

/// A completion that is already done (for empty batches).
#[derive(Debug, Default)]
pub struct Done;

impl Completion for Done {
    fn wait(&mut self, _timeout: Duration) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// One entry from a device's replayable fault buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceFault {
    /// Faulting virtual address (byte exact; the core aligns it).
    pub va: u64,
    /// What the access was.
    pub access: Access,
    /// Which client faulted (warp, uTLB); used to merge duplicates and for statistics.
    pub client: u32,
}

/// Why the core refuses to service a fault; the faulting work gets this as its error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FaultCancel {
    /// Access to an address that no shared region covers (never allocated, or freed).
    #[error("no shared memory at the faulting address")]
    Unmapped,
    /// Access not allowed by the region's protection (a write to read-only memory).
    #[error("access not permitted by the memory's protection")]
    Protection,
    /// The fault could not be serviced (allocation or copy failure that eviction did not cure).
    #[error("fault service failed")]
    ServiceFailed,
    /// The device is being detached or the address space torn down.
    #[error("device detached")]
    Detached,
}

/// Errors a device driver reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Device physical memory out of range or not owned.
    #[error("device physical range {addr:#x}+{len:#x} is invalid")]
    BadPhysical {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Virtual range not aligned to a supported page size or otherwise invalid.
    #[error("virtual range {0} is invalid for this device")]
    BadRange(VaRange),
    /// The page table does not exist (not created, or destroyed).
    #[error("device page table does not exist")]
    NoPageTable,
    /// A wait ran out of time.
    #[error("device operation timed out after {0:?}")]
    Timeout(Duration),
    /// The device is gone or shutting down.
    #[error("device is shut down")]
    Shutdown,
    /// A kernel faulted on an address the core refused to service.
    #[error("device fault at {va:#x} ({access:?}) cancelled: {reason}")]
    FaultCancelled {
        /// Address.
        va: u64,
        /// Access.
        access: Access,
        /// Reason.
        reason: FaultCancel,
    },
    /// A kernel touched memory outside what its launch declared (as a GPU's access outside its
    /// allocations faults): the kernel fails, and the memory is not touched.
    #[error("kernel access {va:#x}+{len:#x} ({access:?}) is outside the memory its launch declared")]
    Undeclared {
        /// Address.
        va: u64,
        /// Bytes.
        len: u64,
        /// Access.
        access: Access,
    },
    /// A driver-specific failure.
    #[error("device error: {0}")]
    Other(String),
}

/// The hardware-dependent functions of a device.
///
/// Contract for callers (the core): page-table calls for one range are serialized by the core's
/// block locks; `invalidate_tlb` is called after `unmap`/`protect` before the memory is reused,
/// copied from or freed. Implementations must be safe to call from several threads at once.
pub trait DeviceMmu: Send + Sync + std::fmt::Debug + 'static {
    /// Capabilities.
    fn caps(&self) -> DeviceCaps;

    /// The device physical memory the core manages, as `(start, len)` ranges (2 MiB multiples).
    fn physical_ranges(&self) -> Vec<(PhysAddr, u64)>;

    /// Creates the device page table for the address space the device is being attached to.
    fn create_page_table(&self) -> Result<(), DeviceError>;

    /// Destroys the page table (after everything was unmapped); invalidates the whole TLB.
    ///
    /// # Safety
    ///
    /// Only the address space the device is attached to may call it, as it lets the device
    /// go (or refuses its attach): once the table is gone the device can be attached again,
    /// and a second address space, or a second attach to this one, manages the same device
    /// memory. While the first still does, both hand out the same device pages, and one's
    /// kernels write the other's data.
    unsafe fn destroy_page_table(&self);

    /// Installs mappings.
    ///
    /// A batch that fails installs nothing: the device undoes whatever part it had installed
    /// before returning the error, so the caller may give the target pages back at once (and
    /// must not unmap: a range may have held a mapping before the call, which stays).
    ///
    /// # Safety
    ///
    /// Every [`MapTarget::Host`] address must point to host memory valid for `len` bytes that
    /// stays mapped in the process until the range is unmapped and its TLB entries invalidated.
    /// Every [`MapTarget::Peer`] address must lie in the window of a peer of this device's
    /// fabric, in memory that peer keeps allocated to the data until the range is unmapped and
    /// its TLB entries invalidated.
    unsafe fn map(&self, entries: &[MapEntry]) -> Result<(), DeviceError>;

    /// Removes mappings. Translations may still be cached until [`DeviceMmu::invalidate_tlb`].
    fn unmap(&self, ranges: &[VaRange]) -> Result<(), DeviceError>;

    /// Changes the permissions of existing mappings (absent entries are skipped).
    fn protect(&self, ranges: &[(VaRange, Prot)]) -> Result<(), DeviceError>;

    /// Invalidates cached translations of the ranges, coalesced. When this returns, no access by
    /// the device uses an old translation of any of them (in-flight accesses have completed).
    fn invalidate_tlb(&self, ranges: &[VaRange]);

    /// Starts a batch of copy-engine operations and returns a completion to wait on.
    ///
    /// # Safety
    ///
    /// Every [`HostAddr`] must point to host memory valid for reads (or writes, as a destination)
    /// of the op's length, not freed or unmapped until the completion has been waited on. Every
    /// [`PeerAddr`] must lie in the window of a peer of this device's fabric, in memory that
    /// peer has allocated to the data and keeps (attached, not freed, not written) until the
    /// completion has been waited on.
    unsafe fn copy(&self, ops: &[CopyOp]) -> Result<Box<dyn Completion>, DeviceError>;

    /// Moves up to `max` pending faults into `out` without blocking; returns how many.
    fn fetch_faults(&self, max: usize, out: &mut Vec<DeviceFault>) -> usize;

    /// Blocks until the fault buffer holds an entry (or, on a device with access counters, a
    /// notice is pending: [`DeviceMmu::take_access_notices`]) or `timeout` passes; returns
    /// whether either is pending. Returns early (false) after [`DeviceMmu::shutdown_faults`].
    fn wait_for_faults(&self, timeout: Duration) -> bool;

    /// Replays: every client waiting on a fault retries its access, except those whose fault
    /// a cancel answers, which get its error. A cancel `(va, access, reason)` answers a fault
    /// fetched before this call, on the page of `va`, whose access needs at least what `access`
    /// does ([`Access::needs`]): a write refused on a read-only page does not fail a read of it
    /// that faulted beside it (it retries, and is served), while a cancel given with
    /// `Access::Read` answers every access to the page. A fault raised since, on the same page,
    /// is not one the core answered.
    fn replay(&self, cancel: &[(u64, Access, FaultCancel)]);

    /// Fails every present and future fault with `FaultCancel::Detached` and wakes
    /// [`DeviceMmu::wait_for_faults`]; used when detaching or tearing down.
    fn shutdown_faults(&self);

    /// A shared region joins the address space this device is attached to (or the device is
    /// attached while the region exists). `app` is the range the program uses, `backing` the
    /// manager's address of its host memory, valid until [`DeviceMmu::region_removed`] returns.
    /// Devices that need per-region setup do it here (CUDA: reserve device virtual addresses for
    /// `app`, register the host pages for DMA once for the region's life). An error refuses the
    /// region (or the attach). The default does nothing.
    fn region_added(&self, _app: VaRange, _backing: HostAddr) -> Result<(), DeviceError> {
        Ok(())
    }

    /// The region that starts at `app.start` is going away (or the device is being detached):
    /// on a [`DeviceCaps::region_bound`] device nothing of it is mapped any more; on others, a
    /// reshape may keep mappings of blocks it did not touch, whose new regions were or will be
    /// announced with [`DeviceMmu::region_added`]. Its host memory is unmapped after this
    /// returns, except where a part of the region lives on. Must tolerate a region it does not know (it may be told twice). The
    /// default does nothing.
    fn region_removed(&self, _app: VaRange) {}

    /// The host backing of `ranges` (application addresses, page aligned) was just freed and
    /// will be replaced by fresh zero pages (`Advice::DontNeed`): a device that pinned those host
    /// pages for DMA must pin the new ones before its next copy of them. Called with the
    /// blocks' locks held. The default does nothing.
    fn host_discarded(&self, _ranges: &[VaRange]) {}

    /// Moves into `out` the regions whose remote accesses by this device reached its
    /// access-counter threshold since the last call: NVIDIA's access counters, which count a
    /// device's accesses to memory it maps but does not hold (host memory, a peer's). The core
    /// may then bring such memory to the device. Devices without access counters report none
    /// (the default).
    fn take_access_notices(&self, _out: &mut Vec<VaRange>) {}

    /// Takes (returns and clears) how many accesses, in 64-byte transactions, the device made
    /// to `range` since the last call, to its own memory and to memory it maps remotely alike:
    /// access counters on all memory, as NVIDIA's can count local accesses too. The core compares
    /// how hot blocks are with them, where accessed bits say only that a block was used. Devices
    /// without such counters return `None` (the default).
    fn take_access_counts(&self, _range: VaRange) -> Option<u64> {
        None
    }

    /// Collects and clears the accessed bits of mapped device pages in `range` (the device's
    /// access information, for eviction by recency). Devices without accessed bits return `None`.
    fn take_accessed(&self, _range: VaRange) -> Option<Vec<u64>> {
        None
    }
}
