//! hetmm-cuda: NVIDIA GPUs as hetmm devices, through the CUDA driver's virtual-memory API.
//!
//! The driver is loaded at run time (`cudarc` with dynamic loading): this crate builds, and its
//! tests pass, on machines without CUDA, a GPU or `nvcc`; [`probe`] says why CUDA cannot be used
//! where it cannot, and tests that need a GPU skip with that reason.
//!
//! How [`CudaDevice`] implements the core's `DeviceMmu`:
//! - Physical memory: `cuMemCreate` chunks of 2 MiB (the allocation granularity). The core's
//!   allocator sees a contiguous physical index space `[0, chunks * 2 MiB)`; chunk `k` is
//!   created on first use and mapped once into a private device-VA *window* at
//!   `window + k * 2 MiB`, where copies address it.
//! - Device virtual addresses: for every shared region, `cuMemAddressReserve` asking for the
//!   region's own host addresses. Where the driver gives another range (usual: the host
//!   already uses those addresses), the whole region is shifted by one offset and
//!   [`CudaDevice::device_ptr`] translates; hetmm's launches translate pointer arguments
//!   themselves, so kernels always receive valid device pointers.
//! - Page table: `cuMemMap` of a chunk at a block's device address, `cuMemSetAccess` over
//!   coalesced runs. Only 2 MiB entries exist (`caps().page_sizes == 2 MiB`): the core moves
//!   whole blocks to and from this device. An unmapped read-write chunk is *parked*: launches
//!   see it unmapped (they check the backend's table), but its driver mapping stays until its
//!   chunk or its block is mapped otherwise, or its region goes (`cuMemUnmap`, runs of chunks in
//!   one call). The core gives a block its previous chunk back when it is free, so data that
//!   goes back and forth costs no `cuMemMap`/`cuMemSetAccess`/`cuMemUnmap` after the first
//!   time; on an H100 those cost about as much as the copies themselves. Read-only mappings
//!   (duplicates) are unmapped at once: changing a live mapping's access cost more there.
//! - Copies: `cuMemcpyHtoDAsync` / `cuMemcpyDtoHAsync` on two dedicated streams (one per
//!   direction, so both copy engines work), from the region's host pages registered
//!   (`cuMemHostRegister`, through the manager's alias, one registration per
//!   `CudaConfig::pin_piece` bytes, 64 MiB by default) once for the region's life; a piece whose
//!   host pages are discarded (`Advice::DontNeed` punches them out of the file) loses its
//!   registration, since it pins the freed pages, and is registered again by the next copy
//!   that uses it. Ops of one batch that continue
//!   each other on both sides are merged into one copy, cut where a registration ends.
//!   Completions are CUDA events, waited on by polling `cuEventQuery` against a deadline.
//! - Faults: a GPU cannot report page faults to user space, so `replayable_faults` is false;
//!   the facade makes a launch's buffers resident before the kernel starts, and a launch
//!   refuses to start unless every buffer it names is mapped.
//! - Remote host access: `false`. The driver can map registered host memory for the device
//!   only at an address it chooses (the host pointer itself under unified addressing), never
//!   inside a `cuMemAddressReserve` range next to device chunks, so one buffer cannot be partly
//!   in device memory and partly in host memory behind a single pointer. Memory that does not
//!   fit is handled by launching in pieces (see `hetmm bench --device cuda`, workload `oversub`).
//! - Kernel completion and unmapping: `unmap`, `protect` and region removal first wait for the
//!   kernels in flight (a GPU cannot fault and retry), so the CPU touching a buffer a kernel
//!   is using waits for the kernel.
//! - Regions need not start on a 2 MiB boundary (memory a program registers): a region's
//!   reservation covers the 2 MiB windows it touches, each chunk is mapped whole at its window,
//!   and the core puts every page at its window offset in its block's chunk. Two regions can
//!   share a window (one ends in it, the next starts there); each maps its own chunk there in
//!   its own reservation, so the second is shifted (by whole chunks: device pointers keep their
//!   offsets in the window).
#![warn(missing_docs)]

pub mod baseline;
mod device;
mod driver;
pub mod kernels;
pub mod plan;

pub use device::{CudaConfig, CudaDevice, CudaLaunch, CudaStats, DEFAULT_PIN_PIECE};
pub use kernels::{Buf, BufUse, KernelCall};

use hetmm_core::device::DeviceError;

/// Errors of the CUDA backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    /// CUDA cannot be used on this machine (no driver library, no GPU, no NVRTC).
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    /// A driver call failed.
    #[error("CUDA driver call {call} failed: {code}")]
    Driver {
        /// The call.
        call: &'static str,
        /// The driver's status.
        code: String,
    },
    /// A kernel call was refused before launch (arguments, sizes, buffers not resident).
    #[error("kernel: {0}")]
    Kernel(String),
    /// A configuration the GPU cannot honour.
    #[error("configuration: {0}")]
    Config(String),
    /// A core-facing device error.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl From<CudaError> for DeviceError {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Device(d) => d,
            other => DeviceError::Other(other.to_string()),
        }
    }
}

/// Whether CUDA can be used here: the number of GPUs, or why not (no `libcuda`, no device).
/// Never panics, whatever is installed.
pub fn probe() -> Result<usize, CudaError> {
    driver::probe()
}

/// Whether the NVRTC library that compiles hetmm's kernels at run time can be loaded (without
/// it, the PTX the repository keeps, [`kernels::PTX`], is loaded instead).
pub fn nvrtc_available() -> bool {
    driver::nvrtc_present()
}

/// The reason tests and commands that need a GPU skip, or `None` when a GPU is usable.
pub fn skip_reason() -> Option<String> {
    probe().err().map(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without a GPU the probe answers with a reason instead of panicking, and
    /// opening a device fails cleanly with the same kind of error.
    #[test]
    fn probe_never_panics_and_explains() {
        match probe() {
            Ok(n) => {
                assert!(n > 0);
                assert!(skip_reason().is_none());
            }
            Err(e) => {
                assert!(matches!(e, CudaError::Unavailable(_)), "{e}");
                let why = skip_reason().unwrap();
                assert!(why.starts_with("CUDA is not available: "), "{why}");
                let err = CudaDevice::new(CudaConfig::default()).unwrap_err();
                assert!(matches!(err, CudaError::Unavailable(_)), "{err}");
                eprintln!("skipping GPU checks: {why}");
            }
        }
        // Loading NVRTC is only attempted, never required.
        let _ = nvrtc_available();
    }

    #[test]
    fn errors_reach_the_core_as_device_errors() {
        let d: DeviceError = CudaError::Driver { call: "cuMemMap", code: "CUDA_ERROR_OUT_OF_MEMORY".into() }.into();
        assert!(d.to_string().contains("cuMemMap"));
        let d: DeviceError = CudaError::Device(DeviceError::NoPageTable).into();
        assert_eq!(d, DeviceError::NoPageTable);
    }
}
