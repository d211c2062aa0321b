//! The public API's edges: ranges at the top of the address space, and calls that name memory
//! the caller does not own in the way the call needs. Each gets a typed error; nothing panics
//! and no buffer is harmed.

use std::time::Duration;

use hetmm::core::error::CoreError;
use hetmm::kernels::stream_write;
use hetmm::sim::{BlockCtx, Grid, SimConfig, SimDevice};
use hetmm::{Access, Device, Error, Hetmm, Use};

fn setup(mem: u64) -> (Hetmm, Device<SimDevice>) {
    let _ = env_logger::builder().is_test(true).try_init();
    let hm = Hetmm::new().expect("userfaultfd and memfd are available");
    let dev = hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: mem, ..SimConfig::default() }).unwrap()).unwrap();
    (hm, dev)
}

/// A use whose end fits in 64 bits but whose page-rounded end does not (rounding up to the next
/// page overflows): refused as an overflow, like one whose end itself overflows.
#[test]
fn a_use_ending_in_the_last_page_of_the_address_space_is_refused() {
    let (_hm, dev) = setup(8 << 20);
    let noop = |_: &BlockCtx| Ok(());
    let g = Grid { blocks: 1, threads_per_block: 1 };
    // SAFETY: the kernel touches nothing, and the use is refused anyway.
    let r = dev.launch(g, &[unsafe { Use::raw(u64::MAX - 100, 50, Access::Read) }], noop);
    assert!(matches!(r, Err(Error::Core(CoreError::Overflow { .. }))), "{r:?}");
}

/// `unregister` is for memory the program registered. Naming part of a buffer from `alloc` is
/// refused and leaves the buffer whole: it used to succeed, dropping the pages from the core
/// while they stayed registered with userfaultfd, so the next CPU access to them was refused
/// by the fault handler (SIGBUS) and the device's data in them was lost.
#[test]
fn unregister_refuses_allocated_buffers_and_leaves_them_whole() {
    let (hm, dev) = setup(8 << 20);
    let words = (4 << 20) / 8;
    let b = hm.alloc::<u64>(words).unwrap();
    let (grid, k) = stream_write(b.ptr(), words, 5);
    dev.launch(grid, &[Use::write(&b)], k).unwrap().wait_timeout(Duration::from_secs(60)).unwrap();
    let first = b.ptr() as *const u8;
    let refused = |r: hetmm::Result<()>| r.is_err_and(|e| e.to_string().contains("Hetmm::alloc"));
    let r = hm.unregister(first, 8192);
    assert!(refused(r), "unregister of an allocated buffer");
    // A range straddling the buffer's end is refused too.
    let r = hm.unregister(b.as_slice()[words - 1..].as_ptr().cast(), 3 << 12);
    assert!(refused(r), "unregister of a range straddling an allocated buffer's end");
    assert!(b.as_slice().iter().enumerate().all(|(i, v)| *v == i as u64 ^ 5), "the device's data is intact");
    // Once the buffer is freed, its addresses are no longer its.
    let p = b.ptr();
    drop(b);
    let r = hm.unregister(p as *const u8, 4096);
    assert!(matches!(r, Err(Error::Core(CoreError::NotShared(_)))), "{r:?}");
}

/// `protect` of part of a buffer splits its region in the core. Calls naming the whole buffer
/// must still work: a kernel reading all of it (part read-only), advice over all of it, and the
/// same after the protection is restored. They failed with NotShared ("not inside one shared
/// region") for as long as the buffer lived.
#[test]
fn whole_buffer_calls_work_after_protecting_part_of_it() {
    use hetmm::core::types::Prot;
    use hetmm::kernels::stream_sum;
    use hetmm::{Advice, Proc};
    let (hm, dev) = setup(16 << 20);
    let words = (4 << 20) / 8;
    let mut b = hm.alloc::<u64>(words).unwrap();
    for (i, v) in b.as_mut_slice().iter_mut().enumerate() {
        *v = i as u64;
    }
    let want = (0..words as u64).fold(0u64, |s, v| s.wrapping_add(v));
    let (ptr, len) = (b.ptr(), b.byte_len());
    let sum = |hm: &Hetmm| {
        let blocks = stream_sum(ptr, words, 0).0.blocks as usize;
        let out = hm.alloc::<u64>(blocks).unwrap();
        let (grid, k) = stream_sum(ptr, words, out.ptr());
        // SAFETY: the range is the buffer `b`'s, which the launch checks.
        let whole = unsafe { Use::raw(ptr, len, Access::Read) };
        dev.launch(grid, &[whole, Use::write(&out)], k).unwrap().wait_timeout(Duration::from_secs(60)).unwrap();
        let sum = out.as_slice().iter().fold(0u64, |s, v| s.wrapping_add(*v));
        sum
    };
    hm.protect(ptr + (1 << 20), 1 << 20, Prot::READ).unwrap();
    assert_eq!(sum(&hm), want, "a kernel reading the whole buffer, part of it read-only");
    hm.advise(ptr, len, Advice::ReadMostly(true)).unwrap();
    hm.advise(ptr, len, Advice::Prefetch(Proc::Cpu.into())).unwrap().wait(Duration::from_secs(60)).unwrap();
    hm.protect(ptr + (1 << 20), 1 << 20, Prot::READ | Prot::WRITE).unwrap();
    hm.advise(ptr, len, Advice::Prefetch(dev.proc())).unwrap().wait(Duration::from_secs(60)).unwrap();
    assert_eq!(sum(&hm), want, "the same after the protection is restored");
    hm.advise(ptr, len, Advice::DontNeed).unwrap();
    assert!(b.as_slice().iter().all(|v| *v == 0), "DontNeed over the whole buffer reads zeros");
}

/// `protect` takes a length as `mprotect(2)` does, rounded up to a whole page: a buffer's own
/// byte length, not a page multiple, protects every page of it (it was refused as unaligned).
/// A start that is not page aligned is still refused.
#[test]
fn protect_rounds_a_buffers_length_up_to_whole_pages() {
    use hetmm::core::types::Prot;
    let (hm, dev) = setup(16 << 20);
    let words = (3 << 20) / 8 + 77;
    let b = hm.alloc::<u64>(words).unwrap();
    assert_ne!(b.byte_len() % 4096, 0);
    hm.protect(b.ptr(), b.byte_len(), Prot::READ).unwrap();
    // The last page, only partly the buffer's, is read-only too: a device write to it fails.
    let (grid, k) = stream_write(b.ptr(), words, 5);
    let r = dev.launch(grid, &[Use::write(&b)], k).and_then(|mut l| l.wait_timeout(Duration::from_secs(60)));
    assert!(r.is_err(), "a kernel writing read-only memory fails: {r:?}");
    assert!(b.as_slice().iter().all(|v| *v == 0), "nothing was written");
    hm.protect(b.ptr(), b.byte_len(), Prot::READ | Prot::WRITE).unwrap();
    let (grid, k) = stream_write(b.ptr(), words, 5);
    dev.launch(grid, &[Use::write(&b)], k).unwrap().wait_timeout(Duration::from_secs(60)).unwrap();
    assert!(b.as_slice().iter().enumerate().all(|(i, v)| *v == i as u64 ^ 5));
    let r = hm.protect(b.ptr() + 8, 4096, Prot::READ);
    assert!(matches!(r, Err(Error::Core(CoreError::Unaligned(_)))), "{r:?}");
}

/// What becomes of page `i` of a [`patchwork`]: unmapped (`Some(0)`), mapped again with these
/// `mmap` flags, or left (`None`).
type Patch = fn(usize) -> Option<libc::c_int>;

/// Maps `pages` pages of private anonymous memory, then replaces each page `i` for which
/// `replace(i)` is `Some(flags)` with a fresh mapping of those flags (so each is a mapping of
/// its own), and writes `i + 1` into the first byte of every page still mapped.
fn patchwork(pages: usize, replace: Patch) -> *mut u8 {
    const PG: usize = 4096;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a fresh private anonymous mapping the kernel places; checked below.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), pages * PG, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED);
    let p = p.cast::<u8>();
    for i in 0..pages {
        match replace(i) {
            // SAFETY: page `i` of the mapping made above, which nothing else uses.
            Some(0) => assert_eq!(unsafe { libc::munmap(p.wrapping_add(i * PG).cast(), PG) }, 0),
            Some(flags) => {
                // SAFETY: MAP_FIXED over page `i` of the mapping made above, which nothing else uses.
                let q = unsafe { libc::mmap(p.wrapping_add(i * PG).cast(), PG, rw, flags | libc::MAP_FIXED, -1, 0) };
                assert_eq!(q, p.wrapping_add(i * PG).cast());
            }
            None => {}
        }
        if replace(i) != Some(0) {
            // SAFETY: page `i` is mapped readable and writable.
            unsafe { *p.wrapping_add(i * PG) = i as u8 + 1 };
        }
    }
    p
}

/// Checks the bytes `patchwork` wrote, then unmaps the pages.
fn check_and_unmap(p: *mut u8, pages: usize, mapped: impl Fn(usize) -> bool) {
    for i in (0..pages).filter(|&i| mapped(i)) {
        // SAFETY: page `i` is still mapped readable (the refused register left it alone).
        assert_eq!(unsafe { *p.wrapping_add(i * 4096) }, i as u8 + 1, "page {i} changed");
    }
    // SAFETY: the pages `patchwork` mapped (unmapping a hole is harmless).
    assert_eq!(unsafe { libc::munmap(p.cast(), pages * 4096) }, 0);
}

/// `register` refuses, with an error that says why, ranges it cannot take whole: a hole, private
/// and shared memory mixed, and shared memory over two mappings. The memory is left as it was.
#[test]
fn register_says_why_it_refuses_a_range() {
    use hetmm::host::RegionError;
    let (hm, _dev) = setup(8 << 20);
    const SHARED: libc::c_int = libc::MAP_SHARED | libc::MAP_ANONYMOUS;
    let cases: [(&str, Patch); 3] = [
        ("a hole", |i| (i == 1).then_some(0)),
        ("private and shared", |i| (i == 2).then_some(SHARED)),
        ("two shared mappings", |i| Some(if i < 2 { SHARED } else { SHARED | libc::MAP_NORESERVE })),
    ];
    for (what, replace) in cases {
        let p = patchwork(4, replace);
        let r = hm.register(p, 4 * 4096);
        match (what, &r) {
            ("a hole", Err(Error::Region(RegionError::NotMapped(range)))) => assert_eq!(range.len, 4 * 4096),
            ("private and shared", Err(Error::Region(RegionError::MixedSharing(_)))) => {}
            ("two shared mappings", Err(Error::Region(RegionError::SharedSpansMappings { mappings, .. }))) => {
                assert!(*mappings >= 2, "{mappings} mappings")
            }
            _ => panic!("{what}: {r:?}"),
        }
        let msg = r.unwrap_err().to_string();
        assert!(!msg.contains("aligned"), "{what}: the message blames alignment: {msg}");
        check_and_unmap(p, 4, |i| replace(i) != Some(0));
    }
}

/// Dropping a buffer frees all of it, also after `protect` of part of it split its region in
/// the core: only the region starting at the buffer's address was removed, the parts after it
/// stayed shared (their memory and device copies held, and `unregister` accepted them).
#[test]
fn dropping_a_buffer_after_protecting_part_of_it_frees_every_part() {
    use hetmm::core::types::{Prot, VaRange};
    let (hm, _dev) = setup(8 << 20);
    let b = hm.alloc::<u64>((4 << 20) / 8).unwrap();
    let (ptr, len) = (b.ptr(), b.byte_len());
    hm.protect(ptr + (1 << 20), 1 << 20, Prot::READ).unwrap();
    hm.protect(ptr + (1 << 20), 1 << 20, Prot::READ | Prot::WRITE).unwrap();
    drop(b);
    assert!(!hm.space().any_shared(VaRange::new(ptr, len)), "parts of the freed buffer are still shared");
    let r = hm.unregister((ptr + (2 << 20)) as *const u8, 4096);
    assert!(matches!(r, Err(Error::Core(CoreError::NotShared(_)))), "{r:?}");
}

/// `unregister` with a zero length is refused, as `register` refuses one: rounding the empty
/// range at an unaligned pointer out to pages unregistered the whole page holding it.
#[test]
fn unregister_of_zero_bytes_is_refused_and_unregisters_nothing() {
    let (hm, _dev) = setup(8 << 20);
    // Whole pages of the test's own: a `Vec` of the heap may share its first page with hetmm's
    // own state, and registering it hangs (see `Hetmm::register`; seen once in CI).
    let mut v = memmap2::MmapMut::map_anon(3 << 20).unwrap();
    v.fill(7);
    let r = hm.register(v.as_ptr(), v.len()).unwrap();
    let inside = v.as_ptr().wrapping_add(100);
    assert_ne!(inside as u64 % 4096, 0);
    let z = hm.unregister(inside, 0);
    assert!(z.is_err(), "unregister of 0 bytes: {z:?}");
    hm.unregister(r.start as *const u8, r.len as usize).expect("the registration is still whole");
    assert!(v.iter().all(|b| *b == 7));
}

/// A wait that times out leaves the launch to be waited for again: the kernel still runs, and
/// its job with it. The wait consumed the launch, ending the job at once (the kernel's memory
/// became the first to evict while the kernel used it), and nothing could wait any more.
#[test]
fn a_launch_whose_wait_timed_out_can_be_waited_for_again() {
    let (hm, dev) = setup(8 << 20);
    let b = hm.alloc::<u64>(512).unwrap();
    let k = |_: &BlockCtx| {
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    };
    let mut l = dev.launch(Grid { blocks: 1, threads_per_block: 1 }, &[Use::write(&b)], k).unwrap();
    let r = l.wait_timeout(Duration::from_millis(10));
    assert!(matches!(r, Err(Error::Device(hetmm::core::device::DeviceError::Timeout(_)))), "{r:?}");
    assert!(!l.is_done());
    l.wait_timeout(Duration::from_secs(60)).unwrap();
    assert!(l.is_done());
}

/// A kernel that itself fails with a timeout (its fault wait gave up, or it returned one) is
/// over: the wait reports that once and ends the launch's job, and later waits return at once.
/// (Found by an audit: the error was taken for the wait expiring, the job stayed, and every
/// later wait said Timeout again, for ever.)
#[test]
fn a_kernel_failing_with_a_timeout_is_over_not_still_running() {
    use hetmm::core::device::DeviceError;
    let (hm, dev) = setup(8 << 20);
    let b = hm.alloc::<u32>(1024).unwrap();
    let k = |_: &BlockCtx| Err(DeviceError::Timeout(Duration::from_millis(1)));
    let mut l = dev.launch(Grid { blocks: 1, threads_per_block: 1 }, &[Use::write(&b)], k).unwrap();
    let t = std::time::Instant::now();
    while !l.is_done() {
        assert!(t.elapsed() < Duration::from_secs(30), "the kernel did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
    let first = l.wait_timeout(Duration::from_millis(50));
    assert!(matches!(first, Err(Error::Device(DeviceError::Timeout(_)))), "the kernel's own error: {first:?}");
    for _ in 0..3 {
        assert!(l.wait_timeout(Duration::from_millis(50)).is_ok(), "a finished launch still waits");
    }
}

/// Memory whose state, made up front, would take over half of the machine's memory is refused
/// with an error (found by an audit: a few TiB would have ended in the OOM killer). Registered
/// memory makes the state of every page at once (about 1% of its size); a buffer only a header
/// per 2 MiB block (its pages' state is made as they are used). Nothing is mapped or registered.
#[test]
fn memory_too_large_for_its_state_is_refused() {
    let (hm, _dev) = setup(8 << 20);
    let Some(memory) = hetmm::memory_total() else { return };
    // Just over each limit: one block more than half the memory's worth of state.
    let header = std::mem::size_of::<hetmm::core::block::Block>() as u64;
    let pages = 512 * std::mem::size_of::<hetmm::core::block::Page>() as u64;
    let over = |per_block: u64| ((memory / 2 / per_block + 1) * (2 << 20)) as usize;
    let r = hm.alloc::<u8>(over(header));
    assert!(matches!(r, Err(Error::TooLarge { .. })), "{r:?}");
    // From the program's own (reserved, inaccessible) memory.
    let r = hm.register(std::ptr::null::<u8>().wrapping_add(1 << 30), over(header + pages));
    assert!(matches!(r, Err(Error::TooLarge { .. })), "{r:?}");
    // Sizes whose page state alone would have been refused up front work for a buffer.
    let b = hm.alloc::<u8>(over(header + pages).min(64 << 30)).expect("a large buffer, mostly unused");
    drop(b);
    assert!(hm.alloc::<u8>(64 << 20).is_ok());
}

/// The program registers read-only memory and then makes it writable with its own `mprotect`
/// (no event tells hetmm): a write must fail (EFAULT for a kernel-mode write, SIGBUS for the
/// CPU's own), not loop. It was served by mapping the page read-only again, for ever (a million
/// faults in 10 s; found by an audit).
#[test]
fn a_write_the_region_does_not_allow_fails_instead_of_looping() {
    use std::io::Read;
    let (hm, _dev) = setup(8 << 20);
    let ps = 4096;
    // SAFETY: a new mapping where the kernel chooses: it replaces nothing.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), ps, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    assert_ne!(p, libc::MAP_FAILED);
    hm.register(p.cast(), ps).unwrap();
    // SAFETY: the registered page, readable.
    assert_eq!(unsafe { std::ptr::read_volatile(p as *const u8) }, 0);
    // SAFETY: the test's own mapping; nothing references it.
    assert_eq!(unsafe { libc::mprotect(p, ps, libc::PROT_READ | libc::PROT_WRITE) }, 0);
    let va = p as usize;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut f = std::fs::File::open("/proc/self/stat").unwrap();
        // SAFETY: the registered page, writable to the kernel now; only this thread uses it.
        let buf = unsafe { std::slice::from_raw_parts_mut(va as *mut u8, 16) };
        let _ = tx.send(f.read(buf).map_err(|e| e.raw_os_error()));
    });
    let got = rx.recv_timeout(Duration::from_secs(30));
    assert_eq!(got, Ok(Err(Some(libc::EFAULT))), "the write neither failed nor completed");
    hm.unregister(p.cast(), ps).unwrap();
    // SAFETY: the test's own mapping, unused from here.
    unsafe { libc::munmap(p, ps) };
}

/// `Launch::wait_timeout(Duration::MAX)` (a caller's "forever") on the simulated device waits
/// for the kernel and returns its result. The sim's `Done::wait` added the timeout to
/// `Instant::now()`, which panics ("overflow when adding duration to instant"); the CUDA
/// backend already saturates such a deadline.
#[test]
fn a_launch_waited_for_with_duration_max_returns_instead_of_panicking() {
    let (hm, dev) = setup(8 << 20);
    let words = 4096 / 8;
    let b = hm.alloc::<u64>(words).unwrap();
    let (grid, k) = stream_write(b.ptr(), words, 5);
    let mut l = dev.launch(grid, &[Use::write(&b)], k).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.wait_timeout(Duration::MAX)));
        let _ = tx.send(r.map(|r| r.map_err(|e| e.to_string())).map_err(|_| "panicked"));
    });
    let got = rx.recv_timeout(Duration::from_secs(60)).expect("the wait returns");
    t.join().unwrap();
    assert_eq!(got, Ok(Ok(())));
    assert!(b.as_slice().iter().enumerate().all(|(i, v)| *v == i as u64 ^ 5));
}

/// A `CoreConfig::copy_timeout` of `Duration::MAX` (wait as long as copies take) migrates: the
/// sim's copy completion added the timeout to `Instant::now()` and panicked in the middle of
/// the migration, with the CPU's access already revoked.
#[test]
fn a_copy_timeout_of_duration_max_migrates_without_panicking() {
    let cfg = hetmm::CoreConfig { copy_timeout: Duration::MAX, ..hetmm::CoreConfig::default() };
    let hm = Hetmm::with_config(cfg).unwrap();
    let dev =
        hm.attach_sim(SimDevice::new(SimConfig { memory_bytes: 8 << 20, ..SimConfig::default() }).unwrap()).unwrap();
    let words = (2 << 20) / 8;
    let mut b = hm.alloc::<u64>(words).unwrap();
    b.as_mut_slice().iter_mut().enumerate().for_each(|(i, v)| *v = i as u64 ^ 7);
    let (ptr, len, to) = (b.ptr(), b.byte_len(), dev.proc());
    let r = std::thread::scope(|s| {
        s.spawn(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hm.migrate(ptr, len, to)))).join().unwrap()
    });
    assert!(matches!(r, Ok(Ok(()))), "migrate: {:?}", r.map_err(|_| "panicked"));
    assert!(b.as_slice().iter().enumerate().all(|(i, v)| *v == i as u64 ^ 7), "the data came back");
}

/// A simulated device whose configuration asks the core to fetch a huge batch of faults
/// (`fault_batch`, validated only as non-zero) still has its faults serviced. The core's
/// service thread preallocated `fault_batch` entries up front: `usize::MAX` panicked it
/// ("capacity overflow", so every fault waited out the sim's 60 s limit), and a value such as
/// 2^40 asked the allocator for terabytes and aborted the process.
#[test]
fn a_huge_fault_batch_in_the_sim_config_still_services_faults() {
    let _ = env_logger::builder().is_test(true).try_init();
    let hm = Hetmm::new().unwrap();
    let cfg = SimConfig { memory_bytes: 8 << 20, fault_batch: usize::MAX, ..SimConfig::default() };
    let Ok(sim) = SimDevice::new(cfg) else { return }; // refusing it is fine too
    let dev = hm.attach_sim(sim).unwrap();
    let words = 4096 / 8;
    let b = hm.alloc::<u64>(words).unwrap();
    let (grid, k) = stream_write(b.ptr(), words, 3);
    let r = dev.launch(grid, &[Use::write(&b)], k).unwrap().wait_timeout(Duration::from_secs(20));
    assert!(r.is_ok(), "{r:?}");
    assert!(b.as_slice().iter().enumerate().all(|(i, v)| *v == i as u64 ^ 3));
}
