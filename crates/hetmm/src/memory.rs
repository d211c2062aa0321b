//! Shared buffers: memory valid on the CPU and on every device at the same address. This module
//! holds the facade's only unsafe code, turning a region's application view into slices.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hetmm_core::cpu::CpuMmu;
use hetmm_core::types::{Prot, VaRange};
use hetmm_core::AddressSpace;
use hetmm_host::HostRegion;

use crate::{Error, Launch, Result, Running};

/// The live buffers of one `Hetmm` (start to length and holds), shared with the buffers, which
/// take themselves out when dropped.
#[derive(Debug, Default, Clone)]
pub(crate) struct Allocs(Arc<Mutex<AllocMap>>);

/// Start of each live buffer to its length and holds.
type AllocMap = BTreeMap<u64, (u64, Arc<Holds>)>;

impl Allocs {
    fn with<R>(&self, f: impl FnOnce(&mut AllocMap) -> R) -> R {
        // A panic while the map was held cannot have left it half-changed (every change is one
        // insert or remove): go on with it.
        f(&mut self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// A live buffer overlapping `[start, end)`, if any.
    pub(crate) fn overlapping(&self, start: u64, end: u64) -> Option<VaRange> {
        self.in_range(start, end).first().map(|(r, _)| *r)
    }

    /// Every live buffer overlapping `[start, end)`, in address order, with its holds.
    pub(crate) fn in_range(&self, start: u64, end: u64) -> Vec<(VaRange, Arc<Holds>)> {
        self.with(|m| {
            // Buffers never overlap: only the last one starting before `start` can reach into it.
            let first = m.range(..=start).next_back().map_or(start, |(&s, _)| s);
            m.range(first..end)
                .filter(|(&s, (len, _))| s + len > start)
                .map(|(&s, (len, h))| (VaRange::new(s, *len), Arc::clone(h)))
                .collect()
        })
    }

    /// Whether every byte of `[start, end)` lies in live buffers.
    pub(crate) fn covers(&self, start: u64, end: u64) -> bool {
        self.covering(start, end).is_some()
    }

    /// The live buffers of `[start, end)` ([`Allocs::in_range`]) if they hold every byte of it.
    pub(crate) fn covering(&self, start: u64, end: u64) -> Option<Vec<(VaRange, Arc<Holds>)>> {
        let bufs = self.in_range(start, end);
        let mut cur = start;
        for (r, _) in &bufs {
            if r.start > cur {
                return None;
            }
            cur = cur.max(r.end());
        }
        (cur >= end).then_some(bufs)
    }
}

/// Who uses a buffer now, so that the CPU's slices and the devices' kernels never overlap in a
/// way Rust forbids: a slice is a promise to the compiler that nothing else writes the memory
/// while it lives (and, for a `&mut` slice, that nothing else reads it). A kernel that writes the
/// buffer waits for no slice (its launch is refused while one lives: [`Error::InUse`]); a slice
/// asked for while such a kernel runs waits for the kernel to end. Kernels are counted until
/// they end, not until their [`Launch`] is dropped or forgotten.
#[derive(Debug, Default)]
pub(crate) struct Holds(Mutex<HoldState>);

#[derive(Debug, Default)]
pub(crate) struct HoldState {
    /// Live [`BufRef`]s.
    readers: usize,
    /// Whether a [`BufMut`] lives.
    writer: bool,
    /// Kernels that used the buffer and may still run, and whether they may write it.
    kernels: Vec<(Running, bool)>,
}

impl Holds {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HoldState> {
        // Every change is one counter or one list edit: a panic cannot leave it half made.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The lock if no other thread holds it (a launch or `DontNeed` checking the buffer).
    fn try_lock(&self) -> Option<MutexGuard<'_, HoldState>> {
        match self.0.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Takes a CPU slice's count (`write`: the `&mut` one), once the kernels it must not overlap
    /// have ended (any kernel for `write`, else those that may write), waiting at most `wait`.
    fn claim_cpu(&self, wait: Duration, write: bool) -> std::result::Result<(), ()> {
        let claim = |st: &mut HoldState| if write { st.writer = true } else { st.readers += 1 };
        self.after_kernels(Instant::now() + wait, |writes| write || writes, claim)
    }

    /// Waits, until `deadline`, for the running kernels that `conflicts` names to end; then
    /// runs `then` on the state, under its lock. `Err(())` when one still runs at the deadline,
    /// or at once when the calling thread runs it. With `deadline` now (the `try_` forms), the
    /// lock itself is not waited for either: another thread holding it is checking a launch.
    fn after_kernels<R>(
        &self,
        deadline: Instant,
        conflicts: impl Fn(bool) -> bool,
        then: impl FnOnce(&mut HoldState) -> R,
    ) -> std::result::Result<R, ()> {
        loop {
            let mut st = if Instant::now() >= deadline { self.try_lock().ok_or(())? } else { self.lock() };
            st.kernels.retain(|(k, _)| !k.is_done());
            let Some(k) = st.kernels.iter().find(|(_, w)| conflicts(*w)).map(|(k, _)| k.clone()) else {
                return Ok(then(&mut st));
            };
            drop(st);
            let now = Instant::now();
            // A kernel asking for a slice of a buffer it writes itself would wait for itself.
            if now >= deadline || k.is_current() {
                return Err(());
            }
            // The kernel's own result is its launch's to report; here only its end counts.
            let _ = k.wait(deadline - now);
        }
    }
}

impl HoldState {
    /// Refuses a kernel that would `write` (or only read) the buffer, or a `DontNeed` of it (a
    /// write), while the CPU holds a slice that forbids it.
    pub(crate) fn admit(&self, buffer: VaRange, write: bool) -> Result<()> {
        if self.writer || (write && self.readers > 0) {
            return Err(Error::InUse { buffer, by: "a CPU slice of it is alive" });
        }
        Ok(())
    }

    /// Counts a kernel that uses the buffer until it ends.
    pub(crate) fn add_kernel(&mut self, k: Running, write: bool) {
        self.kernels.retain(|(k, _)| !k.is_done());
        self.kernels.push((k, write));
    }
}

/// `count` values of `T` in shared memory. CPU accesses go through plain slices; when the data
/// sits on a device, the access faults and hetmm brings it back transparently. Dropping the
/// buffer frees it everywhere.
///
/// A slice from [`as_slice`](Self::as_slice) or [`as_mut_slice`](Self::as_mut_slice) is plain
/// memory to the compiler, which may assume nothing else changes it while the slice lives (nor,
/// for a `&mut` slice, reads it). hetmm keeps that promise at run time, as `RefCell` does for a
/// cell, and against kernels whether their [`Launch`] is waited for, dropped or forgotten:
/// - a launch that would write the buffer while a slice of it lives (or read it while a `&mut`
///   one does) is refused, and so is a [`DontNeed`](crate::Advice::DontNeed) over it while
///   either lives ([`Error::InUse`]);
/// - a slice asked for while a kernel that may write the buffer runs (for `&mut`, any kernel
///   that uses it) waits for the kernel to end, as CUDA synchronizes before the CPU touches
///   managed memory; the `try_` forms return [`Error::InUse`] instead;
/// - a kernel launched through the safe API touches only the memory its uses declare
///   ([`DeviceError::Undeclared`](hetmm_core::device::DeviceError::Undeclared) otherwise), and
///   dropping the buffer waits for the kernels that use it before its memory goes.
///
/// Memory reached otherwise (registered memory, raw uses, unbounded kernels) goes through the
/// `unsafe` entry points, whose contracts say what the caller keeps.
///
/// The program may move the buffer's memory, or part of it, with `mremap` (as any mapping it
/// can address; no slice may be alive then, and [`ptr`](Self::ptr) and the slices keep naming
/// the old address, which the buffer no longer holds): the data goes with it, device copies
/// included, and stays shared memory at the new address, the program's own mapping from then on,
/// like memory it registered (its `munmap` ends it; [`Hetmm::unregister`](crate::Hetmm::unregister)
/// gives it back as private memory). Growing the memory in place, or while moving it, adds fresh
/// private memory the program owns. Dropping the buffer frees what is still at its address, and
/// leaves alone whatever the program mapped where the moved part was.
#[derive(Debug)]
pub struct SharedBuf<T> {
    space: Arc<AddressSpace>,
    region: Arc<HostRegion>,
    count: usize,
    allocs: Allocs,
    holds: Arc<Holds>,
    _t: PhantomData<T>,
}

impl<T: bytemuck::Pod> SharedBuf<T> {
    pub(crate) fn new(
        space: Arc<AddressSpace>,
        region: Arc<HostRegion>,
        count: usize,
        allocs: &Allocs,
    ) -> Result<Self> {
        let range = space.add_region(Arc::clone(&region) as Arc<dyn CpuMmu>, Prot::READ | Prot::WRITE)?;
        let holds = Arc::new(Holds::default());
        allocs.with(|m| m.insert(range.start, (range.len, Arc::clone(&holds))));
        Ok(SharedBuf { space, region, count, allocs: allocs.clone(), holds, _t: PhantomData })
    }

    /// The values, read by the CPU. Waits first for the kernels still running that may write
    /// the buffer (as CUDA synchronizes before the CPU touches managed memory). While the slice
    /// lives, launches that would write the buffer and `DontNeed` advice over it are refused
    /// ([`Error::InUse`]).
    ///
    /// # Panics
    ///
    /// If such a kernel is still running after [`Launch::DEFAULT_TIMEOUT`]. Use
    /// [`try_as_slice`](Self::try_as_slice) not to wait.
    pub fn as_slice(&self) -> BufRef<'_, T> {
        self.slice_within(Launch::DEFAULT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`as_slice`](Self::as_slice) without waiting: [`Error::InUse`] while a kernel that may
    /// write the buffer runs.
    pub fn try_as_slice(&self) -> Result<BufRef<'_, T>> {
        self.slice_within(Duration::ZERO)
    }

    fn slice_within(&self, wait: Duration) -> Result<BufRef<'_, T>> {
        self.holds.claim_cpu(wait, false).map_err(|()| self.in_use("a kernel that may write it is running"))?;
        // SAFETY: the app view (page aligned, >= `count * size_of::<T>()` bytes) is mapped while
        // `self.region` lives, device pages fault back on access, and T is Pod (any bytes valid).
        // Nothing else writes it while the slice lives: kernels that may write it have ended,
        // and the count just taken refuses new ones and `DontNeed` until the slice is dropped;
        // `&self` rules out a `&mut` slice.
        let slice = unsafe { std::slice::from_raw_parts(self.region.app_ptr().cast::<T>(), self.count) };
        Ok(BufRef { slice, holds: &self.holds })
    }

    /// The values, written by the CPU. Waits first for every kernel still running that uses the
    /// buffer; while the slice lives, launches that use the buffer and `DontNeed` advice over it
    /// are refused ([`Error::InUse`]).
    ///
    /// # Panics
    ///
    /// If such a kernel is still running after [`Launch::DEFAULT_TIMEOUT`]. Use
    /// [`try_as_mut_slice`](Self::try_as_mut_slice) not to wait.
    pub fn as_mut_slice(&mut self) -> BufMut<'_, T> {
        self.mut_slice_within(Launch::DEFAULT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`as_mut_slice`](Self::as_mut_slice) without waiting: [`Error::InUse`] while a kernel
    /// that uses the buffer runs.
    pub fn try_as_mut_slice(&mut self) -> Result<BufMut<'_, T>> {
        self.mut_slice_within(Duration::ZERO)
    }

    fn mut_slice_within(&mut self, wait: Duration) -> Result<BufMut<'_, T>> {
        self.holds.claim_cpu(wait, true).map_err(|()| self.in_use("a kernel that uses it is running"))?;
        // SAFETY: as in `slice_within`; no kernel that uses the buffer runs, and the flag just
        // set refuses new ones and `DontNeed` until the slice is dropped; `&mut self` makes this
        // the only CPU slice of the buffer.
        let slice = unsafe { std::slice::from_raw_parts_mut(self.region.app_ptr().cast::<T>(), self.count) };
        Ok(BufMut { slice, holds: &self.holds })
    }
}

/// The CPU's view of a [`SharedBuf`] (a `&[T]` through `Deref`), from
/// [`SharedBuf::as_slice`]: while it lives, no kernel may write the buffer.
#[derive(Debug)]
pub struct BufRef<'a, T> {
    slice: &'a [T],
    holds: &'a Holds,
}

impl<T> Deref for BufRef<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.slice
    }
}

impl<T> Drop for BufRef<'_, T> {
    fn drop(&mut self) {
        self.holds.lock().readers -= 1;
    }
}

/// The CPU's writable view of a [`SharedBuf`] (a `&mut [T]` through `DerefMut`), from
/// [`SharedBuf::as_mut_slice`]: while it lives, no kernel may use the buffer.
#[derive(Debug)]
pub struct BufMut<'a, T> {
    slice: &'a mut [T],
    holds: &'a Holds,
}

impl<T> Deref for BufMut<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.slice
    }
}

impl<T> DerefMut for BufMut<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.slice
    }
}

/// Both views compare with slices, vectors and arrays as the slices they are.
macro_rules! slice_eq {
    ($guard:ident) => {
        impl<T: PartialEq<U>, U> PartialEq<[U]> for $guard<'_, T> {
            fn eq(&self, other: &[U]) -> bool {
                **self == *other
            }
        }
        impl<T: PartialEq<U>, U> PartialEq<&[U]> for $guard<'_, T> {
            fn eq(&self, other: &&[U]) -> bool {
                **self == **other
            }
        }
        impl<T: PartialEq<U>, U> PartialEq<Vec<U>> for $guard<'_, T> {
            fn eq(&self, other: &Vec<U>) -> bool {
                **self == other[..]
            }
        }
        impl<T: PartialEq<U>, U, const N: usize> PartialEq<[U; N]> for $guard<'_, T> {
            fn eq(&self, other: &[U; N]) -> bool {
                **self == other[..]
            }
        }
        impl<T> AsRef<[T]> for $guard<'_, T> {
            fn as_ref(&self) -> &[T] {
                self
            }
        }
    };
}
slice_eq!(BufRef);
slice_eq!(BufMut);

impl<T> Drop for BufMut<'_, T> {
    fn drop(&mut self) {
        self.holds.lock().writer = false;
    }
}

impl<T> SharedBuf<T> {
    /// The address: valid on the CPU and on every attached device.
    pub fn ptr(&self) -> u64 {
        self.region.app_ptr() as u64
    }
    /// Number of values.
    pub fn len(&self) -> usize {
        self.count
    }
    /// Whether the buffer holds no values (never true: empty allocations are refused).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// Bytes of the values.
    pub fn byte_len(&self) -> u64 {
        (self.count * std::mem::size_of::<T>()) as u64
    }

    fn in_use(&self, by: &'static str) -> Error {
        Error::InUse { buffer: VaRange::new(self.ptr(), self.byte_len()), by }
    }
}

impl<T> Drop for SharedBuf<T> {
    fn drop(&mut self) {
        self.allocs.with(|m| m.remove(&self.ptr()));
        // A kernel still running on the buffer would go on writing its addresses once they are
        // free for other memory (perhaps another buffer a slice is alive over): the memory goes
        // only after the kernels that used it end. One still running after the longest wait keeps
        // the memory, leaked, rather than let it write someone else's.
        let deadline = Instant::now() + Launch::DEFAULT_TIMEOUT;
        if self.holds.after_kernels(deadline, |_| true, |_| ()).is_err() {
            log::error!(
                "shared buffer at {:#x}: a kernel using it is still running after {:?}; its memory is leaked",
                self.ptr(),
                Launch::DEFAULT_TIMEOUT
            );
            return;
        }
        // The program's `munmap`s and `mremap`s that returned before this drop are applied first:
        // a part of the view moved away is a region of another CPU side only once its move is
        // applied. Before, the view's region still covers it, and removing that region would free
        // the moved memory's data (device copies included), leaving the move's event nothing to
        // move: the memory would be registered but unknown to the core (a touch got SIGBUS).
        // Bounded (it gives up after 10 s, logged); what is listed below is then as of now.
        if let Err(e) = self.space.settle() {
            if !matches!(e, hetmm_core::error::CoreError::ForkedAway) {
                log::error!("freeing shared buffer at {:#x}: {e}", self.ptr());
            }
        }
        // `protect` of part of the buffer split its region: every piece goes (each lies inside
        // the buffer's own mapping). Parts the program moved away with `mremap` (or unmapped)
        // are not the buffer's any more: what it moved stays managed where it went, as the
        // program's own mapping (see `HostRegion`), and is not freed here.
        let range = VaRange::new(self.ptr(), self.region.len());
        let starts: Vec<u64> =
            self.space.regions_of(range, &*self.region as &dyn CpuMmu).iter().map(|p| p.start).collect();
        for start in starts {
            match self.space.remove_region(start) {
                // A fork child's copy of the parent's buffer: the memory is the child's own copy
                // (see `hetmm_core::fork`); the region stays the parent's.
                Ok(_) | Err(hetmm_core::error::CoreError::ForkedAway) => {}
                Err(e) => log::error!("freeing shared buffer at {start:#x}: {e}"),
            }
        }
    }
}
