//! The raw CUDA driver calls, behind safe owner types. This is the crate's only unsafe code.
//!
//! `cudarc` loads `libcuda` at run time; every function of `cudarc::driver::sys` panics if the
//! library is absent, so nothing here calls into `sys` before [`probe`] has checked that it is
//! present and that `cuInit` found a device ([`Gpu::open`] does). Every call binds the context
//! to the calling thread first: the core calls the device from any thread.
//!
//! Owners (all release their resource on drop):
//! - [`Gpu`]: the device's primary context.
//! - [`VaReservation`]: a range of device virtual addresses (`cuMemAddressReserve`).
//! - [`PhysChunk`]: one physical allocation (`cuMemCreate`).
//! - [`HostRegistration`]: host pages pinned for DMA (`cuMemHostRegister`).
//! - [`DeviceAlloc`], [`ManagedAlloc`], [`PinnedHost`]: the baselines' allocations
//!   (`cuMemAlloc`, `cuMemAllocManaged`, `cuMemAllocHost`).
//! - Streams and events are cudarc's [`CudaStream`] and [`CudaEvent`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use hetmm_core::device::DeviceError;

use crate::kernels::{Dims, Value};
use crate::plan::Access;
use crate::CudaError;

/// Turns a driver status into a result naming the call.
fn check(r: CUresult, call: &'static str) -> Result<(), CudaError> {
    match r {
        CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(CudaError::Driver { call, code: format!("{e:?}") }),
    }
}

fn driver_err(call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CudaError {
    move |e| CudaError::Driver { call, code: format!("{:?}", e.0) }
}

/// Whether the loaded driver library exports `name`. Only called once a [`Gpu`] exists, so the
/// library is present ([`probe`]).
fn driver_exports(name: &std::ffi::CStr) -> bool {
    // SAFETY: `culib` returns the driver library cudarc loaded (present: a `Gpu` was opened);
    // looking a symbol up runs none of its code, and the symbol is not called here.
    unsafe { sys::culib().get::<unsafe extern "C" fn()>(name.to_bytes_with_nul()).is_ok() }
}

/// Why CUDA cannot be used here, or the number of devices.
pub fn probe() -> Result<usize, CudaError> {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library by its usual names; it
    // does not call into it.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "the CUDA driver library (libcuda.so) is not installed on this machine".into(),
        ));
    }
    // `device_count` runs cuInit first: it fails on a machine with the library but no GPU.
    let n = CudaContext::device_count().map_err(|e| {
        CudaError::Unavailable(format!("the CUDA driver found no usable GPU (cuInit/cuDeviceGetCount: {:?})", e.0))
    })?;
    if n <= 0 {
        return Err(CudaError::Unavailable("the CUDA driver reports no GPU".into()));
    }
    Ok(n as usize)
}

/// Whether the NVRTC library (run-time compiler) can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// One GPU: its primary context.
#[derive(Debug)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
}

impl Gpu {
    /// Opens GPU `ordinal` (after [`probe`]).
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>, CudaError> {
        let n = probe()?;
        if ordinal >= n {
            return Err(CudaError::Unavailable(format!("GPU {ordinal} asked for, {n} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err("cuDevicePrimaryCtxRetain"))?;
        Ok(Arc::new(Gpu { ctx }))
    }

    /// The cudarc context.
    pub fn ctx(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Makes the context current on this thread.
    pub fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(driver_err("cuCtxSetCurrent"))
    }

    /// The device's name.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    /// Free and total device memory in bytes.
    pub fn mem_info(&self) -> Result<(u64, u64), CudaError> {
        let (f, t) = self.ctx.mem_get_info().map_err(driver_err("cuMemGetInfo"))?;
        Ok((f as u64, t as u64))
    }

    /// A new non-blocking stream.
    pub fn stream(&self) -> Result<Arc<CudaStream>, CudaError> {
        self.ctx.new_stream().map_err(driver_err("cuStreamCreate"))
    }

    /// Waits for all work on the GPU, at most `limit`; fails with
    /// [`DeviceError::Timeout`](hetmm_core::device::DeviceError::Timeout) when a kernel or copy is
    /// still running then.
    ///
    /// `cuCtxSynchronize` itself cannot be given a time limit and no event covers every stream of
    /// a context, so it runs on a thread of its own that this one waits for; after a time-out
    /// that thread stays blocked in the driver until the work ends (a hung GPU costs a thread,
    /// not the caller).
    pub fn synchronize_within(&self, limit: Duration) -> Result<(), CudaError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let ctx = Arc::clone(&self.ctx);
        std::thread::Builder::new()
            .name("hetmm-cuda-sync".into())
            .spawn(move || {
                let _ = tx.send(ctx.synchronize());
            })
            .map_err(|e| CudaError::Driver { call: "cuCtxSynchronize", code: format!("no thread to wait on: {e}") })?;
        match rx.recv_timeout(limit) {
            Ok(r) => r.map_err(driver_err("cuCtxSynchronize")),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(CudaError::Device(DeviceError::Timeout(limit))),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(CudaError::Driver {
                call: "cuCtxSynchronize",
                code: "the waiting thread ended without an answer".into(),
            }),
        }
    }

    fn device(&self) -> sys::CUdevice {
        self.ctx.cu_device()
    }

    fn location(&self) -> sys::CUmemLocation {
        sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: self.device() }
    }

    fn alloc_prop(&self) -> sys::CUmemAllocationProp {
        sys::CUmemAllocationProp {
            type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
            requestedHandleTypes: sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
            location: self.location(),
            win32HandleMetaData: std::ptr::null_mut(),
            allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
                compressionType: 0,
                gpuDirectRDMACapable: 0,
                usage: 0,
                reserved: [0; 4],
            },
        }
    }

    /// The minimum mapping granularity of `cuMemCreate` allocations.
    pub fn granularity(&self) -> Result<u64, CudaError> {
        self.bind()?;
        let prop = self.alloc_prop();
        let mut g = 0usize;
        // SAFETY: `g` and `prop` are valid for the call; the context is current.
        let r = unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut g,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        };
        check(r, "cuMemGetAllocationGranularity")?;
        Ok(g as u64)
    }

    /// Sets the device's access to `[dev_va, dev_va + len)`, which must be mapped in `res`.
    pub fn set_access(&self, res: &VaReservation, dev_va: u64, len: u64, access: Access) -> Result<(), CudaError> {
        res.check(dev_va, len)?;
        self.bind()?;
        let flags = match access {
            Access::Read => sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READ,
            Access::ReadWrite => sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        let desc = sys::CUmemAccessDesc { location: self.location(), flags };
        // SAFETY: the range lies inside a reservation we own; `desc` is one valid descriptor.
        check(unsafe { sys::cuMemSetAccess(dev_va, len as usize, &desc, 1) }, "cuMemSetAccess")
    }

    /// Maps the whole of `chunk` at `dev_va` inside `res`.
    pub fn map(&self, res: &VaReservation, dev_va: u64, chunk: &PhysChunk) -> Result<(), CudaError> {
        res.check(dev_va, chunk.size)?;
        self.bind()?;
        // SAFETY: the range lies in a reservation we own; `chunk.handle` is a live allocation of
        // exactly `chunk.size` bytes. Mapping it at device addresses touches no host memory.
        check(unsafe { sys::cuMemMap(dev_va, chunk.size as usize, 0, chunk.handle, 0) }, "cuMemMap")
    }

    /// Unmaps `[dev_va, dev_va + len)` inside `res` (one whole earlier mapping).
    pub fn unmap(&self, res: &VaReservation, dev_va: u64, len: u64) -> Result<(), CudaError> {
        res.check(dev_va, len)?;
        self.bind()?;
        // SAFETY: the range lies in a reservation we own; unmapping device addresses touches no
        // host memory (a kernel still using them faults on the device; callers wait for kernels).
        check(unsafe { sys::cuMemUnmap(dev_va, len as usize) }, "cuMemUnmap")
    }

    /// Starts `func` on `stream` with marshalled arguments.
    ///
    /// # Safety
    ///
    /// `args` must match the kernel's parameter list, and every device address the kernel
    /// reaches through them must be mapped device (or managed) memory for the kernel's whole
    /// run, not accessed by the host meanwhile (hetmm's own kernels through a `KernelCall`
    /// only touch the buffers it names).
    pub unsafe fn launch(
        &self,
        stream: &CudaStream,
        func: &CudaFunction,
        dims: Dims,
        args: &[Value],
    ) -> Result<(), CudaError> {
        let mut b = stream.launch_builder(func);
        for a in args {
            match a {
                Value::F32(v) => b.arg(v),
                Value::U64(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig { grid_dim: dims.grid, block_dim: dims.block, shared_mem_bytes: 0 };
        // SAFETY: the caller guarantees the arguments match and every address is mapped.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(driver_err("cuLaunchKernel"))
    }
}

/// A range of device virtual addresses, freed on drop (everything in it must be unmapped by
/// then).
#[derive(Debug)]
pub struct VaReservation {
    gpu: Arc<Gpu>,
    base: u64,
    len: u64,
}

impl VaReservation {
    /// Reserves `len` bytes aligned to `align`, asking for `hint` as the start (the driver may
    /// give another address).
    pub fn new(gpu: &Arc<Gpu>, len: u64, align: u64, hint: u64) -> Result<Self, CudaError> {
        gpu.bind()?;
        let reserve = |hint: u64| {
            let mut base: sys::CUdeviceptr = 0;
            // SAFETY: `base` is a valid out-pointer; a hint is only a request.
            let r = unsafe { sys::cuMemAddressReserve(&mut base, len as usize, align as usize, hint, 0) };
            check(r, "cuMemAddressReserve").map(|()| base)
        };
        // The driver documents the hint as a request, but a hint it cannot honour (the address
        // is the host view's, already in use under unified addressing) may also be refused
        // outright: then let it choose.
        let base = match reserve(hint) {
            Err(e) if hint != 0 => {
                log::debug!("cuda: reserving at {hint:#x} failed ({e}); letting the driver choose");
                reserve(0)?
            }
            r => r?,
        };
        Ok(VaReservation { gpu: Arc::clone(gpu), base, len })
    }

    /// First address.
    pub fn base(&self) -> u64 {
        self.base
    }

    fn check(&self, dev_va: u64, len: u64) -> Result<(), CudaError> {
        let ok = dev_va >= self.base && dev_va.checked_add(len).is_some_and(|e| e <= self.base + self.len);
        if ok {
            Ok(())
        } else {
            Err(CudaError::Config(format!(
                "device range {dev_va:#x}+{len:#x} is outside reservation {:#x}+{:#x}",
                self.base, self.len
            )))
        }
    }
}

impl Drop for VaReservation {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: we reserved exactly this range; its mappings were removed by the owner.
            let r = unsafe { sys::cuMemAddressFree(self.base, self.len as usize) };
            if let Err(e) = check(r, "cuMemAddressFree") {
                log::warn!("cuda: freeing reservation {:#x}+{:#x}: {e}", self.base, self.len);
            }
        }
    }
}

/// One physical allocation of device memory, released on drop (the driver frees it once its
/// last mapping is gone too).
#[derive(Debug)]
pub struct PhysChunk {
    gpu: Arc<Gpu>,
    handle: sys::CUmemGenericAllocationHandle,
    size: u64,
}

impl PhysChunk {
    /// Creates `size` bytes (a multiple of the granularity) on the GPU.
    pub fn new(gpu: &Arc<Gpu>, size: u64) -> Result<Self, CudaError> {
        gpu.bind()?;
        let prop = gpu.alloc_prop();
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: `handle` and `prop` are valid for the call.
        let r = unsafe { sys::cuMemCreate(&mut handle, size as usize, &prop, 0) };
        check(r, "cuMemCreate")?;
        Ok(PhysChunk { gpu: Arc::clone(gpu), handle, size })
    }
}

impl Drop for PhysChunk {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: we own the handle and release it once.
            let r = unsafe { sys::cuMemRelease(self.handle) };
            if let Err(e) = check(r, "cuMemRelease") {
                log::warn!("cuda: releasing a chunk: {e}");
            }
        }
    }
}

/// Host memory registered (pinned) for DMA; unregistered on drop. (Punching a hole in the file
/// behind it while registered would leave the pinned pages orphaned: copies would miss the new
/// pages. hetmm's core never discards registered regions.)
#[derive(Debug)]
pub struct HostRegistration {
    gpu: Arc<Gpu>,
    ptr: usize,
}

impl HostRegistration {
    /// Pins `[ptr, ptr + len)`.
    ///
    /// # Safety
    ///
    /// The range must be mapped host memory that stays mapped until the registration is
    /// dropped.
    pub unsafe fn new(gpu: &Arc<Gpu>, ptr: usize, len: u64) -> Result<Self, CudaError> {
        gpu.bind()?;
        // SAFETY: the caller guarantees the range is mapped for the registration's life.
        let r = unsafe {
            sys::cuMemHostRegister_v2(ptr as *mut std::ffi::c_void, len as usize, sys::CU_MEMHOSTREGISTER_PORTABLE)
        };
        check(r, "cuMemHostRegister")?;
        Ok(HostRegistration { gpu: Arc::clone(gpu), ptr })
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: we registered exactly this pointer.
            let r = unsafe { sys::cuMemHostUnregister(self.ptr as *mut std::ffi::c_void) };
            if let Err(e) = check(r, "cuMemHostUnregister") {
                log::warn!("cuda: unregistering host memory at {:#x}: {e}", self.ptr);
            }
        }
    }
}

/// Enqueues a host-to-device copy.
///
/// # Safety
///
/// `src` must be host memory readable for `len` bytes until the stream has passed this copy;
/// `[dst, dst + len)` must be device memory owned by the caller and not used by anyone else
/// until then.
pub unsafe fn copy_htod(gpu: &Gpu, stream: &CudaStream, dst: u64, src: usize, len: u64) -> Result<(), CudaError> {
    gpu.bind()?;
    // SAFETY: as the caller guarantees.
    let r = unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src as *const std::ffi::c_void, len as usize, stream.cu_stream()) };
    check(r, "cuMemcpyHtoDAsync")
}

/// Enqueues a device-to-host copy.
///
/// # Safety
///
/// `dst` must be host memory writable for `len` bytes, not read or written by anyone else until
/// the stream has passed this copy; `[src, src + len)` must be device memory owned by the caller.
pub unsafe fn copy_dtoh(gpu: &Gpu, stream: &CudaStream, dst: usize, src: u64, len: u64) -> Result<(), CudaError> {
    gpu.bind()?;
    // SAFETY: as the caller guarantees.
    let r = unsafe { sys::cuMemcpyDtoHAsync_v2(dst as *mut std::ffi::c_void, src, len as usize, stream.cu_stream()) };
    check(r, "cuMemcpyDtoHAsync")
}

/// Enqueues a device-to-device copy.
///
/// # Safety
///
/// Both ranges must be device memory owned by the caller (not host memory reachable through
/// unified addressing).
pub unsafe fn copy_dtod(gpu: &Gpu, stream: &CudaStream, dst: u64, src: u64, len: u64) -> Result<(), CudaError> {
    gpu.bind()?;
    // SAFETY: as the caller guarantees.
    let r = unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, len as usize, stream.cu_stream()) };
    check(r, "cuMemcpyDtoDAsync")
}

/// Enqueues zero-filling of device memory.
///
/// # Safety
///
/// `[dst, dst + len)` must be device memory owned by the caller.
pub unsafe fn zero(gpu: &Gpu, stream: &CudaStream, dst: u64, len: u64) -> Result<(), CudaError> {
    gpu.bind()?;
    // SAFETY: as the caller guarantees.
    check(unsafe { sys::cuMemsetD8Async(dst, 0, len as usize, stream.cu_stream()) }, "cuMemsetD8Async")
}

/// Records an event after the work enqueued so far on `stream`.
pub fn record(stream: &CudaStream) -> Result<CudaEvent, CudaError> {
    stream.record_event(None).map_err(driver_err("cuEventRecord"))
}

/// Waits for `events` until `deadline`, polling `cuEventQuery` (spinning briefly, then sleeping
/// in growing steps up to 50 µs: a 64 MiB batch copies in about 1.2 ms). Returns `Ok(false)`
/// when the deadline passed first.
pub fn wait_events(events: &[CudaEvent], deadline: Instant) -> Result<bool, CudaError> {
    let mut pause = Duration::from_micros(1);
    for ev in events {
        // `cuEventQuery` is documented per context: make the event's current on this thread
        // (copy completions are waited on from the core's threads).
        ev.context().bind_to_thread().map_err(driver_err("cuCtxSetCurrent"))?;
        loop {
            if ev.try_is_complete().map_err(driver_err("cuEventQuery"))? {
                break;
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            if pause < Duration::from_micros(8) {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(pause);
            }
            pause = (pause * 2).min(Duration::from_micros(50));
        }
    }
    Ok(true)
}

/// Device memory from `cuMemAlloc` (the explicit-copies baseline), freed on drop.
#[derive(Debug)]
pub struct DeviceAlloc {
    gpu: Arc<Gpu>,
    ptr: u64,
}

impl DeviceAlloc {
    /// Allocates `len` bytes.
    pub fn new(gpu: &Arc<Gpu>, len: u64) -> Result<Self, CudaError> {
        gpu.bind()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out-pointer.
        check(unsafe { sys::cuMemAlloc_v2(&mut ptr, len as usize) }, "cuMemAlloc")?;
        Ok(DeviceAlloc { gpu: Arc::clone(gpu), ptr })
    }
    /// Device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        // `cuMemFree` waits for the device's work without a limit (a kernel that timed out may
        // still read this memory): wait here, bounded, and leak the memory past the limit.
        if self.gpu.synchronize_within(DROP_WAIT).is_ok() {
            // SAFETY: allocated by cuMemAlloc, freed once, no kernel or copy running.
            let _ = check(unsafe { sys::cuMemFree_v2(self.ptr) }, "cuMemFree");
        }
    }
}

/// Managed (unified) memory from `cuMemAllocManaged` (the demand-paging baseline), freed on
/// drop.
#[derive(Debug)]
pub struct ManagedAlloc {
    gpu: Arc<Gpu>,
    ptr: u64,
    len: u64,
}

impl ManagedAlloc {
    /// Allocates `len` bytes attached globally.
    /// Fails with [`CudaError::Unavailable`] where the GPU cannot demand-page managed memory
    /// (`CONCURRENT_MANAGED_ACCESS` is 0, as on some virtual machines): the baselines that use
    /// it would measure something else.
    pub fn new(gpu: &Arc<Gpu>, len: u64) -> Result<Self, CudaError> {
        gpu.bind()?;
        let attr = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS;
        if gpu.ctx.attribute(attr).map_err(driver_err("cuDeviceGetAttribute"))? == 0 {
            return Err(CudaError::Unavailable(
                "this GPU cannot demand-page managed memory (CONCURRENT_MANAGED_ACCESS = 0)".into(),
            ));
        }
        let mut ptr: sys::CUdeviceptr = 0;
        let flags = sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL as u32;
        // SAFETY: `ptr` is a valid out-pointer.
        check(unsafe { sys::cuMemAllocManaged(&mut ptr, len as usize, flags) }, "cuMemAllocManaged")?;
        Ok(ManagedAlloc { gpu: Arc::clone(gpu), ptr, len })
    }
    /// Address (the same on host and device).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// The memory as host bytes, after waiting for all work on the device, at most `limit` (so
    /// no kernel uses it while the host does).
    pub fn host_mut(&mut self, limit: Duration) -> Result<&mut [u8], CudaError> {
        self.gpu.synchronize_within(limit)?;
        // Launching a kernel is an unsafe call whose contract forbids host use of its memory during
        // the kernel: after the synchronize above, no kernel uses it while the slice lives.
        // SAFETY: managed memory is host-accessible at `ptr` for `len` bytes while no kernel uses
        // it (see above); it lives until drop, and `&mut self` makes this the only slice.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.len as usize) })
    }
    /// Starts moving the memory to the GPU (`cuMemPrefetchAsync`).
    pub fn prefetch(&self, stream: &CudaStream) -> Result<(), CudaError> {
        // cudarc panics on a call the loaded driver does not export: a driver older than 12.2
        // lacks this one.
        if !driver_exports(c"cuMemPrefetchAsync_v2") {
            return Err(CudaError::Unavailable("the driver lacks cuMemPrefetchAsync_v2 (CUDA 12.2 or later)".into()));
        }
        self.gpu.bind()?;
        // `_v2` (CUDA 12.2 and later) takes a location; CUDA 13's headers name only this form.
        // SAFETY: the range is our managed allocation.
        let r = unsafe {
            sys::cuMemPrefetchAsync_v2(self.ptr, self.len as usize, self.gpu.location(), 0, stream.cu_stream())
        };
        check(r, "cuMemPrefetchAsync_v2")
    }
}

/// Longest a baseline allocation's drop waits for the GPU's work before freeing it; past it, the
/// allocation is leaked rather than freed under a kernel or copy that may still use it.
const DROP_WAIT: Duration = Duration::from_secs(10);

impl Drop for ManagedAlloc {
    fn drop(&mut self) {
        if self.gpu.synchronize_within(DROP_WAIT).is_ok() {
            // SAFETY: allocated by cuMemAllocManaged, freed once, no kernel running.
            let _ = check(unsafe { sys::cuMemFree_v2(self.ptr) }, "cuMemFree");
        }
    }
}

/// Page-locked host memory from `cuMemAllocHost` (raw copy baselines), freed on drop.
#[derive(Debug)]
pub struct PinnedHost {
    gpu: Arc<Gpu>,
    ptr: usize,
    len: u64,
}

impl PinnedHost {
    /// Allocates `len` bytes.
    pub fn new(gpu: &Arc<Gpu>, len: u64) -> Result<Self, CudaError> {
        gpu.bind()?;
        let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: `p` is a valid out-pointer.
        check(unsafe { sys::cuMemAllocHost_v2(&mut p, len as usize) }, "cuMemAllocHost")?;
        Ok(PinnedHost { gpu: Arc::clone(gpu), ptr: p as usize, len })
    }
    /// Host address.
    pub fn ptr(&self) -> usize {
        self.ptr
    }
    /// The memory as bytes (callers wait for copies into it before reading).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes of host memory that live until drop; `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.len as usize) }
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        if self.gpu.synchronize_within(DROP_WAIT).is_ok() {
            // SAFETY: allocated by cuMemAllocHost, freed once, no copy in flight.
            let _ = check(unsafe { sys::cuMemFreeHost(self.ptr as *mut std::ffi::c_void) }, "cuMemFreeHost");
        }
    }
}
