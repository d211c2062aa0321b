//! The CUDA backend through the facade. Without a GPU (or without libcuda) every GPU check
//! skips, printing why; the skip path itself is checked: the commands fail with a clear message.

mod common;

use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hetmm::core::types::Proc;
use hetmm::cuda::{kernels, CudaConfig, CudaDevice, CudaError, KernelCall};
use hetmm::kernels::mul_mat_cpu;
use hetmm::Hetmm;

const WAIT: Duration = Duration::from_secs(120);

/// GPU tests run one at a time: one of them forks, and a fork quiesces every address space in
/// the process (closes its gate, flushes device data) while the others would be mid-kernel.
static SERIAL: Mutex<()> = Mutex::new(());

/// A manager and a GPU device, with this test's turn on the GPU, or `None` after printing why
/// the test skips (no GPU, or no userfaultfd on this machine: gVisor has none).
fn gpu(mem: u64) -> Option<(MutexGuard<'static, ()>, Hetmm, CudaDevice)> {
    if let Some(why) = hetmm::cuda::skip_reason() {
        eprintln!("skipped (no usable GPU): {why}");
        return None;
    }
    let turn = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let hm = match Hetmm::new() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("skipped (the host side cannot start here): {e}");
            return None;
        }
    };
    let dev = open(CudaConfig { memory_bytes: Some(mem), ..CudaConfig::default() })?;
    Some((turn, hm, dev))
}

/// The GPU with `cfg`, or `None` after printing why not: a GPU the driver lists may still be
/// unusable to this process (held by another in exclusive-process mode, out of memory).
fn open(cfg: CudaConfig) -> Option<CudaDevice> {
    CudaDevice::new(cfg).map_err(|e| eprintln!("skipped (the GPU cannot be opened): {e}")).ok()
}

#[test]
fn commands_explain_a_missing_gpu() {
    let Some(why) = hetmm::cuda::skip_reason() else {
        eprintln!("a GPU is present: the missing-GPU path is not exercised here");
        return;
    };
    assert!(matches!(CudaDevice::new(CudaConfig::default()), Err(CudaError::Unavailable(_))));
    for sub in [&["demo", "--device", "cuda", "--m", "16"][..], &["bench", "--device", "cuda", "--size", "4M"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_hetmm")).args(sub).output().unwrap();
        assert!(!out.status.success(), "{sub:?} must fail without a GPU");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("needs an NVIDIA GPU") && err.contains(&why), "{sub:?}: {err}");
    }
}

#[test]
fn gpu_mul_mat_saxpy_stream() {
    let Some((_turn, hm, g)) = gpu(64 << 20) else { return };
    let dev = hm.attach(g).unwrap();

    // mul_mat with the CPU's pointers, checked bit for bit.
    let m = 200;
    let n = m * m;
    let (mut a, mut b, r) = (hm.alloc::<f32>(n).unwrap(), hm.alloc::<f32>(n).unwrap(), hm.alloc::<f32>(n).unwrap());
    a.as_mut_slice().iter_mut().enumerate().for_each(|(i, v)| *v = (i % 7) as f32);
    b.as_mut_slice().iter_mut().enumerate().for_each(|(i, v)| *v = (i % 5) as f32);
    let call = KernelCall::mul_mat((&r).into(), (&a).into(), (&b).into(), m as u64).unwrap();
    dev.launch(&call).unwrap().wait_timeout(WAIT).unwrap();
    let mut expect = vec![0f32; n];
    mul_mat_cpu(&mut expect, &a.as_slice(), &b.as_slice(), m);
    assert_eq!(r.as_slice(), &expect[..]);

    // Every shared pointer translates; the offset is the region's.
    let d = dev.driver();
    let p = d.region_placement(a.ptr()).unwrap();
    assert_eq!(d.device_ptr(a.ptr() + 4), Some(p.dev_base + 4));

    // saxpy over a buffer that ends mid-block, twice (data comes back to the CPU between).
    let len = (3 << 20) / 4 + 123;
    let (mut x, mut y) = (hm.alloc::<f32>(len).unwrap(), hm.alloc::<f32>(len).unwrap());
    x.as_mut_slice().fill(1.0);
    y.as_mut_slice().fill(1.0);
    for round in 1..=2 {
        let call = KernelCall::saxpy(2.0, (&x).into(), (&y).into()).unwrap();
        dev.launch(&call).unwrap().wait_timeout(WAIT).unwrap();
        assert!(y.as_slice().iter().all(|v| *v == 1.0 + 2.0 * round as f32));
    }

    // stream_write, then stream_sum of what it wrote.
    let cnt = 1 << 20;
    let s = hm.alloc::<u64>(cnt).unwrap();
    let out = hm.alloc::<u64>(kernels::stream_sum_blocks(cnt as u64) as usize).unwrap();
    dev.launch(&KernelCall::stream_write((&s).into(), 7).unwrap()).unwrap().wait_timeout(WAIT).unwrap();
    dev.launch(&KernelCall::stream_sum((&s).into(), (&out).into()).unwrap()).unwrap().wait_timeout(WAIT).unwrap();
    let want = (0..cnt as u64).fold(0u64, |acc, i| acc.wrapping_add(i ^ 7));
    assert_eq!(out.as_slice().iter().fold(0u64, |acc, v| acc.wrapping_add(*v)), want);
    assert!(s.as_slice().iter().enumerate().all(|(i, v)| *v == i as u64 ^ 7));
    let st = d.stats();
    assert!(st.bytes_h2d > 0 && st.bytes_d2h > 0 && st.kernels >= 5);
    assert_eq!(st.bytes_staged, 0, "host pages are registered once per region");
}

#[test]
fn gpu_refuses_what_it_cannot_do() {
    let Some((_turn, hm, g)) = gpu(8 << 20) else { return };
    let dev = hm.attach(g).unwrap();
    // The driver alone refuses a buffer that is not resident.
    let x = hm.alloc::<f32>(1024).unwrap();
    // SAFETY: no slice of `x` is alive (and the launch is refused: nothing is mapped).
    let e = unsafe { dev.driver().launch(&KernelCall::stream_write((&x).into(), 1).unwrap()) }.unwrap_err();
    assert!(matches!(e, CudaError::Kernel(_)), "{e}");
    // A working set larger than the GPU memory hetmm may use cannot be made resident at once.
    let big = hm.alloc::<u64>((16 << 20) / 8).unwrap();
    let r = dev.launch(&KernelCall::stream_write((&big).into(), 1).unwrap());
    assert!(r.is_err());
    // Explicit migration both ways keeps the data.
    let mut y = hm.alloc::<u64>(4096).unwrap();
    y.as_mut_slice().iter_mut().enumerate().for_each(|(i, v)| *v = i as u64);
    hm.migrate(y.ptr(), y.byte_len(), dev.proc()).unwrap();
    hm.migrate(y.ptr(), y.byte_len(), Proc::Cpu).unwrap();
    assert!(y.as_slice().iter().enumerate().all(|(i, v)| *v == i as u64));
}

/// fork() with a GPU attached: data the GPU wrote (its only copy in GPU memory, the host copy
/// stale) reaches the child, which only reads it (a CUDA context is not usable in a fork
/// child); the parent's GPU keeps its data and keeps working.
#[test]
fn gpu_fork_child_sees_gpu_written_data() {
    let Some((_turn, hm, g)) = gpu(64 << 20) else { return };
    let dev = hm.attach(g).unwrap();
    let cnt = 1 << 20;
    let s = hm.alloc::<u64>(cnt).unwrap();
    dev.launch(&KernelCall::stream_write((&s).into(), 7).unwrap()).unwrap().wait_timeout(WAIT).unwrap();
    let before = hm.stats();
    let ptr = s.ptr() as *const u64;
    // SAFETY: the child only reads inherited memory and `_exit`s: no allocation, lock or CUDA call.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: `s` (`cnt` u64s at `ptr`) is alive and inherited, its GPU data flushed to the
        // host before the fork; the child has no other thread, and nothing writes it.
        let v = unsafe { std::slice::from_raw_parts(ptr, cnt) };
        let ok = v.iter().enumerate().all(|(i, x)| *x == i as u64 ^ 7);
        // SAFETY: `_exit` has no preconditions; it ends the child without running the parent's exit
        // handlers.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let status = common::wait_status_within(pid, WAIT).expect("the child did not end (killed)");
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child status {status:#x}");
    assert!(hm.stats().since(&before).bytes_fork_flushed >= (cnt * 8) as u64);
    dev.launch(&KernelCall::stream_write((&s).into(), 9).unwrap()).unwrap().wait_timeout(WAIT).unwrap();
    assert!(s.as_slice().iter().enumerate().all(|(i, v)| *v == i as u64 ^ 9));
}

/// Three CPU threads share one GPU whose memory (64 MiB) holds fewer than the six 16 MiB buffers
/// they work on: each thread alternates between its two buffers, the GPU writes one, the CPU
/// checks every word and rewrites part of it, the GPU sums it. Launches evict the other threads'
/// buffers while those threads read and write theirs on the CPU; a running job's buffers are
/// never taken. Every word and every sum is checked.
#[test]
fn gpu_races_cpu_threads_and_kernels_over_a_small_gpu() {
    let Some((_turn, hm, g)) = gpu(64 << 20) else { return };
    let dev = hm.attach(g).unwrap();
    let words = (16 << 20) / 8;
    let mut bufs: Vec<_> = (0..6).map(|_| hm.alloc::<u64>(words).unwrap()).collect();
    let sums = kernels::stream_sum_blocks(words as u64) as usize;
    let mut outs: Vec<_> = (0..3).map(|_| hm.alloc::<u64>(sums).unwrap()).collect();
    std::thread::scope(|s| {
        for (t, (pair, out)) in bufs.chunks_mut(2).zip(outs.iter_mut()).enumerate() {
            let dev = &dev;
            s.spawn(move || {
                for round in 0..6u64 {
                    let buf = &mut pair[(round % 2) as usize];
                    let seed = (t as u64) << 32 | round;
                    dev.launch(&KernelCall::stream_write((&*buf).into(), seed).unwrap())
                        .unwrap()
                        .wait_timeout(WAIT)
                        .unwrap();
                    let mut v = buf.as_mut_slice();
                    let bad = v.iter().enumerate().filter(|(i, x)| **x != *i as u64 ^ seed).count();
                    assert_eq!(bad, 0, "thread {t} round {round}: words the GPU wrote");
                    // The CPU rewrites every third word; the GPU then sums what is there.
                    for (i, x) in v.iter_mut().enumerate().step_by(3) {
                        *x = i as u64 * 3 + round;
                    }
                    let want = v.iter().fold(0u64, |a, x| a.wrapping_add(*x));
                    drop(v);
                    dev.launch(&KernelCall::stream_sum((&*buf).into(), (&*out).into()).unwrap())
                        .unwrap()
                        .wait_timeout(WAIT)
                        .unwrap();
                    let got = out.as_slice().iter().fold(0u64, |a, x| a.wrapping_add(*x));
                    assert_eq!(got, want, "thread {t} round {round}: the GPU's sum");
                }
            });
        }
    });
    let st = hm.stats();
    assert!(st.evictions > 0, "the buffers outgrow the GPU: {st:?}");
    assert_eq!(st.cpu_fault_errors, 0);
}

/// Read-only memory on a GPU: after `protect(READ)` a kernel may read the buffer (mapped
/// read-only with `cuMemSetAccess`) but a kernel that writes it is refused before it starts, and
/// the data stays as the CPU wrote it; write access given back, the GPU writes again and the
/// CPU sees it.
#[test]
fn gpu_read_only_memory() {
    let Some((_turn, hm, g)) = gpu(64 << 20) else { return };
    let dev = hm.attach(g).unwrap();
    // Two whole 2 MiB blocks and part of a third.
    let words = (5 << 20) / 8 + 77;
    let mut s = hm.alloc::<u64>(words).unwrap();
    s.as_mut_slice().iter_mut().enumerate().for_each(|(i, v)| *v = i as u64 * 5);
    let out = hm.alloc::<u64>(kernels::stream_sum_blocks(words as u64) as usize).unwrap();
    let want = (0..words as u64).fold(0u64, |a, i| a.wrapping_add(i * 5));
    hm.protect(s.ptr(), s.byte_len(), hetmm::core::types::Prot::READ).unwrap();

    dev.launch(&KernelCall::stream_sum((&s).into(), (&out).into()).unwrap()).unwrap().wait_timeout(WAIT).unwrap();
    assert_eq!(out.as_slice().iter().fold(0u64, |a, v| a.wrapping_add(*v)), want, "the GPU reads read-only memory");
    let e = dev.launch(&KernelCall::stream_write((&s).into(), 9).unwrap()).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("read-only"), "a kernel writing read-only memory is refused: {e}");
    assert!(s.as_slice().iter().enumerate().all(|(i, v)| *v == i as u64 * 5), "the data is as the CPU wrote it");

    hm.protect(s.ptr(), s.byte_len(), hetmm::core::types::Prot::READ | hetmm::core::types::Prot::WRITE).unwrap();
    dev.launch(&KernelCall::stream_write((&s).into(), 9).unwrap()).unwrap().wait_timeout(WAIT).unwrap();
    assert!(s.as_slice().iter().enumerate().all(|(i, v)| *v == i as u64 ^ 9), "the GPU writes once it may");
    assert_eq!(hm.stats().cpu_fault_errors, 0);
}

/// This test's turn, the manager, the GPU, and `x` and `y` (see [`saxpy_in_8mib_pieces`]).
type Pieces = (MutexGuard<'static, ()>, Hetmm, hetmm::Device<CudaDevice>, hetmm::SharedBuf<f32>, hetmm::SharedBuf<f32>);

/// The manager and the turn as every GPU test gets them, the GPU attached again pinning host
/// memory in pieces of 8 MiB, and `x` and `y` of 12 MiB each (a piece and a half) after one
/// `y = 2x + y` on the GPU from ones (so `y` holds 3.0).
fn saxpy_in_8mib_pieces() -> Option<Pieces> {
    let (turn, hm, default) = gpu(64 << 20)?;
    drop(default);
    let cfg = CudaConfig { memory_bytes: Some(64 << 20), pin_piece: 8 << 20, ..CudaConfig::default() };
    let g = open(cfg)?;
    let dev = hm.attach(g).unwrap();
    let n = (12 << 20) / 4;
    let (mut x, mut y) = (hm.alloc::<f32>(n).unwrap(), hm.alloc::<f32>(n).unwrap());
    x.as_mut_slice().fill(1.0);
    y.as_mut_slice().fill(1.0);
    dev.launch(&KernelCall::saxpy(2.0, (&x).into(), (&y).into()).unwrap()).unwrap().wait_timeout(WAIT).unwrap();
    Some((turn, hm, dev, x, y))
}

/// Host memory pinned in pieces of several blocks (`CudaConfig::pin_piece`): copies that
/// continue each other are merged, none is staged, and a `DontNeed` inside a piece registers it
/// again, so the GPU reads the pages the CPU wrote afterwards, not the freed ones.
#[test]
fn gpu_pinned_pieces_merge_copies_and_follow_dont_need() {
    let Some((_turn, hm, dev, x, mut y)) = saxpy_in_8mib_pieces() else { return };
    assert!(y.as_slice().iter().all(|v| *v == 3.0));
    // 1 MiB in the second piece: dropped, then written by the CPU into fresh host pages.
    let (lo, hi) = ((9 << 20) / 4, (10 << 20) / 4);
    hm.advise(y.ptr() + (9 << 20), 1 << 20, hetmm::Advice::DontNeed).unwrap();
    assert!(y.as_slice()[lo..hi].iter().all(|v| *v == 0.0), "DontNeed reads zeros");
    y.as_mut_slice()[lo..hi].fill(5.0);
    dev.launch(&KernelCall::saxpy(2.0, (&x).into(), (&y).into()).unwrap()).unwrap().wait_timeout(WAIT).unwrap();
    for (i, v) in y.as_slice().iter().enumerate() {
        let want = if (lo..hi).contains(&i) { 7.0 } else { 5.0 };
        assert_eq!(*v, want, "y[{i}]");
    }
    let st = dev.driver().stats();
    eprintln!("{} copies for {} bytes each way in {} batches", st.copies, st.bytes_h2d, st.copy_batches);
    assert_eq!(st.bytes_staged, 0, "every copy ran from pinned pages");
    assert!(st.copies > 0);
}

/// The program's own `MADV_REMOVE` over memory the GPU holds, across three blocks and two pinned
/// pieces: the pieces are unpinned once (the core reports the whole range, not each block), the
/// device data comes home, and the GPU then reads what the CPU writes there afterwards, every
/// copy from pinned pages.
#[test]
fn gpu_the_programs_own_discard_pins_the_new_pages() {
    let Some((_turn, hm, dev, x, mut y)) = saxpy_in_8mib_pieces() else { return };
    // 6 MiB from 5 MiB: the end of the first piece and the start of the second.
    let (off, len) = (5usize << 20, 6usize << 20);
    // SAFETY: the range lies inside `y`, which this test owns; no slice of it is held.
    let r = unsafe { libc::madvise((y.ptr() as usize + off) as *mut libc::c_void, len, libc::MADV_REMOVE) };
    assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
    let (lo, hi) = (off / 4, (off + len) / 4);
    // The GPU held every page: each keeps its data or reads zeros (the core's invalidate module
    // notes: the REMOVE event does not say whether the program removed or only dropped them).
    assert!(y.as_slice()[lo..hi].iter().all(|v| *v == 3.0 || *v == 0.0));
    y.as_mut_slice()[lo..hi].fill(5.0);
    dev.launch(&KernelCall::saxpy(2.0, (&x).into(), (&y).into()).unwrap()).unwrap().wait_timeout(WAIT).unwrap();
    for (i, v) in y.as_slice().iter().enumerate() {
        let want = if (lo..hi).contains(&i) { 7.0 } else { 5.0 };
        assert_eq!(*v, want, "y[{i}]");
    }
    assert_eq!(dev.driver().stats().bytes_staged, 0, "every copy ran from pinned pages");
    assert_eq!(hm.stats().cpu_fault_errors, 0);
}

/// Memory a program registers need not start on a 2 MiB boundary: `x` starts 64 KiB into a
/// window and `y` in the window where `x` ends (so they cannot both sit at the host's
/// addresses), saxpy runs twice with every element checked, the device pointers
/// keep their offsets in the window, and the data stays in place after `unregister`.
#[test]
fn gpu_registered_memory_need_not_start_on_a_2mib_boundary() {
    let Some((_turn, hm, g)) = gpu(64 << 20) else { return };
    let dev = hm.attach(g).unwrap();
    let (len, span) = ((3usize << 20) + (64 << 10), 12usize << 20);
    let map = common::private_anon(span);
    let x_at = map.next_multiple_of(2 << 20) + (64 << 10);
    let y_at = x_at + len;
    let n = len / 4;
    // Both lie inside the mapping (at most 2 MiB + 64 KiB + 2 * len < 12 MiB in); the slices
    // are made again after each launch has been waited for.
    // SAFETY: in the mapping, disjoint, and no slice is held while a kernel writes `y`.
    let slices = || unsafe {
        (std::slice::from_raw_parts_mut(x_at as *mut f32, n), std::slice::from_raw_parts_mut(y_at as *mut f32, n))
    };
    {
        let (x, y) = slices();
        x.fill(1.0);
        y.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 1000) as f32);
    }
    hm.register(x_at as *const u8, len).unwrap();
    hm.register(y_at as *const u8, len).unwrap();
    let d = dev.driver();
    for at in [x_at, y_at] {
        let p = d.device_ptr(at as u64 + 4).unwrap();
        assert_eq!(p % (2 << 20), (at as u64 + 4) % (2 << 20), "{at:#x}: shifted by whole chunks only");
    }
    let same = |at: usize| d.region_placement(at as u64).unwrap().same_address();
    assert!(!(same(x_at) && same(y_at)), "y's first window is x's last: both cannot have the host's addresses");
    let (xb, yb) = (
        hetmm::cuda::Buf { ptr: x_at as u64, bytes: len as u64 },
        hetmm::cuda::Buf { ptr: y_at as u64, bytes: len as u64 },
    );
    for round in 1..=2 {
        // Registered memory is no buffer of `Hetmm::alloc`: the checked `launch` refuses it
        // (`Error::NotBuffers`). SAFETY: no slice of `x` or `y` is alive while the kernel runs
        // (they are made again only after the wait).
        let l = unsafe { dev.launch_unchecked(&KernelCall::saxpy(2.0, xb, yb).unwrap()) };
        l.unwrap().wait_timeout(WAIT).unwrap();
        let (_, y) = slices();
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (i % 1000) as f32 + 2.0 * round as f32, "round {round}: y[{i}]");
        }
    }
    hm.unregister(x_at as *const u8, len).unwrap();
    hm.unregister(y_at as *const u8, len).unwrap();
    let (x, y) = slices();
    assert!(x.iter().all(|v| *v == 1.0));
    assert!(y.iter().enumerate().all(|(i, v)| *v == (i % 1000) as f32 + 4.0), "the data stays after unregister");
    assert_eq!(d.stats().bytes_staged, 0, "every copy ran from pinned pages");
    // SAFETY: this test's mapping; nothing refers to it now.
    assert_eq!(unsafe { libc::munmap(map as *mut _, span) }, 0);
}
