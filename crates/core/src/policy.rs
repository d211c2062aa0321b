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
    /// Serve the requester from this processor's memory by a remote mapping: the data stays
    /// there where that processor holds it, and is moved there first where it does not (a first
    /// touch, or data elsewhere whose preferred location this is; a peer device's memory
    /// included).
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
    /// Devices whose memory the requester can map through their peer windows: data found there
    /// under accessed-by, or whose preferred location is one of them, is served from there.
    pub peers: ProcMask,
}

/// Chooses what happens to a page after `requester` accesses it with `access`: one pure
/// function over the page's state, the range's advice and the requester, in NVIDIA UVM's order
/// (`block_select_processor_residency`).
pub fn select_residency(page: &Page, attrs: &Attrs, requester: Proc, access: Access, reach: Reach) -> Decision {
    let reading = access <= Access::Read;
    let can_reach = |loc: Proc| loc == requester || (loc == Proc::Cpu && reach.host_remote);
    // Where the requester can be served from (UVM's `accessible_from`): itself, host memory
    // through its aperture, and the memory of the devices it reaches peer to peer.
    let can_access = |loc: Proc| can_reach(loc) || reach.peers.has(loc);
    // The copy closest to the requester (UVM's `closest_resident`): its own, else the CPU's.
    let current = if page.resident.has(requester) {
        Some(requester)
    } else if page.resident.has(Proc::Cpu) {
        Some(Proc::Cpu)
    } else {
        page.resident.devices().next().map(Proc::Device)
    };
    // 1. Read duplication, ahead of the preferred location and accessed-by: readers get copies;
    // a write, or the first touch, goes to the requester (a write collapses the copies there).
    // Not for a block the thrashing response pinned (rule 3): under oversubscription the copies
    // would be evicted and fetched again on every pass, while a remote mapping costs no
    // migration.
    if attrs.read_mostly && reach.thrash_pinned.is_none() {
        return if reading && current.is_some() { Decision::Duplicate } else { Decision::Migrate(requester) };
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
    // 3. Thrashing pinned the data somewhere the requester can reach. Not where advice keeps
    // the data on another device the requester maps peer to peer (its preferred location, or
    // where it lives under accessed-by): serving it "remotely from the CPU" would first take
    // it off that device (UVM pins at the preferred location where the thrashing processors
    // reach it).
    let advised_on_peer = matches!(attrs.preferred, Some(p @ Proc::Device(_)) if p != requester && can_access(p))
        || (attrs.accessed_by.has(requester)
            && matches!(current, Some(c @ Proc::Device(_)) if c != requester && can_access(c)));
    if let Some(pin) = reach.thrash_pinned.filter(|p| can_reach(*p) && !advised_on_peer) {
        return if pin == requester { Decision::Migrate(pin) } else { Decision::Remote(pin) };
    }
    let Some(current) = current else {
        // 4. First touch: the preferred location if the requester can access it there (a peer
        // device's memory too: the data is placed there first), else the requester.
        return match attrs.preferred {
            Some(p) if can_access(p) && p != requester => Decision::Remote(p),
            _ => Decision::Migrate(requester),
        };
    };
    // 5. Accessed-by: keep the data where it is and map it remotely, on another device too
    // where the requester reaches that device's memory peer to peer.
    if attrs.accessed_by.has(requester) && can_access(current) && current != requester {
        return Decision::Remote(current);
    }
    // 6. A preferred location the requester can access (host memory through its aperture, or a
    // peer device's memory): data goes there, requester maps remotely. Not when the requester
    // holds a copy itself: it keeps reading that one.
    if let Some(p) = attrs.preferred.filter(|p| can_access(*p) && *p != requester && current != requester) {
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
    /// A CPU fault brings back what the prefetcher picks around the faulting page (UVM runs its
    /// tree prefetcher for CPU destinations too: 64 KiB on a first fault, growing as the CPU's
    /// share of the block does), instead of [`crate::space::CoreConfig::fault_around`].
    pub cpu_fault_prefetch: bool,
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
            cpu_fault_prefetch: true,
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
            cpu_fault_prefetch: false,
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
    /// destination; `npages`: pages in the block; `skew`: pages between the 2 MiB boundary and
    /// the block's first page (non-zero for the first block of a region that starts inside a
    /// 2 MiB window), so that prefetchers can follow virtual alignment. Returns the extra pages
    /// to migrate (may overlap the inputs; the caller removes them).
    fn prefetch(&self, faulted: &PageMask, resident: &PageMask, npages: usize, skew: usize) -> PageMask;
}

/// No prefetching: only faulted pages move.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPrefetch;

impl Prefetcher for NoPrefetch {
    fn prefetch(&self, _f: &PageMask, _r: &PageMask, _n: usize, _skew: usize) -> PageMask {
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
    fn prefetch(&self, _faulted: &PageMask, _resident: &PageMask, npages: usize, _skew: usize) -> PageMask {
        PageMask::full(npages)
    }
}

impl Prefetcher for TreePrefetcher {
    fn prefetch(&self, faulted: &PageMask, resident: &PageMask, npages: usize, skew: usize) -> PageMask {
        // The tree's leaves and big pages follow virtual 64 KiB boundaries: for a block that
        // starts mid-window, UVM (`update_bitmap_tree_from_va_block`) shifts its tree by the
        // pages between the block's start and the 64 KiB boundary before it (`offset = 16 -
        // prefix`, less than one big page), leaves that are never occupied. The tree is aligned
        // to 64 KiB, not to the 2 MiB window: its root spans the block plus those few leaves.
        let skew = (skew % BIG_PAGE).min(PAGES_PER_BLOCK - npages.min(PAGES_PER_BLOCK));
        let leaves = skew + npages;
        let shift = |m: &PageMask| {
            let mut out = PageMask::default();
            for i in m.iter().filter(|i| *i < npages) {
                out.set(i + skew);
            }
            out
        };
        let (faulted, resident) = (shift(faulted), shift(resident));
        // Big-page growth.
        let mut occupied = resident.or(&faulted);
        for i in faulted.iter() {
            let big = i / BIG_PAGE * BIG_PAGE;
            occupied.set_range(big.max(skew), (big + BIG_PAGE).min(leaves));
        }
        let mut out = occupied;
        // Walk up the virtual tree from each faulted page.
        for i in faulted.iter() {
            let mut size = BIG_PAGE * 2;
            let mut best = None;
            while size <= PAGES_PER_BLOCK {
                let s = i / size * size;
                let e = (s + size).min(leaves);
                let n = occupied.count_range(s.max(skew), e);
                if n as u64 * 100 > (e - s) as u64 * u64::from(self.threshold_pct) {
                    best = Some((s.max(skew), e));
                }
                size *= 2;
            }
            if let Some((s, e)) = best {
                out.set_range(s, e);
            }
        }
        // Back to block pages.
        let mut block = PageMask::default();
        for i in out.iter().filter(|i| *i >= skew) {
            block.set(i - skew);
        }
        block
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
        let out = p.prefetch(&f, &PageMask::default(), 512, 0);
        assert_eq!(out.count(), 16, "one fault pulls its 64 KiB");
        // Half the block resident plus a fault in the other half: more than 51% of 2 MiB.
        let mut r = PageMask::default();
        r.set_range(0, 256);
        let mut f = PageMask::default();
        f.set(300);
        let out = p.prefetch(&f, &r, 512, 0);
        assert_eq!(out.count(), 512);
        assert_eq!(NoPrefetch.prefetch(&f, &r, 512, 0).count(), 0);
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
        // The same without read-mostly (rule 1 above answers before the collapse rule is reached):
        // copies left by duplicate-on-read, or by read-mostly advice since withdrawn, that the
        // writer holds none of. Mapping the writer remotely to one copy would let the others go
        // stale.
        let mut spread = on(Proc::Cpu);
        spread.resident.insert(other);
        for attrs in [none, ab, pref_cpu] {
            assert_eq!(
                select_residency(&spread, &attrs, DEV, Access::Write, peer),
                Decision::Migrate(DEV),
                "a write collapses copies it holds none of: {attrs:?}"
            );
        }
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

    /// uvm.md 3.1 step 2: "If read duplication applies (the policy is ReadMostly ...) and the
    /// access is a read or prefetch, make a copy on the faulting processor" — on a first touch
    /// too, and ahead of the preferred location (7.1: "Read duplication takes precedence over
    /// the preferred location"). UVM: `*read_duplicate = may_read_duplicate && read; if
    /// (*read_duplicate) return processor_id;` with no residency check.
    #[test]
    fn uvm_read_mostly_first_touch_read_copies_to_the_reader() {
        let remote = Reach { host_remote: true, ..Reach::default() };
        let rm_pref_cpu = Attrs { read_mostly: true, preferred: Some(Proc::Cpu), ..Attrs::default() };
        assert_eq!(
            select_residency(&Page::default(), &rm_pref_cpu, DEV, Access::Read, remote),
            Decision::Migrate(DEV),
            "first read of a read-mostly page: the reader gets it, not a remote mapping of the preferred location"
        );
    }

    /// uvm.md 3.1 step 2, second half: a write in a read-duplication range resolves to the
    /// faulting processor (UVM: `if (may_read_duplicate) return processor_id;` before the
    /// preferred-location and accessed-by rules), even where only one copy exists.
    #[test]
    fn uvm_write_to_a_read_mostly_page_resolves_to_the_writer() {
        let remote = Reach { host_remote: true, ..Reach::default() };
        let rm_ab = Attrs { read_mostly: true, accessed_by: ProcMask::only(DEV), ..Attrs::default() };
        assert_eq!(select_residency(&on(Proc::Cpu), &rm_ab, DEV, Access::Write, remote), Decision::Migrate(DEV));
        let rm_pref_cpu = Attrs { read_mostly: true, preferred: Some(Proc::Cpu), ..Attrs::default() };
        assert_eq!(select_residency(&on(Proc::Cpu), &rm_pref_cpu, DEV, Access::Write, remote), Decision::Migrate(DEV));
    }

    /// uvm.md 3.1 steps 6 and 8 work on the *closest* resident copy
    /// (`uvm_va_block_page_get_closest_resident`: the requester itself when it holds one). A
    /// page left with two copies (ReadMostly set, read by the device, then unset: the copies
    /// stay) read again by the device, which lost only its mapping: UVM keeps it local (step 6
    /// returns the closest copy, the device's own; step 8 is skipped as the closest copy is the
    /// requester's), and never maps a page with several copies remotely ("a read-duplication
    /// mapping always points to local memory"). `select_residency` takes the CPU's copy as
    /// "current" and maps the host copy remotely.
    #[test]
    fn uvm_holder_of_a_copy_is_not_mapped_remotely() {
        let remote = Reach { host_remote: true, ..Reach::default() };
        let mut dup = on(Proc::Cpu);
        dup.resident.insert(DEV);
        let ab = Attrs { accessed_by: ProcMask::only(DEV), ..Attrs::default() };
        assert_ne!(select_residency(&dup, &ab, DEV, Access::Read, remote), Decision::Remote(Proc::Cpu), "accessed-by");
        let pref_cpu = Attrs { preferred: Some(Proc::Cpu), ..Attrs::default() };
        assert_ne!(
            select_residency(&dup, &pref_cpu, DEV, Access::Read, remote),
            Decision::Remote(Proc::Cpu),
            "preferred"
        );
    }

    /// Pages device 0 holds after one read fault at the first page of a region that starts
    /// `skew` pages past a 64 KiB boundary, under `uvm`.
    fn pages_after_one_fault(skew: u64) -> Vec<u64> {
        use crate::device::DeviceFault;
        use crate::types::{BLOCK_SIZE, PAGE_SIZE};
        let start = 8 * BLOCK_SIZE + skew * PAGE_SIZE;
        let (space, id) = crate::testing::one_region(Policy::uvm(), start, BLOCK_SIZE);
        let slot = space.slot(id).unwrap();
        let mut batch = vec![DeviceFault { va: start, access: Access::Read, client: 0 }];
        let (cancel, _) = crate::fault::service_batch(&space, &slot, &mut batch);
        assert!(cancel.is_empty());
        (0..64).filter(|p| space.page_state(start + p * PAGE_SIZE).unwrap().resident.has(Proc::Device(id))).collect()
    }

    /// uvm.md 4 step 2: big-page growth fills the 64 KiB *virtual* big page holding the fault
    /// ("the same is done for the unaligned prefix and suffix. The tree is shifted so that
    /// leaves line up with 64 KB boundaries"). A region may start at any page, and its first
    /// block's page 0 is then not 64 KiB aligned; `TreePrefetcher` groups pages by block index
    /// (`i / 16 * 16`), so the fault pulls in 16 pages that straddle two big pages.
    #[test]
    fn uvm_big_page_growth_follows_virtual_64k_boundaries() {
        assert_eq!(pages_after_one_fault(0), (0..16).collect::<Vec<_>>(), "aligned region");
        // Region starts 3 pages into a big page: the fault's big page is the 13-page prefix.
        assert_eq!(pages_after_one_fault(3), (0..13).collect::<Vec<_>>());
    }

    /// uvm.md 3.1 steps 5 and 8: the preferred location is used "if the faulting processor can
    /// access it" (UVM: `accessible_from[preferred]`, which holds peers). `select_residency`
    /// reached only itself and host memory there, though `Reach::peers` says the requester maps
    /// the preferred device's memory through its peer window.
    #[test]
    fn uvm_preferred_peer_device_is_reachable() {
        let other = Proc::Device(DeviceId(1));
        let peer = Reach { host_remote: true, peers: ProcMask::only(other), ..Reach::default() };
        let pref_other = Attrs { preferred: Some(other), ..Attrs::default() };
        // First touch (step 5): the preferred location, mapped remotely.
        assert_eq!(select_residency(&Page::default(), &pref_other, DEV, Access::Read, peer), Decision::Remote(other));
        // Resident on the preferred device (step 8): it stays there, mapped remotely.
        assert_eq!(select_residency(&on(other), &pref_other, DEV, Access::Read, peer), Decision::Remote(other));
        // In host memory (step 8): moved to the preferred device, then mapped remotely; for a
        // write too, the moved copy being the only one.
        for access in [Access::Read, Access::Write] {
            assert_eq!(select_residency(&on(Proc::Cpu), &pref_other, DEV, access, peer), Decision::Remote(other));
        }
        // hetmm's duplicate-on-read gives way to the preferred location, as before.
        let dup_peer = Reach { dup_reads: true, ..peer };
        assert_eq!(select_residency(&on(Proc::Cpu), &pref_other, DEV, Access::Read, dup_peer), Decision::Remote(other));
        // Not a peer: the preferred device is out of reach, the requester gets the data.
        let remote = Reach { host_remote: true, ..Reach::default() };
        assert_eq!(select_residency(&on(Proc::Cpu), &pref_other, DEV, Access::Read, remote), Decision::Migrate(DEV));
        assert_eq!(select_residency(&Page::default(), &pref_other, DEV, Access::Read, remote), Decision::Migrate(DEV));
        // The requester holds the only copy: it keeps it (step 8 is for data elsewhere).
        assert_eq!(select_residency(&on(DEV), &pref_other, DEV, Access::Read, peer), Decision::Migrate(DEV));
        // A write collapses several copies onto the writer, ahead of the preferred location.
        let mut spread = on(Proc::Cpu);
        spread.resident.insert(other);
        assert_eq!(select_residency(&spread, &pref_other, DEV, Access::Write, peer), Decision::Migrate(DEV));
        // Read-mostly still duplicates to the reader first (step 2).
        let rm = Attrs { read_mostly: true, ..pref_other };
        assert_eq!(select_residency(&on(Proc::Cpu), &rm, DEV, Access::Read, peer), Decision::Duplicate);
    }

    /// Found by an audit: uvm.md 4 step 2 and `update_bitmap_tree_from_va_block` (uvm_perf_prefetch.c): a
    /// block that starts mid 2 MiB window gets its tree shifted by `offset = 16 - prefix` leaves
    /// (less than one big page: the tree is aligned to 64 KiB, not to the 2 MiB window), so the
    /// root covers the block's pages plus `offset` leaves. A block starting 100 pages into its
    /// window (412 pages): offset 4, 416 leaves. With its first 200 pages resident and a fault at
    /// page 205 (big page 204..220 grown), 216 of the root's 416 leaves are occupied:
    /// 21600 > 416 * 51 = 21216, so UVM migrates the whole block. `TreePrefetcher` shifts by the
    /// whole skew (100), its root spans 512 leaves of which 100 can never be occupied, and
    /// prefetches only the fault's big page.
    #[test]
    fn uvm_tree_for_a_block_starting_mid_window_is_aligned_to_64k_not_2m() {
        let (skew, npages) = (100usize, 412usize);
        let mut r = PageMask::default();
        r.set_range(0, 200);
        let mut f = PageMask::default();
        f.set(205);
        let got = TreePrefetcher::default().prefetch(&f, &r, npages, skew);
        assert_eq!(got.count(), npages, "UVM prefetches the whole block here");
    }

    /// Found by an audit: the capacity-thrashing response pins a block in host memory for the thrashing
    /// device (`reach_of`: `thrash_pinned = Some(Cpu)` unconditionally). A page whose preferred
    /// location is a peer device the requester reaches, and which lives there, is then "served
    /// remotely from the CPU": `map_remote` first brings it home from the preferred device
    /// (`to_cpu(only_elsewhere(..))`), contradicting the advice (UVM pins at the preferred
    /// location when the thrashing processors can reach it; fault.rs's own whole-block remote
    /// path avoids exactly this for the block's other pages).
    #[test]
    fn thrash_pin_does_not_pull_data_off_its_preferred_peer() {
        let other = Proc::Device(DeviceId(1));
        let pinned_peer = Reach {
            host_remote: true,
            thrash_pinned: Some(Proc::Cpu),
            peers: ProcMask::only(other),
            ..Reach::default()
        };
        let pref_other = Attrs { preferred: Some(other), ..Attrs::default() };
        assert_eq!(
            select_residency(&on(other), &pref_other, DEV, Access::Read, pinned_peer),
            Decision::Remote(other),
            "data at its preferred (peer) location stays there"
        );
        // AccessedBy: keep the data where it is, map it.
        let ab = Attrs { accessed_by: ProcMask::only(DEV), ..Attrs::default() };
        assert_eq!(
            select_residency(&on(other), &ab, DEV, Access::Read, pinned_peer),
            Decision::Remote(other),
            "accessed-by data on a peer stays there"
        );
    }

    /// Found by an audit: `service_block` adds the prefetcher's pages to `prefetched_pages` before applying
    /// the plan; when the plan does not fit in device memory it falls back to the faulted pages
    /// alone, and the count is not taken back. A device of 8 pages: one read fault under `uvm`
    /// (tree prefetcher: 15 more pages of the 64 KiB big page) moves 1 page and counts 15
    /// prefetched.
    #[test]
    fn prefetched_pages_counts_only_pages_that_moved() {
        use crate::device::{DeviceFault, DeviceMmu};
        use crate::space::{AddressSpace, AttachOptions, CoreConfig};
        use crate::types::{Prot, VaRange, BLOCK_SIZE, PAGE_SIZE};
        let start = 8 * BLOCK_SIZE;
        let cfg = CoreConfig { policy: Policy { cpu_readahead: false, ..Policy::uvm() }, ..CoreConfig::default() };
        let space = AddressSpace::new(cfg);
        let host = Arc::new(parking_lot::Mutex::new(vec![0u8; BLOCK_SIZE as usize]));
        space
            .add_region(
                Arc::new(crate::fakes::PlainCpu::new(VaRange::new(start, BLOCK_SIZE))),
                Prot::READ | Prot::WRITE,
            )
            .unwrap();
        let dev = Arc::new(crate::testing::FakeDevice::new(8 * PAGE_SIZE as usize, 0, host));
        let id = space.attach(dev as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
        let slot = space.slot(id).unwrap();
        let before = space.stats.snapshot();
        let mut batch = vec![DeviceFault { va: start, access: Access::Read, client: 0 }];
        let (cancel, _) = crate::fault::service_batch(&space, &slot, &mut batch);
        assert!(cancel.is_empty(), "{cancel:?}");
        let on_dev = (0..512u64)
            .filter(|p| space.page_state(start + p * PAGE_SIZE).unwrap().resident.has(Proc::Device(id)))
            .count() as u64;
        assert!(on_dev >= 1, "the faulted page is served");
        let d = space.stats.snapshot().since(&before);
        assert_eq!(d.prefetched_pages, on_dev - 1, "prefetched pages counted vs pages the device got beyond the fault");
    }

    /// Found by an audit: uvm.md 4 policy gates / `uvm_perf_prefetch_prenotify_fault_migrations`: "If this
    /// is a first-touch fault and the destination processor is the preferred location, populate
    /// the whole max_prefetch_region", for any destination, the CPU included (CPU faults go
    /// through the same prefetcher). The device fault path does this (`first_touch_preferred`);
    /// the CPU fault path under `uvm` (`cpu_prefetch_chunk`) does not: a CPU first touch of a
    /// block whose preferred location is the CPU gets 16 pages, not 512.
    #[test]
    fn uvm_cpu_first_touch_at_the_preferred_cpu_populates_the_block() {
        use crate::advice::Advice;
        use crate::types::{BLOCK_SIZE, PAGE_SIZE};
        let (start, len) = (8 * BLOCK_SIZE, BLOCK_SIZE);
        let (space, _id) = crate::testing::one_region(Policy::uvm(), start, len);
        space.advise(start, len, Advice::PreferredLocation(Some(Proc::Cpu))).unwrap();
        crate::cpu::CpuFaultHandler::cpu_fault(&*space, start + 100 * PAGE_SIZE, Access::Read).unwrap();
        let home =
            (0..512).filter(|p| space.page_state(start + p * PAGE_SIZE).unwrap().resident.has(Proc::Cpu)).count();
        assert_eq!(home, 512, "pages populated by a first CPU touch at the preferred location");
    }

    /// Found by an audit: uvm.md 4 policy gates (`should_apply_prefetch_logic`): "Pages are never
    /// prefetched *away from* a set preferred location". A block preferring the device, held
    /// there; a CPU read of one page under `uvm` must bring that page home (the CPU cannot map
    /// device memory), and no more. `cpu_prefetch_chunk` runs the tree prefetcher regardless and
    /// `bring_chunk_home` decides each extra page with `select_residency`, which answers
    /// `Migrate(Cpu)` (the preferred device is out of the CPU's reach): the whole 64 KiB big
    /// page leaves its preferred location.
    #[test]
    fn uvm_cpu_fault_does_not_prefetch_away_from_the_preferred_device() {
        let home = cpu_read_of_a_block_preferring_its_device(0);
        assert_eq!(home.iter().filter(|&&h| h).count(), 1, "pages taken off their preferred device by one CPU read");
    }

    /// A block of a region under `uvm`, held by a device that its pages from `from` on prefer; a
    /// CPU read of its first page. Which of its pages the CPU holds then.
    fn cpu_read_of_a_block_preferring_its_device(from: u64) -> Vec<bool> {
        use crate::advice::Advice;
        use crate::types::{BLOCK_SIZE, PAGE_SIZE};
        let (start, len) = (8 * BLOCK_SIZE, BLOCK_SIZE);
        let (space, id) = crate::testing::one_region(Policy::uvm(), start, len);
        let dev = Proc::Device(id);
        space.migrate(start, len, dev).unwrap();
        space
            .advise(start + from * PAGE_SIZE, len - from * PAGE_SIZE, Advice::PreferredLocation(Some(dev)))
            .unwrap()
            .wait(std::time::Duration::from_secs(5))
            .unwrap();
        crate::cpu::CpuFaultHandler::cpu_fault(&*space, start, Access::Read).unwrap();
        (0..512).map(|p| space.page_state(start + p * PAGE_SIZE).unwrap().resident.has(Proc::Cpu)).collect()
    }

    /// bdfd8db's gate on uvm's CPU prefetch looks at the faulting page's preferred location
    /// only: a fault on a page without one still prefetches its neighbours off the device they
    /// prefer (pages 8..16 of the fault's 64 KiB big page here), which the device path (gated
    /// page by page) and UVM (`should_apply_prefetch_logic`, per policy range) never do.
    #[test]
    fn uvm_cpu_fault_does_not_prefetch_neighbours_away_from_their_preferred_device() {
        let home = cpu_read_of_a_block_preferring_its_device(8);
        let taken = home[8..].iter().filter(|&&h| h).count();
        assert_eq!(taken, 0, "pages taken off their preferred device by a neighbour's CPU read");
        assert!(home[0], "the faulting page came");
    }

    proptest::proptest! {
        /// `TreePrefetcher` against UVM's algorithm written out page by page (uvm.md 4, block
        /// aligned to 64 KiB): tree over pages seeded with resident | faulted, big pages of
        /// faulted pages filled, then for each faulted page the largest ancestor (sizes 1..512,
        /// clipped to the block) with `count * 100 > pages * 51` filled. Compared outside the
        /// resident and faulted pages (the caller drops those).
        #[test]
        fn tree_matches_uvm_reference(
            faulted in proptest::collection::vec(0usize..512, 1..12),
            resident in proptest::collection::vec((0usize..512, 1usize..64), 0..8),
            npages in proptest::prop_oneof![proptest::strategy::Just(512usize), 1usize..512],
        ) {
            let mut f = PageMask::default();
            for i in faulted.iter().filter(|i| **i < npages) { f.set(*i); }
            let mut r = PageMask::default();
            for (s, l) in resident { r.set_range(s.min(npages), (s + l).min(npages)); }
            let mut tree = vec![false; npages];
            for (i, t) in tree.iter_mut().enumerate() { *t = f.get(i) || r.get(i); }
            for i in (0..npages).filter(|i| f.get(*i)) {
                let s = i / 16 * 16;
                for t in &mut tree[s..(s + 16).min(npages)] { *t = true; }
            }
            let mut want = vec![false; npages];
            for i in (0..npages).filter(|i| f.get(*i)) {
                let mut size = 1;
                let mut best = (i, i + 1);
                while size <= 512 {
                    let s = i / size * size;
                    let e = (s + size).min(npages);
                    let n = tree[s..e].iter().filter(|t| **t).count();
                    if n * 100 > (e - s) * 51 { best = (s, e); }
                    size *= 2;
                }
                for w in &mut want[best.0..best.1] { *w = true; }
            }
            let got = TreePrefetcher::default().prefetch(&f, &r, npages, 0);
            for (i, w) in want.iter().enumerate() {
                if f.get(i) || r.get(i) { continue; }
                proptest::prop_assert_eq!(got.get(i), *w, "page {}", i);
            }
            for i in npages..512 {
                proptest::prop_assert!(!got.get(i), "page {} past the block", i);
            }
        }
    }

    /// uvm.md 4: CPU faults go through the same prefetcher (step 4 names "CPU destinations"),
    /// so a CPU read of one page of a device-resident block brings back its 64 KiB big page.
    /// `CoreConfig::with_policy("uvm")` keeps the 2 MiB `fault_around`: the CPU's first touch
    /// of one page pulls the whole block off the device.
    #[test]
    fn uvm_cpu_fault_brings_back_a_big_page_not_the_block() {
        use crate::types::{BLOCK_SIZE, PAGE_SIZE};
        let (start, len) = (8 * BLOCK_SIZE, BLOCK_SIZE);
        let (space, id) = crate::testing::one_region(Policy::uvm(), start, len);
        space.migrate(start, len, Proc::Device(id)).unwrap();
        crate::cpu::CpuFaultHandler::cpu_fault(&*space, start, Access::Read).unwrap();
        let home =
            (0..512).filter(|p| space.page_state(start + p * PAGE_SIZE).unwrap().resident.has(Proc::Cpu)).count();
        assert_eq!(home, 16, "pages brought back by one CPU read");
    }

    /// A block whose data is all in host memory but unmapped by the CPU (migrated home, or
    /// evicted): one CPU read maps all of it under `uvm`, as the tree is seeded with the pages the
    /// CPU holds; only pages the CPU already maps are left out.
    #[test]
    fn uvm_cpu_fault_on_a_block_held_but_unmapped_maps_all_of_it() {
        use crate::block::CpuMap;
        use crate::types::{BLOCK_SIZE, PAGE_SIZE};
        let (start, len) = (8 * BLOCK_SIZE, BLOCK_SIZE);
        let (space, id) = crate::testing::one_region(Policy::uvm(), start, len);
        space.migrate(start, len, Proc::Device(id)).unwrap();
        space.migrate(start, len, Proc::Cpu).unwrap();
        let page = |p: u64| space.page_state(start + p * PAGE_SIZE).unwrap();
        assert!((0..512).all(|p| page(p).resident.has(Proc::Cpu) && page(p).cpu == CpuMap::None), "set-up");
        crate::cpu::CpuFaultHandler::cpu_fault(&*space, start + 100 * PAGE_SIZE, Access::Read).unwrap();
        assert_eq!((0..512).filter(|&p| page(p).cpu != CpuMap::None).count(), 512, "pages mapped by one CPU read");
    }
}
