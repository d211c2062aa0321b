//! Where policy decides. Residency selection is one pure function over a page's state, the
//! faulting processor and the access; prefetching is a strategy behind a trait. Mechanism (the
//! migration itself) lives in `migrate`.

use crate::block::{Page, PageMask};
use crate::types::{Access, Proc, PAGES_PER_BLOCK};

/// Chooses where a page should live after `requester` accesses it with `access`.
///
/// The foundation's rule: data moves to the processor that touches it (device-private memory
/// cannot be accessed in place, and the CPU cannot map device memory).
pub fn select_residency(_page: &Page, requester: Proc, _access: Access) -> Proc {
    requester
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

    #[test]
    fn residency_follows_requester() {
        let pg = Page::default();
        assert_eq!(select_residency(&pg, Proc::Cpu, Access::Read), Proc::Cpu);
    }
}
