//! Per-device physical allocator: a buddy allocator over the memory a device registers, 2 MiB
//! roots split down to 4 KiB pages (GMEM's isolated buddy allocator; never used for CPU memory).
//!
//! Any allocated page can be freed on its own, whatever order it was allocated with: a 2 MiB
//! chunk whose pages leave the device one at a time is returned page by page and the buddies
//! merge back as they become free. This lets eviction and CPU fault-back free exactly the pages
//! they move without tracking allocation orders.

use std::collections::BTreeSet;

use fixedbitset::FixedBitSet;

use crate::device::PhysAddr;
use crate::types::{PAGE_SHIFT, PAGE_SIZE};

/// Highest order: 2^9 pages = 2 MiB.
pub const MAX_ORDER: u32 = 9;

/// Buddy allocator over page frames of one device.
#[derive(Debug)]
pub struct BuddyAllocator {
    /// Free blocks per order, by first frame number (sorted, so allocation is lowest-address first
    /// and deterministic).
    free: Vec<BTreeSet<u64>>,
    /// The per-frame state of the registered memory, one segment per stretch of it (whole 2 MiB
    /// roots, in address order, never touching): it costs the frames registered, not the
    /// physical address space below or between them (a device whose memory sat high, or in two
    /// ranges far apart, made a byte and a bit for every frame from address 0).
    segments: Vec<Segment>,
    free_pages: u64,
    total_pages: u64,
}

/// The frames of `[first, first + head_order.len())` (`first` a multiple of 2^[`MAX_ORDER`]
/// frames, and so is the length: a block and its buddy always lie in the same segment).
#[derive(Debug)]
struct Segment {
    first: u64,
    /// Order of the free block starting at each frame, or `NOT_FREE_HEAD`.
    head_order: Vec<u8>,
    /// Frames handed out and not yet freed: `free` checks a whole run with word operations
    /// (walking the free blocks above each frame cost about 3 ns a frame, 1.5 us per 2 MiB).
    allocated: FixedBitSet,
}

const NOT_FREE_HEAD: u8 = u8::MAX;

/// Frames in a 2 MiB root.
const ROOT_FRAMES: u64 = 1 << MAX_ORDER;

impl BuddyAllocator {
    /// An allocator over the given physical ranges (each start and length a multiple of 2 MiB is
    /// best; partial tails are registered as smaller blocks).
    pub fn new(ranges: &[(PhysAddr, u64)]) -> Self {
        // Whole frames of each range, in address order; a range whose end overflows is dropped.
        let mut runs: Vec<(u64, u64)> = ranges
            .iter()
            .filter_map(|(a, l)| Some((a.0.div_ceil(PAGE_SIZE), a.0.checked_add(*l)? >> PAGE_SHIFT)))
            .filter(|(first, last)| last > first)
            .collect();
        runs.sort_unstable();
        // Segments: the runs' whole roots, those that overlap or touch merged.
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for &(first, last) in &runs {
            let (s, e) = (first & !(ROOT_FRAMES - 1), last.div_ceil(ROOT_FRAMES) * ROOT_FRAMES);
            match spans.last_mut() {
                Some(prev) if s <= prev.1 => prev.1 = prev.1.max(e),
                _ => spans.push((s, e)),
            }
        }
        let segments = spans
            .into_iter()
            .map(|(s, e)| {
                let n = usize::try_from(e - s).expect("registered memory larger than the address space");
                Segment { first: s, head_order: vec![NOT_FREE_HEAD; n], allocated: FixedBitSet::with_capacity(n) }
            })
            .collect();
        let mut a = BuddyAllocator {
            free: (0..=MAX_ORDER).map(|_| BTreeSet::new()).collect(),
            segments,
            free_pages: 0,
            total_pages: 0,
        };
        // Frames shared by overlapping ranges are registered once (twice, they would sit in two
        // free blocks and be handed out twice).
        let mut covered = 0;
        for (first, last) in runs {
            let first = first.max(covered);
            if last > first {
                a.total_pages += last - first;
                let (k, _) = a.locate(first).expect("a run outside its segment");
                a.free_range(k, first, last - first);
            }
            covered = covered.max(last);
        }
        a
    }

    /// Pages managed.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Pages free.
    pub fn free_pages(&self) -> u64 {
        self.free_pages
    }

    /// Frames the per-frame state covers (the registered memory rounded out to 2 MiB roots).
    pub fn indexed_frames(&self) -> u64 {
        self.segments.iter().map(|s| s.head_order.len() as u64).sum()
    }

    /// The segment holding `frame` and the frame's index in it.
    #[inline]
    fn locate(&self, frame: u64) -> Option<(usize, usize)> {
        // Devices register one range: no search (it cost a quarter more on page-by-page frees).
        let k = match self.segments.as_slice() {
            [_] => 0,
            segs => segs.partition_point(|s| s.first <= frame).checked_sub(1)?,
        };
        let seg = &self.segments[k];
        let i = usize::try_from(frame.checked_sub(seg.first)?).ok()?;
        (i < seg.head_order.len()).then_some((k, i))
    }

    /// Order of the free block starting at `frame` of segment `k`, if one does (`frame` in the
    /// segment).
    #[inline]
    fn head(&self, k: usize, frame: u64) -> Option<u32> {
        let seg = &self.segments[k];
        let h = seg.head_order[(frame - seg.first) as usize];
        (h != NOT_FREE_HEAD).then_some(u32::from(h))
    }

    /// Records `frame` of segment `k` as the head of a free block of `order` (`NOT_FREE_HEAD`:
    /// of none).
    #[inline]
    fn set_head(&mut self, k: usize, frame: u64, order: u8) {
        let seg = &mut self.segments[k];
        seg.head_order[(frame - seg.first) as usize] = order;
    }

    /// Allocates 2^order contiguous, naturally aligned pages.
    pub fn alloc(&mut self, order: u32) -> Option<PhysAddr> {
        if order > MAX_ORDER {
            return None;
        }
        let found = (order..=MAX_ORDER).find(|&o| !self.free[o as usize].is_empty())?;
        let frame = self.free[found as usize].pop_first()?;
        // A free block lies in one segment, and so do its halves.
        let (k, _) = self.locate(frame).expect("a free block outside the registered memory");
        self.set_head(k, frame, NOT_FREE_HEAD);
        // Split down, returning upper halves to the free lists.
        let mut o = found;
        while o > order {
            o -= 1;
            self.push_free(k, frame + (1 << o), o);
        }
        self.take(k, frame, order);
        Some(PhysAddr(frame << PAGE_SHIFT))
    }

    /// Allocates the 2^order pages at `addr` (naturally aligned) if they are all free: the
    /// device may still hold state for exactly that memory (a cached mapping). Returns false and
    /// changes nothing otherwise.
    pub fn alloc_at(&mut self, addr: PhysAddr, order: u32) -> bool {
        let frame = addr.0 >> PAGE_SHIFT;
        if order > MAX_ORDER || !addr.0.is_multiple_of(PAGE_SIZE) || frame & ((1 << order) - 1) != 0 {
            return false;
        }
        // Segments hold whole roots: every block holding `frame` lies in its segment.
        let Some((k, _)) = self.locate(frame) else { return false };
        // The free block holding the range: its head at the first order where `frame` lies in one.
        let Some(o) = (order..=MAX_ORDER).find(|&o| self.head(k, frame & !((1u64 << o) - 1)) == Some(o)) else {
            return false;
        };
        let mut head = frame & !((1u64 << o) - 1);
        self.free[o as usize].remove(&head);
        self.set_head(k, head, NOT_FREE_HEAD);
        // Split down towards `frame`, returning the other halves.
        let mut o = o;
        while o > order {
            o -= 1;
            let upper = head + (1 << o);
            if frame >= upper {
                self.push_free(k, head, o);
                head = upper;
            } else {
                self.push_free(k, upper, o);
            }
        }
        self.take(k, frame, order);
        true
    }

    /// Frees `npages` pages from `addr` (page aligned, all allocated and owned). Returns false and
    /// changes nothing if any page is outside the managed memory or already free.
    pub fn free(&mut self, addr: PhysAddr, npages: u64) -> bool {
        let first = addr.0 >> PAGE_SHIFT;
        if !addr.0.is_multiple_of(PAGE_SIZE) || npages == 0 {
            return false;
        }
        // Only registered memory is ever allocated, so this also refuses memory outside it; a run
        // is allocated only within one segment (segments never touch).
        let Some((k, i)) = self.locate(first) else { return false };
        let Some(end) = usize::try_from(npages).ok().and_then(|n| i.checked_add(n)) else { return false };
        let allocated = &mut self.segments[k].allocated;
        if end > allocated.len() || !allocated.contains_all_in_range(i..end) {
            return false;
        }
        allocated.remove_range(i..end);
        self.free_range(k, first, npages);
        true
    }

    /// Records the 2^order frames at `frame` (in segment `k`) as handed out.
    fn take(&mut self, k: usize, frame: u64, order: u32) {
        let seg = &mut self.segments[k];
        let i = (frame - seg.first) as usize;
        seg.allocated.insert_range(i..i + (1 << order));
        self.free_pages -= 1 << order;
    }

    /// Frees a run (in segment `k`) as maximal aligned power-of-two pieces.
    fn free_range(&mut self, k: usize, mut f: u64, mut n: u64) {
        while n > 0 {
            let align = if f == 0 { MAX_ORDER } else { f.trailing_zeros().min(MAX_ORDER) };
            let fit = 63 - n.leading_zeros();
            let o = align.min(fit);
            self.free_pages += 1 << o;
            self.free_block(k, f, o);
            f += 1 << o;
            n -= 1 << o;
        }
    }

    /// Frees one aligned block (in segment `k`, as its buddies) and merges it with free buddies.
    fn free_block(&mut self, k: usize, mut f: u64, mut o: u32) {
        while o < MAX_ORDER {
            let buddy = f ^ (1 << o);
            if self.head(k, buddy) != Some(o) {
                break;
            }
            self.free[o as usize].remove(&buddy);
            self.set_head(k, buddy, NOT_FREE_HEAD);
            f = f.min(buddy);
            o += 1;
        }
        self.push_free(k, f, o);
    }

    fn push_free(&mut self, k: usize, f: u64, o: u32) {
        self.free[o as usize].insert(f);
        self.set_head(k, f, o as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MB2: u64 = 2 << 20;

    #[test]
    fn alloc_at_takes_exactly_that_block_or_nothing() {
        let mut a = BuddyAllocator::new(&[(PhysAddr(0), 4 * MB2)]);
        assert!(a.alloc_at(PhysAddr(2 * MB2), 9));
        assert!(!a.alloc_at(PhysAddr(2 * MB2), 9), "taken");
        assert!(!a.alloc_at(PhysAddr(4096), 9), "misaligned");
        assert_eq!(a.free_pages(), 3 * 512);
        // A page inside a free chunk: the rest of the chunk stays free, in pieces.
        assert!(a.alloc_at(PhysAddr(MB2 + 5 * 4096), 0));
        assert_eq!(a.free_pages(), 3 * 512 - 1);
        assert!(!a.alloc_at(PhysAddr(MB2), 9));
        assert_eq!(a.alloc(9), Some(PhysAddr(0)));
        assert_eq!(a.alloc(9), Some(PhysAddr(3 * MB2)));
        assert!(a.free(PhysAddr(MB2 + 5 * 4096), 1));
        assert!(a.alloc_at(PhysAddr(MB2), 9), "merged back whole");
        assert_eq!(a.free_pages(), 0);
    }

    #[test]
    fn alloc_split_and_merge() {
        let mut a = BuddyAllocator::new(&[(PhysAddr(0), 2 * MB2)]);
        assert_eq!(a.free_pages(), 1024);
        let p = a.alloc(0).unwrap();
        assert_eq!(p, PhysAddr(0));
        assert_eq!(a.free_pages(), 1023);
        let big = a.alloc(9).unwrap();
        assert_eq!(big, PhysAddr(MB2));
        assert!(a.alloc(9).is_none());
        assert!(a.free(p, 1));
        assert!(!a.free(p, 1), "double free refused");
        assert_eq!(a.alloc(9), Some(PhysAddr(0)), "merged back to a 2 MiB root");
        // Free a 2 MiB allocation page by page; it merges back.
        for i in 0..512 {
            assert!(a.free(PhysAddr(MB2 + i * PAGE_SIZE), 1));
        }
        assert_eq!(a.alloc(9), Some(PhysAddr(MB2)));
        assert!(!a.free(PhysAddr(100 * MB2), 1), "outside managed memory");
    }

    proptest! {
        #[test]
        fn never_hands_out_a_page_twice(ops in proptest::collection::vec((0u32..=9, any::<bool>()), 1..200)) {
            let mut a = BuddyAllocator::new(&[(PhysAddr(0), 4 * MB2)]);
            let mut held: Vec<(u64, u64)> = Vec::new();
            let mut used = std::collections::HashSet::new();
            for (order, free) in ops {
                if free && !held.is_empty() {
                    let (addr, n) = held.swap_remove(0);
                    // Free page by page in reverse to exercise partial frees.
                    for i in (0..n).rev() {
                        prop_assert!(a.free(PhysAddr(addr + i * PAGE_SIZE), 1));
                        used.remove(&(addr / PAGE_SIZE + i));
                    }
                } else if let Some(p) = a.alloc(order) {
                    prop_assert_eq!(p.0 % (PAGE_SIZE << order), 0);
                    for i in 0..(1u64 << order) {
                        prop_assert!(used.insert(p.0 / PAGE_SIZE + i));
                    }
                    held.push((p.0, 1 << order));
                }
                prop_assert_eq!(a.free_pages() + used.len() as u64, 2048);
            }
        }
    }

    #[derive(Clone, Debug)]
    enum AOp {
        Alloc(u32),
        AllocAt(u64, u32),
        Free(u64, u64),
    }

    proptest! {
        /// Allocations, placed allocations and frees of arbitrary runs over registered memory
        /// with unaligned edges and holes, against a bitmap model.
        #[test]
        fn matches_a_bitmap_model(
            ranges in proptest::collection::vec((0u64..1500, 1u64..700), 1..4),
            high in any::<bool>(),
            ops in proptest::collection::vec(prop_oneof![
                (0u32..=9).prop_map(AOp::Alloc),
                (0u64..2048, 0u32..=9).prop_map(|(f, o)| AOp::AllocAt(f, o)),
                (0u64..2048, 1u64..64).prop_map(|(f, n)| AOp::Free(f, n)),
            ], 1..150),
        ) {
            // Ranges in frames, overlapping ones too; all of them far above address 0 or not.
            let base = if high { 1u64 << 40 } else { 0 };
            let mut regs: Vec<(PhysAddr, u64)> = Vec::new();
            let mut registered = vec![false; 2300];
            for (s, l) in ranges {
                for f in s..s + l { registered[f as usize] = true; }
                regs.push((PhysAddr((base + s) * PAGE_SIZE), l * PAGE_SIZE));
            }
            let mut a = BuddyAllocator::new(&regs);
            let mut used = vec![false; 2300];
            let total = registered.iter().filter(|r| **r).count() as u64;
            prop_assert_eq!(a.total_pages(), total);
            let free_run = |used: &Vec<bool>, f: u64, n: u64| (f..f + n).all(|x| registered.get(x as usize).copied().unwrap_or(false) && !used[x as usize]);
            for op in ops {
                match op {
                    AOp::Alloc(o) => {
                        let n = 1u64 << o;
                        let any = (0..2300u64 / n).any(|b| free_run(&used, b * n, n));
                        match a.alloc(o) {
                            Some(p) => {
                                let f = p.0 / PAGE_SIZE - base;
                                prop_assert_eq!(f % n, 0);
                                prop_assert!(free_run(&used, f, n), "handed out a taken or unregistered page");
                                for x in f..f + n { used[x as usize] = true; }
                            }
                            None => prop_assert!(!any, "refused order {} though a free aligned run exists", o),
                        }
                    }
                    AOp::AllocAt(f, o) => {
                        let n = 1u64 << o;
                        let f = f / n * n;
                        let want = free_run(&used, f, n);
                        prop_assert_eq!(a.alloc_at(PhysAddr((base + f) * PAGE_SIZE), o), want);
                        if want { for x in f..f + n { used[x as usize] = true; } }
                    }
                    AOp::Free(f, n) => {
                        let want = (f..f + n).all(|x| used.get(x as usize).copied().unwrap_or(false));
                        prop_assert_eq!(a.free(PhysAddr((base + f) * PAGE_SIZE), n), want);
                        if want { for x in f..f + n { used[x as usize] = false; } }
                    }
                }
                prop_assert_eq!(a.free_pages(), total - used.iter().filter(|u| **u).count() as u64);
            }
        }
    }

    /// The allocator kept a byte and a bit for every frame from physical address 0 to the end of
    /// the highest range: a device whose memory sits high in its physical address space (or two
    /// ranges far apart) paid for the whole gap. Here 4 MiB at 2^62 would have needed 1 PiB of
    /// state (the allocation fails and the process aborts); only the registered frames count.
    #[test]
    fn memory_at_a_high_physical_address_costs_only_its_own_frames() {
        let high = 1u64 << 62;
        let mut a = BuddyAllocator::new(&[(PhysAddr(high), 2 * MB2)]);
        assert_eq!((a.total_pages(), a.free_pages()), (1024, 1024));
        assert_eq!(a.alloc(9), Some(PhysAddr(high)));
        assert!(a.alloc_at(PhysAddr(high + MB2 + 3 * PAGE_SIZE), 0));
        assert_eq!(a.alloc(0), Some(PhysAddr(high + MB2 + 2 * PAGE_SIZE)), "the split's order-0 piece");
        assert!(!a.free(PhysAddr(0), 1), "below the managed memory");
        assert!(!a.free(PhysAddr(high + 2 * MB2), 1), "above the managed memory");
        assert!(a.free(PhysAddr(high), 512));
        assert!(a.free(PhysAddr(high + MB2 + 2 * PAGE_SIZE), 2));
        assert_eq!(a.free_pages(), 1024);
        assert_eq!(a.alloc(9), Some(PhysAddr(high)));
        assert_eq!(a.alloc(9), Some(PhysAddr(high + MB2)), "merged back whole");
        assert!(a.indexed_frames() <= 1024, "state for {} frames", a.indexed_frames());
    }

    /// Two ranges with a huge gap between them (2^61 bytes): both serve, lowest first, and a
    /// free that would span the gap is refused.
    #[test]
    fn ranges_far_apart_both_serve() {
        let far = 1u64 << 61;
        let mut a = BuddyAllocator::new(&[(PhysAddr(far), MB2), (PhysAddr(0), MB2 + 8 * PAGE_SIZE)]);
        assert_eq!(a.total_pages(), 512 + 512 + 8);
        assert_eq!(a.alloc(9), Some(PhysAddr(0)));
        assert_eq!(a.alloc(9), Some(PhysAddr(far)));
        assert_eq!(a.alloc(9), None);
        assert_eq!(a.alloc(3), Some(PhysAddr(MB2)));
        assert!(!a.free(PhysAddr(MB2), far / PAGE_SIZE), "a run over the gap");
        assert!(a.free(PhysAddr(far), 512));
        assert!(a.alloc_at(PhysAddr(far + 7 * PAGE_SIZE), 0));
        assert!(!a.alloc_at(PhysAddr(far + MB2), 0), "past the far range");
        assert!(!a.alloc_at(PhysAddr(MB2 + 8 * PAGE_SIZE), 0), "past the low range");
        assert_eq!(a.free_pages(), 511);
    }

    /// Overlapping registered ranges (a device listing a range twice, or two ranges sharing
    /// frames) registered the shared frames twice: counted twice and put on the free lists in
    /// two blocks, so the same page was handed out twice.
    #[test]
    fn overlapping_ranges_register_each_page_once() {
        let mut a = BuddyAllocator::new(&[(PhysAddr(0), MB2), (PhysAddr(MB2 / 2), MB2)]);
        assert_eq!(a.total_pages(), 768);
        assert_eq!(a.free_pages(), 768);
        let mut seen = std::collections::HashSet::new();
        while let Some(p) = a.alloc(0) {
            assert!(seen.insert(p.0), "page {:#x} handed out twice", p.0);
        }
        assert_eq!(seen.len(), 768);
        // A range whose end overflows is refused rather than panicking.
        let b = BuddyAllocator::new(&[(PhysAddr(0), MB2), (PhysAddr(u64::MAX - 4095), 8192)]);
        assert_eq!(b.total_pages(), 512);
    }
}
