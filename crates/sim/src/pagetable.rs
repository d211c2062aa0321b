//! The device's page table: its own radix format, 4 levels of 512 entries for 48-bit virtual
//! addresses. A level-1 leaf maps 2 MiB, a level-0 leaf maps 4 KiB.
//!
//! A leaf is one `u64`: the target address (page aligned) in bits 12..64 and flags below:
//! valid, read, write, atomic, accessed, and whether the target is host memory (the aperture)
//! rather than device memory. The accessed bit is set by walks (TLB fills) with an atomic OR,
//! so walks only need shared access to the table; changes to the structure need exclusive
//! access (the device holds the table in a reader-writer lock).

use std::sync::atomic::{AtomicU64, Ordering};

use hetmm_core::types::{Prot, VaRange};

/// Bits of virtual address the table translates.
pub const VA_BITS: u32 = 48;
/// One past the highest translatable virtual address.
pub const VA_LIMIT: u64 = 1 << VA_BITS;
const LEVELS: u32 = 4;
const ENTRIES: usize = 512;
const SMALL: u64 = 1 << 12;
const LARGE: u64 = 1 << 21;

const F_VALID: u64 = 1 << 0;
const F_READ: u64 = 1 << 1;
const F_WRITE: u64 = 1 << 2;
const F_ATOMIC: u64 = 1 << 3;
const F_ACCESSED: u64 = 1 << 4;
const F_HOST: u64 = 1 << 5;
const F_PROT: u64 = F_READ | F_WRITE | F_ATOMIC;
const ADDR_MASK: u64 = !(SMALL - 1);

/// Where a leaf points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Device physical address.
    Device(u64),
    /// Host address (through the system-memory aperture).
    Host(u64),
}

impl Target {
    /// The address, whatever the kind.
    pub fn addr(self) -> u64 {
        match self {
            Target::Device(a) | Target::Host(a) => a,
        }
    }
    /// The same kind of target `off` bytes further.
    pub fn offset(self, off: u64) -> Target {
        match self {
            Target::Device(a) => Target::Device(a + off),
            Target::Host(a) => Target::Host(a + off),
        }
    }
}

/// A translation found by a walk: the leaf's whole extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// First virtual address the leaf maps.
    pub va: u64,
    /// Bytes it maps (4 KiB or 2 MiB).
    pub size: u64,
    /// Where `va` lands.
    pub target: Target,
    /// Permissions.
    pub prot: Prot,
}

fn prot_bits(p: Prot) -> u64 {
    let mut b = 0;
    if p.contains(Prot::READ) {
        b |= F_READ;
    }
    if p.contains(Prot::WRITE) {
        b |= F_WRITE;
    }
    if p.contains(Prot::ATOMIC) {
        b |= F_ATOMIC;
    }
    b
}

fn bits_prot(b: u64) -> Prot {
    let mut p = Prot::empty();
    if b & F_READ != 0 {
        p |= Prot::READ;
    }
    if b & F_WRITE != 0 {
        p |= Prot::WRITE;
    }
    if b & F_ATOMIC != 0 {
        p |= Prot::ATOMIC;
    }
    p
}

fn leaf_bits(target: Target, prot: Prot) -> u64 {
    let host = matches!(target, Target::Host(_));
    (target.addr() & ADDR_MASK) | F_VALID | prot_bits(prot) | if host { F_HOST } else { 0 }
}

fn leaf_target(bits: u64) -> Target {
    let a = bits & ADDR_MASK;
    if bits & F_HOST != 0 {
        Target::Host(a)
    } else {
        Target::Device(a)
    }
}

#[derive(Debug)]
enum Entry {
    Empty,
    Table(Box<[Entry]>),
    Leaf(AtomicU64),
}

fn new_node() -> Box<[Entry]> {
    (0..ENTRIES).map(|_| Entry::Empty).collect()
}

/// Bytes one entry at `level` spans.
const fn span(level: u32) -> u64 {
    1 << (12 + 9 * level)
}

const fn index(va: u64, level: u32) -> usize {
    ((va >> (12 + 9 * level)) & (ENTRIES as u64 - 1)) as usize
}

/// Counts of what the table holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// 4 KiB leaves.
    pub small: u64,
    /// 2 MiB leaves.
    pub large: u64,
    /// Table nodes (the root included).
    pub tables: u64,
}

/// A device page table.
#[derive(Debug)]
pub struct PageTable {
    root: Box<[Entry]>,
}

impl Default for PageTable {
    fn default() -> Self {
        Self::new()
    }
}

impl PageTable {
    /// An empty table.
    pub fn new() -> Self {
        Self { root: new_node() }
    }

    /// Maps `[va, va + len)` to `target..` with `prot`. The range must be page aligned and below
    /// [`VA_LIMIT`] and the target page aligned (the caller validates). Uses 2 MiB leaves where
    /// the virtual and target addresses are 2 MiB aligned and the run covers 2 MiB.
    pub fn map(&mut self, va: u64, len: u64, target: Target, prot: Prot) {
        if len == 0 {
            return;
        }
        let delta = target.addr().wrapping_sub(va);
        let host = matches!(target, Target::Host(_));
        let mk = |v: u64| {
            let a = v.wrapping_add(delta);
            leaf_bits(if host { Target::Host(a) } else { Target::Device(a) }, prot)
        };
        map_rec(&mut self.root, LEVELS - 1, 0, va, va + len, &mk);
    }

    /// Removes the mappings in `range` (splitting 2 MiB leaves partly covered).
    pub fn unmap(&mut self, range: VaRange) {
        if range.len > 0 {
            unmap_rec(&mut self.root, LEVELS - 1, 0, range.start, range.end());
        }
    }

    /// Sets the permissions of the mappings present in `range` (absent ones are skipped).
    pub fn protect(&mut self, range: VaRange, prot: Prot) {
        if range.len > 0 {
            protect_rec(&mut self.root, LEVELS - 1, 0, range.start, range.end(), prot_bits(prot));
        }
    }

    /// Walks the table for `va`, setting the leaf's accessed bit.
    pub fn walk(&self, va: u64) -> Option<Translation> {
        self.lookup(va, true)
    }

    /// Looks up `va` without touching the accessed bit.
    pub fn translate(&self, va: u64) -> Option<Translation> {
        self.lookup(va, false)
    }

    fn lookup(&self, va: u64, touch: bool) -> Option<Translation> {
        if va >= VA_LIMIT {
            return None;
        }
        let mut node = &self.root;
        let mut level = LEVELS - 1;
        loop {
            match &node[index(va, level)] {
                Entry::Empty => return None,
                Entry::Table(t) => {
                    if level == 0 {
                        return None;
                    }
                    node = t;
                    level -= 1;
                }
                Entry::Leaf(a) => {
                    let bits = if touch {
                        // Only write when the bit is clear: keeps the line shared on hot walks.
                        let b = a.load(Ordering::Relaxed);
                        if b & F_ACCESSED == 0 {
                            a.fetch_or(F_ACCESSED, Ordering::Relaxed) | F_ACCESSED
                        } else {
                            b
                        }
                    } else {
                        a.load(Ordering::Relaxed)
                    };
                    let size = span(level);
                    return Some(Translation {
                        va: va & !(size - 1),
                        size,
                        target: leaf_target(bits),
                        prot: bits_prot(bits),
                    });
                }
            }
        }
    }

    /// Collects and clears the accessed bits in `range`: the base-page addresses (inside
    /// `range`) of every leaf whose bit was set.
    pub fn take_accessed(&self, range: VaRange) -> Vec<u64> {
        let mut out = Vec::new();
        if range.len > 0 {
            accessed_rec(&self.root, LEVELS - 1, 0, range.start, range.end().min(VA_LIMIT), &mut out);
        }
        out
    }

    /// Counts leaves and tables.
    pub fn census(&self) -> Census {
        let mut c = Census { tables: 1, ..Census::default() };
        census_rec(&self.root, LEVELS - 1, &mut c);
        c
    }
}

/// Replaces a 2 MiB leaf by a table of 512 4 KiB leaves with the same targets and flags.
fn split(e: &mut Entry) {
    if let Entry::Leaf(a) = e {
        let bits = a.load(Ordering::Relaxed);
        let base = bits & ADDR_MASK;
        let flags = bits & !ADDR_MASK;
        let node: Box<[Entry]> =
            (0..ENTRIES as u64).map(|i| Entry::Leaf(AtomicU64::new((base + i * SMALL) | flags))).collect();
        *e = Entry::Table(node);
    }
}

fn is_empty(node: &[Entry]) -> bool {
    node.iter().all(|e| matches!(e, Entry::Empty))
}

/// Visits the entries of `node` (at `level`, mapping from `base`) overlapping `[start, end)`,
/// with each entry's covered sub-range.
fn for_each<'a>(
    node: &'a mut [Entry],
    level: u32,
    base: u64,
    start: u64,
    end: u64,
    mut f: impl FnMut(&'a mut Entry, u64, u64, u64),
) {
    let sp = span(level);
    let first = ((start.max(base) - base) / sp) as usize;
    let last = ((end - 1 - base) / sp).min(ENTRIES as u64 - 1) as usize;
    for (i, e) in node.iter_mut().enumerate().take(last + 1).skip(first) {
        let e_va = base + i as u64 * sp;
        let s = start.max(e_va);
        let t = end.min(e_va + sp);
        f(e, e_va, s, t);
    }
}

fn map_rec(node: &mut [Entry], level: u32, base: u64, start: u64, end: u64, mk: &dyn Fn(u64) -> u64) {
    let sp = span(level);
    for_each(node, level, base, start, end, |e, e_va, s, t| {
        let whole = s == e_va && t == e_va + sp;
        let leaf_here = level == 0 || (level == 1 && whole && mk(s) & ADDR_MASK & (LARGE - 1) == 0);
        if leaf_here {
            *e = Entry::Leaf(AtomicU64::new(mk(s)));
        } else {
            match e {
                Entry::Empty => *e = Entry::Table(new_node()),
                Entry::Leaf(_) => split(e),
                Entry::Table(_) => {}
            }
            if let Entry::Table(t_) = e {
                map_rec(t_, level - 1, e_va, s, t, mk);
            }
        }
    });
}

fn unmap_rec(node: &mut [Entry], level: u32, base: u64, start: u64, end: u64) {
    let sp = span(level);
    for_each(node, level, base, start, end, |e, e_va, s, t| {
        let whole = s == e_va && t == e_va + sp;
        if matches!(e, Entry::Empty) {
            return;
        }
        if whole || level == 0 {
            *e = Entry::Empty;
            return;
        }
        split(e);
        if let Entry::Table(n) = e {
            unmap_rec(n, level - 1, e_va, s, t);
            if is_empty(n) {
                *e = Entry::Empty;
            }
        }
    });
}

fn protect_rec(node: &mut [Entry], level: u32, base: u64, start: u64, end: u64, prot: u64) {
    let sp = span(level);
    for_each(node, level, base, start, end, |e, e_va, s, t| {
        let whole = s == e_va && t == e_va + sp;
        match e {
            Entry::Empty => {}
            Entry::Leaf(a) if whole || level == 0 => {
                let b = a.load(Ordering::Relaxed);
                a.store((b & !F_PROT) | prot, Ordering::Relaxed);
            }
            _ => {
                split(e);
                if let Entry::Table(n) = e {
                    protect_rec(n, level - 1, e_va, s, t, prot);
                }
            }
        }
    });
}

fn accessed_rec(node: &[Entry], level: u32, base: u64, start: u64, end: u64, out: &mut Vec<u64>) {
    if start >= end {
        return;
    }
    let sp = span(level);
    let first = ((start.max(base) - base) / sp) as usize;
    let last = ((end - 1 - base) / sp).min(ENTRIES as u64 - 1) as usize;
    for (i, e) in node.iter().enumerate().take(last + 1).skip(first) {
        let e_va = base + i as u64 * sp;
        let s = start.max(e_va);
        let t = end.min(e_va + sp);
        match e {
            Entry::Empty => {}
            Entry::Table(n) => {
                if level > 0 {
                    accessed_rec(n, level - 1, e_va, s, t, out);
                }
            }
            Entry::Leaf(a) => {
                if a.load(Ordering::Relaxed) & F_ACCESSED != 0
                    && a.fetch_and(!F_ACCESSED, Ordering::Relaxed) & F_ACCESSED != 0
                {
                    let mut p = s & !(SMALL - 1);
                    while p < t {
                        out.push(p);
                        p += SMALL;
                    }
                }
            }
        }
    }
}

fn census_rec(node: &[Entry], level: u32, c: &mut Census) {
    for e in node {
        match e {
            Entry::Empty => {}
            Entry::Table(n) => {
                c.tables += 1;
                if level > 0 {
                    census_rec(n, level - 1, c);
                }
            }
            Entry::Leaf(_) if level == 0 => c.small += 1,
            Entry::Leaf(_) => c.large += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB2: u64 = 2 << 20;

    #[test]
    fn map_small_and_large() {
        let mut pt = PageTable::new();
        // 4 KiB run, not 2 MiB aligned.
        pt.map(0x1000, 3 * SMALL, Target::Device(0x5000), Prot::READ);
        // A 2 MiB aligned run covering two large pages plus a tail.
        pt.map(0x4000_0000, 2 * MB2 + SMALL, Target::Device(MB2 * 4), Prot::RWA);
        let c = pt.census();
        assert_eq!(c.small, 3 + 1);
        assert_eq!(c.large, 2);

        let t = pt.translate(0x2abc).unwrap();
        assert_eq!(t, Translation { va: 0x2000, size: SMALL, target: Target::Device(0x6000), prot: Prot::READ });
        let t = pt.translate(0x4000_0000 + MB2 + 0x123).unwrap();
        assert_eq!(t.size, MB2);
        assert_eq!(t.va, 0x4000_0000 + MB2);
        assert_eq!(t.target, Target::Device(MB2 * 5));
        let t = pt.translate(0x4000_0000 + 2 * MB2).unwrap();
        assert_eq!((t.size, t.target), (SMALL, Target::Device(MB2 * 6)));
        assert!(pt.translate(0x4000_0000 + 2 * MB2 + SMALL).is_none());
        assert!(pt.translate(0).is_none());
        assert!(pt.translate(VA_LIMIT + 5).is_none());

        // 2 MiB-aligned VA but unaligned target: small leaves.
        pt.map(0x8000_0000, MB2, Target::Host(0x7f00_0000_1000), Prot::READ);
        let t = pt.translate(0x8000_0000 + 0x5000).unwrap();
        assert_eq!((t.size, t.target), (SMALL, Target::Host(0x7f00_0000_6000)));
        assert_eq!(pt.census().small, 4 + 512);

        // Remapping a range of small leaves as one large entry frees the table.
        pt.map(0x8000_0000, MB2, Target::Device(0), Prot::READ);
        assert_eq!(pt.census().small, 4);
        assert_eq!(pt.census().large, 3);
    }

    #[test]
    fn split_by_unmap_and_protect() {
        let mut pt = PageTable::new();
        pt.map(MB2, 2 * MB2, Target::Device(0), Prot::RWA);
        assert_eq!(pt.census().large, 2);

        pt.unmap(VaRange::new(MB2 + 0x3000, 0x2000));
        let c = pt.census();
        assert_eq!((c.large, c.small), (1, 510));
        assert!(pt.translate(MB2 + 0x3000).is_none());
        assert!(pt.translate(MB2 + 0x4fff).is_none());
        let t = pt.translate(MB2 + 0x5000).unwrap();
        assert_eq!((t.size, t.target, t.prot), (SMALL, Target::Device(0x5000), Prot::RWA));
        let t = pt.translate(MB2 + 0x2000).unwrap();
        assert_eq!(t.target, Target::Device(0x2000));

        pt.protect(VaRange::new(2 * MB2 + 0x10000, SMALL), Prot::READ);
        let c = pt.census();
        assert_eq!((c.large, c.small), (0, 1022));
        assert_eq!(pt.translate(2 * MB2 + 0x10000).unwrap().prot, Prot::READ);
        assert_eq!(pt.translate(2 * MB2 + 0x11000).unwrap().prot, Prot::RWA);
        assert_eq!(pt.translate(2 * MB2 + 0x11000).unwrap().target, Target::Device(MB2 + 0x11000));

        // Whole-leaf protect keeps the large leaf.
        let mut pt2 = PageTable::new();
        pt2.map(0, MB2, Target::Device(MB2), Prot::RWA);
        pt2.protect(VaRange::new(0, MB2), Prot::READ);
        assert_eq!(pt2.census().large, 1);
        assert_eq!(pt2.translate(5).unwrap().prot, Prot::READ);
        // Protect of absent entries is a no-op.
        pt2.protect(VaRange::new(MB2, MB2), Prot::READ);
        assert_eq!(pt2.census(), Census { small: 0, large: 1, tables: 3 });

        // Unmapping everything frees the tables below the root's children.
        pt.unmap(VaRange::new(0, 8 * MB2));
        let c = pt.census();
        assert_eq!((c.large, c.small), (0, 0));
        assert!(c.tables <= 3);
    }

    #[test]
    fn accessed_bits() {
        let mut pt = PageTable::new();
        pt.map(0, MB2, Target::Device(0), Prot::READ);
        pt.map(MB2, 4 * SMALL, Target::Device(MB2), Prot::READ);
        assert!(pt.take_accessed(VaRange::new(0, 2 * MB2)).is_empty());
        pt.walk(MB2 + SMALL + 7).unwrap();
        pt.walk(MB2 + 3 * SMALL).unwrap();
        pt.translate(MB2).unwrap(); // no touch
        assert_eq!(pt.take_accessed(VaRange::new(MB2, MB2)), vec![MB2 + SMALL, MB2 + 3 * SMALL]);
        assert!(pt.take_accessed(VaRange::new(MB2, MB2)).is_empty());
        pt.walk(0x1234).unwrap();
        let got = pt.take_accessed(VaRange::new(0x10000, 0x3000));
        assert_eq!(got, vec![0x10000, 0x11000, 0x12000]);
        // The accessed bit survives a split.
        pt.walk(0x1234).unwrap();
        pt.unmap(VaRange::new(0, SMALL));
        let got = pt.take_accessed(VaRange::new(0, MB2));
        assert_eq!(got.len(), 511);
        assert_eq!(got[0], SMALL);
    }
}
