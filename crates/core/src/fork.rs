//! `fork()`: what a child process sees of shared memory.
//!
//! The promise, as `fork()` of ordinary memory gives it:
//! - **Private memory** (from `Hetmm::alloc`, and private memory the program registered) is
//!   copied: the child gets its own copy of every byte as of the fork, including the bytes whose
//!   only copy was in a device's memory; the parent's later writes (CPU or device) stay in the
//!   parent, the child's in the child.
//! - **Shared memory** (registered `MAP_SHARED` files and shared anonymous memory, which hetmm
//!   mirrors and never migrates) stays shared, as the kernel shares it.
//! - In the child the copy is **ordinary memory**, at the same addresses, with the same
//!   protection: it is not managed by the parent's address space, whose threads and devices
//!   stayed in the parent. Every operation on the parent's [`AddressSpace`] fails there with
//!   [`CoreError::ForkedAway`]. A child that wants devices makes its own address space and
//!   registers the memory with it.
//! - The parent goes on exactly as before: no page changes state, its devices keep their data
//!   and mappings, and its kernels keep running.
//!
//! How: the host layer calls [`AddressSpace::fork_prepare`] just before the fork (a
//! `pthread_atfork` prepare handler). It waits until no operation is changing page state or
//! moving data (the fork gate, held shared by every such operation, is taken exclusively), then
//! copies the data of every page whose only copy is on a device into its host backing, without
//! changing any state. After the fork, the child calls [`ForkGuard::child`]: the parent's
//! address space becomes inert there and each region's CPU side makes the child's view private
//! ([`CpuMmu::fork_child`]). The parent calls [`ForkGuard::parent`] once the child has its copy,
//! which lets the waiting operations go on.
//!
//! A fork from code running inside an operation (its thread holds the gate: a callback, a
//! logger or a signal handler that forks) cannot wait for that operation, nor for the locks it
//! holds: it does not wait for its own thread, waits a bounded time for the others, and what it
//! cannot copy safely (the blocks the operation is changing; everything if other operations
//! did not end in time) is lost to the child: inaccessible there, counted in
//! `stats.bytes_fork_lost` and [`ForkGuard::lost_bytes`] (see [`AddressSpace::fork_prepare`]).
//! Nor does it wait for another thread that is itself preparing such a fork (its operation is
//! stopped meanwhile): of two at once, one takes the gate, the other waits for that fork, then
//! for the first thread's operation, and both children get their memory (`Gate::close`).
//!
//! Races: a device kernel that writes memory while another thread forks races with the fork
//! like any concurrent write: the child sees the data as of the flush or later. Writes that
//! happen after `fork()` returns in the parent never reach the child.
//!
//! The child of a multithreaded process may only make async-signal-safe calls (POSIX); the
//! child-side work here is only system calls. Threads of hetmm that sleep (the fork gate,
//! device fault and copy waits, the evictor) sleep on std's futex-based primitives rather than
//! in `parking_lot`'s process-wide table of parked threads, whose entries for threads that do
//! not exist in the child corrupt it for a child that goes on to use `parking_lot` (its own
//! address space, say; parking_lot issue #515).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::cpu::{CpuMmu, ForkPart};
use crate::error::{CoreError, Result};
use crate::migrate;
use crate::space::{AddressSpace, Region};
use crate::stats::add;
use crate::types::VaRange;

/// How long a new holder of the gate defers to a waiting fork before entering anyway, while a
/// holder that was there when the fork began to wait is still in: the fork gets the gate
/// promptly under load, and such a holder that (unexpectedly) waits for another thread that
/// needs to enter can never deadlock with it. Once those holders have left, newcomers wait for
/// the fork: otherwise holders that each stay longer than this and overlap (two threads taking
/// turns at large migrations) would keep the fork waiting for ever.
const DEFER: Duration = Duration::from_millis(50);

/// How long a fork from code running under the gate (its thread holds it shared) waits for the
/// other threads' holds to end: they may be waiting for this thread, so it cannot wait for
/// ever. If they do not leave in time, the fork is not exclusive and the child gets none of
/// the private memory (see [`AddressSpace::fork_prepare`]).
const UNDER_GATE_WAIT: Duration = Duration::from_secs(2);

/// The longest a fork from under the gate waits to take it, in all, while another fork from
/// under the gate holds it (that fork's prepare, its child's copy and its parent side; see
/// [`Gate::close`]).
const UNDER_GATE_FORK_WAIT: Duration = Duration::from_secs(60);

/// How long, in all, a fork from under the gate waits for the locks (the regions' list, block
/// locks) that its own thread, or a thread waiting for it, may hold; after that it only tries
/// each lock. A block it cannot lock is lost to the child.
const UNDER_GATE_LOCKS: Duration = Duration::from_millis(500);

/// How long a fork from under the gate waits for one block lock (within [`UNDER_GATE_LOCKS`]).
const UNDER_GATE_BLOCK: Duration = Duration::from_millis(50);

/// The fork gate: shared by operations that change page state, exclusive while a fork is
/// prepared (see [`AddressSpace::fork_prepare`]).
///
/// Built on std's futex-based mutex and condition variable rather than `parking_lot`: a thread
/// waiting in `parking_lot` sits in that crate's process-wide table of parked threads, and a
/// fork at that moment leaves the child with entries of threads that do not exist there (whose
/// stacks the child's new threads reuse), which corrupts the table for any `parking_lot` lock
/// the child later contends (parking_lot issue #515). Threads wait at this gate exactly while
/// a fork happens, so they must not be in that table.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    readers: usize,
    writer: bool,
    writers_waiting: usize,
    /// Bumped each time a fork begins to wait: holders that entered before (a smaller epoch)
    /// are the ones it found there.
    epoch: u64,
    /// Holders the latest waiting fork found there that are still in (see [`DEFER`]).
    early: usize,
    /// Holds of threads that are themselves preparing a fork from under the gate, waiting in
    /// [`Gate::close`]: their operations are stopped there, so another fork from under the
    /// gate does not wait for them (see [`Gate::close`]).
    parked: usize,
}

/// A shared hold of the [`Gate`].
#[derive(Debug)]
pub(crate) struct GateGuard<'a> {
    gate: &'a Gate,
    /// The gate's epoch when this hold began.
    epoch: u64,
    /// Dropped on the thread that entered (which records its holds, see `HELD`).
    _here: std::marker::PhantomData<*const ()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Gate {
    /// Enters shared: waits while a fork holds the gate, and defers to a fork waiting for it
    /// (at most [`DEFER`] while a holder the fork found there is still in; see there).
    pub(crate) fn enter(&self) -> GateGuard<'_> {
        let deadline = Instant::now() + DEFER;
        // A thread that holds the gate already (a fork hold around a call that enters) never
        // defers: the fork waits for its hold, so waiting for the fork would never end.
        let nested = HELD.with(|h| h.borrow().contains(&self.key()));
        let mut st = lock(&self.state);
        loop {
            if st.writer {
                st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            if st.writers_waiting == 0 || nested {
                break;
            }
            let now = Instant::now();
            if now < deadline {
                st = self.cv.wait_timeout(st, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
            } else if st.early > 0 {
                break;
            } else {
                // Only newcomers hold the gate: the fork gets it once they leave (it wakes us).
                st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
        }
        st.readers += 1;
        GateGuard::new(self, st.epoch)
    }

    fn key(&self) -> usize {
        self as *const Gate as usize
    }

    /// Enters shared unless a fork holds or waits for the gate.
    pub(crate) fn try_enter(&self) -> Option<GateGuard<'_>> {
        let mut st = lock(&self.state);
        if st.writer || st.writers_waiting > 0 {
            return None;
        }
        st.readers += 1;
        Some(GateGuard::new(self, st.epoch))
    }

    /// How many holds of this gate the calling thread has.
    fn held_here(&self) -> usize {
        let key = self.key();
        HELD.with(|h| h.borrow().iter().filter(|&&k| k == key).count())
    }

    /// Takes the gate exclusively: waits until no other thread holds it. Whether it took the
    /// gate (on `false` nothing changed: the fork is not exclusive).
    ///
    /// `inside`: the calling thread holds a fork gate (this one, `own` times, or another
    /// address space's): a fork from code running inside an operation. Then every wait is
    /// bounded, since the threads waited for may be waiting for this one (a block lock it
    /// holds, a fork waiting for its hold), and the holds of threads that are themselves in
    /// here from under this gate (`parked`, this thread's own included) are not waited for:
    /// their operations are stopped until their forks are done. Of two such forks, the one
    /// that sees both parked takes the gate; the other waits for it (its wait for a fork from
    /// under the gate that holds the gate is not counted in [`UNDER_GATE_WAIT`], since that
    /// fork waits for nothing of this thread and goes on; capped by [`UNDER_GATE_FORK_WAIT`]),
    /// then for the first thread's operation to end. A fork from outside any operation waits
    /// for every holder, parked ones included (their forks go first), without limit: they
    /// wait for nothing of its thread.
    fn close(&self, own: usize, inside: bool) -> bool {
        let start = Instant::now();
        let mut left = UNDER_GATE_WAIT;
        let (mut last, mut counted) = (start, true);
        let mut st = lock(&self.state);
        st.writers_waiting += 1;
        st.epoch += 1;
        st.early = st.readers.saturating_sub(own);
        st.parked += own;
        if own > 0 {
            // Another fork from under the gate may be waiting for this thread's holds alone.
            self.cv.notify_all();
        }
        let took = loop {
            let quiet = if inside { st.parked } else { 0 };
            if !st.writer && st.readers <= quiet {
                break true;
            }
            if !inside {
                st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let now = Instant::now();
            if counted {
                left = left.saturating_sub(now - last);
            }
            last = now;
            // The gate is held by a fork from under it (only such a fork can take it while this
            // thread holds it): it goes on without this thread; its time is not counted.
            counted = !(st.writer && own > 0);
            let cap = (start + UNDER_GATE_FORK_WAIT).saturating_duration_since(now);
            let wait = if counted { left.min(cap) } else { cap };
            if wait.is_zero() {
                break false;
            }
            st = self.cv.wait_timeout(st, wait).unwrap_or_else(PoisonError::into_inner).0;
        };
        st.writers_waiting -= 1;
        st.parked -= own;
        if took {
            st.writer = true;
        } else {
            drop(st);
            // Newcomers deferring to this fork go on.
            self.cv.notify_all();
        }
        took
    }

    /// How many forks wait to take the gate.
    fn forks_waiting(&self) -> usize {
        lock(&self.state).writers_waiting
    }

    /// Releases the exclusive hold.
    fn open(&self) {
        lock(&self.state).writer = false;
        self.cv.notify_all();
    }
}

thread_local! {
    /// The gates this thread holds (by address, once per hold).
    static HELD: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether the calling thread holds any fork gate (of any address space): it runs inside an
/// operation, and a fork from here is prepared under the bounded waits of
/// [`AddressSpace::fork_prepare`].
pub fn inside_an_operation() -> bool {
    HELD.with(|h| !h.borrow().is_empty())
}

impl<'a> GateGuard<'a> {
    fn new(gate: &'a Gate, epoch: u64) -> Self {
        HELD.with(|h| h.borrow_mut().push(gate.key()));
        GateGuard { gate, epoch, _here: std::marker::PhantomData }
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|&k| k == self.gate.key()) {
                h.swap_remove(i);
            }
        });
        let mut st = lock(&self.gate.state);
        st.readers -= 1;
        if self.epoch < st.epoch {
            st.early = st.early.saturating_sub(1);
        }
        // A waiting fork may be waiting for this hold alone, beside its own thread's (a fork
        // from under the gate): wake it on every leave.
        let wake = st.writers_waiting > 0;
        drop(st);
        if wake {
            self.gate.cv.notify_all();
        }
    }
}

/// What the child needs to make one CPU side's memory its own.
#[derive(Debug)]
struct ForkView {
    cpu: Arc<dyn CpuMmu>,
    parts: Vec<ForkPart>,
    lost: Vec<VaRange>,
}

/// A prepared fork of one address space: the fork gate held exclusively (nothing changes page
/// state or moves data) and host memory holding every page's data. Made by
/// [`AddressSpace::fork_prepare`]; consumed by [`ForkGuard::parent`] in the parent (dropping it
/// does the same) or [`ForkGuard::child`] in the child.
#[derive(Debug)]
pub struct ForkGuard {
    space: Arc<AddressSpace>,
    views: Vec<ForkView>,
    private_bytes: u64,
    /// Whether the gate is closed (always, but for a fork from under the gate that other
    /// operations held off; then every private page is lost).
    exclusive: bool,
}

/// Holds off `fork()` (see [`AddressSpace::hold_forks`]) until dropped.
#[derive(Debug)]
pub struct ForkHold<'a> {
    _gate: GateGuard<'a>,
}

impl AddressSpace {
    /// Holds off [`AddressSpace::fork_prepare`] while the caller makes memory shared in steps the
    /// core sees only at the end (the host adopting a program's memory into its own mapping, then
    /// [`AddressSpace::add_registered`]): a fork in between would find no region there and leave
    /// the child that memory shared with the parent instead of a copy of its own. Waits, like
    /// every operation, while a fork is under way. Calls on this thread that take the gate
    /// themselves (register's undo) enter beside the hold without deferring to a waiting fork.
    ///
    /// A `fork()` on the holding thread does not wait for its own hold (see
    /// [`AddressSpace::fork_prepare`], a fork from under the gate), but memory this thread is
    /// in the middle of making shared is not known to the core yet: avoid it, the child may
    /// find that memory shared with the parent.
    pub fn hold_forks(&self) -> Result<ForkHold<'_>, CoreError> {
        Ok(ForkHold { _gate: self.enter()? })
    }

    /// How many `fork()`s are waiting, in [`AddressSpace::fork_prepare`], for operations to
    /// end (diagnostics: a fork that seems slow; tests that need a fork to be waiting).
    pub fn forks_waiting(&self) -> usize {
        self.gate.forks_waiting()
    }

    /// Prepares a `fork()` of the process (call it on the thread that forks, just before): waits
    /// until no operation is changing page state, then copies every page whose only copy is in
    /// device memory into its host backing, changing no state (see the module notes). Until
    /// the guard is released, operations that change page state wait (device kernels that fault
    /// stall; running kernels go on). `None` in a fork child (the address space is the
    /// parent's: nothing to prepare).
    ///
    /// **A fork from code running under the gate** (this thread is inside an operation: a
    /// callback, a logger or a signal handler that forks; it holds this address space's gate
    /// or another's) never waits for its own thread, and every wait is bounded, since the
    /// operation this thread is in cannot go on:
    /// - it waits for the other threads' operations at most 2 s (`UNDER_GATE_WAIT`); if they do not
    ///   leave (they may be waiting for this thread), the fork is not exclusive: the parent's
    ///   threads go on changing the memory the child would copy, so every page of private
    ///   memory is lost to the child. Operations whose threads are themselves preparing a fork
    ///   from under the gate are stopped and not waited for: of two such forks at once, one
    ///   takes the gate, the other waits for that fork and then for its thread's operation
    ///   (see `Gate::close`);
    /// - it does not apply pending CPU-side events first (the thread applying them may be
    ///   waiting for this one);
    /// - it waits for the regions' list and each block lock a bounded time (50 ms each,
    ///   500 ms in all: `UNDER_GATE_BLOCK`, `UNDER_GATE_LOCKS`): a block whose lock it cannot take (held by this thread's
    ///   own operation, in the middle of changing it, or by a thread that waits for this one) is
    ///   lost to the child, all its pages (their host copies may be half written).
    ///
    /// Lost pages are inaccessible in the child ([`CpuMmu::fork_child`]), counted by
    /// [`ForkGuard::lost_bytes`] and `stats.bytes_fork_lost`. If even the regions' list cannot
    /// be read, nothing is prepared (`None`, logged): the child keeps the memory mapped as the
    /// parent has it. The parent goes on as after any fork.
    pub fn fork_prepare(self: &Arc<Self>) -> Option<ForkGuard> {
        if self.is_forked_away() {
            return None;
        }
        let own = self.gate.held_here();
        let inside = inside_an_operation();
        if !inside {
            // Apply the unmaps and remaps the OS already reported, so the child's view follows
            // the program's latest layout (bounded; a late event is a race with the fork).
            if let Err(e) = self.settle() {
                log::warn!("fork: {e}");
            }
        }
        let exclusive = self.gate.close(own, inside);
        // The guard owns the gate from here: a panic below (a device's copy in the flush, say)
        // opens it as it unwinds instead of leaving every later operation waiting for ever.
        let mut guard = ForkGuard { space: Arc::clone(self), views: Vec::new(), private_bytes: 0, exclusive };
        if !exclusive {
            log::error!(
                "fork from under the fork gate: other operations did not end within {UNDER_GATE_WAIT:?}; \
                 the child gets no private hetmm memory"
            );
        }
        let locks_until = Instant::now() + UNDER_GATE_LOCKS;
        let regions: Vec<Arc<Region>> = if !inside {
            self.regions.read().values().cloned().collect()
        } else if let Some(map) = self.regions.try_read_for(UNDER_GATE_LOCKS) {
            map.values().cloned().collect()
        } else {
            log::error!("fork from under the fork gate: the regions are locked; the child keeps them shared");
            return None;
        };
        add(&self.stats.forks, 1);
        let (views, private_bytes) = (&mut guard.views, &mut guard.private_bytes);
        for r in &regions {
            let mut lost = Vec::new();
            if !r.remote && !exclusive {
                *private_bytes += r.range.len;
                lost.push(r.range);
            } else if !r.remote {
                *private_bytes += r.range.len;
                for (b, cell) in r.blocks.iter().enumerate() {
                    let blk = if !inside {
                        Some(cell.lock())
                    } else {
                        let left = locks_until.saturating_duration_since(Instant::now()).min(UNDER_GATE_BLOCK);
                        if left.is_zero() {
                            cell.try_lock()
                        } else {
                            cell.try_lock_for(left)
                        }
                    };
                    let Some(blk) = blk else {
                        // Held by this thread's operation, one stopped in a fork of its own, or
                        // one waiting for it: lost.
                        lost.push(r.block_span(b));
                        continue;
                    };
                    let (bytes, flushed) = migrate::flush_to_host(self, r, &blk);
                    add(&self.stats.bytes_fork_flushed, bytes);
                    if let Err(left) = flushed {
                        lost.extend(migrate::ranges(&blk, &left));
                    }
                }
            }
            add(&self.stats.bytes_fork_lost, lost.iter().map(|l| l.len).sum());
            let part = ForkPart { range: r.range, prot: r.prot };
            // Regions split by protect or a partial unmap share one CPU side: one call for all.
            match views.iter_mut().find(|v| std::ptr::addr_eq(Arc::as_ptr(&v.cpu), Arc::as_ptr(&r.cpu))) {
                Some(v) => {
                    v.parts.push(part);
                    v.lost.extend(lost);
                }
                None => views.push(ForkView { cpu: Arc::clone(&r.cpu), parts: vec![part], lost }),
            }
        }
        Some(guard)
    }
}

impl ForkGuard {
    /// Bytes of private shared memory the child copies (an upper bound: never-written pages
    /// are not copied).
    pub fn private_bytes(&self) -> u64 {
        self.private_bytes
    }

    /// Number of ranges whose data could not be copied for the child (unreadable there).
    pub fn lost_ranges(&self) -> usize {
        self.views.iter().map(|v| v.lost.len()).sum()
    }

    /// Bytes of private memory the child cannot read (see [`AddressSpace::fork_prepare`]).
    pub fn lost_bytes(&self) -> u64 {
        self.views.iter().flat_map(|v| &v.lost).map(|l| l.len).sum()
    }

    /// Whether the fork holds the gate exclusively: `false` only for a fork from under the gate
    /// that other operations held off (every private page is then lost).
    pub fn is_exclusive(&self) -> bool {
        self.exclusive
    }

    /// In the parent, after the fork (or after a failed fork): releases the gate; everything
    /// goes on as before. Dropping the guard does the same.
    pub fn parent(self) {
        drop(self);
    }

    /// Releases a prepare that no fork followed, to be prepared again (the host does so when the
    /// program changed its memory's layout meanwhile): as [`ForkGuard::parent`], and the prepare
    /// is taken back out of the count of forks (`stats.forks`) and its lost bytes out of
    /// `stats.bytes_fork_lost`, which count each fork once. The bytes it flushed stay counted:
    /// they were copied.
    pub fn abandon(self) {
        self.space.stats.forks.fetch_sub(1, Ordering::Relaxed);
        self.space.stats.bytes_fork_lost.fetch_sub(self.lost_bytes(), Ordering::Relaxed);
        drop(self);
    }

    /// In the child, after the fork, on its only thread: the parent's address space becomes
    /// inert here (every operation fails with `ForkedAway`), and each CPU side makes the
    /// child's view of its memory the child's own ([`CpuMmu::fork_child`]). Nothing of the
    /// address space is ever released in the child: its threads do not exist here, so its
    /// destructors must never run (the guard and the address space are leaked). Returns the
    /// first CPU side's error (the others are still done).
    pub fn child(self) -> Result<()> {
        self.space.forked_away.store(true, Ordering::Release);
        let mut result = Ok(());
        for v in &self.views {
            if let Err(e) = v.cpu.fork_child(&v.parts, &v.lost) {
                if result.is_ok() {
                    result = Err(CoreError::Host(e));
                }
            }
        }
        // Never open the gate or drop the space here: both belong to the parent's threads.
        std::mem::forget(self);
        result
    }
}

impl Drop for ForkGuard {
    /// Only in the parent (`child` forgets the guard).
    fn drop(&mut self) {
        if self.exclusive {
            self.space.gate.open();
        }
    }
}

#[cfg(test)]
mod tests {
    //! The flush with fakes: device-only data reaches host memory, nothing changes state, and
    //! operations wait for the guard.

    use std::sync::Arc;
    use std::time::Duration;

    use parking_lot::Mutex;

    use crate::cpu::{CpuFaultHandler, CpuMmu, ForkPart};
    use crate::device::*;
    use crate::error::CoreError;
    use crate::space::{AddressSpace, AttachOptions, CoreConfig};
    use crate::testing::{FakeDevice, PlainCpu};
    use crate::types::*;

    const BASE: u64 = 0x4000_0000;
    const LEN: u64 = BLOCK_SIZE + 4 * PAGE_SIZE;

    /// The space, its one region's CPU side, the device, its id, and the host backing.
    type World = (Arc<AddressSpace>, Arc<PlainCpu>, Arc<FakeDevice>, DeviceId, Arc<Mutex<Vec<u8>>>);

    fn setup() -> World {
        let host = Arc::new(Mutex::new((0..LEN).map(|i| (i / PAGE_SIZE) as u8 ^ 0x5a).collect::<Vec<u8>>()));
        let space = AddressSpace::new(CoreConfig::default());
        let cpu = Arc::new(PlainCpu::new(VaRange::new(BASE, LEN)));
        space.add_region(Arc::clone(&cpu) as Arc<dyn CpuMmu>, Prot::READ | Prot::WRITE).unwrap();
        space.cpu_fault(BASE, Access::Write).unwrap();
        space.cpu_fault(BASE + BLOCK_SIZE, Access::Write).unwrap();
        let dev = Arc::new(FakeDevice::new((4 * BLOCK_SIZE) as usize, 0, Arc::clone(&host)));
        let id = space.attach(Arc::clone(&dev) as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
        (space, cpu, dev, id, host)
    }

    /// Writes `byte` over the device's copy of the page at `va` (a device kernel's write).
    fn device_write(space: &AddressSpace, dev: &FakeDevice, id: DeviceId, va: u64, byte: u8) {
        let region = space.region_of(va).unwrap();
        let blk = region.blocks[region.block_index(va)].lock();
        let pa = blk.pa(id, ((va - blk.base) / PAGE_SIZE) as usize).unwrap();
        dev.mem.lock()[pa.0 as usize..(pa.0 + PAGE_SIZE) as usize].fill(byte);
    }

    /// A panic while a fork is prepared (here a device's copy in the flush) opens the fork gate
    /// as it unwinds: the host catches such panics and the parent goes on, and every later
    /// operation waited at the closed gate for ever.
    #[test]
    fn a_panic_while_a_fork_is_prepared_leaves_the_gate_open() {
        use std::sync::atomic::Ordering::SeqCst;
        let (space, _cpu, dev, id, _host) = setup();
        space.migrate(BASE, 8 * PAGE_SIZE, Proc::Device(id)).unwrap();
        dev.panic_copies.store(true, SeqCst);
        let s = Arc::clone(&space);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || s.fork_prepare().map(|g| g.parent())));
        assert!(r.is_err(), "the flush's copy panicked");
        dev.panic_copies.store(false, SeqCst);
        let (tx, rx) = std::sync::mpsc::channel();
        let s = Arc::clone(&space);
        std::thread::spawn(move || {
            let _ = tx.send(s.migrate(BASE, 8 * PAGE_SIZE, Proc::Cpu));
        });
        let done = rx.recv_timeout(Duration::from_secs(10)).expect("an operation after the panic waits at the gate");
        done.unwrap();
    }

    #[test]
    fn device_only_data_reaches_host_and_nothing_moves() {
        let (space, cpu, dev, id, host) = setup();
        space.migrate(BASE, 8 * PAGE_SIZE, Proc::Device(id)).unwrap();
        device_write(&space, &dev, id, BASE + 3 * PAGE_SIZE, 0xEE);
        let states: Vec<_> = (0..LEN / PAGE_SIZE).map(|p| space.page_state(BASE + p * PAGE_SIZE)).collect();
        let guard = space.fork_prepare().unwrap();
        let h = host.lock();
        assert!(h[(3 * PAGE_SIZE) as usize..(4 * PAGE_SIZE) as usize].iter().all(|&b| b == 0xEE));
        assert!(h[..(3 * PAGE_SIZE) as usize]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i as u64 / PAGE_SIZE) as u8 ^ 0x5a));
        drop(h);
        let after: Vec<_> = (0..LEN / PAGE_SIZE).map(|p| space.page_state(BASE + p * PAGE_SIZE)).collect();
        assert_eq!(states, after, "no page changed state");
        assert_eq!(guard.private_bytes(), LEN);
        assert_eq!(guard.lost_ranges(), 0);
        assert_eq!(space.stats().bytes_fork_flushed, 8 * PAGE_SIZE);
        guard.parent();
        // The parent goes on: the device's copy is still the live one.
        assert!(space.page_state(BASE).unwrap().resident == ProcMask::only(Proc::Device(id)));
        space.migrate(BASE, 8 * PAGE_SIZE, Proc::Cpu).unwrap();
        assert!(cpu.forked.lock().is_empty());
    }

    /// A block whose device-only pages two devices hold, one failing its copy: the other
    /// device's pages are flushed and counted as such (they were not counted, or not even tried
    /// when the failing device came first), the failing one's are lost.
    #[test]
    fn a_flush_failing_on_one_device_still_copies_and_counts_the_others() {
        let (space, _cpu, dev, id, host) = setup();
        let other = Arc::new(FakeDevice::new((4 * BLOCK_SIZE) as usize, 0, Arc::clone(&host)));
        let id2 = space.attach(Arc::clone(&other) as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
        space.migrate(BASE, PAGE_SIZE, Proc::Device(id)).unwrap();
        space.migrate(BASE + PAGE_SIZE, PAGE_SIZE, Proc::Device(id2)).unwrap();
        let only = |va, d| space.page_state(va).unwrap().resident == ProcMask::only(Proc::Device(d));
        assert!(only(BASE, id) && only(BASE + PAGE_SIZE, id2), "one page on each device");
        device_write(&space, &dev, id, BASE, 0xE1);
        device_write(&space, &other, id2, BASE + PAGE_SIZE, 0xE2);
        let page = |k: u64| host.lock()[(k * PAGE_SIZE) as usize..((k + 1) * PAGE_SIZE) as usize].to_vec();
        for (failing, good, at, byte) in [(&other, id, 0, 0xE1u8), (&dev, id2, 1, 0xE2)] {
            failing.fail_d2h.store(true, std::sync::atomic::Ordering::Relaxed);
            let before = space.stats().bytes_fork_flushed;
            let guard = space.fork_prepare().unwrap();
            assert_eq!(space.stats().bytes_fork_flushed - before, PAGE_SIZE, "device {good:?}'s page");
            assert_eq!(guard.lost_bytes(), PAGE_SIZE, "the failing device's page");
            assert!(page(at).iter().all(|&b| b == byte), "device {good:?}'s page reached host memory");
            guard.parent();
            failing.fail_d2h.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn operations_wait_for_the_guard() {
        let (space, _cpu, _dev, id, _host) = setup();
        let guard = space.fork_prepare().unwrap();
        let s = Arc::clone(&space);
        let t = std::thread::spawn(move || s.migrate(BASE, PAGE_SIZE, Proc::Device(id)));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!t.is_finished(), "a migration ran while a fork was prepared");
        assert!(space.page_state(BASE).unwrap().resident.has(Proc::Cpu));
        guard.parent();
        t.join().unwrap().unwrap();
        assert!(space.page_state(BASE).unwrap().resident.has(Proc::Device(id)));
    }

    #[test]
    fn child_gets_parts_grouped_and_the_space_goes_inert() {
        let (space, cpu, dev, id, _host) = setup();
        space.migrate(BASE, PAGE_SIZE, Proc::Device(id)).unwrap();
        // Split the region in three parts over the same CPU side.
        space.protect_range(BASE + PAGE_SIZE, PAGE_SIZE, Prot::READ).unwrap();
        space.migrate(BASE + BLOCK_SIZE, PAGE_SIZE, Proc::Device(id)).unwrap();
        dev.fail_d2h.store(true, std::sync::atomic::Ordering::Relaxed);
        let guard = space.fork_prepare().unwrap();
        assert_eq!(guard.lost_ranges(), 1);
        guard.child().unwrap();
        let forked = cpu.forked.lock();
        assert_eq!(forked.len(), 1, "one call per CPU side");
        let (parts, lost) = &forked[0];
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[1], ForkPart { range: VaRange::new(BASE + PAGE_SIZE, PAGE_SIZE), prot: Prot::READ });
        assert_eq!(*lost, vec![VaRange::new(BASE + BLOCK_SIZE, PAGE_SIZE)]);
        drop(forked);
        assert!(space.is_forked_away());
        assert_eq!(space.migrate(BASE, PAGE_SIZE, Proc::Cpu), Err(CoreError::ForkedAway));
        assert!(matches!(space.snapshot(BASE, PAGE_SIZE, id), Err(CoreError::ForkedAway)));
        assert!(space.fork_prepare().is_none());
        // Never returns in a real child; here the gate stays held by the leaked guard.
        space.shutdown();
    }

    /// A fork waits while memory is being made shared (the host has adopted it, the core does
    /// not know it yet), then finds the new region.
    #[test]
    fn a_fork_waits_for_memory_being_shared() {
        let (space, _cpu, _dev, _id, _host) = setup();
        let hold = space.hold_forks().unwrap();
        let f = {
            let space = Arc::clone(&space);
            std::thread::spawn(move || {
                let guard = space.fork_prepare().unwrap();
                let n = space.regions.read().len();
                guard.parent();
                n
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!f.is_finished(), "the fork went ahead while memory was being shared");
        let more = VaRange::new(BASE + 4 * BLOCK_SIZE, BLOCK_SIZE);
        space.add_registered(Arc::new(PlainCpu::new(more)), more, Prot::READ | Prot::WRITE, false).unwrap();
        drop(hold);
        assert_eq!(f.join().unwrap(), 2, "the fork saw the new region");
    }

    /// `Hetmm::register`'s undo path: it holds off forks, and when the core refuses a part it
    /// releases the parts it added (a call that enters the gate) before letting go. If it began
    /// to hold while a fork waited (beside a holder the fork had found, which has left since),
    /// the release must not wait for the fork, which waits for the hold.
    #[test]
    fn a_fork_hold_taken_while_a_fork_waits_can_undo_a_registration() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let (space, _cpu, _dev, _id, _host) = setup();
        let early = space.hold_forks().unwrap();
        let forked = Arc::new(AtomicBool::new(false));
        let f = fork_in_background(&space, &forked);
        std::thread::sleep(Duration::from_millis(20));
        let (tx, rx) = std::sync::mpsc::channel();
        let r = {
            let space = Arc::clone(&space);
            std::thread::spawn(move || {
                // Enters after the deferral, beside `early`.
                let hold = space.hold_forks().unwrap();
                tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                let more = VaRange::new(BASE + 4 * BLOCK_SIZE, BLOCK_SIZE);
                space.add_registered(Arc::new(PlainCpu::new(more)), more, Prot::READ | Prot::WRITE, false).unwrap();
                space.release_range(more.start, more.len).unwrap();
                drop(hold);
            })
        };
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        drop(early);
        assert!(wait_until(|| r.is_finished()), "the undo waited for the fork, which waits for it");
        r.join().unwrap();
        f.join().unwrap();
        assert!(forked.load(SeqCst));
    }

    /// A thread that prepares a fork (waiting for the gate), sets `forked`, and lets it go.
    fn fork_in_background(
        space: &Arc<AddressSpace>,
        forked: &Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        let (space, forked) = (Arc::clone(space), Arc::clone(forked));
        std::thread::spawn(move || {
            let guard = space.fork_prepare().unwrap();
            forked.store(true, std::sync::atomic::Ordering::SeqCst);
            guard.parent();
        })
    }

    /// Waits (at most 10 s: a loaded machine may leave the threads waited for unscheduled a
    /// while) until `cond` holds; whether it did.
    fn wait_until(cond: impl Fn() -> bool) -> bool {
        wait_at_most(Duration::from_secs(10), cond)
    }

    /// Waits at most `limit` until `cond` holds; whether it did.
    fn wait_at_most(limit: Duration, cond: impl Fn() -> bool) -> bool {
        let t = std::time::Instant::now();
        while !cond() {
            if t.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Two threads whose operations each hold the gate longer than a new holder defers to a
    /// waiting fork, and overlap (a double-buffered pipeline of large migrations), must not keep
    /// a fork waiting forever: once the holders that were there when the fork began have left,
    /// newcomers wait for the fork.
    #[test]
    fn overlapping_long_operations_do_not_starve_a_fork() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let (space, _cpu, dev1, id1, host) = setup();
        let dev2 = Arc::new(FakeDevice::new((4 * BLOCK_SIZE) as usize, 0, Arc::clone(&host)));
        let id2 = space.attach(Arc::clone(&dev2) as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let forked = Arc::new(AtomicBool::new(false));
        // Each worker bounces one page between the CPU and its device; every copy waits at its
        // device's copy gate, which the test opens for a moment at a time.
        let bounce = |id: DeviceId, va: u64| {
            let (space, stop) = (Arc::clone(&space), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    space.migrate(va, PAGE_SIZE, Proc::Device(id)).unwrap();
                    space.migrate(va, PAGE_SIZE, Proc::Cpu).unwrap();
                }
            })
        };
        let mut g1 = Some(dev1.copy_gate.lock());
        let mut g2 = Some(dev2.copy_gate.lock());
        let a = bounce(id1, BASE);
        assert!(wait_until(|| dev1.copies_started.load(SeqCst) == 1));
        let f = fork_in_background(&space, &forked);
        std::thread::sleep(Duration::from_millis(10));
        let b = bounce(id2, BASE + BLOCK_SIZE);
        // B defers to the waiting fork, then enters beside A.
        assert!(wait_until(|| dev2.copies_started.load(SeqCst) == 1));
        // Let each one's operation finish in turn while the other holds the gate.
        for _ in 0..10 {
            for (dev, g) in [(&dev1, &mut g1), (&dev2, &mut g2)] {
                let n = dev.copies_started.load(SeqCst);
                *g = None;
                std::thread::sleep(Duration::from_millis(5));
                *g = Some(dev.copy_gate.lock());
                // Pacing only (not checked): once the fork waits for the other device's
                // operation alone, this device's next copy waits for the fork.
                wait_at_most(Duration::from_secs(1), || forked.load(SeqCst) || dev.copies_started.load(SeqCst) > n);
            }
            if forked.load(SeqCst) {
                break;
            }
        }
        let done = forked.load(SeqCst);
        stop.store(true, SeqCst);
        g1.take();
        g2.take();
        for t in [a, b, f] {
            t.join().unwrap();
        }
        assert!(done, "the fork waited for ever while two operations took turns holding the gate");
    }
}

#[cfg(test)]
mod race_tests {
    //! A fork racing memory being added, and a fork from a callback run under the gate.

    use std::sync::{Arc, Mutex as StdMutex};
    use std::time::Duration;

    use parking_lot::Mutex;

    use crate::cpu::{CpuFaultHandler, CpuMmu, ForkPart, HostError};
    use crate::device::*;
    use crate::space::{AddressSpace, AttachOptions, CoreConfig};
    use crate::testing::{FakeDevice, PlainCpu};
    use crate::types::*;

    const BASE: u64 = 0x4000_0000;
    const LEN: u64 = BLOCK_SIZE;

    /// `add_region` waits at the fork gate while a fork is prepared. (It took neither the gate
    /// nor `hold_forks`: a region added after `fork_prepare` listed the regions, but before
    /// `fork()`, went back to the program, yet the child never privatized it and kept a
    /// MAP_SHARED view of the parent's memfd, the two processes' writes crossing over.)
    #[test]
    fn a_region_added_while_a_fork_is_prepared_is_not_left_shared_in_the_child() {
        let space = AddressSpace::new(CoreConfig::default());
        let cpu = Arc::new(PlainCpu::new(VaRange::new(BASE, LEN)));
        space.add_region(Arc::clone(&cpu) as Arc<dyn CpuMmu>, Prot::READ | Prot::WRITE).unwrap();
        let guard = space.fork_prepare().unwrap();
        let more = VaRange::new(BASE + 4 * BLOCK_SIZE, BLOCK_SIZE);
        let new_cpu = Arc::new(PlainCpu::new(more));
        let t = {
            let (space, new_cpu) = (Arc::clone(&space), Arc::clone(&new_cpu));
            std::thread::spawn(move || space.add_region(new_cpu as Arc<dyn CpuMmu>, Prot::READ | Prot::WRITE).map(drop))
        };
        std::thread::sleep(Duration::from_millis(100));
        if t.is_finished() {
            // Added while the fork was prepared: the child must still make it private.
            t.join().unwrap().unwrap();
            guard.child().unwrap();
            assert!(
                !new_cpu.forked.lock().is_empty(),
                "a region added between fork_prepare and fork() stays shared with the parent in the child"
            );
            space.shutdown();
        } else {
            guard.parent();
            t.join().unwrap().unwrap();
        }
    }

    /// What a fork from under the gate saw, taken in the hook (before the guard is released).
    #[derive(Debug)]
    struct Seen {
        exclusive: bool,
        lost_bytes: u64,
        /// The host bytes of the first page of the second block (device-only data there).
        flushed: Vec<u8>,
        took: Duration,
    }

    type Hook = Box<dyn FnOnce() + Send>;

    /// A CPU side whose `populate` runs `hook` once (a callback on a thread that holds the fork
    /// gate and a block lock: a logger, a panic hook or a signal handler that forks).
    struct HookCpu {
        inner: PlainCpu,
        hook: StdMutex<Option<Hook>>,
    }

    impl std::fmt::Debug for HookCpu {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("HookCpu").field("inner", &self.inner).finish_non_exhaustive()
        }
    }

    impl CpuMmu for HookCpu {
        fn range(&self) -> VaRange {
            self.inner.range()
        }
        fn revoke(&self, r: &[VaRange]) -> Result<(), HostError> {
            self.inner.revoke(r)
        }
        fn populate(&self, r: &[VaRange]) -> Result<(), HostError> {
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
            self.inner.populate(r)
        }
        fn map(&self, r: &[VaRange], w: bool) -> Result<(), HostError> {
            self.inner.map(r, w)
        }
        fn protect(&self, r: &[VaRange], w: bool) -> Result<(), HostError> {
            self.inner.protect(r, w)
        }
        fn wake(&self, r: VaRange) -> Result<(), HostError> {
            self.inner.wake(r)
        }
        fn discard(&self, r: &[VaRange]) -> Result<(), HostError> {
            self.inner.discard(r)
        }
        fn backing(&self, va: u64) -> HostAddr {
            self.inner.backing(va)
        }
        fn fork_child(&self, parts: &[ForkPart], lost: &[VaRange]) -> Result<(), HostError> {
            self.inner.fork_child(parts, lost)
        }
    }

    /// Two blocks of private memory; the first page of the second block lives only on the
    /// device, holding 0xEE there (the host copy holds 0x11). The first block is untouched.
    type TwoBlocks = (Arc<AddressSpace>, Arc<HookCpu>, DeviceId, Arc<Mutex<Vec<u8>>>);

    fn two_blocks() -> TwoBlocks {
        let space = AddressSpace::new(CoreConfig::default());
        let host = Arc::new(Mutex::new(vec![0x11u8; (2 * BLOCK_SIZE) as usize]));
        let cpu =
            Arc::new(HookCpu { inner: PlainCpu::new(VaRange::new(BASE, 2 * BLOCK_SIZE)), hook: StdMutex::new(None) });
        space.add_region(Arc::clone(&cpu) as Arc<dyn CpuMmu>, Prot::READ | Prot::WRITE).unwrap();
        let dev = Arc::new(FakeDevice::new((4 * BLOCK_SIZE) as usize, 0, Arc::clone(&host)));
        let id = space.attach(Arc::clone(&dev) as Arc<dyn DeviceMmu>, AttachOptions::default()).unwrap();
        let va = BASE + BLOCK_SIZE;
        space.cpu_fault(va, Access::Write).unwrap();
        space.migrate(va, PAGE_SIZE, Proc::Device(id)).unwrap();
        {
            let region = space.region_of(va).unwrap();
            let blk = region.blocks[1].lock();
            let pa = blk.pa(id, 0).unwrap();
            dev.mem.lock()[pa.0 as usize..(pa.0 + PAGE_SIZE) as usize].fill(0xEE);
        }
        assert_eq!(space.page_state(va).unwrap().resident, ProcMask::only(Proc::Device(id)));
        (space, cpu, id, host)
    }

    /// Prepares a fork on this thread and notes what it saw; `child` plays the child's side.
    fn fork_here(space: &Arc<AddressSpace>, host: &Mutex<Vec<u8>>, child: bool) -> Option<Seen> {
        let t = std::time::Instant::now();
        let guard = space.fork_prepare()?;
        let took = t.elapsed();
        let off = BLOCK_SIZE as usize;
        let flushed = host.lock()[off..off + PAGE_SIZE as usize].to_vec();
        let seen = Seen { exclusive: guard.is_exclusive(), lost_bytes: guard.lost_bytes(), flushed, took };
        if child {
            guard.child().unwrap();
        } else {
            guard.parent();
        }
        Some(seen)
    }

    /// Runs a CPU fault on the untouched first block whose `populate` forks (its thread holds
    /// the gate and the first block's lock); what the fork saw, within 30 s (a hang fails; the
    /// callers check how long the fork itself took).
    fn fork_from_a_callback(space: &Arc<AddressSpace>, cpu: &HookCpu, host: &Arc<Mutex<Vec<u8>>>, child: bool) -> Seen {
        let (tx, rx) = std::sync::mpsc::channel();
        let (s, h) = (Arc::downgrade(space), Arc::clone(host));
        *cpu.hook.lock().unwrap() = Some(Box::new(move || {
            if let Some(s) = s.upgrade() {
                let _ = tx.send(fork_here(&s, &h, child));
            }
        }));
        let s = Arc::clone(space);
        // Left running (hung) if the fork deadlocks.
        let fault = std::thread::spawn(move || s.cpu_fault(BASE, Access::Write));
        let seen = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("fork_prepare on a thread holding the fork gate (a fork inside a callback) never returned")
            .expect("the fork was prepared");
        let t = std::time::Instant::now();
        while !fault.is_finished() {
            assert!(t.elapsed() < Duration::from_secs(30), "the operation the fork ran in never finished");
            std::thread::sleep(Duration::from_millis(1));
        }
        let r = fault.join().unwrap();
        if !child {
            r.unwrap();
        }
        seen
    }

    /// A fork from a callback that runs while its thread holds the gate and a block lock (it
    /// waited for ever: `close` waited for every reader, this thread included). The fork is
    /// exclusive and bounded; the block the callback's operation holds (in the middle of
    /// changing it) is lost to the child, all of it; the other block's device-only data is
    /// flushed; the parent goes on.
    #[test]
    fn a_fork_from_a_callback_under_the_gate_does_not_hang() {
        let (space, cpu, id, host) = two_blocks();
        let seen = fork_from_a_callback(&space, &cpu, &host, false);
        assert!(seen.exclusive);
        assert!(seen.took < Duration::from_secs(2), "{:?}", seen.took);
        assert_eq!(seen.lost_bytes, BLOCK_SIZE, "the locked block, all of it");
        assert!(seen.flushed.iter().all(|&b| b == 0xEE), "the other block's device-only data reached host memory");
        assert_eq!(space.stats().bytes_fork_lost, BLOCK_SIZE);
        // The parent goes on: the gate is open, the device copy still the live one.
        assert_eq!(space.page_state(BASE + BLOCK_SIZE).unwrap().resident, ProcMask::only(Proc::Device(id)));
        assert!(space.page_state(BASE).unwrap().resident.has(Proc::Cpu), "the fault completed");
        space.migrate(BASE, PAGE_SIZE, Proc::Device(id)).unwrap();
        space.migrate(BASE, 2 * BLOCK_SIZE, Proc::Cpu).unwrap();
        let g = space.fork_prepare().unwrap();
        assert!(g.is_exclusive());
        assert_eq!(g.lost_bytes(), 0);
        g.parent();
    }

    /// The child's side of the same fork: the locked block is inaccessible there, nothing else.
    #[test]
    fn a_fork_from_a_callback_under_the_gate_gives_the_child_the_rest() {
        let (space, cpu, _id, host) = two_blocks();
        let seen = fork_from_a_callback(&space, &cpu, &host, true);
        assert_eq!(seen.lost_bytes, BLOCK_SIZE);
        let forked = cpu.inner.forked.lock();
        assert_eq!(forked.len(), 1);
        assert_eq!(
            forked[0].0,
            vec![ForkPart { range: VaRange::new(BASE, 2 * BLOCK_SIZE), prot: Prot::READ | Prot::WRITE }]
        );
        assert_eq!(forked[0].1, vec![VaRange::new(BASE, BLOCK_SIZE)]);
        assert!(space.is_forked_away());
        drop(forked);
        space.shutdown();
    }

    /// Runs `body` on its own thread and fails if it does not end within 10 s (a deadlocked
    /// fork would otherwise hang the test run).
    fn within_10s(body: impl FnOnce() + Send + 'static) {
        let t = std::thread::spawn(body);
        let start = std::time::Instant::now();
        while !t.is_finished() {
            assert!(start.elapsed() < Duration::from_secs(10), "hung (the fork deadlocked?)");
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Err(p) = t.join() {
            std::panic::resume_unwind(p);
        }
    }

    /// A fork on a thread that holds the gate (`hold_forks`) but no block lock: it does not
    /// wait for its own hold, and the child gets everything.
    #[test]
    fn a_fork_on_a_thread_holding_the_gate_gets_everything() {
        within_10s(a_fork_on_a_thread_holding_the_gate_gets_everything_body);
    }

    fn a_fork_on_a_thread_holding_the_gate_gets_everything_body() {
        let (space, _cpu, _id, host) = two_blocks();
        let hold = space.hold_forks().unwrap();
        let seen = fork_here(&space, &host, false).unwrap();
        assert!(seen.exclusive);
        assert!(seen.took < Duration::from_secs(1), "{:?}", seen.took);
        assert_eq!(seen.lost_bytes, 0);
        assert!(seen.flushed.iter().all(|&b| b == 0xEE));
        assert_eq!(space.stats().bytes_fork_lost, 0);
        drop(hold);
        space.migrate(BASE + BLOCK_SIZE, PAGE_SIZE, Proc::Cpu).unwrap();
        assert_eq!(host.lock()[BLOCK_SIZE as usize], 0xEE);
        assert!(space.page_state(BASE + BLOCK_SIZE).unwrap().resident.has(Proc::Cpu));
    }

    /// A fork from under the gate still waits for other threads' operations to end.
    #[test]
    fn a_fork_under_the_gate_waits_for_other_holders() {
        within_10s(a_fork_under_the_gate_waits_for_other_holders_body);
    }

    fn a_fork_under_the_gate_waits_for_other_holders_body() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let (space, _cpu, _id, host) = two_blocks();
        let left = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let other = {
            let (space, left) = (Arc::clone(&space), Arc::clone(&left));
            std::thread::spawn(move || {
                let hold = space.hold_forks().unwrap();
                tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(300));
                left.store(true, SeqCst);
                drop(hold);
            })
        };
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let hold = space.hold_forks().unwrap();
        let seen = fork_here(&space, &host, false).unwrap();
        assert!(left.load(SeqCst), "the fork went ahead while another thread held the gate");
        assert!(seen.took < Duration::from_millis(1500), "the fork was not woken when the other left: {:?}", seen.took);
        assert!(seen.exclusive);
        assert_eq!(seen.lost_bytes, 0);
        assert!(seen.flushed.iter().all(|&b| b == 0xEE));
        drop(hold);
        other.join().unwrap();
    }

    /// Another thread that enters an operation on `space` (holds its fork gate) and stays in it
    /// until told on the sender (at most 20 s); returns once it is in.
    fn holds_until_told(space: &Arc<AddressSpace>) -> (std::thread::JoinHandle<()>, std::sync::mpsc::Sender<()>) {
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let space = Arc::clone(space);
        let other = std::thread::spawn(move || {
            let hold = space.hold_forks().unwrap();
            held_tx.send(()).unwrap();
            let _ = go_rx.recv_timeout(Duration::from_secs(20));
            drop(hold);
        });
        held_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        (other, go_tx)
    }

    /// A fork from under the gate whose other holder waits for this thread: bounded; not
    /// exclusive, so the child gets no private memory (all lost); the parent goes on, and
    /// later forks work.
    #[test]
    fn a_fork_under_the_gate_gives_up_on_a_holder_that_waits_for_it() {
        within_10s(a_fork_under_the_gate_gives_up_on_a_holder_that_waits_for_it_body);
    }

    fn a_fork_under_the_gate_gives_up_on_a_holder_that_waits_for_it_body() {
        let (space, cpu, id, _host) = two_blocks();
        // Waits for the forking thread (as for a lock it holds).
        let (other, go_tx) = holds_until_told(&space);
        let hold = space.hold_forks().unwrap();
        let guard = space.fork_prepare().unwrap();
        assert!(!guard.is_exclusive());
        assert_eq!(guard.lost_bytes(), 2 * BLOCK_SIZE, "all private memory");
        // Not exclusive: other operations go on meanwhile.
        space.migrate(BASE, PAGE_SIZE, Proc::Device(id)).unwrap();
        guard.child().unwrap();
        assert_eq!(cpu.inner.forked.lock()[0].1, vec![VaRange::new(BASE, 2 * BLOCK_SIZE)]);
        // (A real child stops here; the test's space plays the parent again.)
        space.forked_away.store(false, std::sync::atomic::Ordering::Release);
        go_tx.send(()).unwrap();
        other.join().unwrap();
        drop(hold);
        let g = space.fork_prepare().unwrap();
        assert!(g.is_exclusive());
        assert_eq!(g.lost_bytes(), 0);
        g.parent();
        space.migrate(BASE, PAGE_SIZE, Proc::Cpu).unwrap();
    }

    /// Two threads inside operations (each holds the gate) prepare forks at once, the second
    /// while the first waits for its hold. Each waited for the other's hold, a bounded time,
    /// and went ahead without the gate: both children lost all private memory. A thread
    /// preparing a fork does not change memory: the second takes the gate, the first waits for
    /// that fork, then for the second's hold to end, and both are exclusive with nothing lost.
    #[test]
    fn two_forks_from_under_the_same_gate_are_both_exclusive() {
        within_10s(two_forks_from_under_the_same_gate_are_both_exclusive_body);
    }

    fn two_forks_from_under_the_same_gate_are_both_exclusive_body() {
        let (space, _cpu, _id, host) = two_blocks();
        let hold = space.hold_forks().unwrap();
        let first = {
            let (space, host) = (Arc::clone(&space), Arc::clone(&host));
            std::thread::spawn(move || {
                let _hold = space.hold_forks().unwrap();
                fork_here(&space, &host, false).unwrap()
            })
        };
        let t = std::time::Instant::now();
        while space.forks_waiting() == 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "the first fork never waited");
            std::thread::sleep(Duration::from_millis(1));
        }
        let second = fork_here(&space, &host, false).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!first.is_finished(), "the first fork went ahead while the second's operation held the gate");
        drop(hold);
        let first = first.join().unwrap();
        for (which, seen) in [("first", &first), ("second", &second)] {
            assert!(seen.exclusive, "the {which} fork: {seen:?}");
            assert_eq!(seen.lost_bytes, 0, "the {which} fork: {seen:?}");
            assert!(seen.flushed.iter().all(|&b| b == 0xEE), "the {which} fork");
        }
        assert!(second.took < Duration::from_secs(1), "{:?}", second.took);
        assert_eq!(space.stats().bytes_fork_lost, 0);
    }

    /// A prepare given up to be done again (`abandon`) takes its lost bytes back out of
    /// `bytes_fork_lost`, as it takes itself out of `forks`: a fork counts once.
    #[test]
    fn an_abandoned_prepare_does_not_count_its_lost_bytes() {
        within_10s(an_abandoned_prepare_does_not_count_its_lost_bytes_body);
    }

    fn an_abandoned_prepare_does_not_count_its_lost_bytes_body() {
        let (space, _cpu, _id, _host) = two_blocks();
        let (other, go_tx) = holds_until_told(&space);
        let hold = space.hold_forks().unwrap();
        let forks = space.stats().forks;
        // Not exclusive (the other holder stays): everything lost.
        let guard = space.fork_prepare().unwrap();
        assert_eq!(guard.lost_bytes(), 2 * BLOCK_SIZE);
        assert_eq!(space.stats().bytes_fork_lost, 2 * BLOCK_SIZE);
        guard.abandon();
        assert_eq!(space.stats().bytes_fork_lost, 0, "an abandoned prepare's lost bytes stayed counted");
        assert_eq!(space.stats().forks, forks);
        go_tx.send(()).unwrap();
        other.join().unwrap();
        drop(hold);
    }
}
