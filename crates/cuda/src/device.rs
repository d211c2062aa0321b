//! [`CudaDevice`]: the `DeviceMmu` implementation over `plan` (bookkeeping) and `driver`
//! (the calls).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaEvent, CudaFunction, CudaModule, CudaStream};
use hetmm_core::device::{
    Completion, CopyOp, DeviceCaps, DeviceError, DeviceFault, DeviceMmu, Done, FaultCancel, HostAddr, MapEntry,
    PhysAddr,
};
use hetmm_core::types::{Prot, VaRange, PAGE_SIZE};
use parking_lot::Mutex;

use crate::driver::{self, Gpu, HostRegistration, PhysChunk, VaReservation};
use crate::kernels::{self, BufUse, KernelCall};
use crate::plan::{self, Access, HostRanges, PageTable, PhysLayout, RegionVa, CHUNK};
use crate::CudaError;

/// Configuration of a CUDA device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaConfig {
    /// GPU ordinal. Default 0.
    pub ordinal: usize,
    /// Device memory hetmm may use (rounded down to 2 MiB; must fit in what is free). Default:
    /// what is free less `headroom`.
    pub memory_bytes: Option<u64>,
    /// Memory left to others when `memory_bytes` is not given. Default 1 GiB.
    pub headroom: u64,
    /// Longest wait for kernels in flight before memory they may use is unmapped. Default 600 s.
    pub kernel_timeout: Duration,
    /// Bytes of a region's host memory pinned per registration (a positive multiple of 2 MiB).
    /// A copy never spans two registrations and adjacent copies inside one are merged, so larger
    /// pieces give the copy engines longer copies: on an H100, copies of 2 MiB ran at 0.935 of
    /// one long copy, of 64 MiB at 1.0. A discard unpins every piece it touches (waiting for the
    /// copies in flight first, where a piece holds other blocks), and the next copy that uses
    /// the piece pins it again. Default [`DEFAULT_PIN_PIECE`], or `HETMM_CUDA_PIN` (a size as
    /// `--size` takes it: `2M`, `1G`).
    pub pin_piece: u64,
}

/// Host memory pinned per registration unless `HETMM_CUDA_PIN` says otherwise (see
/// [`CudaConfig::pin_piece`]).
pub const DEFAULT_PIN_PIECE: u64 = 64 << 20;

impl Default for CudaConfig {
    fn default() -> Self {
        let pin_piece = match std::env::var("HETMM_CUDA_PIN") {
            Ok(v) => plan::parse_pin_piece(&v).unwrap_or_else(|| {
                log::warn!("HETMM_CUDA_PIN={v}: not a positive multiple of 2 MiB; using 64M");
                DEFAULT_PIN_PIECE
            }),
            Err(_) => DEFAULT_PIN_PIECE,
        };
        CudaConfig {
            ordinal: 0,
            memory_bytes: None,
            headroom: 1 << 30,
            kernel_timeout: Duration::from_secs(600),
            pin_piece,
        }
    }
}

/// Counters of a CUDA device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CudaStats {
    /// Bytes copied host to device.
    pub bytes_h2d: u64,
    /// Bytes copied device to host.
    pub bytes_d2h: u64,
    /// Bytes zero-filled.
    pub bytes_zeroed: u64,
    /// Host-side bytes copied from or to memory that is not registered (staged by the driver).
    pub bytes_staged: u64,
    /// Copy batches.
    pub copy_batches: u64,
    /// Copies started (`cuMemcpy*Async` calls, after merging and cutting at registrations).
    pub copies: u64,
    /// Physical chunks created.
    pub chunks_created: u64,
    /// `cuMemMap` calls on shared regions.
    pub maps: u64,
    /// `cuMemUnmap` calls on shared regions.
    pub unmaps: u64,
    /// `cuMemSetAccess` calls.
    pub access_calls: u64,
    /// Regions placed at their host addresses.
    pub regions_same_address: u64,
    /// Regions placed at an offset.
    pub regions_shifted: u64,
    /// Regions whose host pages could not be registered (their copies are staged).
    pub regions_unpinned: u64,
    /// Kernels launched.
    pub kernels: u64,
    /// Nanoseconds in `cuMemMap` on shared regions.
    pub ns_map: u64,
    /// Nanoseconds in `cuMemSetAccess`.
    pub ns_access: u64,
    /// Nanoseconds in `cuMemUnmap` on shared regions.
    pub ns_unmap: u64,
    /// Chunks unmapped for hetmm but left mapped in the driver (parked).
    pub parked: u64,
    /// Parked chunks taken back into use without a driver call.
    pub maps_reused: u64,
}

/// Counters as atomics, read into a [`CudaStats`].
#[derive(Debug, Default)]
struct Counters {
    v: [AtomicU64; 19],
}

impl Counters {
    fn add(&self, i: usize, n: u64) {
        self.v[i].fetch_add(n, Ordering::Relaxed);
    }
    fn get(&self, i: usize) -> u64 {
        self.v[i].load(Ordering::Relaxed)
    }
    fn add_since(&self, i: usize, t: Instant) {
        self.add(i, t.elapsed().as_nanos() as u64);
    }
}

// Counter indices.
const H2D: usize = 0;
const D2H: usize = 1;
const ZERO: usize = 2;
const STAGED: usize = 3;
const BATCHES: usize = 4;
const CHUNKS: usize = 5;
const MAPS: usize = 6;
const UNMAPS: usize = 7;
const ACCESS: usize = 8;
const SAME: usize = 9;
const SHIFTED: usize = 10;
const UNPINNED: usize = 11;
const KERNELS: usize = 12;
const NS_MAP: usize = 13;
const NS_ACCESS: usize = 14;
const NS_UNMAP: usize = 15;
const REUSED: usize = 16;
const PARKED: usize = 17;
const COPIES: usize = 18;

/// What the page-table lock guards.
#[derive(Debug, Default)]
struct State {
    /// The physical window (exists while the page table does).
    window: Option<VaReservation>,
    /// Physical chunks by index, each mapped in the window.
    chunks: Vec<Option<PhysChunk>>,
    pt: PageTable,
    reservations: HashMap<u64, VaReservation>,
    /// Per region: its host backing address and one registration per piece
    /// ([`CudaConfig::pin_piece`]).
    pinned: HashMap<u64, (usize, Vec<Option<HostRegistration>>)>,
    /// Pieces whose registration a discard dropped, as (region start, piece index): pinned again
    /// by the next copy that uses them (see `host_discarded`).
    unpinned: std::collections::BTreeSet<(u64, u64)>,
    host: HostRanges,
}

/// hetmm's kernels, compiled once.
#[derive(Debug)]
struct Compiled {
    _module: Arc<CudaModule>,
    funcs: Vec<(&'static str, CudaFunction)>,
}

#[derive(Debug)]
struct Inner {
    gpu: Arc<Gpu>,
    cfg: CudaConfig,
    name: String,
    total_bytes: u64,
    layout: PhysLayout,
    h2d: Arc<CudaStream>,
    d2h: Arc<CudaStream>,
    compute: Arc<CudaStream>,
    state: Mutex<State>,
    inflight: Mutex<Vec<Arc<CudaEvent>>>,
    kernels: Mutex<Option<Arc<Compiled>>>,
    counters: Counters,
}

/// An NVIDIA GPU as a hetmm device. Cheap to clone (a shared handle).
#[derive(Clone, Debug)]
pub struct CudaDevice {
    inner: Arc<Inner>,
}

/// A kernel started by [`CudaDevice::launch`]. Clones wait on the same kernel.
#[derive(Clone, Debug)]
pub struct CudaLaunch {
    gpu: Arc<Gpu>,
    done: Arc<CudaEvent>,
}

impl CudaLaunch {
    /// Waits for the kernel, at most `timeout` (again after a timeout, if need be).
    pub fn wait(&self, timeout: Duration) -> Result<(), DeviceError> {
        match driver::wait_events(std::slice::from_ref(&*self.done), deadline_after(timeout)) {
            Ok(true) => Ok(()),
            Ok(false) => Err(DeviceError::Timeout(timeout)),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the kernel has finished (errors count as finished; `wait` reports them).
    pub fn is_done(&self) -> bool {
        let _ = self.gpu.bind();
        self.done.try_is_complete().unwrap_or(true)
    }
}

/// The instant `t` from now; a timeout too long to add (`Duration::MAX`, a caller's "forever")
/// gives a deadline about 136 years away instead of a panic.
fn deadline_after(t: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(t).unwrap_or_else(|| now + Duration::from_secs(1 << 32))
}

fn dev_err(e: CudaError) -> DeviceError {
    e.into()
}

impl CudaDevice {
    /// Opens a GPU: checks that the driver and a device are there, that the allocation
    /// granularity divides 2 MiB, and sizes the memory hetmm will use. Nothing is allocated
    /// until memory is used.
    pub fn new(cfg: CudaConfig) -> Result<Self, CudaError> {
        if cfg.pin_piece == 0 || !cfg.pin_piece.is_multiple_of(CHUNK) {
            return Err(CudaError::Config(format!(
                "pin_piece is {} bytes; it must be a positive multiple of 2 MiB",
                cfg.pin_piece
            )));
        }
        let gpu = Gpu::open(cfg.ordinal)?;
        let g = gpu.granularity()?;
        if g == 0 || !CHUNK.is_multiple_of(g) {
            return Err(CudaError::Config(format!(
                "the GPU's allocation granularity is {g} bytes; hetmm needs one that divides 2 MiB"
            )));
        }
        let (free, total) = gpu.mem_info()?;
        let budget = plan::memory_budget(free, cfg.memory_bytes, cfg.headroom).map_err(CudaError::Config)?;
        let (h2d, d2h, compute) = (gpu.stream()?, gpu.stream()?, gpu.stream()?);
        Ok(CudaDevice {
            inner: Arc::new(Inner {
                name: gpu.name(),
                total_bytes: total,
                layout: PhysLayout { chunks: budget / CHUNK },
                gpu,
                cfg,
                h2d,
                d2h,
                compute,
                state: Mutex::new(State::default()),
                inflight: Mutex::new(Vec::new()),
                kernels: Mutex::new(None),
                counters: Counters::default(),
            }),
        })
    }

    /// The GPU's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &CudaConfig {
        &self.inner.cfg
    }

    /// Bytes of device memory hetmm manages on this GPU.
    pub fn memory_bytes(&self) -> u64 {
        self.inner.layout.bytes()
    }

    /// The GPU's total memory.
    pub fn total_memory(&self) -> u64 {
        self.inner.total_bytes
    }

    /// Free and total memory on the GPU now (as the driver reports it).
    pub fn mem_info(&self) -> Result<(u64, u64), CudaError> {
        self.inner.gpu.mem_info()
    }

    /// The device address of host address `va` in shared memory (`None` outside every region
    /// the device knows). Equal to `va` where the driver granted the same addresses.
    pub fn device_ptr(&self, va: u64) -> Option<u64> {
        self.inner.state.lock().pt.translate(va)
    }

    /// The placement of the region holding `va`.
    pub fn region_placement(&self, va: u64) -> Option<RegionVa> {
        self.inner.state.lock().pt.region_of(va).copied()
    }

    /// Counters.
    pub fn stats(&self) -> CudaStats {
        let c = &self.inner.counters;
        CudaStats {
            bytes_h2d: c.get(H2D),
            bytes_d2h: c.get(D2H),
            bytes_zeroed: c.get(ZERO),
            bytes_staged: c.get(STAGED),
            copy_batches: c.get(BATCHES),
            chunks_created: c.get(CHUNKS),
            maps: c.get(MAPS),
            unmaps: c.get(UNMAPS),
            access_calls: c.get(ACCESS),
            regions_same_address: c.get(SAME),
            regions_shifted: c.get(SHIFTED),
            regions_unpinned: c.get(UNPINNED),
            kernels: c.get(KERNELS),
            ns_map: c.get(NS_MAP),
            ns_access: c.get(NS_ACCESS),
            ns_unmap: c.get(NS_UNMAP),
            parked: c.get(PARKED),
            copies: c.get(COPIES),
            maps_reused: c.get(REUSED),
        }
    }

    /// Compiles hetmm's kernels with NVRTC (once).
    pub fn compile_kernels(&self) -> Result<(), CudaError> {
        self.compiled().map(|_| ())
    }

    fn compiled(&self) -> Result<Arc<Compiled>, CudaError> {
        let mut k = self.inner.kernels.lock();
        if let Some(c) = &*k {
            return Ok(Arc::clone(c));
        }
        // NVRTC, where installed, compiles the sources for this driver; otherwise (or if it
        // fails) the PTX built from the same sources and kept in the repository is loaded, and
        // the driver JIT-compiles it for the GPU.
        let shipped = || cudarc::nvrtc::Ptx::from_src(kernels::PTX);
        let (ptx, compiled) = if driver::nvrtc_present() {
            let opts = cudarc::nvrtc::CompileOptions { name: Some("hetmm_kernels.cu".into()), ..Default::default() };
            match cudarc::nvrtc::compile_ptx_with_opts(kernels::program_source(), opts) {
                Ok(p) => (p, true),
                Err(e) => {
                    log::warn!("cuda: NVRTC failed ({e:?}); loading the shipped PTX");
                    (shipped(), false)
                }
            }
        } else {
            log::info!("cuda: NVRTC is not installed; loading the shipped PTX ({})", kernels::PTX_ARCH);
            (shipped(), false)
        };
        let ctx = self.inner.gpu.ctx();
        let load_err =
            |e: cudarc::driver::DriverError| CudaError::Driver { call: "cuModuleLoadData", code: format!("{:?}", e.0) };
        let module = match ctx.load_module(ptx) {
            Ok(m) => m,
            // An NVRTC newer than the driver emits PTX the driver refuses
            // (CUDA_ERROR_UNSUPPORTED_PTX_VERSION): the shipped PTX may still load.
            Err(e) if compiled => {
                log::warn!("cuda: the driver refused NVRTC's PTX ({:?}); loading the shipped PTX", e.0);
                ctx.load_module(shipped()).map_err(load_err)?
            }
            Err(e) => return Err(load_err(e)),
        };
        let mut funcs = Vec::new();
        for spec in kernels::ALL {
            let f = module
                .load_function(spec.name)
                .map_err(|e| CudaError::Driver { call: "cuModuleGetFunction", code: format!("{:?}", e.0) })?;
            funcs.push((spec.name, f));
        }
        let c = Arc::new(Compiled { _module: module, funcs });
        *k = Some(Arc::clone(&c));
        Ok(c)
    }

    /// Launches one of hetmm's kernels on the compute stream. Refuses, without launching,
    /// unless every buffer the call names is mapped on the device (writable where it is
    /// written): a GPU cannot fault memory in. Pointer arguments are translated to device
    /// addresses.
    ///
    /// # Safety
    ///
    /// Until the kernel ends, no Rust reference may point into memory the call writes, nor a
    /// `&mut` into memory it reads: the GPU writes that memory behind the compiler's back (in
    /// device memory the manager copies home when the CPU next touches it, or in host memory
    /// it maps). (`hetmm::Device::launch` keeps this with the buffers' borrow counts.)
    pub unsafe fn launch(&self, call: &KernelCall) -> Result<CudaLaunch, CudaError> {
        let compiled = self.compiled()?;
        let spec = call.spec();
        let func = compiled.funcs.iter().find(|(n, _)| *n == spec.name).map(|(_, f)| f);
        let func = func.ok_or_else(|| CudaError::Kernel(format!("kernel {} is not compiled", spec.name)))?;
        let i = &self.inner;
        // Under the page-table lock: nothing can be unmapped between the check and the launch,
        // and unmapping later waits for this kernel (it is in `inflight` before the lock goes).
        let st = i.state.lock();
        for (buf, how) in call.buffers() {
            let end = buf.ptr.checked_add(buf.bytes).ok_or_else(|| CudaError::Kernel("buffer overflows".into()))?;
            // Device addresses are contiguous only inside one region's reservation (regions are
            // shifted independently): a buffer running into the next region would have the kernel
            // reach past its reservation, into whatever the driver placed there.
            if st.pt.region_of(buf.ptr).is_none_or(|r| end > r.app.end()) {
                return Err(CudaError::Kernel(format!(
                    "{}: buffer {:#x}+{:#x} does not lie inside one shared region",
                    spec.name, buf.ptr, buf.bytes
                )));
            }
            // Every block the buffer touches, from the one holding its start (which may begin
            // after its window's start, at the region's start).
            let mut va = buf.ptr;
            while va < end {
                match st.pt.lookup(va) {
                    Some(m) if *how == BufUse::Read || m.access == Access::ReadWrite => {}
                    Some(_) => return Err(CudaError::Kernel(format!("{}: {va:#x} is mapped read-only", spec.name))),
                    None => {
                        return Err(CudaError::Kernel(format!(
                            "{}: {:#x} is not resident on the GPU (make the kernel's buffers resident first)",
                            spec.name, va
                        )))
                    }
                }
                va = (va & !(CHUNK - 1)) + CHUNK;
            }
        }
        let args = kernels::marshal(spec, call.args(), |va| st.pt.translate(va))?;
        // A device that cannot fault is mapped before its copies land (the migration returns
        // only once they have): a kernel launched meanwhile from another thread, on data it
        // shares with that migration, must not start before every copy to the GPU submitted so
        // far.
        i.compute
            .wait(&driver::record(&i.h2d)?)
            .map_err(|e| CudaError::Driver { call: "cuStreamWaitEvent", code: format!("{:?}", e.0) })?;
        // A `KernelCall` derives its sizes from its buffers: the kernel touches only those.
        // SAFETY: `marshal` matched the arguments to the kernel's parameters; each buffer is mapped
        // (checked above, under the lock unmapping takes) and unmapping waits for the event below.
        unsafe { i.gpu.launch(&i.compute, func, call.dims(), &args)? };
        let done = Arc::new(driver::record(&i.compute)?);
        let mut inflight = i.inflight.lock();
        // Forget finished kernels here too, not only when something waits on them, so a
        // program relaunching on resident data does not pile up events.
        inflight.retain(|e| !e.try_is_complete().unwrap_or(true));
        inflight.push(Arc::clone(&done));
        drop(inflight);
        drop(st);
        i.counters.add(KERNELS, 1);
        Ok(CudaLaunch { gpu: Arc::clone(&i.gpu), done })
    }

    /// The GPU handle (for the baselines).
    pub(crate) fn gpu(&self) -> &Arc<Gpu> {
        &self.inner.gpu
    }

    /// The compute stream (for the baselines).
    pub(crate) fn compute_stream(&self) -> &Arc<CudaStream> {
        &self.inner.compute
    }

    /// Launches a kernel on raw device addresses (the baselines' own allocations).
    ///
    /// # Safety
    ///
    /// `args` must match `spec`, and every device address the kernel reaches must be device
    /// (or managed) memory that stays allocated, and untouched by the host, until the launch
    /// has been waited on.
    pub(crate) unsafe fn launch_raw(
        &self,
        spec: &kernels::KernelSpec,
        dims: kernels::Dims,
        args: &[kernels::Value],
    ) -> Result<CudaLaunch, CudaError> {
        let compiled = self.compiled()?;
        let func = compiled.funcs.iter().find(|(n, _)| *n == spec.name).map(|(_, f)| f);
        let func = func.ok_or_else(|| CudaError::Kernel(format!("kernel {} is not compiled", spec.name)))?;
        let i = &self.inner;
        // SAFETY: as the caller guarantees.
        unsafe { i.gpu.launch(&i.compute, func, dims, args)? };
        let done = Arc::new(driver::record(&i.compute)?);
        i.counters.add(KERNELS, 1);
        Ok(CudaLaunch { gpu: Arc::clone(&i.gpu), done })
    }
}

impl Inner {
    /// Removes the driver mappings of `maps` (mapped or parked chunks of live regions): one call
    /// per run of chunks mapped back to back (the driver unmaps every mapping inside the range),
    /// one per chunk if it refuses. Returns those done and the first error; never stops early.
    fn unmap_chunks(&self, st: &State, maps: &[plan::ChunkMap]) -> (Vec<plan::ChunkMap>, Result<(), DeviceError>) {
        let i = self;
        let t = Instant::now();
        let mut done = Vec::new();
        let mut result = Ok(());
        let mut todo = maps.to_vec();
        todo.sort_by_key(|m| (m.region, m.dev_va));
        for run in plan::contiguous_runs(&todo) {
            let (first, n) = (run[0], run.len() as u64);
            if n > 1 && i.gpu.unmap(&st.reservations[&first.region], first.dev_va, n * CHUNK).is_ok() {
                done.extend_from_slice(run);
                continue;
            }
            // Every chunk is tried (a region's reservation can only be freed empty); the first
            // error is reported.
            for m in run {
                match i.gpu.unmap(&st.reservations[&m.region], m.dev_va, CHUNK) {
                    Ok(()) => done.push(*m),
                    Err(e) => {
                        if result.is_ok() {
                            result = Err(e.into());
                        }
                    }
                }
            }
        }
        i.counters.add_since(NS_UNMAP, t);
        i.counters.add(UNMAPS, done.len() as u64);
        (done, result)
    }

    /// Waits for every kernel in flight (call with the page-table lock held, so no new one
    /// starts).
    fn wait_kernels(&self) -> Result<(), DeviceError> {
        let mut inflight = self.inflight.lock();
        if inflight.is_empty() {
            return Ok(());
        }
        let deadline = deadline_after(self.cfg.kernel_timeout);
        for ev in inflight.iter() {
            match driver::wait_events(std::slice::from_ref(&**ev), deadline) {
                Ok(true) => {}
                Ok(false) => return Err(DeviceError::Timeout(self.cfg.kernel_timeout)),
                // A failed kernel is finished: its error is the launch's to report.
                Err(e) => log::warn!("cuda: a kernel in flight failed: {e}"),
            }
        }
        inflight.clear();
        Ok(())
    }

    /// Creates chunk `k` if needed and maps it into the window.
    fn ensure_chunk(&self, st: &mut State, k: u64) -> Result<(), CudaError> {
        let idx = k as usize;
        if st.chunks.len() <= idx {
            st.chunks.resize_with(idx + 1, || None);
        }
        if st.chunks[idx].is_some() {
            return Ok(());
        }
        let window = st.window.as_ref().ok_or(CudaError::Device(DeviceError::NoPageTable))?;
        let chunk = PhysChunk::new(&self.gpu, CHUNK).map_err(|e| match e {
            CudaError::Driver { code, .. } if code.contains("OUT_OF_MEMORY") => CudaError::Config(format!(
                "the GPU ran out of memory creating chunk {k} of {} (other allocations use it; lower --device-mem)",
                self.layout.chunks
            )),
            e => e,
        })?;
        let at = window.base() + k * CHUNK;
        self.gpu.map(window, at, &chunk)?;
        if let Err(e) = self.gpu.set_access(window, at, CHUNK, Access::ReadWrite) {
            let _ = self.gpu.unmap(window, at, CHUNK);
            return Err(e);
        }
        st.chunks[idx] = Some(chunk);
        self.counters.add(CHUNKS, 1);
        Ok(())
    }

    /// Pins again the pieces a discard unpinned that `ops` copy to or from (a copy outside every
    /// registration is still correct, only staged by the driver: a failure is logged).
    fn pin_again(&self, st: &mut State, ops: &[CopyOp]) {
        let piece = self.cfg.pin_piece;
        let hosts: Vec<(u64, u64)> = ops
            .iter()
            .filter_map(|op| match *op {
                CopyOp::HostToDevice { src, len, .. } => Some((src.0 as u64, len)),
                CopyOp::DeviceToHost { dst, len, .. } => Some((dst.0 as u64, len)),
                _ => None,
            })
            .collect();
        let due =
            plan::pieces_used(st.unpinned.iter().copied(), |r| st.pinned.get(&r).map(|p| p.0 as u64), piece, &hosts);
        for (start, k) in due {
            st.unpinned.remove(&(start, k));
            let Some(len) = st.pt.region(start).map(|r| r.app.len) else { continue };
            let Some((backing, regs)) = st.pinned.get_mut(&start) else { continue };
            let (off, blen) = (k * piece, piece.min(len - k * piece));
            let addr = *backing + off as usize;
            // SAFETY: as in `region_added`: the alias stays mapped until `region_removed`.
            match unsafe { HostRegistration::new(&self.gpu, addr, blen) } {
                Ok(h) => {
                    regs[k as usize] = Some(h);
                    st.host.insert(start, addr as u64, blen);
                }
                Err(e) => log::warn!("cuda: pinning discarded host pages at {addr:#x} again: {e}"),
            }
        }
    }

    /// Waits (at most `kernel_timeout`) for every copy started on the copy streams: used before a
    /// failed copy batch returns, since no completion is handed out to wait on, and before host
    /// pages are unpinned or device memory freed. Whether they all finished.
    fn drain_copies(&self) -> bool {
        let deadline = deadline_after(self.cfg.kernel_timeout);
        let mut drained = true;
        for (what, stream) in [("host-to-device", &self.h2d), ("device-to-host", &self.d2h)] {
            match driver::record(stream).and_then(|ev| driver::wait_events(std::slice::from_ref(&ev), deadline)) {
                Ok(true) => {}
                Ok(false) => {
                    drained = false;
                    log::error!("cuda: {what} copies still run after {:?}", self.cfg.kernel_timeout)
                }
                Err(e) => {
                    drained = false;
                    log::error!("cuda: waiting for the {what} copies: {e}")
                }
            }
        }
        drained
    }

    /// Sets access on `runs` in order, stopping at the first failure. Returns the runs to record
    /// as in force: those applied, and a failed one that only takes write access away (part of
    /// it may be in force; recording less access than the driver grants is the safe side, since
    /// launches check the table).
    fn set_access_runs(&self, st: &State, runs: &[plan::AccessRun]) -> (Vec<plan::AccessRun>, Result<(), CudaError>) {
        let mut applied = Vec::new();
        for run in runs {
            match self.set_access(&st.reservations[&run.region], run) {
                Ok(()) => applied.push(*run),
                Err(e) => {
                    if run.access == Access::Read {
                        applied.push(*run);
                    }
                    return (applied, Err(e));
                }
            }
        }
        (applied, Ok(()))
    }

    /// Sets access on a run, falling back to one call per chunk if the driver refuses a run
    /// spanning several allocations.
    fn set_access(&self, res: &VaReservation, run: &plan::AccessRun) -> Result<(), CudaError> {
        self.counters.add(ACCESS, 1);
        let t = Instant::now();
        let r = self.gpu.set_access(res, run.dev_va, run.len, run.access);
        self.counters.add_since(NS_ACCESS, t);
        match r {
            Ok(()) => Ok(()),
            Err(_) if run.len > CHUNK => {
                for va in (run.dev_va..run.dev_va + run.len).step_by(CHUNK as usize) {
                    self.counters.add(ACCESS, 1);
                    self.gpu.set_access(res, va, CHUNK, run.access)?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Unmaps everything and frees every driver resource (page table destroyed, or dropped).
    /// Copies still in flight after the longest wait (the core gave up on one and went on) keep
    /// the host pages they use pinned and the device memory they use allocated, leaked: unpinned,
    /// the kernel may move the pages under the copy; freed, the memory may be reused under it.
    fn teardown(&self, st: &mut State) {
        if let Err(e) = self.wait_kernels() {
            log::error!("cuda: tearing down with kernels still running: {e}");
        }
        if !self.drain_copies() {
            log::error!("cuda: tearing down with copies in flight: their host pages and device memory are leaked");
            std::mem::forget(std::mem::take(&mut st.pinned));
            std::mem::forget(std::mem::take(&mut st.chunks));
        }
        let all: Vec<_> = st.pt.mapped().chain(st.pt.parked()).copied().collect();
        let all: Vec<_> = all.into_iter().filter(|m| st.reservations.contains_key(&m.region)).collect();
        if let (_, Err(e)) = self.unmap_chunks(st, &all) {
            log::warn!("cuda: teardown unmap: {e}");
        }
        st.pt = PageTable::new();
        st.reservations.clear();
        if let Some(window) = &st.window {
            for (k, c) in st.chunks.iter().enumerate() {
                if c.is_some() {
                    let _ = self.gpu.unmap(window, window.base() + k as u64 * CHUNK, CHUNK);
                }
            }
        }
        st.chunks.clear();
        st.window = None;
        st.pinned.clear();
        st.unpinned.clear();
        st.host = HostRanges::default();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let mut st = std::mem::take(&mut *self.state.lock());
        self.teardown(&mut st);
    }
}

/// Events that complete a copy batch.
#[derive(Debug)]
struct CopyDone {
    events: Vec<CudaEvent>,
}

impl Completion for CopyDone {
    fn wait(&mut self, timeout: Duration) -> Result<(), DeviceError> {
        match driver::wait_events(&self.events, deadline_after(timeout)) {
            Ok(true) => Ok(()),
            Ok(false) => Err(DeviceError::Timeout(timeout)),
            Err(e) => Err(e.into()),
        }
    }
}

impl DeviceMmu for CudaDevice {
    fn caps(&self) -> DeviceCaps {
        DeviceCaps {
            name: format!("cuda ({})", self.inner.name),
            page_sizes: CHUNK,
            replayable_faults: false,
            coherent: false,
            remote_host_access: false,
            peer: None,
            region_bound: true,
            memory_bytes: self.inner.layout.bytes(),
        }
    }

    fn physical_ranges(&self) -> Vec<(PhysAddr, u64)> {
        vec![(PhysAddr(0), self.inner.layout.bytes())]
    }

    fn create_page_table(&self) -> Result<(), DeviceError> {
        let i = &self.inner;
        let mut st = i.state.lock();
        if st.window.is_some() {
            return Err(DeviceError::Other("the device page table already exists".into()));
        }
        st.window = Some(VaReservation::new(&i.gpu, i.layout.bytes(), CHUNK, 0).map_err(dev_err)?);
        Ok(())
    }

    unsafe fn destroy_page_table(&self) {
        let i = &self.inner;
        let mut st = i.state.lock();
        i.teardown(&mut st);
    }

    unsafe fn map(&self, entries: &[MapEntry]) -> Result<(), DeviceError> {
        let i = &self.inner;
        let mut st = i.state.lock();
        if st.window.is_none() {
            return Err(DeviceError::NoPageTable);
        }
        let plan = st.pt.plan_map(entries, i.layout.chunks)?;
        for m in &plan.maps {
            i.ensure_chunk(&mut st, m.chunk).map_err(dev_err)?;
        }
        // Parked mappings in the way go first (for good, whatever happens to the batch).
        let drops: Vec<_> = plan.drop.iter().filter(|d| st.pt.is_parked(d)).copied().collect();
        let (dropped, r) = i.unmap_chunks(&st, &drops);
        for d in &dropped {
            st.pt.unpark(d);
        }
        r?;
        i.counters.add(REUSED, plan.revive.len() as u64);
        let mut done = Vec::new();
        let mut result = Ok(());
        let t = Instant::now();
        for m in &plan.maps {
            let (res, chunk) = (&st.reservations[&m.region], st.chunks[m.chunk as usize].as_ref());
            let Some(chunk) = chunk else { unreachable!("ensured above") };
            match i.gpu.map(res, m.dev_va, chunk) {
                Ok(()) => {
                    i.counters.add(MAPS, 1);
                    done.push(*m);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        i.counters.add_since(NS_MAP, t);
        let mut applied = Vec::new();
        if result.is_ok() {
            let (a, r) = i.set_access_runs(&st, &plan.access);
            (applied, result) = (a, r);
        }
        if let Err(e) = result {
            // A failed batch installs nothing (the core gives the chunks back at once). What
            // cannot be undone is parked, so the next map that needs its block or chunk removes
            // it first.
            let stuck: Vec<_> = done
                .into_iter()
                .filter(|m| i.gpu.unmap(&st.reservations[&m.region], m.dev_va, CHUNK).is_err())
                .collect();
            for m in &stuck {
                log::error!("cuda: undoing a failed map at {:#x} failed; chunk {} parked there", m.host_va, m.chunk);
                st.pt.park_stale(m);
            }
            // Mappings the block held before the call stay, with the access the runs already
            // applied gave them in the driver: record it (new mappings were undone above and are
            // not in the table, so only those are touched).
            st.pt.commit_map(&plan::MapPlan { access: applied, ..plan::MapPlan::default() });
            return Err(e.into());
        }
        st.pt.commit_map(&plan);
        Ok(())
    }

    fn unmap(&self, ranges: &[VaRange]) -> Result<(), DeviceError> {
        let i = &self.inner;
        let mut st = i.state.lock();
        let todo = st.pt.plan_unmap(ranges)?;
        if todo.is_empty() {
            return Ok(());
        }
        i.wait_kernels()?;
        // Parked, not unmapped: launches see them unmapped (they check this table), and mapping
        // the same chunk at the same block again (the core prefers a block's previous chunk)
        // then costs no driver call. A parked mapping is removed when its chunk or its block is
        // mapped otherwise, and with its region.
        // Only read-write mappings are parked: what a migration maps. A read-only one (a
        // duplicate) would come back with another access, and changing it then costs more than
        // unmapping it now, off the path of the next launch.
        let (park, now): (Vec<_>, Vec<_>) = todo.into_iter().partition(|m| m.access == Access::ReadWrite);
        st.pt.park(&park);
        i.counters.add(PARKED, park.len() as u64);
        let (done, result) = i.unmap_chunks(&st, &now);
        st.pt.commit_unmap(&done);
        result
    }

    fn protect(&self, ranges: &[(VaRange, Prot)]) -> Result<(), DeviceError> {
        let i = &self.inner;
        let mut st = i.state.lock();
        let runs = st.pt.plan_protect(ranges)?;
        if runs.is_empty() {
            return Ok(());
        }
        i.wait_kernels()?;
        let (applied, result) = i.set_access_runs(&st, &runs);
        // Record the new access in the table, under the same lock (the region may go, or the
        // block be mapped otherwise, as soon as it is released), and also when a later run
        // failed: the runs already applied are in force in the driver.
        st.pt.commit_map(&plan::MapPlan { access: applied, ..plan::MapPlan::default() });
        result.map_err(dev_err)
    }

    /// Nothing to do: `cuMemUnmap` and `cuMemSetAccess` invalidate the GPU's TLBs themselves,
    /// and both waited for the kernels in flight first.
    fn invalidate_tlb(&self, _ranges: &[VaRange]) {}

    unsafe fn copy(&self, ops: &[CopyOp]) -> Result<Box<dyn Completion>, DeviceError> {
        let i = &self.inner;
        let chunks = i.layout.chunks_for_copies(ops)?;
        if chunks.is_empty() {
            return Ok(Box::new(Done));
        }
        let mut st = i.state.lock();
        for k in chunks {
            i.ensure_chunk(&mut st, k).map_err(dev_err)?;
        }
        if !st.unpinned.is_empty() {
            i.pin_again(&mut st, ops);
        }
        let Some(window) = st.window.as_ref() else { return Err(DeviceError::NoPageTable) };
        let w = window.base();
        let (mut used_h2d, mut used_d2h) = (false, false);
        // Long copies where the core's ops continue each other, each piece inside one host
        // registration.
        for op in &st.host.split(&plan::coalesce_copies(ops)) {
            let len = op.len();
            i.counters.add(COPIES, 1);
            // SAFETY (all arms): physical addresses were checked against the index space and
            // their chunks exist, so `w + pa` is device memory this device owns (the window).
            // Host addresses are the core's: it guarantees they stay valid until the
            // completion has been waited on (the contract of `DeviceMmu::copy`).
            let r = match *op {
                CopyOp::HostToDevice { src, dst, len } => {
                    used_h2d = true;
                    i.counters.add(H2D, len);
                    if !st.host.covers(src.0 as u64, len) {
                        i.counters.add(STAGED, len);
                    }
                    // SAFETY: see above.
                    unsafe { driver::copy_htod(&i.gpu, &i.h2d, w + dst.0, src.0, len) }
                }
                CopyOp::DeviceToHost { src, dst, len } => {
                    used_d2h = true;
                    i.counters.add(D2H, len);
                    if !st.host.covers(dst.0 as u64, len) {
                        i.counters.add(STAGED, len);
                    }
                    // SAFETY: see above.
                    unsafe { driver::copy_dtoh(&i.gpu, &i.d2h, dst.0, w + src.0, len) }
                }
                CopyOp::DeviceToDevice { src, dst, .. } => {
                    used_h2d = true;
                    // SAFETY: see above.
                    unsafe { driver::copy_dtod(&i.gpu, &i.h2d, w + dst.0, w + src.0, len) }
                }
                CopyOp::PeerToDevice { .. } => {
                    return Err(DeviceError::Other("cuda: no peer copies (refused when checked)".into()));
                }
                CopyOp::Zero { dst, .. } => {
                    used_h2d = true;
                    i.counters.add(ZERO, len);
                    // SAFETY: see above.
                    unsafe { driver::zero(&i.gpu, &i.h2d, w + dst.0, len) }
                }
            };
            if let Err(e) = r {
                // The copies already started still read or write host memory the core may reuse
                // as soon as this returns an error: let them finish first.
                i.drain_copies();
                return Err(dev_err(e));
            }
        }
        drop(st);
        let mut events = Vec::new();
        let recorded = (|| {
            if used_h2d {
                events.push(driver::record(&i.h2d)?);
            }
            if used_d2h {
                events.push(driver::record(&i.d2h)?);
            }
            Ok::<(), CudaError>(())
        })();
        if let Err(e) = recorded {
            i.drain_copies();
            return Err(dev_err(e));
        }
        i.counters.add(BATCHES, 1);
        Ok(Box::new(CopyDone { events }))
    }

    fn fetch_faults(&self, _max: usize, _out: &mut Vec<DeviceFault>) -> usize {
        0
    }

    fn wait_for_faults(&self, timeout: Duration) -> bool {
        // A GPU reports no faults to user space; the core starts no service thread for it.
        std::thread::sleep(timeout.min(Duration::from_millis(10)));
        false
    }

    fn replay(&self, _cancel: &[(u64, hetmm_core::types::Access, FaultCancel)]) {}

    fn shutdown_faults(&self) {}

    fn region_added(&self, app: VaRange, backing: HostAddr) -> Result<(), DeviceError> {
        let i = &self.inner;
        // The reservation covers the 2 MiB windows the region touches: chunks are mapped whole,
        // at their windows, and the core places each page at its window offset in its chunk, so
        // a region starting inside a window (memory a program registers) works as an aligned
        // one. A region sharing its first window with another one's last cannot have the host's
        // addresses there (the other has them): the driver gives others, and hetmm shifts.
        let len = RegionVa::reservation_len(app).ok_or(DeviceError::BadRange(app))?;
        if backing.0 == 0 || !(backing.0 as u64).is_multiple_of(PAGE_SIZE) {
            return Err(DeviceError::BadRange(app));
        }
        let mut st = i.state.lock();
        if st.window.is_none() {
            return Err(DeviceError::NoPageTable);
        }
        // Ask for the host's own addresses; take what the driver gives.
        let window = hetmm_core::types::align_down(app.start, CHUNK);
        let res = VaReservation::new(&i.gpu, len, CHUNK, window).map_err(dev_err)?;
        let r = RegionVa { app, dev_base: res.base() };
        st.pt.add_region(r)?;
        i.counters.add(if r.same_address() { SAME } else { SHIFTED }, 1);
        st.reservations.insert(app.start, res);
        let mut regs = Vec::new();
        let mut failed = None;
        for (off, blen) in plan::host_pieces(app.len, i.cfg.pin_piece) {
            // SAFETY: the alias `backing` stays mapped for `app.len` bytes until `region_removed`
            // returns (`region_added`'s contract), which drops these registrations first.
            match unsafe { HostRegistration::new(&i.gpu, backing.0 + off as usize, blen) } {
                Ok(h) => {
                    st.host.insert(app.start, backing.0 as u64 + off, blen);
                    regs.push(Some(h));
                }
                Err(e) => {
                    failed.get_or_insert(e);
                    regs.push(None);
                }
            }
        }
        if let Some(e) = failed {
            i.counters.add(UNPINNED, 1);
            log::warn!("cuda: host pages of region {app} not all registered ({e}); those copies will be staged");
        }
        st.pinned.insert(app.start, (backing.0, regs));
        Ok(())
    }

    /// The old registration of each piece touched pins the pages the discard freed: it is
    /// dropped now, and the piece pinned again only when a copy next uses it (`pin_again`). A
    /// program discarding a large range a block at a time (the core reports discards per block)
    /// thus costs one registration per piece, not one per block.
    fn host_discarded(&self, ranges: &[VaRange]) {
        let i = &self.inner;
        let mut st = i.state.lock();
        let st = &mut *st;
        let piece = i.cfg.pin_piece;
        // Each piece once, however many of the ranges lie in it.
        let mut touched = std::collections::BTreeSet::new();
        for r in ranges {
            let Some(region) = st.pt.region_of(r.start).copied() else { continue };
            let Some(x) = r.intersect(&region.app) else { continue };
            let app = region.app;
            touched.extend(plan::pieces_touched(x.start - app.start, x.len, piece).map(|k| (app.start, k)));
        }
        touched.retain(|&(start, k)| st.pinned.get(&start).is_some_and(|(_, regs)| regs[k as usize].is_some()));
        // Copies in flight may use a piece's pages (blocks of it the core is not discarding, or
        // the discarded ones when the core reports a program's discard without their locks):
        // they must stay pinned until the copies finish.
        if !touched.is_empty() {
            i.drain_copies();
        }
        for (start, k) in touched {
            let Some((backing, regs)) = st.pinned.get_mut(&start) else { continue };
            regs[k as usize] = None;
            st.host.remove((*backing + (k * piece) as usize) as u64);
            st.unpinned.insert((start, k));
        }
    }

    fn region_removed(&self, app: VaRange) {
        let i = &self.inner;
        let mut st = i.state.lock();
        let Some(r) = st.pt.region(app.start).copied() else { return };
        let mapped = st.pt.mapped_in(r.app.start);
        if !mapped.is_empty() {
            if let Err(e) = i.wait_kernels() {
                log::error!("cuda: removing region {app} while kernels run: {e}");
            }
        }
        // Mapped and parked chunks alike: the reservation can only be freed empty.
        let all: Vec<_> = mapped.into_iter().chain(st.pt.parked_in(r.app.start)).collect();
        if st.reservations.contains_key(&app.start) {
            if let (_, Err(e)) = i.unmap_chunks(&st, &all) {
                log::error!("cuda: unmapping chunks of removed region {app}: {e}");
            }
        }
        st.pt.remove_region(app.start);
        st.reservations.remove(&app.start);
        // Its host pages may still be what a copy in flight reads or writes (the core goes on
        // after a copy wait times out): unpinned under it, the kernel could move them.
        if let Some(pinned) = st.pinned.remove(&app.start) {
            if !i.drain_copies() {
                log::error!("cuda: removing region {app} with copies in flight: its host pages stay pinned, leaked");
                std::mem::forget(pinned);
            }
        }
        st.unpinned.retain(|&(start, _)| start != app.start);
        st.host.remove_region(app.start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `CudaConfig::kernel_timeout` and the timeouts given to `CudaLaunch::wait` and a copy
    /// completion are callers' values: `Duration::MAX` ("wait forever") must not panic when the
    /// deadline is computed (`Instant + Duration` panics on overflow).
    #[test]
    fn a_timeout_of_forever_gives_a_deadline_not_a_panic() {
        let d = deadline_after(Duration::MAX);
        assert!(d > Instant::now() + Duration::from_secs(100 * 365 * 86_400));
        let d = deadline_after(Duration::from_millis(5));
        assert!(d <= Instant::now() + Duration::from_millis(5));
    }
}
