//! Per-worker TLBs: small 4-way set-associative caches of translations, one array for 4 KiB
//! entries and one for 2 MiB entries. (Direct-mapped, two hot buffers whose addresses share an
//! index evicted each other on every access, so run times depended on where ASLR put them.)
//!
//! A TLB serves a cached translation without looking at the page table; only an invalidation
//! (or eviction by a conflicting fill) removes it. Each worker's TLB sits behind its own mutex,
//! which the worker holds for the whole of each memory access; an invalidation locks every
//! worker's TLB in turn, so when it returns every access that used an old translation has
//! finished (shootdown semantics).

use hetmm_core::types::{Prot, VaRange};

use crate::pagetable::{Target, Translation};

/// 4 KiB entries per TLB.
pub const SMALL_ENTRIES: usize = 256;
/// 2 MiB entries per TLB.
pub const LARGE_ENTRIES: usize = 64;
/// Entries per set.
const WAYS: usize = 4;
const SMALL: u64 = 1 << 12;
const LARGE: u64 = 1 << 21;
const INVALID: u64 = u64::MAX;

#[derive(Clone, Copy, Debug)]
struct Slot {
    /// First VA of the entry, or `INVALID`.
    tag: u64,
    target: Target,
    prot: Prot,
}

const EMPTY: Slot = Slot { tag: INVALID, target: Target::Device(0), prot: Prot::empty() };

/// Counters kept under the TLB's lock (no shared cache lines on the hot path).
#[derive(Debug)]
pub struct TlbCounters {
    /// Lookups served from the TLB.
    pub hits: u64,
    /// Lookups that needed a walk.
    pub misses: u64,
    /// Page-table walks.
    pub walks: u64,
    /// Entries removed by invalidations.
    pub invalidated: u64,
    /// Bytes accessed in remotely mapped host memory (counted here, under the lock every access
    /// holds anyway).
    pub remote_bytes: u64,
    /// Of those, bytes not yet charged to the link.
    pub link_owed: u64,
    /// Access counters: remote accesses (64-byte transactions) per 2 MiB region, a few regions
    /// per worker (direct-mapped by region; a region that takes another's slot starts from 0).
    access: [(u64, u32); ACCESS_SLOTS],
    /// Access-counter notices raised.
    pub notices: u64,
    /// Use counters ([`crate::usage`]): transactions per 2 MiB region, local and remote, not
    /// yet added to the device's table; direct-mapped by region, [`USE_SLOTS`] of them (a few,
    /// as for `access`, made random accesses over a few hundred MiB move every access's count
    /// to the table: GUPS ran 10-20% slower).
    uses: Box<[(u64, u32)]>,
}

/// Regions each worker keeps use counts for (1 GiB of them without two sharing a slot).
const USE_SLOTS: usize = 512;

impl Default for TlbCounters {
    fn default() -> Self {
        Self {
            hits: 0,
            misses: 0,
            walks: 0,
            invalidated: 0,
            remote_bytes: 0,
            link_owed: 0,
            access: [(0, 0); ACCESS_SLOTS],
            notices: 0,
            uses: vec![(u64::MAX, 0); USE_SLOTS].into_boxed_slice(),
        }
    }
}

/// Regions each worker counts remote accesses for at once.
const ACCESS_SLOTS: usize = 16;
/// The access counters' granularity.
const ACCESS_REGION: u64 = 2 << 20;
/// Bytes per counted access (one transaction).
const ACCESS_BYTES: u64 = 64;

impl TlbCounters {
    /// Counts the remote access of `n` bytes at `va` toward the access-counter `threshold` (0:
    /// off); returns the start of its 2 MiB region when the count reaches it (counting starts
    /// again from 0).
    #[inline]
    pub fn count_access(&mut self, va: u64, n: u64, threshold: u32) -> Option<u64> {
        if threshold == 0 {
            return None;
        }
        let region = va & !(ACCESS_REGION - 1);
        let slot = &mut self.access[(region / ACCESS_REGION) as usize % ACCESS_SLOTS];
        if slot.0 != region {
            *slot = (region, 0);
        }
        slot.1 = slot.1.saturating_add(u32::try_from(n.div_ceil(ACCESS_BYTES)).unwrap_or(u32::MAX));
        if slot.1 < threshold {
            return None;
        }
        slot.1 = 0;
        self.notices += 1;
        Some(region)
    }

    /// Counts an access of `n` bytes at `va` (local or remote) for the use counters; returns a
    /// region and the transactions to add to the device's table when they have built up to
    /// [`crate::usage::USE_FLUSH`] or when this region takes another's slot (the other's are
    /// returned then; this one's wait for a later call).
    #[inline]
    pub fn count_use(&mut self, va: u64, n: u64) -> Option<(u64, u32)> {
        use crate::usage::{USE_BYTES, USE_FLUSH, USE_REGION};
        let region = va & !(USE_REGION - 1);
        let slot = &mut self.uses[(region / USE_REGION) as usize % USE_SLOTS];
        let n = u32::try_from(n.div_ceil(USE_BYTES)).unwrap_or(u32::MAX);
        if slot.0 != region {
            let old = std::mem::replace(slot, (region, n));
            return (old.1 > 0).then_some(old);
        }
        slot.1 = slot.1.saturating_add(n);
        if slot.1 < USE_FLUSH {
            return None;
        }
        Some((region, std::mem::take(&mut slot.1)))
    }

    /// Counts a remote access of `n` bytes; returns the bytes to charge to the link now (all
    /// owed, once a batch has built up), else 0.
    #[inline]
    pub fn remote(&mut self, n: u64) -> u64 {
        self.remote_bytes += n;
        self.link_owed += n;
        if self.link_owed >= crate::link::BATCH {
            std::mem::take(&mut self.link_owed)
        } else {
            0
        }
    }
}

/// One worker's TLB.
#[derive(Debug)]
pub struct Tlb {
    small: Box<[Slot; SMALL_ENTRIES]>,
    large: Box<[Slot; LARGE_ENTRIES]>,
    /// Picks the way a fill replaces when its set is full (round robin over fills).
    clock: usize,
    /// Counters.
    pub counters: TlbCounters,
}

impl Default for Tlb {
    fn default() -> Self {
        Self::new()
    }
}

/// The slots of the set `tag` (a page-aligned VA of pages of `size`) maps to.
fn set_of(slots: &mut [Slot], tag: u64, size: u64) -> &mut [Slot] {
    let sets = slots.len() / WAYS;
    let first = ((tag / size) as usize % sets) * WAYS;
    &mut slots[first..first + WAYS]
}

impl Tlb {
    /// An empty TLB.
    pub fn new() -> Self {
        Self {
            small: Box::new([EMPTY; SMALL_ENTRIES]),
            large: Box::new([EMPTY; LARGE_ENTRIES]),
            clock: 0,
            counters: TlbCounters::default(),
        }
    }

    /// The cached translation covering `va`, if any (counts a hit or a miss).
    #[inline]
    pub fn lookup(&mut self, va: u64) -> Option<Translation> {
        for (slots, size) in [(&mut self.large[..], LARGE), (&mut self.small[..], SMALL)] {
            let tag = va & !(size - 1);
            if let Some(e) = set_of(slots, tag, size).iter().find(|e| e.tag == tag) {
                self.counters.hits += 1;
                return Some(Translation { va: tag, size, target: e.target, prot: e.prot });
            }
        }
        self.counters.misses += 1;
        None
    }

    /// Caches a translation: over an entry for the same page, else in a free way, else over
    /// the way the clock points at.
    pub fn insert(&mut self, t: &Translation) {
        let slot = Slot { tag: t.va, target: t.target, prot: t.prot };
        let (slots, size) = if t.size == LARGE { (&mut self.large[..], LARGE) } else { (&mut self.small[..], SMALL) };
        let set = set_of(slots, t.va, size);
        let way = match set.iter().position(|e| e.tag == t.va).or_else(|| set.iter().position(|e| e.tag == INVALID)) {
            Some(w) => w,
            None => {
                self.clock = self.clock.wrapping_add(1);
                self.clock % WAYS
            }
        };
        set[way] = slot;
    }

    /// Drops the entry translating `va` (after a permission miss).
    pub fn remove(&mut self, t: &Translation) {
        let (slots, size) = if t.size == LARGE { (&mut self.large[..], LARGE) } else { (&mut self.small[..], SMALL) };
        for e in set_of(slots, t.va, size) {
            clear_if(e, t.va);
        }
    }

    /// Removes every entry overlapping one of `ranges`, which must be sorted by start and
    /// non-overlapping (see [`coalesce`]). Returns how many were removed.
    pub fn invalidate(&mut self, ranges: &[VaRange]) -> u64 {
        let small_pages = ranges.iter().fold(0u64, |a, r| a.saturating_add(r.len.div_ceil(SMALL) + 1));
        let n = if small_pages <= (SMALL_ENTRIES / WAYS) as u64 / 4 {
            // Few pages: probe only the sets they index.
            let mut n = 0;
            for r in ranges {
                for (slots, size) in [(&mut self.small[..], SMALL), (&mut self.large[..], LARGE)] {
                    let mut p = r.start & !(size - 1);
                    while p < r.end() {
                        n += set_of(slots, p, size).iter_mut().map(|e| clear_if(e, p)).sum::<u64>();
                        // The last page of the address space: no next one.
                        let Some(next) = p.checked_add(size) else { break };
                        p = next;
                    }
                }
            }
            n
        } else {
            let mut n = 0;
            for (slots, size) in [(&mut self.small[..], SMALL), (&mut self.large[..], LARGE)] {
                for s in slots.iter_mut() {
                    if s.tag != INVALID && overlaps(ranges, s.tag, s.tag + size) {
                        *s = EMPTY;
                        n += 1;
                    }
                }
            }
            n
        };
        self.counters.invalidated += n;
        n
    }

    /// Removes every entry.
    pub fn flush(&mut self) -> u64 {
        let n = self.small.iter().chain(self.large.iter()).filter(|s| s.tag != INVALID).count() as u64;
        self.small.fill(EMPTY);
        self.large.fill(EMPTY);
        self.counters.invalidated += n;
        n
    }
}

/// Empties `slot` if it caches the entry starting at `tag`; returns 1 if it did.
fn clear_if(slot: &mut Slot, tag: u64) -> u64 {
    if slot.tag == tag {
        *slot = EMPTY;
        1
    } else {
        0
    }
}

/// Whether `[s, e)` overlaps one of the sorted, disjoint `ranges`.
fn overlaps(ranges: &[VaRange], s: u64, e: u64) -> bool {
    let i = ranges.partition_point(|r| r.end() <= s);
    ranges.get(i).is_some_and(|r| r.start < e)
}

/// Sorts ranges and merges overlapping or adjacent ones (empty ranges are dropped).
pub fn coalesce(ranges: &[VaRange]) -> Vec<VaRange> {
    let mut v: Vec<VaRange> = ranges.iter().copied().filter(|r| r.len > 0).collect();
    v.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<VaRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(l) if r.start <= l.end() => {
                let e = l.end().max(r.end());
                l.len = e - l.start;
            }
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_insert_invalidate() {
        let mut t = Tlb::new();
        assert!(t.lookup(0x1000).is_none());
        let small = Translation { va: 0x5000, size: SMALL, target: Target::Device(0x9000), prot: Prot::READ };
        let large = Translation { va: 0x40_0000, size: LARGE, target: Target::Host(0x7000_0000_0000), prot: Prot::RWA };
        t.insert(&small);
        t.insert(&large);
        assert_eq!(t.lookup(0x5fff), Some(small));
        assert_eq!(t.lookup(0x5ff_fff), Some(large));
        assert_eq!(t.counters.hits, 2);
        let r =
            coalesce(&[VaRange::new(0x6000, 0x1000), VaRange::new(0x10_0000, 0x1000), VaRange::new(0x5000, 0x1000)]);
        assert_eq!(r, vec![VaRange::new(0x5000, 0x2000), VaRange::new(0x10_0000, 0x1000)]);
        assert_eq!(t.invalidate(&r), 1);
        assert!(t.lookup(0x5000).is_none());
        assert!(t.lookup(0x40_0000).is_some());
        assert_eq!(t.invalidate(&[VaRange::new(0x5f_f000, 0x1000)]), 1);
        assert!(t.lookup(0x40_0000).is_none());
        t.insert(&small);
        t.remove(&small);
        assert!(t.lookup(0x5000).is_none());
        t.insert(&small);
        assert_eq!(t.flush(), 1);
        // Four pages sharing a set all stay cached; a fifth replaces one of them.
        let stride = (SMALL_ENTRIES / WAYS) as u64 * SMALL;
        let page = |k: u64| Translation {
            va: 0x100_0000 + k * stride,
            size: SMALL,
            target: Target::Device(k),
            prot: Prot::READ,
        };
        for k in 0..WAYS as u64 {
            t.insert(&page(k));
        }
        assert!((0..WAYS as u64).all(|k| t.lookup(page(k).va) == Some(page(k))));
        t.insert(&page(WAYS as u64));
        assert_eq!(t.lookup(page(WAYS as u64).va), Some(page(WAYS as u64)));
        assert_eq!((0..WAYS as u64).filter(|k| t.lookup(page(*k).va).is_some()).count(), WAYS - 1);
        t.flush();
        // Large invalidations scan every slot.
        for i in 0..1000u64 {
            t.insert(&Translation { va: i * SMALL, size: SMALL, target: Target::Device(0), prot: Prot::READ });
        }
        t.insert(&large);
        assert_eq!(t.invalidate(&[VaRange::new(0, 1 << 30)]), SMALL_ENTRIES as u64 + 1);
        assert!(t.lookup(999 * SMALL).is_none());
    }
}
