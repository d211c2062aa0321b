//! A memfd mapped twice: the application's view (registered with userfaultfd by the caller) and
//! the manager's alias. All `mmap`/`madvise` `unsafe` of the crate lives here.
//!
//! The two views share the same physical pages (the memfd's page cache), so zapping the
//! application's PTEs never loses data, and the manager can fill a page through its alias before
//! letting the application map it again. The views are placed at 2 MiB-aligned addresses so the
//! kernel (and devices) can use huge mappings.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use hetmm_core::types::{VaRange, BLOCK_SIZE, PAGE_SIZE};
use rustix::fs::{FallocateFlags, MemfdFlags};

use crate::maps::MapsFile;
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

/// A byte copy between disjoint buffers: `(src, dst, len)`.
///
/// # Safety
///
/// The contract of [`std::ptr::copy_nonoverlapping`]: `src` valid for reads and `dst` for
/// writes of `len` bytes, the two not overlapping.
pub type CopyFn = unsafe fn(*const u8, *mut u8, usize);

/// Bytes a memfd of hetmm extends past the memory it holds: holes nothing maps but a view the
/// program grew in place with `mremap` (which raises no userfaultfd event). A page there is a
/// hole, so touching it raises a userfaultfd MISSING fault the host can answer (see
/// `Ctx::fresh_growth_at`); past the memfd's end the kernel would raise SIGBUS at once. Holes
/// cost nothing.
const GROWTH_ROOM: u64 = 1 << 46;

/// Sets the size of a new memfd holding `len` bytes: `len` plus [`GROWTH_ROOM`], less where the
/// process's file-size limit (`RLIMIT_FSIZE`) is lower (a size past it would raise SIGXFSZ,
/// which ends the process), or just `len` where the kernel refuses the room. `EFBIG` where
/// `len` itself is past the limit.
fn size_memfd(memfd: &OwnedFd, len: u64) -> Result<(), Errno> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Fsize).current.unwrap_or(u64::MAX);
    if len > limit {
        return Err(Errno::FBIG);
    }
    let room = GROWTH_ROOM.min(limit.saturating_sub(len)) & !(PAGE_SIZE - 1);
    if room == 0 {
        return rustix::fs::ftruncate(memfd, len);
    }
    match rustix::fs::ftruncate(memfd, len + room) {
        Ok(()) => Ok(()),
        Err(e) => {
            log::debug!("memfd of {len:#x} bytes cannot have room to grow ({e}): growth in place will not be followed");
            rustix::fs::ftruncate(memfd, len)
        }
    }
}

/// A memfd as `/proc/self/maps` names the file a mapping shows (device and inode: the inode
/// number alone matched a program's tmpfs file, whose mapping was then taken for the memfd's
/// and replaced with zeros). Anonymous (nothing matches it) if `fstat` fails.
pub(crate) fn file_of(memfd: &OwnedFd) -> MapsFile {
    MapsFile::of(memfd).unwrap_or_default()
}

/// A memfd of `len` bytes mapped `MAP_SHARED` twice. Dropping it unmaps the application view
/// (what of it is still the view: parts the program moved away or unmapped are left alone); the
/// memfd and the alias go with their last holder (a moved part of the view managed elsewhere may
/// share them).
#[derive(Debug)]
pub struct SharedMapping {
    memfd: Arc<OwnedFd>,
    /// The memfd, as `/proc/self/maps` names it.
    file: MapsFile,
    /// Application view (2 MiB aligned). Stored as an address: the mapping is owned by `self`
    /// and only ever touched through the checked methods below.
    app: usize,
    /// Manager's alias (2 MiB aligned).
    alias: Arc<Alias>,
    len: usize,
    /// Parts of the application view the program moved away or unmapped: no longer the view.
    left: parking_lot::Mutex<Vec<VaRange>>,
    /// Whether dropping it checks, in `/proc/self/maps`, that what it unmaps still shows the
    /// memfd (set when the program may have moved or unmapped part of the view unseen yet).
    check_on_drop: std::sync::atomic::AtomicBool,
    /// The process that made the mapping: only a `fork()` child of it (another pid) may make
    /// its views private ([`SharedMapping::fork_child`]).
    owner: rustix::process::Pid,
}

/// The manager's alias of some shared pages: a mapping this crate created, unmapped on drop
/// unless a `fork()` child already unmapped its copy ([`Alias::drop_in_child`]).
#[derive(Debug)]
pub(crate) struct Alias {
    addr: usize,
    len: usize,
    gone: std::sync::atomic::AtomicBool,
}

impl Alias {
    /// Takes ownership of the mapping `[addr, addr + len)`, which this crate created.
    pub(crate) fn new(addr: usize, len: usize) -> Alias {
        Alias { addr, len, gone: std::sync::atomic::AtomicBool::new(false) }
    }

    /// Its first address.
    pub(crate) fn addr(&self) -> usize {
        self.addr
    }

    /// Its addresses.
    pub(crate) fn range(&self) -> VaRange {
        VaRange::new(self.addr as u64, self.len as u64)
    }

    /// Whether a fork child unmapped it.
    pub(crate) fn is_gone(&self) -> bool {
        self.gone.load(std::sync::atomic::Ordering::Acquire)
    }

    /// In a `fork()` child, whose views no longer need it: unmaps it once (system calls only).
    pub(crate) fn drop_in_child(&self) {
        if !self.gone.swap(true, std::sync::atomic::Ordering::AcqRel) {
            unmap_quiet(self.addr, self.len);
        }
    }
}

impl Drop for Alias {
    fn drop(&mut self) {
        if !self.is_gone() {
            unmap(self.addr, self.len);
        }
    }
}

/// Page-table entries moved out of an application view by [`SharedMapping::move_out_app`]: a
/// private reservation holding a mapping of the region's pages that nothing accesses. Dropping
/// it unmaps the reservation, which frees the entries.
#[derive(Debug)]
pub struct MovedOut {
    reservation: usize,
    res_len: usize,
    moved: VaRange,
}

impl MovedOut {
    /// Where the entries are now.
    pub fn moved(&self) -> VaRange {
        self.moved
    }

    /// The whole reservation holding them, which dropping unmaps (the moved entries are still
    /// registered with the view's userfaultfd: the unmap raises an UNMAP event for this range).
    pub fn reservation(&self) -> VaRange {
        VaRange::new(self.reservation as u64, self.res_len as u64)
    }

    /// Drops the moved entries of `piece` (inside [`MovedOut::moved`]): `MADV_DONTNEED`, which
    /// holds the mmap lock for reading only, so a caller that frees a large run a piece at a
    /// time never holds up the mmap-lock writers (every revoke's `mremap`) for longer than one
    /// piece. The pages stay in the memfd.
    pub fn zap(&self, piece: VaRange) -> Result<(), MappingError> {
        if !piece.is_page_aligned() || piece.len == 0 {
            return Err(MappingError::Unaligned(piece));
        }
        if !self.moved.contains_range(&piece) {
            return Err(MappingError::OutOfBounds { range: piece, region: self.moved });
        }
        // SAFETY: `piece` lies inside the moved mapping, which this value owns and nothing
        // reads; MADV_DONTNEED of a shared memfd mapping only drops entries.
        unsafe { rustix::mm::madvise(piece.start as *mut _, piece.len as usize, Advice::LinuxDontNeed) }
            .map_err(|e| MappingError::Os { op: "madvise(DONTNEED)", range: piece, errno: e.raw_os_error() })
    }

    /// The reservation's start and length, without unmapping it (the caller unmaps what is
    /// still its own).
    fn into_reservation(self) -> (usize, usize) {
        let parts = (self.reservation, self.res_len);
        std::mem::forget(self);
        parts
    }
}

impl Drop for MovedOut {
    fn drop(&mut self) {
        unmap(self.reservation, self.res_len);
    }
}

impl SharedMapping {
    /// Creates the memfd (`len` bytes, a multiple of 4 KiB; pages are allocated lazily) and maps
    /// both views read-write.
    pub fn new(len: u64) -> Result<SharedMapping, MappingError> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) || len > (isize::MAX as u64) - BLOCK_SIZE {
            return Err(MappingError::BadLength(len));
        }
        let whole = VaRange::new(0, len);
        let os = |op| move |e: Errno| MappingError::Os { op, range: whole, errno: e.raw_os_error() };
        let memfd = rustix::fs::memfd_create("hetmm-region", MemfdFlags::CLOEXEC).map_err(os("memfd_create"))?;
        size_memfd(&memfd, len).map_err(os("ftruncate"))?;
        let app = map_aligned(&memfd, len as usize).map_err(os("mmap app view"))?;
        let alias = match map_aligned(&memfd, len as usize) {
            Ok(a) => a,
            Err(e) => {
                unmap(app, len as usize);
                return Err(os("mmap alias")(e));
            }
        };
        Ok(SharedMapping {
            file: file_of(&memfd),
            memfd: Arc::new(memfd),
            app,
            alias: Arc::new(Alias::new(alias, len as usize)),
            len: len as usize,
            left: parking_lot::Mutex::new(Vec::new()),
            check_on_drop: std::sync::atomic::AtomicBool::new(false),
            owner: rustix::process::getpid(),
        })
    }

    /// The memfd and the alias, for a part of the view the program moved elsewhere, managed
    /// there (they live as long as their last holder).
    pub(crate) fn backing_shared(&self) -> (Arc<OwnedFd>, Arc<Alias>) {
        (Arc::clone(&self.memfd), Arc::clone(&self.alias))
    }

    /// The memfd, as `/proc/self/maps` names it.
    pub(crate) fn file(&self) -> MapsFile {
        self.file
    }

    /// The program moved away or unmapped `range` (clipped to the view): it is no longer the
    /// view, and dropping the mapping leaves whatever is mapped there alone.
    pub(crate) fn view_left(&self, range: VaRange) {
        if let Some(x) = self.app_range().intersect(&range) {
            self.left.lock().push(x);
        }
    }

    /// The parts of the application view still the view, in order.
    pub(crate) fn view_parts(&self) -> Vec<VaRange> {
        let mut parts = vec![self.app_range()];
        for &gone in self.left.lock().iter() {
            parts = parts.into_iter().flat_map(|p| p.minus(gone)).collect();
        }
        parts
    }

    /// Makes dropping the mapping check that what it unmaps still shows the memfd.
    pub(crate) fn check_on_drop(&self) {
        self.check_on_drop.store(true, std::sync::atomic::Ordering::Release);
    }

    /// What dropping the mapping unmaps: [`SharedMapping::view_parts`], cut down (where any part
    /// left, or [`SharedMapping::check_on_drop`] asked for it) to the pages that show the memfd
    /// at the view's own offsets, as `/proc/self/maps` says: never what the program mapped at
    /// addresses it moved the view away from.
    pub(crate) fn parts_to_unmap(&self) -> Vec<VaRange> {
        let parts = self.view_parts();
        let careful = self.check_on_drop.load(std::sync::atomic::Ordering::Acquire) || !self.left.lock().is_empty();
        if !careful {
            return parts;
        }
        let app = self.app as u64;
        // One read of the kernel's list for the whole view, not one per part.
        let Some(vmas) = crate::maps::meeting(self.app_range()) else { return Vec::new() };
        let mut out = Vec::new();
        for p in parts {
            for v in &vmas {
                let Some(x) = v.range.intersect(&p) else { continue };
                if v.shared && v.file == self.file && v.off + (x.start - v.range.start) == x.start - app {
                    out.push(x);
                }
            }
        }
        out
    }

    /// Start of the application's view.
    pub fn app_ptr(&self) -> *mut u8 {
        self.app as *mut u8
    }

    /// Start of the manager's alias.
    pub fn alias_ptr(&self) -> *mut u8 {
        self.alias.addr() as *mut u8
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
        // `LinuxDontNeed`, not `DontNeed`, which is the POSIX no-op.
        // SAFETY: `range` was checked inside the app view, which `self` keeps mapped; DONTNEED on
        // its MAP_SHARED memfd only drops PTEs, the memfd keeps the data: no Rust value changes.
        unsafe { rustix::mm::madvise(range.start as *mut _, range.len as usize, Advice::LinuxDontNeed) }
            .map_err(|e| MappingError::Os { op: "madvise(DONTNEED)", range, errno: e.raw_os_error() })
    }

    /// Takes the application view's page-table entries of `range` away without zapping them:
    /// `mremap(MREMAP_DONTUNMAP)` moves them to a fresh private reservation (2 MiB-aligned
    /// like `range`, so the kernel moves whole page-table pages: about 22 us per 2 MiB here,
    /// most of it the REMAP event's round trip, against 160-180 us for `MADV_DONTNEED` of 4 KiB
    /// pages). The view keeps its VMA and its userfaultfd registration: its next access faults
    /// as after a zap. The kernel clears `VM_LOCKED` of that VMA (a zap would refuse an
    /// `mlock`ed range instead). The returned [`MovedOut`] maps the same pages where nothing
    /// reads them; dropping it frees the moved entries (the zap's cost, paid wherever it is
    /// dropped).
    pub fn move_out_app(&self, range: VaRange) -> Result<MovedOut, MappingError> {
        self.offset_of(range)?;
        let os = |op| move |e: Errno| MappingError::Os { op, range, errno: e.raw_os_error() };
        let block = BLOCK_SIZE as usize;
        let (len, res_len) = (range.len as usize, range.len as usize + 2 * block);
        let reservation = reserve(res_len).map_err(os("mmap reservation"))?;
        // Same offset in a 2 MiB block as `range`, inside the reservation.
        let dest = ((reservation + block - 1) & !(block - 1)) + (range.start as usize & (block - 1));
        let flags = rustix::mm::MremapFlags::MAYMOVE | rustix::mm::MremapFlags::DONTUNMAP;
        // With DONTUNMAP the view keeps its VMA and only loses its page-table entries: its pages
        // stay in the memfd and are seen again on the next access (as after `zap_app`).
        // SAFETY: `range` is checked inside the view `self` owns; `dest..dest + len` is inside the
        // reservation made above, used by nothing else; no Rust-visible value changes (see above).
        let moved = unsafe { rustix::mm::mremap_fixed(range.start as *mut _, len, len, flags, dest as *mut _) };
        if let Err(e) = moved {
            // Some kernels unmap the destination before they find the source unfit: the hole
            // may already hold another thread's mapping. Only the slack on both sides is
            // surely ours; the rest of the reservation (address space, no memory) is left.
            unmap(reservation, dest - reservation);
            unmap(dest + len, reservation + res_len - (dest + len));
            return Err(os("mremap(DONTUNMAP)")(e));
        }
        // SAFETY: `dest..dest + len` is the mapping just moved into our reservation; nothing
        // reads it. A fork child does not inherit it (it would share the region's pages).
        let _ = unsafe { rustix::mm::madvise(dest as *mut _, len, Advice::LinuxDontFork) };
        Ok(MovedOut { reservation, res_len, moved: VaRange::new(dest as u64, range.len) })
    }

    /// The alias's addresses for the application-view `range` (same offsets).
    pub fn alias_of(&self, range: VaRange) -> Result<VaRange, MappingError> {
        let off = self.offset_of(range)?;
        Ok(VaRange::new(self.alias.addr() as u64 + off, range.len))
    }

    /// Puts page-table entries of `range` that [`SharedMapping::move_out_app`] moved out into
    /// the alias at the same offsets, where the copy engines are about to read the pages: the
    /// second half of a revoke that moves the view's entries instead of zapping them. Copying
    /// out through an alias without entries runs at half the speed, because every 16 pages
    /// take a fault; the view's entries are exactly what it lacks, and a move of whole
    /// page-table pages costs about what one such fault costs
    /// (`cargo run --release --example revoke_cost`).
    ///
    /// The moved VMA is made read-write first (the view's protection came with it, and
    /// unregistering a write-protect mode leaves every entry read-only, so each later copy into
    /// the alias would take one write fault per page: 3.5 ms per 2 MiB; `mprotect` to
    /// read-only, then read-write, upgrades them in two walks, about 80 us) and unlocked (a
    /// view the program `mlock`ed must not lock the alias), then moved over the alias's part
    /// for `range` with one `mremap(MREMAP_FIXED)`. The alias loses its own entries there: the
    /// caller moves only where it has none. If the final move fails, `moved` is dropped (its
    /// entries freed) and the alias's part is mapped afresh if the kernel left a hole there.
    ///
    /// # Safety
    ///
    /// `moved` must come from `self.move_out_app(range)` and no longer be registered with any
    /// userfaultfd (else faults in the alias would go to that userfaultfd: a copy engine
    /// touching a page without an entry would wait for it), and nothing may access the alias's
    /// part for `range` until this returns (the caller holds its block lock). The view must
    /// still have mapped this mapping's memfd when its entries were moved (as for every revoke:
    /// the core applies the program's unmap before it migrates again).
    pub unsafe fn install_in_alias(&self, moved: MovedOut, range: VaRange) -> Result<(), MappingError> {
        let alias = self.alias_of(range)?;
        if self.alias.is_gone() || moved.moved.len != range.len {
            return Err(MappingError::OutOfBounds { range, region: self.app_range() });
        }
        let (at, len) = (moved.moved.start as usize, range.len as usize);
        use rustix::mm::MprotectFlags;
        for prot in [MprotectFlags::READ, MprotectFlags::READ | MprotectFlags::WRITE] {
            // SAFETY: `[at, at + len)` is the mapping `moved` owns inside its reservation,
            // which nothing accesses; only its entries' permissions change.
            unsafe { rustix::mm::mprotect(at as *mut _, len, prot) }.map_err(os_err("mprotect(moved)", range))?;
        }
        // SAFETY: as above; unlocking changes no data.
        unsafe { rustix::mm::munlock(at as *mut _, len) }.map_err(os_err("munlock(moved)", range))?;
        let flags = rustix::mm::MremapFlags::MAYMOVE;
        // Both map the same memfd pages at the same offsets (the source came from the view at
        // `range`), so every alias address reads the same bytes as before.
        // SAFETY: the source is the one VMA `moved` owns, read-write and unregistered; the alias
        // `self` owns is not accessed meanwhile (caller's contract) and reads the same bytes after.
        let r = unsafe { rustix::mm::mremap_fixed(at as *mut _, len, len, flags, alias.start as *mut _) };
        if let Err(e) = r {
            let err = os_err("mremap into the alias", range)(e);
            drop(moved);
            // Some kernels unmap the destination before they fail: fill a hole, replace nothing.
            self.fill_alias_hole(range)?;
            return Err(err);
        }
        // The moved range left the reservation: only the slack on both sides is still ours.
        let (reservation, res_len) = moved.into_reservation();
        unmap(reservation, at - reservation);
        unmap(at + len, reservation + res_len - (at + len));
        Ok(())
    }

    /// Maps the memfd over a hole in the alias's part for `range` (`MAP_FIXED_NOREPLACE`: a
    /// mapping another thread put there is never replaced; the alias is then wrong there and
    /// the error says so). Where the part is still mapped, nothing happens. NOREPLACE refuses
    /// with EEXIST when any page is mapped, which is also what a hole that another thread's
    /// mapping landed in looks like: the part is then checked to map this memfd throughout.
    fn fill_alias_hole(&self, range: VaRange) -> Result<(), MappingError> {
        let off = self.offset_of(range)?;
        let alias = self.alias.addr() + off as usize;
        // SAFETY: NOREPLACE maps only where nothing is mapped: no existing mapping, Rust's or
        // another thread's, is touched. What it maps is the memfd at the alias's own offsets.
        let r = unsafe {
            rustix::mm::mmap(
                alias as *mut _,
                range.len as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED_NOREPLACE,
                &self.memfd,
                off,
            )
        };
        match r {
            Ok(_) => Ok(()),
            Err(Errno::EXIST) if self.maps_memfd(VaRange::new(alias as u64, range.len), off) => Ok(()),
            Err(e) => {
                log::error!("alias part {range} lost after a failed move: {e}");
                Err(os_err("mmap(alias)", range)(e))
            }
        }
    }

    /// Whether the entries [`SharedMapping::move_out_app`] took for `range` are this mapping's
    /// (the moved VMA maps the memfd at `range`'s offset): not so if the program had moved the
    /// view away and mapped something else there before the move.
    pub fn moved_is_ours(&self, moved: &MovedOut, range: VaRange) -> bool {
        self.offset_of(range).is_ok_and(|off| self.maps_memfd(moved.moved, off))
    }

    /// Puts entries [`SharedMapping::move_out_app`] took back where they came from, replacing
    /// the empty VMA the move left there: for a move that took someone else's memory (see
    /// [`SharedMapping::moved_is_ours`]), which must get it back as it was.
    ///
    /// # Safety
    ///
    /// `moved` must come from `self.move_out_app(range)`, and nothing may have been mapped at
    /// `range` since but the VMA that move left (its contents, none, are replaced).
    pub unsafe fn move_back(moved: MovedOut, range: VaRange) -> Result<(), MappingError> {
        let (at, len) = (moved.moved.start as usize, range.len as usize);
        let flags = rustix::mm::MremapFlags::MAYMOVE;
        // SAFETY: the source is the VMA `moved` owns in its reservation; the destination holds
        // only the empty VMA the move left (caller's contract): the prior mapping returns whole.
        let r = unsafe { rustix::mm::mremap_fixed(at as *mut _, len, len, flags, range.start as *mut _) };
        let (reservation, res_len) = moved.into_reservation();
        // The slack on both sides is still ours; the moved range left the reservation or, on
        // failure, is unmapped with it (its entries freed).
        if r.is_ok() {
            unmap(reservation, at - reservation);
            unmap(at + len, reservation + res_len - (at + len));
        } else {
            unmap(reservation, res_len);
        }
        r.map(drop).map_err(os_err("mremap back", range))
    }

    /// Whether every page of `at` maps this memfd at `off` onwards, as `/proc/self/maps` says
    /// (the inode and the file offset of each VMA covering it).
    fn maps_memfd(&self, alias: VaRange, off: u64) -> bool {
        let (Ok(file), Some(vmas)) = (MapsFile::of(&self.memfd), crate::maps::meeting(alias)) else { return false };
        let mut cur = alias.start;
        for v in vmas {
            // The VMA must start at or before `cur` (no hole) and map the memfd so that `cur`
            // lands on `off + (cur - alias.start)`.
            if v.range.start > cur || v.file != file || v.off + (cur - v.range.start) != off + (cur - alias.start) {
                return false;
            }
            cur = v.range.end().min(alias.end());
            if cur == alias.end() {
                return true;
            }
        }
        false
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

    /// In a `fork()` child (see `CpuMmu::fork_child`): the alias is unmapped, and each part of the
    /// application view, wherever the program has it mapped at the fork, becomes private
    /// anonymous memory holding the memfd's bytes with its protection (`lost` sub-ranges
    /// inaccessible; see [`privatize_parts`]). Only system calls. Refused (EPERM,
    /// nothing done) in the process that made the mapping, where the alias is in use.
    pub(crate) fn fork_child(&self, parts: &[hetmm_core::cpu::ForkPart], lost: &[VaRange]) -> Result<(), MappingError> {
        if rustix::process::getpid() == self.owner {
            let range = self.app_range();
            return Err(MappingError::Os { op: "fork_child", range, errno: Errno::PERM.raw_os_error() });
        }
        // First: the alias maps the whole memfd, and is not the program's to copy.
        self.alias.drop_in_child();
        privatize_parts(parts, self.memfd.as_fd(), lost, |r| self.offset_of(r))
    }

    /// In a `fork()` child, once every CPU side copied its parts: the views of the memfd left
    /// over become zeros ([`zero_leftovers_in_child`]). Nothing in the process that made the
    /// mapping.
    pub(crate) fn zero_leftovers_in_child(&self) -> Result<(), MappingError> {
        if rustix::process::getpid() == self.owner {
            return Ok(());
        }
        zero_leftovers_in_child(self.memfd.as_fd(), self.app_range())
    }

    /// In a `fork()` child, once every view was made private: lets go of the memfd
    /// ([`retire_fd_in_child`]). Nothing in the process that made the mapping.
    pub(crate) fn retire_in_child(&self, null: BorrowedFd<'_>) {
        if rustix::process::getpid() != self.owner {
            retire_fd_in_child(self.memfd.as_fd(), null);
        }
    }

    /// Writes `src` into the backing at byte offset `off` (`pwrite` on the memfd: no view is
    /// touched, so neither gets page-table entries).
    pub fn write_backing(&self, off: u64, src: &[u8]) -> Result<(), MappingError> {
        let range = VaRange::new(off, src.len() as u64);
        if off.checked_add(src.len() as u64).is_none_or(|e| e > self.len as u64) {
            return Err(MappingError::OutOfBounds { range, region: VaRange::new(0, self.len as u64) });
        }
        let mut done = 0;
        while done < src.len() {
            let n =
                rustix::io::pwrite(&self.memfd, &src[done..], off + done as u64).map_err(os_err("pwrite", range))?;
            if n == 0 {
                return Err(MappingError::Os { op: "pwrite", range, errno: Errno::NOSPC.raw_os_error() });
            }
            done += n;
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes of the backing at byte offset `off` into `dst` through the
    /// manager's alias, the way copy engines read host data (faulting in the alias's page-table
    /// entries where it has none).
    pub fn read_alias(&self, off: u64, dst: &mut [u8]) -> Result<(), MappingError> {
        self.read_alias_with(off, dst, std::ptr::copy_nonoverlapping::<u8>)
    }

    /// [`SharedMapping::read_alias`] with the copy done by `copy` (a device's DMA routine, say).
    pub fn read_alias_with(&self, off: u64, dst: &mut [u8], copy: CopyFn) -> Result<(), MappingError> {
        let range = VaRange::new(off, dst.len() as u64);
        if off.checked_add(dst.len() as u64).is_none_or(|e| e > self.len as u64) || self.alias.is_gone() {
            return Err(MappingError::OutOfBounds { range, region: VaRange::new(0, self.len as u64) });
        }
        // The alias, owned by `self`, is only unmapped in a fork child (checked just above); the
        // memfd behind it is at least `len` bytes long: every byte in it is readable.
        // SAFETY: `[off, off + dst.len())` was checked inside the (readable) alias; `dst` is a
        // distinct Rust buffer, so the ranges cannot overlap: `copy`'s contract holds.
        unsafe { copy((self.alias.addr() + off as usize) as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
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
        for p in self.parts_to_unmap() {
            unmap(p.start as usize, p.len as usize);
        }
    }
}

/// Addresses where the program grew a view of a memfd of hetmm in place (see [`room_at`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Room {
    /// The addresses.
    pub(crate) range: VaRange,
    /// Their protection (the view's).
    pub(crate) prot: hetmm_core::types::Prot,
    /// `PROT_EXEC`.
    pub(crate) exec: bool,
}

/// Where managed memory shows a memfd of hetmm: the memfd (device and inode), and the memfd
/// offsets (start, length) some managed view shows, at the addresses it is known at.
#[derive(Debug, Clone, Default)]
pub(crate) struct MemfdUse {
    /// The memfd, as `/proc/self/maps` names it.
    pub(crate) file: MapsFile,
    /// Offset ranges managed memory shows.
    pub(crate) used: Vec<(u64, u64)>,
    /// The manager's aliases of the memfd: never room, whatever offsets they show (an alias may
    /// lie right after a view, and outlive what the program still has of it).
    pub(crate) aliases: Vec<VaRange>,
}

/// If `page` shows one of the memfds of `uses` at an offset no managed memory shows, the
/// addresses of that mapping around it that show only such offsets: what the program grew a
/// view into in place with `mremap` (the kernel extended the mapping over the memfd's room to
/// grow, [`GROWTH_ROOM`], or over offsets whose view the program had unmapped, say by shrinking
/// it first). That memory holds nothing managed: holes, or data the program gave up.
pub(crate) fn room_at(page: VaRange, uses: &[MemfdUse]) -> Option<Room> {
    let vma = crate::maps::meeting(page)?.into_iter().find(|v| v.range.contains(page.start))?;
    if !vma.shared || vma.file.ino == 0 {
        return None;
    }
    let using = uses.iter().find(|u| u.file == vma.file)?;
    if using.aliases.iter().any(|a| a.intersect(&vma.range).is_some()) {
        return None;
    }
    let used = &using.used;
    let off = vma.off + (page.start - vma.range.start);
    if used.iter().any(|&(o, l)| (o..o + l).contains(&off)) {
        return None;
    }
    // The unused offsets around `off`, as addresses of this mapping.
    let lo = used.iter().map(|&(o, l)| o + l).filter(|&e| e <= off).max().unwrap_or(0).max(vma.off);
    let hi = used.iter().map(|&(o, _)| o).filter(|&o| o > off).min().unwrap_or(u64::MAX);
    let start = vma.range.start + (lo - vma.off);
    let end = vma.range.end().min(vma.range.start.saturating_add(hi - vma.off));
    Some(Room { range: VaRange::new(start, end - start), prot: vma.prot, exec: vma.exec })
}

/// CPU protection as `mmap`/`mprotect` flags.
pub fn prot_flags(prot: hetmm_core::types::Prot) -> ProtFlags {
    use hetmm_core::types::Prot;
    let mut f = ProtFlags::empty();
    if prot.contains(Prot::READ) {
        f |= ProtFlags::READ;
    }
    if prot.contains(Prot::WRITE) {
        f |= ProtFlags::WRITE;
    }
    f
}

fn os_err(op: &'static str, range: VaRange) -> impl Fn(Errno) -> MappingError {
    move |e: Errno| MappingError::Os { op, range, errno: e.raw_os_error() }
}

fn check(range: VaRange) -> Result<(), MappingError> {
    if range.len == 0 || !range.is_page_aligned() || range.start.checked_add(range.len).is_none() {
        return Err(MappingError::Unaligned(range));
    }
    Ok(())
}

/// Drops the PTEs of a managed application view (`MADV_DONTNEED`) outside a
/// [`SharedMapping`]: views of registered memory, which the program owns.
///
/// # Safety
///
/// `range` must lie in a view hetmm maps `MAP_SHARED` from its own memfd, where DONTNEED drops
/// page-table entries and keeps the data (on private memory it would zero the program's data).
pub(crate) unsafe fn zap_view(range: VaRange) -> Result<(), MappingError> {
    check(range)?;
    // If the program unmapped the range meanwhile, madvise fails with ENOMEM (no effect).
    // SAFETY: a MAP_SHARED view of a hetmm memfd (our contract): DONTNEED only drops its
    // page-table entries, the memfd keeps the content, so no Rust-visible value changes.
    unsafe { rustix::mm::madvise(range.start as *mut _, range.len as usize, Advice::LinuxDontNeed) }
        .map_err(os_err("madvise(DONTNEED)", range))
}

/// Whether every page of `range` is mapped by some VMA (`madvise(MADV_NORMAL)` fails with
/// ENOMEM on holes).
pub fn is_mapped(range: VaRange) -> bool {
    if check(range).is_err() {
        return false;
    }
    // SAFETY: MADV_NORMAL only resets the readahead hint of existing mappings; it changes no
    // content and no mapping.
    unsafe { rustix::mm::madvise(range.start as *mut _, range.len as usize, Advice::Normal) }.is_ok()
}

fn mprotect_flags(prot: hetmm_core::types::Prot) -> rustix::mm::MprotectFlags {
    rustix::mm::MprotectFlags::from_bits_retain(prot_flags(prot).bits())
}

/// [`mprotect_flags`] of the program's protection `prot`, with `PROT_EXEC` if `exec` (the
/// core's [`hetmm_core::types::Prot`] has no execute bit: the program's own is carried beside).
fn program_mprotect_flags(prot: hetmm_core::types::Prot, exec: bool) -> rustix::mm::MprotectFlags {
    let exec = if exec { rustix::mm::MprotectFlags::EXEC } else { rustix::mm::MprotectFlags::empty() };
    mprotect_flags(prot) | exec
}

/// Changes the protection of a managed application view.
///
/// # Safety
///
/// `range` must lie in an application view of memory hetmm manages, whose protection the program
/// asked for: no Rust reference may rely on the access it takes away.
pub(crate) unsafe fn protect_view(range: VaRange, prot: hetmm_core::types::Prot) -> Result<(), MappingError> {
    check(range)?;
    // SAFETY: a managed application view (our contract); protection changes no content, and
    // accesses against it fault, as the program asked.
    unsafe { rustix::mm::mprotect(range.start as *mut _, range.len as usize, mprotect_flags(prot)) }
        .map_err(os_err("mprotect", range))
}

/// The calling thread's stack, as its thread attributes give it (glibc finds the main
/// thread's from `/proc/self/maps`); `None` where they cannot be read.
pub(crate) fn own_stack() -> Option<VaRange> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: pthread_getattr_np initializes `attr` when it returns 0, and only then is it
    // read (and destroyed, once).
    unsafe {
        if libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) != 0 {
            return None;
        }
        let mut addr = std::ptr::null_mut();
        let mut size = 0usize;
        let r = libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size);
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        (r == 0 && size > 0).then(|| VaRange::new(addr as u64, size as u64))
    }
}

/// Gives `len` bytes at `addr` of a manager's alias of mirrored shared memory the protection
/// `prot` (the alias keeps the protection the program's mapping had when it was registered).
///
/// # Safety
///
/// `addr..addr + len` must be part of a manager's alias of mirrored memory, mapped while the
/// caller's mirror lives, through which devices access the memory only as the core allows.
pub(crate) unsafe fn protect_alias(addr: usize, len: usize, prot: hetmm_core::types::Prot) -> Result<(), MappingError> {
    let range = VaRange::new(addr as u64, len as u64);
    // SAFETY: the caller's contract; protection changes no content.
    unsafe { rustix::mm::mprotect(addr as *mut _, len, mprotect_flags(prot)) }.map_err(os_err("mprotect(alias)", range))
}

/// Whether `len` bytes at `addr` (a manager's alias, mapped while the caller's mirror lives)
/// are all zero. Volatile reads, not a slice: copy engines may write the alias meanwhile, and a
/// Rust reference over memory written concurrently would be a data race. A concurrent write
/// only makes the answer stale.
///
/// # Safety
///
/// `addr..addr + len` must be readable memory that stays mapped during the call (a manager's
/// alias).
pub(crate) unsafe fn alias_is_zero(addr: usize, len: usize) -> bool {
    let words = if addr.is_multiple_of(8) { len / 8 } else { 0 };
    // SAFETY: word `i < len / 8` of `addr..addr + len` (8-aligned), readable and mapped (our
    // contract); volatile, so a concurrent writer is no data race.
    let word = |i: usize| unsafe { ((addr + 8 * i) as *const u64).read_volatile() };
    // SAFETY: byte `i < len` of the same alias range.
    let byte = |i: usize| unsafe { ((addr + i) as *const u8).read_volatile() };
    (0..words).all(|i| word(i) == 0) && (8 * words..len).all(|i| byte(i) == 0)
}

/// In a `fork()` child, which keeps the parent's hetmm objects but never uses or drops them:
/// points the descriptor number of `fd` at `null`'s file instead (`dup3`), so the child stops
/// holding `fd`'s file (a memfd, whose pages would stay allocated for as long as the child lives
/// after the parent frees them; a userfaultfd) while the number stays open, owned by the same
/// never-dropped object: nothing can later close a number the child has reused. A system call
/// only.
pub(crate) fn retire_fd_in_child(fd: BorrowedFd<'_>, null: BorrowedFd<'_>) {
    use std::os::fd::AsRawFd;
    // The number stays open and its owner keeps it (the caller's contract: a fork child, where
    // the owner is never used or dropped).
    // SAFETY: `dup3` only changes which file `fd`'s number refers to; no memory is touched.
    let _ = unsafe { libc::dup3(null.as_raw_fd(), fd.as_raw_fd(), libc::O_CLOEXEC) };
}

/// Creates a memfd of `len` bytes and maps it at a fresh 2 MiB-aligned alias.
pub(crate) fn memfd_with_alias(len: u64) -> Result<(OwnedFd, usize), MappingError> {
    if len == 0 || !len.is_multiple_of(PAGE_SIZE) || len > (isize::MAX as u64) - BLOCK_SIZE {
        return Err(MappingError::BadLength(len));
    }
    let whole = VaRange::new(0, len);
    let memfd =
        rustix::fs::memfd_create("hetmm-registered", MemfdFlags::CLOEXEC).map_err(os_err("memfd_create", whole))?;
    size_memfd(&memfd, len).map_err(os_err("ftruncate", whole))?;
    let alias = map_aligned(&memfd, len as usize).map_err(os_err("mmap alias", whole))?;
    Ok((memfd, alias))
}

/// Copies the program's private memory `[range]` (mapped with protection `prot`) into `memfd`
/// from byte `off`, which the alias at `dst` shows. The kernel copies (`pwrite` from the
/// program's addresses), so a page the program could not read either (a file mapping past the
/// end of its file) is an error here, where reading it directly would raise SIGBUS in the
/// manager. Of anonymous memory (`had` given: the process's pagemap and runs) only the pages
/// with data are copied (the others read as zeros, as the memfd's holes do): the runs that had
/// page-table entries when the caller began holding the program's writes (`mirror::WriteHold`,
/// whose write-protect then leaves markers that read as swap entries on the pages that had
/// none), and the pages present now (written since, and swap or migration entries the hold did
/// not write-protect; a page written just before the hold and swapped out or migrating when
/// this reads its entry would be taken for a marker and not copied: pagemap read without
/// privileges cannot tell them apart). Memory without `READ` is made readable for the copy and
/// given its protection back, so an error leaves the range as it was. Allocates nothing (the
/// caller may be holding the program's writes).
///
/// (Reading `/proc/self/mem` into the alias, as this did first, took 1.8x as long on dense
/// memory: every alias page faulted on its own. See `examples/register_cost.rs`.)
pub(crate) fn copy_private(
    range: VaRange,
    prot: hetmm_core::types::Prot,
    exec: bool,
    had: Option<(&crate::pagemap::Pagemap, &[VaRange])>,
    memfd: BorrowedFd<'_>,
    off: u64,
    dst: usize,
) -> Result<(), MappingError> {
    check(range)?;
    let (addr, len) = (range.start as usize, range.len as usize);
    let readable = prot.contains(hetmm_core::types::Prot::READ);
    if !readable {
        // SAFETY: the caller found this range mapped private in /proc/self/maps; making it
        // readable changes no content and is undone below.
        unsafe { rustix::mm::mprotect(addr as *mut _, len, rustix::mm::MprotectFlags::READ) }
            .map_err(os_err("mprotect", range))?;
    }
    let copy = |run: VaRange| {
        let rel = run.start - range.start;
        copy_run(run, memfd, off + rel, dst + rel as usize)
    };
    let copied = match had {
        Some((pm, had)) => {
            let had_entry = |va: u64| {
                let i = had.partition_point(|r| r.end() <= va);
                had.get(i).is_some_and(|r| r.contains(va))
            };
            pm.runs(range, |va, e| crate::pagemap::has_data(e) || had_entry(va), copy)
        }
        None => (range.start..range.end())
            .step_by(COPY_PIECE)
            .try_for_each(|at| copy(VaRange::new(at, (COPY_PIECE as u64).min(range.end() - at)))),
    };
    if !readable {
        // SAFETY: gives the range back the protection it had before the mprotect above.
        unsafe { rustix::mm::mprotect(addr as *mut _, len, program_mprotect_flags(prot, exec)) }
            .map_err(os_err("mprotect", range))?;
    }
    copied
}

/// The most [`copy_run`] copies at once: the memfd never holds more than this of zero pages
/// that are punched out again.
const COPY_PIECE: usize = 2 << 20;

/// Copies the program's `run` (at most [`COPY_PIECE`] bytes, readable) into `memfd` at `off`,
/// then punches the pages that hold only zeros out of the memfd again (through `dst`, the
/// alias showing `off`), so the memfd ends as sparse as the program's memory was.
fn copy_run(run: VaRange, memfd: BorrowedFd<'_>, off: u64, dst: usize) -> Result<(), MappingError> {
    use std::os::fd::AsRawFd;
    let len = run.len as usize;
    let mut done = 0;
    while done < len {
        // No Rust reference to the program's memory is made: its own threads may write it.
        // SAFETY: the kernel reads `[run.start + done, run.end)`, mapped readable (the caller's
        // contract), and checks every address it reads.
        let n = unsafe {
            libc::pwrite(
                memfd.as_raw_fd(),
                (run.start as usize + done) as *const _,
                len - done,
                (off + done as u64) as i64,
            )
        };
        // The kernel stops at the first page it cannot fault in: EFAULT if that is the first
        // page asked for, a short write otherwise (and EFAULT on the next).
        let errno = match n {
            1.. => {
                done += n as usize;
                continue;
            }
            0 => Errno::IO,
            _ => match Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)) {
                Errno::INTR => continue,
                e => e,
            },
        };
        let page = VaRange::new(hetmm_core::types::align_down(run.start + done as u64, PAGE_SIZE), PAGE_SIZE);
        return Err(MappingError::Os { op: "pwrite from program memory", range: page, errno: errno.raw_os_error() });
    }
    punch_zero_pages(dst, len);
    Ok(())
}

/// Frees the pages of `[dst, dst + len)` (at most [`COPY_PIECE`] bytes of an alias of a memfd
/// only this thread uses) that hold only zeros: they read as zeros again from the hole.
fn punch_zero_pages(dst: usize, len: usize) {
    let psz = PAGE_SIZE as usize;
    // On the stack: see `copy_private`.
    let mut zero = [false; COPY_PIECE / PAGE_SIZE as usize];
    let pages = len.div_ceil(psz).min(zero.len());
    for (k, z) in zero[..pages].iter_mut().enumerate() {
        *z = alias_page_is_zero(dst + k * psz);
    }
    let mut i = 0;
    while i < pages {
        let run = zero[i..pages].iter().take_while(|&&z| z).count();
        if run > 0 {
            // SAFETY: these pages of the caller's alias hold only zeros: no content changes.
            let _ = unsafe { rustix::mm::madvise((dst + i * psz) as *mut _, run * psz, Advice::LinuxRemove) };
        }
        i += run.max(1);
    }
}

/// Whether the alias page at `at` holds only zeros.
fn alias_page_is_zero(at: usize) -> bool {
    // SAFETY: a whole page of an alias (`punch_zero_pages`'s contract), readable, written by no
    // one meanwhile; the slice ends before the page is punched.
    let page = unsafe { std::slice::from_raw_parts(at as *const u64, PAGE_SIZE as usize / 8) };
    page.iter().all(|&w| w == 0)
}

/// Replaces private memory `[range]` of the program with `memfd` (from `offset`), keeping the
/// data: the caller has copied the bytes into the memfd ([`copy_private`]); the memfd is mapped
/// `MAP_SHARED | MAP_FIXED` over the same addresses with protection `prot` (and `PROT_EXEC` if
/// `exec`).
///
/// A write of the program's to the range between the copy and this would be lost: the caller
/// holds them meanwhile (`mirror::WriteHold`).
pub(crate) fn adopt_private(
    range: VaRange,
    prot: hetmm_core::types::Prot,
    exec: bool,
    memfd: &OwnedFd,
    offset: u64,
) -> Result<(), MappingError> {
    check(range)?;
    let (addr, len) = (range.start as usize, range.len as usize);
    // SAFETY: MAP_FIXED replaces exactly the program's private pages of `range`, whose content
    // the caller copied into the memfd; the program sees the same bytes at the same addresses.
    unsafe {
        let prot = ProtFlags::from_bits_retain(program_mprotect_flags(prot, exec).bits());
        rustix::mm::mmap(addr as *mut _, len, prot, MapFlags::SHARED | MapFlags::FIXED, memfd, offset)
    }
    .map_err(os_err("mmap(FIXED) over program memory", range))?;
    Ok(())
}

/// Gives `range` back to the program as private anonymous memory holding the bytes of `memfd`
/// from byte `off` (the memfd's holes are not read: they stay untouched zero pages), with
/// protection `prot` (and `PROT_EXEC` if `exec`): a fresh anonymous mapping is filled, then moved over the range with
/// `mremap(MREMAP_FIXED)`. On failure the range is left as it was. Moves the memfd's file
/// offset.
pub(crate) fn restore_private(
    range: VaRange,
    prot: hetmm_core::types::Prot,
    exec: bool,
    memfd: BorrowedFd<'_>,
    off: u64,
) -> Result<(), MappingError> {
    check(range)?;
    #[cfg(test)]
    if inject::restore_fails() {
        return Err(os_err("mremap(FIXED)", range)(Errno::NOMEM));
    }
    move_copy_over(range, program_mprotect_flags(prot, exec), memfd, off, LostBytes::NONE, false)
}

/// Failures the tests inject into this thread's calls (nothing outside tests).
#[cfg(test)]
pub(crate) mod inject {
    use std::cell::Cell;

    thread_local! {
        /// How many more of this thread's [`super::restore_private`] calls succeed before one
        /// fails (`None`: none fails).
        static RESTORES_LEFT: Cell<Option<u32>> = const { Cell::new(None) };
    }

    /// Makes this thread's restore after `ok` more succeed fail, once.
    pub(crate) fn fail_restore_after(ok: u32) {
        RESTORES_LEFT.with(|c| c.set(Some(ok)));
    }

    /// Whether this call is the one to fail (counting it).
    pub(super) fn restore_fails() -> bool {
        RESTORES_LEFT.with(|c| match c.get() {
            Some(0) => {
                c.set(None);
                true
            }
            Some(n) => {
                c.set(Some(n - 1));
                false
            }
            None => false,
        })
    }
}

/// In a fork child: makes every part of a view of `memfd` the child's own, where `offset_of`
/// gives a part's (or a lost range's) offset into the memfd. Goes on after a failure, so every
/// part is dealt with, and returns the first error. System calls only.
///
/// The parts are the core's regions as the fork's prepare handler found them, but the program
/// may have unmapped, moved or mapped over that memory since, on another thread, before the
/// fork itself (its `munmap`/`mremap` returns once the reader has read the event; the core
/// applies it only after the fork). So the parts name only which bytes of the memfd are the
/// program's memory; where the child has them mapped is read from the kernel
/// (`/proc/self/maps`, [`shared_views_of`]): every `MAP_SHARED` mapping of `memfd` over those
/// bytes, wherever it is now, becomes private anonymous memory holding the same bytes, with the
/// protection it has (execute included), the `lost` bytes inaccessible. Memory the program
/// mapped over a part is left alone, and a part unmapped in full or in part is copied as far as
/// it is still mapped. The caller has unmapped its alias of `memfd` first (else the alias would
/// be copied too).
///
/// If the kernel's map cannot be read, falls back to the parts at their old addresses
/// ([`privatize_in_child`]) and returns that error.
pub(crate) fn privatize_parts(
    parts: &[hetmm_core::cpu::ForkPart],
    memfd: BorrowedFd<'_>,
    lost: &[VaRange],
    offset_of: impl Fn(VaRange) -> Result<u64, MappingError>,
) -> Result<(), MappingError> {
    let whole = parts.iter().fold(None::<VaRange>, |acc, p| {
        Some(match acc {
            None => p.range,
            Some(a) => {
                let (s, e) = (a.start.min(p.range.start), a.end().max(p.range.end()));
                VaRange::new(s, e - s)
            }
        })
    });
    let Some(whole) = whole else { return Ok(()) };
    let file = MapsFile::of(memfd).map_err(os_err("fstat memfd", whole))?;
    let offset_of = &offset_of;
    let lost = LostBytes { ranges: lost, offset_of };
    let mut result = Ok(());
    // Each pass copies the views it found (at most `MAX_VIEWS`); a view copied is no longer a
    // shared mapping of the memfd, so a pass that found fewer was the last. Bounded: a view whose
    // copy and seal both failed would be found again.
    for _ in 0..MAX_PASSES {
        let mut found = [ChildView::default(); MAX_VIEWS];
        let n = match shared_views_of(
            file,
            |vma_off, vma_len| {
                parts.iter().filter_map(move |p| {
                    let off = offset_of(p.range).ok()?;
                    let s = off.max(vma_off);
                    let e = (off + p.range.len).min(vma_off + vma_len);
                    (s < e).then(|| (s, e - s))
                })
            },
            &mut found,
        ) {
            Ok(n) => n,
            Err(errno) => {
                // No map to read: the parts where the prepare found them, as far as mapped.
                let e = MappingError::Os { op: "read /proc/self/maps", range: whole, errno: errno.raw_os_error() };
                for p in parts {
                    let _ = offset_of(p.range).and_then(|off| privatize_in_child(p.range, p.prot, memfd, off, lost));
                }
                return Err(e);
            }
        };
        for v in &found[..n] {
            let r = copy_over_or_seal(v.range, v.prot, memfd, v.off, lost);
            if result.is_ok() {
                result = r;
            }
        }
        // Views over bytes of no part are made zeros only once every CPU side sharing the
        // memfd has copied its parts ([`zero_leftovers_in_child`]): after `mremap` moved part of
        // a region, the part moved away is another side's, and zeroed here it was lost.
        if n < MAX_VIEWS {
            return result;
        }
    }
    result.and(Err(MappingError::Os { op: "fork copy", range: whole, errno: Errno::AGAIN.raw_os_error() }))
}

/// In a fork child, once every CPU side sharing `memfd` has copied its parts: every view of the
/// memfd still shared lies over bytes of no part. That is memory the program grew in place with
/// `mremap` and had not touched at the fork (the parent's first touch there makes fresh private
/// memory, zeros), or entries a revoke moved out for the reaper. Each becomes fresh private
/// memory, zeros, with its protection: left shared, the child and its siblings wrote each
/// other's memory there, and after a shrink and a regrow read the bytes the program gave up.
/// System calls only. `whole` names the memory in errors.
pub(crate) fn zero_leftovers_in_child(memfd: BorrowedFd<'_>, whole: VaRange) -> Result<(), MappingError> {
    let file = MapsFile::of(memfd).map_err(os_err("fstat memfd", whole))?;
    zero_other_views(file, whole)
}

fn zero_other_views(file: MapsFile, whole: VaRange) -> Result<(), MappingError> {
    let mut result = Ok(());
    for _ in 0..MAX_PASSES {
        let mut found = [ChildView::default(); MAX_VIEWS];
        let n = shared_views_of(file, |off, len| std::iter::once((off, len)), &mut found).map_err(|errno| {
            MappingError::Os { op: "read /proc/self/maps", range: whole, errno: errno.raw_os_error() }
        })?;
        for v in &found[..n] {
            let prot = ProtFlags::from_bits_retain(v.prot.bits());
            let flags = MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE;
            // SAFETY: a fork child's view of a hetmm memfd over bytes of no part (see above):
            // nothing of it is the program's data, and nothing in Rust references it.
            let r = unsafe { rustix::mm::mmap_anonymous(v.range.start as *mut _, v.range.len as usize, prot, flags) };
            if let Err(errno) = r {
                seal_quiet(v.range);
                if result.is_ok() {
                    result = Err(MappingError::Os {
                        op: "mmap(FIXED) anonymous",
                        range: v.range,
                        errno: errno.raw_os_error(),
                    });
                }
            }
        }
        if n < MAX_VIEWS {
            return result;
        }
    }
    result.and(Err(MappingError::Os { op: "fork zero", range: whole, errno: Errno::AGAIN.raw_os_error() }))
}

/// Views a pass of [`privatize_parts`] copies at most (a stack array: no allocation in a child).
const MAX_VIEWS: usize = 32;
/// Passes of [`privatize_parts`] at most.
const MAX_PASSES: usize = 4096;

/// One shared view of a memfd found in the child: its addresses, the memfd offset of its first
/// byte, and its protection.
#[derive(Debug, Clone, Copy)]
struct ChildView {
    range: VaRange,
    off: u64,
    prot: rustix::mm::MprotectFlags,
}

impl Default for ChildView {
    fn default() -> Self {
        ChildView { range: VaRange::new(0, 0), off: 0, prot: rustix::mm::MprotectFlags::empty() }
    }
}

/// Lost bytes of a view: ranges of its addresses, put into memfd offsets by `offset_of`.
#[derive(Clone, Copy)]
struct LostBytes<'a> {
    ranges: &'a [VaRange],
    offset_of: &'a dyn Fn(VaRange) -> Result<u64, MappingError>,
}

impl LostBytes<'_> {
    const NONE: LostBytes<'static> = LostBytes { ranges: &[], offset_of: &|r| Err(MappingError::Unaligned(r)) };

    /// The lost bytes of the memfd's `[off, off + len)`, as (start relative to `off`, length).
    fn within(&self, off: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().filter_map(move |&l| {
            let lo = (self.offset_of)(l).ok()?;
            let s = lo.max(off);
            let e = (lo + l.len).min(off + len);
            (s < e).then(|| (s - off, e - s))
        })
    }
}

/// Reads `/proc/self/maps` and puts into `out` the `MAP_SHARED` mappings of `file` over the
/// memfd bytes that `wanted` gives for a mapping's offset and length (the wanted byte ranges
/// inside it, as offset and length): each such range, at the addresses that map it, with the
/// mapping's protection. Returns how many it put (all of `out` if there may be more). Only
/// system calls and the stack (a fork child uses it); the caller changes no mapping while it
/// reads.
fn shared_views_of<I: Iterator<Item = (u64, u64)>>(
    file: MapsFile,
    wanted: impl Fn(u64, u64) -> I,
    out: &mut [ChildView],
) -> Result<usize, Errno> {
    let mut n = 0;
    crate::maps::for_each(crate::maps::Which::SharedFiles, |vma| {
        if !vma.shared || vma.file != file {
            return true;
        }
        let prot = program_mprotect_flags(vma.prot, vma.exec);
        for (off, l) in wanted(vma.off, vma.range.len) {
            if n == out.len() {
                return false;
            }
            let range = VaRange::new(vma.range.start + (off - vma.off), l);
            out[n] = ChildView { range, off, prot };
            n += 1;
        }
        true
    })?;
    Ok(n)
}

/// In a `fork()` child: replaces the program's view `range` of `memfd` (from byte `off`) with
/// private anonymous memory holding the same bytes, with protection `prot`; the `lost` bytes
/// inside it become inaccessible. Holes of the memfd are not read (they stay zero pages).
/// If a step fails, the view is replaced by inaccessible memory, so the child can never reach
/// the parent's memory through it. A range the program no longer maps in full is left alone:
/// the fallback of [`privatize_parts`] when the kernel's map cannot be read.
///
/// Runs in a forked child of a multithreaded process: only system calls (no allocation, no
/// locks, no logging). Moves the memfd's file offset (shared with the parent, which never
/// uses it).
fn privatize_in_child(
    range: VaRange,
    prot: hetmm_core::types::Prot,
    memfd: BorrowedFd<'_>,
    off: u64,
    lost: LostBytes<'_>,
) -> Result<(), MappingError> {
    check(range)?;
    if !is_mapped(range) {
        return Ok(());
    }
    copy_over_or_seal(range, mprotect_flags(prot), memfd, off, lost)
}

/// In a fork child: [`move_copy_over`] of a whole view, or, where that fails, the view made
/// inaccessible ([`seal_quiet`]), so the child never reaches the parent's memory through it.
fn copy_over_or_seal(
    range: VaRange,
    prot: rustix::mm::MprotectFlags,
    memfd: BorrowedFd<'_>,
    off: u64,
    lost: LostBytes<'_>,
) -> Result<(), MappingError> {
    let r = move_copy_over(range, prot, memfd, off, lost, true);
    if r.is_err() {
        seal_quiet(range);
    }
    r
}

/// Fills a fresh private anonymous mapping with the bytes of `memfd` from `off` (its holes stay
/// untouched zero pages), gives it protection `prot` with the `lost` bytes inaccessible, and
/// moves it over `range` with `mremap(MREMAP_FIXED)`: the program then sees the same bytes at the
/// same addresses, privately. On failure the temporary mapping is gone and `range` is as it was.
/// `huge`: ask for huge pages (fewer faults while the copy fills a whole range; not for a sparse
/// one, which they would make resident). System calls only (a fork child uses it); the caller
/// has checked `range`, a hetmm view.
fn move_copy_over(
    range: VaRange,
    prot: rustix::mm::MprotectFlags,
    memfd: BorrowedFd<'_>,
    off: u64,
    lost: LostBytes<'_>,
    huge: bool,
) -> Result<(), MappingError> {
    let len = range.len as usize;
    // Not charged up front (NORESERVE): the view may be far larger than this machine's memory
    // and mostly holes, which the copy skips; charged whole, the kernel refused it (ENOMEM) and
    // the child lost the whole view.
    let flags = MapFlags::PRIVATE | MapFlags::NORESERVE;
    // SAFETY: a fresh private anonymous mapping at an address the kernel picks.
    let tmp =
        unsafe { rustix::mm::mmap_anonymous(std::ptr::null_mut(), len, ProtFlags::READ | ProtFlags::WRITE, flags) }
            .map_err(os_err("mmap anonymous", range))? as usize;
    if huge {
        // A hint: failure changes nothing.
        // SAFETY: `tmp` is the mapping made above, ours alone; the hint changes no content.
        let _ = unsafe { rustix::mm::madvise(tmp as *mut _, len, Advice::LinuxHugepage) };
    }
    // SAFETY: `tmp` is the fresh `len`-byte (`range.len`) mapping made above, ours alone.
    let r = unsafe { fill_from_memfd(tmp, range, memfd, off) }.and_then(|()| {
        // SAFETY: `tmp` is the mapping made above, ours alone; its protection changes no content.
        unsafe { rustix::mm::mprotect(tmp as *mut _, len, prot) }.map_err(os_err("mprotect", range))?;
        for (rel, n) in lost.within(off, range.len) {
            let at = tmp + rel as usize;
            let x = VaRange::new(range.start + rel, n);
            // SAFETY: `[at, at + n)` lies inside `tmp` (`within` clips to the `range.len` bytes).
            unsafe { rustix::mm::mprotect(at as *mut _, n as usize, rustix::mm::MprotectFlags::empty()) }
                .map_err(os_err("mprotect", x))?;
        }
        // Moves our filled mapping over the program's view of the memfd (caller's contract).
        // SAFETY: the program sees the same bytes at the same addresses there, privately.
        unsafe {
            rustix::mm::mremap_fixed(tmp as *mut _, len, len, rustix::mm::MremapFlags::MAYMOVE, range.start as *mut _)
        }
        .map(drop)
        .map_err(os_err("mremap(FIXED)", range))
    });
    if r.is_err() {
        unmap_quiet(tmp, len);
    }
    r
}

/// The runs of `range` (shown by `memfd` from byte `off`) where the memfd has data (its holes
/// read as zeros), in `range`'s addresses. Where the extents cannot be read, all of `range`.
pub(crate) fn data_in(memfd: BorrowedFd<'_>, off: u64, range: VaRange) -> Vec<VaRange> {
    data_extents(memfd, off, off + range.len)
        .map(|x| x.map(|(data, hole)| VaRange::new(range.start + (data - off), hole - data)))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|_| vec![range])
}

/// The data extents of `memfd` in the file offsets `[off, end)`, as `(start, end)` in order
/// (`lseek` with `SEEK_DATA` and `SEEK_HOLE`; the holes read as zeros). Allocates nothing.
fn data_extents(memfd: BorrowedFd<'_>, off: u64, end: u64) -> impl Iterator<Item = Result<(u64, u64), Errno>> + '_ {
    let mut pos = off;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let extent = match rustix::fs::seek(memfd, rustix::fs::SeekFrom::Data(pos)) {
            // No data after `pos`, or none before `end`.
            Err(Errno::NXIO) => None,
            Ok(data) if data >= end => None,
            Ok(data) => Some(rustix::fs::seek(memfd, rustix::fs::SeekFrom::Hole(data)).map(|h| (data, h.min(end)))),
            Err(e) => Some(Err(e)),
        };
        pos = match extent {
            Some(Ok((_, hole))) => hole,
            _ => end,
        };
        extent
    })
}

/// Copies the data extents of `memfd` from `off` into `range.len` bytes at `dst` (holes are
/// skipped: `dst` is fresh zeroed memory).
///
/// # Safety
///
/// `dst..dst + range.len` must be writable memory the caller owns, which no Rust reference
/// covers during the call.
unsafe fn fill_from_memfd(dst: usize, range: VaRange, memfd: BorrowedFd<'_>, off: u64) -> Result<(), MappingError> {
    for extent in data_extents(memfd, off, off + range.len) {
        let (data, hole) = extent.map_err(os_err("lseek(SEEK_DATA, SEEK_HOLE)", range))?;
        let mut cur = data;
        while cur < hole {
            // SAFETY: `[dst + (cur - off), dst + (hole - off))` is in the caller's mapping of
            // `range.len` bytes (off <= cur < hole <= off + len), unreferenced (our contract).
            let buf = unsafe {
                std::slice::from_raw_parts_mut((dst + (cur - off) as usize) as *mut u8, (hole - cur) as usize)
            };
            match rustix::io::pread(memfd, buf, cur) {
                // The memfd is at least `off + len` long; a short file would be a bug: stop.
                Ok(0) => return Err(MappingError::Os { op: "pread", range, errno: Errno::IO.raw_os_error() }),
                Ok(n) => cur += n as u64,
                Err(Errno::INTR) => {}
                Err(e) => return Err(os_err("pread", range)(e)),
            }
        }
    }
    Ok(())
}

/// Replaces `range` with inaccessible memory (a fork child whose copy failed must not reach
/// the parent's memory); unmaps it if even that fails. No logging.
fn seal_quiet(range: VaRange) {
    let flags = MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE;
    // SAFETY: replaces the child's view of a hetmm memfd (the caller's range) with fresh
    // PROT_NONE memory: accesses fault instead of reaching the parent's memory.
    let r = unsafe { rustix::mm::mmap_anonymous(range.start as *mut _, range.len as usize, ProtFlags::empty(), flags) };
    if r.is_err() {
        unmap_quiet(range.start as usize, range.len as usize);
    }
}

/// Unmaps `[addr, addr + len)` of a mapping this crate created, ignoring errors (fork child:
/// no logging).
pub(crate) fn unmap_quiet(addr: usize, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: only called on mappings this crate created (a fork child's alias or scratch
    // mapping), which nothing accesses afterwards.
    let _ = unsafe { rustix::mm::munmap(addr as *mut _, len) };
}

/// Maps fresh private anonymous memory (zeros) over `range` with protection `prot` (and
/// `PROT_EXEC` if `exec`): what private memory the program grew with `mremap` holds in its new
/// part, put where the kernel extended a registered memfd mapping over memfd pages.
///
/// # Safety
///
/// `range` must hold nothing to keep (an extension of a moved registered mapping: memfd pages
/// that belong elsewhere), and no Rust reference may cover it.
pub(crate) unsafe fn fresh_private(
    range: VaRange,
    prot: hetmm_core::types::Prot,
    exec: bool,
) -> Result<(), MappingError> {
    check(range)?;
    let prot = ProtFlags::from_bits_retain(program_mprotect_flags(prot, exec).bits());
    // SAFETY: MAP_FIXED replaces exactly `range`, which holds nothing to keep and which nothing
    // in Rust references (the caller's contract).
    unsafe {
        rustix::mm::mmap_anonymous(range.start as *mut _, range.len as usize, prot, MapFlags::PRIVATE | MapFlags::FIXED)
    }
    .map(drop)
    .map_err(os_err("mmap(FIXED) anonymous", range))
}

/// A second mapping of the same shared pages as `range` (one `MAP_SHARED` VMA), from
/// `mremap(old_size = 0)`: the manager's alias of file-backed shared memory.
pub(crate) fn dup_shared(range: VaRange) -> Result<usize, MappingError> {
    check(range)?;
    // SAFETY: with old_size 0 mremap leaves the old mapping alone and creates a new one at an
    // address the kernel picks, mapping the same shared pages.
    unsafe { rustix::mm::mremap(range.start as *mut _, 0, range.len as usize, rustix::mm::MremapFlags::MAYMOVE) }
        .map(|p| p as usize)
        .map_err(os_err("mremap(dup)", range))
}

/// One page of inaccessible private memory, never registered with userfaultfd: an address for
/// an ioctl that only asks the kernel whether events are in flight (see `Ctx::events_read`).
pub(crate) fn probe_page() -> Result<Alias, MappingError> {
    let page = VaRange::new(0, PAGE_SIZE);
    // SAFETY: a new private mapping where the kernel chooses replaces nothing.
    let p = unsafe {
        rustix::mm::mmap_anonymous(std::ptr::null_mut(), PAGE_SIZE as usize, ProtFlags::empty(), MapFlags::PRIVATE)
    }
    .map_err(os_err("mmap probe page", page))?;
    Ok(Alias::new(p as usize, PAGE_SIZE as usize))
}

/// Fallocates or punches `len` bytes at `off` of a memfd.
pub(crate) fn memfd_space(memfd: &OwnedFd, off: u64, len: u64, punch: bool) -> Result<(), MappingError> {
    let mode = if punch { FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE } else { FallocateFlags::empty() };
    rustix::fs::fallocate(memfd, mode, off, len).map_err(os_err("fallocate", VaRange::new(off, len)))
}

/// A fresh `len`-byte reservation of PROT_NONE address space, at an address the kernel picks.
fn reserve(len: usize) -> Result<usize, Errno> {
    // SAFETY: a new private mapping where the kernel finds room: it overlaps nothing Rust owns.
    let base = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }?;
    Ok(base as usize)
}

/// Maps `len` bytes of `memfd` shared read-write at a 2 MiB-aligned address: reserve
/// `len + 2 MiB` of PROT_NONE address space, map the memfd over the aligned part with
/// MAP_FIXED, and give back the slack on both sides.
fn map_aligned(memfd: &OwnedFd, len: usize) -> Result<usize, Errno> {
    let block = BLOCK_SIZE as usize;
    let reserve_len = len + block;
    let base = reserve(reserve_len)?;
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
        unmap(base, reserve_len);
        return Err(e);
    }
    unmap(base, aligned - base);
    unmap(aligned + len, base + reserve_len - (aligned + len));
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
    use super::*;

    /// Set in the child [`memory_past_the_file_size_limit_is_an_error`] starts.
    const FSIZE_CHILD: &str = "HETMM_TEST_FSIZE_CHILD";

    /// The child's half of [`memory_past_the_file_size_limit_is_an_error`] (does nothing in a
    /// plain test run): under a 1 MiB file-size limit, asks for 4 MiB and prints what it got.
    #[test]
    fn fsize_limit_child() {
        if std::env::var_os(FSIZE_CHILD).is_none() {
            return;
        }
        let mut lim = rustix::process::getrlimit(rustix::process::Resource::Fsize);
        lim.current = Some(1 << 20);
        rustix::process::setrlimit(rustix::process::Resource::Fsize, lim).unwrap();
        match SharedMapping::new(4 << 20) {
            Err(e) => println!("child: refused: {e}"),
            Ok(_) => println!("child: mapped"),
        }
    }

    /// Memory larger than the process's file-size limit (`ulimit -f`) is refused with an
    /// error; sizing its memfd past the limit would raise SIGXFSZ, which ends the process.
    /// (Found by an audit: the child died of SIGXFSZ.) Run in a child process, since the limit
    /// is the whole process's.
    #[test]
    fn memory_past_the_file_size_limit_is_an_error() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "mapping::tests::fsize_limit_child", "--nocapture", "--test-threads=1"])
            .env(FSIZE_CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "the child died: {:?}\n{stdout}", out.status);
        assert!(stdout.contains("child: refused"), "the child was not refused: {stdout}");
    }

    /// The manager's alias shows the memfd at offsets no view may show any more (the program
    /// unmapped the view it was managed at, while the memory lives on elsewhere or the core
    /// still holds it): it is never room to make fresh memory of, wherever it lies (right after
    /// the view, where the kernel may well place it, a grown part's check looked at it).
    #[test]
    fn an_alias_is_never_room() {
        let m = SharedMapping::new(2 * PAGE_SIZE).unwrap();
        let alias = VaRange::new(m.alias_ptr() as u64, 2 * PAGE_SIZE);
        let page = VaRange::new(alias.start, PAGE_SIZE);
        let unused = MemfdUse { file: m.file(), used: Vec::new(), aliases: Vec::new() };
        assert!(room_at(page, std::slice::from_ref(&unused)).is_some(), "offsets no view shows are room");
        let known = MemfdUse { aliases: vec![alias], ..unused };
        assert!(room_at(page, &[known]).is_none(), "the alias is not");
    }

    /// A file of another file system with the memfd's inode number (a program's tmpfs file:
    /// inode numbers are per file system, and small on both) is not the memfd: its mapping was
    /// taken for room, and replaced with zeros (found by an audit, with a tmpfs file mapped right
    /// after registered memory that was then given back).
    #[test]
    fn a_file_with_the_memfds_inode_number_on_another_device_is_not_room() {
        let m = SharedMapping::new(2 * PAGE_SIZE).unwrap();
        let page = VaRange::new(m.alias_ptr() as u64, PAGE_SIZE);
        let mut other = m.file();
        other.dev.1 = other.dev.1.wrapping_add(1);
        let foreign = MemfdUse { file: other, used: Vec::new(), aliases: Vec::new() };
        assert!(room_at(page, &[foreign]).is_none(), "matched by inode number alone");
        let ours = MemfdUse { file: m.file(), used: Vec::new(), aliases: Vec::new() };
        assert!(room_at(page, &[ours]).is_some());
    }

    #[test]
    fn views_alias_and_are_aligned() {
        let m = SharedMapping::new(3 * PAGE_SIZE).unwrap();
        assert_eq!(m.len(), 3 * PAGE_SIZE);
        assert_eq!(m.app_ptr() as u64 % BLOCK_SIZE, 0);
        assert_eq!(m.alias_ptr() as u64 % BLOCK_SIZE, 0);
        // SAFETY: offset 4096 < 3 pages is in both views, which `m` keeps mapped; both map the same
        // memfd page (MAP_SHARED), so the alias reads the byte written through the view.
        unsafe {
            m.app_ptr().add(4096).write(7);
            assert_eq!(m.alias_ptr().add(4096).read(), 7);
        }
        // Zap keeps the data (not registered with a uffd here: a normal fault brings it back).
        m.zap_app(VaRange::new(m.app_ptr() as u64 + PAGE_SIZE, PAGE_SIZE)).unwrap();
        assert_eq!(m.touch_app(m.app_ptr() as u64 + PAGE_SIZE + 1).unwrap(), 0);
        // SAFETY: as above; the zapped page is not registered with a uffd: an ordinary fault maps
        // it again.
        assert_eq!(unsafe { m.app_ptr().add(4096).read() }, 7);
        // Punch drops it.
        m.punch(VaRange::new(m.app_ptr() as u64 + PAGE_SIZE, PAGE_SIZE)).unwrap();
        // SAFETY: as above; the punch keeps the memfd's size, so the page reads back as zeros, not
        // SIGBUS.
        assert_eq!(unsafe { m.alias_ptr().add(4096).read() }, 0);
        m.allocate(m.app_range()).unwrap();
    }

    /// A failed move into the alias may leave a hole in it that another thread's mapping lands
    /// in: refilling the hole must then fail, not take the foreign mapping for the alias (copies
    /// through the alias would read and write another thread's memory).
    #[test]
    fn a_foreign_mapping_in_an_alias_hole_is_reported() {
        let m = SharedMapping::new(4 * PAGE_SIZE).unwrap();
        let app = m.app_range();
        // An intact alias: nothing to fill.
        m.fill_alias_hole(app).unwrap();
        // Pages 1-2 of the alias unmapped, a foreign page mapped at page 2.
        let alias = m.alias_ptr() as usize;
        unmap(alias + PAGE_SIZE as usize, 2 * PAGE_SIZE as usize);
        // SAFETY: FIXED_NOREPLACE maps only where nothing is mapped (alias page 2, just unmapped
        // above): it replaces no mapping, Rust's or anyone's.
        let foreign = unsafe {
            rustix::mm::mmap_anonymous(
                (alias + 2 * PAGE_SIZE as usize) as *mut _,
                PAGE_SIZE as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE,
            )
        }
        .unwrap();
        let hole = VaRange::new(app.start + PAGE_SIZE, 2 * PAGE_SIZE);
        assert!(m.fill_alias_hole(hole).is_err(), "a foreign page in the alias was taken for the memfd");
        // With the foreign page gone the hole is filled and the alias reads the memfd again.
        unmap(foreign as usize, PAGE_SIZE as usize);
        // SAFETY: page 2 of `m`'s 4-page view, which `m` owns and keeps mapped (only alias pages
        // were unmapped).
        unsafe { m.app_ptr().add(2 * PAGE_SIZE as usize).write(9) };
        m.fill_alias_hole(hole).unwrap();
        m.fill_alias_hole(app).unwrap();
        // SAFETY: alias page 2, inside the alias `m` owns, maps the memfd again after the refill
        // above.
        assert_eq!(unsafe { m.alias_ptr().add(2 * PAGE_SIZE as usize).read() }, 9);
    }

    /// A revoke moving a view's entries out may take another mapping's if the program moved
    /// the view away and mapped its own memory there meanwhile: that is told apart, and the
    /// program's memory goes back where it was, contents and all.
    #[test]
    fn a_move_out_that_took_foreign_memory_gives_it_back() {
        let len = 2 * PAGE_SIZE as usize;
        let m = SharedMapping::new(len as u64).unwrap();
        let app = m.app_range();
        // SAFETY: byte 0 of `m`'s 2-page view, which `m` owns and keeps mapped; no uffd is
        // registered.
        unsafe { m.app_ptr().write(5) };
        let moved = m.move_out_app(app).unwrap();
        assert!(m.moved_is_ours(&moved, app), "the view's own entries");
        drop(moved);
        // The program moves the view away and maps memory of its own at the old address.
        let flags = MapFlags::PRIVATE;
        // SAFETY: a fresh private PROT_NONE mapping at an address the kernel picks: it replaces
        // nothing.
        let away = unsafe { rustix::mm::mmap_anonymous(std::ptr::null_mut(), len, ProtFlags::empty(), flags) }.unwrap();
        let mv = rustix::mm::MremapFlags::MAYMOVE;
        // SAFETY: moves `m`'s view (no Rust reference into it, nothing else reads it) over `away`,
        // this test's own PROT_NONE placeholder of the same `len`.
        unsafe { rustix::mm::mremap_fixed(app.start as *mut _, len, len, mv, away) }.unwrap();
        let rw = ProtFlags::READ | ProtFlags::WRITE;
        let at = app.start as *mut std::ffi::c_void;
        // SAFETY: FIXED_NOREPLACE maps only where nothing is mapped (the view's old address, left
        // empty by the move above): it replaces no mapping, Rust's or anyone's.
        let mine = unsafe { rustix::mm::mmap_anonymous(at, len, rw, flags | MapFlags::FIXED_NOREPLACE) }.unwrap();
        // SAFETY: `mine` is the `len`-byte read-write mapping just made.
        unsafe { mine.cast::<u8>().write(9) };
        let moved = m.move_out_app(app).unwrap();
        assert!(!m.moved_is_ours(&moved, app), "the program's memory taken for the view's");
        // SAFETY: `moved` came from `m.move_out_app(app)` just above, and nothing was mapped at
        // `app` since (the empty VMA that move left still holds the addresses).
        unsafe { SharedMapping::move_back(moved, app) }.unwrap();
        // SAFETY: `mine` is mapped read-write again at `at` (its entries moved back), `len` bytes.
        assert_eq!(unsafe { mine.cast::<u8>().read() }, 9, "the program's memory is back, contents and all");
        // SAFETY: `away` holds `m`'s view (MAP_SHARED of the memfd, `len` bytes), which stays
        // mapped until the `unmap` below; unregistered, so a missing entry takes an ordinary fault.
        assert_eq!(unsafe { away.cast::<u8>().read() }, 5, "the view (moved away) still reads the memfd");
        unmap(away as usize, len);
    }

    /// Dropping a mapping whose view the program moved in part (and mapped memory of its own
    /// where it was) unmaps only what still shows the memfd at the view's offsets, even before
    /// the move is known (`check_on_drop`): it unmapped the whole view, the program's memory
    /// included.
    #[test]
    fn dropping_a_moved_view_leaves_what_the_program_put_there() {
        let page = PAGE_SIZE as usize;
        let m = SharedMapping::new(3 * PAGE_SIZE).unwrap();
        let app = m.app_ptr() as usize;
        let rw = ProtFlags::READ | ProtFlags::WRITE;
        // SAFETY: a fresh private PROT_NONE placeholder at an address the kernel picks.
        let away =
            unsafe { rustix::mm::mmap_anonymous(std::ptr::null_mut(), page, ProtFlags::empty(), MapFlags::PRIVATE) }
                .unwrap();
        let mv = rustix::mm::MremapFlags::MAYMOVE;
        // SAFETY: moves page 1 of `m`'s view (no Rust reference into it; no uffd) over the test's
        // placeholder `away`.
        unsafe { rustix::mm::mremap_fixed((app + page) as *mut _, page, page, mv, away) }.unwrap();
        let at = (app + page) as *mut std::ffi::c_void;
        // SAFETY: FIXED_NOREPLACE maps only where nothing is mapped (the hole the move left).
        let mine =
            unsafe { rustix::mm::mmap_anonymous(at, page, rw, MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE) }.unwrap();
        // SAFETY: the test's page just mapped read-write.
        unsafe { mine.cast::<u8>().write(9) };
        m.check_on_drop();
        drop(m);
        assert!(is_mapped(VaRange::new(mine as u64, PAGE_SIZE)), "the program's page was unmapped");
        // SAFETY: the test's page, still mapped (checked above).
        assert_eq!(unsafe { mine.cast::<u8>().read() }, 9);
        assert!(
            !is_mapped(VaRange::new(app as u64, PAGE_SIZE))
                && !is_mapped(VaRange::new((app + 2 * page) as u64, PAGE_SIZE))
        );
        assert!(is_mapped(VaRange::new(away as u64, PAGE_SIZE)), "the moved page is the program's");
        unmap(mine as usize, page);
        unmap(away as usize, page);
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

    /// Pages of a `len`-byte range resident in memory (`mincore`).
    fn resident_pages(addr: usize, len: usize) -> usize {
        let mut vec = vec![0u8; len / PAGE_SIZE as usize];
        // SAFETY: `addr..addr + len` is mapped (the caller's); `vec` holds one byte per page.
        let r = unsafe { libc::mincore(addr as *mut _, len, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    /// Registering a sparse private range (a large `malloc` arena, a `MAP_NORESERVE`
    /// reservation with a few pages touched) must not allocate a memfd page for every page of
    /// it: `copy_private` reads every untouched page as zeros and writes those zeros through
    /// the alias, so a 64 MiB range with one page written takes 64 MiB of shmem (a 1 TiB
    /// reservation would take the machine down).
    #[test]
    fn copying_sparse_private_memory_keeps_the_memfd_sparse() {
        let len = 64 << 20;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh private mapping at an address the kernel picks.
        let prog = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, flags, -1, 0) };
        assert_ne!(prog, libc::MAP_FAILED);
        // SAFETY: byte 5 * 4096 of the `len`-byte mapping just made.
        unsafe { prog.cast::<u8>().add(5 * PAGE_SIZE as usize).write(0xab) };
        let range = VaRange::new(prog as u64, len as u64);
        let (memfd, alias) = memfd_with_alias(len as u64).unwrap();
        let rw = hetmm_core::types::Prot::READ | hetmm_core::types::Prot::WRITE;
        let pm = crate::pagemap::Pagemap::open().unwrap();
        let had = pm.entries(range);
        copy_private(range, rw, false, Some((&pm, &had)), memfd.as_fd(), 0, alias).unwrap();
        // SAFETY: byte 5 * 4096 of the alias, `len` bytes mapped above.
        assert_eq!(unsafe { (alias as *const u8).add(5 * PAGE_SIZE as usize).read() }, 0xab);
        let allocated = rustix::fs::fstat(&memfd).unwrap().st_blocks as u64 * 512;
        unmap(alias, len);
        // SAFETY: the test's own mapping, not used afterwards.
        unsafe { libc::munmap(prog, len) };
        assert!(allocated <= 1 << 20, "{allocated} bytes of memfd allocated for one written page");
    }

    /// Giving registered memory back (`Host::unregister`) must not make every page of a sparse
    /// range resident: `restore_private` copies the whole alias into fresh anonymous memory,
    /// zeros included (and reading the alias over a memfd hole allocates shmem too).
    #[test]
    fn restoring_sparse_memory_keeps_it_sparse() {
        let len = 64 << 20;
        let (memfd, alias) = memfd_with_alias(len as u64).unwrap();
        // One page of data in the memfd.
        let mut one = vec![0u8; PAGE_SIZE as usize];
        one[7] = 0x5a;
        rustix::io::pwrite(&memfd, &one, 5 * PAGE_SIZE).unwrap();
        // The program's range (here: a PROT_NONE placeholder the restore replaces).
        let prog = reserve(len).unwrap();
        let range = VaRange::new(prog as u64, len as u64);
        let rw = hetmm_core::types::Prot::READ | hetmm_core::types::Prot::WRITE;
        let r = restore_private(range, rw, false, memfd.as_fd(), 0);
        let allocated = rustix::fs::fstat(&memfd).unwrap().st_blocks as u64 * 512;
        r.unwrap();
        let resident = resident_pages(prog, len);
        // SAFETY: byte 7 of page 5 of the restored range, mapped read-write above.
        let b = unsafe { (prog as *const u8).add(5 * PAGE_SIZE as usize + 7).read() };
        unmap(alias, len);
        unmap(prog, len);
        assert_eq!(b, 0x5a);
        assert!(resident <= 256, "{resident} pages resident after restoring one page of data");
        assert!(allocated <= 1 << 20, "{allocated} bytes of memfd allocated by reading its holes");
    }

    /// The `rwxs` field of the `/proc/self/maps` line holding `va`.
    fn perms_at(va: usize) -> String {
        let v = crate::maps::meeting(VaRange::new(va as u64, 1)).unwrap();
        let v = v.first().unwrap_or_else(|| panic!("{va:#x} not mapped"));
        let bit = |on: bool, c: char| if on { c } else { '-' };
        [
            bit(v.prot.contains(hetmm_core::types::Prot::READ), 'r'),
            bit(v.prot.contains(hetmm_core::types::Prot::WRITE), 'w'),
            bit(v.exec, 'x'),
            if v.shared { 's' } else { 'p' },
        ]
        .iter()
        .collect()
    }

    /// A `MAP_SHARED` view of `memfd`'s `len` bytes from `off`, at `at` (`MAP_FIXED` over the
    /// test's own reservation).
    fn shared_view(memfd: &OwnedFd, at: usize, len: usize, off: u64, prot: ProtFlags) {
        // SAFETY: `at..at + len` is inside the caller's own reservation, which nothing references.
        let p = unsafe { rustix::mm::mmap(at as *mut _, len, prot, MapFlags::SHARED | MapFlags::FIXED, memfd, off) };
        assert_eq!(p.unwrap() as usize, at);
    }

    /// The fork child's copy follows the memory to where the kernel has it at the fork, not
    /// where the prepare found it: views of the memfd's bytes moved elsewhere (a part of them
    /// unmapped, one executable) become private copies with their own protection, the lost
    /// bytes (given at the old addresses) inaccessible; other memory is left alone; more views
    /// than one pass takes are all copied.
    #[test]
    fn privatize_parts_copies_the_views_where_the_kernel_has_them() {
        let page = PAGE_SIZE as usize;
        let n = 8;
        let len = n * page;
        let (memfd, alias) = memfd_with_alias(len as u64).unwrap();
        for i in 0..n {
            // SAFETY: page `i` of the alias, mapped read-write above.
            unsafe { std::ptr::write_bytes((alias + i * page) as *mut u8, i as u8 + 1, page) };
        }
        unmap(alias, len);
        // Where the prepare found the memory: an address range nothing maps any more.
        let old = reserve(len).unwrap();
        unmap(old, len);
        // Now: pages 0-2 unmapped; 3-4 read-write at `a`; 5 executable (and readable) at `b`;
        // 6-7 read-write at `c`; and a private page of the test's own at `d`.
        let room = reserve(16 * page).unwrap();
        let (a, b, c, d) = (room, room + 4 * page, room + 8 * page, room + 12 * page);
        let rw = ProtFlags::READ | ProtFlags::WRITE;
        shared_view(&memfd, a, 2 * page, 3 * PAGE_SIZE, rw);
        shared_view(&memfd, b, page, 5 * PAGE_SIZE, ProtFlags::READ | ProtFlags::EXEC);
        shared_view(&memfd, c, 2 * page, 6 * PAGE_SIZE, rw);
        // SAFETY: FIXED over the test's own reservation; a private page filled with 0x77.
        unsafe {
            rustix::mm::mmap_anonymous(d as *mut _, page, rw, MapFlags::PRIVATE | MapFlags::FIXED).unwrap();
            std::ptr::write_bytes(d as *mut u8, 0x77, page);
        }
        let rw_prot = hetmm_core::types::Prot::READ | hetmm_core::types::Prot::WRITE;
        let parts = [hetmm_core::cpu::ForkPart { range: VaRange::new(old as u64, len as u64), prot: rw_prot }];
        // Page 7 (at its old address) could not be copied from a device.
        let lost = [VaRange::new((old + 7 * page) as u64, PAGE_SIZE)];
        let view = VaRange::new(old as u64, len as u64);
        let offset_of = |r: VaRange| {
            if view.contains_range(&r) {
                Ok(r.start - view.start)
            } else {
                Err(MappingError::OutOfBounds { range: r, region: view })
            }
        };
        privatize_parts(&parts, memfd.as_fd(), &lost, offset_of).unwrap();
        let perms = [a, b, c, c + page, d].map(perms_at);
        // SAFETY: bytes of the copies at `a`, `b` and `c` (all readable but page 7 at `c + page`)
        // and of the test's page at `d`.
        let bytes = unsafe { [a, a + page, b, c, d].map(|x| (x as *const u8).read()) };
        // SAFETY: writes to the copy at `a`, private and read-write now.
        unsafe { (a as *mut u8).write(0xEE) };
        let mut first = [0u8; 1];
        rustix::io::pread(&memfd, &mut first, 3 * PAGE_SIZE).unwrap();
        unmap(room, 16 * page);
        assert_eq!(perms, ["rw-p", "r-xp", "rw-p", "---p", "rw-p"].map(String::from));
        assert_eq!(bytes, [4, 5, 6, 7, 0x77]);
        assert_eq!(first, [4], "a write to the child's copy reached the memfd");

        // More views than one pass finds: every one is copied.
        let many = 2 * MAX_VIEWS + 3;
        let room = reserve(2 * many * page).unwrap();
        for i in 0..many {
            // Apart from each other (one VMA each), each showing page `i % n`.
            shared_view(&memfd, room + 2 * i * page, page, (i % n) as u64 * PAGE_SIZE, rw);
        }
        let parts = [hetmm_core::cpu::ForkPart { range: view, prot: rw_prot }];
        privatize_parts(&parts, memfd.as_fd(), &[], offset_of).unwrap();
        let shared = (0..many).filter(|i| perms_at(room + 2 * i * page).ends_with('s')).count();
        // SAFETY: the first byte of each copy, readable.
        let right = (0..many).all(|i| unsafe { ((room + 2 * i * page) as *const u8).read() } == (i % n) as u8 + 1);
        unmap(room, 2 * many * page);
        assert_eq!(shared, 0, "views left shared");
        assert!(right, "a copy does not hold its page's bytes");
    }
}
