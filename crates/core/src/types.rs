//! Addresses, ranges, processors and access kinds: the vocabulary every other module speaks.

use bitflags::bitflags;
use serde::Serialize;

/// log2 of the base page size (4 KiB).
pub const PAGE_SHIFT: u32 = 12;
/// Base page size in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// log2 of a logical block (2 MiB, the unit of locking and servicing, as UVM's va_block).
pub const BLOCK_SHIFT: u32 = 21;
/// Logical block size in bytes.
pub const BLOCK_SIZE: u64 = 1 << BLOCK_SHIFT;
/// Base pages per block.
pub const PAGES_PER_BLOCK: usize = (BLOCK_SIZE / PAGE_SIZE) as usize;
/// Most devices one address space can hold (residency sets are `u64` masks; bit 0 is the CPU).
pub const MAX_DEVICES: usize = 63;

/// A byte range of virtual addresses `[start, start + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct VaRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl VaRange {
    /// `self` minus `cut`: up to two pieces (`self` whole if they do not overlap).
    pub fn minus(self, cut: VaRange) -> Vec<VaRange> {
        if self.intersect(&cut).is_none() {
            return vec![self];
        }
        let mut out = Vec::new();
        if cut.start > self.start {
            out.push(VaRange::new(self.start, cut.start.min(self.end()) - self.start));
        }
        if cut.end() < self.end() {
            let s = cut.end().max(self.start);
            out.push(VaRange::new(s, self.end() - s));
        }
        out
    }

    /// A range from its start and length.
    pub const fn new(start: u64, len: u64) -> Self {
        Self { start, len }
    }
    /// One past the last byte (saturating: callers validate overflow with [`VaRange::checked`]).
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
    /// The range if `start + len` does not overflow and `len > 0`.
    pub fn checked(start: u64, len: u64) -> Option<Self> {
        (len > 0 && start.checked_add(len).is_some()).then_some(Self { start, len })
    }
    /// Whether start and length are multiples of the base page size.
    pub const fn is_page_aligned(&self) -> bool {
        self.start.is_multiple_of(PAGE_SIZE) && self.len.is_multiple_of(PAGE_SIZE)
    }
    /// Whether `other` lies wholly inside `self`.
    pub const fn contains_range(&self, other: &VaRange) -> bool {
        other.start >= self.start && other.end() <= self.end()
    }
    /// Whether `va` lies inside.
    pub const fn contains(&self, va: u64) -> bool {
        va >= self.start && va < self.end()
    }
    /// The overlap of two ranges, if any.
    pub fn intersect(&self, other: &VaRange) -> Option<VaRange> {
        let s = self.start.max(other.start);
        let e = self.end().min(other.end());
        (s < e).then(|| VaRange::new(s, e - s))
    }
    /// Number of base pages (the range must be page aligned).
    pub const fn pages(&self) -> u64 {
        self.len / PAGE_SIZE
    }
}

impl std::fmt::Display for VaRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end())
    }
}

/// Index of an attached device inside one address space (0-based; residency bit `1 + id`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DeviceId(pub u8);

/// A processor that can hold or access data: the CPU or an attached device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Proc {
    /// The host CPU (data in the host backing page).
    Cpu,
    /// An attached device.
    Device(DeviceId),
}

impl Proc {
    /// The bit of this processor in a [`ProcMask`].
    pub const fn bit(self) -> u64 {
        match self {
            Proc::Cpu => 1,
            Proc::Device(DeviceId(d)) => 1 << (1 + d as u32),
        }
    }
}

/// A set of processors as a bit mask (bit 0: CPU, bit 1 + d: device d).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ProcMask(pub u64);

impl ProcMask {
    /// The empty set.
    pub const EMPTY: ProcMask = ProcMask(0);
    /// The set holding one processor.
    pub const fn only(p: Proc) -> Self {
        ProcMask(p.bit())
    }
    /// Whether `p` is in the set.
    pub const fn has(self, p: Proc) -> bool {
        self.0 & p.bit() != 0
    }
    /// Adds `p`.
    pub fn insert(&mut self, p: Proc) {
        self.0 |= p.bit();
    }
    /// Removes `p`.
    pub fn remove(&mut self, p: Proc) {
        self.0 &= !p.bit();
    }
    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The devices in the set.
    pub fn devices(self) -> impl Iterator<Item = DeviceId> {
        let m = self.0 >> 1;
        (0..MAX_DEVICES as u8).filter(move |d| m & (1 << d) != 0).map(DeviceId)
    }
}

/// Kind of memory access, ordered from least to most intrusive (UVM's order: a merged fault keeps
/// the most intrusive access).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Access {
    /// Speculative access (prefetch); never fatal.
    Prefetch,
    /// Load.
    Read,
    /// Store.
    Write,
    /// Read-modify-write atomic.
    Atomic,
}

impl Access {
    /// The protection an access needs.
    pub fn needs(self) -> Prot {
        match self {
            Access::Prefetch | Access::Read => Prot::READ,
            Access::Write => Prot::READ | Prot::WRITE,
            Access::Atomic => Prot::READ | Prot::WRITE | Prot::ATOMIC,
        }
    }
}

bitflags! {
    /// Page protection, on the CPU or in a device page-table entry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Prot: u8 {
        /// Loads allowed.
        const READ = 1;
        /// Stores allowed.
        const WRITE = 2;
        /// Atomics allowed (device entries only).
        const ATOMIC = 4;
    }
}

impl Prot {
    /// Read, write and atomic.
    pub const RWA: Prot = Prot::READ.union(Prot::WRITE).union(Prot::ATOMIC);
}

/// Rounds `v` down to a multiple of `align` (a power of two).
pub const fn align_down(v: u64, align: u64) -> u64 {
    v & !(align - 1)
}

/// Rounds `v` up to a multiple of `align` (a power of two); `None` on overflow.
pub const fn align_up(v: u64, align: u64) -> Option<u64> {
    match v.checked_add(align - 1) {
        Some(x) => Some(x & !(align - 1)),
        None => None,
    }
}

/// Splits a sorted list of page addresses into maximal contiguous ranges.
pub fn coalesce_pages(pages: impl IntoIterator<Item = u64>) -> Vec<VaRange> {
    let mut out: Vec<VaRange> = Vec::new();
    for p in pages {
        match out.last_mut() {
            Some(r) if r.end() == p => r.len += PAGE_SIZE,
            _ => out.push(VaRange::new(p, PAGE_SIZE)),
        }
    }
    out
}

/// Parses sizes like `512M`, `1G`, `2GiB`, `4096`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mul)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_minus() {
        let r = VaRange::new(0x1000, 0x4000);
        assert_eq!(r.minus(VaRange::new(0x2000, 0x1000)), [VaRange::new(0x1000, 0x1000), VaRange::new(0x3000, 0x2000)]);
        assert_eq!(r.minus(VaRange::new(0, 0x2000)), [VaRange::new(0x2000, 0x3000)]);
        assert_eq!(r.minus(VaRange::new(0x4000, 0x9000)), [VaRange::new(0x1000, 0x3000)]);
        assert_eq!(r.minus(VaRange::new(0, 0x9000)), []);
        assert_eq!(r.minus(VaRange::new(0x9000, 0x1000)), [r]);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("3x"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
    }

    #[test]
    fn range_checks() {
        assert!(VaRange::checked(u64::MAX - 10, 100).is_none());
        assert!(VaRange::checked(0, 0).is_none());
        let r = VaRange::new(0x1000, 0x3000);
        assert!(r.is_page_aligned());
        assert!(r.contains_range(&VaRange::new(0x2000, 0x1000)));
        assert_eq!(r.intersect(&VaRange::new(0x3000, 0x5000)), Some(VaRange::new(0x3000, 0x1000)));
        assert_eq!(coalesce_pages([0x1000, 0x2000, 0x4000]).len(), 2);
    }

    #[test]
    fn masks() {
        let mut m = ProcMask::only(Proc::Cpu);
        m.insert(Proc::Device(DeviceId(3)));
        assert!(m.has(Proc::Device(DeviceId(3))));
        assert_eq!(m.devices().collect::<Vec<_>>(), vec![DeviceId(3)]);
        m.remove(Proc::Cpu);
        assert!(!m.has(Proc::Cpu));
        assert!(Access::Atomic > Access::Write && Access::Write > Access::Read);
    }
}
