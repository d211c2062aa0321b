//! The logical page table: one [`Block`] per 2 MiB of a shared region, holding per-page
//! residency sets, CPU and device mapping state, and the device physical pages. Every state
//! change of a page happens here, under the block's lock (held by the caller).

use crate::device::PhysAddr;
use crate::types::{DeviceId, Proc, ProcMask, PAGES_PER_BLOCK, PAGE_SIZE};

/// A set of pages of one block (512 bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageMask(pub [u64; PAGES_PER_BLOCK / 64]);

impl PageMask {
    /// Every page.
    pub fn full(npages: usize) -> Self {
        let mut m = PageMask::default();
        m.set_range(0, npages);
        m
    }
    /// Whether page `i` is set.
    pub fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    /// Sets page `i`.
    pub fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    /// Clears page `i`.
    pub fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    /// Sets pages `[start, end)`.
    pub fn set_range(&mut self, start: usize, end: usize) {
        for (w, word) in self.0.iter_mut().enumerate() {
            *word |= word_range(w, start, end);
        }
    }
    /// Number of pages set.
    pub fn count(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
    /// Number of pages set in `[start, end)`.
    pub fn count_range(&self, start: usize, end: usize) -> usize {
        self.0.iter().enumerate().map(|(w, &word)| (word & word_range(w, start, end)).count_ones() as usize).sum()
    }
    /// Whether no page is set.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }
    /// Union.
    pub fn or(&self, o: &PageMask) -> PageMask {
        let mut r = *self;
        r.0.iter_mut().zip(o.0).for_each(|(a, b)| *a |= b);
        r
    }
    /// Intersection.
    pub fn and(&self, o: &PageMask) -> PageMask {
        let mut r = *self;
        r.0.iter_mut().zip(o.0).for_each(|(a, b)| *a &= b);
        r
    }
    /// Difference `self \ o`.
    pub fn and_not(&self, o: &PageMask) -> PageMask {
        let mut r = *self;
        r.0.iter_mut().zip(o.0).for_each(|(a, b)| *a &= !b);
        r
    }
    /// Indices set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        // Word by word, set bits only: the core walks masks of 512 pages on every hot path.
        self.0.iter().enumerate().flat_map(|(w, &bits)| {
            let mut bits = bits;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let i = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(w * 64 + i)
            })
        })
    }
    /// Maximal runs `[start, end)` of set pages.
    pub fn runs(&self) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < PAGES_PER_BLOCK {
            let rest = self.0[i / 64] >> (i % 64);
            if rest == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            i += rest.trailing_zeros() as usize;
            // The run from `i`: whole words of ones, then the ones at the start of the next.
            let start = i;
            while i < PAGES_PER_BLOCK {
                let ones = (self.0[i / 64] >> (i % 64)).trailing_ones() as usize;
                i += ones;
                if i % 64 != 0 || ones == 0 {
                    break;
                }
            }
            out.push((start, i));
        }
        out
    }
}

/// The bits of word `w` of a [`PageMask`] that pages `[start, end)` cover.
fn word_range(w: usize, start: usize, end: usize) -> u64 {
    let lo = start.max(w * 64).saturating_sub(w * 64);
    let hi = end.min(w * 64 + 64).saturating_sub(w * 64);
    match hi.saturating_sub(lo) {
        0 => 0,
        64 => u64::MAX,
        n => ((1u64 << n) - 1) << lo,
    }
}

/// How the CPU maps a page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuMap {
    /// No CPU mapping: an access faults.
    #[default]
    None,
    /// Mapped read-only (write-protected).
    Read,
    /// Mapped read-write.
    Write,
}

/// State of one base page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// Processors holding a valid copy (CPU: the host backing page). Empty: never written (reads
    /// as zeros).
    pub resident: ProcMask,
    /// CPU mapping.
    pub cpu: CpuMap,
    /// Devices whose page table maps the page: to their own copy if `resident` has them, else
    /// remotely to the host backing.
    pub dev_mapped: ProcMask,
    /// Devices (a subset of `dev_mapped`) whose mapping is read-only.
    pub dev_ro: ProcMask,
    /// Devices (a subset of `dev_mapped`, holding no copy) whose mapping reaches another device's
    /// copy through its peer window. Such a mapping is removed before the page's holders change
    /// (`migrate::unmap_peer_maps`), so the memory it reaches is never freed or moved under it.
    pub peer_mapped: ProcMask,
}

impl Page {
    /// A page never touched: no copy anywhere (reads as zeros), mapped nowhere.
    pub const UNTOUCHED: Page = Page {
        resident: ProcMask::EMPTY,
        cpu: CpuMap::None,
        dev_mapped: ProcMask::EMPTY,
        dev_ro: ProcMask::EMPTY,
        peer_mapped: ProcMask::EMPTY,
    };
}

/// What every page of a block reads as before its state is first changed.
static UNTOUCHED: [Page; PAGES_PER_BLOCK] = [Page::UNTOUCHED; PAGES_PER_BLOCK];

/// The per-page state of a block, a slice of [`Page`]s. It is made only when a page is first
/// written to (through `DerefMut`); until then every page reads as [`Page::UNTOUCHED`]. Page
/// state is 40 bytes per 4 KiB page, so made up front it cost 1% of every allocation's size in
/// the allocating call (160 MiB and 40-130 ms for 16 GiB), however little of it was used; UVM
/// also makes its blocks' state only when a block is first used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pages {
    /// How many pages the block has.
    n: usize,
    /// Their state, once one has changed.
    made: Option<Box<[Page]>>,
}

impl Pages {
    /// `n` untouched pages (at most a block's).
    pub fn untouched(n: usize) -> Self {
        debug_assert!(n <= PAGES_PER_BLOCK, "{n} pages in one block");
        Pages { n: n.min(PAGES_PER_BLOCK), made: None }
    }

    /// Whether any page's state was ever changed (made). A block whose state was never made
    /// has nothing to undo, forget or copy.
    pub fn is_made(&self) -> bool {
        self.made.is_some()
    }

    /// Each page's state through `f`, which must keep an untouched page untouched: a state
    /// never made stays unmade.
    pub fn map(&self, f: impl Fn(&Page) -> Page) -> Pages {
        debug_assert_eq!(f(&Page::UNTOUCHED), Page::UNTOUCHED, "an untouched page changed");
        Pages { n: self.n, made: self.made.as_ref().map(|v| v.iter().map(f).collect()) }
    }
}

impl std::ops::Deref for Pages {
    type Target = [Page];

    fn deref(&self) -> &[Page] {
        match &self.made {
            Some(v) => v,
            None => &UNTOUCHED[..self.n],
        }
    }
}

impl<'a> IntoIterator for &'a Pages {
    type Item = &'a Page;
    type IntoIter = std::slice::Iter<'a, Page>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl std::ops::DerefMut for Pages {
    /// Makes the state: any access through `&mut` may change it.
    fn deref_mut(&mut self) -> &mut [Page] {
        let n = self.n;
        self.made.get_or_insert_with(|| vec![Page::UNTOUCHED; n].into_boxed_slice())
    }
}

/// One 2 MiB block of a region.
#[derive(Debug)]
pub struct Block {
    /// Virtual address of page 0.
    pub base: u64,
    /// Pages in this block (512, or fewer at a region's end).
    pub npages: usize,
    /// Per-page state (made on its first change).
    pub pages: Pages,
    /// Device physical page of each page, per device that holds pages here.
    dev_pa: Vec<(DeviceId, Box<[u64]>)>,
    /// The 2 MiB chunk the block last had on each device: taken again when free, so a device
    /// that caches its mappings (CUDA) maps nothing anew.
    prev_chunk: Vec<(DeviceId, PhysAddr)>,
    /// Devices whose eviction queue holds this block.
    pub queued_on: ProcMask,
    /// For each device that used the block: when it last touched it (fault service or sampled
    /// accessed bits, as ticks of the address space's clock; for LRU eviction) and how hot the
    /// block is there (its access counters; for the thrashing response). A short list, not an
    /// array for every possible device (an array of four lost devices 4 and up).
    uses: Vec<DeviceUse>,
    /// Devices for which this block is served by remote mappings because it thrashed.
    pub thrashing: ProcMask,
    /// Jobs (launches) now using the block, and whether a finished job used it last.
    pub active_jobs: u32,
    /// A finished job used the block and no job uses it now: evict it first.
    pub job_done: bool,
    /// When a device last took pages of the block ([`Block::taken_by`]): a speculative move
    /// asked for before then (the CPU read-ahead) leaves the block where the newer placement put
    /// it.
    taken: u64,
    /// The jobs counted in `active_jobs`, by id (one entry per count): a job's end takes only
    /// its own count, never that of a later job on new memory at the same addresses.
    pub job_ids: Vec<u64>,
    /// Launches getting ready to use the block (migrating their buffers, then launching), one
    /// entry per launch naming the thread preparing it: a device that cannot fault must not
    /// lose the block meanwhile.
    pub launching: Vec<std::thread::ThreadId>,
    /// Pages a service in progress is working on: never evicted to make room for the same
    /// service.
    pub busy: PageMask,
}

const NO_PA: u64 = u64::MAX;

/// One device's pages of a block, looked up once for a walk over many pages
/// ([`Block::pas`]).
#[derive(Clone, Copy, Debug)]
pub struct DevicePages<'a>(&'a [u64]);

impl DevicePages<'_> {
    /// The device page of page `i`, if the device holds one.
    pub fn get(&self, i: usize) -> Option<PhysAddr> {
        self.0.get(i).copied().filter(|&pa| pa != NO_PA).map(PhysAddr)
    }
}

/// How fast a block's heat fades: half of it per second. Long beside a kernel's passes over its
/// data (tens of milliseconds here), so blocks read once per pass stay about as hot as each
/// other whenever they are compared; short enough that a block used heavily a while ago does not
/// keep its place for long.
pub const HEAT_HALF_LIFE_NS: u64 = 1_000_000_000;

/// One device's use of a block (see [`Block::touch`], [`Block::add_heat`]).
#[derive(Clone, Copy, Debug)]
struct DeviceUse {
    dev: DeviceId,
    touched: u64,
    heat: Heat,
    /// Ticks when the device last evicted the block (0: not since it last came back).
    last_evicted: u64,
    /// The device's consecutive evict-and-refault cycles of the block. Per device: one
    /// device's evictions followed by another's first touch counted as thrashing on the
    /// second, which had evicted nothing (found by an audit).
    refaults: u32,
}

/// One device's heat of a block (see [`Block::add_heat`]).
#[derive(Clone, Copy, Debug, Default)]
struct Heat {
    /// Accesses, decayed to `at`.
    value: f64,
    /// Ticks of the last update.
    at: u64,
}

impl Block {
    /// Runs `f` with `busy` marked as the pages an operation in progress works on, and
    /// clears the mark afterwards, also when `f` panics (a driver bug the fault service catches
    /// and goes on from): left set, it narrowed later revokes and allocations of the block (found
    /// by an audit).
    pub(crate) fn while_busy<R>(&mut self, busy: PageMask, f: impl FnOnce(&mut Block) -> R) -> R {
        self.busy = busy;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        self.busy = PageMask::default();
        r.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// A block of `npages` untouched pages at `base`.
    pub fn new(base: u64, npages: usize) -> Self {
        Block {
            base,
            npages,
            pages: Pages::untouched(npages),
            dev_pa: Vec::new(),
            prev_chunk: Vec::new(),
            queued_on: ProcMask::EMPTY,
            uses: Vec::new(),
            thrashing: ProcMask::EMPTY,
            active_jobs: 0,
            job_done: false,
            taken: 0,
            job_ids: Vec::new(),
            launching: Vec::new(),
            busy: PageMask::default(),
        }
    }

    /// Virtual address of page `i`.
    pub fn va(&self, i: usize) -> u64 {
        self.base + i as u64 * PAGE_SIZE
    }

    /// Device physical address of page `i` on `dev`, if it holds one.
    pub fn pa(&self, dev: DeviceId, i: usize) -> Option<PhysAddr> {
        self.pas(dev)?.get(i)
    }

    /// The device page of every page on `dev` (`None` per page where it holds none), if it holds
    /// any page here.
    pub fn pas(&self, dev: DeviceId) -> Option<DevicePages<'_>> {
        self.dev_pa.iter().find(|(d, _)| *d == dev).map(|(_, v)| DevicePages(v))
    }

    /// Records the device page of page `i`.
    pub fn set_pa(&mut self, dev: DeviceId, i: usize, pa: Option<PhysAddr>) {
        self.pas_mut(dev)[i] = pa.map_or(NO_PA, |p| p.0);
    }

    /// Records device pages for many pages at once: `(page, device page)` pairs.
    pub fn set_pas(&mut self, dev: DeviceId, pas: impl IntoIterator<Item = (usize, PhysAddr)>) {
        let v = self.pas_mut(dev);
        for (i, pa) in pas {
            v[i] = pa.0;
        }
    }

    /// The 2 MiB chunk the block last had on `dev`, if it had one.
    pub fn prev_chunk(&self, dev: DeviceId) -> Option<PhysAddr> {
        self.prev_chunk.iter().find(|(d, _)| *d == dev).map(|(_, pa)| *pa)
    }

    /// Forgets the device pages of `m` on `dev`, returning them as runs `(first device page,
    /// pages)` of consecutive device memory. A run that starts where the block's first page
    /// starts in a 2 MiB chunk (the chunk's start, unless the block starts inside its 2 MiB
    /// window) is remembered as the block's previous chunk there.
    pub fn take_pas(&mut self, dev: DeviceId, m: &PageMask) -> Vec<(PhysAddr, u64)> {
        let mut runs: Vec<(PhysAddr, u64)> = Vec::new();
        let Some((_, v)) = self.dev_pa.iter_mut().find(|(d, _)| *d == dev) else { return runs };
        for i in m.iter() {
            let pa = std::mem::replace(&mut v[i], NO_PA);
            if pa == NO_PA {
                continue;
            }
            match runs.last_mut() {
                Some((s, n)) if s.0 + *n * crate::types::PAGE_SIZE == pa => *n += 1,
                _ => runs.push((PhysAddr(pa), 1)),
            }
        }
        let block = crate::types::BLOCK_SIZE;
        if let Some(&(first, _)) = runs.first().filter(|(pa, _)| pa.0 % block == self.base % block) {
            let first = PhysAddr(first.0 - first.0 % block);
            match self.prev_chunk.iter_mut().find(|(d, _)| *d == dev) {
                Some(e) => e.1 = first,
                None => self.prev_chunk.push((dev, first)),
            }
        }
        runs
    }

    fn pas_mut(&mut self, dev: DeviceId) -> &mut [u64] {
        let idx = match self.dev_pa.iter().position(|(d, _)| *d == dev) {
            Some(idx) => idx,
            None => {
                self.dev_pa.push((dev, vec![NO_PA; self.npages].into_boxed_slice()));
                self.dev_pa.len() - 1
            }
        };
        &mut self.dev_pa[idx].1
    }

    /// Forgets every trace of device `d` once it is detached (its copies already brought home,
    /// its page table gone): its mappings, local or remote, its place in its eviction queue, its
    /// thrashing state, its touch time and its previous chunk. A device attached later may get
    /// the same id, and must not inherit any of them: a stale mapping bit made every later
    /// migration of the page ask the detached device to unmap it, and fail.
    pub fn forget_device(&mut self, d: DeviceId) {
        let me = Proc::Device(d);
        let pages: &mut [Page] = if self.pages.is_made() { &mut self.pages } else { &mut [] };
        for p in pages {
            p.dev_mapped.remove(me);
            p.dev_ro.remove(me);
            p.peer_mapped.remove(me);
        }
        self.queued_on.remove(me);
        self.thrashing.remove(me);
        self.uses.retain(|u| u.dev != d);
        self.prev_chunk.retain(|(x, _)| *x != d);
        self.dev_pa.retain(|(x, _)| *x != d);
    }

    /// The block now lives at `base` (the program moved it by a multiple of 2 MiB): its device
    /// copies stay; every device mapping of it was removed at the old addresses. Launches and
    /// jobs named the old addresses, so none holds it any more.
    pub fn moved_to(&mut self, base: u64) {
        debug_assert!(self.pages.iter().all(|p| p.dev_mapped.is_empty()), "a carried block is still mapped");
        self.base = base;
        self.launching.clear();
        self.active_jobs = 0;
        self.job_ids.clear();
    }

    /// Records that device `d` touched the block at `tick`.
    pub fn touch(&mut self, d: crate::types::DeviceId, tick: u64) {
        self.use_by(d).touched = tick;
    }

    /// Device `d`'s entry in [`Block::uses`], made if it has none.
    fn use_by(&mut self, d: DeviceId) -> &mut DeviceUse {
        let k = match self.uses.iter().position(|u| u.dev == d) {
            Some(k) => k,
            None => {
                self.uses.push(DeviceUse { dev: d, touched: 0, heat: Heat::default(), last_evicted: 0, refaults: 0 });
                self.uses.len() - 1
            }
        };
        &mut self.uses[k]
    }

    /// Adds `accesses` counted by device `d`'s access counters up to `tick` to the block's heat
    /// on `d`, and returns the heat: accesses, each weighing half as much for every
    /// [`HEAT_HALF_LIFE_NS`] since it was counted.
    pub fn add_heat(&mut self, d: crate::types::DeviceId, tick: u64, accesses: u64) -> f64 {
        let h = &mut self.use_by(d).heat;
        let age = tick.saturating_sub(h.at) as f64 / HEAT_HALF_LIFE_NS as f64;
        h.value = h.value * (-age).exp2() + accesses as f64;
        h.at = h.at.max(tick);
        h.value
    }

    /// Device `d` evicted the block at `tick`.
    pub fn evicted_by(&mut self, d: DeviceId, tick: u64) {
        self.use_by(d).last_evicted = tick;
    }

    /// Device `d` takes the block back at `now`. If it evicted the block less than `window`
    /// before, that is one more evict-and-refault cycle there: returns their count. One that
    /// comes back later starts the count again.
    pub fn refaulted(&mut self, d: DeviceId, now: u64, window: u64) -> Option<u32> {
        let u = self.use_by(d);
        let last = std::mem::take(&mut u.last_evicted);
        if last == 0 {
            return None;
        }
        if now.saturating_sub(last) < window {
            u.refaults = u.refaults.saturating_add(1);
            Some(u.refaults)
        } else {
            u.refaults = 0;
            None
        }
    }

    /// Device `d`'s consecutive evict-and-refault cycles of the block.
    pub fn refaults(&self, d: DeviceId) -> u32 {
        self.uses.iter().find(|u| u.dev == d).map_or(0, |u| u.refaults)
    }

    /// Sets device `d`'s eviction history of the block (tests).
    #[cfg(test)]
    pub(crate) fn set_refaults(&mut self, d: DeviceId, refaults: u32, last_evicted: u64) {
        let u = self.use_by(d);
        (u.refaults, u.last_evicted) = (refaults, last_evicted);
    }

    /// Records that device `d` took pages of the block at `tick` (a fault served, a migration or
    /// a prefetch), which is also a touch.
    pub fn taken_by(&mut self, d: DeviceId, tick: u64) {
        self.touch(d, tick);
        self.taken = self.taken.max(tick);
    }

    /// When a device last took pages of the block ([`Block::taken_by`]; 0: none has).
    pub fn last_taken(&self) -> u64 {
        self.taken
    }

    /// When device `d` last touched the block.
    pub fn touched_by(&self, d: crate::types::DeviceId) -> u64 {
        self.uses.iter().find(|u| u.dev == d).map_or(0, |u| u.touched)
    }

    /// Pages mapped by device `p` (locally or remotely).
    pub fn mapped_on(&self, p: Proc) -> PageMask {
        let mut m = PageMask::default();
        for (i, pg) in self.pages.iter().enumerate() {
            if pg.dev_mapped.has(p) {
                m.set(i);
            }
        }
        m
    }

    /// Pages resident on `p`.
    pub fn resident_on(&self, p: Proc) -> PageMask {
        let mut m = PageMask::default();
        for (i, pg) in self.pages.iter().enumerate() {
            if pg.resident.has(p) {
                m.set(i);
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every device's recency and heat are kept, whatever its id (an array of four dropped
    /// those of devices 4 and up, so LRU eviction and the thrashing response did not see their
    /// use; found by an audit), and a detached device's are forgotten.
    #[test]
    fn recency_and_heat_are_kept_for_any_device() {
        let mut b = Block::new(0, 512);
        for (d, tick) in [(0u8, 5u64), (4, 7), (62, 9)] {
            b.touch(DeviceId(d), tick);
            assert_eq!(b.touched_by(DeviceId(d)), tick);
            assert_eq!(b.add_heat(DeviceId(d), tick, 10), 10.0);
        }
        assert_eq!(b.touched_by(DeviceId(3)), 0);
        b.forget_device(DeviceId(4));
        assert_eq!(b.touched_by(DeviceId(4)), 0);
        assert_eq!(b.add_heat(DeviceId(4), 7, 1), 1.0, "its heat starts again");
        assert_eq!(b.touched_by(DeviceId(62)), 9);
    }

    /// A block's page state reads as untouched until something is written through `&mut`,
    /// which makes it; what was written is kept, and `map` keeps an unmade state unmade.
    #[test]
    fn page_state_is_made_on_its_first_change() {
        let mut b = Block::new(0x20_0000, 7);
        assert!(!b.pages.is_made());
        assert_eq!(b.pages.len(), 7);
        assert!(b.pages.iter().all(|p| *p == Page::UNTOUCHED && *p == Page::default()));
        assert_eq!(b.resident_on(Proc::Cpu).count(), 0);
        let mapped = b.pages.map(|p| *p);
        assert!(!mapped.is_made());
        b.pages[3].resident = ProcMask::only(Proc::Cpu);
        assert!(b.pages.is_made());
        assert_eq!(b.pages.len(), 7);
        assert_eq!(b.resident_on(Proc::Cpu).runs(), vec![(3, 4)]);
        let copied = b.pages.map(|p| Page { cpu: if p.resident.is_empty() { p.cpu } else { CpuMap::Read }, ..*p });
        assert!(copied.is_made() && copied[3].cpu == CpuMap::Read && copied[3].resident.has(Proc::Cpu));
    }

    #[test]
    fn mask_ops() {
        let mut m = PageMask::default();
        m.set_range(3, 7);
        m.set(100);
        assert_eq!(m.count(), 5);
        assert_eq!(m.runs(), vec![(3, 7), (100, 101)]);
        assert_eq!(m.count_range(0, 5), 2);
        let f = PageMask::full(512);
        assert_eq!(f.and_not(&m).count(), 507);
    }

    proptest::proptest! {
        /// The word-wise mask operations against page-by-page ones.
        #[test]
        fn mask_ops_match_page_by_page(
            ranges in proptest::collection::vec((0usize..=512, 0usize..=512), 0..6),
            pages in proptest::collection::vec(0usize..512, 0..40),
            (a, b) in (0usize..=512, 0usize..=512),
        ) {
            let mut m = PageMask::default();
            let mut want = [false; 512];
            for (s, e) in ranges {
                m.set_range(s, e);
                (s..e.max(s)).for_each(|i| want[i] = true);
            }
            for i in pages {
                m.set(i);
                want[i] = true;
            }
            let set: Vec<usize> = (0..512).filter(|&i| want[i]).collect();
            proptest::prop_assert_eq!(m.iter().collect::<Vec<_>>(), set.clone());
            let mut runs: Vec<(usize, usize)> = Vec::new();
            for i in set {
                match runs.last_mut() {
                    Some((_, e)) if *e == i => *e += 1,
                    _ => runs.push((i, i + 1)),
                }
            }
            proptest::prop_assert_eq!(m.runs(), runs);
            proptest::prop_assert_eq!(m.count_range(a, b), (a..b.max(a)).filter(|&i| want[i]).count());
        }
    }

    #[test]
    fn pa_table() {
        let mut b = Block::new(0x20_0000, 512);
        let d = DeviceId(1);
        assert_eq!(b.pa(d, 5), None);
        b.set_pa(d, 5, Some(PhysAddr(0x3000)));
        assert_eq!(b.pa(d, 5), Some(PhysAddr(0x3000)));
        b.set_pa(d, 5, None);
        assert_eq!(b.pa(d, 5), None);
        assert_eq!(b.va(2), 0x20_2000);
    }
}
