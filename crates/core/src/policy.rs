//! Where policy decides. Residency selection is one pure function over a page's state, the
//! faulting processor and the access; prefetching is a strategy behind a trait. Mechanism (the
//! migration itself) lives in `migrate`.

use std::sync::Arc;

use crate::attrs::Attrs;
use crate::block::{Page, PageMask};
use crate::types::{Access, Proc, ProcMask, PAGES_PER_BLOCK};

/// What to do with one page that `requester` accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Move the data to this processor (the only copy), then map it there for the requester.
    Migrate(Proc),
    /// Give the requester its own read-only copy; every holder keeps read-only access.
    Duplicate,
    /// Leave the data where it is (on this processor) and map it remotely for the requester.
    Remote(Proc),
}

/// Facts about the requester that residency selection needs besides the page.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reach {
    /// The requester can map host memory remotely (a device with a system-memory aperture).
    pub host_remote: bool,
    /// A thrashing response pinned this page's data at a location.
    pub thrash_pinned: Option<Proc>,
    /// The policy duplicates on read without advice (see [`Policy::duplicate_reads`]).
    pub dup_reads: bool,
    /// Devices whose memory the requester can map through their peer windows.
    pub peers: ProcMask,
}

/// Chooses what happens to a page after `requester` accesses it with `access`: one pure
/// function over the page's state, the range's advice and the requester, in NVIDIA UVM's order
/// (`block_select_processor_residency`).
pub fn select_residency(page: &Page, attrs: &Attrs, requester: Proc, access: Access, reach: Reach) -> Decision {
    let reading = access <= Access::Read;
    let can_reach = |loc: Proc| loc == requester || (loc == Proc::Cpu && reach.host_remote);
    let current =
        if page.resident.has(Proc::Cpu) { Some(Proc::Cpu) } else { page.resident.devices().next().map(Proc::Device) };
    // 1. Read duplication: readers get copies; a write collapses them to the writer. Not for a
    // block the thrashing response pinned (rule 3): under oversubscription the copies would be
    // evicted and fetched again on every pass, while a remote mapping costs no migration.
    if attrs.read_mostly && reading && current.is_some() && reach.thrash_pinned.is_none() {
        return Decision::Duplicate;
    }
    let copies = page.resident.0.count_ones();
    // 1b. Duplicate-on-read (hetmm): a reader of data held elsewhere gets its own read-only copy
    // unless advice says where the data belongs. A reader that already holds one of several
    // copies (it lost only its mapping, or a prefetch brought the copy while its fault was in
    // flight) keeps them all: migrating would drop the others, to be copied again at their
    // holders' next read (`pingpong` re-copied 40-150 MB a run that way).
    if reach.dup_reads
        && reading
        && current.is_some()
        && (!page.resident.has(requester) || copies > 1)
        && attrs.preferred.is_none()
        && !attrs.accessed_by.has(requester)
        && reach.thrash_pinned.is_none()
    {
        return Decision::Duplicate;
    }
    if !reading && (copies > 1 || page.resident.has(requester)) {
        return Decision::Migrate(requester);
    }
    // 2. The requester is the preferred location.
    if attrs.preferred == Some(requester) {
        return Decision::Migrate(requester);
    }
    // 3. Thrashing pinned the data somewhere the requester can reach.
    if let Some(pin) = reach.thrash_pinned.filter(|p| can_reach(*p)) {
        return if pin == requester { Decision::Migrate(pin) } else { Decision::Remote(pin) };
    }
    let Some(current) = current else {
        // 4. First touch: the preferred location if reachable, else the requester.
        return match attrs.preferred {
            Some(p) if can_reach(p) && p != requester => Decision::Remote(p),
            _ => Decision::Migrate(requester),
        };
    };
    // 5. Accessed-by: keep the data where it is and map it remotely, on another device too
    // where the requester reaches that device's memory peer to peer.
    if attrs.accessed_by.has(requester) && (can_reach(current) || reach.peers.has(current)) && current != requester {
        return Decision::Remote(current);
    }
    // 6. A preferred location the requester can reach: data goes there, requester maps remotely.
    if let Some(p) = attrs.preferred.filter(|p| can_reach(*p) && *p != requester) {
        return Decision::Remote(p);
    }
    Decision::Migrate(requester)
}

/// How victims are chosen when device memory runs short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// Whole blocks in the order they first got device memory (UVM: FIFO by allocation, no
    /// access information).
    Fifo,
    /// Blocks of finished jobs first, then least recently accessed by the device (accessed bits
    /// sampled from the device, fault times otherwise).
    JobAwareLru,
}

/// How evict-and-refault cycles are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thrashing {
    /// Ignore capacity thrashing (UVM ignores migrations caused by eviction).
    Ignore,
    /// Once blocks come back soon after eviction (capacity thrashing), the device keeps the
    /// blocks that come back most often (its hot set) and serves the others by remote mappings
    /// of host memory (zero-copy) while device memory is short.
    RemoteMap,
}

/// A complete policy: every strategy the mechanism consults. Selected by name.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Name (`uvm`, `hetmm`).
    pub name: &'static str,
    /// Prefetch inside a 2 MiB block.
    pub prefetcher: Arc<dyn Prefetcher>,
    /// Prefetch whole blocks ahead when device faults walk blocks sequentially or with a stride.
    pub cross_block: bool,
    /// Victim selection.
    pub eviction: Eviction,
    /// Background eviction: keep free up to this fraction of device memory, as much of it as
    /// the fault path has had to evict lately (0: evict only when an allocation fails; see
    /// `evict::background_loop`; rounded to whole blocks, none where the share is under half a
    /// block: `evict::free_cap`).
    pub free_watermark: f64,
    /// Capacity-thrashing response.
    pub thrashing: Thrashing,
    /// Threads servicing the blocks of one fault batch.
    pub service_workers: usize,
    /// Bring CPU chunks back ahead of a CPU walking sequentially through device-resident data.
    pub cpu_readahead: bool,
    /// Read duplication without advice: a processor that reads data another holds gets a
    /// read-only copy, and the holder keeps read-only access (the CPU is write-protected, not
    /// unmapped). A write collapses the copies to the writer. Reads that follow writes elsewhere
    /// cost no migration back.
    pub duplicate_reads: bool,
    /// A device fault that moves pages the CPU maps revokes the CPU's mappings of the whole
    /// block. Each revoke is an `madvise` that waits for the userfaultfd reader (tens of
    /// microseconds here), so a device faulting its way through a block pays for one instead of
    /// one per fault. A CPU thread still using the rest of the block re-faults it; the data has
    /// not moved, so it is mapped again at once.
    pub revoke_whole_block: bool,
    /// A whole block's device pages come from one 2 MiB chunk: when memory is free only in
    /// pieces, up to four blocks are evicted to make a chunk before the block is scattered over
    /// single pages (and the prefetcher leaves such a block to the fault path). Scattered, the device can only map it with 4 KiB entries for as long as it stays:
    /// `graph`'s randomly gathered block ran its kernels 1.7x slower that way (10x the device
    /// TLB misses), in about one run in five at oversubscription 1-1.25.
    pub whole_chunks: bool,
    /// Act on the device's access counters: memory a device maps remotely and uses heavily is
    /// brought to it once residency selection would now do so (the thrashing response that kept
    /// it remote is over, or memory freed up); advice that keeps memory remote still holds. UVM
    /// leaves these migrations off on x86 (`uvm_perf_access_counter_migration_enable`), so
    /// memory its thrashing response pinned remotely stays remote.
    pub access_counters: bool,
}

impl Policy {
    /// A faithful reimplementation of NVIDIA UVM's defaults: tree prefetcher inside 2 MiB, FIFO
    /// whole-block eviction on allocation failure only, no capacity-thrashing response, one
    /// service thread per device.
    pub fn uvm() -> Self {
        Policy {
            name: "uvm",
            prefetcher: Arc::new(TreePrefetcher::default()),
            cross_block: false,
            eviction: Eviction::Fifo,
            free_watermark: 0.0,
            thrashing: Thrashing::Ignore,
            service_workers: 1,
            cpu_readahead: false,
            duplicate_reads: false,
            revoke_whole_block: false,
            whole_chunks: false,
            access_counters: false,
        }
    }

    /// hetmm's defaults: whole-block migration on a fault plus cross-block sequential/stride
    /// prefetch, job-aware LRU eviction (in the background too, up to a free-memory watermark,
    /// sized by recent demand), thrashing detection with remote mapping, parallel block service,
    /// CPU read-ahead.
    pub fn hetmm() -> Self {
        Policy {
            name: "hetmm",
            prefetcher: Arc::new(WholeBlock),
            cross_block: true,
            eviction: Eviction::JobAwareLru,
            free_watermark: 0.05,
            thrashing: Thrashing::RemoteMap,
            service_workers: 2,
            cpu_readahead: true,
            duplicate_reads: true,
            revoke_whole_block: true,
            whole_chunks: true,
            access_counters: true,
        }
    }

    /// The policy called `name`.
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "uvm" => Some(Self::uvm()),
            "hetmm" => Some(Self::hetmm()),
            _ => None,
        }
    }

    /// Names [`Policy::by_name`] accepts.
    pub const NAMES: [&'static str; 2] = ["hetmm", "uvm"];
}

/// Adds pages to a block's migration on top of those that faulted.
pub trait Prefetcher: Send + Sync + std::fmt::Debug {
    /// `faulted`: pages faulted in this batch; `resident`: pages already resident on the
    /// destination; `npages`: pages in the block. Returns the extra pages to migrate (may overlap
    /// the inputs; the caller removes them).
    fn prefetch(&self, faulted: &PageMask, resident: &PageMask, npages: usize) -> PageMask;
}

/// No prefetching: only faulted pages move.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPrefetch;

impl Prefetcher for NoPrefetch {
    fn prefetch(&self, _f: &PageMask, _r: &PageMask, _n: usize) -> PageMask {
        PageMask::default()
    }
}

/// NVIDIA UVM's tree prefetcher, as `uvm_perf_prefetch.c` does it: every faulted page pulls in
/// its whole 64 KiB big page, then for each faulted page the largest enclosing power-of-two
/// subregion of the block whose occupancy (resident on the destination or being migrated) is over
/// `threshold_pct` is migrated whole. Never crosses the 2 MiB block.
#[derive(Debug, Clone, Copy)]
pub struct TreePrefetcher {
    /// Occupancy threshold in percent (UVM: 51).
    pub threshold_pct: u32,
}

impl Default for TreePrefetcher {
    fn default() -> Self {
        TreePrefetcher { threshold_pct: 51 }
    }
}

/// Pages per 64 KiB big page.
const BIG_PAGE: usize = 16;

/// Migrates the whole 2 MiB block on any fault in it: AMD SVM's default migration granularity
/// (`KFD_IOCTL_SVM_ATTR_GRANULARITY` 9, 512 pages). One copy and one 2 MiB device mapping per
/// block instead of a tree that grows over several faults: fewer fault round trips, bulk copies,
/// and TLB reach on the device. It costs bandwidth where a device touches only a few pages of a
/// block; under capacity thrashing, blocks outside the hot set are served remotely instead (see
/// [`Thrashing::RemoteMap`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct WholeBlock;

impl Prefetcher for WholeBlock {
    fn prefetch(&self, _faulted: &PageMask, _resident: &PageMask, npages: usize) -> PageMask {
        PageMask::full(npages)
    }
}

impl Prefetcher for TreePrefetcher {
    fn prefetch(&self, faulted: &PageMask, resident: &PageMask, npages: usize) -> PageMask {
        // Big-page growth.
        let mut occupied = resident.or(faulted);
        for i in faulted.iter() {
            let s = i / BIG_PAGE * BIG_PAGE;
            occupied.set_range(s, (s + BIG_PAGE).min(npages));
        }
        let mut out = occupied;
        // Walk up the virtual tree from each faulted page.
        for i in faulted.iter() {
            let mut size = BIG_PAGE * 2;
            let mut best = None;
            while size <= PAGES_PER_BLOCK {
                let s = i / size * size;
                let e = (s + size).min(npages);
                let n = occupied.count_range(s, e);
                if n as u64 * 100 > (e - s) as u64 * u64::from(self.threshold_pct) {
                    best = Some((s, e));
                }
                size *= 2;
            }
            if let Some((s, e)) = best {
                out.set_range(s, e);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_grows_big_pages_and_dense_regions() {
        let p = TreePrefetcher::default();
        let mut f = PageMask::default();
        f.set(3);
        let out = p.prefetch(&f, &PageMask::default(), 512);
        assert_eq!(out.count(), 16, "one fault pulls its 64 KiB");
        // Half the block resident plus a fault in the other half: more than 51% of 2 MiB.
        let mut r = PageMask::default();
        r.set_range(0, 256);
        let mut f = PageMask::default();
        f.set(300);
        let out = p.prefetch(&f, &r, 512);
        assert_eq!(out.count(), 512);
        assert_eq!(NoPrefetch.prefetch(&f, &r, 512).count(), 0);
    }

    use crate::types::{DeviceId, ProcMask};

    const DEV: Proc = Proc::Device(DeviceId(0));

    fn on(p: Proc) -> Page {
        Page { resident: ProcMask::only(p), ..Page::default() }
    }

    #[test]
    fn residency_decisions_follow_uvm_order() {
        let none = Attrs::default();
        let r = Reach::default();
        let remote = Reach { host_remote: true, ..Reach::default() };
        assert_eq!(select_residency(&on(Proc::Cpu), &none, DEV, Access::Read, r), Decision::Migrate(DEV));
        assert_eq!(select_residency(&Page::default(), &none, DEV, Access::Write, r), Decision::Migrate(DEV));
        let rm = Attrs { read_mostly: true, ..none };
        assert_eq!(select_residency(&on(Proc::Cpu), &rm, DEV, Access::Read, r), Decision::Duplicate);
        assert_eq!(select_residency(&on(Proc::Cpu), &rm, DEV, Access::Write, r), Decision::Migrate(DEV));
        // A block the thrashing response pinned in host memory is read remotely, not copied.
        let pinned = Reach { host_remote: true, thrash_pinned: Some(Proc::Cpu), ..Reach::default() };
        assert_eq!(select_residency(&on(Proc::Cpu), &rm, DEV, Access::Read, pinned), Decision::Remote(Proc::Cpu));
        let ab = Attrs { accessed_by: ProcMask::only(DEV), ..none };
        assert_eq!(select_residency(&on(Proc::Cpu), &ab, DEV, Access::Read, remote), Decision::Remote(Proc::Cpu));
        assert_eq!(select_residency(&on(Proc::Cpu), &ab, DEV, Access::Read, r), Decision::Migrate(DEV), "no aperture");
        // Data on another device: mapped there where that device is a peer, else it moves.
        let other = Proc::Device(crate::types::DeviceId(1));
        let peer = Reach { host_remote: true, peers: ProcMask::only(other), ..Reach::default() };
        assert_eq!(select_residency(&on(other), &ab, DEV, Access::Write, peer), Decision::Remote(other));
        assert_eq!(select_residency(&on(other), &ab, DEV, Access::Write, remote), Decision::Migrate(DEV));
        let pref_cpu = Attrs { preferred: Some(Proc::Cpu), ..none };
        assert_eq!(
            select_residency(&on(Proc::Cpu), &pref_cpu, DEV, Access::Write, remote),
            Decision::Remote(Proc::Cpu)
        );
        assert_eq!(select_residency(&on(DEV), &pref_cpu, Proc::Cpu, Access::Read, r), Decision::Migrate(Proc::Cpu));
        let pinned = Reach { host_remote: true, thrash_pinned: Some(Proc::Cpu), ..Reach::default() };
        let dr = Reach { dup_reads: true, ..Reach::default() };
        assert_eq!(select_residency(&on(Proc::Cpu), &none, DEV, Access::Read, dr), Decision::Duplicate);
        assert_eq!(select_residency(&on(Proc::Cpu), &none, DEV, Access::Write, dr), Decision::Migrate(DEV));
        assert_eq!(select_residency(&on(DEV), &none, Proc::Cpu, Access::Read, dr), Decision::Duplicate);
        assert_eq!(select_residency(&Page::default(), &none, DEV, Access::Read, dr), Decision::Migrate(DEV));
        assert_eq!(select_residency(&on(Proc::Cpu), &none, DEV, Access::Read, pinned), Decision::Remote(Proc::Cpu));
        let mut dup = on(Proc::Cpu);
        dup.resident.insert(DEV);
        let ab_rm = Attrs { accessed_by: ProcMask::only(DEV), read_mostly: true, ..none };
        assert_eq!(
            select_residency(&dup, &ab_rm, DEV, Access::Write, remote),
            Decision::Migrate(DEV),
            "a write collapses copies"
        );
        // A reader that holds one of several copies keeps them all (it only lost its mapping);
        // holding the only copy, it keeps that as it is.
        assert_eq!(select_residency(&dup, &none, Proc::Cpu, Access::Read, dr), Decision::Duplicate);
        assert_eq!(select_residency(&dup, &none, DEV, Access::Read, dr), Decision::Duplicate);
        assert_eq!(select_residency(&on(DEV), &none, DEV, Access::Read, dr), Decision::Migrate(DEV));
        assert_eq!(select_residency(&dup, &none, Proc::Cpu, Access::Read, r), Decision::Migrate(Proc::Cpu), "uvm");
        assert!(
            Policy::by_name("uvm").is_some() && Policy::by_name("hetmm").is_some() && Policy::by_name("x").is_none()
        );
    }
}
