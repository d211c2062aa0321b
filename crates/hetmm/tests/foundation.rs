//! The foundation's acceptance tests, on the simulated device with the real host side
//! (memfd + userfaultfd): data moves both ways byte-exactly, counters match the migrations,
//! CPU threads and kernels race, kernel-mode accesses work, oversubscription loses nothing, bad
//! input gets typed errors, and teardown with work in flight ends.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hetmm::core::device::{DeviceError, FaultCancel};
use hetmm::core::error::CoreError;
use hetmm::core::types::{Proc, PAGE_SIZE};
use hetmm::kernels::{mul_mat, mul_mat_cpu, stream_sum, stream_write};
use hetmm::sim::{BlockCtx, Grid, SimConfig, SimDevice};
use hetmm::{Access, Device, Error, Hetmm, Use};

fn setup(mem: u64) -> (Hetmm, Device<SimDevice>) {
    let _ = env_logger::builder().is_test(true).try_init();
    let hm = Hetmm::new().expect("userfaultfd and memfd are available");
    let dev = hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: mem, ..SimConfig::default() }).unwrap()).unwrap();
    (hm, dev)
}

const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;

/// An address space with two simulated devices of 16 MiB, peers of each other when `peer`.
fn two_devices(peer: bool) -> (Hetmm, [Device<SimDevice>; 2]) {
    let hm = Hetmm::new().expect("userfaultfd and memfd are available");
    let cfg = SimConfig { memory_bytes: 16 << 20, peer_copies: peer, ..SimConfig::default() };
    let devs = [
        hm.attach_sim(SimDevice::new(cfg.clone()).unwrap()).unwrap(),
        hm.attach_sim(SimDevice::new(cfg).unwrap()).unwrap(),
    ];
    (hm, devs)
}

/// A kernel over `pages` pages of u64 at `base`: each block owns one page and applies `f(page,
/// word, old) -> new` to each word.
fn per_page<F>(base: u64, pages: usize, f: F) -> (Grid, impl Fn(&BlockCtx) -> Result<(), DeviceError> + Send + Sync)
where
    F: Fn(usize, usize, u64) -> u64 + Send + Sync,
{
    let k = move |ctx: &BlockCtx| {
        let p = ctx.block_idx() as usize;
        let va = base + p as u64 * PAGE_SIZE;
        let mut buf = vec![0u64; WORDS_PER_PAGE];
        ctx.read_slice(va, &mut buf)?;
        for (w, v) in buf.iter_mut().enumerate() {
            *v = f(p, w, *v);
        }
        ctx.write_slice(va, &buf)
    };
    (Grid { blocks: pages as u32, threads_per_block: 64 }, k)
}

#[test]
fn cpu_writes_device_reads_and_device_writes_cpu_reads() {
    let (hm, dev) = setup(64 << 20);
    let n = (3 << 20) / 8 + 123; // spans two blocks, ends mid-page
    let mut src = hm.alloc::<u64>(n).unwrap();
    let dst = hm.alloc::<u64>(n).unwrap();
    for (i, v) in src.as_mut_slice().iter_mut().enumerate() {
        *v = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    // Device copy kernel: reads src (device faults, H2D), writes dst (zero-fill on device).
    let (s, d) = (src.ptr(), dst.ptr());
    let k = move |ctx: &BlockCtx| {
        let start = ctx.block_idx() as usize * 4096;
        let len = 4096.min(n - start);
        let mut buf = vec![0u64; len];
        ctx.read_slice(s + start as u64 * 8, &mut buf)?;
        ctx.write_slice(d + start as u64 * 8, &buf)
    };
    let grid = Grid { blocks: n.div_ceil(4096) as u32, threads_per_block: 32 };
    dev.launch(grid, &[Use::read(&src), Use::write(&dst)], k).unwrap().wait().unwrap();
    let st = hm.stats();
    assert!(st.device_faults > 0 && st.fault_batches > 0);
    assert_eq!(st.bytes_to_device, src.byte_len().div_ceil(PAGE_SIZE) * PAGE_SIZE, "src moved once");
    assert_eq!(
        st.bytes_zero_filled,
        dst.byte_len().div_ceil(PAGE_SIZE) * PAGE_SIZE,
        "dst zero-filled on device, not copied"
    );
    // The CPU reads dst: faults bring it back.
    for (i, v) in dst.as_slice().iter().enumerate() {
        assert_eq!(*v, (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15), "word {i}");
    }
    assert!(settled_stats(&hm).cpu_faults > 0);
}

#[test]
fn ping_pong_100_rounds_moves_each_page_once_per_direction() {
    let (hm, dev) = setup(64 << 20);
    let pages = 256; // 1 MiB: inside one fault-around chunk and one block
    let n = pages * WORDS_PER_PAGE;
    let mut buf = hm.alloc::<u64>(n).unwrap();
    let bytes = buf.byte_len();
    for round in 0..100u64 {
        let before = hm.stats();
        for (i, v) in buf.as_mut_slice().iter_mut().enumerate() {
            *v = i as u64 ^ (round << 32);
        }
        let after_cpu = hm.stats();
        let (grid, k) = per_page(buf.ptr(), pages, move |p, w, old| {
            assert_eq!(old, (p * WORDS_PER_PAGE + w) as u64 ^ (round << 32));
            old + 1
        });
        dev.launch(grid, &[Use::write(&buf)], k).unwrap().wait().unwrap();
        let after_dev = hm.stats();
        for (i, v) in buf.as_slice().iter().enumerate() {
            assert_eq!(*v, (i as u64 ^ (round << 32)) + 1, "round {round} word {i}");
        }
        let round_total = hm.stats().since(&before);
        let devd = after_dev.since(&after_cpu);
        assert_eq!(after_cpu.since(&before).bytes_to_device, 0, "CPU writes move nothing to the device");
        assert_eq!(devd.bytes_to_device, bytes, "round {round}: one migration to the device per page");
        assert_eq!(devd.bytes_to_host, 0, "the kernel moves nothing back");
        assert_eq!(round_total.bytes_to_host, bytes, "round {round}: one migration back per page");
        assert_eq!(round_total.bytes_to_device, bytes);
    }
}

/// Two simulated devices take turns updating one buffer. With their peer windows (the default)
/// each turn's data comes from the other device's memory in one copy and nothing goes through
/// host memory; without them, every turn copies the buffer home and out again. The CPU then
/// reads every word.
#[test]
fn two_devices_take_turns_peer_to_peer() {
    let _ = env_logger::builder().is_test(true).try_init();
    let step = |old: u64| old.wrapping_mul(3).wrapping_add(1);
    for peer in [true, false] {
        let (hm, devs) = two_devices(peer);
        let pages = 1024; // 4 MiB
        let n = pages * WORDS_PER_PAGE;
        let mut buf = hm.alloc::<u64>(n).unwrap();
        for (i, v) in buf.as_mut_slice().iter_mut().enumerate() {
            *v = i as u64;
        }
        let rounds = 6u64;
        let before = hm.stats();
        for r in 0..rounds {
            let (grid, k) = per_page(buf.ptr(), pages, move |_, _, old| step(old));
            devs[r as usize % 2].launch(grid, &[Use::write(&buf)], k).unwrap().wait().unwrap();
        }
        let st = hm.stats().since(&before);
        let (bytes, turns) = (buf.byte_len(), rounds - 1);
        let from_peers: u64 = devs.iter().map(|d| d.driver().stats().bytes_from_peers).sum();
        if peer {
            assert_eq!(st.bytes_device_to_device, turns * bytes, "peer copies");
            assert_eq!(from_peers, turns * bytes, "the sim's copy engines read the peers");
            assert_eq!((st.bytes_to_host, st.bytes_to_device), (0, bytes), "only the first turn's data from the CPU");
        } else {
            assert_eq!((st.bytes_device_to_device, from_peers), (0, 0));
            assert_eq!((st.bytes_to_host, st.bytes_to_device), (turns * bytes, rounds * bytes), "through host memory");
        }
        for (i, v) in buf.as_slice().iter().enumerate() {
            let want = (0..rounds).fold(i as u64, |x, _| step(x));
            assert_eq!(*v, want, "peer {peer}: word {i}");
        }
    }
}

/// `AccessedBy` a second device, with the data on the first: the second device's kernel reads and
/// updates the first device's copy in place through its peer window (its accesses cross the
/// link: counted as remote bytes), and nothing migrates. The CPU then reads every word.
#[test]
fn accessed_by_reaches_the_data_on_a_peer_in_place() {
    let _ = env_logger::builder().is_test(true).try_init();
    let (hm, [a, b]) = two_devices(true);
    let pages = 512; // 2 MiB
    let buf = hm.alloc::<u64>(pages * WORDS_PER_PAGE).unwrap();
    let (grid, k) = per_page(buf.ptr(), pages, |p, w, _| (p * WORDS_PER_PAGE + w) as u64);
    a.launch(grid, &[Use::write(&buf)], k).unwrap().wait().unwrap();
    hm.advise_buf(&buf, hetmm::Advice::AccessedBy(b.proc(), true)).unwrap().wait(Duration::from_secs(10)).unwrap();
    let before = hm.stats();
    let remote_before = b.driver().stats().remote_bytes;
    let (grid, k) = per_page(buf.ptr(), pages, |_, _, old| old * 3);
    b.launch(grid, &[Use::write(&buf)], k).unwrap().wait().unwrap();
    let st = hm.stats().since(&before);
    assert_eq!((st.bytes_to_device, st.bytes_to_host, st.bytes_device_to_device), (0, 0, 0), "nothing migrates");
    assert_eq!(b.driver().stats().remote_bytes - remote_before, 2 * buf.byte_len(), "read and written in place");
    for (i, v) in buf.as_slice().iter().enumerate() {
        assert_eq!(*v, i as u64 * 3, "word {i}");
    }
}

/// A device detached while another copies its data peer to peer: the detach brings what it
/// still holds home, the copying device gets the rest from its memory first, and every word of
/// the buffer is right afterwards, wherever it went.
#[test]
fn detaching_a_peer_while_data_comes_from_it_loses_nothing() {
    let _ = env_logger::builder().is_test(true).try_init();
    for round in 0..8u64 {
        let (hm, [a, b]) = two_devices(true);
        let pages = 1024; // 4 MiB
        let buf = hm.alloc::<u64>(pages * WORDS_PER_PAGE).unwrap();
        let (grid, k) = per_page(buf.ptr(), pages, move |p, w, _| (p * WORDS_PER_PAGE + w) as u64 ^ round);
        a.launch(grid, &[Use::write(&buf)], k).unwrap().wait().unwrap();
        let (grid, k) = per_page(buf.ptr(), pages, |_, _, old| old.wrapping_add(1));
        let running = b.launch(grid, &[Use::write(&buf)], k).unwrap();
        if round % 2 == 1 {
            std::thread::sleep(Duration::from_micros(200 * round));
        }
        hm.detach(&a).unwrap();
        running.wait().unwrap();
        for (i, v) in buf.as_slice().iter().enumerate() {
            assert_eq!(*v, (i as u64 ^ round).wrapping_add(1), "round {round}: word {i}");
        }
    }
}

#[test]
fn cpu_threads_and_kernels_race_on_interleaved_pages() {
    let (hm, dev) = setup(64 << 20);
    let pages = 1024; // 4 MiB, two blocks
    let n = pages * WORDS_PER_PAGE;
    let buf = hm.alloc::<u64>(n).unwrap();
    let base = buf.ptr();
    let iters = 12u64;
    let cpu_val = |it: u64, p: usize, w: usize| (it << 48) | ((p as u64) << 16) | w as u64 | 1 << 63;
    let dev_val = |it: u64, p: usize, w: usize| (it << 48) | ((p as u64) << 16) | w as u64;
    std::thread::scope(|s| {
        for t in 0..2usize {
            let buf = &buf;
            s.spawn(move || {
                // Even pages belong to the CPU; thread t owns pages with p % 4 == 2t. Writes go
                // through a raw pointer: the buffer is shared with the device by design.
                let ptr = buf.ptr() as *mut u64;
                for it in 0..iters {
                    for p in (2 * t..pages).step_by(4) {
                        for w in 0..WORDS_PER_PAGE {
                            // SAFETY: inside the buffer; only this thread writes this page.
                            unsafe { ptr.add(p * WORDS_PER_PAGE + w).write_volatile(cpu_val(it, p, w)) };
                        }
                    }
                }
            });
        }
        for it in 0..iters {
            let k = move |ctx: &BlockCtx| {
                let p = ctx.block_idx() as usize * 2 + 1; // odd pages belong to the device
                let data: Vec<u64> = (0..WORDS_PER_PAGE).map(|w| dev_val(it, p, w)).collect();
                ctx.write_slice(base + p as u64 * PAGE_SIZE, &data)
            };
            let grid = Grid { blocks: (pages / 2) as u32, threads_per_block: 32 };
            dev.launch(grid, &[Use::write(&buf)], k).unwrap().wait().unwrap();
        }
    });
    for (i, v) in buf.as_slice().iter().enumerate() {
        let (p, w) = (i / WORDS_PER_PAGE, i % WORDS_PER_PAGE);
        let want = if p % 2 == 0 { cpu_val(iters - 1, p, w) } else { dev_val(iters - 1, p, w) };
        assert_eq!(*v, want, "page {p} word {w}");
    }
}

fn on_device(hm: &Hetmm, dev: &Device<SimDevice>, va: u64) -> bool {
    hm.space().page_state(va).is_some_and(|pg| pg.resident.has(dev.proc().proc()) && !pg.resident.has(Proc::Cpu))
}

#[test]
fn read_and_write_syscalls_on_device_resident_memory() {
    let (hm, dev) = setup(64 << 20);
    if !hm.kernel_faults_supported() {
        eprintln!("SKIP: userfaultfd is user-mode only here; kernel-mode accesses cannot be served");
        return;
    }
    let len = (1 << 20) + 3 * PAGE_SIZE as usize;
    let mut file = tempfile();
    let pattern: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    file.write_all(&pattern).unwrap();

    // read(2) into memory whose pages sit on the device.
    let mut buf = hm.alloc::<u8>(len).unwrap();
    hm.migrate(buf.ptr(), buf.byte_len().div_ceil(PAGE_SIZE) * PAGE_SIZE, dev.proc()).unwrap();
    assert!(on_device(&hm, &dev, buf.ptr()));
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_exact(&mut buf.as_mut_slice()).unwrap();
    assert!(buf.as_slice() == pattern[..], "read(2) filled device-resident memory correctly");

    // write(2) from memory the device wrote.
    let words = len / 8;
    let src = hm.alloc::<u64>(words).unwrap();
    let (grid, k) = stream_write(src.ptr(), words, 0xABCD);
    dev.launch(grid, &[Use::write(&src)], k).unwrap().wait().unwrap();
    assert!(on_device(&hm, &dev, src.ptr()));
    let mut out = tempfile();
    // SAFETY-free view of the u64s as bytes.
    let view = src.as_slice();
    let bytes: &[u8] = bytemuck_cast(&view);
    out.write_all(bytes).unwrap();
    out.seek(SeekFrom::Start(0)).unwrap();
    let mut back = Vec::new();
    out.read_to_end(&mut back).unwrap();
    let expect: Vec<u8> = (0..words as u64).flat_map(|i| (i ^ 0xABCD).to_ne_bytes()).collect();
    assert!(back == expect, "write(2) from device-resident memory wrote the device's data");
}

fn bytemuck_cast(v: &[u64]) -> &[u8] {
    // The facade re-exports no bytemuck; a u64 slice is always viewable as bytes.
    let (pre, mid, post) = {
        // SAFETY: u8 has alignment 1 and every byte of a u64 is initialised.
        unsafe { v.align_to::<u8>() }
    };
    assert!(pre.is_empty() && post.is_empty());
    mid
}

fn tempfile() -> std::fs::File {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("hetmm-test-{}-{}", std::process::id(), rand_suffix()));
    let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

#[test]
fn device_memory_smaller_than_data_loses_nothing() {
    let (hm, dev) = setup(4 << 20);
    let st = write_then_sum_8x_the_device(hm, dev);
    assert_eq!(st.background_evictions, 0, "no background evictor on a device this small at 5%");
}

/// The same with a 50% free watermark: hetmm's background evictor keeps a whole block of the
/// two free, racing the fault service (at the default 5% a device this small has none). The
/// thrashing response is off, so that every block passes through the device: with it, the device
/// soon serves the data remotely, and on a loaded machine the fault path had then made all of
/// the few evictions before the evictor ran (1 run in about 100 of the test binary).
#[test]
fn device_memory_smaller_than_data_loses_nothing_with_background_eviction() {
    use hetmm::core::policy::{Policy, Thrashing};
    use hetmm::core::space::CoreConfig;
    let _ = env_logger::builder().is_test(true).try_init();
    let policy = Policy { free_watermark: 0.5, thrashing: Thrashing::Ignore, ..Policy::hetmm() };
    let hm = Hetmm::with_config(CoreConfig { policy, ..CoreConfig::default() }).unwrap();
    let dev =
        hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: 4 << 20, ..SimConfig::default() }).unwrap()).unwrap();
    let st = write_then_sum_8x_the_device(hm, dev);
    assert!(st.background_evictions > 0, "the background evictor ran: {st:?}");
}

/// Writes 32 MiB from a kernel, sums it in another, checks every word. Returns the counters.
fn write_then_sum_8x_the_device(hm: Hetmm, dev: Device<SimDevice>) -> hetmm::core::stats::StatsSnapshot {
    let words = (32 << 20) / 8; // 8x the device
    let buf = hm.alloc::<u64>(words).unwrap();
    let (grid, k) = stream_write(buf.ptr(), words, 7);
    dev.launch(grid, &[Use::write(&buf)], k).unwrap().wait().unwrap();
    let (grid, _) = stream_sum(buf.ptr(), words, 0);
    let sums = hm.alloc::<u64>(grid.blocks as usize).unwrap();
    let (grid, k) = stream_sum(buf.ptr(), words, sums.ptr());
    dev.launch(grid, &[Use::read(&buf), Use::write(&sums)], k).unwrap().wait().unwrap();
    let expect = (0..words as u64).fold(0u64, |a, i| a.wrapping_add(i ^ 7));
    assert_eq!(sums.as_slice().iter().fold(0u64, |a, v| a.wrapping_add(*v)), expect);
    for (i, v) in buf.as_slice().iter().enumerate() {
        assert_eq!(*v, i as u64 ^ 7, "word {i}");
    }
    let st = hm.stats();
    assert!(st.evictions > 0, "eviction happened");
    st
}

/// A kernel on a device whose memory is all pinned still runs: what it touches beyond the pinned
/// data is served remotely from host memory, and every word arrives. It used to fail with
/// `ServiceFailed` (nothing could be evicted).
#[test]
fn a_kernel_runs_on_a_device_full_of_pinned_data() {
    let (hm, dev) = setup(4 << 20);
    let words = (4 << 20) / 8;
    let mut pinned = hm.alloc::<u64>(words).unwrap();
    pinned.as_mut_slice().fill(3);
    hm.advise_buf(&pinned, hetmm::Advice::Pin(true)).unwrap().wait(Duration::from_secs(10)).unwrap();
    hm.migrate(pinned.ptr(), (words * 8) as u64, dev.proc()).unwrap();
    let buf = hm.alloc::<u64>(words).unwrap();
    let (grid, k) = stream_write(buf.ptr(), words, 7);
    dev.launch(grid, &[Use::write(&buf)], k).unwrap().wait().unwrap();
    for (i, v) in buf.as_slice().iter().enumerate() {
        assert_eq!(*v, i as u64 ^ 7, "word {i}");
    }
    assert!(pinned.as_slice().iter().all(|&v| v == 3));
    assert!(hm.stats().oom_remote_pages > 0, "{:?}", hm.stats());
}

/// The counters once the fault service has finished adding to them: the fill's CPU fault is
/// counted just after the filling thread was woken (see [`Hetmm::stats`]).
/// The kernel may unmap CPU pages behind hetmm's back, with no event: reclaim, or on the build
/// machine DAMON's `pageout` scheme, which does to hetmm's memfd pages what `MADV_PAGEOUT` does
/// here on demand (unmaps them and keeps them in the page cache, there being no swap). The next
/// CPU access faults, the core finds the page home and maps it again: nothing moves and no byte
/// changes, for plain pages and for read-mostly duplicates mapped read-only beside a device's
/// copy; a CPU write to a duplicate afterwards still collapses the device's copy.
#[test]
fn pages_the_kernel_unmaps_on_its_own_fault_back_unchanged() {
    let (hm, dev) = setup(64 << 20);
    let words = (4 << 20) / 8;
    let mut plain = hm.alloc::<u64>(words).unwrap();
    let mut dup = hm.alloc::<u64>(words).unwrap();
    plain.as_mut_slice().iter_mut().enumerate().for_each(|(i, v)| *v = i as u64 * 3);
    dup.as_mut_slice().iter_mut().enumerate().for_each(|(i, v)| *v = i as u64 * 5);
    hm.advise_buf(&dup, hetmm::Advice::ReadMostly(true)).unwrap();
    let sum = |buf: &hetmm::SharedBuf<u64>| {
        let blocks = stream_sum(buf.ptr(), words, 0).0.blocks as usize;
        let out = hm.alloc::<u64>(blocks).unwrap();
        let (grid, k) = stream_sum(buf.ptr(), words, out.ptr());
        dev.launch(grid, &[Use::read(buf), Use::write(&out)], k)
            .unwrap()
            .wait_timeout(Duration::from_secs(60))
            .unwrap();
        let sum = out.as_slice().iter().fold(0u64, |s, v| s.wrapping_add(*v));
        sum
    };
    let want = |k: u64| (0..words as u64).fold(0u64, |s, i| s.wrapping_add(i * k));
    assert_eq!(sum(&dup), want(5), "the device reads its duplicate");
    // The CPU reads its copy of the duplicates: mapped read-only.
    assert!(dup.as_slice().iter().enumerate().all(|(i, v)| *v == i as u64 * 5));
    let before = settled_stats(&hm);
    for (ptr, len) in [(plain.ptr(), plain.byte_len()), (dup.ptr(), dup.byte_len())] {
        // SAFETY: the buffers are this test's; MADV_PAGEOUT keeps their contents.
        let rc = unsafe { libc::madvise(ptr as *mut libc::c_void, len as usize, libc::MADV_PAGEOUT) };
        assert_eq!(rc, 0, "MADV_PAGEOUT: {}", std::io::Error::last_os_error());
    }
    for (i, v) in plain.as_slice().iter().enumerate() {
        assert_eq!(*v, i as u64 * 3, "plain word {i}");
    }
    for (i, v) in dup.as_slice().iter().enumerate() {
        assert_eq!(*v, i as u64 * 5, "read-mostly word {i}");
    }
    let st = settled_stats(&hm).since(&before);
    assert!(st.cpu_faults > 0, "the pages lost their entries and faulted back: {st:?}");
    assert_eq!((st.bytes_to_host, st.bytes_to_device), (0, 0), "nothing moved: {st:?}");
    // A CPU write to a duplicate collapses the device's copy: the device sees it.
    dup.as_mut_slice()[words - 1] = 0;
    assert_eq!(sum(&dup), want(5).wrapping_sub((words as u64 - 1) * 5), "the device sees the CPU's write");
}

fn settled_stats(hm: &Hetmm) -> hetmm::core::stats::StatsSnapshot {
    let mut last = hm.stats();
    for _ in 0..200 {
        std::thread::sleep(std::time::Duration::from_millis(5));
        let now = hm.stats();
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("counters still changing after 1 s with nothing running: {last:?}");
}

#[test]
fn bad_input_gets_typed_errors_and_changes_nothing() {
    let (hm, dev) = setup(16 << 20);
    let mut buf = hm.alloc::<u64>(4096).unwrap();
    buf.as_mut_slice().fill(5);
    let (p, len) = (buf.ptr(), buf.byte_len());
    let before = settled_stats(&hm);
    let core = |r: hetmm::Result<()>| match r {
        Err(Error::Core(e)) => e,
        other => panic!("expected a core error, got {other:?}"),
    };
    assert!(matches!(core(hm.migrate(p + 1, PAGE_SIZE, dev.proc())), CoreError::Unaligned(_)));
    assert!(matches!(core(hm.migrate(p, 100, dev.proc())), CoreError::Unaligned(_)));
    assert!(matches!(core(hm.migrate(p, 0, dev.proc())), CoreError::Empty { .. }));
    assert!(matches!(core(hm.migrate(p, len + PAGE_SIZE, dev.proc())), CoreError::NotShared(_)));
    assert!(matches!(core(hm.migrate(u64::MAX - 4095, 8192, dev.proc())), CoreError::Overflow { .. }));
    assert!(matches!(hm.alloc::<u64>(0), Err(Error::EmptyAlloc)));
    assert!(matches!(hm.alloc::<u64>(usize::MAX), Err(Error::SizeOverflow { .. })));
    // The byte count fits, its rounding up to a page does not (it panicked in debug builds).
    assert!(matches!(hm.alloc::<u8>(usize::MAX), Err(Error::SizeOverflow { .. })));
    let noop = |_: &BlockCtx| Ok(());
    let g = Grid { blocks: 1, threads_per_block: 1 };
    let raw = |start, len| {
        // SAFETY: the kernels given these touch nothing, and the uses are refused anyway.
        unsafe { Use::raw(start, len, Access::Read) }
    };
    assert!(matches!(dev.launch(g, &[raw(p, 0)], noop), Err(Error::Core(CoreError::Empty { .. }))));
    assert!(matches!(dev.launch(g, &[raw(p, len + 1)], noop), Err(Error::Core(CoreError::NotShared(_)))));
    assert!(matches!(dev.launch(g, &[raw(u64::MAX - 10, 100)], noop), Err(Error::Core(CoreError::Overflow { .. }))));
    assert_eq!(hm.stats(), before, "refused operations changed nothing");
    assert!(buf.as_slice().iter().all(|v| *v == 5));

    // Freed memory: migrate and launch are refused; a kernel that touches it anyway faults with a
    // typed error.
    drop(buf);
    assert!(matches!(core(hm.migrate(p, PAGE_SIZE, dev.proc())), CoreError::NotShared(_)));
    assert!(matches!(dev.launch(g, &[raw(p, 8)], noop), Err(Error::Core(CoreError::NotShared(_)))));
    let stale = move |ctx: &BlockCtx| ctx.load::<u64>(p).map(|_| ());
    // A bounded launch cannot even try: the kernel declared nothing.
    match dev.launch(g, &[], stale).unwrap().wait() {
        Err(Error::Device(DeviceError::Undeclared { va, len: 8, access: Access::Read })) if va == p => {}
        other => panic!("kernel outside its uses: {other:?}"),
    }
    // SAFETY: the kernel only reads, and nothing is mapped at `p` any more.
    match unsafe { dev.launch_unbounded(g, &[], stale) }.unwrap().wait() {
        Err(Error::Device(DeviceError::FaultCancelled { reason: FaultCancel::Unmapped, .. })) => {}
        other => panic!("kernel on freed memory: {other:?}"),
    }

    // A detached device refuses work.
    let keep = hm.alloc::<u64>(512).unwrap();
    hm.detach(&dev).unwrap();
    assert!(matches!(dev.launch(g, &[Use::read(&keep)], noop), Err(Error::Core(CoreError::Detached(_)))));
    assert!(matches!(core(hm.migrate(keep.ptr(), PAGE_SIZE, dev.proc())), CoreError::Detached(_)));
    assert!(matches!(hm.detach(&dev), Err(Error::Core(CoreError::Detached(_)))));
}

#[test]
fn detach_brings_device_data_back() {
    let (hm, dev) = setup(16 << 20);
    let words = (2 << 20) / 8;
    let buf = hm.alloc::<u64>(words).unwrap();
    let (grid, k) = stream_write(buf.ptr(), words, 99);
    dev.launch(grid, &[Use::write(&buf)], k).unwrap().wait().unwrap();
    hm.detach(&dev).unwrap();
    assert!(buf.as_slice().iter().enumerate().all(|(i, v)| *v == i as u64 ^ 99));
}

#[test]
fn dropping_everything_with_kernels_and_faults_in_flight_ends() {
    let (hm, dev) = setup(8 << 20);
    let words = (64 << 20) / 8;
    let buf = hm.alloc::<u64>(words).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // A CPU thread keeps faulting pages back while kernels fault them to the device.
    let cpu = {
        let (ptr, stop) = (buf.ptr() as usize, Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: the buffer outlives this thread (joined below, before it is dropped).
                unsafe { std::ptr::read_volatile((ptr as *const u64).add(i % words)) };
                i += 4096;
            }
        })
    };
    let launches: Vec<_> = (0..3)
        .map(|s| {
            let (grid, k) = stream_write(buf.ptr(), words, s);
            dev.launch(grid, &[Use::write(&buf)], k).unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    drop(dev);
    drop(hm);
    for mut l in launches {
        // Finished or failed; never hangs.
        let _ = l.wait_timeout(Duration::from_secs(30));
    }
    stop.store(true, Ordering::Relaxed);
    cpu.join().unwrap();
    drop(buf);
    assert!(t.elapsed() < Duration::from_secs(30), "teardown took {:?}", t.elapsed());
}

/// The sim's `mul_mat` agrees with `mul_mat_cpu` bit for bit on fractional values at sizes that
/// leave partial row bands, partial register tiles and a partial group of `b` rows (it takes 64
/// at a time): every element sums its products in the same order, with fused multiply-adds.
#[test]
fn sim_mul_mat_matches_the_cpu_bit_for_bit_at_any_size() {
    let (hm, dev) = setup(64 << 20);
    for m in [1usize, 3, 5, 18, 37, 64, 100, 130] {
        let n = m * m;
        let (mut a, mut b, r) = (hm.alloc::<f32>(n).unwrap(), hm.alloc::<f32>(n).unwrap(), hm.alloc::<f32>(n).unwrap());
        let val = |i: usize, salt: u32| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(salt) % 1000) as f32 / 7.0 - 50.0
        };
        a.as_mut_slice().iter_mut().enumerate().for_each(|(i, v)| *v = val(i, 1));
        b.as_mut_slice().iter_mut().enumerate().for_each(|(i, v)| *v = val(i, 2));
        let (grid, k) = mul_mat(r.ptr(), a.ptr(), b.ptr(), m);
        dev.launch(grid, &[Use::read(&a), Use::read(&b), Use::write(&r)], k).unwrap().wait().unwrap();
        let mut expect = vec![0f32; n];
        mul_mat_cpu(&mut expect, &a.as_slice(), &b.as_slice(), m);
        let same = r.as_slice().iter().zip(&expect).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "m = {m}: the device's product differs from the CPU's");
    }
}

const HOT: usize = (4 << 20) / 8;
const COLD: usize = (16 << 20) / 8;
const SLICE: usize = (64 << 10) / 8;

/// A device of three blocks (6 MiB) thrashes: every kernel block reads all of `hot` (2 MiB
/// blocks, half the device) and its own slice of `cold` (16 MiB, read once), and writes a sum to
/// `sums`. Returns the address space, the device, the three buffers and the bytes the kernel
/// read remotely; every sum is checked.
#[allow(clippy::type_complexity)]
fn thrash_hot_and_cold(
    policy: hetmm::Policy,
) -> (Hetmm, Device<SimDevice>, hetmm::SharedBuf<u64>, hetmm::SharedBuf<u64>, hetmm::SharedBuf<u64>, u64) {
    let hm = Hetmm::with_config(hetmm::CoreConfig { policy, ..hetmm::CoreConfig::default() }).unwrap();
    let dev =
        hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: 6 << 20, ..SimConfig::default() }).unwrap()).unwrap();
    let mut hot = hm.alloc::<u64>(HOT).unwrap();
    let mut cold = hm.alloc::<u64>(COLD).unwrap();
    let blocks = COLD / SLICE;
    let sums = hm.alloc::<u64>(blocks).unwrap();
    hot.as_mut_slice().iter_mut().enumerate().for_each(|(i, v)| *v = i as u64 * 7);
    cold.as_mut_slice().iter_mut().enumerate().for_each(|(i, v)| *v = i as u64 ^ 0x55);
    let (h, c, s) = (hot.ptr(), cold.ptr(), sums.ptr());
    let k = move |ctx: &BlockCtx| {
        let b = ctx.block_idx() as usize;
        let mut buf = vec![0u64; SLICE];
        ctx.read_slice(c + (b * SLICE * 8) as u64, &mut buf)?;
        let mut sum = buf.iter().fold(0u64, |a, v| a.wrapping_add(*v));
        for part in 0..HOT / SLICE {
            ctx.read_slice(h + (part * SLICE * 8) as u64, &mut buf)?;
            sum = buf.iter().fold(sum, |a, v| a.wrapping_add(*v));
        }
        ctx.write_slice(s + (b * 8) as u64, &[sum])
    };
    let before = dev.driver().stats().remote_bytes;
    dev.launch(
        Grid { blocks: blocks as u32, threads_per_block: 1 },
        &[Use::read(&hot), Use::read(&cold), Use::write(&sums)],
        k,
    )
    .unwrap()
    .wait()
    .unwrap();
    let remote = dev.driver().stats().remote_bytes - before;
    let hot_sum = (0..HOT as u64).fold(0u64, |a, i| a.wrapping_add(i * 7));
    for (b, got) in sums.as_slice().iter().enumerate() {
        let cold_sum = (b * SLICE..(b + 1) * SLICE).fold(0u64, |a, i| a.wrapping_add(i as u64 ^ 0x55));
        assert_eq!(*got, cold_sum.wrapping_add(hot_sum), "kernel block {b}");
    }
    assert!(hm.stats().thrash_events > 0, "the device never thrashed: the test shows nothing");
    (hm, dev, hot, cold, sums, remote)
}

/// Capacity thrashing keeps the hot set on the device and serves the rest remotely: the cold
/// data (each byte read once) must be what is served remotely, not `hot` (read by every kernel
/// block). The thrashing response used to map the blocks that came back most, `hot`'s,
/// remotely: hundreds of MiB read over the link instead of a few.
#[test]
fn capacity_thrashing_keeps_the_hot_set_and_serves_the_rest_remotely() {
    let (_hm, _dev, _hot, _cold, _sums, remote) = thrash_hot_and_cold(hetmm::Policy::hetmm());
    // `hot` is read 256 times over (1 GiB); `cold` and `sums` together are 16 MiB.
    assert!(remote <= 64 << 20, "{} MiB read remotely", remote >> 20);
}

/// Once the thrashing is over and memory has freed up, a block the thrashing response served
/// remotely comes to the device when the device keeps using it: its accesses no longer fault,
/// so the device's access counters say it is used, and once it is there kernels read none of it
/// remotely. Without them (UVM's default on x86) it is read over the link for as long as it is
/// used: 8 kernels reading its 2 MiB 16 times each read 256 MiB remotely. (It asserted that the
/// block came within the first kernel, which a loaded machine did not always give it.)
#[test]
fn access_counters_bring_a_block_served_remotely_back_once_memory_frees_up() {
    for counters in [true, false] {
        let policy = hetmm::Policy { access_counters: counters, ..hetmm::Policy::hetmm() };
        let (hm, dev, hot, cold, sums, _) = thrash_hot_and_cold(policy);
        drop(hot);
        drop(sums);
        let me = dev.proc().proc();
        let remote_block = (0..COLD * 8 / (2 << 20)).map(|b| cold.ptr() + (b << 21) as u64).find(|&va| {
            let p = hm.space().page_state(va).unwrap();
            p.dev_mapped.has(me) && !p.resident.has(me)
        });
        let blk = remote_block.expect("some block of cold is served remotely");
        let (before, stats) = (dev.driver().stats().remote_bytes, hm.stats());
        let sums = hm.alloc::<u64>(1).unwrap();
        let first = ((blk - cold.ptr()) / 8) as usize;
        let want = (first..first + (2 << 20) / 8).fold(0u64, |a, i| a.wrapping_add(i as u64 ^ 0x55));
        // One kernel of 16 blocks, each reading the whole block; checks the sum. The remote
        // bytes it read.
        let round = || {
            let s = sums.ptr();
            let k = move |ctx: &BlockCtx| {
                let mut buf = vec![0u64; SLICE];
                let mut sum = 0u64;
                for part in 0..(2 << 20) / (SLICE * 8) {
                    ctx.read_slice(blk + (part * SLICE * 8) as u64, &mut buf)?;
                    sum = buf.iter().fold(sum, |a, v| a.wrapping_add(*v));
                }
                if ctx.block_idx() == 0 {
                    ctx.store(s, sum)?;
                }
                Ok(())
            };
            // SAFETY: the block lies in the buffer `cold`, which the launch checks.
            let uses = [unsafe { Use::raw(blk, 2 << 20, Access::Read) }, Use::write(&sums)];
            let remote = dev.driver().stats().remote_bytes;
            dev.launch(Grid { blocks: 16, threads_per_block: 1 }, &uses, k).unwrap().wait().unwrap();
            assert_eq!(sums.as_slice()[0], want, "the kernel read the block right");
            dev.driver().stats().remote_bytes - remote
        };
        let resident = || hm.space().page_state(blk).unwrap().resident.has(me);
        if counters {
            // The notices are served beside the kernels: on a loaded machine the block may come
            // over a few kernels later (each reads 32 MiB remotely until it does), but it comes.
            let mut rounds = 0;
            while !resident() {
                assert!(rounds < 64, "the block never came to the device: {:?}", hm.stats().since(&stats));
                round();
                rounds += 1;
            }
            let d = hm.stats().since(&stats);
            assert!(d.access_unmapped_pages > 0, "no notice moved anything: {d:?}");
            assert_eq!(round(), 0, "read remotely once on the device");
        } else {
            for _ in 0..8 {
                round();
            }
            assert!(!resident());
            assert_eq!(hm.stats().since(&stats).access_unmapped_pages, 0);
            let remote = dev.driver().stats().remote_bytes - before;
            assert!(remote >= 128 << 20, "only {} MiB read remotely: the test shows nothing", remote >> 20);
        }
    }
}

/// Two devices, the first detached and its id given to a third: the hetmm, the second and third
/// devices, and the place the first device's handle gave before its detach.
fn id_given_again() -> (Hetmm, Device<SimDevice>, Device<SimDevice>, hetmm::Place) {
    let (hm, [a, b]) = two_devices(true);
    let stale = a.proc();
    hm.detach(&a).unwrap();
    let cfg = SimConfig { memory_bytes: 16 << 20, peer_copies: true, ..SimConfig::default() };
    let c = hm.attach_sim(SimDevice::new(cfg).unwrap()).unwrap();
    assert_eq!(c.id(), a.id(), "set-up: the id is given again");
    (hm, b, c, stale)
}

/// Audit: a processor taken from a device's handle (`dev.proc()`) named the device by id only,
/// and `attach` gives a detached device's id to the next device: a program that kept it past the
/// `detach` moved data to (and advised about) the new device. Each call taking it must refuse it.
#[test]
fn a_stale_proc_never_reaches_the_device_given_its_id() {
    let (hm, _b, c, stale) = id_given_again();
    let buf = hm.alloc::<u64>(512).unwrap();
    let on_c = || hm.space().page_state(buf.ptr()).is_some_and(|p| p.resident.has(Proc::Device(c.id())));
    let detached = |r: Result<(), Error>| matches!(r, Err(Error::Core(CoreError::Detached(_))));
    let wait = |p: hetmm::Pending| Ok(p.wait(Duration::from_secs(10))?);
    let migrated = hm.migrate(buf.ptr(), PAGE_SIZE, stale);
    assert!(detached(migrated) && !on_c(), "migrate to the detached device's proc: the new device got the data");
    let prefetched = hm.advise(buf.ptr(), PAGE_SIZE, hetmm::Advice::Prefetch(stale)).and_then(wait);
    assert!(detached(prefetched) && !on_c(), "prefetch to the detached device's proc reached the new device");
    let preferred = hm.advise(buf.ptr(), PAGE_SIZE, hetmm::Advice::PreferredLocation(Some(stale))).and_then(wait);
    assert!(detached(preferred), "preferring the detached device's proc was taken");
    hm.migrate(buf.ptr(), PAGE_SIZE, c.proc()).expect("the new device's own proc works");
    assert!(on_c());
}

/// `AccessedBy` names its device by the handle's place too: a detached device's is refused
/// once another device has its id, and the CPU, which is no device, is refused.
#[test]
fn accessed_by_a_detached_devices_proc_is_refused() {
    let (hm, _b, c, stale) = id_given_again();
    let buf = hm.alloc::<u64>(512).unwrap();
    let stale = hm.advise_buf(&buf, hetmm::Advice::AccessedBy(stale, true));
    assert!(matches!(stale, Err(Error::Core(CoreError::Detached(_)))), "{stale:?}");
    let cpu = hm.advise_buf(&buf, hetmm::Advice::AccessedBy(hetmm::Place::CPU, true));
    assert!(matches!(cpu, Err(Error::NotADevice { .. })), "{cpu:?}");
    hm.advise_buf(&buf, hetmm::Advice::AccessedBy(c.proc(), true)).expect("the new device's own proc works");
}

/// Audit (peer / multi-device): a handle of a detached device names it by id only, and `attach`
/// gives the lowest free id to the next device. The stale handle then reaches the new device:
/// `detach(&old)` detaches the new one (it should fail with `Detached`, as it does before any
/// reuse), and the new device's handle is left refusing work.
#[test]
fn a_stale_handle_never_reaches_the_device_given_its_id() {
    let (hm, [a, _b]) = two_devices(true);
    hm.detach(&a).unwrap();
    let cfg = SimConfig { memory_bytes: 16 << 20, peer_copies: true, ..SimConfig::default() };
    let c = hm.attach_sim(SimDevice::new(cfg).unwrap()).unwrap();
    assert_eq!(c.id(), a.id(), "set-up: the id is given again");
    let buf = hm.alloc::<u64>(512).unwrap();
    let stale = hm.detach(&a);
    let new_works = hm.migrate(buf.ptr(), PAGE_SIZE, c.proc());
    assert!(
        matches!(stale, Err(Error::Core(CoreError::Detached(_)))) && new_works.is_ok(),
        "detach through the old handle: {stale:?}; the new device afterwards: {new_works:?}"
    );
}
