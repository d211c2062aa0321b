//! hetmm: one virtual address space for the CPU and every attached accelerator.
//!
//! ```no_run
//! use hetmm::{Hetmm, kernels, sim::{SimConfig, SimDevice}, Use};
//! # fn main() -> Result<(), hetmm::Error> {
//! let hm = Hetmm::new()?;
//! let dev = hm.attach(SimDevice::new(SimConfig::default())?)?;
//! let mut a = hm.alloc::<f32>(1 << 20)?;
//! let mut b = hm.alloc::<f32>(1 << 20)?;
//! a.as_mut_slice().fill(1.0); // plain CPU stores through a plain pointer
//! b.as_mut_slice().fill(1.0);
//! let (grid, k) = kernels::saxpy(2.0, a.ptr(), b.ptr(), a.len());
//! dev.launch(grid, &[Use::read(&a), Use::write(&b)], k)?.wait()?; // the device faults pages in
//! assert_eq!(b.as_slice()[0], 3.0); // the CPU access migrates the data back
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod kernels;
mod memory;
mod place;
mod space;

use std::sync::{Arc, Weak};
use std::time::Duration;

pub use hetmm_core as core;
pub use hetmm_core::types::parse_size;
pub use hetmm_core::{types::Access, types::Proc, AddressSpace, CoreConfig, Pending, Policy};
pub use hetmm_cuda as cuda;
pub use hetmm_host as host;
pub use hetmm_sim as sim;

use hetmm_core::cpu::CpuFaultHandler;
use hetmm_core::device::{DeviceError, DeviceMmu};
use hetmm_core::error::CoreError;
use hetmm_core::snapshot::SnapEntry;
use hetmm_core::stats::StatsSnapshot;
use hetmm_core::types::{align_down, align_up, DeviceId, Prot, VaRange, BLOCK_SIZE, PAGE_SIZE};
use hetmm_host::fork::ForkError;
use hetmm_host::probe::ProbeError;
use hetmm_host::{Host, HostInitError, RegionError};
use hetmm_sim::{Grid, SimDevice};

pub use memory::{BufMut, BufRef, SharedBuf};
pub use place::{Advice, Place};
pub use space::Space;

/// How many times [`Hetmm::alloc`] makes a new view when the core refuses it as overlapping old
/// memory whose move or unmap by another thread is not applied yet.
const ALLOC_TRIES: u32 = 8;

/// Errors of the hetmm API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The core refused or failed an operation.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The CPU side (userfaultfd, its threads) could not be set up.
    #[error("host: {0}")]
    HostInit(#[from] HostInitError),
    /// Host memory could not be created, registered or given back (the facts are inside).
    #[error("host memory: {0}")]
    Region(#[from] RegionError),
    /// The fork handlers could not be installed.
    #[error(transparent)]
    Fork(#[from] ForkError),
    /// A measurement of the host's limits (`hetmm bench`) failed.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// A device reported an error (a kernel fault, a timeout).
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// `count` elements of `size` bytes do not fit in the address space.
    #[error("allocation of {count} elements of {size} bytes overflows")]
    SizeOverflow {
        /// Elements requested.
        count: usize,
        /// Bytes per element.
        size: usize,
    },
    /// The simulated device could not be created.
    #[error("simulated device: {0}")]
    Sim(#[from] hetmm_sim::SimError),
    /// No policy has this name.
    #[error("unknown policy {0:?} (known: hetmm, uvm)")]
    UnknownPolicy(String),
    /// Zero-length allocation.
    #[error("empty allocation")]
    EmptyAlloc,
    /// A type aligned beyond what a buffer's memory is (2 MiB): its slices would be misaligned.
    #[error("values aligned to {align} bytes: buffers are aligned to {max}")]
    OverAligned {
        /// The type's alignment.
        align: usize,
        /// A buffer's alignment.
        max: usize,
    },
    /// Memory so large that hetmm's state for its pages (made up front, about 1% of the size)
    /// would take more than half of this machine's memory: refused, rather than ending in the
    /// OOM killer.
    #[error("{bytes} bytes of shared memory need {state} bytes of page state, over half of this machine's {memory}")]
    TooLarge {
        /// Bytes asked for.
        bytes: u64,
        /// Bytes of page state they would need.
        state: u64,
        /// This machine's memory (`MemTotal`).
        memory: u64,
    },
    /// Advice that only a device can take named the CPU.
    #[error("{what} takes a device, not the CPU")]
    NotADevice {
        /// The advice.
        what: &'static str,
    },
    /// The CUDA backend refused or failed (no GPU, a kernel call, a driver error).
    #[error(transparent)]
    Cuda(#[from] hetmm_cuda::CudaError),
    /// The buffer is in use in a way the operation would break: a launch that would write it, or
    /// a `DontNeed` of it, while a CPU slice of it is alive; a slice asked for without waiting
    /// while a kernel that may write it runs.
    #[error("buffer {buffer} is in use: {by}")]
    InUse {
        /// The buffer.
        buffer: VaRange,
        /// What holds it.
        by: &'static str,
    },
    /// The safe entry points change memory (a `DontNeed`, a GPU launch) only inside buffers
    /// from [`Hetmm::alloc`], whose CPU slices they can check: registered memory, which the
    /// program reaches through its own references, needs the `unsafe` entry points.
    #[error("{range} is not all in buffers from Hetmm::alloc: {what} there needs the unchecked entry point")]
    NotBuffers {
        /// The range asked for.
        range: VaRange,
        /// The operation.
        what: &'static str,
    },
    /// `unregister` named memory of a buffer from [`Hetmm::alloc`]: only registered memory can
    /// be unregistered (a buffer is freed by dropping it).
    #[error("{range} overlaps the buffer {buffer} from Hetmm::alloc: only registered memory can be unregistered")]
    Allocated {
        /// The range asked for, rounded out to pages.
        range: VaRange,
        /// The allocated buffer it overlaps.
        buffer: VaRange,
    },
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One address space shared by the CPU and the devices attached to it.
///
/// `fork()`: a child gets a private copy, as of the fork, of the private memory this address
/// space manages (data held only by a device included), and shares the shared memory (see
/// [`hetmm_core::fork`]). In the child the copy is ordinary memory; this `Hetmm` and its devices
/// stay with the parent, and every call on them there fails with [`CoreError::ForkedAway`]. A
/// child that wants devices makes its own `Hetmm` and registers the memory. The parent is not
/// disturbed.
#[derive(Debug)]
pub struct Hetmm {
    space: Arc<AddressSpace>,
    host: Arc<Host>,
    /// The live buffers from [`Hetmm::alloc`] (start to length), which `unregister` refuses: the
    /// core cannot tell them from registered memory.
    allocs: memory::Allocs,
    /// Held (shared) by `alloc` from the new buffer's region to its entry in `allocs`, and
    /// (exclusive) by `unregister` from its check of `allocs` to the release: an `alloc` on
    /// another thread landing in the range (in memory the program unmapped there) is either
    /// listed, and refused, or made after the release, and untouched by it.
    allocating: std::sync::RwLock<()>,
}

impl Hetmm {
    /// An address space with the default configuration.
    pub fn new() -> Result<Self> {
        Self::with_config(CoreConfig::default())
    }

    /// An address space with the given configuration.
    pub fn with_config(config: CoreConfig) -> Result<Self> {
        let space = AddressSpace::new(config);
        let weak: Weak<dyn CpuFaultHandler> = Arc::downgrade(&space) as Weak<dyn CpuFaultHandler>;
        let host = Host::new(weak)?;
        hetmm_host::fork::track(&space, &host)?;
        Ok(Hetmm { space, host, allocs: memory::Allocs::default(), allocating: std::sync::RwLock::new(()) })
    }

    /// The core address space's calls that change no memory: page state, statistics, spans,
    /// eviction of a device's data home ([`Space`]).
    pub fn space(&self) -> Space<'_> {
        Space(&self.space)
    }

    /// The core address space, all of it.
    ///
    /// # Safety
    ///
    /// Its calls do not see the buffers' slices or the kernels using them. None may change
    /// memory a live [`BufRef`] or [`BufMut`] covers, or a running kernel uses: no
    /// `advise(DontNeed)` there (see [`Hetmm::advise_unchecked`]), and no `unmap_range`,
    /// `release_range`, `remap_range`, `protect_range`, `discard_cpu_range` or
    /// `apply_cpu_event` of a range the program did not change in the OS itself.
    pub unsafe fn space_unchecked(&self) -> &Arc<AddressSpace> {
        &self.space
    }

    /// Whether kernel-mode accesses (`read(2)` into device-resident memory) are served.
    pub fn kernel_faults_supported(&self) -> bool {
        self.host.kernel_faults_supported()
    }

    /// Attaches a device.
    pub fn attach<D: DeviceMmu + Clone>(&self, dev: D) -> Result<Device<D>> {
        self.attach_with(dev, hetmm_core::AttachOptions::default())
    }

    /// Attaches a simulated device using its configured fault batch size.
    pub fn attach_sim(&self, dev: SimDevice) -> Result<Device<SimDevice>> {
        let opts = hetmm_core::AttachOptions { fault_batch: dev.config().fault_batch };
        self.attach_with(dev, opts)
    }

    fn attach_with<D: DeviceMmu + Clone>(&self, dev: D, opts: hetmm_core::AttachOptions) -> Result<Device<D>> {
        let mmu: Arc<dyn DeviceMmu> = Arc::new(dev.clone());
        // The device's threads take no asynchronous signals (see `hetmm_host::signals`).
        let id = hetmm_host::signals::blocked_while(|| self.space.attach(Arc::clone(&mmu), opts))?;
        let (space, allocs) = (Arc::clone(&self.space), self.allocs.clone());
        // Read at once: no other call has the new id yet, so it names the device just attached.
        let attachment = self.space.attachment_of(id, &mmu).ok_or(CoreError::Detached(id))?;
        Ok(Device { id, attachment, dev, mmu, space, allocs, prepare: Default::default() })
    }

    /// Detaches a device: its data comes back to the CPU; later use of the handle fails.
    pub fn detach<D>(&self, dev: &Device<D>) -> Result<()> {
        Ok(self.space.detach(self.own(dev)?)?)
    }

    /// Allocates shared memory for `count` values of `T`, zero-initialised, valid on the CPU and
    /// every device at the same address.
    pub fn alloc<T: bytemuck::Pod>(&self, count: usize) -> Result<SharedBuf<T>> {
        let size = std::mem::size_of::<T>();
        let bytes = count.checked_mul(size).ok_or(Error::SizeOverflow { count, size })?;
        if bytes == 0 {
            return Err(Error::EmptyAlloc);
        }
        // The view is 2 MiB aligned: a slice of a type aligned beyond that would not be (found
        // by an audit: safe code got a misaligned `&[T]`).
        let align = std::mem::align_of::<T>();
        if align as u64 > BLOCK_SIZE {
            return Err(Error::OverAligned { align, max: BLOCK_SIZE as usize });
        }
        // Within a page of the top of the address space there is no room: overflow, not a panic.
        let len = (bytes as u64).checked_next_multiple_of(PAGE_SIZE).ok_or(Error::SizeOverflow { count, size })?;
        within_memory(len, false)?;
        // The kernel may hand the new view addresses that the program's `munmap` or `mremap` of
        // managed memory just left. Until that change's event is applied, the core still has the
        // old memory there and refuses the new region as overlapping it, and the host must not
        // apply the event to the new view (it would forget the view, or follow it away): so the
        // changes that returned before this call are applied first, and the host follows the new
        // view only once the core holds it (by then the event is applied). A change another
        // thread makes meanwhile may still leave an old region where the view lands: tried again,
        // a few times, each once what was read of such changes is applied.
        let mut tries = 0;
        loop {
            self.space.settle()?;
            let region = Host::create_region_unlisted(&self.host, len)?;
            // Guards no data: a panic while it was held left nothing half made.
            let listing = self.allocating.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let made = SharedBuf::new(Arc::clone(&self.space), Arc::clone(&region), count, &self.allocs);
            drop(listing);
            match made {
                Err(Error::Core(CoreError::Overlap(_))) if tries < ALLOC_TRIES => {
                    tries += 1;
                    // Dropping the region gives its view back (unregistered first: no event).
                    drop(region);
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(buf) => {
                    self.host.list_region(&region);
                    return Ok(buf);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// An address space running the policy called `name` (`hetmm` or `uvm`).
    pub fn with_policy(name: &str) -> Result<Self> {
        let cfg = CoreConfig::with_policy(name).ok_or_else(|| Error::UnknownPolicy(name.to_string()))?;
        Self::with_config(cfg)
    }

    /// Gives a hint about `[start, start + len)` (see [`Advice`]); a prefetch completes in the
    /// background: wait on the returned [`Pending`].
    ///
    /// [`Advice::DontNeed`] changes what the memory reads (zeros), so it is taken only over
    /// buffers from [`Hetmm::alloc`] none of whose CPU slices is alive ([`Error::InUse`]; no slice
    /// can be taken until it is done); elsewhere it is refused ([`Error::NotBuffers`]): registered
    /// memory needs [`Hetmm::advise_unchecked`]. Every other advice keeps the bytes as they are.
    pub fn advise(&self, start: u64, len: u64, advice: Advice) -> Result<Pending> {
        let Some(end) = start.checked_add(len).filter(|_| matches!(advice, Advice::DontNeed)) else {
            // SAFETY: this advice keeps every byte as it is (an overflowing range is refused).
            return unsafe { self.advise_unchecked(start, len, advice) };
        };
        let Some(held) = self.allocs.covering(start, end) else {
            return Err(Error::NotBuffers { range: VaRange::new(start, len), what: "DontNeed" });
        };
        // Settled first: the slices' locks are held only across the change itself.
        self.space.settle()?;
        let states: Vec<_> = held.iter().map(|(_, h)| h.lock()).collect();
        for ((buffer, _), st) in held.iter().zip(&states) {
            st.admit(*buffer, true)?;
        }
        // The range lies in buffers none of whose slices is alive, and none can be taken while
        // `states` is held, until the memory reads zeros.
        Ok(self.space.advise(start, len, advice.checked(&self.space)?)?)
    }

    /// [`Hetmm::advise`] without its checks, over any shared memory.
    ///
    /// # Safety
    ///
    /// For [`Advice::DontNeed`], which makes the memory read zeros: no reference to any of it
    /// may be alive (a slice of a buffer, or the program's own references to memory it
    /// registered), as the compiler may assume such memory does not change.
    pub unsafe fn advise_unchecked(&self, start: u64, len: u64, advice: Advice) -> Result<Pending> {
        // As `migrate`: a munmap or mremap the program made just before is applied first, so
        // the advice meets the memory as the program sees it.
        self.space.settle()?;
        // Checked after the settle: a place from a detached device's handle is refused.
        let advice = advice.checked(&self.space)?;
        // A prefetch's worker thread takes no asynchronous signals (see `hetmm_host::signals`).
        Ok(hetmm_host::signals::blocked_while(|| self.space.advise(start, len, advice))?)
    }

    /// [`Hetmm::advise`] over a whole buffer.
    pub fn advise_buf<T>(&self, buf: &SharedBuf<T>, advice: Advice) -> Result<Pending> {
        let len = buf.byte_len().div_ceil(PAGE_SIZE) * PAGE_SIZE;
        self.advise(buf.ptr(), len, advice)
    }

    /// Moves `[start, start + len)` to `to` in bulk (an explicit prefetch). The range may span
    /// several adjacent shared regions. A place from a handle of a device detached since is
    /// refused ([`CoreError::Detached`]), whatever device has its id now.
    pub fn migrate(&self, start: u64, len: u64, to: impl Into<Place>) -> Result<()> {
        self.space.settle()?;
        let to = to.into().checked(&self.space)?;
        Ok(self.space.migrate_span(start, len, to)?)
    }

    /// Makes memory the program already has shared with every device, at the same address and
    /// with the same bytes: `[ptr, ptr + len)` rounded out to whole pages, which must all be
    /// mapped. Private memory (malloc, anonymous or private file mappings) becomes migratable
    /// shared memory; `MAP_SHARED` memory (files, shared anonymous) is mirrored: devices map its
    /// host pages remotely and their writes land in the file. Returns the page range covered.
    ///
    /// The program must not write the range while `register` runs (reads wait for it), nor
    /// register one range from two threads at once. Memory already shared is refused
    /// ([`CoreError::Overlap`]) and left as it is, and so is private memory with a page the
    /// program could not read either (a file mapping past the end of its file). So is a range
    /// with a hole, one mixing private and shared mappings, and shared memory over more than one
    /// mapping ([`RegionError::NotMapped`], [`RegionError::MixedSharing`],
    /// [`RegionError::SharedSpansMappings`]).
    ///
    /// Private memory becomes a shared mapping of hetmm's own, which does not keep what the
    /// kernel attached to the old mapping: `mlock`, `MADV_WIPEONFORK`/`MADV_DONTFORK` (a fork
    /// child gets its own copy of the bytes, see the README on fork) and `MAP_GROWSDOWN` are
    /// gone, also after [`Hetmm::unregister`]. Telling them apart would mean reading
    /// `/proc/self/smaps`, which walks the page tables of every mapping of the process.
    ///
    /// Register page-aligned memory (an `mmap`, or an allocation of whole pages). A range that
    /// starts or ends mid-page takes the rest of that page with it, and on the heap that may
    /// hold other data, hetmm's own included: `register` hangs if hetmm's own state lies there
    /// (its first access after the memory changes hands faults while hetmm holds the lock that
    /// serves the fault; seen once in CI with a 3 MiB `Vec`), and so may a later migration of
    /// such a page. Not yet refused or handled.
    pub fn register(&self, ptr: *const u8, len: usize) -> Result<VaRange> {
        self.space.settle()?;
        let (start, end) = page_span(ptr, len)?;
        within_memory(end - start, true)?;
        if end > start && self.space.any_shared(VaRange::new(start, end - start)) {
            return Err(CoreError::Overlap(VaRange::new(start, end - start)).into());
        }
        // From the host's adoption of the memory until the core knows it, a fork would leave the
        // child sharing it with this process.
        let _no_fork = self.space.hold_forks()?;
        let reg = self.host.register(ptr as u64, len as u64)?;
        for (k, &(part, prot)) in reg.parts.iter().enumerate() {
            if let Err(e) = self.space.add_registered(Arc::clone(&reg.cpu), part, prot, reg.remote) {
                // Undo only what this call did: its own parts, then its adoption or mirror.
                for &(done, _) in &reg.parts[..k] {
                    let _ = self.space.release_range(done.start, done.len);
                }
                let _ = self.host.unregister(reg.range.start, reg.range.len);
                return Err(e.into());
            }
        }
        Ok(reg.range)
    }

    /// Stops sharing `[ptr, ptr + len)` (rounded out to pages): every page comes back to host
    /// memory, devices lose their mappings, and private memory becomes ordinary private
    /// anonymous memory again holding the current bytes.
    pub fn unregister(&self, ptr: *const u8, len: usize) -> Result<()> {
        let (start, end) = page_span(ptr, len)?;
        self.space.settle()?;
        // No buffer is made meanwhile: one landing in the range would be released with it.
        let _no_alloc = self.allocating.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Releasing an allocated buffer's pages would leave them registered with userfaultfd
        // but unknown to the core: the next CPU access would be refused (SIGBUS).
        if let Some(buffer) = self.allocs.overlapping(start, end) {
            return Err(Error::Allocated { range: VaRange::new(start, end - start), buffer });
        }
        // From the core's release of the memory until the host has given it back, it is still
        // the manager's shared mapping: a fork in between would leave the child sharing it with
        // this process (as in `register`).
        let _no_fork = self.space.hold_forks()?;
        // The CPU sides of regions released whole hold the host's record of the registration
        // (it keeps only weak references): keep them until the host has given the memory back.
        let released = self.space.release_range_parts(start, end.saturating_sub(start))?;
        let r = self.host.unregister(start, end - start).map_err(Error::from);
        if r.is_err() {
            // The host left the memory as it was, registered (see `Host::unregister`): the core
            // takes it back, so it stays shared memory serving its faults (released, the next
            // access to a page not mapped got SIGBUS), and the call may be made again. The
            // range's advice is gone.
            for p in &released {
                // Unmapped by the CPU first (`AddressSpace::take_back`): the core records it so.
                if let Err(e) = self.space.take_back(p) {
                    log::error!("taking {} back after a failed unregister: {e}", p.range);
                }
            }
        }
        drop(released);
        r
    }

    /// Changes the protection of shared memory `[start, start + len)` on the CPU and on every
    /// device together. A device write to memory without `WRITE` fails with
    /// [`FaultCancel::Protection`](hetmm_core::device::FaultCancel::Protection).
    ///
    /// As with `mprotect(2)`, `start` must be page aligned and `len` is rounded up to a whole
    /// page, so a buffer's own length ([`SharedBuf::byte_len`]) may be passed.
    ///
    /// As with `mprotect(2)` too, the CPU's own accesses obey the new protection: writing a
    /// buffer made read-only (through [`SharedBuf::as_mut_slice`], say), or reading one made
    /// inaccessible, kills the process with SIGSEGV. Give the buffer its protection back first.
    pub fn protect(&self, start: u64, len: u64, prot: Prot) -> Result<()> {
        self.space.settle()?;
        // A length within a page of the top of the address space stays as it is (and is refused).
        let len = len.checked_next_multiple_of(PAGE_SIZE).unwrap_or(len);
        Ok(self.space.protect_range(start, len, prot)?)
    }

    /// One entry per page of `[start, start + len)` as `dev` sees it (like HMM's SNAPSHOT).
    pub fn snapshot<D>(&self, start: u64, len: u64, dev: &Device<D>) -> Result<Vec<SnapEntry>> {
        let id = self.own(dev)?;
        self.space.settle()?;
        Ok(self.space.snapshot(start, len, id)?)
    }

    /// Gives `dev` exclusive access to `[start, start + len)` for atomics; any CPU access
    /// revokes it (see [`hetmm_core::exclusive`]).
    pub fn make_exclusive<D>(&self, start: u64, len: u64, dev: &Device<D>) -> Result<()> {
        let id = self.own(dev)?;
        self.space.settle()?;
        Ok(self.space.make_exclusive(start, len, id)?)
    }

    /// Whether `dev` still has exclusive access to every page of the range.
    pub fn check_exclusive<D>(&self, start: u64, len: u64, dev: &Device<D>) -> Result<bool> {
        let id = self.own(dev)?;
        self.space.settle()?;
        Ok(self.space.check_exclusive(start, len, id)?)
    }

    /// The id of `dev` in this address space; `Detached` where it names no device here any
    /// more (it was detached, and the id may be another device's now) or is another `Hetmm`'s.
    fn own<D>(&self, dev: &Device<D>) -> Result<DeviceId> {
        if !Arc::ptr_eq(&dev.space, &self.space) {
            return Err(CoreError::Detached(dev.id).into());
        }
        dev.check_same()?;
        Ok(dev.id)
    }

    /// Counters. Each is added by the thread that did the work. A CPU fault and its pages are
    /// counted before the faulting thread is let go; its time (`ns_cpu_fault`) just after, so
    /// read at once after an access, that may not include the access's fault yet.
    pub fn stats(&self) -> StatsSnapshot {
        self.space.stats()
    }
}

impl Drop for Hetmm {
    fn drop(&mut self) {
        // Memory the program registered and did not unregister goes back to being its own, as
        // `unregister` gives it: left the manager's shared mapping, unmanaged, private memory
        // stayed shared with every fork child for the rest of the process. (Buffers from `alloc`
        // still alive stay managed; see `SharedBuf`.)
        for r in self.space.region_ranges() {
            if self.allocs.overlapping(r.start, r.end()).is_some() {
                continue;
            }
            if let Err(e) = self.unregister(r.start as *const u8, r.len as usize) {
                log::warn!("giving back registered memory {r} as the manager is dropped: {e}");
            }
        }
        // Then detach every device: kernels waiting on faults fail instead of hanging.
        self.space.shutdown();
    }
}

/// How a kernel uses a buffer: validated before launch and, for devices that cannot fault, made
/// resident before the kernel starts. A use of a buffer borrows it (it cannot outlive the buffer
/// and name memory mapped there later); its fields are read-only, so that only
/// [`Use::raw`], `unsafe`, names other memory.
///
/// ```compile_fail
/// # use hetmm::{Access, Use};
/// // Safe code cannot make up a use of memory it holds references to.
/// let u = Use { start: 0x1000, len: 8, access: Access::Write };
/// ```
///
/// ```compile_fail
/// # use hetmm::{Hetmm, Use, sim::{Grid, SimConfig, SimDevice}};
/// # fn main() -> Result<(), hetmm::Error> {
/// # let hm = Hetmm::new()?;
/// # let dev = hm.attach_sim(SimDevice::new(SimConfig::default())?)?;
/// let buf = hm.alloc::<u64>(512)?;
/// let u = Use::write(&buf);
/// drop(buf); // the use borrows the buffer: it cannot name the freed memory later
/// dev.launch(Grid::new(1, 1), &[u], |_: &hetmm::sim::BlockCtx| Ok(()))?.wait()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Use<'a> {
    start: u64,
    len: u64,
    access: Access,
    /// Whether the range is a buffer's from [`Use::read`] or [`Use::write`] (checked to lie in
    /// live buffers at launch), not the caller's word ([`Use::raw`]).
    checked: bool,
    _buf: std::marker::PhantomData<&'a ()>,
}

impl<'a> Use<'a> {
    /// The kernel reads `buf`.
    pub fn read<T>(buf: &'a SharedBuf<T>) -> Self {
        Self::of(buf, Access::Read)
    }
    /// The kernel writes (and may read) `buf`.
    pub fn write<T>(buf: &'a SharedBuf<T>) -> Self {
        Self::of(buf, Access::Write)
    }
    fn of<T>(buf: &'a SharedBuf<T>, access: Access) -> Self {
        Use { start: buf.ptr(), len: buf.byte_len(), access, checked: true, _buf: std::marker::PhantomData }
    }
    /// Start of the byte range.
    pub fn start(&self) -> u64 {
        self.start
    }
    /// Length of the byte range.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the range is empty (such a use is refused at launch).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// What the kernel does there.
    pub fn access(&self) -> Access {
        self.access
    }
    /// A raw range. The kernel may touch exactly these bytes (page-aligned outward before the
    /// launch's checks); where they lie in buffers from [`Hetmm::alloc`], the launch checks their
    /// slices as for [`Use::read`] and [`Use::write`].
    ///
    /// # Safety
    ///
    /// Outside such buffers (memory the program registered): while the kernel runs, no reference
    /// to memory it may write may be alive, nor a `&mut` to memory it reads, as the compiler may
    /// assume such memory does not change (or is not read).
    pub unsafe fn raw(start: u64, len: u64, access: Access) -> Self {
        Use { start, len, access, checked: false, _buf: std::marker::PhantomData }
    }

    /// Whether the kernel may change the bytes.
    fn writes(&self) -> bool {
        matches!(self.access, Access::Write | Access::Atomic)
    }
}

/// A device attached to an address space.
#[derive(Debug)]
pub struct Device<D> {
    id: DeviceId,
    /// The attachment's number, which, unlike the id, no later device gets: what
    /// [`Device::proc`] names it by.
    attachment: u64,
    dev: D,
    /// The driver as the address space holds it: the id is given to the next device attached
    /// once this one is detached, and this tells them apart.
    mmu: Arc<dyn DeviceMmu>,
    space: Arc<AddressSpace>,
    allocs: memory::Allocs,
    /// Held by a launch on a device that cannot fault from its first migration until its kernel
    /// is launched: two launches getting ready at once each held what they had migrated, each
    /// waited for the other's memory, and one (or both) failed though each fit the device.
    prepare: std::sync::Mutex<()>,
}

impl<D> Device<D> {
    /// Fails with `Detached` once the id names another device (this one was detached).
    fn check_same(&self) -> Result<()> {
        if self.space.is_attached_as(self.id, &self.mmu) {
            Ok(())
        } else {
            Err(CoreError::Detached(self.id).into())
        }
    }

    /// The device's id in the address space.
    pub fn id(&self) -> DeviceId {
        self.id
    }
    /// The device as a place to move data to or advise about ([`Hetmm::migrate`],
    /// [`Advice`]). It names this attachment: once the device is detached the calls refuse it
    /// ([`CoreError::Detached`]), even where a device attached since has its id.
    pub fn proc(&self) -> Place {
        Place::attached(self.id, self.attachment)
    }
    /// The driver. Its calls do not see the buffers' slices: its launches are `unsafe`, under
    /// contracts of their own, and so is letting the device go behind the address space's back:
    ///
    /// ```compile_fail
    /// # use hetmm::core::device::DeviceMmu;
    /// # fn f(dev: &hetmm::Device<hetmm::sim::SimDevice>) {
    /// dev.driver().destroy_page_table(); // attached again, its memory would be managed twice
    /// # }
    /// ```
    pub fn driver(&self) -> &D {
        &self.dev
    }

    /// Checks that the device is attached and every use names shared memory, and marks the
    /// page-aligned ranges as used by a job (end it with `AddressSpace::job_end`) and as being
    /// got ready for a launch (until the returned [`Preparing`] is dropped, once the kernel is
    /// launched). On a device that cannot fault, the ranges are then migrated to it: the launch
    /// mark comes first, so eviction (which never takes such blocks from such a device) cannot
    /// undo one use's migration while the next is migrated.
    fn begin_job(&self, uses: &[Use<'_>]) -> Result<(hetmm_core::space::JobToken, Preparing<'_>)> {
        // userfaultfd lets munmap/mremap/madvise return as soon as their event is read, before
        // hetmm has dropped the device mappings of the old addresses: a kernel launched after
        // such a call must not start until the event is applied, or it could read through a
        // device mapping of what used to be at its addresses.
        self.space.settle()?;
        self.check_same()?;
        let caps = self.space.device_caps(self.id)?;
        let mut out = Vec::with_capacity(uses.len());
        for u in uses {
            if u.len == 0 {
                return Err(CoreError::Empty { start: u.start }.into());
            }
            // Rounding the end up to a page can itself overflow (a use ending in the last page).
            let (start, end) = u
                .start
                .checked_add(u.len)
                .and_then(|e| align_up(e, PAGE_SIZE))
                .map(|e| (align_down(u.start, PAGE_SIZE), e))
                .ok_or(CoreError::Overflow { start: u.start, len: u.len })?;
            // One range per region: part of a buffer may have been given other protection.
            out.extend(self.space.span_parts(start, end - start)?);
        }
        // One launch at a time gets ready on a device that cannot fault (see `prepare`).
        let serial =
            (!caps.replayable_faults).then(|| self.prepare.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let job = self.space.job_begin(&out);
        let preparing = Preparing::new(&self.space, job.ranges(), serial);
        if !caps.replayable_faults {
            // Still this device after the migrations, which name it by id: one detached
            // meanwhile gave its id to the next device attached (found by a review).
            let moved = out.iter().try_for_each(|r| self.space.migrate(r.start, r.len, Proc::Device(self.id)));
            if let Err(e) = moved.map_err(Error::from).and_then(|()| self.check_same()) {
                drop(preparing);
                self.space.job_end(&job);
                return Err(e);
            }
        }
        Ok((job, preparing))
    }
}

impl<D> Device<D> {
    /// Starts a kernel with `go` once `uses` are checked and ready: a buffer's use must still
    /// lie in live buffers ([`Error::NotBuffers`]); the buffers the uses reach into must have no
    /// CPU slice the kernel would break ([`Error::InUse`]), and count the kernel until it ends
    /// (their slices wait for it; see `memory::Holds`). Their holds are locked only from that
    /// check until the kernel is counted (so no slice is taken in between), not across the
    /// slow part before it (settling events, a GPU's migrations), which changes no bytes.
    ///
    /// `go` returns the running kernel and what must outlive the locks: the driver's own handle,
    /// whose drop may drop the kernel's closure and whatever it captured (a buffer's last `Arc`,
    /// whose drop takes its holds' lock), so it goes only once every lock is let go.
    fn start(&self, uses: &[Use<'_>], go: impl FnOnce() -> Result<(Running, Keep)>) -> Result<Launch> {
        let (job, preparing) = self.begin_job(uses)?;
        let r = self.start_held(uses, go);
        drop(preparing);
        match r {
            Ok((k, keep)) => {
                drop(keep);
                Ok(Launch { inner: Some(k), job: Some(job), space: Arc::clone(&self.space) })
            }
            Err(e) => {
                self.space.job_end(&job);
                Err(e)
            }
        }
    }

    /// [`start`](Self::start)'s checks of the buffers' slices, the launch, and its count. A
    /// buffer's use is checked to lie in live buffers here, under their locks: a buffer dropped
    /// on another thread meanwhile is either gone from the list (refused) or waits, in its drop,
    /// for the kernel counted here.
    fn start_held(&self, uses: &[Use<'_>], go: impl FnOnce() -> Result<(Running, Keep)>) -> Result<(Running, Keep)> {
        let mut held: Vec<(VaRange, Arc<memory::Holds>, bool)> = Vec::new();
        for u in uses {
            for (buffer, h) in self.allocs.in_range(u.start, u.start.saturating_add(u.len)) {
                match held.iter_mut().find(|(_, o, _)| Arc::ptr_eq(o, &h)) {
                    Some(e) => e.2 |= u.writes(),
                    None => held.push((buffer, h, u.writes())),
                }
            }
        }
        // Always in address order: two launches never wait on each other's holds.
        held.sort_by_key(|(b, _, _)| b.start);
        let mut states: Vec<_> = held.iter().map(|(_, h, _)| h.lock()).collect();
        for u in uses.iter().filter(|u| u.checked) {
            if !self.allocs.covers(u.start, u.start.saturating_add(u.len)) {
                return Err(Error::NotBuffers { range: VaRange::new(u.start, u.len), what: "a launch" });
            }
        }
        for ((buffer, _, write), st) in held.iter().zip(&states) {
            st.admit(*buffer, *write)?;
        }
        let (k, keep) = go()?;
        for ((_, _, write), st) in held.iter().zip(states.iter_mut()) {
            st.add_kernel(k.clone(), *write);
        }
        Ok((k, keep))
    }
}

/// A launch getting its buffers ready ([`AddressSpace::launch_prepare`]): ended
/// ([`AddressSpace::launch_ready`]) when dropped, on the same thread, whatever happens
/// meanwhile. A panic in between must not leave the blocks held: other threads would wait
/// for them on every migration that needs their memory.
#[derive(Debug)]
struct Preparing<'a> {
    space: Arc<AddressSpace>,
    ranges: Vec<VaRange>,
    /// The device's preparation lock where it cannot fault: let go after `launch_ready`.
    _serial: Option<std::sync::MutexGuard<'a, ()>>,
}

impl<'a> Preparing<'a> {
    fn new(space: &Arc<AddressSpace>, ranges: &[VaRange], serial: Option<std::sync::MutexGuard<'a, ()>>) -> Self {
        space.launch_prepare(ranges);
        Preparing { space: Arc::clone(space), ranges: ranges.to_vec(), _serial: serial }
    }
}

impl Drop for Preparing<'_> {
    fn drop(&mut self) {
        self.space.launch_ready(&self.ranges);
    }
}

impl Device<SimDevice> {
    /// Launches `kernel` over `grid`. `uses` lists the shared memory it touches, checked now
    /// (each must be shared memory, and no CPU slice may be alive over a buffer the kernel
    /// writes, nor a `&mut` one over a buffer it reads: [`Error::InUse`]). The kernel may touch
    /// only those bytes, and write only those of write uses: any other access fails it with
    /// [`DeviceError::Undeclared`]. The device faults the pages in on demand.
    pub fn launch<F>(&self, grid: Grid, uses: &[Use<'_>], kernel: F) -> Result<Launch>
    where
        F: Fn(&hetmm_sim::BlockCtx) -> Result<(), DeviceError> + Send + Sync + 'static,
    {
        let mut bounds = hetmm_sim::Bounds::new();
        for u in uses {
            bounds.allow(u.start, u.len, u.writes());
        }
        self.start(uses, || {
            // SAFETY: the kernel can reach only `bounds`, the uses' bytes, and `start` launches
            // only with the buffers' counts taken for them (refusing those under a slice that
            // conflicts), or with the caller's word for unchecked ones (`Use::raw`'s contract).
            let l = unsafe { self.dev.launch_within(grid, Some(bounds), kernel) };
            l.map(|l| (Running::Sim(l.done()), Keep::Sim(l))).map_err(Error::from)
        })
    }

    /// [`launch`](Self::launch) of a kernel that may touch any shared memory, as through a
    /// pointer it reads (the whole promise of shared virtual memory): `uses` are checked as
    /// for `launch` and marked as the job's, but bound nothing.
    ///
    /// # Safety
    ///
    /// While the kernel runs, no reference may be alive to memory it writes outside `uses`
    /// (a slice of a buffer, or the program's own references to memory it registered), nor a
    /// `&mut` to memory it reads there.
    pub unsafe fn launch_unbounded<F>(&self, grid: Grid, uses: &[Use<'_>], kernel: F) -> Result<Launch>
    where
        F: Fn(&hetmm_sim::BlockCtx) -> Result<(), DeviceError> + Send + Sync + 'static,
    {
        self.start(uses, || {
            // SAFETY: `uses` as in `launch`; the rest of memory by the caller's word (this
            // function's contract).
            let l = unsafe { self.dev.launch_within(grid, None, kernel) };
            l.map(|l| (Running::Sim(l.done()), Keep::Sim(l))).map_err(Error::from)
        })
    }
}

impl Device<hetmm_cuda::CudaDevice> {
    /// Launches one of hetmm's CUDA kernels. A GPU cannot fault memory in, so the buffers the
    /// call names are migrated to the GPU first (whole 2 MiB blocks), and the launch is refused
    /// if they are not all resident then (their total exceeds the GPU memory hetmm manages:
    /// launch in pieces). Pointers are translated to device addresses. The buffers must lie in
    /// buffers from [`Hetmm::alloc`] ([`Error::NotBuffers`]; registered memory needs
    /// [`launch_unchecked`](Self::launch_unchecked)), checked as for the simulated device's
    /// launch ([`Error::InUse`]).
    pub fn launch(&self, call: &hetmm_cuda::KernelCall) -> Result<Launch> {
        // Checked uses: `start` refuses any not in live buffers, under the buffers' locks.
        self.launch_call(call, true)
    }

    /// [`launch`](Self::launch) over any shared memory, registered memory included.
    ///
    /// # Safety
    ///
    /// As for [`Use::raw`]: while the kernel runs, no reference may be alive to memory outside
    /// buffers from [`Hetmm::alloc`] that the call writes, nor a `&mut` to such memory it reads.
    pub unsafe fn launch_unchecked(&self, call: &hetmm_cuda::KernelCall) -> Result<Launch> {
        self.launch_call(call, false)
    }

    /// The launch of `call`, its buffers `checked` to lie in live buffers or not (the caller's
    /// word, `launch_unchecked`'s contract).
    fn launch_call(&self, call: &hetmm_cuda::KernelCall, checked: bool) -> Result<Launch> {
        // Compiled before any buffer's lock is taken (the first time, NVRTC takes seconds).
        self.dev.compile_kernels()?;
        let uses: Vec<Use<'_>> = call
            .buffers()
            .iter()
            .map(|(b, u)| {
                let access = if *u == hetmm_cuda::BufUse::Write { Access::Write } else { Access::Read };
                Use { start: b.ptr, len: b.bytes, access, checked, _buf: std::marker::PhantomData }
            })
            .collect();
        self.start(&uses, || {
            // SAFETY: `start` launches only with the buffers' counts taken for the call's uses
            // (refusing those under a slice that conflicts), or with the caller's word for
            // unchecked ones (`launch_unchecked`'s contract, `Use::raw`'s).
            let l = unsafe { self.dev.launch(call) };
            l.map(|l| (Running::Cuda(l), Keep::Nothing)).map_err(Error::from)
        })
    }
}

impl<T> From<&SharedBuf<T>> for hetmm_cuda::Buf {
    fn from(b: &SharedBuf<T>) -> Self {
        hetmm_cuda::Buf { ptr: b.ptr(), bytes: b.byte_len() }
    }
}

/// The machine's memory in bytes (`MemTotal` of /proc/meminfo), if it can be read.
pub fn memory_total() -> Option<u64> {
    hetmm_sim::machine_memory()
}

/// Refuses `len` bytes of shared memory whose state, made up front, would take over half of the
/// machine's memory ([`Error::TooLarge`]): a header per 2 MiB block, and with `pages` the state
/// of every page too (registered memory, every page of which holds data; a buffer's page state
/// is made as its pages are first used). An audit saw 648 MiB for 64 GiB never touched when a
/// buffer's page state was made up front; a few TiB would end in the OOM killer.
fn within_memory(len: u64, pages: bool) -> Result<()> {
    let Some(memory) = memory_total() else { return Ok(()) };
    let page_state =
        if pages { BLOCK_SIZE / PAGE_SIZE * std::mem::size_of::<hetmm_core::block::Page>() as u64 } else { 0 };
    let per_block = std::mem::size_of::<hetmm_core::block::Block>() as u64 + page_state;
    let state = len.div_ceil(BLOCK_SIZE).saturating_mul(per_block);
    if state > memory / 2 {
        return Err(Error::TooLarge { bytes: len, state, memory });
    }
    Ok(())
}

/// `[ptr, ptr + len)` rounded out to whole pages, as `(start, end)`.
fn page_span(ptr: *const u8, len: usize) -> Result<(u64, u64)> {
    let (start, len) = (ptr as u64, len as u64);
    // Rounded out, no bytes would still be a page.
    if len == 0 {
        return Err(CoreError::Empty { start }.into());
    }
    let end = start.checked_add(len).and_then(|e| align_up(e, PAGE_SIZE)).ok_or(CoreError::Overflow { start, len })?;
    Ok((align_down(start, PAGE_SIZE), end))
}

/// A running kernel (a job: the memory it named becomes the first eviction candidate once it
/// ends), on the simulated device or a GPU.
#[derive(Debug)]
pub struct Launch {
    /// Taken by the waits.
    inner: Option<Running>,
    job: Option<hetmm_core::space::JobToken>,
    space: Arc<AddressSpace>,
}

/// What a launch keeps until its buffers' locks are let go (see `Device::start`).
#[derive(Debug)]
enum Keep {
    /// The simulated device's handle, which holds the kernel's closure.
    Sim(#[allow(dead_code)] hetmm_sim::Launch),
    /// Nothing.
    Nothing,
}

/// A kernel that may still be running: held by its [`Launch`], and by the buffers it uses until
/// it ends (clones wait on the same kernel).
#[derive(Debug, Clone)]
pub(crate) enum Running {
    /// The launch's end only: holding it keeps no closure (nor what it captured) alive, so a
    /// buffer's list of kernels makes no cycle with a kernel that captured the buffer, and
    /// dropping an entry runs no code of the program's.
    Sim(hetmm_sim::Done),
    Cuda(hetmm_cuda::CudaLaunch),
}

impl Running {
    /// Waits at most `timeout` for the kernel; its result.
    pub(crate) fn wait(&self, timeout: Duration) -> Result<(), DeviceError> {
        match self {
            Running::Sim(l) => l.wait(timeout),
            Running::Cuda(l) => l.wait(timeout),
        }
    }

    /// Whether the kernel has ended (an error included).
    pub(crate) fn is_done(&self) -> bool {
        match self {
            Running::Sim(l) => l.is_done(),
            Running::Cuda(l) => l.is_done(),
        }
    }

    /// Whether the calling thread runs this kernel (waiting for it there would wait for itself).
    pub(crate) fn is_current(&self) -> bool {
        match self {
            Running::Sim(l) => l.is_current(),
            Running::Cuda(_) => false,
        }
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            self.space.job_end(&job);
        }
    }
}

impl Launch {
    /// The longest [`Launch::wait`] waits.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

    /// Waits for the kernel (bounded by [`Launch::DEFAULT_TIMEOUT`]).
    pub fn wait(mut self) -> Result<()> {
        self.wait_timeout(Self::DEFAULT_TIMEOUT)
    }

    /// Waits at most `timeout`. After a timeout the kernel still runs, and its job with it: the
    /// launch can be waited for again (it ended the job at once, dropped, and the kernel's
    /// memory became the first to evict while the kernel used it).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<()> {
        let wait = |inner: &Option<Running>, t: Duration| inner.as_ref().map(|k| k.wait(t));
        let Some(mut r) = wait(&self.inner, timeout) else { return Ok(()) };
        // A timeout from a kernel that is over is the kernel's own result (its fault wait gave
        // up), or it ended just after the wait did: either way the kernel's result, taken again,
        // is final. Taken for a wait that expired, the launch kept its job and every later wait
        // said Timeout again (found by an audit).
        if matches!(r, Err(hetmm_core::device::DeviceError::Timeout(_))) {
            if !self.is_done() {
                return Ok(r?);
            }
            r = wait(&self.inner, Duration::ZERO).unwrap_or(Ok(()));
        }
        // The kernel is over: so is its job.
        self.inner = None;
        if let Some(job) = self.job.take() {
            self.space.job_end(&job);
        }
        Ok(r?)
    }

    /// Whether the kernel has finished.
    pub fn is_done(&self) -> bool {
        self.inner.as_ref().is_none_or(Running::is_done)
    }
}

/// A range for display.
pub fn range_of<T>(buf: &SharedBuf<T>) -> VaRange {
    VaRange::new(buf.ptr(), buf.byte_len())
}
