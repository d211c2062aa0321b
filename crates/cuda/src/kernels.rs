//! hetmm's CUDA kernels: CUDA C sources kept in `crates/cuda/kernels/*.cu`, compiled at run time
//! with NVRTC where it is installed, else loaded from the PTX the repository keeps beside them
//! (built from those sources by `examples/gen_ptx.rs`; a test checks it is current), and the
//! calls that launch them. A [`KernelCall`] is built only from buffers
//! ([`Buf`]) and scalars: its constructors derive the element counts and launch dimensions from
//! the buffers' sizes, so a kernel never touches memory outside the buffers it names. The
//! caller makes those buffers resident on the device before launching (the facade's
//! `Device::<CudaDevice>::launch` does it), and pointer arguments are translated to device
//! addresses at launch ([`marshal`]).

use crate::CudaError;

/// Threads per block of the one-dimensional kernels.
pub const THREADS: u32 = 256;
/// Tile edge of `mul_mat` (its blocks are `TILE x TILE` threads).
pub const TILE: u32 = 16;
/// Most blocks a one-dimensional launch uses (the kernels loop over the rest, grid-stride).
pub const MAX_BLOCKS: u32 = 1 << 16;

/// The type of one kernel parameter, in declaration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// `float`.
    F32,
    /// `unsigned long long`.
    U64,
    /// A pointer into shared memory (translated to a device address at launch).
    Ptr,
}

/// A kernel: its entry point, the file that holds it, and its parameters.
#[derive(Debug, PartialEq, Eq)]
pub struct KernelSpec {
    /// Entry point (`extern "C"`).
    pub name: &'static str,
    /// Source file under `crates/cuda/kernels`.
    pub file: &'static str,
    /// Parameters in order.
    pub params: &'static [Param],
}

/// `saxpy(float a, const float* x, float* y, u64 n)`.
pub const SAXPY: KernelSpec =
    KernelSpec { name: "saxpy", file: "saxpy.cu", params: &[Param::F32, Param::Ptr, Param::Ptr, Param::U64] };
/// `stream_sum(const u64* src, u64 n, u64* out)`.
pub const STREAM_SUM: KernelSpec =
    KernelSpec { name: "stream_sum", file: "stream.cu", params: &[Param::Ptr, Param::U64, Param::Ptr] };
/// `stream_write(u64* dst, u64 n, u64 seed)`.
pub const STREAM_WRITE: KernelSpec =
    KernelSpec { name: "stream_write", file: "stream.cu", params: &[Param::Ptr, Param::U64, Param::U64] };
/// `mul_mat(float* r, const float* a, const float* b, u64 m)`.
pub const MUL_MAT: KernelSpec =
    KernelSpec { name: "mul_mat", file: "mul_mat.cu", params: &[Param::Ptr, Param::Ptr, Param::Ptr, Param::U64] };

/// Every kernel.
pub const ALL: [&KernelSpec; 4] = [&SAXPY, &STREAM_SUM, &STREAM_WRITE, &MUL_MAT];

/// The source files, by name.
pub const SOURCES: [(&str, &str); 3] = [
    ("saxpy.cu", include_str!("../kernels/saxpy.cu")),
    ("stream.cu", include_str!("../kernels/stream.cu")),
    ("mul_mat.cu", include_str!("../kernels/mul_mat.cu")),
];

/// One NVRTC program holding every kernel.
pub fn program_source() -> String {
    SOURCES.iter().map(|(f, s)| format!("// ---- {f}\n{s}\n")).collect()
}

/// The PTX of [`program_source`], for machines without NVRTC (the driver JIT-compiles it for
/// the GPU at module load). Regenerate with `cargo run -p hetmm-cuda --example gen_ptx`.
pub const PTX: &str = include_str!("../kernels/hetmm_kernels.ptx");

/// The virtual architecture [`PTX`] is compiled for: Volta and every later GPU can load it.
pub const PTX_ARCH: &str = "compute_70";

/// FNV-1a (64-bit) of `bytes`: a digest that says whether [`PTX`] was built from the current
/// sources (not a security property).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The first line of [`PTX`]: which sources, by digest, and which architecture it was built for.
pub fn ptx_header() -> String {
    format!(
        "// hetmm_kernels.ptx: built by `cargo run -p hetmm-cuda --example gen_ptx` from crates/cuda/kernels/*.cu \
         (sources FNV-1a {:016x}), --gpu-architecture={PTX_ARCH}",
        fnv1a(program_source().as_bytes())
    )
}

/// A kernel argument as the caller gives it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// A `float`.
    F32(f32),
    /// An `unsigned long long`.
    U64(u64),
    /// A host address in shared memory.
    Ptr(u64),
}

/// A kernel argument ready for the driver (pointers already device addresses).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    /// A `float`.
    F32(f32),
    /// A 64-bit value (integer or device address).
    U64(u64),
}

/// Checks `args` against `spec` and translates pointers with `translate` (host address to
/// device address; `None` when the address is not in shared memory known to the device).
pub fn marshal(
    spec: &KernelSpec,
    args: &[Arg],
    translate: impl Fn(u64) -> Option<u64>,
) -> Result<Vec<Value>, CudaError> {
    if args.len() != spec.params.len() {
        return Err(CudaError::Kernel(format!(
            "{} takes {} arguments, {} given",
            spec.name,
            spec.params.len(),
            args.len()
        )));
    }
    spec.params
        .iter()
        .zip(args)
        .enumerate()
        .map(|(i, (p, a))| match (p, a) {
            (Param::F32, Arg::F32(v)) => Ok(Value::F32(*v)),
            (Param::U64, Arg::U64(v)) => Ok(Value::U64(*v)),
            (Param::Ptr, Arg::Ptr(va)) => translate(*va).map(Value::U64).ok_or_else(|| {
                CudaError::Kernel(format!(
                    "{} argument {i}: {va:#x} is not shared memory known to the device",
                    spec.name
                ))
            }),
            _ => Err(CudaError::Kernel(format!("{} argument {i}: expected {p:?}, got {a:?}", spec.name))),
        })
        .collect()
}

/// Launch dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
}

/// Blocks of a one-dimensional grid-stride launch over `n` elements.
pub fn blocks_for(n: u64) -> u32 {
    u32::try_from(n.div_ceil(u64::from(THREADS))).unwrap_or(u32::MAX).clamp(1, MAX_BLOCKS)
}

/// How many partial sums [`KernelCall::stream_sum`] writes for `n` elements (the size its
/// `out` buffer should have, in `u64` values): one per block, each block covering at least 16
/// elements per thread.
pub fn stream_sum_blocks(n: u64) -> u32 {
    u32::try_from(n.div_ceil(u64::from(THREADS) * 16)).unwrap_or(u32::MAX).clamp(1, 1024)
}

/// A buffer of shared memory: its host address and length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Host address (valid on the device after translation).
    pub ptr: u64,
    /// Bytes.
    pub bytes: u64,
}

/// How a kernel uses a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufUse {
    /// Loads only.
    Read,
    /// Stores (and loads).
    Write,
}

/// A kernel with its arguments, launch dimensions and the buffers it touches.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelCall {
    spec: &'static KernelSpec,
    dims: Dims,
    args: Vec<Arg>,
    bufs: Vec<(Buf, BufUse)>,
}

fn elems(b: Buf, size: u64, what: &str) -> Result<u64, CudaError> {
    match b.bytes / size {
        0 => Err(CudaError::Kernel(format!("{what}: buffer at {:#x} holds no element", b.ptr))),
        n => Ok(n),
    }
}

impl KernelCall {
    /// `y = a * x + y` over the elements both buffers hold (f32).
    pub fn saxpy(a: f32, x: Buf, y: Buf) -> Result<Self, CudaError> {
        let n = elems(x, 4, "saxpy x")?.min(elems(y, 4, "saxpy y")?);
        Ok(KernelCall {
            spec: &SAXPY,
            dims: Dims { grid: (blocks_for(n), 1, 1), block: (THREADS, 1, 1) },
            args: vec![Arg::F32(a), Arg::Ptr(x.ptr), Arg::Ptr(y.ptr), Arg::U64(n)],
            bufs: vec![(x, BufUse::Read), (y, BufUse::Write)],
        })
    }

    /// Sums every u64 of `src` into one partial sum per block in `out`: `out` must hold
    /// [`stream_sum_blocks`] values for `src`'s length (more are left alone).
    pub fn stream_sum(src: Buf, out: Buf) -> Result<Self, CudaError> {
        let n = elems(src, 8, "stream_sum src")?;
        let blocks = stream_sum_blocks(n);
        if out.bytes < u64::from(blocks) * 8 {
            return Err(CudaError::Kernel(format!("stream_sum: out holds {} values, {blocks} needed", out.bytes / 8)));
        }
        Ok(KernelCall {
            spec: &STREAM_SUM,
            dims: Dims { grid: (blocks, 1, 1), block: (THREADS, 1, 1) },
            args: vec![Arg::Ptr(src.ptr), Arg::U64(n), Arg::Ptr(out.ptr)],
            bufs: vec![(src, BufUse::Read), (Buf { ptr: out.ptr, bytes: u64::from(blocks) * 8 }, BufUse::Write)],
        })
    }

    /// `dst[i] = i ^ seed` over every u64 of `dst`.
    pub fn stream_write(dst: Buf, seed: u64) -> Result<Self, CudaError> {
        let n = elems(dst, 8, "stream_write dst")?;
        Ok(KernelCall {
            spec: &STREAM_WRITE,
            dims: Dims { grid: (blocks_for(n), 1, 1), block: (THREADS, 1, 1) },
            args: vec![Arg::Ptr(dst.ptr), Arg::U64(n), Arg::U64(seed)],
            bufs: vec![(dst, BufUse::Write)],
        })
    }

    /// `r = a x b` for `m x m` row-major f32 matrices; each buffer must hold `m * m` values.
    pub fn mul_mat(r: Buf, a: Buf, b: Buf, m: u64) -> Result<Self, CudaError> {
        let need = m.checked_mul(m).and_then(|n| n.checked_mul(4)).filter(|&n| n > 0);
        let need = need.ok_or_else(|| CudaError::Kernel(format!("mul_mat: bad size m = {m}")))?;
        for (what, buf) in [("r", r), ("a", a), ("b", b)] {
            if buf.bytes < need {
                return Err(CudaError::Kernel(format!("mul_mat: {what} holds {} bytes, {need} needed", buf.bytes)));
            }
        }
        let tiles = u32::try_from(m.div_ceil(u64::from(TILE)))
            .ok()
            .filter(|&t| t <= 65_535)
            .ok_or_else(|| CudaError::Kernel(format!("mul_mat: m = {m} is too large for one launch")))?;
        let used = |x: Buf| Buf { ptr: x.ptr, bytes: need };
        Ok(KernelCall {
            spec: &MUL_MAT,
            dims: Dims { grid: (tiles, tiles, 1), block: (TILE, TILE, 1) },
            args: vec![Arg::Ptr(r.ptr), Arg::Ptr(a.ptr), Arg::Ptr(b.ptr), Arg::U64(m)],
            bufs: vec![(used(a), BufUse::Read), (used(b), BufUse::Read), (used(r), BufUse::Write)],
        })
    }

    /// The kernel.
    pub fn spec(&self) -> &'static KernelSpec {
        self.spec
    }
    /// Launch dimensions.
    pub fn dims(&self) -> Dims {
        self.dims
    }
    /// Arguments (pointers as host addresses).
    pub fn args(&self) -> &[Arg] {
        &self.args
    }
    /// The buffers the kernel touches: exactly these bytes, no others.
    pub fn buffers(&self) -> &[(Buf, BufUse)] {
        &self.bufs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_ptx_is_built_from_the_current_sources() {
        assert_eq!(
            PTX.lines().next(),
            Some(ptx_header().as_str()),
            "crates/cuda/kernels/*.cu changed: regenerate the PTX (cargo run -p hetmm-cuda --example gen_ptx)"
        );
        for spec in ALL {
            // Every entry point, unmangled, with one `.param` per declared parameter.
            let head = format!(".entry {}(", spec.name);
            let at = PTX.find(&head).unwrap_or_else(|| panic!("{} missing from the PTX", spec.name));
            let params = &PTX[at..at + PTX[at..].find(')').unwrap()];
            assert_eq!(params.matches(".param").count(), spec.params.len(), "{}", spec.name);
        }
    }

    /// The parameter list of `name` as declared in the CUDA source.
    fn declared(src: &str, name: &str) -> Vec<Param> {
        let head = format!("extern \"C\" __global__ void {name}(");
        let at = src.find(&head).unwrap_or_else(|| panic!("{name} not declared"));
        let rest = &src[at + head.len()..];
        let list = &rest[..rest.find(')').unwrap()];
        list.split(',')
            .map(|p| {
                let p = p.trim();
                if p.contains('*') {
                    Param::Ptr
                } else if p.starts_with("float ") {
                    Param::F32
                } else if p.starts_with("unsigned long long ") {
                    Param::U64
                } else {
                    panic!("{name}: unexpected parameter {p}")
                }
            })
            .collect()
    }

    #[test]
    fn sources_are_present_and_match_the_specs() {
        for spec in ALL {
            let (_, src) = SOURCES.iter().find(|(f, _)| *f == spec.file).expect("source file");
            assert_eq!(declared(src, spec.name), spec.params, "{}", spec.name);
            assert!(program_source().contains(&format!("void {}(", spec.name)));
        }
        // The files on disk are the ones compiled in.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
        for (f, src) in SOURCES {
            assert_eq!(std::fs::read_to_string(format!("{dir}/{f}")).unwrap(), src);
        }
    }

    #[test]
    fn marshalling_translates_pointers_and_checks_types() {
        let shift = |va: u64| (va >= 0x1000).then_some(va + 0x10_0000);
        let v = marshal(&SAXPY, &[Arg::F32(2.0), Arg::Ptr(0x1000), Arg::Ptr(0x2000), Arg::U64(7)], shift).unwrap();
        assert_eq!(v, vec![Value::F32(2.0), Value::U64(0x10_1000), Value::U64(0x10_2000), Value::U64(7)]);
        let e = marshal(&SAXPY, &[Arg::F32(2.0)], shift).unwrap_err();
        assert!(e.to_string().contains("takes 4 arguments"), "{e}");
        let e = marshal(&SAXPY, &[Arg::U64(2), Arg::Ptr(0x1000), Arg::Ptr(0x2000), Arg::U64(7)], shift).unwrap_err();
        assert!(e.to_string().contains("argument 0"), "{e}");
        let e = marshal(&SAXPY, &[Arg::F32(2.0), Arg::Ptr(0x10), Arg::Ptr(0x2000), Arg::U64(7)], shift).unwrap_err();
        assert!(e.to_string().contains("not shared memory"), "{e}");
    }

    #[test]
    fn calls_stay_inside_their_buffers() {
        let x = Buf { ptr: 0x1000, bytes: 4 * 1000 };
        let y = Buf { ptr: 0x9000, bytes: 4 * 600 + 3 };
        let c = KernelCall::saxpy(3.0, x, y).unwrap();
        assert_eq!(c.args()[3], Arg::U64(600));
        assert_eq!(c.dims(), Dims { grid: (3, 1, 1), block: (256, 1, 1) });
        assert_eq!(c.buffers()[1], (y, BufUse::Write));
        assert!(KernelCall::saxpy(1.0, Buf { ptr: 0, bytes: 3 }, y).is_err());

        let n = 10_000_000u64;
        let blocks = stream_sum_blocks(n);
        assert_eq!(blocks, 1024);
        let src = Buf { ptr: 0x10_0000, bytes: n * 8 };
        assert!(KernelCall::stream_sum(src, Buf { ptr: 0x2000, bytes: 8 * 1023 }).is_err());
        let c = KernelCall::stream_sum(src, Buf { ptr: 0x2000, bytes: 8 * 4096 }).unwrap();
        assert_eq!(c.dims().grid.0, 1024);
        assert_eq!(c.buffers()[1].0.bytes, 8 * 1024, "only the partial sums written count as used");
        assert_eq!(stream_sum_blocks(1), 1);
        assert_eq!(blocks_for(u64::MAX), MAX_BLOCKS);
        assert_eq!(blocks_for(0), 1);

        let m = 100u64;
        let mb = Buf { ptr: 0x4000, bytes: m * m * 4 };
        let c = KernelCall::mul_mat(mb, mb, mb, m).unwrap();
        assert_eq!(c.dims(), Dims { grid: (7, 7, 1), block: (16, 16, 1) });
        assert!(KernelCall::mul_mat(Buf { bytes: m * m * 4 - 1, ..mb }, mb, mb, m).is_err());
        assert!(KernelCall::mul_mat(mb, mb, mb, 0).is_err());
        assert!(KernelCall::mul_mat(mb, mb, mb, u64::MAX).is_err());
        let w = KernelCall::stream_write(Buf { ptr: 0x8000, bytes: 8 * 256 * 5 }, 9).unwrap();
        assert_eq!(w.args(), &[Arg::Ptr(0x8000), Arg::U64(1280), Arg::U64(9)]);
        assert_eq!(w.spec().name, "stream_write");
    }
}
