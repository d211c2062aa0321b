//! Where the ceiling of hetmm's host-to-device migration lies on a GPU: raw `cuMemcpyAsync`
//! bandwidth from the kinds of host memory hetmm could copy from, in the pieces hetmm copies in,
//! and with the CPU's page-table work running beside the copy.
//!
//! Sources (1 GiB each, written by the CPU first):
//! - `pinned`: `cuMemAllocHost` (the bar's reference);
//! - `memfd`: a `MAP_SHARED` memfd mapping of 4 KiB pages, `cuMemHostRegister`ed (hetmm's
//!   alias today);
//! - `anon`: private anonymous 4 KiB pages (`MADV_NOHUGEPAGE`), registered;
//! - `anon-thp`: private anonymous memory with `MADV_HUGEPAGE`, registered;
//! - `memfd-thp`: the memfd with `MADV_HUGEPAGE`, where shmem THP is `advise` or better;
//! - `hugetlb`: a `MFD_HUGETLB` memfd, where 2 MiB huge pages are reserved.
//!
//! Each is copied as one 1 GiB copy, as 512 copies of 2 MiB and as 16 of 64 MiB on one stream,
//! host to device and back, medians of 5. Last, the memfd copied while 8 threads zap a second,
//! CPU-populated view of the same file 64 MiB at a time (what a migration's revoke does beside
//! the copy of the batch before).
//!
//! `cargo run --release -p hetmm-cuda --example copy_probe [--setup]`: `--setup` (root) sets
//! shmem THP to `advise` and reserves 600 huge pages first, restoring both at the end.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{CudaContext, CudaStream};

const LEN: usize = 1 << 30;
const REPS: usize = 5;
const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
const ANON_THP: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
const NR_HUGE: &str = "/proc/sys/vm/nr_hugepages";

fn ok(r: CUresult, what: &str) {
    assert_eq!(r, CUresult::CUDA_SUCCESS, "{what}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One host buffer: its address and how to free it.
struct Host {
    ptr: *mut u8,
    registered: bool,
    pinned: bool,
    fd: Option<i32>,
}

impl Host {
    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: every Host maps LEN bytes read-write at `ptr` until drop.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, LEN) }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // SAFETY: `ptr` is ours, registered/pinned/mapped as the flags say, no copy in flight
        // (every copy is waited for).
        unsafe {
            if self.registered {
                sys::cuMemHostUnregister(self.ptr.cast());
            }
            if self.pinned {
                sys::cuMemFreeHost(self.ptr.cast());
            } else {
                libc::munmap(self.ptr.cast(), LEN);
            }
            if let Some(fd) = self.fd {
                libc::close(fd);
            }
        }
    }
}

fn memfd(flags: libc::c_uint) -> Option<i32> {
    // SAFETY: a plain syscall with a static name.
    let fd = unsafe { libc::memfd_create(c"probe".as_ptr(), flags) };
    // SAFETY: `fd` is ours.
    (fd >= 0 && unsafe { libc::ftruncate(fd, LEN as i64) } == 0).then_some(fd)
}

fn map(fd: Option<i32>, advice: Option<i32>) -> Option<*mut u8> {
    let (flags, fd) = match fd {
        Some(fd) => (libc::MAP_SHARED, fd),
        None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
    };
    // SAFETY: a new mapping chosen by the kernel.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), LEN, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        return None;
    }
    if let Some(a) = advice {
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(p, LEN, a) };
    }
    Some(p.cast())
}

fn host(kind: &str) -> Option<Host> {
    let (ptr, fd) = match kind {
        "pinned" => {
            let mut p: *mut c_void = std::ptr::null_mut();
            // SAFETY: a valid out-pointer.
            ok(unsafe { sys::cuMemAllocHost_v2(&mut p, LEN) }, "cuMemAllocHost");
            let mut h = Host { ptr: p.cast(), registered: false, pinned: true, fd: None };
            h.slice().iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
            return Some(h);
        }
        "memfd" => {
            let fd = memfd(0)?;
            (map(Some(fd), Some(libc::MADV_NOHUGEPAGE))?, Some(fd))
        }
        "memfd-thp" => {
            let fd = memfd(0)?;
            (map(Some(fd), Some(libc::MADV_HUGEPAGE))?, Some(fd))
        }
        "hugetlb" => {
            let fd = memfd(libc::MFD_HUGETLB)?;
            (map(Some(fd), None)?, Some(fd))
        }
        "anon" => (map(None, Some(libc::MADV_NOHUGEPAGE))?, None),
        "anon-thp" => (map(None, Some(libc::MADV_HUGEPAGE))?, None),
        _ => return None,
    };
    let mut h = Host { ptr, registered: false, pinned: false, fd };
    h.slice().iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    // SAFETY: LEN bytes mapped until the Host is dropped, which unregisters first.
    let r = unsafe { sys::cuMemHostRegister_v2(ptr.cast(), LEN, sys::CU_MEMHOSTREGISTER_PORTABLE) };
    if r != CUresult::CUDA_SUCCESS {
        println!("  {kind}: cuMemHostRegister failed: {r:?}");
        return None;
    }
    h.registered = true;
    Some(h)
}

/// GB/s of copying LEN bytes in pieces of `piece`, one direction, median of REPS.
fn bandwidth(s: &CudaStream, h: &Host, dev: u64, piece: usize, up: bool) -> f64 {
    let v = (0..REPS)
        .map(|_| {
            let t = Instant::now();
            for off in (0..LEN).step_by(piece) {
                // SAFETY: both buffers hold LEN bytes and live until the synchronize below.
                let r = unsafe {
                    if up {
                        sys::cuMemcpyHtoDAsync_v2(dev + off as u64, h.ptr.add(off).cast(), piece, s.cu_stream())
                    } else {
                        sys::cuMemcpyDtoHAsync_v2(h.ptr.add(off).cast(), dev + off as u64, piece, s.cu_stream())
                    }
                };
                ok(r, "cuMemcpyAsync");
            }
            s.synchronize().expect("synchronize");
            LEN as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(v)
}

/// H2D from the memfd while 8 threads zap (MADV_DONTNEED) a populated second view of the
/// file, 64 MiB per round, as many rounds as the copy lasts.
fn copy_beside_zaps(s: &CudaStream, fd: i32, h: &Host, dev: u64) -> (f64, usize) {
    let Some(view) = map(Some(fd), Some(libc::MADV_NOHUGEPAGE)) else { return (0.0, 0) };
    let view = view as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let zapped = std::thread::scope(|sc| {
        let z = sc.spawn(|| {
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) {
                let base = view + (rounds % 16) * (64 << 20);
                // Populate the piece (read faults map the file's pages), then zap it on 8 threads.
                for p in (base..base + (64 << 20)).step_by(4096) {
                    // SAFETY: inside our shared mapping of the file.
                    unsafe { std::ptr::read_volatile(p as *const u8) };
                }
                std::thread::scope(|t| {
                    for k in 0..8usize {
                        t.spawn(move || {
                            let a = base + k * (8 << 20);
                            // SAFETY: 8 MiB inside our own mapping of the file.
                            unsafe { libc::madvise(a as *mut c_void, 8 << 20, libc::MADV_DONTNEED) };
                        });
                    }
                });
                rounds += 1;
            }
            rounds
        });
        let g = bandwidth(s, h, dev, 64 << 20, true);
        stop.store(true, Ordering::Relaxed);
        (g, z.join().unwrap_or(0))
    });
    // SAFETY: our own mapping, no longer used.
    unsafe { libc::munmap(view as *mut c_void, LEN) };
    zapped
}

/// GB/s of the CPU copying the memfd into pinned memory on `threads` threads (what staging
/// through a pinned bounce buffer would add beside the DMA), median of REPS.
fn cpu_copy(src: &Host, dst: &Host, threads: usize) -> f64 {
    let (s, d) = (src.ptr as usize, dst.ptr as usize);
    let per = LEN / threads;
    let v = (0..REPS)
        .map(|_| {
            let t = Instant::now();
            std::thread::scope(|sc| {
                for k in 0..threads {
                    sc.spawn(move || {
                        // SAFETY: disjoint `per`-byte pieces of two LEN-byte buffers, no copy in
                        // flight on either.
                        unsafe {
                            std::ptr::copy_nonoverlapping((s + k * per) as *const u8, (d + k * per) as *mut u8, per)
                        };
                    });
                }
            });
            LEN as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(v)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_else(|e| format!("({e})"))
}

fn main() {
    let setup = std::env::args().any(|a| a == "--setup");
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { sys::is_culib_present() } {
        println!("copy_probe: no CUDA driver library here; nothing measured");
        return;
    }
    let ctx = match CudaContext::new(0) {
        Ok(c) => c,
        Err(e) => {
            println!("copy_probe: no GPU ({e:?}); nothing measured");
            return;
        }
    };
    ctx.bind_to_thread().expect("cuCtxSetCurrent");
    let (shmem0, huge0) = (read(SHMEM_THP), read(NR_HUGE));
    if setup {
        let _ = std::fs::write(SHMEM_THP, "advise");
        let _ = std::fs::write(NR_HUGE, "600");
    }
    println!(
        "{}; THP anon: {}; shmem: {}; nr_hugepages: {}",
        ctx.name().unwrap_or_default(),
        read(ANON_THP),
        read(SHMEM_THP),
        read(NR_HUGE)
    );
    let s = ctx.new_stream().expect("stream");
    let mut dev = 0u64;
    // SAFETY: a valid out-pointer.
    ok(unsafe { sys::cuMemAlloc_v2(&mut dev, LEN) }, "cuMemAlloc");
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>9} {:>9}   GB/s",
        "source", "H2D 1G", "H2D 2M", "H2D 64M", "D2H 1G", "D2H 2M"
    );
    let pinned = host("pinned");
    for kind in ["pinned", "memfd", "anon", "anon-thp", "memfd-thp", "hugetlb"] {
        let t = Instant::now();
        let Some(h) = host(kind) else {
            println!("{kind:<10} not available");
            continue;
        };
        let setup_ms = t.elapsed().as_secs_f64() * 1e3;
        let row = [
            bandwidth(&s, &h, dev, LEN, true),
            bandwidth(&s, &h, dev, 2 << 20, true),
            bandwidth(&s, &h, dev, 64 << 20, true),
            bandwidth(&s, &h, dev, LEN, false),
            bandwidth(&s, &h, dev, 2 << 20, false),
        ];
        let cells: Vec<String> = row.iter().map(|g| format!("{g:>9.2}")).collect();
        println!("{kind:<10} {}   (write + register {setup_ms:.0} ms)", cells.join(" "));
        if kind == "memfd" {
            if let Some(fd) = h.fd {
                let (g, rounds) = copy_beside_zaps(&s, fd, &h, dev);
                println!("memfd H2D 64M pieces beside 8-thread zaps of a second view: {g:.2} GB/s ({rounds} rounds of 64 MiB zapped)");
            }
            if let Some(p) = &pinned {
                let g: Vec<String> =
                    [1, 2, 4, 8, 12].iter().map(|&n| format!("{n} threads {:.1}", cpu_copy(&h, p, n))).collect();
                println!("CPU memcpy memfd -> pinned, GB/s: {}", g.join(", "));
            }
        }
    }
    if setup {
        let _ = std::fs::write(SHMEM_THP, shmem0.split(['[', ']']).nth(1).unwrap_or("never"));
        let _ = std::fs::write(NR_HUGE, huge0);
    }
}
