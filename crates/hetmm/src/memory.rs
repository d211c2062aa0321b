//! Shared buffers: memory valid on the CPU and on every device at the same address. This module
//! holds the facade's only unsafe code, turning a region's application view into slices.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use hetmm_core::cpu::CpuMmu;
use hetmm_core::types::{Prot, VaRange};
use hetmm_core::AddressSpace;
use hetmm_host::HostRegion;

use crate::Result;

/// The ranges of the live buffers of one `Hetmm` (start to length), shared with the buffers,
/// which take themselves out when dropped.
#[derive(Debug, Default, Clone)]
pub(crate) struct Allocs(Arc<Mutex<BTreeMap<u64, u64>>>);

impl Allocs {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<u64, u64>) -> R) -> R {
        // A panic while the map was held cannot have left it half-changed (every change is one
        // insert or remove): go on with it.
        f(&mut self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// A live buffer overlapping `[start, end)`, if any.
    pub(crate) fn overlapping(&self, start: u64, end: u64) -> Option<VaRange> {
        self.with(|m| {
            let (&s, &len) = m.range(..end).next_back()?;
            (s + len > start).then(|| VaRange::new(s, len))
        })
    }
}

/// `count` values of `T` in shared memory. CPU accesses go through plain slices; when the data
/// sits on a device, the access faults and hetmm brings it back transparently. Dropping the
/// buffer frees it everywhere.
///
/// A slice from [`as_slice`](Self::as_slice) or [`as_mut_slice`](Self::as_mut_slice) is plain
/// memory to the compiler, which may assume nothing else changes it while the slice lives. So
/// hold none across a kernel that writes the buffer, or across an
/// [`Advice::DontNeed`](crate::Advice::DontNeed) of it (which makes it read zeros): take it
/// before the launch or advice, or after the job's `wait`, as CUDA asks of managed memory a
/// running kernel uses. This is the caller's part, not checked: kernels and advice receive
/// addresses, not borrows of the buffers (an audit showed an optimized build reading a value
/// a `DontNeed` had already zeroed through a slice held across it).
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
        allocs.with(|m| m.insert(range.start, range.len));
        Ok(SharedBuf { space, region, count, allocs: allocs.clone(), _t: PhantomData })
    }

    /// The values, read by the CPU.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: the app view (page aligned, >= `count * size_of::<T>()` bytes) is mapped while
        // `self.region` lives, device pages fault back on access, and T is Pod (any bytes valid).
        unsafe { std::slice::from_raw_parts(self.region.app_ptr().cast::<T>(), self.count) }
    }

    /// The values, written by the CPU.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only CPU slice of the buffer.
        unsafe { std::slice::from_raw_parts_mut(self.region.app_ptr().cast::<T>(), self.count) }
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
}

impl<T> Drop for SharedBuf<T> {
    fn drop(&mut self) {
        self.allocs.with(|m| m.remove(&self.ptr()));
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
