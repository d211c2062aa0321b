//! Device physical memory and the host aperture: the only module that dereferences raw
//! pointers.
//!
//! The device's memory is an anonymous private mapping the application is never given a pointer
//! to (lazily backed by the kernel: untouched pages cost nothing). Everything reaches it through
//! bounds-checked methods taking device physical addresses. Host memory reached through the
//! system-memory aperture (a [`hetmm_core::device::MapTarget::Host`] mapping, or a copy-engine
//! op) is accessed by the `host_*` functions here, whose callers carry the trait's safety
//! contract.
//!
//! Memory model: the simulated device, like a real one, lets several clients (warps, copy
//! engines) touch the same bytes at once. Plain accesses are byte copies through raw pointers
//! (never Rust references into the arena); racing plain accesses give unspecified bytes, as on
//! hardware. Atomics are real CPU atomics on naturally aligned words.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use hetmm_core::device::DeviceError;

use crate::SimError;

/// A read-modify-write operation on a naturally aligned word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AtomicOp {
    /// `fetch_add` on a `u32`.
    AddU32(u32),
    /// `fetch_add` on a `u64`.
    AddU64(u64),
    /// Compare-and-swap on a `u32`: `(current, new)`.
    CasU32(u32, u32),
}

impl AtomicOp {
    /// Bytes the op touches (its natural alignment too).
    pub(crate) fn size(self) -> u64 {
        match self {
            AtomicOp::AddU32(_) | AtomicOp::CasU32(..) => 4,
            AtomicOp::AddU64(_) => 8,
        }
    }

    /// Runs the op on the word at `ptr` and returns the previous value (widened).
    ///
    /// # Safety
    ///
    /// `ptr` must be aligned to [`AtomicOp::size`] and valid for reads and writes of that many
    /// bytes for the duration of the call. Concurrent plain accesses to the same bytes (another
    /// warp's store, a copy engine) are a race the simulator accepts as the hardware it models
    /// does, as the module notes say: the op is atomic only against other atomics of its size.
    unsafe fn run(self, ptr: *mut u8) -> u64 {
        match self {
            AtomicOp::AddU32(v) => {
                // SAFETY: the caller guarantees alignment and validity (see the fn contract).
                let a = unsafe { AtomicU32::from_ptr(ptr.cast::<u32>()) };
                u64::from(a.fetch_add(v, Ordering::SeqCst))
            }
            AtomicOp::AddU64(v) => {
                // SAFETY: as above.
                let a = unsafe { AtomicU64::from_ptr(ptr.cast::<u64>()) };
                a.fetch_add(v, Ordering::SeqCst)
            }
            AtomicOp::CasU32(cur, new) => {
                // SAFETY: as above.
                let a = unsafe { AtomicU32::from_ptr(ptr.cast::<u32>()) };
                let prev = match a.compare_exchange(cur, new, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(p) | Err(p) => p,
                };
                u64::from(prev)
            }
        }
    }
}

/// The device's physical memory: `len` bytes addressed `[0, len)`.
#[derive(Debug)]
pub(crate) struct PhysMem {
    base: NonNull<u8>,
    len: u64,
}

// SAFETY: the arena is plain memory owned by this struct; it is only reached through raw-pointer
// copies and atomics (never through references), so sharing the base pointer between threads is
// sound; racing plain accesses are the simulated hardware's documented behaviour.
unsafe impl Send for PhysMem {}
// SAFETY: see `Send`; every method takes `&self` and does bounds-checked raw accesses.
unsafe impl Sync for PhysMem {}

impl PhysMem {
    /// Reserves `len` bytes of zeroed memory, backed by transparent huge pages where the kernel
    /// allows (so first touches cost one fault per 2 MiB, as device memory costs none), and
    /// populated up front when `prefault` is set.
    pub(crate) fn new(len: u64, prefault: bool) -> Result<Self, SimError> {
        let size = usize::try_from(len).map_err(|_| SimError::BadMemorySize(len))?;
        if size == 0 {
            return Err(SimError::BadMemorySize(len));
        }
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address; it overlaps nothing.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                size,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE,
            )
        }
        .map_err(|e| SimError::Memory(e.to_string()))?;
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| SimError::Memory("mmap returned null".into()))?;
        // SAFETY: advice on the mapping just created, over exactly its length; neither call
        // changes its contents (zeros either way).
        unsafe {
            // Huge pages and prefaulting are optimisations: failure leaves ordinary lazy pages.
            let _ = rustix::mm::madvise(ptr, size, rustix::mm::Advice::LinuxHugepage);
            if prefault {
                let _ = rustix::mm::madvise(ptr, size, rustix::mm::Advice::LinuxPopulateWrite);
            }
        }
        Ok(Self { base, len })
    }

    /// The process address of physical address 0: where other simulated devices' copy engines
    /// read this memory (the device's peer window).
    pub(crate) fn base_addr(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// Bytes of memory.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Checks that `[pa, pa + len)` lies inside the memory.
    pub(crate) fn check(&self, pa: u64, len: u64) -> Result<(), DeviceError> {
        match pa.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(DeviceError::BadPhysical { addr: pa, len }),
        }
    }

    /// Pointer to `pa` after a bounds check of `len` bytes.
    fn ptr(&self, pa: u64, len: u64) -> Result<*mut u8, DeviceError> {
        self.check(pa, len)?;
        // The check bounds `pa` by `self.len`, which fits in `usize` (checked in `new`).
        let off = pa as usize;
        // SAFETY: `off <= self.len`, so the result stays inside (or one past) the mapping.
        Ok(unsafe { self.base.as_ptr().add(off) })
    }

    /// Copies `out.len()` bytes at `pa` into `out`.
    pub(crate) fn read(&self, pa: u64, out: &mut [u8]) -> Result<(), DeviceError> {
        let src = self.ptr(pa, out.len() as u64)?;
        // SAFETY: `src..src+len` is inside the arena (checked); `out` is a distinct Rust buffer,
        // so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `data` to `pa`: a kernel's store. One of at least `KERNEL_STREAM_MIN` bytes
    /// writes whole lines, which device memory takes without reading them first, so it goes
    /// through non-temporal stores (see [`dma_copy`]) rather than through the CPU's caches.
    pub(crate) fn write(&self, pa: u64, data: &[u8]) -> Result<(), DeviceError> {
        let dst = self.ptr(pa, data.len() as u64)?;
        // SAFETY: the destination is inside the arena (checked); `data` is a distinct buffer.
        unsafe { copy_bypassing_caches(data.as_ptr(), dst, data.len(), KERNEL_STREAM_MIN) };
        Ok(())
    }

    /// Zero-fills `[pa, pa + len)`.
    pub(crate) fn zero(&self, pa: u64, len: u64) -> Result<(), DeviceError> {
        let dst = self.ptr(pa, len)?;
        // SAFETY: the range is inside the arena (checked).
        unsafe { std::ptr::write_bytes(dst, 0, len as usize) };
        Ok(())
    }

    /// Copies `len` bytes from `src` to `dst` inside the memory (the ranges may overlap here;
    /// a copy op whose ranges overlap is refused before it is cut into pieces).
    pub(crate) fn copy_within(&self, src: u64, dst: u64, len: u64) -> Result<(), DeviceError> {
        let s = self.ptr(src, len)?;
        let d = self.ptr(dst, len)?;
        // SAFETY: both ranges are inside the arena (checked); `copy` allows overlap.
        unsafe { std::ptr::copy(s, d, len as usize) };
        Ok(())
    }

    /// Runs an atomic at `pa` (naturally aligned) and returns the previous value.
    pub(crate) fn atomic(&self, pa: u64, op: AtomicOp) -> Result<u64, DeviceError> {
        let size = op.size();
        if !pa.is_multiple_of(size) {
            return Err(DeviceError::Other(format!("misaligned {size}-byte atomic at device physical {pa:#x}")));
        }
        let p = self.ptr(pa, size)?;
        // SAFETY: in bounds (checked), aligned (the arena base is page aligned and `pa` is a
        // multiple of the size), and the arena lives as long as `self`.
        Ok(unsafe { op.run(p) })
    }

    /// Copies device memory at `pa` to host memory at `dst`.
    ///
    /// # Safety
    ///
    /// `dst` must be valid for writes of `len` bytes and not overlap the arena.
    pub(crate) unsafe fn copy_to_host(&self, pa: u64, dst: usize, len: u64) -> Result<(), DeviceError> {
        let src = self.ptr(pa, len)?;
        // SAFETY: source checked in bounds; destination valid per the caller's contract and
        // disjoint from the arena.
        unsafe { dma_copy(src, dst as *mut u8, len as usize) };
        Ok(())
    }

    /// Copies host memory at `src` to device memory at `pa`.
    ///
    /// # Safety
    ///
    /// `src` must be valid for reads of `len` bytes and not overlap the arena.
    pub(crate) unsafe fn copy_from_host(&self, src: usize, pa: u64, len: u64) -> Result<(), DeviceError> {
        let dst = self.ptr(pa, len)?;
        // SAFETY: destination checked in bounds; source valid per the caller's contract and
        // disjoint from the arena.
        unsafe { dma_copy(src as *const u8, dst, len as usize) };
        Ok(())
    }
}

impl Drop for PhysMem {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this base and length and nothing else
        // refers to it once the owner is dropped.
        if let Err(e) = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len as usize) } {
            log::warn!("sim: munmap of device memory failed: {e}");
        }
    }
}

/// Copies of at least this many bytes use non-temporal stores (see [`dma_copy`]).
pub const DMA_STREAM_MIN: usize = 64 << 10;

/// A kernel's stores of at least this many bytes use non-temporal stores ([`PhysMem::write`]).
/// Below a page, a kernel often writes a few values it reads again soon (a reduction's
/// partial sums), which the caches should keep. `stream_breakdown -- 2G` on the 2-core VM: the
/// resident kernel 0.090-0.094 s against 0.118-0.120 s through the caches (the CPU's stores
/// read every line for ownership first, half again as much memory traffic), the device-fault
/// path 0.29-0.32 s against 0.33-0.34 s.
const KERNEL_STREAM_MIN: usize = 4 << 10;

/// A copy engine's transfer: copies `len` bytes from `src` to `dst`.
///
/// A DMA engine writes memory without passing the data through the CPU's caches. Pieces of at
/// least `DMA_STREAM_MIN` (64 KiB) bytes are copied that way here, with non-temporal stores: the
/// destination's lines are not read for ownership first and the copy does not evict the
/// caches' contents. `memcpy` takes that path only above a threshold tied to the last-level
/// cache size (tens of MiB), far above the engines' 256 KiB pieces. On the 2-core development
/// VM, `stream_breakdown 2G` (a 2 GiB device-fault migration) spent 0.29-0.30 CPU-seconds
/// copying against 0.32-0.34 with `memcpy`, three runs each, alternating.
///
/// # Safety
///
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and the two ranges must
/// not overlap (the contract of [`std::ptr::copy_nonoverlapping`]).
pub unsafe fn dma_copy(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the caller's contract is this function's.
    unsafe { copy_bypassing_caches(src, dst, len, DMA_STREAM_MIN) }
}

/// Copies `len` bytes from `src` to `dst`, with non-temporal stores where `len` is at least
/// `min` (and the machine has them), with `copy_nonoverlapping` otherwise.
///
/// # Safety
///
/// As [`dma_copy`].
unsafe fn copy_bypassing_caches(src: *const u8, dst: *mut u8, len: usize, min: usize) {
    #[cfg(target_arch = "x86_64")]
    if len >= min {
        // Bytes up to the first 16-byte aligned destination address go through a plain copy.
        let head = dst.align_offset(16).min(len);
        let body = (len - head) & !63;
        // SAFETY: every range below lies inside `[0, len)` of both buffers, which the caller
        // guarantees valid and disjoint.
        unsafe {
            std::ptr::copy_nonoverlapping(src, dst, head);
            stream_body(src.add(head), dst.add(head), body);
            std::ptr::copy_nonoverlapping(src.add(head + body), dst.add(head + body), len - head - body);
        }
        return;
    }
    // SAFETY: the caller's contract is `copy_nonoverlapping`'s.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

/// Copies `len` bytes (a multiple of 64) to a 16-byte aligned `dst` with non-temporal stores,
/// then fences so the data is visible to every reader before the copy counts as done.
///
/// # Safety
///
/// As [`dma_copy`], and `dst` 16-byte aligned and `len` a multiple of 64.
#[cfg(target_arch = "x86_64")]
unsafe fn stream_body(src: *const u8, dst: *mut u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    let (s, d) = (src.cast::<__m128i>(), dst.cast::<__m128i>());
    for i in 0..len / 16 {
        // SAFETY: `i * 16 + 16 <= len`, inside both buffers; the load is unaligned, the
        // destination is 16-byte aligned (the caller's contract); SSE2 is part of x86_64.
        unsafe { _mm_stream_si128(d.add(i), _mm_loadu_si128(s.add(i))) };
    }
    // SAFETY: SSE2 is part of x86_64; the fence orders the streaming stores before the
    // completion is signalled.
    unsafe { _mm_sfence() };
}

/// Reads host memory through the aperture into `out`.
///
/// # Safety
///
/// `addr` must be valid for reads of `out.len()` bytes (the [`hetmm_core::device::DeviceMmu::map`]
/// contract: host memory mapped stays valid until unmapped and invalidated).
pub(crate) unsafe fn host_read(addr: usize, out: &mut [u8]) {
    // SAFETY: the source is valid per the caller's contract; `out` is a distinct buffer.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) };
}

/// Writes `data` to host memory through the aperture.
///
/// # Safety
///
/// `addr` must be valid for writes of `data.len()` bytes (see [`host_read`]).
pub(crate) unsafe fn host_write(addr: usize, data: &[u8]) {
    // SAFETY: the destination is valid per the caller's contract; `data` is a distinct buffer.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
}

/// Runs an atomic on host memory through the aperture.
///
/// # Safety
///
/// `addr` must be valid for reads and writes of `op.size()` bytes (see [`host_read`]).
pub(crate) unsafe fn host_atomic(addr: usize, op: AtomicOp) -> Result<u64, DeviceError> {
    if !(addr as u64).is_multiple_of(op.size()) {
        return Err(DeviceError::Other(format!("misaligned {}-byte atomic at host {addr:#x}", op.size())));
    }
    // SAFETY: aligned (checked) and valid per the caller's contract.
    Ok(unsafe { op.run(addr as *mut u8) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_copy_is_exact_at_any_alignment() {
        let len = DMA_STREAM_MIN + 300;
        let src: Vec<u8> = (0..len + 64).map(|i| (i * 7 + 3) as u8).collect();
        for (s_off, d_off, n) in [(0, 0, len), (1, 3, len), (5, 0, len - 7), (0, 9, 100), (13, 13, DMA_STREAM_MIN)] {
            let mut dst = vec![0xeeu8; len + 64];
            // SAFETY: both ranges lie inside their own vectors, which are distinct.
            unsafe { dma_copy(src.as_ptr().add(s_off), dst.as_mut_ptr().add(d_off), n) };
            assert_eq!(&dst[d_off..d_off + n], &src[s_off..s_off + n], "{s_off} {d_off} {n}");
            assert!(dst[..d_off].iter().chain(&dst[d_off + n..]).all(|&b| b == 0xee), "wrote outside");
        }
    }

    #[test]
    fn a_kernels_large_stores_land_exactly() {
        let m = PhysMem::new(2 << 20, false).unwrap();
        let data: Vec<u8> = (0..KERNEL_STREAM_MIN * 3 + 77).map(|i| (i * 13 + 1) as u8).collect();
        for (pa, n) in [(0, data.len()), (3, data.len() - 5), (4096 + 9, KERNEL_STREAM_MIN), (100, 64)] {
            m.zero(0, 2 << 20).unwrap();
            m.write(pa, &data[..n]).unwrap();
            let mut back = vec![0u8; n + 128];
            m.read(pa.saturating_sub(64), &mut back).unwrap();
            let lead = (pa - pa.saturating_sub(64)) as usize;
            assert!(back[..lead].iter().chain(&back[lead + n..]).all(|&b| b == 0), "wrote outside at {pa}");
            assert_eq!(&back[lead..lead + n], &data[..n], "at {pa}, {n} bytes");
        }
    }

    #[test]
    fn bounds_and_atomics() {
        let m = PhysMem::new(2 << 20, false).unwrap();
        m.write(100, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 3];
        m.read(100, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert!(matches!(m.read((2 << 20) - 1, &mut b), Err(DeviceError::BadPhysical { .. })));
        assert!(m.check(u64::MAX, 2).is_err());
        assert_eq!(m.atomic(8, AtomicOp::AddU64(5)).unwrap(), 0);
        assert_eq!(m.atomic(8, AtomicOp::AddU64(5)).unwrap(), 5);
        assert_eq!(m.atomic(16, AtomicOp::CasU32(0, 7)).unwrap(), 0);
        assert_eq!(m.atomic(16, AtomicOp::CasU32(0, 9)).unwrap(), 7);
        assert!(m.atomic(17, AtomicOp::AddU32(1)).is_err());
        m.copy_within(100, 200, 3).unwrap();
        m.zero(100, 3).unwrap();
        m.read(200, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        m.read(100, &mut b).unwrap();
        assert_eq!(b, [0, 0, 0]);
    }
}
