//! hetmm-sim: a simulated accelerator, hetmm's default device.
//!
//! It models a GPU's memory system faithfully rather than taking shortcuts: the device has its
//! own physical memory (an arena the application cannot address), its own page-table format
//! (4-level radix, 2 MiB and 4 KiB leaves, accessed bits), a TLB per warp slot that keeps
//! serving cached translations until they are invalidated, a bounded replayable fault buffer,
//! copy engines, and a compute engine whose kernels reach memory only through translation. If
//! a page is not mapped in the device page table, a kernel cannot see it: it faults, and waits
//! for the core to service the fault and replay.
//!
//! Parts:
//! - `memory`: physical memory and host-aperture accesses (the only raw-pointer code).
//! - `pagetable`: the page-table format.
//! - `tlb`: per-worker TLBs and shootdown.
//! - `fault`: the replayable fault buffer.
//! - `copy`: copy engines.
//! - `compute`: the compute engine, [`Grid`], [`BlockCtx`], [`Launch`].
//! - [`SimDevice`]: the handle, implementing [`hetmm_core::device::DeviceMmu`].
//!
//! ```
//! use std::time::Duration;
//! use hetmm_core::device::{DeviceMmu, MapEntry, MapTarget, PhysAddr};
//! use hetmm_core::types::Prot;
//! use hetmm_sim::{Grid, SimConfig, SimDevice};
//!
//! let dev = SimDevice::new(SimConfig::with_memory(8 << 20).unwrap()).unwrap();
//! dev.create_page_table().unwrap();
//! let entry = MapEntry { va: 0x4000_0000, len: 2 << 20, target: MapTarget::Device(PhysAddr(0)), prot: Prot::RWA };
//! // SAFETY: a device target; no host memory is involved.
//! unsafe { dev.map(&[entry]).unwrap() };
//! // SAFETY: the kernel touches device memory only, which no Rust reference points into.
//! let l = unsafe {
//!     dev.launch(Grid::new(4, 32), |b| {
//!         for t in b.threads() {
//!             let va = 0x4000_0000 + 4 * u64::from(b.block_idx() * 32 + t);
//!             b.store::<u32>(va, t)?;
//!         }
//!         Ok(())
//!     })
//! }
//! .unwrap();
//! l.wait(Duration::from_secs(10)).unwrap();
//! ```
#![warn(missing_docs)]

mod compute;
mod copy;
mod device;
mod fault;
mod link;
mod memory;
mod pagetable;
mod sync;
mod tlb;
mod usage;

#[cfg(test)]
mod tests;

use serde::Serialize;

pub use compute::{BlockCtx, Bounds, Done, Grid, Launch, FAULT_WAIT_LIMIT};
pub use copy::CopyCompletion;
pub use device::SimDevice;
pub use memory::dma_copy;
pub use pagetable::{Census, Target, Translation, VA_BITS};
pub use tlb::{LARGE_ENTRIES as TLB_LARGE_ENTRIES, SMALL_ENTRIES as TLB_SMALL_ENTRIES};

/// [`SimConfig::link_gbps`] by default.
pub const DEFAULT_LINK_GBPS: u32 = 8;

/// Most copy engines or compute workers a configuration may ask for.
pub const MAX_THREADS: usize = 1024;

/// Errors creating a simulated device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// Memory size zero or not a multiple of 2 MiB.
    #[error("device memory size {0:#x} is not a positive multiple of 2 MiB")]
    BadMemorySize(u64),
    /// More device memory than the machine has: it could never be used, and the core keeps
    /// state for each of its pages when the device is attached (18 GiB for 64 TiB).
    #[error("device memory of {bytes} bytes is more than this machine's {machine} bytes")]
    MemoryTooLarge {
        /// The memory asked for.
        bytes: u64,
        /// The machine's memory (`MemTotal`).
        machine: u64,
    },
    /// A count that must be at least 1 was 0.
    #[error("{0} must be at least 1")]
    ZeroCount(&'static str),
    /// A count above [`MAX_THREADS`].
    #[error("{what} = {value} is more than the limit {MAX_THREADS}")]
    TooMany {
        /// Which setting.
        what: &'static str,
        /// Its value.
        value: usize,
    },
    /// The device memory could not be reserved.
    #[error("cannot reserve device memory: {0}")]
    Memory(String),
    /// A device thread could not be started.
    #[error("cannot start a device thread: {0}")]
    Thread(String),
}

/// Remote accesses to a 2 MiB region that raise an access-counter notice, by default.
pub const DEFAULT_ACCESS_THRESHOLD: u32 = 256;

/// Configuration of a simulated device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SimConfig {
    /// Bytes of device memory (a positive multiple of 2 MiB). Default 1 GiB.
    pub memory_bytes: u64,
    /// Copy-engine threads. Default 2.
    pub copy_engines: usize,
    /// Compute workers (warp slots, each with its own TLB). Default 16: more slots than cores,
    /// so many faults are in flight while warps wait.
    pub compute_workers: usize,
    /// Entries in the replayable fault buffer. Default 4096.
    pub fault_buffer_entries: usize,
    /// How many faults the core should fetch at a time. Default 256.
    pub fault_batch: usize,
    /// Populate the device memory when the device is made (as real device memory needs no first
    /// touch); off by default to keep small tests light. Benchmarks turn it on.
    pub prefault: bool,
    /// Bandwidth in GB/s of the link to host memory that a kernel's accesses to remotely mapped
    /// host memory cross, on top of the access itself; all warps share it. `None` (or 0): remote
    /// accesses cost what local ones do. Default 8 GB/s: about what one of this simulator's copy
    /// engines moves on the development machine, so a byte read remotely costs about what
    /// migrating it would, as on a GPU whose copy engines and remote accesses share its PCIe link.
    pub link_gbps: Option<u32>,
    /// Offer a peer window ([`hetmm_core::device::PeerWindow`]): other simulated devices' copy
    /// engines read this device's memory directly, and this device's read theirs, so data moves
    /// between two devices in one copy instead of two through host memory (as GPUs on one PCIe
    /// switch or NVLink do). Default on.
    pub peer_copies: bool,
    /// Access counters, as NVIDIA GPUs have: kernels' accesses to memory mapped remotely (host
    /// memory or a peer's) are counted per 2 MiB of virtual addresses, in 64-byte transactions,
    /// and a region whose count reaches this threshold is reported to the core
    /// ([`hetmm_core::device::DeviceMmu::take_access_notices`]), which may migrate it. With
    /// them on, every access, local or remote, is also counted per 2 MiB for the core to read
    /// ([`hetmm_core::device::DeviceMmu::take_access_counts`]). 0: both off. Default 256 (UVM's
    /// default threshold and granularity).
    pub access_counter_threshold: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            memory_bytes: 1 << 30,
            copy_engines: 2,
            compute_workers: 16,
            fault_buffer_entries: 4096,
            fault_batch: 256,
            prefault: false,
            link_gbps: Some(DEFAULT_LINK_GBPS),
            peer_copies: true,
            access_counter_threshold: DEFAULT_ACCESS_THRESHOLD,
        }
    }
}

impl SimConfig {
    /// A validated configuration.
    pub fn new(
        memory_bytes: u64,
        copy_engines: usize,
        compute_workers: usize,
        fault_buffer_entries: usize,
        fault_batch: usize,
    ) -> Result<Self, SimError> {
        let c =
            Self { memory_bytes, copy_engines, compute_workers, fault_buffer_entries, fault_batch, ..Self::default() };
        c.validate()?;
        Ok(c)
    }

    /// The default configuration with `memory_bytes` of memory, validated.
    pub fn with_memory(memory_bytes: u64) -> Result<Self, SimError> {
        let c = Self { memory_bytes, ..Self::default() };
        c.validate()?;
        Ok(c)
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), SimError> {
        const MB2: u64 = 2 << 20;
        if self.memory_bytes == 0
            || !self.memory_bytes.is_multiple_of(MB2)
            || usize::try_from(self.memory_bytes).is_err()
        {
            return Err(SimError::BadMemorySize(self.memory_bytes));
        }
        if let Some(machine) = machine_memory().filter(|&m| self.memory_bytes > m) {
            return Err(SimError::MemoryTooLarge { bytes: self.memory_bytes, machine });
        }
        for (what, v) in [
            ("copy_engines", self.copy_engines),
            ("compute_workers", self.compute_workers),
            ("fault_buffer_entries", self.fault_buffer_entries),
            ("fault_batch", self.fault_batch),
        ] {
            if v == 0 {
                return Err(SimError::ZeroCount(what));
            }
        }
        for (what, v) in [("copy_engines", self.copy_engines), ("compute_workers", self.compute_workers)] {
            if v > MAX_THREADS {
                return Err(SimError::TooMany { what, value: v });
            }
        }
        Ok(())
    }
}

/// Counters of a simulated device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SimStats {
    /// Translations served from a TLB.
    pub tlb_hits: u64,
    /// Translations not in a TLB (or lacking the permission).
    pub tlb_misses: u64,
    /// Page-table walks.
    pub page_walks: u64,
    /// `invalidate_tlb` calls (with at least one range).
    pub tlb_invalidations: u64,
    /// TLB entries removed by invalidations and flushes.
    pub tlb_entries_invalidated: u64,
    /// Entries written to the fault buffer.
    pub faults_raised: u64,
    /// Entries handed to the core by `fetch_faults`.
    pub faults_fetched: u64,
    /// Faulting accesses that failed with a cancellation.
    pub faults_cancelled: u64,
    /// Times a warp found the fault buffer full.
    pub fault_buffer_full_waits: u64,
    /// Replays.
    pub replays: u64,
    /// Bytes copied host to device.
    pub bytes_h2d: u64,
    /// Bytes copied device to host.
    pub bytes_d2h: u64,
    /// Bytes copied device to device.
    pub bytes_d2d: u64,
    /// Bytes copied from other devices' memory through their peer windows.
    pub bytes_from_peers: u64,
    /// Bytes zero-filled.
    pub bytes_zeroed: u64,
    /// Copy pieces executed (ops are cut into pieces of at most 2 MiB).
    pub copy_pieces: u64,
    /// Copy batches submitted.
    pub copy_batches: u64,
    /// Kernels launched.
    pub kernels_launched: u64,
    /// Blocks run (skipped blocks not counted).
    pub blocks_run: u64,
    /// Bytes kernels read, wrote or updated atomically in host memory mapped remotely.
    pub remote_bytes: u64,
    /// Nanoseconds of link time those accesses were charged ([`SimConfig::link_gbps`]).
    pub link_busy_ns: u64,
    /// Access-counter notices raised ([`SimConfig::access_counter_threshold`]).
    pub access_notices: u64,
}

/// The machine's memory in bytes (`MemTotal` of /proc/meminfo), if it can be read.
pub fn machine_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.trim_start_matches("MemTotal:").trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}
