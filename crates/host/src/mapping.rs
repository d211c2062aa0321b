//! A memfd mapped twice: the application's view (registered with userfaultfd by the caller) and
//! the manager's alias. All `mmap`/`madvise` `unsafe` of the crate lives here.
//!
//! The two views share the same physical pages (the memfd's page cache), so zapping the
//! application's PTEs never loses data, and the manager can fill a page through its alias before
//! letting the application map it again. The views are placed at 2 MiB-aligned addresses so the
//! kernel (and devices) can use huge mappings.

use std::os::fd::OwnedFd;

use hetmm_core::types::{VaRange, BLOCK_SIZE, PAGE_SIZE};
use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::io::Errno;
use rustix::mm::{Advice, MapFlags, ProtFlags};

/// A bad request or a failed OS call on a [`SharedMapping`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// The length is zero, not a multiple of 4 KiB, or too large.
    #[error("bad mapping length {0:#x} (need a non-zero multiple of 4 KiB)")]
    BadLength(u64),
    /// Start or length not page aligned, or empty.
    #[error("range {0} is not page aligned or is empty")]
    Unaligned(VaRange),
    /// The range is not inside the application view.
    #[error("range {range} is outside the mapping {region}")]
    OutOfBounds {
        /// The range asked for.
        range: VaRange,
        /// The application view.
        region: VaRange,
    },
    /// An OS call failed.
    #[error("{op} on {range} failed: errno {errno}")]
    Os {
        /// The call ("memfd_create", "mmap", "madvise", "fallocate", ...).
        op: &'static str,
        /// The range it was applied to (the whole view for setup calls).
        range: VaRange,
        /// The errno.
        errno: i32,
    },
}

impl MappingError {
    /// The errno closest to the error: EINVAL for bad lengths or alignment, EFAULT for ranges
    /// outside the mapping, the OS's errno otherwise.
    pub fn errno(&self) -> i32 {
        match self {
            MappingError::BadLength(_) | MappingError::Unaligned(_) => Errno::INVAL.raw_os_error(),
            MappingError::OutOfBounds { .. } => Errno::FAULT.raw_os_error(),
            MappingError::Os { errno, .. } => *errno,
        }
    }
}

/// A memfd of `len` bytes mapped `MAP_SHARED` twice. Dropping it unmaps both views and closes
/// the memfd.
#[derive(Debug)]
pub struct SharedMapping {
    memfd: OwnedFd,
    /// Application view (2 MiB aligned). Stored as an address: the mapping is owned by `self`
    /// and only ever touched through the checked methods below.
    app: usize,
    /// Manager's alias (2 MiB aligned).
    alias: usize,
    len: usize,
}

impl SharedMapping {
    /// Creates the memfd (`len` bytes, a multiple of 4 KiB; pages are allocated lazily) and maps
    /// both views read-write.
    pub fn new(len: u64) -> Result<SharedMapping, MappingError> {
        if len == 0 || len % PAGE_SIZE != 0 || len > (isize::MAX as u64) - BLOCK_SIZE {
            return Err(MappingError::BadLength(len));
        }
        let whole = VaRange::new(0, len);
        let os = |op| move |e: Errno| MappingError::Os { op, range: whole, errno: e.raw_os_error() };
        let memfd = rustix::fs::memfd_create("hetmm-region", MemfdFlags::CLOEXEC).map_err(os("memfd_create"))?;
        rustix::fs::ftruncate(&memfd, len).map_err(os("ftruncate"))?;
        let app = map_aligned(&memfd, len as usize).map_err(os("mmap app view"))?;
        let alias = match map_aligned(&memfd, len as usize) {
            Ok(a) => a,
            Err(e) => {
                unmap(app, len as usize);
                return Err(os("mmap alias")(e));
            }
        };
        Ok(SharedMapping { memfd, app, alias, len: len as usize })
    }

    /// Start of the application's view.
    pub fn app_ptr(&self) -> *mut u8 {
        self.app as *mut u8
    }

    /// Start of the manager's alias.
    pub fn alias_ptr(&self) -> *mut u8 {
        self.alias as *mut u8
    }

    /// Usable length in bytes (both views).
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Always false: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The application view as a range of virtual addresses.
    pub fn app_range(&self) -> VaRange {
        VaRange::new(self.app as u64, self.len as u64)
    }

    /// Checks that `range` is a page-aligned, non-empty part of the application view and
    /// returns its byte offset into the memfd.
    pub fn offset_of(&self, range: VaRange) -> Result<u64, MappingError> {
        if range.len == 0 || !range.is_page_aligned() {
            return Err(MappingError::Unaligned(range));
        }
        let region = self.app_range();
        if range.start.checked_add(range.len).is_none() || !region.contains_range(&range) {
            return Err(MappingError::OutOfBounds { range, region });
        }
        Ok(range.start - region.start)
    }

    /// Drops the application view's PTEs for `range` (`MADV_DONTNEED`); the memfd keeps the
    /// data, so the next access is a (MINOR) userfaultfd fault.
    pub fn zap_app(&self, range: VaRange) -> Result<(), MappingError> {
        self.offset_of(range)?;
        // SAFETY: `range` was checked to lie inside the application view, which `self` owns and
        // keeps mapped. MADV_DONTNEED on a MAP_SHARED memfd mapping only drops PTEs: the content
        // stays in the memfd and is seen again on the next access, so no Rust-visible value
        // changes. (`LinuxDontNeed`, not `DontNeed`, which is the POSIX no-op.)
        unsafe { rustix::mm::madvise(range.start as *mut _, range.len as usize, Advice::LinuxDontNeed) }
            .map_err(|e| MappingError::Os { op: "madvise(DONTNEED)", range, errno: e.raw_os_error() })
    }

    /// Makes sure backing pages exist for `range` (zero-filled where there were none; existing
    /// data is kept).
    pub fn allocate(&self, range: VaRange) -> Result<(), MappingError> {
        let off = self.offset_of(range)?;
        rustix::fs::fallocate(&self.memfd, FallocateFlags::empty(), off, range.len).map_err(|e| MappingError::Os {
            op: "fallocate",
            range,
            errno: e.raw_os_error(),
        })
    }

    /// Frees the backing pages of `range` (`PUNCH_HOLE | KEEP_SIZE`); their data is gone. The
    /// kernel also drops the PTEs of every view mapping them.
    pub fn punch(&self, range: VaRange) -> Result<(), MappingError> {
        let off = self.offset_of(range)?;
        let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        rustix::fs::fallocate(&self.memfd, mode, off, range.len).map_err(|e| MappingError::Os {
            op: "fallocate(PUNCH_HOLE)",
            range,
            errno: e.raw_os_error(),
        })
    }

    /// Maps the alias view of `range` in bulk (`MADV_POPULATE_WRITE`), allocating zeroed backing
    /// where there was none, so the manager's copies into or out of it take no page faults.
    pub fn populate_alias(&self, range: VaRange) -> Result<(), MappingError> {
        let off = self.offset_of(range)?;
        // SAFETY: `offset_of` checked that `[off, off + len)` lies inside the alias mapping, which
        // lives as long as `self`; populating only faults pages in and never changes their data.
        unsafe {
            rustix::mm::madvise(
                self.alias_ptr().add(off as usize).cast(),
                range.len as usize,
                Advice::LinuxPopulateWrite,
            )
        }
        .map_err(|e| MappingError::Os { op: "madvise(POPULATE_WRITE)", range, errno: e.raw_os_error() })
    }

    /// Reads one byte at `va` through the application view (volatile, so it really touches the
    /// page: this is how probes take a fault). May block on a userfaultfd fault.
    pub fn touch_app(&self, va: u64) -> Result<u8, MappingError> {
        self.offset_of(VaRange::new(va & !(PAGE_SIZE - 1), PAGE_SIZE))?;
        // SAFETY: `va` lies inside the application view, which stays mapped while `self` lives;
        // a volatile one-byte read of shared memory has no alignment or validity requirement.
        Ok(unsafe { std::ptr::read_volatile(va as *const u8) })
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        unmap(self.app, self.len);
        unmap(self.alias, self.len);
    }
}

/// Maps `len` bytes of `memfd` shared read-write at a 2 MiB-aligned address: reserve
/// `len + 2 MiB` of PROT_NONE address space, map the memfd over the aligned part with
/// MAP_FIXED, and give back the slack on both sides.
fn map_aligned(memfd: &OwnedFd, len: usize) -> Result<usize, Errno> {
    let block = BLOCK_SIZE as usize;
    let reserve = len + block;
    // SAFETY: a fresh PROT_NONE reservation at an address the kernel picks; it cannot overlap
    // anything Rust owns.
    let base = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            reserve,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }? as usize;
    let aligned = (base + block - 1) & !(block - 1);
    // SAFETY: `[aligned, aligned + len)` lies inside the reservation made just above, which
    // nothing else uses, so MAP_FIXED replaces only our own PROT_NONE pages.
    let mapped = unsafe {
        rustix::mm::mmap(
            aligned as *mut _,
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED | MapFlags::FIXED,
            memfd,
            0,
        )
    };
    if let Err(e) = mapped {
        unmap(base, reserve);
        return Err(e);
    }
    unmap(base, aligned - base);
    unmap(aligned + len, base + reserve - (aligned + len));
    Ok(aligned)
}

/// Unmaps `[addr, addr + len)` of a mapping this module created; a zero length is a no-op.
fn unmap(addr: usize, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: only called on (parts of) mappings this module created and owns, when nothing
    // will access them again (drop, error paths, reservation slack).
    if let Err(e) = unsafe { rustix::mm::munmap(addr as *mut _, len) } {
        log::error!("munmap({addr:#x}, {len:#x}) failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::undocumented_unsafe_blocks)]
    use super::*;

    #[test]
    fn views_alias_and_are_aligned() {
        let m = SharedMapping::new(3 * PAGE_SIZE).unwrap();
        assert_eq!(m.len(), 3 * PAGE_SIZE);
        assert_eq!(m.app_ptr() as u64 % BLOCK_SIZE, 0);
        assert_eq!(m.alias_ptr() as u64 % BLOCK_SIZE, 0);
        unsafe {
            m.app_ptr().add(4096).write(7);
            assert_eq!(m.alias_ptr().add(4096).read(), 7);
        }
        // Zap keeps the data (not registered with a uffd here: a normal fault brings it back).
        m.zap_app(VaRange::new(m.app_ptr() as u64 + PAGE_SIZE, PAGE_SIZE)).unwrap();
        assert_eq!(m.touch_app(m.app_ptr() as u64 + PAGE_SIZE + 1).unwrap(), 0);
        assert_eq!(unsafe { m.app_ptr().add(4096).read() }, 7);
        // Punch drops it.
        m.punch(VaRange::new(m.app_ptr() as u64 + PAGE_SIZE, PAGE_SIZE)).unwrap();
        assert_eq!(unsafe { m.alias_ptr().add(4096).read() }, 0);
        m.allocate(m.app_range()).unwrap();
    }

    #[test]
    fn bad_input_is_typed() {
        assert_eq!(SharedMapping::new(0).unwrap_err(), MappingError::BadLength(0));
        assert_eq!(SharedMapping::new(100).unwrap_err(), MappingError::BadLength(100));
        let m = SharedMapping::new(PAGE_SIZE).unwrap();
        let a = m.app_ptr() as u64;
        assert!(matches!(m.zap_app(VaRange::new(a + 1, PAGE_SIZE)), Err(MappingError::Unaligned(_))));
        assert!(matches!(m.allocate(VaRange::new(a, 0)), Err(MappingError::Unaligned(_))));
        assert!(matches!(m.punch(VaRange::new(a, 2 * PAGE_SIZE)), Err(MappingError::OutOfBounds { .. })));
        assert!(matches!(
            m.zap_app(VaRange::new(u64::MAX - PAGE_SIZE + 1, PAGE_SIZE)),
            Err(MappingError::OutOfBounds { .. })
        ));
        assert!(m.touch_app(a + PAGE_SIZE).is_err());
    }
}
