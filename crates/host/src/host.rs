//! [`Host`]: one userfaultfd and its fault-handler thread; [`HostRegion`]: one shared region,
//! the core's [`CpuMmu`].
//!
//! Threading rule: the handler thread is the only reader of the uffd, and it never zaps, maps
//! memory, or touches managed memory itself; it only forwards faults to the core (which calls
//! [`CpuMmu::map`]) and resolves faults the core could not serve. Zaps happen on the core's
//! threads. This keeps working once `EVENT_REMOVE` is enabled: then `madvise(MADV_DONTNEED)`
//! blocks until the event is read, so a zapping reader would deadlock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use hetmm_core::cpu::{CpuFaultHandler, CpuMmu, HostError};
use hetmm_core::device::HostAddr;
use hetmm_core::types::{VaRange, BLOCK_SIZE, PAGE_SIZE};
use parking_lot::{ArcMutexGuard, Mutex, RawMutex};

use crate::events::{self, Ctx, Own};
use crate::mapping::{MappingError, MovedOut, SharedMapping};
use crate::pagemap::Pagemap;
use crate::uffd::{Features, OpenError, RegisterMode, Uffd, UffdError};

/// How long dropping a [`Host`] waits for its thread (a core call may be in flight).
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an ioctl that made no progress (EAGAIN: the address space is changing) is retried
/// at least, however long that takes, before [`RETRY_FOR`] can end the retries.
pub(crate) const MAX_RETRIES: u32 = 16;

/// Why a [`Host`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostInitError {
    /// No usable userfaultfd.
    #[error(transparent)]
    Uffd(#[from] OpenError),
    /// The fault-handler thread could not be spawned.
    #[error("cannot spawn the fault-handler thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Why a region could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// Bad length or the memfd/mmap calls failed.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// Registering the application view with the uffd failed.
    #[error(transparent)]
    Register(#[from] UffdError),
    /// Part of the range is not mapped (or `/proc/self/maps` could not be read).
    #[error("{0} is not entirely mapped: every page of a registered range must be mapped")]
    NotMapped(VaRange),
    /// The range mixes private and shared mappings.
    #[error("{0} mixes private and shared mappings: register them separately")]
    MixedSharing(VaRange),
    /// Shared memory over more than one mapping.
    #[error("shared memory {range} spans {mappings} mappings: register one mapping at a time")]
    SharedSpansMappings {
        /// The range asked for, rounded out to pages.
        range: VaRange,
        /// How many mappings it spans.
        mappings: usize,
    },
    /// The range holds the calling thread's stack.
    #[error("{0} holds the calling thread's stack: registering it would stop the thread at its next write there")]
    OwnStack(VaRange),
}

/// The CPU side of an address space: one userfaultfd and one thread that reads it and passes
/// faults to the core's [`CpuFaultHandler`].
pub struct Host {
    pub(crate) uffd: Arc<Uffd>,
    pub(crate) ctx: Arc<Ctx>,
    stop: Arc<AtomicBool>,
    /// The uffd reader (never blocks on the core) and the servicer (faults and events, in order).
    workers: Mutex<Vec<Worker>>,
    /// How large revokes take entries away (see [`Revoke`]).
    revoke: Revoke,
    /// Where revokes move page-table entries out for later freeing ([`Revoke::MoveOut`]): the
    /// thread that frees them.
    reaper: Option<Reaper>,
    /// Which alias pages already have entries ([`Revoke::IntoAlias`] moves only where none);
    /// `None` where procfs refuses (then nothing moves into the alias).
    pub(crate) pagemap: Option<Pagemap>,
}

/// The thread that frees page-table entries revokes moved out of application views, stopped
/// before the host's others (its unmaps may wait for the reader).
struct Reaper {
    /// None once the host is being dropped.
    tx: Mutex<Option<mpsc::Sender<MovedOut>>>,
    worker: Mutex<Option<Worker>>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("uffd", &self.uffd).finish_non_exhaustive()
    }
}

impl Host {
    /// Opens the uffd and starts the fault-handler thread. The handler is held weakly, so the
    /// core can own the host without a cycle; faults arriving after it is gone get SIGBUS.
    pub fn new(handler: Weak<dyn CpuFaultHandler>) -> Result<Arc<Host>, HostInitError> {
        let revoke = Revoke::from_env();
        Host::with_revoke(handler, revoke, revoke.wants_reaper(cpus()))
    }

    /// [`Host::new`] with the way large revokes take entries away, and whether a reaper thread
    /// frees entries moved out (without one, [`Revoke::IntoAlias`] zaps where the alias has
    /// entries of its own, and [`Revoke::MoveOut`] frees them on the revoking thread).
    pub(crate) fn with_revoke(
        handler: Weak<dyn CpuFaultHandler>,
        revoke: Revoke,
        with_reaper: bool,
    ) -> Result<Arc<Host>, HostInitError> {
        let uffd = Arc::new(Uffd::open(Features::REQUIRED, Features::OPTIONAL)?);
        let ctx = Arc::new(Ctx::new(uffd.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let (c, h, s) = (ctx.clone(), handler.clone(), stop.clone());
        let reader = Worker::spawn("hetmm-uffd-read", move || events::read_loop(&c, &h, &s, tx))
            .map_err(HostInitError::Spawn)?;
        let (c, s) = (ctx.clone(), stop.clone());
        let servicer = match Worker::spawn("hetmm-cpu-fault", move || events::service_loop(&c, &handler, &s, rx)) {
            Ok(w) => w,
            Err(e) => {
                stop.store(true, Ordering::Release);
                reader.join(JOIN_TIMEOUT);
                return Err(HostInitError::Spawn(e));
            }
        };
        let pagemap = Pagemap::open();
        let reaper = if with_reaper {
            let (tx, moved) = mpsc::channel();
            let c = ctx.clone();
            match Worker::spawn("hetmm-reaper", move || reap_loop(&c, moved)) {
                Ok(w) => Some(Reaper { tx: Mutex::new(Some(tx)), worker: Mutex::new(Some(w)) }),
                Err(e) => {
                    stop.store(true, Ordering::Release);
                    reader.join(JOIN_TIMEOUT);
                    servicer.join(JOIN_TIMEOUT);
                    return Err(HostInitError::Spawn(e));
                }
            }
        } else {
            None
        };
        Ok(Arc::new(Host { uffd, ctx, stop, workers: Mutex::new(vec![reader, servicer]), revoke, reaper, pagemap }))
    }

    /// Hands entries moved out of an application view to the reaper; frees them here if it
    /// is gone.
    fn reap(&self, moved: MovedOut) {
        let moved = match self.reaper.as_ref().and_then(|r| r.tx.lock().clone()) {
            Some(tx) => match tx.send(moved) {
                Ok(()) => return,
                Err(mpsc::SendError(m)) => m,
            },
            None => moved,
        };
        release(&self.ctx, moved);
    }

    /// Creates a shared region of `len` bytes (a multiple of 4 KiB) and registers its
    /// application view (MISSING | MINOR | WP). Nothing is mapped yet: every first access
    /// faults to the core.
    pub fn create_region(self: &Arc<Self>, len: u64) -> Result<Arc<HostRegion>, RegionError> {
        let region = self.create_region_unlisted(len)?;
        self.list_region(&region);
        Ok(region)
    }

    /// [`Host::create_region`], except that the host does not apply the program's `munmap` and
    /// `mremap` events to the region until [`Host::list_region`]. The kernel may place the new
    /// view at addresses the program's change of older managed memory just left, whose event is
    /// read or applied only later: applied to the new region, it would take the old memory's
    /// move or unmap for the new view's. List the region once the core holds it (the core
    /// refuses it while it still has the old memory there, so the event has been applied by
    /// then).
    pub fn create_region_unlisted(self: &Arc<Self>, len: u64) -> Result<Arc<HostRegion>, RegionError> {
        let mapping = SharedMapping::new(len)?;
        let mode = RegisterMode::MISSING | RegisterMode::MINOR | RegisterMode::WP;
        // SAFETY: the view of a mapping just made, whose bytes this host serves from here on.
        unsafe { self.uffd.register(mapping.app_range(), mode) }?;
        Ok(Arc::new(HostRegion { host: self.clone(), mapping, moved: Mutex::new(Weak::new()) }))
    }

    /// From now on the program's `munmap` and `mremap` of `region`'s view are followed (see
    /// [`Host::create_region_unlisted`]).
    pub fn list_region(&self, region: &Arc<HostRegion>) {
        let mut regions = self.ctx.regions.lock();
        regions.retain(|w| w.strong_count() > 0);
        regions.push(Arc::downgrade(region));
    }

    /// The uffd features in use.
    pub fn features(&self) -> Features {
        self.uffd.features()
    }

    /// Whether kernel-mode accesses (`read(2)` into a region) are served (see
    /// [`Uffd::kernel_faults_supported`]).
    pub fn kernel_faults_supported(&self) -> bool {
        self.uffd.kernel_faults_supported()
    }

    /// Locks the lists of regions and registered memory for a `fork()`, from its prepare
    /// handler until its parent or child handler: the child reads them to let go of the
    /// parent's files ([`ForkHold::retire_in_child`]), and a list another thread held at the
    /// moment of the fork would stay locked in the child for ever. Their holders never wait
    /// for anything while holding them, so this waits only for a push or a prune to end, at
    /// most `wait` for each: a fork from a signal handler may interrupt its own thread while
    /// that holds a list, and two forks may wait for each other through one (a list not taken
    /// is only tried in the child, as then nothing else can hold it but a thread gone there).
    pub(crate) fn hold_for_fork(self: &Arc<Self>, wait: Duration) -> ForkHold {
        ForkHold {
            regions: self.ctx.regions.try_lock_arc_for(wait),
            mirrors: self.ctx.mirrors.try_lock_arc_for(wait),
            host: Arc::clone(self),
        }
    }
}

/// A host's lists of regions and registered memory, locked for a `fork()` (see
/// [`Host::hold_for_fork`]); `None` where the wait for one ran out.
pub(crate) struct ForkHold {
    regions: Option<ArcMutexGuard<RawMutex, Vec<Weak<crate::HostRegion>>>>,
    mirrors: Option<ArcMutexGuard<RawMutex, Vec<Weak<crate::mirror::Mirror>>>>,
    host: Arc<Host>,
}

impl ForkHold {
    /// In the parent, after the fork: unlocks the lists and gives the host back.
    pub(crate) fn release(self) -> Arc<Host> {
        let ForkHold { host, .. } = self;
        host
    }

    /// In a `fork()` child, once every view was made the child's own (`CpuMmu::fork_child`):
    /// lets go of the parent's files the child still holds, the memfds (whose pages would stay
    /// allocated while the child lives after the parent frees them) and the userfaultfd. Only
    /// system calls. The caller never drops the hold: the child's copies of the parent's
    /// objects are never used again (the `hetmm` crate refuses them there; this crate's own
    /// calls on them would wait for the lists), and an unlock could wake threads that do not
    /// exist here. Nothing in the process that made the host.
    /// In a fork child, once every address space's CPU sides copied their parts: the views of
    /// each memfd of this host left over become zeros. The first failure's errno, having gone on.
    pub(crate) fn zero_leftovers_in_child(&self) -> Result<(), i32> {
        let host = &self.host;
        if rustix::process::getpid() == host.uffd.owner() {
            return Ok(());
        }
        let mut first = Ok(());
        let mut note = |r: Result<(), crate::mapping::MappingError>| {
            if let (Err(e), Ok(())) = (r, &first) {
                first = Err(e.errno());
            }
        };
        each_listed(self.regions.as_deref(), &host.ctx.regions, |r| note(r.mapping.zero_leftovers_in_child()));
        each_listed(self.mirrors.as_deref(), &host.ctx.mirrors, |m| note(m.zero_leftovers_in_child()));
        first
    }

    pub(crate) fn retire_in_child(&self) {
        use std::os::fd::AsFd;
        let host = &self.host;
        if rustix::process::getpid() == host.uffd.owner() {
            return;
        }
        let Ok(null) = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC) else { return };
        let null = null.as_fd();
        each_listed(self.regions.as_deref(), &host.ctx.regions, |r| r.mapping.retire_in_child(null));
        each_listed(self.mirrors.as_deref(), &host.ctx.mirrors, |m| m.retire_in_child(null));
        crate::mapping::retire_fd_in_child(host.uffd.as_fd(), null);
    }
}

/// In a fork child: `f` on every live entry of a list, `held` where the prepare took it, and
/// otherwise what trying its lock finds (nothing else can release it there). Neither the entries
/// nor a lock taken are let go: the child never drops the parent's objects.
fn each_listed<T>(held: Option<&Vec<Weak<T>>>, list: &Mutex<Vec<Weak<T>>>, mut f: impl FnMut(&T)) {
    let tried = if held.is_none() { list.try_lock() } else { None };
    for e in held.or(tried.as_deref()).map_or(&[][..], |v| &v[..]).iter().filter_map(Weak::upgrade) {
        f(&e);
        // Never the last holder here (the core's region or the registration keeps it).
        std::mem::forget(e);
    }
    std::mem::forget(tried);
}

impl Drop for Host {
    fn drop(&mut self) {
        // In a fork child only the forking thread exists: the host's threads are not there to
        // stop or join (each join would wait out its timeout), and a lock one of them held at
        // the fork stays held. Their handles are just let go.
        if rustix::process::getpid() != self.uffd.owner() {
            return;
        }
        let reaper = self.reaper.as_ref().and_then(|r| {
            drop(r.tx.lock().take());
            r.worker.lock().take()
        });
        let workers: Vec<Worker> = self.workers.lock().drain(..).collect();
        let stop = Arc::clone(&self.stop);
        // Dropped on one of the host's own threads (the core's last holder lets it go there):
        // on the reader, waiting for the reaper here would wait for events only this thread
        // reads (the reaper's zaps and unmaps). Another thread stops them, while this one goes
        // back to reading.
        let here = std::thread::current().id();
        if reaper.is_some() && workers.iter().any(|w| w.handle.thread().id() == here) {
            // Shared with the new thread, so that they come back if it cannot start.
            let slot = Arc::new(Mutex::new(Some((reaper, workers))));
            let theirs = Arc::clone(&slot);
            let spawned = Worker::spawn("hetmm-stop", move || {
                if let Some((reaper, workers)) = theirs.lock().take() {
                    stop_workers(reaper, workers, &stop);
                }
            });
            if let Err(e) = spawned {
                log::error!("starting a thread to stop the host's threads: {e}; stopping them here");
                if let Some((reaper, workers)) = slot.lock().take() {
                    stop_workers(reaper, workers, &self.stop);
                }
            }
            // Started: not joined (it ends once it has joined the others, each join bounded).
            return;
        }
        stop_workers(reaper, workers, &self.stop);
    }
}

/// Stops the host's threads: the reaper frees what is queued and ends first, while the reader
/// still reads the events its zaps and unmaps wait for; then the reader and the servicer.
/// Every join is bounded ([`JOIN_TIMEOUT`]).
fn stop_workers(reaper: Option<Worker>, workers: Vec<Worker>, stop: &AtomicBool) {
    if let Some(w) = reaper {
        w.join(JOIN_TIMEOUT);
    }
    stop.store(true, Ordering::Release);
    for w in workers {
        w.join(JOIN_TIMEOUT);
    }
}

/// A thread with a bounded join: the thread's end is seen through a channel whose sender it
/// owns (dropped when it returns or unwinds).
pub(crate) struct Worker {
    handle: JoinHandle<()>,
    done: mpsc::Receiver<()>,
}

impl Worker {
    pub(crate) fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<Worker> {
        let (tx, done) = mpsc::channel::<()>();
        let handle = std::thread::Builder::new().name(name.into()).spawn(move || {
            let _tx = tx;
            crate::signals::block_here();
            f();
        })?;
        Ok(Worker { handle, done })
    }

    /// Waits up to `timeout` for the thread to end, then joins it; detaches it otherwise (or
    /// when called from the thread itself, where joining would deadlock).
    pub(crate) fn join(self, timeout: Duration) {
        if self.handle.thread().id() == std::thread::current().id() {
            return;
        }
        match self.done.recv_timeout(timeout) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                log::error!("thread {:?} did not stop within {timeout:?}; detached", self.handle.thread().name());
            }
            _ => {
                let name = self.handle.thread().name().map(str::to_owned);
                if self.handle.join().is_err() {
                    log::error!("thread {name:?} panicked");
                }
            }
        }
    }
}

/// One shared region: a [`SharedMapping`] whose application view is registered with the host's
/// uffd. Implements the core's [`CpuMmu`].
///
/// The program may move memory out of the view with `mremap` (as it may any mapping it can
/// address): the moved part keeps its data and stays managed at its new address, like memory the
/// program registered (it is the program's mapping now: its `munmap` ends it), and the region
/// forgets it. So does it the parts the program unmaps. Dropping the region unmaps only what is
/// still its view.
#[derive(Debug)]
pub struct HostRegion {
    host: Arc<Host>,
    mapping: SharedMapping,
    /// Where the parts the program moved out of the view are managed (see
    /// [`HostRegion::moved_away`]), while any is.
    moved: Mutex<Weak<crate::mirror::Mirror>>,
}

impl HostRegion {
    /// Start of the application's view.
    pub fn app_ptr(&self) -> *mut u8 {
        self.mapping.app_ptr()
    }

    /// Start of the manager's alias.
    pub fn alias_ptr(&self) -> *mut u8 {
        self.mapping.alias_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.mapping.len()
    }

    /// Always false: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        self.mapping.is_empty()
    }

    /// The memfd, as `/proc/self/maps` names it.
    pub(crate) fn file(&self) -> crate::maps::MapsFile {
        self.mapping.file()
    }

    /// The manager's alias of the region.
    pub(crate) fn alias_range(&self) -> VaRange {
        VaRange::new(self.mapping.alias_ptr() as u64, self.mapping.len())
    }

    /// What is still the view: each part's addresses and memfd offset.
    pub(crate) fn pieces(&self) -> Vec<(VaRange, u64)> {
        let app = self.mapping.app_range().start;
        self.mapping.view_parts().into_iter().map(|p| (p, p.start - app)).collect()
    }

    /// The program unmapped `range` (or mapped over it): whatever of it was the view is not.
    pub(crate) fn forget(&self, range: VaRange) {
        self.mapping.view_left(range);
    }

    /// After the program moved `[from, from + len)` to `to` with `mremap`: if that was part of
    /// this region's view, the moved memory's CPU side at `to` (managed as registered private
    /// memory over the region's memfd and alias), and the region forgets the part. `None` if it
    /// was not the view, or (where the move spans the view and memory moved out of it and back
    /// beside it) not memfd bytes in a row.
    pub(crate) fn moved_away(self: &Arc<Self>, from: u64, to: u64, len: u64) -> Option<Arc<dyn CpuMmu>> {
        let moved = VaRange::checked(from, len)?;
        // The mirror takes the part before the view forgets it, both under the write lock (see
        // `Ctx::layout`): the part's offsets always have an owner.
        let _layout = self.host.ctx.layout.write();
        let parts = self.mapping.view_parts();
        let app = self.mapping.app_range().start;
        let mut slot = self.moved.lock();
        if !parts.iter().any(|p| p.contains_range(&moved)) {
            // The move may span parts of the view and memory moved out of it and back beside
            // them (the kernel merged their VMAs): those parts join the moved memory's mirror,
            // which follows the whole move, where together they hold it.
            let mine: Vec<(VaRange, u64)> =
                parts.iter().filter_map(|p| p.intersect(&moved)).map(|x| (x, x.start - app)).collect();
            if mine.is_empty() {
                return None;
            }
            let view = slot.upgrade()?.remapped_with(from, to, len, &mine)?;
            for &(x, _) in &mine {
                self.mapping.view_left(x);
            }
            return Some(view);
        }
        let off = from - app;
        let mirror = slot.upgrade().unwrap_or_else(|| {
            let (memfd, alias) = self.mapping.backing_shared();
            crate::mirror::Mirror::for_moved_region(&self.host, self, memfd, alias)
        });
        *slot = Arc::downgrade(&mirror);
        let view = mirror.moved_in(to, off, len);
        self.mapping.view_left(moved);
        Some(view)
    }

    /// Moves the entries of the ranges from [`MOVE_OUT_MIN`] out for the reaper; returns the
    /// ranges left to zap.
    fn move_out(&self, ranges: &[VaRange], mark: u64) -> Vec<VaRange> {
        let mut left = Vec::new();
        for &r in ranges {
            if r.len < MOVE_OUT_MIN {
                left.push(r);
                continue;
            }
            match self.take_entries(r) {
                Some(moved) => {
                    if let Some(moved) = self.keep_if_ours(moved, r, mark) {
                        self.host.reap(moved);
                    }
                }
                None => left.push(r),
            }
        }
        left
    }

    /// `moved`, if its entries are the view's; else (the program moved the view away while the
    /// revoke ran and something else sits at `r`) they go back where they were, and `None`.
    fn keep_if_ours(&self, moved: MovedOut, r: VaRange, mark: u64) -> Option<MovedOut> {
        if !self.host.ctx.reshaped_since(mark, &[r]) || self.mapping.moved_is_ours(&moved, r) {
            return Some(moved);
        }
        log::warn!("revoke of {r}: the program moved it away meanwhile; giving back what was taken there");
        // Where the program's memory is registered, the move back raises events: an UNMAP of
        // `r` (the empty VMA there is replaced), a REMAP from where the entries are and an UNMAP
        // of that. They are hetmm's own, not the program's: the core must not drop or move the
        // program's memory for them.
        let (ctx, at) = (&self.host.ctx, moved.moved());
        let back = || {
            // SAFETY: `moved` came from `move_out_app(r)`; `r` holds what that move left (the
            // revoke holds the block locks, and what was moved is the program's own mapping there).
            unsafe { SharedMapping::move_back(moved, r) }
        };
        let given = ctx.own_op(Own::Unmap, r, || ctx.own_op(Own::Unmap, at, || ctx.own_op(Own::MoveOut, at, back)));
        if let Err(e) = given {
            log::error!("giving back memory a revoke took at {r}: {e}");
        }
        None
    }

    /// Moves the view's entries of `r` out to a private reservation, marked as the manager's
    /// own move; `None` (logged) where the kernel refuses, and `r` is to be zapped instead.
    fn take_entries(&self, r: VaRange) -> Option<MovedOut> {
        self.host
            .ctx
            .own_op(Own::MoveOut, r, || self.mapping.move_out_app(r))
            .map_err(|e| log::debug!("revoke {r} by moving its entries: {e}; zapping instead"))
            .ok()
    }

    /// Moves the view's entries of each 2 MiB piece of the ranges into the alias where the
    /// piece is at least [`MOVE_OUT_MIN`] and the alias has no entries there (see
    /// [`HostRegion::move_run_into_alias`]); returns the pieces left to zap, adjacent ones
    /// merged. Pieces in a row move in one call.
    fn move_into_alias(&self, ranges: &[VaRange], mark: u64) -> Vec<VaRange> {
        let Some(pagemap) = &self.host.pagemap else { return ranges.to_vec() };
        // Too little to move (the device-fault path's revokes): no pagemap reads.
        if ranges.iter().map(|r| r.len).sum::<u64>() < INTO_ALIAS_MIN {
            return ranges.to_vec();
        }
        let mut left = Vec::new();
        let mut run: Option<VaRange> = None;
        let has_entries = |x: VaRange| self.mapping.alias_of(x).map_or(true, |a| pagemap.any_entry(a));
        for &r in ranges {
            // An alias with entries at the start of a range has them throughout, most likely
            // (a GPU backend pins it whole): one read decides, not one per block. Nothing can
            // move into it: the entries move out for the reaper to free, where there is one
            // (zapping them was half of a GPU migration's time on the H100 machine: 20 ms per
            // GiB beside the copy's 19.5), else they are zapped.
            if block_pieces(r).next().is_some_and(has_entries) {
                let rest = if self.host.reaper.is_some() { self.move_out(&[r], mark) } else { vec![r] };
                rest.into_iter().for_each(|x| push_merged(&mut left, x));
                continue;
            }
            for (i, piece) in block_pieces(r).enumerate() {
                // The first piece was read just above.
                let movable = piece.len >= MOVE_OUT_MIN && (i == 0 || !has_entries(piece));
                if !movable {
                    push_merged(&mut left, piece);
                    continue;
                }
                run = match run {
                    Some(x) if x.end() == piece.start => Some(VaRange::new(x.start, x.len + piece.len)),
                    Some(x) => {
                        self.move_run_into_alias(x, &mut left, mark);
                        Some(piece)
                    }
                    None => Some(piece),
                };
            }
        }
        if let Some(x) = run {
            self.move_run_into_alias(x, &mut left, mark);
        }
        left
    }

    /// One run's entries moved into the alias (a run under [`INTO_ALIAS_MIN`] is left to zap):
    /// first out to a private reservation ([`SharedMapping::move_out_app`], which checks the
    /// source before anything of ours is unmapped), where the moved VMA is unregistered (it
    /// came with the view's registration; an alias fault must never reach the uffd), then into
    /// the alias ([`SharedMapping::install_in_alias`]). The view has lost its entries once the
    /// first move succeeds, so the revoke is done whatever happens next: if a later step
    /// fails, the moved entries are freed as the reaper frees them.
    fn move_run_into_alias(&self, range: VaRange, left: &mut Vec<VaRange>, mark: u64) {
        if range.len < INTO_ALIAS_MIN {
            push_merged(left, range);
            return;
        }
        let Some(moved) = self.take_entries(range) else {
            push_merged(left, range);
            return;
        };
        let Some(moved) = self.keep_if_ours(moved, range, mark) else { return };
        if let Err(e) = retry_again(|| self.host.uffd.unregister(moved.moved())) {
            log::debug!("unregistering entries moved out of {range}: {e}; freeing them");
            release(&self.host.ctx, moved);
            return;
        }
        // The entries are the view's: `keep_if_ours` gave back any that were not.
        // SAFETY: `moved` came from `move_out_app(range)` above and was unregistered; the core
        // holds `range`'s block locks in a revoke: no copy engine touches its alias part meanwhile.
        if let Err(e) = unsafe { self.mapping.install_in_alias(moved, range) } {
            // The entries are freed; where the alias lost its part, the error is logged there.
            log::debug!("moving entries of {range} into the alias: {e}");
        }
    }

    /// Takes the CPU's access to `ranges` away (`CpuMmu::revoke`) the way `how` says; what a
    /// move does not take (small or unfit ranges) is zapped.
    fn revoke_ranges(&self, ranges: &[VaRange], how: Revoke) -> Result<(), HostError> {
        reshape_checked(&self.host.ctx, ranges, |mark| self.revoke_unchecked(ranges, how, mark))
    }

    fn revoke_unchecked(&self, ranges: &[VaRange], how: Revoke, mark: u64) -> Result<(), HostError> {
        // Our own zap raises a REMOVE event, our own move a REMAP event: mark them so the
        // reader does not take them for the program's.
        let zap = |r: VaRange| {
            self.host.ctx.self_zap(r, mark, || self.mapping.zap_app(r)).map_err(|e| mapping_err("revoke", r, e))
        };
        // What the kernel will not move in one piece (it spans VMAs: the program changed the
        // protection of part of it) is zapped.
        let left = match how {
            Revoke::Zap => ranges.to_vec(),
            Revoke::MoveOut => self.move_out(ranges, mark),
            Revoke::IntoAlias => self.move_into_alias(ranges, mark),
        };
        let ranges = &left[..];
        let pieces = zap_pieces(ranges, zap_threads());
        if pieces.len() <= 1 {
            return ranges.iter().try_for_each(|&r| zap(r));
        }
        // Large revokes (a bulk migration's batch) are split across threads: zapping 4 KiB PTEs
        // costs the CPU about as much as copying the data, and `MADV_DONTNEED` of disjoint
        // ranges runs in parallel (it takes the mmap lock for reading).
        std::thread::scope(|sc| {
            let workers: Vec<_> =
                pieces[1..].iter().map(|piece| sc.spawn(move || piece.iter().try_for_each(|&r| zap(r)))).collect();
            let mine = pieces[0].iter().try_for_each(|&r| zap(r));
            workers.into_iter().fold(mine, |acc, w| {
                let r = w.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                acc.and(r)
            })
        })
    }

    /// Maps one range with UFFDIO_CONTINUE, tolerating pages that are already mapped.
    fn map_range(&self, range: VaRange, writable: bool) -> Result<(), HostError> {
        self.mapping.offset_of(range).map_err(|e| mapping_err("map", range, e))?;
        continue_range(&self.host.ctx, range, writable, &|r| self.mapping.allocate(r))
    }
}

/// Runs `op` (a revoke of `ranges`, given the mark it started at), checked
/// before and after against the program's unmaps and remaps: if the program unmapped or moved
/// memory of `ranges` while it ran, the addresses acted on may no longer have been the view's
/// (see [`Ctx::reshaped_since`]), and the CPU may still map the pages where they went, so the
/// call fails with [`HostError::RACED`]: the core acts on nothing and tries again once the change
/// is applied. Checked before it starts too, so that it does not zap or move whatever the program
/// may already have mapped at addresses it moved away from (that leaves a window of
/// microseconds: an unmap or remap read between this check and the zap).
pub(crate) fn reshape_checked(
    ctx: &Ctx,
    ranges: &[VaRange],
    op: impl FnOnce(u64) -> Result<(), HostError>,
) -> Result<(), HostError> {
    fully_checked(ctx, "revoke", ranges, op)
}

/// [`reshape_checked`] for any operation `what` that takes CPU access away (a revoke, a
/// write-protect).
pub(crate) fn fully_checked(
    ctx: &Ctx,
    what: &'static str,
    ranges: &[VaRange],
    op: impl FnOnce(u64) -> Result<(), HostError>,
) -> Result<(), HostError> {
    let mark = ctx.reshape_mark();
    if ctx.reshaped_since(mark, ranges) {
        return Err(raced(what, ranges));
    }
    let done = op(mark);
    // A move the kernel made before `op` but has not queued the event of yet is seen once the
    // event is read (see `Ctx::events_read`), by the check below.
    if !ctx.events_read()
        || ctx.reshaped_since(mark, ranges)
        || done.as_ref().is_err_and(|e| unmapped_meanwhile(ctx, ranges, mark, e))
    {
        return Err(raced(what, ranges));
    }
    done
}

/// A write-protect (`writable` false) or its undoing, checked as the core needs it: taking
/// write access away is checked in full ([`fully_checked`]); giving it back only when it fails
/// ([`failure_checked`]). A write-protect that succeeded on addresses the program had just moved
/// away (`mremap` moved the entries, its event not yet read) left the CPU a writable mapping where
/// they went, while the core recorded the page write-protected beside a device's read copy.
/// Since a move carries device copies along, the CPU's next write there reached host memory
/// alone, and the device went on reading the old bytes (seed 70082 of the 6-thread stress test).
pub(crate) fn protect_checked(
    ctx: &Ctx,
    ranges: &[VaRange],
    writable: bool,
    op: impl FnOnce() -> Result<(), HostError>,
) -> Result<(), HostError> {
    if writable {
        failure_checked(ctx, "protect", ranges, op)
    } else {
        fully_checked(ctx, "protect", ranges, |_| op())
    }
}

/// Runs `op` (giving the CPU write access back to `ranges`), and reports its failure as raced
/// ([`HostError::RACED`]) when the program unmapped or moved the range meanwhile (see
/// [`unmapped_meanwhile`]), so that the core tries again once the change is applied. A success
/// is not checked: one that acted on addresses the program had just moved away leaves the CPU
/// less access than the core records where they went, and its next write there faults.
pub(crate) fn failure_checked(
    ctx: &Ctx,
    what: &'static str,
    ranges: &[VaRange],
    op: impl FnOnce() -> Result<(), HostError>,
) -> Result<(), HostError> {
    let mark = ctx.reshape_mark();
    let done = op();
    if done.as_ref().is_err_and(|e| unmapped_meanwhile(ctx, ranges, mark, e)) {
        return Err(raced(what, ranges));
    }
    done
}

/// Whether `e`, the error of an operation on `ranges` started at `mark`, says the range is no
/// longer mapped (ENOMEM from a zap, ENOENT from a write-protect) because the program unmapped
/// or moved it: the kernel takes the mapping away before it queues the event, so the event may
/// not have been read yet. Waits for it (at most a second); a range that stays unmapped with no
/// event is a real error.
fn unmapped_meanwhile(ctx: &Ctx, ranges: &[VaRange], mark: u64, e: &HostError) -> bool {
    if e.errno != libc::ENOMEM && e.errno != libc::ENOENT {
        return false;
    }
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        if ctx.reshaped_since(mark, ranges) {
            return true;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    false
}

/// The error of `what` (a revoke or write-protect) of `ranges` that raced the program's unmap or
/// remap.
fn raced(what: &'static str, ranges: &[VaRange]) -> HostError {
    let start = ranges.iter().map(|r| r.start).min().unwrap_or(0);
    let end = ranges.iter().map(|r| r.end()).max().unwrap_or(start);
    HostError { op: what, range: VaRange::new(start, end - start), errno: HostError::RACED }
}

/// How long a uffd ioctl is retried while it fails with EAGAIN (see [`retry_again`]). Each of
/// the manager's own zaps raises an event too, so under heavy revoking (several threads, moved
/// entries reaped) the address space can keep changing for tens of milliseconds on a loaded
/// machine: a CPU fault whose map gives up raises SIGBUS, so the bound is generous.
const RETRY_FOR: Duration = Duration::from_secs(5);

/// Back-off between retries of an ioctl that failed with EAGAIN, bounded by `limit` (usually
/// [`RETRY_FOR`]).
struct Backoff {
    since: std::time::Instant,
    n: u32,
    limit: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff::within(RETRY_FOR)
    }

    fn within(limit: Duration) -> Self {
        Backoff { since: std::time::Instant::now(), n: 0, limit }
    }

    /// Sleeps before the next try (20 us, doubling up to about 1 ms); `false` once the bound
    /// is spent.
    fn again(&mut self) -> bool {
        if self.n >= MAX_RETRIES && self.since.elapsed() > self.limit {
            return false;
        }
        self.n += 1;
        std::thread::sleep(Duration::from_micros(10 << self.n.min(7)));
        true
    }
}

/// Runs a uffd ioctl, retrying (bounded, with back-off) while it fails with EAGAIN: with
/// EVENT_REMOVE/UNMAP/REMAP on, every range ioctl fails so while an event is queued and not yet
/// read (`mmap_changing`); the reader thread reads it promptly.
pub(crate) fn retry_again<T>(op: impl FnMut() -> Result<T, UffdError>) -> Result<T, UffdError> {
    retry_again_within(RETRY_FOR, op)
}

/// [`retry_again`], retrying for `limit` instead of [`RETRY_FOR`].
pub(crate) fn retry_again_within<T>(
    limit: Duration,
    mut op: impl FnMut() -> Result<T, UffdError>,
) -> Result<T, UffdError> {
    let mut backoff = Backoff::within(limit);
    loop {
        match op() {
            Err(UffdError::Retry { .. }) if backoff.again() => {}
            r => return r,
        }
    }
}

/// Maps `range` with UFFDIO_CONTINUE (write-protected unless `writable`), tolerating pages that
/// are already mapped, retrying a bounded number of times while the address space is changing
/// (EAGAIN: an event is queued), and allocating backing with `allocate` where the page cache has
/// none (the program punched it: `MADV_REMOVE`). Fails as raced, mapping nothing more, once an
/// unmap or remap of the range is read and not yet applied ([`Ctx::mapping_checked`]).
pub(crate) fn continue_range(
    ctx: &Ctx,
    range: VaRange,
    writable: bool,
    allocate: &dyn Fn(VaRange) -> Result<(), MappingError>,
) -> Result<(), HostError> {
    let (uffd, end) = (&ctx.uffd, range.end());
    let (mut cur, mut backoff, mut existed, mut allocated) = (range.start, Backoff::new(), false, false);
    while cur < end {
        let left = VaRange::new(cur, end - cur);
        match ctx.mapping_checked(left, || uffd.cont(left, !writable, true))? {
            Ok(()) => break,
            // The kernel mapped and woke `done` bytes; go on from there.
            Err(UffdError::Partial { done, .. }) => cur += done,
            // This page already has a PTE: skip it (its waiters are woken below).
            Err(UffdError::Exists { .. }) => {
                existed = true;
                cur += PAGE_SIZE;
            }
            Err(UffdError::Retry { .. }) if backoff.again() => {}
            Err(UffdError::Os { errno, .. }) if errno == rustix::io::Errno::FAULT.raw_os_error() && !allocated => {
                allocated = true;
                allocate(VaRange::new(cur, end - cur)).map_err(|e| mapping_err("map", range, e))?;
            }
            Err(e) => return Err(uffd_err("map", range, e)),
        }
    }
    if existed {
        // Pages mapped before may carry the other write permission, and EEXIST woke nobody.
        retry_again(|| uffd.writeprotect(range, !writable, false)).map_err(|e| uffd_err("map", range, e))?;
        retry_again(|| uffd.wake(range)).map_err(|e| uffd_err("map", range, e))?;
    }
    Ok(())
}

impl CpuMmu for HostRegion {
    fn range(&self) -> VaRange {
        self.mapping.app_range()
    }

    fn revoke(&self, ranges: &[VaRange]) -> Result<(), HostError> {
        self.revoke_ranges(ranges, self.host.revoke)
    }

    fn populate(&self, ranges: &[VaRange]) -> Result<(), HostError> {
        for &r in ranges {
            self.mapping.allocate(r).map_err(|e| mapping_err("populate", r, e))?;
        }
        Ok(())
    }

    fn map(&self, ranges: &[VaRange], writable: bool) -> Result<(), HostError> {
        ranges.iter().try_for_each(|&r| self.map_range(r, writable))
    }

    fn protect(&self, ranges: &[VaRange], writable: bool) -> Result<(), HostError> {
        let op = || {
            ranges.iter().try_for_each(|&r| {
                self.mapping.offset_of(r).map_err(|e| mapping_err("protect", r, e))?;
                retry_again(|| self.host.uffd.writeprotect(r, !writable, true)).map_err(|e| uffd_err("protect", r, e))
            })
        };
        protect_checked(&self.host.ctx, ranges, writable, op)
    }

    fn wake(&self, range: VaRange) -> Result<(), HostError> {
        self.mapping.offset_of(range).map_err(|e| mapping_err("wake", range, e))?;
        retry_again(|| self.host.uffd.wake(range)).map_err(|e| uffd_err("wake", range, e))
    }

    fn discard(&self, ranges: &[VaRange]) -> Result<(), HostError> {
        for &r in ranges {
            self.mapping.punch(r).map_err(|e| mapping_err("discard", r, e))?;
            // Punching already drops the PTEs of every view; zap anyway so the contract does
            // not rest on that detail.
            let mark = self.host.ctx.reshape_mark();
            self.host.ctx.self_zap(r, mark, || self.mapping.zap_app(r)).map_err(|e| mapping_err("discard", r, e))?;
        }
        Ok(())
    }

    /// The alias address of `va`. A `va` outside the region has no backing: the result is the
    /// null address (logged), which any copy engine rejects.
    fn backing(&self, va: u64) -> HostAddr {
        let app = self.mapping.app_range();
        if !app.contains(va) {
            log::error!("backing({va:#x}) outside region {app}");
            return HostAddr(0);
        }
        HostAddr(self.mapping.alias_ptr() as usize + (va - app.start) as usize)
    }

    fn set_prot(&self, range: VaRange, prot: hetmm_core::types::Prot) -> Result<(), HostError> {
        self.mapping.offset_of(range).map_err(|e| mapping_err("protect", range, e))?;
        // SAFETY: `range` was just checked inside this region's view; the core asks for the
        // protection the program gave the range.
        unsafe { crate::mapping::protect_view(range, prot) }.map_err(|e| mapping_err("protect", range, e))
    }

    fn reads_zero(&self, range: VaRange) -> bool {
        match self.mapping.offset_of(range) {
            // SAFETY: `range` is checked inside the view: its part of the alias, which
            // `self.mapping` keeps mapped.
            Ok(off) => unsafe {
                crate::mapping::alias_is_zero(self.mapping.alias_ptr() as usize + off as usize, range.len as usize)
            },
            Err(_) => false,
        }
    }

    /// Memory from [`Host::create_region`] is private: the child gets a private copy of each
    /// part (see `SharedMapping::fork_child`).
    fn fork_child(&self, parts: &[hetmm_core::cpu::ForkPart], lost: &[VaRange]) -> Result<(), HostError> {
        self.mapping.fork_child(parts, lost).map_err(|e| mapping_err("fork", self.mapping.app_range(), e))
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        // A move or unmap of the view the reader has read but not yet passed on is not known
        // here: then what is unmapped is checked to still be the view.
        if self.host.ctx.reshape_in_flight() {
            self.mapping.check_on_drop();
        }
        // Unregister before the mapping unmaps (the core guarantees no device maps it); only
        // what is still the view: memory the program put where parts of it were may be
        // registered memory of its own.
        let parts = self.mapping.parts_to_unmap();
        // A part the program grew in place stays its memory (in a fork child, whose views are
        // its own copies, nothing is reshaped).
        if rustix::process::getpid() == self.host.uffd.owner() {
            if let Some(last) = parts.last().filter(|p| p.end() == self.mapping.app_range().end()) {
                self.host.ctx.fill_room_after(last.end(), self.file());
            }
        }
        for r in parts {
            if let Err(e) = self.host.uffd.unregister(r) {
                log::error!("unregistering region {r}: {e}");
            }
        }
    }
}

/// Bytes from which a revoke moves page-table entries out instead of zapping them (see
/// [`SharedMapping::move_out_app`]): below it, the reservation and the reaper's unmap cost
/// about what the zap saves.
const MOVE_OUT_MIN: u64 = 1 << 20;

/// Bytes from which a run of blocks is revoked by moving its entries into the alias. Each move
/// changes the VMAs of the view and the alias several times, and each change stalls every copy
/// engine faulting on the alias meanwhile. The device-fault path revokes 2-16 MiB at a time
/// while copies run: moving every run there cost what the faster copies saved
/// (`stream_breakdown`, 1 GiB: 0.195-0.22 s against 0.197-0.214 s zapping, five runs of each).
/// A bulk `Prefetch` revokes 64 MiB at a time before its copies: there it pays.
const INTO_ALIAS_MIN: u64 = 32 << 20;

/// How a revoke of [`MOVE_OUT_MIN`] bytes or more takes the application view's page-table
/// entries away (`HETMM_REVOKE`: `alias`, the default, `zap` or `move`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Revoke {
    /// Runs of [`INTO_ALIAS_MIN`] bytes or more moved into the alias where it has no entries
    /// of its own, the rest zapped: the copy engines read through the moved entries next.
    /// Where the alias has entries (a GPU backend pins it whole), such runs move out for the
    /// reaper to free, on machines of [`REAPER_MIN_CPUS`] or more, and are zapped elsewhere. As
    /// with `MoveOut`, a view the program `mlock`ed loses its lock where its entries move (a
    /// zap would refuse it instead); memory hetmm migrates to devices is not held in RAM by
    /// `mlock` either way.
    IntoAlias,
    /// `MADV_DONTNEED`.
    Zap,
    /// Moved out to a private reservation that a reaper thread unmaps later. Meant for
    /// machines with CPUs to spare; on the 2-CPU build machine the reaper's unmaps compete with
    /// the copies. For comparing on the GPU machine (`.ci/gpu check` runs its copy each way).
    MoveOut,
}

/// CPUs from which the default revoke ([`Revoke::IntoAlias`]) keeps a reaper thread: on fewer
/// its unmaps would take a CPU the copies and the program need (see [`Revoke::MoveOut`]).
const REAPER_MIN_CPUS: usize = 8;

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Revoke {
    /// Whether revokes this way want a reaper thread on a machine of `cpus` CPUs.
    fn wants_reaper(self, cpus: usize) -> bool {
        match self {
            Revoke::MoveOut => true,
            Revoke::IntoAlias => cpus >= REAPER_MIN_CPUS,
            Revoke::Zap => false,
        }
    }

    fn from_env() -> Revoke {
        match std::env::var("HETMM_REVOKE").as_deref() {
            Ok("zap") => Revoke::Zap,
            Ok("move") => Revoke::MoveOut,
            Ok("alias") | Err(_) => Revoke::IntoAlias,
            Ok(other) => {
                log::warn!("HETMM_REVOKE={other}: not alias, zap or move; using alias");
                Revoke::IntoAlias
            }
        }
    }
}

/// Appends `r` to `ranges`, merged into the last range where it continues it.
fn push_merged(ranges: &mut Vec<VaRange>, r: VaRange) {
    match ranges.last_mut() {
        Some(last) if last.end() == r.start => *last = VaRange::new(last.start, last.len + r.len),
        _ => ranges.push(r),
    }
}

/// Splits `r` at 2 MiB boundaries.
fn block_pieces(r: VaRange) -> impl Iterator<Item = VaRange> {
    let mut cur = r.start;
    std::iter::from_fn(move || {
        if cur >= r.end() {
            return None;
        }
        let next = ((cur / BLOCK_SIZE + 1) * BLOCK_SIZE).min(r.end());
        let piece = VaRange::new(cur, next - cur);
        cur = next;
        Some(piece)
    })
}

/// The reaper: frees the page-table entries revokes moved out, off the revoking thread (the
/// zap's cost, paid where it delays nobody), until the host drops the sender.
fn reap_loop(ctx: &Ctx, moved: mpsc::Receiver<MovedOut>) {
    while let Ok(m) = moved.recv() {
        release(ctx, m);
    }
}

/// Unmaps entries moved out. They are still registered (a move keeps the registration):
/// unregistered first, so the unmap raises no UNMAP event (while an event is unread, every
/// other uffd ioctl of the address space fails with EAGAIN and backs off); if that fails, the
/// unmap's event is marked as the manager's own.
fn release(ctx: &Ctx, m: MovedOut) {
    // The entries go first, a block at a time under the mmap lock held for reading. Unmapping
    // them whole would zap them all while holding the lock (downgraded to reading, but held):
    // every revoke's `mremap` meanwhile, which needs it for writing, waited for the whole run
    // (on the H100 machine a bulk migration's start time rose from 8 to 29 ms per GiB, the
    // revokes themselves taking 4). Unregistering entries also walks them under the lock held
    // for writing, to clear their write-protection: with none left the walk is short.
    for piece in block_pieces(m.moved()) {
        if let Err(e) = ctx.self_zap(piece, ctx.reshape_mark(), || m.zap(piece)) {
            log::debug!("zapping moved-out entries at {piece}: {e}; the unmap frees them");
            break;
        }
        ctx.reaped.fetch_add(piece.len, Ordering::Relaxed);
    }
    if let Err(e) = retry_again(|| ctx.uffd.unregister(m.moved())) {
        log::debug!("unregistering moved-out entries at {}: {e}", m.moved());
    }
    // An event covers the whole unmapped reservation.
    let r = m.reservation();
    ctx.own_op(Own::Unmap, r, || drop(m));
}

/// Bytes of revoke below which one thread zaps alone (thread start-up would cost more than it
/// saves).
const ZAP_PARALLEL_MIN: u64 = 8 << 20;

/// Threads for a large revoke: half the CPUs (the program and hetmm's other threads keep the
/// rest), at most 8; 1 on a machine of 2 or 3 CPUs.
fn zap_threads() -> usize {
    (cpus() / 2).clamp(1, 8)
}

/// Splits `ranges` into at most `threads` pieces of about equal bytes (a multiple of 2 MiB each
/// but the last), none under [`ZAP_PARALLEL_MIN`] / 2; one piece when the total is under
/// [`ZAP_PARALLEL_MIN`].
fn zap_pieces(ranges: &[VaRange], threads: usize) -> Vec<Vec<VaRange>> {
    const CUT: u64 = 2 << 20;
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let n = if total < ZAP_PARALLEL_MIN { 1 } else { threads.min((total / (ZAP_PARALLEL_MIN / 2)) as usize).max(1) };
    if n == 1 {
        return vec![ranges.to_vec()];
    }
    let share = total.div_ceil(n as u64).div_ceil(CUT) * CUT;
    let mut out = vec![Vec::new()];
    let mut filled = 0u64;
    for &r in ranges {
        let mut cur = r;
        while cur.len > 0 {
            if filled == share {
                out.push(Vec::new());
                filled = 0;
            }
            let take = cur.len.min(share - filled);
            out.last_mut().expect("never empty").push(VaRange::new(cur.start, take));
            filled += take;
            cur = VaRange::new(cur.start + take, cur.len - take);
        }
    }
    out
}

pub(crate) fn mapping_err(op: &'static str, range: VaRange, e: MappingError) -> HostError {
    HostError { op, range, errno: e.errno() }
}

pub(crate) fn uffd_err(op: &'static str, range: VaRange, e: UffdError) -> HostError {
    log::debug!("{op} on {range}: {e}");
    HostError { op, range, errno: e.errno() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{file_with, private_filled, tempfile};
    use hetmm_core::error::CoreError;
    use hetmm_core::types::{Access, BLOCK_SIZE};
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicU64, AtomicUsize};
    use std::sync::OnceLock;
    use std::time::Instant;

    /// A revoke or write-protect that fails because the range is no longer mapped, whose event
    /// the reader reads only afterwards (the kernel takes the mapping away before it queues the
    /// event), raced the program's unmap: it is reported as raced (the core retries, then finds
    /// the memory gone), not as the raw errno (a `migrate` racing a munmap failed with ENOMEM or
    /// ENOENT). With no event, the errno stands.
    #[test]
    fn a_call_failing_on_memory_unmapped_before_its_event_is_raced() {
        let Ok(uffd) = crate::uffd::Uffd::open(crate::uffd::Features::REQUIRED, crate::uffd::Features::OPTIONAL) else {
            return;
        };
        let ctx = Ctx::new(Arc::new(uffd));
        let mine = [VaRange::new(0x10_0000, 4 * PAGE_SIZE)];
        // A revoke is checked whole, a write-protect only when it fails.
        let call = |what: &'static str, op: &dyn Fn() -> Result<(), HostError>| {
            if what == "revoke" {
                reshape_checked(&ctx, &mine, |_| op())
            } else {
                failure_checked(&ctx, what, &mine, op)
            }
        };
        for (what, errno) in [("revoke", libc::ENOMEM), ("protect", libc::ENOENT)] {
            let gone = HostError { op: what, range: mine[0], errno };
            let r = std::thread::scope(|sc| {
                call(what, &|| {
                    sc.spawn(|| {
                        std::thread::sleep(Duration::from_millis(20));
                        ctx.note_reshape(&[VaRange::new(0x10_2000, PAGE_SIZE)]);
                    });
                    Err(gone.clone())
                })
            });
            let e = r.unwrap_err();
            assert!(e.raced(), "{what}: {e:?}");
            // Applied: the next call starts clean, and with no event its errno stands (after
            // waiting a second for one: once is enough).
            ctx.reshapes_applied_for_test();
            if what == "revoke" {
                assert_eq!(call(what, &|| Err(gone.clone())), Err(gone));
            }
            // An error that does not mean "unmapped" is not waited on.
            let other = HostError { op: what, range: mine[0], errno: libc::EINVAL };
            assert_eq!(call(what, &|| Err(other.clone())), Err(other));
        }
    }

    #[test]
    fn large_revokes_split_evenly_and_cover_every_byte() {
        let mb = 1u64 << 20;
        let ranges = [VaRange::new(0x4000_0000, 40 * mb), VaRange::new(0x8000_0000, 24 * mb + 4096)];
        for threads in [1usize, 2, 3, 8] {
            let pieces = zap_pieces(&ranges, threads);
            // Rounding each share up to 2 MiB may leave one thread without a piece.
            assert!((threads - 1..=threads).contains(&pieces.len()), "{threads} threads: {}", pieces.len());
            assert!(pieces[..pieces.len() - 1].iter().all(|p| p.iter().map(|r| r.len).sum::<u64>() % (2 * mb) == 0));
            let mut all: Vec<VaRange> = pieces.concat();
            all.sort_unstable();
            let total: u64 = all.iter().map(|r| r.len).sum();
            assert_eq!(total, 64 * mb + 4096);
            // Pieces are disjoint and, merged, give back the input.
            let mut merged: Vec<VaRange> = Vec::new();
            for r in all {
                match merged.last_mut() {
                    Some(l) if l.end() == r.start => l.len += r.len,
                    _ => merged.push(r),
                }
            }
            assert_eq!(merged, ranges.to_vec());
        }
        assert_eq!(zap_pieces(&[VaRange::new(0, 6 * mb)], 8).len(), 1, "small revokes stay on one thread");
        assert_eq!(zap_pieces(&[VaRange::new(0, 8 * mb)], 8).len(), 2, "no piece under 4 MiB");
    }

    /// Serves every fault like the core would for host-resident data: make sure backing exists,
    /// then map it.
    #[derive(Default)]
    struct TestCore {
        region: OnceLock<Weak<HostRegion>>,
        faults: AtomicUsize,
        writes: AtomicUsize,
        /// A page address the "core" refuses to serve (0: none).
        fail_va: AtomicU64,
        /// Events (discard, unmap, remap) that reached the core.
        events: AtomicUsize,
        /// Registered memory the "core" knows (served when `region` is not set).
        registered: OnceLock<Arc<dyn CpuMmu>>,
        /// Every fault served, in order: which pages faulted, not only how many (see
        /// [`TestCore::faults_in`]).
        seen: Mutex<Vec<(u64, Access)>>,
    }

    /// Whether page-table entries stay put between a test's steps unless hetmm or the test
    /// takes them: not while `.ci/pageout-storm` pages the test binary out (`.ci/flake-hunt`
    /// sets HETMM_PAGEOUT_STORM then). Checks that hetmm left entries alone are skipped under
    /// it; what the program reads, and that the pages hetmm took fault, are checked always.
    fn entries_stay() -> bool {
        std::env::var_os("HETMM_PAGEOUT_STORM").is_none()
    }

    impl TestCore {
        /// Where the faults stand now, for [`TestCore::faults_in`].
        fn mark(&self) -> usize {
            self.seen.lock().len()
        }

        /// Faults served since `mark` at pages of `range`. Tests of large regions check the
        /// pages they touch, not a total: the kernel may drop page-table entries of the view on
        /// its own (on the build machine, DAMON's `pageout` scheme takes a freshly allocated
        /// memfd page that `populate` left unmapped, and unmaps it after `map` mapped it: one
        /// loaded run in about 300 of a 40 MiB test saw 2 to 8 such faults), and a page whose
        /// entry went that way faults again, to be mapped again.
        fn faults_in(&self, mark: usize, range: VaRange) -> usize {
            self.seen.lock()[mark..].iter().filter(|&&(va, _)| range.contains(va)).count()
        }

        /// Whether the page at `va` faulted since `mark`.
        fn faulted(&self, mark: usize, va: u64) -> bool {
            self.faults_in(mark, VaRange::new(va & !(PAGE_SIZE - 1), PAGE_SIZE)) > 0
        }
    }

    impl CpuFaultHandler for TestCore {
        fn cpu_fault(&self, va: u64, access: Access) -> Result<(), CoreError> {
            self.faults.fetch_add(1, Ordering::Relaxed);
            self.seen.lock().push((va, access));
            if access == Access::Write {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            if va == self.fail_va.load(Ordering::Relaxed) {
                return Err(CoreError::NotShared(VaRange::new(va, PAGE_SIZE)));
            }
            let page = [VaRange::new(va, PAGE_SIZE)];
            if let Some(cpu) = self.registered.get() {
                cpu.populate(&page)?;
                return Ok(cpu.map(&page, true)?);
            }
            let region =
                self.region.get().and_then(Weak::upgrade).ok_or(CoreError::NotShared(VaRange::new(va, PAGE_SIZE)))?;
            region.populate(&page)?;
            region.map(&page, true)?;
            Ok(())
        }
        fn cpu_event(&self, _: hetmm_core::invalidate::CpuEvent) -> Result<(), CoreError> {
            self.events.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    fn setup(len: u64) -> (Arc<TestCore>, Arc<Host>, Arc<HostRegion>) {
        setup_with(len, None)
    }

    /// [`setup`] with the way large revokes go and whether a reaper runs (`None`: as
    /// [`Host::new`] decides).
    fn setup_with(len: u64, revoke: Option<(Revoke, bool)>) -> (Arc<TestCore>, Arc<Host>, Arc<HostRegion>) {
        let core = Arc::new(TestCore::default());
        let weak: Weak<dyn CpuFaultHandler> = Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>;
        let host = match revoke {
            None => Host::new(weak),
            Some((how, reaper)) => Host::with_revoke(weak, how, reaper),
        };
        let host = host.expect("host");
        let region = host.create_region(len).expect("region");
        core.region.set(Arc::downgrade(&region)).unwrap();
        (core, host, region)
    }

    /// Maps all of `region` writable and writes word `i` as `i * k` through the application
    /// view (from another thread, as the program would); returns the range.
    fn mapped_and_written(region: &HostRegion, k: u64) -> VaRange {
        let all = region.range();
        region.populate(&[all]).unwrap();
        region.map(&[all], true).unwrap();
        let app = region.app_ptr() as usize;
        let words = (all.len / 8) as usize;
        // SAFETY: word `i < len / 8`, 8-aligned in the 2 MiB-aligned view the caller's `region`
        // keeps mapped until `on_thread` returns; a missing entry faults to the test core.
        on_thread(move || (0..words).for_each(|i| unsafe { (app as *mut u64).add(i).write_volatile(i as u64 * k) }));
        all
    }

    /// Runs `f` on another thread, failing the test instead of hanging if it blocks.
    fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("access hung or panicked")
    }

    fn page(r: &HostRegion, i: u64) -> VaRange {
        VaRange::new(r.app_ptr() as u64 + i * PAGE_SIZE, PAGE_SIZE)
    }

    /// A core that holds the host (as the real one does) and whose last reference the reader
    /// thread drops: once armed, the reader waits, at its next read while one of the reaper's
    /// zaps is under way, until the test has let its own references go, so that the host is
    /// dropped on the reader while the reaper still has entries to free.
    #[derive(Default)]
    struct ReaderDropsCore {
        inner: TestCore,
        host: Mutex<Option<Arc<Host>>>,
        me: Mutex<Option<Arc<ReaderDropsCore>>>,
        ctx: OnceLock<Arc<Ctx>>,
        armed: AtomicBool,
        held: AtomicBool,
        go: AtomicBool,
    }

    impl CpuFaultHandler for ReaderDropsCore {
        fn cpu_fault(&self, va: u64, access: Access) -> Result<(), CoreError> {
            self.inner.cpu_fault(va, access)
        }

        fn event_queued(&self, queued: bool) {
            if std::thread::current().name() != Some("hetmm-uffd-read") || !self.armed.load(Ordering::Acquire) {
                return;
            }
            if queued && self.ctx.get().is_some_and(|c| c.zap_in_flight()) && !self.held.swap(true, Ordering::AcqRel) {
                let t = Instant::now();
                while !self.go.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            if !queued && self.go.load(Ordering::Acquire) {
                // Not the last reference: the reader's own goes at the end of its batch.
                drop(self.me.lock().take());
            }
        }
    }

    /// The host dropped on its reader thread (the core's last holder lets it go there) while the
    /// reaper still frees moved-out entries: the reaper's zaps wait for the reader to read their
    /// events, so the drop must not wait for the reaper there. (It joined it: the join timed out
    /// after 5 s, the reader then stopped, and the reaper waited forever, its entries never
    /// freed.)
    #[test]
    fn a_host_dropped_on_its_reader_lets_the_reaper_finish() {
        let core = Arc::new(ReaderDropsCore::default());
        let weak: Weak<dyn CpuFaultHandler> = Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>;
        let host = Host::with_revoke(weak, Revoke::MoveOut, true).expect("host");
        let ctx = Arc::clone(&host.ctx);
        let _ = core.ctx.set(Arc::clone(&ctx));
        let region = host.create_region(16 << 20).expect("region");
        core.inner.region.set(Arc::downgrade(&region)).unwrap();
        *core.host.lock() = Some(host);
        *core.me.lock() = Some(Arc::clone(&core));
        let all = mapped_and_written(&region, 5);
        core.armed.store(true, Ordering::Release);
        // The entries go to the reaper either way; the revoke may then wait for the reader this
        // test holds (to see every move in flight), give up after a second and report a race.
        if let Err(e) = region.revoke_ranges(&[all], Revoke::MoveOut) {
            assert_eq!(e.errno, HostError::RACED, "{e}");
        }
        let t = Instant::now();
        while !core.held.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(core.held.load(Ordering::Acquire), "the reader waited while the reaper zapped");
        // The reader holds the core now; the test's references go, the host's last one with
        // the core.
        drop(region);
        let weak_core = Arc::downgrade(&core);
        drop(core);
        let go = weak_core.upgrade().expect("the reader holds the core");
        go.go.store(true, Ordering::Release);
        drop(go);
        let t = Instant::now();
        // The reaper is a thread of its own: on a loaded machine it may take a while.
        while ctx.reaped.load(Ordering::Relaxed) < all.len && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(ctx.reaped.load(Ordering::Relaxed), all.len, "the reaper freed every moved-out entry");
        let t = Instant::now();
        while weak_core.strong_count() > 0 && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(weak_core.strong_count(), 0, "the core (and the host) were dropped");
    }

    /// A revoke that moved out another registered mapping's entries (the program moved memory it
    /// had registered to the view's address, replacing the view) gives them back without
    /// the core hearing of it: the move back unmaps the empty VMA the move left there and remaps
    /// the entries from the reservation, and both events are hetmm's own. (The core was told the
    /// program had unmapped and moved that memory, and forgot memory still mapped there.)
    #[test]
    fn giving_back_foreign_registered_memory_is_not_the_programs_change() {
        let len = 2 * PAGE_SIZE;
        let (core, host, region) = setup(len);
        let app = VaRange::new(region.app_ptr() as u64, len);
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks: it replaces
        // nothing.
        let mine = unsafe { libc::mmap(std::ptr::null_mut(), len as usize, rw, anon, -1, 0) };
        assert_ne!(mine, libc::MAP_FAILED);
        // SAFETY: `mine` is the `len`-byte read-write mapping just made (checked not MAP_FAILED).
        unsafe { mine.cast::<u8>().write(9) };
        let _reg = host.register(mine as u64, len).expect("register");
        let mark = host.ctx.reshape_mark();
        // The program moves its registered memory where the view was, replacing the view in one
        // call. (Moving the view away first would leave a hole at its address between the two
        // calls, where another test's thread stack or mapping could land, and the second move
        // would then replace that.)
        let mv = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        let at = app.start as *mut libc::c_void;
        // Losing the view this way is the race this test checks is handled.
        // SAFETY: moves this test's own `mine` over the view, which `region` owns and nothing reads
        // meanwhile; no Rust reference points into either.
        assert_eq!(unsafe { libc::mremap(mine, len as usize, len as usize, mv, at) }, at);
        // An UNMAP of the view the move replaced and a REMAP (the UNMAP of where it came from,
        // the move's own, is not passed on: see `events::apply_event`).
        let t = Instant::now();
        while core.events.load(Ordering::Relaxed) < 2 && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        let seen = core.events.load(Ordering::Relaxed);
        assert_eq!(seen, 2, "the program's move over the view");
        // A revoke of the view's old address, racing them, takes the program's memory.
        let moved = region.take_entries(app).expect("moved out");
        assert!(region.keep_if_ours(moved, app, mark).is_none(), "given back");
        // SAFETY: `at` maps the test's `mine` memory (read-write, `len` bytes) since the mremap
        // above, and nothing unmaps it before `region` drops; the give-back restored its entries.
        assert_eq!(unsafe { at.cast::<u8>().read() }, 9, "the program's memory is back");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(core.events.load(Ordering::Relaxed), seen, "the give-back reached the core as the program's");
    }

    #[test]
    fn minor_fault_brings_data_back() {
        let (core, _host, region) = setup(4 * PAGE_SIZE);
        // First write: missing fault, served by populate + map.
        let app = region.app_ptr() as usize;
        // SAFETY: byte 100 of the region's 4-page view, which `region` keeps mapped while
        // `on_thread` waits; the missing fault goes to the test core, which maps the page.
        on_thread(move || unsafe { (app as *mut u8).add(100).write(42) });
        assert_eq!(core.writes.load(Ordering::Relaxed), 1);
        region.revoke(&[page(&region, 0)]).unwrap();
        let before = core.faults.load(Ordering::Relaxed);
        // SAFETY: as above; the revoked page faults (MINOR) to the test core, which maps it back.
        let v = on_thread(move || unsafe { (app as *const u8).add(100).read_volatile() });
        assert_eq!(v, 42);
        assert_eq!(core.faults.load(Ordering::Relaxed), before + 1);
        // The alias always saw the data.
        let b = region.backing(page(&region, 0).start + 100).0;
        // SAFETY: `b` is byte 100 of the region's alias (unregistered, mapped while `region`
        // lives).
        assert_eq!(unsafe { (b as *const u8).read() }, 42);
    }

    /// A large revoke moves the entries out instead of zapping them: the next access faults to
    /// the core as after a zap and finds the data, pages outside the range stay mapped, and
    /// neither the move nor the reaper's unmap reaches the core as the program's remap or unmap.
    #[test]
    fn large_revoke_moves_entries_out_unseen() {
        let (core, host, region) = setup(3 * BLOCK_SIZE);
        let all = mapped_and_written(&region, 7);
        // Not 2 MiB-aligned: whole page tables move in the middle, single entries at the ends.
        let r = VaRange::new(all.start + 5 * PAGE_SIZE, 2 * BLOCK_SIZE);
        let mark = core.mark();
        region.revoke_ranges(&[r], Revoke::MoveOut).unwrap();
        // SAFETY: callers pass 8-aligned addresses in the view, which `region` keeps mapped until
        // after the reads; a moved-out entry only faults to the test core, which maps it again.
        let read = |va: u64| on_thread(move || unsafe { (va as *const u64).read_volatile() });
        for va in [all.start + 4 * PAGE_SIZE + 8, r.end() + 16] {
            assert_eq!(read(va), (va - all.start) / 8 * 7, "outside the range");
            assert!(!entries_stay() || !core.faulted(mark, va), "pages outside the range stay mapped");
        }
        for off in [0, BLOCK_SIZE - 8, r.len - 8] {
            let va = r.start + off;
            assert_eq!(read(va), (va - all.start) / 8 * 7);
            assert!(core.faulted(mark, va), "each page in the range faults");
        }
        // Without a reaper (HETMM_REVOKE unset) the entries were freed at once; with one,
        // dropping the host waits for it while the reader still reads.
        drop(region);
        on_thread(move || drop(host));
        assert_eq!(core.events.load(Ordering::Relaxed), 0, "the manager's own remap and unmap are not the program's");
    }

    /// The default large revoke moves the entries into the alias: the next access faults to the
    /// core as after a zap and finds the data, pages outside the range stay mapped, the alias
    /// has entries there afterwards, reads and writes through it (unregistered: no fault
    /// reaches the core) and its writes are seen by the program, and the move reaches the core
    /// as no event of the program's. Where the alias already has entries, and for runs under
    /// `INTO_ALIAS_MIN`, the range is zapped instead, with the same result for the program.
    #[test]
    fn large_revoke_moves_entries_into_the_alias_unseen() {
        let (core, host, region) = setup(24 * BLOCK_SIZE);
        let Some(pagemap) = Pagemap::open() else {
            eprintln!("skipped: /proc/self/pagemap cannot be opened here");
            return;
        };
        let all = mapped_and_written(&region, 7);
        let block = |i: u64| VaRange::new(all.start + i * BLOCK_SIZE, BLOCK_SIZE);
        // Block 1's alias gets entries of its own first: it is zapped, and so is the piece of
        // block 0 before it (a run under INTO_ALIAS_MIN). Blocks 2-22 move; the page of block
        // 23 is a piece under MOVE_OUT_MIN, zapped.
        let mut b = [0u8; 8];
        region.mapping.read_alias(BLOCK_SIZE + 64, &mut b).unwrap();
        assert_eq!(u64::from_ne_bytes(b), (BLOCK_SIZE + 64) / 8 * 7);
        // A page of block 4 the view does not map: the alias has no entry for it after the
        // move, and touching it there must not reach the userfaultfd.
        let hole = VaRange::new(block(4).start + 9 * PAGE_SIZE, PAGE_SIZE);
        region.revoke_ranges(&[hole], Revoke::IntoAlias).unwrap();
        // The program made its view read-only: the moved entries must still be writable in
        // the alias, where copies home write.
        region.set_prot(all, hetmm_core::types::Prot::READ).unwrap();
        let r = VaRange::new(all.start + 5 * PAGE_SIZE, 23 * BLOCK_SIZE - 4 * PAGE_SIZE);
        let mark = core.mark();
        region.revoke_ranges(&[r], Revoke::IntoAlias).unwrap();
        let alias = |x: VaRange| region.mapping.alias_of(x).unwrap();
        assert!(!entries_stay() || pagemap.any_entry(alias(block(3))), "block 3's entries are in the alias now");
        assert!(!pagemap.any_entry(VaRange::new(r.start, 23 * BLOCK_SIZE - 5 * PAGE_SIZE)), "not in the view");
        assert!(!pagemap.any_entry(alias(VaRange::new(r.start, BLOCK_SIZE - 5 * PAGE_SIZE))), "block 0: zapped");
        // The alias reads and writes without faulting to the core.
        let a = alias(block(3)).start as usize;
        // SAFETY: `a` starts block 3 of the alias (2 MiB, 8-aligned, unregistered), mapped while
        // `region` lives; word 3 is in bounds.
        let v = on_thread(move || unsafe { (a as *const u64).add(3).read_volatile() });
        assert_eq!(v, (3 * BLOCK_SIZE + 24) / 8 * 7);
        // SAFETY: word 5 of the same alias block, as above; nothing else accesses it meanwhile.
        on_thread(move || unsafe { (a as *mut u64).add(5).write_volatile(0xABCD) });
        let h = region.mapping.alias_of(hole).unwrap().start as usize;
        // SAFETY: `h` is the alias page of `hole` (in block 4, page-aligned), mapped while `region`
        // lives; with no entry it faults in from the memfd as usual (the alias is not registered).
        let v = on_thread(move || unsafe { (h as *const u64).read_volatile() });
        assert_eq!(v, (hole.start - all.start) / 8 * 7);
        // SAFETY: word 1 of the same alias page, as above.
        on_thread(move || unsafe { (h as *mut u64).add(1).write_volatile(0x5EED) });
        assert_eq!(core.faults_in(0, alias(all)), 0, "the alias is not registered");
        // SAFETY: callers pass 8-aligned addresses in the read-only view, mapped by `region` until
        // after the reads; a moved or zapped entry faults to the test core, which maps it.
        let read = |va: u64| on_thread(move || unsafe { (va as *const u64).read_volatile() });
        for va in [all.start + 4 * PAGE_SIZE + 8, r.end() + 16] {
            assert_eq!(read(va), (va - all.start) / 8 * 7, "outside the range");
            assert!(!entries_stay() || !core.faulted(mark, va), "pages outside the range stay mapped");
        }
        let seen = [(block(3).start + 40, 0xABCD), (hole.start + 8, 0x5EED)];
        let written = [r.start, block(1).start + 8, block(2).start, block(22).end() - 8, r.end() - 8];
        for (va, want) in written.map(|va| (va, (va - all.start) / 8 * 7)).into_iter().chain(seen) {
            assert_eq!(read(va), want, "at {:#x} into the region", va - all.start);
            assert!(core.faulted(mark, va), "each page in the range faults");
        }
        drop(region);
        on_thread(move || drop(host));
        assert_eq!(core.events.load(Ordering::Relaxed), 0, "the manager's own moves are not the program's");
    }

    /// Where the alias has entries of its own (a GPU backend pins it) and the host keeps a
    /// reaper, the default large revoke moves the view's entries out for the reaper instead of
    /// zapping them: the view has no entries at once, the reaper frees the moved ones a block at
    /// a time (their REMOVE events, like the moves, are the manager's own, never the
    /// program's), the alias keeps its entries, and the next access faults and finds the data.
    #[test]
    fn large_revoke_over_an_alias_with_entries_moves_out_for_the_reaper() {
        let (core, host, region) = setup_with(20 * BLOCK_SIZE, Some((Revoke::IntoAlias, true)));
        let Some(pagemap) = Pagemap::open() else {
            eprintln!("skipped: /proc/self/pagemap cannot be opened here");
            return;
        };
        let all = mapped_and_written(&region, 3);
        // Every page of the alias gets an entry, as a GPU backend's pinning gives it.
        let mut b = [0u8; 8];
        for off in (0..all.len).step_by(PAGE_SIZE as usize) {
            region.mapping.read_alias(off, &mut b).unwrap();
            assert_eq!(u64::from_ne_bytes(b), off / 8 * 3);
        }
        let alias = region.mapping.alias_of(all).unwrap();
        let r = VaRange::new(all.start + BLOCK_SIZE, 18 * BLOCK_SIZE);
        let mark = core.mark();
        region.revoke_ranges(&[r], Revoke::IntoAlias).unwrap();
        assert!(!pagemap.any_entry(r), "the view lost its entries");
        // Under a pageout storm the alias may have lost its entries before the revoke looked,
        // and the entries then moved into it instead: the reaper has nothing to free.
        if entries_stay() {
            assert!(pagemap.any_entry(region.mapping.alias_of(r).unwrap()), "the alias keeps its own");
            let deadline = Instant::now() + Duration::from_secs(10);
            while host.ctx.reaped.load(Ordering::Relaxed) < r.len && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(host.ctx.reaped.load(Ordering::Relaxed), r.len, "the reaper freed the moved entries");
        }
        // SAFETY: callers pass 8-aligned addresses in the view, which `region` keeps mapped until
        // after the reads; an entry moved to the reaper faults to the test core, which maps it.
        let read = |va: u64| on_thread(move || unsafe { (va as *const u64).read_volatile() });
        assert_eq!(read(all.start + 8), 3, "before the range");
        assert!(!entries_stay() || !core.faulted(mark, all.start), "before the range, still mapped");
        for va in [r.start, r.start + 7 * BLOCK_SIZE + 40, r.end() - 8] {
            assert_eq!(read(va), (va - all.start) / 8 * 3);
            assert!(core.faulted(mark, va), "each page read in the range faults");
        }
        assert!(!entries_stay() || pagemap.any_entry(alias), "the alias still has entries");
        drop(region);
        on_thread(move || drop(host));
        assert_eq!(core.events.load(Ordering::Relaxed), 0, "the manager's own moves and zaps are not the program's");
    }

    /// The kernel may drop the view's page-table entries on its own, with no event: reclaim, or
    /// on the build machine DAMON's `pageout` scheme, which does to a memfd page what
    /// `MADV_PAGEOUT` does here (unmaps it, fails to write it out with no swap, and keeps it in
    /// the page cache). The next access faults to the core as after a revoke and finds the data,
    /// write-protected pages too (their entries leave markers that fault the same way), and no
    /// event of the program's reaches the core.
    #[test]
    fn entries_the_kernel_drops_on_its_own_fault_back_with_the_data() {
        let (core, host, region) = setup(BLOCK_SIZE);
        let Some(pagemap) = Pagemap::open() else {
            eprintln!("skipped: /proc/self/pagemap cannot be opened here");
            return;
        };
        let all = mapped_and_written(&region, 5);
        // The second half write-protected, as read duplicates are mapped.
        let half = VaRange::new(all.start + BLOCK_SIZE / 2, BLOCK_SIZE / 2);
        region.protect(&[half], false).unwrap();
        let mark = core.mark();
        // SAFETY: the view is this test's mapping; MADV_PAGEOUT keeps its contents.
        let rc = unsafe { libc::madvise(all.start as *mut libc::c_void, all.len as usize, libc::MADV_PAGEOUT) };
        assert_eq!(rc, 0, "MADV_PAGEOUT: {}", std::io::Error::last_os_error());
        let pages: Vec<u64> = (0..all.len / PAGE_SIZE).map(|i| all.start + i * PAGE_SIZE).collect();
        let dropped: Vec<u64> = pages.iter().copied().filter(|&va| !pagemap.present(va)).collect();
        if dropped.is_empty() {
            eprintln!("skipped: MADV_PAGEOUT unmapped nothing here");
            return;
        }
        // SAFETY: `va` lies in the region's view, mapped for the test's life; the access faults
        // to the test core, which maps the page.
        let read = |va: u64| on_thread(move || unsafe { (va as *const u64).read_volatile() });
        for &va in &pages {
            assert_eq!(read(va + 8), (va + 8 - all.start) / 8 * 5, "at {:#x}", va - all.start);
        }
        for &va in &dropped {
            assert!(core.faulted(mark, va), "a dropped entry faults to the core at {:#x}", va - all.start);
        }
        let w = half.start + 16;
        // SAFETY: as for `read`; the write faults and the core maps the page writable.
        on_thread(move || unsafe { (w as *mut u64).write_volatile(77) });
        assert_eq!(read(w), 77);
        drop(region);
        on_thread(move || drop(host));
        assert_eq!(core.events.load(Ordering::Relaxed), 0, "the kernel's own unmapping is no event of the program's");
    }

    #[test]
    fn missing_fault_reads_zeros() {
        let (core, _host, region) = setup(4 * PAGE_SIZE);
        let va = page(&region, 3).start as usize;
        // SAFETY: page 3 of the region's 4-page view (page-aligned), mapped while `region` lives;
        // the missing fault is served by the test core.
        let v = on_thread(move || unsafe { (va as *const u64).read_volatile() });
        assert_eq!(v, 0);
        assert_eq!(core.faults.load(Ordering::Relaxed), 1);
        assert_eq!(core.writes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn write_protected_map_then_write_upgrades() {
        let (core, _host, region) = setup(PAGE_SIZE);
        region.populate(&[page(&region, 0)]).unwrap();
        region.map(&[page(&region, 0)], false).unwrap();
        let va = region.app_ptr() as usize;
        // SAFETY: byte 0 of the region's one-page view, mapped (write-protected) above and kept by
        // `region`.
        assert_eq!(on_thread(move || unsafe { (va as *const u8).read_volatile() }), 0);
        assert_eq!(core.faults.load(Ordering::Relaxed), 0);
        // A write hits the WP bit: the core maps writable (EEXIST path + unprotect).
        // SAFETY: as above; the write hits the write-protect bit and the test core maps the page
        // writable.
        on_thread(move || unsafe { (va as *mut u8).write_volatile(9) });
        assert_eq!(core.writes.load(Ordering::Relaxed), 1);
        // SAFETY: as above; any fault here is served by the handler thread, not this one.
        assert_eq!(unsafe { (va as *const u8).read() }, 9);
    }

    #[test]
    fn kernel_mode_fault_is_served() {
        let (core, host, region) = setup(2 * PAGE_SIZE);
        assert!(host.kernel_faults_supported());
        let va = region.app_ptr() as usize;
        // SAFETY: page 0 (`PAGE_SIZE` bytes) of the region's 2-page view, mapped while `region`
        // lives; the missing fault goes to the test core.
        on_thread(move || unsafe { (va as *mut u8).write_bytes(0xEE, PAGE_SIZE as usize) });
        region.revoke(&[page(&region, 0)]).unwrap();
        let (before, mark) = (core.faults.load(Ordering::Relaxed), core.mark());
        let file = file_with(&[0x5A; 4096]);
        // read(2) copies into the zapped page in kernel mode: the copy faults to the handler.
        let n = on_thread(move || {
            // SAFETY: page 0 of the view, `PAGE_SIZE` bytes mapped while `region` lives; no other
            // reference to it exists while `read` fills it (its faults go to the handler thread).
            let buf = unsafe { std::slice::from_raw_parts_mut(va as *mut u8, PAGE_SIZE as usize) };
            let mut file = file;
            file.read(buf).unwrap()
        });
        assert_eq!(n, 4096);
        assert!(core.faulted(mark, va as u64), "the kernel's copy faulted to the handler");
        // (Under a pageout storm the page may lose its entry again before the copy retries.)
        assert!(!entries_stay() || core.faults.load(Ordering::Relaxed) == before + 1, "one fault");
        let b = region.backing(va as u64).0 as *const u8;
        // SAFETY: `b` is page 0 of the region's alias (4096 bytes, mapped while `region` lives),
        // which nothing writes while the slice lives.
        assert!(unsafe { std::slice::from_raw_parts(b, 4096) }.iter().all(|&x| x == 0x5A));
    }

    /// A core error (or a dead core) releases the faulting thread with poison instead of hanging
    /// it. Checked with a kernel-mode access, which gets EFAULT where a user access would die
    /// of SIGBUS.
    #[test]
    fn unserved_fault_is_poisoned_not_hung() {
        let (core, _host, region) = setup(2 * PAGE_SIZE);
        let va = region.app_ptr() as usize;
        core.fail_va.store(va as u64, Ordering::Relaxed);
        let res = read_into(va, 4096);
        assert_eq!(res.map_err(|e| e.raw_os_error()), Err(Some(14)));
        // With the core gone, every fault is poisoned.
        drop(core);
        let res = read_into(va + PAGE_SIZE as usize, 4096);
        assert!(res.is_err(), "{res:?}");
    }

    /// A thread reading memory the program registers, between `Host::register` and the core
    /// learning of it (`Hetmm::register` hands the parts over before it drops the
    /// registration), waits for the core: its page was poisoned after 64 immediate retries
    /// (about 2 ms), and every later access got SIGBUS.
    #[test]
    fn a_fault_while_a_registration_is_set_up_waits_for_it() {
        let core = Arc::new(TestCore::default());
        let host = Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>).unwrap();
        let len = 2 * PAGE_SIZE as usize;
        let p = private_filled(len, 0x11);
        let reg = host.register(p as u64, len as u64).unwrap();
        let (c, cpu) = (core.clone(), Arc::clone(&reg.cpu));
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let _ = c.registered.set(cpu);
            drop(reg);
        });
        // The kernel reads the page (write(2) from it): EFAULT, not SIGBUS, if it was poisoned.
        let va = p as usize;
        let out = tempfile();
        // SAFETY: `out` is an open file this closure owns; `va..va + 4096` is the first page of
        // `p`, which stays mapped until the munmap below (never reached if `on_thread` gives up).
        let first = on_thread(move || unsafe { libc::write(out.as_raw_fd(), va as *const _, 4096) });
        late.join().unwrap();
        assert_eq!(first, 4096, "the read failed after {} faults", core.faults.load(Ordering::Relaxed));
        // SAFETY: byte 4096 of `p`'s `len` (8192) bytes, still mapped.
        assert_eq!(unsafe { *(p as *const u8).add(4096) }, 0x11);
        host.unregister(p as u64, len as u64).unwrap();
        // SAFETY: `p` is this test's mapping, unregistered above; nothing accesses it afterwards.
        unsafe { libc::munmap(p, len) };
    }

    fn read_into(va: usize, len: usize) -> std::io::Result<usize> {
        let mut file = file_with(&vec![1u8; len]);
        on_thread(move || {
            // SAFETY: callers pass `len` bytes of a region's view, kept mapped and referenced by
            // nothing else while `read` fills them (a poisoned fault fails the copy with EFAULT).
            let buf = unsafe { std::slice::from_raw_parts_mut(va as *mut u8, len) };
            file.read(buf)
        })
    }

    #[test]
    fn concurrent_faults_on_shared_pages() {
        let (core, _host, region) = setup(8 * PAGE_SIZE);
        let app = region.app_ptr() as usize;
        let sums = on_thread(move || {
            let ts: Vec<_> = (0..16)
                .map(|t| {
                    std::thread::spawn(move || {
                        // Every thread writes its own byte on every page.
                        for p in 0..8 {
                            // SAFETY: byte `t` < 16 of page `p` < 8 of the 8-page view, which
                            // `region` keeps mapped past the join; each writes only its own bytes.
                            unsafe { ((app + p * 4096 + t) as *mut u8).write_volatile(t as u8 + 1) };
                        }
                    })
                })
                .collect();
            ts.into_iter().all(|t| t.join().is_ok())
        });
        assert!(sums);
        for p in 0..8 {
            for t in 0..16 {
                // SAFETY: as above, after the writers were joined; every page is mapped by then.
                assert_eq!(unsafe { ((app + p * 4096 + t) as *const u8).read() }, t as u8 + 1);
            }
        }
        let n = core.faults.load(Ordering::Relaxed);
        assert!((8..=8 * 16).contains(&n), "{n}");
    }

    #[test]
    fn map_of_mapped_range_is_fine() {
        let (_core, _host, region) = setup(4 * PAGE_SIZE);
        let all = region.range();
        region.populate(&[all]).unwrap();
        region.map(&[page(&region, 1)], true).unwrap();
        // Page 1 exists in the middle: EEXIST is skipped and the rest is mapped.
        region.map(&[all], true).unwrap();
        region.map(&[all], true).unwrap();
        region.wake(all).unwrap();
        let b = region.backing(all.start + 3 * PAGE_SIZE).0 as *mut u8;
        // SAFETY: `b` is the alias of page 3 of the region's 4-page view, mapped while `region`
        // lives.
        unsafe { b.write(3) };
        // SAFETY: page 3 of the view, mapped (`map` above) and kept mapped by `region`.
        assert_eq!(unsafe { region.app_ptr().add(3 * 4096).read_volatile() }, 3);
    }

    #[test]
    fn discard_drops_data() {
        let (_core, _host, region) = setup(PAGE_SIZE);
        let va = region.app_ptr() as usize;
        // SAFETY: byte 0 of the region's one-page view, mapped while `region` lives; the fault goes
        // to the core.
        on_thread(move || unsafe { (va as *mut u8).write(1) });
        region.discard(&[page(&region, 0)]).unwrap();
        // SAFETY: as above; the discarded page faults to the test core, which maps a zero page.
        assert_eq!(on_thread(move || unsafe { (va as *const u8).read_volatile() }), 0);
    }

    #[test]
    fn bad_ranges_are_typed_errors() {
        let (_core, _host, region) = setup(2 * PAGE_SIZE);
        let a = region.app_ptr() as u64;
        let unaligned = VaRange::new(a + 1, PAGE_SIZE);
        let outside = VaRange::new(a + PAGE_SIZE, 2 * PAGE_SIZE);
        let einval = rustix::io::Errno::INVAL.raw_os_error();
        let efault = rustix::io::Errno::FAULT.raw_os_error();
        assert_eq!(region.map(&[unaligned], true).unwrap_err().errno, einval);
        assert_eq!(region.revoke(&[outside]).unwrap_err().errno, efault);
        assert_eq!(region.populate(&[outside]).unwrap_err().errno, efault);
        assert_eq!(region.discard(&[unaligned]).unwrap_err().errno, einval);
        let e = region.wake(outside).unwrap_err();
        assert_eq!((e.op, e.range), ("wake", outside));
        assert_eq!(region.backing(a + 2 * PAGE_SIZE), HostAddr(0));
        assert!(region.map(&[VaRange::new(a, 0)], true).is_err());
        let host = region.host.clone();
        assert!(matches!(host.create_region(0), Err(RegionError::Mapping(_))));
        assert!(matches!(host.create_region(4095), Err(RegionError::Mapping(_))));
    }

    /// A uffd inherited by a fork child describes the parent's address space: its ioctls must
    /// refuse to act from the child.
    #[test]
    fn uffd_refuses_ioctls_from_a_fork_child() {
        let _turn = crate::test_support::fork_turn();
        let (_core, host, region) = setup(2 * PAGE_SIZE);
        region.populate(&[page(&region, 0)]).unwrap();
        // SAFETY: the child only makes uffd calls that refuse at once in a child (a pid check, no
        // lock another thread may hold) and `_exit`s without unwinding.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let esrch = rustix::io::Errno::SRCH.raw_os_error();
            let ok = region.map(&[page(&region, 0)], true).is_err_and(|e| e.errno == esrch)
                // SAFETY: a page of the test's own region, which this host serves (and the call
                // is refused in the child anyway).
                && unsafe { host.uffd.register(page(&region, 1), RegisterMode::MISSING) }.is_err_and(|e| e.errno() == esrch);
            // SAFETY: `_exit` ends the child at once, running no destructors or handlers.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: `pid` is the child forked above; `status` is a live local it writes.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status:#x}");
        // The parent's uffd still works.
        region.map(&[page(&region, 0)], true).unwrap();
    }

    /// The child-side fork hook does nothing in the process that owns the region (its alias is
    /// in use there).
    #[test]
    fn fork_hook_is_refused_in_the_owner() {
        let (_core, _host, region) = setup(PAGE_SIZE);
        let app = region.app_ptr() as usize;
        // SAFETY: byte 0 of the region's one-page view, mapped while `region` lives; the fault goes
        // to the core.
        on_thread(move || unsafe { (app as *mut u8).write(5) });
        let part = hetmm_core::cpu::ForkPart { range: region.range(), prot: hetmm_core::types::Prot::READ };
        let e = region.fork_child(&[part], &[]).unwrap_err();
        assert_eq!(e.errno, rustix::io::Errno::PERM.raw_os_error());
        let b = region.backing(region.range().start).0 as *const u8;
        // SAFETY: `b` is byte 0 of the region's alias, mapped while `region` lives.
        assert_eq!(unsafe { b.read() }, 5);
        // SAFETY: as for the write above; the page stays mapped while `region` lives.
        assert_eq!(unsafe { (app as *const u8).read_volatile() }, 5);
    }

    /// A fork child that drops its copy of the host returns at once: the host's threads do not
    /// exist there, and each join used to wait out its 5 s timeout.
    #[test]
    fn a_fork_child_drops_its_host_promptly() {
        let _turn = crate::test_support::fork_turn();
        let core = Arc::new(TestCore::default());
        let host = Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>).unwrap();
        // SAFETY: the child drops the host (no uffd call, no lock of the parent's threads: the
        // drop returns before either) and `_exit`s without unwinding.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let t = Instant::now();
            drop(host);
            let quick = t.elapsed() < Duration::from_secs(2);
            // SAFETY: `_exit` ends the child at once, running no destructors or handlers.
            unsafe { libc::_exit(if quick { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: `pid` is the child forked above; `status` is a live local it writes.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status:#x}");
    }

    #[test]
    fn drop_idle_host_is_prompt() {
        let core = Arc::new(TestCore::default());
        let host = Host::new(Arc::downgrade(&core) as Weak<dyn CpuFaultHandler>).unwrap();
        let region = host.create_region(PAGE_SIZE).unwrap();
        drop(region);
        let t = Instant::now();
        drop(host);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
}
