//! Regenerates `crates/cuda/kernels/hetmm_kernels.ptx`, the PTX hetmm loads when NVRTC is not
//! installed, from the CUDA C sources in `crates/cuda/kernels/*.cu`. Needs NVRTC (any CUDA 12
//! `libnvrtc.so.12` on the loader path; no GPU). The first line records the sources' digest,
//! and a unit test fails when the sources change without the PTX being regenerated.
//!
//! `LD_LIBRARY_PATH=/path/to/nvrtc/lib cargo run -p hetmm-cuda --example gen_ptx`

use hetmm_cuda::kernels;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if !hetmm_cuda::nvrtc_available() {
        return Err("NVRTC (libnvrtc.so.12) is not on the loader path".into());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        name: Some("hetmm_kernels.cu".into()),
        arch: Some(kernels::PTX_ARCH),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(kernels::program_source(), opts)
        .map_err(|e| format!("NVRTC failed: {e:?}"))?;
    // NVRTC's own header lines (compiler release, PTX version) follow ours.
    let out = format!("{}\n{}", kernels::ptx_header(), ptx.to_src());
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/hetmm_kernels.ptx");
    std::fs::write(path, out)?;
    println!("wrote {path}");
    Ok(())
}
