//! Memory the program already has, made shared with devices ([`Host::register`]).
//!
//! Private memory (anonymous, `malloc`, private file mappings): a memfd takes its bytes and is
//! mapped `MAP_SHARED | MAP_FIXED` over the same addresses, so the pointer stays valid and the
//! data is preserved; from then on it is managed like [`Host::create_region`] memory (migrated,
//! faulted back through userfaultfd). Shared memory (`MAP_SHARED` files and shared anonymous
//! memory): mirrored, never migrated; devices map its host pages remotely through the manager's
//! own second mapping of them, so writes land in the file.
//!
//! A registration follows the program's `munmap` and `mremap` of its memory (userfaultfd
//! UNMAP/REMAP events; see `events`). Shared memory is registered with userfaultfd for that
//! alone (write-protect mode, nothing ever write-protected, so no fault ever comes); the kernel
//! allows it for shmem (shared anonymous memory, memfd, tmpfs files) but not for regular files:
//! a mirror of a regular file is not told of `munmap`/`mremap` (until [`Host::unregister`],
//! devices keep mapping the file's pages at the old addresses). [`Host::unregister`] gives
//! private memory back as private anonymous memory with the current bytes.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use hetmm_core::cpu::{CpuMmu, HostError};
use hetmm_core::device::HostAddr;
use hetmm_core::types::{align_down, align_up, Prot, VaRange, PAGE_SIZE};
use parking_lot::Mutex;

use crate::events::Arriving;
use crate::host::{continue_range, mapping_err, retry_again, uffd_err, Host, RegionError};
use crate::mapping::{self, MappingError};
use crate::uffd::{Features, RegisterMode, Uffd};

/// One VMA of the program's memory, from `/proc/self/maps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    /// Addresses (clipped to the range asked about).
    pub range: VaRange,
    /// Protection.
    pub prot: Prot,
    /// `MAP_SHARED`.
    pub shared: bool,
    /// `PROT_EXEC` (which [`Prot`] cannot say): kept when the memory is adopted and given back.
    pub exec: bool,
    /// Anonymous memory (no file behind it: a page without an entry reads as zeros).
    pub anon: bool,
}

/// The VMAs covering `range`, clipped to it, in order; `None` if some page of it is unmapped.
/// The kernel writes `/proc/self/maps` a page of text per read, looking the VMAs up again for
/// each, so other threads mapping and unmapping meanwhile can make a read skip a VMA: a range
/// that looks broken is read again before it is believed.
pub fn vmas(range: VaRange) -> Option<Vec<Vma>> {
    (0..3).find_map(|_| vmas_once(range))
}

/// The VMAs of `/proc/self/maps` that meet `range`, whole (not clipped).
fn vmas_meeting(range: VaRange) -> Option<Vec<Vma>> {
    let found = crate::maps::meeting(range)?;
    let vma = |v: crate::maps::MapsLine| Vma {
        range: v.range,
        prot: v.prot,
        shared: v.shared,
        exec: v.exec,
        anon: v.file.ino == 0,
    };
    Some(found.into_iter().map(vma).collect())
}

fn vmas_once(range: VaRange) -> Option<Vec<Vma>> {
    let mut out = vmas_meeting(range)?;
    for v in &mut out {
        v.range = v.range.intersect(&range)?;
    }
    let mut cur = range.start;
    for v in &out {
        if v.range.start != cur {
            return None;
        }
        cur = v.range.end();
    }
    (cur == range.end()).then_some(out)
}

/// A piece of the program's address space showing part of a mirror.
#[derive(Debug, Clone, Copy)]
struct Seg {
    app: u64,
    off: u64,
    len: u64,
}

/// The manager's side of one registration: the memfd (private memory) and the alias.
#[derive(Debug)]
pub struct Mirror {
    /// The host, whose threads serve the faults and events of this memory: kept running while
    /// the memory is managed, even past the program's last handle on the host (a device handle
    /// can keep the address space, and with it this memory, alive).
    host: Arc<Host>,
    memfd: Option<Arc<OwnedFd>>,
    /// The memfd, as `/proc/self/maps` names it (anonymous for shared memory).
    file: crate::maps::MapsFile,
    alias: Arc<mapping::Alias>,
    segs: Mutex<Vec<Seg>>,
    /// For memory moved out of a region's view ([`Mirror::for_moved_region`]): the region, whose
    /// view shows the same memfd (what is left of it is not growth, see [`fresh_growth`]).
    region: Option<std::sync::Weak<crate::HostRegion>>,
}

impl Mirror {
    /// In a `fork()` child, once every CPU side copied its parts: the views of the memfd left
    /// over become zeros ([`mapping::zero_leftovers_in_child`]; errors name the alias's range:
    /// the segments' lock may be held by a thread the child does not have).
    pub(crate) fn zero_leftovers_in_child(&self) -> Result<(), crate::mapping::MappingError> {
        match &self.memfd {
            Some(fd) => mapping::zero_leftovers_in_child(fd.as_fd(), self.alias_range()),
            None => Ok(()),
        }
    }

    /// In a `fork()` child, once every view was made private: lets go of the memfd
    /// ([`mapping::retire_fd_in_child`]).
    pub(crate) fn retire_in_child(&self, null: std::os::fd::BorrowedFd<'_>) {
        if let Some(fd) = &self.memfd {
            mapping::retire_fd_in_child(fd.as_fd(), null);
        }
    }

    /// Whether this is mirrored shared memory (devices map host pages; nothing migrates).
    pub fn is_remote(&self) -> bool {
        self.memfd.is_none()
    }

    /// Memory of a [`Host::create_region`] region that the program moved out of the region's
    /// view with `mremap`: from then on it is managed like registered private memory (the
    /// program owns the mapping; its `munmap` ends it), over the region's memfd and alias,
    /// which live as long as the region or any such part does. Starts with no piece (see
    /// [`Mirror::moved_in`]).
    pub(crate) fn for_moved_region(
        host: &Arc<Host>,
        region: &Arc<crate::HostRegion>,
        memfd: Arc<OwnedFd>,
        alias: Arc<mapping::Alias>,
    ) -> Arc<Mirror> {
        let file = mapping::file_of(&memfd);
        let mirror = Arc::new(Mirror {
            host: Arc::clone(host),
            memfd: Some(memfd),
            file,
            alias,
            segs: Mutex::new(Vec::new()),
            region: Some(Arc::downgrade(region)),
        });
        host.ctx.mirrors.lock().push(Arc::downgrade(&mirror));
        mirror
    }

    /// The program moved memfd bytes `[off, off + len)` to `to` (out of a region's view): a new
    /// piece of this mirror, and its view.
    pub(crate) fn moved_in(self: &Arc<Self>, to: u64, off: u64, len: u64) -> Arc<dyn CpuMmu> {
        // Before the lock, so dropped after it (see `Mirror::region_held`).
        let region = self.region_held();
        let mut segs = self.segs.lock();
        segs.push(Seg { app: to, off, len });
        fresh_growth(to + len, self.file, off + len, &legit(&segs, region.as_deref()));
        Arc::new(MirrorView { mirror: Arc::clone(self), app: to, off, len })
    }

    /// The region this mirror's memory was moved out of, while it lives. Taken before `segs` is
    /// locked and let go after: the last holder of a region may let it go on another thread
    /// while this one holds it, and its drop here, under `segs`, looks for memory grown past
    /// its view (`Ctx::fill_room_after`), which reads every mirror's pieces,
    /// this one's too: the servicer waited for the lock it held (found by an audit, by reading).
    fn region_held(&self) -> Option<Arc<crate::HostRegion>> {
        self.region.as_ref().and_then(std::sync::Weak::upgrade)
    }

    /// The manager's alias of the memory.
    pub(crate) fn alias_range(&self) -> VaRange {
        self.alias.range()
    }

    /// The memfd and where the program's address space shows it: each piece's addresses and
    /// memfd offset (`None` for shared memory: no memfd).
    pub(crate) fn pieces(&self) -> Option<(crate::maps::MapsFile, Vec<(VaRange, u64)>)> {
        self.memfd.as_ref()?;
        Some((self.file, self.segs.lock().iter().map(|s| (VaRange::new(s.app, s.len), s.off)).collect()))
    }

    /// After the program moved `[from, from+len)` to `to`: a view of the new place, if `from`
    /// was ours.
    pub(crate) fn remapped(self: &Arc<Self>, from: u64, to: u64, len: u64) -> Option<Arc<dyn CpuMmu>> {
        self.remapped_with(from, to, len, &[])
    }

    /// [`Mirror::remapped`] where the move also took `parts` (addresses, memfd offset) of the
    /// view of the region this mirror's memory was moved out of: pieces of it moved back beside
    /// what is left of the view merge with it into one VMA, and the program may move them in
    /// one go. The parts become pieces of this mirror (then moved) only if, with them, one
    /// piece holds the whole move; else nothing changes and `None`.
    pub(crate) fn remapped_with(
        self: &Arc<Self>,
        from: u64,
        to: u64,
        len: u64,
        parts: &[(VaRange, u64)],
    ) -> Option<Arc<dyn CpuMmu>> {
        let moved = VaRange::new(from, len);
        // Before the lock, so dropped after it (see `Mirror::region_held`).
        let region = self.region_held();
        let mut segs = self.segs.lock();
        let mut all = segs.clone();
        all.extend(parts.iter().map(|&(r, off)| Seg { app: r.start, off, len: r.len }));
        // Pieces that meet again (one moved away and back: the kernel merges their VMAs, and
        // the program may move them in one go) are one piece.
        coalesce(&mut all);
        let seg = *all.iter().find(|s| VaRange::new(s.app, s.len).contains_range(&moved))?;
        *segs = all;
        let off = seg.off + (from - seg.app);
        cut(&mut segs, moved);
        segs.push(Seg { app: to, off, len });
        if self.memfd.is_some() {
            fresh_growth(to + len, self.file, off + len, &legit(&segs, region.as_deref()));
        }
        Some(Arc::new(MirrorView { mirror: Arc::clone(self), app: to, off, len }))
    }

    /// The program unmapped `range`.
    pub(crate) fn forget(&self, range: VaRange) {
        cut(&mut self.segs.lock(), range);
    }
}

/// Where the program's address space shows a mirror's memfd as managed memory: its pieces
/// `segs`, and what is left of the view of the `region` its memory was moved out of (a piece
/// moved back beside it merges with it into one VMA).
fn legit(segs: &[Seg], region: Option<&crate::HostRegion>) -> Vec<Seg> {
    let mut all = segs.to_vec();
    if let Some(r) = region {
        all.extend(r.pieces().into_iter().map(|(x, off)| Seg { app: x.start, off, len: x.len }));
    }
    all
}

/// Private memory the program moved and grew at once (`mremap` to a larger size, as `realloc`
/// does): the kernel extends the memfd mapping past `end` (the event gives only the old length)
/// over memfd pages that hold other data, or none. The program asked for fresh memory there, so
/// fresh private memory replaces the extension (unmanaged: only what was registered is). Parts
/// that are pieces of the registration (`segs`: the kernel merged a neighbour's VMA) stay.
/// Only where the mapping at `end` still continues the moved memory, showing its memfd (`file`)
/// at offset `off` there: the event is applied after the program's mremap returned, and the
/// program may have moved or unmapped the memory since and mapped anything there (another
/// thread's new stack took such addresses, and was replaced with zeros).
fn fresh_growth(end: u64, file: crate::maps::MapsFile, off: u64, segs: &[Seg]) {
    let Some(vma) = crate::maps::meeting(VaRange::new(end - PAGE_SIZE, PAGE_SIZE))
        .and_then(|v| v.into_iter().find(|m| m.range.contains(end - PAGE_SIZE)))
    else {
        return;
    };
    if !vma.shared || vma.file != file || vma.off.checked_add(end - vma.range.start) != Some(off) {
        return;
    }
    let mut cur = end;
    while cur < vma.range.end() {
        if let Some(s) = segs.iter().find(|s| s.app == cur) {
            cur += s.len;
            continue;
        }
        // Up to the next piece of ours, or the end of the VMA.
        let stop = segs.iter().map(|s| s.app).filter(|&a| a > cur).min().unwrap_or(u64::MAX).min(vma.range.end());
        let grown = VaRange::new(cur, stop - cur);
        // No piece of the registration lies in `grown`: it is memfd pages the program's mremap
        // extended its mapping over, where the program expects new memory; nothing to keep.
        // SAFETY: `grown` holds nothing to keep (above), and the manager has no reference into it.
        if let Err(e) = unsafe { mapping::fresh_private(grown, vma.prot, vma.exec) } {
            log::error!("replacing the grown part {grown} of registered memory: {e}");
        }
        cur = stop;
    }
}

/// Joins pieces adjacent both in the program's address space and in the memfd.
fn coalesce(segs: &mut Vec<Seg>) {
    segs.sort_by_key(|s| s.app);
    let mut out: Vec<Seg> = Vec::with_capacity(segs.len());
    for s in segs.drain(..) {
        match out.last_mut() {
            Some(l) if l.app + l.len == s.app && l.off + l.len == s.off => l.len += s.len,
            _ => out.push(s),
        }
    }
    *segs = out;
}

fn cut(segs: &mut Vec<Seg>, range: VaRange) {
    let mut out = Vec::with_capacity(segs.len() + 1);
    for s in segs.drain(..) {
        let r = VaRange::new(s.app, s.len);
        match r.intersect(&range) {
            None => out.push(s),
            Some(x) => {
                if x.start > s.app {
                    out.push(Seg { app: s.app, off: s.off, len: x.start - s.app });
                }
                if x.end() < r.end() {
                    out.push(Seg { app: x.end(), off: s.off + (x.end() - s.app), len: r.end() - x.end() });
                }
            }
        }
    }
    *segs = out;
}

/// The CPU side of registered memory at one place in the program's address space: the core's
/// [`CpuMmu`] for it.
#[derive(Debug)]
pub struct MirrorView {
    mirror: Arc<Mirror>,
    app: u64,
    off: u64,
    len: u64,
}

impl MirrorView {
    /// The memfd (and alias) offset of `r`, a page-aligned, non-empty part of this view.
    fn offset_of(&self, r: VaRange) -> Result<u64, MappingError> {
        if r.len == 0 || !r.is_page_aligned() {
            return Err(MappingError::Unaligned(r));
        }
        let me = VaRange::new(self.app, self.len);
        if !me.contains_range(&r) {
            return Err(MappingError::OutOfBounds { range: r, region: me });
        }
        Ok(self.off + (r.start - self.app))
    }

    fn check(&self, op: &'static str, r: VaRange) -> Result<u64, HostError> {
        self.offset_of(r).map_err(|e| mapping_err(op, r, e))
    }
}

impl CpuMmu for MirrorView {
    fn range(&self) -> VaRange {
        VaRange::new(self.app, self.len)
    }

    fn revoke(&self, ranges: &[VaRange]) -> Result<(), HostError> {
        if self.mirror.is_remote() {
            return Ok(());
        }
        crate::host::reshape_checked(&self.mirror.host.ctx, ranges, |mark| {
            ranges.iter().try_for_each(|&r| {
                self.check("revoke", r)?;
                // SAFETY: `r` was just checked inside this mirror's view, mapped shared from its
                // memfd.
                let zap = || unsafe { mapping::zap_view(r) };
                self.mirror.host.ctx.self_zap(r, mark, zap).map_err(|e| mapping_err("revoke", r, e))
            })
        })
    }

    fn populate(&self, ranges: &[VaRange]) -> Result<(), HostError> {
        let Some(fd) = &self.mirror.memfd else { return Ok(()) };
        for &r in ranges {
            let off = self.check("populate", r)?;
            mapping::memfd_space(fd, off, r.len, false).map_err(|e| mapping_err("populate", r, e))?;
        }
        Ok(())
    }

    fn map(&self, ranges: &[VaRange], writable: bool) -> Result<(), HostError> {
        let Some(fd) = &self.mirror.memfd else { return Ok(()) };
        for &r in ranges {
            self.check("map", r)?;
            let alloc = |x: VaRange| mapping::memfd_space(fd, self.off + (x.start - self.app), x.len, false);
            continue_range(&self.mirror.host.ctx, r, writable, &alloc)?;
        }
        Ok(())
    }

    fn protect(&self, ranges: &[VaRange], writable: bool) -> Result<(), HostError> {
        if self.mirror.is_remote() {
            return Ok(());
        }
        crate::host::protect_checked(&self.mirror.host.ctx, ranges, writable, || {
            ranges.iter().try_for_each(|&r| {
                self.check("protect", r)?;
                retry_again(|| self.mirror.host.ctx.uffd.writeprotect(r, !writable, true))
                    .map_err(|e| uffd_err("protect", r, e))
            })
        })
    }

    fn wake(&self, range: VaRange) -> Result<(), HostError> {
        self.check("wake", range)?;
        retry_again(|| self.mirror.host.ctx.uffd.wake(range)).map_err(|e| uffd_err("wake", range, e))
    }

    fn discard(&self, ranges: &[VaRange]) -> Result<(), HostError> {
        let Some(fd) = &self.mirror.memfd else { return Ok(()) };
        for &r in ranges {
            let off = self.check("discard", r)?;
            mapping::memfd_space(fd, off, r.len, true).map_err(|e| mapping_err("discard", r, e))?;
            // SAFETY: `r` was checked inside this mirror's view, mapped shared from its memfd.
            let zap = || unsafe { mapping::zap_view(r) };
            let mark = self.mirror.host.ctx.reshape_mark();
            self.mirror.host.ctx.self_zap(r, mark, zap).map_err(|e| mapping_err("discard", r, e))?;
        }
        Ok(())
    }

    fn backing(&self, va: u64) -> HostAddr {
        if !self.range().contains(va) {
            log::error!("backing({va:#x}) outside {}", self.range());
            return HostAddr(0);
        }
        HostAddr(self.mirror.alias.addr() + (self.off + (va - self.app)) as usize)
    }

    fn set_prot(&self, range: VaRange, prot: Prot) -> Result<(), HostError> {
        let off = self.check("protect", range)?;
        // SAFETY: `range` was just checked inside this mirror's view; the core asks for the
        // protection the program gave the range.
        unsafe { mapping::protect_view(range, prot) }.map_err(|e| mapping_err("protect", range, e))?;
        if self.mirror.is_remote() {
            // Devices reach mirrored memory through the alias, which kept the protection the
            // mapping had when it was registered. It stays readable: hetmm itself reads it
            // (`reads_zero`), and devices get only what the core maps them.
            let alias = prot | Prot::READ;
            // SAFETY: the alias part of `range` (checked above), mapped while the mirror lives.
            unsafe { mapping::protect_alias(self.mirror.alias.addr() + off as usize, range.len as usize, alias) }
                .map_err(|e| mapping_err("protect", range, e))?;
        }
        Ok(())
    }

    fn reads_zero(&self, range: VaRange) -> bool {
        match self.check("snapshot", range) {
            // SAFETY: `range` is checked inside the view: its part of the alias, mapped while the
            // mirror lives.
            Ok(off) => unsafe { mapping::alias_is_zero(self.mirror.alias.addr() + off as usize, range.len as usize) },
            Err(_) => false,
        }
    }

    fn cpu_present(&self, range: VaRange) -> Option<Vec<bool>> {
        self.check("snapshot", range).ok()?;
        let pm = crate::pagemap::Pagemap::open()?;
        Some((range.start..range.end()).step_by(PAGE_SIZE as usize).map(|va| pm.present(va)).collect())
    }

    /// Registered private memory becomes a private copy in the child (read from the memfd, not
    /// the alias), wherever the program has it mapped at the fork (see
    /// `mapping::privatize_parts`); registered shared memory stays shared, as the kernel keeps
    /// it.
    /// Refused (EPERM, nothing done) in the process that registered the memory, where the alias
    /// is in use.
    fn fork_child(&self, parts: &[hetmm_core::cpu::ForkPart], lost: &[VaRange]) -> Result<(), HostError> {
        if rustix::process::getpid() == self.mirror.host.ctx.uffd.owner() {
            return Err(HostError { op: "fork", range: self.range(), errno: libc::EPERM });
        }
        // First: the alias maps the whole memfd, and is not the program's to copy.
        self.mirror.alias.drop_in_child();
        match &self.mirror.memfd {
            Some(fd) => mapping::privatize_parts(parts, fd.as_fd(), lost, |r| self.offset_of(r))
                .map_err(|e| mapping_err("fork", self.range(), e)),
            None => Ok(()),
        }
    }
}

/// What [`Host::register`] made of the program's memory.
#[derive(Debug)]
pub struct Registration {
    /// The page-aligned range covered.
    pub range: VaRange,
    /// Mirrored shared memory (devices map host pages) rather than migratable private memory.
    pub remote: bool,
    /// The CPU side, for every part of `range`.
    pub cpu: Arc<dyn CpuMmu>,
    /// The parts with their protection, as the program mapped them.
    pub parts: Vec<(VaRange, Prot)>,
    /// CPU faults in `range` wait until this is dropped: hand the parts to the core first.
    _arriving: Option<Arriving>,
}

impl Host {
    /// Makes the program's memory `[start, start + len)` (rounded out to pages) shared with
    /// devices, at the same addresses and with the same bytes (see the module notes). Every page
    /// must be mapped, all private or all shared (shared memory: one mapping).
    pub fn register(self: &Arc<Self>, start: u64, len: u64) -> Result<Registration, RegionError> {
        let s = align_down(start, PAGE_SIZE);
        let e = start
            .checked_add(len)
            .and_then(|e| align_up(e, PAGE_SIZE))
            .filter(|_| len > 0)
            .ok_or(MappingError::BadLength(len))?;
        let range = VaRange::new(s, e - s);
        // Private memory is write-protected while it is copied: the thread's next write to its
        // own stack there would wait for itself (found by an audit).
        if mapping::own_stack().is_some_and(|st| st.intersect(&range).is_some()) {
            return Err(RegionError::OwnStack(range));
        }
        let vm = vmas(range).ok_or(RegionError::NotMapped(range))?;
        let shared = vm.iter().filter(|v| v.shared).count();
        let parts: Vec<(VaRange, Prot)> = vm.iter().map(|v| (v.range, v.prot)).collect();
        if shared == vm.len() {
            if vm.len() != 1 {
                return Err(RegionError::SharedSpansMappings { range, mappings: vm.len() });
            }
            // Managed memory's memfd, mapped where the program did not put managed memory: what
            // is left of memory it grew in place and gave back, or a mistake of the program's.
            let file = crate::maps::meeting(range).and_then(|v| v.first().map(|m| m.file)).filter(|f| f.ino != 0);
            if let Some(f) = file.filter(|f| self.ctx.memfd_uses().iter().any(|u| u.file == *f)) {
                log::warn!("registering {range}, which shows hetmm's own memfd ({f:?}), as shared memory");
            }
            let alias = mapping::dup_shared(range)?;
            // Only to be told of munmap/mremap/madvise (see the module notes).
            // SAFETY: write-protect mode only: nothing is write-protected or filled through this
            // handle there (it is registered to be told of munmap/mremap/madvise), so the
            // program's bytes stay its own.
            if let Err(e) = unsafe { self.uffd.register(range, RegisterMode::WP) } {
                log::info!("shared memory {range} cannot be watched ({e}): its munmap and mremap are not followed");
            }
            let mirror = Arc::new(Mirror {
                host: Arc::clone(self),
                memfd: None,
                file: crate::maps::MapsFile::default(),
                alias: Arc::new(mapping::Alias::new(alias, range.len as usize)),
                segs: Mutex::new(vec![Seg { app: range.start, off: 0, len: range.len }]),
                region: None,
            });
            self.ctx.mirrors.lock().push(Arc::downgrade(&mirror));
            let cpu = Arc::new(MirrorView { mirror, app: range.start, off: 0, len: range.len });
            return Ok(Registration { range, remote: true, cpu, parts, _arriving: None });
        }
        if shared != 0 {
            return Err(RegionError::MixedSharing(range));
        }
        let (memfd, alias) = mapping::memfd_with_alias(range.len)?;
        let mirror = Arc::new(Mirror {
            host: Arc::clone(self),
            file: mapping::file_of(&memfd),
            memfd: Some(Arc::new(memfd)),
            alias: Arc::new(mapping::Alias::new(alias, range.len as usize)),
            segs: Mutex::new(vec![Seg { app: range.start, off: 0, len: range.len }]),
            region: None,
        });
        let fd = mirror.memfd.as_ref().ok_or(MappingError::BadLength(0))?;
        // The pages of anonymous parts with data, read before the hold below marks the others.
        let pagemap = self.pagemap.as_ref();
        let had: Vec<Option<Vec<VaRange>>> =
            vm.iter().map(|v| pagemap.filter(|_| v.anon).map(|pm| pm.entries(v.range))).collect();
        // From the copy until the memfd is mapped over the memory, a write there would be lost.
        // (Made before the hold: nothing is allocated while it holds.)
        let whole: Vec<(VaRange, Option<&[VaRange]>)> = vm.iter().map(|v| (v.range, None)).collect();
        let held: Vec<(VaRange, Option<&[VaRange]>)> =
            vm.iter().zip(&had).map(|(v, h)| (v.range, h.as_deref())).collect();
        let hold = WriteHold::new(&held);
        // Every byte is copied before any part is adopted: a part that cannot be read (a file
        // mapping past the end of its file) is refused with the whole range still as it was.
        // (On the way out the hold goes first: it is the last local made.)
        for (v, had) in vm.iter().zip(&had) {
            let rel = v.range.start - range.start;
            let had = pagemap.zip(had.as_deref());
            mapping::copy_private(v.range, v.prot, v.exec, had, fd.as_fd(), rel, alias + rel as usize)?;
        }
        // A failure past the first adoption gives the parts already adopted back as private
        // memory holding the memfd's bytes: the program's range ends as it was (private), not
        // as memfd mappings nobody manages (shared with a fork child). They are memfd mappings
        // by then, held anew; the first failure is logged once no hold is left.
        let undo = |adopted: usize| {
            let _held = WriteHold::new(&whole[..adopted]);
            let mut failed = None;
            for v in &vm[..adopted] {
                if let Err(e) =
                    mapping::restore_private(v.range, v.prot, v.exec, fd.as_fd(), v.range.start - range.start)
                {
                    failed.get_or_insert((v.range, e));
                }
            }
            failed
        };
        let report = |failed: Option<(VaRange, MappingError)>| {
            if let Some((r, e)) = failed {
                log::error!("giving {r} back after a failed registration: {e}");
            }
        };
        for (i, v) in vm.iter().enumerate() {
            if let Err(e) = mapping::adopt_private(v.range, v.prot, v.exec, fd, v.range.start - range.start) {
                // The parts not adopted stay as they are: their writers may go on.
                drop(hold);
                let failed = undo(i);
                report(failed);
                return Err(e.into());
            }
        }
        // The writers held go on, into the memfd (through the fault path once registered below).
        drop(hold);
        let mode = RegisterMode::MISSING | RegisterMode::MINOR | RegisterMode::WP;
        // From here until the core knows the range, its faults have nowhere to go: they wait.
        let arriving = Arriving::new(&self.ctx, range);
        // SAFETY: `range` is now hetmm's shared mapping holding the program's bytes (moved in
        // above), which this host serves from here on.
        if let Err(e) = unsafe { self.uffd.register(range, mode) } {
            // A registration that failed part way may have registered some VMAs: undone first
            // (waking any fault there), so the moves back raise no UNMAP event.
            let _ = self.uffd.unregister(range);
            let failed = undo(vm.len());
            drop(arriving);
            report(failed);
            return Err(e.into());
        }
        self.ctx.mirrors.lock().push(Arc::downgrade(&mirror));
        let cpu = Arc::new(MirrorView { mirror, app: range.start, off: 0, len: range.len });
        Ok(Registration { range, remote: false, cpu, parts, _arriving: Some(arriving) })
    }

    /// Gives registered private memory `[start, start + len)` back to the program as private
    /// anonymous memory with its current bytes (the core must have brought every page back to
    /// host memory and dropped the range first). Shared memory needs nothing here.
    ///
    /// All or nothing: on an error the memory is as it was, hetmm's memfd mapping, registered
    /// (the core may take it back, and the call may be made again). A failure past the first
    /// part given back left the parts before it private and the rest unregistered memfd
    /// mappings, which a second call then gave back from the memfd's stale bytes, losing what
    /// the program had written to the private parts meanwhile (found by an audit).
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), RegionError> {
        let range =
            VaRange::checked(start, len).filter(VaRange::is_page_aligned).ok_or(MappingError::BadLength(len))?;
        let mirrors = self.ctx.live_mirrors_pub();
        // Every part is looked up before anything changes: a range that is not all mapped is
        // refused with its faults still coming to hetmm (unregistered first, the memfd mapping
        // that stayed would have served the CPU stale bytes of data on a device).
        let mut parts: Vec<Giving> = Vec::new();
        let mut pieces: Vec<(&Arc<Mirror>, VaRange)> = Vec::new();
        for m in &mirrors {
            let Some(fd) = m.memfd.as_ref() else { continue };
            let alias = m.alias_range().start as usize;
            let segs = m.segs.lock().clone();
            for s in segs {
                let Some(x) = VaRange::new(s.app, s.len).intersect(&range) else { continue };
                let vm = vmas(x).ok_or(RegionError::NotMapped(x))?;
                let off = |v: &Vma| s.off + (v.range.start - s.app);
                parts.extend(vm.iter().map(|v| Giving { vma: *v, fd, off: off(v), alias }));
                pieces.push((m, x));
            }
        }
        self.give_back(&parts, &pieces)?;
        for (m, x) in pieces {
            m.forget(x);
            // A part the program grew in place past the memory it gives back.
            self.ctx.fill_room_after(x.end(), m.file);
        }
        // Mirrored shared memory: only watched (see `register`), nothing to give back.
        for m in mirrors.iter().filter(|m| m.memfd.is_none()) {
            for s in m.segs.lock().iter() {
                if let Some(x) = VaRange::new(s.app, s.len).intersect(&range) {
                    let _ = self.uffd.unregister(x);
                }
            }
            m.forget(range);
        }
        Ok(())
    }

    /// Makes each of `parts` (of `pieces`, registered memfd mappings) private memory holding its
    /// bytes; on a failure, the parts already given back are adopted again and `pieces`
    /// registered again, so the memory is as it was (see [`Host::unregister`]).
    fn give_back(&self, parts: &[Giving<'_>], pieces: &[(&Arc<Mirror>, VaRange)]) -> Result<(), RegionError> {
        for &(_, x) in pieces {
            let _ = self.uffd.unregister(x);
        }
        // From the copy back until the private memory is moved over the memfd mapping, a write
        // there would be lost. Large memory is held where the memfd has data. (Made before the
        // hold: nothing is allocated while it holds.)
        let extents: Vec<Vec<VaRange>> =
            parts.iter().map(|p| mapping::data_in(p.fd.as_fd(), p.off, p.vma.range)).collect();
        let held: Vec<(VaRange, Option<&[VaRange]>)> =
            parts.iter().zip(&extents).map(|(p, e)| (p.vma.range, Some(e.as_slice()))).collect();
        let whole: Vec<(VaRange, Option<&[VaRange]>)> = parts.iter().map(|p| (p.vma.range, None)).collect();
        let hold = WriteHold::new(&held);
        let mut done = 0;
        let mut failed = None;
        for p in parts {
            match mapping::restore_private(p.vma.range, p.vma.prot, p.vma.exec, p.fd.as_fd(), p.off) {
                Ok(()) => done += 1,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(hold);
        let Some(e) = failed else { return Ok(()) };
        // The parts given back are private memory the program may write already: held anew,
        // their bytes go back into the memfd, which is mapped over them again.
        let again = WriteHold::new(&whole[..done]);
        let mut lost = None;
        for p in &parts[..done] {
            let v = p.vma;
            let r = mapping::copy_private(v.range, v.prot, v.exec, None, p.fd.as_fd(), p.off, p.alias + p.off as usize)
                .and_then(|()| mapping::adopt_private(v.range, v.prot, v.exec, p.fd, p.off));
            if let Err(e) = r {
                lost.get_or_insert((v.range, e));
            }
        }
        drop(again);
        let mode = RegisterMode::MISSING | RegisterMode::MINOR | RegisterMode::WP;
        for &(_, x) in pieces {
            // SAFETY: `x` is hetmm's memfd mapping holding the program's bytes again (above),
            // served by this host as before the call.
            if let Err(e) = unsafe { self.uffd.register(x, mode) } {
                log::error!("registering {x} again after a failed unregister: {e}");
            }
        }
        if let Some((r, e)) = lost {
            log::error!("adopting {r} again after a failed unregister: {e}");
        }
        Err(e.into())
    }
}

/// One VMA of registered private memory being given back ([`Host::unregister`]): its memfd, the
/// offset of its first byte there, and the start of the memfd's alias.
struct Giving<'a> {
    vma: Vma,
    fd: &'a Arc<OwnedFd>,
    off: u64,
    alias: usize,
}

/// Holds the program's writes to memory hetmm copies and then replaces under it (private memory
/// adopted by [`Host::register`], a memfd mapping given back by [`Host::unregister`]): a write
/// landing between the copy and the replacement went to pages about to be dropped, and was lost.
/// A userfaultfd of the hold's own write-protects the ranges; a writing thread waits in its
/// fault, which nobody answers, until the hold is dropped: it unprotects and unregisters the
/// ranges (on kernels older than 6.12 the close would leave the write-protect bits a failed step
/// leaves on memory that stays), wakes the waiters and closes the uffd, and a woken writer
/// writes into whatever is mapped there by then. Reads go on.
///
/// Pages without an entry are write-protected too (`UFFD_FEATURE_WP_UNPOPULATED`, where the
/// kernel has it: a marker per page, and the page tables to hold them). In memory larger than
/// [`MARK_ALL`] only the 2 MiB windows meeting runs known to hold data are: a terabyte of
/// untouched reservation would take gigabytes of page tables. A page first written elsewhere
/// there after the copy passed it is lost. Nothing waits for a page to be present: a fault of
/// the copy's own on a page the program dropped meanwhile (`MADV_DONTNEED`, as `free` does in
/// the heap) must not wait for the hold.
///
/// Where the kernel cannot (a kernel that lets this process only handle user-mode faults,
/// memory a uffd of the program's already watches, a private mapping of a regular file), writes
/// there are not held and may be lost as before. Accesses the kernel makes without being able to
/// wait (a `/proc/pid/mem` write, an exiting thread clearing its tid) fail instead (EFAULT). A
/// fork that goes ahead during a hold (only one from inside an operation can: registering
/// holds forks off, and that fork's wait is bounded) leaves the child holding the uffd too, so
/// the close would not wake the writers: the drop wakes them first.
/// Between [`WriteHold::new`] and the drop the caller must not allocate or free: a writer held in
/// the middle of `malloc`'s own bookkeeping (registered heap memory shares pages with it) may
/// hold the lock `malloc` would wait for, and `free` may write into held memory itself.
struct WriteHold {
    /// Open for the hold's life: closing it is what lets the writers go on.
    uffd: Option<Uffd>,
    /// The ranges registered (allocated before any is write-protected).
    held: Vec<VaRange>,
    /// The first range that could not be held, logged once the hold is gone.
    failed: Option<(VaRange, crate::uffd::UffdError)>,
}

/// Memory up to this size is write-protected whole by a [`WriteHold`], data or not.
const MARK_ALL: u64 = 4 << 30;

impl WriteHold {
    /// Holds writes to each range of `parts`, given with the runs of it known to hold data
    /// (`None`: any page may).
    fn new(parts: &[(VaRange, Option<&[VaRange]>)]) -> WriteHold {
        let mut hold = WriteHold { uffd: None, held: Vec::with_capacity(parts.len()), failed: None };
        let optional = Features::WP_UNPOPULATED | Features::WP_HUGETLBFS_SHMEM;
        let uffd = match Uffd::open(Features::PAGEFAULT_FLAG_WP, optional) {
            Ok(u) if u.kernel_faults_supported() => u,
            Ok(_) => return hold,
            Err(e) => {
                log::debug!("writes are not held while memory is replaced: {e}");
                return hold;
            }
        };
        for &(r, data) in parts {
            // SAFETY: write-protect mode, to hold the program's writes while the memory is
            // replaced; the hold write-protects and then releases it without changing a byte.
            if let Err(e) = unsafe { uffd.register(r, RegisterMode::WP) } {
                hold.failed.get_or_insert((r, e));
                continue;
            }
            hold.held.push(r);
            let protected = match data.filter(|_| r.len > MARK_ALL) {
                None => uffd.writeprotect(r, true, false),
                Some(runs) => data_windows(r, runs).try_for_each(|w| uffd.writeprotect(w, true, false)),
            };
            if let Err(e) = protected {
                hold.failed.get_or_insert((r, e));
            }
        }
        hold.uffd = Some(uffd);
        hold
    }
}

/// The 2 MiB windows of `r` that meet `runs` (sorted), merged and clipped to `r`.
fn data_windows(r: VaRange, runs: &[VaRange]) -> impl Iterator<Item = VaRange> + '_ {
    const W: u64 = hetmm_core::types::BLOCK_SIZE;
    let mut next = r.start;
    let mut pending: Option<VaRange> = None;
    let mut it = runs.iter();
    std::iter::from_fn(move || loop {
        let Some(run) = it.next() else { return pending.take() };
        let start = align_down(run.start, W).max(r.start).max(next);
        let end = align_up(run.end(), W).unwrap_or(u64::MAX).min(r.end());
        if start >= end {
            continue;
        }
        next = end;
        match pending.as_mut() {
            Some(p) if p.end() == start => p.len += end - start,
            _ => {
                if let Some(done) = pending.replace(VaRange::new(start, end - start)) {
                    return Some(done);
                }
            }
        }
    })
}

impl Drop for WriteHold {
    fn drop(&mut self) {
        if let Some(uffd) = self.uffd.take() {
            for &r in &self.held {
                // Nothing is registered there any more where the memory was replaced.
                let _ = uffd.writeprotect(r, false, false);
                let _ = uffd.unregister(r);
                // Unregistering wakes only the waiters of VMAs still registered, and closing
                // only where no fork child shares the uffd: the writers held where the memory
                // was replaced are woken here.
                let _ = uffd.wake(r);
            }
        }
        if let Some((r, e)) = self.failed.take() {
            log::debug!("writes to {r} were not held while it was replaced: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::private_filled;
    use hetmm_core::cpu::CpuFaultHandler;
    use hetmm_core::error::CoreError;
    use hetmm_core::types::Access;
    use std::sync::Weak;

    /// A move of registered memory is applied after the program's mremap returned: by then the
    /// program may have moved the memory on and something else may be mapped at its end (another
    /// thread's new stack took such addresses). Only the memfd mapping continuing the moved
    /// memory is growth to replace with fresh memory; other memory there stays as it is. (Any
    /// mapping found there was replaced with zeros past the moved length: a test thread whose
    /// stack it was died of SIGSEGV.)
    #[test]
    fn growth_is_looked_for_only_in_the_moved_memorys_mapping() {
        let page = PAGE_SIZE as usize;
        let p = private_filled(2 * page, 0xAB) as usize;
        // As if a page of the memfd of inode 12345 moved to `p` and then left (another mapping
        // is there now, continuing past the page's end).
        fresh_growth(p as u64 + PAGE_SIZE, crate::maps::MapsFile { dev: (0, 1), ino: 12345 }, 0, &[]);
        // SAFETY: the test's own two pages, still mapped (the call above must not replace them).
        let b = unsafe { ((p + page) as *const u8).read_volatile() };
        // SAFETY: the test's own mapping, not used after.
        unsafe { libc::munmap(p as *mut _, 2 * page) };
        assert_eq!(b, 0xAB, "memory that is not the moved memory's memfd mapping was replaced");
    }

    #[test]
    fn data_windows_are_the_2mib_windows_meeting_the_runs_merged_and_clipped() {
        const W: u64 = 2 << 20;
        let r = VaRange::new(10 * W + 4096, 20 * W);
        let runs = [
            VaRange::new(10 * W + 8192, 4096), // the first window, clipped to `r`
            VaRange::new(11 * W + 4096, 4096), // the next window: merged with it
            VaRange::new(11 * W + 8192, 4096), // the same window again
            VaRange::new(15 * W - 4096, 8192), // across two windows
            VaRange::new(30 * W, 4096),        // the last window, clipped
        ];
        let w: Vec<VaRange> = data_windows(r, &runs).collect();
        assert_eq!(
            w,
            vec![VaRange::new(r.start, 2 * W - 4096), VaRange::new(14 * W, 2 * W), VaRange::new(30 * W, 4096),]
        );
        assert_eq!(data_windows(r, &[]).count(), 0);
    }

    /// A hold over memory larger than [`MARK_ALL`] write-protects only the 2 MiB windows that
    /// hold data: markers on every page of a large untouched reservation took page tables in
    /// proportion to its size. Smaller memory is write-protected whole.
    #[test]
    fn a_large_hold_marks_only_the_windows_with_data() {
        let Some(pm) = crate::pagemap::Pagemap::open() else {
            eprintln!("skipped: /proc/self/pagemap cannot be opened here");
            return;
        };
        let len = (MARK_ALL + (64 << 20)) as usize;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh private reservation at an address the kernel picks.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, flags, -1, 0) } as usize;
        assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
        let data = p + (3 << 30) + 8192;
        // SAFETY: a byte of the reservation just made.
        unsafe { (data as *mut u8).write(7) };
        let range = VaRange::new(p as u64, len as u64);
        let had = pm.entries(range);
        assert_eq!(had, vec![VaRange::new(data as u64, PAGE_SIZE)]);
        let wp = |va: usize| pm.entry(va as u64) & (1 << 57) != 0;
        let hold = WriteHold::new(&[(range, Some(&had))]);
        if hold.uffd.is_none() || !hold.held.contains(&range) {
            eprintln!("skipped: no write-protect hold here ({:?})", hold.failed);
            return;
        }
        let unpopulated = Uffd::open(Features::WP_UNPOPULATED, Features::empty()).is_ok();
        assert!(wp(data), "the page with data is write-protected");
        assert_eq!(wp(data + 4096), unpopulated, "so are the pages around it, in its window");
        assert!(!wp(p + (1 << 30)), "a window without data has no marker");
        drop(hold);
        assert!(!wp(data), "the hold gone, nothing is write-protected");
        // SAFETY: the test's own reservation.
        unsafe { libc::munmap(p as *mut _, len) };
    }

    /// A fork child that shares the hold's uffd (it was forked during the hold) does not keep
    /// the held writers waiting once the hold is dropped: closing a uffd a child still has wakes
    /// nobody, and they waited until the child exited.
    #[test]
    fn a_hold_wakes_its_writers_though_a_fork_child_shares_its_uffd() {
        let _turn = crate::test_support::fork_turn();
        let len = 4 * PAGE_SIZE as usize;
        let p = private_filled(len, 1) as usize;
        let range = VaRange::new(p as u64, len as u64);
        let hold = WriteHold::new(&[(range, None)]);
        if hold.uffd.is_none() || !hold.held.contains(&range) {
            eprintln!("skipped: no write-protect hold here ({:?})", hold.failed);
            return;
        }
        // SAFETY: a byte of the test's mapping, written once by this thread alone.
        let writer = std::thread::spawn(move || unsafe { (p as *mut u8).write_volatile(2) });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!writer.is_finished(), "the write is held");
        // SAFETY: the child only sleeps and `_exit`s: no allocation, no lock.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: async-signal-safe calls only, in the child.
            unsafe {
                libc::sleep(20);
                libc::_exit(0);
            }
        }
        // The memory replaced, as a registration replaces it.
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
        // SAFETY: replaces the test's own mapping, which no reference covers.
        assert_eq!(unsafe { libc::mmap(p as *mut _, len, rw, flags, -1, 0) } as usize, p);
        drop(hold);
        let t = std::time::Instant::now();
        while !writer.is_finished() && t.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let woken = writer.is_finished();
        // SAFETY: the child made above; killed and reaped.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        assert!(woken, "the writer still waited with the child alive");
        writer.join().unwrap();
        // SAFETY: byte 0 of the new mapping, which the woken writer wrote.
        assert_eq!(unsafe { (p as *const u8).read_volatile() }, 2, "the write landed in the new memory");
        // SAFETY: the test's own mapping, not used afterwards.
        unsafe { libc::munmap(p as *mut _, len) };
    }

    /// A core that serves no fault (these tests never fault registered memory).
    struct NoCore;
    impl CpuFaultHandler for NoCore {
        fn cpu_fault(&self, va: u64, _: Access) -> Result<(), CoreError> {
            Err(CoreError::NotShared(VaRange::new(va & !(PAGE_SIZE - 1), PAGE_SIZE)))
        }
    }

    /// A registration that fails after some parts were adopted (here the second part's
    /// `mmap(MAP_FIXED)` is refused: it is sealed) must leave the program's memory as it was:
    /// it leaves the first part a `MAP_SHARED` memfd mapping nobody manages, so a `fork()`
    /// child then shares it with the parent (writes of one seen by the other).
    #[test]
    fn a_failed_adoption_leaves_no_part_adopted() {
        let core = Arc::new(NoCore);
        let host = Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>).unwrap();
        let len = 2 * PAGE_SIZE as usize;
        let p = private_filled(len, 0x11) as usize;
        let second = p + PAGE_SIZE as usize;
        // SAFETY: seals the test's own second page (mseal(2)): it can no longer be replaced.
        let r = unsafe { libc::syscall(462, second, PAGE_SIZE as usize, 0) };
        assert_eq!(r, 0, "mseal: {}", std::io::Error::last_os_error());
        let range = VaRange::new(p as u64, len as u64);
        assert!(host.register(p as u64, len as u64).is_err(), "a sealed part cannot be adopted");
        let after = vmas(range).expect("still mapped");
        // SAFETY: byte 0 of the test's first page, mapped (checked just above), not registered.
        assert_eq!(unsafe { (p as *const u8).read() }, 0x11);
        assert!(after.iter().all(|v| !v.shared), "failed registration left {after:?}");
    }

    /// The permissions `/proc/self/maps` gives the VMA holding `va`.
    fn perms_at(va: u64) -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for line in maps.lines() {
            let mut it = line.split_whitespace();
            let (span, perms) = (it.next().unwrap(), it.next().unwrap());
            let (s, e) = span.split_once('-').unwrap();
            let (s, e) = (u64::from_str_radix(s, 16).unwrap(), u64::from_str_radix(e, 16).unwrap());
            if (s..e).contains(&va) {
                return perms.to_string();
            }
        }
        panic!("{va:#x} not mapped")
    }

    /// Registering memory keeps "its protection as the program mapped it", but only read and
    /// write survive: executable memory (a JIT's code buffer) is adopted without `PROT_EXEC`
    /// (and given back without it by `unregister`), so the program's next call into it dies of
    /// SIGSEGV.
    #[test]
    fn registering_executable_memory_keeps_it_executable() {
        let core = Arc::new(NoCore);
        let host = Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>).unwrap();
        let len = PAGE_SIZE as usize;
        // One `ret` instruction after another.
        let p = private_filled(len, 0xc3) as usize;
        // SAFETY: the test's own page, made executable.
        let r = unsafe { libc::mprotect(p as *mut _, len, libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) };
        assert_eq!(r, 0);
        assert_eq!(perms_at(p as u64), "rwxp");
        let reg = host.register(p as u64, len as u64).unwrap();
        let during = perms_at(p as u64);
        // The core keeps the CPU side (and with it the host's record of the memory).
        let _cpu = Arc::clone(&reg.cpu);
        drop(reg);
        host.unregister(p as u64, len as u64).unwrap();
        let after = perms_at(p as u64);
        // SAFETY: the test's own page, unregistered above; nothing uses it afterwards.
        unsafe { libc::munmap(p as *mut _, len) };
        assert!(during.contains('x'), "registered: {during}");
        assert!(after.contains('x'), "unregistered: {after}");
    }

    /// Audit: `unregister` gave registered memory back one VMA at a time and stopped at the first
    /// failure, leaving the parts before it private and the rest unregistered memfd mappings. A
    /// second call gave every part back from the memfd again: what the program had written to
    /// the private parts meanwhile was lost. A failed call must leave the memory as it was, and
    /// a second one give back every byte written since.
    #[test]
    fn a_failed_unregister_leaves_the_memory_registered_and_loses_no_write() {
        let core = Arc::new(ServeCore::default());
        let host = Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>).unwrap();
        let page = PAGE_SIZE as usize;
        let p = private_filled(3 * page, 0x11) as usize;
        // Three VMAs: read-write, read-only, read-write.
        // SAFETY: the middle page of the test's own mapping; its bytes stay as they are.
        assert_eq!(unsafe { libc::mprotect((p + page) as *mut _, page, libc::PROT_READ) }, 0);
        let reg = host.register(p as u64, 3 * PAGE_SIZE).unwrap();
        let _ = core.cpu.set(Arc::clone(&reg.cpu));
        drop(reg);
        // The second part's move back fails.
        mapping::inject::fail_restore_after(1);
        let failed = host.unregister(p as u64, 3 * PAGE_SIZE);
        assert!(failed.is_err(), "the injected failure is reported");
        // SAFETY: the test's first page, writable (registered or given back: served either way).
        unsafe { (p as *mut u8).write_volatile(0x22) };
        host.unregister(p as u64, 3 * PAGE_SIZE).expect("a second unregister gives the memory back");
        // SAFETY: the test's three pages, private anonymous memory again.
        let (a, b, c) = unsafe {
            ((p as *const u8).read(), ((p + page) as *const u8).read(), ((p + 2 * page) as *const u8).read())
        };
        let perms = perms_at(p as u64);
        // SAFETY: the test's own pages; nothing uses them afterwards.
        unsafe { libc::munmap(p as *mut _, 3 * page) };
        assert_eq!((a, b, c), (0x22, 0x11, 0x11), "the write made between the two calls is kept");
        assert!(perms.ends_with('p'), "given back private: {perms}");
    }

    /// Serves every fault like the core does for host-resident data of registered memory.
    #[derive(Default)]
    struct ServeCore {
        cpu: std::sync::OnceLock<Arc<dyn CpuMmu>>,
    }
    impl CpuFaultHandler for ServeCore {
        fn cpu_fault(&self, va: u64, _: Access) -> Result<(), CoreError> {
            let page = [VaRange::new(va & !(PAGE_SIZE - 1), PAGE_SIZE)];
            let cpu = self.cpu.get().ok_or(CoreError::NotShared(page[0]))?;
            cpu.populate(&page)?;
            Ok(cpu.map(&page, true)?)
        }
    }

    /// Sparse private memory, registered (its untouched pages are holes of the memfd, not
    /// zero-filled pages), reads back byte for byte through the program's pointer, takes
    /// writes, and is given back with them.
    #[test]
    fn sparse_registered_memory_reads_and_writes_back() {
        let core = Arc::new(ServeCore::default());
        let host = Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>).unwrap();
        let len = 4 << 20;
        let page = PAGE_SIZE as usize;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a fresh private mapping at an address the kernel picks.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        let p = p as usize;
        // SAFETY: bytes of the test's `len`-byte mapping.
        unsafe {
            ((p + 3 * page) as *mut u8).write(0x77);
            ((p + len - 1) as *mut u8).write(0x78);
        }
        let reg = host.register(p as u64, len as u64).unwrap();
        let _ = core.cpu.set(Arc::clone(&reg.cpu));
        drop(reg);
        let sum = std::thread::spawn(move || {
            let mut sum = 0u64;
            for i in 0..len {
                // SAFETY: byte `i` of the registered range, mapped; faults are served above.
                sum += u64::from(unsafe { ((p + i) as *const u8).read_volatile() });
            }
            // SAFETY: as above.
            unsafe { ((p + 10 * page + 5) as *mut u8).write_volatile(0x42) };
            sum
        })
        .join()
        .unwrap();
        assert_eq!(sum, 0x77 + 0x78);
        host.unregister(p as u64, len as u64).unwrap();
        // SAFETY: bytes of the range, private anonymous memory again.
        let (a, b, c) = unsafe {
            (
                ((p + 3 * page) as *const u8).read(),
                ((p + 10 * page + 5) as *const u8).read(),
                ((p + len - 1) as *const u8).read(),
            )
        };
        // SAFETY: the test's own mapping, unused afterwards.
        unsafe { libc::munmap(p as *mut _, len) };
        assert_eq!((a, b, c), (0x77, 0x42, 0x78));
    }

    /// Records whether the host could follow each move of registered memory.
    #[derive(Default)]
    struct RemapCore {
        remaps: parking_lot::Mutex<Vec<(u64, u64, u64, bool)>>,
    }
    impl CpuFaultHandler for RemapCore {
        fn cpu_fault(&self, va: u64, _: Access) -> Result<(), CoreError> {
            Err(CoreError::NotShared(VaRange::new(va & !(PAGE_SIZE - 1), PAGE_SIZE)))
        }
        fn cpu_event(&self, ev: hetmm_core::invalidate::CpuEvent) -> Result<(), CoreError> {
            if let hetmm_core::invalidate::CpuEvent::Remap { from, to, len, new_cpu } = ev {
                self.remaps.lock().push((from, to, len, new_cpu.is_some()));
            }
            Ok(())
        }
    }

    /// The program moves one page of registered memory away and back (the kernel merges it
    /// with its neighbours again: one VMA), then moves the whole range: the host must follow
    /// that move. It keeps the page's piece apart from its neighbours (`remapped` looks for one
    /// piece holding the whole move), so the core is told the memory left hetmm's management,
    /// while it is still registered with userfaultfd: its next CPU fault gets SIGBUS.
    #[test]
    fn a_move_over_pieces_moved_back_is_followed() {
        let core = Arc::new(RemapCore::default());
        let host = Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>).unwrap();
        let page = PAGE_SIZE as usize;
        let len = 3 * page;
        let p = private_filled(len, 0x33) as usize;
        let reg = host.register(p as u64, len as u64).unwrap();
        // The core keeps the CPU side (and with it the host's record of the memory).
        let _cpu = Arc::clone(&reg.cpu);
        drop(reg);
        let fixed = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        // Destinations: the test's own PROT_NONE placeholders, which the moves replace.
        let x = private_filled(page, 0) as usize;
        let y = private_filled(len, 0) as usize;
        // Moves the test's registered page 1 over the test's placeholder `x`, then back to the
        // hole it left; then the whole (merged) range over the placeholder `y`.
        // SAFETY: only the test's own mappings move; no Rust reference points into any of them.
        unsafe {
            assert_eq!(libc::mremap((p + page) as *mut _, page, page, fixed, x as *mut libc::c_void) as usize, x);
            assert_eq!(
                libc::mremap(x as *mut _, page, page, fixed, (p + page) as *mut libc::c_void) as usize,
                p + page
            );
            let r = libc::mremap(p as *mut _, len, len, fixed, y as *mut libc::c_void);
            assert_eq!(r as usize, y, "the range is one VMA again: {}", std::io::Error::last_os_error());
        }
        // The events reach the core through the host's reader thread: bounded, generously.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while core.remaps.lock().len() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let remaps = core.remaps.lock().clone();
        // SAFETY: the test's memory, moved to `y` (no more use afterwards).
        unsafe { libc::munmap(y as *mut _, len) };
        assert_eq!(remaps.len(), 3, "{remaps:?}");
        assert_eq!(remaps[2], (p as u64, y as u64, len as u64, true), "{remaps:?}");
    }

    /// A core that applies a move of registered memory only once the test lets it.
    struct HeldCore {
        release: parking_lot::Mutex<std::sync::mpsc::Receiver<()>>,
    }
    impl CpuFaultHandler for HeldCore {
        fn cpu_fault(&self, va: u64, _: Access) -> Result<(), CoreError> {
            Err(CoreError::NotShared(VaRange::new(va & !(PAGE_SIZE - 1), PAGE_SIZE)))
        }
        fn cpu_event(&self, ev: hetmm_core::invalidate::CpuEvent) -> Result<(), CoreError> {
            if matches!(ev, hetmm_core::invalidate::CpuEvent::Remap { .. }) {
                let _ = self.release.lock().recv_timeout(std::time::Duration::from_secs(10));
            }
            Ok(())
        }
    }

    /// A map the core decided on before the program moved the memory with `MREMAP_DONTUNMAP`
    /// (a fault read before the move, served before the move is applied) is refused as raced:
    /// the old range is still registered and shows the same memfd bytes, and mapping it let the
    /// program read, and write, the moved memory through the old addresses behind the core's
    /// back (and the old range, meant to be empty memory, was not).
    #[test]
    fn a_map_of_memory_moved_away_and_not_yet_applied_is_refused() {
        let (tx, rx) = std::sync::mpsc::channel();
        let core = Arc::new(HeldCore { release: parking_lot::Mutex::new(rx) });
        let host = Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>).unwrap();
        let len = 4 * PAGE_SIZE as usize;
        let (p, cpu) = crate::test_support::registered_private(&host, len, 0x33);
        let y = private_filled(len, 0) as usize;
        let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP;
        // SAFETY: moves the test's registered memory over its own placeholder `y`; no Rust
        // reference points into either.
        let r = unsafe { libc::mremap(p as *mut _, len, len, flags, y as *mut libc::c_void) };
        assert_eq!(r as usize, y, "{}", std::io::Error::last_os_error());
        // The mremap returned: the reader has read the move, and the servicer is held applying
        // it. The core, not knowing yet, maps a page at the old address.
        let mapped = cpu.map(&[VaRange::new(p as u64, PAGE_SIZE)], true);
        let present = crate::pagemap::Pagemap::open().map(|pm| pm.present(p as u64));
        tx.send(()).unwrap();
        // SAFETY: the test's own mappings, not used afterwards.
        unsafe {
            libc::munmap(p as *mut _, len);
            libc::munmap(y as *mut _, len);
        }
        assert!(mapped.as_ref().is_err_and(|e| e.raced()), "{mapped:?}");
        assert_ne!(present, Some(true), "nothing mapped at the old address");
    }

    /// Reads the 8 bytes at `at` the way the kernel does for a system call (`write(2)` from
    /// them into a file), on another thread, waiting at most 10 s for it: the `write`'s result
    /// and the bytes it wrote (0xff where it wrote none).
    fn kernel_read8(at: usize) -> Result<(isize, [u8; 8]), std::sync::mpsc::RecvTimeoutError> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let out = crate::test_support::tempfile();
            use std::os::fd::AsRawFd;
            // SAFETY: `write` only reads `at..at + 8`, in the kernel, into a file of ours: where
            // that is not mapped (any more) the call fails with EFAULT.
            let n = unsafe { libc::write(out.as_raw_fd(), at as *const _, 8) };
            let mut got = [0xffu8; 8];
            if n == 8 {
                use std::os::unix::fs::FileExt;
                out.read_exact_at(&mut got, 0).unwrap();
            }
            let _ = tx.send((n, got));
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
    }

    /// Registered private memory the program grows with `mremap` (glibc's `realloc` of a large
    /// block does): the new pages must be fresh zeros, as for the private anonymous memory the
    /// program had. Adopted, the memory is a `MAP_SHARED` memfd mapping, and the kernel extends
    /// it over the next pages of the memfd: here those of the program's own pages 2-3, still
    /// mapped at their old place (the extension is registered, unknown to the core: a kernel
    /// access there fails with EFAULT; with a core that served it, the program would write its
    /// other memory through it).
    #[test]
    fn growing_registered_memory_gives_fresh_pages() {
        let core = Arc::new(RemapCore::default());
        let host = Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>).unwrap();
        let page = PAGE_SIZE as usize;
        let len = 4 * page;
        let p = private_filled(len, 0x33) as usize;
        let reg = host.register(p as u64, len as u64).unwrap();
        let _cpu = Arc::clone(&reg.cpu);
        drop(reg);
        let y = private_filled(len, 0) as usize;
        let fixed = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        // SAFETY: grows the test's registered pages 0-1 into the test's placeholder `y`; no Rust
        // reference points into either.
        let r = unsafe { libc::mremap(p as *mut _, 2 * page, len, fixed, y as *mut libc::c_void) };
        assert_eq!(r as usize, y, "{}", std::io::Error::last_os_error());
        let at = y + 2 * page;
        let res = kernel_read8(at);
        // SAFETY: the test's own mappings, not used afterwards.
        unsafe {
            libc::munmap(y as *mut _, len);
            libc::munmap((p + 2 * page) as *mut _, 2 * page);
        }
        assert_eq!(res, Ok((8, [0u8; 8])), "the grown part of registered private memory");
    }

    /// Registered private memory grown in place (`mremap` into the free addresses right after
    /// it) raises no userfaultfd event: the kernel extends the memfd mapping over the memfd's
    /// room to grow, and the first access there faults to the host, which makes the new part
    /// fresh private memory, the program's own: it reads as zeros (a kernel-mode access, as here,
    /// is served too; past the memfd's end it failed with EFAULT, and an instruction got SIGBUS).
    #[test]
    fn memory_grown_in_place_is_fresh_memory() {
        let core = Arc::new(RemapCore::default());
        let host = Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>).unwrap();
        if !host.kernel_faults_supported() {
            return;
        }
        let page = PAGE_SIZE as usize;
        // The room to grow is freed just before the growth, and another test's thread may map
        // something into it in between (ENOMEM): then the attempt starts over elsewhere.
        let mut grown = None;
        let mut errors = Vec::new();
        for _ in 0..20 {
            let p = private_filled(4 * page, 0x33) as usize;
            let reg = host.register(p as u64, 2 * page as u64).unwrap();
            let cpu = Arc::clone(&reg.cpu);
            drop(reg);
            // Pages 2-3 (not registered) are given back to make room, then pages 0-1 grow into
            // them in place (no MREMAP_MAYMOVE: nothing else can be replaced).
            // SAFETY: the test's own fresh mapping; no Rust reference points into it.
            let r = unsafe {
                libc::munmap((p + 2 * page) as *mut _, 2 * page);
                libc::mremap(p as *mut _, 2 * page, 4 * page, 0)
            };
            if r as usize == p {
                grown = Some((p, cpu));
                break;
            }
            errors.push(std::io::Error::last_os_error().to_string());
            // SAFETY: the test's own registered pages 0-1, not used afterwards.
            unsafe { libc::munmap(p as *mut _, 2 * page) };
        }
        let Some((p, _cpu)) = grown else {
            panic!("no room to grow stayed free in 20 tries: {errors:?}");
        };
        let at = p + 2 * page;
        let res = kernel_read8(at);
        let shared_after = vmas(VaRange::new(at as u64, 2 * PAGE_SIZE)).map(|v| v.iter().any(|m| m.shared));
        // SAFETY: the test's own mapping, not used afterwards.
        unsafe { libc::munmap(p as *mut _, 4 * page) };
        assert_eq!(res, Ok((8, [0u8; 8])), "the part grown in place reads as fresh memory");
        assert_eq!(shared_after, Some(false), "the grown part is private memory, not the memfd's");
    }

    /// A private file mapping with one copied-on-write page, registered, reads back byte for
    /// byte: the written page's bytes, the file's elsewhere (checked correct).
    #[test]
    fn a_private_file_mapping_with_cow_pages_keeps_its_bytes() {
        use std::os::fd::AsRawFd;
        let core = Arc::new(ServeCore::default());
        let host = Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>).unwrap();
        let page = PAGE_SIZE as usize;
        let data: Vec<u8> = (0..3 * page).map(|i| (i / page) as u8 + 1).collect();
        let file = crate::test_support::file_with(&data);
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a fresh private mapping of the test's file at an address the kernel picks.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), 3 * page, rw, libc::MAP_PRIVATE, file.as_raw_fd(), 0) };
        assert_ne!(p, libc::MAP_FAILED);
        let p = p as usize;
        // SAFETY: page 1 of the test's 3-page mapping: copied on write.
        unsafe { std::ptr::write_bytes((p + page) as *mut u8, 9, page) };
        let reg = host.register(p as u64, 3 * page as u64).unwrap();
        let _ = core.cpu.set(Arc::clone(&reg.cpu));
        drop(reg);
        let got = std::thread::spawn(move || {
            // SAFETY: the registered range, mapped; faults are served by `ServeCore`.
            (0..3 * page).map(|i| unsafe { ((p + i) as *const u8).read_volatile() }).collect::<Vec<u8>>()
        })
        .join()
        .unwrap();
        host.unregister(p as u64, 3 * page as u64).unwrap();
        // SAFETY: the test's mapping, unused afterwards.
        unsafe { libc::munmap(p as *mut _, 3 * page) };
        let want: Vec<u8> = (0..3 * page).map(|i| [1u8, 9, 3][i / page]).collect();
        assert!(got == want, "bytes differ after registration");
    }
}
