//! Which pages of this process have page-table entries, read from `/proc/self/pagemap`: how a
//! revoke decides between moving the application view's entries into the alias (where the alias
//! has none) and zapping them (where it has its own, which a move would throw away).

use std::fs::File;
use std::os::unix::fs::FileExt;

use hetmm_core::types::{align_down, VaRange, PAGE_SIZE};

/// Bits of a pagemap entry saying the page has an entry: present, or swapped out (or a marker,
/// which shows as a swap entry: what a userfaultfd write-protect leaves on a page without one).
const HAS_ENTRY: u64 = (1 << 63) | (1 << 62);
/// The bit of a pagemap entry saying the page is present (mapped to memory).
const PRESENT: u64 = 1 << 63;
/// Swapped out (or migrating, or a marker).
const SWAP: u64 = 1 << 62;
/// Write-protected through a userfaultfd (markers always are).
const UFFD_WP: u64 = 1 << 57;

/// Whether pagemap entry `e` shows data: a present page, or a swap or migration entry that is
/// not write-protected through a userfaultfd (a marker, which holds none, always is).
pub(crate) fn has_data(e: u64) -> bool {
    e & PRESENT != 0 || (e & SWAP != 0 && e & UFFD_WP == 0)
}

/// Entries read per `pread` (4 KiB: one 2 MiB block).
const BATCH: usize = 512;

/// `/proc/self/pagemap`, opened once.
#[derive(Debug)]
pub(crate) struct Pagemap(File);

impl Pagemap {
    /// Opens it; `None` where procfs is missing or refuses.
    pub(crate) fn open() -> Option<Pagemap> {
        File::open("/proc/self/pagemap").ok().map(Pagemap)
    }

    /// Whether any page of `range` has a page-table entry in this process. An unreadable entry
    /// counts as one (the caller then takes the path that is right either way).
    pub(crate) fn any_entry(&self, range: VaRange) -> bool {
        if range.len == 0 {
            return false;
        }
        // Every page holding a byte of the range, also when `start` is not page aligned.
        let first = align_down(range.start, PAGE_SIZE);
        let pages = VaRange::new(first, align_down(range.end() - 1, PAGE_SIZE) + PAGE_SIZE - first);
        self.runs(pages, |_, e| e & HAS_ENTRY != 0, |_| Err(())).is_err()
    }

    /// Calls `each` with the runs of pages of `range` (page aligned) whose pagemap entry
    /// `keep(address, entry)` accepts, in order, each inside one batch of [`BATCH`] pages
    /// (2 MiB); stops at `each`'s first error. A batch whose entries cannot be read is kept
    /// whole. Allocates nothing.
    pub(crate) fn runs<E>(
        &self,
        range: VaRange,
        keep: impl Fn(u64, u64) -> bool,
        mut each: impl FnMut(VaRange) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut buf = [0u8; BATCH * 8];
        let first = range.start / PAGE_SIZE;
        let pages = range.len / PAGE_SIZE;
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(BATCH as u64) as usize;
            let bytes = &mut buf[..n * 8];
            let readable = self.0.read_exact_at(bytes, (first + done) * 8).is_ok();
            let va = |k: usize| (first + done + k as u64) * PAGE_SIZE;
            let kept = |k: usize| {
                !readable || bytes[k * 8..k * 8 + 8].try_into().map_or(true, |w| keep(va(k), u64::from_ne_bytes(w)))
            };
            let mut k = 0;
            while k < n {
                let run = (k..n).take_while(|&j| kept(j)).count();
                if run > 0 {
                    each(VaRange::new(va(k), run as u64 * PAGE_SIZE))?;
                }
                k += run.max(1);
            }
            done += n as u64;
        }
        Ok(())
    }

    /// The runs of pages of `range` that have a page-table entry (present or swapped out), merged.
    pub(crate) fn entries(&self, range: VaRange) -> Vec<VaRange> {
        let mut out: Vec<VaRange> = Vec::new();
        let _ = self.runs(
            range,
            |_, e| e & HAS_ENTRY != 0,
            |r| {
                match out.last_mut() {
                    Some(l) if l.end() == r.start => l.len += r.len,
                    _ => out.push(r),
                }
                Ok::<(), ()>(())
            },
        );
        out
    }

    /// The raw pagemap entry of the page at `va` (0 where unreadable).
    pub(crate) fn entry(&self, va: u64) -> u64 {
        let mut e = [0u8; 8];
        self.0.read_exact_at(&mut e, va / PAGE_SIZE * 8).map_or(0, |_| u64::from_ne_bytes(e))
    }

    /// Whether the page at `va` is present (mapped to memory): unlike [`Pagemap::any_entry`],
    /// a swap entry or a marker (a write-protected entry the kernel dropped) is not.
    pub(crate) fn present(&self, va: u64) -> bool {
        self.entry(va) & PRESENT != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_touched_pages_only() {
        let Some(pm) = Pagemap::open() else {
            eprintln!("skipped: /proc/self/pagemap cannot be opened here");
            return;
        };
        let m = crate::mapping::SharedMapping::new(4 * PAGE_SIZE).unwrap();
        let alias = VaRange::new(m.alias_ptr() as u64, 4 * PAGE_SIZE);
        assert!(!pm.any_entry(alias), "a fresh mapping has no entries");
        m.write_backing(2 * PAGE_SIZE + 5, &[9]).unwrap();
        assert!(!pm.any_entry(alias), "pwrite maps nothing");
        let mut b = [0u8; 1];
        m.read_alias(2 * PAGE_SIZE + 5, &mut b).unwrap();
        // Used, so the read is not optimised away.
        assert_eq!(std::hint::black_box(b), [9]);
        assert!(pm.any_entry(alias));
        assert!(pm.any_entry(VaRange::new(alias.start + 2 * PAGE_SIZE, PAGE_SIZE)));
        // Fault-around maps only pages the memfd has: the holes around stay without entries.
        assert!(!pm.any_entry(VaRange::new(alias.start, 2 * PAGE_SIZE)));
        assert!(!pm.any_entry(VaRange::new(alias.start + 3 * PAGE_SIZE, PAGE_SIZE)));
    }

    /// A range that starts inside a page covers the pages its last byte lies in too.
    #[test]
    fn unaligned_range_covers_its_last_page() {
        let Some(pm) = Pagemap::open() else {
            eprintln!("skipped: /proc/self/pagemap cannot be opened here");
            return;
        };
        let m = crate::mapping::SharedMapping::new(4 * PAGE_SIZE).unwrap();
        let alias = m.alias_ptr() as u64;
        m.write_backing(PAGE_SIZE, &[9]).unwrap();
        let mut b = [0u8; 1];
        m.read_alias(PAGE_SIZE, &mut b).unwrap();
        assert_eq!(std::hint::black_box(b), [9]);
        assert!(!pm.any_entry(VaRange::new(alias, PAGE_SIZE)), "page 0 has no entry");
        // [alias + 2 KiB, alias + 6 KiB) overlaps page 1, which has one.
        assert!(pm.any_entry(VaRange::new(alias + PAGE_SIZE / 2, PAGE_SIZE)));
    }
}
