//! The userfaultfd reader and the CPU-fault/event servicer.
//!
//! Threading rule: the reader only reads the uffd and dispatches; it never takes a core lock,
//! zaps, maps or touches managed memory, so it is always free to read the REMOVE events that
//! `madvise(MADV_DONTNEED)` waits for (the core's own zaps happen on other threads while they
//! hold block locks). Events whose range is one of the manager's own zaps in flight are dropped
//! there. Everything else (faults and the program's unmap/remap/discard events) goes, in order,
//! to the servicer, which calls the core: a fault at a remapped address is served after the
//! remap that created it.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Weak};
use std::time::{Duration, Instant};

use hetmm_core::cpu::{CpuFaultHandler, CpuMmu, HostError};
use hetmm_core::error::CoreError;
use hetmm_core::invalidate::CpuEvent;
use hetmm_core::types::{Access, VaRange, PAGE_SIZE};
use parking_lot::Mutex;

use crate::mirror::Mirror;
use crate::uffd::{self, Event, Uffd, UffdError};

/// How long the threads sleep in poll/recv before they look at their stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Messages read per `read(2)`.
const BATCH: usize = 64;
/// Longest [`Ctx::fill_room_after`] waits for [`Ctx::layout`].
const LAYOUT_WAIT: Duration = Duration::from_millis(200);
/// State shared by the host's threads and its regions.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) uffd: Arc<Uffd>,
    /// The manager's own operations on registered ranges, whose events are not the program's:
    /// zaps (REMOVE events inside the range), moves of page-table entries out (a REMAP event
    /// from exactly the range) and unmaps of moved entries (an UNMAP event of exactly the
    /// range). The syscall returns as soon as the reader's read(2) took the event, before the
    /// reader looks the range up, so an entry lives on after its operation: until the reader
    /// has classified every batch that could hold the events (the value: the number of
    /// batches, see [`Ctx::own_op`]).
    zaps: Mutex<Vec<(Own, VaRange, Option<u64>)>>,
    /// read(2) calls the reader has started.
    reads: AtomicU64,
    /// Batches the reader has classified (it finished looking up their REMOVE ranges).
    classified: AtomicU64,
    /// The program's unmaps and remaps the reader has classified (see [`Ctx::reshaped_since`]).
    reshapes: AtomicU64,
    /// The ranges of the latest of them (see [`Reshapes`]).
    reshape_log: Mutex<Reshapes>,
    /// Those of them the core has applied.
    reshapes_applied: AtomicU64,
    /// Bytes of moved-out page-table entries freed (zapped a block at a time: see
    /// `host::release`).
    pub(crate) reaped: AtomicU64,
    /// Registered memory (followed through unmap and remap). In an `Arc` so that a fork can
    /// hold the list from its prepare to its child (see [`crate::Host::hold_for_fork`]).
    pub(crate) mirrors: Arc<Mutex<Vec<Weak<Mirror>>>>,
    /// Regions of [`crate::Host::create_region`] (parts the program moves out of them are
    /// followed: see [`crate::HostRegion::moved_away`]). In an `Arc` as `mirrors` is.
    pub(crate) regions: Arc<Mutex<Vec<Weak<crate::HostRegion>>>>,
    /// Ranges being registered ([`crate::Host::register`]): registered with userfaultfd, not
    /// yet known to the core. A fault there waits until the registration is done.
    arriving: Mutex<Vec<VaRange>>,
    /// Written while memfd offsets pass from one owner to another (part of a region's view
    /// moved out to a mirror, [`crate::HostRegion::moved_away`]); read while deciding, from
    /// [`Ctx::memfd_uses`], that memory shows offsets no one owns and replacing it. Between the
    /// region forgetting the part and the mirror taking it, no one owns those offsets: another
    /// thread's [`Ctx::fill_room_after`] then replaced the program's moved memory with zeros.
    pub(crate) layout: parking_lot::RwLock<()>,
    /// See [`Ctx::events_read`] (`None`: it could not be mapped; nothing is checked).
    probe: Option<crate::mapping::Alias>,
    /// Held by the reader (for writing) from a read(2) until its batch is classified, and by a
    /// map ([`Ctx::mapping_checked`], for reading: maps run side by side) while it checks for
    /// moves and maps: see there.
    reading: parking_lot::RwLock<()>,
}

/// Marks a range as arriving ([`Ctx::arriving`]) for as long as it lives.
#[derive(Debug)]
pub(crate) struct Arriving {
    ctx: Arc<Ctx>,
    range: VaRange,
}

impl Arriving {
    pub(crate) fn new(ctx: &Arc<Ctx>, range: VaRange) -> Self {
        ctx.arriving.lock().push(range);
        Arriving { ctx: Arc::clone(ctx), range }
    }
}

impl Drop for Arriving {
    fn drop(&mut self) {
        let mut a = self.ctx.arriving.lock();
        if let Some(i) = a.iter().position(|r| *r == self.range) {
            a.swap_remove(i);
        }
    }
}

/// The ranges of the program's latest unmaps and remaps, by their number in
/// [`Ctx::reshapes`], for [`Ctx::reshaped_since`] to tell whether one touched a revoke's ranges.
/// Bounded: entries already applied are dropped past [`Reshapes::KEEP`], and a question about
/// changes older than the oldest kept is answered yes.
#[derive(Debug, Default)]
struct Reshapes {
    entries: std::collections::VecDeque<(u64, VaRange)>,
    /// Every change numbered up to this one has been dropped.
    dropped: u64,
}

impl Reshapes {
    /// How many entries are kept at least (a revoke's mark older than that is rare: it means
    /// that many changes were read while one revoke ran).
    const KEEP: usize = 1024;

    fn push(&mut self, seq: u64, ranges: &[VaRange], applied: u64) {
        self.entries.extend(ranges.iter().map(|&r| (seq, r)));
        while self.entries.len() > Self::KEEP && self.entries.front().is_some_and(|&(s, _)| s <= applied) {
            if let Some((s, _)) = self.entries.pop_front() {
                self.dropped = self.dropped.max(s);
            }
        }
    }

    /// Whether a change numbered after `since` overlaps any of `ranges` (yes if such changes were
    /// dropped).
    fn touches(&self, since: u64, ranges: &[VaRange]) -> bool {
        since < self.dropped
            || self
                .entries
                .iter()
                .rev()
                .take_while(|&&(s, _)| s > since)
                .any(|(_, r)| ranges.iter().any(|x| x.intersect(r).is_some()))
    }
}

impl Ctx {
    pub(crate) fn new(uffd: Arc<Uffd>) -> Self {
        Ctx {
            uffd,
            zaps: Mutex::new(Vec::new()),
            reads: AtomicU64::new(0),
            classified: AtomicU64::new(0),
            reshapes: AtomicU64::new(0),
            reshape_log: Mutex::new(Reshapes::default()),
            reshapes_applied: AtomicU64::new(0),
            reaped: AtomicU64::new(0),
            mirrors: Arc::new(Mutex::new(Vec::new())),
            regions: Arc::new(Mutex::new(Vec::new())),
            arriving: Mutex::new(Vec::new()),
            layout: parking_lot::RwLock::new(()),
            probe: crate::mapping::probe_page()
                .map_err(|e| log::warn!("no probe page ({e}): revokes cannot see moves the kernel has not queued"))
                .ok(),
            reading: parking_lot::RwLock::new(()),
        }
    }

    /// Runs `map` (one `UFFDIO_CONTINUE` over `range`) unless an unmap or remap touching
    /// `range` has been read and not yet applied, in which case it fails as raced
    /// ([`HostError::RACED`]) without mapping anything. The core decided to map from where it
    /// believes the memory is; after such a change the addresses may show something else: the
    /// old range of an `MREMAP_DONTUNMAP` move, still registered and showing the same memfd
    /// bytes (the program then read and wrote the moved memory through it, behind the core's
    /// back), or other registered memory mapped there since. Airtight with the reader's lock
    /// held across the check and the map: a move the kernel makes meanwhile keeps the address
    /// space marked as changing until its event is read, which waits for the lock, so the map
    /// fails with EAGAIN (and the caller tries again, checking again); a move whose event was
    /// read before is in the log, classified under the same lock.
    pub(crate) fn mapping_checked<T>(
        &self,
        range: VaRange,
        map: impl FnOnce() -> Result<T, UffdError>,
    ) -> Result<Result<T, UffdError>, HostError> {
        let _reading = self.reading.read();
        if self.unapplied_reshape_touches(range) {
            return Err(HostError { op: "map", range, errno: HostError::RACED });
        }
        Ok(map())
    }

    /// Whether an unmap or remap touching `range` the reader has classified is not yet applied.
    fn unapplied_reshape_touches(&self, range: VaRange) -> bool {
        let applied = self.reshapes_applied.load(Ordering::Acquire);
        self.reshapes.load(Ordering::Acquire) != applied && self.reshape_log.lock().touches(applied, &[range])
    }

    /// Whether an unmap or remap of the program's memory may be read or being read and not yet
    /// applied (no wait: see [`Ctx::reshape_pending`] for the bounded wait).
    pub(crate) fn reshape_in_flight(&self) -> bool {
        self.classified.load(Ordering::Acquire) < self.reads.load(Ordering::Acquire)
            || self.reshapes.load(Ordering::Acquire) != self.reshapes_applied.load(Ordering::Acquire)
    }

    fn is_arriving(&self, va: u64) -> bool {
        self.arriving.lock().iter().any(|r| r.contains(va))
    }

    /// Runs `zap` (an `MADV_DONTNEED` of `range`) marked as the manager's own, unless an unmap
    /// or remap touching `range` has been read since `mark` (from [`Ctx::reshape_mark`], taken
    /// where the caller decided on the zap) or is not yet applied ([`Ctx::reshaped_since`]):
    /// the range may not be the manager's any more, and `MADV_DONTNEED` destroys the data of private memory the program may have mapped
    /// there since (a revoke that had checked before the program's munmap zeroed the memory the
    /// program then mapped and filled there, and registered). It fails then with ENOMEM, as a
    /// zap of an unmapped range does, having zapped nothing. A window remains, from this check
    /// until the kernel has looked the range up again after the zap's REMOVE event is read
    /// (it lets go of the mmap lock while it waits for that): a munmap, read, and a new mapping
    /// in it.
    pub(crate) fn self_zap(
        &self,
        range: VaRange,
        mark: u64,
        zap: impl FnOnce() -> Result<(), crate::mapping::MappingError>,
    ) -> Result<(), crate::mapping::MappingError> {
        // Checked once the zap is marked the manager's own, as close to the madvise as can be.
        // (While it is marked, a REMOVE event of the program's in the range is taken for the
        // zap's, as during the zap itself; the check takes microseconds unless the reader is
        // behind.)
        self.own_op(Own::Zap, range, || {
            if self.reshaped_since(mark, &[range]) {
                let errno = rustix::io::Errno::NOMEM.raw_os_error();
                return Err(crate::mapping::MappingError::Os { op: "madvise(DONTNEED)", range, errno });
            }
            zap()
        })
    }

    /// Runs `op`, an operation of kind `kind` on `range`, marked as the manager's own.
    pub(crate) fn own_op<T>(&self, kind: Own, range: VaRange, op: impl FnOnce() -> T) -> T {
        self.zaps.lock().push((kind, range, None));
        let r = op();
        // Every event of the operation was taken by a read(2) that had started by now: the
        // entry may go once the reader has classified that many batches.
        let until = self.reads.load(Ordering::Acquire);
        let mut z = self.zaps.lock();
        if let Some(e) = z.iter_mut().find(|(k, x, done)| *k == kind && *x == range && done.is_none()) {
            e.2 = Some(until);
        }
        prune(&mut z, self.classified.load(Ordering::Acquire));
        r
    }

    /// Whether an event of kind `kind` for `range` comes from the manager's own operation: a
    /// REMOVE inside a zap, a REMAP or UNMAP of exactly the range moved or unmapped (the
    /// program's own unmap or remap of memory being zapped must still reach the core).
    fn is_own(&self, kind: Own, range: VaRange) -> bool {
        self.zaps.lock().iter().any(|(k, x, _)| {
            *k == kind
                && match kind {
                    Own::Zap => x.contains_range(&range),
                    Own::MoveOut | Own::Unmap => *x == range,
                }
        })
    }

    /// A mark for [`Ctx::reshaped_since`], taken before a revoke.
    pub(crate) fn reshape_mark(&self) -> u64 {
        self.reshapes.load(Ordering::Acquire)
    }

    /// The reader passes the program's unmap or remap touching `ranges` on to the core.
    pub(crate) fn note_reshape(&self, ranges: &[VaRange]) {
        let mut log = self.reshape_log.lock();
        // Under the log's lock, so that a reader of the log sees the count and the ranges agree.
        let seq = self.reshapes.fetch_add(1, Ordering::AcqRel) + 1;
        log.push(seq, ranges, self.reshapes_applied.load(Ordering::Acquire));
    }

    /// Whether the core may not yet know where the program's memory in `ranges` is: an unmap or
    /// remap of registered memory overlapping them was read since `mark` or is still to be
    /// applied, counting every event a read(2) started by now may hold (waits, at most a second,
    /// for the reader to classify them; `true` if it does not). A revoke that overlapped such a
    /// change may have acted on addresses the program had already moved away: the kernel moves
    /// the page-table entries before the event is read, and the program may map something else
    /// at the old addresses once it is (its mremap returns then), so a zap there succeeds and
    /// takes nothing of ours. Changes elsewhere do not count: a program unmapping unrelated
    /// memory in a loop must not make every migration fail as raced.
    pub(crate) fn reshaped_since(&self, mark: u64, ranges: &[VaRange]) -> bool {
        if !self.wait_classified() {
            return true;
        }
        let read = self.reshapes.load(Ordering::Acquire);
        if read == mark && read == self.reshapes_applied.load(Ordering::Acquire) {
            return false;
        }
        let log = self.reshape_log.lock();
        // Every change after `mark` (read since) or after `applied` (not yet applied).
        log.touches(mark.min(self.reshapes_applied.load(Ordering::Acquire)), ranges)
    }

    /// Whether one of the manager's zaps is under way (its operation not returned).
    #[cfg(test)]
    pub(crate) fn zap_in_flight(&self) -> bool {
        self.zaps.lock().iter().any(|(k, _, done)| *k == Own::Zap && done.is_none())
    }

    /// Counts every change read so far as applied (what the servicer does as it applies them).
    #[cfg(test)]
    pub(crate) fn reshapes_applied_for_test(&self) {
        self.reshapes_applied.store(self.reshapes.load(Ordering::Acquire), Ordering::Release);
    }

    /// Whether an unmap or remap of the program's memory has been read and not yet applied to
    /// the core, counting every event a read(2) started by now may hold (waits, at most a
    /// second, for the reader to classify them; `true` if it does not). The core's regions
    /// follow the program's layout only once none is.
    pub(crate) fn reshape_pending(&self) -> bool {
        !self.wait_classified()
            || self.reshapes.load(Ordering::Acquire) != self.reshapes_applied.load(Ordering::Acquire)
    }

    /// Waits (at most a second) until every event the kernel has begun for this userfaultfd has
    /// been read; whether it did. The kernel counts an `mremap` of registered memory as changing
    /// the address space from before it moves the page-table entries until the reader has read
    /// its REMAP event, which it queues only after moving them, and refuses every userfaultfd
    /// range ioctl meanwhile with EAGAIN. Here the ioctl (an unprotect of a page never
    /// registered: it does nothing, ENOENT) only asks. A move whose event is not yet queued is
    /// otherwise invisible: a revoke that zapped the old range after a `MREMAP_DONTUNMAP` moved
    /// the entries (the range stays mapped, so the zap succeeds on nothing) left the CPU a
    /// writable mapping the core did not know of, and a device copy later overwrote its writes.
    pub(crate) fn events_read(&self) -> bool {
        let Some(probe) = &self.probe else { return true };
        let t = Instant::now();
        let asked = crate::host::retry_again_within(Duration::from_secs(1), || {
            self.uffd.writeprotect(probe.range(), false, false)
        });
        if matches!(asked, Err(UffdError::Retry { .. })) {
            log::warn!("events in flight for over {:?}: reported as a race", t.elapsed());
            return false;
        }
        if t.elapsed() > Duration::from_millis(1) {
            log::debug!("waited {:?} for events in flight to be read", t.elapsed());
        }
        true
    }

    /// Waits (at most a second) until the reader has classified every batch a read(2) started
    /// by now holds; whether it did.
    fn wait_classified(&self) -> bool {
        let until = self.reads.load(Ordering::Acquire);
        let t = Instant::now();
        while self.classified.load(Ordering::Acquire) < until {
            let waited = t.elapsed();
            if waited > std::time::Duration::from_secs(1) {
                return false;
            }
            // A batch takes microseconds to classify, and a sleep, however short, tens of them
            // here: every zap checks (`self_zap`), and a revoke of many small ranges waited
            // that long for each (uvm's stream took 15% longer).
            if waited < std::time::Duration::from_micros(200) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
        true
    }

    /// The reader finished classifying a batch: drop the zaps it could have held.
    fn batch_classified(&self) {
        let classified = self.classified.fetch_add(1, Ordering::AcqRel) + 1;
        prune(&mut self.zaps.lock(), classified);
    }

    pub(crate) fn live_mirrors_pub(&self) -> Vec<Arc<Mirror>> {
        self.live_mirrors()
    }

    fn live_mirrors(&self) -> Vec<Arc<Mirror>> {
        let mut m = self.mirrors.lock();
        m.retain(|w| w.strong_count() > 0);
        m.iter().filter_map(Weak::upgrade).collect()
    }

    fn live_regions(&self) -> Vec<Arc<crate::HostRegion>> {
        let mut r = self.regions.lock();
        r.retain(|w| w.strong_count() > 0);
        r.iter().filter_map(Weak::upgrade).collect()
    }

    /// The CPU side of `[to, to + len)` after the program moved `[from, from + len)` there, if
    /// that memory is registered memory or part of a region's view.
    fn remap_view(&self, from: u64, to: u64, len: u64) -> Option<Arc<dyn CpuMmu>> {
        self.live_mirrors()
            .into_iter()
            .find_map(|m| m.remapped(from, to, len))
            .or_else(|| self.live_regions().into_iter().find_map(|r| r.moved_away(from, to, len)))
    }

    /// The program unmapped `range`: what of it was managed memory is not. A part the program
    /// grew such memory by in place, right after `range`, that it never touched still shows the
    /// memfd (no event told of it): with the managed memory gone, nothing would know it as such
    /// (a touch got SIGBUS), so it becomes the fresh private memory a touch would have made it.
    fn forget(&self, range: VaRange) {
        let meets = |p: &[(VaRange, u64)]| p.iter().any(|(r, _)| r.intersect(&range).is_some());
        let mut files = Vec::new();
        for m in self.live_mirrors() {
            if let Some((file, p)) = m.pieces() {
                if meets(&p) {
                    files.push(file);
                }
            }
            m.forget(range);
        }
        for r in self.live_regions() {
            if meets(&r.pieces()) {
                files.push(r.file());
            }
            r.forget(range);
        }
        files.sort_unstable();
        files.dedup();
        for file in files {
            self.fill_room_after(range.end(), file);
        }
    }

    /// Where managed memory shows each memfd of hetmm (see [`crate::mapping::room_at`]).
    pub(crate) fn memfd_uses(&self) -> Vec<crate::mapping::MemfdUse> {
        let mut uses: Vec<crate::mapping::MemfdUse> = Vec::new();
        let pieces = self
            .live_mirrors()
            .iter()
            .filter_map(|m| m.pieces().map(|(file, p)| (file, p, m.alias_range())))
            .chain(self.live_regions().iter().map(|r| (r.file(), r.pieces(), r.alias_range())))
            .collect::<Vec<_>>();
        for (file, p, alias) in pieces {
            let used = p.into_iter().map(|(r, off)| (off, r.len));
            match uses.iter_mut().find(|u| u.file == file) {
                Some(u) => {
                    u.used.extend(used);
                    u.aliases.push(alias);
                }
                None => uses.push(crate::mapping::MemfdUse { file, used: used.collect(), aliases: vec![alias] }),
            }
        }
        uses
    }

    /// A fault at `va` the core knows nothing of: if the page shows a memfd of hetmm at an
    /// offset no managed memory shows (the program grew a view in place with `mremap`, which
    /// raises no event: the kernel extended the mapping over the memfd's room to grow, see
    /// `mapping::GROWTH_ROOM`), that new part becomes fresh private memory, the program's own and
    /// unmanaged (what growing private memory gives; growth that moves is treated alike, see
    /// `mirror::fresh_growth`), and the faulting thread is woken to find it. Whether it did.
    fn fresh_growth_at(&self, va: u64) -> bool {
        let page = VaRange::new(va & !(PAGE_SIZE - 1), PAGE_SIZE);
        let _layout = self.layout.read();
        let Some(room) = crate::mapping::room_at(page, &self.memfd_uses()) else { return false };
        self.fill_room(room, "a fault").is_ok_and(|()| {
            let _ = crate::host::retry_again(|| self.uffd.wake(page));
            true
        })
    }

    /// Where memory of the memfd `file` stops being managed at `end` (the end of a view given
    /// back or dropped): if the program grew it in place there and never touched the new part,
    /// that part still shows the memfd; it becomes the fresh private memory a touch would have
    /// made it (with the view gone, a touch would raise SIGBUS). Cheap where nothing is mapped at
    /// `end`. Unregistered first, so that replacing it raises no event: this may run on the
    /// reader thread (where the core's last holder lets it go), which would wait for itself to
    /// read it. Only memory showing `file` is looked at: other managed memory the program put at
    /// `end` is not this memory's growth.
    pub(crate) fn fill_room_after(&self, end: u64, file: crate::maps::MapsFile) {
        let page = VaRange::new(end, PAGE_SIZE);
        if !crate::mapping::is_mapped(page) {
            return;
        }
        // Bounded: this may run on the reader thread, and the servicer holds the lock while a
        // move it applies replaces a grown part, which waits for the reader to read the event.
        let Some(_layout) = self.layout.try_read_for(LAYOUT_WAIT) else {
            log::warn!("memory grown in place past {end:#x} not looked for: the layout stayed busy");
            return;
        };
        let mut uses = self.memfd_uses();
        uses.retain(|u| u.file == file);
        if uses.is_empty() {
            uses.push(crate::mapping::MemfdUse { file, used: Vec::new(), aliases: Vec::new() });
        }
        // From `end` on only: what is before it is the view being dropped or given back.
        if let Some(mut room) = crate::mapping::room_at(page, &uses) {
            room.range = VaRange::new(end, room.range.end() - end.min(room.range.end()));
            if let Err(e) = crate::host::retry_again(|| self.uffd.unregister(room.range)) {
                log::error!("unregistering {}, managed memory grown in place: {e}", room.range);
                return;
            }
            let _ = self.fill_room(room, "memory given back before it");
        }
    }

    /// After the program moved managed memory from `old` to `to` with `MREMAP_DONTUNMAP`: the
    /// kernel left `old` mapped, showing the same memfd bytes as `to` (and still registered,
    /// its entries gone: a touch faulted to the core, which knows only `to` now, and got
    /// SIGBUS). A program expects what such a move of private memory leaves, empty memory: it
    /// becomes fresh private memory (zeros), the program's own, unmanaged. Only if it still
    /// shows the bytes `to` shows: the program may have unmapped it or mapped something else
    /// there since (a small window remains between this check and the replacement, as for any
    /// `MAP_FIXED` over memory another thread may unmap: the slow lookups come before it).
    pub(crate) fn empty_left_behind(&self, old: VaRange, to: u64) {
        let ours = self.memfd_uses();
        let Some(view) = left_behind(old, to) else { return };
        let (prot, exec) = (view.prot, view.exec);
        // Only hetmm's memfds: mirrored shared memory left behind still shows the program's own
        // file, as such a move of it leaves it.
        if !ours.iter().any(|u| u.file == view.file) {
            return;
        }
        // SAFETY: `old` shows memfd bytes that managed memory shows at `to` (checked just above):
        // nothing there is kept only there, and the manager holds no reference into `old`.
        let fresh = self.own_op(Own::Unmap, old, || unsafe { crate::mapping::fresh_private(old, prot, exec) });
        match fresh {
            Ok(()) => log::debug!("{old}: left behind by MREMAP_DONTUNMAP; now fresh private memory"),
            Err(e) => log::error!("replacing {old}, left behind by MREMAP_DONTUNMAP: {e}"),
        }
    }

    /// Makes `room` (from [`crate::mapping::room_at`]) fresh private memory, marked as the
    /// manager's own change (replacing a registered mapping raises an UNMAP event of exactly the
    /// range); `why` says what found it (for the log).
    fn fill_room(&self, room: crate::mapping::Room, why: &str) -> Result<(), crate::mapping::MappingError> {
        let r = room.range;
        // `room` shows a memfd of hetmm at offsets no managed memory shows (`room_at`): holes or
        // data the program gave up, nothing to keep.
        // SAFETY: as just said; the manager holds no reference into `room`.
        let fresh = self.own_op(Own::Unmap, r, || unsafe { crate::mapping::fresh_private(r, room.prot, room.exec) });
        match &fresh {
            Ok(()) => log::debug!("{r}: managed memory grown in place (found by {why}); now fresh private memory"),
            Err(e) => log::error!("replacing {r}, managed memory grown in place: {e}"),
        }
        fresh
    }
}

/// The one shared mapping of a file that covers all of `range`, if that is what is mapped there
/// (what the old range of a move of hetmm's memory with `MREMAP_DONTUNMAP` is when its event
/// is read).
fn one_file_view(range: VaRange) -> Option<crate::maps::MapsLine> {
    match crate::maps::meeting(range)?.as_slice() {
        [m] if m.shared && m.file.ino != 0 && m.range.contains_range(&range) => Some(*m),
        _ => None,
    }
}

/// The one mapping of `old` if it shows the same bytes of the same file as `[to, to + old.len)`:
/// what a move from `old` to `to` with `MREMAP_DONTUNMAP` leaves behind (a plain move leaves
/// `old` unmapped, or mapped anew since).
fn left_behind(old: VaRange, to: u64) -> Option<crate::maps::MapsLine> {
    let at = |r: VaRange| one_file_view(r).map(|m| (m, (m.file, m.off + (r.start - m.range.start))));
    let (view, bytes) = at(old)?;
    (at(VaRange::new(to, old.len)).map(|(_, b)| b) == Some(bytes)).then_some(view)
}

/// Drops the finished operations whose events the reader has classified (`classified`
/// batches).
fn prune(zaps: &mut Vec<(Own, VaRange, Option<u64>)>, classified: u64) {
    zaps.retain(|(_, _, done)| done.is_none_or(|k| classified < k));
}

/// A kind of the manager's own operation on registered memory (see [`Ctx::own_op`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Own {
    /// `MADV_DONTNEED`: REMOVE events inside the range.
    Zap,
    /// Page-table entries moved out with `mremap`: a REMAP event from the range.
    MoveOut,
    /// Moved-out entries unmapped: an UNMAP event of the range.
    Unmap,
}

/// One message for the servicer.
#[derive(Debug)]
pub(crate) enum Msg {
    Fault(u64, Access),
    Discard(VaRange),
    Unmap(VaRange),
    /// `kept`: the old range was still mapped when the event was read (`MREMAP_DONTUNMAP`).
    Remap {
        from: u64,
        to: u64,
        len: u64,
        kept: bool,
    },
    /// The UNMAP event of the old range of a plain move already applied (see [`apply_event`]).
    MovedAway,
}

/// The reader: poll, read a batch, drop our own zaps' events, pass the rest on in order.
pub(crate) fn read_loop(ctx: &Ctx, handler: &Weak<dyn CpuFaultHandler>, stop: &AtomicBool, tx: mpsc::Sender<Vec<Msg>>) {
    let uffd = &ctx.uffd;
    let mut msgs = [uffd::empty_msg(); BATCH];
    while !stop.load(Ordering::Acquire) {
        match uffd.poll(POLL_INTERVAL) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                log::error!("uffd poll failed: {e}");
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
        }
        // The read itself counts as a pending event: the kernel lets munmap/mremap/madvise
        // return as soon as their event is read, and `settle` must not miss the event between
        // the read and its dispatch.
        let core = handler.upgrade();
        if let Some(c) = &core {
            c.event_queued(true);
        }
        // From the read until the batch is classified (see `Ctx::mapping_checked`).
        let reading = ctx.reading.write();
        ctx.reads.fetch_add(1, Ordering::AcqRel);
        let n = match uffd.read_msgs(&mut msgs) {
            Ok(n) => n,
            Err(e) => {
                if let Some(c) = &core {
                    c.event_queued(false);
                }
                ctx.batch_classified();
                drop(reading);
                log::error!("uffd read failed: {e}");
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
        };
        let mut out = Vec::with_capacity(n);
        for m in &msgs[..n] {
            let msg = match uffd::decode(m) {
                Event::Pagefault { addr, flags, .. } => {
                    let write = flags & (uffd::PAGEFAULT_FLAG_WRITE | uffd::PAGEFAULT_FLAG_WP) != 0;
                    let access = if write { Access::Write } else { Access::Read };
                    out.push(Msg::Fault(addr & !(PAGE_SIZE - 1), access));
                    continue;
                }
                Event::Remove { start, end } => {
                    let r = VaRange::new(start, end.saturating_sub(start));
                    if r.len == 0 || ctx.is_own(Own::Zap, r) {
                        continue;
                    }
                    Msg::Discard(r)
                }
                Event::Unmap { start, end } => {
                    let r = VaRange::new(start, end.saturating_sub(start));
                    // The reaper freeing entries a revoke moved out.
                    if r.len > 0 && ctx.is_own(Own::Unmap, r) {
                        continue;
                    }
                    ctx.note_reshape(&[r]);
                    Msg::Unmap(r)
                }
                Event::Remap { from, to, len } => {
                    // A revoke moving page-table entries out (`SharedMapping::move_out_app`).
                    if len > 0 && ctx.is_own(Own::MoveOut, VaRange::new(from, len)) {
                        continue;
                    }
                    ctx.note_reshape(&[VaRange::new(from, len), VaRange::new(to, len)]);
                    // A plain move unmaps the old range before the kernel queues the event (and
                    // the program's mremap returns only once the UNMAP event that follows is
                    // read, but another thread may map anything there meanwhile: a new buffer's
                    // view); after MREMAP_DONTUNMAP it is still mapped, showing the same bytes of
                    // the same file as the new range.
                    let kept = len > 0 && left_behind(VaRange::new(from, len), to).is_some();
                    Msg::Remap { from, to, len, kept }
                }
                other => {
                    log::warn!("ignoring userfaultfd event {other:?}");
                    continue;
                }
            };
            if let Some(c) = &core {
                c.event_queued(true);
            }
            out.push(msg);
        }
        ctx.batch_classified();
        drop(reading);
        let sent = out.is_empty() || tx.send(out).is_ok();
        if let Some(c) = &core {
            c.event_queued(false);
        }
        drop(core);
        if !sent {
            break;
        }
    }
}

/// The servicer: faults (deduplicated per run) and events, in the order they were read.
pub(crate) fn service_loop(
    ctx: &Ctx,
    handler: &Weak<dyn CpuFaultHandler>,
    stop: &AtomicBool,
    rx: mpsc::Receiver<Vec<Msg>>,
) {
    let mut faults: Vec<(u64, Access)> = Vec::with_capacity(BATCH);
    let mut s = Serving::default();
    while !stop.load(Ordering::Acquire) {
        // Faults waiting for a registration to finish are tried again every millisecond.
        let wait = if s.deferred.is_empty() { POLL_INTERVAL } else { DEFER_RETRY };
        let batch = match rx.recv_timeout(wait) {
            Ok(b) => b,
            Err(mpsc::RecvTimeoutError::Timeout) => Vec::new(),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if batch.is_empty() && s.deferred.is_empty() {
            continue;
        }
        let core = handler.upgrade();
        faults.append(&mut s.deferred);
        for msg in batch {
            match msg {
                Msg::Fault(va, access) => faults.push((va, access)),
                ev => {
                    serve_faults(ctx, core.as_deref(), &mut faults, &mut s);
                    // A panic in the core must not end this thread (see `serve_faults`).
                    let applied = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        apply_event(ctx, core.as_deref(), ev, &mut s.moved_from);
                    }));
                    if applied.is_err() {
                        log::error!("the core panicked applying a userfaultfd event");
                    }
                }
            }
        }
        serve_faults(ctx, core.as_deref(), &mut faults, &mut s);
        // If this was the last reference, the core (and possibly the Host) is dropped here, on
        // this thread; `Worker::join` detects that and does not join itself.
        drop(core);
    }
}

/// How many old ranges of plain moves [`apply_event`] remembers while their UNMAP events are due.
const MOVED_FROM_MAX: usize = 64;

/// `moved_from`: the old ranges of plain moves applied, whose UNMAP events (which the kernel
/// queues once the move's REMAP event is read) have not come yet.
fn apply_event(ctx: &Ctx, core: Option<&dyn CpuFaultHandler>, ev: Msg, moved_from: &mut Vec<VaRange>) {
    let reshape = matches!(ev, Msg::Unmap(_) | Msg::Remap { .. });
    // A plain move unmaps the old range, and the kernel tells of that too, in an UNMAP event it
    // queues once the REMAP event is read. By then the move is applied and nothing managed is
    // left there, but the range is free: the kernel may already have placed new managed memory
    // there (another thread's `Hetmm::alloc`, which the core accepts once the move is applied),
    // which applying the UNMAP would take for unmapped (the core dropped its region: its next
    // access failed). So it is dropped as what it is, the move's own.
    let ev = match ev {
        Msg::Remap { from, len, kept: false, .. } if len > 0 => {
            if moved_from.len() >= MOVED_FROM_MAX {
                moved_from.remove(0);
            }
            moved_from.push(VaRange::new(from, len));
            ev
        }
        // Inside, not only equal: however the kernel reports the lengths of a move that also
        // shrinks, its UNMAP lies within the range the REMAP named, and matching it retires the
        // record (one left over would swallow a later unmap there).
        Msg::Unmap(r) => match moved_from.iter().position(|m| m.contains_range(&r)) {
            Some(k) => {
                moved_from.remove(k);
                Msg::MovedAway
            }
            None => ev,
        },
        ev => ev,
    };
    let applied = apply_event_to_core(ctx, core, ev);
    // Counted applied here before the core is told (`settle` returns on that): a revoke that
    // `settle` lets start must not find the event unapplied and fail as raced.
    if reshape {
        ctx.reshapes_applied.fetch_add(1, Ordering::AcqRel);
    }
    if let (true, Some(core)) = (applied, core) {
        core.event_queued(false);
    }
}

/// Applies `ev` to the core, if any; whether it was an event (not a fault) the core queued.
fn apply_event_to_core(ctx: &Ctx, core: Option<&dyn CpuFaultHandler>, ev: Msg) -> bool {
    let mut left_behind = None;
    let event = match ev {
        Msg::Fault(..) => return false,
        // Nothing to apply; the core counted it as queued like any other event.
        Msg::MovedAway => return core.is_some(),
        Msg::Discard(r) => CpuEvent::Discard(r),
        Msg::Unmap(r) => {
            ctx.forget(r);
            CpuEvent::Unmap(r)
        }
        Msg::Remap { from, to, len, kept } => {
            // The old range leaves hetmm's management. A plain move is followed by an UNMAP
            // event for it; after MREMAP_DONTUNMAP it stays mapped and registered (see
            // `Ctx::empty_left_behind`).
            let new_cpu = ctx.remap_view(from, to, len);
            if kept && new_cpu.is_some() {
                left_behind = Some(VaRange::new(from, len));
            }
            CpuEvent::Remap { from, to, len, new_cpu }
        }
    };
    let applied = match core {
        Some(core) => {
            // A panic in the core is caught here, not only around the whole event: the counts
            // [`apply_event`] keeps after this must move whatever happens, or every later
            // `settle` would wait out its timeout and maps of this range be refused as raced.
            match std::panic::catch_unwind(AssertUnwindSafe(|| core.cpu_event(event.clone()))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::error!("applying {event:?}: {e}"),
                Err(_) => log::error!("the core panicked applying {event:?}"),
            }
            true
        }
        None => false,
    };
    if let (Some(old), CpuEvent::Remap { to, .. }) = (left_behind, &event) {
        ctx.empty_left_behind(old, *to);
    }
    applied
}

/// How many times in a row a fault outside every shared region is woken to retry before the
/// page is poisoned: enough for a registration being set up, not a livelock.
const OUTSIDE_RETRIES: u32 = 64;
/// How long, at least, such a fault is retried before the page is poisoned: the kernel lets the
/// program touch memory it moved with `mremap` before it queues the move's event, and `read`
/// hands on faults before events, so a thread faulting at the new address retries until the
/// event is read and applied. A preempted `mremap` on a loaded machine took longer than 64
/// immediate retries (found by an audit, by reading).
const OUTSIDE_FOR: Duration = Duration::from_secs(1);

/// Counts one more retry of a fault outside every shared region at `va`, at `now`; false once
/// it has had [`OUTSIDE_RETRIES`] in a row over at least [`OUTSIDE_FOR`].
fn retry_outside(retries: &mut std::collections::HashMap<u64, (u32, Instant)>, va: u64, now: Instant) -> bool {
    if retries.len() > 4096 {
        retries.clear();
    }
    let (n, first) = retries.entry(va).or_insert((0, now));
    *n += 1;
    *n <= OUTSIDE_RETRIES || now.duration_since(*first) < OUTSIDE_FOR
}

/// How often faults in a range being registered are tried again.
const DEFER_RETRY: Duration = Duration::from_millis(1);
/// Longest a fault waits for a registration (which has then gone wrong: the range is dropped
/// from [`Ctx::arriving`] when `register` returns, whatever happens).
const DEFER_LIMIT: Duration = Duration::from_secs(10);

/// The servicer's memory of faults it could not serve yet.
#[derive(Debug, Default)]
struct Serving {
    /// Retries so far of faults outside every shared region, by address.
    retries: std::collections::HashMap<u64, (u32, Instant)>,
    /// Faults in a range being registered, to be served once the core knows it.
    deferred: Vec<(u64, Access)>,
    /// When each deferred address was first deferred.
    since: std::collections::HashMap<u64, std::time::Instant>,
    /// Old ranges of plain moves whose UNMAP events are due (see [`apply_event`]).
    moved_from: Vec<VaRange>,
}

fn serve_faults(ctx: &Ctx, core: Option<&dyn CpuFaultHandler>, faults: &mut Vec<(u64, Access)>, s: &mut Serving) {
    let uffd = &*ctx.uffd;
    if faults.is_empty() {
        return;
    }
    if s.since.len() > 4096 {
        s.since.clear();
    }
    // Threads faulting on one page each send a message: serve the page once, with the most
    // intrusive access.
    faults.sort_unstable_by_key(|f| f.0);
    faults.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1 = kept.1.max(later.1);
        }
        same
    });
    for &(va, access) in faults.iter() {
        // A panic in the core is caught: were this thread to end, nobody would read the uffd
        // again, and every later fault, and the program's munmap of managed memory, would wait
        // forever. The faulting thread gets SIGBUS instead.
        let fault = std::panic::catch_unwind(AssertUnwindSafe(|| core.map(|c| c.cpu_fault(va, access))));
        let served = match fault {
            Err(_) => Err("the core panicked".to_string()),
            Ok(None) => Err("the core is gone".to_string()),
            Ok(Some(r)) => match r {
                // A registration being set up: registered with userfaultfd, not yet in the core.
                // The thread waits (not woken, so it does not spin) until the core knows it.
                Err(CoreError::NotShared(_))
                    if ctx.is_arriving(va)
                        && s.since.entry(va).or_insert_with(std::time::Instant::now).elapsed() < DEFER_LIMIT =>
                {
                    s.deferred.push((va, access));
                    continue;
                }
                // Memory the program grew in place out of managed memory.
                Err(CoreError::NotShared(_)) if ctx.fresh_growth_at(va) => {
                    s.retries.remove(&va);
                    s.since.remove(&va);
                    continue;
                }
                // No region there: the message is stale (another path mapped the page, woke the
                // thread, and the region went away since), or a registration failed and is being
                // undone. Poisoning would plant a SIGBUS in memory that is, or is about to be,
                // someone's: let the thread retry. A page that keeps faulting there is poisoned
                // after all (below).
                Err(CoreError::NotShared(_)) if retry_outside(&mut s.retries, va, Instant::now()) => {
                    // A later registration of this page gets its own wait.
                    s.since.remove(&va);
                    log::debug!("CPU {access:?} fault at {va:#x} outside shared memory; waking it to retry");
                    let _ = crate::host::retry_again(|| uffd.wake(VaRange::new(va, PAGE_SIZE)));
                    continue;
                }
                // The program moved or unmapped the page, and the change is read but not yet
                // applied: the map was refused. Woken, the thread faults again, after the change
                // (bounded as above).
                Err(e) if e.raced() && retry_outside(&mut s.retries, va, Instant::now()) => {
                    log::debug!("CPU {access:?} fault at {va:#x} raced an unmap or remap; waking it to retry");
                    let _ = crate::host::retry_again(|| uffd.wake(VaRange::new(va, PAGE_SIZE)));
                    continue;
                }
                r => {
                    s.retries.remove(&va);
                    s.since.remove(&va);
                    r.map_err(|e| e.to_string())
                }
            },
        };
        if let Err(why) = served {
            log::error!("CPU {access:?} fault at {va:#x} not served ({why}); raising SIGBUS");
            release_with_sigbus(ctx, va, access);
        }
    }
    faults.clear();
}

/// Resolves a fault the core could not serve so the faulting thread does not hang: the page is
/// poisoned (the thread gets SIGBUS). If it was mapped meanwhile, the waiter is just woken; but a
/// write to a page mapped write-protected (a read duplicate, a revoke's marker) would only write
/// and fault again, for as long as the core fails: that entry is dropped first, its data staying
/// in the memfd, and then the write-protect marker the zap leaves on shmem, so that the poison
/// takes. (Unprotecting first instead would let other threads write the page meanwhile.) A read
/// over such a marker alone (no page present: a revoke zapped a write-protected page) is the
/// same: the poison meets the marker, and only waking the thread faulted it again for as long as
/// the core failed (found by an audit).
fn release_with_sigbus(ctx: &Ctx, va: u64, access: Access) {
    let uffd = &*ctx.uffd;
    let page = VaRange::new(va, PAGE_SIZE);
    // `POISON` is a required feature (`Features::REQUIRED`).
    let poison = || crate::host::retry_again(|| uffd.poison(page));
    let mut res = poison();
    // A read is refused by a page mapped meanwhile (to wake for) or by a marker (to clear).
    let over_marker = || access == Access::Write || crate::pagemap::Pagemap::open().is_some_and(|m| !m.present(va));
    if matches!(res, Err(UffdError::Exists { .. })) && over_marker() && shared_view(page) {
        // SAFETY: `page` is registered with our uffd (it faulted there) and mapped MAP_SHARED
        // (checked just above): one of hetmm's memfd views, where DONTNEED keeps the data.
        let zapped = ctx.self_zap(page, ctx.reshape_mark(), || unsafe { crate::mapping::zap_view(page) });
        let cleared = zapped.map_err(|e| e.to_string()).and_then(|()| {
            crate::host::retry_again(|| uffd.writeprotect(page, false, false)).map_err(|e| e.to_string())
        });
        match cleared {
            Ok(()) => res = poison(),
            Err(e) => log::error!("dropping the write-protected entry at {page}: {e}"),
        }
    }
    match res {
        Ok(()) => {}
        Err(UffdError::Exists { .. }) => {
            let _ = crate::host::retry_again(|| uffd.wake(page));
        }
        Err(e) => {
            // Waking makes the thread fault again, which is better than hanging it forever.
            log::error!("cannot poison {page}: {e}; waking the thread to retry");
            let _ = crate::host::retry_again(|| uffd.wake(page));
        }
    }
}

/// Whether `page` is mapped `MAP_SHARED` (as `/proc/self/maps` says).
fn shared_view(page: VaRange) -> bool {
    crate::mirror::vmas(page).is_some_and(|v| v.iter().all(|m| m.shared))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uffd::Features;
    use std::sync::OnceLock;

    /// Where the test's events happen.
    const WHERE: VaRange = VaRange::new(0x7000_0000, 2 * PAGE_SIZE);

    /// A core that panics applying an event leaves nothing counted pending or unapplied: every
    /// later `settle` would wait out its timeout, and maps of the range be refused as raced.
    /// (Found by an audit: the panic was caught only around the whole event, after which the
    /// counts never moved.)
    #[test]
    fn a_core_panicking_on_an_event_leaves_the_counts_balanced() {
        let Ok(uffd) = crate::uffd::Uffd::open(Features::REQUIRED, Features::OPTIONAL) else { return };
        let ctx = Ctx::new(Arc::new(uffd));
        let core = Recorder { panics: true, ..Recorder::default() };
        let r = VaRange::new(WHERE.start, PAGE_SIZE);
        // What the reader does on an UNMAP event, then what the servicer does.
        ctx.note_reshape(&[r]);
        core.event_queued(true);
        apply_event(&ctx, Some(&core), Msg::Unmap(r), &mut Vec::new());
        assert_eq!(core.queued.load(Ordering::Acquire), 0, "the event stays counted queued");
        assert!(!ctx.reshape_in_flight(), "the event stays unapplied");
        assert!(ctx.mapping_checked(r, || Ok::<(), UffdError>(())).is_ok(), "maps of the range are refused");
    }

    /// Records, when told an event is applied, whether a revoke starting then would be refused
    /// as raced.
    struct Core {
        ctx: OnceLock<Arc<Ctx>>,
        raced_when_applied: Mutex<Vec<bool>>,
    }

    impl CpuFaultHandler for Core {
        fn cpu_fault(&self, _va: u64, _access: Access) -> Result<(), CoreError> {
            Ok(())
        }

        fn event_queued(&self, queued: bool) {
            if !queued {
                let ctx = self.ctx.get().unwrap();
                self.raced_when_applied.lock().push(ctx.reshaped_since(ctx.reshape_mark(), &[WHERE]));
            }
        }
    }

    /// Once the core counts an unmap or remap as applied (what `settle` waits for), a revoke
    /// that starts must not be refused as racing it: `migrate` retries a raced revoke after
    /// `settle` only a few times, and would fail while the host still counts it unapplied.
    #[test]
    fn an_event_the_core_counts_applied_is_applied_for_revokes() {
        let Ok(uffd) = crate::uffd::Uffd::open(Features::REQUIRED, Features::OPTIONAL) else { return };
        let ctx = Arc::new(Ctx::new(Arc::new(uffd)));
        let core = Core { ctx: OnceLock::new(), raced_when_applied: Mutex::new(Vec::new()) };
        core.ctx.set(Arc::clone(&ctx)).unwrap();
        let r = VaRange::new(WHERE.start, PAGE_SIZE);
        for ev in [Msg::Unmap(r), Msg::Remap { from: r.start, to: r.end(), len: r.len, kept: false }] {
            // What the reader does when it passes a program's unmap or remap on.
            ctx.note_reshape(&[r]);
            core.event_queued(true);
            apply_event(&ctx, Some(&core), ev, &mut Vec::new());
        }
        assert_eq!(*core.raced_when_applied.lock(), [false, false]);
        assert!(!ctx.reshaped_since(ctx.reshape_mark(), &[WHERE]));
    }

    /// Records what the core is told: each event applied, and how many are queued. With
    /// `panics`, applying any event panics instead (a bug in the core).
    #[derive(Default)]
    struct Recorder {
        events: Mutex<Vec<(&'static str, u64)>>,
        queued: std::sync::atomic::AtomicI64,
        panics: bool,
    }

    impl CpuFaultHandler for Recorder {
        fn cpu_fault(&self, _va: u64, _access: Access) -> Result<(), CoreError> {
            Ok(())
        }

        fn cpu_event(&self, ev: CpuEvent) -> Result<(), CoreError> {
            assert!(!self.panics, "a core bug while applying an event");
            let e = match ev {
                CpuEvent::Discard(r) => ("discard", r.start),
                CpuEvent::Unmap(r) => ("unmap", r.start),
                CpuEvent::Remap { from, .. } => ("remap", from),
            };
            self.events.lock().push(e);
            Ok(())
        }

        fn event_queued(&self, queued: bool) {
            self.queued.fetch_add(if queued { 1 } else { -1 }, Ordering::AcqRel);
        }
    }

    /// The UNMAP event of a plain move's old range, which the kernel queues once the move's
    /// REMAP event is read, is not applied: the move took everything managed from there, and
    /// the kernel may already have placed new managed memory in the range (another thread's
    /// `Hetmm::alloc`, which the core accepts once the move is applied), which the core then
    /// dropped as unmapped (the buffer's next `migrate` failed: not shared memory). A later
    /// unmap of the same range, and one after a move with `MREMAP_DONTUNMAP` (no such event),
    /// are applied; every event is counted applied.
    #[test]
    fn the_unmap_event_of_a_moves_old_range_is_not_applied() {
        let Ok(uffd) = crate::uffd::Uffd::open(Features::REQUIRED, Features::OPTIONAL) else { return };
        let ctx = Ctx::new(Arc::new(uffd));
        let core = Recorder::default();
        let r = VaRange::new(WHERE.start, PAGE_SIZE);
        let to = WHERE.end();
        let evs = [
            Msg::Remap { from: r.start, to, len: r.len, kept: false },
            Msg::Unmap(r),
            Msg::Unmap(r),
            Msg::Remap { from: r.start, to, len: r.len, kept: true },
            Msg::Unmap(r),
        ];
        let mut moved_from = Vec::new();
        for ev in evs {
            // What the reader does when it passes a program's unmap or remap on.
            ctx.note_reshape(&[r]);
            core.event_queued(true);
            apply_event(&ctx, Some(&core), ev, &mut moved_from);
        }
        let s = r.start;
        assert_eq!(*core.events.lock(), [("remap", s), ("unmap", s), ("remap", s), ("unmap", s)]);
        assert_eq!(core.queued.load(Ordering::Acquire), 0, "events left counted as queued");
        assert!(!ctx.reshape_in_flight(), "events left counted unapplied");
    }

    /// A revoke that checked its range before the program unmapped registered private memory
    /// and mapped fresh private memory there must not zap that: `MADV_DONTNEED` drops the data
    /// of private memory. It zeroed the memory the program had just mapped and filled (which
    /// the program then registered: zeros in a device's read of it, once in a soak).
    #[test]
    fn a_stale_revoke_leaves_private_memory_mapped_in_its_place_alone() {
        let core = Arc::new(Recorder::default());
        let Ok(host) = crate::Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>) else { return };
        let len = 4 * PAGE_SIZE as usize;
        let (p, cpu) = crate::test_support::registered_private(&host, len, 0x11);
        let (range, p) = (VaRange::new(p as u64, len as u64), p as *mut libc::c_void);
        // The revoke passes `reshape_checked`'s first check and waits here, just before its zap
        // marks itself the manager's own.
        let held = host.ctx.zaps.lock();
        let revoke = std::thread::spawn(move || cpu.revoke(&[range]));
        std::thread::sleep(Duration::from_millis(200));
        // The program unmaps the memory (its munmap returns once the reader has read the event)
        // and maps fresh private memory in its place, and fills it.
        // SAFETY: the test's own registered mapping; nothing refers into it.
        assert_eq!(unsafe { libc::munmap(p, len) }, 0);
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
        // SAFETY: NOREPLACE maps only where nothing is mapped: the range just unmapped.
        let q = unsafe { libc::mmap(p, len, rw, flags, -1, 0) };
        assert_eq!(q, p, "{}", std::io::Error::last_os_error());
        // SAFETY: the `len`-byte mapping just made.
        unsafe { std::ptr::write_bytes(q.cast::<u8>(), 0x5A, len) };
        drop(held);
        let r = revoke.join().unwrap();
        let first_bytes: Vec<u8> =
            // SAFETY: bytes of our `len`-byte mapping at `p`.
            (0..len).step_by(PAGE_SIZE as usize).map(|o| unsafe { *(p as *const u8).add(o) }).collect();
        // SAFETY: the test's own mapping, not used again.
        unsafe { libc::munmap(p, len) };
        assert_eq!(first_bytes, [0x5A; 4], "the revoke zeroed the program's new memory ({r:?})");
        assert!(r.as_ref().is_err_and(|e| e.raced()), "{r:?}");
    }

    /// Only a change overlapping a revoke's ranges makes it raced: a program unmapping other
    /// registered memory in a loop made `migrate` fail after its retries.
    #[test]
    fn only_changes_overlapping_a_revoke_race_it() {
        let Ok(uffd) = crate::uffd::Uffd::open(Features::REQUIRED, Features::OPTIONAL) else { return };
        let ctx = Ctx::new(Arc::new(uffd));
        let mine = [VaRange::new(0x10_0000, 4 * PAGE_SIZE), VaRange::new(0x20_0000, PAGE_SIZE)];
        let mark = ctx.reshape_mark();
        // Read, not yet applied, elsewhere: not raced.
        ctx.note_reshape(&[VaRange::new(0x30_0000, PAGE_SIZE)]);
        ctx.note_reshape(&[VaRange::new(0x40_0000, PAGE_SIZE), VaRange::new(0x10_4000, PAGE_SIZE)]);
        assert!(!ctx.reshaped_since(mark, &mine));
        // A remap whose source overlaps the second range: raced, read since the mark.
        ctx.note_reshape(&[VaRange::new(0x1f_f000, 2 * PAGE_SIZE), VaRange::new(0x50_0000, 2 * PAGE_SIZE)]);
        assert!(ctx.reshaped_since(mark, &mine));
        // Applied, and a revoke starting now: not raced (nothing since, nothing unapplied).
        ctx.reshapes_applied.store(3, Ordering::Release);
        assert!(!ctx.reshaped_since(ctx.reshape_mark(), &mine));
        // A mark taken while the change into the first range was still unapplied.
        ctx.reshapes_applied.store(0, Ordering::Release);
        assert!(ctx.reshaped_since(ctx.reshape_mark(), &[VaRange::new(0x50_1000, PAGE_SIZE)]));
        assert!(!ctx.reshaped_since(ctx.reshape_mark(), &[VaRange::new(0x60_0000, PAGE_SIZE)]));
    }

    /// The log is bounded, and a question about changes it dropped is answered yes.
    #[test]
    fn a_dropped_change_counts_as_raced() {
        let mut log = Reshapes::default();
        let far = [VaRange::new(1 << 40, PAGE_SIZE)];
        let n = Reshapes::KEEP as u64 + 10;
        for seq in 1..=n {
            // All applied but the last.
            log.push(seq, &[VaRange::new(seq * PAGE_SIZE, PAGE_SIZE)], n - 1);
        }
        assert!(log.entries.len() <= Reshapes::KEEP);
        assert!(log.touches(0, &far), "changes before the kept ones are unknown");
        assert!(!log.touches(n - 5, &far));
        assert!(log.touches(n - 5, &[VaRange::new(n * PAGE_SIZE, 1)]));
        assert!(!log.touches(n, &[VaRange::new(n * PAGE_SIZE, 1)]));
    }

    /// A test core that refuses every fault while `refuse` is set, and otherwise maps the page
    /// writable in `region`.
    #[derive(Default)]
    struct Refusing {
        region: OnceLock<Weak<crate::HostRegion>>,
        refuse: AtomicBool,
        /// Panics (once) instead of refusing.
        panic: AtomicBool,
        faults: AtomicU64,
    }

    impl CpuFaultHandler for Refusing {
        fn cpu_fault(&self, va: u64, _access: Access) -> Result<(), CoreError> {
            self.faults.fetch_add(1, Ordering::Relaxed);
            let page = [VaRange::new(va, PAGE_SIZE)];
            if self.panic.swap(false, Ordering::AcqRel) {
                panic!("a test core's bug");
            }
            if self.refuse.load(Ordering::Acquire) {
                return Err(CoreError::Timeout { what: "test refusal", after: Duration::ZERO });
            }
            let r = self.region.get().and_then(Weak::upgrade).ok_or(CoreError::NotShared(page[0]))?;
            r.populate(&page)?;
            Ok(r.map(&page, true)?)
        }
    }

    /// How long a test waits for an access the host's threads serve or release: generous, a
    /// loaded machine may leave them unscheduled for seconds; a fault that is never served, or
    /// that loops, still fails.
    const SERVED_WITHIN: Duration = Duration::from_secs(30);

    /// Runs `f` on a thread; its result if it returns within `limit`, else `None` (the thread
    /// is left running: the caller unblocks it).
    fn within<T: Send + 'static>(
        limit: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> (mpsc::Receiver<T>, Option<T>) {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        let got = rx.recv_timeout(limit).ok();
        (rx, got)
    }

    /// A file holding one page of 0x5A, to `read(2)` from (a kernel-mode write into the page).
    fn page_file() -> std::fs::File {
        crate::test_support::file_with(&[0x5A; PAGE_SIZE as usize])
    }

    /// What [`refused_write_protected_page`] sets up.
    type RefusedPage = (Arc<Refusing>, Arc<crate::Host>, Arc<crate::HostRegion>, usize);

    /// A one-page region mapped write-protected (then `revoked`: a write-protect marker in its
    /// place), its core refusing every fault from now on: the core, the host, the region (to keep
    /// alive) and the page's address. `None` where userfaultfd is not available.
    fn refused_write_protected_page(revoked: bool) -> Option<RefusedPage> {
        let core = Arc::new(Refusing::default());
        let host = crate::Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>).ok()?;
        let region = host.create_region(PAGE_SIZE).unwrap();
        core.region.set(Arc::downgrade(&region)).unwrap();
        let page = VaRange::new(region.app_ptr() as u64, PAGE_SIZE);
        region.populate(&[page]).unwrap();
        region.map(&[page], false).unwrap();
        if revoked {
            region.revoke(&[page]).unwrap();
        }
        core.refuse.store(true, Ordering::Release);
        Some((core, host, region, page.start as usize))
    }

    /// A write fault the core cannot serve on a page mapped write-protected (a read duplicate;
    /// also a write-protect marker left by a revoke) must release the thread (SIGBUS; EFAULT for
    /// a kernel-mode access), as for any other unserved fault. `UFFDIO_POISON` refuses a page
    /// that has an entry (EEXIST), and `release_with_sigbus` then only wakes the thread: it
    /// writes again, faults again, and the two loop for as long as the core keeps failing.
    #[test]
    fn an_unserved_write_to_a_write_protected_page_is_released() {
        let Some((core, _host, _region, va)) = refused_write_protected_page(false) else { return };
        let mut file = page_file();
        let (rx, got) = within(SERVED_WITHIN, move || {
            use std::io::Read;
            // SAFETY: the region's one-page view, mapped while `region` lives (the test waits for
            // this thread before dropping it); nothing else references it meanwhile.
            let buf = unsafe { std::slice::from_raw_parts_mut(va as *mut u8, PAGE_SIZE as usize) };
            file.read(buf).map_err(|e| e.raw_os_error())
        });
        let faults = core.faults.load(Ordering::Relaxed);
        // Let a looping fault be served, so the thread ends either way.
        core.refuse.store(false, Ordering::Release);
        let late = got.is_none() && rx.recv_timeout(Duration::from_secs(10)).is_ok();
        assert!(
            got.is_some(),
            "the write was neither served nor released in {SERVED_WITHIN:?} ({faults} faults; ended later: {late})"
        );
        assert_eq!(got, Some(Err(Some(libc::EFAULT))), "the refused write was released with poison");
    }

    /// A fault outside every shared region is retried for a while, not just 64 times in a row:
    /// a thread touching memory the program moved with `mremap` faults before the move's event
    /// is read, and a preempted `mremap` took longer than 64 immediate retries.
    #[test]
    fn faults_outside_shared_memory_are_retried_for_a_while_then_given_up() {
        let mut retries = std::collections::HashMap::new();
        let t0 = Instant::now();
        assert!((0..1000).all(|_| retry_outside(&mut retries, 0x1000, t0)), "many retries at once");
        assert!(retry_outside(&mut retries, 0x1000, t0 + OUTSIDE_FOR / 2));
        assert!(!retry_outside(&mut retries, 0x1000, t0 + OUTSIDE_FOR), "given up after both bounds");
        assert!(retry_outside(&mut retries, 0x2000, t0 + OUTSIDE_FOR), "another page counts apart");
        let mut few = std::collections::HashMap::new();
        let late = t0 + 10 * OUTSIDE_FOR;
        assert!((0..OUTSIDE_RETRIES).all(|_| retry_outside(&mut few, 0x3000, late)));
        assert!(!retry_outside(&mut few, 0x3000, late + OUTSIDE_FOR), "past both bounds");
    }

    /// A read the core cannot serve, of a page whose write-protected entry a revoke zapped
    /// (leaving a userfaultfd write-protect marker on the shmem view): the poison meets the
    /// marker (EEXIST), and the thread was only woken, to fault again for as long as the core
    /// failed (two million faults in 10 s; found by an audit). It must be released.
    #[test]
    fn an_unserved_read_over_a_write_protect_marker_is_released() {
        let Some((core, _host, _region, va)) = refused_write_protected_page(true) else { return };
        let (rx, got) = within(SERVED_WITHIN, move || {
            let mut fds = [0i32; 2];
            // SAFETY: a fresh pipe, this thread's own.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: a kernel-mode read of the region's page (write(2) from it into the pipe);
            // the region outlives this thread (the test waits for it below).
            let n = unsafe { libc::write(fds[1], va as *const libc::c_void, 16) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            // SAFETY: the pipe's own descriptors.
            unsafe { (libc::close(fds[0]), libc::close(fds[1])) };
            (n, errno)
        });
        core.refuse.store(false, Ordering::Release);
        let late = got.is_none() && rx.recv_timeout(Duration::from_secs(10)).is_ok();
        assert_eq!(
            got,
            Some((-1, Some(libc::EFAULT))),
            "the read was neither served nor released (ended later: {late})"
        );
    }

    /// Registered memory outlives the host when the program keeps the core (a `Device` handle
    /// holds the address space) past `Hetmm`: the registration's `Mirror` holds the context and
    /// with it the uffd, while `Host::drop` stopped the only threads that read it. A CPU access
    /// to such memory then waits forever (so does the program's `munmap` of it: its UNMAP event
    /// is never read).
    #[test]
    fn registered_memory_does_not_hang_once_the_host_is_gone() {
        let core = Arc::new(Refusing::default());
        let Ok(host) = crate::Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>) else { return };
        let len = 2 * PAGE_SIZE as usize;
        let p = crate::test_support::private_filled(len, 0x11);
        let reg = host.register(p as u64, len as u64).unwrap();
        let cpu = Arc::clone(&reg.cpu);
        drop(reg);
        drop(host);
        let va = p as usize;
        let mut file = page_file();
        let (rx, got) = within(SERVED_WITHIN, move || {
            use std::io::Read;
            // SAFETY: the first page of `p`, mapped until the munmap below (after this thread ended).
            let buf = unsafe { std::slice::from_raw_parts_mut(va as *mut u8, PAGE_SIZE as usize) };
            file.read(buf).map_err(|e| e.raw_os_error())
        });
        // Closing the uffd (the last holder of the context goes) releases a waiting thread.
        drop(cpu);
        let late = got.is_none() && rx.recv_timeout(Duration::from_secs(10)).is_ok();
        // SAFETY: `p` is this test's mapping; the reading thread has ended (or never will).
        unsafe { libc::munmap(p, len) };
        assert!(got.is_some(), "a CPU access to registered memory hung after the host was dropped (ended once the registration went: {late})");
    }

    /// A panic in the core while it serves a fault releases that thread (EFAULT for a
    /// kernel-mode access) and the host goes on serving: the servicer thread must not end, or
    /// every later fault would wait forever.
    #[test]
    fn a_core_panicking_on_a_fault_releases_it_and_later_faults_are_served() {
        let core = Arc::new(Refusing::default());
        let Ok(host) = crate::Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>) else { return };
        let region = host.create_region(2 * PAGE_SIZE).unwrap();
        core.region.set(Arc::downgrade(&region)).unwrap();
        let va = region.app_ptr() as usize;
        core.panic.store(true, Ordering::Release);
        let read_into = move |at: usize| {
            move || {
                use std::io::Read;
                // SAFETY: a page of the region's view, mapped while `region` lives (the test
                // waits for this thread before dropping it); nothing else references it meanwhile.
                let buf = unsafe { std::slice::from_raw_parts_mut(at as *mut u8, PAGE_SIZE as usize) };
                page_file().read(buf).map_err(|e| e.raw_os_error())
            }
        };
        let (_, first) = within(SERVED_WITHIN, read_into(va));
        assert_eq!(first, Some(Err(Some(libc::EFAULT))), "the fault the core panicked on was released");
        let (_, second) = within(SERVED_WITHIN, read_into(va + PAGE_SIZE as usize));
        assert_eq!(second, Some(Ok(PAGE_SIZE as usize)), "a later fault was served");
    }

    /// A userfaultfd with a context over it, or `None` where this machine has none.
    fn uffd_and_ctx() -> Option<(Arc<crate::uffd::Uffd>, Ctx)> {
        let uffd = Arc::new(crate::uffd::Uffd::open(Features::REQUIRED, Features::OPTIONAL).ok()?);
        let ctx = Ctx::new(Arc::clone(&uffd));
        Some((uffd, ctx))
    }

    /// Runs `in_flight` (given the moved range's old addresses) while an `mremap` of memory
    /// registered with `uffd` has moved its entries and its REMAP event is queued, unread (no
    /// reader here); then reads the event, and unmaps both ranges.
    fn during_an_unread_move(uffd: &crate::uffd::Uffd, in_flight: impl FnOnce(VaRange)) {
        use rustix::mm::{self, MapFlags, MremapFlags, ProtFlags};
        let len = 2 * PAGE_SIZE as usize;
        // SAFETY: fresh anonymous mappings where the kernel chooses replace nothing; unmapped below.
        let (src, dst) = unsafe {
            let rw = ProtFlags::READ | ProtFlags::WRITE;
            let src = mm::mmap_anonymous(std::ptr::null_mut(), len, rw, MapFlags::PRIVATE).unwrap() as usize;
            let dst = mm::mmap_anonymous(std::ptr::null_mut(), len, ProtFlags::empty(), MapFlags::PRIVATE).unwrap();
            (src, dst as usize)
        };
        let old = VaRange::new(src as u64, len as u64);
        // SAFETY: the test's own fresh anonymous mapping, which nothing else refers to.
        unsafe { uffd.register(old, crate::uffd::RegisterMode::MISSING) }.unwrap();
        std::thread::scope(|s| {
            // SAFETY: moves the test's registered mapping over its own placeholder `dst`
            // (MREMAP_FIXED replaces only that), leaving `src` mapped; nothing references either.
            let t = s.spawn(move || unsafe {
                let flags = MremapFlags::MAYMOVE | MremapFlags::DONTUNMAP;
                mm::mremap_fixed(src as *mut _, len, len, flags, dst as *mut _).map(|p| p as usize)
            });
            assert!(uffd.poll(std::time::Duration::from_secs(10)).unwrap(), "the move's event is queued");
            in_flight(old);
            let mut msgs = [uffd::empty_msg(); 4];
            let n = uffd.read_msgs(&mut msgs).unwrap();
            assert!(msgs[..n].iter().any(|m| matches!(uffd::decode(m), Event::Remap { .. })));
            assert_eq!(t.join().unwrap().unwrap(), dst);
        });
        // Unregistered first: unmapping registered memory waits for its UNMAP event to be read.
        for r in [src, dst] {
            uffd.unregister(VaRange::new(r as u64, len as u64)).unwrap();
        }
        // SAFETY: the test's own mappings (`src` left behind, empty), not used again.
        unsafe {
            let _ = mm::munmap(src as *mut _, len);
            let _ = mm::munmap(dst as *mut _, len);
        }
    }

    /// A write-protect that succeeds while a move of its range is in flight (the kernel moved
    /// the entries, the event is unread) is reported raced: it acted on the old addresses, and
    /// the CPU still writes the memory where it went. Giving write access back is not checked.
    #[test]
    fn a_write_protect_racing_an_unread_move_is_raced() {
        let Some((uffd, ctx)) = uffd_and_ctx() else { return };
        let mut protects = 0;
        during_an_unread_move(&uffd, |old| {
            let r = crate::host::protect_checked(&ctx, &[old], false, || {
                protects += 1;
                Ok(())
            });
            assert!(r.as_ref().is_err_and(|e| e.raced()), "write-protect: {r:?}");
            let r = crate::host::protect_checked(&ctx, &[old], true, || Ok(()));
            assert!(r.is_ok(), "giving write access back: {r:?}");
        });
        assert_eq!(protects, 1, "the write-protect ran once");
    }

    /// The kernel refuses userfaultfd range ioctls from before an `mremap` of registered memory
    /// moves its entries until its REMAP event is read: `events_read` sees such a move in flight
    /// (the event queued, no reader here) and waits for it, giving up after a second; once the
    /// event is read it answers at once.
    #[test]
    fn events_read_waits_for_a_move_whose_event_is_unread() {
        let Some((uffd, ctx)) = uffd_and_ctx() else { return };
        assert!(ctx.events_read(), "nothing in flight");
        during_an_unread_move(&uffd, |_| assert!(!ctx.events_read(), "an unread move is in flight"));
        let t = Instant::now();
        assert!(ctx.events_read(), "the move's event was read");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }
}
