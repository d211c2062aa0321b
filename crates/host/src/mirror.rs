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
use crate::uffd::RegisterMode;

/// One VMA of the program's memory, from `/proc/self/maps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    /// Addresses (clipped to the range asked about).
    pub range: VaRange,
    /// Protection.
    pub prot: Prot,
    /// `MAP_SHARED`.
    pub shared: bool,
}

/// The VMAs covering `range`, clipped to it, in order; `None` if some page of it is unmapped.
/// The kernel writes `/proc/self/maps` a page of text per read, looking the VMAs up again for
/// each, so other threads mapping and unmapping meanwhile can make a read skip a VMA: a range
/// that looks broken is read again before it is believed.
pub fn vmas(range: VaRange) -> Option<Vec<Vma>> {
    (0..3).find_map(|_| vmas_once(range))
}

fn vmas_once(range: VaRange) -> Option<Vec<Vma>> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let mut out: Vec<Vma> = Vec::new();
    for line in maps.lines() {
        let mut it = line.split_whitespace();
        let (Some(span), Some(perms)) = (it.next(), it.next()) else { continue };
        let Some((s, e)) = span.split_once('-') else { continue };
        let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else { continue };
        let Some(part) = VaRange::new(s, e - s).intersect(&range) else { continue };
        let b = perms.as_bytes();
        let mut prot = Prot::empty();
        if b.first() == Some(&b'r') {
            prot |= Prot::READ;
        }
        if b.get(1) == Some(&b'w') {
            prot |= Prot::WRITE;
        }
        out.push(Vma { range: part, prot, shared: b.get(3) == Some(&b's') });
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
    memfd: Option<OwnedFd>,
    alias: mapping::Alias,
    segs: Mutex<Vec<Seg>>,
}

impl Mirror {
    /// Whether this is mirrored shared memory (devices map host pages; nothing migrates).
    pub fn is_remote(&self) -> bool {
        self.memfd.is_none()
    }

    /// After the program moved `[from, from+len)` to `to`: a view of the new place, if `from`
    /// was ours.
    pub(crate) fn remapped(self: &Arc<Self>, from: u64, to: u64, len: u64) -> Option<Arc<dyn CpuMmu>> {
        let moved = VaRange::new(from, len);
        let mut segs = self.segs.lock();
        let seg = *segs.iter().find(|s| VaRange::new(s.app, s.len).contains_range(&moved))?;
        let off = seg.off + (from - seg.app);
        cut(&mut segs, moved);
        segs.push(Seg { app: to, off, len });
        Some(Arc::new(MirrorView { mirror: Arc::clone(self), app: to, off, len }))
    }

    /// The program unmapped `range`.
    pub(crate) fn forget(&self, range: VaRange) {
        cut(&mut self.segs.lock(), range);
    }
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
        crate::host::reshape_checked(&self.mirror.host.ctx, ranges, |_| {
            ranges.iter().try_for_each(|&r| {
                self.check("revoke", r)?;
                // SAFETY: `r` was just checked inside this mirror's view, mapped shared from its
                // memfd.
                let zap = || unsafe { mapping::zap_view(r) };
                self.mirror.host.ctx.self_zap(r, zap).map_err(|e| mapping_err("revoke", r, e))
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
            continue_range(&self.mirror.host.ctx.uffd, r, writable, &alloc)?;
        }
        Ok(())
    }

    fn protect(&self, ranges: &[VaRange], writable: bool) -> Result<(), HostError> {
        if self.mirror.is_remote() {
            return Ok(());
        }
        crate::host::failure_checked(&self.mirror.host.ctx, "protect", ranges, || {
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
            self.mirror.host.ctx.self_zap(r, zap).map_err(|e| mapping_err("discard", r, e))?;
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
        self.check("protect", range)?;
        // SAFETY: `range` was just checked inside this mirror's view; the core asks for the
        // protection the program gave the range.
        unsafe { mapping::protect_view(range, prot) }.map_err(|e| mapping_err("protect", range, e))
    }

    fn reads_zero(&self, range: VaRange) -> bool {
        match self.check("snapshot", range) {
            // SAFETY: `range` is checked inside the view: its part of the alias, mapped while the
            // mirror lives.
            Ok(off) => unsafe { mapping::alias_is_zero(self.mirror.alias.addr() + off as usize, range.len as usize) },
            Err(_) => false,
        }
    }

    /// Registered private memory becomes a private copy in the child (read from the memfd, not
    /// the alias); registered shared memory stays shared, as the kernel keeps it.
    /// Refused (EPERM, nothing done) in the process that registered the memory, where the alias
    /// is in use.
    fn fork_child(&self, parts: &[hetmm_core::cpu::ForkPart], lost: &[VaRange]) -> Result<(), HostError> {
        if rustix::process::getpid() == self.mirror.host.ctx.uffd.owner() {
            return Err(HostError { op: "fork", range: self.range(), errno: libc::EPERM });
        }
        let result = match &self.mirror.memfd {
            Some(fd) => mapping::privatize_parts(parts, fd.as_fd(), lost, |r| self.offset_of(r))
                .map_err(|e| mapping_err("fork", self.range(), e)),
            None => Ok(()),
        };
        self.mirror.alias.drop_in_child();
        result
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
        let vm = vmas(range).ok_or(RegionError::NotMapped(range))?;
        let shared = vm.iter().filter(|v| v.shared).count();
        let parts: Vec<(VaRange, Prot)> = vm.iter().map(|v| (v.range, v.prot)).collect();
        if shared == vm.len() {
            if vm.len() != 1 {
                return Err(RegionError::SharedSpansMappings { range, mappings: vm.len() });
            }
            let alias = mapping::dup_shared(range)?;
            // Only to be told of munmap/mremap/madvise (see the module notes).
            if let Err(e) = self.uffd.register(range, RegisterMode::WP) {
                log::info!("shared memory {range} cannot be watched ({e}): its munmap and mremap are not followed");
            }
            let mirror = Arc::new(Mirror {
                host: Arc::clone(self),
                memfd: None,
                alias: mapping::Alias::new(alias, range.len as usize),
                segs: Mutex::new(vec![Seg { app: range.start, off: 0, len: range.len }]),
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
            memfd: Some(memfd),
            alias: mapping::Alias::new(alias, range.len as usize),
            segs: Mutex::new(vec![Seg { app: range.start, off: 0, len: range.len }]),
        });
        let fd = mirror.memfd.as_ref().ok_or(MappingError::BadLength(0))?;
        // Every byte is copied before any part is adopted: a part that cannot be read (a file
        // mapping past the end of its file) is refused with the whole range still as it was.
        for v in &vm {
            mapping::copy_private(v.range, v.prot, alias + (v.range.start - range.start) as usize)?;
        }
        for v in &vm {
            mapping::adopt_private(v.range, v.prot, fd, v.range.start - range.start)?;
        }
        let mode = RegisterMode::MISSING | RegisterMode::MINOR | RegisterMode::WP;
        // From here until the core knows the range, its faults have nowhere to go: they wait.
        let arriving = Arriving::new(&self.ctx, range);
        self.uffd.register(range, mode)?;
        self.ctx.mirrors.lock().push(Arc::downgrade(&mirror));
        let cpu = Arc::new(MirrorView { mirror, app: range.start, off: 0, len: range.len });
        Ok(Registration { range, remote: false, cpu, parts, _arriving: Some(arriving) })
    }

    /// Gives registered private memory `[start, start + len)` back to the program as private
    /// anonymous memory with its current bytes (the core must have brought every page back to
    /// host memory and dropped the range first). Shared memory needs nothing here.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), RegionError> {
        let range =
            VaRange::checked(start, len).filter(VaRange::is_page_aligned).ok_or(MappingError::BadLength(len))?;
        for m in self.ctx.live_mirrors_pub() {
            let Some(fd_alias) = m.memfd.as_ref().map(|_| m.alias.addr()) else {
                for s in m.segs.lock().iter() {
                    if let Some(x) = VaRange::new(s.app, s.len).intersect(&range) {
                        let _ = self.uffd.unregister(x);
                    }
                }
                m.forget(range);
                continue;
            };
            let segs: Vec<Seg> = m.segs.lock().clone();
            for s in segs {
                let Some(x) = VaRange::new(s.app, s.len).intersect(&range) else { continue };
                let _ = self.uffd.unregister(x);
                let vm = vmas(x).ok_or(RegionError::NotMapped(x))?;
                for v in vm {
                    let src = fd_alias + (s.off + (v.range.start - s.app)) as usize;
                    mapping::restore_private(v.range, v.prot, src)?;
                }
                m.forget(x);
            }
        }
        Ok(())
    }
}
