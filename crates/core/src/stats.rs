//! Counters for every path: faults, batches, bytes each way, evictions, and service time split
//! into its steps. Updated with relaxed atomics; read as a [`StatsSnapshot`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use serde::Serialize;

macro_rules! stats {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        /// Live counters of one address space.
        #[derive(Debug, Default)]
        pub struct Stats { $($(#[$m])* pub $name: AtomicU64,)* }

        /// A copy of the counters at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
        pub struct StatsSnapshot { $($(#[$m])* pub $name: u64,)* }

        impl Stats {
            /// Reads every counter.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl StatsSnapshot {
            /// Counter-wise difference `self - earlier` (saturating).
            pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.saturating_sub(earlier.$name),)* }
            }
        }
    };
}

stats! {
    /// CPU faults serviced (one per userfaultfd message handled).
    cpu_faults,
    /// Pages brought back to the CPU by CPU faults (fault-around included).
    cpu_fault_pages,
    /// CPU faults the core could not serve (the host then poisons the page, or lets the thread
    /// retry when it was mapped meanwhile). Nonzero means something is wrong.
    cpu_fault_errors,
    /// Device fault entries fetched.
    device_faults,
    /// Device fault entries merged into another entry of the same batch.
    duplicate_faults,
    /// Device fault entries a batch flush discarded: raised while the batch was serviced, their
    /// clients fault again after the replay if they still need service (UVM's BATCH_FLUSH).
    flushed_faults,
    /// Device faults cancelled (bad address, protection, detach).
    cancelled_faults,
    /// Device fault batches serviced.
    fault_batches,
    /// Blocks device fault batches serviced (the pages the prefetcher added to them included),
    /// counted once served: a service put off (memory busy) or failed counts nothing, and the
    /// cross-block prefetcher's and explicit migrations' blocks are not counted.
    blocks_serviced,
    /// Replays issued.
    replays,
    /// Bytes copied host to device.
    bytes_to_device,
    /// Bytes copied device to host.
    bytes_to_host,
    /// Bytes copied device to device (peer copies between devices).
    bytes_device_to_device,
    /// Pages a device mapped to another device's copy through its peer window (`AccessedBy`
    /// with the data on a peer, or a preferred location on a peer).
    peer_mapped_pages,
    /// Pages a device's fault placed on a peer device, their preferred location, to map them
    /// there (UVM's residency rule: data goes to the preferred location its faulting processor
    /// can access).
    peer_placed_pages,
    /// Pages a device's fault could not place on their preferred peer device (its memory full
    /// of what cannot be evicted, or the device gone): the faulting device took them instead.
    peer_place_fallbacks,
    /// Bytes zero-filled on devices (first touch by a device).
    bytes_zero_filled,
    /// Evictions (victim blocks) from device memory to host backing.
    evictions,
    /// Of the evictions, those the background evictor made (ahead of demand).
    background_evictions,
    /// Bytes evictions copied home (counted in bytes_to_host too; read duplicates the CPU
    /// already holds are dropped, not copied, and not counted).
    bytes_evicted,
    /// Pages a device got beyond those that faulted: moved or copied there by the prefetchers,
    /// or mapped there remotely (a thrashing block is mapped whole on its first fault); pages
    /// it held already (a read-only copy a write makes exclusive) are not counted. Also the
    /// pages the CPU read-ahead brought home (or gave backing) for the CPU.
    prefetched_pages,
    /// Evict-and-refault events detected: a block a device faults on again within the
    /// thrashing window of its eviction from that device (CPU-device ping-pong is not counted).
    thrash_events,
    /// Faulting pages served by remote mappings of host memory because nothing on the device
    /// could be evicted for them (its memory pinned, or held by launches).
    oom_remote_pages,
    /// Access-counter notices from devices (a region mapped remotely reached the device's
    /// access threshold).
    access_notices,
    /// Pages whose remote mappings access-counter notices removed, so that the device's next
    /// access brings them to it.
    access_unmapped_pages,
    /// Blocks the thrashing response brought to a thrashing device in place of a block its access
    /// counters found at least twice as cool (the block they replaced was evicted for them).
    hot_arrivals,
    /// Revokes and write-protects of CPU mappings refused because the program unmapped or moved
    /// the range while they ran (the migration or fault service is tried again once the change
    /// is applied).
    revokes_raced,
    /// CPU faults whose service raced the program's unmap or remap of the page, read and not
    /// yet applied (its map was refused: the addresses may show other memory now); the thread
    /// is woken and faults again, after the change.
    cpu_faults_raced,
    /// Blocks a reshape (a partial munmap, mremap or `protect`, an unregister of part of a
    /// region) moved whole into the new regions, device copies and all, instead of bringing them
    /// home: blocks the change did not touch, and blocks an mremap moved by a multiple of 2 MiB.
    reshape_blocks_kept,
    /// Pages an mremap carried with their device copies one by one, into blocks other than
    /// their own (moved by a distance that is not a multiple of 2 MiB); such pages are mapped
    /// with 4 KiB device entries.
    reshape_pages_rekeyed,
    /// Nanoseconds allocating device memory (eviction included).
    ns_alloc,
    /// Nanoseconds revoking CPU mappings.
    ns_revoke,
    /// Nanoseconds in copies (submit and wait).
    ns_copy,
    /// Nanoseconds writing device page tables (and TLB invalidation).
    ns_map,
    /// Nanoseconds in eviction.
    ns_evict,
    /// Nanoseconds servicing CPU faults.
    ns_cpu_fault,
    /// fork()s prepared (device-only data copied into host memory for the child); a fork
    /// prepared more than once (see `ForkGuard::abandon`) counts once.
    forks,
    /// Bytes copied device to host so that a fork child sees them (counted in bytes_to_host
    /// too); no page changed state.
    bytes_fork_flushed,
    /// Bytes of private memory a fork child cannot read (inaccessible there): data on a device
    /// that could not be copied, and the blocks a fork from under the fork gate could not lock
    /// (see `AddressSpace::fork_prepare`). A fork prepared more than once (see
    /// `ForkGuard::abandon`) counts once.
    bytes_fork_lost,
}

/// Adds to a counter.
#[inline]
pub fn add(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Relaxed);
}

/// Adds the nanoseconds since `t0` to a counter.
#[inline]
pub fn add_since(c: &AtomicU64, t0: Instant) {
    add(c, u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
}
